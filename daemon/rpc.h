/*
 * rpc.h - internals shared by daemon/rpc_*.c: the per-call state machine, the method table
 * and the helpers handlers use to read requests and write replies.
 *
 * One struct kvt_rpc_call per call. Its address (low bits tagged) is the completion-queue tag
 * of each batch it starts: TAG_OP for the call's single main batch in flight, TAG_CLOSE for
 * its GRPC_OP_RECV_CLOSE_ON_SERVER batch started when the call arrives. All completions of a
 * call arrive on the queue of the thread that accepted it, so a call's state is only touched
 * by that thread, except health Watch calls, which the health module drives under its lock.
 * The call is freed when its status has been sent (or it was cancelled) and no batch is in
 * flight.
 */
#ifndef KVT_RPC_H
#define KVT_RPC_H

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>

#include "rpc_server.h"

#define KVT_TENANT_LOCAL "local"

struct kvt_rpc_call;

/*
 * The worker pool (rpc_pool.c). A task is owned by its submitter and must stay valid until it
 * has run (or kvt_pool_cancel withdrew it). kvt_pool_submit queues it, or runs it on the
 * calling thread when the queue is full (back-pressure) or there is no pool; kvt_pool_wait
 * returns once it has run, running it here if no worker has taken it yet; kvt_pool_cancel
 * withdraws a task still queued (returns 0) or waits until it has run (returns 1).
 */
struct kvt_task {
	void (*fn)(void *arg);
	void *arg;
	int state;
	int detached;
	struct kvt_task *next, *prev;
};
int kvt_pool_start(unsigned n_threads, size_t queue_cap);
void kvt_pool_stop(void); /* runs what is queued, then joins the workers */
unsigned kvt_pool_threads(void);
/* Workers with nothing to do right now (a hint: what splitting a decode may use). */
unsigned kvt_pool_idle(void);
/* Workers running a task right now (tests observe where a step runs). */
unsigned kvt_pool_busy(void);
void kvt_pool_submit(struct kvt_task *t, void (*fn)(void *arg), void *arg);
/* Fire and forget: t is not touched once fn has started (fn may free it); no wait/cancel. */
void kvt_pool_submit_detached(struct kvt_task *t, void (*fn)(void *arg), void *arg);
void kvt_pool_wait(struct kvt_task *t);
int kvt_pool_cancel(struct kvt_task *t);
uint64_t kvt_pool_ran_inline(void);

enum kvt_rpc_kind { KVT_RPC_UNARY, KVT_RPC_CLIENT_STREAM, KVT_RPC_SERVER_STREAM };

/* What a handler produced: a status, a message for non-OK, and (unary / final) a reply. */
struct kvt_rpc_result {
	grpc_status_code code;
	char msg[512];
	grpc_byte_buffer *reply; /* owned; NULL for none */
};

/* Server-streaming step: 1 = *out holds the next message, 0 = done (res says the status),
 * 2 = park (health Watch: the health module resumes the call), 3 = *out is the last message:
 * it goes out with the OK status in one batch (one completion and one write fewer). */
enum { KVT_STREAM_DONE = 0, KVT_STREAM_MSG = 1, KVT_STREAM_PARK = 2, KVT_STREAM_LAST = 3 };

struct kvt_rpc_method {
	const char *path;
	const char *name; /* for counters and logs */
	enum kvt_rpc_kind kind;
	/* Unary: request bytes -> result. */
	void (*unary)(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		      struct kvt_rpc_result *res);
	/* Client streaming: each message (0 = go on, else res is final), then the end. */
	int (*on_message)(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
			  struct kvt_rpc_result *res);
	void (*on_end)(struct kvt_rpc_call *c, struct kvt_rpc_result *res);
	/* Optional: takes the message as gRPC's byte buffer (read without flattening it);
	 * used instead of on_message when present. */
	int (*on_message_bb)(struct kvt_rpc_call *c, grpc_byte_buffer *bb,
			     struct kvt_rpc_result *res);
	/* Server streaming: the request (0 = go on, else res is final), then messages. */
	int (*start)(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		     struct kvt_rpc_result *res);
	int (*next)(struct kvt_rpc_call *c, grpc_byte_buffer **out, struct kvt_rpc_result *res);
	/* Frees c->state (always called once, also on cancellation). */
	void (*cleanup)(struct kvt_rpc_call *c);
	/* next() may park the call (health Watch): its transitions run under
	 * kvt_rpc_watch_mu. */
	int parkable;
	/* Steps run on the worker pool instead of the completion-queue thread
	 * (KVT_POOL_* bits): the heavy ones. */
	unsigned pooled;
};

#define KVT_POOL_UNARY 1u /* unary() */
#define KVT_POOL_END 2u   /* on_end() of a client stream */
#define KVT_POOL_NEXT 4u  /* next() of a server stream */

extern pthread_mutex_t kvt_rpc_watch_mu;

enum kvt_call_phase {
	PHASE_REQUESTED,  /* waiting in grpc_server_request_call */
	PHASE_RECV,       /* reading a request message */
	PHASE_PROBE,      /* client stream ended: is it a half-close or a cancellation? */
	PHASE_SENDING,    /* a streamed message is being sent */
	PHASE_PARKED,     /* Watch: waiting for a health change */
	PHASE_WORK,       /* a step is on the worker pool (no batch of ours but CLOSE in flight) */
	PHASE_FINISHING,  /* status being sent */
	PHASE_DONE,       /* status sent or call cancelled; waiting for batches to drain */
};

struct kvt_rpc_call {
	struct kvt_rpc_server *srv;
	struct kvt_rpc_cq *cq;
	grpc_call *call;
	grpc_call_details details;
	grpc_metadata_array request_md;
	const struct kvt_rpc_method *method;
	int method_index;
	enum kvt_call_phase phase; /* atomic: read by the queue thread while a worker runs */
	int pending;          /* batches in flight (atomic for Watch) */
	int close_received;
	int cancelled;        /* from RECV_CLOSE_ON_SERVER */
	int initial_md_sent;
	int counted;          /* counted in active calls */
	grpc_byte_buffer *recv_buf;
	grpc_byte_buffer *send_buf;
	grpc_slice status_details;
	int have_status_details;
	struct kvt_rpc_result res;
	uint64_t start_us;
	void *state;          /* the handler's */
	struct kvt_task task; /* the step on the worker pool */
	grpc_slice req_slice; /* a pooled unary step's request */
	struct kvt_rpc_call *watch_next; /* health watchers list */
};

struct kvt_daemon *kvt_rpc_daemon(struct kvt_rpc_call *c);
const struct kvt_config *kvt_rpc_config(void);

/* Results. */
grpc_status_code kvt_rpc_status_from_errno(int neg_errno);
const char *kvt_rpc_code_name(grpc_status_code code);
void kvt_rpc_fail(struct kvt_rpc_result *res, grpc_status_code code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Packs msg into res->reply (status OK). */
void kvt_rpc_reply(struct kvt_rpc_result *res, const ProtobufCMessage *msg);
/* A byte buffer over a malloc'd buffer, freed by gRPC when it is done with it (no copy). */
grpc_byte_buffer *kvt_rpc_buffer_take(void *buf, size_t len);
grpc_byte_buffer *kvt_rpc_pack(const ProtobufCMessage *msg);
/* protobuf-c's unpack, then every string field (at any depth) checked on the wire for a NUL
 * byte (protobuf-c would cut the string there); NULL = res says why (INVALID_ARGUMENT naming
 * the message or the field). Every request is read through this. */
void *kvt_rpc_unpack(const ProtobufCMessageDescriptor *d, const uint8_t *req, size_t len,
		     struct kvt_rpc_result *res);
/* Reply buffers for large streamed messages (Fetch blocks). A buffer of up to
 * max_message_bytes comes from a pool of reply_pool_buffers reused buffers (already faulted
 * in, so a reply costs no page faults and no madvise); larger ones, or when every pooled
 * buffer is in flight, come from malloc. kvt_rpc_reply_buf_take hands the buffer to gRPC
 * without a copy and the pool gets it back when gRPC is done; kvt_rpc_reply_buf_put returns
 * one that was never handed over. */
void *kvt_rpc_reply_buf_get(size_t len);
void kvt_rpc_reply_buf_put(void *buf);
grpc_byte_buffer *kvt_rpc_reply_buf_take(void *buf, size_t len);
/* True when the call's deadline has passed (handlers check before heavy work). */
int kvt_rpc_deadline_passed(struct kvt_rpc_call *c);

/* The method tables (rpc_kvtier.c, rpc_health.c). */
extern const struct kvt_rpc_method kvt_rpc_kvtier_methods[];
extern const size_t kvt_rpc_kvtier_n_methods;
extern const struct kvt_rpc_method kvt_rpc_health_methods[];
extern const size_t kvt_rpc_health_n_methods;

/* Counters per method and status code (Stats). */
void kvt_rpc_counters_each(void (*fn)(void *ctx, const char *name, uint64_t value), void *ctx);

/* Health (rpc_health.c). */
void kvt_rpc_health_set_serving(int serving);
int kvt_rpc_health_serving(void);
/* Finishes parked Watch calls (shutdown). */
void kvt_rpc_health_shutdown(void);
/* The framework resumes a call: sends what next() gives (used by the health module). */
void kvt_rpc_call_resume(struct kvt_rpc_call *c);

/* kvt_codec isa name for Stats. */
const char *kvt_rpc_isa_name(void);

#endif

/*
 * rpc_server.c - the gRPC C-core server: listeners, completion-queue threads, and the
 * per-call state machine that drives unary, client-streaming and server-streaming methods
 * (see rpc.h for the call's life).
 */
#include "rpc.h"

#include <assert.h>
#include <errno.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "kvt_tsan.h"
#include "log.h"

#define TAG_NEW 0u
#define TAG_OP 1u
#define TAG_CLOSE 2u
#define TAG_SHUTDOWN 3u
/* Calls waiting in grpc_server_request_call per queue: new calls never wait for a slot. */
#define REQUESTS_PER_CQ 16
#define MAX_METHODS 32
#define N_CODES 17

struct kvt_rpc_cq {
	struct kvt_rpc_server *srv;
	grpc_completion_queue *cq;
	pthread_t thread;
	int started;
};

struct kvt_rpc_server {
	grpc_server *server;
	struct kvt_rpc_cq *cqs;
	int n_cqs;
	struct kvt_daemon *d;
	int shutting_down; /* atomic */
	uint64_t active_calls; /* atomic */
	uint64_t max_calls;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int shutdown_done;
	char socket_path[KVT_CONFIG_STR_MAX + 16];
	int tag_anchor; /* the shutdown tag's address */
};

static struct kvt_rpc_server *g_srv;
static const struct kvt_rpc_method *g_methods[MAX_METHODS];
static size_t g_n_methods;
/* Requests by method and final status; the last row counts unknown methods. */
static uint64_t g_counters[MAX_METHODS + 1][N_CODES];
/* Serializes the state transitions of parkable (health Watch) calls; see rpc.h. */
pthread_mutex_t kvt_rpc_watch_mu = PTHREAD_MUTEX_INITIALIZER;

static void *tag_of(void *p, unsigned kind)
{
	assert(((uintptr_t)p & 3u) == 0);
	return (void *)((uintptr_t)p | kind);
}

struct kvt_daemon *kvt_rpc_daemon(struct kvt_rpc_call *c)
{
	return c->srv->d;
}

const struct kvt_config *kvt_rpc_config(void)
{
	return &kvt_config_live;
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

grpc_status_code kvt_rpc_status_from_errno(int e)
{
	switch (e) {
	case 0: return GRPC_STATUS_OK;
	case -EINVAL: case -ERANGE: case -EBADMSG: case -E2BIG: case -EDOM:
		return GRPC_STATUS_INVALID_ARGUMENT;
	case -ENOENT: return GRPC_STATUS_NOT_FOUND;
	case -EEXIST: return GRPC_STATUS_ALREADY_EXISTS;
	case -ENOMEM: case -ENOSPC: case -EMFILE: case -EMSGSIZE: case -EDQUOT:
		return GRPC_STATUS_RESOURCE_EXHAUSTED;
	case -ESHUTDOWN: case -EAGAIN: return GRPC_STATUS_UNAVAILABLE;
	case -ETIMEDOUT: return GRPC_STATUS_DEADLINE_EXCEEDED;
	case -ECANCELED: return GRPC_STATUS_CANCELLED;
	case -ENOTSUP: case -ENOSYS: return GRPC_STATUS_UNIMPLEMENTED;
	case -EBUSY: case -EALREADY: return GRPC_STATUS_FAILED_PRECONDITION;
	case -ESTALE: return GRPC_STATUS_ABORTED;
	case -EPERM: return GRPC_STATUS_PERMISSION_DENIED;
	case -EACCES: return GRPC_STATUS_UNAUTHENTICATED;
	default: return GRPC_STATUS_INTERNAL;
	}
}

const char *kvt_rpc_code_name(grpc_status_code code)
{
	static const char *const names[N_CODES] = {
		"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
		"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
		"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
		"UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
	return (unsigned)code < N_CODES ? names[code] : "UNKNOWN";
}

void kvt_rpc_fail(struct kvt_rpc_result *res, grpc_status_code code, const char *fmt, ...)
{
	va_list ap;
	res->code = code;
	va_start(ap, fmt);
	vsnprintf(res->msg, sizeof res->msg, fmt, ap);
	va_end(ap);
	if (res->reply) {
		grpc_byte_buffer_destroy(res->reply);
		res->reply = NULL;
	}
}

static void free_user_buf(void *p)
{
	KVT_TSAN_ACQUIRE(p);
	free(p);
}

grpc_byte_buffer *kvt_rpc_buffer_take(void *buf, size_t len)
{
	KVT_TSAN_RELEASE(buf); /* freed by gRPC, on any thread */
	grpc_slice s = grpc_slice_new_with_user_data(buf, len, free_user_buf, buf);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

/* ---- reply buffer pool ----------------------------------------------------------------- */

/* Each reply buffer carries this header in front of it: whether it belongs to the pool. */
struct reply_hdr {
	uint64_t magic;
	uint32_t pooled;
	uint32_t reserved;
	struct reply_hdr *next; /* free list */
	uint8_t pad[40];
};
_Static_assert(sizeof(struct reply_hdr) == 64, "reply buffers stay 64-byte aligned");
#define REPLY_MAGIC 0x6b7674726570ull /* "kvtrep" */

static struct {
	pthread_mutex_t mu;
	struct reply_hdr *free_list;
	uint64_t made;      /* pooled buffers in existence (<= max) */
	uint64_t max;       /* reply_pool_buffers, read at first use */
	size_t buf_bytes;   /* max_message_bytes, read at first use */
	int taken;             /* a buffer left the pool since the last trim tick */
	uint64_t active_ms;    /* the last trim tick that saw one leave */
	int init;
} g_reply_pool = {.mu = PTHREAD_MUTEX_INITIALIZER};

void *kvt_rpc_reply_buf_get(size_t len)
{
	struct reply_hdr *h = NULL;
	pthread_mutex_lock(&g_reply_pool.mu);
	if (!g_reply_pool.init) {
		/* Neither option is reloadable: fixed for the process's life. */
		g_reply_pool.max = kvt_config_live.reply_pool_buffers;
		g_reply_pool.buf_bytes = (size_t)kvt_config_live.max_message_bytes;
		g_reply_pool.init = 1;
	}
	if (len <= g_reply_pool.buf_bytes) {
		g_reply_pool.taken = 1; /* the trim tick reads the clock, not this hot path */
		if (g_reply_pool.free_list) {
			h = g_reply_pool.free_list;
			g_reply_pool.free_list = h->next;
		} else if (g_reply_pool.made < g_reply_pool.max) {
			h = aligned_alloc(64, sizeof(*h) + g_reply_pool.buf_bytes);
			if (h) {
				g_reply_pool.made++;
				h->magic = REPLY_MAGIC;
				h->pooled = 1;
			}
		}
	}
	pthread_mutex_unlock(&g_reply_pool.mu);
	if (!h) {
		h = aligned_alloc(64, sizeof(*h) + ((len + 63) & ~(size_t)63));
		if (!h)
			return NULL;
		h->magic = REPLY_MAGIC;
		h->pooled = 0;
	}
	h->next = NULL;
	return h + 1;
}

void kvt_rpc_reply_buf_put(void *buf)
{
	if (!buf)
		return;
	struct reply_hdr *h = (struct reply_hdr *)buf - 1;
	if (h->magic != REPLY_MAGIC) {
		/* Not one of ours: a memory corruption; stop before it spreads. */
		kvt_log_error("reply buffer with a bad header", NULL);
		abort();
	}
	if (!h->pooled) {
		h->magic = 0;
		free(h);
		return;
	}
	pthread_mutex_lock(&g_reply_pool.mu);
	h->next = g_reply_pool.free_list;
	g_reply_pool.free_list = h;
	pthread_mutex_unlock(&g_reply_pool.mu);
}

/* Frees the idle pooled buffers; the caller holds the lock. Buffers in flight return to the
 * list when gRPC is done with them and are freed at a later trim. */
static uint64_t reply_pool_free_idle(void)
{
	uint64_t n = 0;
	while (g_reply_pool.free_list) {
		struct reply_hdr *h = g_reply_pool.free_list;
		g_reply_pool.free_list = h->next;
		g_reply_pool.made--;
		h->magic = 0;
		free(h);
		n++;
	}
	return n;
}

uint64_t kvt_rpc_reply_pool_trim(uint64_t now_ms)
{
	uint64_t idle_ms = KVT_CFG(reply_pool_idle_ms), n = 0;
	if (!idle_ms)
		return 0;
	pthread_mutex_lock(&g_reply_pool.mu);
	if (g_reply_pool.taken) {
		g_reply_pool.taken = 0;
		g_reply_pool.active_ms = now_ms;
	} else if (g_reply_pool.free_list && now_ms - g_reply_pool.active_ms >= idle_ms) {
		n = reply_pool_free_idle();
	}
	pthread_mutex_unlock(&g_reply_pool.mu);
	return n;
}

uint64_t kvt_rpc_reply_pool_resident(void)
{
	pthread_mutex_lock(&g_reply_pool.mu);
	uint64_t n = g_reply_pool.made;
	pthread_mutex_unlock(&g_reply_pool.mu);
	return n;
}

/* Server teardown. */
static void reply_pool_drain(void)
{
	pthread_mutex_lock(&g_reply_pool.mu);
	reply_pool_free_idle();
	pthread_mutex_unlock(&g_reply_pool.mu);
}

static void reply_buf_destroy(void *p)
{
	KVT_TSAN_ACQUIRE(p);
	kvt_rpc_reply_buf_put(p);
}

grpc_byte_buffer *kvt_rpc_reply_buf_take(void *buf, size_t len)
{
	KVT_TSAN_RELEASE(buf); /* given back by gRPC's slice destructor, on any thread */
	grpc_slice s = grpc_slice_new_with_user_data(buf, len, reply_buf_destroy, buf);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

/* A varint at p[*pos] (n bytes in all) into *v; 0, or -1 where it runs off the end. */
static int wire_varint(const uint8_t *p, size_t n, size_t *pos, uint64_t *v)
{
	uint64_t x = 0;
	for (int shift = 0; shift <= 63; shift += 7) {
		if (*pos >= n)
			return -1;
		const uint8_t b = p[(*pos)++];
		x |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80)) {
			*v = x;
			return 0;
		}
	}
	return -1;
}

/*
 * protobuf-c keeps a string's bytes up to its first NUL: a session_id "a\0b" on the wire reads
 * as "a", so a request naming one session could act on another (DropSession of "x\0y" drops
 * "x"), and check_id never sees the byte it exists to refuse. So every string field of a
 * request (at any depth) is checked on the wire for a NUL before the message is used.
 * 0 = none; -1 = res names the field. Only called on bytes protobuf-c parsed.
 */
static int wire_strings_ok(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t n,
			   const char *parent, int depth, struct kvt_rpc_result *res)
{
	size_t pos = 0;
	while (pos < n) {
		uint64_t tag, len;
		if (wire_varint(p, n, &pos, &tag))
			return 0;
		switch (tag & 7) {
		case 0:
			if (wire_varint(p, n, &pos, &len))
				return 0;
			continue;
		case 1: pos += 8; continue;
		case 5: pos += 4; continue;
		case 2: break;
		default: return 0; /* groups: nothing of ours */
		}
		if (wire_varint(p, n, &pos, &len) || len > n - pos)
			return 0;
		const ProtobufCFieldDescriptor *f =
			protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3));
		if (f && f->type == PROTOBUF_C_TYPE_STRING) {
			const uint8_t *z = memchr(p + pos, 0, (size_t)len);
			if (z) {
				kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
					     "%s%s%s has a NUL byte at offset %zu (printable ASCII only)",
					     parent, *parent ? "." : "", f->name,
					     (size_t)(z - (p + pos)));
				return -1;
			}
		} else if (f && f->type == PROTOBUF_C_TYPE_MESSAGE && depth < 8) {
			if (wire_strings_ok(f->descriptor, p + pos, (size_t)len, f->name, depth + 1,
					    res))
				return -1;
		}
		pos += (size_t)len;
	}
	return 0;
}

void *kvt_rpc_unpack(const ProtobufCMessageDescriptor *d, const uint8_t *req, size_t len,
		     struct kvt_rpc_result *res)
{
	ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, req);
	if (!m) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "malformed %s", d->short_name);
		return NULL;
	}
	if (wire_strings_ok(d, req, len, "", 0, res)) {
		protobuf_c_message_free_unpacked(m, NULL);
		return NULL;
	}
	return m;
}

grpc_byte_buffer *kvt_rpc_pack(const ProtobufCMessage *msg)
{
	size_t n = protobuf_c_message_get_packed_size(msg);
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf)
		return NULL;
	size_t w = protobuf_c_message_pack(msg, buf);
	assert(w == n);
	(void)w;
	return kvt_rpc_buffer_take(buf, n);
}

void kvt_rpc_reply(struct kvt_rpc_result *res, const ProtobufCMessage *msg)
{
	res->code = GRPC_STATUS_OK;
	res->msg[0] = '\0';
	if (res->reply)
		grpc_byte_buffer_destroy(res->reply);
	res->reply = kvt_rpc_pack(msg);
	if (!res->reply)
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory packing the reply");
}

int kvt_rpc_deadline_passed(struct kvt_rpc_call *c)
{
	gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
	gpr_timespec dl = gpr_convert_clock_type(c->details.deadline, GPR_CLOCK_MONOTONIC);
	return gpr_time_cmp(dl, now) < 0;
}

void kvt_rpc_counters_each(void (*fn)(void *ctx, const char *name, uint64_t value), void *ctx)
{
	char name[128];
	for (size_t m = 0; m <= g_n_methods; m++)
		for (int code = 0; code < N_CODES; code++) {
			uint64_t v = __atomic_load_n(&g_counters[m][code], __ATOMIC_RELAXED);
			if (!v)
				continue;
			snprintf(name, sizeof name, "rpc.%s.%s",
				 m < g_n_methods ? g_methods[m]->name : "unknown",
				 kvt_rpc_code_name((grpc_status_code)code));
			fn(ctx, name, v);
		}
}

/* ---- the call state machine ---------------------------------------------------------- */

static void call_step_locked(struct kvt_rpc_call *c, unsigned kind, int success);

/* A call's phase is written by whichever thread runs its step (its queue thread, or a worker
 * while the phase is PHASE_WORK) and read by the queue thread when the call's CLOSE batch
 * completes meanwhile. */
static void set_phase(struct kvt_rpc_call *c, enum kvt_call_phase p)
{
	__atomic_store_n(&c->phase, p, __ATOMIC_RELEASE);
}

static enum kvt_call_phase get_phase(const struct kvt_rpc_call *c)
{
	return __atomic_load_n(&c->phase, __ATOMIC_ACQUIRE);
}

static int is_parkable(const struct kvt_rpc_call *c)
{
	return c->method && c->method->parkable;
}

static void start_batch(struct kvt_rpc_call *c, const grpc_op *ops, size_t n, unsigned kind)
{
	__atomic_fetch_add(&c->pending, 1, __ATOMIC_RELAXED);
	KVT_TSAN_RELEASE(c); /* the completion comes back to cq_main through gRPC */
	grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag_of(c, kind), NULL);
	/* Every batch we start is well formed by construction: failure is a bug. */
	assert(e == GRPC_CALL_OK && "grpc_call_start_batch refused a batch");
	(void)e;
}

static struct kvt_rpc_call *call_new(struct kvt_rpc_server *srv, struct kvt_rpc_cq *cq)
{
	struct kvt_rpc_call *c = calloc(1, sizeof *c);
	if (!c)
		return NULL;
	c->srv = srv;
	c->cq = cq;
	c->method_index = -1;
	set_phase(c, PHASE_REQUESTED);
	grpc_call_details_init(&c->details);
	grpc_metadata_array_init(&c->request_md);
	return c;
}

static void request_one(struct kvt_rpc_server *srv, struct kvt_rpc_cq *cq)
{
	struct kvt_rpc_call *c = call_new(srv, cq);
	if (!c) {
		kvt_log_error("out of memory requesting a call", NULL);
		return;
	}
	KVT_TSAN_RELEASE(c);
	grpc_call_error e = grpc_server_request_call(srv->server, &c->call, &c->details,
						     &c->request_md, cq->cq, cq->cq,
						     tag_of(c, TAG_NEW));
	if (e != GRPC_CALL_OK) {
		kvt_log_error("grpc_server_request_call failed", "error=%d", (int)e);
		grpc_call_details_destroy(&c->details);
		grpc_metadata_array_destroy(&c->request_md);
		free(c);
	}
}

static void call_cleanup_state(struct kvt_rpc_call *c)
{
	if (c->method && c->method->cleanup && c->state)
		c->method->cleanup(c);
	c->state = NULL;
}

static void call_free(struct kvt_rpc_call *c)
{
	call_cleanup_state(c);
	if (c->recv_buf)
		grpc_byte_buffer_destroy(c->recv_buf);
	if (c->send_buf)
		grpc_byte_buffer_destroy(c->send_buf);
	if (c->res.reply)
		grpc_byte_buffer_destroy(c->res.reply);
	if (c->have_status_details)
		grpc_slice_unref(c->status_details);
	if (c->call)
		grpc_call_unref(c->call);
	if (c->counted)
		__atomic_fetch_sub(&c->srv->active_calls, 1, __ATOMIC_RELAXED);
	grpc_call_details_destroy(&c->details);
	grpc_metadata_array_destroy(&c->request_md);
	free(c);
}

/* Returns 1 when the call was freed. */
static int maybe_free(struct kvt_rpc_call *c)
{
	if (get_phase(c) == PHASE_DONE && c->close_received &&
	    __atomic_load_n(&c->pending, __ATOMIC_RELAXED) == 0) {
		call_free(c);
		return 1;
	}
	return 0;
}

static void count_status(struct kvt_rpc_call *c, grpc_status_code code)
{
	size_t m = c->method_index >= 0 ? (size_t)c->method_index : g_n_methods;
	if ((unsigned)code < N_CODES)
		__atomic_fetch_add(&g_counters[m][code], 1, __ATOMIC_RELAXED);
}

/* The call ends without a status of ours: the peer went away, cancelled it, or the stream
 * broke. Counted as CANCELLED so every call shows in rpc.<Method>.<CODE> (a client killed
 * mid-stream included); its state (an Append's staging, a Fetch's decode-ahead) is dropped. */
static void call_broken(struct kvt_rpc_call *c)
{
	set_phase(c, PHASE_DONE);
	count_status(c, GRPC_STATUS_CANCELLED);
	call_cleanup_state(c);
}

static void call_finish(struct kvt_rpc_call *c)
{
	struct kvt_rpc_result *res = &c->res;
	grpc_op ops[3];
	size_t n = 0;
	memset(ops, 0, sizeof ops);
	if (res->code != GRPC_STATUS_OK && res->reply) {
		grpc_byte_buffer_destroy(res->reply);
		res->reply = NULL;
	}
	if (!c->initial_md_sent) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		n++;
		c->initial_md_sent = 1;
	}
	if (res->reply) {
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n].data.send_message.send_message = res->reply;
		n++;
	}
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = res->code;
	if (res->code != GRPC_STATUS_OK && res->msg[0]) {
		c->status_details = grpc_slice_from_copied_string(res->msg);
		c->have_status_details = 1;
		ops[n].data.send_status_from_server.status_details = &c->status_details;
	}
	n++;
	count_status(c, res->code);
	const char *name = c->method ? c->method->name : "unknown";
	uint64_t us = now_us() - c->start_us;
	if (res->code == GRPC_STATUS_INTERNAL) {
		char q[600];
		kvt_log_error("request failed: internal error", "method=%s code=%s error=%s us=%llu",
			      name, kvt_rpc_code_name(res->code),
			      kvt_log_quote(q, sizeof q, res->msg), (unsigned long long)us);
	} else if (res->code != GRPC_STATUS_OK && kvt_log_get_level() <= KVT_LOG_DEBUG) {
		char q[600];
		kvt_log_debug("request failed", "method=%s code=%s error=%s us=%llu", name,
			      kvt_rpc_code_name(res->code), kvt_log_quote(q, sizeof q, res->msg),
			      (unsigned long long)us);
	} else if (kvt_log_get_level() <= KVT_LOG_DEBUG) {
		kvt_log_debug("request", "method=%s code=OK us=%llu", name, (unsigned long long)us);
	}
	set_phase(c, PHASE_FINISHING);
	start_batch(c, ops, n, TAG_OP);
}

static void call_recv(struct kvt_rpc_call *c)
{
	grpc_op op;
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = &c->recv_buf;
	set_phase(c, PHASE_RECV);
	start_batch(c, &op, 1, TAG_OP);
}

static void call_send(struct kvt_rpc_call *c, grpc_byte_buffer *bb)
{
	grpc_op ops[2];
	size_t n = 0;
	memset(ops, 0, sizeof ops);
	if (!c->initial_md_sent) {
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		c->initial_md_sent = 1;
	}
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	ops[n].data.send_message.send_message = bb;
	n++;
	c->send_buf = bb;
	set_phase(c, PHASE_SENDING);
	start_batch(c, ops, n, TAG_OP);
}

static void stream_next_here(struct kvt_rpc_call *c)
{
	grpc_byte_buffer *bb = NULL;
	int rc = c->method->next(c, &bb, &c->res);
	if (rc == KVT_STREAM_MSG) {
		assert(bb);
		call_send(c, bb);
	} else if (rc == KVT_STREAM_LAST) {
		assert(bb && !c->res.reply);
		c->res.code = GRPC_STATUS_OK;
		c->res.msg[0] = '\0';
		c->res.reply = bb;
		call_finish(c);
	} else if (rc == KVT_STREAM_PARK) {
		set_phase(c, PHASE_PARKED);
	} else {
		call_finish(c);
	}
}

/*
 * Pooled steps. The queue thread sets PHASE_WORK and hands the step to the pool; the worker
 * runs the handler and starts the call's next batch itself (grpc_call_start_batch is thread
 * safe), whose completion comes back to the call's queue thread as always. While a step is on
 * the pool only the call's CLOSE batch can complete, and that never frees a call that is not
 * PHASE_DONE, so the worker is the only thread touching the call.
 */
static void work_next(void *arg)
{
	stream_next_here(arg);
}

static void work_unary(void *arg)
{
	struct kvt_rpc_call *c = arg;
	c->method->unary(c, GRPC_SLICE_START_PTR(c->req_slice), GRPC_SLICE_LENGTH(c->req_slice),
			 &c->res);
	grpc_slice_unref(c->req_slice);
	c->req_slice = grpc_empty_slice();
	call_finish(c);
}

static void work_end(void *arg)
{
	struct kvt_rpc_call *c = arg;
	c->method->on_end(c, &c->res);
	call_finish(c);
}

static void to_pool(struct kvt_rpc_call *c, void (*fn)(void *))
{
	set_phase(c, PHASE_WORK);
	kvt_pool_submit_detached(&c->task, fn, c);
}

static void stream_next(struct kvt_rpc_call *c)
{
	if (c->method->pooled & KVT_POOL_NEXT)
		to_pool(c, work_next);
	else
		stream_next_here(c);
}

void kvt_rpc_call_resume(struct kvt_rpc_call *c)
{
	/* Called with kvt_rpc_watch_mu held, for a parked call. */
	if (get_phase(c) == PHASE_PARKED && !c->cancelled)
		stream_next(c);
}

static const struct kvt_rpc_method *find_method(const char *path, size_t len, int *index)
{
	for (size_t i = 0; i < g_n_methods; i++) {
		if (strlen(g_methods[i]->path) == len && !memcmp(g_methods[i]->path, path, len)) {
			*index = (int)i;
			return g_methods[i];
		}
	}
	*index = -1;
	return NULL;
}

static void call_arrived(struct kvt_rpc_call *c)
{
	struct kvt_rpc_server *srv = c->srv;
	c->start_us = now_us();
	grpc_op op;
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	op.data.recv_close_on_server.cancelled = &c->cancelled;
	start_batch(c, &op, 1, TAG_CLOSE);

	size_t plen = GRPC_SLICE_LENGTH(c->details.method);
	const char *path = (const char *)GRPC_SLICE_START_PTR(c->details.method);
	c->method = find_method(path, plen, &c->method_index);
	if (!c->method) {
		kvt_rpc_fail(&c->res, GRPC_STATUS_UNIMPLEMENTED, "unknown method %.*s",
			     (int)(plen > 200 ? 200 : plen), path);
		call_finish(c);
		return;
	}
	uint64_t active = __atomic_add_fetch(&srv->active_calls, 1, __ATOMIC_RELAXED);
	c->counted = 1;
	if (active > srv->max_calls) {
		kvt_rpc_fail(&c->res, GRPC_STATUS_RESOURCE_EXHAUSTED,
			     "too many calls in flight: max_concurrent_calls is %llu",
			     (unsigned long long)srv->max_calls);
		call_finish(c);
		return;
	}
	call_recv(c);
}

static void on_received(struct kvt_rpc_call *c, int success)
{
	const struct kvt_rpc_method *m = c->method;
	if (!success) {
		/* The stream broke or was cancelled: a client stream's staging is dropped by
		 * cleanup, nothing is committed. */
		call_broken(c);
		return;
	}
	grpc_byte_buffer *bb = c->recv_buf;
	c->recv_buf = NULL;
	if (!bb) {
		if (m->kind == KVT_RPC_CLIENT_STREAM) {
			/* A cancelled or reset stream also ends with "no more messages". gRPC
			 * tells an error from a half-close; and before committing, the initial
			 * metadata goes out as a probe: on a cancelled call that batch fails. */
			if (grpc_call_failed_before_recv_message(c->call)) {
				call_broken(c);
				return;
			}
			grpc_op op;
			memset(&op, 0, sizeof op);
			op.op = GRPC_OP_SEND_INITIAL_METADATA;
			c->initial_md_sent = 1;
			set_phase(c, PHASE_PROBE);
			start_batch(c, &op, 1, TAG_OP);
			return;
		} else {
			kvt_rpc_fail(&c->res, GRPC_STATUS_INVALID_ARGUMENT,
				     "the request message is missing");
		}
		call_finish(c);
		return;
	}
	if (m->kind == KVT_RPC_CLIENT_STREAM && m->on_message_bb) {
		int brc = m->on_message_bb(c, bb, &c->res);
		grpc_byte_buffer_destroy(bb);
		if (brc)
			call_finish(c);
		else
			call_recv(c);
		return;
	}
	grpc_byte_buffer_reader reader;
	if (!grpc_byte_buffer_reader_init(&reader, bb)) {
		grpc_byte_buffer_destroy(bb);
		kvt_rpc_fail(&c->res, GRPC_STATUS_INVALID_ARGUMENT,
			     "could not read the request (bad compression?)");
		call_finish(c);
		return;
	}
	grpc_slice s = grpc_byte_buffer_reader_readall(&reader);
	grpc_byte_buffer_reader_destroy(&reader);
	grpc_byte_buffer_destroy(bb);
	const uint8_t *p = GRPC_SLICE_START_PTR(s);
	size_t len = GRPC_SLICE_LENGTH(s);
	int rc;
	switch (m->kind) {
	case KVT_RPC_UNARY:
		if (m->pooled & KVT_POOL_UNARY) {
			c->req_slice = s;
			to_pool(c, work_unary);
			return;
		}
		m->unary(c, p, len, &c->res);
		grpc_slice_unref(s);
		call_finish(c);
		return;
	case KVT_RPC_CLIENT_STREAM:
		rc = m->on_message(c, p, len, &c->res);
		grpc_slice_unref(s);
		if (rc)
			call_finish(c);
		else
			call_recv(c);
		return;
	case KVT_RPC_SERVER_STREAM:
		rc = m->start(c, p, len, &c->res);
		grpc_slice_unref(s);
		if (rc)
			call_finish(c);
		else
			stream_next(c);
		return;
	}
}

static void call_step_locked(struct kvt_rpc_call *c, unsigned kind, int success)
{
	if (kind == TAG_CLOSE) {
		__atomic_fetch_sub(&c->pending, 1, __ATOMIC_RELAXED);
		c->close_received = 1;
		if (c->cancelled && get_phase(c) == PHASE_PARKED) {
			call_broken(c);
		}
		maybe_free(c);
		return;
	}
	assert(kind == TAG_OP);
	__atomic_fetch_sub(&c->pending, 1, __ATOMIC_RELAXED);
	switch (get_phase(c)) {
	case PHASE_RECV:
		on_received(c, success);
		break;
	case PHASE_PROBE:
		if (!success || c->cancelled) {
			call_broken(c);
		} else {
			if (c->method->pooled & KVT_POOL_END) {
				to_pool(c, work_end);
				break;
			}
			c->method->on_end(c, &c->res);
			call_finish(c);
		}
		break;
	case PHASE_SENDING:
		grpc_byte_buffer_destroy(c->send_buf);
		c->send_buf = NULL;
		if (!success) {
			call_broken(c);
		} else {
			stream_next(c);
		}
		break;
	case PHASE_FINISHING:
		if (c->res.reply) {
			grpc_byte_buffer_destroy(c->res.reply);
			c->res.reply = NULL;
		}
		set_phase(c, PHASE_DONE);
		call_cleanup_state(c);
		break;
	default:
		assert(0 && "completion in an unexpected call phase");
	}
	maybe_free(c);
}

static void call_step(struct kvt_rpc_call *c, unsigned kind, int success)
{
	if (is_parkable(c)) {
		pthread_mutex_lock(&kvt_rpc_watch_mu);
		call_step_locked(c, kind, success);
		pthread_mutex_unlock(&kvt_rpc_watch_mu);
	} else {
		call_step_locked(c, kind, success);
	}
}

static void *cq_main(void *arg)
{
	struct kvt_rpc_cq *cq = arg;
	struct kvt_rpc_server *srv = cq->srv;
	for (;;) {
		grpc_event ev = grpc_completion_queue_next(
			cq->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		unsigned kind = (unsigned)((uintptr_t)ev.tag & 3u);
		void *p = (void *)((uintptr_t)ev.tag & ~(uintptr_t)3u);
		if (kind == TAG_SHUTDOWN) {
			pthread_mutex_lock(&srv->mu);
			srv->shutdown_done = 1;
			pthread_cond_broadcast(&srv->cv);
			pthread_mutex_unlock(&srv->mu);
			continue;
		}
		struct kvt_rpc_call *c = p;
		KVT_TSAN_ACQUIRE(c);
		if (kind == TAG_NEW) {
			if (!ev.success) {
				/* The server is shutting down: this slot never got a call. */
				grpc_call_details_destroy(&c->details);
				grpc_metadata_array_destroy(&c->request_md);
				free(c);
				continue;
			}
			if (!__atomic_load_n(&srv->shutting_down, __ATOMIC_RELAXED))
				request_one(srv, cq);
			call_arrived(c);
			continue;
		}
		call_step(c, kind, ev.success);
	}
	return NULL;
}

/* ---- listeners -------------------------------------------------------------------------- */

static int mkdir_parents(const char *path, char *err, size_t errlen)
{
	char buf[KVT_CONFIG_STR_MAX + 16];
	snprintf(buf, sizeof buf, "%s", path);
	char *slash = strrchr(buf, '/');
	if (!slash || slash == buf)
		return 0;
	*slash = '\0';
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0750) && errno != EEXIST)
			goto fail;
		*p = '/';
	}
	if (mkdir(buf, 0750) && errno != EEXIST)
		goto fail;
	return 0;
fail:
	snprintf(err, errlen, "socket directory %s: %s", buf, strerror(errno));
	return -errno;
}

/* A socket file left by a crashed daemon is removed; a live one means another daemon. */
static int clear_stale_socket(const char *path, char *err, size_t errlen)
{
	struct stat st;
	if (lstat(path, &st) != 0)
		return 0;
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "socket %s exists and is not a socket", path);
		return -EEXIST;
	}
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof sa.sun_path) {
		snprintf(err, errlen, "socket path %s is longer than %zu bytes", path,
			 sizeof sa.sun_path - 1);
		return -ENAMETOOLONG;
	}
	snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	close(fd);
	if (rc == 0) {
		snprintf(err, errlen, "socket %s is in use by another kvtierd", path);
		return -EADDRINUSE;
	}
	if (unlink(path) != 0 && errno != ENOENT) {
		snprintf(err, errlen, "removing stale socket %s: %s", path, strerror(errno));
		return -errno;
	}
	return 0;
}

int kvt_rpc_server_start(const struct kvt_config *cfg, struct kvt_daemon *d,
			 struct kvt_rpc_server **out, char *err, size_t errlen)
{
	int rc = 0;
	struct kvt_rpc_server *srv = calloc(1, sizeof *srv);
	if (!srv) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	srv->d = d;
	srv->max_calls = cfg->max_concurrent_calls;
	pthread_mutex_init(&srv->mu, NULL);
	pthread_cond_init(&srv->cv, NULL);
	g_n_methods = 0;
	for (size_t i = 0; i < kvt_rpc_kvtier_n_methods; i++)
		g_methods[g_n_methods++] = &kvt_rpc_kvtier_methods[i];
	for (size_t i = 0; i < kvt_rpc_health_n_methods; i++)
		g_methods[g_n_methods++] = &kvt_rpc_health_methods[i];
	assert(g_n_methods <= MAX_METHODS);

	grpc_arg args[3];
	memset(args, 0, sizeof args);
	args[0].type = GRPC_ARG_INTEGER;
	args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
	args[0].value.integer = (int)cfg->max_message_bytes;
	args[1].type = GRPC_ARG_INTEGER;
	args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
	args[1].value.integer = (int)cfg->max_message_bytes;
	args[2].type = GRPC_ARG_INTEGER;
	args[2].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
	args[2].value.integer = 0;
	grpc_channel_args chargs = {.num_args = 3, .args = args};
	srv->server = grpc_server_create(&chargs, NULL);

	srv->n_cqs = (int)cfg->cq_threads;
	srv->cqs = calloc((size_t)srv->n_cqs, sizeof *srv->cqs);
	if (!srv->cqs) {
		snprintf(err, errlen, "out of memory");
		rc = -ENOMEM;
		goto fail;
	}
	for (int i = 0; i < srv->n_cqs; i++) {
		srv->cqs[i].srv = srv;
		srv->cqs[i].cq = grpc_completion_queue_create_for_next(NULL);
		grpc_server_register_completion_queue(srv->server, srv->cqs[i].cq, NULL);
	}

	kvt_config_socket_path(cfg, srv->socket_path, sizeof srv->socket_path);
	rc = mkdir_parents(srv->socket_path, err, errlen);
	if (rc)
		goto fail;
	rc = clear_stale_socket(srv->socket_path, err, errlen);
	if (rc)
		goto fail;
	char addr[KVT_CONFIG_STR_MAX + 32];
	snprintf(addr, sizeof addr, "unix:%s", srv->socket_path);
	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	/* The socket is born 0660 (no window with looser permissions). */
	mode_t old_umask = umask(0117);
	int port = grpc_server_add_http2_port(srv->server, addr, creds);
	umask(old_umask);
	if (!port) {
		grpc_server_credentials_release(creds);
		snprintf(err, errlen, "cannot listen on unix socket %s", srv->socket_path);
		rc = -EADDRINUSE;
		goto fail;
	}
	if (cfg->listen_tcp[0]) {
		/* kvt_config_validate allowed it: loopback and insecure_loopback. */
		int tport = grpc_server_add_http2_port(srv->server, cfg->listen_tcp, creds);
		if (!tport) {
			grpc_server_credentials_release(creds);
			snprintf(err, errlen, "cannot listen on TCP %s", cfg->listen_tcp);
			rc = -EADDRINUSE;
			goto fail;
		}
	}
	grpc_server_credentials_release(creds);
	unsigned n_workers = (unsigned)cfg->workers;
	if (!n_workers) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		n_workers = n > 0 ? (unsigned)n : 1;
	}
	/* Every call has at most one step and one decode-ahead on the pool: a queue that
	 * holds that never pushes back in normal operation. */
	if (kvt_pool_start(n_workers, 2 * cfg->max_concurrent_calls + 64)) {
		snprintf(err, errlen, "cannot start %u worker threads", n_workers);
		rc = -EAGAIN;
		goto fail;
	}
	grpc_server_start(srv->server);
	chmod(srv->socket_path, 0660);

	for (int i = 0; i < srv->n_cqs; i++)
		for (int k = 0; k < REQUESTS_PER_CQ; k++)
			request_one(srv, &srv->cqs[i]);
	for (int i = 0; i < srv->n_cqs; i++) {
		if (pthread_create(&srv->cqs[i].thread, NULL, cq_main, &srv->cqs[i]) != 0) {
			snprintf(err, errlen, "cannot start completion-queue thread %d", i);
			rc = -EAGAIN;
			/* Threads already running drain through the normal stop path. */
			g_srv = srv;
			*out = srv;
			kvt_rpc_server_stop(srv, 0);
			kvt_rpc_server_destroy(srv);
			*out = NULL;
			return rc;
		}
		srv->cqs[i].started = 1;
	}
	kvt_rpc_health_set_serving(1);
	g_srv = srv;
	*out = srv;
	char q[300];
	kvt_log_info("listening",
		     "socket=%s tcp=%s cq_threads=%d workers=%u max_message_bytes=%llu",
		     kvt_log_quote(q, sizeof q, srv->socket_path),
		     cfg->listen_tcp[0] ? cfg->listen_tcp : "off", srv->n_cqs, kvt_pool_threads(),
		     (unsigned long long)cfg->max_message_bytes);
	return 0;
fail:
	if (srv->cqs) {
		for (int i = 0; i < srv->n_cqs; i++)
			if (srv->cqs[i].cq) {
				grpc_completion_queue_shutdown(srv->cqs[i].cq);
				while (grpc_completion_queue_next(srv->cqs[i].cq,
								  gpr_inf_future(GPR_CLOCK_REALTIME),
								  NULL).type != GRPC_QUEUE_SHUTDOWN)
					;
			}
	}
	grpc_server_destroy(srv->server);
	for (int i = 0; srv->cqs && i < srv->n_cqs; i++)
		if (srv->cqs[i].cq)
			grpc_completion_queue_destroy(srv->cqs[i].cq);
	free(srv->cqs);
	free(srv);
	return rc;
}

int kvt_rpc_server_stop(struct kvt_rpc_server *srv, uint64_t grace_ms)
{
	int forced = 0;
	kvt_rpc_health_set_serving(0);
	__atomic_store_n(&srv->shutting_down, 1, __ATOMIC_RELAXED);
	grpc_server_shutdown_and_notify(srv->server, srv->cqs[0].cq,
					tag_of(&srv->tag_anchor, TAG_SHUTDOWN));
	/* Watchers would hold the shutdown open forever: tell them and end their streams. */
	kvt_rpc_health_shutdown();
	struct timespec dl;
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += (time_t)(grace_ms / 1000);
	dl.tv_nsec += (long)(grace_ms % 1000) * 1000000;
	if (dl.tv_nsec >= 1000000000) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&srv->mu);
	while (!srv->shutdown_done) {
		if (pthread_cond_timedwait(&srv->cv, &srv->mu, &dl) == ETIMEDOUT)
			break;
	}
	if (!srv->shutdown_done) {
		pthread_mutex_unlock(&srv->mu);
		kvt_log_warn("calls still in flight after the grace period: cancelling them",
			     "grace_ms=%llu active=%llu", (unsigned long long)grace_ms,
			     (unsigned long long)__atomic_load_n(&srv->active_calls,
								 __ATOMIC_RELAXED));
		grpc_server_cancel_all_calls(srv->server);
		forced = 1;
		pthread_mutex_lock(&srv->mu);
		while (!srv->shutdown_done)
			pthread_cond_wait(&srv->cv, &srv->mu);
	}
	pthread_mutex_unlock(&srv->mu);
	/* Every call has sent its status, so no step is left to come to the pool; the workers
	 * finish what they hold (a decode-ahead a cancelled Fetch left) before the queues
	 * close. */
	kvt_pool_stop();
	/* The queues drain what is left and close. */
	for (int i = 0; i < srv->n_cqs; i++)
		grpc_completion_queue_shutdown(srv->cqs[i].cq);
	for (int i = 0; i < srv->n_cqs; i++)
		if (srv->cqs[i].started)
			pthread_join(srv->cqs[i].thread, NULL);
	return forced;
}

void kvt_rpc_server_destroy(struct kvt_rpc_server *srv)
{
	if (!srv)
		return;
	grpc_server_destroy(srv->server);
	for (int i = 0; i < srv->n_cqs; i++)
		grpc_completion_queue_destroy(srv->cqs[i].cq);
	unlink(srv->socket_path);
	free(srv->cqs);
	pthread_mutex_destroy(&srv->mu);
	pthread_cond_destroy(&srv->cv);
	if (g_srv == srv)
		g_srv = NULL;
	reply_pool_drain();
	free(srv);
}

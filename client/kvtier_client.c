/*
 * kvtier_client.c - libkvtier over the gRPC C core.
 *
 * Every call creates its own pluck completion queue and grpc_call with a deadline, so calls
 * from many threads share one channel without sharing any mutable state. Messages are packed
 * by protobuf-c straight into grpc slices.
 */
#include "kvtier_client.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "grpc/health/v1/health.pb-c.h"
#include "kvtier/v1/kvtier.pb-c.h"
#include "kvt_codec.h"
#include "kvt_wire_reader.h"

/* Invariants stay checked in release builds: a broken one aborts with file:line. */
#define ASSERT(cond)                                                                      \
	do {                                                                              \
		if (!(cond)) {                                                            \
			fprintf(stderr, "libkvtier: %s:%d: assertion failed: %s\n", __FILE__, \
				__LINE__, #cond);                                         \
			abort();                                                          \
		}                                                                         \
	} while (0)

#define SVC "/kvtier.v1.KvTier/"
/* Room left in every message for framing and the non-tensor fields (ids are <= 128 B). */
#define MSG_OVERHEAD_BYTES 4096u
/* A single encoded chunk or tail larger than this is a protocol error, not an allocation. */
#define MAX_OBJECT_BYTES (1ull << 32)

struct kvt_client {
	grpc_channel *channel;
	char *auth_value; /* "Bearer <token>" or NULL */
	uint32_t call_timeout_ms;
	uint32_t max_message_bytes;
	uint32_t max_receive_bytes;
	bool fetch_local;         /* the fetch mode of KVT_CLIENT_FETCH_DEFAULT ranges */
	uint64_t pid_ns;          /* inode of this process's pid namespace, 0: unknown */
};

/* ---- status helpers ------------------------------------------------------------------------ */

static const char *const code_names[] = {
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
	"UNAUTHENTICATED",
};

const char *kvt_client_code_name(int code)
{
	if (code < 0 || code > KVT_CODE_UNAUTHENTICATED)
		return "UNKNOWN_CODE";
	return code_names[code];
}

int kvt_client_errno_from_code(int code)
{
	switch (code) {
	case KVT_CODE_OK: return 0;
	case KVT_CODE_CANCELLED: return -ECANCELED;
	case KVT_CODE_INVALID_ARGUMENT: return -EINVAL;
	case KVT_CODE_DEADLINE_EXCEEDED: return -ETIMEDOUT;
	case KVT_CODE_NOT_FOUND: return -ENOENT;
	case KVT_CODE_ALREADY_EXISTS: return -EEXIST;
	case KVT_CODE_PERMISSION_DENIED: return -EACCES;
	case KVT_CODE_RESOURCE_EXHAUSTED: return -ENOSPC;
	case KVT_CODE_FAILED_PRECONDITION: return -EBUSY;
	case KVT_CODE_ABORTED: return -ECONNABORTED;
	case KVT_CODE_OUT_OF_RANGE: return -ERANGE;
	case KVT_CODE_UNIMPLEMENTED: return -ENOSYS;
	case KVT_CODE_INTERNAL: return -EPROTO;
	case KVT_CODE_UNAVAILABLE: return -ENOTCONN;
	case KVT_CODE_DATA_LOSS: return -EBADMSG;
	case KVT_CODE_UNAUTHENTICATED: return -EPERM;
	default: return -EIO;
	}
}

static void st_ok(struct kvt_client_status *st)
{
	if (!st)
		return;
	st->code = KVT_CODE_OK;
	st->local = 0;
	st->message[0] = '\0';
}

/* A status made by the library; returns the errno the caller should return. */
__attribute__((format(printf, 4, 5))) static int st_local(struct kvt_client_status *st,
							   int code, int err, const char *fmt, ...)
{
	if (st) {
		int n;
		va_list ap;
		st->code = code;
		st->local = 1;
		n = snprintf(st->message, sizeof(st->message), "libkvtier: ");
		va_start(ap, fmt);
		vsnprintf(st->message + n, sizeof(st->message) - (size_t)n, fmt, ap);
		va_end(ap);
	}
	return err;
}

size_t kvt_client_dtype_size(uint32_t dtype)
{
	switch (dtype) {
	case KVT_CLIENT_DTYPE_F16:
	case KVT_CLIENT_DTYPE_BF16: return 2;
	case KVT_CLIENT_DTYPE_F32: return 4;
	default: return 0;
	}
}

size_t kvt_client_kv_bytes(const struct kvt_client_shape *shape, uint64_t n_tokens)
{
	return (size_t)shape->n_layers * (size_t)n_tokens * shape->n_kv_heads * shape->head_dim *
	       kvt_client_dtype_size(shape->dtype);
}

void kvt_client_codec_init(struct kvt_client_codec *codec)
{
	memset(codec, 0, sizeof(*codec));
	codec->rotate_v = -1;
	codec->n_sinks = -1;
	codec->pin_detect_max = -1;
	codec->pin_detect_ratio = -1.0f;
	codec->recent_exact_tokens = -1;
}

void kvt_client_session_params_init(struct kvt_client_session_params *p, const char *session_id,
				    uint32_t n_layers, uint32_t n_kv_heads, uint32_t head_dim,
				    uint32_t dtype)
{
	memset(p, 0, sizeof(*p));
	p->session_id = session_id;
	p->n_layers = n_layers;
	p->n_kv_heads = n_kv_heads;
	p->head_dim = head_dim;
	p->dtype = dtype;
	kvt_client_codec_init(&p->codec);
	p->ttl_seconds = -1;
	p->pinned = -1;
}

void kvt_client_append_opts_init(struct kvt_client_append_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->token_begin = KVT_CLIENT_END;
}

void kvt_client_block_init(struct kvt_client_block *b)
{
	memset(b, 0, sizeof(*b));
	b->has_k = 1;
	b->has_v = 1;
}

void kvt_client_fetch_range_init(struct kvt_client_fetch_range *r)
{
	memset(r, 0, sizeof(*r));
	r->token_end = KVT_CLIENT_END;
	r->layer_end = KVT_CLIENT_ALL_LAYERS;
}

/* ---- connection ------------------------------------------------------------------------------ */

static gpr_timespec deadline_after_ms(uint32_t ms)
{
	return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
			    gpr_time_from_millis((int64_t)ms, GPR_TIMESPAN));
}

/* Drains and destroys a pluck queue once every batch on it has completed. */
static void cq_destroy(grpc_completion_queue *cq)
{
	grpc_event ev;
	grpc_completion_queue_shutdown(cq);
	do {
		ev = grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME),
						 NULL);
	} while (ev.type != GRPC_QUEUE_SHUTDOWN);
	grpc_completion_queue_destroy(cq);
}

int kvt_client_connect(const struct kvt_client_options *opts, struct kvt_client **out,
		       struct kvt_client_status *st)
{
	struct kvt_client *c = NULL;
	grpc_channel_credentials *creds = NULL;
	grpc_completion_queue *cq = NULL;
	grpc_arg args[7];
	grpc_channel_args chargs;
	int rc = 0;

	*out = NULL;
	if (!opts || !opts->target || !*opts->target)
		return st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL, "target is empty");
	c = calloc(1, sizeof(*c));
	if (!c)
		return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
	c->call_timeout_ms = opts->call_timeout_ms ? opts->call_timeout_ms : 60000;
	c->max_message_bytes =
		opts->max_message_bytes ? opts->max_message_bytes : KVT_CLIENT_DEFAULT_MESSAGE_BYTES;
	c->max_receive_bytes = opts->max_receive_bytes ? opts->max_receive_bytes : (16u << 20);
	if (c->max_message_bytes < 2 * MSG_OVERHEAD_BYTES || c->max_message_bytes > (1u << 30)) {
		rc = st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL,
			      "max_message_bytes %u is outside %u..%u", c->max_message_bytes,
			      2 * MSG_OVERHEAD_BYTES, 1u << 30);
		free(c);
		return rc;
	}
	/* sent with RestoreToDevice (the worker named there is this process) */
	struct stat ns;
	c->pid_ns = stat("/proc/self/ns/pid", &ns) == 0 ? (uint64_t)ns.st_ino : 0;
	/* Local decode is the default: it ships the encoded bytes (a fifth of f16 at 2 bits)
	 * and takes the decode off the daemon that every worker of the node shares. */
	c->fetch_local = true;
	if (opts->fetch_mode == KVT_CLIENT_FETCH_SERVER) {
		c->fetch_local = false;
	} else if (opts->fetch_mode == KVT_CLIENT_FETCH_DEFAULT) {
		const char *env = getenv("KVTIER_CLIENT_FETCH");
		if (env && *env && strcmp(env, "local") && strcmp(env, "server")) {
			rc = st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL,
				      "KVTIER_CLIENT_FETCH \"%.64s\" is not \"local\" or \"server\"",
				      env);
			free(c);
			return rc;
		}
		if (env && !strcmp(env, "server"))
			c->fetch_local = false;
	} else if (opts->fetch_mode != KVT_CLIENT_FETCH_LOCAL) {
		rc = st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL,
			      "fetch_mode %d is not -1 (server), 0 (default) or 1 (local)",
			      opts->fetch_mode);
		free(c);
		return rc;
	}
	if (opts->bearer_token) {
		size_t n = strlen(opts->bearer_token) + 8;
		c->auth_value = malloc(n);
		if (!c->auth_value) {
			free(c);
			return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		}
		snprintf(c->auth_value, n, "Bearer %s", opts->bearer_token);
	}

	grpc_init();
	/* Both ends set explicit message limits; reconnects back off briefly so a client that
	 * starts before the daemon connects soon after it comes up. Retries stay off: appends are
	 * streams that must not be replayed behind the caller's back. */
	args[0].type = GRPC_ARG_INTEGER;
	args[0].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
	args[0].value.integer = (int)c->max_message_bytes;
	args[1].type = GRPC_ARG_INTEGER;
	args[1].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
	args[1].value.integer = (int)c->max_receive_bytes;
	args[2].type = GRPC_ARG_INTEGER;
	args[2].key = (char *)GRPC_ARG_ENABLE_RETRIES;
	args[2].value.integer = 0;
	args[3].type = GRPC_ARG_INTEGER;
	args[3].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
	args[3].value.integer = 100;
	args[4].type = GRPC_ARG_INTEGER;
	args[4].key = (char *)GRPC_ARG_MIN_RECONNECT_BACKOFF_MS;
	args[4].value.integer = 100;
	args[5].type = GRPC_ARG_INTEGER;
	args[5].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
	args[5].value.integer = 1000;
	chargs.num_args = 6;
	chargs.args = args;
	if (opts->own_connection) {
		/* A subchannel pool of this channel's own: it never shares the connection of
		 * another client to the same target. */
		args[6].type = GRPC_ARG_INTEGER;
		args[6].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
		args[6].value.integer = 1;
		chargs.num_args = 7;
	}


	creds = grpc_insecure_credentials_create();
	c->channel = grpc_channel_create(opts->target, creds, &chargs);
	grpc_channel_credentials_release(creds);
	if (!c->channel) {
		rc = st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL, "cannot create a channel to %s",
			      opts->target);
		goto fail;
	}

	if (!opts->lazy) {
		uint32_t ms = opts->connect_timeout_ms ? opts->connect_timeout_ms : 5000;
		gpr_timespec deadline = deadline_after_ms(ms);
		grpc_connectivity_state s;

		cq = grpc_completion_queue_create_for_pluck(NULL);
		for (;;) {
			grpc_event ev;
			s = grpc_channel_check_connectivity_state(c->channel, 1);
			if (s == GRPC_CHANNEL_READY)
				break;
			if (s == GRPC_CHANNEL_SHUTDOWN) {
				rc = st_local(st, KVT_CODE_UNAVAILABLE, -ENOTCONN,
					      "channel to %s shut down", opts->target);
				goto fail;
			}
			grpc_channel_watch_connectivity_state(c->channel, s, deadline, cq, c);
			ev = grpc_completion_queue_pluck(cq, c, gpr_inf_future(GPR_CLOCK_REALTIME),
							 NULL);
			if (ev.type != GRPC_OP_COMPLETE || !ev.success) {
				rc = st_local(st, KVT_CODE_UNAVAILABLE, -ETIMEDOUT,
					      "no connection to %s within %u ms", opts->target, ms);
				goto fail;
			}
		}
		cq_destroy(cq);
		cq = NULL;
	}
	*out = c;
	st_ok(st);
	return 0;

fail:
	if (cq)
		cq_destroy(cq);
	if (c->channel)
		grpc_channel_destroy(c->channel);
	free(c->auth_value);
	free(c);
	grpc_shutdown();
	return rc;
}

void kvt_client_close(struct kvt_client *c)
{
	if (!c)
		return;
	grpc_channel_destroy(c->channel);
	free(c->auth_value);
	free(c);
	grpc_shutdown();
}

uint32_t kvt_client_max_message_bytes(const struct kvt_client *c)
{
	return c->max_message_bytes;
}

/* ---- calls ----------------------------------------------------------------------------------- */

struct call {
	struct kvt_client *c;
	grpc_completion_queue *cq;
	grpc_call *call;
	grpc_metadata md;
	size_t n_md;
	grpc_metadata_array initial_md;
	grpc_metadata_array trailing_md;
	grpc_status_code status;
	grpc_slice details;
	bool status_started;
	bool status_done;
	int local_rc;                 /* a library-side failure that ends the call */
	struct kvt_client_status *st;
};

static int call_begin(struct call *cl, struct kvt_client *c, const char *method,
		      uint32_t timeout_ms, struct kvt_client_status *st)
{
	grpc_slice m;

	memset(cl, 0, sizeof(*cl));
	cl->c = c;
	cl->st = st;
	grpc_metadata_array_init(&cl->initial_md);
	grpc_metadata_array_init(&cl->trailing_md);
	cl->details = grpc_empty_slice();
	cl->cq = grpc_completion_queue_create_for_pluck(NULL);
	m = grpc_slice_from_static_string(method);
	cl->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cl->cq, m,
					    NULL,
					    deadline_after_ms(timeout_ms ? timeout_ms :
									   c->call_timeout_ms),
					    NULL);
	if (!cl->call) {
		cq_destroy(cl->cq);
		cl->cq = NULL;
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO, "cannot create a call to %s",
				method);
	}
	if (c->auth_value) {
		cl->md.key = grpc_slice_from_static_string("authorization");
		cl->md.value = grpc_slice_from_static_string(c->auth_value);
		cl->n_md = 1;
	}
	return 0;
}

/* Runs one batch and waits for it. Returns the event's success flag (0 or 1) or -EPROTO
 * when the batch could not start (a bug in how we sequence ops). */
static int call_batch(struct call *cl, grpc_op *ops, size_t n, void *tag)
{
	grpc_event ev;
	grpc_call_error e = grpc_call_start_batch(cl->call, ops, n, tag, NULL);
	if (e != GRPC_CALL_OK)
		return st_local(cl->st, KVT_CODE_INTERNAL, -EPROTO, "grpc_call_start_batch: %d",
				(int)e);
	ev = grpc_completion_queue_pluck(cl->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	ASSERT(ev.type == GRPC_OP_COMPLETE);
	return ev.success ? 1 : 0;
}

static void op_send_initial(grpc_op *op, struct call *cl)
{
	memset(op, 0, sizeof(*op));
	op->op = GRPC_OP_SEND_INITIAL_METADATA;
	op->data.send_initial_metadata.count = cl->n_md;
	op->data.send_initial_metadata.metadata = cl->n_md ? &cl->md : NULL;
}

/* The first four ops of every call with one request message (unary and server streaming):
 * send initial metadata, the request, half-close, receive initial metadata. */
static void ops_single_request(grpc_op *ops, struct call *cl, grpc_byte_buffer *send)
{
	op_send_initial(&ops[0], cl);
	memset(&ops[1], 0, sizeof(ops[1]) * 3);
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &cl->initial_md;
}

static void op_recv_status(grpc_op *op, struct call *cl)
{
	memset(op, 0, sizeof(*op));
	op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	op->data.recv_status_on_client.trailing_metadata = &cl->trailing_md;
	op->data.recv_status_on_client.status = &cl->status;
	op->data.recv_status_on_client.status_details = &cl->details;
	cl->status_started = true;
}

/* Waits for the final status (if not in yet), fills st, frees the call. Returns 0 or the
 * errno of the status (a local failure recorded earlier wins). */
static int call_end(struct call *cl)
{
	int rc;

	if (!cl->status_done) {
		grpc_op op;
		if (!cl->status_started) {
			op_recv_status(&op, cl);
			(void)call_batch(cl, &op, 1, (void *)4);
		}
		cl->status_done = true;
	}
	if (cl->local_rc) {
		rc = cl->local_rc; /* st already filled by the local failure */
	} else {
		rc = kvt_client_errno_from_code((int)cl->status);
		if (cl->st) {
			size_t n = GRPC_SLICE_LENGTH(cl->details);
			cl->st->code = (int)cl->status;
			cl->st->local = 0;
			if (n >= sizeof(cl->st->message))
				n = sizeof(cl->st->message) - 1;
			memcpy(cl->st->message, GRPC_SLICE_START_PTR(cl->details), n);
			cl->st->message[n] = '\0';
		}
	}
	grpc_slice_unref(cl->details);
	grpc_metadata_array_destroy(&cl->initial_md);
	grpc_metadata_array_destroy(&cl->trailing_md);
	grpc_call_unref(cl->call);
	cq_destroy(cl->cq);
	return rc;
}

/* Records a library-side failure and cancels the call so the server stops. */
static int call_fail(struct call *cl, int rc)
{
	if (!cl->local_rc)
		cl->local_rc = rc;
	grpc_call_cancel(cl->call, NULL);
	return rc;
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	grpc_slice s = grpc_slice_malloc(n);
	grpc_byte_buffer *bb;
	size_t w = protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
	ASSERT(w == n);
	bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

static ProtobufCMessage *unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d)
{
	grpc_byte_buffer_reader r;
	grpc_slice s;
	ProtobufCMessage *m;

	if (!grpc_byte_buffer_reader_init(&r, bb))
		return NULL;
	s = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
	grpc_slice_unref(s);
	return m;
}

/* One request, one response. *resp is NULL unless the call succeeded. */
static int unary(struct kvt_client *c, const char *method, const ProtobufCMessage *req,
		 const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
		 uint32_t timeout_ms, struct kvt_client_status *st)
{
	struct call cl;
	grpc_op ops[6];
	grpc_byte_buffer *send = NULL, *recv = NULL;
	int rc;

	*resp = NULL;
	rc = call_begin(&cl, c, method, timeout_ms, st);
	if (rc)
		return rc;
	send = pack(req);
	ops_single_request(ops, &cl, send);
	memset(&ops[4], 0, sizeof(ops[4]));
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &recv;
	op_recv_status(&ops[5], &cl);
	rc = call_batch(&cl, ops, 6, (void *)1);
	grpc_byte_buffer_destroy(send);
	if (rc < 0)
		call_fail(&cl, rc);
	cl.status_done = rc >= 0;
	if (!cl.status_done)
		cl.status_started = false;
	if (rc >= 0 && cl.status == GRPC_STATUS_OK) {
		if (!recv) {
			cl.local_rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
					       "%s returned OK without a message", method);
		} else {
			*resp = unpack(recv, resp_desc);
			if (!*resp)
				cl.local_rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
						       "%s: cannot parse the response", method);
		}
	}
	if (recv)
		grpc_byte_buffer_destroy(recv);
	rc = call_end(&cl);
	if (rc && *resp) {
		protobuf_c_message_free_unpacked(*resp, NULL);
		*resp = NULL;
	}
	return rc;
}

/* Client streaming: next() yields messages until it returns 0 (done) or < 0 (failure, sent
 * nowhere: the call is cancelled so the server discards what it got). */
typedef int (*next_fn)(void *ctx, grpc_byte_buffer **out);

static int client_stream(struct kvt_client *c, const char *method, next_fn next, void *ctx,
			 uint32_t cancel_after, uint32_t close_after,
			 const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
			 uint32_t *messages, uint32_t timeout_ms, struct kvt_client_status *st)
{
	struct call cl;
	grpc_op ops[3];
	grpc_byte_buffer *recv = NULL, *inflight = NULL;
	uint32_t sent = 0, queued = 0;
	int rc;
	bool cancelled = false;

	*resp = NULL;
	rc = call_begin(&cl, c, method, timeout_ms, st);
	if (rc)
		return rc;
	op_send_initial(&ops[0], &cl);
	rc = call_batch(&cl, ops, 1, (void *)1);
	if (rc < 0) {
		call_fail(&cl, rc);
		goto end;
	}
	/* The response and status arrive whenever the server decides (it may end the call
	 * early with an error), so that batch runs beside the sends. */
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[0].data.recv_initial_metadata.recv_initial_metadata = &cl.initial_md;
	ops[1].op = GRPC_OP_RECV_MESSAGE;
	ops[1].data.recv_message.recv_message = &recv;
	op_recv_status(&ops[2], &cl);
	if (grpc_call_start_batch(cl.call, ops, 3, (void *)2, NULL) != GRPC_CALL_OK) {
		cl.status_started = false;
		call_fail(&cl, st_local(st, KVT_CODE_INTERNAL, -EPROTO, "cannot start receive"));
		goto end;
	}

	/* One send in flight while the next message is packed: packing (a copy of the tensor
	 * bytes) overlaps the transfer of the previous message. */
	for (;;) {
		grpc_byte_buffer *bb = NULL;
		int more;
		bool hook = (cancel_after && queued >= cancel_after) ||
			    (close_after && queued >= close_after);
		more = hook ? 0 : next(ctx, &bb);
		if (inflight) {
			grpc_event ev = grpc_completion_queue_pluck(
				cl.cq, (void *)3, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
			ASSERT(ev.type == GRPC_OP_COMPLETE);
			grpc_byte_buffer_destroy(inflight);
			inflight = NULL;
			if (!ev.success) {
				/* the server already ended the call: its status says why */
				if (bb)
					grpc_byte_buffer_destroy(bb);
				break;
			}
			sent++;
		}
		if (hook && cancel_after && queued >= cancel_after) {
			grpc_call_cancel(cl.call, NULL);
			cancelled = true;
			break;
		}
		if (more < 0) {
			call_fail(&cl, more);
			cancelled = true;
			break;
		}
		if (more == 0)
			break;
		memset(ops, 0, sizeof(ops[0]));
		ops[0].op = GRPC_OP_SEND_MESSAGE;
		ops[0].data.send_message.send_message = bb;
		if (grpc_call_start_batch(cl.call, ops, 1, (void *)3, NULL) != GRPC_CALL_OK) {
			grpc_byte_buffer_destroy(bb);
			call_fail(&cl, st_local(st, KVT_CODE_INTERNAL, -EPROTO, "cannot start a send"));
			cancelled = true;
			break;
		}
		inflight = bb;
		queued++;
	}
	ASSERT(!inflight);
	if (!cancelled) {
		memset(ops, 0, sizeof(ops[0]));
		ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
		(void)call_batch(&cl, ops, 1, (void *)5);
	}
	{
		grpc_event ev = grpc_completion_queue_pluck(cl.cq, (void *)2,
							    gpr_inf_future(GPR_CLOCK_REALTIME),
							    NULL);
		ASSERT(ev.type == GRPC_OP_COMPLETE);
		cl.status_done = true;
	}
	if (!cl.local_rc && cl.status == GRPC_STATUS_OK) {
		if (!recv) {
			cl.local_rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
					       "%s returned OK without a message", method);
		} else {
			*resp = unpack(recv, resp_desc);
			if (!*resp)
				cl.local_rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
						       "%s: cannot parse the response", method);
		}
	}
end:
	if (recv)
		grpc_byte_buffer_destroy(recv);
	if (messages)
		*messages = sent;
	rc = call_end(&cl);
	if (rc && *resp) {
		protobuf_c_message_free_unpacked(*resp, NULL);
		*resp = NULL;
	}
	return rc;
}

/* Server streaming: on_msg() gets every reply; a negative return cancels the call and is
 * what the function returns. */
typedef int (*msg_fn)(void *ctx, ProtobufCMessage *m, struct kvt_client_status *st);
/* Optional: reads the reply straight from gRPC's receive buffer. 0 = handled, FALLBACK = go
 * through protobuf-c (on_msg), < 0 = failure. */
typedef int (*bb_fn)(void *ctx, grpc_byte_buffer *bb, struct kvt_client_status *st);
#define FALLBACK 1

static int server_stream(struct kvt_client *c, const char *method, const ProtobufCMessage *req,
			 const ProtobufCMessageDescriptor *resp_desc, msg_fn on_msg, bb_fn on_bb,
			 void *ctx, uint32_t *messages, uint32_t timeout_ms,
			 struct kvt_client_status *st)
{
	struct call cl;
	grpc_op ops[4];
	grpc_byte_buffer *send;
	uint32_t n = 0;
	int rc;

	rc = call_begin(&cl, c, method, timeout_ms, st);
	if (rc)
		return rc;
	send = pack(req);
	ops_single_request(ops, &cl, send);
	rc = call_batch(&cl, ops, 4, (void *)1);
	grpc_byte_buffer_destroy(send);
	if (rc < 0) {
		call_fail(&cl, rc);
		goto end;
	}
	for (;;) {
		grpc_byte_buffer *recv = NULL;
		ProtobufCMessage *m;
		memset(ops, 0, sizeof(ops[0]));
		ops[0].op = GRPC_OP_RECV_MESSAGE;
		ops[0].data.recv_message.recv_message = &recv;
		rc = call_batch(&cl, ops, 1, (void *)2);
		if (rc < 0) {
			call_fail(&cl, rc);
			break;
		}
		if (!rc || !recv)
			break; /* end of stream, or the call failed: the status tells */
		if (on_bb) {
			rc = on_bb(ctx, recv, st);
			if (rc != FALLBACK) {
				grpc_byte_buffer_destroy(recv);
				if (rc < 0) {
					call_fail(&cl, rc);
					break;
				}
				n++;
				continue;
			}
		}
		m = unpack(recv, resp_desc);
		grpc_byte_buffer_destroy(recv);
		if (!m) {
			call_fail(&cl, st_local(st, KVT_CODE_INTERNAL, -EPROTO,
						"%s: cannot parse reply %u", method, n));
			break;
		}
		n++;
		rc = on_msg(ctx, m, st);
		protobuf_c_message_free_unpacked(m, NULL);
		if (rc < 0) {
			call_fail(&cl, rc);
			break;
		}
	}
end:
	if (messages)
		*messages = n;
	/* The status is asked for only now, after any cancel: gRPC core 1.51 can leave a
	 * RECV_STATUS_ON_CLIENT started *before* a cancel pending forever when the last replies
	 * and the trailers are already received but unread (fuzz_rpc's raw_call has a replay). */
	return call_end(&cl);
}

/* ---- conversions ------------------------------------------------------------------------------ */

static void codec_to_proto(const struct kvt_client_codec *in, Kvtier__V1__CodecConfig *out)
{
	kvtier__v1__codec_config__init(out);
	if (in->scheme) {
		out->has_scheme = 1;
		out->scheme = (Kvtier__V1__Scheme)in->scheme;
	}
	if (in->key_bits) {
		out->has_key_bits = 1;
		out->key_bits = in->key_bits;
	}
	if (in->value_bits) {
		out->has_value_bits = 1;
		out->value_bits = in->value_bits;
	}
	if (in->group) {
		out->has_group = 1;
		out->group = in->group;
	}
	if (in->chunk_tokens) {
		out->has_chunk_tokens = 1;
		out->chunk_tokens = in->chunk_tokens;
	}
	if (in->rotate_v >= 0) {
		out->has_rotate_v = 1;
		out->rotate_v = in->rotate_v ? 1 : 0;
	}
	if (in->n_sinks >= 0) {
		out->has_n_sinks = 1;
		out->n_sinks = (uint32_t)in->n_sinks;
	}
	if (in->pin_detect_max >= 0) {
		out->has_pin_detect_max = 1;
		out->pin_detect_max = (uint32_t)in->pin_detect_max;
	}
	if (in->pin_detect_ratio >= 0.0f) {
		out->has_pin_detect_ratio = 1;
		out->pin_detect_ratio = in->pin_detect_ratio;
	}
	if (in->recent_exact_tokens >= 0) {
		out->has_recent_exact_tokens = 1;
		out->recent_exact_tokens = (uint32_t)in->recent_exact_tokens;
	}
	if (in->preset[0])
		out->preset = (char *)in->preset; /* borrowed until the request is packed */
	if (in->key_rounding[0])
		out->key_rounding = (char *)in->key_rounding; /* borrowed as preset */
}

static void codec_from_proto(const Kvtier__V1__CodecConfig *in, struct kvt_client_codec *out)
{
	kvt_client_codec_init(out);
	if (!in)
		return;
	if (in->has_scheme)
		out->scheme = (uint32_t)in->scheme;
	if (in->has_key_bits)
		out->key_bits = in->key_bits;
	if (in->has_value_bits)
		out->value_bits = in->value_bits;
	if (in->has_group)
		out->group = in->group;
	if (in->has_chunk_tokens)
		out->chunk_tokens = in->chunk_tokens;
	if (in->has_rotate_v)
		out->rotate_v = in->rotate_v ? 1 : 0;
	if (in->has_n_sinks)
		out->n_sinks = (int32_t)in->n_sinks;
	if (in->has_pin_detect_max)
		out->pin_detect_max = (int32_t)in->pin_detect_max;
	if (in->has_pin_detect_ratio)
		out->pin_detect_ratio = in->pin_detect_ratio;
	if (in->has_recent_exact_tokens)
		out->recent_exact_tokens = (int32_t)in->recent_exact_tokens;
	if (in->preset)
		snprintf(out->preset, sizeof out->preset, "%s", in->preset);
	if (in->key_rounding)
		snprintf(out->key_rounding, sizeof out->key_rounding, "%s", in->key_rounding);
}

static void copy_str(char *dst, size_t cap, const char *src)
{
	size_t n = src ? strlen(src) : 0;
	if (n >= cap)
		n = cap - 1;
	if (n)
		memcpy(dst, src, n);
	dst[n] = '\0';
}

static void info_from_proto(const Kvtier__V1__SessionInfo *in, struct kvt_client_session_info *out)
{
	memset(out, 0, sizeof(*out));
	copy_str(out->session_id, sizeof(out->session_id), in->session_id);
	out->n_layers = in->n_layers;
	out->n_kv_heads = in->n_kv_heads;
	out->head_dim = in->head_dim;
	out->dtype = (uint32_t)in->dtype;
	codec_from_proto(in->codec, &out->codec);
	out->n_tokens = in->n_tokens;
	out->n_chunks = in->n_chunks;
	out->tail_tokens = in->tail_tokens;
	out->bytes_held = in->bytes_held;
	out->logical_bytes = in->logical_bytes;
	out->bits_per_element = in->bits_per_element;
	out->pinned = in->pinned ? 1 : 0;
	out->ttl_seconds = in->ttl_seconds;
	out->idle_ms = in->idle_ms;
	out->created = in->created ? 1 : 0;
	copy_str(out->tier, sizeof(out->tier), in->tier);
}

static void open_to_proto(const struct kvt_client_session_params *p,
			  Kvtier__V1__OpenSessionRequest *req, Kvtier__V1__CodecConfig *codec)
{
	kvtier__v1__open_session_request__init(req);
	req->session_id = (char *)p->session_id;
	if (p->n_layers) {
		req->has_n_layers = 1;
		req->n_layers = p->n_layers;
	}
	if (p->n_kv_heads) {
		req->has_n_kv_heads = 1;
		req->n_kv_heads = p->n_kv_heads;
	}
	if (p->head_dim) {
		req->has_head_dim = 1;
		req->head_dim = p->head_dim;
	}
	if (p->dtype) {
		req->has_dtype = 1;
		req->dtype = (Kvtier__V1__Dtype)p->dtype;
	}
	codec_to_proto(&p->codec, codec);
	req->codec = codec;
	if (p->ttl_seconds >= 0) {
		req->has_ttl_seconds = 1;
		req->ttl_seconds = (uint32_t)(p->ttl_seconds > UINT32_MAX ? UINT32_MAX :
									    p->ttl_seconds);
	}
	if (p->tier)
		req->tier = (char *)p->tier;
	if (p->pinned >= 0) {
		req->has_pinned = 1;
		req->pinned = p->pinned ? 1 : 0;
	}
}

/* A unary call answering SessionInfo. */
static int session_call(struct kvt_client *c, const char *method, const ProtobufCMessage *req,
			struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	ProtobufCMessage *resp;
	int rc = unary(c, method, req, &kvtier__v1__session_info__descriptor, &resp, 0, st);
	if (rc)
		return rc;
	if (info)
		info_from_proto((Kvtier__V1__SessionInfo *)resp, info);
	protobuf_c_message_free_unpacked(resp, NULL);
	return 0;
}

/* ---- health and session management ------------------------------------------------------------ */

int kvt_client_health(struct kvt_client *c, const char *service, uint32_t timeout_ms,
		      int *serving, struct kvt_client_status *st)
{
	Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
	ProtobufCMessage *resp;
	int rc;

	if (service)
		req.service = (char *)service;
	rc = unary(c, "/grpc.health.v1.Health/Check", &req.base,
		   &grpc__health__v1__health_check_response__descriptor, &resp, timeout_ms, st);
	if (rc)
		return rc;
	if (serving)
		*serving = (int)((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
	protobuf_c_message_free_unpacked(resp, NULL);
	return 0;
}

int kvt_client_open(struct kvt_client *c, const struct kvt_client_session_params *p,
		    struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__OpenSessionRequest req;
	Kvtier__V1__CodecConfig codec;

	open_to_proto(p, &req, &codec);
	return session_call(c, SVC "OpenSession", &req.base, info, st);
}

int kvt_client_fork(struct kvt_client *c, const char *source_id, const char *new_id,
		    uint64_t n_tokens, int64_t ttl_seconds, int pinned,
		    struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__ForkRequest req = KVTIER__V1__FORK_REQUEST__INIT;
	req.source_session_id = (char *)source_id;
	req.new_session_id = (char *)new_id;
	if (n_tokens != KVT_CLIENT_END) {
		req.has_n_tokens = 1;
		req.n_tokens = n_tokens;
	}
	if (ttl_seconds >= 0) {
		req.has_ttl_seconds = 1;
		req.ttl_seconds = (uint32_t)ttl_seconds;
	}
	if (pinned >= 0) {
		req.has_pinned = 1;
		req.pinned = pinned ? 1 : 0;
	}
	return session_call(c, SVC "Fork", &req.base, info, st);
}

int kvt_client_truncate(struct kvt_client *c, const char *session_id, uint64_t n_tokens,
			struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__TruncateRequest req = KVTIER__V1__TRUNCATE_REQUEST__INIT;
	req.session_id = (char *)session_id;
	if (n_tokens != KVT_CLIENT_END) {
		req.has_n_tokens = 1;
		req.n_tokens = n_tokens;
	}
	return session_call(c, SVC "Truncate", &req.base, info, st);
}

int kvt_client_drop(struct kvt_client *c, const char *session_id, uint64_t *bytes_freed,
		    struct kvt_client_status *st)
{
	Kvtier__V1__DropSessionRequest req = KVTIER__V1__DROP_SESSION_REQUEST__INIT;
	ProtobufCMessage *resp;
	int rc;

	req.session_id = (char *)session_id;
	rc = unary(c, SVC "DropSession", &req.base, &kvtier__v1__drop_session_response__descriptor,
		   &resp, 0, st);
	if (rc)
		return rc;
	if (bytes_freed)
		*bytes_freed = ((Kvtier__V1__DropSessionResponse *)resp)->bytes_freed;
	protobuf_c_message_free_unpacked(resp, NULL);
	return 0;
}

int kvt_client_pin(struct kvt_client *c, const char *session_id,
		   struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__PinRequest req = KVTIER__V1__PIN_REQUEST__INIT;
	req.session_id = (char *)session_id;
	return session_call(c, SVC "Pin", &req.base, info, st);
}

int kvt_client_unpin(struct kvt_client *c, const char *session_id,
		     struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__PinRequest req = KVTIER__V1__PIN_REQUEST__INIT;
	req.session_id = (char *)session_id;
	return session_call(c, SVC "Unpin", &req.base, info, st);
}

int kvt_client_set_ttl(struct kvt_client *c, const char *session_id, uint32_t ttl_seconds,
		       struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__SetTtlRequest req = KVTIER__V1__SET_TTL_REQUEST__INIT;
	req.session_id = (char *)session_id;
	req.has_ttl_seconds = 1;
	req.ttl_seconds = ttl_seconds;
	return session_call(c, SVC "SetTtl", &req.base, info, st);
}

int kvt_client_stat(struct kvt_client *c, const char *session_id,
		    struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	Kvtier__V1__StatSessionRequest req = KVTIER__V1__STAT_SESSION_REQUEST__INIT;
	req.session_id = (char *)session_id;
	return session_call(c, SVC "StatSession", &req.base, info, st);
}

int kvt_client_list_page(struct kvt_client *c, const char *prefix, uint32_t page_size,
			 const char *page_token, struct kvt_client_session_info **out, size_t *n,
			 char *next_token, size_t next_token_len, struct kvt_client_status *st)
{
	Kvtier__V1__ListSessionsRequest req = KVTIER__V1__LIST_SESSIONS_REQUEST__INIT;
	Kvtier__V1__ListSessionsResponse *resp;
	ProtobufCMessage *m;
	size_t i;
	int rc;

	*out = NULL;
	*n = 0;
	if (prefix && *prefix)
		req.prefix = (char *)prefix;
	if (page_size) {
		req.has_page_size = 1;
		req.page_size = page_size;
	}
	if (page_token && *page_token)
		req.page_token = (char *)page_token;
	rc = unary(c, SVC "ListSessions", &req.base, &kvtier__v1__list_sessions_response__descriptor,
		   &m, 0, st);
	if (rc)
		return rc;
	resp = (Kvtier__V1__ListSessionsResponse *)m;
	if (resp->n_sessions) {
		*out = calloc(resp->n_sessions, sizeof(**out));
		if (!*out) {
			protobuf_c_message_free_unpacked(m, NULL);
			return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		}
	}
	for (i = 0; i < resp->n_sessions; i++)
		info_from_proto(resp->sessions[i], &(*out)[i]);
	*n = resp->n_sessions;
	if (next_token && next_token_len)
		copy_str(next_token, next_token_len, resp->next_page_token);
	protobuf_c_message_free_unpacked(m, NULL);
	return 0;
}

int kvt_client_list(struct kvt_client *c, const char *prefix,
		    struct kvt_client_session_info **out, size_t *n, struct kvt_client_status *st)
{
	char token[512] = "";
	struct kvt_client_session_info *all = NULL;
	size_t n_all = 0;
	/* A bound on pages: a server that never ends its listing cannot keep us here. */
	for (int page = 0; page < 100000; page++) {
		struct kvt_client_session_info *part, *grown;
		size_t n_part;
		char next[512];
		int rc = kvt_client_list_page(c, prefix, 1000, token, &part, &n_part, next,
					      sizeof(next), st);
		if (rc) {
			free(all);
			return rc;
		}
		if (n_part) {
			grown = realloc(all, (n_all + n_part) * sizeof(*all));
			if (!grown) {
				free(part);
				free(all);
				return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM,
						"out of memory");
			}
			all = grown;
			memcpy(all + n_all, part, n_part * sizeof(*all));
			n_all += n_part;
		}
		free(part);
		if (!next[0] || (n_part == 0)) {
			*out = all;
			*n = n_all;
			return 0;
		}
		memcpy(token, next, sizeof(token));
	}
	free(all);
	return st_local(st, KVT_CODE_INTERNAL, -EPROTO, "ListSessions did not end after 100000 pages");
}

int kvt_client_prefetch(struct kvt_client *c, const char *session_id, char *tier,
			size_t tier_len, struct kvt_client_status *st)
{
	Kvtier__V1__PrefetchRequest req = KVTIER__V1__PREFETCH_REQUEST__INIT;
	ProtobufCMessage *resp;
	int rc;

	req.session_id = (char *)session_id;
	rc = unary(c, SVC "Prefetch", &req.base, &kvtier__v1__prefetch_response__descriptor, &resp,
		   0, st);
	if (rc)
		return rc;
	if (tier && tier_len)
		copy_str(tier, tier_len, ((Kvtier__V1__PrefetchResponse *)resp)->tier);
	protobuf_c_message_free_unpacked(resp, NULL);
	return 0;
}

/* ---- append ---------------------------------------------------------------------------------- */

static void block_to_proto(const struct kvt_client_block *b, Kvtier__V1__KvBlock *out)
{
	kvtier__v1__kv_block__init(out);
	if (b->has_token_begin) {
		out->has_token_begin = 1;
		out->token_begin = b->token_begin;
	}
	out->has_n_tokens = 1;
	out->n_tokens = b->n_tokens;
	out->has_layer_begin = 1;
	out->layer_begin = b->layer_begin;
	out->has_n_layers = 1;
	out->n_layers = b->n_layers;
	if (b->dtype) {
		out->has_dtype = 1;
		out->dtype = (Kvtier__V1__Dtype)b->dtype;
	}
	if (b->has_k) {
		out->has_k = 1;
		out->k.data = (uint8_t *)b->k;
		out->k.len = b->k_bytes;
	}
	if (b->has_v) {
		out->has_v = 1;
		out->v.data = (uint8_t *)b->v;
		out->v.len = b->v_bytes;
	}
}

struct blocks_ctx {
	const char *session_id;
	const struct kvt_client_block *blocks;
	size_t n, i;
};

static int next_raw_block(void *ctx, grpc_byte_buffer **out)
{
	struct blocks_ctx *x = ctx;
	Kvtier__V1__AppendRequest req = KVTIER__V1__APPEND_REQUEST__INIT;
	Kvtier__V1__KvBlock blk;

	if (x->i >= x->n)
		return 0;
	if (x->i == 0)
		req.session_id = (char *)x->session_id;
	block_to_proto(&x->blocks[x->i], &blk);
	req.block = &blk;
	*out = pack(&req.base);
	x->i++;
	return 1;
}

static void append_result(ProtobufCMessage *m, uint32_t messages,
			  struct kvt_client_append_result *res)
{
	Kvtier__V1__AppendResponse *r = (Kvtier__V1__AppendResponse *)m;
	if (!res)
		return;
	res->n_tokens = r->n_tokens;
	res->appended = r->appended;
	res->chunks_sealed = r->chunks_sealed;
	res->messages_sent = messages;
}

int kvt_client_append_blocks(struct kvt_client *c, const char *session_id,
			     const struct kvt_client_block *blocks, size_t n_blocks,
			     const struct kvt_client_append_opts *opts,
			     struct kvt_client_append_result *res, struct kvt_client_status *st)
{
	struct blocks_ctx x = { session_id, blocks, n_blocks, 0 };
	ProtobufCMessage *resp;
	uint32_t msgs = 0;
	int rc;

	if (res)
		memset(res, 0, sizeof(*res));
	rc = client_stream(c, SVC "Append", next_raw_block, &x, opts ? opts->cancel_after : 0,
			   opts ? opts->close_after : 0, &kvtier__v1__append_response__descriptor,
			   &resp, &msgs, opts ? opts->timeout_ms : 0, st);
	if (res)
		res->messages_sent = msgs;
	if (rc)
		return rc;
	append_result(resp, msgs, res);
	protobuf_c_message_free_unpacked(resp, NULL);
	return 0;
}

/* The AppendRequest splitting rule: token batches of `batch` tokens; when one batch of all
 * layers does not fit a message, each batch goes out as layer ranges of `layers_per_msg`. */
struct split_plan {
	size_t token_bytes;       /* one token of one layer of K (or V) */
	uint32_t batch;           /* tokens per batch */
	uint32_t layers_per_msg;  /* layers per message */
};

static int plan_split(const struct kvt_client_shape *s, uint32_t n_tokens, size_t msg_bytes,
		      uint32_t max_batch, struct split_plan *p, struct kvt_client_status *st)
{
	size_t budget = msg_bytes > 2 * MSG_OVERHEAD_BYTES ? msg_bytes - MSG_OVERHEAD_BYTES : 0;
	size_t per_token_all = 0;

	p->token_bytes = (size_t)s->n_kv_heads * s->head_dim * kvt_client_dtype_size(s->dtype);
	if (!p->token_bytes)
		return st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL,
				"shape has zero n_kv_heads, head_dim or an unknown dtype %u",
				s->dtype);
	per_token_all = 2 * p->token_bytes * s->n_layers;
	if (2 * p->token_bytes > budget)
		return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -EMSGSIZE,
				"one token of one layer (%zu bytes of K+V) exceeds max_message_bytes %zu",
				2 * p->token_bytes, msg_bytes);
	if (per_token_all <= budget) {
		size_t fit = budget / per_token_all;
		p->batch = (uint32_t)(fit < n_tokens ? fit : n_tokens);
		p->layers_per_msg = s->n_layers;
	} else {
		/* One token of every layer is too big: batches as long as fit one layer, cut by
		 * layer ranges. */
		size_t fit = budget / (2 * p->token_bytes);
		p->batch = (uint32_t)(fit < n_tokens ? fit : n_tokens);
		p->layers_per_msg = (uint32_t)(budget / (2 * p->token_bytes * p->batch));
		if (p->layers_per_msg > s->n_layers)
			p->layers_per_msg = s->n_layers;
	}
	if (max_batch && p->batch > max_batch) {
		p->batch = max_batch;
		if (p->layers_per_msg < s->n_layers) {
			size_t l = budget / (2 * p->token_bytes * p->batch);
			p->layers_per_msg = (uint32_t)(l < s->n_layers ? l : s->n_layers);
		}
	}
	if (p->batch == 0)
		p->batch = 1;
	ASSERT(p->layers_per_msg >= 1);
	return 0;
}

struct append_ctx {
	const char *session_id;
	struct kvt_client_shape shape;
	const uint8_t *k, *v;
	uint32_t n_tokens;
	uint64_t guard;           /* KVT_CLIENT_END: none */
	struct split_plan plan;
	uint32_t t;               /* next batch's first token (relative) */
	uint32_t l;               /* next layer of the current batch */
	uint8_t *scratch_k, *scratch_v;
	bool first;
};

/* Copies layers [l0, l1) x tokens [t, t+n) of a [L][N][H][d] tensor into dst (dense). */
static const uint8_t *gather(const uint8_t *src, uint8_t *dst, uint32_t n_all, size_t tb,
			     uint32_t t, uint32_t n, uint32_t l0, uint32_t l1)
{
	if (n == n_all || l1 - l0 == 1)
		return src + ((size_t)l0 * n_all + t) * tb; /* already contiguous */
	for (uint32_t l = l0; l < l1; l++)
		memcpy(dst + (size_t)(l - l0) * n * tb, src + ((size_t)l * n_all + t) * tb, n * tb);
	return dst;
}

/* Cuts the next block of the append plan; 0 when every token was cut. */
static int cut_block(struct append_ctx *x, Kvtier__V1__KvBlock *blk)
{
	struct kvt_client_block b;
	uint32_t n, l1;

	if (x->t >= x->n_tokens)
		return 0;
	n = x->n_tokens - x->t;
	if (n > x->plan.batch)
		n = x->plan.batch;
	l1 = x->l + x->plan.layers_per_msg;
	if (l1 > x->shape.n_layers)
		l1 = x->shape.n_layers;

	kvt_client_block_init(&b);
	/* The guard goes on a batch's first block only, so "tokens already sent" counts whole
	 * batches and is never ambiguous inside a batch split by layers. */
	if (x->guard != KVT_CLIENT_END && x->l == 0) {
		b.has_token_begin = 1;
		b.token_begin = x->guard + x->t;
	}
	b.n_tokens = n;
	b.layer_begin = x->l;
	b.n_layers = l1 - x->l;
	b.dtype = x->shape.dtype;
	b.k_bytes = b.v_bytes = (size_t)b.n_layers * n * x->plan.token_bytes;
	b.k = gather(x->k, x->scratch_k, x->n_tokens, x->plan.token_bytes, x->t, n, x->l, l1);
	b.v = gather(x->v, x->scratch_v, x->n_tokens, x->plan.token_bytes, x->t, n, x->l, l1);
	block_to_proto(&b, blk);

	if (l1 >= x->shape.n_layers) {
		x->l = 0;
		x->t += n;
	} else {
		x->l = l1;
	}
	return 1;
}

static int next_append(void *ctx, grpc_byte_buffer **out)
{
	struct append_ctx *x = ctx;
	Kvtier__V1__AppendRequest req = KVTIER__V1__APPEND_REQUEST__INIT;
	Kvtier__V1__KvBlock blk;

	if (!cut_block(x, &blk))
		return 0;
	if (x->first) {
		req.session_id = (char *)x->session_id;
		x->first = false;
	}
	req.block = &blk;
	/* pack copies the tensor bytes, so the scratch buffers are free again after this */
	*out = pack(&req.base);
	return 1;
}

int kvt_client_append(struct kvt_client *c, const char *session_id,
		      const struct kvt_client_shape *shape, const void *k, const void *v,
		      uint32_t n_tokens, const struct kvt_client_append_opts *opts,
		      struct kvt_client_append_result *res, struct kvt_client_status *st)
{
	struct kvt_client_append_opts def;
	struct append_ctx x;
	ProtobufCMessage *resp = NULL;
	size_t msg_bytes, scratch;
	uint32_t msgs = 0;
	int rc;

	if (!opts) {
		kvt_client_append_opts_init(&def);
		opts = &def;
	}
	if (res)
		memset(res, 0, sizeof(*res));
	if (!shape || !k || !v)
		return st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL, "shape, k and v are required");
	if (n_tokens == 0)
		return st_local(st, KVT_CODE_INVALID_ARGUMENT, -EINVAL,
				"n_tokens is 0 (an empty append sends nothing)");
	memset(&x, 0, sizeof(x));
	x.session_id = session_id;
	x.shape = *shape;
	x.k = k;
	x.v = v;
	x.n_tokens = n_tokens;
	x.guard = opts->token_begin;
	x.first = true;
	msg_bytes = opts->max_message_bytes && opts->max_message_bytes < c->max_message_bytes ?
			    opts->max_message_bytes :
			    c->max_message_bytes;
	rc = plan_split(shape, n_tokens, msg_bytes, opts->max_batch_tokens, &x.plan, st);
	if (rc)
		return rc;
	if (x.plan.batch < n_tokens && x.plan.layers_per_msg > 1) {
		scratch = (size_t)x.plan.layers_per_msg * x.plan.batch * x.plan.token_bytes;
		x.scratch_k = malloc(scratch);
		x.scratch_v = malloc(scratch);
		if (!x.scratch_k || !x.scratch_v) {
			rc = st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
			goto out;
		}
	}
	rc = client_stream(c, SVC "Append", next_append, &x, opts->cancel_after,
			   opts->close_after, &kvtier__v1__append_response__descriptor, &resp,
			   &msgs, opts->timeout_ms, st);
	if (res)
		res->messages_sent = msgs;
	if (!rc) {
		append_result(resp, msgs, res);
		protobuf_c_message_free_unpacked(resp, NULL);
	}
out:
	free(x.scratch_k);
	free(x.scratch_v);
	return rc;
}

/* ---- fetch ------------------------------------------------------------------------------------ */

/* Places one KvBlock into [layers][tokens][H][d] outputs covering [t0, t1) x [l0, l1). */
struct place_ctx {
	uint64_t t0, t1;
	uint32_t l0, l1;
	uint32_t dtype;
	size_t token_bytes;       /* 0 until known (raw fetch, or inferred) */
	uint8_t *k, *v;
	size_t k_cap, v_cap;
	size_t k_done, v_done;
	bool check_dtype;
	bool infer;               /* learn token_bytes from the first block */
	size_t need;              /* bytes of the whole range (known once token_bytes is) */
};

/* Checks a block's range and byte counts against the request (learning token_bytes from the
 * first block). Returns 0 and *rows_out (token-layers; 0 = nothing to place) or < 0. */
static int place_check(struct place_ctx *p, const Kvtier__V1__KvBlock *b, const char *what,
		       size_t *rows_out, struct kvt_client_status *st)
{
	size_t rows;

	*rows_out = 0;

	if (p->check_dtype && b->has_dtype && (uint32_t)b->dtype != p->dtype)
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO, "%s block has dtype %d, asked %u",
				what, (int)b->dtype, p->dtype);
	if (b->token_begin < p->t0 || b->token_begin + b->n_tokens > p->t1 ||
	    b->layer_begin < p->l0 || (uint64_t)b->layer_begin + b->n_layers > p->l1)
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"%s block tokens [%llu, %llu) layers [%u, %u) outside the range tokens [%llu, %llu) layers [%u, %u)",
				what, (unsigned long long)b->token_begin,
				(unsigned long long)(b->token_begin + b->n_tokens), b->layer_begin,
				b->layer_begin + b->n_layers, (unsigned long long)p->t0,
				(unsigned long long)p->t1, p->l0, p->l1);
	rows = (size_t)b->n_tokens * b->n_layers;
	if (rows == 0)
		return 0;
	if (p->infer && !p->token_bytes) {
		/* One token of one layer is k.len / rows bytes; the range needs that many bytes
		 * per token-layer, which the caller's buffers must hold. */
		size_t n = b->has_k ? b->k.len : b->v.len;
		if (n == 0 || n % rows)
			return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
					"%s block of %zu token-layers has %zu bytes", what, rows, n);
		p->token_bytes = n / rows;
		p->need = (size_t)(p->t1 - p->t0) * (p->l1 - p->l0) * p->token_bytes;
		if ((p->k && p->k_cap < p->need) || (p->v && p->v_cap < p->need))
			return st_local(st, KVT_CODE_INVALID_ARGUMENT, -ENOSPC,
					"output buffers (k %zu, v %zu bytes) are smaller than the range (%zu bytes each)",
					p->k ? p->k_cap : 0, p->v ? p->v_cap : 0, p->need);
	}
	if (p->token_bytes &&
	    ((b->has_k && b->k.len != rows * p->token_bytes) ||
	     (b->has_v && b->v.len != rows * p->token_bytes)))
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"%s block of %zu token-layers has k %zu / v %zu bytes, expected %zu each",
				what, rows, b->k.len, b->v.len, rows * p->token_bytes);
	*rows_out = rows;
	return 0;
}

/* Where layer i of a checked block goes in the outputs (offset and run length in bytes). */
static size_t place_offset(const struct place_ctx *p, const Kvtier__V1__KvBlock *b, uint32_t i,
			   size_t *len)
{
	size_t tb = p->token_bytes;
	*len = (size_t)b->n_tokens * tb;
	return (((size_t)(b->layer_begin - p->l0 + i)) * (p->t1 - p->t0) +
		(b->token_begin - p->t0)) * tb;
}

static int place_block(struct place_ctx *p, const Kvtier__V1__KvBlock *b, const char *what,
		       struct kvt_client_status *st)
{
	size_t rows;
	int rc = place_check(p, b, what, &rows, st);
	if (rc || rows == 0)
		return rc;
	if (!p->token_bytes) {
		/* raw fetch: the shape is unknown here, so only count */
		p->k_done += b->has_k ? b->k.len : 0;
		p->v_done += b->has_v ? b->v.len : 0;
		return 0;
	}
	for (uint32_t i = 0; i < b->n_layers; i++) {
		size_t len, off = place_offset(p, b, i, &len);
		if (p->k && b->has_k) {
			ASSERT(off + len <= p->k_cap);
			memcpy(p->k + off, b->k.data + (size_t)i * len, len);
		}
		if (p->v && b->has_v) {
			ASSERT(off + len <= p->v_cap);
			memcpy(p->v + off, b->v.data + (size_t)i * len, len);
		}
	}
	if (b->has_k)
		p->k_done += b->k.len;
	if (b->has_v)
		p->v_done += b->v.len;
	return 0;
}

static int on_fetch_msg(void *ctx, ProtobufCMessage *m, struct kvt_client_status *st)
{
	return place_block(ctx, (Kvtier__V1__KvBlock *)m, "Fetch", st);
}

/*
 * The copy-once path for Fetch replies: K and V go from gRPC's receive slices straight into
 * the caller's buffers (no flattening, no protobuf-c copy). It takes the layout kvtierd
 * writes (scalars 1..5, then k, then v, each once); anything else returns FALLBACK before
 * anything is counted, and protobuf-c parses the message again from the start (bytes copied
 * so far are overwritten by the same bytes).
 */
static int fetch_bb_parse(struct place_ctx *p, struct kvt_wire_reader *cu, struct kvt_client_status *st)
{
	Kvtier__V1__KvBlock b = KVTIER__V1__KV_BLOCK__INIT;
	unsigned seen = 0;
	size_t rows = 0;
	uint64_t tag, val;

	if (!p->infer)
		return FALLBACK; /* raw fetch: counted by protobuf-c's path */
	while (kvt_wire_fill(cu) == 0) {
		if (kvt_wire_varint(cu, &tag))
			return FALLBACK;
		uint32_t fn = (uint32_t)(tag >> 3), wt = (uint32_t)(tag & 7);
		if (fn >= 1 && fn <= 5 && wt == 0 && !(seen & (1u << fn)) && !(seen & (1u << 6))) {
			if (kvt_wire_varint(cu, &val) || (fn != 1 && val > UINT32_MAX))
				return FALLBACK;
			seen |= 1u << fn;
			switch (fn) {
			case 1: b.has_token_begin = 1; b.token_begin = val; break;
			case 2: b.has_n_tokens = 1; b.n_tokens = (uint32_t)val; break;
			case 3: b.has_layer_begin = 1; b.layer_begin = (uint32_t)val; break;
			case 4: b.has_n_layers = 1; b.n_layers = (uint32_t)val; break;
			case 5: b.has_dtype = 1; b.dtype = (Kvtier__V1__Dtype)(int)val; break;
			}
		} else if (fn == 6 && wt == 2 && !(seen & (1u << 6))) {
			if (kvt_wire_varint(cu, &val))
				return FALLBACK;
			/* V is not in yet: checked as the same length, confirmed below. */
			b.has_k = b.has_v = 1;
			b.k.len = b.v.len = val;
			seen |= 1u << 6;
			int rc = place_check(p, &b, "Fetch", &rows, st);
			if (rc)
				return rc;
			if (rows == 0 || !p->token_bytes)
				return FALLBACK;
			for (uint32_t i = 0; i < b.n_layers; i++) {
				size_t len, off = place_offset(p, &b, i, &len);
				ASSERT(!p->k || off + len <= p->k_cap);
				if (kvt_wire_copy(cu, p->k ? p->k + off : NULL, len))
					return FALLBACK;
			}
		} else if (fn == 7 && wt == 2 && (seen & (1u << 6)) && !(seen & (1u << 7))) {
			if (kvt_wire_varint(cu, &val) || val != b.k.len)
				return FALLBACK;
			seen |= 1u << 7;
			for (uint32_t i = 0; i < b.n_layers; i++) {
				size_t len, off = place_offset(p, &b, i, &len);
				ASSERT(!p->v || off + len <= p->v_cap);
				if (kvt_wire_copy(cu, p->v ? p->v + off : NULL, len))
					return FALLBACK;
			}
		} else {
			return FALLBACK;
		}
	}
	if (!(seen & (1u << 7)))
		return FALLBACK;
	p->k_done += b.k.len;
	p->v_done += b.v.len;
	return 0;
}

static int on_fetch_bb(void *ctx, grpc_byte_buffer *bb, struct kvt_client_status *st)
{
	struct kvt_wire_reader cu;
	int rc;

	memset(&cu, 0, sizeof(cu));
	if (!grpc_byte_buffer_reader_init(&cu.r, bb))
		return FALLBACK; /* compressed: protobuf-c's path reports it */
	rc = fetch_bb_parse(ctx, &cu, st);
	grpc_byte_buffer_reader_destroy(&cu.r);
	return rc;
}

/* fetch_local's answer for a range the daemon's Fetch rejects (nothing written, no status). */
#define FETCH_REJECTED 1
static int fetch_local(struct kvt_client *c, const char *session_id,
		       const struct kvt_client_fetch_range *r, uint8_t *ko, size_t k_cap,
		       uint8_t *vo, size_t v_cap, struct kvt_client_fetch_result *res,
		       struct kvt_client_status *st);

/* The range a fetch answered, as the caller asked for it (r: after defaults are filled). */
static void fetch_result_range(struct kvt_client_fetch_result *res,
			       const struct kvt_client_fetch_range *r)
{
	res->token_begin = r->token_begin;
	res->token_end = r->token_end;
	res->layer_begin = r->layer_begin;
	res->layer_end = r->layer_end;
	res->dtype = r->dtype;
}

int kvt_client_fetch(struct kvt_client *c, const char *session_id,
		     const struct kvt_client_fetch_range *range, void *k_out, size_t k_cap,
		     void *v_out, size_t v_cap, struct kvt_client_fetch_result *res,
		     struct kvt_client_status *st)
{
	struct kvt_client_fetch_range r;
	Kvtier__V1__FetchRequest req = KVTIER__V1__FETCH_REQUEST__INIT;
	struct place_ctx p;
	uint32_t msgs = 0;
	int rc;

	if (range)
		r = *range;
	else
		kvt_client_fetch_range_init(&r);
	if (res)
		memset(res, 0, sizeof(*res));
	memset(&p, 0, sizeof(p));
	req.session_id = (char *)session_id;

	if (r.raw) {
		/* Fields exactly as given; replies are counted, not placed. */
		req.has_token_begin = r.token_begin != 0;
		req.has_token_end = r.token_end != KVT_CLIENT_END;
		req.has_layer_begin = r.layer_begin != 0;
		req.has_layer_end = r.layer_end != KVT_CLIENT_ALL_LAYERS;
		req.has_dtype = r.dtype != 0;
		p.t0 = 0;
		p.t1 = UINT64_MAX / 2;
		p.l0 = 0;
		p.l1 = UINT32_MAX;
		k_out = v_out = NULL;
	} else {
		if (r.token_end == KVT_CLIENT_END || r.layer_end == KVT_CLIENT_ALL_LAYERS || !r.dtype) {
			/* Defaults are resolved with one Stat, so the request and the placement
			 * agree on the exact range. */
			struct kvt_client_session_info info;
			rc = kvt_client_stat(c, session_id, &info, st);
			if (rc)
				return rc;
			if (r.token_end == KVT_CLIENT_END)
				r.token_end = info.n_tokens;
			if (r.layer_end == KVT_CLIENT_ALL_LAYERS)
				r.layer_end = info.n_layers;
			if (!r.dtype)
				r.dtype = info.dtype;
		}
		req.has_token_begin = req.has_token_end = 1;
		req.has_layer_begin = req.has_layer_end = 1;
		req.has_dtype = 1;
		p.t0 = r.token_begin;
		p.t1 = r.token_end;
		p.l0 = r.layer_begin;
		p.l1 = r.layer_end;
		p.dtype = r.dtype;
		p.check_dtype = true;
		p.infer = true;
		if (p.t1 < p.t0 || p.l1 < p.l0) {
			/* The server names the bad field; nothing is placed. */
			p.t1 = p.t0;
			p.l1 = p.l0;
			k_out = v_out = NULL;
		}
	}
	bool local = r.decode_local == KVT_CLIENT_FETCH_LOCAL ||
		     (r.decode_local == KVT_CLIENT_FETCH_DEFAULT && c->fetch_local);
	if (local && !r.raw && !r.max_message_bytes) {
		rc = fetch_local(c, session_id, &r, k_out, k_cap, v_out, v_cap, res, st);
		if (res)
			fetch_result_range(res, &r);
		if (rc != FETCH_REJECTED)
			return rc;
		/* The daemon's Fetch would refuse this range (layers or dtype): send it as a
		 * Fetch, so the status is the daemon's own, exactly as without local decode. */
		if (res)
			memset(res, 0, sizeof(*res));
	}
	req.token_begin = r.token_begin;
	req.token_end = r.token_end;
	req.layer_begin = r.layer_begin;
	req.layer_end = r.layer_end;
	req.dtype = (Kvtier__V1__Dtype)r.dtype;
	if (r.max_message_bytes) {
		req.has_max_message_bytes = 1;
		req.max_message_bytes = r.max_message_bytes;
	}
	p.k = k_out;
	p.v = v_out;
	p.k_cap = k_cap;
	p.v_cap = v_cap;

	rc = server_stream(c, SVC "Fetch", &req.base, &kvtier__v1__kv_block__descriptor,
			   on_fetch_msg, on_fetch_bb, &p, &msgs, r.timeout_ms, st);
	if (res) {
		fetch_result_range(res, &r);
		res->k_bytes = p.k_done;
		res->v_bytes = p.v_done;
		res->messages = msgs;
	}
	if (rc)
		return rc;
	if (!r.raw && p.t1 > p.t0 && p.l1 > p.l0 && !p.token_bytes)
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"Fetch returned no data for a non-empty range");
	if (!r.raw && (p.k_done != p.need || p.v_done != p.need))
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"Fetch returned k %zu / v %zu bytes for a range of %zu bytes each",
				p.k_done, p.v_done, p.need);
	return 0;
}

/* ---- FetchEncoded / StoreEncoded --------------------------------------------------------------- */

void kvt_client_encoded_free(struct kvt_client_encoded *enc)
{
	if (!enc)
		return;
	for (size_t i = 0; i < enc->n_chunks; i++)
		free(enc->chunks[i].bytes);
	free(enc->chunks);
	free(enc->tail_k);
	free(enc->tail_v);
	free(enc);
}

struct enc_ctx {
	struct kvt_client_encoded *enc;
	bool have_info;
	size_t chunks_cap;
	size_t cur_filled;        /* bytes received of the last chunk */
	struct place_ctx tail;
	bool by_tokens;           /* asked for the token range [t0, t1) (local-decode Fetch) */
	uint64_t t0, t1;
};

/*
 * Where the next piece of a chunk goes: checks (chunk_index, offset, total_bytes, len) against
 * what came before, starting a new chunk (and its buffer) at offset 0, and returns the
 * destination of the piece's len bytes in *dst. Both reply paths use it.
 */
static int enc_piece_dst(struct enc_ctx *x, uint32_t chunk_index, uint64_t offset,
			 uint64_t total_bytes, size_t len, uint8_t **dst,
			 struct kvt_client_status *st)
{
	struct kvt_client_encoded *enc = x->enc;
	struct kvt_client_encoded_chunk *ch = NULL;

	if (!x->have_info)
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"FetchEncoded: first message carries no session info");
	if (enc->n_chunks && enc->chunks[enc->n_chunks - 1].chunk_index == chunk_index)
		ch = &enc->chunks[enc->n_chunks - 1];
	if (!ch) {
		if (offset != 0 || total_bytes == 0 || total_bytes > MAX_OBJECT_BYTES)
			return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
					"FetchEncoded: chunk %u starts at offset %llu with total_bytes %llu",
					chunk_index, (unsigned long long)offset,
					(unsigned long long)total_bytes);
		if (enc->n_chunks && x->cur_filled != enc->chunks[enc->n_chunks - 1].n_bytes)
			return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
					"FetchEncoded: chunk %u ended after %zu of %zu bytes",
					enc->chunks[enc->n_chunks - 1].chunk_index, x->cur_filled,
					enc->chunks[enc->n_chunks - 1].n_bytes);
		if (enc->n_chunks == x->chunks_cap) {
			size_t cap = x->chunks_cap ? 2 * x->chunks_cap : 16;
			void *g = realloc(enc->chunks, cap * sizeof(*enc->chunks));
			if (!g)
				return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM,
						"out of memory");
			enc->chunks = g;
			x->chunks_cap = cap;
		}
		ch = &enc->chunks[enc->n_chunks];
		ch->chunk_index = chunk_index;
		ch->n_bytes = (size_t)total_bytes;
		ch->bytes = malloc(ch->n_bytes);
		if (!ch->bytes)
			return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM,
					"out of memory for a %zu-byte chunk", ch->n_bytes);
		enc->n_chunks++;
		x->cur_filled = 0;
	}
	if (offset != x->cur_filled || len > ch->n_bytes - x->cur_filled)
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"FetchEncoded: chunk %u piece at %llu (+%zu) does not continue at %zu of %zu",
				chunk_index, (unsigned long long)offset, len, x->cur_filled,
				ch->n_bytes);
	*dst = ch->bytes + x->cur_filled;
	x->cur_filled += len;
	return 0;
}

static int on_encoded_msg(void *ctx, ProtobufCMessage *m, struct kvt_client_status *st)
{
	struct enc_ctx *x = ctx;
	struct kvt_client_encoded *enc = x->enc;
	Kvtier__V1__EncodedPiece *p = (Kvtier__V1__EncodedPiece *)m;

	if (p->session && !x->have_info) {
		struct kvt_client_session_info *i = &enc->info;
		info_from_proto(p->session, i);
		x->have_info = true;
		enc->tail_tokens = i->tail_tokens;
		enc->tail_token_begin = i->n_tokens - i->tail_tokens;
		if (x->by_tokens) {
			/* the tail's tokens of the range only */
			uint64_t sealed = enc->tail_token_begin;
			uint64_t a = x->t0 > sealed ? x->t0 : sealed, b = x->t1 > sealed ? x->t1 : sealed;
			if (x->t1 > i->n_tokens)
				return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
						"FetchEncoded: the session has %llu tokens, asked %llu",
						(unsigned long long)i->n_tokens,
						(unsigned long long)x->t1);
			enc->tail_token_begin = a;
			enc->tail_tokens = (uint32_t)(b - a);
		}
		x->tail.t0 = enc->tail_token_begin;
		x->tail.t1 = enc->tail_token_begin + enc->tail_tokens;
		x->tail.l0 = 0;
		x->tail.l1 = i->n_layers;
		x->tail.dtype = i->dtype;
		x->tail.check_dtype = true;
		x->tail.token_bytes = (size_t)i->n_kv_heads * i->head_dim *
				      kvt_client_dtype_size(i->dtype);
		if (enc->tail_tokens) {
			size_t bytes = (size_t)i->n_layers * enc->tail_tokens * x->tail.token_bytes;
			if (bytes == 0 || bytes > MAX_OBJECT_BYTES)
				return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
						"FetchEncoded: tail of %zu bytes is out of bounds",
						bytes);
			enc->tail_k = malloc(bytes);
			enc->tail_v = malloc(bytes);
			if (!enc->tail_k || !enc->tail_v)
				return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM,
						"out of memory for a %zu-byte tail", bytes);
			x->tail.k = enc->tail_k;
			x->tail.v = enc->tail_v;
			x->tail.k_cap = x->tail.v_cap = bytes;
		}
	}
	if (!x->have_info)
		return st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				"FetchEncoded: first message carries no session info");
	if (p->piece_case == KVTIER__V1__ENCODED_PIECE__PIECE_CHUNK) {
		Kvtier__V1__ChunkPiece *cp = p->chunk;
		uint8_t *dst;
		int rc = enc_piece_dst(x, cp->chunk_index, cp->offset, cp->total_bytes,
				       cp->data.len, &dst, st);
		if (rc)
			return rc;
		memcpy(dst, cp->data.data, cp->data.len);
		return 0;
	}
	if (p->piece_case == KVTIER__V1__ENCODED_PIECE__PIECE_TAIL)
		return place_block(&x->tail, p->tail, "FetchEncoded tail", st);
	return 0; /* an info-only message */
}

/*
 * The copy-once path for FetchEncoded's chunk pieces (nearly all of its bytes): the piece's
 * data goes from gRPC's receive slices straight into the chunk's buffer (no flattening, no
 * protobuf-c copy, no second copy out of it). It takes the layout kvtierd writes (EncodedPiece
 * with only field 1, a ChunkPiece of fields 1, 2, 3, then 4 last); every field is read and
 * checked before anything changes, so anything else (the session info, tail blocks) returns
 * FALLBACK and goes through protobuf-c.
 */
static int on_encoded_bb(void *ctx, grpc_byte_buffer *bb, struct kvt_client_status *st)
{
	struct enc_ctx *x = ctx;
	struct kvt_wire_reader cu;
	uint64_t tag, inner, v, fields[4] = {0, 0, 0, 0};
	unsigned seen = 0;
	uint8_t *dst;
	int rc = FALLBACK;
	size_t total = grpc_byte_buffer_length(bb);

	memset(&cu, 0, sizeof(cu));
	if (!grpc_byte_buffer_reader_init(&cu.r, bb))
		return FALLBACK; /* compressed: protobuf-c's path reports it */
	if (kvt_wire_varint(&cu, &tag) || tag != (1u << 3 | 2) || kvt_wire_varint(&cu, &inner) ||
	    cu.consumed + inner != total)
		goto out;
	while (!(seen & (1u << 4))) {
		if (kvt_wire_varint(&cu, &tag))
			goto out;
		uint32_t fn = (uint32_t)(tag >> 3), wt = (uint32_t)(tag & 7);
		if (fn < 1 || fn > 4 || (seen & (1u << fn)) || wt != (fn == 4 ? 2u : 0u) ||
		    kvt_wire_varint(&cu, &v))
			goto out;
		seen |= 1u << fn;
		fields[fn - 1] = v;
	}
	/* data is the last field and ends the message */
	if (seen != 0x1e || fields[0] > UINT32_MAX || cu.consumed + fields[3] != total)
		goto out;
	rc = enc_piece_dst(x, (uint32_t)fields[0], fields[1], fields[2], (size_t)fields[3], &dst,
			   st);
	if (rc == 0 && kvt_wire_copy(&cu, dst, (size_t)fields[3]))
		rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
			      "FetchEncoded: chunk piece shorter than its length");
out:
	grpc_byte_buffer_reader_destroy(&cu.r);
	return rc;
}

/* Runs one FetchEncoded call into x (x->enc allocated by the caller) and checks that every
 * chunk and the tail arrived whole. */
static int fetch_encoded_run(struct kvt_client *c, const Kvtier__V1__FetchEncodedRequest *req,
			     struct enc_ctx *x, bool want_tail, uint32_t *messages,
			     uint32_t timeout_ms, struct kvt_client_status *st)
{
	int rc = server_stream(c, SVC "FetchEncoded", &req->base,
			       &kvtier__v1__encoded_piece__descriptor, on_encoded_msg, on_encoded_bb,
			       x, messages, timeout_ms, st);
	if (!rc && !x->have_info)
		rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO, "FetchEncoded sent no session info");
	if (!rc && x->enc->n_chunks &&
	    x->cur_filled != x->enc->chunks[x->enc->n_chunks - 1].n_bytes)
		rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO, "FetchEncoded: last chunk incomplete");
	if (!rc && want_tail && x->enc->tail_tokens) {
		size_t need = x->tail.k_cap;
		if (x->tail.k_done != need || x->tail.v_done != need)
			rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				      "FetchEncoded: tail has k %zu / v %zu of %zu bytes",
				      x->tail.k_done, x->tail.v_done, need);
	}
	return rc;
}

int kvt_client_fetch_encoded(struct kvt_client *c, const char *session_id,
			     uint32_t chunk_begin, uint32_t chunk_end, int include_tail,
			     struct kvt_client_encoded **out, struct kvt_client_status *st)
{
	Kvtier__V1__FetchEncodedRequest req = KVTIER__V1__FETCH_ENCODED_REQUEST__INIT;
	struct enc_ctx x;
	int rc;

	*out = NULL;
	memset(&x, 0, sizeof(x));
	x.enc = calloc(1, sizeof(*x.enc));
	if (!x.enc)
		return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
	req.session_id = (char *)session_id;
	if (chunk_begin) {
		req.has_chunk_begin = 1;
		req.chunk_begin = chunk_begin;
	}
	if (chunk_end != KVT_CLIENT_ALL_CHUNKS) {
		req.has_chunk_end = 1;
		req.chunk_end = chunk_end;
	}
	req.has_include_tail = 1;
	req.include_tail = include_tail ? 1 : 0;
	rc = fetch_encoded_run(c, &req, &x, include_tail != 0, NULL, 0, st);
	if (!include_tail) {
		/* no tail was asked for: report none */
		free(x.enc->tail_k);
		free(x.enc->tail_v);
		x.enc->tail_k = x.enc->tail_v = NULL;
		x.enc->tail_tokens = 0;
	}
	if (rc) {
		kvt_client_encoded_free(x.enc);
		return rc;
	}
	*out = x.enc;
	return 0;
}

/*
 * The local-decode Fetch: FetchEncoded of the chunks that overlap the token range plus the
 * tail's tokens of it, then the chunks decoded here straight into the caller's buffers (the
 * codec's own decoder, so the bytes are those a Fetch returns). The transfer is the encoded
 * size (about 5x less than f16 at 2 bits) and the daemon only sends chunk bytes.
 */
static int fetch_local(struct kvt_client *c, const char *session_id,
		       const struct kvt_client_fetch_range *r, uint8_t *ko, size_t k_cap,
		       uint8_t *vo, size_t v_cap, struct kvt_client_fetch_result *res,
		       struct kvt_client_status *st)
{
	Kvtier__V1__FetchEncodedRequest req = KVTIER__V1__FETCH_ENCODED_REQUEST__INIT;
	struct enc_ctx x;
	struct kvt_client_encoded *enc;
	char err[256];
	uint32_t msgs = 0;
	int rc;

	memset(&x, 0, sizeof(x));
	x.enc = enc = calloc(1, sizeof(*x.enc));
	if (!enc)
		return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
	x.by_tokens = true;
	x.t0 = r->token_begin;
	x.t1 = r->token_end;
	req.session_id = (char *)session_id;
	req.has_token_begin = req.has_token_end = 1;
	req.token_begin = r->token_begin;
	req.token_end = r->token_end;
	rc = fetch_encoded_run(c, &req, &x, true, &msgs, r->timeout_ms, st);
	if (res) {
		/* the messages this path received, as the Fetch path counts its own */
		res->messages = msgs;
		res->decoded_locally = 1;
	}
	if (rc)
		goto out;

	const struct kvt_client_session_info *info = &enc->info;
	const uint64_t t0 = r->token_begin, t1 = r->token_end, nt = t1 - t0;
	const uint32_t l0 = r->layer_begin, l1 = r->layer_end, B = info->codec.chunk_tokens;
	const size_t hd = (size_t)info->n_kv_heads * info->head_dim;
	const size_t os = kvt_dtype_size(r->dtype), out_tok = hd * os;
	const size_t need = (size_t)nt * (l1 - l0) * out_tok;
	const uint64_t sealed = (uint64_t)info->n_chunks * B;
	if (l0 > l1 || l1 > info->n_layers || !os || r->dtype > KVT_CLIENT_DTYPE_F32) {
		/* the caller sends the request as a Fetch for the daemon's status */
		rc = FETCH_REJECTED;
		goto out;
	}
	if (!B) {
		rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
			      "FetchEncoded session info has chunk_tokens 0");
		goto out;
	}
	if ((ko && k_cap < need) || (vo && v_cap < need)) {
		rc = st_local(st, KVT_CODE_INVALID_ARGUMENT, -ENOSPC,
			      "output buffers (k %zu, v %zu bytes) are smaller than the range (%zu bytes each)",
			      ko ? k_cap : 0, vo ? v_cap : 0, need);
		goto out;
	}
	/* The chunks must be exactly those overlapping the range, each a valid chunk of this
	 * session's shape at its place (a chunk is checked, crc included, before it is
	 * decoded). */
	uint64_t want_first = t0 < sealed ? t0 / B : info->n_chunks;
	uint64_t want_end = t1 <= t0 ? want_first : t1 < sealed ? (t1 + B - 1) / B : info->n_chunks;
	if (enc->n_chunks != want_end - want_first) {
		rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
			      "FetchEncoded sent %zu chunks for tokens [%llu, %llu), expected %llu",
			      enc->n_chunks, (unsigned long long)t0, (unsigned long long)t1,
			      (unsigned long long)(want_end - want_first));
		goto out;
	}
	for (size_t i = 0; i < enc->n_chunks && nt && l1 > l0; i++) {
		const struct kvt_client_encoded_chunk *ch = &enc->chunks[i];
		struct kvt_codec_config cfg;
		struct kvt_chunk_header hdr;
		uint64_t cidx = want_first + i;
		if (ch->chunk_index != cidx ||
		    kvt_chunk_parse(ch->bytes, ch->n_bytes, &cfg, &hdr, err, sizeof(err)) ||
		    cfg.n_layers != info->n_layers || cfg.n_kv_heads != info->n_kv_heads ||
		    cfg.head_dim != info->head_dim || cfg.chunk_tokens != B ||
		    hdr.first_token != cidx * B) {
			rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				      "FetchEncoded chunk %u (expected %llu) is not a chunk of this "
				      "session at token %llu: %s",
				      ch->chunk_index, (unsigned long long)cidx,
				      (unsigned long long)(cidx * B), err);
			goto out;
		}
		uint32_t a = (uint32_t)((t0 > cidx * B ? t0 : cidx * B) - cidx * B);
		uint32_t b = (uint32_t)((t1 < (cidx + 1) * B ? t1 : (cidx + 1) * B) - cidx * B);
		uint64_t at = cidx * B + a - t0; /* output token of chunk token a */
		/* the whole range in this chunk: the output is the decoder's layout */
		uint32_t per = nt == b - a ? l1 - l0 : 1;
		for (uint32_t l = l0; l < l1; l += per) {
			size_t off = ((size_t)(l - l0) * nt + at) * out_tok;
			if (kvt_decode_chunk(ch->bytes, a, b, l, l + per, r->dtype,
					     ko ? ko + off : NULL, vo ? vo + off : NULL, err,
					     sizeof(err)) < 0) {
				rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
					      "decoding chunk %llu: %s", (unsigned long long)cidx,
					      err);
				goto out;
			}
		}
	}
	if (t1 > sealed && nt && l1 > l0) {
		/* the exact tail's tokens of the range: [L][tail_tokens][H][d] in the session's
		 * dtype, converted to the requested one */
		uint64_t ts = enc->tail_token_begin;
		size_t n = (size_t)(t1 - ts), stok = hd * kvt_dtype_size(info->dtype);
		if (!enc->tail_k || ts != (t0 > sealed ? t0 : sealed) || enc->tail_tokens != n) {
			rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO,
				      "FetchEncoded tail is tokens [%llu, +%u), expected [%llu, %llu)",
				      (unsigned long long)ts, enc->tail_tokens,
				      (unsigned long long)(t0 > sealed ? t0 : sealed),
				      (unsigned long long)t1);
			goto out;
		}
		for (uint32_t l = l0; l < l1; l++) {
			size_t off = ((size_t)(l - l0) * nt + (ts - t0)) * out_tok;
			size_t src = (size_t)l * n * stok;
			if (ko)
				kvt_convert((uint8_t *)enc->tail_k + src, info->dtype, ko + off,
					    r->dtype, n * hd);
			if (vo)
				kvt_convert((uint8_t *)enc->tail_v + src, info->dtype, vo + off,
					    r->dtype, n * hd);
		}
	}
	if (res) {
		res->k_bytes = ko ? need : 0;
		res->v_bytes = vo ? need : 0;
	}
out:
	kvt_client_encoded_free(enc);
	return rc;
}

struct store_ctx {
	const struct kvt_client_session_params *open;
	const struct kvt_client_encoded *enc;
	size_t budget;
	bool opened;
	size_t chunk;             /* current chunk */
	size_t offset;            /* inside it */
	struct append_ctx tail;   /* the tail, cut like an append */
};

static int next_store(void *ctx, grpc_byte_buffer **out)
{
	struct store_ctx *x = ctx;
	Kvtier__V1__StoreEncodedRequest req = KVTIER__V1__STORE_ENCODED_REQUEST__INIT;
	Kvtier__V1__EncodedPiece piece = KVTIER__V1__ENCODED_PIECE__INIT;
	Kvtier__V1__ChunkPiece cp = KVTIER__V1__CHUNK_PIECE__INIT;
	Kvtier__V1__OpenSessionRequest open;
	Kvtier__V1__CodecConfig codec;

	if (!x->opened) {
		open_to_proto(x->open, &open, &codec);
		req.open = &open;
		*out = pack(&req.base);
		x->opened = true;
		return 1;
	}
	if (x->chunk < x->enc->n_chunks) {
		const struct kvt_client_encoded_chunk *ch = &x->enc->chunks[x->chunk];
		size_t n = ch->n_bytes - x->offset;
		if (n > x->budget)
			n = x->budget;
		cp.has_chunk_index = 1;
		cp.chunk_index = (uint32_t)x->chunk;
		cp.has_offset = 1;
		cp.offset = x->offset;
		cp.has_total_bytes = 1;
		cp.total_bytes = ch->n_bytes;
		cp.has_data = 1;
		cp.data.data = ch->bytes + x->offset;
		cp.data.len = n;
		piece.piece_case = KVTIER__V1__ENCODED_PIECE__PIECE_CHUNK;
		piece.chunk = &cp;
		req.piece = &piece;
		*out = pack(&req.base);
		x->offset += n;
		if (x->offset >= ch->n_bytes) {
			x->chunk++;
			x->offset = 0;
		}
		return 1;
	}
	if (x->tail.n_tokens) {
		Kvtier__V1__KvBlock blk;
		if (!cut_block(&x->tail, &blk))
			return 0;
		piece.piece_case = KVTIER__V1__ENCODED_PIECE__PIECE_TAIL;
		piece.tail = &blk;
		req.piece = &piece;
		*out = pack(&req.base);
		return 1;
	}
	return 0;
}

int kvt_client_store_encoded(struct kvt_client *c, const struct kvt_client_session_params *open,
			     const struct kvt_client_encoded *enc,
			     struct kvt_client_session_info *info, struct kvt_client_status *st)
{
	struct store_ctx x;
	ProtobufCMessage *resp = NULL;
	int rc;

	memset(&x, 0, sizeof(x));
	x.open = open;
	x.enc = enc;
	x.budget = c->max_message_bytes - MSG_OVERHEAD_BYTES;
	if (enc->tail_tokens) {
		const struct kvt_client_session_info *i = &enc->info;
		x.tail.shape.n_layers = i->n_layers;
		x.tail.shape.n_kv_heads = i->n_kv_heads;
		x.tail.shape.head_dim = i->head_dim;
		x.tail.shape.dtype = i->dtype;
		x.tail.k = enc->tail_k;
		x.tail.v = enc->tail_v;
		x.tail.n_tokens = enc->tail_tokens;
		x.tail.guard = enc->tail_token_begin;
		x.tail.first = false;
		rc = plan_split(&x.tail.shape, enc->tail_tokens, c->max_message_bytes, 0,
				&x.tail.plan, st);
		if (rc)
			return rc;
		if (x.tail.plan.batch < enc->tail_tokens && x.tail.plan.layers_per_msg > 1) {
			size_t s = (size_t)x.tail.plan.layers_per_msg * x.tail.plan.batch *
				   x.tail.plan.token_bytes;
			x.tail.scratch_k = malloc(s);
			x.tail.scratch_v = malloc(s);
			if (!x.tail.scratch_k || !x.tail.scratch_v) {
				rc = st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM,
					      "out of memory");
				goto out;
			}
		}
	}
	rc = client_stream(c, SVC "StoreEncoded", next_store, &x, 0, 0,
			   &kvtier__v1__session_info__descriptor, &resp, NULL, 0, st);
	if (!rc) {
		if (info)
			info_from_proto((Kvtier__V1__SessionInfo *)resp, info);
		protobuf_c_message_free_unpacked(resp, NULL);
	}
out:
	free(x.tail.scratch_k);
	free(x.tail.scratch_v);
	return rc;
}

/* ---- Attend ------------------------------------------------------------------------------------ */

int kvt_client_attend(struct kvt_client *c, struct kvt_client_attend_item *items,
		      size_t n_items, uint32_t timeout_ms, struct kvt_client_status *st)
{
	Kvtier__V1__AttendRequest req = KVTIER__V1__ATTEND_REQUEST__INIT;
	Kvtier__V1__AttendItem *pi = NULL, **pp = NULL;
	Kvtier__V1__AttendResponse *resp;
	ProtobufCMessage *m = NULL;
	int rc;

	if (n_items) {
		pi = calloc(n_items, sizeof(*pi));
		pp = calloc(n_items, sizeof(*pp));
		if (!pi || !pp) {
			rc = st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
			goto out;
		}
	}
	for (size_t i = 0; i < n_items; i++) {
		const struct kvt_client_attend_item *it = &items[i];
		kvtier__v1__attend_item__init(&pi[i]);
		pi[i].session_id = (char *)it->session_id;
		pi[i].has_layer = 1;
		pi[i].layer = it->layer;
		pi[i].has_n_q_heads = 1;
		pi[i].n_q_heads = it->n_q_heads;
		if (it->softmax_scale != 0.0f) {
			pi[i].has_softmax_scale = 1;
			pi[i].softmax_scale = it->softmax_scale;
		}
		if (it->q) {
			pi[i].has_q = 1;
			pi[i].q.data = (uint8_t *)it->q;
			pi[i].q.len = it->q_bytes;
		}
		if (it->new_k) {
			pi[i].has_new_k = 1;
			pi[i].new_k.data = (uint8_t *)it->new_k;
			pi[i].new_k.len = it->new_k_bytes;
		}
		if (it->new_v) {
			pi[i].has_new_v = 1;
			pi[i].new_v.data = (uint8_t *)it->new_v;
			pi[i].new_v.len = it->new_v_bytes;
		}
		pp[i] = &pi[i];
		items[i].out_bytes = 0;
		items[i].n_tokens_attended = 0;
	}
	req.n_items = n_items;
	req.items = pp;
	rc = unary(c, SVC "Attend", &req.base, &kvtier__v1__attend_response__descriptor, &m,
		   timeout_ms, st);
	if (rc)
		goto out;
	resp = (Kvtier__V1__AttendResponse *)m;
	if (resp->n_results != n_items) {
		rc = st_local(st, KVT_CODE_INTERNAL, -EPROTO, "Attend returned %zu results for %zu items",
			      resp->n_results, n_items);
		goto out;
	}
	for (size_t i = 0; i < n_items; i++) {
		Kvtier__V1__AttendResult *r = resp->results[i];
		if (r->out.len > items[i].out_cap || (r->out.len && !items[i].out)) {
			rc = st_local(st, KVT_CODE_INVALID_ARGUMENT, -ENOSPC,
				      "Attend item %zu: output of %zu bytes exceeds out_cap %zu", i,
				      r->out.len, items[i].out_cap);
			goto out;
		}
		if (r->out.len)
			memcpy(items[i].out, r->out.data, r->out.len);
		items[i].out_bytes = r->out.len;
		items[i].n_tokens_attended = r->n_tokens_attended;
	}
out:
	if (m)
		protobuf_c_message_free_unpacked(m, NULL);
	free(pi);
	free(pp);
	return rc;
}

/* ---- RestoreToDevice ------------------------------------------------------------------------- */

int kvt_client_restore_to_device(struct kvt_client *c, const struct kvt_client_restore *r,
				 struct kvt_client_restore_result *res,
				 struct kvt_client_status *st)
{
	Kvtier__V1__RestoreToDeviceRequest req = KVTIER__V1__RESTORE_TO_DEVICE_REQUEST__INIT;
	Kvtier__V1__RestoreToDeviceResponse *resp;
	ProtobufCMessage *m;
	int rc;

	req.session_id = (char *)r->session_id;
	/* this process exported the handles: the daemon drops its mappings once we are gone */
	req.has_worker_pid = 1;
	req.worker_pid = (uint32_t)getpid();
	req.has_worker_pid_ns = c->pid_ns != 0;
	req.worker_pid_ns = c->pid_ns;
	if (r->ipc_mem_handle) {
		req.has_ipc_mem_handle = 1;
		req.ipc_mem_handle.data = (uint8_t *)r->ipc_mem_handle;
		req.ipc_mem_handle.len = r->ipc_mem_handle_bytes;
	}
	if (r->ipc_mem_handle_v) {
		req.has_ipc_mem_handle_v = 1;
		req.ipc_mem_handle_v.data = (uint8_t *)r->ipc_mem_handle_v;
		req.ipc_mem_handle_v.len = r->ipc_mem_handle_v_bytes;
	}
	req.has_k_offset_bytes = 1;
	req.k_offset_bytes = r->k_offset_bytes;
	req.has_v_offset_bytes = 1;
	req.v_offset_bytes = r->v_offset_bytes;
	req.has_buffer_bytes = 1;
	req.buffer_bytes = r->buffer_bytes;
	if (r->layout) {
		req.has_layout = 1;
		req.layout = (Kvtier__V1__DeviceLayout)r->layout;
	}
	if (r->block_size) {
		req.has_block_size = 1;
		req.block_size = r->block_size;
	}
	req.n_block_table = r->n_block_table;
	req.block_table = (uint32_t *)r->block_table;
	req.has_token_begin = 1;
	req.token_begin = r->token_begin;
	if (r->token_end != KVT_CLIENT_END) {
		req.has_token_end = 1;
		req.token_end = r->token_end;
	}
	req.has_layer_begin = 1;
	req.layer_begin = r->layer_begin;
	if (r->layer_end != KVT_CLIENT_ALL_LAYERS) {
		req.has_layer_end = 1;
		req.layer_end = r->layer_end;
	}
	if (r->dtype) {
		req.has_dtype = 1;
		req.dtype = (Kvtier__V1__Dtype)r->dtype;
	}
	if (r->device_ordinal >= 0) {
		req.has_device_ordinal = 1;
		req.device_ordinal = r->device_ordinal;
	}
	if (r->layer_stride_bytes) {
		req.has_layer_stride_bytes = 1;
		req.layer_stride_bytes = r->layer_stride_bytes;
	}
	rc = unary(c, SVC "RestoreToDevice", &req.base,
		   &kvtier__v1__restore_to_device_response__descriptor, &m, 0, st);
	if (rc)
		return rc;
	resp = (Kvtier__V1__RestoreToDeviceResponse *)m;
	if (res) {
		res->n_tokens = resp->n_tokens;
		res->bytes_written = resp->bytes_written;
		res->elapsed_us = resp->elapsed_us;
	}
	protobuf_c_message_free_unpacked(m, NULL);
	return 0;
}

/* ---- Stats ------------------------------------------------------------------------------------- */

int kvt_client_stats(struct kvt_client *c, struct kvt_client_stats *out,
		     struct kvt_client_status *st)
{
	Kvtier__V1__StatsRequest req = KVTIER__V1__STATS_REQUEST__INIT;
	Kvtier__V1__StatsResponse *r;
	ProtobufCMessage *m;
	int rc;

	memset(out, 0, sizeof(*out));
	rc = unary(c, SVC "Stats", &req.base, &kvtier__v1__stats_response__descriptor, &m, 0, st);
	if (rc)
		return rc;
	r = (Kvtier__V1__StatsResponse *)m;
	out->sessions = r->sessions;
	out->tokens = r->tokens;
	out->bytes_held = r->bytes_held;
	out->logical_bytes = r->logical_bytes;
	for (size_t i = 0; i < r->n_tiers && out->n_tiers < 8; i++) {
		struct kvt_client_tier_stats *t = &out->tiers[out->n_tiers++];
		copy_str(t->name, sizeof(t->name), r->tiers[i]->name);
		t->capacity_bytes = r->tiers[i]->capacity_bytes;
		t->used_bytes = r->tiers[i]->used_bytes;
		t->chunks = r->tiers[i]->chunks;
	}
	if (r->n_counters) {
		out->counters = calloc(r->n_counters, sizeof(*out->counters));
		if (!out->counters) {
			protobuf_c_message_free_unpacked(m, NULL);
			return st_local(st, KVT_CODE_RESOURCE_EXHAUSTED, -ENOMEM, "out of memory");
		}
		for (size_t i = 0; i < r->n_counters; i++) {
			copy_str(out->counters[i].name, sizeof(out->counters[i].name),
				 r->counters[i]->name);
			out->counters[i].value = r->counters[i]->value;
		}
		out->n_counters = r->n_counters;
	}
	copy_str(out->version, sizeof(out->version), r->version);
	out->uptime_ms = r->uptime_ms;
	copy_str(out->codec_isa, sizeof(out->codec_isa), r->codec_isa);
	out->gpu = r->gpu ? 1 : 0;
	protobuf_c_message_free_unpacked(m, NULL);
	return 0;
}

void kvt_client_stats_free(struct kvt_client_stats *s)
{
	if (!s)
		return;
	free(s->counters);
	s->counters = NULL;
	s->n_counters = 0;
}

uint64_t kvt_client_stats_counter(const struct kvt_client_stats *s, const char *name)
{
	for (size_t i = 0; i < s->n_counters; i++)
		if (!strcmp(s->counters[i].name, name))
			return s->counters[i].value;
	return 0;
}

#ifndef KVT_CLIENT_HAVE_CUDA
/* Built without CUDA: there is nothing to export a handle with (kvtier_client_cuda.c is the
 * real one). */
int kvt_client_restore_to_device_ptr(struct kvt_client *c, const struct kvt_client_restore *r,
				     const void *k_dev, const void *v_dev,
				     struct kvt_client_restore_result *res,
				     struct kvt_client_status *st)
{
	(void)c;
	(void)r;
	(void)k_dev;
	(void)v_dev;
	(void)res;
	return st_local(st, KVT_CODE_FAILED_PRECONDITION, -ENOTSUP,
			"libkvtier was built without CUDA: pass the IPC handle to "
			"kvt_client_restore_to_device instead");
}
#endif

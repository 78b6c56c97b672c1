/*
 * fuzz_rpc.c - mutation fuzzing of kvtierd's RPC surface over the wire.
 *
 * A real kvtierd (small limits, capacity_policy reject) serves a few pinned reference sessions
 * made through libkvtier (oscar f16, none bf16, kivi f32, hadamard with a recent window), whose
 * Fetch replies (the raw reply bytes, in three ranges and dtypes), FetchEncoded chunks and
 * tail, and Stat are recorded at start. Each iteration builds a valid request for one method
 * of kvtier.proto (or grpc.health.v1, or an unknown path) with protobuf-c, then mutates it:
 *   - semantically, through the protobuf-c descriptors: one field (at any depth) set to a
 *     boundary value (0, 1, max, -1 as unsigned, limits +-1, overflowing token ranges, huge
 *     dims, NaN/Inf), present <-> absent, unknown enums, strings empty / 129 bytes / non-UTF-8 /
 *     another session's id (a reference's only where the request cannot write), bytes one
 *     short / long / empty, repeated fields emptied or repeated thousands of times;
 *   - on the serialized bytes: bit flips, byte sets, truncation, junk appended, varint edge
 *     values (overlong, 11 bytes), field numbers and wire types changed, length prefixes too
 *     long / short, fields duplicated, deleted, swapped, repeated many times, a NUL or 0xff
 *     inside a string, the same mutations inside a nested message (its length fixed up);
 *   - for streams: a bad message mid-stream, the stream half-closed early, cancelled
 *     mid-stream (client streams before half-close, server streams after some replies),
 *     no request message at all, extra messages.
 * Requests that write (Append, Truncate, Drop, Pin, SetTtl, StoreEncoded, Attend with a new
 * token) only name scratch sessions ("s..."; a few bit flips cannot make a "REF-..." id of
 * one); a reference is only named where the request cannot change it (reads, Fork's source,
 * OpenSession / StoreEncoded onto it, Append streams that are always cancelled).
 *
 * Oracles, per call: it completes within its deadline (+5 s) with a status; a non-OK status
 * has a message; the code is one the contract allows for bad input (OK, INVALID_ARGUMENT,
 * NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED;
 * UNIMPLEMENTED for an unknown method; CANCELLED only where we cancelled): never INTERNAL,
 * UNKNOWN and the like; an OK reply parses as the method's response type; a session id
 * with a NUL byte (protobuf-c would read only its prefix) gets INVALID_ARGUMENT, also on
 * writes aimed at a reference. A server stream we cancel is ended the way libkvtier ends one
 * (its status asked for after the cancel; see raw_call). Every
 * KVT_FUZZ_CHECK_EVERY iterations and at the end: kvtierd's pid is alive, health is SERVING,
 * every reference fetches byte-identical to what was recorded and its Stat is unchanged, Stats
 * equal the sums over ListSessions, no rpc.*.INTERNAL / UNKNOWN counter and no eviction;
 * then the scratch sessions are dropped and made again. At the end kvtierd must exit 0 on
 * SIGTERM (under ASan: no leak) and its log must hold no sanitizer report.
 *
 * Every iteration draws from its own stream of (run seed, iteration): KVT_SEED=<s>
 * KVT_FUZZ_ITER=<i> replays iteration i alone on a fresh daemon and prints the request. The
 * default is DEFAULT_ITERS iterations (~20-30 s under ASan on a 2-core machine);
 * KVT_FUZZ_ITERS=<n> or KVT_FUZZ_SECONDS=<s> run longer. The last line sums up the outcomes
 * by status code and by method.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <sys/wait.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "fuzz_run.h"
#include "grpc/health/v1/health.pb-c.h"
#include "kvt_it.h"
#include "kvtier/v1/kvtier.pb-c.h"

#define DEFAULT_ITERS 30000u
#define CHECK_EVERY_DEFAULT 250u
#define CALL_DEADLINE_MS 15000u
#define HANG_SLACK_MS 5000u
#define CANCEL_WAIT_MS 3000u /* a call we cancelled must end within this */
#define MAX_FAILING_ITERS 20
#define MAX_MSGS 12
#define MAX_MSG_BYTES (2u << 20)    /* what we build; the daemon's limit is below */
#define DAEMON_MSG_LIMIT (1u << 20) /* --max_message_bytes */
#define N_REFS 4
#define N_SCRATCH 8
#define N_NEWIDS 16

/* ---- Randomness: one stream per iteration ----------------------------------------------- */

static void rng_stream(uint64_t stream, uint64_t n) { kvt_rand_stream(stream, n); }

static uint32_t rb(uint32_t n) { return n ? kvt_rand_below(n) : 0; }
static bool coin(uint32_t n) { return kvt_rand_below(n) == 0; }

/* ---- Failure context ---------------------------------------------------------------------- */

static char ctx[4096];
static bool ctx_printed, verbose;
static int failing_iters;
static uint64_t cur_iter;

static void ctx_add(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ctx_add(const char *fmt, ...)
{
	size_t n = strlen(ctx);
	va_list ap;
	if (n >= sizeof(ctx) - 2)
		return;
	va_start(ap, fmt);
	vsnprintf(ctx + n, sizeof(ctx) - n, fmt, ap);
	va_end(ap);
}

static void fail_ctx(void)
{
	if (ctx_printed)
		return;
	ctx_printed = true;
	failing_iters++;
	printf("#   iteration %llu: %s\n#   replay: KVT_SEED=%llu KVT_FUZZ_ITER=%llu\n",
	       (unsigned long long)cur_iter, ctx, (unsigned long long)kvt_test_seed,
	       (unsigned long long)cur_iter);
}

#define FCHECK(cond, ...) KVT_CHECK_OR(fail_ctx, cond, __VA_ARGS__)

static void hex_ctx(const char *what, const uint8_t *p, size_t n)
{
	ctx_add(" %s[%zu]=", what, n);
	for (size_t i = 0; i < n && i < 96; i++)
		ctx_add("%02x", p[i]);
	if (n > 96)
		ctx_add("...");
}

/* ---- The daemon, its sessions ------------------------------------------------------------- */

static struct kvt_daemon g_d;
static struct kvt_client *g_c;
static grpc_channel *g_ch;

struct shape {
	uint32_t L, H, D, dtype;
	struct kvt_client_codec codec;
};

struct ref {
	const char *id;
	struct shape sh;
	uint32_t n_tokens;
	struct kvt_client_session_info info;
	uint8_t *fetch[3];      /* raw Fetch reply streams: full, f32 sub-range, layer 1.. */
	size_t fetch_len[3];
	struct kvt_client_encoded *enc;
};

static struct ref refs[N_REFS] = {
	{ .id = "REF-oscar-f16", .sh = { 2, 2, 64, KVT_DTYPE_F16, { 0 } }, .n_tokens = 150 },
	{ .id = "REF-none-bf16", .sh = { 1, 1, 128, KVT_DTYPE_BF16, { 0 } }, .n_tokens = 70 },
	{ .id = "REF-kivi-f32", .sh = { 2, 1, 64, KVT_DTYPE_F32, { 0 } }, .n_tokens = 100 },
	{ .id = "REF-hada-w64", .sh = { 3, 2, 64, KVT_DTYPE_F16, { 0 } }, .n_tokens = 90 },
};

static void ref_codecs(void)
{
	for (int i = 0; i < N_REFS; i++)
		kvt_client_codec_init(&refs[i].sh.codec);
	/* 0: the daemon's default codec (the kvtier-int2 preset) */
	refs[1].sh.codec.scheme = KVT_CLIENT_SCHEME_NONE;
	refs[1].sh.codec.group = 32;
	refs[1].sh.codec.chunk_tokens = 32;
	refs[2].sh.codec.scheme = KVT_CLIENT_SCHEME_KIVI;
	refs[2].sh.codec.key_bits = 4;
	refs[2].sh.codec.value_bits = 4;
	refs[2].sh.codec.group = 32;
	refs[2].sh.codec.chunk_tokens = 64;
	refs[3].sh.codec.scheme = KVT_CLIENT_SCHEME_HADAMARD;
	refs[3].sh.codec.key_bits = 2;
	refs[3].sh.codec.value_bits = 2;
	refs[3].sh.codec.group = 32;
	refs[3].sh.codec.chunk_tokens = 32;
	refs[3].sh.codec.recent_exact_tokens = 64;
}

/* Writable ids: the scratch pool ("s0".."s7", remade at every check with a reference's shape)
 * and ids that requests may create ("sn0".."sn15"). A shape is known after an OK reply. */
struct wid {
	char id[16];
	int shape; /* index into refs of the shape it was made with, -1: unknown */
};
static struct wid wids[N_SCRATCH + N_NEWIDS];

static struct wid *wid_find(const char *id)
{
	for (size_t i = 0; i < N_SCRATCH + N_NEWIDS; i++)
		if (!strcmp(wids[i].id, id))
			return &wids[i];
	return NULL;
}

static uint8_t *g_k, *g_v; /* 512 tokens of valid K / V, any shape: [..] f16/bf16/f32 */
#define KV_POOL_BYTES (3u * 512 * 2 * 128 * 4)

/* ---- Outcome counters --------------------------------------------------------------------- */

enum {
	M_OPEN, M_FORK, M_TRUNCATE, M_DROP, M_PIN, M_UNPIN, M_SET_TTL, M_STAT, M_LIST, M_APPEND,
	M_FETCH, M_FETCH_ENC, M_STORE_ENC, M_ATTEND, M_RESTORE, M_PREFETCH, M_STATS, M_HEALTH,
	M_WATCH, M_UNKNOWN, N_METHODS
};
enum kind { UNARY, CSTREAM, SSTREAM };

static const struct method {
	const char *path, *name;
	enum kind kind;
	const ProtobufCMessageDescriptor *req, *resp;
} methods[N_METHODS] = {
#define KV(m) "/kvtier.v1.KvTier/" m
	{ KV("OpenSession"), "Open", UNARY, &kvtier__v1__open_session_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("Fork"), "Fork", UNARY, &kvtier__v1__fork_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("Truncate"), "Truncate", UNARY, &kvtier__v1__truncate_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("DropSession"), "Drop", UNARY, &kvtier__v1__drop_session_request__descriptor,
	  &kvtier__v1__drop_session_response__descriptor },
	{ KV("Pin"), "Pin", UNARY, &kvtier__v1__pin_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("Unpin"), "Unpin", UNARY, &kvtier__v1__pin_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("SetTtl"), "SetTtl", UNARY, &kvtier__v1__set_ttl_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("StatSession"), "Stat", UNARY, &kvtier__v1__stat_session_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("ListSessions"), "List", UNARY, &kvtier__v1__list_sessions_request__descriptor,
	  &kvtier__v1__list_sessions_response__descriptor },
	{ KV("Append"), "Append", CSTREAM, &kvtier__v1__append_request__descriptor,
	  &kvtier__v1__append_response__descriptor },
	{ KV("Fetch"), "Fetch", SSTREAM, &kvtier__v1__fetch_request__descriptor,
	  &kvtier__v1__kv_block__descriptor },
	{ KV("FetchEncoded"), "FetchEnc", SSTREAM, &kvtier__v1__fetch_encoded_request__descriptor,
	  &kvtier__v1__encoded_piece__descriptor },
	{ KV("StoreEncoded"), "StoreEnc", CSTREAM, &kvtier__v1__store_encoded_request__descriptor,
	  &kvtier__v1__session_info__descriptor },
	{ KV("Attend"), "Attend", UNARY, &kvtier__v1__attend_request__descriptor,
	  &kvtier__v1__attend_response__descriptor },
	{ KV("RestoreToDevice"), "Restore", UNARY,
	  &kvtier__v1__restore_to_device_request__descriptor,
	  &kvtier__v1__restore_to_device_response__descriptor },
	{ KV("Prefetch"), "Prefetch", UNARY, &kvtier__v1__prefetch_request__descriptor,
	  &kvtier__v1__prefetch_response__descriptor },
	{ KV("Stats"), "Stats", UNARY, &kvtier__v1__stats_request__descriptor,
	  &kvtier__v1__stats_response__descriptor },
	{ "/grpc.health.v1.Health/Check", "Health", UNARY,
	  &grpc__health__v1__health_check_request__descriptor,
	  &grpc__health__v1__health_check_response__descriptor },
	{ "/grpc.health.v1.Health/Watch", "Watch", SSTREAM,
	  &grpc__health__v1__health_check_request__descriptor,
	  &grpc__health__v1__health_check_response__descriptor },
	{ NULL, "unknown", UNARY, &kvtier__v1__stats_request__descriptor, NULL },
#undef KV
};

#define N_CODES 17
static uint64_t by_code[N_CODES + 1], by_method[N_METHODS][2]; /* [OK, not OK] */
static uint64_t n_calls, n_checks;

static const char *code_name(int code)
{
	return kvt_client_code_name(code);
}

/* ---- A raw call over gRPC core ------------------------------------------------------------ */

enum end_mode {
	END_CLOSE,        /* send every message, half-close */
	END_CANCEL,       /* send every message, then cancel (never half-close) */
	END_CANCEL_RECV,  /* half-close, cancel after cancel_after replies */
};

struct raw_msg {
	uint8_t *p;
	size_t n, cap;
};

struct call_out {
	int code;
	char msg[600];
	bool hung, cancelled;
	uint32_t n_recv;
	uint8_t *recv; /* replies, each as [u32 length][bytes] */
	size_t recv_len, recv_cap;
	bool recv_bad;  /* a reply did not parse as the response type */
};

static gpr_timespec after_ms(uint32_t ms)
{
	return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static void recv_append(struct call_out *o, const uint8_t *p, size_t n)
{
	if (o->recv_len + n + 4 > o->recv_cap) {
		size_t cap = o->recv_cap ? o->recv_cap * 2 : 65536;
		while (cap < o->recv_len + n + 4)
			cap *= 2;
		o->recv = realloc(o->recv, cap);
		if (!o->recv)
			abort();
		o->recv_cap = cap;
	}
	uint32_t n32 = (uint32_t)n;
	memcpy(o->recv + o->recv_len, &n32, 4);
	memcpy(o->recv + o->recv_len + 4, p, n);
	o->recv_len += n + 4;
}

/* Waits for tag on cq until the call's deadline plus slack; false = it never came (a hang). */
static bool wait_tag(grpc_completion_queue *cq, void *tag, gpr_timespec limit, int *success)
{
	grpc_event ev = grpc_completion_queue_pluck(cq, tag, limit, NULL);
	if (ev.type == GRPC_QUEUE_TIMEOUT)
		return false;
	*success = ev.success;
	return true;
}

struct pending {
	grpc_metadata_array imd, tmd;
	grpc_slice details;
	grpc_status_code status;
	grpc_byte_buffer *rbb;
	grpc_call *call;
	grpc_completion_queue *cq;
};

/* Calls that never completed: kept reachable (LeakSanitizer) and never touched again. */
static struct pending *g_stuck[256];
static size_t g_n_stuck;

static void keep_stuck(struct pending *pd, grpc_call *call, grpc_completion_queue *cq)
{
	pd->call = call;
	pd->cq = cq;
	if (g_n_stuck < sizeof g_stuck / sizeof g_stuck[0])
		g_stuck[g_n_stuck++] = pd;
}

static void start_recv_status(grpc_call *call, struct pending *pd)
{
	grpc_op op;
	memset(&op, 0, sizeof op);
	op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	op.data.recv_status_on_client.trailing_metadata = &pd->tmd;
	op.data.recv_status_on_client.status = &pd->status;
	op.data.recv_status_on_client.status_details = &pd->details;
	if (grpc_call_start_batch(call, &op, 1, (void *)1, NULL) != GRPC_CALL_OK)
		abort();
}

static void raw_call(const char *path, const struct raw_msg *msgs, size_t n_msgs,
		     enum end_mode mode, uint32_t cancel_after, const ProtobufCMessageDescriptor *resp,
		     struct call_out *o)
{
	/* What gRPC writes into when a batch completes lives on the heap: a call that never
	 * completes is kept (reachable, never freed) instead of writing into a dead frame. */
	struct pending *pd = calloc(1, sizeof *pd);
	if (!pd)
		abort();
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_metadata_array *imd = &pd->imd, *tmd = &pd->tmd;
	grpc_slice *details_p = &pd->details;
	grpc_status_code *status_p = &pd->status;
	*details_p = grpc_empty_slice();
	*status_p = GRPC_STATUS_UNKNOWN;
	grpc_op ops[3];
	int ok = 0;
	const char *hung_at = "";
	/*
	 * A server stream we cancel asks for its status only after the cancel, as libkvtier's
	 * server_stream does. gRPC core 1.51 never completes a RECV_STATUS_ON_CLIENT started
	 * *before* the cancel when the server's last replies and its status are already in the
	 * client's buffers unread (a Fetch whose two replies and trailers came in one read,
	 * cancelled after the first: replay KVT_SEED=1796041850527563453 KVT_FUZZ_ITER=134975
	 * with the status in the first batch); started after the cancel it completes at once
	 * with CANCELLED. Receiving after our cancel hangs the same way, so we do not.
	 */
	bool status_late = mode == END_CANCEL_RECV, status_started = !status_late;
	void *first_tag = status_late ? (void *)5 : (void *)1;
	gpr_timespec limit = after_ms(CALL_DEADLINE_MS + HANG_SLACK_MS);
	grpc_slice m = grpc_slice_from_copied_string(path);
	grpc_call *call = grpc_channel_create_call(g_ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL,
						   after_ms(CALL_DEADLINE_MS), NULL);
	grpc_slice_unref(m);
	o->n_recv = 0;
	o->recv_len = 0;
	o->hung = o->cancelled = o->recv_bad = false;
	o->msg[0] = '\0';
	o->code = -1;
	if (!call) {
		o->code = KVT_CODE_INTERNAL;
		snprintf(o->msg, sizeof o->msg, "(test) cannot create a call to %s", path);
		grpc_completion_queue_destroy(cq);
		free(pd);
		return;
	}
	grpc_metadata_array_init(imd);
	grpc_metadata_array_init(tmd);
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[1].data.recv_initial_metadata.recv_initial_metadata = imd;
	ops[2].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[2].data.recv_status_on_client.trailing_metadata = tmd;
	ops[2].data.recv_status_on_client.status = status_p;
	ops[2].data.recv_status_on_client.status_details = details_p;
	if (grpc_call_start_batch(call, ops, status_late ? 2 : 3, first_tag, NULL) != GRPC_CALL_OK)
		abort();
	for (size_t i = 0; i < n_msgs; i++) {
		grpc_slice s = grpc_slice_from_copied_buffer((const char *)msgs[i].p, msgs[i].n);
		grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
		grpc_slice_unref(s);
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_SEND_MESSAGE;
		ops[0].data.send_message.send_message = bb;
		if (grpc_call_start_batch(call, ops, 1, (void *)2, NULL) != GRPC_CALL_OK)
			abort();
		bool came = wait_tag(cq, (void *)2, limit, &ok);
		grpc_byte_buffer_destroy(bb);
		if (!came) {
			o->hung = true;
			hung_at = "send";
			goto cancel_wait;
		}
		if (!ok)
			break; /* the server ended the call: its status says why */
	}
	if (mode == END_CANCEL) {
		grpc_call_cancel(call, NULL);
		o->cancelled = true;
	} else {
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
		if (grpc_call_start_batch(call, ops, 1, (void *)3, NULL) != GRPC_CALL_OK)
			abort();
		if (!wait_tag(cq, (void *)3, limit, &ok)) {
			o->hung = true;
			hung_at = "close";
			goto cancel_wait;
		}
	}
	for (;;) {
		grpc_byte_buffer *rbb;
		pd->rbb = NULL;
		if (mode == END_CANCEL_RECV && o->n_recv >= cancel_after) {
			grpc_call_cancel(call, NULL);
			o->cancelled = true;
			limit = after_ms(CANCEL_WAIT_MS);
			break;
		}
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_RECV_MESSAGE;
		ops[0].data.recv_message.recv_message = &pd->rbb;
		if (grpc_call_start_batch(call, ops, 1, (void *)4, NULL) != GRPC_CALL_OK)
			abort();
		if (!wait_tag(cq, (void *)4, limit, &ok)) {
			o->hung = true;
			hung_at = "recv";
			goto cancel_wait;
		}
		rbb = pd->rbb;
		if (!ok || !rbb)
			break;
		grpc_byte_buffer_reader r;
		if (grpc_byte_buffer_reader_init(&r, rbb)) {
			grpc_slice all = grpc_byte_buffer_reader_readall(&r);
			grpc_byte_buffer_reader_destroy(&r);
			const uint8_t *p = GRPC_SLICE_START_PTR(all);
			size_t n = GRPC_SLICE_LENGTH(all);
			if (resp) {
				ProtobufCMessage *pm = protobuf_c_message_unpack(resp, NULL, n, p);
				if (!pm)
					o->recv_bad = true;
				else
					protobuf_c_message_free_unpacked(pm, NULL);
			}
			recv_append(o, p, n);
			grpc_slice_unref(all);
		} else {
			o->recv_bad = true;
		}
		grpc_byte_buffer_destroy(rbb);
		o->n_recv++;
	}
	if (status_late) {
		start_recv_status(call, pd);
		status_started = true;
		if (!wait_tag(cq, first_tag, limit, &ok)) {
			o->hung = true;
			hung_at = "initial metadata";
			goto cancel_wait;
		}
	}
	if (!wait_tag(cq, (void *)1, limit, &ok)) {
		o->hung = true;
		hung_at = "status";
		goto cancel_wait;
	}
	goto done;
cancel_wait:
	/* A hang: cancel and collect every batch still out so the queue can go. */
	printf("#   %s: no completion at %s (%u replies in so far); cancelling\n", path,
	       hung_at, o->n_recv);
	grpc_call_cancel(call, NULL);
	if (!status_started)
		start_recv_status(call, pd);
	if (first_tag != (void *)1)
		(void)wait_tag(cq, first_tag, after_ms(HANG_SLACK_MS), &ok);
	for (int i = 0;; i++) {
		grpc_event ev = grpc_completion_queue_pluck(cq, (void *)1, after_ms(HANG_SLACK_MS),
							    NULL);
		if (ev.type != GRPC_QUEUE_TIMEOUT)
			break;
		if (i == 1) {
			/* leaked: the queue cannot be destroyed with a batch out */
			printf("#   the call to %s does not end even when cancelled\n", path);
			o->code = KVT_CODE_DEADLINE_EXCEEDED;
			snprintf(o->msg, sizeof o->msg, "(test) no status");
			keep_stuck(pd, call, cq);
			return;
		}
	}
done:
	o->code = (int)*status_p;
	{
		size_t n = GRPC_SLICE_LENGTH(*details_p);
		if (n >= sizeof o->msg)
			n = sizeof o->msg - 1;
		memcpy(o->msg, GRPC_SLICE_START_PTR(*details_p), n);
		o->msg[n] = '\0';
	}
	grpc_slice_unref(*details_p);
	grpc_metadata_array_destroy(imd);
	grpc_metadata_array_destroy(tmd);
	free(pd);
	grpc_call_unref(call);
	grpc_completion_queue_shutdown(cq);
	for (;;) {
		grpc_event ev = grpc_completion_queue_pluck(cq, NULL,
							    gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
	}
	grpc_completion_queue_destroy(cq);
}

/* ---- Packing and the semantic mutator ----------------------------------------------------- */

static void msg_pack(struct raw_msg *r, const ProtobufCMessage *m)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	if (n + 64 > r->cap) {
		r->cap = n + 4096;
		r->p = realloc(r->p, r->cap);
		if (!r->p)
			abort();
	}
	r->n = protobuf_c_message_pack(m, r->p);
	KVT_CHECK(r->n == n, "pack size %zu != %zu", r->n, n);
}

/* Undo log: the semantic mutator writes into a message built here (pointing at our buffers)
 * and puts everything back after packing. */
#define UNDO_MAX 8
static struct undo {
	void *addr;
	uint8_t old[16];
	size_t n;
} undo[UNDO_MAX];
static size_t n_undo;
static void *undo_free[UNDO_MAX];
static size_t n_undo_free;

static void undo_save(void *addr, size_t n)
{
	if (n_undo == UNDO_MAX || n > 16)
		abort();
	undo[n_undo].addr = addr;
	undo[n_undo].n = n;
	memcpy(undo[n_undo].old, addr, n);
	n_undo++;
}

static void *undo_alloc(size_t n)
{
	void *p = calloc(1, n ? n : 1);
	if (!p || n_undo_free == UNDO_MAX)
		abort();
	undo_free[n_undo_free++] = p;
	return p;
}

static void undo_all(void)
{
	while (n_undo) {
		n_undo--;
		memcpy(undo[n_undo].addr, undo[n_undo].old, undo[n_undo].n);
	}
	while (n_undo_free)
		free(undo_free[--n_undo_free]);
}

struct fieldref {
	ProtobufCMessage *msg;
	const ProtobufCFieldDescriptor *f;
};

static size_t collect_fields(ProtobufCMessage *m, struct fieldref *out, size_t n, size_t cap,
			     int depth)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	for (unsigned i = 0; i < d->n_fields && n < cap; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		out[n].msg = m;
		out[n].f = f;
		n++;
		if (f->type != PROTOBUF_C_TYPE_MESSAGE || depth >= 3)
			continue;
		uint8_t *base = (uint8_t *)m;
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t cnt = *(size_t *)(base + f->quantifier_offset);
			ProtobufCMessage **arr = *(ProtobufCMessage ***)(base + f->offset);
			for (size_t j = 0; j < cnt && j < 3; j++)
				n = collect_fields(arr[j], out, n, cap, depth + 1);
		} else {
			if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
				uint32_t c = *(uint32_t *)(base + f->quantifier_offset);
				if (c != f->id)
					continue;
			}
			ProtobufCMessage *sub = *(ProtobufCMessage **)(base + f->offset);
			if (sub)
				n = collect_fields(sub, out, n, cap, depth + 1);
		}
	}
	return n;
}

static const uint64_t interesting_u64[] = {
	0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 255, 256, 257,
	1000, 1001, 1023, 1024, 1025, 4096, 65535, 65536, 0x7fffffffull, 0x80000000ull,
	0xfffffffeull, 0xffffffffull, 0x100000000ull, 0x7fffffffffffffffull,
	0x8000000000000000ull, 0xfffffffffffffffeull, 0xffffffffffffffffull,
};
#define N_INTERESTING (sizeof interesting_u64 / sizeof interesting_u64[0])

static uint64_t pick_u64(uint64_t cur)
{
	switch (rb(5)) {
	case 0: return cur + 1;
	case 1: return cur - 1;
	case 2: return kvt_rand_u64() >> rb(64);
	default: return interesting_u64[rb(N_INTERESTING)];
	}
}

/* Session ids a string field may become; refs only where the request cannot write. */
static const char *pick_string(bool allow_refs)
{
	static char long129[130], long128[129], long300[301];
	static const char *const weird[] = {
		"",          "\xff\xfe",     "\xc0\x80",     "caf\xc3",    "s0 ",   " ",
		"s\t0",      "../s0",        "no-such-session", "s0\x7f", "sn0", "sn15",
		"s1",        "REF-",         "%s%s%n",       "sn9",       "s7",   "\xe2\x82",
	};
	if (!long129[0]) {
		memset(long129, 'x', 129);
		memset(long128, 's', 128);
		memset(long300, 'y', 300);
	}
	uint32_t r = rb(10);
	if (r == 0)
		return long129;
	if (r == 1)
		return long128;
	if (r == 2)
		return long300;
	if (r == 3 && allow_refs)
		return refs[rb(N_REFS)].id;
	return weird[rb(sizeof weird / sizeof weird[0])];
}

/* Sets one field (anywhere in m) to a boundary or foreign value. Fields named in `keep` (a
 * space-separated list) are left alone. */
static void sem_mutate(ProtobufCMessage *m, bool allow_refs, const char *keep)
{
	struct fieldref fr[96];
	size_t n = collect_fields(m, fr, 0, 96, 0);
	if (!n)
		return;
	struct fieldref *x = NULL;
	for (int tries = 0; tries < 8; tries++) {
		x = &fr[rb((uint32_t)n)];
		if (!keep || !strstr(keep, x->f->name))
			break;
		x = NULL;
	}
	if (!x)
		return;
	const ProtobufCFieldDescriptor *f = x->f;
	uint8_t *base = (uint8_t *)x->msg;
	void *val = base + f->offset;
	ctx_add(" sem:%s.%s", x->msg->descriptor->short_name, f->name);

	if (f->label == PROTOBUF_C_LABEL_REPEATED) {
		size_t *cnt = (size_t *)(base + f->quantifier_offset);
		void **arr = (void **)val;
		undo_save(cnt, sizeof *cnt);
		undo_save(arr, sizeof *arr);
		if (*cnt == 0 || coin(3)) {
			*cnt = 0;
			ctx_add("=[]");
			return;
		}
		/* many copies of the first element (pointers for messages, values else) */
		size_t k = coin(2) ? 2 + rb(20) : 100 + rb(f->type == PROTOBUF_C_TYPE_MESSAGE ? 2000 : 300000);
		size_t esz = f->type == PROTOBUF_C_TYPE_MESSAGE ? sizeof(void *) : 4;
		if (f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_UINT32)
			return;
		uint8_t *na = undo_alloc(k * esz);
		for (size_t j = 0; j < k; j++) {
			memcpy(na + j * esz, (uint8_t *)*arr, esz);
			if (f->type == PROTOBUF_C_TYPE_UINT32 && coin(4))
				((uint32_t *)na)[j] = (uint32_t)pick_u64(j);
		}
		*arr = na;
		*cnt = k;
		ctx_add("=x%zu", k);
		return;
	}
	bool oneof = f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF;
	protobuf_c_boolean *has = NULL;
	if (!oneof && f->quantifier_offset &&
	    (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE))
		has = (protobuf_c_boolean *)(base + f->quantifier_offset);
	/* present -> absent */
	if (coin(6) && !oneof) {
		if (has) {
			undo_save(has, sizeof *has);
			*has = 0;
		} else {
			undo_save(val, sizeof(void *));
			*(void **)val = NULL;
		}
		ctx_add("=absent");
		return;
	}
	if (has) {
		undo_save(has, sizeof *has);
		*has = 1;
	}
	switch (f->type) {
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32: {
		undo_save(val, 4);
		uint32_t v = (uint32_t)pick_u64(*(uint32_t *)val);
		*(uint32_t *)val = v;
		ctx_add("=%u", v);
		break;
	}
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_ENUM: {
		static const int32_t ev[] = { 0, 1, 2, 3, 4, 5, 7, 99, -1, INT32_MAX, INT32_MIN };
		undo_save(val, 4);
		int32_t v = coin(2) ? ev[rb(sizeof ev / sizeof ev[0])] : (int32_t)pick_u64(0);
		*(int32_t *)val = v;
		ctx_add("=%d", v);
		break;
	}
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_FIXED64: {
		undo_save(val, 8);
		uint64_t v = pick_u64(*(uint64_t *)val);
		if (coin(4))
			v = refs[rb(N_REFS)].n_tokens + rb(3) - 1;
		*(uint64_t *)val = v;
		ctx_add("=%llu", (unsigned long long)v);
		break;
	}
	case PROTOBUF_C_TYPE_BOOL: {
		undo_save(val, sizeof(protobuf_c_boolean));
		protobuf_c_boolean v = (protobuf_c_boolean)rb(3); /* 2: a non-canonical bool */
		*(protobuf_c_boolean *)val = v;
		ctx_add("=%d", (int)v);
		break;
	}
	case PROTOBUF_C_TYPE_FLOAT: {
		static const float fv[] = { 0.0f, -0.0f, 1.0f, -1.0f, 1e-45f, 3.4e38f, 0.5f, 0.999f };
		undo_save(val, 4);
		float v;
		uint32_t r = rb(12);
		if (r == 0)
			v = NAN;
		else if (r == 1)
			v = INFINITY;
		else if (r == 2)
			v = -INFINITY;
		else
			v = fv[rb(sizeof fv / sizeof fv[0])];
		*(float *)val = v;
		ctx_add("=%g", (double)v);
		break;
	}
	case PROTOBUF_C_TYPE_DOUBLE: {
		undo_save(val, 8);
		*(double *)val = coin(2) ? NAN : -1e300;
		ctx_add("=nan/-1e300");
		break;
	}
	case PROTOBUF_C_TYPE_STRING: {
		undo_save(val, sizeof(char *));
		const char *s = pick_string(allow_refs);
		*(const char **)val = s;
		ctx_add("=\"%.20s\"(%zu)", s, strlen(s));
		break;
	}
	case PROTOBUF_C_TYPE_BYTES: {
		ProtobufCBinaryData *bd = val;
		undo_save(bd, sizeof *bd);
		size_t old = bd->len, nl;
		switch (rb(7)) {
		case 0: nl = 0; break;
		case 1: nl = old ? old - 1 : 1; break;
		case 2: nl = old + 1; break;
		case 3: nl = old * 2 + 2; break;
		case 4: nl = 64 + rb(2); break;
		case 5: nl = old / 2; break;
		default: nl = rb(4096); break;
		}
		uint8_t *p = undo_alloc(nl);
		if (old && bd->data)
			memcpy(p, bd->data, nl < old ? nl : old);
		if (coin(3))
			for (size_t j = 0; j < nl; j++)
				p[j] = (uint8_t)kvt_rand_u64();
		bd->data = p;
		bd->len = nl;
		ctx_add("=%zu bytes (was %zu)", nl, old);
		break;
	}
	case PROTOBUF_C_TYPE_MESSAGE:
		/* absent sub-messages are handled above; present ones: an empty one */
		if (!*(void **)val || oneof)
			break;
		{
			const ProtobufCMessageDescriptor *sd = f->descriptor;
			ProtobufCMessage *e = undo_alloc(sd->sizeof_message);
			protobuf_c_message_init(sd, e);
			undo_save(val, sizeof(void *));
			*(void **)val = e;
			ctx_add("={}");
		}
		break;
	default:
		break;
	}
}

/* ---- Byte mutations ---------------------------------------------------------------------- */

struct wfield {
	size_t off, tag_len, val_off, val_len, end;
	uint32_t fn, wt;
};

static int get_varint(const uint8_t *p, size_t n, size_t *pos, uint64_t *v)
{
	uint64_t x = 0;
	for (int i = 0; i < 10; i++) {
		if (*pos >= n)
			return -1;
		uint8_t b = p[(*pos)++];
		x |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80)) {
			*v = x;
			return 0;
		}
	}
	return -1;
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
	size_t n = 0;
	do {
		p[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
		v >>= 7;
	} while (v);
	return n;
}

/* Top-level fields of a serialized message; -1 when it does not parse. */
static int parse_fields(const uint8_t *p, size_t n, struct wfield *out, int cap)
{
	size_t pos = 0;
	int k = 0;
	while (pos < n) {
		struct wfield w;
		uint64_t tag, v;
		w.off = pos;
		if (get_varint(p, n, &pos, &tag) || k == cap)
			return -1;
		w.tag_len = pos - w.off;
		w.fn = (uint32_t)(tag >> 3);
		w.wt = (uint32_t)(tag & 7);
		w.val_off = pos;
		switch (w.wt) {
		case 0:
			if (get_varint(p, n, &pos, &v))
				return -1;
			break;
		case 1: pos += 8; break;
		case 5: pos += 4; break;
		case 2:
			if (get_varint(p, n, &pos, &v) || v > n - pos)
				return -1;
			w.val_off = pos;
			pos += v;
			break;
		default: return -1;
		}
		if (pos > n)
			return -1;
		w.val_len = pos - w.val_off;
		w.end = pos;
		out[k++] = w;
	}
	return k;
}

static void buf_reserve(struct raw_msg *r, size_t n)
{
	if (n <= r->cap)
		return;
	size_t cap = r->cap ? r->cap : 256;
	while (cap < n)
		cap *= 2;
	r->p = realloc(r->p, cap);
	if (!r->p)
		abort();
	r->cap = cap;
}

/* Replaces [off, off+del) with ins[0..n_ins). */
static void splice(struct raw_msg *r, size_t off, size_t del, const uint8_t *ins, size_t n_ins)
{
	buf_reserve(r, r->n - del + n_ins + 16);
	memmove(r->p + off + n_ins, r->p + off + del, r->n - off - del);
	if (n_ins)
		memcpy(r->p + off, ins, n_ins);
	r->n = r->n - del + n_ins;
}

static void byte_mutate(struct raw_msg *r, int depth);

/* One mutation of a sub-message: its bytes mutated, its length prefix fixed up. */
static bool mutate_nested(struct raw_msg *r, const struct wfield *w, int depth)
{
	struct raw_msg sub = { 0 };
	uint8_t hdr[32];
	buf_reserve(&sub, w->val_len + 16);
	memcpy(sub.p, r->p + w->val_off, w->val_len);
	sub.n = w->val_len;
	byte_mutate(&sub, depth + 1);
	size_t h = 0;
	memcpy(hdr, r->p + w->off, w->tag_len);
	h = w->tag_len;
	h += put_varint(hdr + h, sub.n);
	splice(r, w->off, w->end - w->off, hdr, 0);
	{
		uint8_t *tmp = malloc(h + sub.n);
		memcpy(tmp, hdr, h);
		memcpy(tmp + h, sub.p, sub.n);
		splice(r, w->off, 0, tmp, h + sub.n);
		free(tmp);
	}
	free(sub.p);
	return true;
}

static void byte_mutate(struct raw_msg *r, int depth)
{
	struct wfield fs[256];
	int nf = parse_fields(r->p, r->n, fs, 256);
	uint8_t tmp[40];
	uint32_t op = rb(16);
	if (nf <= 0 && op >= 5)
		op = rb(5);
	switch (op) {
	case 0: /* bit flips */
		if (!r->n)
			break;
		for (uint32_t i = 0, k = 1 + rb(4); i < k; i++) {
			size_t at = rb((uint32_t)r->n);
			r->p[at] ^= (uint8_t)(1u << rb(8));
		}
		ctx_add(" flip");
		break;
	case 1: { /* byte set */
		static const uint8_t bv[] = { 0x00, 0x01, 0x7f, 0x80, 0xff, 0x08, 0x10, 0x12, 0x1a };
		if (!r->n)
			break;
		size_t at = rb((uint32_t)r->n);
		r->p[at] = coin(2) ? bv[rb(sizeof bv)] : (uint8_t)kvt_rand_u64();
		ctx_add(" set@%zu", at);
		break;
	}
	case 2: { /* truncate */
		size_t at = r->n ? rb((uint32_t)r->n) : 0;
		if (nf > 0 && coin(2)) {
			const struct wfield *w = &fs[rb((uint32_t)nf)];
			at = w->end > 0 ? w->end - 1 - (coin(2) ? 0 : (w->end - w->off - 1)) : 0;
		}
		r->n = at;
		ctx_add(" trunc@%zu", at);
		break;
	}
	case 3: { /* junk appended */
		size_t k = 1 + rb(coin(4) ? 5000 : 12);
		buf_reserve(r, r->n + k);
		for (size_t i = 0; i < k; i++)
			r->p[r->n + i] = (uint8_t)kvt_rand_u64();
		r->n += k;
		ctx_add(" junk+%zu", k);
		break;
	}
	case 4: { /* a varint field with an edge value, somewhere */
		uint32_t fn = coin(8) ? (uint32_t)pick_u64(0) & 0x1fffffff : 1 + rb(18);
		size_t h = put_varint(tmp, (uint64_t)fn << 3 | 0);
		uint32_t kind = rb(4);
		if (kind == 0) {
			/* overlong: ten bytes for a small value */
			for (int i = 0; i < 9; i++)
				tmp[h++] = 0x80 | (uint8_t)(i == 0 ? rb(128) : 0);
			tmp[h++] = 0x00;
		} else if (kind == 1) {
			/* eleven bytes: not a varint */
			for (int i = 0; i < 10; i++)
				tmp[h++] = 0xff;
			tmp[h++] = 0x01;
		} else {
			h += put_varint(tmp + h, pick_u64(0));
		}
		size_t at = nf > 0 && coin(2) ? fs[rb((uint32_t)nf)].off : (coin(2) ? r->n : 0);
		splice(r, at, 0, tmp, h);
		ctx_add(" varint(f%u,%u)@%zu", fn, kind, at);
		break;
	}
	case 5: { /* field number changed */
		const struct wfield *w = &fs[rb((uint32_t)nf)];
		static const uint32_t fnv[] = { 0, 1, 2, 3, 5, 6, 7, 9, 15, 16, 19, 1000, 536870911 };
		uint32_t fn = coin(2) ? fnv[rb(sizeof fnv / sizeof fnv[0])] : 1 + rb(20);
		size_t h = put_varint(tmp, (uint64_t)fn << 3 | w->wt);
		splice(r, w->off, w->tag_len, tmp, h);
		ctx_add(" f%u->f%u", w->fn, fn);
		break;
	}
	case 6: { /* wire type changed */
		const struct wfield *w = &fs[rb((uint32_t)nf)];
		uint32_t wt = rb(8);
		size_t h = put_varint(tmp, (uint64_t)w->fn << 3 | wt);
		splice(r, w->off, w->tag_len, tmp, h);
		ctx_add(" f%u wt%u->%u", w->fn, w->wt, wt);
		break;
	}
	case 7: { /* length prefix too long / short */
		int cand[256], nc = 0;
		for (int i = 0; i < nf; i++)
			if (fs[i].wt == 2)
				cand[nc++] = i;
		if (!nc)
			break;
		const struct wfield *w = &fs[cand[rb((uint32_t)nc)]];
		uint64_t len = w->val_len;
		static const uint64_t lv[] = { 0x7fffffffull, 0x80000000ull, 0xffffffffull,
					       0x100000000ull, 0xffffffffffffffffull };
		uint32_t k = rb(6);
		uint64_t nl = k == 0 ? len + 1 : k == 1 ? (len ? len - 1 : 0) : k == 2 ? len + 1 + rb(100)
			    : k == 3 ? 0 : lv[rb(5)];
		size_t h = put_varint(tmp, nl);
		size_t old_len_bytes = w->val_off - w->off - w->tag_len;
		splice(r, w->off + w->tag_len, old_len_bytes, tmp, h);
		ctx_add(" f%u len %zu->%llu", w->fn, w->val_len, (unsigned long long)nl);
		break;
	}
	case 8: { /* duplicate a field (after itself or at the end) */
		const struct wfield *w = &fs[rb((uint32_t)nf)];
		size_t n = w->end - w->off;
		uint8_t *copy = malloc(n ? n : 1);
		memcpy(copy, r->p + w->off, n);
		splice(r, coin(2) ? w->end : r->n, 0, copy, n);
		free(copy);
		ctx_add(" dup f%u", w->fn);
		break;
	}
	case 9: { /* delete a field */
		const struct wfield *w = &fs[rb((uint32_t)nf)];
		splice(r, w->off, w->end - w->off, NULL, 0);
		ctx_add(" del f%u", w->fn);
		break;
	}
	case 10: { /* a field repeated many times */
		const struct wfield *w = &fs[rb((uint32_t)nf)];
		size_t n = w->end - w->off, k = coin(2) ? 10 + rb(100) : 1000 + rb(60000);
		if (n * k > MAX_MSG_BYTES)
			k = MAX_MSG_BYTES / (n ? n : 1);
		uint8_t *rep = malloc(n * k + 1);
		for (size_t i = 0; i < k; i++)
			memcpy(rep + i * n, r->p + w->off, n);
		splice(r, w->end, 0, rep, n * k);
		free(rep);
		ctx_add(" f%u x%zu", w->fn, k);
		break;
	}
	case 11: { /* swap two fields */
		if (nf < 2)
			break;
		uint32_t a = rb((uint32_t)nf - 1);
		const struct wfield *x = &fs[a], *y = &fs[a + 1];
		size_t nx = x->end - x->off, ny = y->end - y->off;
		uint8_t *t = malloc(nx + ny);
		memcpy(t, r->p + y->off, ny);
		memcpy(t + ny, r->p + x->off, nx);
		memcpy(r->p + x->off, t, nx + ny);
		free(t);
		ctx_add(" swap f%u f%u", x->fn, y->fn);
		break;
	}
	case 12: { /* a NUL, 0xff or control byte inside a string / bytes field */
		int cand[256], nc = 0;
		for (int i = 0; i < nf; i++)
			if (fs[i].wt == 2)
				cand[nc++] = i;
		if (!nc)
			break;
		struct wfield w = fs[cand[rb((uint32_t)nc)]];
		static const uint8_t ins[] = { 0x00, 0xff, 0x0a, 0xc3, 0x80 };
		uint8_t b = ins[rb(sizeof ins)];
		size_t at = w.val_off + (w.val_len ? rb((uint32_t)w.val_len + 1) : 0);
		bool replace = w.val_len && coin(2) && at < w.end;
		uint8_t hdr[16];
		if (replace) {
			r->p[at] = b;
		} else {
			splice(r, at, 0, &b, 1);
			size_t h = put_varint(hdr, w.val_len + 1);
			splice(r, w.off + w.tag_len, w.val_off - w.off - w.tag_len, hdr, h);
		}
		ctx_add(" str f%u byte %02x@%zu%s", w.fn, b, at - w.val_off, replace ? "=" : "+");
		break;
	}
	default: { /* inside a nested message */
		int cand[256], nc = 0;
		for (int i = 0; i < nf; i++)
			if (fs[i].wt == 2 && fs[i].val_len > 0) {
				struct wfield sub[8];
				if (parse_fields(r->p + fs[i].val_off, fs[i].val_len, sub, 8) != -1 ||
				    fs[i].val_len > 8)
					cand[nc++] = i;
			}
		if (!nc || depth >= 3) {
			if (!r->n)
				break;
			r->p[rb((uint32_t)r->n)] ^= 1;
			ctx_add(" flip1");
			break;
		}
		struct wfield w = fs[cand[rb((uint32_t)nc)]];
		ctx_add(" in f%u{", w.fn);
		mutate_nested(r, &w, depth);
		ctx_add(" }");
		break;
	}
	}
}

/* ---- Building valid requests ------------------------------------------------------------- */

struct req {
	int method;
	struct raw_msg msgs[MAX_MSGS];
	size_t n_msgs;
	enum end_mode end;
	uint32_t cancel_after;
	const char *path;
	bool writes_ref; /* a request that would be allowed to change a reference (never made) */
};

static uint32_t dtype_size(uint32_t dt)
{
	return dt == KVT_DTYPE_F32 ? 4 : 2;
}

static size_t row_bytes(const struct shape *s)
{
	return (size_t)s->H * s->D * dtype_size(s->dtype);
}

static void codec_to_pb(const struct kvt_client_codec *c, Kvtier__V1__CodecConfig *o)
{
	kvtier__v1__codec_config__init(o);
	if (c->scheme) {
		o->has_scheme = 1;
		o->scheme = (Kvtier__V1__Scheme)c->scheme;
	}
	if (c->key_bits) {
		o->has_key_bits = 1;
		o->key_bits = c->key_bits;
	}
	if (c->value_bits) {
		o->has_value_bits = 1;
		o->value_bits = c->value_bits;
	}
	if (c->group) {
		o->has_group = 1;
		o->group = c->group;
	}
	if (c->chunk_tokens) {
		o->has_chunk_tokens = 1;
		o->chunk_tokens = c->chunk_tokens;
	}
	if (c->recent_exact_tokens > 0) {
		o->has_recent_exact_tokens = 1;
		o->recent_exact_tokens = (uint32_t)c->recent_exact_tokens;
	}
}

/* Packs m into the next message slot, after (maybe) a semantic mutation. */
static void add_msg(struct req *q, ProtobufCMessage *m, int sem, bool allow_refs, const char *keep)
{
	if (q->n_msgs == MAX_MSGS)
		return;
	if (sem)
		sem_mutate(m, allow_refs, keep);
	msg_pack(&q->msgs[q->n_msgs++], m);
	undo_all();
}

static const char *any_id(bool allow_refs)
{
	uint32_t r = rb(10);
	if (allow_refs && r < 5)
		return refs[rb(N_REFS)].id;
	if (r < 8)
		return wids[rb(N_SCRATCH)].id;
	return wids[N_SCRATCH + rb(N_NEWIDS)].id;
}

static const struct shape *shape_of(const char *id)
{
	for (int i = 0; i < N_REFS; i++)
		if (!strcmp(refs[i].id, id))
			return &refs[i].sh;
	struct wid *w = wid_find(id);
	if (w && w->shape >= 0)
		return &refs[w->shape].sh;
	return &refs[rb(N_REFS)].sh;
}

static uint32_t ref_len(const char *id)
{
	for (int i = 0; i < N_REFS; i++)
		if (!strcmp(refs[i].id, id))
			return refs[i].n_tokens;
	return 40;
}

static void fill_block(Kvtier__V1__KvBlock *b, const struct shape *s, uint32_t n, uint32_t l0,
		       uint32_t nl, bool junk)
{
	size_t bytes = (size_t)nl * n * row_bytes(s);
	kvtier__v1__kv_block__init(b);
	b->has_n_tokens = 1;
	b->n_tokens = n;
	if (l0 || coin(2)) {
		b->has_layer_begin = 1;
		b->layer_begin = l0;
	}
	if (nl != s->L || coin(2)) {
		b->has_n_layers = 1;
		b->n_layers = nl;
	}
	if (coin(2)) {
		b->has_dtype = 1;
		b->dtype = (Kvtier__V1__Dtype)s->dtype;
	}
	if (bytes > KV_POOL_BYTES)
		bytes = KV_POOL_BYTES;
	size_t off = junk ? rb(64) * 2 : 0; /* misaligned: other (maybe NaN) values */
	b->has_k = b->has_v = 1;
	b->k.data = g_k + off;
	b->v.data = g_v + off;
	b->k.len = b->v.len = bytes;
}

/* Which mutation an iteration applies: none, semantic, bytes, or both. */
struct plan {
	int sem, bytes;
	size_t target_msg; /* which message of a stream */
};

static void build(struct req *q, struct plan *pl)
{
	int m = q->method;
	if (m < 0 || m >= N_METHODS)
		abort();
	bool allow_refs;
	const char *id;
	q->path = methods[m].path;
	q->end = END_CLOSE;
	int sem = pl->sem;
	switch (m) {
	case M_OPEN: {
		Kvtier__V1__OpenSessionRequest r;
		Kvtier__V1__CodecConfig cc;
		kvtier__v1__open_session_request__init(&r);
		int si = (int)rb(N_REFS);
		id = coin(3) ? refs[si].id : any_id(false);
		const struct shape *s = coin(2) ? shape_of(id) : &refs[si].sh;
		r.session_id = (char *)id;
		r.has_n_layers = r.has_n_kv_heads = r.has_head_dim = r.has_dtype = 1;
		r.n_layers = s->L;
		r.n_kv_heads = s->H;
		r.head_dim = s->D;
		r.dtype = (Kvtier__V1__Dtype)s->dtype;
		codec_to_pb(&s->codec, &cc);
		if (coin(3)) {
			cc.preset = coin(2) ? "kvtier-int2" : "oscar-int2";
		}
		if (coin(4)) {
			cc.key_rounding = coin(2) ? "mse" : "minmax";
		}
		r.codec = &cc;
		if (coin(3)) {
			r.has_ttl_seconds = 1;
			r.ttl_seconds = rb(100);
		}
		if (coin(4)) {
			r.has_pinned = 1;
			r.pinned = (protobuf_c_boolean)rb(2);
		}
		if (coin(4))
			r.tier = coin(2) ? "host" : "gpu";
		/* opening an existing session changes nothing: refs allowed */
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_FORK: {
		Kvtier__V1__ForkRequest r;
		kvtier__v1__fork_request__init(&r);
		r.source_session_id = (char *)any_id(true);
		r.new_session_id = wids[N_SCRATCH + rb(N_NEWIDS)].id;
		if (coin(2)) {
			r.has_n_tokens = 1;
			r.n_tokens = rb(ref_len(r.source_session_id) + 1);
		}
		if (coin(4)) {
			r.has_pinned = 1;
			r.pinned = (protobuf_c_boolean)rb(2);
		}
		/* a reference as the new id: ALREADY_EXISTS; the source is only read */
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_TRUNCATE: {
		Kvtier__V1__TruncateRequest r;
		kvtier__v1__truncate_request__init(&r);
		r.session_id = (char *)any_id(false);
		r.has_n_tokens = 1;
		r.n_tokens = rb(60);
		add_msg(q, &r.base, sem, false, NULL);
		break;
	}
	case M_DROP:
	case M_PIN:
	case M_UNPIN:
	case M_PREFETCH:
	case M_STAT: {
		/* one string field session_id = 1 in all of these */
		Kvtier__V1__StatSessionRequest r;
		kvtier__v1__stat_session_request__init(&r);
		allow_refs = m == M_STAT || m == M_PREFETCH;
		r.session_id = (char *)any_id(allow_refs);
		add_msg(q, &r.base, sem, allow_refs, NULL);
		break;
	}
	case M_SET_TTL: {
		Kvtier__V1__SetTtlRequest r;
		kvtier__v1__set_ttl_request__init(&r);
		r.session_id = (char *)any_id(false);
		r.has_ttl_seconds = 1;
		r.ttl_seconds = coin(2) ? 0 : 1 + rb(3600);
		add_msg(q, &r.base, sem, false, NULL);
		break;
	}
	case M_LIST: {
		Kvtier__V1__ListSessionsRequest r;
		kvtier__v1__list_sessions_request__init(&r);
		if (coin(2))
			r.prefix = coin(2) ? "REF-" : "s";
		if (coin(2)) {
			r.has_page_size = 1;
			r.page_size = 1 + rb(5);
		}
		if (coin(3))
			r.page_token = (char *)any_id(true);
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_STATS: {
		Kvtier__V1__StatsRequest r;
		kvtier__v1__stats_request__init(&r);
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_HEALTH:
	case M_WATCH: {
		Grpc__Health__V1__HealthCheckRequest r;
		grpc__health__v1__health_check_request__init(&r);
		if (coin(2))
			r.service = coin(2) ? "" : "kvtier.v1.KvTier";
		add_msg(q, &r.base, sem, true, NULL);
		if (m == M_WATCH) {
			q->end = END_CANCEL_RECV;
			q->cancel_after = 1;
		}
		break;
	}
	case M_UNKNOWN: {
		static const char *const paths[] = {
			"/kvtier.v1.KvTier/Nope",        "/kvtier.v1.KvTier/openSession",
			"/kvtier.v1.KvTier/",            "/kvtier.v1.KvTier/OpenSession/x",
			"/kvtier.v2.KvTier/OpenSession", "/grpc.health.v1.Health/List",
			"/",                             "/kvtier.v1.KvTier/Stats/",
			"/x/y/z/" "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
			"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
			"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
		};
		Kvtier__V1__StatsRequest r;
		kvtier__v1__stats_request__init(&r);
		q->path = paths[rb(sizeof paths / sizeof paths[0])];
		add_msg(q, &r.base, 0, true, NULL);
		break;
	}
	case M_FETCH: {
		Kvtier__V1__FetchRequest r;
		kvtier__v1__fetch_request__init(&r);
		id = any_id(true);
		const struct shape *s = shape_of(id);
		uint32_t n = ref_len(id);
		r.session_id = (char *)id;
		if (coin(2)) {
			r.has_token_begin = 1;
			r.token_begin = rb(n);
		}
		if (coin(2)) {
			r.has_token_end = 1;
			r.token_end = r.token_begin + rb(n - (uint32_t)r.token_begin + 1);
		}
		if (coin(2)) {
			r.has_layer_begin = 1;
			r.layer_begin = rb(s->L);
		}
		if (coin(2)) {
			r.has_layer_end = 1;
			r.layer_end = r.layer_begin + 1 + rb(s->L - r.layer_begin);
		}
		if (coin(2)) {
			r.has_dtype = 1;
			r.dtype = (Kvtier__V1__Dtype)(1 + rb(3));
		}
		if (coin(3)) {
			r.has_max_message_bytes = 1;
			r.max_message_bytes = coin(2) ? 1024 + rb(65536) : (uint32_t)pick_u64(0);
		}
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_FETCH_ENC: {
		Kvtier__V1__FetchEncodedRequest r;
		kvtier__v1__fetch_encoded_request__init(&r);
		id = any_id(true);
		r.session_id = (char *)id;
		if (coin(2)) {
			if (coin(2)) {
				r.has_chunk_begin = 1;
				r.chunk_begin = rb(3);
			}
			if (coin(2)) {
				r.has_chunk_end = 1;
				r.chunk_end = r.chunk_begin + rb(3);
			}
			if (coin(2)) {
				r.has_include_tail = 1;
				r.include_tail = (protobuf_c_boolean)rb(2);
			}
		} else if (coin(2)) {
			uint32_t n = ref_len(id);
			r.has_token_begin = 1;
			r.token_begin = rb(n);
			r.has_token_end = 1;
			r.token_end = r.token_begin + rb(n - (uint32_t)r.token_begin + 1);
		}
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_RESTORE: {
		Kvtier__V1__RestoreToDeviceRequest r;
		uint8_t handle[64];
		uint32_t table[8];
		kvtier__v1__restore_to_device_request__init(&r);
		id = any_id(true);
		const struct shape *s = shape_of(id);
		uint32_t n = ref_len(id);
		for (size_t i = 0; i < sizeof handle; i++)
			handle[i] = (uint8_t)kvt_rand_u64();
		r.session_id = (char *)id;
		r.has_ipc_mem_handle = 1;
		r.ipc_mem_handle.data = handle;
		r.ipc_mem_handle.len = 64;
		r.has_buffer_bytes = 1;
		r.buffer_bytes = 2ull * s->L * n * row_bytes(s);
		r.has_v_offset_bytes = 1;
		r.v_offset_bytes = r.buffer_bytes / 2;
		r.has_layout = 1;
		r.layout = coin(2) ? KVTIER__V1__DEVICE_LAYOUT__DEVICE_LAYOUT_CONTIGUOUS
				   : KVTIER__V1__DEVICE_LAYOUT__DEVICE_LAYOUT_PAGED;
		if (r.layout == KVTIER__V1__DEVICE_LAYOUT__DEVICE_LAYOUT_PAGED) {
			r.has_block_size = 1;
			r.block_size = 16 << rb(3);
			for (int i = 0; i < 8; i++)
				table[i] = (uint32_t)i;
			r.n_block_table = 8;
			r.block_table = table;
		}
		if (coin(2)) {
			r.has_worker_pid = 1;
			r.worker_pid = (uint32_t)getpid();
		}
		add_msg(q, &r.base, sem, true, NULL);
		break;
	}
	case M_ATTEND: {
		Kvtier__V1__AttendRequest r;
		Kvtier__V1__AttendItem items[4], *ip[4];
		static float qbuf[4][16 * 256];
		kvtier__v1__attend_request__init(&r);
		size_t ni = 1 + rb(4);
		bool stage = coin(3); /* a new token: scratch sessions only */
		for (size_t i = 0; i < ni; i++) {
			Kvtier__V1__AttendItem *it = &items[i];
			kvtier__v1__attend_item__init(it);
			id = stage ? any_id(false) : any_id(true);
			const struct shape *s = shape_of(id);
			uint32_t nq = s->H * (1 + rb(2)) * (stage ? 1 : 2);
			it->session_id = (char *)id;
			it->has_layer = 1;
			it->layer = stage ? (uint32_t)i % s->L : rb(s->L);
			it->has_n_q_heads = 1;
			it->n_q_heads = nq;
			for (size_t j = 0; j < (size_t)nq * s->D && j < 16 * 256; j++)
				qbuf[i][j] = 0.01f * (float)((j * 7 + i) % 101) - 0.5f;
			it->has_q = 1;
			it->q.data = (uint8_t *)qbuf[i];
			it->q.len = (size_t)nq * s->D * 4;
			if (coin(4)) {
				it->has_softmax_scale = 1;
				it->softmax_scale = 0.125f;
			}
			if (stage) {
				it->has_new_k = it->has_new_v = 1;
				it->new_k.data = g_k;
				it->new_v.data = g_v;
				it->new_k.len = it->new_v.len = row_bytes(s);
			}
			ip[i] = it;
		}
		r.n_items = ni;
		r.items = ip;
		add_msg(q, &r.base, sem, !stage, stage ? NULL : "new_k new_v");
		break;
	}
	case M_APPEND: {
		/* A reference target only with a stream that is always cancelled. */
		bool to_ref = coin(5);
		id = to_ref ? refs[rb(N_REFS)].id : any_id(false);
		const struct shape *s = shape_of(id);
		uint32_t batches = 1 + rb(3);
		size_t total = 0;
		bool junk = coin(5);
		for (uint32_t bi = 0; bi < batches; bi++) {
			uint32_t n = 1 + rb(40);
			uint32_t per = coin(2) ? s->L : 1 + rb(s->L);
			for (uint32_t l0 = 0; l0 < s->L; l0 += per) {
				uint32_t nl = l0 + per > s->L ? s->L - l0 : per;
				Kvtier__V1__AppendRequest r;
				Kvtier__V1__KvBlock b;
				kvtier__v1__append_request__init(&r);
				if (total == 0 || coin(4))
					r.session_id = (char *)id;
				fill_block(&b, s, n, l0, nl, junk);
				r.block = &b;
				total++;
				int sem_here = sem && q->n_msgs == pl->target_msg % (batches * s->L);
				/* a later message naming a reference is rejected (it differs from the
				 * first); the first names one only in streams that are cancelled */
				add_msg(q, &r.base, sem_here, q->n_msgs > 0 || to_ref, NULL);
			}
		}
		if (to_ref)
			q->end = END_CANCEL;
		else if (coin(8))
			q->end = END_CANCEL;
		if (coin(10) && q->n_msgs > 1)
			q->n_msgs = 1 + rb((uint32_t)q->n_msgs - 1); /* half-closed early */
		break;
	}
	case M_STORE_ENC: {
		struct ref *src = &refs[rb(N_REFS)];
		struct kvt_client_encoded *e = src->enc;
		Kvtier__V1__StoreEncodedRequest r;
		Kvtier__V1__OpenSessionRequest o;
		Kvtier__V1__CodecConfig cc;
		Kvtier__V1__EncodedPiece pc;
		Kvtier__V1__ChunkPiece cp;
		Kvtier__V1__KvBlock b;
		bool onto_ref = coin(6);
		kvtier__v1__store_encoded_request__init(&r);
		kvtier__v1__open_session_request__init(&o);
		o.session_id = (char *)(onto_ref ? refs[rb(N_REFS)].id
						 : wids[N_SCRATCH + rb(N_NEWIDS)].id);
		o.has_n_layers = o.has_n_kv_heads = o.has_head_dim = o.has_dtype = 1;
		o.n_layers = src->info.n_layers;
		o.n_kv_heads = src->info.n_kv_heads;
		o.head_dim = src->info.head_dim;
		o.dtype = (Kvtier__V1__Dtype)src->info.dtype;
		codec_to_pb(&src->sh.codec, &cc);
		o.codec = &cc;
		r.open = &o;
		/* the open message may name a reference only when it is rejected (not empty) */
		add_msg(q, &r.base, sem && pl->target_msg % 4 == 0, true, NULL);
		r.open = NULL;
		for (size_t ci = 0; ci < e->n_chunks && q->n_msgs < MAX_MSGS - 2; ci++) {
			size_t len = e->chunks[ci].n_bytes, off = 0;
			size_t piece = coin(2) ? len : 1 + len / 2;
			while (off < len && q->n_msgs < MAX_MSGS - 2) {
				size_t n = len - off < piece ? len - off : piece;
				kvtier__v1__encoded_piece__init(&pc);
				kvtier__v1__chunk_piece__init(&cp);
				cp.has_chunk_index = cp.has_offset = cp.has_total_bytes = cp.has_data = 1;
				cp.chunk_index = (uint32_t)ci;
				cp.offset = off;
				cp.total_bytes = len;
				cp.data.data = e->chunks[ci].bytes + off;
				cp.data.len = n;
				pc.piece_case = KVTIER__V1__ENCODED_PIECE__PIECE_CHUNK;
				pc.chunk = &cp;
				r.piece = &pc;
				add_msg(q, &r.base, sem && pl->target_msg % 4 == 1 && ci == 0, true,
					NULL);
				off += n;
			}
		}
		if (e->tail_tokens) {
			kvtier__v1__encoded_piece__init(&pc);
			kvtier__v1__kv_block__init(&b);
			b.has_token_begin = 1;
			b.token_begin = e->tail_token_begin;
			b.has_n_tokens = 1;
			b.n_tokens = e->tail_tokens;
			b.has_k = b.has_v = 1;
			b.k.data = e->tail_k;
			b.v.data = e->tail_v;
			b.k.len = b.v.len = (size_t)src->info.n_layers * e->tail_tokens *
					    row_bytes(&src->sh);
			pc.piece_case = KVTIER__V1__ENCODED_PIECE__PIECE_TAIL;
			pc.tail = &b;
			r.piece = &pc;
			add_msg(q, &r.base, sem && pl->target_msg % 4 >= 2, true, NULL);
		}
		if (coin(8))
			q->end = END_CANCEL;
		if (coin(10) && q->n_msgs > 1)
			q->n_msgs = 1 + rb((uint32_t)q->n_msgs - 1);
		break;
	}
	}
	if (methods[m].kind == SSTREAM && m != M_WATCH && coin(8)) {
		q->end = END_CANCEL_RECV;
		q->cancel_after = rb(3);
	}
	if (coin(40))
		q->n_msgs = 0; /* no request message at all */
	else if (methods[m].kind != CSTREAM && coin(40) && q->n_msgs < MAX_MSGS) {
		/* a second request message on a single-request call */
		buf_reserve(&q->msgs[q->n_msgs], q->msgs[0].n + 1);
		memcpy(q->msgs[q->n_msgs].p, q->msgs[0].p, q->msgs[0].n);
		q->msgs[q->n_msgs].n = q->msgs[0].n;
		q->n_msgs++;
	}
}

/* ---- Checks of the whole daemon ----------------------------------------------------------- */

static void fetch_raw_ref(const struct ref *r, int which, struct call_out *o)
{
	Kvtier__V1__FetchRequest f;
	struct raw_msg m = { 0 };
	kvtier__v1__fetch_request__init(&f);
	f.session_id = (char *)r->id;
	if (which == 1) {
		f.has_token_begin = f.has_token_end = f.has_dtype = 1;
		f.token_begin = 3;
		f.token_end = r->n_tokens - 2;
		f.dtype = KVTIER__V1__DTYPE__DTYPE_F32;
		f.has_max_message_bytes = 1;
		f.max_message_bytes = 16384;
	} else if (which == 2) {
		f.has_layer_begin = 1;
		f.layer_begin = r->sh.L - 1;
		f.has_dtype = 1;
		f.dtype = r->sh.dtype == KVT_DTYPE_BF16 ? KVTIER__V1__DTYPE__DTYPE_F16
							: KVTIER__V1__DTYPE__DTYPE_BF16;
	}
	msg_pack(&m, &f.base);
	raw_call(methods[M_FETCH].path, &m, 1, END_CLOSE, 0, &kvtier__v1__kv_block__descriptor, o);
	free(m.p);
}

static bool same_info(const struct kvt_client_session_info *a,
		      const struct kvt_client_session_info *b)
{
	return a->n_tokens == b->n_tokens && a->n_chunks == b->n_chunks &&
	       a->tail_tokens == b->tail_tokens && a->bytes_held == b->bytes_held &&
	       a->logical_bytes == b->logical_bytes && a->n_layers == b->n_layers &&
	       a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
	       a->dtype == b->dtype && a->pinned == b->pinned &&
	       a->ttl_seconds == b->ttl_seconds &&
	       !memcmp(&a->codec, &b->codec, sizeof a->codec);
}

static bool same_encoded(const struct kvt_client_encoded *a, const struct kvt_client_encoded *b,
			 const struct shape *s)
{
	if (a->n_chunks != b->n_chunks || a->tail_tokens != b->tail_tokens ||
	    a->tail_token_begin != b->tail_token_begin)
		return false;
	for (size_t i = 0; i < a->n_chunks; i++)
		if (a->chunks[i].n_bytes != b->chunks[i].n_bytes ||
		    memcmp(a->chunks[i].bytes, b->chunks[i].bytes, a->chunks[i].n_bytes))
			return false;
	size_t t = (size_t)s->L * a->tail_tokens * row_bytes(s);
	return !t || (!memcmp(a->tail_k, b->tail_k, t) && !memcmp(a->tail_v, b->tail_v, t));
}

static bool daemon_alive(void)
{
	int status;
	return g_d.pid > 0 && waitpid(g_d.pid, &status, WNOHANG) == 0 && kill(g_d.pid, 0) == 0;
}

/* Health SERVING, the pid alive, every reference exactly as recorded, Stats = the sums of the
 * listing, no INTERNAL / UNKNOWN counted, nothing evicted. Returns false when the daemon is
 * gone (the run stops). */
static bool check_daemon(const char *when)
{
	struct kvt_client_status st;
	struct call_out o = { 0 };
	int serving = 0;
	n_checks++;
	FCHECK(daemon_alive(), "[%s] kvtierd (pid %d) is not running", when, (int)g_d.pid);
	if (!daemon_alive())
		return false;
	FCHECK(kvt_client_health(g_c, "", 5000, &serving, &st) == 0 && serving == 1,
	       "[%s] health: %s %s", when, code_name(st.code), st.message);
	{
		/* the fuzzing channel (its connection saw every mutant) still gets answers */
		struct raw_msg m = { 0 };
		raw_call(methods[M_STATS].path, &m, 1, END_CLOSE, 0,
			 &kvtier__v1__stats_response__descriptor, &o);
		FCHECK(o.code == 0 && o.n_recv == 1 && !o.recv_bad,
		       "[%s] Stats on the fuzzing channel: %s \"%s\"", when, code_name(o.code),
		       o.msg);
	}
	for (int i = 0; i < N_REFS; i++) {
		struct ref *r = &refs[i];
		struct kvt_client_session_info info;
		struct kvt_client_encoded *e = NULL;
		for (int w = 0; w < 3; w++) {
			fetch_raw_ref(r, w, &o);
			FCHECK(o.code == 0 && o.recv_len == r->fetch_len[w] &&
				       !memcmp(o.recv, r->fetch[w], o.recv_len),
			       "[%s] %s: Fetch %d differs from the recorded one: %s \"%s\", %zu bytes "
			       "(recorded %zu)",
			       when, r->id, w, code_name(o.code), o.msg, o.recv_len, r->fetch_len[w]);
		}
		FCHECK(kvt_client_stat(g_c, r->id, &info, &st) == 0 && same_info(&info, &r->info),
		       "[%s] %s: Stat changed or failed (%s %s): %llu tokens, %llu bytes held, "
		       "pinned %d (recorded %llu, %llu, %d)",
		       when, r->id, code_name(st.code), st.message,
		       (unsigned long long)info.n_tokens, (unsigned long long)info.bytes_held,
		       info.pinned, (unsigned long long)r->info.n_tokens,
		       (unsigned long long)r->info.bytes_held, r->info.pinned);
		FCHECK(kvt_client_fetch_encoded(g_c, r->id, 0, KVT_CLIENT_ALL_CHUNKS, 1, &e, &st) == 0 &&
			       same_encoded(e, r->enc, &r->sh),
		       "[%s] %s: FetchEncoded differs from the recorded one (%s %s)", when, r->id,
		       code_name(st.code), st.message);
		kvt_client_encoded_free(e);
	}
	/* Stats against the listing (nothing else talks to this daemon) */
	struct kvt_client_stats s0;
	struct kvt_client_session_info *list = NULL;
	size_t nl = 0;
	if (kvt_client_stats(g_c, &s0, &st) == 0) {
		if (kvt_client_list(g_c, NULL, &list, &nl, &st) == 0) {
			uint64_t tokens = 0, bytes = 0, logical = 0, chunks = 0;
			for (size_t i = 0; i < nl; i++) {
				tokens += list[i].n_tokens;
				bytes += list[i].bytes_held;
				logical += list[i].logical_bytes;
				chunks += list[i].n_chunks;
			}
			/* TTL expiry between the two calls would change the sums */
			uint64_t expired = kvt_client_stats_counter(&s0, "sessions.expired");
			struct kvt_client_stats s1;
			if (kvt_client_stats(g_c, &s1, &st) == 0) {
				if (kvt_client_stats_counter(&s1, "sessions.expired") == expired) {
					FCHECK(s0.sessions == nl && s0.tokens == tokens &&
						       s0.bytes_held == bytes &&
						       s0.logical_bytes == logical &&
						       (s0.n_tiers == 0 || s0.tiers[0].chunks == chunks),
					       "[%s] Stats (%llu sessions, %llu tokens, %llu bytes, %llu "
					       "logical) != the listing's sums (%zu, %llu, %llu, %llu)",
					       when, (unsigned long long)s0.sessions,
					       (unsigned long long)s0.tokens,
					       (unsigned long long)s0.bytes_held,
					       (unsigned long long)s0.logical_bytes, nl,
					       (unsigned long long)tokens, (unsigned long long)bytes,
					       (unsigned long long)logical);
				}
				kvt_client_stats_free(&s1);
			}
			free(list);
		} else {
			FCHECK(0, "[%s] ListSessions: %s %s", when, code_name(st.code), st.message);
		}
		for (size_t i = 0; i < s0.n_counters; i++) {
			const char *nm = s0.counters[i].name;
			size_t ln = strlen(nm);
			bool bad = (ln > 9 && !strcmp(nm + ln - 9, ".INTERNAL")) ||
				   (ln > 8 && !strcmp(nm + ln - 8, ".UNKNOWN")) ||
				   (ln > 10 && !strcmp(nm + ln - 10, ".DATA_LOSS"));
			FCHECK(!bad || s0.counters[i].value == 0, "[%s] counter %s = %llu", when, nm,
			       (unsigned long long)s0.counters[i].value);
		}
		FCHECK(kvt_client_stats_counter(&s0, "sessions.evicted") == 0,
		       "[%s] sessions were evicted (capacity_policy is reject)", when);
		kvt_client_stats_free(&s0);
	} else {
		FCHECK(0, "[%s] Stats: %s %s", when, code_name(st.code), st.message);
	}
	free(o.recv);
	return true;
}

static bool is_ref(const char *id)
{
	for (int i = 0; i < N_REFS; i++)
		if (!strcmp(refs[i].id, id))
			return true;
	return false;
}

/* Drops every non-reference session and makes the scratch pool again. */
static void reset_scratch(void)
{
	struct kvt_client_session_info *list = NULL;
	struct kvt_client_status st;
	size_t nl = 0;
	if (kvt_client_list(g_c, NULL, &list, &nl, &st) == 0) {
		for (size_t i = 0; i < nl; i++)
			if (!is_ref(list[i].session_id))
				(void)kvt_client_drop(g_c, list[i].session_id, NULL, &st);
		free(list);
	}
	for (int i = 0; i < N_SCRATCH + N_NEWIDS; i++)
		wids[i].shape = i < N_SCRATCH ? i % N_REFS : -1;
	for (int i = 0; i < N_SCRATCH; i++) {
		const struct ref *r = &refs[i % N_REFS];
		struct kvt_client_session_params p;
		kvt_client_session_params_init(&p, wids[i].id, r->sh.L, r->sh.H, r->sh.D,
					       r->sh.dtype);
		p.codec = r->sh.codec;
		p.ttl_seconds = 0;
		struct kvt_client_shape sh = { r->sh.L, r->sh.H, r->sh.D, r->sh.dtype };
		uint32_t n = 20 + (uint32_t)i * 7;
		FCHECK(kvt_client_open(g_c, &p, NULL, &st) == 0 &&
			       kvt_client_append(g_c, wids[i].id, &sh, g_k, g_v, n, NULL, NULL, &st) == 0,
		       "scratch %s: %s %s", wids[i].id, code_name(st.code), st.message);
	}
}

/* ---- One iteration ------------------------------------------------------------------------ */

static bool code_allowed(int code, bool cancelled, int method)
{
	switch (code) {
	case KVT_CODE_OK:
	case KVT_CODE_INVALID_ARGUMENT:
	case KVT_CODE_NOT_FOUND:
	case KVT_CODE_ALREADY_EXISTS:
	case KVT_CODE_FAILED_PRECONDITION:
	case KVT_CODE_OUT_OF_RANGE:
	case KVT_CODE_RESOURCE_EXHAUSTED:
		return true;
	case KVT_CODE_UNIMPLEMENTED: return method == M_UNKNOWN;
	case KVT_CODE_CANCELLED: return cancelled;
	default: return false;
	}
}

static void note_reply(const struct req *q, const struct call_out *o)
{
	/* an OK SessionInfo of a writable id: remember its shape for later requests */
	if (o->code || !o->n_recv || methods[q->method].resp != &kvtier__v1__session_info__descriptor)
		return;
	uint32_t n;
	memcpy(&n, o->recv, 4);
	Kvtier__V1__SessionInfo *si = kvtier__v1__session_info__unpack(NULL, n, o->recv + 4);
	if (!si)
		return;
	struct wid *w = si->session_id ? wid_find(si->session_id) : NULL;
	if (w) {
		w->shape = -1;
		for (int i = 0; i < N_REFS; i++)
			if (refs[i].sh.L == si->n_layers && refs[i].sh.H == si->n_kv_heads &&
			    refs[i].sh.D == si->head_dim && refs[i].sh.dtype == (uint32_t)si->dtype)
				w->shape = i;
	}
	kvtier__v1__session_info__free_unpacked(si, NULL);
}

static const uint32_t method_weight[N_METHODS] = {
	[M_OPEN] = 8, [M_FORK] = 6, [M_TRUNCATE] = 5, [M_DROP] = 3, [M_PIN] = 2, [M_UNPIN] = 2,
	[M_SET_TTL] = 3, [M_STAT] = 4, [M_LIST] = 4, [M_APPEND] = 14, [M_FETCH] = 10,
	[M_FETCH_ENC] = 8, [M_STORE_ENC] = 8, [M_ATTEND] = 8, [M_RESTORE] = 5, [M_PREFETCH] = 2,
	[M_STATS] = 2, [M_HEALTH] = 2, [M_WATCH] = 1, [M_UNKNOWN] = 1,
};

static struct req g_req;
static struct call_out g_out;

static void run_iteration(uint64_t it)
{
	struct req *q = &g_req;
	struct plan pl = { 0 };
	uint32_t total = 0, r;
	cur_iter = it;
	ctx[0] = '\0';
	ctx_printed = false;
	rng_stream(1, it);
	for (int i = 0; i < N_METHODS; i++)
		total += method_weight[i];
	r = rb(total);
	q->method = N_METHODS - 1;
	for (int i = 0; i < N_METHODS; i++) {
		if (r < method_weight[i]) {
			q->method = i;
			break;
		}
		r -= method_weight[i];
	}
	q->n_msgs = 0;
	q->cancel_after = 0;
	switch (rb(10)) {
	case 0: break;
	case 1: case 2: case 3: pl.sem = 1; break;
	case 4: case 5: case 6: case 7: pl.bytes = 1 + (int)rb(3); break;
	default: pl.sem = 1; pl.bytes = 1; break;
	}
	pl.target_msg = rb(12);
	/* A session id with a NUL byte (what protobuf-c would cut short) in the first message,
	 * nothing else wrong, writes aimed at references included: INVALID_ARGUMENT. */
	static const bool id_first[N_METHODS] = {
		[M_OPEN] = 1, [M_FORK] = 1, [M_TRUNCATE] = 1, [M_DROP] = 1, [M_PIN] = 1,
		[M_UNPIN] = 1, [M_SET_TTL] = 1, [M_STAT] = 1, [M_FETCH] = 1, [M_FETCH_ENC] = 1,
		[M_RESTORE] = 1, [M_PREFETCH] = 1, [M_APPEND] = 1,
	};
	bool nul_id = id_first[q->method] && coin(20);
	if (nul_id)
		pl.sem = pl.bytes = 0;
	ctx_add("%s", methods[q->method].name);
	build(q, &pl);
	if (nul_id && q->n_msgs) {
		struct wfield fs[64];
		int nf = parse_fields(q->msgs[0].p, q->msgs[0].n, fs, 64);
		for (int i = 0; i < nf; i++) {
			if (fs[i].fn != 1 || fs[i].wt != 2)
				continue;
			char id[64];
			size_t n = (size_t)snprintf(id, sizeof id, "%s",
						    coin(2) ? refs[rb(N_REFS)].id : wids[rb(N_SCRATCH)].id);
			id[n++] = '\0';
			for (uint32_t k = rb(4); k; k--)
				id[n++] = (char)('a' + rb(26));
			uint8_t hdr[16];
			size_t h = put_varint(hdr + 1, n) + 1;
			hdr[0] = 0x0a;
			splice(&q->msgs[0], fs[i].off, fs[i].end - fs[i].off, NULL, 0);
			splice(&q->msgs[0], fs[i].off, 0, (const uint8_t *)id, n);
			splice(&q->msgs[0], fs[i].off, 0, hdr, h);
			ctx_add(" nul-id \"%s\\0...\"(%zu)", id, n);
			q->end = END_CLOSE;
			break;
		}
	}
	/* byte mutations: one message of a stream (several sometimes) */
	if (pl.bytes && q->n_msgs) {
		size_t t = pl.target_msg % q->n_msgs;
		/* any message: no byte mutation turns a scratch id ("s..", 2-4 bytes) into a
		 * reference's ("REF-...", 12-13 bytes), and streams aimed at a reference are
		 * always cancelled */
		for (int k = 0; k < pl.bytes; k++) {
			ctx_add(" [msg %zu]", t);
			byte_mutate(&q->msgs[t], 0);
			if (coin(3))
				t = rb((uint32_t)q->n_msgs);
		}
	}
	ctx_add(" | %zu msgs, end %d/%u", q->n_msgs, (int)q->end, q->cancel_after);
	if (verbose) {
		printf("# iteration %llu: %s\n", (unsigned long long)it, ctx);
		for (size_t i = 0; i < q->n_msgs; i++) {
			char what[32];
			snprintf(what, sizeof what, "msg%zu", i);
			ctx[0] = '\0';
			hex_ctx(what, q->msgs[i].p, q->msgs[i].n);
			printf("#  %s\n", ctx);
		}
	}
	raw_call(q->path, q->msgs, q->n_msgs, q->end, q->cancel_after, methods[q->method].resp,
		 &g_out);
	n_calls++;
	int code = g_out.code;
	by_code[code >= 0 && code < N_CODES ? code : N_CODES]++;
	by_method[q->method][code != 0]++;
	if (verbose)
		printf("#   -> %s \"%s\" (%u replies)\n", code_name(code), g_out.msg, g_out.n_recv);
	bool ok_code = code_allowed(code, g_out.cancelled, q->method);
	if (nul_id && strstr(ctx, "nul-id"))
		ok_code = code == KVT_CODE_INVALID_ARGUMENT;
	if (g_out.hung || !ok_code || (code != 0 && !g_out.msg[0]) ||
	    (code == 0 && g_out.recv_bad) ||
	    (code == 0 && methods[q->method].kind != SSTREAM && g_out.n_recv != 1)) {
		ctx_add(" -> %s \"%s\"", code_name(code), g_out.msg);
		for (size_t i = 0; i < q->n_msgs && i < 3; i++) {
			char what[32];
			snprintf(what, sizeof what, "msg%zu", i);
			hex_ctx(what, q->msgs[i].p, q->msgs[i].n);
		}
	}
	FCHECK(!g_out.hung, "%s: no status within %u ms of the deadline", methods[q->method].name,
	       HANG_SLACK_MS);
	FCHECK(ok_code, "%s: status %s is not one bad input may get: \"%s\"",
	       methods[q->method].name, code_name(code), g_out.msg);
	FCHECK(code == 0 || g_out.msg[0], "%s: %s without a message", methods[q->method].name,
	       code_name(code));
	FCHECK(code != 0 || !g_out.recv_bad, "%s: an OK reply does not parse",
	       methods[q->method].name);
	FCHECK(code != 0 || methods[q->method].kind == SSTREAM || g_out.n_recv == 1,
	       "%s: OK with %u replies", methods[q->method].name, g_out.n_recv);
	note_reply(q, &g_out);
}

/* ---- Set-up ------------------------------------------------------------------------------- */

static int make_refs(void)
{
	struct kvt_client_status st;
	ref_codecs();
	for (int i = 0; i < N_REFS; i++) {
		struct ref *r = &refs[i];
		struct kvt_client_session_params p;
		kvt_client_session_params_init(&p, r->id, r->sh.L, r->sh.H, r->sh.D, r->sh.dtype);
		p.codec = r->sh.codec;
		p.pinned = 1;
		p.ttl_seconds = 0;
		struct kvt_client_shape sh = { r->sh.L, r->sh.H, r->sh.D, r->sh.dtype };
		size_t bytes = (size_t)r->sh.L * r->n_tokens * row_bytes(&r->sh);
		uint8_t *k = it_xmalloc(bytes), *v = it_xmalloc(bytes);
		it_gen_kv(r->sh.L, r->sh.H, r->sh.D, r->sh.dtype, 0, r->n_tokens, k, v);
		int rc = kvt_client_open(g_c, &p, NULL, &st);
		/* two appends: the second one seals on top of the first */
		if (!rc) {
			uint32_t a = r->n_tokens / 3;
			uint8_t *k2 = it_xmalloc(bytes), *v2 = it_xmalloc(bytes);
			/* [L][n] -> [L][a] and [L][n-a] */
			size_t rowb = row_bytes(&r->sh);
			for (uint32_t l = 0; l < r->sh.L; l++) {
				memcpy(k2 + (size_t)l * a * rowb, k + (size_t)l * r->n_tokens * rowb,
				       a * rowb);
				memcpy(v2 + (size_t)l * a * rowb, v + (size_t)l * r->n_tokens * rowb,
				       a * rowb);
			}
			rc = kvt_client_append(g_c, r->id, &sh, k2, v2, a, NULL, NULL, &st);
			for (uint32_t l = 0; l < r->sh.L && !rc; l++) {
				memcpy(k2 + (size_t)l * (r->n_tokens - a) * rowb,
				       k + ((size_t)l * r->n_tokens + a) * rowb,
				       (r->n_tokens - a) * rowb);
				memcpy(v2 + (size_t)l * (r->n_tokens - a) * rowb,
				       v + ((size_t)l * r->n_tokens + a) * rowb,
				       (r->n_tokens - a) * rowb);
			}
			if (!rc)
				rc = kvt_client_append(g_c, r->id, &sh, k2, v2, r->n_tokens - a, NULL,
						       NULL, &st);
			free(k2);
			free(v2);
		}
		free(k);
		free(v);
		if (rc || kvt_client_stat(g_c, r->id, &r->info, &st)) {
			printf("not ok - reference %s: %s %s\n", r->id, code_name(st.code), st.message);
			return -1;
		}
		for (int w = 0; w < 3; w++) {
			struct call_out o = { 0 };
			fetch_raw_ref(r, w, &o);
			if (o.code || !o.n_recv) {
				printf("not ok - fetch %s (%d): %s %s\n", r->id, w, code_name(o.code),
				       o.msg);
				free(o.recv);
				return -1;
			}
			r->fetch[w] = o.recv;
			r->fetch_len[w] = o.recv_len;
		}
		if (kvt_client_fetch_encoded(g_c, r->id, 0, KVT_CLIENT_ALL_CHUNKS, 1, &r->enc, &st)) {
			printf("not ok - fetch_encoded %s: %s\n", r->id, st.message);
			return -1;
		}
		printf("# reference %s: %u tokens, %u chunks, tail %u, %llu bytes held\n", r->id,
		       (unsigned)r->info.n_tokens, r->info.n_chunks, r->info.tail_tokens,
		       (unsigned long long)r->info.bytes_held);
	}
	return 0;
}

static int log_has_sanitizer_report(const char *path)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	int found = 0;
	if (!f)
		return 0;
	while (fgets(line, sizeof line, f))
		if (strstr(line, "Sanitizer") || strstr(line, "runtime error:")) {
			if (!found)
				printf("#   %s", line);
			found = 1;
		}
	fclose(f);
	return found;
}

static void test_fuzz_rpc(void)
{
	const char *e;
	uint64_t check_every = CHECK_EVERY_DEFAULT;
	const char *one = getenv("KVT_FUZZ_ITER");
	if ((e = getenv("KVT_FUZZ_CHECK_EVERY")) && *e)
		check_every = strtoull(e, NULL, 0);
	if (!check_every)
		check_every = 1;
	for (int i = 0; i < N_SCRATCH; i++)
		snprintf(wids[i].id, sizeof wids[i].id, "s%d", i);
	for (int i = 0; i < N_NEWIDS; i++)
		snprintf(wids[N_SCRATCH + i].id, sizeof wids[0].id, "sn%d", i);
	reset_scratch();
	KVT_REQUIRE(check_daemon("start"), "daemon at start");

	struct fuzz_run run;
	fuzz_run_start(&run, DEFAULT_ITERS);
	uint64_t done = 0;
	if (one && *one) {
		verbose = true;
		run_iteration(strtoull(one, NULL, 0));
		done = 1;
	} else {
		for (uint64_t it = 0; fuzz_run_more(&run, it) && failing_iters < MAX_FAILING_ITERS;
		     it++) {
			run_iteration(it);
			done++;
			if (done % 2000 == 0)
				printf("# %llu iterations, %.1f s\n", (unsigned long long)done,
				       fuzz_run_elapsed(&run));
			if (done % check_every == 0) {
				ctx[0] = '\0';
				ctx_printed = false;
				snprintf(ctx, sizeof ctx, "check after iterations up to %llu",
					 (unsigned long long)it);
				if (!check_daemon("periodic"))
					break;
				reset_scratch();
			}
		}
	}
	ctx[0] = '\0';
	ctx_printed = false;
	snprintf(ctx, sizeof ctx, "final check after %llu iterations", (unsigned long long)done);
	check_daemon("end");
	const double el = fuzz_run_elapsed(&run);

	char line[2048];
	size_t n = (size_t)snprintf(line, sizeof line,
				    "# fuzz_rpc: %llu iterations in %.1f s (%.0f/s), %llu checks; codes:",
				    (unsigned long long)done, el, el > 0 ? (double)done / el : 0.0,
				    (unsigned long long)n_checks);
	for (int c = 0; c <= N_CODES && n < sizeof line; c++)
		if (by_code[c])
			n += (size_t)snprintf(line + n, sizeof line - n, " %s %llu",
					      c < N_CODES ? code_name(c) : "other",
					      (unsigned long long)by_code[c]);
	n += (size_t)snprintf(line + n, n < sizeof line ? sizeof line - n : 0, "; ok/err by method:");
	for (int m = 0; m < N_METHODS && n < sizeof line; m++)
		n += (size_t)snprintf(line + n, sizeof line - n, " %s %llu/%llu", methods[m].name,
				      (unsigned long long)by_method[m][0],
				      (unsigned long long)by_method[m][1]);
	printf("%s; %d failing iterations\n", line, failing_iters);
}

/* SIGTERM and a bounded wait, here rather than kvt_daemon_stop: the log (with what ASan /
 * LSan wrote at exit) is read before the temporary directory goes. 0 = exit status 0 and no
 * sanitizer report in the log. */
static int stop_daemon(void)
{
	int status = 0, rc = -1;
	if (g_d.pid <= 0) {
		kvt_daemon_stop(&g_d);
		return -1;
	}
	kill(g_d.pid, SIGTERM);
	for (int i = 0; i < 3000; i++) { /* 60 s */
		pid_t w = waitpid(g_d.pid, &status, WNOHANG);
		if (w == g_d.pid) {
			rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
			break;
		}
		struct timespec ts = { 0, 20 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	if (rc < 0) {
		printf("# kvtierd did not exit within 60 s of SIGTERM\n");
		kill(g_d.pid, SIGKILL);
		waitpid(g_d.pid, &status, 0);
	}
	g_d.pid = -1;
	if (rc != 0)
		printf("# kvtierd exit status %d\n", rc);
	if (log_has_sanitizer_report(g_d.log_path)) {
		printf("# kvtierd's log holds a sanitizer report\n");
		rc = rc ? rc : -2;
	}
	if (rc)
		kvt_daemon_print_log(&g_d, 60);
	kvt_daemon_stop(&g_d); /* pid already reaped: removes the directory */
	return rc;
}

int main(void)
{
	static const char *const args[] = {
		"--max_message_bytes=1MiB", "--host_capacity_bytes=96MiB",
		"--max_append_bytes=1MiB",  "--capacity_policy=reject",
		"--max_sessions=64",        "--max_attend_items=64",
		"--max_ttl_seconds=3600",   "--default_ttl_seconds=0",
		"--workers=2",              "--reply_pool_buffers=2",
		NULL,
	};
	grpc_arg ga[2];
	grpc_channel_args chargs;
	grpc_channel_credentials *creds;
	int rc = 1;

	setvbuf(stdout, NULL, _IOLBF, 0); /* a killed run still shows how far it got */
	kvt_test_init();
	signal(SIGPIPE, SIG_IGN);
	it_seed(7);
	g_k = it_xmalloc(KV_POOL_BYTES + 256);
	g_v = it_xmalloc(KV_POOL_BYTES + 256);
	/* f16 values, read as any dtype: finite data for f16 / bf16 and mostly for f32 */
	it_gen_kv(1, 1, (KV_POOL_BYTES + 256) / 2, KVT_DTYPE_F16, 5, 1, g_k, g_v);
	if (kvt_daemon_start(&g_d, args) != 0) {
		printf("not ok - kvtierd did not start\n");
		return 1;
	}
	if (kvt_daemon_client(&g_d, 0, &g_c))
		goto out;
	grpc_init();
	ga[0].type = GRPC_ARG_INTEGER;
	ga[0].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
	ga[0].value.integer = -1;
	ga[1].type = GRPC_ARG_INTEGER;
	ga[1].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
	ga[1].value.integer = -1;
	chargs.num_args = 2;
	chargs.args = ga;
	creds = grpc_insecure_credentials_create();
	g_ch = grpc_channel_create(g_d.target, creds, &chargs);
	grpc_channel_credentials_release(creds);
	if (make_refs())
		goto out;
	KVT_RUN(test_fuzz_rpc);
	rc = 0;
out:
	if (g_ch)
		grpc_channel_destroy(g_ch);
	for (int i = 0; i < N_REFS; i++) {
		for (int w = 0; w < 3; w++)
			free(refs[i].fetch[w]);
		kvt_client_encoded_free(refs[i].enc);
	}
	kvt_client_close(g_c);
	KVT_CHECK(stop_daemon() == 0, "kvtierd exits 0 on SIGTERM with no sanitizer report");
	free(g_k);
	free(g_v);
	free(g_out.recv);
	for (int i = 0; i < MAX_MSGS; i++)
		free(g_req.msgs[i].p);
	if (g_ch)
		grpc_shutdown();
	return rc ? 1 : kvt_test_done();
}

/*
 * rpc_kvtier.c - the kvtier.v1.KvTier handlers: validate every field first (a rejected
 * request changes nothing), then do the work under the session's lock.
 *
 * Large replies (Fetch blocks) are encoded by hand so the decoder writes K and V straight
 * into the message buffer that gRPC then sends without a copy.
 */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvtier/v1/kvtier.pb-c.h"
#include "kvt_tsan.h"
#include "kvt_wire_reader.h"
#include "log.h"
#include "rpc.h"

#define KVT_VERSION_STRING "0.1.0"
/* Room for message framing (tags, lengths, the small fields) below max_message_bytes. */
#define MSG_OVERHEAD_BYTES 1024
#define LIST_PAGE_DEFAULT 100
#define LIST_PAGE_MAX 1000
#define MAX_Q_HEADS (8 * KVT_MAX_KV_HEADS)

static struct kvt_sessions *sessions_of(struct kvt_rpc_call *c)
{
	return kvt_rpc_daemon(c)->sessions;
}

/* ---- validation helpers ---------------------------------------------------------------- */

static int check_id(const char *id, const char *field, struct kvt_rpc_result *res)
{
	if (!id || !*id) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "%s is required (1..%d bytes)",
			     field, KVT_SESSION_ID_MAX);
		return -1;
	}
	size_t n = strlen(id);
	if (n > KVT_SESSION_ID_MAX) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "%s is %zu bytes, the limit is %d",
			     field, n, KVT_SESSION_ID_MAX);
		return -1;
	}
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)id[i];
		if (ch < 0x20 || ch > 0x7e) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "%s has a non-printable byte 0x%02x at offset %zu (printable "
				     "ASCII only)",
				     field, ch, i);
			return -1;
		}
	}
	return 0;
}

static int get_session(struct kvt_rpc_call *c, const char *id, const char *field,
		       struct kvt_session **out, struct kvt_rpc_result *res)
{
	if (check_id(id, field, res))
		return -1;
	if (kvt_sessions_get(sessions_of(c), KVT_TENANT_LOCAL, id, out)) {
		kvt_rpc_fail(res, GRPC_STATUS_NOT_FOUND, "session \"%s\" not found", id);
		return -1;
	}
	return 0;
}

static int check_ttl(uint32_t ttl, const char *field, struct kvt_rpc_result *res)
{
	uint64_t max = KVT_CFG(max_ttl_seconds);
	if (max && ttl > max) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%s %u exceeds max_ttl_seconds %" PRIu64, field, ttl, max);
		return -1;
	}
	return 0;
}

static uint32_t default_ttl(void)
{
	return (uint32_t)KVT_CFG(default_ttl_seconds);
}

static int dtype_ok(int d)
{
	return d == KVT_DTYPE_F16 || d == KVT_DTYPE_BF16 || d == KVT_DTYPE_F32;
}

static int bits_ok(uint32_t b)
{
	return b == 2 || b == 3 || b == 4 || b == 8;
}

/* Shape + codec of an OpenSessionRequest, defaults filled from the configuration. */
static int resolve_config(const Kvtier__V1__OpenSessionRequest *r, struct kvt_codec_config *cfg,
			  struct kvt_rpc_result *res)
{
	if (!r->has_n_layers || !r->has_n_kv_heads || !r->has_head_dim || !r->has_dtype) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "%s is required",
			     !r->has_n_layers ? "n_layers"
			     : !r->has_n_kv_heads ? "n_kv_heads"
			     : !r->has_head_dim ? "head_dim"
						 : "dtype");
		return -1;
	}
	if (r->n_layers < 1 || r->n_layers > KVT_MAX_LAYERS) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "n_layers %u is out of range 1..%d",
			     r->n_layers, KVT_MAX_LAYERS);
		return -1;
	}
	if (r->n_kv_heads < 1 || r->n_kv_heads > KVT_MAX_KV_HEADS) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "n_kv_heads %u is out of range 1..%d", r->n_kv_heads, KVT_MAX_KV_HEADS);
		return -1;
	}
	if (r->head_dim != 64 && r->head_dim != 128 && r->head_dim != 256) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "head_dim %u is not supported (64, 128 or 256)", r->head_dim);
		return -1;
	}
	if (!dtype_ok((int)r->dtype)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "dtype %d is not one of DTYPE_F16, DTYPE_BF16, DTYPE_F32", (int)r->dtype);
		return -1;
	}
	const Kvtier__V1__CodecConfig *cc = r->codec;
	memset(cfg, 0, sizeof *cfg);
	cfg->n_layers = r->n_layers;
	cfg->n_kv_heads = r->n_kv_heads;
	cfg->head_dim = r->head_dim;
	cfg->dtype = (uint32_t)r->dtype;
	/* What absent fields take: the named preset's values when codec.preset is set, else the
	 * daemon's default_* keys (which by default spell the preset kvtier-int2). */
	struct kvt_codec_config d = *cfg;
	if (cc && cc->preset && cc->preset[0]) {
		char perr[200] = "";
		if (kvt_codec_preset(&d, cc->preset, perr, sizeof perr)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "codec.%s", perr);
			return -1;
		}
	} else {
		double ratio;
		__atomic_load(&kvt_config_live.default_pin_detect_ratio, &ratio, __ATOMIC_RELAXED);
		d.scheme = (uint32_t)KVT_CFG(default_scheme);
		d.key_bits = (uint32_t)KVT_CFG(default_key_bits);
		d.value_bits = (uint32_t)KVT_CFG(default_value_bits);
		d.group = (uint32_t)KVT_CFG(default_group);
		d.chunk_tokens = (uint32_t)KVT_CFG(default_chunk_tokens);
		d.rotate_v = (uint32_t)KVT_CFG(default_rotate_v);
		d.n_sinks = (uint32_t)KVT_CFG(default_n_sinks);
		d.pin_detect_ratio = (float)ratio;
		d.pin_detect_max = (uint32_t)KVT_CFG(default_pin_detect_max);
		d.recent_exact_tokens = (uint32_t)KVT_CFG(default_recent_exact_tokens);
		d.key_rounding = (uint32_t)KVT_CFG(default_key_rounding);
	}
	if (cc && cc->has_scheme && cc->scheme != KVTIER__V1__SCHEME__SCHEME_DEFAULT) {
		if ((int)cc->scheme < 1 || (int)cc->scheme > 4) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.scheme %d is not one of SCHEME_NONE, SCHEME_KIVI, "
				     "SCHEME_HADAMARD, SCHEME_OSCAR",
				     (int)cc->scheme);
			return -1;
		}
		cfg->scheme = (uint32_t)cc->scheme - 1;
	} else {
		cfg->scheme = d.scheme;
	}
	int exact = cfg->scheme == KVT_SCHEME_NONE;
	if (exact) {
		if ((cc && cc->has_key_bits && cc->key_bits != 0 && cc->key_bits != 16) ||
		    (cc && cc->has_value_bits && cc->value_bits != 0 && cc->value_bits != 16)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.%s must be absent, 0 or 16 for SCHEME_NONE",
				     cc->has_key_bits && cc->key_bits != 0 && cc->key_bits != 16
					     ? "key_bits"
					     : "value_bits");
			return -1;
		}
		cfg->key_bits = cfg->value_bits = 16;
	} else {
		cfg->key_bits = cc && cc->has_key_bits ? cc->key_bits : d.key_bits;
		cfg->value_bits = cc && cc->has_value_bits ? cc->value_bits : d.value_bits;
		if (!bits_ok(cfg->key_bits) || !bits_ok(cfg->value_bits)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "codec.%s %u is not one of 2, 3, 4, 8",
				     !bits_ok(cfg->key_bits) ? "key_bits" : "value_bits",
				     !bits_ok(cfg->key_bits) ? cfg->key_bits : cfg->value_bits);
			return -1;
		}
	}
	cfg->group = cc && cc->has_group ? cc->group : d.group;
	cfg->chunk_tokens = cc && cc->has_chunk_tokens ? cc->chunk_tokens : d.chunk_tokens;
	int rotating = cfg->scheme == KVT_SCHEME_HADAMARD || cfg->scheme == KVT_SCHEME_OSCAR;
	if (cc && cc->has_rotate_v) {
		if (cc->rotate_v && !rotating) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.rotate_v needs SCHEME_HADAMARD or SCHEME_OSCAR");
			return -1;
		}
		cfg->rotate_v = cc->rotate_v ? 1 : 0;
	} else {
		cfg->rotate_v = rotating ? d.rotate_v : 0;
	}
	if (cc && cc->has_n_sinks) {
		cfg->n_sinks = cc->n_sinks;
	} else {
		cfg->n_sinks = d.n_sinks < cfg->chunk_tokens ? d.n_sinks : cfg->chunk_tokens;
	}
	if (cc && cc->has_pin_detect_ratio) {
		if (!(cc->pin_detect_ratio >= 0.0f && cc->pin_detect_ratio < 1.0f)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.pin_detect_ratio %g is out of range [0, 1)",
				     (double)cc->pin_detect_ratio);
			return -1;
		}
		cfg->pin_detect_ratio = cc->pin_detect_ratio;
	} else {
		cfg->pin_detect_ratio = d.pin_detect_ratio;
	}
	if (cc && cc->has_pin_detect_max) {
		cfg->pin_detect_max = cc->pin_detect_max;
	} else {
		cfg->pin_detect_max =
			d.pin_detect_max < cfg->chunk_tokens ? d.pin_detect_max : cfg->chunk_tokens;
	}
	if (cc && cc->has_recent_exact_tokens) {
		uint32_t w = cc->recent_exact_tokens;
		if (w != 0 && (w < cfg->chunk_tokens || w > KVT_MAX_RECENT_EXACT)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.recent_exact_tokens %u is not 0 or in chunk_tokens..%d "
				     "(%u..%d)",
				     w, KVT_MAX_RECENT_EXACT, cfg->chunk_tokens, KVT_MAX_RECENT_EXACT);
			return -1;
		}
		cfg->recent_exact_tokens = w;
	} else if (cc && cc->has_chunk_tokens) {
		/* A client that chose its chunk size without a window keeps the sealing it had
		 * before windows existed: a chunk every chunk_tokens tokens. */
		cfg->recent_exact_tokens = 0;
	} else {
		/* The default (or the preset's) window goes with the default (or the preset's)
		 * chunk size; one narrower than the chunk cannot apply (a window holds >= B). */
		cfg->recent_exact_tokens =
			d.recent_exact_tokens >= cfg->chunk_tokens ? d.recent_exact_tokens : 0;
	}
	if (cc && cc->key_rounding) {
		int kr = kvt_rounding_parse(cc->key_rounding);
		if (kr < 0) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.key_rounding '%.40s' is not one of minmax, mse",
				     cc->key_rounding);
			return -1;
		}
		if (exact && kr != KVT_ROUNDING_MINMAX) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "codec.key_rounding %s needs a quantizing scheme (SCHEME_NONE "
				     "stores exact values)",
				     cc->key_rounding);
			return -1;
		}
		cfg->key_rounding = (uint32_t)kr;
	} else if (exact || (cc && (cc->has_scheme || cc->has_key_bits || cc->has_group))) {
		/* A client that picked its quantizer without naming a rounding gets OScaR's, the
		 * one its encoded bytes were compared against before the field existed. */
		cfg->key_rounding = KVT_ROUNDING_MINMAX;
	} else {
		cfg->key_rounding = d.key_rounding;
	}
	char err[400] = "";
	if (kvt_codec_config_validate(cfg, err, sizeof err)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "codec: %s", err);
		return -1;
	}
	return 0;
}

/* ---- replies ---------------------------------------------------------------------------- */

struct info_msg {
	Kvtier__V1__SessionInfo info;
	Kvtier__V1__CodecConfig codec;
	char preset[32];
};

static void fill_info(struct info_msg *m, struct kvt_session *s, const struct kvt_session_info *i)
{
	Kvtier__V1__SessionInfo info = KVTIER__V1__SESSION_INFO__INIT;
	Kvtier__V1__CodecConfig codec = KVTIER__V1__CODEC_CONFIG__INIT;
	const struct kvt_codec_config *c = &i->cfg;
	m->info = info;
	m->codec = codec;
	m->codec.has_scheme = 1;
	m->codec.scheme = (Kvtier__V1__Scheme)(c->scheme + 1);
	m->codec.has_key_bits = 1;
	m->codec.key_bits = c->key_bits;
	m->codec.has_value_bits = 1;
	m->codec.value_bits = c->value_bits;
	m->codec.has_group = 1;
	m->codec.group = c->group;
	m->codec.has_chunk_tokens = 1;
	m->codec.chunk_tokens = c->chunk_tokens;
	m->codec.has_rotate_v = 1;
	m->codec.rotate_v = c->rotate_v != 0;
	m->codec.has_n_sinks = 1;
	m->codec.n_sinks = c->n_sinks;
	m->codec.has_pin_detect_ratio = 1;
	m->codec.pin_detect_ratio = c->pin_detect_ratio;
	m->codec.has_pin_detect_max = 1;
	m->codec.pin_detect_max = c->pin_detect_max;
	m->codec.has_recent_exact_tokens = 1;
	m->codec.recent_exact_tokens = c->recent_exact_tokens;
	m->codec.key_rounding = (char *)kvt_rounding_name(c->key_rounding);
	/* The preset this codec equals, if any (the shape does not matter). */
	const char *pn = kvt_codec_preset_name(c);
	if (pn) {
		snprintf(m->preset, sizeof m->preset, "%s", pn);
		m->codec.preset = m->preset;
	}
	m->info.session_id = s->id;
	m->info.has_n_layers = 1;
	m->info.n_layers = c->n_layers;
	m->info.has_n_kv_heads = 1;
	m->info.n_kv_heads = c->n_kv_heads;
	m->info.has_head_dim = 1;
	m->info.head_dim = c->head_dim;
	m->info.has_dtype = 1;
	m->info.dtype = (Kvtier__V1__Dtype)c->dtype;
	m->info.codec = &m->codec;
	m->info.has_n_tokens = 1;
	m->info.n_tokens = i->n_tokens;
	m->info.has_n_chunks = 1;
	m->info.n_chunks = i->n_chunks;
	m->info.has_tail_tokens = 1;
	m->info.tail_tokens = i->tail_tokens;
	m->info.has_bytes_held = 1;
	m->info.bytes_held = i->bytes_held;
	m->info.has_logical_bytes = 1;
	m->info.logical_bytes = i->logical_bytes;
	m->info.has_bits_per_element = 1;
	m->info.bits_per_element = i->bits_per_element;
	m->info.has_pinned = 1;
	m->info.pinned = i->pinned != 0;
	m->info.has_ttl_seconds = 1;
	m->info.ttl_seconds = i->ttl_seconds;
	m->info.has_idle_ms = 1;
	m->info.idle_ms = i->idle_ms;
	m->info.tier = (char *)"host";
}

/* ---- the GPU tier (tiers/tier_gpu.h) ------------------------------------------------------ */

/* Brings a GPU-resident session's device mirror up to date with its sequence (new chunks
 * copied into the arena, or adopted when the GPU encoder already wrote them there). `flags`
 * KVT_GPU_SYNC_USE marks a use of the session (Append, Attend, Prefetch, RestoreToDevice):
 * under gpu_arena_policy lru it may demote colder sessions to make room. Without room the
 * chunks stay on the host and the session's tier says "gpu+host". Session lock held.
 * Failures are logged: the host copy always serves. */
static void gpu_sync_locked(struct kvt_session *s, unsigned flags)
{
	struct kvt_tier_gpu *g = s->table->gpu;
	if (!s->gpu_wanted || !g || !kvt_tier_gpu_tier_enabled(g))
		return;
	char err[300] = "", q[400];
	int rc = kvt_tier_gpu_mirror_sync(g, &s->gpu_mirror, s->seq, &s->pinned, flags, err,
					  sizeof err);
	if (rc)
		kvt_log_warn("gpu mirror sync failed; the host copy serves", "session=%s error=%s",
			     kvt_log_quote(q, sizeof q, s->id),
			     kvt_log_quote(q + 200, sizeof q - 200, err));
}

/* Where the session's sealed chunks live, for SessionInfo.tier / Prefetch. */
static const char *gpu_tier_locked(struct kvt_session *s)
{
	if (!s->gpu_wanted || !s->gpu_mirror)
		return "host";
	return kvt_tier_gpu_mirror_tier(s->table->gpu, s->gpu_mirror, kvt_seq_n_chunks(s->seq));
}

/* The sealing encoder of a GPU-resident session (kvt_seq_set_encoder): the GPU tier encodes
 * on the device into the arena and copies the bytes back for the host copy. */
static int64_t gpu_seal_encode(void *ctx, const struct kvt_codec_config *cfg,
			       uint64_t first_token, const void *k, const void *v, void *out,
			       size_t out_cap, char *err, size_t errlen)
{
	struct kvt_session *s = ctx;
	return kvt_tier_gpu_encode(s->table->gpu, &s->gpu_mirror, &s->pinned, cfg, first_token,
				   k, v, out, out_cap, err, errlen);
}

/* Session lock held: the session becomes GPU-resident (its chunks sealed by the GPU encoder,
 * mirrored in the arena) or goes back to the host (its arena copies freed). */
static void gpu_set_wanted_locked(struct kvt_session *s, int want)
{
	struct kvt_tier_gpu *g = s->table->gpu;
	want = want && kvt_tier_gpu_tier_enabled(g);
	if (want) {
		struct kvt_seq_encoder enc = {.encode = gpu_seal_encode, .ctx = s};
		kvt_seq_set_encoder(s->seq, &enc);
	} else {
		kvt_seq_set_encoder(s->seq, NULL);
		if (s->gpu_mirror) {
			kvt_tier_gpu_mirror_free(g, s->gpu_mirror);
			s->gpu_mirror = NULL;
		}
	}
	s->gpu_wanted = want;
}

static void reply_info(struct kvt_rpc_result *res, struct kvt_session *s, int has_created,
		       int created)
{
	struct kvt_session_info i;
	struct info_msg m;
	kvt_session_lock(s);
	gpu_sync_locked(s, 0);
	kvt_session_info_locked(s, &i);
	const char *tier = gpu_tier_locked(s);
	kvt_session_unlock(s);
	fill_info(&m, s, &i);
	m.info.tier = (char *)tier;
	if (has_created) {
		m.info.has_created = 1;
		m.info.created = created != 0;
	}
	kvt_rpc_reply(res, &m.info.base);
}

static void fail_errno(struct kvt_rpc_result *res, int rc, const char *what, const char *err)
{
	grpc_status_code code = kvt_rpc_status_from_errno(rc);
	if (rc == -ENOMEM) {
		/* Name the limit and the policy so an operator knows what to raise. */
		kvt_rpc_fail(res, code,
			     "%s: host memory is full: host_capacity_bytes is %" PRIu64
			     " and capacity_policy %s (%s)",
			     what, KVT_CFG(host_capacity_bytes),
			     KVT_CFG(capacity_policy) == KVT_POLICY_REJECT
				     ? "is reject"
				     : "found no idle unpinned session to drop",
			     err && *err ? err : "allocation refused");
		return;
	}
	kvt_rpc_fail(res, code, "%s: %s", what, err && *err ? err : strerror(-rc));
}

#define UNPACK(type, fn, var)                                                              \
	type *var = kvt_rpc_unpack(&fn##__descriptor, req, len, res);                      \
	if (!var)                                                                          \
		return;

/* ---- session management ---------------------------------------------------------------- */

static void h_open(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		   struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__OpenSessionRequest, kvtier__v1__open_session_request, r);
	struct kvt_codec_config cfg;
	struct kvt_session *s = NULL;
	int created = 0;
	char err[400] = "";
	if (check_id(r->session_id, "session_id", res) || resolve_config(r, &cfg, res))
		goto out;
	uint32_t ttl = r->has_ttl_seconds ? r->ttl_seconds : default_ttl();
	if (r->has_ttl_seconds && check_ttl(ttl, "ttl_seconds", res))
		goto out;
	int want_gpu = KVT_CFG(gpu_default_tier) == 1;
	if (r->tier && *r->tier) {
		if (!strcmp(r->tier, "gpu")) {
			want_gpu = 1;
		} else if (!strcmp(r->tier, "host")) {
			want_gpu = 0;
		} else {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "tier \"%.32s\" is not \"host\" or \"gpu\"", r->tier);
			goto out;
		}
	}
	int rc = kvt_sessions_open(sessions_of(c), KVT_TENANT_LOCAL, r->session_id, &cfg, ttl,
				   r->has_pinned && r->pinned, KVT_CFG(max_sessions), &s, &created,
				   err, sizeof err);
	if (rc) {
		fail_errno(res, rc, "OpenSession", err);
		goto out;
	}
	if (created || (r->tier && *r->tier)) {
		/* A GPU request on a daemon without the GPU tier is not an error: the session
		 * lives on the host and SessionInfo.tier says so. */
		kvt_session_lock(s);
		gpu_set_wanted_locked(s, want_gpu);
		gpu_sync_locked(s, KVT_GPU_SYNC_USE);
		kvt_session_unlock(s);
	}
	reply_info(res, s, 1, created);
	kvt_session_put(s);
out:
	kvtier__v1__open_session_request__free_unpacked(r, NULL);
}

static void h_fork(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		   struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__ForkRequest, kvtier__v1__fork_request, r);
	struct kvt_session *src = NULL, *s = NULL;
	char err[400] = "";
	if (check_id(r->new_session_id, "new_session_id", res) ||
	    get_session(c, r->source_session_id, "source_session_id", &src, res))
		goto out;
	uint32_t ttl = r->has_ttl_seconds ? r->ttl_seconds : default_ttl();
	if (r->has_ttl_seconds && check_ttl(ttl, "ttl_seconds", res))
		goto out;
	kvt_session_lock(src);
	uint64_t have = kvt_seq_tokens(src->seq);
	kvt_session_unlock(src);
	uint64_t n = r->has_n_tokens ? r->n_tokens : have;
	if (n > have) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "n_tokens %" PRIu64 " exceeds the source session's length %" PRIu64, n,
			     have);
		goto out;
	}
	kvt_session_touch(src);
	int rc = kvt_sessions_fork(sessions_of(c), src, r->new_session_id, n, ttl,
				   r->has_pinned && r->pinned, KVT_CFG(max_sessions), &s, err,
				   sizeof err);
	if (rc) {
		fail_errno(res, rc, "Fork", err);
		goto out;
	}
	reply_info(res, s, 0, 0);
	kvt_session_put(s);
out:
	kvt_session_put(src);
	kvtier__v1__fork_request__free_unpacked(r, NULL);
}

static void h_truncate(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		       struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__TruncateRequest, kvtier__v1__truncate_request, r);
	struct kvt_session *s = NULL;
	char err[400] = "";
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	if (!r->has_n_tokens) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "n_tokens is required");
		goto out;
	}
	kvt_session_touch(s);
	kvt_session_lock(s);
	uint64_t have = kvt_seq_tokens(s->seq);
	int rc = 0;
	if (r->n_tokens > have) {
		kvt_session_unlock(s);
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "n_tokens %" PRIu64 " exceeds the session's length %" PRIu64,
			     r->n_tokens, have);
		goto out;
	}
	if (r->n_tokens < have) {
		rc = kvt_seq_truncate(s->seq, r->n_tokens, err, sizeof err);
		if (rc == 0)
			kvt_session_clear_stage_locked(s);
	}
	kvt_session_unlock(s);
	if (rc) {
		fail_errno(res, rc, "Truncate", err);
		goto out;
	}
	reply_info(res, s, 0, 0);
out:
	kvt_session_put(s);
	kvtier__v1__truncate_request__free_unpacked(r, NULL);
}

static void h_drop(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		   struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__DropSessionRequest, kvtier__v1__drop_session_request, r);
	uint64_t bytes = 0;
	if (check_id(r->session_id, "session_id", res))
		goto out;
	if (kvt_sessions_drop(sessions_of(c), KVT_TENANT_LOCAL, r->session_id, &bytes)) {
		kvt_rpc_fail(res, GRPC_STATUS_NOT_FOUND, "session \"%s\" not found", r->session_id);
		goto out;
	}
	Kvtier__V1__DropSessionResponse out = KVTIER__V1__DROP_SESSION_RESPONSE__INIT;
	out.has_bytes_freed = 1;
	out.bytes_freed = bytes;
	kvt_rpc_reply(res, &out.base);
out:
	kvtier__v1__drop_session_request__free_unpacked(r, NULL);
}

static void pin_common(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		       struct kvt_rpc_result *res, int pin)
{
	UNPACK(Kvtier__V1__PinRequest, kvtier__v1__pin_request, r);
	struct kvt_session *s = NULL;
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	__atomic_store_n(&s->pinned, (uint32_t)pin, __ATOMIC_RELAXED);
	kvt_session_touch(s);
	reply_info(res, s, 0, 0);
	kvt_session_put(s);
out:
	kvtier__v1__pin_request__free_unpacked(r, NULL);
}

static void h_pin(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		  struct kvt_rpc_result *res)
{
	pin_common(c, req, len, res, 1);
}

static void h_unpin(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		    struct kvt_rpc_result *res)
{
	pin_common(c, req, len, res, 0);
}

static void h_set_ttl(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		      struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__SetTtlRequest, kvtier__v1__set_ttl_request, r);
	struct kvt_session *s = NULL;
	if (check_id(r->session_id, "session_id", res))
		goto out;
	if (!r->has_ttl_seconds) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "ttl_seconds is required");
		goto out;
	}
	if (check_ttl(r->ttl_seconds, "ttl_seconds", res) ||
	    get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	__atomic_store_n(&s->ttl_seconds, r->ttl_seconds, __ATOMIC_RELAXED);
	kvt_session_touch(s);
	reply_info(res, s, 0, 0);
	kvt_session_put(s);
out:
	kvtier__v1__set_ttl_request__free_unpacked(r, NULL);
}

static void h_stat(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		   struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__StatSessionRequest, kvtier__v1__stat_session_request, r);
	struct kvt_session *s = NULL;
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	reply_info(res, s, 0, 0);
	kvt_session_put(s);
out:
	kvtier__v1__stat_session_request__free_unpacked(r, NULL);
}

static void h_list(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		   struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__ListSessionsRequest, kvtier__v1__list_sessions_request, r);
	struct kvt_session **list = NULL;
	size_t n = 0;
	int more = 0;
	struct info_msg *msgs = NULL;
	Kvtier__V1__SessionInfo **ptrs = NULL;
	const char *prefix = r->prefix ? r->prefix : "";
	const char *token = r->page_token ? r->page_token : "";
	uint32_t page = r->has_page_size ? r->page_size : LIST_PAGE_DEFAULT;
	if (page < 1 || page > LIST_PAGE_MAX) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "page_size %u is out of range 1..%d",
			     page, LIST_PAGE_MAX);
		goto out;
	}
	if (strlen(prefix) > KVT_SESSION_ID_MAX) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "prefix is %zu bytes, the limit is %d",
			     strlen(prefix), KVT_SESSION_ID_MAX);
		goto out;
	}
	if (*token && check_id(token, "page_token", res))
		goto out;
	int rc = kvt_sessions_list(sessions_of(c), KVT_TENANT_LOCAL, prefix, token, page, &list,
				   &n, &more);
	if (rc) {
		fail_errno(res, rc, "ListSessions", NULL);
		goto out;
	}
	msgs = calloc(n ? n : 1, sizeof *msgs);
	ptrs = calloc(n ? n : 1, sizeof *ptrs);
	if (!msgs || !ptrs) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory listing sessions");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		struct kvt_session_info info;
		kvt_session_lock(list[i]);
		kvt_session_info_locked(list[i], &info);
		kvt_session_unlock(list[i]);
		fill_info(&msgs[i], list[i], &info);
		ptrs[i] = &msgs[i].info;
	}
	Kvtier__V1__ListSessionsResponse out = KVTIER__V1__LIST_SESSIONS_RESPONSE__INIT;
	out.n_sessions = n;
	out.sessions = ptrs;
	out.next_page_token = (char *)(more && n ? list[n - 1]->id : "");
	kvt_rpc_reply(res, &out.base);
	if (res->reply && grpc_byte_buffer_length(res->reply) > KVT_CFG(max_message_bytes))
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED,
			     "the page is larger than max_message_bytes %" PRIu64
			     "; ask for a smaller page_size",
			     KVT_CFG(max_message_bytes));
out:
	for (size_t i = 0; i < n; i++)
		kvt_session_put(list[i]);
	free(list);
	free(msgs);
	free(ptrs);
	kvtier__v1__list_sessions_request__free_unpacked(r, NULL);
}

static void h_prefetch(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		       struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__PrefetchRequest, kvtier__v1__prefetch_request, r);
	struct kvt_session *s = NULL;
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	kvt_session_touch(s);
	/* GPU-resident sessions are brought up to date in the arena; others are on the host,
	 * the top tier for them. */
	kvt_session_lock(s);
	gpu_sync_locked(s, KVT_GPU_SYNC_USE);
	const char *tier = gpu_tier_locked(s);
	kvt_session_unlock(s);
	Kvtier__V1__PrefetchResponse out = KVTIER__V1__PREFETCH_RESPONSE__INIT;
	out.tier = (char *)tier;
	kvt_rpc_reply(res, &out.base);
	kvt_session_put(s);
out:
	kvtier__v1__prefetch_request__free_unpacked(r, NULL);
}

/*
 * RestoreToDevice: every field is checked here (INVALID_ARGUMENT naming it and the limit)
 * before the GPU is asked for anything; then FAILED_PRECONDITION when this daemon has no
 * usable GPU (the reason: built without CUDA, gpu_enable = no, no device). The handles are
 * opened (or found in the tier's cache) and the true allocation sizes checked again there.
 */
static void h_restore(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		      struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__RestoreToDeviceRequest, kvtier__v1__restore_to_device_request, r);
	struct kvt_session *s = NULL;
	uint32_t *sorted = NULL;
	char err[512] = "";
	struct kvt_tier_gpu *g = kvt_rpc_daemon(c)->gpu;
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	if (!r->has_ipc_mem_handle || r->ipc_mem_handle.len != KVT_GPU_IPC_HANDLE_BYTES) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "ipc_mem_handle is %s%zu bytes; a cudaIpcMemHandle_t is %d bytes",
			     r->has_ipc_mem_handle ? "" : "absent: ",
			     r->has_ipc_mem_handle ? r->ipc_mem_handle.len : 0,
			     KVT_GPU_IPC_HANDLE_BYTES);
		goto out;
	}
	if (r->has_ipc_mem_handle_v && r->ipc_mem_handle_v.len != KVT_GPU_IPC_HANDLE_BYTES) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "ipc_mem_handle_v is %zu bytes; a cudaIpcMemHandle_t is %d bytes "
			     "(leave it out when V lives in the K allocation)",
			     r->ipc_mem_handle_v.len, KVT_GPU_IPC_HANDLE_BYTES);
		goto out;
	}
	const struct kvt_codec_config *cfg = &s->cfg;
	uint32_t dtype = r->has_dtype ? (uint32_t)r->dtype : 0;
	if (dtype == 0 && (cfg->dtype == KVT_DTYPE_F16 || cfg->dtype == KVT_DTYPE_BF16))
		dtype = cfg->dtype;
	if (dtype != KVT_DTYPE_F16 && dtype != KVT_DTYPE_BF16) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "dtype %u is not DTYPE_F16 (1) or DTYPE_BF16 (2)%s", dtype,
			     r->has_dtype ? "" : " (absent, and the session's dtype is f32)");
		goto out;
	}
	int paged;
	if (r->has_layout && r->layout == KVTIER__V1__DEVICE_LAYOUT__DEVICE_LAYOUT_CONTIGUOUS)
		paged = 0;
	else if (r->has_layout && r->layout == KVTIER__V1__DEVICE_LAYOUT__DEVICE_LAYOUT_PAGED)
		paged = 1;
	else {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "layout %d is not DEVICE_LAYOUT_CONTIGUOUS (1) or DEVICE_LAYOUT_PAGED "
			     "(2)", r->has_layout ? (int)r->layout : 0);
		goto out;
	}
	kvt_session_touch(s);
	kvt_session_lock(s);
	uint64_t have = kvt_seq_tokens(s->seq);
	kvt_session_unlock(s);
	struct kvt_gpu_restore rq = {0};
	rq.owner = s;
	rq.handle_k = r->ipc_mem_handle.data;
	rq.handle_v = r->has_ipc_mem_handle_v ? r->ipc_mem_handle_v.data : r->ipc_mem_handle.data;
	rq.k_offset = r->has_k_offset_bytes ? r->k_offset_bytes : 0;
	rq.v_offset = r->has_v_offset_bytes ? r->v_offset_bytes : 0;
	rq.buffer_bytes = r->has_buffer_bytes ? r->buffer_bytes : 0;
	rq.worker_pid = r->has_worker_pid ? r->worker_pid : 0;
	rq.worker_pid_ns = r->has_worker_pid_ns ? r->worker_pid_ns : 0;
	rq.token_begin = r->has_token_begin ? r->token_begin : 0;
	rq.token_end = r->has_token_end ? r->token_end : have;
	rq.layer_begin = r->has_layer_begin ? r->layer_begin : 0;
	rq.layer_end = r->has_layer_end ? r->layer_end : cfg->n_layers;
	rq.dtype = dtype;
	rq.device_ordinal = r->has_device_ordinal ? r->device_ordinal : -1;
	if (rq.token_begin > rq.token_end || rq.token_end > have) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "token range [%" PRIu64 ", %" PRIu64 ") is not inside the session's "
			     "%" PRIu64 " tokens",
			     rq.token_begin, rq.token_end, have);
		goto out;
	}
	if (rq.layer_begin >= rq.layer_end || rq.layer_end > cfg->n_layers) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "layer range [%u, %u) is empty or not inside the session's %u layers",
			     rq.layer_begin, rq.layer_end, cfg->n_layers);
		goto out;
	}
	if ((rq.k_offset | rq.v_offset) & 15) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "k_offset_bytes %" PRIu64 " and v_offset_bytes %" PRIu64
			     " must be multiples of 16",
			     rq.k_offset, rq.v_offset);
		goto out;
	}
	if (rq.device_ordinal < -1 || (r->has_device_ordinal && r->device_ordinal < 0)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "device_ordinal %d is negative",
			     r->device_ordinal);
		goto out;
	}
	uint32_t row_bytes = cfg->n_kv_heads * cfg->head_dim * (uint32_t)kvt_dtype_size(dtype);
	uint64_t n_tok = rq.token_end - rq.token_begin;
	uint32_t nl = rq.layer_end - rq.layer_begin;
	uint64_t span; /* one layer's rows */
	if (!paged) {
		if (r->has_block_size || r->n_block_table) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "block_size and block_table are for DEVICE_LAYOUT_PAGED only");
			goto out;
		}
		span = n_tok * row_bytes;
	} else {
		if (!r->has_block_size || r->block_size == 0 || r->block_size > 65536) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "block_size %u must be 1..65536 tokens for DEVICE_LAYOUT_PAGED",
				     r->has_block_size ? r->block_size : 0);
			goto out;
		}
		uint64_t need = (rq.token_end + r->block_size - 1) / r->block_size;
		if (r->n_block_table < need) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "block_table has %zu entries; tokens up to token_end %" PRIu64
				     " in blocks of %u need %" PRIu64,
				     r->n_block_table, rq.token_end, r->block_size, need);
			goto out;
		}
		/* two blocks of the range on one physical block would overwrite each other */
		uint64_t b0 = rq.token_begin / r->block_size, nb = need - b0;
		sorted = malloc((nb ? nb : 1) * sizeof *sorted);
		if (!sorted) {
			kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
			goto out;
		}
		for (uint64_t b = 0; b < nb && n_tok; b++) {
			uint32_t v = r->block_table[b0 + b];
			for (uint64_t k = 0; k < b; k++) {
				if (sorted[k] == v) {
					kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
						     "block_table[%" PRIu64 "] and block_table[%" PRIu64
						     "] are both block %u",
						     b0 + k, b0 + b, v);
					goto out;
				}
				if (b > 4096)
					break; /* quadratic check bounded; the pool bound still holds */
			}
			sorted[b] = v;
		}
		rq.block_size = r->block_size;
		rq.block_table = r->block_table;
		rq.n_block_table = r->n_block_table;
		struct kvt_gpu_restore one = rq;
		one.layer_end = one.layer_begin + 1;
		one.layer_stride = 0;
		span = kvt_gpu_restore_extent(&one, row_bytes);
	}
	if (r->has_layer_stride_bytes) {
		rq.layer_stride = r->layer_stride_bytes;
	} else if (!paged || nl == 1) {
		rq.layer_stride = span;
	} else {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "layer_stride_bytes is required for DEVICE_LAYOUT_PAGED with %u layers "
			     "(bytes between one layer's block pool and the next's)", nl);
		goto out;
	}
	if ((rq.layer_stride & 15) || (nl > 1 && rq.layer_stride < span)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "layer_stride_bytes %" PRIu64 " must be a multiple of 16 and at least "
			     "one layer's span of %" PRIu64 " bytes",
			     rq.layer_stride, span);
		goto out;
	}
	uint64_t extent = kvt_gpu_restore_extent(&rq, row_bytes);
	if (!r->has_buffer_bytes || rq.buffer_bytes == 0) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "buffer_bytes (the mapped allocation's size) is required");
		goto out;
	}
	if (rq.k_offset > rq.buffer_bytes || extent > rq.buffer_bytes - rq.k_offset ||
	    rq.v_offset > rq.buffer_bytes || extent > rq.buffer_bytes - rq.v_offset) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "the restore writes %" PRIu64 " bytes from k_offset_bytes %" PRIu64
			     " and from v_offset_bytes %" PRIu64 ", beyond buffer_bytes %" PRIu64,
			     extent, rq.k_offset, rq.v_offset, rq.buffer_bytes);
		goto out;
	}
	if (!kvt_tier_gpu_usable(g)) {
		kvt_rpc_fail(res, GRPC_STATUS_FAILED_PRECONDITION,
			     "RestoreToDevice needs a GPU and this kvtierd has none usable: %s; "
			     "use Fetch and copy to the device",
			     kvt_tier_gpu_reason(g));
		goto out;
	}
	if (kvt_rpc_deadline_passed(c)) {
		kvt_rpc_fail(res, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed before the restore");
		goto out;
	}
	struct kvt_gpu_restore_result rr;
	kvt_session_lock(s);
	int rc = 0;
	if (kvt_seq_tokens(s->seq) < rq.token_end) {
		rc = -ERANGE;
		snprintf(err, sizeof err, "the session was truncated to %" PRIu64 " tokens meanwhile",
			 kvt_seq_tokens(s->seq));
	} else {
		gpu_sync_locked(s, KVT_GPU_SYNC_USE);
		rc = kvt_tier_gpu_restore(g, s->seq, s->gpu_mirror, &rq, &rr, err, sizeof err);
	}
	kvt_session_unlock(s);
	if (rc) {
		grpc_status_code code = rc == -ENODEV ? GRPC_STATUS_FAILED_PRECONDITION
					: rc == -EINVAL ? GRPC_STATUS_INVALID_ARGUMENT
					: rc == -ERANGE ? GRPC_STATUS_FAILED_PRECONDITION
					: rc == -E2BIG ? GRPC_STATUS_FAILED_PRECONDITION
					: rc == -ENOMEM ? GRPC_STATUS_RESOURCE_EXHAUSTED
							: GRPC_STATUS_INTERNAL;
		kvt_rpc_fail(res, code, "RestoreToDevice: %s", err);
		goto out;
	}
	Kvtier__V1__RestoreToDeviceResponse o = KVTIER__V1__RESTORE_TO_DEVICE_RESPONSE__INIT;
	o.has_n_tokens = 1;
	o.n_tokens = n_tok;
	o.has_bytes_written = 1;
	o.bytes_written = rr.bytes_written;
	o.has_elapsed_us = 1;
	o.elapsed_us = rr.elapsed_us;
	kvt_rpc_reply(res, &o.base);
out:
	free(sorted);
	kvt_session_put(s);
	kvtier__v1__restore_to_device_request__free_unpacked(r, NULL);
}

static uint64_t g_append_zero_copy, g_append_fallback; /* atomic; Stats */

struct counter_list {
	Kvtier__V1__Counter *items;
	Kvtier__V1__Counter **ptrs;
	char (*names)[96];
	size_t n, cap;
};

static void add_counter(void *ctx, const char *name, uint64_t value)
{
	struct counter_list *l = ctx;
	if (l->n == l->cap)
		return;
	Kvtier__V1__Counter init = KVTIER__V1__COUNTER__INIT;
	l->items[l->n] = init;
	snprintf(l->names[l->n], sizeof l->names[l->n], "%s", name);
	l->items[l->n].name = l->names[l->n];
	l->items[l->n].has_value = 1;
	l->items[l->n].value = value;
	l->ptrs[l->n] = &l->items[l->n];
	l->n++;
}

const char *kvt_rpc_isa_name(void)
{
	return kvt_codec_active_isa() == KVT_ISA_AVX2 ? "avx2" : "scalar";
}

static void h_stats(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		    struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__StatsRequest, kvtier__v1__stats_request, r);
	struct kvt_daemon *d = kvt_rpc_daemon(c);
	uint64_t sessions, tokens, bytes, logical, chunks;
	kvt_sessions_totals(d->sessions, &sessions, &tokens, &bytes, &logical, &chunks);
	struct kvt_tier_stats ts;
	kvt_tier_host_stats(d->host, &ts);
	Kvtier__V1__TierStats host = KVTIER__V1__TIER_STATS__INIT;
	host.name = (char *)ts.name;
	host.has_capacity_bytes = 1;
	host.capacity_bytes = ts.capacity_bytes;
	host.has_used_bytes = 1;
	host.used_bytes = ts.used_bytes;
	host.has_chunks = 1;
	host.chunks = chunks;
	Kvtier__V1__TierStats *tiers[2] = {&host, NULL};
	size_t n_tiers = 1;
	Kvtier__V1__TierStats gpu_tier = KVTIER__V1__TIER_STATS__INIT;
	struct kvt_tier_stats gs;
	uint64_t gpu_largest = 0;
	if (d->gpu && kvt_tier_gpu_tier_enabled(d->gpu)) {
		kvt_tier_gpu_stats(d->gpu, &gs, &gpu_largest);
		gpu_tier.name = (char *)gs.name;
		gpu_tier.has_capacity_bytes = 1;
		gpu_tier.capacity_bytes = gs.capacity_bytes;
		gpu_tier.has_used_bytes = 1;
		gpu_tier.used_bytes = gs.used_bytes;
		gpu_tier.has_chunks = 1;
		gpu_tier.chunks = gs.chunks;
		tiers[n_tiers++] = &gpu_tier;
	}

	struct counter_list cl = {0};
	cl.cap = 512;
	cl.items = calloc(cl.cap, sizeof *cl.items);
	cl.ptrs = calloc(cl.cap, sizeof *cl.ptrs);
	cl.names = calloc(cl.cap, sizeof *cl.names);
	if (!cl.items || !cl.ptrs || !cl.names) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	kvt_rpc_counters_each(add_counter, &cl);
	add_counter(&cl, "sessions.evicted",
		    __atomic_load_n(&d->sessions->evicted, __ATOMIC_RELAXED));
	add_counter(&cl, "sessions.expired",
		    __atomic_load_n(&d->sessions->expired, __ATOMIC_RELAXED));
	add_counter(&cl, "host.refused", ts.refused);
	add_counter(&cl, "append.messages_zero_copy",
		    __atomic_load_n(&g_append_zero_copy, __ATOMIC_RELAXED));
	add_counter(&cl, "append.messages_parsed",
		    __atomic_load_n(&g_append_fallback, __ATOMIC_RELAXED));
	add_counter(&cl, "host.allocations", ts.allocations);
	add_counter(&cl, "rpc.reply_pool_resident", kvt_rpc_reply_pool_resident());
	if (d->gpu) {
		kvt_tier_gpu_counters(d->gpu, add_counter, &cl);
		if (kvt_tier_gpu_tier_enabled(d->gpu))
			add_counter(&cl, "gpu.arena_largest_free_bytes", gpu_largest);
	}

	Kvtier__V1__StatsResponse out = KVTIER__V1__STATS_RESPONSE__INIT;
	out.has_sessions = 1;
	out.sessions = sessions;
	out.has_tokens = 1;
	out.tokens = tokens;
	out.has_bytes_held = 1;
	out.bytes_held = bytes;
	out.has_logical_bytes = 1;
	out.logical_bytes = logical;
	out.n_tiers = n_tiers;
	out.tiers = tiers;
	out.n_counters = cl.n;
	out.counters = cl.ptrs;
	out.version = (char *)KVT_VERSION_STRING;
	out.has_uptime_ms = 1;
	out.uptime_ms = kvt_now_ms() - d->start_ms;
	out.codec_isa = (char *)kvt_rpc_isa_name();
	out.has_gpu = 1;
	out.gpu = d->gpu && kvt_tier_gpu_usable(d->gpu);
	kvt_rpc_reply(res, &out.base);
out:
	free(cl.items);
	free(cl.ptrs);
	free(cl.names);
	kvtier__v1__stats_request__free_unpacked(r, NULL);
}

/* ---- K/V staging shared by Append and StoreEncoded -------------------------------------- */

/*
 * Tokens staged for one atomic commit: per layer, a region of `cap` tokens, so a batch
 * that arrives layer by layer lands in place; at commit the regions are slid together into
 * the dense [L][n][H][d] that kvt_seq_append takes. Charged to the host tier.
 */
struct kv_stage {
	struct kvt_tier_host *host;
	struct kvt_codec_config cfg;
	size_t tb; /* bytes of one token of one layer: H * d * dtype size */
	uint8_t *k, *v;
	uint64_t cap, n;
	uint32_t batch_n, next_layer;
	int guarded; /* some block carried token_begin */
};

static void stage_init(struct kv_stage *st, struct kvt_tier_host *host,
		       const struct kvt_codec_config *cfg)
{
	memset(st, 0, sizeof *st);
	st->host = host;
	st->cfg = *cfg;
	st->tb = (size_t)cfg->n_kv_heads * cfg->head_dim * kvt_dtype_size(cfg->dtype);
}

static size_t stage_bytes(const struct kv_stage *st, uint64_t cap)
{
	return (size_t)(cap * st->tb * st->cfg.n_layers);
}

static void stage_free(struct kv_stage *st)
{
	if (st->k) {
		kvt_tier_host_free(st->host, st->k, stage_bytes(st, st->cap));
		kvt_tier_host_free(st->host, st->v, stage_bytes(st, st->cap));
	}
	st->k = st->v = NULL;
	st->cap = st->n = 0;
}

static int stage_grow(struct kv_stage *st, uint64_t need, struct kvt_rpc_result *res)
{
	uint64_t max_bytes = KVT_CFG(max_append_bytes);
	uint64_t per_token = 2 * (uint64_t)st->tb * st->cfg.n_layers;
	if (need * per_token > max_bytes) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED,
			     "the stream stages %" PRIu64 " tokens (%" PRIu64
			     " bytes of K and V); max_append_bytes is %" PRIu64,
			     need, need * per_token, max_bytes);
		return -1;
	}
	if (need <= st->cap)
		return 0;
	uint64_t cap = st->cap ? st->cap * 2 : 64;
	while (cap < need)
		cap *= 2;
	if (cap * per_token > max_bytes)
		cap = max_bytes / per_token;
	assert(cap >= need);
	uint8_t *k = kvt_tier_host_alloc(st->host, stage_bytes(st, cap));
	uint8_t *v = k ? kvt_tier_host_alloc(st->host, stage_bytes(st, cap)) : NULL;
	if (!v) {
		if (k)
			kvt_tier_host_free(st->host, k, stage_bytes(st, cap));
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED,
			     "host memory is full: staging %" PRIu64
			     " tokens does not fit in host_capacity_bytes %" PRIu64,
			     need, KVT_CFG(host_capacity_bytes));
		return -1;
	}
	for (uint32_t l = 0; l < st->cfg.n_layers && st->k; l++) {
		/* The whole region (also the open batch's layers already written). */
		memcpy(k + l * cap * st->tb, st->k + l * st->cap * st->tb, st->cap * st->tb);
		memcpy(v + l * cap * st->tb, st->v + l * st->cap * st->tb, st->cap * st->tb);
	}
	uint64_t n = st->n;
	stage_free(st);
	st->k = k;
	st->v = v;
	st->cap = cap;
	st->n = n;
	return 0;
}

/* Validates one KvBlock against the stream so far (its k/v lengths, not their bytes) and makes
 * room for it; the caller then copies the bytes and calls stage_commit. base = session length. */
static int stage_check(struct kv_stage *st, const Kvtier__V1__KvBlock *b, uint64_t base,
		       const char *field, struct kvt_rpc_result *res)
{
	const struct kvt_codec_config *cfg = &st->cfg;
	if (!b) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "%s is required", field);
		return -1;
	}
	if (!b->has_n_tokens || b->n_tokens == 0) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "%s.n_tokens must be at least 1",
			     field);
		return -1;
	}
	uint32_t layer_begin = b->has_layer_begin ? b->layer_begin : 0;
	uint32_t n_layers = b->has_n_layers ? b->n_layers : cfg->n_layers - layer_begin;
	if (b->has_dtype && b->dtype != KVTIER__V1__DTYPE__DTYPE_UNSPECIFIED &&
	    (uint32_t)b->dtype != cfg->dtype) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%s.dtype %d differs from the session's dtype %u (%s)", field,
			     (int)b->dtype, cfg->dtype, kvt_dtype_name(cfg->dtype));
		return -1;
	}
	if (layer_begin >= cfg->n_layers || n_layers == 0 ||
	    n_layers > cfg->n_layers - layer_begin) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%s layers [%u, %u) are out of range: the session has %u layers", field,
			     layer_begin, layer_begin + n_layers, cfg->n_layers);
		return -1;
	}
	if (layer_begin != st->next_layer) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%s.layer_begin %u: expected %u (a token batch covers layers 0..%u in "
			     "order)",
			     field, layer_begin, st->next_layer, cfg->n_layers - 1);
		return -1;
	}
	if (st->next_layer && b->n_tokens != st->batch_n) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%s.n_tokens %u differs from the open batch's %u (layers %u.. missing)",
			     field, b->n_tokens, st->batch_n, st->next_layer);
		return -1;
	}
	if (b->has_token_begin) {
		st->guarded = 1;
		if (b->token_begin != base + st->n) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "%s.token_begin %" PRIu64 ": expected %" PRIu64
				     " (session length plus tokens already sent)",
				     field, b->token_begin, base + st->n);
			return -1;
		}
	}
	size_t want = (size_t)n_layers * b->n_tokens * st->tb;
	if (!b->has_k || !b->has_v || b->k.len != want || b->v.len != want) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%s.%s is %zu bytes, expected %zu (%u layers x %u tokens x %u heads x "
			     "%u dims x %zu bytes)",
			     field, (!b->has_k || b->k.len != want) ? "k" : "v",
			     (!b->has_k || b->k.len != want) ? (b->has_k ? b->k.len : 0)
							     : (b->has_v ? b->v.len : 0),
			     want, n_layers, b->n_tokens, cfg->n_kv_heads, cfg->head_dim,
			     kvt_dtype_size(cfg->dtype));
		return -1;
	}
	if (st->next_layer == 0) {
		if (stage_grow(st, st->n + b->n_tokens, res))
			return -1;
		st->batch_n = b->n_tokens;
	}
	return 0;
}

/* Where layer l of the open batch goes (K or V). */
static uint8_t *stage_dst(struct kv_stage *st, uint8_t *base_ptr, uint32_t l)
{
	return base_ptr + ((uint64_t)l * st->cap + st->n) * st->tb;
}

static void stage_commit(struct kv_stage *st, uint32_t n_layers)
{
	st->next_layer += n_layers;
	if (st->next_layer == st->cfg.n_layers) {
		st->n += st->batch_n;
		st->next_layer = 0;
		st->batch_n = 0;
	}
}

static uint32_t block_layer_begin(const Kvtier__V1__KvBlock *b)
{
	return b->has_layer_begin ? b->layer_begin : 0;
}

static uint32_t block_n_layers(const struct kv_stage *st, const Kvtier__V1__KvBlock *b)
{
	return b->has_n_layers ? b->n_layers : st->cfg.n_layers - block_layer_begin(b);
}

/* Validates one KvBlock against the stream so far and stages it. */
static int stage_block(struct kv_stage *st, const Kvtier__V1__KvBlock *b, uint64_t base,
		       const char *field, struct kvt_rpc_result *res)
{
	if (stage_check(st, b, base, field, res))
		return -1;
	uint32_t layer_begin = block_layer_begin(b), n_layers = block_n_layers(st, b);
	size_t run = (size_t)b->n_tokens * st->tb;
	for (uint32_t j = 0; j < n_layers; j++) {
		memcpy(stage_dst(st, st->k, layer_begin + j), b->k.data + j * run, run);
		memcpy(stage_dst(st, st->v, layer_begin + j), b->v.data + j * run, run);
	}
	stage_commit(st, n_layers);
	return 0;
}

/* Checks the stream ended on a batch boundary and packs the regions densely. */
static int stage_close(struct kv_stage *st, struct kvt_rpc_result *res)
{
	if (st->next_layer) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "the stream ended inside a token batch: layers %u..%u of its %u "
			     "tokens are missing",
			     st->next_layer, st->cfg.n_layers - 1, st->batch_n);
		return -1;
	}
	for (uint32_t l = 1; l < st->cfg.n_layers && st->n < st->cap; l++) {
		memmove(st->k + l * st->n * st->tb, st->k + l * st->cap * st->tb, st->n * st->tb);
		memmove(st->v + l * st->n * st->tb, st->v + l * st->cap * st->tb, st->n * st->tb);
	}
	return 0;
}

/* ---- Append ------------------------------------------------------------------------------ */

struct append_state {
	struct kvt_session *s;
	uint64_t base;
	struct kv_stage st;
};

/* The stream's first message: resolve the session, remember its length. */
static struct append_state *append_begin(struct kvt_rpc_call *c, const char *id,
					 struct kvt_rpc_result *res)
{
	struct kvt_session *s;
	if (get_session(c, id, "session_id", &s, res))
		return NULL;
	struct append_state *a = calloc(1, sizeof *a);
	if (!a) {
		kvt_session_put(s);
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return NULL;
	}
	a->s = s;
	kvt_session_touch(s);
	kvt_session_lock(s);
	a->base = kvt_seq_tokens(s->seq);
	kvt_session_unlock(s);
	stage_init(&a->st, kvt_rpc_daemon(c)->host, &s->cfg);
	c->state = a;
	return a;
}

static int append_message(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
			  struct kvt_rpc_result *res)
{
	struct append_state *a = c->state;
	Kvtier__V1__AppendRequest *r =
		kvt_rpc_unpack(&kvtier__v1__append_request__descriptor, req, len, res);
	int rc = -1;
	if (!r)
		return -1;
	if (!a) {
		a = append_begin(c, r->session_id, res);
		if (!a)
			goto out;
	} else if (r->session_id && *r->session_id && strcmp(r->session_id, a->s->id)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "session_id \"%.128s\" differs from the stream's first message (\"%s\")",
			     r->session_id, a->s->id);
		goto out;
	}
	rc = stage_block(&a->st, r->block, a->base, "block", res);
out:
	kvtier__v1__append_request__free_unpacked(r, NULL);
	return rc;
}


/*
 * The zero-copy path for Append messages: K and V go from gRPC's receive slices straight into
 * the staging regions, with no flattening and no protobuf-c copy. It handles the layout every
 * encoder writes (session_id, then block with its scalars, then k, then v); anything else
 * (field order, repeats, unknown fields, malformed bytes) returns FALLBACK and the message
 * goes through protobuf-c, which gives the same answers and the precise errors.
 */
#define FALLBACK 1

/* Copies one tensor [n_layers][n_tokens][H][d] into the layer regions of the open batch. */
static int cur_copy_tensor(struct kvt_wire_reader *cu, struct kv_stage *st, uint8_t *base,
			   const Kvtier__V1__KvBlock *b)
{
	uint32_t lb = block_layer_begin(b), nl = block_n_layers(st, b);
	size_t run = (size_t)b->n_tokens * st->tb;
	for (uint32_t j = 0; j < nl; j++)
		if (kvt_wire_copy(cu, stage_dst(st, base, lb + j), run))
			return -1;
	return 0;
}

/* 0 = staged, -1 = res holds the error, FALLBACK = use protobuf-c. */
static int append_fast(struct kvt_rpc_call *c, struct kvt_wire_reader *cu, struct kvt_rpc_result *res)
{
	struct append_state *a = c->state;
	char sid[KVT_SESSION_ID_MAX + 1];
	int have_sid = 0;
	Kvtier__V1__KvBlock b = KVTIER__V1__KV_BLOCK__INIT;
	uint64_t v;
	if (kvt_wire_varint(cu, &v))
		return FALLBACK;
	if (v == (1 << 3 | 2)) {
		uint64_t n;
		if (kvt_wire_varint(cu, &n) || n == 0 || n > KVT_SESSION_ID_MAX || kvt_wire_copy(cu, sid, n))
			return FALLBACK;
		sid[n] = '\0';
		if (strlen(sid) != n)
			return FALLBACK;
		have_sid = 1;
		if (kvt_wire_varint(cu, &v))
			return FALLBACK;
	}
	if (v != (2 << 3 | 2))
		return FALLBACK;
	uint64_t blen;
	if (kvt_wire_varint(cu, &blen))
		return FALLBACK;
	uint64_t end = cu->consumed + blen;
	if (!a) {
		if (!have_sid)
			return FALLBACK;
		a = append_begin(c, sid, res);
		if (!a)
			return -1;
	} else if (have_sid && strcmp(sid, a->s->id)) {
		return FALLBACK;
	}
	struct kv_stage *st = &a->st;
	unsigned seen = 0;
	while (cu->consumed < end) {
		uint64_t tag, val;
		if (kvt_wire_varint(cu, &tag))
			return FALLBACK;
		uint32_t fn = (uint32_t)(tag >> 3), wt = (uint32_t)(tag & 7);
		if (fn >= 1 && fn <= 5 && wt == 0 && !(seen & (1u << fn)) && !(seen & (1u << 6))) {
			if (kvt_wire_varint(cu, &val) || val > UINT32_MAX || (fn == 5 && val > 3))
				return FALLBACK;
			seen |= 1u << fn;
			switch (fn) {
			case 1: b.has_token_begin = 1; b.token_begin = val; break;
			case 2: b.has_n_tokens = 1; b.n_tokens = (uint32_t)val; break;
			case 3: b.has_layer_begin = 1; b.layer_begin = (uint32_t)val; break;
			case 4: b.has_n_layers = 1; b.n_layers = (uint32_t)val; break;
			case 5: b.has_dtype = 1; b.dtype = (Kvtier__V1__Dtype)val; break;
			}
		} else if (fn == 6 && wt == 2 && !(seen & (1u << 6))) {
			if (kvt_wire_varint(cu, &val))
				return FALLBACK;
			/* V has not been seen yet: checked as the same length, confirmed below. */
			b.has_k = b.has_v = 1;
			b.k.len = b.v.len = val;
			seen |= 1u << 6;
			if (stage_check(st, &b, a->base, "block", res))
				return -1;
			if (cur_copy_tensor(cu, st, st->k, &b))
				return FALLBACK;
		} else if (fn == 7 && wt == 2 && (seen & (1u << 6)) && !(seen & (1u << 7))) {
			if (kvt_wire_varint(cu, &val) || val != b.k.len)
				return FALLBACK;
			seen |= 1u << 7;
			if (cur_copy_tensor(cu, st, st->v, &b))
				return FALLBACK;
		} else {
			return FALLBACK;
		}
	}
	if (cu->consumed != end || !(seen & (1u << 7)) || !kvt_wire_eof(cu))
		return FALLBACK;
	stage_commit(st, block_n_layers(st, &b));
	return 0;
}

static int append_message_bb(struct kvt_rpc_call *c, grpc_byte_buffer *bb,
			     struct kvt_rpc_result *res)
{
	struct kvt_wire_reader cu;
	memset(&cu, 0, sizeof cu);
	int rc = FALLBACK;
	if (grpc_byte_buffer_reader_init(&cu.r, bb)) {
		rc = append_fast(c, &cu, res);
		grpc_byte_buffer_reader_destroy(&cu.r);
	}
	__atomic_fetch_add(rc == FALLBACK ? &g_append_fallback : &g_append_zero_copy, 1,
			   __ATOMIC_RELAXED);
	if (rc != FALLBACK)
		return rc;
	grpc_byte_buffer_reader r;
	if (!grpc_byte_buffer_reader_init(&r, bb)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "could not read the request (bad compression?)");
		return -1;
	}
	grpc_slice all = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	rc = append_message(c, GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all), res);
	grpc_slice_unref(all);
	return rc;
}

static void append_end(struct kvt_rpc_call *c, struct kvt_rpc_result *res)
{
	struct append_state *a = c->state;
	char err[400] = "";
	if (!a || a->st.n == 0) {
		if (a && a->st.next_layer) {
			stage_close(&a->st, res);
			return;
		}
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "empty append: the stream carried no complete token batch");
		return;
	}
	if (stage_close(&a->st, res))
		return;
	if (a->st.n > UINT32_MAX) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "too many tokens in one append");
		return;
	}
	struct kvt_session *s = a->s;
	kvt_session_lock(s);
	uint64_t now_len = kvt_seq_tokens(s->seq);
	uint32_t chunks_before = kvt_seq_n_chunks(s->seq);
	if (!s->linked) {
		kvt_session_unlock(s);
		kvt_rpc_fail(res, GRPC_STATUS_NOT_FOUND,
			     "session \"%s\" was dropped during the append", s->id);
		return;
	}
	if (s->staged_layers) {
		kvt_session_unlock(s);
		kvt_rpc_fail(res, GRPC_STATUS_FAILED_PRECONDITION,
			     "session \"%s\" has a token staged by Attend on %u of %u layers; "
			     "finish it before appending",
			     s->id, s->staged_layers, s->cfg.n_layers);
		return;
	}
	if (now_len != a->base && a->st.guarded) {
		kvt_session_unlock(s);
		kvt_rpc_fail(res, GRPC_STATUS_FAILED_PRECONDITION,
			     "session \"%s\" changed length from %" PRIu64 " to %" PRIu64
			     " during the append (token_begin no longer matches)",
			     s->id, a->base, now_len);
		return;
	}
	int rc = kvt_seq_append(s->seq, a->st.k, a->st.v, (uint32_t)a->st.n, err, sizeof err);
	uint64_t after = kvt_seq_tokens(s->seq);
	uint32_t chunks_after = kvt_seq_n_chunks(s->seq);
	/* also after a failure: chunks the GPU encoder wrote for it are given back */
	if (rc || chunks_after != chunks_before)
		gpu_sync_locked(s, KVT_GPU_SYNC_USE);
	kvt_session_unlock(s);
	kvt_session_touch(s);
	if (rc) {
		fail_errno(res, rc, "Append", err);
		return;
	}
	Kvtier__V1__AppendResponse out = KVTIER__V1__APPEND_RESPONSE__INIT;
	out.has_n_tokens = 1;
	out.n_tokens = after;
	out.has_appended = 1;
	out.appended = a->st.n;
	out.has_chunks_sealed = 1;
	out.chunks_sealed = chunks_after - chunks_before;
	kvt_rpc_reply(res, &out.base);
}

static void append_cleanup(struct kvt_rpc_call *c)
{
	struct append_state *a = c->state;
	stage_free(&a->st);
	kvt_session_put(a->s);
	free(a);
}

/* ---- Fetch ------------------------------------------------------------------------------- */

static size_t varint_size(uint64_t v)
{
	size_t n = 1;
	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

/* Token batches x layer groups of [t0, t1) x [l0, l1), each block under a byte budget. */
struct block_iter {
	uint64_t t0, t1, cur_t;
	uint32_t l0, l1, cur_l;
	uint32_t dtype;
	size_t tlb;       /* bytes of one token of one layer in the output dtype */
	uint64_t tpb;     /* tokens per block */
	uint32_t lpb;     /* layers per block */
};

static int iter_init(struct block_iter *it, const struct kvt_codec_config *cfg, uint64_t t0,
		     uint64_t t1, uint32_t l0, uint32_t l1, uint32_t dtype, uint64_t limit,
		     struct kvt_rpc_result *res)
{
	memset(it, 0, sizeof *it);
	it->t0 = it->cur_t = t0;
	it->t1 = t1;
	it->l0 = it->cur_l = l0;
	it->l1 = l1;
	it->dtype = dtype;
	it->tlb = (size_t)cfg->n_kv_heads * cfg->head_dim * kvt_dtype_size(dtype);
	uint64_t smallest = 2 * it->tlb + MSG_OVERHEAD_BYTES;
	if (limit < smallest) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "max_message_bytes %" PRIu64 " is below the smallest block (%" PRIu64
			     " bytes: K and V of one token of one layer plus framing)",
			     limit, smallest);
		return -1;
	}
	uint64_t budget = limit - MSG_OVERHEAD_BYTES;
	uint32_t nl = l1 - l0;
	if (nl == 0 || t1 == t0)
		return 0;
	if (2 * it->tlb * nl <= budget) {
		it->lpb = nl;
		it->tpb = budget / (2 * it->tlb * nl);
	} else {
		it->lpb = (uint32_t)(budget / (2 * it->tlb));
		it->tpb = 1;
	}
	if (it->tpb > t1 - t0)
		it->tpb = t1 - t0;
	/* Equal blocks rather than full ones and a remainder: 128 tokens under a 4 MiB limit go
	 * as 64 + 64 (whole key groups, half the largest message) instead of 127 + 1. */
	if (it->lpb == nl && it->tpb > 0) {
		uint64_t n_blocks = (t1 - t0 + it->tpb - 1) / it->tpb;
		it->tpb = (t1 - t0 + n_blocks - 1) / n_blocks;
	}
	if (it->tpb > UINT32_MAX)
		it->tpb = UINT32_MAX;
	return 0;
}

static int iter_done(const struct block_iter *it)
{
	return it->cur_t >= it->t1 || it->l0 == it->l1;
}

/*
 * One block's decode, split by layers across idle workers when the block is large: the
 * calling thread decodes the first part and claims any part no worker has picked up yet, so
 * a busy pool makes this a plain sequential decode. The caller holds the session lock, and
 * kvt_seq_fetch only reads the session, so the parts may run at once.
 */
#define SPLIT_MIN_BYTES (512u * 1024u) /* K bytes of a block below which it is not split */
#define SPLIT_MAX 16

struct fetch_part {
	struct kvt_task task;
	const struct kvt_seq *seq;
	uint64_t t, nt;
	uint32_t l, nl, dtype;
	uint8_t *kp, *vp;
	int rc;
	char err[256];
};

static void fetch_part_run(void *arg)
{
	struct fetch_part *fp = arg;
	fp->rc = kvt_seq_fetch(fp->seq, fp->t, fp->t + fp->nt, fp->l, fp->l + fp->nl, fp->dtype,
			       fp->kp, fp->vp, fp->err, sizeof fp->err);
}

static int fetch_split(const struct kvt_seq *seq, uint64_t t, uint64_t nt, uint32_t l,
		       uint32_t nl, uint32_t dtype, size_t tlb, uint8_t *kp, uint8_t *vp,
		       char *err, size_t errlen)
{
	size_t layer_bytes = (size_t)nt * tlb;
	unsigned parts = kvt_pool_idle() + 1;
	if (parts > nl)
		parts = nl;
	if (parts > SPLIT_MAX)
		parts = SPLIT_MAX;
	if (parts < 2 || layer_bytes * nl < SPLIT_MIN_BYTES)
		return kvt_seq_fetch(seq, t, t + nt, l, l + nl, dtype, kp, vp, err, errlen);
	struct fetch_part fp[SPLIT_MAX];
	uint32_t done = 0;
	for (unsigned i = 0; i < parts; i++) {
		uint32_t n = (nl - done) / (parts - i);
		fp[i] = (struct fetch_part){.seq = seq, .t = t, .nt = nt, .l = l + done, .nl = n,
					    .dtype = dtype, .kp = kp + done * layer_bytes,
					    .vp = vp + done * layer_bytes};
		done += n;
	}
	for (unsigned i = 1; i < parts; i++)
		kvt_pool_submit(&fp[i].task, fetch_part_run, &fp[i]);
	fetch_part_run(&fp[0]);
	int rc = 0;
	for (unsigned i = 0; i < parts; i++) {
		if (i)
			kvt_pool_wait(&fp[i].task);
		if (fp[i].rc && !rc) {
			rc = fp[i].rc;
			snprintf(err, errlen, "%s", fp[i].err);
		}
	}
	return rc;
}

/*
 * Encodes the next KvBlock, decoding straight into the message. wrap_field != 0 wraps the
 * block as that length-delimited field (EncodedPiece.tail). Session lock held by the caller.
 */
static int iter_next(struct block_iter *it, const struct kvt_seq *seq, uint32_t wrap_field,
		     grpc_byte_buffer **out, char *err, size_t errlen)
{
	uint64_t t = it->cur_t;
	uint32_t l = it->cur_l;
	uint64_t nt = it->t1 - t < it->tpb ? it->t1 - t : it->tpb;
	uint32_t nl = it->l1 - l < it->lpb ? it->l1 - l : it->lpb;
	size_t kb = (size_t)nt * nl * it->tlb;
	size_t inner = 1 + varint_size(t) + 1 + varint_size(nt) + 1 + varint_size(l) + 1 +
		       varint_size(nl) + 1 + varint_size(it->dtype) + 2 * (1 + varint_size(kb) + kb);
	size_t total = inner + (wrap_field ? 1 + varint_size(inner) : 0);
	uint8_t *buf = kvt_rpc_reply_buf_get(total);
	if (!buf) {
		snprintf(err, errlen, "out of memory for a %zu-byte block", total);
		return -ENOMEM;
	}
	uint8_t *p = buf;
	if (wrap_field) {
		*p++ = (uint8_t)(wrap_field << 3 | 2);
		p = put_varint(p, inner);
	}
	*p++ = 1 << 3;
	p = put_varint(p, t);
	*p++ = 2 << 3;
	p = put_varint(p, nt);
	*p++ = 3 << 3;
	p = put_varint(p, l);
	*p++ = 4 << 3;
	p = put_varint(p, nl);
	*p++ = 5 << 3;
	p = put_varint(p, it->dtype);
	*p++ = 6 << 3 | 2;
	p = put_varint(p, kb);
	uint8_t *kp = p;
	p += kb;
	*p++ = 7 << 3 | 2;
	p = put_varint(p, kb);
	uint8_t *vp = p;
	p += kb;
	assert((size_t)(p - buf) == total);
	int rc = fetch_split(seq, t, nt, l, nl, it->dtype, it->tlb, kp, vp, err, errlen);
	if (rc) {
		kvt_rpc_reply_buf_put(buf);
		return rc;
	}
	*out = kvt_rpc_reply_buf_take(buf, total);
	it->cur_l += nl;
	if (it->cur_l >= it->l1) {
		it->cur_l = it->l0;
		it->cur_t += nt;
	}
	return 0;
}

/*
 * A Fetch decodes one message ahead: once message n is handed to gRPC, message n+1 is decoded
 * on the worker pool while n is written to the socket, and next() takes it (waiting for it,
 * or decoding it itself when no worker has started it yet).
 */
struct fetch_state {
	struct kvt_session *s;
	struct block_iter it;
	struct kvt_task ahead;
	int ahead_on;                 /* submitted; result not taken yet */
	int ahead_rc;                 /* KVT_STREAM_MSG (ahead_bb) or KVT_STREAM_DONE (ahead_res) */
	grpc_byte_buffer *ahead_bb;
	struct kvt_rpc_result ahead_res;
};

static int fetch_start(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		       struct kvt_rpc_result *res)
{
	Kvtier__V1__FetchRequest *r =
		kvt_rpc_unpack(&kvtier__v1__fetch_request__descriptor, req, len, res);
	struct kvt_session *s = NULL;
	int rc = -1;
	if (!r)
		return -1;
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	const struct kvt_codec_config *cfg = &s->cfg;
	kvt_session_lock(s);
	uint64_t n = kvt_seq_tokens(s->seq);
	kvt_session_unlock(s);
	uint64_t t0 = r->has_token_begin ? r->token_begin : 0;
	uint64_t t1 = r->has_token_end ? r->token_end : n;
	uint32_t l0 = r->has_layer_begin ? r->layer_begin : 0;
	uint32_t l1 = r->has_layer_end ? r->layer_end : cfg->n_layers;
	uint32_t dtype = r->has_dtype && r->dtype != KVTIER__V1__DTYPE__DTYPE_UNSPECIFIED
				 ? (uint32_t)r->dtype
				 : cfg->dtype;
	uint64_t limit = KVT_CFG(max_message_bytes);
	if (t0 > t1 || t1 > n) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "token range [%" PRIu64 ", %" PRIu64 ") is out of range: the session "
			     "has %" PRIu64 " tokens",
			     t0, t1, n);
		goto out;
	}
	if (l0 > l1 || l1 > cfg->n_layers) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "layer range [%u, %u) is out of range: the session has %u layers", l0,
			     l1, cfg->n_layers);
		goto out;
	}
	if (!dtype_ok((int)dtype)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "dtype %u is not one of DTYPE_F16, DTYPE_BF16, DTYPE_F32", dtype);
		goto out;
	}
	if (r->has_max_message_bytes) {
		if (r->max_message_bytes > limit) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "max_message_bytes %u exceeds the server's %" PRIu64,
				     r->max_message_bytes, limit);
			goto out;
		}
		limit = r->max_message_bytes;
	}
	struct fetch_state *f = calloc(1, sizeof *f);
	if (!f) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	if (iter_init(&f->it, cfg, t0, t1, l0, l1, dtype, limit, res)) {
		free(f);
		goto out;
	}
	kvt_session_touch(s);
	f->s = s;
	s = NULL;
	c->state = f;
	rc = 0;
out:
	kvt_session_put(s);
	kvtier__v1__fetch_request__free_unpacked(r, NULL);
	return rc;
}

/* The next message of the iterator: KVT_STREAM_MSG with *out, or KVT_STREAM_DONE with res. */
static int fetch_produce(struct fetch_state *f, grpc_byte_buffer **out, struct kvt_rpc_result *res)
{
	char err[400] = "";
	if (iter_done(&f->it)) {
		res->code = GRPC_STATUS_OK;
		return KVT_STREAM_DONE;
	}
	kvt_session_lock(f->s);
	uint64_t n = kvt_seq_tokens(f->s->seq);
	int rc;
	if (f->it.t1 > n) {
		kvt_session_unlock(f->s);
		kvt_rpc_fail(res, GRPC_STATUS_ABORTED,
			     "session \"%s\" was truncated to %" PRIu64 " tokens during the fetch",
			     f->s->id, n);
		return KVT_STREAM_DONE;
	}
	rc = iter_next(&f->it, f->s->seq, 0, out, err, sizeof err);
	kvt_session_unlock(f->s);
	if (rc) {
		fail_errno(res, rc, "Fetch", err);
		return KVT_STREAM_DONE;
	}
	return KVT_STREAM_MSG;
}

static void fetch_ahead(void *arg)
{
	struct fetch_state *f = arg;
	f->ahead_bb = NULL;
	f->ahead_res.code = GRPC_STATUS_OK;
	f->ahead_res.msg[0] = '\0';
	f->ahead_rc = fetch_produce(f, &f->ahead_bb, &f->ahead_res);
}

static int fetch_next(struct kvt_rpc_call *c, grpc_byte_buffer **out, struct kvt_rpc_result *res)
{
	struct fetch_state *f = c->state;
	int rc;
	if (kvt_rpc_deadline_passed(c)) {
		kvt_rpc_fail(res, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed during Fetch");
		return KVT_STREAM_DONE;
	}
	if (f->ahead_on) {
		kvt_pool_wait(&f->ahead);
		f->ahead_on = 0;
		rc = f->ahead_rc;
		*out = f->ahead_bb;
		f->ahead_bb = NULL;
		if (rc == KVT_STREAM_DONE) {
			res->code = f->ahead_res.code;
			memcpy(res->msg, f->ahead_res.msg, sizeof res->msg);
		}
	} else {
		rc = fetch_produce(f, out, res);
	}
	if (rc == KVT_STREAM_MSG && iter_done(&f->it))
		return KVT_STREAM_LAST; /* with the status */
	if (rc == KVT_STREAM_MSG && kvt_pool_threads() > 0) {
		f->ahead_on = 1;
		kvt_pool_submit(&f->ahead, fetch_ahead, f);
	}
	return rc;
}

static void fetch_cleanup(struct kvt_rpc_call *c)
{
	struct fetch_state *f = c->state;
	if (f->ahead_on) {
		/* Withdrawn if no worker took it; else it is waited for (one block's decode). */
		kvt_pool_cancel(&f->ahead);
		if (f->ahead_bb)
			grpc_byte_buffer_destroy(f->ahead_bb);
	}
	kvt_session_put(f->s);
	free(f);
}

/* ---- FetchEncoded ------------------------------------------------------------------------- */

static void chunk_unref(void *p)
{
	KVT_TSAN_ACQUIRE(p);
	kvt_chunk_put(p);
}

struct fetch_enc_state {
	struct kvt_session *s;
	int sent_info;
	uint32_t chunk, chunk_end;
	uint64_t offset;
	uint64_t piece_bytes;
	int include_tail;
	struct block_iter it;
};

static int fenc_start(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		      struct kvt_rpc_result *res)
{
	Kvtier__V1__FetchEncodedRequest *r =
		kvt_rpc_unpack(&kvtier__v1__fetch_encoded_request__descriptor, req, len, res);
	struct kvt_session *s = NULL;
	int rc = -1;
	if (!r)
		return -1;
	if (get_session(c, r->session_id, "session_id", &s, res))
		goto out;
	kvt_session_lock(s);
	uint32_t nch = kvt_seq_n_chunks(s->seq);
	uint64_t n = kvt_seq_tokens(s->seq);
	kvt_session_unlock(s);
	uint32_t cb = r->has_chunk_begin ? r->chunk_begin : 0;
	uint32_t ce = r->has_chunk_end ? r->chunk_end : nch;
	const uint64_t B = s->cfg.chunk_tokens, sealed = (uint64_t)nch * B;
	/* tail tokens sent: [tail_begin, tail_end) */
	uint64_t tail_begin = sealed, tail_end = n;
	int by_tokens = r->has_token_begin || r->has_token_end;
	if (by_tokens) {
		if (r->has_chunk_begin || r->has_chunk_end || r->has_include_tail) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "token_begin / token_end select by tokens: chunk_begin, "
				     "chunk_end and include_tail must then be absent");
			goto out;
		}
		uint64_t t0 = r->has_token_begin ? r->token_begin : 0;
		uint64_t t1 = r->has_token_end ? r->token_end : n;
		if (t0 > t1 || t1 > n) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "token range [%" PRIu64 ", %" PRIu64 ") is out of range: the "
				     "session has %" PRIu64 " tokens",
				     t0, t1, n);
			goto out;
		}
		/* the chunks overlapping the range (none when it is empty) */
		cb = (uint32_t)(t0 < sealed ? t0 / B : nch);
		ce = (uint32_t)(t1 <= t0 ? cb : t1 < sealed ? (t1 + B - 1) / B : nch);
		tail_begin = t0 > sealed ? t0 : sealed;
		tail_end = t1 > sealed ? t1 : sealed;
	}
	if (cb > ce || ce > nch) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "chunk range [%u, %u) is out of range: the session has %u sealed chunks",
			     cb, ce, nch);
		goto out;
	}
	struct fetch_enc_state *f = calloc(1, sizeof *f);
	if (!f) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	f->chunk = cb;
	f->chunk_end = ce;
	f->include_tail = by_tokens || !r->has_include_tail || r->include_tail;
	uint64_t limit = KVT_CFG(max_message_bytes);
	f->piece_bytes = limit - MSG_OVERHEAD_BYTES;
	if (iter_init(&f->it, &s->cfg, tail_begin, f->include_tail ? tail_end : tail_begin, 0,
		      s->cfg.n_layers, s->cfg.dtype, limit, res)) {
		free(f);
		goto out;
	}
	kvt_session_touch(s);
	f->s = s;
	s = NULL;
	c->state = f;
	rc = 0;
out:
	kvt_session_put(s);
	kvtier__v1__fetch_encoded_request__free_unpacked(r, NULL);
	return rc;
}

static int fenc_next(struct kvt_rpc_call *c, grpc_byte_buffer **out, struct kvt_rpc_result *res)
{
	struct fetch_enc_state *f = c->state;
	struct kvt_session *s = f->s;
	char err[400] = "";
	if (!f->sent_info) {
		/* First message: the source's shape and codec, nothing else. */
		struct kvt_session_info i;
		struct info_msg m;
		kvt_session_lock(s);
		kvt_session_info_locked(s, &i);
		kvt_session_unlock(s);
		fill_info(&m, s, &i);
		Kvtier__V1__EncodedPiece p = KVTIER__V1__ENCODED_PIECE__INIT;
		p.session = &m.info;
		*out = kvt_rpc_pack(&p.base);
		f->sent_info = 1;
		if (!*out) {
			kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
			return KVT_STREAM_DONE;
		}
		return f->chunk >= f->chunk_end && iter_done(&f->it) ? KVT_STREAM_LAST
								      : KVT_STREAM_MSG;
	}
	if (kvt_rpc_deadline_passed(c)) {
		kvt_rpc_fail(res, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed during FetchEncoded");
		return KVT_STREAM_DONE;
	}
	kvt_session_lock(s);
	if (kvt_seq_n_chunks(s->seq) < f->chunk_end ||
	    kvt_seq_tokens(s->seq) < f->it.t1) {
		kvt_session_unlock(s);
		kvt_rpc_fail(res, GRPC_STATUS_ABORTED,
			     "session \"%s\" was truncated during FetchEncoded", s->id);
		return KVT_STREAM_DONE;
	}
	if (f->chunk < f->chunk_end) {
		/* Zero copy: the piece's data is a slice over the chunk itself, holding a
		 * chunk reference until gRPC has sent it (a Truncate or Drop meanwhile cannot
		 * free it). Only the small header is written here. */
		const struct kvt_chunk *ch = kvt_chunk_get(kvt_seq_chunk(s->seq, f->chunk));
		kvt_session_unlock(s);
		uint64_t left = ch->size_bytes - f->offset;
		uint64_t take = left < f->piece_bytes ? left : f->piece_bytes;
		uint8_t hdr[64], *p = hdr;
		size_t inner = 1 + varint_size(f->chunk) + 1 + varint_size(f->offset) + 1 +
			       varint_size(ch->size_bytes) + 1 + varint_size(take) + take;
		*p++ = 1 << 3 | 2; /* EncodedPiece.chunk */
		p = put_varint(p, inner);
		*p++ = 1 << 3; /* ChunkPiece.chunk_index */
		p = put_varint(p, f->chunk);
		*p++ = 2 << 3; /* offset */
		p = put_varint(p, f->offset);
		*p++ = 3 << 3; /* total_bytes */
		p = put_varint(p, ch->size_bytes);
		*p++ = 4 << 3 | 2; /* data */
		p = put_varint(p, take);
		grpc_slice slices[2];
		slices[0] = grpc_slice_from_copied_buffer((const char *)hdr, (size_t)(p - hdr));
		KVT_TSAN_RELEASE(ch); /* unreferenced by gRPC's slice destructor, on any thread */
		slices[1] = grpc_slice_new_with_user_data((void *)(ch->bytes + f->offset), take,
							  chunk_unref, (void *)ch);
		*out = grpc_raw_byte_buffer_create(slices, 2);
		grpc_slice_unref(slices[0]);
		grpc_slice_unref(slices[1]);
		f->offset += take;
		if (f->offset >= ch->size_bytes) {
			f->chunk++;
			f->offset = 0;
		}
		/* iter_done reads only the iterator (no session state): safe unlocked */
		return f->chunk >= f->chunk_end && iter_done(&f->it) ? KVT_STREAM_LAST
								      : KVT_STREAM_MSG;
	}
	if (iter_done(&f->it)) {
		kvt_session_unlock(s);
		res->code = GRPC_STATUS_OK;
		return KVT_STREAM_DONE;
	}
	int rc = iter_next(&f->it, s->seq, 2 /* EncodedPiece.tail */, out, err, sizeof err);
	kvt_session_unlock(s);
	if (rc) {
		fail_errno(res, rc, "FetchEncoded", err);
		return KVT_STREAM_DONE;
	}
	return iter_done(&f->it) ? KVT_STREAM_LAST : KVT_STREAM_MSG;
}

static void fenc_cleanup(struct kvt_rpc_call *c)
{
	struct fetch_enc_state *f = c->state;
	kvt_session_put(f->s);
	free(f);
}

/* ---- StoreEncoded ------------------------------------------------------------------------- */

struct store_chunk {
	uint8_t *bytes;
	uint64_t total;
	uint64_t have;
};

struct store_state {
	int opened;
	char id[KVT_SESSION_ID_MAX + 1];
	struct kvt_codec_config cfg;
	uint32_t ttl;
	int pinned;
	struct store_chunk *chunks;
	uint32_t n_chunks, cap_chunks;
	uint64_t chunk_bytes; /* charged */
	int in_tail;
	struct kv_stage st;
	struct kvt_tier_host *host;
};

static int store_piece(struct store_state *ss, const Kvtier__V1__EncodedPiece *p,
		       struct kvt_rpc_result *res)
{
	if (p->piece_case == KVTIER__V1__ENCODED_PIECE__PIECE__NOT_SET)
		return 0; /* e.g. FetchEncoded's first message: the session info only */
	if (p->piece_case == KVTIER__V1__ENCODED_PIECE__PIECE_TAIL) {
		ss->in_tail = 1;
		uint64_t sealed = (uint64_t)ss->n_chunks * ss->cfg.chunk_tokens;
		if (ss->n_chunks && ss->chunks[ss->n_chunks - 1].have != ss->chunks[ss->n_chunks - 1].total) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "piece.tail arrived before chunk %u was complete", ss->n_chunks - 1);
			return -1;
		}
		return stage_block(&ss->st, p->tail, sealed, "piece.tail", res);
	}
	const Kvtier__V1__ChunkPiece *cp = p->chunk;
	if (ss->in_tail) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "piece.chunk after tail blocks: chunks come first");
		return -1;
	}
	if (!cp || !cp->has_chunk_index || !cp->has_offset || !cp->has_total_bytes || !cp->has_data) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "piece.chunk needs chunk_index, offset, total_bytes and data");
		return -1;
	}
	struct store_chunk *cur = ss->n_chunks ? &ss->chunks[ss->n_chunks - 1] : NULL;
	int new_chunk = !cur || cur->have == cur->total;
	uint32_t want_index = new_chunk ? ss->n_chunks : ss->n_chunks - 1;
	if (cp->chunk_index != want_index) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "piece.chunk.chunk_index %u: expected %u (chunks in order, pieces of "
			     "one chunk consecutive)",
			     cp->chunk_index, want_index);
		return -1;
	}
	if (new_chunk) {
		size_t max = kvt_chunk_max_bytes(&ss->cfg);
		if (cp->total_bytes < KVT_CHUNK_HEADER_BYTES || cp->total_bytes > max) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "piece.chunk.total_bytes %" PRIu64
				     " is out of range %d..%zu for this codec",
				     cp->total_bytes, KVT_CHUNK_HEADER_BYTES, max);
			return -1;
		}
		uint64_t per_token = 2 * (uint64_t)ss->st.tb * ss->cfg.n_layers;
		if (ss->chunk_bytes + cp->total_bytes + ss->st.cap * per_token >
		    KVT_CFG(max_append_bytes)) {
			kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED,
				     "the stream stages more than max_append_bytes %" PRIu64,
				     KVT_CFG(max_append_bytes));
			return -1;
		}
		if (ss->n_chunks == ss->cap_chunks) {
			uint32_t nc = ss->cap_chunks ? ss->cap_chunks * 2 : 16;
			struct store_chunk *n = realloc(ss->chunks, nc * sizeof *n);
			if (!n) {
				kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
				return -1;
			}
			ss->chunks = n;
			ss->cap_chunks = nc;
		}
		uint8_t *b = kvt_tier_host_alloc(ss->host, cp->total_bytes);
		if (!b) {
			kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED,
				     "host memory is full (host_capacity_bytes %" PRIu64 ")",
				     KVT_CFG(host_capacity_bytes));
			return -1;
		}
		ss->chunk_bytes += cp->total_bytes;
		cur = &ss->chunks[ss->n_chunks++];
		cur->bytes = b;
		cur->total = cp->total_bytes;
		cur->have = 0;
	}
	if (cp->total_bytes != cur->total || cp->offset != cur->have ||
	    cp->data.len > cur->total - cur->have || cp->data.len == 0) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "piece.chunk %u: offset %" PRIu64 " + %zu bytes does not continue the "
			     "chunk (have %" PRIu64 " of %" PRIu64 " bytes)",
			     cp->chunk_index, cp->offset, cp->data.len, cur->have, cur->total);
		return -1;
	}
	memcpy(cur->bytes + cur->have, cp->data.data, cp->data.len);
	cur->have += cp->data.len;
	if (cur->have == cur->total) {
		char err[400] = "";
		struct kvt_codec_config got;
		struct kvt_chunk_header hdr;
		uint32_t idx = ss->n_chunks - 1;
		if (kvt_chunk_parse(cur->bytes, cur->total, &got, &hdr, err, sizeof err)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "chunk %u is invalid: %s", idx,
				     err);
			return -1;
		}
		got.pin_detect_ratio = ss->cfg.pin_detect_ratio;
		got.pin_detect_max = ss->cfg.pin_detect_max;
		got.recent_exact_tokens = ss->cfg.recent_exact_tokens; /* a session property */
		got.key_rounding = ss->cfg.key_rounding; /* an encoder choice, not in a chunk */
		if (kvt_codec_config_compare(&ss->cfg, &got, err, sizeof err)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "chunk %u does not match the session: %s", idx, err);
			return -1;
		}
		if (hdr.first_token != (uint64_t)idx * ss->cfg.chunk_tokens) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "chunk %u starts at token %" PRIu64 ", expected %" PRIu64, idx,
				     hdr.first_token, (uint64_t)idx * ss->cfg.chunk_tokens);
			return -1;
		}
	}
	return 0;
}

static int store_message(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
			 struct kvt_rpc_result *res)
{
	struct store_state *ss = c->state;
	Kvtier__V1__StoreEncodedRequest *r =
		kvt_rpc_unpack(&kvtier__v1__store_encoded_request__descriptor, req, len, res);
	int rc = -1;
	if (!r)
		return -1;
	if (!ss) {
		if (!r->open) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "open is required in the first message");
			goto out;
		}
		struct kvt_codec_config cfg;
		if (check_id(r->open->session_id, "open.session_id", res) ||
		    resolve_config(r->open, &cfg, res))
			goto out;
		uint32_t ttl = r->open->has_ttl_seconds ? r->open->ttl_seconds : default_ttl();
		if (r->open->has_ttl_seconds && check_ttl(ttl, "open.ttl_seconds", res))
			goto out;
		struct kvt_session *e = NULL;
		if (kvt_sessions_get(sessions_of(c), KVT_TENANT_LOCAL, r->open->session_id, &e) == 0) {
			char err[400] = "";
			kvt_session_lock(e);
			uint64_t n = kvt_seq_tokens(e->seq);
			kvt_session_unlock(e);
			int bad = kvt_codec_config_compare(&e->cfg, &cfg, err, sizeof err);
			kvt_session_put(e);
			if (bad || n) {
				kvt_rpc_fail(res, GRPC_STATUS_ALREADY_EXISTS,
					     "session \"%s\" exists %s%s", r->open->session_id,
					     n ? "and is not empty" : "with another config: ",
					     n ? "" : err);
				goto out;
			}
		}
		ss = calloc(1, sizeof *ss);
		if (!ss) {
			kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
			goto out;
		}
		snprintf(ss->id, sizeof ss->id, "%s", r->open->session_id);
		ss->cfg = cfg;
		ss->ttl = ttl;
		ss->pinned = r->open->has_pinned && r->open->pinned;
		ss->host = kvt_rpc_daemon(c)->host;
		stage_init(&ss->st, ss->host, &cfg);
		c->state = ss;
	} else if (r->open) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "open is only allowed in the first message");
		goto out;
	}
	rc = r->piece ? store_piece(ss, r->piece, res) : 0;
out:
	kvtier__v1__store_encoded_request__free_unpacked(r, NULL);
	return rc;
}

static void store_end(struct kvt_rpc_call *c, struct kvt_rpc_result *res)
{
	struct store_state *ss = c->state;
	char err[400] = "";
	struct kvt_session *s = NULL;
	int created = 0, rc;
	if (!ss) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "empty stream: open is required");
		return;
	}
	if (ss->n_chunks && ss->chunks[ss->n_chunks - 1].have != ss->chunks[ss->n_chunks - 1].total) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "the stream ended inside chunk %u", ss->n_chunks - 1);
		return;
	}
	if (stage_close(&ss->st, res))
		return;
	rc = kvt_sessions_open(sessions_of(c), KVT_TENANT_LOCAL, ss->id, &ss->cfg, ss->ttl,
			       ss->pinned, KVT_CFG(max_sessions), &s, &created, err, sizeof err);
	if (rc) {
		fail_errno(res, rc, "StoreEncoded", err);
		return;
	}
	kvt_session_lock(s);
	if (kvt_seq_tokens(s->seq) != 0 || s->staged_layers) {
		kvt_session_unlock(s);
		kvt_session_put(s);
		kvt_rpc_fail(res, GRPC_STATUS_ALREADY_EXISTS,
			     "session \"%s\" was filled by another request meanwhile", ss->id);
		return;
	}
	rc = 0;
	for (uint32_t i = 0; i < ss->n_chunks && rc == 0; i++)
		rc = kvt_seq_append_chunk(s->seq, ss->chunks[i].bytes, ss->chunks[i].total, err,
					  sizeof err);
	if (rc == 0 && ss->st.n)
		rc = kvt_seq_append(s->seq, ss->st.k, ss->st.v, (uint32_t)ss->st.n, err, sizeof err);
	if (rc) {
		/* Back to empty: a prefix of zero tokens is exact, nothing else changes. */
		char e2[200];
		int trc = kvt_seq_truncate(s->seq, 0, e2, sizeof e2);
		assert(trc == 0 && "truncating to 0 must succeed");
		(void)trc;
	}
	gpu_sync_locked(s, KVT_GPU_SYNC_USE);
	kvt_session_unlock(s);
	if (rc) {
		if (created)
			kvt_sessions_unlink(sessions_of(c), s);
		kvt_session_put(s);
		fail_errno(res, rc, "StoreEncoded", err);
		return;
	}
	reply_info(res, s, 1, created);
	kvt_session_put(s);
}

static void store_cleanup(struct kvt_rpc_call *c)
{
	struct store_state *ss = c->state;
	for (uint32_t i = 0; i < ss->n_chunks; i++)
		kvt_tier_host_free(ss->host, ss->chunks[i].bytes, ss->chunks[i].total);
	free(ss->chunks);
	stage_free(&ss->st);
	free(ss);
}

/* ---- Attend ------------------------------------------------------------------------------- */

/*
 * GPU batching of Attend. Items on GPU-resident sessions are collected (their sessions stay
 * locked from collection until the batch runs, so nothing else changes them) and run together
 * by kvt_tier_gpu_attend_batch: one attention plan and launch pair per codec for the whole
 * request. Deadlock freedom: while the batch holds session locks, another session's lock is
 * only ever tried (trylock); when that fails the batch runs first and releases everything,
 * then the lock is waited for with nothing held. The tier's mutex is taken after session
 * locks, as everywhere.
 */
struct attend_held {
	struct kvt_session *s;
	int live_tail; /* a collected item reads this session's own tail buffer */
};
struct attend_batch {
	struct kvt_tier_gpu *g;
	struct kvt_gpu_attend_item *gi; /* [max items] */
	uint8_t **copies;               /* gi[j]'s tail copy (K then V), or NULL */
	size_t *item;                   /* the request item of gi[j] */
	size_t n;
	struct attend_held *held;       /* sessions with collected items, locked */
	size_t n_held;
};

static struct attend_held *batch_held(struct attend_batch *b, const struct kvt_session *s)
{
	for (size_t i = 0; i < b->n_held; i++)
		if (b->held[i].s == s)
			return &b->held[i];
	return NULL;
}

/* The CPU attention of a collected item (its chunks are still the sequence's: the session has
 * been locked since). */
static int attend_item_cpu(const struct kvt_gpu_attend_item *it, char *err, size_t errlen)
{
	const void **chunks = calloc(it->n_chunks ? it->n_chunks : 1, sizeof *chunks);
	if (!chunks) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	for (uint32_t k = 0; k < it->n_chunks; k++)
		chunks[k] = kvt_seq_chunk(it->seq, k)->bytes;
	struct kvt_attend_request ar = {
		.cfg = kvt_seq_config(it->seq), .layer = it->layer, .n_q_heads = it->n_q_heads,
		.softmax_scale = it->softmax_scale, .q = it->q, .chunks = chunks,
		.n_chunks = it->n_chunks, .tail_k = it->tail_k, .tail_v = it->tail_v,
		.n_tail = it->n_tail, .out = it->out};
	int rc = kvt_attend(&ar, 1, err, errlen);
	free(chunks);
	return rc;
}

/* Runs the collected items (the GPU first; whatever it did not take on the CPU), then unlocks
 * every held session but `keep` (which stays locked). Returns the first failure with *failed
 * = its request item. */
static int batch_flush(struct attend_batch *b, const struct kvt_session *keep, size_t *failed,
		       char *err, size_t errlen)
{
	int rc = 0;
	if (b->n) {
		char e[300] = "", q[300];
		if (kvt_tier_gpu_attend_batch(b->g, b->gi, b->n, e, sizeof e))
			kvt_log_warn("gpu attend batch failed; the CPU serves it", "items=%zu error=%s",
				     b->n, kvt_log_quote(q, sizeof q, e));
		for (size_t j = 0; j < b->n; j++) {
			if (b->gi[j].rc == -EAGAIN)
				b->gi[j].rc = attend_item_cpu(&b->gi[j], err, errlen);
			if (b->gi[j].rc && rc == 0) {
				rc = b->gi[j].rc;
				*failed = b->item[j];
			}
		}
	}
	for (size_t j = 0; j < b->n; j++) {
		free(b->copies[j]);
		b->copies[j] = NULL;
	}
	for (size_t i = 0; i < b->n_held; i++)
		if (b->held[i].s != keep)
			kvt_session_unlock(b->held[i].s);
	b->n = 0;
	b->n_held = 0;
	return rc;
}


static void h_attend(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		     struct kvt_rpc_result *res)
{
	UNPACK(Kvtier__V1__AttendRequest, kvtier__v1__attend_request, r);
	size_t n = r->n_items;
	struct kvt_session **ss = NULL;
	Kvtier__V1__AttendResult *results = NULL;
	Kvtier__V1__AttendResult **rptrs = NULL;
	float **outs = NULL, **qs = NULL;
	uint64_t *attended = NULL;
	char err[400] = "";
	if (n == 0) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT, "items is empty");
		goto out;
	}
	if (n > KVT_CFG(max_attend_items)) {
		kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
			     "%zu items exceed max_attend_items %" PRIu64, n,
			     KVT_CFG(max_attend_items));
		goto out;
	}
	ss = calloc(n, sizeof *ss);
	results = calloc(n, sizeof *results);
	rptrs = calloc(n, sizeof *rptrs);
	outs = calloc(n, sizeof *outs);
	if (!ss || !results || !rptrs || !outs) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	/* Everything is checked before any item runs. */
	uint64_t reply_bytes = 0;
	for (size_t i = 0; i < n; i++) {
		const Kvtier__V1__AttendItem *it = r->items[i];
		char field[48];
		snprintf(field, sizeof field, "items[%zu].session_id", i);
		if (get_session(c, it->session_id, field, &ss[i], res))
			goto out;
		const struct kvt_codec_config *cfg = &ss[i]->cfg;
		if (!it->has_layer || it->layer >= cfg->n_layers) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "items[%zu].layer %s%u is out of range: the session has %u layers",
				     i, it->has_layer ? "" : "(absent) ", it->layer, cfg->n_layers);
			goto out;
		}
		if (!it->has_n_q_heads || it->n_q_heads == 0 || it->n_q_heads % cfg->n_kv_heads ||
		    it->n_q_heads > MAX_Q_HEADS) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "items[%zu].n_q_heads %u must be a multiple of n_kv_heads %u, "
				     "at most %d",
				     i, it->n_q_heads, cfg->n_kv_heads, MAX_Q_HEADS);
			goto out;
		}
		size_t qb = (size_t)it->n_q_heads * cfg->head_dim * sizeof(float);
		if (!it->has_q || it->q.len != qb) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "items[%zu].q is %zu bytes, expected %zu (f32 [%u][%u])", i,
				     it->has_q ? it->q.len : 0, qb, it->n_q_heads, cfg->head_dim);
			goto out;
		}
		if (it->has_softmax_scale &&
		    !(isfinite(it->softmax_scale) && it->softmax_scale > 0.0f)) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "items[%zu].softmax_scale %g must be finite and positive", i,
				     (double)it->softmax_scale);
			goto out;
		}
		size_t tb = (size_t)cfg->n_kv_heads * cfg->head_dim * kvt_dtype_size(cfg->dtype);
		if (it->has_new_k != it->has_new_v ||
		    (it->has_new_k && (it->new_k.len != tb || it->new_v.len != tb))) {
			kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
				     "items[%zu]: new_k and new_v must both be %zu bytes ([%u][%u] %s)",
				     i, tb, cfg->n_kv_heads, cfg->head_dim, kvt_dtype_name(cfg->dtype));
			goto out;
		}
		if (it->has_new_k) {
			for (size_t j = 0; j < i; j++) {
				if (ss[j] == ss[i] && r->items[j]->has_new_k &&
				    r->items[j]->layer == it->layer) {
					kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
						     "items[%zu] stages layer %u of session \"%s\" "
						     "again (items[%zu] did)",
						     i, it->layer, ss[i]->id, j);
					goto out;
				}
			}
			kvt_session_lock(ss[i]);
			int dup = (ss[i]->stage_mask[it->layer / 64] >> (it->layer % 64)) & 1;
			kvt_session_unlock(ss[i]);
			if (dup) {
				kvt_rpc_fail(res, GRPC_STATUS_INVALID_ARGUMENT,
					     "items[%zu]: layer %u of session \"%s\" already has the "
					     "next token staged",
					     i, it->layer, ss[i]->id);
				goto out;
			}
		}
		reply_bytes += qb + 32;
	}
	if (reply_bytes + MSG_OVERHEAD_BYTES > KVT_CFG(max_message_bytes)) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED,
			     "the reply would be %" PRIu64 " bytes, above max_message_bytes %" PRIu64,
			     reply_bytes, KVT_CFG(max_message_bytes));
		goto out;
	}
	if (kvt_rpc_deadline_passed(c)) {
		kvt_rpc_fail(res, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline passed before Attend ran");
		goto out;
	}
	struct attend_batch b = {.g = kvt_rpc_daemon(c)->gpu};
	b.gi = calloc(n, sizeof *b.gi);
	b.copies = calloc(n, sizeof *b.copies);
	b.item = calloc(n, sizeof *b.item);
	b.held = calloc(n, sizeof *b.held);
	qs = calloc(n, sizeof *qs);
	attended = calloc(n, sizeof *attended);
	if (!b.gi || !b.copies || !b.item || !b.held || !qs || !attended) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		goto out_batch;
	}
	int gpu_tier = b.g && kvt_tier_gpu_tier_enabled(b.g);
	for (size_t i = 0; i < n; i++) {
		const Kvtier__V1__AttendItem *it = r->items[i];
		struct kvt_session *s = ss[i];
		const struct kvt_codec_config *cfg = &s->cfg;
		float scale = it->has_softmax_scale ? it->softmax_scale
						    : 1.0f / sqrtf((float)cfg->head_dim);
		size_t qb = (size_t)it->n_q_heads * cfg->head_dim * sizeof(float);
		outs[i] = malloc(qb);
		qs[i] = malloc(qb);
		if (!outs[i] || !qs[i]) {
			kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
			goto out_batch;
		}
		float *q = qs[i];
		memcpy(q, it->q.data, qb); /* aligned copy of the wire bytes */
		int rc = 0;
		size_t failed = i;
		kvt_session_touch(s);
		struct attend_held *h = batch_held(&b, s);
		if (!h) {
			if (b.n_held && pthread_mutex_trylock(&s->lock) != 0) {
				/* never wait for a lock while holding others: run what we have */
				rc = batch_flush(&b, NULL, &failed, err, sizeof err);
				if (rc) {
					fail_errno(res, rc, "Attend", err);
					goto out_batch;
				}
				kvt_session_lock(s);
			} else if (!b.n_held) {
				kvt_session_lock(s);
			}
		}
		/* GPU-resident sessions go to the batch (the GPU kernel when every chunk it reads
		 * is in the arena when the batch runs, the CPU otherwise). */
		int on_gpu = gpu_tier && s->gpu_wanted;
		if (on_gpu)
			gpu_sync_locked(s, KVT_GPU_SYNC_USE);
		size_t tb = (size_t)cfg->n_kv_heads * cfg->head_dim * kvt_dtype_size(cfg->dtype);
		uint32_t nt = kvt_seq_tail_tokens(s->seq), nch = kvt_seq_n_chunks(s->seq);
		int collected = 0;
		if (!it->has_new_k) {
			attended[i] = kvt_seq_tokens(s->seq);
			if (on_gpu && attended[i] > 0) {
				/* reads the session's tail in place: a commit on this session
				 * runs the batch first */
				struct kvt_gpu_attend_item gi = {
					.m = s->gpu_mirror, .seq = s->seq, .n_chunks = nch,
					.layer = it->layer, .n_q_heads = it->n_q_heads,
					.softmax_scale = scale, .q = q,
					.tail_k = nt ? kvt_seq_tail_k(s->seq, it->layer) : NULL,
					.tail_v = nt ? kvt_seq_tail_v(s->seq, it->layer) : NULL,
					.n_tail = nt, .out = outs[i]};
				b.gi[b.n] = gi;
				b.item[b.n++] = i;
				collected = 2;
			} else {
				rc = kvt_seq_attend(s->seq, it->layer, it->n_q_heads, scale, q,
						    outs[i], err, sizeof err);
			}
		} else {
			/* Over the session plus the new token: the chunks as they are, the
			 * tail extended by one token in a copy. */
			uint8_t *tk = malloc(2 * (nt + 1) * tb), *tv = tk ? tk + (nt + 1) * tb : NULL;
			if (!tk) {
				rc = -ENOMEM;
			} else {
				if (nt) {
					memcpy(tk, kvt_seq_tail_k(s->seq, it->layer), nt * tb);
					memcpy(tv, kvt_seq_tail_v(s->seq, it->layer), nt * tb);
				}
				memcpy(tk + nt * tb, it->new_k.data, tb);
				memcpy(tv + nt * tb, it->new_v.data, tb);
				struct kvt_gpu_attend_item gi = {
					.m = s->gpu_mirror, .seq = s->seq, .n_chunks = nch,
					.layer = it->layer, .n_q_heads = it->n_q_heads,
					.softmax_scale = scale, .q = q, .tail_k = tk, .tail_v = tv,
					.n_tail = nt + 1, .out = outs[i]};
				if (on_gpu) {
					b.gi[b.n] = gi;
					b.copies[b.n] = tk;
					b.item[b.n++] = i;
					collected = 1;
				} else {
					rc = attend_item_cpu(&gi, err, sizeof err);
					free(tk);
				}
			}
			attended[i] = kvt_seq_tokens(s->seq) + 1;
			if (rc == 0 && ((s->stage_mask[it->layer / 64] >> (it->layer % 64)) & 1)) {
				/* Another request staged this layer since validation. */
				snprintf(err, sizeof err, "items[%zu]: layer %u already has the next "
					 "token staged", i, it->layer);
				rc = -EINVAL;
			}
			if (rc == 0 && !s->stage_k) {
				size_t all = tb * cfg->n_layers;
				s->stage_k = kvt_tier_host_alloc(s->table->host, all);
				s->stage_v = s->stage_k ? kvt_tier_host_alloc(s->table->host, all) : NULL;
				if (!s->stage_v) {
					if (s->stage_k)
						kvt_tier_host_free(s->table->host, s->stage_k, all);
					s->stage_k = NULL;
					rc = -ENOMEM;
				}
			}
			if (rc == 0) {
				memcpy(s->stage_k + it->layer * tb, it->new_k.data, tb);
				memcpy(s->stage_v + it->layer * tb, it->new_v.data, tb);
				s->stage_mask[it->layer / 64] |= 1ull << (it->layer % 64);
				s->staged_layers++;
			}
			if (rc == 0 && s->staged_layers == cfg->n_layers) {
				/* The commit changes the tail in place: collected items that read
				 * it run first (the session stays locked: it is this item's). */
				if (h && h->live_tail) {
					/* s stays locked through the flush: nothing else may
					 * change its staging before the commit */
					rc = batch_flush(&b, s, &failed, err, sizeof err);
					h = NULL;
					if (rc) {
						kvt_session_unlock(s);
						fail_errno(res, rc, "Attend", err);
						goto out_batch;
					}
					if (collected) {
						/* this item was in the flushed batch: done */
						collected = 0;
					}
				}
				rc = kvt_seq_append(s->seq, s->stage_k, s->stage_v, 1, err,
						    sizeof err);
				if (rc == 0) {
					kvt_session_clear_stage_locked(s);
					if (on_gpu)
						gpu_sync_locked(s, KVT_GPU_SYNC_USE);
				} else {
					/* Keep the staging; the next attempt retries. */
					s->stage_mask[it->layer / 64] &= ~(1ull << (it->layer % 64));
					s->staged_layers--;
				}
			}
		}
		if (collected) {
			if (!h) {
				h = &b.held[b.n_held++];
				h->s = s;
				h->live_tail = 0;
			}
			if (collected == 2)
				h->live_tail = 1;
		} else if (!h) {
			kvt_session_unlock(s);
		}
		if (rc) {
			if (collected == 1 && b.n && b.item[b.n - 1] == i) {
				/* the staging failed: this item is not answered */
				free(b.copies[b.n - 1]);
				b.copies[b.n - 1] = NULL;
				b.n--;
			}
			fail_errno(res, rc, "Attend", err);
			goto out_batch;
		}
	}
	{
		size_t failed = 0;
		int rc = batch_flush(&b, NULL, &failed, err, sizeof err);
		if (rc) {
			fail_errno(res, rc, "Attend", err);
			goto out_batch;
		}
	}
	for (size_t i = 0; i < n; i++) {
		Kvtier__V1__AttendResult ar = KVTIER__V1__ATTEND_RESULT__INIT;
		const struct kvt_codec_config *cfg = &ss[i]->cfg;
		results[i] = ar;
		results[i].has_out = 1;
		results[i].out.data = (uint8_t *)outs[i];
		results[i].out.len = (size_t)r->items[i]->n_q_heads * cfg->head_dim * sizeof(float);
		results[i].has_n_tokens_attended = 1;
		results[i].n_tokens_attended = attended[i];
		rptrs[i] = &results[i];
	}
	Kvtier__V1__AttendResponse out = KVTIER__V1__ATTEND_RESPONSE__INIT;
	out.n_results = n;
	out.results = rptrs;
	kvt_rpc_reply(res, &out.base);
out_batch:
	/* on a failure: collected items are dropped unanswered and their sessions unlocked */
	for (size_t j = 0; b.copies && j < b.n; j++)
		free(b.copies[j]);
	for (size_t j = 0; b.held && j < b.n_held; j++)
		kvt_session_unlock(b.held[j].s);
	free(b.gi);
	free(b.copies);
	free(b.item);
	free(b.held);
out:
	for (size_t i = 0; ss && i < n; i++)
		kvt_session_put(ss[i]);
	for (size_t i = 0; outs && i < n; i++)
		free(outs[i]);
	for (size_t i = 0; qs && i < n; i++)
		free(qs[i]);
	free(qs);
	free(attended);
	free(ss);
	free(results);
	free(rptrs);
	free(outs);
	kvtier__v1__attend_request__free_unpacked(r, NULL);
}

/* ---- the table ---------------------------------------------------------------------------- */

#define KV(m) "/kvtier.v1.KvTier/" m
const struct kvt_rpc_method kvt_rpc_kvtier_methods[] = {
	{.path = KV("OpenSession"), .name = "OpenSession", .kind = KVT_RPC_UNARY, .unary = h_open},
	{.path = KV("Fork"), .name = "Fork", .kind = KVT_RPC_UNARY, .unary = h_fork},
	{.path = KV("Truncate"), .name = "Truncate", .kind = KVT_RPC_UNARY, .unary = h_truncate},
	{.path = KV("DropSession"), .name = "DropSession", .kind = KVT_RPC_UNARY, .unary = h_drop},
	{.path = KV("Pin"), .name = "Pin", .kind = KVT_RPC_UNARY, .unary = h_pin},
	{.path = KV("Unpin"), .name = "Unpin", .kind = KVT_RPC_UNARY, .unary = h_unpin},
	{.path = KV("SetTtl"), .name = "SetTtl", .kind = KVT_RPC_UNARY, .unary = h_set_ttl},
	{.path = KV("StatSession"), .name = "StatSession", .kind = KVT_RPC_UNARY, .unary = h_stat},
	{.path = KV("ListSessions"), .name = "ListSessions", .kind = KVT_RPC_UNARY, .unary = h_list},
	{.path = KV("Append"), .name = "Append", .kind = KVT_RPC_CLIENT_STREAM,
	 .on_message = append_message, .on_message_bb = append_message_bb, .on_end = append_end,
	 .cleanup = append_cleanup, .pooled = KVT_POOL_END},
	{.path = KV("Fetch"), .name = "Fetch", .kind = KVT_RPC_SERVER_STREAM, .start = fetch_start,
	 .next = fetch_next, .cleanup = fetch_cleanup, .pooled = KVT_POOL_NEXT},
	{.path = KV("FetchEncoded"), .name = "FetchEncoded", .kind = KVT_RPC_SERVER_STREAM,
	 .start = fenc_start, .next = fenc_next, .cleanup = fenc_cleanup},
	{.path = KV("StoreEncoded"), .name = "StoreEncoded", .kind = KVT_RPC_CLIENT_STREAM,
	 .on_message = store_message, .on_end = store_end, .cleanup = store_cleanup,
	 .pooled = KVT_POOL_END},
	{.path = KV("Attend"), .name = "Attend", .kind = KVT_RPC_UNARY, .unary = h_attend,
	 .pooled = KVT_POOL_UNARY},
	/* Both may copy a whole session (to the device, or into the GPU arena) and wait for
	 * the session lock behind an Append commit: on the pool, never on a queue thread. */
	{.path = KV("RestoreToDevice"), .name = "RestoreToDevice", .kind = KVT_RPC_UNARY,
	 .unary = h_restore, .pooled = KVT_POOL_UNARY},
	{.path = KV("Prefetch"), .name = "Prefetch", .kind = KVT_RPC_UNARY, .unary = h_prefetch,
	 .pooled = KVT_POOL_UNARY},
	{.path = KV("Stats"), .name = "Stats", .kind = KVT_RPC_UNARY, .unary = h_stats},
};
const size_t kvt_rpc_kvtier_n_methods =
	sizeof kvt_rpc_kvtier_methods / sizeof kvt_rpc_kvtier_methods[0];

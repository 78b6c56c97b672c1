/*
 * kvt_it.h - shared pieces of the C integration tests: TNI-like KV data (a few low-norm sink
 * tokens, outlier channels), the local reference sequence built with the same codec config
 * as a daemon session, and comparison helpers. Header-only; each test is one executable.
 */
#ifndef KVT_IT_H
#define KVT_IT_H

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_codec.h"
#include "kvt_daemon.h"
#include "kvt_seq.h"
#include "kvt_test.h"
#include "kvtier_client.h"

/* Wire Scheme (kvtier.proto) -> kernels' enum kvt_scheme. */
static inline uint32_t it_scheme_to_kernel(uint32_t wire)
{
	return wire - 1; /* NONE 1 -> 0, KIVI 2 -> 1, HADAMARD 3 -> 2, OSCAR 4 -> 3 */
}

/* The local codec config equal to a session's effective one (SessionInfo has every field). */
static inline void it_config_from_info(const struct kvt_client_session_info *i,
				       struct kvt_codec_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->scheme = it_scheme_to_kernel(i->codec.scheme);
	cfg->key_bits = i->codec.key_bits;
	cfg->value_bits = i->codec.value_bits;
	cfg->group = i->codec.group;
	cfg->chunk_tokens = i->codec.chunk_tokens;
	cfg->n_layers = i->n_layers;
	cfg->n_kv_heads = i->n_kv_heads;
	cfg->head_dim = i->head_dim;
	cfg->dtype = i->dtype;
	cfg->rotate_v = i->codec.rotate_v > 0;
	cfg->n_sinks = i->codec.n_sinks > 0 ? (uint32_t)i->codec.n_sinks : 0;
	cfg->pin_detect_max = i->codec.pin_detect_max > 0 ? (uint32_t)i->codec.pin_detect_max : 0;
	cfg->pin_detect_ratio = i->codec.pin_detect_ratio > 0 ? i->codec.pin_detect_ratio : 0;
	cfg->recent_exact_tokens =
		i->codec.recent_exact_tokens > 0 ? (uint32_t)i->codec.recent_exact_tokens : 0;
	int kr = kvt_rounding_parse(i->codec.key_rounding);
	cfg->key_rounding = kr > 0 ? (uint32_t)kr : 0;
}

static inline struct kvt_client_shape it_shape(const struct kvt_client_session_info *i)
{
	struct kvt_client_shape s = { i->n_layers, i->n_kv_heads, i->head_dim, i->dtype };
	return s;
}

/* Test data comes from a per-thread splitmix64 stream so threads never share RNG state;
 * it_seed() derives each thread's stream from the printed test seed. */
static _Thread_local uint64_t it_rng;
static inline void it_seed(uint64_t stream)
{
	it_rng = kvt_test_seed ^ (stream * 0x9e3779b97f4a7c15ull);
}
static inline uint64_t it_rand_u64(void)
{
	uint64_t z = (it_rng += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}
static inline uint32_t it_rand_below(uint32_t n) { return (uint32_t)(it_rand_u64() % n); }
static inline float it_rand_normal(void)
{
	float u1 = (float)((it_rand_u64() >> 40) * 0x1p-24), u2 = (float)((it_rand_u64() >> 40) * 0x1p-24);
	if (u1 < 1e-12f)
		u1 = 1e-12f;
	return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/*
 * n tokens of TNI-like K and V ([L][n][H][d] in dtype) for session positions pos0..: keys
 * have a few outlier channels (x6) and tokens 0 and 1 of the session are low-norm sinks
 * (keys x0.15, values x0.05), like the attention sinks of a real model.
 */
static inline void it_gen_kv(uint32_t L, uint32_t H, uint32_t d, uint32_t dtype, uint64_t pos0,
			     uint32_t n, void *k, void *v)
{
	size_t row = (size_t)H * d, total = (size_t)L * n * row;
	float *kf = malloc(total * sizeof(float)), *vf = malloc(total * sizeof(float));
	if (!kf || !vf)
		abort();
	for (uint32_t l = 0; l < L; l++)
		for (uint32_t t = 0; t < n; t++) {
			uint64_t pos = pos0 + t;
			float ks = pos < 2 ? 0.15f : 1.0f, vs = pos < 2 ? 0.05f : 1.0f;
			float *kr = kf + ((size_t)l * n + t) * row, *vr = vf + ((size_t)l * n + t) * row;
			for (size_t j = 0; j < row; j++) {
				uint32_t ch = (uint32_t)(j % d);
				float out = (ch % 29 == 3) ? 6.0f : 1.0f; /* outlier channels */
				kr[j] = ks * out * (1.5f * it_rand_normal() + 0.3f);
				vr[j] = vs * it_rand_normal();
			}
		}
	kvt_convert(kf, KVT_DTYPE_F32, k, dtype, total);
	kvt_convert(vf, KVT_DTYPE_F32, v, dtype, total);
	free(kf);
	free(vf);
}

/* One of the daemon's Stats counters (UINT64_MAX when Stats fails). */
static inline uint64_t it_counter(struct kvt_client *c, const char *name)
{
	struct kvt_client_stats s;
	struct kvt_client_status st;
	if (kvt_client_stats(c, &s, &st))
		return UINT64_MAX;
	uint64_t v = kvt_client_stats_counter(&s, name);
	kvt_client_stats_free(&s);
	return v;
}

/* A tier's used bytes from Stats (UINT64_MAX when Stats fails or the daemon has no such
 * tier); *capacity (may be NULL) gets its capacity. */
static inline uint64_t it_tier_used(struct kvt_client *c, const char *tier, uint64_t *capacity)
{
	struct kvt_client_stats s;
	struct kvt_client_status st;
	uint64_t u = UINT64_MAX;
	if (kvt_client_stats(c, &s, &st))
		return u;
	for (size_t i = 0; i < s.n_tiers; i++)
		if (!strcmp(s.tiers[i].name, tier)) {
			u = s.tiers[i].used_bytes;
			if (capacity)
				*capacity = s.tiers[i].capacity_bytes;
		}
	kvt_client_stats_free(&s);
	return u;
}

static inline void *it_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		abort();
	return p;
}

/* Fetches [t0, t1) x [l0, l1) of a session in dtype through libkvtier with range.decode_local
 * = mode (enum kvt_client_fetch_mode: the client's default, local decode or the daemon's
 * Fetch) and from the local reference and compares bytes. Returns 1 when equal. */
static inline int it_fetch_equals_mode(struct kvt_client *c, const char *id,
				       const struct kvt_seq *ref, uint64_t t0, uint64_t t1,
				       uint32_t l0, uint32_t l1, uint32_t dtype, int mode)
{
	const char *how = mode == KVT_CLIENT_FETCH_LOCAL	? " (local)"
			  : mode == KVT_CLIENT_FETCH_SERVER ? " (server)"
							    : " (default)";
	const struct kvt_codec_config *cfg = kvt_seq_config(ref);
	size_t n = (size_t)(t1 - t0) * (l1 - l0) * cfg->n_kv_heads * cfg->head_dim *
		   kvt_dtype_size(dtype);
	uint8_t *k = it_xmalloc(n), *v = it_xmalloc(n), *rk = it_xmalloc(n), *rv = it_xmalloc(n);
	struct kvt_client_fetch_range r;
	struct kvt_client_status st;
	char err[256] = "";
	int ok = 1, rc;

	kvt_client_fetch_range_init(&r);
	r.token_begin = t0;
	r.token_end = t1;
	r.layer_begin = l0;
	r.layer_end = l1;
	r.dtype = dtype;
	r.decode_local = mode;
	rc = kvt_client_fetch(c, id, &r, k, n, v, n, NULL, &st);
	if (rc) {
		printf("# fetch%s %s [%llu,%llu) x [%u,%u): %d %s: %s\n", how,
		       id, (unsigned long long)t0, (unsigned long long)t1, l0, l1, rc,
		       kvt_client_code_name(st.code), st.message);
		ok = 0;
		goto out;
	}
	rc = kvt_seq_fetch(ref, t0, t1, l0, l1, dtype, rk, rv, err, sizeof(err));
	if (rc) {
		printf("# local kvt_seq_fetch: %d %s\n", rc, err);
		ok = 0;
		goto out;
	}
	if (memcmp(k, rk, n) || memcmp(v, rv, n)) {
		size_t i = 0;
		while (i < n && k[i] == rk[i] && v[i] == rv[i])
			i++;
		printf("# fetch%s %s [%llu,%llu) x [%u,%u) dtype %u differs from the local reference at byte %zu of %zu\n",
		       how, id, (unsigned long long)t0, (unsigned long long)t1,
		       l0, l1, dtype, i, n);
		ok = 0;
	}
out:
	free(k);
	free(v);
	free(rk);
	free(rv);
	return ok;
}

static inline int it_fetch_equals(struct kvt_client *c, const char *id, const struct kvt_seq *ref,
				  uint64_t t0, uint64_t t1, uint32_t l0, uint32_t l1, uint32_t dtype)
{
	/* both paths: the default (local decode unless the environment says server) and the
	 * daemon's Fetch */
	int a = it_fetch_equals_mode(c, id, ref, t0, t1, l0, l1, dtype, KVT_CLIENT_FETCH_DEFAULT);
	int b = it_fetch_equals_mode(c, id, ref, t0, t1, l0, l1, dtype, KVT_CLIENT_FETCH_SERVER);
	return a && b;
}

/* Attention outputs equal up to float summation order: |a-b| <= 1e-4 * (1 + max|b|). */
static inline int it_close(const float *a, const float *b, size_t n, float *max_err)
{
	float m = 0, e = 0;
	for (size_t i = 0; i < n; i++) {
		if (fabsf(b[i]) > m)
			m = fabsf(b[i]);
		if (!(fabsf(a[i] - b[i]) <= e))
			e = isnan(a[i]) ? INFINITY : fabsf(a[i] - b[i]);
	}
	if (max_err)
		*max_err = e;
	return e <= 1e-4f * (1.0f + m);
}

/* Stat fields that a rejected request must leave untouched. */
static inline int it_same_state(const struct kvt_client_session_info *a,
				const struct kvt_client_session_info *b)
{
	return a->n_tokens == b->n_tokens && a->n_chunks == b->n_chunks &&
	       a->tail_tokens == b->tail_tokens && a->bytes_held == b->bytes_held &&
	       a->n_layers == b->n_layers && a->head_dim == b->head_dim &&
	       a->n_kv_heads == b->n_kv_heads && a->dtype == b->dtype &&
	       a->pinned == b->pinned && a->ttl_seconds == b->ttl_seconds &&
	       a->codec.scheme == b->codec.scheme && a->codec.chunk_tokens == b->codec.chunk_tokens;
}

#endif

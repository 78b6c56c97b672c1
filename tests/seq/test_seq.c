/*
 * test_seq.c - the sealing state machine (kernels/kvt_seq.h) against references built from
 * the codec's own encode/decode (OSCAR.md section 7 item 6, plus fork, truncate, allocation
 * failure, StoreEncoded and error paths).
 *
 * Every scheme is covered (oscar with sinks, kivi, hadamard, none; f16 wire dtype, plus oscar
 * on bf16 and none on f32); KVT_SEQ_SCHEMES=oscar,none-f32 narrows the list when debugging.
 * A "+bBwW" suffix sets chunk_tokens B and a recent window recent_exact_tokens W
 * ("oscar+b32w100"): every test then runs with the windowed sealing rule, and test_window
 * checks its bounds at every append size, fork / truncate / savepoint with a window, and that
 * Fetch of the window returns the input bit for bit.
 */
#include "kvt_seq.h"
#include "kvt_test.h"

#include <errno.h>
#include <pthread.h>

#define NL 2
#define NH 2
#define HD 64
#define NQ 4            /* query heads: GQA group of 2 */
#define MAX_TOK 700
#define ERRLEN 256

static struct kvt_codec_config g_cfg;
static uint16_t *g_k, *g_v; /* source tokens, [NL][MAX_TOK][NH][HD] f16 */
static char g_err[ERRLEN];

/* ---- a counting allocator that can refuse the n-th request ------------------------------ */

#define MAX_LIVE 4096
struct counting {
	long calls;
	long fail_at;           /* refuse the call with this index (-1: never) */
	size_t live_bytes;
	void *ptr[MAX_LIVE];
	size_t size[MAX_LIVE];
	int size_mismatch;
};

static void *c_alloc(void *ctx, size_t bytes)
{
	struct counting *c = ctx;
	long idx = c->calls++;

	if (idx == c->fail_at)
		return NULL;
	for (int i = 0; i < MAX_LIVE; i++) {
		if (!c->ptr[i]) {
			c->ptr[i] = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
			c->size[i] = bytes;
			c->live_bytes += bytes;
			return c->ptr[i];
		}
	}
	return NULL;
}

static void c_free(void *ctx, void *p, size_t bytes)
{
	struct counting *c = ctx;

	for (int i = 0; i < MAX_LIVE; i++) {
		if (c->ptr[i] == p) {
			if (c->size[i] != bytes)
				c->size_mismatch++;
			c->live_bytes -= c->size[i];
			c->ptr[i] = NULL;
			free(p);
			return;
		}
	}
	c->size_mismatch++;
}

static struct kvt_seq_alloc counting_hooks(struct counting *c)
{
	memset(c, 0, sizeof(*c));
	c->fail_at = -1;
	return (struct kvt_seq_alloc){ c_alloc, c_free, c };
}

/* ---- data helpers --------------------------------------------------------------------------- */

static void fill_source(void)
{
	for (size_t l = 0; l < NL; l++)
		for (size_t t = 0; t < MAX_TOK; t++)
			for (size_t i = 0; i < NH * HD; i++) {
				size_t at = (l * MAX_TOK + t) * NH * HD + i;
				/* channel 3 of each head an outlier, like real keys */
				float o = (i % HD) == 3 ? 6.0f : 0.0f;
				g_k[at] = kvt_f32_to_f16(kvt_rand_normal() + o);
				g_v[at] = kvt_f32_to_f16(kvt_rand_normal());
			}
}

static size_t ws(void)
{
	return kvt_dtype_size(g_cfg.dtype);
}

/* Most tokens the exact tail may hold: W with a window, else B - 1. */
static uint32_t tail_max(void)
{
	return g_cfg.recent_exact_tokens ? g_cfg.recent_exact_tokens : g_cfg.chunk_tokens - 1;
}

/* Chunks sealed once appends (of any sizes) bring a session to T tokens: the fewest whole
 * chunks that leave at most tail_max() unsealed (T / B without a window). */
static uint32_t chunks_for(uint64_t T)
{
	const uint32_t B = g_cfg.chunk_tokens, W = tail_max();

	return T <= W ? 0 : (uint32_t)((T - W + B - 1) / B);
}

/* Chunks a fork or truncate to n tokens keeps: whole chunks of the prefix when n falls inside
 * the sealed part, else every chunk (the rest comes from the exact tail). */
static uint32_t chunks_kept(const struct kvt_seq *src, uint64_t n)
{
	const uint32_t B = g_cfg.chunk_tokens;

	return n > (uint64_t)kvt_seq_n_chunks(src) * B ? kvt_seq_n_chunks(src) : (uint32_t)(n / B);
}

/* Tokens [t0, t0+n) of the source as a dense [NL][n][NH][HD] tensor in the configuration's
 * wire dtype (caller frees). */
static void *gather(const uint16_t *src, size_t t0, size_t n)
{
	uint8_t *o = malloc((n ? n : 1) * NL * NH * HD * ws());

	for (size_t l = 0; l < NL; l++)
		kvt_convert(src + (l * MAX_TOK + t0) * NH * HD, KVT_DTYPE_F16,
			    o + l * n * NH * HD * ws(), g_cfg.dtype, n * NH * HD);
	return o;
}

static int append_src(struct kvt_seq *s, size_t t0, size_t n)
{
	void *k = gather(g_k, t0, n), *v = gather(g_v, t0, n);
	int rc = kvt_seq_append(s, k, v, (uint32_t)n, g_err, ERRLEN);

	free(k);
	free(v);
	return rc;
}

static struct kvt_seq *make_seq(size_t tokens, const struct kvt_seq_alloc *a)
{
	struct kvt_seq *s = NULL;

	if (kvt_seq_create(&g_cfg, a, &s, g_err, ERRLEN) < 0)
		return NULL;
	if (tokens && append_src(s, 0, tokens) < 0) {
		kvt_seq_destroy(s);
		return NULL;
	}
	return s;
}

/* Reference contents of a sequence: every chunk decoded whole + the exact tail, in out_dtype,
 * [NL][tokens][NH][HD]. */
static void *reference_all(const struct kvt_seq *s, uint32_t dtype, int want_v)
{
	const uint32_t B = g_cfg.chunk_tokens;
	uint64_t T = kvt_seq_tokens(s);
	size_t es = kvt_dtype_size(dtype), tok = NH * HD * es;
	uint8_t *out = malloc((T ? T : 1) * NL * tok), *tmp = malloc((size_t)B * NL * tok);

	for (uint32_t c = 0; c < kvt_seq_n_chunks(s); c++) {
		int rc = kvt_decode_chunk(kvt_seq_chunk(s, c)->bytes, 0, B, 0, NL, dtype,
					  want_v ? NULL : tmp, want_v ? tmp : NULL, g_err, ERRLEN);
		KVT_CHECK(rc == 0, "decode chunk %u: %s", c, g_err);
		for (size_t l = 0; l < NL; l++)
			memcpy(out + (l * T + (size_t)c * B) * tok, tmp + l * B * tok, B * tok);
	}
	for (size_t l = 0; l < NL; l++) {
		const void *t = want_v ? kvt_seq_tail_v(s, (uint32_t)l) : kvt_seq_tail_k(s, (uint32_t)l);

		if (kvt_seq_tail_tokens(s))
			kvt_convert(t, g_cfg.dtype, out + (l * T + (size_t)kvt_seq_n_chunks(s) * B) * tok,
				    dtype, (size_t)kvt_seq_tail_tokens(s) * NH * HD);
	}
	free(tmp);
	return out;
}

/* Naive f32 attention of one layer over reference K and V [T][NH][HD]. */
static void naive_attend(const float *K, const float *V, size_t T, const float *q, float scale,
			 float *out)
{
	double *p = malloc(T * sizeof(double));

	for (size_t i = 0; i < NQ; i++) {
		size_t kh = i / (NQ / NH);
		double mx = -INFINITY, sum = 0;

		for (size_t t = 0; t < T; t++) {
			double s = 0;

			for (size_t j = 0; j < HD; j++)
				s += (double)q[i * HD + j] * K[(t * NH + kh) * HD + j];
			p[t] = s * scale;
			if (p[t] > mx)
				mx = p[t];
		}
		for (size_t t = 0; t < T; t++) {
			p[t] = exp(p[t] - mx);
			sum += p[t];
		}
		for (size_t j = 0; j < HD; j++) {
			double o = 0;

			for (size_t t = 0; t < T; t++)
				o += p[t] * V[(t * NH + kh) * HD + j];
			out[i * HD + j] = (float)(o / sum);
		}
	}
	free(p);
}

/* kvt_seq_attend equals naive attention over (chunks decoded + exact tail), every layer. */
static void check_attend(const struct kvt_seq *s, const char *what)
{
	uint64_t T = kvt_seq_tokens(s);
	float *K = reference_all(s, KVT_DTYPE_F32, 0), *V = reference_all(s, KVT_DTYPE_F32, 1);
	float q[NQ * HD], got[NQ * HD], ref[NQ * HD], scale = 1.0f / sqrtf(HD);

	for (uint32_t l = 0; l < NL; l++) {
		double worst = 0;

		for (size_t i = 0; i < NQ * HD; i++)
			q[i] = kvt_rand_normal();
		int rc = kvt_seq_attend(s, l, NQ, scale, q, got, g_err, ERRLEN);
		KVT_CHECK(rc == 0, "%s: attend layer %u rc %d: %s", what, l, rc, g_err);
		naive_attend(K + (size_t)l * T * NH * HD, V + (size_t)l * T * NH * HD, T, q, scale,
			     ref);
		for (size_t i = 0; i < NQ * HD; i++) {
			double e = fabs((double)got[i] - ref[i]) / (1.0 + fabs(ref[i]));

			if (e > worst)
				worst = e;
		}
		KVT_CHECK(worst <= 1e-4, "%s: layer %u tokens %" PRIu64 " attention differs from "
			  "the reference by %.3g", what, l, T, worst);
	}
	free(K);
	free(V);
}

/* ---- configurations --------------------------------------------------------------------- */

/* "oscar", "kivi", ... optionally with a wire dtype: "oscar-bf16", "none-f32". */
static int select_config(const char *spec)
{
	char name[32], *dash, *plus;
	int scheme, dtype = KVT_DTYPE_F16;
	unsigned wb = 0, ww = 0;

	snprintf(name, sizeof(name), "%s", spec);
	plus = strchr(name, '+');
	if (plus) {
		KVT_CHECK(sscanf(plus + 1, "b%uw%u", &wb, &ww) == 2, "bad suffix in '%s'", spec);
		*plus = 0;
	}
	dash = strchr(name, '-');
	if (dash) {
		*dash = 0;
		dtype = kvt_dtype_parse(dash + 1);
	}
	scheme = kvt_scheme_parse(name);
	KVT_CHECK(scheme >= 0 && dtype > 0, "unknown configuration '%s'", spec);
	if (scheme < 0 || dtype <= 0)
		return -1;
	kvt_codec_config_default(&g_cfg, NL, NH, HD, (uint32_t)dtype);
	g_cfg.scheme = (uint32_t)scheme;
	if (scheme == KVT_SCHEME_NONE) {
		g_cfg.key_bits = g_cfg.value_bits = 0;
		g_cfg.rotate_v = 0;
		g_cfg.n_sinks = 0;
	} else if (scheme == KVT_SCHEME_KIVI) {
		g_cfg.key_bits = g_cfg.value_bits = 4;
		g_cfg.rotate_v = 0;
		g_cfg.n_sinks = 0;
	} else if (scheme == KVT_SCHEME_HADAMARD) {
		g_cfg.n_sinks = 2;
		g_cfg.group = 64;
	}
	if (plus) {
		g_cfg.chunk_tokens = wb;
		if (g_cfg.group > wb)
			g_cfg.group = wb;
		g_cfg.recent_exact_tokens = ww;
	}
	int rc = kvt_codec_config_validate(&g_cfg, g_err, ERRLEN);
	KVT_CHECK(rc == 0, "config %s invalid: %s", spec, g_err);
	return rc;
}

/* ---- tests --------------------------------------------------------------------------------- */

/* OSCAR.md 7.6: prefill P then 300 single-token appends. */
static void test_sealing(void)
{
	static const uint32_t prefills[] = { 0, 1, 31, 32, 127, 128, 129, 255, 256, 257 };
	const uint32_t B = g_cfg.chunk_tokens;
	size_t max_bytes = kvt_chunk_max_bytes(&g_cfg);
	uint8_t *enc = malloc(max_bytes);

	for (size_t pi = 0; pi < sizeof(prefills) / sizeof(prefills[0]); pi++) {
		uint32_t P = prefills[pi], sealed_seen = 0;
		const struct kvt_chunk *seen[8] = { 0 };
		uint32_t seen_crc[8] = { 0 };
		struct kvt_seq *s = make_seq(P, NULL);
		char what[64];

		KVT_REQUIRE(s != NULL, "prefill %u: %s", P, g_err);
		for (uint32_t step = 0; step <= 300; step++) {
			uint64_t T = P + step;

			if (step > 0) {
				int rc = append_src(s, T - 1, 1);
				KVT_REQUIRE(rc == 0, "append token %" PRIu64 ": %s", T - 1, g_err);
			}
			snprintf(what, sizeof(what), "prefill %u step %u", P, step);
			KVT_REQUIRE(kvt_seq_tokens(s) == T, "%s: tokens %" PRIu64, what,
				    kvt_seq_tokens(s));
			KVT_CHECK(kvt_seq_tail_tokens(s) <= tail_max(), "%s: tail %u", what,
				  kvt_seq_tail_tokens(s));
			KVT_CHECK(kvt_seq_tail_tokens(s) >= (T < tail_max() - B + 1 ? T : tail_max() - B + 1),
				  "%s: tail %u below the window's floor", what, kvt_seq_tail_tokens(s));
			KVT_CHECK(kvt_seq_n_chunks(s) == chunks_for(T) &&
					  kvt_seq_tail_tokens(s) == T - (uint64_t)chunks_for(T) * B,
				  "%s: %u chunks + %u tail for %" PRIu64 " tokens", what,
				  kvt_seq_n_chunks(s), kvt_seq_tail_tokens(s), T);
			/* A chunk, once sealed, is never replaced or changed. */
			for (uint32_t c = 0; c < sealed_seen && c < 8; c++)
				KVT_CHECK(kvt_seq_chunk(s, c) == seen[c] &&
						  kvt_crc32c(0, seen[c]->bytes, seen[c]->size_bytes) ==
							  seen_crc[c],
					  "%s: chunk %u changed after it was sealed", what, c);
			/* New chunks hold exactly tokens [cB, cB+B): equal to encoding them. */
			for (uint32_t c = sealed_seen; c < kvt_seq_n_chunks(s) && c < 8; c++) {
				const struct kvt_chunk *ch = kvt_seq_chunk(s, c);
				struct kvt_chunk_header h;
				void *k = gather(g_k, (size_t)c * B, B), *v = gather(g_v, (size_t)c * B, B);
				int64_t n = kvt_encode_chunk(&g_cfg, (uint64_t)c * B, k, v, enc,
							     max_bytes, g_err, ERRLEN);

				KVT_CHECK(kvt_chunk_parse(ch->bytes, ch->size_bytes, NULL, &h, g_err,
							  ERRLEN) == 0, "%s: chunk %u parse: %s", what, c, g_err);
				KVT_CHECK(h.first_token == (uint64_t)c * B,
					  "%s: chunk %u first_token %" PRIu64, what, c,
					  (uint64_t)h.first_token);
				KVT_CHECK(n == (int64_t)ch->size_bytes &&
						  memcmp(enc, ch->bytes, ch->size_bytes) == 0,
					  "%s: chunk %u is not the encoding of tokens [%u, %u)", what, c,
					  c * B, (c + 1) * B);
				KVT_CHECK(((uintptr_t)ch->bytes & 63) == 0, "chunk bytes unaligned");
				KVT_CHECK(kvt_chunk_refcount(ch) == 1, "%s: refcount %u", what,
					  kvt_chunk_refcount(ch));
				seen[c] = ch;
				seen_crc[c] = kvt_crc32c(0, ch->bytes, ch->size_bytes);
				free(k);
				free(v);
			}
			sealed_seen = kvt_seq_n_chunks(s);
			/* The tail holds the newest tokens exactly. */
			if (kvt_seq_tail_tokens(s)) {
				size_t nt = kvt_seq_tail_tokens(s), n = nt * NH * HD * ws();
				uint8_t *k = gather(g_k, (size_t)kvt_seq_n_chunks(s) * B, nt);
				uint8_t *v = gather(g_v, (size_t)kvt_seq_n_chunks(s) * B, nt);

				for (uint32_t l = 0; l < NL; l++)
					KVT_CHECK(memcmp(kvt_seq_tail_k(s, l), k + l * n, n) == 0 &&
							  memcmp(kvt_seq_tail_v(s, l), v + l * n, n) == 0,
						  "%s: tail of layer %u is not the exact input", what, l);
				free(k);
				free(v);
			}
			if (T > 0)
				check_attend(s, what);
		}
		kvt_seq_destroy(s);
	}
	free(enc);
}

static void test_fetch_ranges(void)
{
	static const uint32_t sizes[] = { 300, 256, 77 };

	for (size_t si = 0; si < 3; si++) {
		struct kvt_seq *s = make_seq(sizes[si], NULL);
		uint64_t T = sizes[si];

		KVT_REQUIRE(s != NULL, "make: %s", g_err);
		for (uint32_t dt = KVT_DTYPE_F16; dt <= KVT_DTYPE_F32; dt++) {
			uint8_t *rk = reference_all(s, dt, 0), *rv = reference_all(s, dt, 1);
			size_t tok = NH * HD * kvt_dtype_size(dt);

			for (int it = 0; it < 150; it++) {
				uint64_t t0 = kvt_rand_below((uint32_t)T + 1);
				uint64_t t1 = t0 + kvt_rand_below((uint32_t)(T - t0) + 1);
				uint32_t l0 = kvt_rand_below(NL), l1 = l0 + 1 + kvt_rand_below(NL - l0);
				size_t nt = t1 - t0, nb = (nt ? nt : 1) * (l1 - l0) * tok;
				uint8_t *k = malloc(nb), *v = malloc(nb);
				int ok = 1;
				int rc = kvt_seq_fetch(s, t0, t1, l0, l1, dt, k, v, g_err, ERRLEN);

				KVT_CHECK(rc == 0, "fetch [%" PRIu64 ",%" PRIu64 ") rc %d: %s", t0, t1,
					  rc, g_err);
				for (uint32_t l = l0; l < l1 && rc == 0; l++) {
					size_t o = (size_t)(l - l0) * nt * tok, r = ((size_t)l * T + t0) * tok;

					ok &= memcmp(k + o, rk + r, nt * tok) == 0;
					ok &= memcmp(v + o, rv + r, nt * tok) == 0;
				}
				KVT_CHECK(ok, "fetch T %" PRIu64 " [%" PRIu64 ",%" PRIu64 ") layers "
					  "[%u,%u) %s differs from chunk decodes + tail", T, t0, t1, l0,
					  l1, kvt_dtype_name(dt));
				/* One side only. */
				rc = kvt_seq_fetch(s, t0, t1, l0, l1, dt, NULL, v, g_err, ERRLEN);
				KVT_CHECK(rc == 0, "fetch v only: %s", g_err);
				free(k);
				free(v);
			}
			free(rk);
			free(rv);
		}
		kvt_seq_destroy(s);
	}
}

/* Fetch of [0, n) of both sequences in the wire dtype must be byte-identical. */
static int same_prefix(const struct kvt_seq *a, const struct kvt_seq *b, uint64_t n)
{
	size_t bytes = (size_t)n * NL * NH * HD * ws();
	uint8_t *ka = calloc(1, bytes + 1), *va = calloc(1, bytes + 1), *kb = calloc(1, bytes + 1),
		*vb = calloc(1, bytes + 1);
	int same = kvt_seq_fetch(a, 0, n, 0, NL, g_cfg.dtype, ka, va, g_err, ERRLEN) == 0 &&
		   kvt_seq_fetch(b, 0, n, 0, NL, g_cfg.dtype, kb, vb, g_err, ERRLEN) == 0 &&
		   memcmp(ka, kb, bytes) == 0 && memcmp(va, vb, bytes) == 0;

	free(ka);
	free(va);
	free(kb);
	free(vb);
	return same;
}

static uint64_t expected_bytes(const struct kvt_seq *s)
{
	uint64_t cap = g_cfg.recent_exact_tokens ? g_cfg.recent_exact_tokens : g_cfg.chunk_tokens;
	uint64_t b = kvt_seq_tail_k(s, 0) ? 2ull * NL * cap * NH * HD * ws() : 0;

	for (uint32_t c = 0; c < kvt_seq_n_chunks(s); c++)
		b += kvt_seq_chunk(s, c)->alloc_bytes;
	return b;
}

static void test_fork(void)
{
	static const uint64_t cuts[] = { 0, 1, 100, 128, 129, 200, 255, 256, 257, 300 };
	const uint32_t B = g_cfg.chunk_tokens;
	struct counting ca;
	struct kvt_seq_alloc hooks = counting_hooks(&ca);
	struct kvt_seq *src = make_seq(300, NULL);

	KVT_REQUIRE(src != NULL, "make: %s", g_err);
	for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
		uint64_t n = cuts[i];
		struct kvt_seq *f = NULL;
		int rc = kvt_seq_fork(src, n, &hooks, &f, g_err, ERRLEN);
		uint32_t fc = chunks_kept(src, n);

		KVT_REQUIRE(rc == 0, "fork %" PRIu64 ": %s", n, g_err);
		KVT_CHECK(kvt_seq_tokens(f) == n && kvt_seq_n_chunks(f) == fc &&
				  kvt_seq_tail_tokens(f) == n - (uint64_t)fc * B,
			  "fork %" PRIu64 ": %" PRIu64 " tokens, %u chunks, %u tail", n,
			  kvt_seq_tokens(f), kvt_seq_n_chunks(f), kvt_seq_tail_tokens(f));
		for (uint32_t c = 0; c < kvt_seq_n_chunks(src); c++) {
			uint32_t want = c < fc ? 2 : 1;

			KVT_CHECK(kvt_chunk_refcount(kvt_seq_chunk(src, c)) == want,
				  "fork %" PRIu64 ": chunk %u refcount %u, want %u", n, c,
				  kvt_chunk_refcount(kvt_seq_chunk(src, c)), want);
			if (c < fc)
				KVT_CHECK(kvt_seq_chunk(f, c) == kvt_seq_chunk(src, c),
					  "fork %" PRIu64 ": chunk %u not shared", n, c);
		}
		KVT_CHECK(same_prefix(src, f, n), "fork %" PRIu64 ": data differs from the source "
			  "prefix", n);
		KVT_CHECK(kvt_seq_bytes(f) == expected_bytes(f), "fork %" PRIu64 ": bytes %" PRIu64
			  " want %" PRIu64, n, kvt_seq_bytes(f), expected_bytes(f));
		if (n > 0)
			check_attend(f, "fork");
		/* The fork grows on its own; the source does not move. */
		KVT_CHECK(append_src(f, 400, 150) == 0, "append to fork: %s", g_err);
		KVT_CHECK(kvt_seq_tokens(f) == n + 150 && kvt_seq_tokens(src) == 300,
			  "fork %" PRIu64 " append: fork %" PRIu64 " src %" PRIu64, n,
			  kvt_seq_tokens(f), kvt_seq_tokens(src));
		KVT_CHECK(kvt_seq_n_chunks(f) == chunks_for(n + 150) &&
				  kvt_seq_tail_tokens(f) <= tail_max(),
			  "fork %" PRIu64 " + 150: %u chunks, %u tail", n, kvt_seq_n_chunks(f),
			  kvt_seq_tail_tokens(f));
		if (kvt_seq_n_chunks(f) > fc) {
			struct kvt_chunk_header h;
			const struct kvt_chunk *c = kvt_seq_chunk(f, fc);

			kvt_chunk_parse(c->bytes, c->size_bytes, NULL, &h, g_err, ERRLEN);
			KVT_CHECK(h.first_token == (uint64_t)fc * B, "fork chunk first_token %" PRIu64,
				  (uint64_t)h.first_token);
		}
		kvt_seq_destroy(f);
		for (uint32_t c = 0; c < kvt_seq_n_chunks(src); c++)
			KVT_CHECK(kvt_chunk_refcount(kvt_seq_chunk(src, c)) == 1,
				  "after fork %" PRIu64 " destroyed: chunk %u refcount %u", n, c,
				  kvt_chunk_refcount(kvt_seq_chunk(src, c)));
		KVT_CHECK(ca.live_bytes == 0, "fork %" PRIu64 ": %zu bytes leaked", n,
			  ca.live_bytes);
	}
	/* The source goes first: the fork's shared chunks stay valid and are freed through the
	 * hooks that made them. */
	{
		struct counting cs;
		struct kvt_seq_alloc sh = counting_hooks(&cs);
		struct kvt_seq *s2 = make_seq(270, &sh), *f = NULL;

		KVT_REQUIRE(s2 != NULL, "make: %s", g_err);
		KVT_REQUIRE(kvt_seq_fork(s2, 260, &hooks, &f, g_err, ERRLEN) == 0, "fork: %s", g_err);
		kvt_seq_destroy(s2);
		KVT_CHECK(cs.live_bytes > 0, "shared chunks freed while the fork holds them");
		KVT_CHECK(kvt_seq_fetch(f, 0, 260, 0, NL, KVT_DTYPE_F32, NULL, NULL, g_err, ERRLEN) ==
				  -EINVAL, "fetch with no outputs should be -EINVAL");
		check_attend(f, "fork outliving its source");
		kvt_seq_destroy(f);
		KVT_CHECK(cs.live_bytes == 0 && ca.live_bytes == 0 && !cs.size_mismatch &&
				  !ca.size_mismatch,
			  "leak: source hooks %zu, fork hooks %zu bytes", cs.live_bytes,
			  ca.live_bytes);
	}
	kvt_seq_destroy(src);
}

static void test_truncate(void)
{
	const uint32_t B = g_cfg.chunk_tokens;
	struct kvt_seq *s = make_seq(300, NULL), *keep = NULL, *ref = NULL;
	static const uint64_t cuts[] = { 299, 290, 256, 200, 129, 128, 50, 0 };

	KVT_REQUIRE(s != NULL, "make: %s", g_err);
	KVT_REQUIRE(kvt_seq_fork(s, 300, NULL, &keep, g_err, ERRLEN) == 0, "fork: %s", g_err);
	KVT_CHECK(kvt_seq_truncate(s, 301, g_err, ERRLEN) == -EINVAL && strstr(g_err, "n_tokens"),
		  "truncate beyond the end: %s", g_err);
	for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
		uint64_t n = cuts[i];
		uint32_t kc = chunks_kept(s, n);

		KVT_REQUIRE(kvt_seq_truncate(s, n, g_err, ERRLEN) == 0, "truncate %" PRIu64 ": %s",
			    n, g_err);
		KVT_CHECK(kvt_seq_tokens(s) == n && kvt_seq_n_chunks(s) == kc &&
				  kvt_seq_tail_tokens(s) == n - (uint64_t)kc * B,
			  "truncate %" PRIu64 ": %u chunks %u tail", n, kvt_seq_n_chunks(s),
			  kvt_seq_tail_tokens(s));
		KVT_CHECK(same_prefix(s, keep, n), "truncate %" PRIu64 ": data differs", n);
		for (uint32_t c = 0; c < kvt_seq_n_chunks(keep); c++)
			KVT_CHECK(kvt_chunk_refcount(kvt_seq_chunk(keep, c)) == (c < kc ? 2u : 1u),
				  "truncate %" PRIu64 ": chunk %u refcount %u", n, c,
				  kvt_chunk_refcount(kvt_seq_chunk(keep, c)));
		KVT_CHECK(kvt_seq_bytes(s) == expected_bytes(s), "truncate bytes");
	}
	/* Grows again after a cut; tokens keep their positions. */
	KVT_CHECK(append_src(s, 0, 200) == 0, "append after truncate: %s", g_err);
	KVT_REQUIRE(kvt_seq_create(&g_cfg, NULL, &ref, g_err, ERRLEN) == 0, "create: %s", g_err);
	KVT_CHECK(append_src(ref, 0, 200) == 0, "append: %s", g_err);
	KVT_CHECK(same_prefix(s, ref, 200), "truncate to 0 then append differs from a fresh seq");
	/* Truncating into a chunk of a sequence that has no tail buffer yet (StoreEncoded). */
	{
		struct kvt_seq *st = NULL;
		const struct kvt_chunk *c0 = kvt_seq_chunk(keep, 0);

		KVT_REQUIRE(kvt_seq_create(&g_cfg, NULL, &st, g_err, ERRLEN) == 0, "create");
		KVT_CHECK(kvt_seq_append_chunk(st, c0->bytes, c0->size_bytes, g_err, ERRLEN) == 0,
			  "append_chunk: %s", g_err);
		KVT_CHECK(kvt_seq_tail_k(st, 0) == NULL, "no tail buffer expected");
		uint64_t cut = B > 75 ? 70 : B / 2 + 3;

		KVT_CHECK(kvt_seq_truncate(st, cut, g_err, ERRLEN) == 0, "truncate: %s", g_err);
		KVT_CHECK(same_prefix(st, keep, cut), "truncate of a stored chunk differs");
		kvt_seq_destroy(st);
	}
	kvt_seq_destroy(ref);
	kvt_seq_destroy(keep);
	kvt_seq_destroy(s);
}

/* State a failed call must not change. */
struct snapshot {
	uint64_t tokens, bytes;
	uint32_t n_chunks, tail;
	const struct kvt_chunk *chunks[8];
	uint32_t tail_crc;
	size_t live;
};

static void snap(const struct kvt_seq *s, const struct counting *c, struct snapshot *o)
{
	memset(o, 0, sizeof(*o));
	o->tokens = kvt_seq_tokens(s);
	o->bytes = kvt_seq_bytes(s);
	o->n_chunks = kvt_seq_n_chunks(s);
	o->tail = kvt_seq_tail_tokens(s);
	for (uint32_t i = 0; i < o->n_chunks && i < 8; i++)
		o->chunks[i] = kvt_seq_chunk(s, i);
	for (uint32_t l = 0; l < NL && o->tail; l++) {
		o->tail_crc = kvt_crc32c(o->tail_crc, kvt_seq_tail_k(s, l), (size_t)o->tail * NH * HD * ws());
		o->tail_crc = kvt_crc32c(o->tail_crc, kvt_seq_tail_v(s, l), (size_t)o->tail * NH * HD * ws());
	}
	o->live = c->live_bytes;
}

static int same_snap(const struct snapshot *a, const struct snapshot *b)
{
	return memcmp(a, b, sizeof(*a)) == 0;
}

static void test_alloc_refusal(void)
{
	struct counting ca;
	struct kvt_seq_alloc hooks = counting_hooks(&ca);
	struct snapshot before, after;
	static const uint32_t prefills[] = { 0, 50 };
	static const uint32_t adds[] = { 1, 100, 300 };
	int refusals = 0;

	for (size_t pi = 0; pi < 2; pi++) {
		for (size_t ai = 0; ai < 3; ai++) {
			for (long k = 0;; k++) {
				struct kvt_seq *s = NULL;
				int rc;

				ca.fail_at = -1;
				KVT_REQUIRE(kvt_seq_create(&g_cfg, &hooks, &s, g_err, ERRLEN) == 0, "create");
				if (prefills[pi])
					KVT_REQUIRE(append_src(s, 0, prefills[pi]) == 0, "prefill: %s", g_err);
				snap(s, &ca, &before);
				ca.fail_at = ca.calls + k;
				g_err[0] = 0;
				rc = append_src(s, prefills[pi], adds[ai]);
				ca.fail_at = -1;
				if (rc == 0) {
					KVT_CHECK(kvt_seq_tokens(s) == prefills[pi] + adds[ai], "tokens");
					kvt_seq_destroy(s);
					break;
				}
				refusals++;
				snap(s, &ca, &after);
				KVT_CHECK(rc == -ENOMEM, "append refused at alloc %ld: rc %d", k, rc);
				KVT_CHECK(same_snap(&before, &after),
					  "append %u+%u refused at alloc %ld changed the sequence",
					  prefills[pi], adds[ai], k);
				KVT_CHECK(strstr(g_err, "allocator refused") != NULL, "message: '%s'", g_err);
				/* A later identical call succeeds and is right. */
				KVT_CHECK(append_src(s, prefills[pi], adds[ai]) == 0, "retry: %s", g_err);
				check_attend(s, "after refusal and retry");
				kvt_seq_destroy(s);
				KVT_REQUIRE(k < 50, "never succeeded");
			}
		}
	}
	KVT_CHECK(ca.live_bytes == 0, "%zu bytes leaked after appends", ca.live_bytes);

	/* Fork, StoreEncoded and truncate into a chunk under refusal. */
	{
		struct kvt_seq *src = make_seq(300, NULL), *f = NULL, *st = NULL;
		const struct kvt_chunk *c0;

		KVT_REQUIRE(src != NULL, "make: %s", g_err);
		c0 = kvt_seq_chunk(src, 0);
		for (long k = 0; k < 10; k++) {
			ca.fail_at = ca.calls + k;
			int rc = kvt_seq_fork(src, 200, &hooks, &f, g_err, ERRLEN);
			ca.fail_at = -1;
			if (rc == 0) {
				kvt_seq_destroy(f);
				break;
			}
			refusals++;
			KVT_CHECK(rc == -ENOMEM && f == NULL, "fork refusal rc %d", rc);
			KVT_CHECK(kvt_chunk_refcount(c0) == 1, "fork refusal leaked a reference");
		}
		KVT_REQUIRE(kvt_seq_create(&g_cfg, &hooks, &st, g_err, ERRLEN) == 0, "create");
		for (long k = 0; k < 10; k++) {
			snap(st, &ca, &before);
			ca.fail_at = ca.calls + k;
			int rc = kvt_seq_append_chunk(st, c0->bytes, c0->size_bytes, g_err, ERRLEN);
			ca.fail_at = -1;
			if (rc == 0)
				break;
			refusals++;
			snap(st, &ca, &after);
			KVT_CHECK(rc == -ENOMEM && same_snap(&before, &after),
				  "append_chunk refusal rc %d changed the sequence", rc);
		}
		for (long k = 0; k < 10; k++) {
			snap(st, &ca, &before);
			ca.fail_at = ca.calls + k;
			int rc = kvt_seq_truncate(st, 10, g_err, ERRLEN);
			ca.fail_at = -1;
			if (rc == 0)
				break;
			refusals++;
			snap(st, &ca, &after);
			KVT_CHECK(rc == -ENOMEM && same_snap(&before, &after),
				  "truncate refusal rc %d changed the sequence", rc);
		}
		KVT_CHECK(kvt_seq_tokens(st) == 10, "truncate after refusals");
		kvt_seq_destroy(st);
		kvt_seq_destroy(src);
		ca.fail_at = ca.calls;
		KVT_CHECK(kvt_seq_create(&g_cfg, &hooks, &st, g_err, ERRLEN) == -ENOMEM && !st,
			  "create under refusal");
		ca.fail_at = -1;
	}
	KVT_CHECK(refusals >= 8, "only %d refusals exercised", refusals);
	KVT_CHECK(ca.live_bytes == 0 && !ca.size_mismatch, "%zu bytes leaked, %d size mismatches",
		  ca.live_bytes, ca.size_mismatch);
}

static void test_append_chunk(void)
{
	const uint32_t B = g_cfg.chunk_tokens;
	struct kvt_seq *a = make_seq(300, NULL), *b = NULL, *other = NULL;
	const struct kvt_chunk *c0, *c1;
	struct kvt_codec_config oc;
	uint8_t *bad;

	KVT_REQUIRE(a != NULL, "make: %s", g_err);
	c0 = kvt_seq_chunk(a, 0);
	c1 = kvt_seq_chunk(a, 1);
	KVT_REQUIRE(kvt_seq_create(&g_cfg, NULL, &b, g_err, ERRLEN) == 0, "create: %s", g_err);
	KVT_CHECK(kvt_seq_append_chunk(b, c1->bytes, c1->size_bytes, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "first_token"),
		  "out-of-order chunk: %s", g_err);
	KVT_CHECK(kvt_seq_append_chunk(b, c0->bytes, c0->size_bytes - 1, g_err, ERRLEN) < 0,
		  "short chunk accepted");
	bad = malloc(c0->size_bytes);
	memcpy(bad, c0->bytes, c0->size_bytes);
	bad[c0->size_bytes - 7] ^= 0x40;
	KVT_CHECK(kvt_seq_append_chunk(b, bad, c0->size_bytes, g_err, ERRLEN) == -EBADMSG,
		  "corrupt chunk: %s", g_err);
	free(bad);
	KVT_CHECK(kvt_seq_tokens(b) == 0, "rejected chunks changed the sequence");
	KVT_CHECK(kvt_seq_append_chunk(b, c0->bytes, c0->size_bytes, g_err, ERRLEN) == 0,
		  "store chunk 0: %s", g_err);
	KVT_CHECK(kvt_seq_append_chunk(b, c1->bytes, c1->size_bytes, g_err, ERRLEN) == 0,
		  "store chunk 1: %s", g_err);
	KVT_CHECK(kvt_seq_tokens(b) == 2ull * B && kvt_chunk_refcount(c0) == 1,
		  "stored: %" PRIu64 " tokens", kvt_seq_tokens(b));
	KVT_CHECK(kvt_seq_chunk(b, 0) != c0 && memcmp(kvt_seq_chunk(b, 0)->bytes, c0->bytes,
						       c0->size_bytes) == 0, "stored bytes differ");
	KVT_CHECK(same_prefix(a, b, 2ull * B), "fetch of stored chunks differs");
	KVT_CHECK(append_src(b, 2ull * B, 300 - 2ull * B) == 0, "append: %s", g_err);
	KVT_CHECK(same_prefix(a, b, 300), "fetch after appending to stored chunks differs");
	check_attend(b, "stored chunks + tail");
	KVT_CHECK(kvt_seq_append_chunk(b, c0->bytes, c0->size_bytes, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "tail"),
		  "store with a tail: %s", g_err);
	/* A chunk of another configuration is refused, naming the field. */
	oc = g_cfg;
	oc.n_sinks = g_cfg.n_sinks ? 0 : 1;
	if (oc.scheme == KVT_SCHEME_NONE) {
		oc.n_sinks = 0;
		oc.dtype = g_cfg.dtype == KVT_DTYPE_F32 ? KVT_DTYPE_F16 : KVT_DTYPE_F32;
	}
	KVT_REQUIRE(kvt_seq_create(&oc, NULL, &other, g_err, ERRLEN) == 0, "create other: %s",
		    g_err);
	KVT_CHECK(kvt_seq_append_chunk(other, c0->bytes, c0->size_bytes, g_err, ERRLEN) ==
			  -EINVAL && (strstr(g_err, "n_sinks") || strstr(g_err, "dtype")),
		  "config mismatch: %s", g_err);
	kvt_seq_destroy(other);
	kvt_seq_destroy(b);
	kvt_seq_destroy(a);
}

static void test_errors(void)
{
	struct kvt_seq *s = make_seq(130, NULL), *f = NULL;
	float q[NQ * HD] = { 0 }, o[NQ * HD];
	uint8_t buf[4 * NL * NH * HD * 4];
	struct kvt_codec_config bad = g_cfg;

	KVT_REQUIRE(s != NULL, "make: %s", g_err);
	KVT_CHECK(kvt_seq_fetch(s, 0, 131, 0, 1, KVT_DTYPE_F32, buf, NULL, g_err, ERRLEN) ==
			  -EINVAL && strstr(g_err, "t1 131"), "t1 beyond: %s", g_err);
	KVT_CHECK(kvt_seq_fetch(s, 5, 4, 0, 1, KVT_DTYPE_F32, buf, NULL, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "t0 5"), "t0 > t1: %s", g_err);
	KVT_CHECK(kvt_seq_fetch(s, 0, 1, 0, NL + 1, KVT_DTYPE_F32, buf, NULL, g_err, ERRLEN) ==
			  -EINVAL && strstr(g_err, "l1"), "l1 beyond: %s", g_err);
	KVT_CHECK(kvt_seq_fetch(s, 0, 1, 1, 0, KVT_DTYPE_F32, buf, NULL, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "l0"), "l0 > l1: %s", g_err);
	KVT_CHECK(kvt_seq_fetch(s, 0, 1, 0, 1, 9, buf, NULL, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "out_dtype"), "dtype: %s", g_err);
	KVT_CHECK(kvt_seq_fetch(s, 3, 3, 0, 1, KVT_DTYPE_F32, buf, NULL, g_err, ERRLEN) == 0,
		  "empty range: %s", g_err);
	KVT_CHECK(kvt_seq_attend(s, NL, NQ, 0.125f, q, o, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "layer"), "attend layer: %s", g_err);
	KVT_CHECK(kvt_seq_attend(s, 0, NH + 1, 0.125f, q, o, g_err, ERRLEN) == -EINVAL &&
			  strstr(g_err, "n_q_heads"), "attend heads: %s", g_err);
	KVT_CHECK(kvt_seq_fork(s, 131, NULL, &f, g_err, ERRLEN) == -EINVAL && !f &&
			  strstr(g_err, "n_tokens"), "fork beyond: %s", g_err);
	KVT_CHECK(kvt_seq_tail_k(s, NL) == NULL, "tail of a missing layer");
	KVT_CHECK(kvt_seq_chunk(s, kvt_seq_n_chunks(s)) == NULL, "chunk beyond the end");
	KVT_CHECK(kvt_seq_append(s, NULL, NULL, 1, g_err, ERRLEN) == -EINVAL, "NULL input");
	KVT_CHECK(kvt_seq_tokens(s) == 130, "errors changed the sequence");
	bad.head_dim = 96;
	KVT_CHECK(kvt_seq_create(&bad, NULL, &f, g_err, ERRLEN) == -EINVAL && !f &&
			  strstr(g_err, "head_dim"), "bad config: %s", g_err);
	kvt_seq_destroy(s);
	{
		struct kvt_seq *e = make_seq(0, NULL);

		KVT_CHECK(kvt_seq_attend(e, 0, NQ, 0.125f, q, o, g_err, ERRLEN) == -EINVAL,
			  "attend on an empty sequence");
		KVT_CHECK(kvt_seq_bytes(e) == 0, "an empty sequence holds %" PRIu64 " bytes",
			  kvt_seq_bytes(e));
		kvt_seq_destroy(e);
	}
}

static void test_savepoint(void)
{
	struct kvt_seq *s = make_seq(100, NULL), *ref = make_seq(130, NULL);
	struct kvt_seq *ref100 = make_seq(100, NULL);
	struct kvt_seq_savepoint sp;

	KVT_REQUIRE(s != NULL && ref != NULL && ref100 != NULL, "make: %s", g_err);
	kvt_seq_savepoint(s, &sp);
	KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == 0, "immediate rollback: %s", g_err);
	/* Draft tokens that stay in the tail roll back exactly, and can be re-appended. */
	KVT_REQUIRE(append_src(s, 300, 20) == 0, "append: %s", g_err);
	KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == 0 && kvt_seq_tokens(s) == 100,
		  "rollback: %s", g_err);
	KVT_CHECK(same_prefix(s, ref100, 100), "rollback changed the kept tokens");
	KVT_REQUIRE(append_src(s, 100, 30) == 0, "append: %s", g_err);
	KVT_CHECK(same_prefix(s, ref, 130), "append after rollback differs");
	/* A seal in between makes an exact rollback impossible: refused, nothing changes. */
	kvt_seq_savepoint(s, &sp);
	KVT_REQUIRE(append_src(s, 130, 10) == 0, "append: %s", g_err);
	KVT_REQUIRE(append_src(s, 0, 120) == 0, "append: %s", g_err);
	KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == -ESTALE && strstr(g_err, "sealed") &&
			  kvt_seq_tokens(s) == 260, "rollback across a seal: %s", g_err);
	/* At a chunk boundary the savepoint's tail is empty: rollback is exact again. */
	KVT_REQUIRE(kvt_seq_truncate(s, 256, g_err, ERRLEN) == 0, "truncate: %s", g_err);
	kvt_seq_savepoint(s, &sp);
	KVT_REQUIRE(append_src(s, 5, 7) == 0, "append: %s", g_err);
	KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == 0 && kvt_seq_tokens(s) == 256 &&
			  kvt_seq_n_chunks(s) == 2, "rollback at a boundary: %s", g_err);
	/* A truncate since the savepoint makes it stale even when the length is back. */
	KVT_REQUIRE(append_src(s, 5, 7) == 0, "append: %s", g_err);
	kvt_seq_savepoint(s, &sp);
	KVT_REQUIRE(kvt_seq_truncate(s, 258, g_err, ERRLEN) == 0, "truncate: %s", g_err);
	KVT_REQUIRE(append_src(s, 9, 9) == 0, "append: %s", g_err);
	KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == -ESTALE && strstr(g_err, "truncated") &&
			  kvt_seq_tokens(s) == 267, "rollback after truncate: %s", g_err);
	kvt_seq_destroy(ref100);
	kvt_seq_destroy(ref);
	kvt_seq_destroy(s);
}

/* Fetch of [t0, t1) in the wire dtype equals the source tokens bit for bit (exact). */
static int exact_range(const struct kvt_seq *s, uint64_t t0, uint64_t t1)
{
	size_t n = (size_t)(t1 - t0), bytes = n * NL * NH * HD * ws();
	uint8_t *k = malloc(bytes + 1), *v = malloc(bytes + 1);
	uint8_t *rk = gather(g_k, t0, n), *rv = gather(g_v, t0, n);
	int same = kvt_seq_fetch(s, t0, t1, 0, NL, g_cfg.dtype, k, v, g_err, ERRLEN) == 0 &&
		   memcmp(k, rk, bytes) == 0 && memcmp(v, rv, bytes) == 0;

	free(k);
	free(v);
	free(rk);
	free(rv);
	return same;
}

/* The recent window (configs with recent_exact_tokens W): bounds after every append of every
 * size, chunks equal to encoding their tokens, Fetch of the window exact, and fork /
 * truncate / savepoint with a window. */
static void test_window(void)
{
	const uint32_t B = g_cfg.chunk_tokens, W = g_cfg.recent_exact_tokens;
	const uint32_t floor_ = W - B + 1;
	const uint32_t sizes[] = { 1, 2, 7, B - 1, B, B + 1, floor_, W - 1, W, W + 1, 2 * W + 5, 257 };
	size_t max_bytes = kvt_chunk_max_bytes(&g_cfg);
	uint8_t *enc = malloc(max_bytes);

	if (!W) {
		free(enc);
		return;
	}
	for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
		struct kvt_seq *s = make_seq(0, NULL);
		uint64_t T = 0;
		uint32_t checked = 0;

		KVT_REQUIRE(s != NULL, "make: %s", g_err);
		while (T + sizes[si] <= 650) {
			uint64_t sealed;

			KVT_REQUIRE(append_src(s, T, sizes[si]) == 0, "append %u: %s", sizes[si], g_err);
			T += sizes[si];
			sealed = (uint64_t)kvt_seq_n_chunks(s) * B;
			KVT_CHECK(kvt_seq_tokens(s) == T && kvt_seq_n_chunks(s) == chunks_for(T),
				  "size %u T %" PRIu64 ": %u chunks", sizes[si], T, kvt_seq_n_chunks(s));
			KVT_CHECK(kvt_seq_tail_tokens(s) <= W &&
					  kvt_seq_tail_tokens(s) >= (T < floor_ ? T : floor_),
				  "size %u T %" PRIu64 ": tail %u outside [min(T, %u), %u]", sizes[si],
				  T, kvt_seq_tail_tokens(s), floor_, W);
			KVT_CHECK(exact_range(s, sealed, T),
				  "size %u T %" PRIu64 ": Fetch of the window [%" PRIu64 ", %" PRIu64
				  ") is not the exact input", sizes[si], T, sealed, T);
			for (; checked < kvt_seq_n_chunks(s); checked++) {
				const struct kvt_chunk *ch = kvt_seq_chunk(s, checked);
				void *k = gather(g_k, (size_t)checked * B, B);
				void *v = gather(g_v, (size_t)checked * B, B);
				int64_t n = kvt_encode_chunk(&g_cfg, (uint64_t)checked * B, k, v, enc,
							     max_bytes, g_err, ERRLEN);

				KVT_CHECK(n == (int64_t)ch->size_bytes &&
						  memcmp(enc, ch->bytes, ch->size_bytes) == 0,
					  "size %u: chunk %u is not the encoding of its tokens", sizes[si],
					  checked);
				free(k);
				free(v);
			}
		}
		check_attend(s, "window appends");
		kvt_seq_destroy(s);
	}

	/* Fork and truncate at every interesting cut of a 300-token session. A cut at or after
	 * the sealed part keeps the window exact and, appended to, equals a fresh session. */
	{
		struct kvt_seq *src = make_seq(300, NULL);
		const uint64_t sealed = (uint64_t)kvt_seq_n_chunks(src) * B;
		const uint64_t cuts[] = { 300, 299, sealed + 1, sealed, sealed - 1, B, 0 };

		KVT_REQUIRE(src != NULL && sealed > 0, "make: %s", g_err);
		for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
			uint64_t n = cuts[i];
			struct kvt_seq *f = NULL, *t = NULL, *fresh = make_seq(n + 150, NULL);

			KVT_REQUIRE(fresh != NULL, "make: %s", g_err);
			KVT_REQUIRE(kvt_seq_fork(src, n, NULL, &f, g_err, ERRLEN) == 0, "fork: %s", g_err);
			KVT_REQUIRE(kvt_seq_fork(src, 300, NULL, &t, g_err, ERRLEN) == 0, "fork: %s", g_err);
			KVT_REQUIRE(kvt_seq_truncate(t, n, g_err, ERRLEN) == 0, "truncate: %s", g_err);
			KVT_CHECK(kvt_seq_config(f)->recent_exact_tokens == W, "fork lost the window");
			KVT_CHECK(kvt_seq_tail_tokens(f) <= W && kvt_seq_tail_tokens(t) <= W,
				  "cut %" PRIu64 ": tails %u / %u over W", n, kvt_seq_tail_tokens(f),
				  kvt_seq_tail_tokens(t));
			if (n >= sealed)
				KVT_CHECK(exact_range(f, sealed, n) && exact_range(t, sealed, n),
					  "cut %" PRIu64 ": the window is not exact after fork/truncate", n);
			KVT_CHECK(same_prefix(f, t, n), "cut %" PRIu64 ": fork and truncate differ", n);
			KVT_CHECK(append_src(f, n, 150) == 0 && append_src(t, n, 150) == 0,
				  "append after cut: %s", g_err);
			KVT_CHECK(kvt_seq_n_chunks(f) == chunks_for(n + 150) &&
					  kvt_seq_tail_tokens(f) <= W,
				  "cut %" PRIu64 " + 150: %u chunks %u tail", n, kvt_seq_n_chunks(f),
				  kvt_seq_tail_tokens(f));
			if (n >= sealed)
				KVT_CHECK(same_prefix(f, fresh, n + 150) && same_prefix(t, fresh, n + 150),
					  "cut %" PRIu64 " + 150 differs from a fresh session", n);
			check_attend(f, "window fork");
			kvt_seq_destroy(f);
			kvt_seq_destroy(t);
			kvt_seq_destroy(fresh);
		}
		kvt_seq_destroy(src);
	}

	/* Savepoints: drafts that stay within the window roll back; one that seals is refused,
	 * and truncate back to the savepoint keeps every unsealed token exact. */
	{
		struct kvt_seq *s = make_seq(W, NULL);
		struct kvt_seq_savepoint sp;

		KVT_REQUIRE(s != NULL, "make: %s", g_err);
		KVT_CHECK(kvt_seq_n_chunks(s) == 0 && kvt_seq_tail_tokens(s) == W, "W tokens unsealed");
		kvt_seq_savepoint(s, &sp);
		KVT_REQUIRE(append_src(s, W, 3) == 0, "append: %s", g_err);
		KVT_CHECK(kvt_seq_n_chunks(s) == 1, "overflowing the window seals one chunk");
		KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == -ESTALE && strstr(g_err, "sealed") &&
				  kvt_seq_tokens(s) == W + 3ull, "rollback across a seal: %s", g_err);
		KVT_CHECK(kvt_seq_truncate(s, W, g_err, ERRLEN) == 0 && kvt_seq_n_chunks(s) == 1 &&
				  kvt_seq_tail_tokens(s) == W - B && exact_range(s, B, W),
			  "truncate back to the savepoint: %s", g_err);
		kvt_seq_savepoint(s, &sp);
		KVT_REQUIRE(append_src(s, W, B) == 0, "append: %s", g_err);
		KVT_CHECK(kvt_seq_n_chunks(s) == 1 && kvt_seq_tail_tokens(s) == W,
			  "B more tokens fit the window");
		KVT_CHECK(kvt_seq_rollback(s, &sp, g_err, ERRLEN) == 0 && kvt_seq_tokens(s) == W &&
				  exact_range(s, B, W), "rollback within the window: %s", g_err);
		kvt_seq_destroy(s);
	}

	/* Limits of the field. */
	{
		struct kvt_codec_config bad = g_cfg;
		struct kvt_seq *s = NULL;

		bad.recent_exact_tokens = B - 1;
		KVT_CHECK(kvt_seq_create(&bad, NULL, &s, g_err, ERRLEN) == -EINVAL && !s &&
				  strstr(g_err, "recent_exact_tokens"), "W < B: %s", g_err);
		bad.recent_exact_tokens = KVT_MAX_RECENT_EXACT + 1;
		KVT_CHECK(kvt_seq_create(&bad, NULL, &s, g_err, ERRLEN) == -EINVAL && !s &&
				  strstr(g_err, "recent_exact_tokens"), "W too large: %s", g_err);
	}
	free(enc);
}

/* A long session (more chunks than kvt_seq_attend keeps on its stack) appended in uneven
 * pieces; attention and a fetch across the whole range still match the reference. */
static void test_long(void)
{
	struct kvt_seq *s = make_seq(0, NULL);
	uint64_t T = 0;

	KVT_REQUIRE(s != NULL, "make: %s", g_err);
	while (T < 70 * (uint64_t)g_cfg.chunk_tokens + 17) {
		uint32_t n = 1 + kvt_rand_below(600);

		KVT_REQUIRE(append_src(s, kvt_rand_below(MAX_TOK - 600), n) == 0, "append: %s", g_err);
		T += n;
	}
	KVT_CHECK(kvt_seq_tokens(s) == T && kvt_seq_n_chunks(s) == chunks_for(T),
		  "long: %" PRIu64 " tokens, %u chunks", kvt_seq_tokens(s), kvt_seq_n_chunks(s));
	check_attend(s, "long session");
	{
		uint8_t *ref = reference_all(s, KVT_DTYPE_F32, 1);
		size_t bytes = (size_t)T * NL * NH * HD * 4;
		uint8_t *v = malloc(bytes);

		KVT_CHECK(kvt_seq_fetch(s, 0, T, 0, NL, KVT_DTYPE_F32, NULL, v, g_err, ERRLEN) == 0 &&
				  memcmp(v, ref, bytes) == 0, "long: whole fetch differs");
		free(v);
		free(ref);
	}
	kvt_seq_destroy(s);
}

/* Forks of one source taken and dropped concurrently: the shared chunks' counts are atomic,
 * so every count returns to 1 and each fork sees the source's data. */
struct fork_worker {
	const struct kvt_seq *src;
	uint64_t seed;
	int failures;
};

static void *fork_worker_main(void *p)
{
	struct fork_worker *w = p;
	uint64_t r = w->seed;

	for (int it = 0; it < 200; it++) {
		struct kvt_seq *f = NULL;
		uint64_t n;
		char err[ERRLEN];

		r = r * 6364136223846793005ull + 1442695040888963407ull;
		n = (r >> 33) % (kvt_seq_tokens(w->src) + 1);
		if (kvt_seq_fork(w->src, n, NULL, &f, err, sizeof(err)) != 0) {
			w->failures++;
			continue;
		}
		if (kvt_seq_tokens(f) != n || (n >= g_cfg.chunk_tokens &&
					       kvt_seq_chunk(f, 0) != kvt_seq_chunk(w->src, 0)))
			w->failures++;
		kvt_seq_destroy(f);
	}
	return NULL;
}

static void test_concurrent_forks(void)
{
	struct kvt_seq *src = make_seq(600, NULL);
	struct fork_worker w[4];
	pthread_t tid[4];

	KVT_REQUIRE(src != NULL, "make: %s", g_err);
	for (int i = 0; i < 4; i++) {
		w[i] = (struct fork_worker){ src, kvt_rand_u64(), 0 };
		KVT_REQUIRE(pthread_create(&tid[i], NULL, fork_worker_main, &w[i]) == 0, "thread");
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(tid[i], NULL);
		KVT_CHECK(w[i].failures == 0, "worker %d: %d failures", i, w[i].failures);
	}
	for (uint32_t c = 0; c < kvt_seq_n_chunks(src); c++)
		KVT_CHECK(kvt_chunk_refcount(kvt_seq_chunk(src, c)) == 1,
			  "chunk %u refcount %u after concurrent forks", c,
			  kvt_chunk_refcount(kvt_seq_chunk(src, c)));
	kvt_seq_destroy(src);
}

int main(void)
{
	const char *list = getenv("KVT_SEQ_SCHEMES");
	char buf[128], *save = NULL;

	kvt_test_init();
	g_k = malloc((size_t)NL * MAX_TOK * NH * HD * 2);
	g_v = malloc((size_t)NL * MAX_TOK * NH * HD * 2);
	fill_source();
	snprintf(buf, sizeof(buf), "%s", list && *list ? list : "oscar,kivi,hadamard,none,oscar-bf16,none-f32,"
		 "oscar+b32w100,kivi+b32w32,none-f32+b64w64,oscar-bf16+b32w128");
	for (char *name = strtok_r(buf, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
		printf("# scheme %s\n", name);
		if (select_config(name) < 0)
			continue;
		KVT_RUN(test_sealing);
		KVT_RUN(test_fetch_ranges);
		KVT_RUN(test_fork);
		KVT_RUN(test_truncate);
		KVT_RUN(test_alloc_refusal);
		KVT_RUN(test_append_chunk);
		KVT_RUN(test_errors);
		KVT_RUN(test_concurrent_forks);
		KVT_RUN(test_long);
		if (g_cfg.recent_exact_tokens)
			KVT_RUN(test_window); /* its own savepoint checks: test_savepoint's cuts assume B 128 */
		else
			KVT_RUN(test_savepoint);
	}
	free(g_k);
	free(g_v);
	return kvt_test_done();
}

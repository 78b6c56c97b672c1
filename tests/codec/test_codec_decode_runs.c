/*
 * test_codec_decode_runs.c - the run decoder (kvt_decode_chunk -> ops->decode_rows) writes
 * exactly the bytes of the one-row-per-call decoder it replaced (kvt_decode_chunk_rowwise),
 * on the AVX2 table and on the scalar one, for every scheme x bit width x G x d x wire dtype
 * x output dtype x rotate_v, any token and layer range, with pins; and again on chunks whose
 * codes, scales, zeros and norms were overwritten with random (finite) bytes, so the fast
 * paths see parameters no encoder would write (subnormal, huge, negative scales).
 * The GPU decoder follows the CPU decoder's float operations: bytes, not tolerances.
 */
#include "codec_test_util.h"

static bool avx2;
static size_t n_compared;

/* Out-of-range token and layer choices are kept inside the chunk. */
struct range {
	uint32_t t0, t1, l0, l1, odt;
	bool want_k, want_v;
};

static void random_range(const struct kvt_codec_config *cfg, struct range *r)
{
	const uint32_t B = cfg->chunk_tokens, L = cfg->n_layers;
	switch (kvt_rand_below(4)) {
	case 0: /* everything */
		r->t0 = 0;
		r->t1 = B;
		break;
	case 1: /* one token */
		r->t0 = kvt_rand_below(B);
		r->t1 = r->t0 + 1;
		break;
	default: /* anything, crossing group boundaries */
		r->t0 = kvt_rand_below(B);
		r->t1 = r->t0 + 1 + kvt_rand_below(B - r->t0);
		break;
	}
	r->l0 = kvt_rand_below(L);
	r->l1 = r->l0 + 1 + kvt_rand_below(L - r->l0);
	r->odt = 1 + kvt_rand_below(3);
	uint32_t which = kvt_rand_below(4);
	r->want_k = which != 1;
	r->want_v = which != 2;
}

/* The four decoders (new/old x avx2/scalar) on one range; all outputs must be equal. */
static void compare_range(const uint8_t *chunk, const struct kvt_codec_config *cfg,
			  const struct range *r, const char *what)
{
	const size_t n = (size_t)(r->l1 - r->l0) * (r->t1 - r->t0) * cfg->n_kv_heads *
			 cfg->head_dim * kvt_dtype_size(r->odt);
	uint8_t *k[4], *v[4];
	char err[256];
	for (int p = 0; p < 4; p++) {
		/* poisoned, so a row a path forgets to write shows up */
		k[p] = malloc(n + 1);
		v[p] = malloc(n + 1);
		memset(k[p], 0x5a + p, n + 1);
		memset(v[p], 0xa5 + p, n + 1);
	}
	int rc[4];
	kvt_codec_set_isa(KVT_ISA_SCALAR);
	rc[0] = kvt_decode_chunk(chunk, r->t0, r->t1, r->l0, r->l1, r->odt,
				 r->want_k ? k[0] : NULL, r->want_v ? v[0] : NULL, err, sizeof(err));
	rc[1] = kvt_decode_chunk_rowwise(&kvt_codec_ops_scalar, chunk, r->t0, r->t1, r->l0, r->l1,
					 r->odt, r->want_k ? k[1] : NULL, r->want_v ? v[1] : NULL,
					 err, sizeof(err));
	int np = 2;
#ifdef KVT_HAVE_AVX2_BUILD
	if (avx2) {
		kvt_codec_set_isa(KVT_ISA_AVX2);
		rc[2] = kvt_decode_chunk(chunk, r->t0, r->t1, r->l0, r->l1, r->odt,
					 r->want_k ? k[2] : NULL, r->want_v ? v[2] : NULL, err,
					 sizeof(err));
		rc[3] = kvt_decode_chunk_rowwise(&kvt_codec_ops_avx2, chunk, r->t0, r->t1, r->l0,
						 r->l1, r->odt, r->want_k ? k[3] : NULL,
						 r->want_v ? v[3] : NULL, err, sizeof(err));
		np = 4;
	}
#endif
	kvt_codec_set_isa(KVT_ISA_AUTO);
	static const char *names[4] = {"scalar runs", "scalar rowwise", "avx2 runs",
				       "avx2 rowwise"};
	for (int p = 0; p < np; p++)
		KVT_CHECK(rc[p] == 0, "%s: %s rc %d (%s)", what, names[p], rc[p], cfg_str(cfg));
	for (int p = 1; p < np && !kvt_test_failures; p++) {
		/* reference: the old scalar decoder, which every earlier test holds to the codec's
		 * definition; the poison byte past the end must survive */
		const int ref = 1;
		if (p == ref)
			continue;
		KVT_CHECK(!r->want_k || memcmp(k[p], k[ref], n) == 0,
			  "%s: K of %s differs from %s: %s tokens [%u, %u) layers [%u, %u) out %s", what,
			  names[p], names[ref], cfg_str(cfg), r->t0, r->t1, r->l0, r->l1,
			  kvt_dtype_name(r->odt));
		KVT_CHECK(!r->want_v || memcmp(v[p], v[ref], n) == 0,
			  "%s: V of %s differs from %s: %s tokens [%u, %u) layers [%u, %u) out %s", what,
			  names[p], names[ref], cfg_str(cfg), r->t0, r->t1, r->l0, r->l1,
			  kvt_dtype_name(r->odt));
		KVT_CHECK(k[p][n] == (uint8_t)(0x5a + p) && v[p][n] == (uint8_t)(0xa5 + p),
			  "%s: %s wrote past the output", what, names[p]);
	}
	KVT_CHECK(memcmp(k[0], k[1], n) == 0 || !r->want_k, "%s: scalar runs K (%s)", what,
		  cfg_str(cfg));
	KVT_CHECK(memcmp(v[0], v[1], n) == 0 || !r->want_v, "%s: scalar runs V (%s)", what,
		  cfg_str(cfg));
	n_compared += n * (r->want_k + r->want_v);
	for (int p = 0; p < 4; p++) {
		free(k[p]);
		free(v[p]);
	}
}

/* a random finite 16-bit value of the scale dtype, from subnormal to large (but not so large
 * that the f32 butterflies overflow: the output dtype's own overflow is part of the test) */
static uint16_t random_param16(uint32_t sdt)
{
	uint32_t sign = kvt_rand_below(2);
	if (sdt == KVT_DTYPE_BF16) {
		uint32_t e = kvt_rand_below(8) == 0 ? 0 : 127 - 40 + kvt_rand_below(80);
		return (uint16_t)(sign << 15 | e << 7 | kvt_rand_below(128));
	}
	return (uint16_t)(sign << 15 | kvt_rand_below(31) << 10 | kvt_rand_below(1024));
}

/* Overwrites every layer's codes, scales, zeros and norms with random bytes (the header, the
 * pin table and the exact rows stay valid: decode does not check the crc). */
static void scramble(uint8_t *chunk)
{
	struct kvt_codec_config cfg;
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	KVT_REQUIRE(kvt_chunk_view(chunk, SIZE_MAX, &cfg, &hdr, &lay, NULL, 0) == 0, "view");
	for (uint32_t l = 0; l < cfg.n_layers; l++) {
		uint8_t *sec = chunk + lay.data_offset + (size_t)l * lay.layer_bytes;
		for (size_t i = 0; i < lay.k_codes_bytes; i++)
			sec[lay.k_codes_off + i] = (uint8_t)kvt_rand_u64();
		for (size_t i = 0; i < lay.v_codes_bytes; i++)
			sec[lay.v_codes_off + i] = (uint8_t)kvt_rand_u64();
		const size_t offs[4] = {lay.k_scale_off, lay.k_zero_off, lay.v_scale_off,
					lay.v_zero_off};
		const size_t sizes[4] = {lay.k_scale_bytes, lay.k_scale_bytes, lay.v_scale_bytes,
					 lay.v_scale_bytes};
		for (int a = 0; a < 4; a++)
			for (size_t i = 0; i + 2 <= sizes[a]; i += 2) {
				uint16_t x = random_param16(hdr.scale_dtype);
				memcpy(sec + offs[a] + i, &x, 2);
			}
		for (size_t i = 0; i + 4 <= lay.norms_bytes; i += 4) {
			float x = kvt_rand_below(16) == 0 ? 0.0f : kvt_rand_uniform() * 1000.0f;
			memcpy(sec + lay.norms_off + i, &x, 4);
		}
	}
}

static void one_config(struct kvt_codec_config *cfg, int n_ranges, bool scrambled)
{
	char err[256];
	if (kvt_codec_config_validate(cfg, err, sizeof(err)) != 0)
		return; /* a width this build does not have (3 bits before it lands, ...) */
	uint32_t low[2] = {kvt_rand_below(cfg->chunk_tokens), kvt_rand_below(cfg->chunk_tokens)};
	void *k = random_kv(cfg, cfg->chunk_tokens, 1.5f, low, 2);
	void *v = random_kv(cfg, cfg->chunk_tokens, 1.0f, NULL, 0);
	size_t len;
	uint8_t *chunk = encode_new(cfg, kvt_rand_below(2) ? 0 : 4096, k, v, &len);
	free(k);
	free(v);
	KVT_REQUIRE(chunk != NULL, "encode %s", cfg_str(cfg));
	if (scrambled)
		scramble(chunk);
	for (int i = 0; i < n_ranges && !kvt_test_failures; i++) {
		struct range r;
		random_range(cfg, &r);
		compare_range(chunk, cfg, &r, scrambled ? "scrambled" : "encoded");
	}
	free(chunk);
}

/* scheme x bits (2, 3, 4, 8: the widths the build accepts) x G x d x wire dtype x rotate_v */
static void test_sweep(void)
{
	static const uint32_t dims[] = {64, 128, 256}, groups[] = {32, 64, 128},
			      bits[] = {2, 3, 4, 8};
	uint32_t configs = 0;
	for (uint32_t sc = KVT_SCHEME_KIVI; sc <= KVT_SCHEME_OSCAR; sc++)
		for (uint32_t bi = 0; bi < 4; bi++)
			for (uint32_t gi = 0; gi < 3; gi++)
				for (uint32_t di = 0; di < 3; di++)
					for (uint32_t dt = 1; dt <= 3; dt++)
						for (uint32_t rv = 0; rv < 2; rv++) {
							if (rv && !kvt_scheme_rotates_keys(sc))
								continue;
							struct kvt_codec_config cfg;
							kvt_codec_config_default(&cfg, 2, 1 + kvt_rand_below(3),
										 dims[di], dt);
							cfg.scheme = sc;
							cfg.group = groups[gi];
							cfg.chunk_tokens = groups[gi] * (1 + kvt_rand_below(2));
							cfg.key_bits = bits[bi];
							/* values: the same width, or another the build has */
							cfg.value_bits = bits[kvt_rand_below(2) ? bi : kvt_rand_below(4)];
							cfg.rotate_v = rv;
							cfg.n_sinks = kvt_rand_below(4);
							if (kvt_rand_below(2)) {
								cfg.pin_detect_ratio = 0.6f;
								cfg.pin_detect_max = 3;
							}
							char err[256];
							if (kvt_codec_config_validate(&cfg, err, sizeof(err)))
								cfg.value_bits = cfg.key_bits;
							if (kvt_codec_config_validate(&cfg, err, sizeof(err)))
								continue;
							one_config(&cfg, 3, false);
							one_config(&cfg, 2, true);
							configs++;
							if (kvt_test_failures)
								return;
						}
	printf("# %u configurations, %zu output bytes compared%s\n", configs, n_compared,
	       avx2 ? "" : " (no AVX2: scalar paths only)");
	KVT_CHECK(configs >= 3 * 3 * 3 * 3 * 5, "only %u configurations were valid", configs);
}

/* the default shapes of kvtier-bench and the daemon, bigger chunks, many ranges */
static void test_bench_shapes(void)
{
	static const uint32_t shapes[][3] = {{4, 8, 128}, {3, 3, 64}, {2, 4, 256}};
	for (int s = 0; s < 3; s++)
		for (uint32_t sc = KVT_SCHEME_KIVI; sc <= KVT_SCHEME_OSCAR; sc++)
			for (uint32_t b = 2; b <= 4; b += 2) {
				struct kvt_codec_config cfg;
				kvt_codec_config_default(&cfg, shapes[s][0], shapes[s][1], shapes[s][2],
							 KVT_DTYPE_F16);
				cfg.scheme = sc;
				cfg.key_bits = cfg.value_bits = b;
				cfg.rotate_v = kvt_scheme_rotates_keys(sc) ? cfg.rotate_v : 0;
				cfg.chunk_tokens = 128;
				one_config(&cfg, 6, false);
				one_config(&cfg, 3, true);
				if (kvt_test_failures)
					return;
			}
}

/* a chunk-sized random config (codec_test_util's random_config) now and then */
static void test_random_configs(void)
{
	for (int it = 0; it < 40 && !kvt_test_failures; it++) {
		struct kvt_codec_config cfg;
		random_config(&cfg);
		if (cfg.scheme == KVT_SCHEME_NONE)
			cfg.scheme = KVT_SCHEME_OSCAR;
		if (cfg.key_bits == 16)
			cfg.key_bits = cfg.value_bits = 2;
		one_config(&cfg, 4, kvt_rand_below(2));
	}
}

int main(void)
{
	kvt_test_init();
	avx2 = have_avx2();
	if (!avx2)
		printf("# no AVX2+F16C on this CPU: the scalar paths only\n");
	KVT_RUN(test_sweep);
	KVT_RUN(test_bench_shapes);
	KVT_RUN(test_random_configs);
	return kvt_test_done();
}

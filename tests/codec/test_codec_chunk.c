/*
 * test_codec_chunk.c - configs, the chunk layout, encode/decode round trips on random shapes
 * and codecs, pinned tokens, corruption detection, error paths, and the AVX2 path against the
 * scalar one (identical bytes, identical decoded values).
 */
#include <pthread.h>

#include "codec_test_util.h"
#include "kvt_test_kv.h"

static bool avx2;

static void test_config_validate_messages(void)
{
	struct kvt_codec_config base, c;
	char err[256];
	kvt_codec_config_default(&base, 32, 8, 128, KVT_DTYPE_F16);
	KVT_CHECK(kvt_codec_config_validate(&base, err, sizeof(err)) == 0, "defaults valid");
	KVT_CHECK(base.scheme == KVT_SCHEME_OSCAR && base.key_bits == 2 && base.value_bits == 2 &&
			  base.group == 32 && base.chunk_tokens == 128 && base.rotate_v == 1 &&
			  base.n_sinks == 4 && base.pin_detect_ratio == 0.0f,
		  "default values");
	struct {
		void (*mut)(struct kvt_codec_config *);
		const char *want;
	} cases[] = {
#define CASE(body, want) {({ void f_(struct kvt_codec_config *x) { body; } f_; }), want}
		CASE(x->head_dim = 96, "head_dim 96 is not one of 64, 128, 256"),
		CASE(x->scheme = 9, "scheme 9"),
		CASE(x->key_bits = 5, "key_bits 5 is not one of 2, 3, 4, 8"),
		CASE(x->value_bits = 16, "value_bits 16"),
		CASE(x->group = 48, "group 48 is not one of 32, 64, 128"),
		CASE(x->chunk_tokens = 2048, "chunk_tokens 2048"),
		CASE((x->group = 64, x->chunk_tokens = 96), "chunk_tokens 96 is not a multiple of group 64"),
		CASE(x->n_layers = 0, "n_layers 0"),
		CASE(x->n_layers = 257, "n_layers 257"),
		CASE(x->n_kv_heads = 65, "n_kv_heads 65"),
		CASE(x->dtype = 7, "dtype 7"),
		CASE(x->rotate_v = 2, "rotate_v 2"),
		CASE((x->scheme = KVT_SCHEME_KIVI), "rotate_v 1 needs scheme hadamard or oscar"),
		CASE(x->n_sinks = 65, "n_sinks 65"),
		CASE(x->pin_detect_ratio = 1.5f, "pin_detect_ratio"),
		CASE(x->pin_detect_ratio = -0.1f, "pin_detect_ratio"),
		CASE(x->pin_detect_max = 129, "pin_detect_max 129"),
		CASE((x->scheme = KVT_SCHEME_NONE, x->key_bits = 16, x->value_bits = 2, x->rotate_v = 0),
		     "value_bits 2 is not 0 or 16"),
#undef CASE
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		c = base;
		cases[i].mut(&c);
		err[0] = 0;
		int rc = kvt_codec_config_validate(&c, err, sizeof(err));
		KVT_CHECK(rc == -EINVAL, "case %zu rc %d", i, rc);
		KVT_CHECK(strstr(err, cases[i].want) != NULL, "case %zu: message '%s' lacks '%s'", i,
			  err, cases[i].want);
	}
	KVT_CHECK(kvt_codec_config_validate(NULL, NULL, 0) == -EINVAL, "NULL config");
	c = base;
	c.scheme = KVT_SCHEME_NONE, c.key_bits = c.value_bits = 0, c.rotate_v = 0;
	KVT_CHECK(kvt_codec_config_validate(&c, err, sizeof(err)) == 0, "none with 0 bits: %s", err);
}

static void test_names(void)
{
	for (uint32_t s = 0; s <= KVT_SCHEME_OSCAR; s++)
		KVT_CHECK(kvt_scheme_parse(kvt_scheme_name(s)) == (int)s, "scheme %u", s);
	for (uint32_t d = KVT_DTYPE_F16; d <= KVT_DTYPE_F32; d++)
		KVT_CHECK(kvt_dtype_parse(kvt_dtype_name(d)) == (int)d, "dtype %u", d);
	KVT_CHECK(kvt_scheme_name(4) == NULL && kvt_dtype_name(0) == NULL, "unknown names");
	KVT_CHECK(kvt_scheme_parse("turbo") == -EINVAL && kvt_dtype_parse(NULL) == -EINVAL,
		  "unknown parse");
	KVT_CHECK(kvt_dtype_size(KVT_DTYPE_F16) == 2 && kvt_dtype_size(KVT_DTYPE_BF16) == 2 &&
			  kvt_dtype_size(KVT_DTYPE_F32) == 4 && kvt_dtype_size(9) == 0,
		  "dtype sizes");
}

static void test_layout(void)
{
	for (int it = 0; it < 500; it++) {
		struct kvt_codec_config cfg;
		struct kvt_chunk_layout l;
		random_config(&cfg);
		uint32_t np = cfg.scheme == KVT_SCHEME_NONE ? 0 : kvt_rand_below(cfg.chunk_tokens + 1);
		KVT_REQUIRE(kvt_chunk_layout(&cfg, np, &l) == 0, "layout %s", cfg_str(&cfg));
		const size_t offs[] = {l.norms_off,  l.k_scale_off, l.k_zero_off,
				       l.v_scale_off, l.v_zero_off, l.k_codes_off,
				       l.v_codes_off, l.k_exact_off, l.v_exact_off, l.layer_bytes};
		const size_t sz[] = {l.norms_bytes,   l.k_scale_bytes, l.k_scale_bytes,
				     l.v_scale_bytes, l.v_scale_bytes, l.k_codes_bytes,
				     l.v_codes_bytes, l.exact_bytes,   l.exact_bytes};
		for (int i = 0; i < 10; i++)
			KVT_CHECK(offs[i] % 64 == 0, "offset %d not 64-aligned", i);
		for (int i = 0; i < 9; i++)
			KVT_CHECK(offs[i] + sz[i] <= offs[i + 1], "array %d overlaps", i);
		KVT_CHECK(l.data_offset % 64 == 0 && l.data_offset >= 64 + 2 * np, "data_offset");
		KVT_CHECK(l.total_bytes == l.data_offset + cfg.n_layers * l.layer_bytes, "total");
		KVT_CHECK(kvt_chunk_layout(&cfg, cfg.chunk_tokens + 1, &l) == -EINVAL, "too many pins");
	}
	/* OSCAR.md section 5: INT2 G32 d128 is 96 bytes per token per head plus the norm */
	struct kvt_codec_config cfg;
	struct kvt_chunk_layout l;
	kvt_codec_config_default(&cfg, 1, 8, 128, KVT_DTYPE_F16);
	cfg.n_sinks = 0;
	KVT_CHECK(kvt_chunk_layout(&cfg, 0, &l) == 0, "layout");
	KVT_CHECK(l.layer_bytes == 8 * 128 * 96 + 128 * 4, "layer bytes %zu", l.layer_bytes);
	struct kvt_chunk_header h = {.chunk_tokens = 128, .n_layers = 1, .n_kv_heads = 8,
				     .head_dim = 128, .total_bytes = l.total_bytes};
	double bpe = kvt_chunk_bits_per_element(&h);
	KVT_CHECK(fabs(bpe - 3.0) < 0.02, "bits per element %g", bpe);
	cfg.group = 128;
	KVT_CHECK(kvt_chunk_layout(&cfg, 0, &l) == 0, "layout");
	KVT_CHECK(l.layer_bytes == 8 * 128 * 72 + 128 * 4, "G128 layer bytes %zu", l.layer_bytes);
	/* 3-bit keys, 2-bit values, G 64, B 64 on SmolLM2's shape (30 layers, 3 KV heads, d 64):
	 * norms 256 + key scale/zero 2 x 384 + value scale/zero 2 x 384 + key codes 3 x 64 x 24
	 * + value codes 3 x 64 x 16 = 9472 B per layer, 3.0840 bits per element */
	kvt_codec_config_default(&cfg, 30, 3, 64, KVT_DTYPE_F16);
	cfg.key_bits = 3;
	cfg.group = cfg.chunk_tokens = 64;
	KVT_CHECK(kvt_chunk_layout(&cfg, 0, &l) == 0, "layout");
	KVT_CHECK(l.k_codes_bytes == 3 * 64 * 24 && l.v_codes_bytes == 3 * 64 * 16 &&
			  l.layer_bytes == 9472 && l.total_bytes == 64 + 30 * 9472,
		  "K3 layer bytes %zu", l.layer_bytes);
	h = (struct kvt_chunk_header){.chunk_tokens = 64, .n_layers = 30, .n_kv_heads = 3,
				      .head_dim = 64, .total_bytes = l.total_bytes};
	bpe = kvt_chunk_bits_per_element(&h);
	KVT_CHECK(fabs(bpe - 3.0840) < 0.0001, "K3 bits per element %g", bpe);
}

/* Decodes the whole chunk to f32 under the current ISA. */
static void decode_all(const uint8_t *chunk, const struct kvt_codec_config *cfg, float *k,
		       float *v)
{
	char err[256] = "";
	int rc = kvt_decode_chunk(chunk, 0, cfg->chunk_tokens, 0, cfg->n_layers, KVT_DTYPE_F32,
				  k, v, err, sizeof(err));
	KVT_CHECK(rc == 0, "decode rc %d: %s", rc, err);
}

static int16_t pin_of(const uint8_t *chunk, uint32_t t)
{
	struct kvt_chunk_header h;
	memcpy(&h, chunk, sizeof(h));
	for (uint32_t i = 0; i < h.n_pinned; i++) {
		uint16_t p;
		memcpy(&p, chunk + 64 + 2 * i, 2);
		if (p == t)
			return (int16_t)i;
	}
	return -1;
}


/*
 * Checks one chunk against its input element by element: pinned tokens bit-exact, scheme
 * none exact, every quantized element within the quantizer's bound of the encoder's input
 * (recomputed here: rotation and joint norm), and the decoded tensor equal to n * H(x^).
 */
static void check_chunk_against_input(const struct kvt_codec_config *cfg, uint64_t first,
				      const uint8_t *chunk, const void *k, const void *v)
{
	const uint32_t B = cfg->chunk_tokens, L = cfg->n_layers, H = cfg->n_kv_heads,
		       d = cfg->head_dim, G = cfg->group;
	const size_t row = (size_t)H * d, n = (size_t)L * B * row;
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	struct kvt_codec_config pc;
	char err[256] = "";
	memcpy(&hdr, chunk, sizeof(hdr)); /* the encoder's size: parse wants the exact length */
	KVT_REQUIRE(kvt_chunk_parse(chunk, hdr.total_bytes, &pc, &hdr, err, sizeof(err)) == 0,
		    "parse: %s", err);
	KVT_CHECK(hdr.first_token == first, "first_token");
	KVT_REQUIRE(kvt_chunk_layout(cfg, hdr.n_pinned, &lay) == 0, "layout");
	/* sinks pinned */
	for (uint32_t t = 0; t < B && first + t < cfg->n_sinks; t++)
		KVT_CHECK(cfg->scheme == KVT_SCHEME_NONE || pin_of(chunk, t) >= 0, "sink %u not pinned",
			  t);
	float *kd = malloc(n * 4), *vd = malloc(n * 4), *kin = malloc(n * 4), *vin = malloc(n * 4);
	decode_all(chunk, cfg, kd, vd);
	kvt_convert(k, cfg->dtype, kin, KVT_DTYPE_F32, n);
	kvt_convert(v, cfg->dtype, vin, KVT_DTYPE_F32, n);
	/* exact tokens: bit-exact through the same dtype */
	void *kx = alloc_tensor(cfg->dtype, row), *vx = alloc_tensor(cfg->dtype, row);
	size_t ws = kvt_dtype_size(cfg->dtype);
	const uint32_t sdt = hdr.scale_dtype, gv = (uint32_t)kvt_value_group(cfg), ng = d / gv;
	float x[256], xh[256];
	size_t bad = 0, beyond_step = 0, checked = 0;
	for (uint32_t l = 0; l < L && !bad; l++) {
		const uint8_t *sec = chunk + lay.data_offset + (size_t)l * lay.layer_bytes;
		for (uint32_t t = 0; t < B && !bad; t++) {
			size_t base = ((size_t)l * B + t) * row;
			int16_t p = pin_of(chunk, t);
			if (cfg->scheme == KVT_SCHEME_NONE || p >= 0) {
				char err2[256];
				KVT_CHECK(kvt_decode_chunk(chunk, t, t + 1, l, l + 1, cfg->dtype, kx, vx,
							   err2, sizeof(err2)) == 0, "decode row");
				bad += memcmp(kx, (const uint8_t *)k + base * ws, row * ws) != 0;
				bad += memcmp(vx, (const uint8_t *)v + base * ws, row * ws) != 0;
				KVT_CHECK(!bad, "exact token %u layer %u not bit-exact (%s)", t, l,
					  cfg_str(cfg));
				continue;
			}
			float nrm = 1.0f;
			if (cfg->scheme == KVT_SCHEME_OSCAR)
				memcpy(&nrm, sec + lay.norms_off + 4 * t, 4);
			for (int kv = 0; kv < 2; kv++) {
				for (uint32_t h = 0; h < H; h++) {
					const float *in = (kv ? vin : kin) + base + (size_t)h * d;
					memcpy(x, in, d * 4);
					bool rot = kv ? cfg->rotate_v : kvt_scheme_rotates_keys(cfg->scheme);
					if (rot)
						kvt_hadamard_f32(x, 1, d);
					if (!kv && cfg->scheme == KVT_SCHEME_OSCAR)
						for (uint32_t c = 0; c < d; c++)
							x[c] = x[c] / nrm;
					uint32_t bits = kv ? cfg->value_bits : cfg->key_bits;
					size_t idx = (size_t)h * B + t;
					const uint8_t *codes = sec + (kv ? lay.v_codes_off : lay.k_codes_off) +
							       idx * d * bits / 8;
					const uint16_t *sc = (const uint16_t *)(const void *)(sec + (kv ? lay.v_scale_off : lay.k_scale_off));
					const uint16_t *zr = (const uint16_t *)(const void *)(sec + (kv ? lay.v_zero_off : lay.k_zero_off));
					bool per_channel = !kv && cfg->scheme != KVT_SCHEME_HADAMARD;
					for (uint32_t c = 0; c < d; c++) {
						size_t pi = per_channel ? ((size_t)h * (B / G) + t / G) * d + c
									: idx * ng + c / gv;
						float s = kvt_widen16(sc[pi], sdt), z = kvt_widen16(zr[pi], sdt);
						xh[c] = (float)packed_code(codes, c, bits, d) * s + z;
						checked++;
						if (s == 0.0f && z != x[c])
							continue; /* underflowed scale: constant by rule */
						float err_q = fabsf(xh[c] - x[c]);
						if (err_q > s)
							beyond_step++;
						if (err_q > quant_bound(s, z, bits, sdt, x[c])) {
							bad++;
							KVT_CHECK(0, "%s l%u t%u h%u c%u: x %g x^ %g s %g z %g (%s)",
								  kv ? "v" : "k", l, t, h, c, (double)x[c],
								  (double)xh[c], (double)s, (double)z,
								  cfg_str(cfg));
							break;
						}
					}
					/* decoded = n * H(x^) in f32 (or x^ without rotation) */
					double want[256], scale = 0;
					for (uint32_t i = 0; i < d; i++) {
						double acc = 0;
						for (uint32_t j = 0; j < d && rot; j++)
							acc += (__builtin_popcount(i & j) & 1 ? -1.0 : 1.0) * xh[j];
						want[i] = rot ? acc / sqrt((double)d) : xh[i];
						if (!kv)
							want[i] *= nrm;
						scale = fmax(scale, fabs(want[i]));
					}
					const float *got = (kv ? vd : kd) + base + (size_t)h * d;
					for (uint32_t i = 0; i < d; i++)
						if (fabs(got[i] - want[i]) > 1e-5 * scale + 1e-30) {
							bad++;
							KVT_CHECK(0, "decoded %s l%u t%u h%u c%u: %g want %g (%s)",
								  kv ? "v" : "k", l, t, h, i, (double)got[i],
								  want[i], cfg_str(cfg));
							break;
						}
				}
			}
		}
	}
	if (beyond_step)
		printf("# %zu of %zu elements beyond one step (16-bit zero/scale rounding) (%s)\n",
		       beyond_step, checked, cfg_str(cfg));
	free(kx);
	free(vx);
	free(kd);
	free(vd);
	free(kin);
	free(vin);
}

static void test_roundtrip_random(void)
{
	for (int it = 0; it < 60 && !kvt_test_failures; it++) {
		struct kvt_codec_config cfg;
		random_config(&cfg);
		uint64_t first = kvt_rand_below(2) ? 0 : (uint64_t)cfg.chunk_tokens * kvt_rand_below(5);
		uint32_t low[3] = {kvt_rand_below(cfg.chunk_tokens), kvt_rand_below(cfg.chunk_tokens),
				   kvt_rand_below(cfg.chunk_tokens)};
		void *k = random_kv(&cfg, cfg.chunk_tokens, 1.0f, low, 3);
		void *v = random_kv(&cfg, cfg.chunk_tokens, 0.5f, NULL, 0);
		size_t len;
		uint8_t *chunk = encode_new(&cfg, first, k, v, &len);
		KVT_REQUIRE(chunk != NULL, "encode %s", cfg_str(&cfg));
		KVT_CHECK(len <= kvt_chunk_max_bytes(&cfg), "len within max");
		check_chunk_against_input(&cfg, first, chunk, k, v);
		free(chunk);
		free(k);
		free(v);
	}
}

static void test_paths_identical(void)
{
	if (!avx2) {
		printf("# no AVX2: skipped\n");
		return;
	}
	for (int it = 0; it < 80 && !kvt_test_failures; it++) {
		struct kvt_codec_config cfg;
		random_config(&cfg);
		uint32_t low[2] = {kvt_rand_below(cfg.chunk_tokens), kvt_rand_below(cfg.chunk_tokens)};
		void *k = random_kv(&cfg, cfg.chunk_tokens, 2.0f, low, 2);
		void *v = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
		size_t len[2];
		uint8_t *c[2];
		size_t n = (size_t)cfg.n_layers * cfg.chunk_tokens * cfg.n_kv_heads * cfg.head_dim;
		uint32_t odt = 1 + kvt_rand_below(3);
		void *kd[2], *vd[2];
		for (int p = 0; p < 2; p++) {
			kvt_codec_set_isa(p ? KVT_ISA_AVX2 : KVT_ISA_SCALAR);
			c[p] = encode_new(&cfg, 0, k, v, &len[p]);
			kd[p] = alloc_tensor(odt, n);
			vd[p] = alloc_tensor(odt, n);
			if (c[p])
				KVT_CHECK(kvt_decode_chunk(c[0], 0, cfg.chunk_tokens, 0, cfg.n_layers, odt,
							   kd[p], vd[p], NULL, 0) == 0,
					  "decode");
		}
		kvt_codec_set_isa(KVT_ISA_AUTO);
		KVT_REQUIRE(c[0] && c[1], "encode");
		KVT_CHECK(len[0] == len[1] && memcmp(c[0], c[1], len[0]) == 0,
			  "chunk bytes differ between scalar and avx2 (%s)", cfg_str(&cfg));
		KVT_CHECK(memcmp(kd[0], kd[1], n * kvt_dtype_size(odt)) == 0 &&
				  memcmp(vd[0], vd[1], n * kvt_dtype_size(odt)) == 0,
			  "decoded %s differs between paths (%s)", kvt_dtype_name(odt), cfg_str(&cfg));
		for (int p = 0; p < 2; p++) {
			free(c[p]);
			free(kd[p]);
			free(vd[p]);
		}
		free(k);
		free(v);
	}
}

/* every scheme x bits x G x d x dtype (small shapes): AVX2 bytes == scalar bytes, decoded
 * values identical, and the chunk within the quantizer's bound of its input */
static void test_paths_sweep(void)
{
	static const uint32_t dims[] = {64, 128, 256}, groups[] = {32, 64, 128};
	const uint32_t *bits = kvt_test_bits, nb = KVT_TEST_N_BITS;
	uint32_t combos = 0;
	for (uint32_t sc = 0; sc < 4; sc++)
		for (uint32_t bi = 0; bi < nb; bi++)
			for (uint32_t gi = 0; gi < 3; gi++)
				for (uint32_t di = 0; di < 3; di++)
					for (uint32_t dt = 1; dt <= 3; dt++) {
						if (sc == KVT_SCHEME_NONE && bi)
							continue;
						struct kvt_codec_config cfg;
						kvt_codec_config_default(&cfg, 2, 2, dims[di], dt);
						cfg.scheme = sc;
						cfg.group = groups[gi];
						cfg.chunk_tokens = groups[gi] * (1 + kvt_rand_below(2));
						cfg.key_bits = sc ? bits[bi] : 16;
						cfg.value_bits = sc ? bits[(bi + kvt_rand_below(nb)) % nb] : 16;
						cfg.rotate_v = kvt_scheme_rotates_keys(sc) ? kvt_rand_below(2) : 0;
						cfg.n_sinks = kvt_rand_below(5);
						if (sc && kvt_rand_below(2)) {
							cfg.pin_detect_ratio = 0.6f;
							cfg.pin_detect_max = 3;
						}
						uint32_t low[2] = {kvt_rand_below(cfg.chunk_tokens),
								   kvt_rand_below(cfg.chunk_tokens)};
						void *k = random_kv(&cfg, cfg.chunk_tokens, 1.0f, low, 2);
						void *v = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
						size_t len[2] = {0, 0};
						uint8_t *c[2] = {NULL, NULL};
						size_t n = (size_t)2 * cfg.chunk_tokens * 2 * cfg.head_dim;
						float *kd[2], *vd[2];
						for (int p = 0; p < 2; p++) {
							kvt_codec_set_isa(p && avx2 ? KVT_ISA_AVX2 : KVT_ISA_SCALAR);
							c[p] = encode_new(&cfg, 0, k, v, &len[p]);
							kd[p] = malloc(n * 4);
							vd[p] = malloc(n * 4);
							if (c[p])
								decode_all(c[p], &cfg, kd[p], vd[p]);
						}
						kvt_codec_set_isa(KVT_ISA_AUTO);
						KVT_CHECK(c[0] && c[1] && len[0] == len[1] &&
								  memcmp(c[0], c[1], len[0]) == 0 &&
								  memcmp(kd[0], kd[1], n * 4) == 0 &&
								  memcmp(vd[0], vd[1], n * 4) == 0,
							  "paths differ (%s)", cfg_str(&cfg));
						if (c[0])
							check_chunk_against_input(&cfg, 0, c[0], k, v);
						for (int p = 0; p < 2; p++) {
							free(c[p]);
							free(kd[p]);
							free(vd[p]);
						}
						free(k);
						free(v);
						combos++;
						if (kvt_test_failures)
							return;
					}
	printf("# %u configurations%s\n", combos, avx2 ? "" : " (no AVX2: scalar twice)");
}

/* every token range x every layer range of a small chunk equals the slice of a full decode */
/* every token x layer range of a chunk decodes to the same bytes as the whole chunk, at 2-bit
 * and at 3-bit keys / values */
static void decode_every_range(uint32_t kb, uint32_t vb)
{
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 3, 2, 64, KVT_DTYPE_F16);
	cfg.key_bits = kb;
	cfg.value_bits = vb;
	cfg.pin_detect_ratio = 0.5f;
	cfg.pin_detect_max = 2;
	uint32_t low[1] = {17};
	void *k = random_kv(&cfg, 32, 1.0f, low, 1), *v = random_kv(&cfg, 32, 1.0f, NULL, 0);
	cfg.chunk_tokens = 32;
	size_t len;
	uint8_t *chunk = encode_new(&cfg, 0, k, v, &len);
	KVT_REQUIRE(chunk != NULL, "encode");
	size_t row = 2 * 64, n = (size_t)3 * 32 * row;
	uint16_t *kf = malloc(n * 2), *vf = malloc(n * 2), *ks = malloc(n * 2), *vs = malloc(n * 2);
	KVT_REQUIRE(kvt_decode_chunk(chunk, 0, 32, 0, 3, KVT_DTYPE_F16, kf, vf, NULL, 0) == 0, "full");
	size_t ranges = 0;
	for (uint32_t t0 = 0; t0 <= 32; t0++)
		for (uint32_t t1 = t0; t1 <= 32; t1++)
			for (uint32_t l0 = 0; l0 <= 3; l0++)
				for (uint32_t l1 = l0; l1 <= 3; l1++) {
					KVT_REQUIRE(kvt_decode_chunk(chunk, t0, t1, l0, l1, KVT_DTYPE_F16, ks,
								     vs, NULL, 0) == 0,
						    "range");
					size_t nt = t1 - t0;
					for (uint32_t l = l0; l < l1; l++) {
						size_t src = ((size_t)l * 32 + t0) * row, dst = (size_t)(l - l0) * nt * row;
						KVT_REQUIRE(memcmp(ks + dst, kf + src, nt * row * 2) == 0 &&
								    memcmp(vs + dst, vf + src, nt * row * 2) == 0,
							    "K%u V%u [%u,%u) x [%u,%u) differs", kb, vb, t0, t1, l0, l1);
					}
					ranges++;
				}
	printf("# K%u V%u: %zu ranges\n", kb, vb, ranges);
	free(kf);
	free(vf);
	free(ks);
	free(vs);
	free(chunk);
	free(k);
	free(v);
}

static void test_decode_every_range(void)
{
	decode_every_range(2, 2);
	decode_every_range(3, 2);
	decode_every_range(3, 3);
}

static void test_decode_slices(void)
{
	for (int it = 0; it < 30 && !kvt_test_failures; it++) {
		struct kvt_codec_config cfg;
		random_config(&cfg);
		void *k = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
		void *v = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
		size_t len;
		uint8_t *chunk = encode_new(&cfg, 0, k, v, &len);
		KVT_REQUIRE(chunk != NULL, "encode");
		uint32_t B = cfg.chunk_tokens, L = cfg.n_layers, odt = 1 + kvt_rand_below(3);
		size_t row = (size_t)cfg.n_kv_heads * cfg.head_dim, os = kvt_dtype_size(odt);
		size_t n = (size_t)L * B * row;
		uint8_t *kf = alloc_tensor(odt, n), *vf = alloc_tensor(odt, n);
		uint8_t *ks = alloc_tensor(odt, n), *vs = alloc_tensor(odt, n);
		KVT_REQUIRE(kvt_decode_chunk(chunk, 0, B, 0, L, odt, kf, vf, NULL, 0) == 0, "full");
		for (int s = 0; s < 20; s++) {
			uint32_t t0 = kvt_rand_below(B + 1), t1 = t0 + kvt_rand_below(B - t0 + 1);
			uint32_t l0 = kvt_rand_below(L + 1), l1 = l0 + kvt_rand_below(L - l0 + 1);
			bool want_k = kvt_rand_below(3) != 0, want_v = kvt_rand_below(3) != 0;
			char err[256] = "";
			int rc = kvt_decode_chunk(chunk, t0, t1, l0, l1, odt, want_k ? ks : NULL,
						  want_v ? vs : NULL, err, sizeof(err));
			KVT_REQUIRE(rc == 0, "slice rc %d: %s", rc, err);
			size_t nt = t1 - t0;
			for (uint32_t l = l0; l < l1; l++) {
				size_t src = ((size_t)l * B + t0) * row * os;
				size_t dst = (size_t)(l - l0) * nt * row * os;
				if (want_k)
					KVT_CHECK(memcmp(ks + dst, kf + src, nt * row * os) == 0,
						  "k slice [%u,%u) x [%u,%u) differs", t0, t1, l0, l1);
				if (want_v)
					KVT_CHECK(memcmp(vs + dst, vf + src, nt * row * os) == 0,
						  "v slice [%u,%u) x [%u,%u) differs", t0, t1, l0, l1);
			}
		}
		free(kf);
		free(vf);
		free(ks);
		free(vs);
		free(chunk);
		free(k);
		free(v);
	}
}

static void test_norms(void)
{
	/* OSCAR.md 7.2: one joint norm per token over all heads; k'' has unit norm; zero key */
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 2, 4, 128, KVT_DTYPE_F32);
	cfg.n_sinks = 0;
	cfg.key_bits = 8;
	size_t row = 4 * 128, n = 2 * 128 * row;
	float *k = random_kv(&cfg, 128, 3.0f, NULL, 0), *v = random_kv(&cfg, 128, 1.0f, NULL, 0);
	memset(k + 5 * row, 0, row * 4); /* layer 0, token 5: zero key */
	size_t len;
	uint8_t *chunk = encode_new(&cfg, 1000, k, v, &len);
	KVT_REQUIRE(chunk != NULL, "encode");
	struct kvt_chunk_layout lay;
	KVT_REQUIRE(kvt_chunk_layout(&cfg, 0, &lay) == 0, "layout");
	KVT_CHECK(lay.norms_bytes == 128 * 4, "one norm per token per layer (%zu bytes)",
		  lay.norms_bytes);
	float x[512];
	for (uint32_t l = 0; l < 2; l++)
		for (uint32_t t = 0; t < 128; t++) {
			float nrm;
			memcpy(&nrm, chunk + lay.data_offset + l * lay.layer_bytes + lay.norms_off + 4 * t, 4);
			const float *kt = k + ((size_t)l * 128 + t) * row;
			double ss = 0;
			for (size_t i = 0; i < row; i++)
				ss += (double)kt[i] * kt[i];
			if (ss == 0) {
				KVT_CHECK(nrm == 1.0f, "zero key norm %g", (double)nrm);
				continue;
			}
			KVT_CHECK(fabs(nrm - sqrt(ss)) <= 1e-5 * sqrt(ss), "l%u t%u norm %g want %g", l, t,
				  (double)nrm, sqrt(ss));
			/* the scaled, rotated, concatenated key has unit norm */
			memcpy(x, kt, row * 4);
			kvt_hadamard_f32(x, 4, 128);
			double u = 0;
			for (size_t i = 0; i < row; i++)
				u += (double)(x[i] / nrm) * (x[i] / nrm);
			KVT_CHECK(fabs(u - 1.0) < 1e-5, "unit norm %g", u);
		}
	float *kd = malloc(n * 4), *vd = malloc(n * 4);
	decode_all(chunk, &cfg, kd, vd);
	for (size_t i = 0; i < n; i++)
		if (!isfinite(kd[i]) || !isfinite(vd[i])) {
			KVT_CHECK(0, "non-finite decoded value at %zu", i);
			break;
		}
	for (size_t i = 0; i < row; i++)
		KVT_CHECK(fabsf(kd[5 * row + i]) < 1e-2f, "zero key decodes near 0: %g",
			  (double)kd[5 * row + i]);
	free(kd);
	free(vd);
	free(chunk);
	free(k);
	free(v);
}

static void test_pins(void)
{
	/* sinks pinned in the first chunk only; detection pins low-norm tokens, lowest first */
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 3, 2, 64, KVT_DTYPE_BF16);
	cfg.n_sinks = 4;
	cfg.pin_detect_ratio = 0.3f;
	cfg.pin_detect_max = 2;
	uint32_t B = cfg.chunk_tokens;
	size_t row = 2 * 64;
	float *kf = malloc((size_t)3 * B * row * 4);
	for (size_t i = 0; i < (size_t)3 * B * row; i++)
		kf[i] = kvt_rand_normal(); /* no outliers: norms within a few % of each other */
	/* token 50: 0.05x in layer 1; token 90: 0.1x in layer 2; token 7: 0.2x; token 8: 0.5x */
	const uint32_t tok[4] = {50, 90, 7, 8}, lay_of[4] = {1, 2, 0, 0};
	const float f[4] = {0.05f, 0.1f, 0.2f, 0.5f};
	for (int i = 0; i < 4; i++)
		for (size_t c = 0; c < row; c++)
			kf[((size_t)lay_of[i] * B + tok[i]) * row + c] *= f[i];
	void *k = alloc_tensor(cfg.dtype, (size_t)3 * B * row);
	kvt_convert(kf, KVT_DTYPE_F32, k, cfg.dtype, (size_t)3 * B * row);
	void *v = random_kv(&cfg, B, 1.0f, NULL, 0);
	size_t len;
	uint8_t *c0 = encode_new(&cfg, 0, k, v, &len);
	KVT_REQUIRE(c0 != NULL, "encode");
	struct kvt_chunk_header h;
	memcpy(&h, c0, sizeof(h));
	KVT_CHECK(h.n_pinned == 6, "n_pinned %u (4 sinks + 2 detected)", h.n_pinned);
	const uint16_t want[6] = {0, 1, 2, 3, 50, 90};
	for (int i = 0; i < 6 && i < h.n_pinned; i++) {
		uint16_t p;
		memcpy(&p, c0 + 64 + 2 * i, 2);
		KVT_CHECK(p == want[i], "pin %d = %u want %u", i, p, want[i]);
	}
	check_chunk_against_input(&cfg, 0, c0, k, v);
	/* a later chunk of the same session: no sinks, same detection */
	uint8_t *c1 = encode_new(&cfg, B, k, v, &len);
	KVT_REQUIRE(c1 != NULL, "encode");
	memcpy(&h, c1, sizeof(h));
	KVT_CHECK(h.n_pinned == 2, "n_pinned %u in a later chunk", h.n_pinned);
	check_chunk_against_input(&cfg, B, c1, k, v);
	/* chunk 0 straddling S: first_token 2 pins tokens 0, 1 (session 2, 3) */
	uint8_t *c2 = encode_new(&cfg, 2, k, v, &len);
	KVT_REQUIRE(c2 != NULL, "encode");
	memcpy(&h, c2, sizeof(h));
	KVT_CHECK(h.n_pinned == 4, "n_pinned %u with first_token 2", h.n_pinned);
	free(c0);
	free(c1);
	free(c2);
	free(kf);
	free(k);
	free(v);
}

/* kvt_chunk_param_max: the largest |scale| and |zero| of a chunk's quantizer parameters (what
 * the GPU tier checks against the tensor-core kernels' f16 range). kivi's parameters follow the
 * data (scale = range / (2^bits - 1), zero = a minimum), so the same data times 1024 (exact in
 * bf16) has exactly 1024 times the parameters; scheme none has none. */
static void test_param_max(void)
{
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 2, 2, 64, KVT_DTYPE_BF16);
	cfg.scheme = KVT_SCHEME_KIVI;
	cfg.rotate_v = 0;
	cfg.key_bits = cfg.value_bits = 2;
	const uint32_t B = cfg.chunk_tokens;
	const size_t n = (size_t)cfg.n_layers * B * cfg.n_kv_heads * cfg.head_dim;
	void *k = random_kv(&cfg, B, 1.0f, NULL, 0), *v = random_kv(&cfg, B, 0.5f, NULL, 0);
	size_t len;
	uint8_t *c1 = encode_new(&cfg, 0, k, v, &len);
	float *f = malloc(n * 4);
	void *kv[2] = {k, v};
	kvt_test_scale_kv(kv, cfg.dtype, n, 1024.0f, f);
	uint8_t *c2 = encode_new(&cfg, 0, k, v, &len);
	KVT_REQUIRE(c1 != NULL && c2 != NULL, "encode");
	float s1 = -1, z1 = -1, s2 = -1, z2 = -1;
	KVT_CHECK(kvt_chunk_param_max(c1, &s1, &z1) == 0 && kvt_chunk_param_max(c2, &s2, &z2) == 0,
		  "param_max");
	KVT_CHECK(s1 > 0.0f && z1 > 0.0f && s2 == 1024.0f * s1 && z2 == 1024.0f * z1,
		  "scale max %g -> %g, zero max %g -> %g (want x1024)", s1, s2, z1, z2);
	/* no parameters: 0 */
	cfg.scheme = KVT_SCHEME_NONE;
	cfg.key_bits = cfg.value_bits = 16;
	cfg.n_sinks = 0;
	uint8_t *c3 = encode_new(&cfg, 0, k, v, &len);
	KVT_REQUIRE(c3 != NULL, "encode none");
	KVT_CHECK(kvt_chunk_param_max(c3, &s1, &z1) == 0 && s1 == 0.0f && z1 == 0.0f,
		  "scheme none: %g, %g", s1, z1);
	/* not a chunk */
	c3[0] ^= 0xff;
	KVT_CHECK(kvt_chunk_param_max(c3, &s1, &z1) == -EINVAL, "bad magic refused");
	free(c1);
	free(c2);
	free(c3);
	free(f);
	free(k);
	free(v);
}

static void test_parse_rejects_corruption(void)
{
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 2, 1, 64, KVT_DTYPE_F16);
	void *k = random_kv(&cfg, 128, 1.0f, NULL, 0), *v = random_kv(&cfg, 128, 1.0f, NULL, 0);
	size_t len;
	uint8_t *chunk = encode_new(&cfg, 0, k, v, &len);
	KVT_REQUIRE(chunk != NULL, "encode");
	char err[256];
	struct kvt_codec_config pc;
	KVT_REQUIRE(kvt_chunk_parse(chunk, len, &pc, NULL, err, sizeof(err)) == 0, "parse: %s", err);
	KVT_CHECK(pc.scheme == cfg.scheme && pc.group == cfg.group && pc.n_layers == 2 &&
			  pc.head_dim == 64 && pc.n_sinks == 4 && pc.rotate_v == 1,
		  "parsed config");
	/* every single byte flipped (one random bit) is caught */
	for (size_t i = 0; i < len; i++) {
		uint8_t bit = (uint8_t)(1u << kvt_rand_below(8));
		chunk[i] ^= bit;
		err[0] = 0;
		int rc = kvt_chunk_parse(chunk, len, NULL, NULL, err, sizeof(err));
		chunk[i] ^= bit;
		if (rc != -EBADMSG || !err[0]) {
			KVT_CHECK(0, "flip at byte %zu: rc %d '%s'", i, rc, err);
			break;
		}
	}
	/* len is the chunk's length, not a buffer's capacity: one byte short or one byte over is
	 * refused naming both sizes (a longer buffer was accepted, so an upload with trailing
	 * bytes passed) */
	uint8_t *longer = malloc(len + 1);
	KVT_REQUIRE(longer != NULL, "malloc");
	memcpy(longer, chunk, len);
	longer[len] = 0;
	char want[128];
	snprintf(want, sizeof want, "chunk length %zu is shorter than its total_bytes %zu", len - 1,
		 len);
	KVT_CHECK(kvt_chunk_parse(longer, len - 1, NULL, NULL, err, sizeof(err)) == -EBADMSG &&
			  strstr(err, want),
		  "len = size - 1: '%s'", err);
	KVT_CHECK(kvt_chunk_parse(longer, len, NULL, NULL, err, sizeof(err)) == 0,
		  "len = size: '%s'", err);
	snprintf(want, sizeof want, "chunk length %zu is longer than its total_bytes %zu", len + 1,
		 len);
	KVT_CHECK(kvt_chunk_parse(longer, len + 1, NULL, NULL, err, sizeof(err)) == -EBADMSG &&
			  strstr(err, want),
		  "len = size + 1: '%s'", err);
	KVT_CHECK(kvt_chunk_parse(longer, SIZE_MAX, NULL, NULL, err, sizeof(err)) == -EINVAL,
		  "len = SIZE_MAX: '%s'", err);
	free(longer);
	KVT_CHECK(kvt_chunk_parse(chunk, 10, NULL, NULL, err, sizeof(err)) == -EBADMSG, "tiny");
	chunk[0] ^= 1;
	KVT_CHECK(kvt_chunk_parse(chunk, len, NULL, NULL, err, sizeof(err)) == -EBADMSG &&
			  strstr(err, "magic"),
		  "magic: %s", err);
	chunk[0] ^= 1;
	chunk[4] = 2;
	KVT_CHECK(kvt_chunk_parse(chunk, len, NULL, NULL, err, sizeof(err)) == -EBADMSG &&
			  strstr(err, "version"),
		  "version: %s", err);
	chunk[4] = 1;
	chunk[len - 1] ^= 0x80;
	KVT_CHECK(kvt_chunk_parse(chunk, len, NULL, NULL, err, sizeof(err)) == -EBADMSG &&
			  strstr(err, "crc32c"),
		  "crc: %s", err);
	chunk[len - 1] ^= 0x80;
	KVT_CHECK(kvt_chunk_parse(chunk, len, NULL, NULL, err, sizeof(err)) == 0, "restored");
	KVT_CHECK(kvt_chunk_parse(NULL, len, NULL, NULL, err, sizeof(err)) == -EINVAL, "NULL");
	/* a bad pin entry is refused by decode too (it indexes with it; no crc check there) */
	uint16_t saved;
	memcpy(&saved, chunk + 64, 2);
	uint16_t badpin = 0xffff;
	memcpy(chunk + 64, &badpin, 2);
	float tmp[128 * 64];
	KVT_CHECK(kvt_decode_chunk(chunk, 0, 1, 0, 1, KVT_DTYPE_F32, tmp, NULL, err, sizeof(err)) ==
				  -EBADMSG &&
			  strstr(err, "pin table"),
		  "decode with a bad pin: %s", err);
	memcpy(chunk + 64, &saved, 2);
	KVT_CHECK(kvt_chunk_parse(chunk, 70, NULL, NULL, err, sizeof(err)) == -EBADMSG &&
			  strstr(err, "length"),
		  "cut inside the pin table: %s", err);
	free(chunk);
	free(k);
	free(v);
}

static void test_encode_decode_errors(void)
{
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 1, 1, 64, KVT_DTYPE_F16);
	void *k = random_kv(&cfg, 128, 1.0f, NULL, 0), *v = random_kv(&cfg, 128, 1.0f, NULL, 0);
	size_t cap = kvt_chunk_max_bytes(&cfg);
	uint8_t *out = aligned_alloc(64, KVT_ALIGN_UP(cap, 64));
	char err[256];
	struct kvt_codec_config bad = cfg;
	bad.group = 16;
	KVT_CHECK(kvt_encode_chunk(&bad, 0, k, v, out, cap, err, sizeof(err)) == -EINVAL &&
			  strstr(err, "group 16"),
		  "bad config: %s", err);
	KVT_CHECK(kvt_encode_chunk(&cfg, 0, NULL, v, out, cap, err, sizeof(err)) == -EINVAL &&
			  strstr(err, "k is NULL"),
		  "NULL k: %s", err);
	KVT_CHECK(kvt_encode_chunk(&cfg, 0, k, v, out, cap - 1, err, sizeof(err)) == -ENOSPC &&
			  strstr(err, "out_cap"),
		  "small out: %s", err);
	KVT_CHECK(kvt_encode_chunk(&cfg, UINT64_MAX - 5, k, v, out, cap, err, sizeof(err)) == -EINVAL &&
			  strstr(err, "first_token"),
		  "first_token overflow: %s", err);
	int64_t n = kvt_encode_chunk(&cfg, 0, k, v, out, cap, err, sizeof(err));
	KVT_REQUIRE(n > 0, "encode: %s", err);
	float buf[128 * 64];
	KVT_CHECK(kvt_decode_chunk(out, 0, 129, 0, 1, KVT_DTYPE_F32, buf, NULL, err, sizeof(err)) ==
				  -EINVAL &&
			  strstr(err, "token range"),
		  "token range: %s", err);
	KVT_CHECK(kvt_decode_chunk(out, 5, 4, 0, 1, KVT_DTYPE_F32, buf, NULL, err, sizeof(err)) ==
			  -EINVAL,
		  "reversed range");
	KVT_CHECK(kvt_decode_chunk(out, 0, 1, 0, 2, KVT_DTYPE_F32, buf, NULL, err, sizeof(err)) ==
				  -EINVAL &&
			  strstr(err, "layer range"),
		  "layer range: %s", err);
	KVT_CHECK(kvt_decode_chunk(out, 0, 1, 0, 1, 0, buf, NULL, err, sizeof(err)) == -EINVAL &&
			  strstr(err, "out_dtype"),
		  "out dtype: %s", err);
	out[0] ^= 1;
	KVT_CHECK(kvt_decode_chunk(out, 0, 1, 0, 1, KVT_DTYPE_F32, buf, NULL, err, sizeof(err)) ==
			  -EBADMSG,
		  "decode checks the header");
	out[0] ^= 1;
	KVT_CHECK(kvt_decode_chunk(out, 3, 3, 0, 1, KVT_DTYPE_F32, NULL, NULL, err, sizeof(err)) == 0,
		  "empty range is fine");
	free(out);
	free(k);
	free(v);
}

static void test_deterministic(void)
{
	struct kvt_codec_config cfg;
	random_config(&cfg);
	void *k = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
	void *v = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
	size_t l1, l2;
	uint8_t *a = encode_new(&cfg, 0, k, v, &l1), *b = encode_new(&cfg, 0, k, v, &l2);
	KVT_CHECK(a && b && l1 == l2 && memcmp(a, b, l1) == 0, "same input, same bytes (%s)",
		  cfg_str(&cfg));
	free(a);
	free(b);
	free(k);
	free(v);
}

struct thread_job {
	const struct kvt_codec_config *cfg;
	const void *k, *v;
	uint8_t *out[4];
	size_t len[4];
};

static void *encode_thread(void *arg)
{
	struct thread_job *j = arg;
	for (int i = 0; i < 4; i++)
		j->out[i] = encode_new(j->cfg, 0, j->k, j->v, &j->len[i]);
	return NULL;
}

static void test_threads_share_nothing(void)
{
	/* the codec keeps no state between calls: concurrent encodes give the same bytes */
	struct kvt_codec_config cfg;
	random_config(&cfg);
	void *k = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
	void *v = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
	struct thread_job jobs[3];
	pthread_t th[3];
	for (int t = 0; t < 3; t++) {
		jobs[t] = (struct thread_job){.cfg = &cfg, .k = k, .v = v};
		KVT_REQUIRE(pthread_create(&th[t], NULL, encode_thread, &jobs[t]) == 0, "thread");
	}
	for (int t = 0; t < 3; t++)
		pthread_join(th[t], NULL);
	for (int t = 0; t < 3; t++)
		for (int i = 0; i < 4; i++) {
			KVT_CHECK(jobs[t].out[i] && jobs[t].len[i] == jobs[0].len[0] &&
					  memcmp(jobs[t].out[i], jobs[0].out[0], jobs[0].len[0]) == 0,
				  "thread %d encode %d differs (%s)", t, i, cfg_str(&cfg));
		}
	for (int t = 0; t < 3; t++)
		for (int i = 0; i < 4; i++)
			free(jobs[t].out[i]);
	free(k);
	free(v);
}

int main(void)
{
	kvt_test_init();
	avx2 = have_avx2();
	printf("# avx2 %s\n", avx2 ? "available" : "absent");
	KVT_RUN(test_config_validate_messages);
	KVT_RUN(test_names);
	KVT_RUN(test_layout);
	KVT_RUN(test_roundtrip_random);
	KVT_RUN(test_paths_identical);
	KVT_RUN(test_paths_sweep);
	KVT_RUN(test_decode_every_range);
	KVT_RUN(test_decode_slices);
	KVT_RUN(test_norms);
	KVT_RUN(test_pins);
	KVT_RUN(test_parse_rejects_corruption);
	KVT_RUN(test_encode_decode_errors);
	KVT_RUN(test_deterministic);
	KVT_RUN(test_param_max);
	KVT_RUN(test_threads_share_nothing);
	return kvt_test_done();
}

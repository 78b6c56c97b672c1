/*
 * test_codec_rounding.c - key_rounding mse (kernels/kvt_codec.h, CHUNK_FORMAT.md "Key
 * rounding"): validation and names, the presets, scalar == AVX2 bytes, no key group's squared
 * error above min-max's (recomputed here from the chunk and the input) and every key element
 * within the quantizer's usual error bound (the half-step rule), values, norms, pins and the
 * header untouched, and decoding unchanged.
 */
#include <math.h>

#include "codec_test_util.h"

static bool avx2;

static void test_validate_and_names(void)
{
	struct kvt_codec_config c;
	char err[256] = "";
	kvt_codec_config_default(&c, 2, 2, 64, KVT_DTYPE_F16);
	KVT_CHECK(c.key_rounding == KVT_ROUNDING_MINMAX, "the default is min-max");
	c.key_rounding = KVT_ROUNDING_MSE;
	KVT_CHECK(kvt_codec_config_validate(&c, err, sizeof(err)) == 0, "mse valid: %s", err);
	c.key_rounding = 2;
	KVT_CHECK(kvt_codec_config_validate(&c, err, sizeof(err)) == -EINVAL &&
			  strstr(err, "key_rounding 2 is not one of minmax (0), mse (1)"),
		  "bad value: '%s'", err);
	c.key_rounding = KVT_ROUNDING_MSE;
	c.scheme = KVT_SCHEME_NONE, c.key_bits = c.value_bits = 16, c.rotate_v = 0;
	KVT_CHECK(kvt_codec_config_validate(&c, err, sizeof(err)) == -EINVAL &&
			  strstr(err, "key_rounding mse needs a quantizing scheme"),
		  "none + mse: '%s'", err);
	c.key_rounding = KVT_ROUNDING_MINMAX;
	KVT_CHECK(kvt_codec_config_validate(&c, err, sizeof(err)) == 0, "none + minmax: %s", err);

	KVT_CHECK(!strcmp(kvt_rounding_name(KVT_ROUNDING_MINMAX), "minmax") &&
			  !strcmp(kvt_rounding_name(KVT_ROUNDING_MSE), "mse") &&
			  kvt_rounding_name(2) == NULL,
		  "names");
	KVT_CHECK(kvt_rounding_parse("minmax") == KVT_ROUNDING_MINMAX &&
			  kvt_rounding_parse("mse") == KVT_ROUNDING_MSE &&
			  kvt_rounding_parse("MSE") == -EINVAL && kvt_rounding_parse(NULL) == -EINVAL,
		  "parse");

	/* the presets: both round keys by min-max (key_rounding mse did not generalize to
	 * held-out texts, docs/DECISIONS.md), and a preset's name is only reported for its own
	 * rounding */
	kvt_codec_config_default(&c, 2, 2, 64, KVT_DTYPE_F16);
	KVT_REQUIRE(kvt_codec_preset(&c, "kvtier-int2", err, sizeof(err)) == 0, "%s", err);
	KVT_CHECK(c.key_rounding == KVT_ROUNDING_MINMAX, "kvtier-int2 uses min-max");
	KVT_CHECK(!strcmp(kvt_codec_preset_name(&c), "kvtier-int2"), "kvtier-int2 by name");
	c.key_rounding = KVT_ROUNDING_MSE;
	KVT_CHECK(kvt_codec_preset_name(&c) == NULL, "kvtier-int2 with mse is no preset");
	KVT_REQUIRE(kvt_codec_preset(&c, "oscar-int2", err, sizeof(err)) == 0, "%s", err);
	KVT_CHECK(c.key_rounding == KVT_ROUNDING_MINMAX, "oscar-int2 uses min-max");
	KVT_CHECK(!strcmp(kvt_codec_preset_name(&c), "oscar-int2"), "oscar-int2 by name");
}

static void random_mse_config(struct kvt_codec_config *cfg)
{
	do {
		random_config(cfg);
	} while (cfg->scheme == KVT_SCHEME_NONE);
	cfg->key_rounding = KVT_ROUNDING_MSE;
}

static void test_paths_identical(void)
{
	if (!avx2) {
		printf("# no AVX2: skipped\n");
		return;
	}
	for (int it = 0; it < 60 && !kvt_test_failures; it++) {
		struct kvt_codec_config cfg;
		random_mse_config(&cfg);
		uint32_t low[2] = {kvt_rand_below(cfg.chunk_tokens), kvt_rand_below(cfg.chunk_tokens)};
		void *k = random_kv(&cfg, cfg.chunk_tokens, 2.0f, low, 2);
		void *v = random_kv(&cfg, cfg.chunk_tokens, 1.0f, NULL, 0);
		size_t len[2];
		uint8_t *c[2];
		uint64_t first = kvt_rand_below(3) * cfg.chunk_tokens;
		for (int p = 0; p < 2; p++) {
			kvt_codec_set_isa(p ? KVT_ISA_AVX2 : KVT_ISA_SCALAR);
			c[p] = encode_new(&cfg, first, k, v, &len[p]);
		}
		kvt_codec_set_isa(KVT_ISA_AUTO);
		KVT_REQUIRE(c[0] && c[1], "encode");
		KVT_CHECK(len[0] == len[1] && memcmp(c[0], c[1], len[0]) == 0,
			  "mse chunk bytes differ between scalar and avx2 (%s)", cfg_str(&cfg));
		free(c[0]);
		free(c[1]);
		free(k);
		free(v);
	}
}


/* The encoder's key input in its quantization domain: rotated (hadamard, oscar) and divided
 * by the stored joint norm (oscar), [L][B][H][d] f32, the same operations as the encoder. */
static float *key_domain(const struct kvt_codec_config *cfg, const uint8_t *chunk,
			 const struct kvt_chunk_layout *lay, const void *k)
{
	const uint32_t B = cfg->chunk_tokens, L = cfg->n_layers, H = cfg->n_kv_heads,
		       d = cfg->head_dim;
	const size_t row = (size_t)H * d, n = (size_t)L * B * row;
	float *x = malloc(n * 4);
	kvt_convert(k, cfg->dtype, x, KVT_DTYPE_F32, n);
	for (uint32_t l = 0; l < L; l++)
		for (uint32_t t = 0; t < B; t++) {
			float *xr = x + ((size_t)l * B + t) * row;
			if (kvt_scheme_rotates_keys(cfg->scheme))
				kvt_hadamard_f32(xr, H, d);
			if (cfg->scheme != KVT_SCHEME_OSCAR)
				continue;
			float nrm;
			memcpy(&nrm, chunk + lay->data_offset + (size_t)l * lay->layer_bytes +
					     lay->norms_off + 4 * t,
			       4);
			for (size_t c = 0; c < row; c++)
				xr[c] = xr[c] / nrm;
		}
	return x;
}

/* Squared error of one key group of a chunk, summed in element order in f32 the way the
 * encoder compares candidates; pinned tokens left out. */
static float group_err(const struct kvt_codec_config *cfg, const uint8_t *chunk,
		       const struct kvt_chunk_layout *lay, const float *x, const uint8_t *pin,
		       uint32_t l, uint32_t h, uint32_t t0, uint32_t c0, uint32_t *changed_out,
		       const uint8_t *other)
{
	const uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim,
		       G = cfg->group, bits = cfg->key_bits;
	const uint32_t sdt = cfg->dtype == KVT_DTYPE_BF16 ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
	const uint32_t gv = (uint32_t)kvt_value_group(cfg);
	const bool per_channel = cfg->scheme != KVT_SCHEME_HADAMARD;
	const uint8_t *sec = chunk + lay->data_offset + (size_t)l * lay->layer_bytes;
	const uint16_t *sc = (const uint16_t *)(const void *)(sec + lay->k_scale_off);
	const uint16_t *zr = (const uint16_t *)(const void *)(sec + lay->k_zero_off);
	size_t pi = per_channel ? ((size_t)h * (B / G) + t0 / G) * d + c0
				: ((size_t)h * B + t0) * (d / gv) + c0 / gv;
	if (other) {
		const uint8_t *osec = other + lay->data_offset + (size_t)l * lay->layer_bytes;
		uint16_t os, oz;
		memcpy(&os, osec + lay->k_scale_off + 2 * pi, 2);
		memcpy(&oz, osec + lay->k_zero_off + 2 * pi, 2);
		*changed_out += os != sc[pi] || oz != zr[pi];
	}
	float s = kvt_widen16(sc[pi], sdt), z = kvt_widen16(zr[pi], sdt);
	float e = 0.0f;
	uint32_t n = per_channel ? G : gv;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t t = per_channel ? t0 + i : t0, c = per_channel ? c0 : c0 + i;
		if (pin[t])
			continue;
		const uint8_t *codes = sec + lay->k_codes_off + ((size_t)h * B + t) * d * bits / 8;
		float xv = x[((size_t)l * B + t) * H * d + (size_t)h * d + c];
		float y = (float)packed_code(codes, c, bits, d) * s + z;
		float dl = y - xv;
		e = e + dl * dl;
		/* the half-step rule: every element within the quantizer's usual bound */
		KVT_CHECK(s == 0.0f || fabsf(dl) <= quant_bound(s, z, bits, sdt, xv),
			  "l%u h%u t%u c%u: |x^ - x| = %g above the bound %g (s %g z %g)", l, h, t, c,
			  (double)fabsf(dl), (double)quant_bound(s, z, bits, sdt, xv), (double)s,
			  (double)z);
	}
	return e;
}

static void test_never_worse_than_minmax(void)
{
	uint64_t groups = 0, changed = 0;
	double sum_mm = 0, sum_mse = 0;
	for (int it = 0; it < 60 && !kvt_test_failures; it++) {
		struct kvt_codec_config cfg, mm;
		random_mse_config(&cfg);
		if (it % 3 == 0) /* the preset's shape class: oscar 2 bits, G 32 */
			cfg.scheme = KVT_SCHEME_OSCAR, cfg.key_bits = 2, cfg.group = 32,
			cfg.rotate_v = 1;
		mm = cfg;
		mm.key_rounding = KVT_ROUNDING_MINMAX;
		const uint32_t B = cfg.chunk_tokens, L = cfg.n_layers, H = cfg.n_kv_heads,
			       d = cfg.head_dim;
		uint32_t low[2] = {kvt_rand_below(B), kvt_rand_below(B)};
		void *k = random_kv(&cfg, B, 2.0f, low, 2);
		void *v = random_kv(&cfg, B, 1.0f, NULL, 0);
		uint64_t first = kvt_rand_below(2) * B;
		size_t len_mse = 0, len_mm = 0;
		uint8_t *a = encode_new(&cfg, first, k, v, &len_mse);
		uint8_t *b = encode_new(&mm, first, k, v, &len_mm);
		KVT_REQUIRE(a && b, "encode");
		KVT_REQUIRE(len_mse == len_mm, "sizes %zu %zu", len_mse, len_mm);

		/* the header is the same but for the crc: decoders cannot tell them apart */
		struct kvt_chunk_header ha, hb;
		memcpy(&ha, a, sizeof(ha));
		memcpy(&hb, b, sizeof(hb));
		ha.crc32c = hb.crc32c = 0;
		KVT_CHECK(memcmp(&ha, &hb, sizeof(ha)) == 0, "headers differ (%s)", cfg_str(&cfg));
		struct kvt_codec_config pc;
		char err[256] = "";
		KVT_REQUIRE(kvt_chunk_parse(a, len_mse, &pc, NULL, err, sizeof(err)) == 0, "%s", err);
		KVT_CHECK(pc.key_rounding == 0, "parse leaves key_rounding 0");

		struct kvt_chunk_layout lay;
		KVT_REQUIRE(kvt_chunk_layout(&cfg, ha.n_pinned, &lay) == 0, "layout");
		uint8_t pin[KVT_MAX_CHUNK_TOKENS] = {0};
		for (uint32_t i = 0; i < ha.n_pinned; i++) {
			uint16_t p;
			memcpy(&p, a + 64 + 2 * i, 2);
			pin[p] = 1;
		}
		/* pins, norms, value arrays and the pinned copies are byte-identical */
		KVT_CHECK(memcmp(a + 64, b + 64, lay.data_offset - 64) == 0, "pin tables differ");
		for (uint32_t l = 0; l < L; l++) {
			const uint8_t *sa = a + lay.data_offset + l * lay.layer_bytes;
			const uint8_t *sb = b + lay.data_offset + l * lay.layer_bytes;
			KVT_CHECK(memcmp(sa + lay.norms_off, sb + lay.norms_off, lay.norms_bytes) == 0 &&
					  memcmp(sa + lay.v_scale_off, sb + lay.v_scale_off,
						 lay.k_codes_off - lay.v_scale_off) == 0 &&
					  memcmp(sa + lay.v_codes_off, sb + lay.v_codes_off,
						 lay.layer_bytes - lay.v_codes_off) == 0,
				  "layer %u: something other than the keys changed (%s)", l,
				  cfg_str(&cfg));
		}

		float *x = key_domain(&cfg, a, &lay, k);
		const bool per_channel = cfg.scheme != KVT_SCHEME_HADAMARD;
		const uint32_t gv = (uint32_t)kvt_value_group(&cfg);
		for (uint32_t l = 0; l < L && !kvt_test_failures; l++)
			for (uint32_t h = 0; h < H; h++)
				for (uint32_t t0 = 0; t0 < B; t0 += per_channel ? cfg.group : 1)
					for (uint32_t c0 = 0; c0 < d; c0 += per_channel ? 1 : gv) {
						if (!per_channel && pin[t0])
							continue;
						uint32_t ch = 0;
						float ea = group_err(&cfg, a, &lay, x, pin, l, h, t0, c0,
								     &ch, NULL);
						float eb = group_err(&mm, b, &lay, x, pin, l, h, t0, c0,
								     &ch, a);
						groups++;
						changed += ch;
						sum_mse += ea;
						sum_mm += eb;
						KVT_CHECK(!(ea > eb),
							  "group l%u h%u t%u c%u: mse error %g above min-max's "
							  "%g (%s)",
							  l, h, t0, c0, (double)ea, (double)eb, cfg_str(&cfg));
					}

		/* decoding reads the chosen grid: the mse chunk decodes like any other chunk
		 * and within the key range (codes clamp inside it) */
		size_t n = (size_t)L * B * H * d;
		float *kd = malloc(n * 4), *vd = malloc(n * 4), *kd2 = malloc(n * 4),
		      *vd2 = malloc(n * 4);
		KVT_CHECK(kvt_decode_chunk(a, 0, B, 0, L, KVT_DTYPE_F32, kd, vd, err, sizeof(err)) == 0,
			  "decode: %s", err);
		KVT_CHECK(kvt_decode_chunk(b, 0, B, 0, L, KVT_DTYPE_F32, kd2, vd2, err, sizeof(err)) ==
				  0,
			  "decode: %s", err);
		KVT_CHECK(memcmp(vd, vd2, n * 4) == 0, "values decode differently (%s)",
			  cfg_str(&cfg));
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t t = 0; t < B; t++)
				if (pin[t])
					KVT_CHECK(memcmp(kd + ((size_t)l * B + t) * H * d,
							 kd2 + ((size_t)l * B + t) * H * d, H * d * 4) == 0,
						  "pinned token %u differs", t);
		free(kd);
		free(vd);
		free(kd2);
		free(vd2);
		free(x);
		free(a);
		free(b);
		free(k);
		free(v);
	}
	printf("# %llu key groups, %llu re-ranged by mse; squared error mse/min-max %.3f\n",
	       (unsigned long long)groups, (unsigned long long)changed, sum_mse / sum_mm);
	KVT_CHECK(changed > groups / 10, "mse changed only %llu of %llu groups",
		  (unsigned long long)changed, (unsigned long long)groups);
	KVT_CHECK(sum_mse < 0.95 * sum_mm, "mse's total error %g is not below min-max's %g",
		  sum_mse, sum_mm);
}

/* Edge cases: zeros of both signs, constant channels, a zero token, huge values; both paths
 * agree and no group gets worse (the same check as above, on awkward data). */
static void test_edge_groups(void)
{
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 1, 2, 64, KVT_DTYPE_F32);
	cfg.chunk_tokens = 64;
	cfg.n_sinks = 1;
	cfg.key_rounding = KVT_ROUNDING_MSE;
	for (uint32_t scheme = KVT_SCHEME_KIVI; scheme <= KVT_SCHEME_OSCAR; scheme++) {
		cfg.scheme = scheme;
		cfg.rotate_v = kvt_scheme_rotates_keys(scheme);
		size_t n = (size_t)64 * 2 * 64;
		float *k = malloc(n * 4), *v = malloc(n * 4);
		fill_f32(k, n, 1.0f);
		fill_f32(v, n, 1.0f);
		for (uint32_t t = 0; t < 64; t++)
			for (uint32_t h = 0; h < 2; h++) {
				float *r = k + ((size_t)t * 2 + h) * 64;
				r[3] = 0.0f;
				r[5] = t % 2 ? -0.0f : 0.0f;
				r[7] = 1.5f;
				r[9] = t == 40 ? 3e38f : r[9];
				if (t == 9)
					memset(r, 0, 64 * 4);
			}
		size_t len[2];
		uint8_t *c[2];
		for (int p = 0; p < 2; p++) {
			kvt_codec_set_isa(p && avx2 ? KVT_ISA_AVX2 : KVT_ISA_SCALAR);
			c[p] = encode_new(&cfg, 0, k, v, &len[p]);
		}
		kvt_codec_set_isa(KVT_ISA_AUTO);
		KVT_REQUIRE(c[0] && c[1], "encode");
		KVT_CHECK(len[0] == len[1] && memcmp(c[0], c[1], len[0]) == 0,
			  "edge data: paths differ (%s)", cfg_str(&cfg));
		float *kd = malloc(n * 4);
		char err[256] = "";
		KVT_CHECK(kvt_decode_chunk(c[0], 0, 64, 0, 1, KVT_DTYPE_F32, kd, NULL, err,
					   sizeof(err)) == 0,
			  "decode: %s", err);
		if (scheme == KVT_SCHEME_KIVI) /* no rotation: a constant channel stays exact */
			for (uint32_t t = 1; t < 64; t++)
				KVT_CHECK(t == 9 || kd[(size_t)t * 128 + 7] == 1.5f, "constant channel t%u: %g",
					  t, (double)kd[(size_t)t * 128 + 7]);
		free(kd);
		free(c[0]);
		free(c[1]);
		free(k);
		free(v);
	}
}

/* The encoder rejects nothing new: errors keep their messages with mse on. */
static void test_encode_errors(void)
{
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 1, 1, 64, KVT_DTYPE_F16);
	cfg.key_rounding = 5;
	char err[256] = "";
	uint8_t out[64];
	uint16_t kv[128 * 64] = {0};
	KVT_CHECK(kvt_encode_chunk(&cfg, 0, kv, kv, out, sizeof(out), err, sizeof(err)) == -EINVAL &&
			  strstr(err, "key_rounding 5"),
		  "encode validates key_rounding: '%s'", err);
}

int main(void)
{
	kvt_test_init();
	avx2 = have_avx2();
	printf("# avx2 %s\n", avx2 ? "available" : "absent");
	KVT_RUN(test_validate_and_names);
	KVT_RUN(test_paths_identical);
	KVT_RUN(test_never_worse_than_minmax);
	KVT_RUN(test_edge_groups);
	KVT_RUN(test_encode_errors);
	return kvt_test_done();
}

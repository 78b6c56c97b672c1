/*
 * codec_test_util.h - helpers shared by the codec tests: random tensors in any dtype, random
 * configs, and running one thing under both instruction sets.
 */
#ifndef CODEC_TEST_UTIL_H
#define CODEC_TEST_UTIL_H

#include <errno.h>
#include <stdbool.h>

#include "codec_internal.h"
#include "kvt_codec.h"
#include "kvt_test.h"

static inline bool have_avx2(void)
{
	enum kvt_isa was = kvt_codec_active_isa();
	bool ok = kvt_codec_set_isa(KVT_ISA_AVX2) == 0;
	kvt_codec_set_isa(was);
	return ok;
}

/* n values: normal * amp, with some channels carrying outliers like real keys do */
static inline void fill_f32(float *x, size_t n, float amp)
{
	for (size_t i = 0; i < n; i++) {
		float v = kvt_rand_normal() * amp;
		if (kvt_rand_below(64) == 0)
			v *= 8.0f;
		x[i] = v;
	}
}

static inline void *alloc_tensor(uint32_t dtype, size_t n)
{
	return aligned_alloc(64, KVT_ALIGN_UP(n * kvt_dtype_size(dtype) + 64, 64));
}

/* Random K or V [L][B][H][d] in dtype; low-norm "sink" tokens at the given rows. */
static inline void *random_kv(const struct kvt_codec_config *cfg, uint32_t ntok, float amp,
			      const uint32_t *low_tokens, uint32_t n_low)
{
	size_t row = (size_t)cfg->n_kv_heads * cfg->head_dim;
	size_t n = (size_t)cfg->n_layers * ntok * row;
	float *f = malloc(n * 4);
	fill_f32(f, n, amp);
	for (uint32_t l = 0; l < cfg->n_layers; l++)
		for (uint32_t i = 0; i < n_low; i++)
			for (size_t c = 0; c < row; c++)
				f[((size_t)l * ntok + low_tokens[i]) * row + c] *= 0.1f;
	void *out = alloc_tensor(cfg->dtype, n);
	kvt_convert(f, KVT_DTYPE_F32, out, cfg->dtype, n);
	free(f);
	return out;
}

/* The code widths the format allows; random tests draw from all of them. */
static const uint32_t kvt_test_bits[] = {2, 3, 4, 8};
#define KVT_TEST_N_BITS 4u
static inline uint32_t random_bits(void)
{
	return kvt_test_bits[kvt_rand_below(KVT_TEST_N_BITS)];
}

/* Code of channel c of a packed row of d channels, written out from CHUNK_FORMAT.md (not
 * from the kernels): little end first at 2, 4, 8 bits; at 3 bits the low 2 bits as a 2-bit
 * row in bytes [0, d/4) and the high bit at bit c % 8 of byte d/4 + c/8. */
static inline uint32_t packed_code(const uint8_t *p, uint32_t c, uint32_t bits, uint32_t d)
{
	if (bits == 3) {
		uint32_t lo = (p[c / 4] >> ((c % 4) * 2)) & 3u;
		uint32_t hi = (p[d / 4 + c / 8] >> (c % 8)) & 1u;
		return lo | hi << 2;
	}
	uint32_t per = 8 / bits;
	return (p[c / per] >> ((c % per) * bits)) & ((1u << bits) - 1);
}

static inline void random_config(struct kvt_codec_config *cfg)
{
	static const uint32_t dims[] = {64, 128, 256}, groups[] = {32, 64, 128};
	uint32_t d = dims[kvt_rand_below(3)];
	kvt_codec_config_default(cfg, 1 + kvt_rand_below(3), 1 + kvt_rand_below(4), d,
				 1 + kvt_rand_below(3));
	cfg->scheme = kvt_rand_below(4);
	cfg->group = groups[kvt_rand_below(3)];
	cfg->chunk_tokens = cfg->group * (1 + kvt_rand_below(256 / cfg->group));
	if (cfg->scheme == KVT_SCHEME_NONE) {
		cfg->key_bits = cfg->value_bits = 16;
	} else {
		cfg->key_bits = random_bits();
		cfg->value_bits = random_bits();
	}
	cfg->rotate_v = kvt_scheme_rotates_keys(cfg->scheme) ? kvt_rand_below(2) : 0;
	cfg->n_sinks = kvt_rand_below(6);
	if (cfg->scheme != KVT_SCHEME_NONE && kvt_rand_below(2)) {
		cfg->pin_detect_ratio = 0.5f;
		cfg->pin_detect_max = kvt_rand_below(5);
	}
}

static inline const char *cfg_str(const struct kvt_codec_config *c)
{
	static char buf[200];
	snprintf(buf, sizeof(buf),
		 "%s K%u V%u G%u B%u L%u H%u d%u %s rotv%u S%u det%.2f/%u",
		 kvt_scheme_name(c->scheme), c->key_bits, c->value_bits, c->group, c->chunk_tokens,
		 c->n_layers, c->n_kv_heads, c->head_dim, kvt_dtype_name(c->dtype), c->rotate_v,
		 c->n_sinks, (double)c->pin_detect_ratio, c->pin_detect_max);
	return buf;
}

/* Encodes into a fresh buffer; returns it (size in *len) or NULL. */
static inline uint8_t *encode_new(const struct kvt_codec_config *cfg, uint64_t first,
				  const void *k, const void *v, size_t *len)
{
	size_t cap = kvt_chunk_max_bytes(cfg);
	uint8_t *out = aligned_alloc(64, KVT_ALIGN_UP(cap, 64));
	char err[256] = "";
	int64_t n = kvt_encode_chunk(cfg, first, k, v, out, cap, err, sizeof(err));
	if (n < 0) {
		printf("# encode failed: %s (%s)\n", err, cfg_str(cfg));
		free(out);
		return NULL;
	}
	*len = (size_t)n;
	return out;
}

static inline float f32_at(const void *p, uint32_t dtype, size_t i)
{
	if (dtype == KVT_DTYPE_F16)
		return kvt_f16_to_f32(((const uint16_t *)p)[i]);
	if (dtype == KVT_DTYPE_BF16)
		return kvt_bf16_to_f32(((const uint16_t *)p)[i]);
	return ((const float *)p)[i];
}

/*
 * The quantizer's error bound for one element (CHUNK_FORMAT.md "Error bound"): half a step
 * for rounding, plus what storing the zero and the scale in 16 bits can add at the grid's ends
 * (half an ulp of the zero, qmax half-ulps of the scale). For f16 scales and zero-centred
 * groups this is within one step; bf16's 8-bit mantissa makes the zero term dominate for
 * one-signed groups at 8 bits.
 */
static inline float quant_bound(float s, float z, uint32_t bits, uint32_t sdt, float x)
{
	float eps = sdt == KVT_DTYPE_BF16 ? 0x1p-8f : 0x1p-11f; /* half-ulp, relative */
	float abs_half = sdt == KVT_DTYPE_BF16 ? 0.0f : 0x1p-25f; /* f16 subnormal spacing / 2 */
	float qmax = (float)((1u << bits) - 1);
	return 0.5f * s + fabsf(z) * eps + qmax * s * eps + (qmax + 1.0f) * abs_half +
	       1e-6f * fabsf(x);
}

#endif

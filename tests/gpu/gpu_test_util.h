/*
 * gpu_test_util.h - what the GPU tests share: random codec configs and K/V data shaped like a
 * model's (a few outlier channels, varying token norms, low-norm sink tokens, some exact-zero
 * and constant rows for the quantizer's edge cases), and element access to a chunk's arrays.
 */
#ifndef GPU_TEST_UTIL_H
#define GPU_TEST_UTIL_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_codec.h"
#include "kvt_cuda.h"
#include "kvt_test.h"

#define GPU_SKIP 77

static inline uint32_t pick_u32(const uint32_t *v, uint32_t n) { return v[kvt_rand_below(n)]; }

/* A random valid config: every scheme, bit width, group, chunk size, head_dim and dtype. */
static inline void random_config(struct kvt_codec_config *cfg, bool equal_bits)
{
	static const uint32_t schemes[] = {KVT_SCHEME_OSCAR, KVT_SCHEME_OSCAR, KVT_SCHEME_KIVI,
					   KVT_SCHEME_HADAMARD, KVT_SCHEME_NONE};
	static const uint32_t bits[] = {2, 3, 4, 8, 2, 3};
	static const uint32_t groups[] = {32, 64, 128, 32};
	static const uint32_t dims[] = {64, 128, 256, 128};
	static const uint32_t heads[] = {1, 2, 4, 8};
	static const uint32_t dtypes[] = {KVT_DTYPE_F16, KVT_DTYPE_BF16, KVT_DTYPE_F32,
					  KVT_DTYPE_BF16};
	memset(cfg, 0, sizeof(*cfg));
	cfg->scheme = pick_u32(schemes, 5);
	cfg->key_bits = pick_u32(bits, 6);
	cfg->value_bits = equal_bits ? cfg->key_bits : pick_u32(bits, 6);
	cfg->group = pick_u32(groups, 4);
	uint32_t mult = 1u << kvt_rand_below(3);
	cfg->chunk_tokens = cfg->group * mult;
	if (cfg->chunk_tokens < 32)
		cfg->chunk_tokens = 32;
	cfg->n_layers = 1 + kvt_rand_below(3);
	cfg->n_kv_heads = pick_u32(heads, 4);
	cfg->head_dim = pick_u32(dims, 4);
	cfg->dtype = pick_u32(dtypes, 4);
	cfg->rotate_v = (cfg->scheme == KVT_SCHEME_OSCAR || cfg->scheme == KVT_SCHEME_HADAMARD)
				? (kvt_rand_below(4) != 0)
				: 0;
	uint32_t smax = cfg->chunk_tokens < KVT_MAX_SINKS ? cfg->chunk_tokens : KVT_MAX_SINKS;
	uint32_t r = kvt_rand_below(4);
	cfg->n_sinks = r == 0 ? 0 : r == 1 ? 4 : r == 2 ? 1 + kvt_rand_below(smax) : smax;
	if (cfg->scheme == KVT_SCHEME_NONE) {
		cfg->key_bits = cfg->value_bits = 16;
		cfg->rotate_v = 0;
	}
}

/* The shape of kvtier's INT2 preset since session 4 ("kvtier-int2": oscar, 3-bit keys,
 * 2-bit values, G 64, B 64, rotate_v, S 8, W 128), written out so the GPU tests keep this
 * shape whatever the preset becomes. */
static inline void k3_preset_config(struct kvt_codec_config *cfg, uint32_t n_layers,
				    uint32_t n_kv_heads, uint32_t head_dim, uint32_t dtype)
{
	kvt_codec_config_default(cfg, n_layers, n_kv_heads, head_dim, dtype); /* oscar, rotate_v */
	cfg->key_bits = 3;
	cfg->value_bits = 2;
	cfg->group = 64;
	cfg->chunk_tokens = 64;
	cfg->n_sinks = 8;
	cfg->recent_exact_tokens = 128;
}

static inline void describe(const struct kvt_codec_config *c, char *buf, size_t len)
{
	snprintf(buf, len, "%s k%u v%u G%u B%u L%u H%u d%u %s rotv%u S%u",
		 kvt_scheme_name(c->scheme), c->key_bits, c->value_bits, c->group,
		 c->chunk_tokens, c->n_layers, c->n_kv_heads, c->head_dim, kvt_dtype_name(c->dtype),
		 c->rotate_v, c->n_sinks);
}

/*
 * [n_layers][ntok][H][d] K and V, stored in dtype into k/v. Keys: per-channel bias and a
 * few outlier channels, token norms that vary by 4x, tokens 0..2 of the session at a low
 * norm (sinks); values: small for sinks. Some rows exactly zero or constant.
 */
static inline void random_kv(const struct kvt_codec_config *cfg, uint64_t first_token,
			     uint32_t ntok, void *k, void *v)
{
	uint32_t L = cfg->n_layers, H = cfg->n_kv_heads, d = cfg->head_dim;
	size_t n = (size_t)L * ntok * H * d;
	float *kf = malloc(n * 4), *vf = malloc(n * 4);
	float *bias = malloc((size_t)H * d * 4);
	for (size_t i = 0; i < (size_t)H * d; i++)
		bias[i] = 0.5f * kvt_rand_normal() + (kvt_rand_below(16) == 0 ? 6.0f : 0.0f);
	for (uint32_t l = 0; l < L; l++)
		for (uint32_t t = 0; t < ntok; t++) {
			uint64_t pos = first_token + t;
			float tn = pos < 3 ? 0.15f : 0.5f + 1.5f * kvt_rand_uniform();
			uint32_t kind = kvt_rand_below(64);
			for (uint32_t h = 0; h < H; h++)
				for (uint32_t c = 0; c < d; c++) {
					size_t i = (((size_t)l * ntok + t) * H + h) * d + c;
					float kx = tn * (kvt_rand_normal() + bias[h * d + c]);
					float vx = (pos < 3 ? 0.05f : 1.0f) * kvt_rand_normal();
					if (kind == 0) {
						kx = 0.0f;
						vx = 0.0f;
					} else if (kind == 1) {
						vx = 0.75f;
					}
					kf[i] = kx;
					vf[i] = vx;
				}
		}
	kvt_convert(kf, KVT_DTYPE_F32, k, cfg->dtype, n);
	kvt_convert(vf, KVT_DTYPE_F32, v, cfg->dtype, n);
	free(kf);
	free(vf);
	free(bias);
}

/* Code c of a packed row of d codes. 3-bit rows: bytes [0, d/4) the low 2 bits as a 2-bit
 * row, bytes [d/4, 3d/8) the high bits (channel c at bit c % 8 of byte d/4 + c/8). */
static inline uint32_t chunk_code(const uint8_t *row, uint32_t c, uint32_t bits, uint32_t d)
{
	if (bits == 3)
		return ((row[c / 4] >> ((c % 4) * 2)) & 3u) | (((row[d / 4 + c / 8] >> (c % 8)) & 1u) << 2);
	uint32_t per = 8 / bits;
	return (row[c / per] >> ((c % per) * bits)) & ((1u << bits) - 1);
}

static inline float widen_scale(uint16_t b, uint32_t dtype)
{
	return dtype == KVT_DTYPE_BF16 ? kvt_bf16_to_f32(b) : kvt_f16_to_f32(b);
}

/* Index of the scale / zero pair of element (head h, token t, channel c) in a layer's key
 * (is_v 0) or value arrays: keys per channel over G tokens (but hadamard: per token),
 * values per token over the value group of channels. */
static inline size_t chunk_qp_index(const struct kvt_codec_config *cfg, int is_v, uint32_t h,
				    uint32_t t, uint32_t c)
{
	const uint32_t B = cfg->chunk_tokens, d = cfg->head_dim, G = cfg->group;
	const uint32_t gv = G < d ? G : d, ng = d / gv;
	if (!is_v && cfg->scheme != KVT_SCHEME_HADAMARD)
		return ((size_t)h * (B / G) + t / G) * d + c;
	return ((size_t)h * B + t) * ng + c / gv;
}

/* Dequantized element (code * scale + zero, the rotated/normalised domain) and its step. */
static inline float chunk_dq(const uint8_t *chunk, const struct kvt_codec_config *cfg,
			     const struct kvt_chunk_layout *lay, uint32_t l, int is_v, uint32_t h,
			     uint32_t t, uint32_t c, float *step, float *zero)
{
	const uint32_t B = cfg->chunk_tokens, d = cfg->head_dim;
	const uint8_t *sec = chunk + lay->data_offset + (size_t)l * lay->layer_bytes;
	uint32_t bits = is_v ? cfg->value_bits : cfg->key_bits;
	const uint8_t *row = sec + (is_v ? lay->v_codes_off : lay->k_codes_off) +
			     ((size_t)h * B + t) * d * bits / 8;
	const size_t si = chunk_qp_index(cfg, is_v, h, t, c);
	uint16_t sb, zb;
	memcpy(&sb, sec + (is_v ? lay->v_scale_off : lay->k_scale_off) + si * 2, 2);
	memcpy(&zb, sec + (is_v ? lay->v_zero_off : lay->k_zero_off) + si * 2, 2);
	float s = widen_scale(sb, cfg->dtype), z = widen_scale(zb, cfg->dtype);
	*step = s;
	if (zero)
		*zero = z;
	return (float)chunk_code(row, c, bits, d) * s + z;
}

/* The attention reference of the GPU tests: naive softmax attention in double of nq query
 * rows q [nq][d] over ntok rows of k, v [ntok][H][d] (f32); query head i reads KV head
 * i / (nq / H). out [nq][d]. */
static inline void naive_attention(const float *q, uint32_t nq, const float *k, const float *v,
				   size_t ntok, uint32_t H, uint32_t d, float scale, float *out)
{
	double *lg = malloc((ntok ? ntok : 1) * sizeof(double));
	const uint32_t R = nq / H;
	for (uint32_t i = 0; i < nq; i++) {
		const uint32_t h = i / R;
		double mx = -INFINITY, sum = 0.0;
		for (size_t t = 0; t < ntok; t++) {
			double a = 0.0;
			for (uint32_t c = 0; c < d; c++)
				a += (double)q[(size_t)i * d + c] * k[(t * H + h) * d + c];
			lg[t] = a * scale;
			mx = lg[t] > mx ? lg[t] : mx;
		}
		for (size_t t = 0; t < ntok; t++)
			sum += lg[t] = exp(lg[t] - mx);
		for (uint32_t c = 0; c < d; c++) {
			double o = 0.0;
			for (size_t t = 0; t < ntok; t++)
				o += lg[t] * v[(t * H + h) * d + c];
			out[(size_t)i * d + c] = (float)(o / sum);
		}
	}
	free(lg);
}

/* ||a - ref|| / ||ref|| (infinite when a holds a NaN or an infinity) */
static inline double rel_err(const float *a, const float *ref, size_t n)
{
	double num = 0.0, den = 0.0;
	for (size_t i = 0; i < n; i++) {
		if (!isfinite(a[i]))
			return INFINITY;
		double e = (double)a[i] - ref[i];
		num += e * e;
		den += (double)ref[i] * ref[i];
	}
	return sqrt(num / (den > 0 ? den : 1e-30));
}

#endif

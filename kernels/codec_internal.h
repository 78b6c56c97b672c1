/*
 * codec_internal.h - what the CPU codec's modules share and nothing else includes (tests do,
 * to compare the scalar and AVX2 kernels directly).
 *
 * The codec is split into drivers (encode, decode, attend: plain C, one copy) and kernels
 * (the hot loops), reached through one table of function pointers per instruction set. The
 * AVX2 table must produce bit-identical results to the scalar one: every kernel documents the
 * exact sequence of float operations it performs, and both versions follow it (8 summation
 * lanes reduced in a fixed order, the same butterfly stages, division where the format says
 * divide, no FMA).
 */
#ifndef KVT_CODEC_INTERNAL_H
#define KVT_CODEC_INTERNAL_H

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvt_codec.h"

#define KVT_ALIGN_UP(x, a) (((x) + ((size_t)(a) - 1)) & ~((size_t)(a) - 1))

/* Asserts that stay on in release builds (CONVENTIONS.md): a broken invariant aborts with
 * file:line instead of writing a wrong chunk. */
#define KVT_ASSERT(cond)                                                                  \
	do {                                                                              \
		if (!(cond))                                                              \
			kvt_codec_assert_fail(#cond, __FILE__, __LINE__);                 \
	} while (0)
_Noreturn void kvt_codec_assert_fail(const char *what, const char *file, int line);

/* Writes a message into err (when non-NULL) and returns rc. */
int kvt_codec_errf(char *err, size_t errlen, int rc, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* ---- Scalar building blocks (also used by the AVX2 drivers for per-group work) ---------- */

static inline float kvt_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, 4);
	return f;
}
static inline uint32_t kvt_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	return u;
}

/* The conversions, inline so hot scalar loops do not pay a call per element; the public
 * kvt_f16_to_f32() etc. wrap these. Bit-exact round-to-nearest-even, subnormals, inf, NaN. */
static inline float kvt_f16_to_f32_inline(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t mant = h & 0x3ff;
	if (exp == 0x1f)
		return kvt_bits_f32(sign | 0x7f800000u | (mant << 13));
	if (exp != 0)
		return kvt_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
	if (mant == 0)
		return kvt_bits_f32(sign);
	/* subnormal: normalize */
	uint32_t e = 113;
	while (!(mant & 0x400)) {
		mant <<= 1;
		e--;
	}
	return kvt_bits_f32(sign | (e << 23) | ((mant & 0x3ff) << 13));
}

static inline uint16_t kvt_f32_to_f16_inline(float f)
{
	uint32_t x = kvt_f32_bits(f);
	uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
	uint32_t ax = x & 0x7fffffffu;
	if (ax >= 0x7f800000u) {
		if (ax == 0x7f800000u)
			return sign | 0x7c00;
		/* NaN: quiet it and keep the top payload bits (what F16C does) */
		return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
	}
	if (ax >= 0x477ff000u) /* >= 65520 rounds to inf */
		return sign | 0x7c00;
	if (ax >= 0x38800000u) { /* normal f16 */
		uint32_t r = ax - 0x38000000u;
		r = r + 0xfffu + ((r >> 13) & 1u);
		return (uint16_t)(sign | (r >> 13));
	}
	uint32_t exp = ax >> 23;
	if (exp == 0)
		return sign; /* f32 subnormals are far below f16's smallest step */
	uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
	uint32_t shift = 126 - exp; /* value in units of 2^-24 is mant >> shift */
	if (shift > 24)
		return sign;
	uint32_t q = mant >> shift;
	uint32_t rem = mant & ((1u << shift) - 1);
	uint32_t half = 1u << (shift - 1);
	if (rem > half || (rem == half && (q & 1)))
		q++;
	return (uint16_t)(sign | q);
}

static inline float kvt_bf16_to_f32_inline(uint16_t h)
{
	return kvt_bits_f32((uint32_t)h << 16);
}

static inline uint16_t kvt_f32_to_bf16_inline(float f)
{
	uint32_t x = kvt_f32_bits(f);
	if ((x & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((x >> 16) | 0x40); /* NaN stays NaN (quieted) */
	x = x + 0x7fffu + ((x >> 16) & 1u);
	return (uint16_t)(x >> 16);
}

/* Rounds f to the scale dtype (f16 or bf16) and returns the 16-bit pattern. */
static inline uint16_t kvt_round16_bits(float f, uint32_t sdt)
{
	return sdt == KVT_DTYPE_BF16 ? kvt_f32_to_bf16_inline(f) : kvt_f32_to_f16_inline(f);
}
static inline float kvt_widen16(uint16_t h, uint32_t sdt)
{
	return sdt == KVT_DTYPE_BF16 ? kvt_bf16_to_f32_inline(h) : kvt_f16_to_f32_inline(h);
}

/*
 * The quantizer's per-group rule (CHUNK_FORMAT.md "Quantizer"), from the group's min and max
 * over its unpinned elements. Returns the stored 16-bit scale and zero and their f32 values.
 * has_any = false (every element pinned) gives scale 0, zero 0.
 */
static inline void kvt_qparam(float mn, float mx, bool has_any, float qmax, uint32_t sdt,
			      uint16_t *scale_bits, uint16_t *zero_bits, float *scale_f,
			      float *zero_f)
{
	if (!has_any) {
		*scale_bits = 0;
		*zero_bits = 0;
		*scale_f = 0.0f;
		*zero_f = 0.0f;
		return;
	}
	if (mn == 0.0f && mx == 0.0f) {
		mn = -1.0f;
		mx = 1.0f;
	}
	if (mx > mn) {
		float scale = (mx - mn) / qmax;
		uint16_t sb = kvt_round16_bits(scale, sdt);
		float s = kvt_widen16(sb, sdt);
		if (s != 0.0f) {
			float zq = __builtin_rintf(-mn / s);
			uint16_t zb = kvt_round16_bits((-zq) * s, sdt);
			*scale_bits = sb;
			*zero_bits = zb;
			*scale_f = s;
			*zero_f = kvt_widen16(zb, sdt);
			return;
		}
	}
	/* constant group (or a scale that underflows the 16-bit type): decode to the stored mn */
	*scale_bits = 0;
	*zero_bits = kvt_round16_bits(mn, sdt);
	*scale_f = 0.0f;
	*zero_f = kvt_widen16(*zero_bits, sdt);
}

/* One element's code against the stored scale and zero: clamp(rint((x - z) / s), 0, qmax),
 * 0 when s == 0. The comparisons are written the way maxps/minps behave (NaN -> 0). */
static inline uint32_t kvt_qcode(float x, float s, float z, float qmax)
{
	if (s == 0.0f)
		return 0;
	float r = __builtin_rintf((x - z) / s);
	r = r > 0.0f ? r : 0.0f;
	r = r < qmax ? r : qmax;
	return (uint32_t)r;
}

/* The fixed reduction of 8 summation lanes, shared by every path. */
static inline float kvt_reduce8(const float a[8])
{
	return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* Min and max of n (a multiple of 8) floats the way the AVX2 path computes them: lane i % 8
 * keeps `v < acc ? v : acc` in index order, then lanes (j, j+4), (j, j+2), (0, 1) combine.
 * Only the sign of a zero result can depend on the order; fixing the order keeps the bytes. */
static inline void kvt_minmax8(const float *x, uint32_t n, float *mn_out, float *mx_out)
{
	float mn[8], mx[8];
	for (int j = 0; j < 8; j++) {
		mn[j] = __builtin_inff();
		mx[j] = -__builtin_inff();
	}
	for (uint32_t i = 0; i < n; i += 8)
		for (int j = 0; j < 8; j++) {
			float v = x[i + j];
			mn[j] = v < mn[j] ? v : mn[j];
			mx[j] = v > mx[j] ? v : mx[j];
		}
	for (int w = 4; w >= 1; w >>= 1)
		for (int j = 0; j < w; j++) {
			mn[j] = mn[j] < mn[j + w] ? mn[j] : mn[j + w];
			mx[j] = mx[j] > mx[j + w] ? mx[j] : mx[j + w];
		}
	*mn_out = mn[0];
	*mx_out = mx[0];
}

/* ---- key_rounding mse (CHUNK_FORMAT.md "Key rounding") ---------------------------------- */

/* Squared error of one group of n elements x[i * stride] (skip[i] != 0 left out; skip may be
 * NULL) against scale s and zero z: codes as kvt_qcode, decoded as code * s + z, the squares
 * summed in element order in f32 (CHUNK_FORMAT.md "Key rounding"). */
static inline float kvt_group_sq_err(const float *x, size_t stride, uint32_t n, const uint8_t *skip,
			  float s, float z, float qmax)
{
	float e = 0.0f;
	for (uint32_t i = 0; i < n; i++) {
		if (skip && skip[i])
			continue;
		float xv = x[i * stride];
		float y = (float)kvt_qcode(xv, s, z, qmax) * s + z;
		float dl = y - xv;
		e = e + dl * dl;
	}
	return e;
}

/*
 * KVT_ROUNDING_MSE for one group that the min-max rule already quantized (scale, zero and its
 * codes codes8[i * cstride] are min-max's): tries the ranges [lo, hi] = [mn + r i/16,
 * mx - r j/16] for i, j = 0..4 (r = mx - mn; i-major order) with the zero at lo, skips those
 * that leave the group's min or max more than half a (stored) step outside [lo, hi], and keeps
 * the first whose squared error is strictly below the best so far, min-max's first. The whole
 * search is this one function (the AVX2 mse_cols does the same operations 8 channels at a
 * time), so every instruction set writes the same bytes.
 * Why: min-max puts a grid point on both extremes, so with 4 levels most of ~32 roughly
 * normal samples fall between two widely spaced points; a narrower grid fits the bulk better.
 * Unbounded clipping (the MSE optimum) measured worse on some contexts of SmolLM2: a token
 * whose key is extreme in a channel is often one that draws attention, and clipping it moves
 * its logit; the half-step rule keeps every element's error within what rounding allows
 * (docs/realmodel/int2.md).
 */
static inline void kvt_mse_group(const float *x, size_t stride, uint32_t n, const uint8_t *skip,
		      float qmax, uint32_t sdt, uint16_t *scale, uint16_t *zero, uint8_t *codes8,
		      size_t cstride)
{
	float mn = __builtin_inff(), mx = -__builtin_inff();
	bool any = false;
	for (uint32_t i = 0; i < n; i++) {
		if (skip && skip[i])
			continue;
		float v = x[i * stride];
		mn = v < mn ? v : mn;
		mx = v > mx ? v : mx;
		any = true;
	}
	float s0 = kvt_widen16(*scale, sdt), z0 = kvt_widen16(*zero, sdt);
	if (!any || s0 == 0.0f)
		return; /* nothing to quantize, or a constant group: min-max's answer is exact */
	float best = kvt_group_sq_err(x, stride, n, skip, s0, z0, qmax);
	uint16_t best_sb = *scale, best_zb = *zero;
	float best_s = s0, best_z = z0;
	const float r = mx - mn;
	for (uint32_t i = 0; i <= 4; i++) {
		for (uint32_t j = 0; j <= 4; j++) {
			float lo = mn + r * ((float)i * 0.0625f);
			float hi = mx - r * ((float)j * 0.0625f);
			if (!(hi > lo))
				continue;
			uint16_t sb = kvt_round16_bits((hi - lo) / qmax, sdt);
			float s = kvt_widen16(sb, sdt);
			uint16_t zb = kvt_round16_bits(lo, sdt);
			float z = kvt_widen16(zb, sdt);
			if (!(s > 0.0f) || !isfinite(s) || !isfinite(z))
				continue;
			/* every element stays within half a step of the grid: no outlier is
			 * clipped by more than rounding would move it */
			if (!(lo - mn <= 0.5f * s) || !(mx - hi <= 0.5f * s))
				continue;
			float e = kvt_group_sq_err(x, stride, n, skip, s, z, qmax);
			if (e < best) {
				best = e;
				best_sb = sb;
				best_zb = zb;
				best_s = s;
				best_z = z;
			}
		}
	}
	if (best_sb == *scale && best_zb == *zero)
		return;
	*scale = best_sb;
	*zero = best_zb;
	for (uint32_t i = 0; i < n; i++)
		codes8[i * cstride] = skip && skip[i]
					      ? 0
					      : (uint8_t)kvt_qcode(x[i * stride], best_s, best_z, qmax);
}

/* ---- Row runs for the decoder ------------------------------------------------------------- */

/*
 * n tokens x n_heads heads of decoded rows of one layer section (kvt_decode_chunk hands a
 * token run inside one key group to the kernel at once, so per-channel parameters are widened
 * once per run and head): row (r, h) is decode_row(codes + h * head_codes + r * code_stride,
 * d, bits, gv, s16 + h * head_params + r * (d / gv) (gv > 1) or s16 + h * head_params
 * (gv == 1: d per-channel parameters shared by the head's rows), the same for z16, sdt, rot,
 * norms ? norms[r] * mult : mult, out + h * head_out + r * out_stride, out_dtype): the same
 * float operations in the same order (CHUNK_FORMAT.md "Decoding"), except that rows with
 * pidx[r] >= 0 (pinned tokens; pidx may be NULL) are left untouched for the caller. Rows go
 * token by token (all heads of token r, then r + 1), the order of the output.
 */
struct kvt_decode_rows {
	const uint8_t *codes;
	size_t code_stride, head_codes;   /* bytes */
	const uint16_t *s16, *z16;
	size_t head_params;               /* elements */
	const float *norms;
	float mult;
	const int16_t *pidx;
	uint8_t *out;
	size_t out_stride, head_out;      /* bytes */
	uint32_t n, n_heads, d, bits, gv, sdt, out_dtype;
	bool rot;
};
/* Heads per decode_rows call at most (the per-channel parameters of each are widened on the
 * kernel's stack: 2 KiB per head at d 256). */
#define KVT_DECODE_HEADS_MAX 8

/* ---- Kernel table ------------------------------------------------------------------------- */
struct kvt_codec_ops {
	const char *name;
	/* n elements of dtype (f16/bf16/f32) <-> f32 */
	void (*load_f32)(const void *src, uint32_t dtype, float *dst, size_t n);
	void (*store_f32)(const float *src, void *dst, uint32_t dtype, size_t n);
	/* n vectors of length d (power of two, 2..256): butterflies with stride 1, 2, 4, ...,
	 * d/2 (each pair (a, b) -> (a + b, a - b)), then every element multiplied by mult. */
	void (*fwht)(float *x, size_t n, uint32_t d, float mult);
	/* sum of x[i]^2, n a multiple of 8: lane i % 8 accumulates acc + x*x in index order,
	 * lanes reduced by kvt_reduce8. */
	float (*sumsq)(const float *x, size_t n);
	/* x[i] = x[i] / div */
	void (*div)(float *x, size_t n, float div);
	/* Dot product, n a multiple of 8, same lane rule as sumsq (acc + a*b). */
	float (*dot)(const float *a, const float *b, size_t n);
	/* y[i] = y[i] + a * x[i] */
	void (*axpy)(float *y, const float *x, float a, size_t n);
	/*
	 * Per-channel quantization of one key group: ntok rows of d channels at x (row stride
	 * x_stride floats); rows with pin[t] != 0 are left out of min/max and get code 0.
	 * Writes d scales and zeros (16-bit) and the unpacked codes u8 [ntok][d] to codes8.
	 */
	void (*quant_cols)(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
			   uint32_t d, uint32_t bits, uint32_t sdt, uint16_t *scale,
			   uint16_t *zero, uint8_t *codes8);
	/* Per-token quantization of nrows rows of d channels (row stride x_stride floats) in
	 * groups of gv: scales and zeros [nrows][d/gv], unpacked codes u8 [nrows][d]. Rows with
	 * pin[r] != 0 (pin may be NULL) get scale 0, zero 0, codes 0. */
	void (*quant_rows)(const float *x, size_t x_stride, uint32_t nrows, const uint8_t *pin,
			   uint32_t d, uint32_t gv, uint32_t bits, uint32_t sdt, uint16_t *scale,
			   uint16_t *zero, uint8_t *codes8);
	/* Packs d codes (each < 2^bits) little end first: channel c at bits (c % (8/b)) * b of
	 * byte c * b / 8; 3 bits: the low 2 bits as a 2-bit row in bytes [0, d/4), the high bit
	 * of channel c at bit c % 8 of byte d/4 + c/8 (CHUNK_FORMAT.md). */
	void (*pack)(const uint8_t *codes8, uint32_t d, uint32_t bits, uint8_t *out);
	/* Unpacks one row and dequantizes with per-channel f32 scale/zero: y = code*s + z. */
	void (*dequant_ch)(const uint8_t *packed, uint32_t d, uint32_t bits, const float *s,
			   const float *z, float *y);
	/* Same with per-group 16-bit scale/zero (groups of gv channels). */
	void (*dequant_grp)(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			    const uint16_t *s, const uint16_t *z, uint32_t sdt, float *y);
	/* One decoded row: dequantize with 16-bit scale/zero, channel c using s16[c / gv]
	 * (gv = 1: per-channel parameters; else groups of gv >= 8 channels; a power of two):
	 * code * s + z; then
	 * when rot the butterflies of fwht and the multiply by mult; then round to out_dtype.
	 * Exactly dequant + fwht + store_f32. */
	void (*decode_row)(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			   const uint16_t *s16, const uint16_t *z16, uint32_t sdt, bool rot,
			   float mult, void *out, uint32_t out_dtype);
	/* out[i] = dot(w + i * w_stride, x, d) for i < nrows (same lane rule as dot) */
	void (*dot_rows)(const float *w, size_t w_stride, uint32_t nrows, const float *x,
			 uint32_t d, float *out);
	/* v = dequant (16-bit scale/zero in groups of gv) of one row, then for i < nrows:
	 * acc_i = acc_i + p_i * v, acc_i = acc + i * acc_stride, p_i = p[i * p_stride]
	 * (exactly dequant + axpy per row) */
	void (*accum_grp)(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			  const uint16_t *s16, const uint16_t *z16, uint32_t sdt, const float *p,
			  size_t p_stride, uint32_t nrows, float *acc, size_t acc_stride);
	/* key_rounding mse on the output of quant_cols (same arguments): kvt_mse_group for each
	 * of the d channels (elements x[t * x_stride + c], skip pin), rewriting scale, zero and
	 * codes8 where a better range is found. */
	void (*mse_cols)(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
			 uint32_t d, uint32_t bits, uint32_t sdt, uint16_t *scale, uint16_t *zero,
			 uint8_t *codes8);
	/* Unpacks one row to f32 codes (no scale). */
	void (*unpack_f32)(const uint8_t *packed, uint32_t d, uint32_t bits, float *y);
	/* A run of decoded rows (struct kvt_decode_rows): exactly decode_row on each. */
	void (*decode_rows)(const struct kvt_decode_rows *job);
};

extern const struct kvt_codec_ops kvt_codec_ops_scalar;
#if defined(__x86_64__) || defined(__i386__)
#define KVT_HAVE_AVX2_BUILD 1
extern const struct kvt_codec_ops kvt_codec_ops_avx2;
#endif

/* kvt_decode_chunk as it was before the run decoder (one ops->decode_row call per row), with
 * the given table; its arguments are checked the same way. Kept so tests can prove the run
 * decoder writes the same bytes. */
int kvt_decode_chunk_rowwise(const struct kvt_codec_ops *ops, const void *chunk,
			     uint32_t tok_begin, uint32_t tok_end, uint32_t layer_begin,
			     uint32_t layer_end, uint32_t out_dtype, void *k_out, void *v_out,
			     char *err, size_t errlen);

/* The table of the active instruction set (reads KVT_ISA once, then CPUID). */
const struct kvt_codec_ops *kvt_codec_ops_get(void);

/* crc32c back ends (kvt_crc32c picks one at run time) */
uint32_t kvt_crc32c_sw(uint32_t crc, const void *buf, size_t len);
bool kvt_crc32c_hw_available(void);
uint32_t kvt_crc32c_hw(uint32_t crc, const void *buf, size_t len);

/* Chunk crc over total bytes with the header's crc field read as 0. */
uint32_t kvt_chunk_crc(const void *chunk, size_t total_bytes);

/* Header fields -> config, with the checks kvt_chunk_parse does minus the crc (attend and
 * decode use it, with len SIZE_MAX, on chunks that were parsed when they arrived): the pin
 * table is checked too, since they index with it. len is the chunk's exact length (what
 * kvt_chunk_parse passes: shorter or longer than total_bytes is refused), or SIZE_MAX for
 * "unknown, parsed before" (no length check). */
int kvt_chunk_view(const void *chunk, size_t len, struct kvt_codec_config *cfg,
		   struct kvt_chunk_header *hdr, struct kvt_chunk_layout *lay, char *err,
		   size_t errlen);

static inline size_t kvt_value_group(const struct kvt_codec_config *cfg)
{
	return cfg->group < cfg->head_dim ? cfg->group : cfg->head_dim;
}
static inline bool kvt_scheme_rotates_keys(uint32_t scheme)
{
	return scheme == KVT_SCHEME_HADAMARD || scheme == KVT_SCHEME_OSCAR;
}
static inline float kvt_inv_sqrt_dim(uint32_t d)
{
	/* exact for 4, 16, 64, 256; correctly rounded otherwise */
	return (float)(1.0 / __builtin_sqrt((double)d));
}

#endif

/*
 * codec_kernels_avx2.c - the AVX2 + F16C kernels. Each one performs exactly the float
 * operations of its scalar twin in codec_kernels.c (same butterflies, same 8-lane order, the
 * same min/max semantics: _mm256_min_ps(v, acc) is `v < acc ? v : acc`), so encoded bytes
 * and decoded values are identical on both paths. Compiled with -mavx2 -mf16c (no FMA) and
 * entered only after CPUID reports both.
 */
#include "codec_internal.h"

#ifdef KVT_HAVE_AVX2_BUILD
#include <immintrin.h>

static void v_load_f32(const void *src, uint32_t dtype, float *dst, size_t n)
{
	const uint16_t *h = src;
	size_t i = 0;
	if (dtype == KVT_DTYPE_F16) {
		for (; i + 8 <= n; i += 8)
			_mm256_storeu_ps(dst + i,
					 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
		for (; i < n; i++)
			dst[i] = kvt_f16_to_f32(h[i]);
	} else if (dtype == KVT_DTYPE_BF16) {
		for (; i + 8 <= n; i += 8) {
			__m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
			_mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
		}
		for (; i < n; i++)
			dst[i] = kvt_bf16_to_f32(h[i]);
	} else {
		memmove(dst, src, n * 4);
	}
}

/* bf16 round-to-nearest-even of 8 floats; the 16-bit results in the low half of each lane */
static inline __m256i bf16_round32(__m256 x)
{
	__m256i b = _mm256_castps_si256(x);
	__m256i absb = _mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff));
	__m256i nan = _mm256_cmpgt_epi32(absb, _mm256_set1_epi32(0x7f800000));
	__m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
	__m256i r = _mm256_srli_epi32(
		_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
	__m256i q = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
	return _mm256_blendv_epi8(r, q, nan);
}

static inline __m128i pack32_to_16(__m256i r)
{
	return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* round to the scale dtype: 8 x u16 bits */
static inline __m128i round16(__m256 x, uint32_t sdt)
{
	if (sdt == KVT_DTYPE_BF16)
		return pack32_to_16(bf16_round32(x));
	return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static inline __m256 widen16(__m128i h, uint32_t sdt)
{
	if (sdt == KVT_DTYPE_BF16)
		return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
	return _mm256_cvtph_ps(h);
}

/* one value through F16C / integer bf16: bit-identical to kvt_round16_bits / kvt_widen16 */
static inline uint16_t round16_1(float f, uint32_t sdt)
{
	if (sdt == KVT_DTYPE_BF16)
		return kvt_f32_to_bf16(f);
	return (uint16_t)_mm_extract_epi16(
		_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 0);
}

static inline float widen16_1(uint16_t h, uint32_t sdt)
{
	if (sdt == KVT_DTYPE_BF16)
		return kvt_bf16_to_f32(h);
	return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

/* kvt_qparam (codec_internal.h) with the conversions done by F16C */
static inline void qparam_1(float mn, float mx, float qmax, uint32_t sdt, uint16_t *scale_bits,
			    uint16_t *zero_bits, float *scale_f, float *zero_f)
{
	if (mn == 0.0f && mx == 0.0f) {
		mn = -1.0f;
		mx = 1.0f;
	}
	if (mx > mn) {
		float scale = (mx - mn) / qmax;
		uint16_t sb = round16_1(scale, sdt);
		float s = widen16_1(sb, sdt);
		if (s != 0.0f) {
			float zq = _mm_cvtss_f32(_mm_round_ss(
				_mm_setzero_ps(), _mm_set_ss(-mn / s),
				_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
			uint16_t zb = round16_1((-zq) * s, sdt);
			*scale_bits = sb;
			*zero_bits = zb;
			*scale_f = s;
			*zero_f = widen16_1(zb, sdt);
			return;
		}
	}
	*scale_bits = 0;
	*zero_bits = round16_1(mn, sdt);
	*scale_f = 0.0f;
	*zero_f = widen16_1(*zero_bits, sdt);
}

/* up to 8 per-group 16-bit scales and zeros -> f32, one conversion each */
static inline void widen_params(const uint16_t *s16, const uint16_t *z16, uint32_t n,
				uint32_t sdt, float *sf, float *zf)
{
	uint16_t sb[8] = {0}, zb[8] = {0};
	memcpy(sb, s16, n * 2);
	memcpy(zb, z16, n * 2);
	_mm256_store_ps(sf, widen16(_mm_loadu_si128((const __m128i *)sb), sdt));
	_mm256_store_ps(zf, widen16(_mm_loadu_si128((const __m128i *)zb), sdt));
}

static void v_store_f32(const float *src, void *dst, uint32_t dtype, size_t n)
{
	uint16_t *h = dst;
	size_t i = 0;
	if (dtype == KVT_DTYPE_F16 || dtype == KVT_DTYPE_BF16) {
		for (; i + 8 <= n; i += 8)
			_mm_storeu_si128((__m128i *)(h + i), round16(_mm256_loadu_ps(src + i), dtype));
		for (; i < n; i++)
			h[i] = kvt_round16_bits(src[i], dtype);
	} else {
		memmove(dst, src, n * 4);
	}
}

/* Butterfly stages 1, 2, 4 inside one 8-lane vector: lane j pairs with j ^ h; the low lane
 * gets partner + self (= a + b), the high lane partner + (-self) (= a - b), both exact as the
 * scalar a + b and a - b. */
static inline __m256 fwht8(__m256 v)
{
	const __m256 s1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT32_MIN, 0, INT32_MIN, 0,
								 INT32_MIN, 0, INT32_MIN));
	const __m256 s2 = _mm256_castsi256_ps(
		_mm256_setr_epi32(0, 0, INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN));
	const __m256 s4 = _mm256_castsi256_ps(
		_mm256_setr_epi32(0, 0, 0, 0, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN));
	v = _mm256_add_ps(_mm256_permute_ps(v, 0xB1), _mm256_xor_ps(v, s1));
	v = _mm256_add_ps(_mm256_permute_ps(v, 0x4E), _mm256_xor_ps(v, s2));
	v = _mm256_add_ps(_mm256_permute2f128_ps(v, v, 1), _mm256_xor_ps(v, s4));
	return v;
}

static void fwht_scalar_row(float *x, uint32_t d, float mult)
{
	for (uint32_t h = 1; h < d; h <<= 1)
		for (uint32_t i = 0; i < d; i += 2 * h)
			for (uint32_t j = i; j < i + h; j++) {
				float a = x[j], b = x[j + h];
				x[j] = a + b;
				x[j + h] = a - b;
			}
	for (uint32_t j = 0; j < d; j++)
		x[j] = x[j] * mult;
}

#define BFLY(a, b)                                                                         \
	do {                                                                               \
		__m256 s_ = _mm256_add_ps(a, b), d_ = _mm256_sub_ps(a, b);                 \
		a = s_;                                                                    \
		b = d_;                                                                    \
	} while (0)

/* Stages 1..32 of a 64-element block in registers (8 vectors), optionally times m. */
static inline void fwht64(float *x, __m256 m, bool scale)
{
	__m256 v0 = fwht8(_mm256_loadu_ps(x)), v1 = fwht8(_mm256_loadu_ps(x + 8));
	__m256 v2 = fwht8(_mm256_loadu_ps(x + 16)), v3 = fwht8(_mm256_loadu_ps(x + 24));
	__m256 v4 = fwht8(_mm256_loadu_ps(x + 32)), v5 = fwht8(_mm256_loadu_ps(x + 40));
	__m256 v6 = fwht8(_mm256_loadu_ps(x + 48)), v7 = fwht8(_mm256_loadu_ps(x + 56));
	BFLY(v0, v1);
	BFLY(v2, v3);
	BFLY(v4, v5);
	BFLY(v6, v7);
	BFLY(v0, v2);
	BFLY(v1, v3);
	BFLY(v4, v6);
	BFLY(v5, v7);
	BFLY(v0, v4);
	BFLY(v1, v5);
	BFLY(v2, v6);
	BFLY(v3, v7);
	if (scale) {
		v0 = _mm256_mul_ps(v0, m);
		v1 = _mm256_mul_ps(v1, m);
		v2 = _mm256_mul_ps(v2, m);
		v3 = _mm256_mul_ps(v3, m);
		v4 = _mm256_mul_ps(v4, m);
		v5 = _mm256_mul_ps(v5, m);
		v6 = _mm256_mul_ps(v6, m);
		v7 = _mm256_mul_ps(v7, m);
	}
	_mm256_storeu_ps(x, v0);
	_mm256_storeu_ps(x + 8, v1);
	_mm256_storeu_ps(x + 16, v2);
	_mm256_storeu_ps(x + 24, v3);
	_mm256_storeu_ps(x + 32, v4);
	_mm256_storeu_ps(x + 40, v5);
	_mm256_storeu_ps(x + 48, v6);
	_mm256_storeu_ps(x + 56, v7);
}

static void v_fwht(float *x, size_t n, uint32_t d, float mult)
{
	const __m256 m = _mm256_set1_ps(mult);
	for (size_t r = 0; r < n; r++, x += d) {
		if (d < 8) {
			fwht_scalar_row(x, d, mult);
			continue;
		}
		if (d == 8) {
			_mm256_storeu_ps(x, _mm256_mul_ps(fwht8(_mm256_loadu_ps(x)), m));
			continue;
		}
		if (d == 64) {
			fwht64(x, m, true);
			continue;
		}
		uint32_t h = 8;
		if (d > 64) {
			for (uint32_t j = 0; j < d; j += 64)
				fwht64(x + j, m, false);
			h = 64;
		} else {
			for (uint32_t j = 0; j < d; j += 8)
				_mm256_storeu_ps(x + j, fwht8(_mm256_loadu_ps(x + j)));
		}
		for (; h < d / 2; h <<= 1)
			for (uint32_t i = 0; i < d; i += 2 * h)
				for (uint32_t j = i; j < i + h; j += 8) {
					__m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
					_mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
					_mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
				}
		/* last stage fused with the multiply: (a + b) * m, (a - b) * m as the scalar does */
		h = d / 2;
		for (uint32_t j = 0; j < h; j += 8) {
			__m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
			_mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_add_ps(a, b), m));
			_mm256_storeu_ps(x + j + h, _mm256_mul_ps(_mm256_sub_ps(a, b), m));
		}
	}
}

static inline float reduce8(__m256 acc)
{
	__m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
	__m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
	__m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
	return _mm_cvtss_f32(s1);
}

static float v_sumsq(const float *x, size_t n)
{
	__m256 acc = _mm256_setzero_ps();
	for (size_t i = 0; i < n; i += 8) {
		__m256 v = _mm256_loadu_ps(x + i);
		acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
	}
	return reduce8(acc);
}

static float v_dot(const float *a, const float *b, size_t n)
{
	__m256 acc = _mm256_setzero_ps();
	for (size_t i = 0; i < n; i += 8)
		acc = _mm256_add_ps(acc,
				    _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
	return reduce8(acc);
}

static void v_div(float *x, size_t n, float div)
{
	const __m256 dv = _mm256_set1_ps(div);
	size_t i = 0;
	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), dv));
	for (; i < n; i++)
		x[i] = x[i] / div;
}

static void v_axpy(float *y, const float *x, float a, size_t n)
{
	const __m256 av = _mm256_set1_ps(a);
	size_t i = 0;
	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i),
						      _mm256_mul_ps(av, _mm256_loadu_ps(x + i))));
	for (; i < n; i++)
		y[i] = y[i] + a * x[i];
}

/* codes of 8 elements against (s, z): clamp(rint((x - z) / s), 0, qmax), 0 where s == 0 */
static inline __m256i qcode8(__m256 x, __m256 s, __m256 z, __m256 qmax)
{
	__m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(x, z), s),
				   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	r = _mm256_max_ps(r, _mm256_setzero_ps());
	r = _mm256_min_ps(r, qmax);
	r = _mm256_andnot_ps(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_EQ_OQ), r);
	return _mm256_cvttps_epi32(r);
}

static inline void store_codes8(uint8_t *dst, __m256i c)
{
	__m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
	_mm_storel_epi64((__m128i *)dst, _mm_packus_epi16(w, w));
}

/* kvt_qparam (has_any true) for 8 groups at once; the same operations lane by lane */
static inline void qparam8(__m256 mn, __m256 mx, __m256 qmax, uint32_t sdt, __m128i *sb_out,
			   __m128i *zb_out, __m256 *sf_out, __m256 *zf_out)
{
	const __m256 zero_v = _mm256_setzero_ps();
	__m256 zz = _mm256_and_ps(_mm256_cmp_ps(mn, zero_v, _CMP_EQ_OQ),
				  _mm256_cmp_ps(mx, zero_v, _CMP_EQ_OQ));
	mn = _mm256_blendv_ps(mn, _mm256_set1_ps(-1.0f), zz);
	mx = _mm256_blendv_ps(mx, _mm256_set1_ps(1.0f), zz);
	__m256 gt = _mm256_cmp_ps(mx, mn, _CMP_GT_OQ);
	__m128i sb = round16(_mm256_div_ps(_mm256_sub_ps(mx, mn), qmax), sdt);
	__m256 s = widen16(sb, sdt);
	__m256 ok = _mm256_and_ps(gt, _mm256_cmp_ps(s, zero_v, _CMP_NEQ_UQ));
	__m256 negmn = _mm256_xor_ps(mn, _mm256_set1_ps(-0.0f));
	__m256 zq = _mm256_round_ps(_mm256_div_ps(negmn, s),
				    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m128i zb = round16(_mm256_mul_ps(_mm256_xor_ps(zq, _mm256_set1_ps(-0.0f)), s), sdt);
	__m128i cb = round16(mn, sdt); /* constant group: zero = mn */
	__m128i ok16 = pack32_to_16(_mm256_srli_epi32(_mm256_castps_si256(ok), 16));
	sb = _mm_and_si128(sb, ok16);
	zb = _mm_blendv_epi8(cb, zb, ok16);
	*sb_out = sb;
	*zb_out = zb;
	*sf_out = widen16(sb, sdt);
	*zf_out = widen16(zb, sdt);
}

static void v_quant_cols(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
			 uint32_t d, uint32_t bits, uint32_t sdt, uint16_t *scale, uint16_t *zero,
			 uint8_t *codes8)
{
	const float qmaxf = (float)((1u << bits) - 1);
	const __m256 qmax = _mm256_set1_ps(qmaxf);
	bool any = false;
	for (uint32_t t = 0; t < ntok; t++)
		any |= !pin[t];
	if (!any) {
		memset(scale, 0, d * 2);
		memset(zero, 0, d * 2);
		memset(codes8, 0, (size_t)ntok * d);
		return;
	}
	/* row by row (rows are 1 KiB+ apart: walking a column would hit one cache set), each
	 * channel's lane still sees the tokens in order */
	float mn[256] __attribute__((aligned(32))), mx[256] __attribute__((aligned(32)));
	float sf[256] __attribute__((aligned(32))), zf[256] __attribute__((aligned(32)));
	for (uint32_t c = 0; c < d; c += 8) {
		_mm256_store_ps(mn + c, _mm256_set1_ps(__builtin_inff()));
		_mm256_store_ps(mx + c, _mm256_set1_ps(-__builtin_inff()));
	}
	for (uint32_t t = 0; t < ntok; t++) {
		if (pin[t])
			continue;
		const float *xr = x + t * x_stride;
		for (uint32_t c = 0; c < d; c += 8) {
			__m256 v = _mm256_loadu_ps(xr + c);
			_mm256_store_ps(mn + c, _mm256_min_ps(v, _mm256_load_ps(mn + c)));
			_mm256_store_ps(mx + c, _mm256_max_ps(v, _mm256_load_ps(mx + c)));
		}
	}
	for (uint32_t c = 0; c < d; c += 8) {
		__m128i sb, zb;
		__m256 s, z;
		qparam8(_mm256_load_ps(mn + c), _mm256_load_ps(mx + c), qmax, sdt, &sb, &zb, &s, &z);
		_mm_storeu_si128((__m128i *)(scale + c), sb);
		_mm_storeu_si128((__m128i *)(zero + c), zb);
		_mm256_store_ps(sf + c, s);
		_mm256_store_ps(zf + c, z);
	}
	for (uint32_t t = 0; t < ntok; t++) {
		uint8_t *dst = codes8 + (size_t)t * d;
		if (pin[t]) {
			memset(dst, 0, d);
			continue;
		}
		const float *xr = x + t * x_stride;
		for (uint32_t c = 0; c < d; c += 8)
			store_codes8(dst + c, qcode8(_mm256_loadu_ps(xr + c), _mm256_load_ps(sf + c),
						     _mm256_load_ps(zf + c), qmax));
	}
}

/* Squared error of 8 channel groups (lanes) against (s, z), kvt_group_sq_err lane by lane */
static inline __m256 mse_err8(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
			      __m256 s, __m256 z, __m256 qmax)
{
	__m256 e = _mm256_setzero_ps();
	for (uint32_t t = 0; t < ntok; t++) {
		if (pin[t])
			continue;
		__m256 xv = _mm256_loadu_ps(x + t * x_stride);
		__m256 y = _mm256_add_ps(
			_mm256_mul_ps(_mm256_cvtepi32_ps(qcode8(xv, s, z, qmax)), s), z);
		__m256 dl = _mm256_sub_ps(y, xv);
		e = _mm256_add_ps(e, _mm256_mul_ps(dl, dl));
	}
	return e;
}

/* kvt_mse_group (codec_internal.h) for 8 channels at a time: the same operations per lane,
 * the candidates in the same order, the same strict comparison. */
static void v_mse_cols(const float *x, size_t x_stride, uint32_t ntok, const uint8_t *pin,
		       uint32_t d, uint32_t bits, uint32_t sdt, uint16_t *scale, uint16_t *zero,
		       uint8_t *codes8)
{
	const __m256 qmax = _mm256_set1_ps((float)((1u << bits) - 1));
	const __m256 zero_v = _mm256_setzero_ps(), half = _mm256_set1_ps(0.5f);
	const __m256 inf = _mm256_set1_ps(__builtin_inff()), sign = _mm256_set1_ps(-0.0f);
	bool any = false;
	for (uint32_t t = 0; t < ntok; t++)
		any |= !pin[t];
	if (!any)
		return; /* quant_cols wrote scale 0, zero 0, codes 0 */
	for (uint32_t c = 0; c < d; c += 8) {
		const float *xc = x + c;
		__m256 mn = inf, mx = _mm256_set1_ps(-__builtin_inff());
		for (uint32_t t = 0; t < ntok; t++) {
			if (pin[t])
				continue;
			__m256 v = _mm256_loadu_ps(xc + t * x_stride);
			mn = _mm256_min_ps(v, mn);
			mx = _mm256_max_ps(v, mx);
		}
		__m128i sb0 = _mm_loadu_si128((const __m128i *)(scale + c));
		__m128i zb0 = _mm_loadu_si128((const __m128i *)(zero + c));
		__m256 s0 = widen16(sb0, sdt), z0 = widen16(zb0, sdt);
		__m256 active = _mm256_cmp_ps(s0, zero_v, _CMP_NEQ_UQ);
		if (_mm256_movemask_ps(active) == 0)
			continue;
		__m256 best = mse_err8(xc, x_stride, ntok, pin, s0, z0, qmax);
		__m128i bsb = sb0, bzb = zb0;
		__m256 bs = s0, bz = z0;
		const __m256 r = _mm256_sub_ps(mx, mn);
		for (uint32_t i = 0; i <= 4; i++) {
			for (uint32_t j = 0; j <= 4; j++) {
				__m256 lo = _mm256_add_ps(
					mn, _mm256_mul_ps(r, _mm256_set1_ps((float)i * 0.0625f)));
				__m256 hi = _mm256_sub_ps(
					mx, _mm256_mul_ps(r, _mm256_set1_ps((float)j * 0.0625f)));
				__m128i cs = round16(_mm256_div_ps(_mm256_sub_ps(hi, lo), qmax), sdt);
				__m128i cz = round16(lo, sdt);
				__m256 sv = widen16(cs, sdt), zv = widen16(cz, sdt);
				__m256 hs = _mm256_mul_ps(half, sv);
				__m256 ok = _mm256_and_ps(active, _mm256_cmp_ps(hi, lo, _CMP_GT_OQ));
				ok = _mm256_and_ps(ok, _mm256_cmp_ps(sv, zero_v, _CMP_GT_OQ));
				ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_andnot_ps(sign, sv), inf,
								     _CMP_LT_OQ));
				ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_andnot_ps(sign, zv), inf,
								     _CMP_LT_OQ));
				ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_sub_ps(lo, mn), hs,
								     _CMP_LE_OQ));
				ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_sub_ps(mx, hi), hs,
								     _CMP_LE_OQ));
				if (_mm256_movemask_ps(ok) == 0)
					continue;
				__m256 e = mse_err8(xc, x_stride, ntok, pin, sv, zv, qmax);
				__m256 better = _mm256_and_ps(ok, _mm256_cmp_ps(e, best, _CMP_LT_OQ));
				__m128i b16 = pack32_to_16(
					_mm256_srli_epi32(_mm256_castps_si256(better), 16));
				best = _mm256_blendv_ps(best, e, better);
				bs = _mm256_blendv_ps(bs, sv, better);
				bz = _mm256_blendv_ps(bz, zv, better);
				bsb = _mm_blendv_epi8(bsb, cs, b16);
				bzb = _mm_blendv_epi8(bzb, cz, b16);
			}
		}
		_mm_storeu_si128((__m128i *)(scale + c), bsb);
		_mm_storeu_si128((__m128i *)(zero + c), bzb);
		/* unchanged lanes recompute min-max's own codes (the same qcode on the same s, z) */
		for (uint32_t t = 0; t < ntok; t++)
			if (!pin[t])
				store_codes8(codes8 + (size_t)t * d + c,
					     qcode8(_mm256_loadu_ps(xc + t * x_stride), bs, bz, qmax));
	}
}

static void v_quant_rows(const float *x, size_t x_stride, uint32_t nrows, const uint8_t *pin,
			 uint32_t d, uint32_t gv, uint32_t bits, uint32_t sdt, uint16_t *scale,
			 uint16_t *zero, uint8_t *codes8)
{
	const float qmaxf = (float)((1u << bits) - 1);
	const __m256 qmax = _mm256_set1_ps(qmaxf);
	const uint32_t ng = d / gv;
	float mnv[1024] __attribute__((aligned(32))), mxv[1024] __attribute__((aligned(32)));
	float sfv[1024] __attribute__((aligned(32))), zfv[1024] __attribute__((aligned(32)));
	for (uint32_t r0 = 0; r0 < nrows; r0 += 1024 / ng) {
		uint32_t nr = nrows - r0 < 1024 / ng ? nrows - r0 : 1024 / ng;
		/* 1: min and max of every group, in the fixed lane order of kvt_minmax8 */
		for (uint32_t r = 0; r < nr; r++) {
			const float *xr = x + (size_t)(r0 + r) * x_stride;
			for (uint32_t g = 0; g < ng; g++) {
				const float *xg = xr + g * gv;
				__m256 mn = _mm256_set1_ps(__builtin_inff());
				__m256 mx = _mm256_set1_ps(-__builtin_inff());
				for (uint32_t c = 0; c < gv; c += 8) {
					__m256 v = _mm256_loadu_ps(xg + c);
					mn = _mm256_min_ps(v, mn);
					mx = _mm256_max_ps(v, mx);
				}
				__m128 n4 = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
				__m128 n2 = _mm_min_ps(n4, _mm_movehl_ps(n4, n4));
				__m128 n1 = _mm_min_ss(n2, _mm_shuffle_ps(n2, n2, 1));
				__m128 x4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
				__m128 x2 = _mm_max_ps(x4, _mm_movehl_ps(x4, x4));
				__m128 x1 = _mm_max_ss(x2, _mm_shuffle_ps(x2, x2, 1));
				mnv[r * ng + g] = _mm_cvtss_f32(n1);
				mxv[r * ng + g] = _mm_cvtss_f32(x1);
			}
		}
		/* 2: the parameters, 8 groups at a time */
		uint16_t *sp = scale + (size_t)r0 * ng, *zp = zero + (size_t)r0 * ng;
		uint32_t n = nr * ng, i = 0;
		for (; i + 8 <= n; i += 8) {
			__m128i sb, zb;
			__m256 sf, zf;
			qparam8(_mm256_load_ps(mnv + i), _mm256_load_ps(mxv + i), qmax, sdt, &sb, &zb,
				&sf, &zf);
			_mm_storeu_si128((__m128i *)(sp + i), sb);
			_mm_storeu_si128((__m128i *)(zp + i), zb);
			_mm256_store_ps(sfv + i, sf);
			_mm256_store_ps(zfv + i, zf);
		}
		for (; i < n; i++)
			qparam_1(mnv[i], mxv[i], qmaxf, sdt, &sp[i], &zp[i], &sfv[i], &zfv[i]);
		/* 3: the codes */
		for (uint32_t r = 0; r < nr; r++) {
			const float *xr = x + (size_t)(r0 + r) * x_stride;
			uint8_t *cr = codes8 + (size_t)(r0 + r) * d;
			if (pin && pin[r0 + r]) {
				memset(sp + (size_t)r * ng, 0, ng * 2);
				memset(zp + (size_t)r * ng, 0, ng * 2);
				memset(cr, 0, d);
				continue;
			}
			for (uint32_t g = 0; g < ng; g++) {
				__m256 sv = _mm256_set1_ps(sfv[r * ng + g]), zv = _mm256_set1_ps(zfv[r * ng + g]);
				for (uint32_t c = g * gv; c < (g + 1) * gv; c += 8)
					store_codes8(cr + c, qcode8(_mm256_loadu_ps(xr + c), sv, zv, qmax));
			}
		}
	}
}

static void v_pack(const uint8_t *codes8, uint32_t d, uint32_t bits, uint8_t *out)
{
	if (bits == 8) {
		memcpy(out, codes8, d);
		return;
	}
	for (uint32_t c = 0; c < d; c += 32) {
		__m256i v = _mm256_loadu_si256((const __m256i *)(codes8 + c));
		if (bits == 3) {
			/* high-bit plane: bit 2 of each code moved to the byte's sign bit, one
			 * movemask bit per channel (channel c + i at bit i) */
			uint32_t hi = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 5));
			memcpy(out + d / 4 + c / 8, &hi, 4);
			v = _mm256_and_si256(v, _mm256_set1_epi8(3)); /* low plane: a 2-bit row */
		}
		if (bits == 2 || bits == 3) {
			__m256i p = _mm256_maddubs_epi16(v, _mm256_set1_epi16(0x0401));
			p = _mm256_madd_epi16(p, _mm256_set1_epi32(0x00100001));
			p = _mm256_shuffle_epi8(p, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1,
								    -1, -1, -1, -1, -1, -1, -1, 0, 4,
								    8, 12, -1, -1, -1, -1, -1, -1, -1,
								    -1, -1, -1, -1, -1));
			uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(p));
			uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(p, 1));
			memcpy(out + c / 4, &lo, 4);
			memcpy(out + c / 4 + 4, &hi, 4);
		} else {
			__m256i p = _mm256_maddubs_epi16(v, _mm256_set1_epi16(0x1001));
			_mm_storeu_si128((__m128i *)(out + c / 2),
					 _mm_packus_epi16(_mm256_castsi256_si128(p),
							  _mm256_extracti128_si256(p, 1)));
		}
	}
}

/* 8 codes starting at channel c (c a multiple of 8) of a row of d channels as int32 lanes */
static inline __m256i unpack8(const uint8_t *p, uint32_t c, uint32_t bits, uint32_t d)
{
	if (bits == 3) {
		/* low 2 bits from the 2-bit plane, the high bit from byte d/4 + c/8 */
		uint16_t w;
		memcpy(&w, p + c / 4, 2);
		const __m256i sh = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
		__m256i lo = _mm256_and_si256(
			_mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_add_epi32(sh, sh)),
			_mm256_set1_epi32(3));
		__m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(p[d / 4 + c / 8]), sh),
					      _mm256_set1_epi32(1));
		return _mm256_or_si256(lo, _mm256_slli_epi32(hi, 2));
	}
	if (bits == 2) {
		uint16_t w;
		memcpy(&w, p + c / 4, 2);
		return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w),
							  _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
					_mm256_set1_epi32(3));
	}
	if (bits == 4) {
		uint32_t w;
		memcpy(&w, p + c / 2, 4);
		return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w),
							  _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
					_mm256_set1_epi32(15));
	}
	return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + c)));
}

static void v_unpack_f32(const uint8_t *packed, uint32_t d, uint32_t bits, float *y)
{
	for (uint32_t c = 0; c < d; c += 8)
		_mm256_storeu_ps(y + c, _mm256_cvtepi32_ps(unpack8(packed, c, bits, d)));
}

static void v_dequant_ch(const uint8_t *packed, uint32_t d, uint32_t bits, const float *s,
			 const float *z, float *y)
{
	for (uint32_t c = 0; c < d; c += 8) {
		__m256 code = _mm256_cvtepi32_ps(unpack8(packed, c, bits, d));
		_mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_mul_ps(code, _mm256_loadu_ps(s + c)),
						      _mm256_loadu_ps(z + c)));
	}
}

static void v_dequant_grp(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			  const uint16_t *s, const uint16_t *z, uint32_t sdt, float *y)
{
	float sg[8] __attribute__((aligned(32))), zg[8] __attribute__((aligned(32)));
	widen_params(s, z, d / gv, sdt, sg, zg);
	for (uint32_t g = 0; g < d / gv; g++) {
		__m256 sv = _mm256_set1_ps(sg[g]);
		__m256 zv = _mm256_set1_ps(zg[g]);
		for (uint32_t c = g * gv; c < (g + 1) * gv; c += 8) {
			__m256 code = _mm256_cvtepi32_ps(unpack8(packed, c, bits, d));
			_mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_mul_ps(code, sv), zv));
		}
	}
}

static inline void store8(void *out, uint32_t c, __m256 v, uint32_t odt)
{
	if (odt == KVT_DTYPE_F32)
		_mm256_storeu_ps((float *)out + c, v);
	else
		_mm_storeu_si128((__m128i *)((uint16_t *)out + c), round16(v, odt));
}

#define FWHT64_REGS(v)                                                                     \
	do {                                                                               \
		for (int i_ = 0; i_ < 8; i_++)                                             \
			v[i_] = fwht8(v[i_]);                                              \
		BFLY(v[0], v[1]);                                                          \
		BFLY(v[2], v[3]);                                                          \
		BFLY(v[4], v[5]);                                                          \
		BFLY(v[6], v[7]);                                                          \
		BFLY(v[0], v[2]);                                                          \
		BFLY(v[1], v[3]);                                                          \
		BFLY(v[4], v[6]);                                                          \
		BFLY(v[5], v[7]);                                                          \
		BFLY(v[0], v[4]);                                                          \
		BFLY(v[1], v[5]);                                                          \
		BFLY(v[2], v[6]);                                                          \
		BFLY(v[3], v[7]);                                                          \
	} while (0)

/*
 * v_decode_row for the common shape (d 128, f16 scales and output, 2- or 4-bit codes),
 * specialised at compile time: the same float operations in the same order as the generic
 * path below (dequantise, butterflies 1..32 of each 64-half in registers, the last stage
 * fused with the multiply), with the branches on bits, groups and dtypes gone, 2-bit codes
 * unpacked 16 at a time, and the second half never leaving registers.
 */
static inline __attribute__((always_inline)) __m256i unpack16_2bit_hi(uint32_t w)
{
	return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w),
						  _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)),
				_mm256_set1_epi32(3));
}

static inline __attribute__((always_inline)) __m256i unpack16_2bit_lo(uint32_t w)
{
	return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w),
						  _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
				_mm256_set1_epi32(3));
}

static inline __attribute__((always_inline)) void
deq64_d128(const uint8_t *packed, uint32_t bits, bool per_ch, uint32_t b, const uint16_t *s16,
	   const uint16_t *z16, const float *sg, const float *zg, __m256 v[8])
{
	for (uint32_t i = 0; i < 8; i++) {
		uint32_t c = b + 8 * i;
		__m256i code;
		if (bits == 2) {
			uint32_t w;
			memcpy(&w, packed + (c & ~15u) / 4, 4);
			code = (c & 8) ? unpack16_2bit_hi(w) : unpack16_2bit_lo(w);
		} else {
			code = unpack8(packed, c, 4, 128);
		}
		__m256 sc = per_ch ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + c)))
				   : _mm256_set1_ps(sg[c >> 5]);
		__m256 zc = per_ch ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z16 + c)))
				   : _mm256_set1_ps(zg[c >> 5]);
		v[i] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(code), sc), zc);
	}
}

static inline __attribute__((always_inline)) void
decode_row_d128(const uint8_t *packed, uint32_t bits, bool per_ch, const uint16_t *s16,
		const uint16_t *z16, float mult, uint16_t *out)
{
	float sg[8] __attribute__((aligned(32))), zg[8] __attribute__((aligned(32)));
	if (!per_ch)
		widen_params(s16, z16, 4, KVT_DTYPE_F16, sg, zg);
	__m256 a[8], c[8];
	deq64_d128(packed, bits, per_ch, 0, s16, z16, sg, zg, a);
	FWHT64_REGS(a);
	float lo[64] __attribute__((aligned(32)));
	for (int i = 0; i < 8; i++)
		_mm256_store_ps(lo + 8 * i, a[i]);
	deq64_d128(packed, bits, per_ch, 64, s16, z16, sg, zg, c);
	FWHT64_REGS(c);
	const __m256 m = _mm256_set1_ps(mult);
	for (int i = 0; i < 8; i++) {
		__m256 x = _mm256_load_ps(lo + 8 * i);
		_mm_storeu_si128((__m128i *)(out + 8 * i),
				 _mm256_cvtps_ph(_mm256_mul_ps(_mm256_add_ps(x, c[i]), m),
						 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
		_mm_storeu_si128((__m128i *)(out + 64 + 8 * i),
				 _mm256_cvtps_ph(_mm256_mul_ps(_mm256_sub_ps(x, c[i]), m),
						 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
	}
}

static void decode_row_d128_k2(const uint8_t *p, const uint16_t *s, const uint16_t *z, float m,
			       uint16_t *o)
{
	decode_row_d128(p, 2, true, s, z, m, o);
}

static void decode_row_d128_v2(const uint8_t *p, const uint16_t *s, const uint16_t *z, float m,
			       uint16_t *o)
{
	decode_row_d128(p, 2, false, s, z, m, o);
}

static void decode_row_d128_k4(const uint8_t *p, const uint16_t *s, const uint16_t *z, float m,
			       uint16_t *o)
{
	decode_row_d128(p, 4, true, s, z, m, o);
}

static void decode_row_d128_v4(const uint8_t *p, const uint16_t *s, const uint16_t *z, float m,
			       uint16_t *o)
{
	decode_row_d128(p, 4, false, s, z, m, o);
}

/* dequant + fwht + store_f32 of one row, the intermediate kept in registers where it fits */
static void v_decode_row(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			 const uint16_t *s16, const uint16_t *z16, uint32_t sdt, bool rot, float mult,
			 void *out, uint32_t odt)
{
	float sg[8] __attribute__((aligned(32))), zg[8] __attribute__((aligned(32)));
	const bool per_ch = gv == 1;
	const uint32_t gshift = (uint32_t)__builtin_ctz(gv); /* gv is a power of two */
	if (rot && d == 128 && odt == KVT_DTYPE_F16 && sdt == KVT_DTYPE_F16 &&
	    (gv == 1 || gv == 32) && (bits == 2 || bits == 4)) {
		uint16_t *o = out;
		if (bits == 2 && per_ch)
			decode_row_d128_k2(packed, s16, z16, mult, o);
		else if (bits == 2)
			decode_row_d128_v2(packed, s16, z16, mult, o);
		else if (per_ch)
			decode_row_d128_k4(packed, s16, z16, mult, o);
		else
			decode_row_d128_v4(packed, s16, z16, mult, o);
		return;
	}
	if (!per_ch)
		widen_params(s16, z16, d / gv, sdt, sg, zg);
#define DEQ(c)                                                                             \
	_mm256_add_ps(                                                                     \
		_mm256_mul_ps(_mm256_cvtepi32_ps(unpack8(packed, (c), bits, d)),               \
			      per_ch ? widen16(_mm_loadu_si128((const __m128i *)(s16 + (c))), sdt) \
				     : _mm256_set1_ps(sg[(c) >> gshift])),                       \
		per_ch ? widen16(_mm_loadu_si128((const __m128i *)(z16 + (c))), sdt)        \
		       : _mm256_set1_ps(zg[(c) >> gshift]))
	if (!rot || d < 64) {
		float tmp[256] __attribute__((aligned(32)));
		for (uint32_t c = 0; c < d; c += 8)
			_mm256_store_ps(tmp + c, DEQ(c));
		if (rot)
			v_fwht(tmp, 1, d, mult);
		for (uint32_t c = 0; c < d; c += 8)
			store8(out, c, _mm256_load_ps(tmp + c), odt);
		return;
	}
	const __m256 m = _mm256_set1_ps(mult);
	float tmp[256] __attribute__((aligned(32)));
	for (uint32_t b = 0; b < d; b += 64) {
		__m256 v[8];
		for (int i = 0; i < 8; i++)
			v[i] = DEQ(b + 8 * (uint32_t)i);
		FWHT64_REGS(v);
		if (d == 64) {
			for (int i = 0; i < 8; i++)
				store8(out, 8 * (uint32_t)i, _mm256_mul_ps(v[i], m), odt);
			return;
		}
		for (int i = 0; i < 8; i++)
			_mm256_store_ps(tmp + b + 8 * i, v[i]);
	}
#undef DEQ
	if (d == 256)
		for (uint32_t i = 0; i < 256; i += 128)
			for (uint32_t j = i; j < i + 64; j += 8) {
				__m256 a = _mm256_load_ps(tmp + j), c = _mm256_load_ps(tmp + j + 64);
				_mm256_store_ps(tmp + j, _mm256_add_ps(a, c));
				_mm256_store_ps(tmp + j + 64, _mm256_sub_ps(a, c));
			}
	uint32_t h = d / 2;
	for (uint32_t j = 0; j < h; j += 8) {
		__m256 a = _mm256_load_ps(tmp + j), c = _mm256_load_ps(tmp + j + h);
		store8(out, j, _mm256_mul_ps(_mm256_add_ps(a, c), m), odt);
		store8(out, j + h, _mm256_mul_ps(_mm256_sub_ps(a, c), m), odt);
	}
}

/* ---- The run decoder (decode_rows) -------------------------------------------------------
 *
 * The rotated rows use a transposed register layout. A row of d = 8 * NV elements lives in NV
 * vectors; before the inverse transform, lane k of vector i holds element i + NV * k, so the
 * butterflies of strides 1 .. NV/2 pair whole vectors (i, i + h): a plain add and sub, where
 * the natural layout needs a permute and a sign flip per stage. Then each block of 8 vectors
 * is transposed (8x8), after which vector k of block b holds the 8 contiguous elements
 * 8 b + NV k .. + 7, and the strides NV, 2 NV, 4 NV pair whole vectors again; the last stage is
 * followed by the multiply, then the conversion and a contiguous store. The codes come out of
 * the packed row in that layout for free: for 2-bit codes at d 128, lane k of the row's 32
 * bytes read as 8 dwords holds elements 16 k .. 16 k + 15, so vector i is (row >> 2 i) & 3.
 *
 * Every element sees exactly the scalar decoder's operations: code * scale, + zero, the
 * butterflies in stride order 1, 2, ..., d/2, each (a, b) -> (a + b, a - b) with a the lower
 * element, then * mult, then the rounding to the output dtype (only the order in which
 * independent elements are computed changes). Rows that are not rotated are dequantized in
 * the natural layout and stored.
 */
#define KVT_AI inline __attribute__((always_inline))
#define ODT_BYTES(odt) ((odt) == KVT_DTYPE_F32 ? 4u : 2u)

/* The stores of a row would wait for their lines when the output is not in cache (as when
 * the daemon decodes into reply buffers): asking for the same head's lines two tokens ahead
 * overlaps that wait with the work (measured: about +40% on an output that misses). */
static KVT_AI void prefetch_out(const struct kvt_decode_rows *j, uint32_t r, uint32_t h,
				uint32_t bytes)
{
	if (r + 2 >= j->n)
		return;
	const char *p = (const char *)(j->out + h * j->head_out + (size_t)(r + 2) * j->out_stride);
	for (uint32_t c = 0; c < bytes; c += 64)
		_mm_prefetch(p + c, _MM_HINT_T0);
}

/* The same for the input: a run reads n_heads rows B rows apart (one stream per head), too
 * many for the hardware to follow when the chunk is not in cache (a session the daemon has
 * not touched lately): the codes (and per-row parameters) of the head's row PF_IN tokens
 * ahead. Past the run or the array this is a harmless prefetch of other chunk bytes (a
 * prefetch never faults). */
#define PF_IN 4
static KVT_AI void prefetch_in(const struct kvt_decode_rows *j, uint32_t r, uint32_t h,
			       uint32_t np)
{
	/* addresses as integers: they may point past the chunk */
	const uintptr_t p = (uintptr_t)j->codes + h * j->head_codes + (r + PF_IN) * j->code_stride;
	for (uint32_t c = 0; c < j->code_stride; c += 64)
		_mm_prefetch((const char *)(p + c), _MM_HINT_T0);
	if (np) {
		const size_t pp = 2 * (h * j->head_params + (size_t)(r + PF_IN) * np);
		_mm_prefetch((const char *)((uintptr_t)j->s16 + pp), _MM_HINT_T0);
		_mm_prefetch((const char *)((uintptr_t)j->z16 + pp), _MM_HINT_T0);
	}
}

/* o[k] lane r = v[r] lane k */
static KVT_AI void tr8(__m256 v[8])
{
	__m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
	__m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
	__m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
	__m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
	__m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
	__m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
	__m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
	__m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
	v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
	v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
	v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
	v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
	v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
	v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
	v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
	v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* butterflies of strides 1, 2, 4 over 8 vectors (pairs (r, r + h) of the array) */
static KVT_AI void bfly8(__m256 v[8])
{
	BFLY(v[0], v[1]);
	BFLY(v[2], v[3]);
	BFLY(v[4], v[5]);
	BFLY(v[6], v[7]);
	BFLY(v[0], v[2]);
	BFLY(v[1], v[3]);
	BFLY(v[4], v[6]);
	BFLY(v[5], v[7]);
	BFLY(v[0], v[4]);
	BFLY(v[1], v[5]);
	BFLY(v[2], v[6]);
	BFLY(v[3], v[7]);
}

/* The packed row as dword vectors: lane k of word w holds the 32 / BITS codes of elements
 * NV k + (32 / BITS) w ... (see above); a row is d * BITS / 8 bytes, read exactly. */
static KVT_AI void rot_words_24(const uint8_t *p, const uint32_t D, const uint32_t BITS,
				__m256i w[4])
{
	if (D == 64 && BITS == 2) {
		w[0] = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
	} else if ((D == 64 && BITS == 4) || (D == 128 && BITS == 2)) {
		w[0] = _mm256_loadu_si256((const __m256i *)p);
	} else if ((D == 128 && BITS == 4) || (D == 256 && BITS == 2)) {
		/* lane k of the row's qwords -> even dwords in w[0], odd in w[1] */
		__m256 q0 = _mm256_loadu_ps((const float *)(const void *)p);
		__m256 q1 = _mm256_loadu_ps((const float *)(const void *)(p + 32));
		w[0] = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(q0, q1, 0x88)),
						0xD8);
		w[1] = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(q0, q1, 0xDD)),
						0xD8);
	} else { /* d 256, 4 bits: lane k of 16-byte block k -> dword m of it in w[m] */
		__m256 q0 = _mm256_loadu_ps((const float *)(const void *)p);
		__m256 q1 = _mm256_loadu_ps((const float *)(const void *)(p + 32));
		__m256 q2 = _mm256_loadu_ps((const float *)(const void *)(p + 64));
		__m256 q3 = _mm256_loadu_ps((const float *)(const void *)(p + 96));
		__m256 t0 = _mm256_unpacklo_ps(q0, q1), t1 = _mm256_unpackhi_ps(q0, q1);
		__m256 t2 = _mm256_unpacklo_ps(q2, q3), t3 = _mm256_unpackhi_ps(q2, q3);
		/* lanes come out as blocks 0, 2, 4, 6, 1, 3, 5, 7: put them in order */
		const __m256i ord = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
		w[0] = _mm256_permutevar8x32_epi32(_mm256_castps_si256(_mm256_shuffle_ps(t0, t2, 0x44)), ord);
		w[1] = _mm256_permutevar8x32_epi32(_mm256_castps_si256(_mm256_shuffle_ps(t0, t2, 0xEE)), ord);
		w[2] = _mm256_permutevar8x32_epi32(_mm256_castps_si256(_mm256_shuffle_ps(t1, t3, 0x44)), ord);
		w[3] = _mm256_permutevar8x32_epi32(_mm256_castps_si256(_mm256_shuffle_ps(t1, t3, 0xEE)), ord);
	}
}

static KVT_AI void rot_words(const uint8_t *p, const uint32_t D, const uint32_t BITS,
			     __m256i w[4])
{
	if (BITS == 3) {
		/* the low plane (bytes [0, d/4)) is a 2-bit row; in the high plane (d/8 bytes)
		 * bit i of lane k is element i + NV k: byte k (d 64), 16-bit word k (d 128),
		 * dword k (d 256), in the word after the low plane's */
		rot_words_24(p, D, 2, w);
		const uint8_t *hp = p + D / 4;
		if (D == 64)
			w[1] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)hp));
		else if (D == 128)
			w[1] = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)hp));
		else
			w[2] = _mm256_loadu_si256((const __m256i *)(const void *)hp);
		return;
	}
	rot_words_24(p, D, BITS, w);
}

/* code vector i of the transposed layout, as floats */
#define ROT_CODE(w, i, BITS)                                                                \
	_mm256_cvtepi32_ps(_mm256_and_si256(                                                \
		_mm256_srli_epi32((w)[(i) / (32 / (BITS))], (int)((BITS) * ((i) % (32 / (BITS))))), \
		_mm256_set1_epi32((1 << (BITS)) - 1)))

static KVT_AI __m256 rot_code(const __m256i w[4], const uint32_t i, const uint32_t D,
			      const uint32_t BITS)
{
	if (BITS != 3)
		return ROT_CODE(w, i, BITS);
	__m256i lo = _mm256_and_si256(_mm256_srli_epi32(w[i / 16], (int)(2 * (i % 16))),
				      _mm256_set1_epi32(3));
	__m256i hw = w[D == 256 ? 2 : 1];
	__m256i hi = i >= 2 ? _mm256_srli_epi32(hw, (int)(i - 2)) : _mm256_slli_epi32(hw, (int)(2 - i));
	return _mm256_cvtepi32_ps(_mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi32(4))));
}

/* one block of 8 vectors (elements 8 b + r + NV k): dequantize, strides 1, 2, 4 */
static KVT_AI void rot_block_in(const __m256i w[4], const uint32_t b, const uint32_t D,
				const uint32_t BITS,
				const bool PER_CH, const float *Ps, const float *Pz, __m256 sv,
				__m256 zv, __m256 v[8])
{
	_Pragma("GCC unroll 8") for (uint32_t r = 0; r < 8; r++)
	{
		const uint32_t i = 8 * b + r;
		__m256 sc = PER_CH ? _mm256_load_ps(Ps + 8 * i) : sv;
		__m256 zc = PER_CH ? _mm256_load_ps(Pz + 8 * i) : zv;
		v[r] = _mm256_add_ps(_mm256_mul_ps(rot_code(w, i, D, BITS), sc), zc);
	}
	bfly8(v);
}

/* one block after the strides below NV: transpose, strides NV, 2 NV, 4 NV, * m, store */
static KVT_AI void rot_block_out(__m256 v[8], const uint32_t b, const uint32_t NV, __m256 m,
				 uint8_t *o, const uint32_t ODT)
{
	tr8(v);
	bfly8(v);
	_Pragma("GCC unroll 8") for (uint32_t k = 0; k < 8; k++)
		store8(o, 8 * b + NV * k, _mm256_mul_ps(v[k], m), ODT);
}

static KVT_AI void rot_row(const uint8_t *p, uint8_t *o, const uint32_t D, const uint32_t BITS,
			   const bool PER_CH, const uint32_t ODT, const float *Ps, const float *Pz,
			   __m256 sv, __m256 zv, __m256 m)
{
	const uint32_t NV = D / 8;
	__m256i w[4];
	__m256 v[8];
	rot_words(p, D, BITS, w);
	if (NV == 8) {
		rot_block_in(w, 0, D, BITS, PER_CH, Ps, Pz, sv, zv, v);
		rot_block_out(v, 0, NV, m, o, ODT);
		return;
	}
	float tmp[256] __attribute__((aligned(32)));
	if (NV == 16) {
		/* block 0 waits in memory while block 1 stays in registers */
		rot_block_in(w, 0, D, BITS, PER_CH, Ps, Pz, sv, zv, v);
		for (int r = 0; r < 8; r++)
			_mm256_store_ps(tmp + 8 * r, v[r]);
		rot_block_in(w, 1, D, BITS, PER_CH, Ps, Pz, sv, zv, v);
		for (int r = 0; r < 8; r++) { /* stride 8: (i, i + 8) */
			__m256 a = _mm256_load_ps(tmp + 8 * r);
			_mm256_store_ps(tmp + 8 * r, _mm256_add_ps(a, v[r]));
			v[r] = _mm256_sub_ps(a, v[r]);
		}
		rot_block_out(v, 1, NV, m, o, ODT);
		for (int r = 0; r < 8; r++)
			v[r] = _mm256_load_ps(tmp + 8 * r);
		rot_block_out(v, 0, NV, m, o, ODT);
		return;
	}
	/* NV 32: four blocks through memory; strides 8 and 16 pair blocks (0, 1), (2, 3) and
	 * then (0, 2), (1, 3) */
	_Pragma("GCC unroll 4") for (uint32_t b = 0; b < 4; b++)
	{
		rot_block_in(w, b, D, BITS, PER_CH, Ps, Pz, sv, zv, v);
		for (int r = 0; r < 8; r++)
			_mm256_store_ps(tmp + 64 * b + 8 * r, v[r]);
	}
	for (int r = 0; r < 8; r++) {
		__m256 x0 = _mm256_load_ps(tmp + 8 * r), x1 = _mm256_load_ps(tmp + 64 + 8 * r);
		__m256 x2 = _mm256_load_ps(tmp + 128 + 8 * r), x3 = _mm256_load_ps(tmp + 192 + 8 * r);
		BFLY(x0, x1);
		BFLY(x2, x3);
		BFLY(x0, x2);
		BFLY(x1, x3);
		_mm256_store_ps(tmp + 8 * r, x0);
		_mm256_store_ps(tmp + 64 + 8 * r, x1);
		_mm256_store_ps(tmp + 128 + 8 * r, x2);
		_mm256_store_ps(tmp + 192 + 8 * r, x3);
	}
	_Pragma("GCC unroll 4") for (uint32_t b = 0; b < 4; b++)
	{
		for (int r = 0; r < 8; r++)
			v[r] = _mm256_load_ps(tmp + 64 * b + 8 * r);
		rot_block_out(v, b, NV, m, o, ODT);
	}
}

/* ng (1, 2, 4 or 8) 16-bit parameters, read exactly, widened to f32 in lanes 0..ng-1 */
static KVT_AI __m256 load_params(const uint16_t *p, uint32_t ng, uint32_t sdt)
{
	__m128i h;
	if (ng == 1) {
		h = _mm_cvtsi32_si128(p[0]);
	} else if (ng == 2) {
		uint32_t x;
		memcpy(&x, p, 4);
		h = _mm_cvtsi32_si128((int)x);
	} else if (ng == 4) {
		h = _mm_loadl_epi64((const __m128i *)(const void *)p);
	} else {
		h = _mm_loadu_si128((const __m128i *)(const void *)p);
	}
	return widen16(h, sdt);
}

/* d per-channel parameters widened once per run: natural order, or for rotated rows
 * Ps[8 i + k] = s[i + NV k] (the layout of the code vectors) */
static KVT_AI void prep_per_ch(const uint16_t *s16, const uint16_t *z16, uint32_t sdt,
			       uint32_t D, bool rot, float *Ps, float *Pz)
{
	float ns[256] __attribute__((aligned(32))), nz[256] __attribute__((aligned(32)));
	float *ds = rot ? ns : Ps, *dz = rot ? nz : Pz;
	for (uint32_t c = 0; c < D; c += 8) {
		_mm256_store_ps(ds + c, widen16(_mm_loadu_si128((const __m128i *)(s16 + c)), sdt));
		_mm256_store_ps(dz + c, widen16(_mm_loadu_si128((const __m128i *)(z16 + c)), sdt));
	}
	if (!rot)
		return;
	const uint32_t NV = D / 8;
	for (uint32_t b = 0; b < NV / 8; b++) {
		__m256 x[8], y[8];
		for (uint32_t k = 0; k < 8; k++) {
			x[k] = _mm256_load_ps(ns + k * NV + 8 * b);
			y[k] = _mm256_load_ps(nz + k * NV + 8 * b);
		}
		tr8(x);
		tr8(y);
		for (uint32_t r = 0; r < 8; r++) {
			_mm256_store_ps(Ps + 8 * (8 * b + r), x[r]);
			_mm256_store_ps(Pz + 8 * (8 * b + r), y[r]);
		}
	}
}

static KVT_AI void dec_rows_rot(const struct kvt_decode_rows *j, const uint32_t D,
				const uint32_t BITS, const bool PER_CH, const uint32_t ODT)
{
	/* per head: the per-channel parameters in the code vectors' layout */
	float Ps[KVT_DECODE_HEADS_MAX][256] __attribute__((aligned(32)));
	float Pz[KVT_DECODE_HEADS_MAX][256] __attribute__((aligned(32)));
	const uint32_t NV = D / 8, ng = PER_CH ? 0 : D / j->gv, sdt = j->sdt, nh = j->n_heads;
	/* lane k of a per-row parameter vector: the group of element NV k */
	const __m256i gidx = _mm256_srl_epi32(
		_mm256_setr_epi32(0, (int)NV, 2 * (int)NV, 3 * (int)NV, 4 * (int)NV, 5 * (int)NV,
				  6 * (int)NV, 7 * (int)NV),
		_mm_cvtsi32_si128(PER_CH ? 0 : __builtin_ctz(j->gv)));
	__m256 sv = _mm256_setzero_ps(), zv = _mm256_setzero_ps();
	KVT_ASSERT(nh <= KVT_DECODE_HEADS_MAX);
	if (PER_CH)
		for (uint32_t h = 0; h < nh; h++)
			prep_per_ch(j->s16 + h * j->head_params, j->z16 + h * j->head_params, sdt, D,
				    true, Ps[h], Pz[h]);
	for (uint32_t r = 0; r < j->n; r++) {
		if (j->pidx && j->pidx[r] >= 0)
			continue;
		const __m256 m = _mm256_set1_ps(j->norms ? j->norms[r] * j->mult : j->mult);
		for (uint32_t h = 0; h < nh; h++) {
			if (!PER_CH) {
				const size_t pp = h * j->head_params + r * ng;
				sv = _mm256_permutevar8x32_ps(load_params(j->s16 + pp, ng, sdt), gidx);
				zv = _mm256_permutevar8x32_ps(load_params(j->z16 + pp, ng, sdt), gidx);
			}
			prefetch_out(j, r, h, D * ODT_BYTES(ODT));
			prefetch_in(j, r, h, ng);
			rot_row(j->codes + h * j->head_codes + r * j->code_stride,
				j->out + h * j->head_out + r * j->out_stride, D, BITS, PER_CH, ODT,
				Ps[PER_CH ? h : 0], Pz[PER_CH ? h : 0], sv, zv, m);
		}
	}
}

/* rows that are not rotated: code * scale + zero in the natural layout, stored */
static KVT_AI __m256 nat_code(const uint8_t *p, uint32_t i, uint32_t d, const uint32_t BITS)
{
	if (BITS == 3) {
		uint16_t x;
		memcpy(&x, p + 2 * i, 2);
		__m256i lo = _mm256_and_si256(
			_mm256_srlv_epi32(_mm256_set1_epi16((short)x),
					  _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
			_mm256_set1_epi32(3));
		/* bit c of the high plane's byte i, moved to bit 2 */
		__m256i hi = _mm256_slli_epi32(
			_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(p[d / 4 + i]),
							   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
					 _mm256_set1_epi32(1)),
			2);
		return _mm256_cvtepi32_ps(_mm256_or_si256(lo, hi));
	}
	if (BITS == 2) {
		uint16_t x;
		memcpy(&x, p + 2 * i, 2);
		return _mm256_cvtepi32_ps(_mm256_and_si256(
			_mm256_srlv_epi32(_mm256_set1_epi16((short)x),
					  _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
			_mm256_set1_epi32(3)));
	}
	uint32_t x;
	memcpy(&x, p + 4 * i, 4);
	return _mm256_cvtepi32_ps(_mm256_and_si256(
		_mm256_srlv_epi32(_mm256_set1_epi32((int)x),
				  _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
		_mm256_set1_epi32(15)));
}

static KVT_AI void dec_rows_nat(const struct kvt_decode_rows *j, const uint32_t BITS,
				const bool PER_CH, const uint32_t ODT)
{
	float Ps[KVT_DECODE_HEADS_MAX][256] __attribute__((aligned(32)));
	float Pz[KVT_DECODE_HEADS_MAX][256] __attribute__((aligned(32)));
	const uint32_t d = j->d, nv = d / 8, ng = PER_CH ? 0 : d / j->gv, vpg = j->gv / 8;
	const uint32_t nh = j->n_heads;
	KVT_ASSERT(nh <= KVT_DECODE_HEADS_MAX);
	if (PER_CH)
		for (uint32_t h = 0; h < nh; h++)
			prep_per_ch(j->s16 + h * j->head_params, j->z16 + h * j->head_params, j->sdt,
				    d, false, Ps[h], Pz[h]);
	for (uint32_t r = 0; r < j->n; r++) {
		if (j->pidx && j->pidx[r] >= 0)
			continue;
		for (uint32_t h = 0; h < nh; h++) {
			const uint8_t *p = j->codes + h * j->head_codes + r * j->code_stride;
			uint8_t *o = j->out + h * j->head_out + r * j->out_stride;
			prefetch_out(j, r, h, d * ODT_BYTES(ODT));
			prefetch_in(j, r, h, ng);
			if (PER_CH) {
				for (uint32_t i = 0; i < nv; i++)
					store8(o, 8 * i,
					       _mm256_add_ps(_mm256_mul_ps(nat_code(p, i, d, BITS),
									   _mm256_load_ps(Ps[h] + 8 * i)),
							     _mm256_load_ps(Pz[h] + 8 * i)),
					       ODT);
				continue;
			}
			const size_t pp = h * j->head_params + r * ng;
			__m256 ws = load_params(j->s16 + pp, ng, j->sdt);
			__m256 wz = load_params(j->z16 + pp, ng, j->sdt);
			for (uint32_t g = 0; g < ng; g++) {
				__m256 sv = _mm256_permutevar8x32_ps(ws, _mm256_set1_epi32((int)g));
				__m256 zv = _mm256_permutevar8x32_ps(wz, _mm256_set1_epi32((int)g));
				for (uint32_t i = g * vpg; i < (g + 1) * vpg; i++)
					store8(o, 8 * i,
					       _mm256_add_ps(_mm256_mul_ps(nat_code(p, i, d, BITS), sv), zv),
					       ODT);
			}
		}
	}
}

typedef void (*dec_rows_fn)(const struct kvt_decode_rows *j);

#define DEC_ROT(D, BITS, PC, ODT)                                                           \
	static void dec_rot_##D##_##BITS##_##PC##_##ODT(const struct kvt_decode_rows *j)    \
	{                                                                                   \
		dec_rows_rot(j, D, BITS, PC, ODT);                                          \
	}
#define DEC_ROT_ODT(D, BITS, PC)                                                            \
	DEC_ROT(D, BITS, PC, 1) DEC_ROT(D, BITS, PC, 2) DEC_ROT(D, BITS, PC, 3)
#define DEC_ROT_PC(D, BITS) DEC_ROT_ODT(D, BITS, 0) DEC_ROT_ODT(D, BITS, 1)
DEC_ROT_PC(64, 2)
DEC_ROT_PC(64, 4)
DEC_ROT_PC(128, 2)
DEC_ROT_PC(128, 4)
DEC_ROT_PC(256, 2)
DEC_ROT_PC(256, 4)
DEC_ROT_PC(64, 3)
DEC_ROT_PC(128, 3)
DEC_ROT_PC(256, 3)
#define DEC_NAT(BITS, PC, ODT)                                                              \
	static void dec_nat_##BITS##_##PC##_##ODT(const struct kvt_decode_rows *j)          \
	{                                                                                   \
		dec_rows_nat(j, BITS, PC, ODT);                                             \
	}
DEC_NAT(2, 0, 1)
DEC_NAT(2, 0, 2)
DEC_NAT(2, 0, 3)
DEC_NAT(2, 1, 1)
DEC_NAT(2, 1, 2)
DEC_NAT(2, 1, 3)
DEC_NAT(4, 0, 1)
DEC_NAT(4, 0, 2)
DEC_NAT(4, 0, 3)
DEC_NAT(4, 1, 1)
DEC_NAT(4, 1, 2)
DEC_NAT(4, 1, 3)
DEC_NAT(3, 0, 1)
DEC_NAT(3, 0, 2)
DEC_NAT(3, 0, 3)
DEC_NAT(3, 1, 1)
DEC_NAT(3, 1, 2)
DEC_NAT(3, 1, 3)

#define ODTS(pre) { pre##_1, pre##_2, pre##_3 }
#define PCS(pre) { ODTS(pre##_0), ODTS(pre##_1) }
/* [d 64/128/256][bits 2/4/3][per_ch][out dtype - 1] */
static const dec_rows_fn dec_rot_fns[3][3][2][3] = {
	{ PCS(dec_rot_64_2), PCS(dec_rot_64_4), PCS(dec_rot_64_3) },
	{ PCS(dec_rot_128_2), PCS(dec_rot_128_4), PCS(dec_rot_128_3) },
	{ PCS(dec_rot_256_2), PCS(dec_rot_256_4), PCS(dec_rot_256_3) },
};
/* [bits 2/4/3][per_ch][out dtype - 1] */
static const dec_rows_fn dec_nat_fns[3][2][3] = { PCS(dec_nat_2), PCS(dec_nat_4), PCS(dec_nat_3) };
#undef ODTS
#undef PCS

static void v_decode_rows(const struct kvt_decode_rows *j)
{
	const uint32_t d = j->d, gv = j->gv;
	const bool fast = (j->bits == 2 || j->bits == 3 || j->bits == 4) &&
			  (d == 64 || d == 128 || d == 256) &&
			  (gv == 1 || (gv >= 32 && gv <= d && !(gv & (gv - 1)))) &&
			  j->out_dtype >= KVT_DTYPE_F16 && j->out_dtype <= KVT_DTYPE_F32 &&
			  (j->sdt == KVT_DTYPE_F16 || j->sdt == KVT_DTYPE_BF16);
	if (fast) {
		const uint32_t bi = j->bits == 2 ? 0 : j->bits == 4 ? 1 : 2, pc = gv == 1;
		const uint32_t oi = j->out_dtype - 1;
		if (j->rot)
			dec_rot_fns[d == 64 ? 0 : d == 128 ? 1 : 2][bi][pc][oi](j);
		else
			dec_nat_fns[bi][pc][oi](j);
		return;
	}
	/* any other width or shape: one row at a time */
	const size_t np = gv == 1 ? 0 : d / gv;
	for (uint32_t r = 0; r < j->n; r++) {
		if (j->pidx && j->pidx[r] >= 0)
			continue;
		for (uint32_t h = 0; h < j->n_heads; h++) {
			const size_t pp = h * j->head_params + r * np;
			v_decode_row(j->codes + h * j->head_codes + r * j->code_stride, d, j->bits, gv,
				     j->s16 + pp, j->z16 + pp, j->sdt, j->rot,
				     j->norms ? j->norms[r] * j->mult : j->mult,
				     j->out + h * j->head_out + r * j->out_stride, j->out_dtype);
		}
	}
}

static void v_dot_rows(const float *w, size_t w_stride, uint32_t nrows, const float *x,
		       uint32_t d, float *out)
{
	uint32_t i = 0;
	for (; i + 4 <= nrows; i += 4) {
		const float *w0 = w + i * w_stride, *w1 = w0 + w_stride, *w2 = w1 + w_stride,
			    *w3 = w2 + w_stride;
		__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
		for (uint32_t c = 0; c < d; c += 8) {
			__m256 xv = _mm256_loadu_ps(x + c);
			a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(w0 + c), xv));
			a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(w1 + c), xv));
			a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(w2 + c), xv));
			a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(w3 + c), xv));
		}
		out[i] = reduce8(a0);
		out[i + 1] = reduce8(a1);
		out[i + 2] = reduce8(a2);
		out[i + 3] = reduce8(a3);
	}
	for (; i < nrows; i++)
		out[i] = v_dot(w + i * w_stride, x, d);
}

static void v_accum_grp(const uint8_t *packed, uint32_t d, uint32_t bits, uint32_t gv,
			const uint16_t *s16, const uint16_t *z16, uint32_t sdt, const float *p,
			size_t p_stride, uint32_t nrows, float *acc, size_t acc_stride)
{
	float v[256] __attribute__((aligned(32)));
	v_dequant_grp(packed, d, bits, gv, s16, z16, sdt, v);
	uint32_t i = 0;
	for (; i + 4 <= nrows; i += 4) {
		const __m256 p0 = _mm256_set1_ps(p[i * p_stride]);
		const __m256 p1 = _mm256_set1_ps(p[(i + 1) * p_stride]);
		const __m256 p2 = _mm256_set1_ps(p[(i + 2) * p_stride]);
		const __m256 p3 = _mm256_set1_ps(p[(i + 3) * p_stride]);
		float *y0 = acc + i * acc_stride, *y1 = y0 + acc_stride, *y2 = y1 + acc_stride,
		      *y3 = y2 + acc_stride;
		for (uint32_t c = 0; c < d; c += 8) {
			__m256 vv = _mm256_load_ps(v + c);
			_mm256_storeu_ps(y0 + c, _mm256_add_ps(_mm256_loadu_ps(y0 + c), _mm256_mul_ps(p0, vv)));
			_mm256_storeu_ps(y1 + c, _mm256_add_ps(_mm256_loadu_ps(y1 + c), _mm256_mul_ps(p1, vv)));
			_mm256_storeu_ps(y2 + c, _mm256_add_ps(_mm256_loadu_ps(y2 + c), _mm256_mul_ps(p2, vv)));
			_mm256_storeu_ps(y3 + c, _mm256_add_ps(_mm256_loadu_ps(y3 + c), _mm256_mul_ps(p3, vv)));
		}
	}
	for (; i < nrows; i++)
		v_axpy(acc + i * acc_stride, v, p[i * p_stride], d);
}

const struct kvt_codec_ops kvt_codec_ops_avx2 = {
	.dot_rows = v_dot_rows,
	.accum_grp = v_accum_grp,
	.decode_row = v_decode_row,
	.decode_rows = v_decode_rows,
	.name = "avx2",
	.load_f32 = v_load_f32,
	.store_f32 = v_store_f32,
	.fwht = v_fwht,
	.sumsq = v_sumsq,
	.div = v_div,
	.dot = v_dot,
	.axpy = v_axpy,
	.quant_cols = v_quant_cols,
	.quant_rows = v_quant_rows,
	.mse_cols = v_mse_cols,
	.pack = v_pack,
	.dequant_ch = v_dequant_ch,
	.dequant_grp = v_dequant_grp,
	.unpack_f32 = v_unpack_f32,
};
#endif /* KVT_HAVE_AVX2_BUILD */

/*
 * codec_dtype.c - f16 / bf16 <-> f32, bit-exact round-to-nearest-even including subnormals,
 * infinities and NaN. The AVX2 path converts with F16C, which follows the same rules; the
 * tests compare the two over every f16 value and many f32 ones.
 */
#include "codec_internal.h"

float kvt_f16_to_f32(uint16_t h)
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

uint16_t kvt_f32_to_f16(float f)
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

float kvt_bf16_to_f32(uint16_t h)
{
	return kvt_bits_f32((uint32_t)h << 16);
}

uint16_t kvt_f32_to_bf16(float f)
{
	uint32_t x = kvt_f32_bits(f);
	if ((x & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((x >> 16) | 0x40); /* NaN stays NaN (quieted) */
	x = x + 0x7fffu + ((x >> 16) & 1u);
	return (uint16_t)(x >> 16);
}

void kvt_convert(const void *src, uint32_t src_dtype, void *dst, uint32_t dst_dtype, size_t n)
{
	if (src_dtype == dst_dtype) {
		memmove(dst, src, n * kvt_dtype_size(src_dtype));
		return;
	}
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	float tmp[256];
	const uint8_t *s = src;
	uint8_t *o = dst;
	size_t ss = kvt_dtype_size(src_dtype), ds = kvt_dtype_size(dst_dtype);
	KVT_ASSERT(ss && ds);
	while (n) {
		size_t m = n < 256 ? n : 256;
		if (src_dtype == KVT_DTYPE_F32) {
			ops->store_f32((const float *)(const void *)s, o, dst_dtype, m);
		} else if (dst_dtype == KVT_DTYPE_F32) {
			ops->load_f32(s, src_dtype, (float *)(void *)o, m);
		} else {
			ops->load_f32(s, src_dtype, tmp, m);
			ops->store_f32(tmp, o, dst_dtype, m);
		}
		s += m * ss;
		o += m * ds;
		n -= m;
	}
}

/*
 * codec_dtype.c - f16 / bf16 <-> f32, bit-exact round-to-nearest-even including subnormals,
 * infinities and NaN. The AVX2 path converts with F16C, which follows the same rules; the
 * tests compare the two over every f16 value and many f32 ones.
 */
#include "codec_internal.h"

float kvt_f16_to_f32(uint16_t h)
{
	return kvt_f16_to_f32_inline(h);
}

uint16_t kvt_f32_to_f16(float f)
{
	return kvt_f32_to_f16_inline(f);
}

float kvt_bf16_to_f32(uint16_t h)
{
	return kvt_bf16_to_f32_inline(h);
}

uint16_t kvt_f32_to_bf16(float f)
{
	return kvt_f32_to_bf16_inline(f);
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

/*
 * codec_hadamard.c - the orthonormal Walsh-Hadamard transform callers see. The butterflies
 * live in the kernel tables (codec_kernels.c, codec_kernels_avx2.c); this is the front door.
 */
#include "codec_internal.h"

void kvt_hadamard_f32(float *x, size_t n, uint32_t d)
{
	KVT_ASSERT(d >= 2 && d <= 256 && (d & (d - 1)) == 0);
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	/* the AVX2 butterflies work on 8 lanes; tiny d goes through the scalar reference */
	if (d < 8)
		ops = &kvt_codec_ops_scalar;
	ops->fwht(x, n, d, kvt_inv_sqrt_dim(d));
}

void kvt_rotate_queries(float *q, size_t n, uint32_t d)
{
	kvt_hadamard_f32(q, n, d);
}

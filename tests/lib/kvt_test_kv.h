/* kvt_test_kv.h - K/V test data helpers that need the codec's dtype conversions (link
 * kvt_kernels). */
#ifndef KVT_TEST_KV_H
#define KVT_TEST_KV_H

#include <stddef.h>
#include <stdint.h>

#include "kvt_codec.h"

/* Multiplies the n elements of dtype dt in each of kv[0] (keys) and kv[1] (values) by `by`,
 * through f32 (scratch: n floats): the same data at another magnitude, e.g. past what the GPU
 * kernels' f16 parameters hold. */
static inline void kvt_test_scale_kv(void *const kv[2], uint32_t dt, size_t n, float by,
				     float *scratch)
{
	for (int t = 0; t < 2; t++) {
		kvt_convert(kv[t], dt, scratch, KVT_DTYPE_F32, n);
		for (size_t i = 0; i < n; i++)
			scratch[i] *= by;
		kvt_convert(scratch, KVT_DTYPE_F32, kv[t], dt, n);
	}
}

#endif

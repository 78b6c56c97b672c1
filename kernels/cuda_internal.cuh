/*
 * cuda_internal.cuh - what kernels/*.cu share: the context, error helpers and the device
 * building blocks that mirror the CPU codec's float operations (codec_internal.h documents
 * their exact order; the GPU follows it so both paths write the same bytes).
 *
 * The library is compiled with --use_fast_math, so every operation whose rounding the chunk
 * format depends on is written with an explicit IEEE intrinsic (__fadd_rn, __fmul_rn,
 * __fdiv_rn, __fsqrt_rn): those are never contracted into FMAs nor approximated.
 */
#ifndef KVT_CUDA_INTERNAL_CUH
#define KVT_CUDA_INTERNAL_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* kvt_codec.h is C17; its one C-only keyword has a C++ spelling */
#if defined(__cplusplus) && !defined(_Static_assert)
#define _Static_assert static_assert
#endif
#include "kvt_codec.h"
#include "kvt_cuda.h"

#define KVT_FULL_MASK 0xffffffffu

struct kvt_cuda_ctx {
	int device;
	int sm_count;
	int cc_major; /* compute capability major (programmatic dependent launches: 9+) */
	char name[256];
	cudaStream_t stream; /* every op but an attention run takes it by kvt_cuda_stream() */
	/* the stream's last op was an attention run (kvt_cuda_attend_run sets it, every other op
	 * clears it through kvt_cuda_stream): no kernel still queued or running on the stream
	 * writes chunk bytes, so the next run's INT2 kernel may copy chunk bytes before its grid
	 * dependency wait (att_params.early; docs/gpu.md "Session 11") */
	bool after_attend;
	/* staging for job descriptors and chunk headers: pinned host -> device, reused per
	 * call once the previous call's copy has finished (staging_done) */
	void *stage_host;
	void *stage_dev;
	size_t stage_bytes;
	cudaEvent_t stage_done;
	uint32_t *crc_acc_dev; /* KVT_CUDA_MAX_JOBS partial crcs */
	uint32_t *work_ctr_dev; /* the fast encoder's grid-wide work counter, then the crc pass's
				 * counters (CRC_SYNC_WORDS words, kvt_cuda_enc.cuh) */
};

/* the ctx's stream for any op other than an attention run (see after_attend) */
static inline cudaStream_t kvt_cuda_stream(kvt_cuda_ctx *c)
{
	c->after_attend = false;
	return c->stream;
}

int kvt_cuda_errf(char *err, size_t errlen, int rc, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* Maps a CUDA error to a negative errno and a message naming what failed. */
int kvt_cuda_check(cudaError_t e, const char *what, char *err, size_t errlen);
/* Waits until the staging buffer may be overwritten. */
int kvt_cuda_stage_acquire(kvt_cuda_ctx *ctx, char *err, size_t errlen);
/* Copies the first `bytes` of the staging buffer to the device and marks it busy. */
int kvt_cuda_stage_push(kvt_cuda_ctx *ctx, size_t bytes, char *err, size_t errlen);

static inline uint32_t kvt_sdt_of(uint32_t dtype)
{
	return dtype == KVT_DTYPE_BF16 ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
}

/* A launch configuration for cudaLaunchKernelEx; with pdl, the launch is the programmatic
 * dependent of the kernel before it in the stream (sm_90+): its blocks may start once every
 * block of that kernel has started or executed griddepcontrol.launch_dependents, so the
 * kernel must not read that kernel's output without its own wait. *at holds the attribute
 * and must live until the launch. */
static inline cudaLaunchConfig_t kvt_launch_config(dim3 grid, dim3 block, size_t smem,
						   cudaStream_t s, bool pdl, cudaLaunchAttribute *at)
{
	cudaLaunchConfig_t lc;
	memset(&lc, 0, sizeof(lc));
	lc.gridDim = grid;
	lc.blockDim = block;
	lc.dynamicSmemBytes = smem;
	lc.stream = s;
	memset(at, 0, sizeof(*at));
	at->id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at->val.programmaticStreamSerializationAllowed = 1;
	lc.attrs = at;
	lc.numAttrs = pdl ? 1 : 0;
	return lc;
}

/* ---- Device building blocks --------------------------------------------------------------- */

/* element i's bits (f32, or the f16 / bf16 in the low half), and their value: a load split
 * from its conversion, for code that issues loads long before it needs their values (the
 * INT2 attention prologue) */
__device__ __forceinline__ uint32_t kvt_d_ld_raw(const void *p, size_t i, uint32_t dt)
{
	return dt == KVT_DTYPE_F32 ? ((const uint32_t *)p)[i] : ((const uint16_t *)p)[i];
}

__device__ __forceinline__ float kvt_d_widen(uint32_t raw, uint32_t dt)
{
	return dt == KVT_DTYPE_F32    ? __uint_as_float(raw)
	       : dt == KVT_DTYPE_BF16 ? __uint_as_float(raw << 16)
				      : __half2float(__ushort_as_half((uint16_t)raw));
}

/* the load and the conversion in one (written out: as kvt_d_widen(kvt_d_ld_raw()) ptxas
 * compiles the attention and codec kernels differently, and those were measured as they are) */
__device__ __forceinline__ float kvt_d_ld(const void *p, size_t i, uint32_t dt)
{
	if (dt == KVT_DTYPE_F16)
		return __half2float(((const __half *)p)[i]);
	if (dt == KVT_DTYPE_BF16)
		return __uint_as_float((uint32_t)((const uint16_t *)p)[i] << 16);
	return ((const float *)p)[i];
}

__device__ __forceinline__ void kvt_d_st(void *p, size_t i, uint32_t dt, float f)
{
	if (dt == KVT_DTYPE_F16)
		((__half *)p)[i] = __float2half_rn(f);
	else if (dt == KVT_DTYPE_BF16)
		((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(f);
	else
		((float *)p)[i] = f;
}

__device__ __forceinline__ float kvt_d_widen16(uint16_t b, bool bf)
{
	return bf ? __uint_as_float((uint32_t)b << 16) : __half2float(__ushort_as_half(b));
}

__device__ __forceinline__ uint16_t kvt_d_round16(float f, bool bf)
{
	return bf ? __bfloat16_as_ushort(__float2bfloat16_rn(f))
		  : __half_as_ushort(__float2half_rn(f));
}

/*
 * Fast Walsh-Hadamard transform of one vector of D = 32 * EPL floats spread over a warp, lane
 * l holding elements l*EPL .. l*EPL+EPL-1: butterflies with stride 1, 2, ..., D/2 in that
 * order, each pair (a, b) -> (a + b, a - b), then every element times mult: the CPU's
 * s_fwht, operation for operation.
 */
/* The in-register butterflies of that transform at strides S0, 2 S0, ... < S1 over a lane's N
 * elements, each pair (a, b) -> (a + b, a - b) rounded as the CPU's fadd / fsub. */
template <int N, int S0, int S1>
__device__ __forceinline__ void kvt_d_fwht_reg(float (&x)[N])
{
#pragma unroll
	for (int s = S0; s < S1; s <<= 1) {
#pragma unroll
		for (int e = 0; e < N; e++) {
			if (!(e & s)) {
				float a = x[e], b = x[e + s];
				x[e] = __fadd_rn(a, b);
				x[e + s] = __fsub_rn(a, b);
			}
		}
	}
}

template <int EPL>
__device__ __forceinline__ void kvt_d_fwht(float (&x)[EPL], int lane, float mult)
{
	kvt_d_fwht_reg<EPL, 1, EPL>(x);
#pragma unroll
	for (int m = 1; m < 32; m <<= 1) {
#pragma unroll
		for (int e = 0; e < EPL; e++) {
			float y = __shfl_xor_sync(KVT_FULL_MASK, x[e], m);
			x[e] = (lane & m) ? __fsub_rn(y, x[e]) : __fadd_rn(x[e], y);
		}
	}
#pragma unroll
	for (int e = 0; e < EPL; e++)
		x[e] = __fmul_rn(x[e], mult);
}

/* kvt_qparam: the quantizer's per-group rule from the group's min and max. */
__device__ __forceinline__ void kvt_d_qparam(float mn, float mx, bool has_any, float qmax,
					     bool bf, uint16_t *sb_out, uint16_t *zb_out,
					     float *s_out, float *z_out)
{
	if (!has_any) {
		*sb_out = 0;
		*zb_out = 0;
		*s_out = 0.0f;
		*z_out = 0.0f;
		return;
	}
	if (mn == 0.0f && mx == 0.0f) {
		mn = -1.0f;
		mx = 1.0f;
	}
	if (mx > mn) {
		float scale = __fdiv_rn(__fsub_rn(mx, mn), qmax);
		uint16_t sb = kvt_d_round16(scale, bf);
		float s = kvt_d_widen16(sb, bf);
		if (s != 0.0f) {
			float zq = rintf(__fdiv_rn(-mn, s));
			uint16_t zb = kvt_d_round16(__fmul_rn(-zq, s), bf);
			*sb_out = sb;
			*zb_out = zb;
			*s_out = s;
			*z_out = kvt_d_widen16(zb, bf);
			return;
		}
	}
	*sb_out = 0;
	*zb_out = kvt_d_round16(mn, bf);
	*s_out = 0.0f;
	*z_out = kvt_d_widen16(*zb_out, bf);
}

/* kvt_qcode: clamp(rint((x - z) / s), 0, qmax), NaN -> 0, 0 when s == 0. */
__device__ __forceinline__ uint32_t kvt_d_qcode(float x, float s, float z, float qmax)
{
	if (s == 0.0f)
		return 0;
	float r = rintf(__fdiv_rn(__fsub_rn(x, z), s));
	r = r > 0.0f ? r : 0.0f;
	r = r < qmax ? r : qmax;
	return (uint32_t)r;
}

#endif

/*
 * kvt_cuda_attend.cuh - what the decode-attention translation units share: the plan's device
 * descriptors, the kernel parameters and the device helpers used by more than one kernel.
 *
 * The INT2 tensor-core kernels live in kvt_cuda_attend_i2.cu, apart from the other kernels
 * (kvt_cuda_attend.cu): with every kernel in one file, NVVM compiled the CUDA-core kernel
 * (attend_kernel) differently from session 1 (96 instead of 103 registers at <128,4,4>) and it
 * ran 1.8x slower (docs/gpu.md, "Known regression").
 */
#ifndef KVT_CUDA_ATTEND_CUH
#define KVT_CUDA_ATTEND_CUH

#include <math.h>

#include "cuda_internal.cuh"

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / 32)
#define RQ 4 /* query heads per item */

enum {
	ITEM_CODED = 0,
	ITEM_EXACT = 1,
	ITEM_NONE_CHUNKS = 2,
	ITEM_TAIL = 3, /* a run of a request's exact tail folded into a coded item (p.fold): never
			* launched, a descriptor in the item's [xb, xb + xn) after its pins */
};

struct att_req_dev {
	const void *q;
	float *out;
	float scale;
	uint32_t q_dtype;
};

struct att_chunk_dev {
	const uint8_t *sec; /* this request's layer section */
	const uint16_t *pins;
	uint32_t n_pinned;
	uint32_t k_exact_off, v_exact_off;
};

struct att_item_dev {
	uint32_t req, kind, kv_head, q_base, nq, first, count;
	uint32_t group; /* its group (the combine tells rotated items by exact_begin) */
	const uint8_t *xk, *xv; /* exact rows (ITEM_EXACT): token 0, head 0 */
	/* folded pins (p.fold, coded items of the keys-as-B INT2 kernel): the pinned tokens of
	 * the item's chunks are ITEM_EXACT descriptors [xb, xb + xn) of the items array, past
	 * the launched ones, followed on a group's last coded items by ITEM_TAIL descriptors
	 * of runs of the request's tail (session 16); the item's block attends them in its merge */
	uint32_t xb, xn;
};

struct att_group_dev {
	uint32_t req, q_base, nq, item_begin, item_end;
	uint32_t exact_begin; /* items [item_begin, exact_begin) are quantized chunk runs */
};

/* What the CUDA-core kernel (attend_kernel) reads: session 1's parameter block, kept apart
 * because its size decides how ptxas compiles that kernel. With the INT2 fields below in
 * the same block, ptxas gave attend_kernel<128,2,2> 96 registers instead of 103 and the
 * kernel ran 1.8x slower on the H200 (491 vs 269 us at 1 x 131072; session 1's source
 * compiled with just those four fields added gives 96 registers too: docs/gpu.md). */
struct att_params_base {
	const att_item_dev *items;
	const att_chunk_dev *chunks;
	const att_req_dev *reqs;
	const att_group_dev *groups;
	float *part_ml;  /* [n_items][RQ][2] */
	float *part_acc; /* [n_items][RQ][D] */
	uint32_t B, G, H, scheme, dtype, sbf, rotk, rotv, kb, vb, rqn, mma;
	uint32_t norms_off, k_scale_off, k_zero_off, v_scale_off, v_zero_off, k_codes_off,
		v_codes_off;
	float inv_sqrt_d;
};

struct att_params : att_params_base {
	/* INT2 kernel */
	uint32_t i2;
	uint32_t gsh; /* log2(G / 32): the key group of 32-token block sb is sb >> gsh */
	/* fused combine (INT2 kernel, KVTIER_CUDA_FUSED_COMBINE): items done per group; the
	 * block that completes a group merges it (and sets its counter back to 0 for the next
	 * run of the plan); fused 2 (every group one item, pins folded): the item's merge writes
	 * the output, no counter */
	uint32_t *counters;
	uint32_t fused;
	/* pins folded into the coded items (KVTIER_CUDA_FOLD_PINS, default on for the keys-as-B
	 * kernel): every coded item's block rotates its value partial back to the original basis
	 * and adds its chunks' pinned tokens from their exact copies, so the groups have no pin
	 * items and no rotated partials (exact_begin = item_begin) */
	uint32_t fold;
	/* the folded tail on tensor cores (session 18, i3_tail_mma: the swapped loop's kernels
	 * built for it), where a plan's items each carry a whole tail (every group one item);
	 * 0: one warp per query head on CUDA cores (i3_tail_rows) */
	uint32_t tail_tc;
	/* session 11: early (set per run by kvt_cuda_attend_run) 1 (2: one unit, A/B only) when
	 * the INT2 kernel copies its first units' chunk bytes before its grid dependency wait
	 * (the stream's last op was an attention run, so nothing still running writes chunk
	 * bytes); cmb_trig0 (plan build) 1 when the combine lets the next kernel launch at its
	 * start instead of after its wait */
	uint32_t early, cmb_trig0;
	uint32_t wait1; /* the INT2 kernel's grid dependency wait in thread 0 only (A/B only) */
	/* scheme none on the exact rows' tensor-core kernel (session 17, kvt_cuda_attend_exact.cu;
	 * p.mma is 0 for it) */
	uint32_t xmma;
#ifdef KVT_ATT_TIMELINE
	/* diagnostic builds only (-DKVT_ATT_TIMELINE; never in a production build): %globaltimer
	 * stamps of the INT2 kernel's blocks, tl[item][ATT_TL_SLOTS], and of the combine's,
	 * tlc[group][RQ][ATT_TLC_SLOTS]; kvt_cuda_attend_timeline_print reads them */
	unsigned long long *tl, *tlc;
#endif
};

/* the INT2 kernel's stamps per block: entry (its wait done), prologue done, each warp's unit
 * loop done, merge done, where, resident */
#define ATT_TL_SLOTS 9
#define ATT_TL_ENTRY 0
#define ATT_TL_PROLOGUE 1
#define ATT_TL_LOOP 2 /* + warp */
#define ATT_TL_MERGE 6
#define ATT_TL_WHERE 7 /* bytes 0-1: %smid; byte 4 + w: warp w's %warpid (session 9) */
#define ATT_TL_RESIDENT 8 /* the block's first instruction, before its grid dependency wait
			   * (session 11) */
/* the combine's stamps per block (session 10): entry (resident, before its wait), wait
 * done, warp 0's items merged, output written */
#define ATT_TLC_SLOTS 4

#ifdef KVT_ATT_TIMELINE
__device__ __forceinline__ void kvt_att_stamp(unsigned long long *slot)
{
	unsigned long long t;
	asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
	*slot = t;
}
#define ATT_TL(arr, idx) kvt_att_stamp(&(arr)[idx])
/* where a block and its warps run: the multiprocessor (warp 0's lane 0) and each warp's slot
 * on it (lane 0), as separate bytes of one slot */
__device__ __forceinline__ void kvt_att_where(unsigned long long *slot, int warp, int lane)
{
	uint32_t v;
	if (lane)
		return;
	if (warp == 0) {
		asm volatile("mov.u32 %0, %%smid;" : "=r"(v));
		((uint16_t *)slot)[0] = (uint16_t)v;
	}
	asm volatile("mov.u32 %0, %%warpid;" : "=r"(v));
	((uint8_t *)slot)[4 + warp] = (uint8_t)v;
}
#define ATT_TL_AT(arr, idx, warp, lane) kvt_att_where(&(arr)[idx], warp, lane)
#else
#define ATT_TL(arr, idx) ((void)0) /* arr is not evaluated: the fields do not exist */
#define ATT_TL_AT(arr, idx, warp, lane) ((void)0)
#endif

struct kvt_cuda_attend_plan {
	att_params p;
	uint32_t D, n_items, n_groups; /* n_items: launched (folded pin descriptors follow them) */
	uint32_t pdl; /* the combine as a programmatic dependent launch */
	uint32_t cmb_all; /* the INT2 plan's combine issues a whole batch's loads at once */
	uint32_t chain; /* the INT2 kernel as a programmatic dependent launch (of whatever kernel
			 * precedes it in the stream: it waits for it before reading any data but
			 * the plan's own descriptors, which no kernel writes, and on an early run
			 * (att_params.early) its first units' chunk bytes) */
	uint32_t early; /* runs may be early (chain, unless KVTIER_CUDA_EARLY=0); 2: one unit */
	uint64_t folded_tail_tokens; /* tail tokens x groups attended in coded items' merges */
	uint32_t early_runs; /* runs whose INT2 kernel copied chunk bytes before its wait
			      * (kvt_cuda_attend_plan_info; tests) */
	uint64_t read_bytes;
	void *dev_block; /* descriptors + scratch, one allocation */
};

/* programmatic dependent launch (sm_90; no-ops where the launch did not ask for it) */
__device__ __forceinline__ void kvt_grid_dep_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void kvt_grid_dep_launch(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
	for (int m = 16; m >= 1; m >>= 1)
		v = fmaxf(v, __shfl_xor_sync(KVT_FULL_MASK, v, m));
	return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
	for (int m = 16; m >= 1; m >>= 1)
		v += __shfl_xor_sync(KVT_FULL_MASK, v, m);
	return v;
}

/* Per-warp online softmax state: m uniform, l per lane (summed at the end), acc lane-owned
 * channels lane*EPL.. of each of N query heads. */
template <int EPL, int N> struct warp_state {
	float m[N], l[N], acc[N][EPL];
};

template <int EPL, int N> __device__ __forceinline__ void state_init(warp_state<EPL, N> &st)
{
#pragma unroll
	for (int q = 0; q < N; q++) {
		st.m[q] = -INFINITY;
		st.l[q] = 0.0f;
#pragma unroll
		for (int e = 0; e < EPL; e++)
			st.acc[q][e] = 0.0f;
	}
}

/* Folds one 32-token unit's logits (lane = token; -inf = masked) into the state; leaves
 * p = exp(logit - m) in pbuf[lane][q] for the value pass. Returns false when every logit
 * so far is -inf (nothing to accumulate). */
template <int EPL, int N>
__device__ __forceinline__ bool softmax_unit(warp_state<EPL, N> &st, const float (&lg)[N],
					     float *pbuf, int lane)
{
	bool any = false;
#pragma unroll
	for (int q = 0; q < N; q++) {
		float mu = warp_max(lg[q]);
		float mn = fmaxf(st.m[q], mu);
		float p = 0.0f;
		if (mn != -INFINITY) {
			any = true;
			float alpha = __expf(st.m[q] - mn); /* exp(-inf) = 0 on the first unit */
			st.l[q] *= alpha;
#pragma unroll
			for (int e = 0; e < EPL; e++)
				st.acc[q][e] *= alpha;
			st.m[q] = mn;
			p = lg[q] == -INFINITY ? 0.0f : __expf(lg[q] - mn);
			st.l[q] += p;
		}
		pbuf[lane * N + q] = p;
	}
	__syncwarp();
	return any;
}

/* attend_rows for rows that are not 16-byte aligned: one element load at a time */
template <int D, int N>
__device__ void attend_rows_scalar(const att_params_base &p, warp_state<D / 32, N> &st, const uint8_t *k,
			    const uint8_t *v, uint32_t n, size_t stride, const float *qo,
			    float *pbuf, int lane)
{
	constexpr int EPL = D / 32;
	for (uint32_t t0 = 0; t0 < n; t0 += 32) {
		uint32_t t = t0 + lane;
		float lg[N];
#pragma unroll
		for (int q = 0; q < N; q++)
			lg[q] = -INFINITY;
		if (t < n) {
			float a[N];
#pragma unroll
			for (int q = 0; q < N; q++)
				a[q] = 0.0f;
			for (int c = 0; c < D; c++) {
				float x = kvt_d_ld(k, (size_t)t * stride + c, p.dtype);
#pragma unroll
				for (int q = 0; q < N; q++)
					a[q] = fmaf(qo[q * D + c], x, a[q]);
			}
#pragma unroll
			for (int q = 0; q < N; q++)
				lg[q] = a[q];
		}
		__syncwarp();
		if (!softmax_unit<EPL, N>(st, lg, pbuf, lane))
			continue;
		uint32_t m = min(32u, n - t0);
		for (uint32_t jj = 0; jj < m; jj++) {
			size_t base = (size_t)(t0 + jj) * stride + lane * EPL;
			float x[EPL];
#pragma unroll
			for (int e = 0; e < EPL; e++)
				x[e] = kvt_d_ld(v, base + e, p.dtype);
#pragma unroll
			for (int q = 0; q < N; q++) {
				float pq = pbuf[jj * N + q];
#pragma unroll
				for (int e = 0; e < EPL; e++)
					st.acc[q][e] = fmaf(pq, x[e], st.acc[q][e]);
			}
		}
		__syncwarp();
	}
}

/* NW 32-bit words at p, as vector loads (p aligned to min(16, 4 NW) bytes) */
template <int NW>
__device__ __forceinline__ void rows_ld_words(const uint8_t *p, uint32_t (&w)[NW])
{
	if constexpr (NW == 1) {
		w[0] = __ldg((const unsigned int *)p);
	} else if constexpr (NW == 2) {
		const uint2 x = __ldg((const uint2 *)p);
		w[0] = x.x;
		w[1] = x.y;
	} else {
		static_assert(NW % 4 == 0, "whole 16-byte pieces");
#pragma unroll
		for (int i = 0; i < NW / 4; i++) {
			const uint4 x = __ldg((const uint4 *)p + i);
			w[4 * i] = x.x;
			w[4 * i + 1] = x.y;
			w[4 * i + 2] = x.z;
			w[4 * i + 3] = x.w;
		}
	}
}

/* the elements in NW words of dtype DT (f16 / bf16: two per word, the low half first) */
template <uint32_t DT, int NW>
__device__ __forceinline__ void rows_widen(const uint32_t (&w)[NW], float *x)
{
#pragma unroll
	for (int i = 0; i < NW; i++) {
		if constexpr (DT == KVT_DTYPE_F32) {
			x[i] = __uint_as_float(w[i]);
		} else if constexpr (DT == KVT_DTYPE_BF16) {
			x[2 * i] = __uint_as_float(w[i] << 16);
			x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
		} else {
			const float2 f = __half22float2(*(const __half2 *)&w[i]);
			x[2 * i] = f.x;
			x[2 * i + 1] = f.y;
		}
	}
}

/* attend_rows with the row dtype fixed and 16-byte aligned rows: the key pass reads a lane's
 * row 16 bytes at a time against float4s of the query (two partial sums per head for
 * shorter FMA chains), the value pass a lane's EPL channels of a row in one load (session
 * 16, H200: against the element-at-a-time loop with a dtype switch per element, scheme none
 * 3.1x faster, and a 127-token tail as exact items 17 us less per step at 1 x 131072). Rows
 * read cooperatively (several lanes to a row, shuffles) were slower for none and spilled in
 * the packed kernel (docs/gpu.md "Session 16"). */
template <int D, int N, uint32_t DT>
__device__ void attend_rows_vec(warp_state<D / 32, N> &st, const uint8_t *k, const uint8_t *v,
				uint32_t n, size_t stride, const float *qo, float *pbuf, int lane)
{
	constexpr int EPL = D / 32;
	constexpr int WS = DT == KVT_DTYPE_F32 ? 4 : 2; /* bytes per element */
	constexpr int VE = 16 / WS;                      /* elements per 16-byte piece */
	constexpr int NWV = EPL * WS / 4;                /* words of a lane's value channels */
	const size_t sb = stride * WS;
	for (uint32_t t0 = 0; t0 < n; t0 += 32) {
		const uint32_t t = t0 + lane;
		float lg[N];
#pragma unroll
		for (int q = 0; q < N; q++)
			lg[q] = -INFINITY;
		if (t < n) {
			const uint8_t *r = k + (size_t)t * sb;
			float a0[N], a1[N];
#pragma unroll
			for (int q = 0; q < N; q++)
				a0[q] = a1[q] = 0.0f;
#pragma unroll 1 /* registers: the packed kernel has 128 at 4 blocks per SM */
			for (int j = 0; j < D / VE; j++) {
				uint32_t w[4];
				rows_ld_words<4>(r + j * 16, w);
				float x[VE];
				rows_widen<DT, 4>(w, x);
#pragma unroll
				for (int q = 0; q < N; q++) {
					const float4 *qq = (const float4 *)(qo + q * D + j * VE);
#pragma unroll
					for (int e = 0; e < VE / 4; e++) {
						const float4 c = qq[e];
						a0[q] = fmaf(c.x, x[4 * e], a0[q]);
						a1[q] = fmaf(c.y, x[4 * e + 1], a1[q]);
						a0[q] = fmaf(c.z, x[4 * e + 2], a0[q]);
						a1[q] = fmaf(c.w, x[4 * e + 3], a1[q]);
					}
				}
			}
#pragma unroll
			for (int q = 0; q < N; q++)
				lg[q] = a0[q] + a1[q];
		}
		__syncwarp();
		if (!softmax_unit<EPL, N>(st, lg, pbuf, lane))
			continue;
		const uint32_t m = min(32u, n - t0);
		const uint8_t *vr = v + (size_t)t0 * sb + (size_t)lane * EPL * WS;
#pragma unroll 2
		for (uint32_t jj = 0; jj < m; jj++) {
			uint32_t w[NWV];
			rows_ld_words<NWV>(vr + jj * sb, w);
			float x[EPL];
			rows_widen<DT, NWV>(w, x);
#pragma unroll
			for (int q = 0; q < N; q++) {
				const float pq = pbuf[jj * N + q];
#pragma unroll
				for (int e = 0; e < EPL; e++)
					st.acc[q][e] = fmaf(pq, x[e], st.acc[q][e]);
			}
		}
		__syncwarp();
	}
}

/* Exact rows (pins, tail, scheme none): token j at k + j*stride (elements, head applied),
 * logits against the scaled original-basis query qo [N][D] (16-byte aligned). */
template <int D, int N>
__device__ void attend_rows(const att_params_base &p, warp_state<D / 32, N> &st, const uint8_t *k,
			    const uint8_t *v, uint32_t n, size_t stride, const float *qo,
			    float *pbuf, int lane)
{
	if (((uintptr_t)k | (uintptr_t)v) & 15)
		attend_rows_scalar<D, N>(p, st, k, v, n, stride, qo, pbuf, lane);
	else if (p.dtype == KVT_DTYPE_BF16)
		attend_rows_vec<D, N, KVT_DTYPE_BF16>(st, k, v, n, stride, qo, pbuf, lane);
	else if (p.dtype == KVT_DTYPE_F16)
		attend_rows_vec<D, N, KVT_DTYPE_F16>(st, k, v, n, stride, qo, pbuf, lane);
	else
		attend_rows_vec<D, N, KVT_DTYPE_F32>(st, k, v, n, stride, qo, pbuf, lane);
}

/* Writes a warp's lane-per-channel state to the block's reduction arrays. */
template <int D, int N>
__device__ __forceinline__ void state_store(const warp_state<D / 32, N> &st, float *rm, float *rl,
					    float *racc, int lane)
{
	constexpr int EPL = D / 32;
#pragma unroll
	for (int q = 0; q < N; q++) {
		float l = warp_sum(st.l[q]);
		if (lane == 0) {
			rm[q] = st.m[q];
			rl[q] = l;
		}
#pragma unroll
		for (int e = 0; e < EPL; e++)
			racc[q * D + lane * EPL + e] = st.acc[q][e];
	}
}

/* Every attention kernel's prologue: warp w loads query heads w, w + ATT_WARPS, ... < NQ of
 * the item, times the request's scale (zero past it.nq), into original(q, channel) and,
 * rotated when the keys are (p.rotk), into rotated(q, channel): each kernel's own shared
 * arrays and layout. The caller synchronises the block. (attend_kernel writes the same loop
 * out; its comment says why.) */
template <int D, int NQ, class Original, class Rotated>
__device__ __forceinline__ void att_load_queries(const att_params_base &p, const att_item_dev &it,
						 const att_req_dev &rq, Original original,
						 Rotated rotated)
{
	constexpr int EPL = D / 32;
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	for (int q = warp; q < NQ; q += ATT_WARPS) {
		float x[EPL];
#pragma unroll
		for (int e = 0; e < EPL; e++)
			x[e] = (uint32_t)q < it.nq
				       ? kvt_d_ld(rq.q, (size_t)(it.q_base + q) * D + lane * EPL + e,
						  rq.q_dtype) * rq.scale
				       : 0.0f;
#pragma unroll
		for (int e = 0; e < EPL; e++)
			original(q, lane * EPL + e) = x[e];
		if (p.rotk)
			kvt_d_fwht<EPL>(x, lane, p.inv_sqrt_d);
#pragma unroll
		for (int e = 0; e < EPL; e++)
			rotated(q, lane * EPL + e) = x[e];
	}
}

/* Merges the block's warps and writes the item's partial (running max, sum, unnormalised
 * output) for N query heads. red_m / red_l are [ATT_WARPS][N]; warp w's N x D partial starts
 * at red_acc + w * wstride (the INT2 kernel keeps them in its stage buffers, the others
 * dense: wstride N * D). */
template <int D, int N>
__device__ __forceinline__ void block_merge(const att_params_base &p, const float *red_m, const float *red_l,
			    const float *red_acc, size_t wstride = (size_t)N * D)
{
	__syncthreads();
	for (int i = threadIdx.x; i < N * D; i += ATT_THREADS) {
		int q = i / D;
		float M = -INFINITY;
#pragma unroll
		for (int w = 0; w < ATT_WARPS; w++)
			M = fmaxf(M, red_m[w * N + q]);
		float L = 0.0f, A = 0.0f;
		if (M != -INFINITY) {
#pragma unroll
			for (int w = 0; w < ATT_WARPS; w++) {
				float f = __expf(red_m[w * N + q] - M);
				L += red_l[w * N + q] * f;
				A += red_acc[(size_t)w * wstride + i] * f;
			}
		}
		p.part_acc[(size_t)blockIdx.x * N * D + i] = A;
		if (i % D == 0) {
			p.part_ml[((size_t)blockIdx.x * N + q) * 2] = M;
			p.part_ml[((size_t)blockIdx.x * N + q) * 2 + 1] = L;
		}
	}
}

#define RQ8 8
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
					 uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
		     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* (code at bit sh, code at bit sh + 16) -> f16x2, exact (codes up to 255 fit the mantissa
 * under 0x6400 = 1024) */
template <int BITS> __device__ __forceinline__ uint32_t codes_h2(uint32_t u, int sh)
{
	static_assert(BITS == 2 || BITS == 4 || BITS == 8, "2-, 4- or 8-bit codes");
	uint32_t x;
	if constexpr (BITS == 8) {
		/* bytes sh/8 and sh/8 + 2 under 0x64 in one byte permute (H200, session 19: -8%
		 * per step against shift + and-or), minus 1024 */
		asm("prmt.b32 %0, %1, %2, %3;"
		    : "=r"(x)
		    : "r"(u), "r"(0x64646464u), "r"(0x4240u + 0x0101u * (uint32_t)(sh >> 3)));
		const __half2 h = __hsub2(*(__half2 *)&x, __half2(__ushort_as_half(0x6400),
								  __ushort_as_half(0x6400)));
		return *(const uint32_t *)&h;
	} else {
		/* codes at bits p..p + BITS - 1 <= 9 of each half stay where they are: x = 1024 +
		 * code * 2^p, and fma(x, 2^-p, -2^(10 - p)) = code exactly (powers of two); codes
		 * higher up come from u >> 8, which every pair of the word shares (one shift per
		 * word instead of one per pair; H200, session 19: -2 to -5.5% per step on the
		 * packed kernel's INT2 / INT4 / K3 V2 shapes) */
		constexpr uint32_t M2 = BITS == 2 ? 0x00030003u : 0x000f000fu;
		const bool low = sh + BITS <= 10;
		const uint32_t w = low ? u : u >> 8;
		const int p = low ? sh : sh - 8;
		x = (w & (M2 << p)) | 0x64006400u;
		const uint16_t sc = (uint16_t)((15 - p) << 10);           /* 2^-p */
		const uint16_t bi = (uint16_t)(0x8000u | ((25 - p) << 10)); /* -2^(10 - p) */
		const __half2 h = __hfma2(*(__half2 *)&x,
					  __halves2half2(__ushort_as_half(sc), __ushort_as_half(sc)),
					  __halves2half2(__ushort_as_half(bi), __ushort_as_half(bi)));
		return *(const uint32_t *)&h;
	}
}

/* d[0..1] += A * B for the output rows 0..7 only: A's rows 8..15 are zero, so the other two
 * accumulators stay zero and are shared scratch (z) across calls, halving the registers. */
__device__ __forceinline__ void mma16816_top(float &d0, float &d1, float &z0, float &z1,
					     const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
		     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		     : "+f"(d0), "+f"(d1), "+f"(z0), "+f"(z1)
		     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem)
{
	uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem));
}

__device__ __forceinline__ void cp_async_wait_all(void)
{
	asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t u4_word(const uint4 &v, int i)
{
	return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/* 16-bit element c of a register array of uint4 (c known at compile time after unrolling) */
template <int N> __device__ __forceinline__ uint16_t u4_half(const uint4 (&v)[N], int c)
{
	uint32_t w = u4_word(v[c / 8], (c % 8) / 2);
	return (uint16_t)((c & 1) ? w >> 16 : w & 0xffff);
}

/* LS (session 19): the low parts times 2^11 (KVT_LO_SCALE), i.e. in the high parts' range:
 * for small products (INT8's scales are 1/255 of a group's range) the plain low part falls
 * below f16's normal range and loses its bits. The caller then accumulates the low parts
 * apart and multiplies them by 2^-11 before adding them to the high parts (exact: a power of
 * two). */
#define KVT_LO_SCALE 2048.0f
#define KVT_LO_UNSCALE (1.0f / 2048.0f)
template <bool LS = false>
__device__ __forceinline__ void split_h2(float x, float y, uint32_t &hi, uint32_t &lo)
{
	__half hx = __float2half_rn(x), hy = __float2half_rn(y);
	__half2 h = __halves2half2(hx, hy);
	float lx = x - __half2float(hx), ly = y - __half2float(hy);
	if constexpr (LS) {
		lx *= KVT_LO_SCALE;
		ly *= KVT_LO_SCALE;
	}
	__half2 l = __floats2half2_rn(lx, ly);
	hi = *(uint32_t *)&h;
	lo = *(uint32_t *)&l;
}

/* Exact rows on tensor cores (the exact kernel, kvt_cuda_attend_exact.cu, and the INT2
 * kernel's folded tail, kvt_cuda_attend_i2.cu): */

/* d += a * b on f16 or bf16 operands, f32 accumulators (not volatile: no side effects, so
 * the compiler may schedule it) */
template <uint32_t DT>
__device__ __forceinline__ void ex_mma(float (&d)[4], const uint4 &a, uint32_t b0, uint32_t b1)
{
	if constexpr (DT == KVT_DTYPE_BF16)
		asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
		    "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		    : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
	else
		asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
		    "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		    : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

/* the 8 x 8 16-bit matrix a warp holds (lane (r, c): row r, columns 2c, 2c + 1), transposed */
__device__ __forceinline__ uint32_t ex_trans(uint32_t x)
{
	uint32_t y;
	asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
	return y;
}

/* (x, y) -> high parts and the rest, each a pair of DT (x = hi + lo to ~16 bits) */
template <uint32_t DT>
__device__ __forceinline__ void ex_split(float x, float y, uint32_t &hi, uint32_t &lo)
{
	if constexpr (DT == KVT_DTYPE_BF16) {
		const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
		const float2 hf = __bfloat1622float2(h);
		const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
		hi = *(const uint32_t *)&h;
		lo = *(const uint32_t *)&l;
	} else {
		split_h2(x, y, hi, lo);
	}
}

/* a 16-byte piece of a row, streamed (not kept in L1: every byte is read once), with the L2
 * fetching the whole 256-byte row-sized sector group at once (H200, same call: 138.3 ->
 * 131.0 us at d128 1 x 131072 without the hint's "L2::256B", 77.2 -> 73.2 at d64) */
__device__ __forceinline__ uint4 ex_ld(const uint8_t *p)
{
	uint4 v;
	asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
		     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
		     : "l"(p));
	return v;
}

/* the score MMA's A fragments for NQ query heads, built by the whole block (callers sync)
 * from the scaled queries q [NQ][D] into qf [D / 16][32]: rows 0-7 the heads' high parts,
 * 8-15 the rest; k step j = 2 pc + h of lane (gg, tt) holds head gg's channels
 * 8 (tt + 4 pc) + 4 h + 0..3, the ones its quad partner loads from a key row as words 2h,
 * 2h + 1 of piece pc (ex_tile_load) */
template <int D, uint32_t DT, int NQ>
__device__ __forceinline__ void ex_query_frags(const float *q, uint4 *qf)
{
	for (int i = threadIdx.x; i < D / 16 * 32; i += ATT_THREADS) {
		const int j = i / 32, gg = (i % 32) >> 2, tt = i & 3;
		const int c0 = 8 * (tt + 4 * (j >> 1)) + 4 * (j & 1);
		float x[4];
#pragma unroll
		for (int e = 0; e < 4; e++)
			x[e] = gg < NQ ? q[gg * D + c0 + e] : 0.0f;
		uint4 f;
		ex_split<DT>(x[0], x[1], f.x, f.y);
		ex_split<DT>(x[2], x[3], f.z, f.w);
		qf[i] = f;
	}
}

/* a 16-token tile's rows r0 + g and r0 + 8 + g (g = lane / 4; zeros from row n on): the key
 * and value pieces t4, t4 + 4, ... (t4 = lane % 4) of each, from kb / vb (row r0's), rows
 * row_bytes apart */
template <int PPL>
__device__ __forceinline__ void ex_tile_load(uint4 (&kw)[2][PPL], uint4 (&vw)[2][PPL],
					     const uint8_t *kb, const uint8_t *vb,
					     size_t row_bytes, uint32_t r0, uint32_t n, int lane)
{
#pragma unroll
	for (int hf = 0; hf < 2; hf++) {
		const uint32_t r = 8 * hf + (lane >> 2);
		const bool ok = r0 + r < n;
		const size_t o = (size_t)r * row_bytes + 16 * (lane & 3);
#pragma unroll
		for (int i = 0; i < PPL; i++) {
			kw[hf][i] = ok ? ex_ld(kb + o + 64 * i) : make_uint4(0, 0, 0, 0);
			vw[hf][i] = ok ? ex_ld(vb + o + 64 * i) : make_uint4(0, 0, 0, 0);
		}
	}
}

/* f16: p goes into the value MMA times 2^14 (at most 16384), so that small weights keep f16's
 * full precision instead of becoming subnormal (bf16 has float's exponent range); the
 * partial is scaled back at the end (ex_partial_store's un = 1 / ex_p_scale) */
template <uint32_t DT> __host__ __device__ constexpr float ex_p_scale(void)
{
	return DT == KVT_DTYPE_F16 ? 16384.0f : 1.0f;
}

/* one 16-token tile (ex_tile_load's rows, r0 the first token, n the run's length) for the
 * heads of qf (ex_query_frags): the scores, head g's online softmax (m, l: this lane's
 * tokens; the running maximum kept unless the tile exceeds it, one vote per tile), then
 * O += P V with P times ex_p_scale. acc: output tile
 * (piece i, word w) holds channels 8 (t4 + 4 i) + 2 w + {0,1}, columns e (high parts) and
 * 2 + e (the rest) */
template <int D, uint32_t DT>
__device__ __forceinline__ void ex_tile_attend(const uint4 *qf, const uint4 (&kw)[2][D / 32],
					       const uint4 (&vw)[2][D / 32], uint32_t r0,
					       uint32_t n, float &m, float &l, float (&acc)[D / 8][4],
					       int lane)
{
	constexpr int PPL = D / 32, KS = D / 16;
	constexpr float psc = ex_p_scale<DT>();
	const int t4 = lane & 3;
	/* scores: s[hf] rows g (high parts) and g + 8 (the rest) of head g, tokens
	 * r0 + 8 hf + 2 t4 + {0, 1} */
	float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
	for (int j = 0; j < KS; j++) {
		const uint4 a = qf[j * 32 + lane];
#pragma unroll
		for (int hf = 0; hf < 2; hf++)
			ex_mma<DT>(s[hf], a, u4_word(kw[hf][j >> 1], 2 * (j & 1)),
				   u4_word(kw[hf][j >> 1], 2 * (j & 1) + 1));
	}
	float sc[2][2];
	float mt = -INFINITY;
#pragma unroll
	for (int hf = 0; hf < 2; hf++)
#pragma unroll
		for (int e = 0; e < 2; e++) {
			const uint32_t t = r0 + 8 * hf + 2 * t4 + e;
			sc[hf][e] = t < n ? s[hf][e] + s[hf][2 + e] : -INFINITY;
			mt = fmaxf(mt, sc[hf][e]);
		}
	mt = fmaxf(mt, __shfl_xor_sync(KVT_FULL_MASK, mt, 1));
	mt = fmaxf(mt, __shfl_xor_sync(KVT_FULL_MASK, mt, 2));
	/* a new maximum: rescale (rare after the first tiles, so the vote skips it) */
	if (__any_sync(KVT_FULL_MASK, mt > m)) {
		const float mn = fmaxf(m, mt);
		const float al = mn == -INFINITY ? 1.0f : __expf(m - mn);
		l *= al;
#pragma unroll
		for (int i = 0; i < 4 * PPL; i++)
#pragma unroll
			for (int e = 0; e < 4; e++)
				acc[i][e] *= al;
		m = mn;
	}
	float pr[2][2];
#pragma unroll
	for (int hf = 0; hf < 2; hf++)
#pragma unroll
		for (int e = 0; e < 2; e++) {
			pr[hf][e] = sc[hf][e] == -INFINITY ? 0.0f : __expf(sc[hf][e] - m);
			l += pr[hf][e];
		}
	/* P as the A operand: rows g = head g's high parts, g + 8 the rest; k = the tile's
	 * tokens, 2 t4 + {0,1} from the first half, 8 + 2 t4 + {0,1} from the second */
	uint4 pa;
	ex_split<DT>(psc * pr[0][0], psc * pr[0][1], pa.x, pa.y);
	ex_split<DT>(psc * pr[1][0], psc * pr[1][1], pa.z, pa.w);
#pragma unroll
	for (int i = 0; i < PPL; i++)
#pragma unroll
		for (int w = 0; w < 4; w++)
			ex_mma<DT>(acc[4 * i + w], pa, ex_trans(u4_word(vw[0][i], w)),
				   ex_trans(u4_word(vw[1][i], w)));
}

/* the warp's partial after ex_tile_attend, for heads g < NQ: maximum and sum (summed over
 * the quad) into pm[g] / pl[g], channels (times un) into pa[g * D ...] */
template <int D, int NQ>
__device__ __forceinline__ void ex_partial_store(float m, float l, const float (&acc)[D / 8][4],
						 float un, float *pm, float *pl, float *pa, int lane)
{
	const int g = lane >> 2, t4 = lane & 3;
	l += __shfl_xor_sync(KVT_FULL_MASK, l, 1);
	l += __shfl_xor_sync(KVT_FULL_MASK, l, 2);
	if (g < NQ) {
		if (t4 == 0) {
			pm[g] = m;
			pl[g] = l;
		}
		float *ra = pa + g * D;
		/* channel 8 (t4 + 4 i) + 2 w + e: output tile 4 i + w, columns e and 2 + e */
		auto ch = [&](int i, int w, int e) { return un * (acc[4 * i + w][e] + acc[4 * i + w][2 + e]); };
#pragma unroll
		for (int i = 0; i < D / 32; i++) {
			const int c0 = 8 * (t4 + 4 * i);
			*(float4 *)&ra[c0] = make_float4(ch(i, 0, 0), ch(i, 0, 1), ch(i, 1, 0), ch(i, 1, 1));
			*(float4 *)&ra[c0 + 4] = make_float4(ch(i, 2, 0), ch(i, 2, 1), ch(i, 3, 0), ch(i, 3, 1));
		}
	}
}

/* resident blocks per multiprocessor of an attention kernel launched with ATT_THREADS threads
 * and no dynamic shared memory (0 when the query fails; its error is cleared) */
template <class Kernel> static int att_blocks_per_sm(Kernel kernel, size_t dyn_smem = 0)
{
	int nb = 0;
	if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, ATT_THREADS, dyn_smem) !=
	    cudaSuccess)
		nb = 0;
	(void)cudaGetLastError();
	return nb;
}

/* The plan builder (kvt_cuda_attend.cu) and the INT2 kernels (kvt_cuda_attend_i2.cu) meet
 * here. p.i2: 0 not the INT2 kernel, 2 the keys-as-B loop (attend_coded_i4<..., false>), 3
 * the swapped key orientation (attend_coded_i4<..., true>, the default since session 8 for
 * INT2 and session 9 for 3-bit keys; KVTIER_CUDA_I2_SWAP=0 gives 2). Session 2's kernel (1) and
 * session 4's bulk-copy staging (the first 3) were removed in sessions 5 and 6. p.kb 3 (3-bit
 * keys, 2-bit values: kvtier-int2) runs either loop with its 3-bit key path. */
/* resident blocks per multiprocessor of the INT2 kernel `variant` at value group gv with
 * kb-bit keys (cudaOccupancyMaxActiveBlocksPerMultiprocessor; 0 when it fails) */
int kvt_att_i2_blocks_per_sm(uint32_t variant, uint32_t gv, uint32_t kb, bool f16);
/* launches the INT2 kernel of pl->p.i2 and, unless fused, the combine */
cudaError_t kvt_att_i2_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s);
/* the combine kernel for 128-dim heads, RQ heads per group (kvt_cuda_attend.cu) */
cudaError_t kvt_att_combine_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s);
/* the combine kernel for the plan's head_dim (64, 128 or 256) and query heads per group
 * (p.rqn), an ordinary launch (kvt_cuda_attend.cu) */
cudaError_t kvt_att_combine_launch_dq(const kvt_cuda_attend_plan *pl, cudaStream_t s);
/* hadamard (per-token key groups, INT2 / INT4, head_dim 64 / 128 / 256) on the packed
 * tensor-core kernel, then the combine (kvt_cuda_attend_had.cu, session 20) */
cudaError_t kvt_att_had_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s);

/* The exact rows' tensor-core kernel (kvt_cuda_attend_exact.cu; p.xmma): scheme none, f16 or
 * bf16, head_dim 64 or 128, RQ or RQ8 query heads per item. Resident blocks per
 * multiprocessor (0 when the query fails), and the launch of the kernel and the combine. */
int kvt_att_exact_blocks_per_sm(uint32_t d, uint32_t dtype, uint32_t nq);
cudaError_t kvt_att_exact_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s);

#endif

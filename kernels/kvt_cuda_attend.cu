/*
 * kvt_cuda_attend.cu - one decode step of attention over encoded chunks, FlashDecoding
 * style (OSCAR.md section 3).
 *
 * A host-side plan cuts every (request, KV head, group of up to 4 query heads) into work
 * items: runs of consecutive encoded chunks, sized so the batch fills every multiprocessor
 * several times, plus items for exact tokens (the pinned sinks of a chunk, the tail; the
 * keys-as-B INT2 kernel folds a chunk's pinned tokens into the coded item instead). One
 * thread block computes one item's partial softmax (running max, sum, unnormalised output);
 * a combine kernel merges the partials of each group and rotates the quantized-value part
 * back to the original basis. Two launches for the whole batch, whatever the sessions and
 * layers in it.
 *
 * Inside an item, each warp walks 32-token units. Keys: one lane per token reads its packed
 * row with 16-byte loads; the key group's per-channel scale is folded into the rotated query
 * (w = q' * s, done once per unit by the warp) and its zero into one constant per query
 * head, so a logit is n_t * (<w, codes> + <q', z>) with the codes dequantized in registers.
 * Values: one lane per channel group; the per-token value scale folds into the softmax
 * weight. The query rotation is fused into the block's prologue.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_cuda_attend.cuh"
#include "kvt_cuda_attend_mma.cuh"

/* 3-bit rows (kvt_codec.h): bytes [0, D/4) hold the low 2 bits of each code as a 2-bit row,
 * bytes [D/4, 3D/8) the high bits (channel c at bit c % 8 of byte D/4 + c / 8). */

/* A lane's EPL value codes (channels lane * EPL ..) of a 3-bit row, as 3-bit fields. */
template <int EPL>
__device__ __forceinline__ uint64_t v3_lane_codes(const uint8_t *row, int lane, uint32_t D)
{
	uint32_t lo, hi;
	if constexpr (EPL == 8) {
		lo = *(const uint16_t *)(row + lane * 2);
		hi = row[D / 4 + lane];
	} else if constexpr (EPL == 4) {
		lo = row[lane];
		hi = (row[D / 4 + (lane >> 1)] >> ((lane & 1) * 4)) & 0xfu;
	} else {
		lo = (row[lane >> 1] >> ((lane & 1) * 4)) & 0xfu;
		hi = (row[D / 4 + (lane >> 2)] >> ((lane & 3) * 2)) & 3u;
	}
	uint64_t v = 0;
#pragma unroll
	for (int e = 0; e < EPL; e++)
		v |= (uint64_t)(((lo >> (2 * e)) & 3u) | (((hi >> e) & 1u) << 2)) << (3 * e);
	return v;
}

/* One key code x of channel c into a lane's logit accumulators (attend_coded's key step, every
 * width): per-channel keys against the scale-folded query wq; hadamard keys (per-token groups)
 * summed per group in ga and folded with the token's group scale and zero at the group's end. */
template <int D>
__device__ __forceinline__ void key_code_step(const att_params_base &p, float x, uint32_t c,
					      bool had, uint32_t t, uint32_t h, uint32_t gv,
					      uint32_t ng, const float *qr, const float *wq,
					      const uint8_t *sec, bool bf, float (&a)[RQ],
					      float (&ga)[RQ])
{
	if (!had) {
		float4 w4 = *(const float4 *)(wq + c * RQ);
		a[0] = fmaf(w4.x, x, a[0]);
		a[1] = fmaf(w4.y, x, a[1]);
		a[2] = fmaf(w4.z, x, a[2]);
		a[3] = fmaf(w4.w, x, a[3]);
		return;
	}
#pragma unroll
	for (int q = 0; q < RQ; q++)
		ga[q] = fmaf(qr[q * D + c], x, ga[q]);
	if ((c + 1) % gv == 0) {
		size_t si = ((size_t)h * p.B + t) * ng + c / gv;
		float s = kvt_d_widen16(((const uint16_t *)(sec + p.k_scale_off))[si], bf);
		float z = kvt_d_widen16(((const uint16_t *)(sec + p.k_zero_off))[si], bf);
#pragma unroll
		for (int q = 0; q < RQ; q++) {
			float qs = wq[(c / gv) * RQ + q];
			a[q] = fmaf(s, ga[q], fmaf(z, qs, a[q]));
			ga[q] = 0.0f;
		}
	}
}

/* The token's logits from the accumulated sums: times the joint norm (oscar) plus the zero
 * term (per-channel keys); a pinned token is masked (its exact item covers it). */
__device__ __forceinline__ void key_logits(const att_params_base &p, bool oscar, bool had,
					   bool pinned, uint32_t t, const uint8_t *sec,
					   const float (&bias)[RQ], const float (&a)[RQ],
					   float (&lg)[RQ])
{
	float n = oscar ? ((const float *)(sec + p.norms_off))[t] : 1.0f;
#pragma unroll
	for (int q = 0; q < RQ; q++)
		lg[q] = pinned ? -INFINITY : (had ? a[q] : n * (a[q] + bias[q]));
}

/* The logits of one lane's token from a 3-bit key row (attend_coded's key step for KB 3: the
 * same float operations as its 2/4/8-bit loop, the row read as 8-byte low-plane and 4-byte
 * high-plane words since 3D/8-byte rows are only 8-byte aligned at D 64). */
template <int D>
__device__ __forceinline__ void lg3_keys(const att_params_base &p, const uint8_t *row, bool had,
					 bool oscar, bool pinned, uint32_t t, uint32_t h,
					 uint32_t gv, uint32_t ng, const float (&bias)[RQ],
					 const float *qr, const float *wq, const uint8_t *sec, bool bf,
					 float (&lg)[RQ])
{
	float a[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
	float ga[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
	for (uint32_t k = 0; k < D / 32; k++) {
		const uint2 lv = *(const uint2 *)(row + k * 8);
		const uint32_t hv = *(const uint32_t *)(row + D / 4 + k * 4);
#pragma unroll
		for (int jb = 0; jb < 32; jb++) {
			const uint32_t c = k * 32 + jb;
			const uint32_t cd = (((jb < 16 ? lv.x : lv.y) >> ((jb % 16) * 2)) & 3u) |
					    (((hv >> jb) & 1u) << 2);
			key_code_step<D>(p, __uint_as_float(cd | 0x4b000000u) - 8388608.0f, c, had, t,
					 h, gv, ng, qr, wq, sec, bf, a, ga);
		}
	}
	key_logits(p, oscar, had, pinned, t, sec, bias, a, lg);
}

/* Quantized chunks: 32-token units [u0, u1) of the item's chunks. */
template <int D, int KB, int VB>
__device__ void attend_coded(const att_params_base &p, const att_item_dev &it, warp_state<D / 32, RQ> &st,
			     uint32_t u0, uint32_t u1, const float *qr, float *wq, float *pbuf,
			     int lane)
{
	constexpr int EPL = D / 32;
	constexpr uint32_t KROW = D * KB / 8, VROW = D * VB / 8;
	constexpr uint32_t KMASK = (1u << KB) - 1, VMASK = (1u << VB) - 1;
	constexpr int VLB = EPL * VB; /* value code bits per lane per token */
	if constexpr (KB > 8 || VB > 8) {
		return; /* scheme none never reaches here (ITEM_NONE_CHUNKS) */
	} else {
	const uint32_t upc = p.B / 32, h = it.kv_head;
	const uint32_t gv = p.G < D ? p.G : D, ng = D / gv;
	const bool bf = p.sbf, oscar = p.scheme == KVT_SCHEME_OSCAR;
	const bool had = p.scheme == KVT_SCHEME_HADAMARD;
	uint32_t cached = 0xffffffffu;
	float bias[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
	if (had) {
		/* per-token key groups: wq[g][q] = sum of q' over channel group g */
		__syncwarp();
		for (uint32_t i = lane; i < ng * RQ; i += 32) {
			uint32_t gg = i / RQ, q = i % RQ;
			float sum = 0.0f;
			for (uint32_t c = gg * gv; c < (gg + 1) * gv; c++)
				sum += qr[q * D + c];
			wq[i] = sum;
		}
		__syncwarp();
	}

	for (uint32_t u = u0; u < u1; u++) {
		const uint32_t ci = it.first + u / upc, sb = u % upc;
		const att_chunk_dev ch = p.chunks[ci];
		const uint8_t *sec = ch.sec;
		const uint32_t t = sb * 32 + lane; /* this lane's token (keys) */
		const uint32_t g = (sb * 32) / p.G;

		/* w = q' * s and bias = <q', z> for this key group (per-channel schemes) */
		if (!had && (ci * 64 + g) != cached) {
			cached = ci * 64 + g;
			const uint16_t *ks = (const uint16_t *)(sec + p.k_scale_off) +
					     ((size_t)h * (p.B / p.G) + g) * D;
			const uint16_t *kz = (const uint16_t *)(sec + p.k_zero_off) +
					     ((size_t)h * (p.B / p.G) + g) * D;
			float bp[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
			__syncwarp();
			for (int c = lane; c < D; c += 32) {
				float s = kvt_d_widen16(ks[c], bf), z = kvt_d_widen16(kz[c], bf);
#pragma unroll
				for (int q = 0; q < RQ; q++) {
					wq[c * RQ + q] = qr[q * D + c] * s;
					bp[q] = fmaf(qr[q * D + c], z, bp[q]);
				}
			}
#pragma unroll
			for (int q = 0; q < RQ; q++)
				bias[q] = warp_sum(bp[q]);
			__syncwarp();
		}

		/* pinned tokens of this chunk are masked here (their exact item covers them) */
		bool pinned = false;
		for (uint32_t i = 0; i < ch.n_pinned; i++)
			pinned |= ch.pins[i] == t;

		float lg[RQ];
		if constexpr (KB == 3) {
			lg3_keys<D>(p, sec + p.k_codes_off + ((size_t)h * p.B + t) * KROW, had, oscar,
				    pinned, t, h, gv, ng, bias, qr, wq, sec, bf, lg);
		} else {
			const uint4 *kr = (const uint4 *)(sec + p.k_codes_off + ((size_t)h * p.B + t) * KROW);
			float a[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
			float ga[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
			for (uint32_t piece = 0; piece < KROW / 16; piece++) {
				uint4 v4 = kr[piece];
				uint32_t wds[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
				for (int w = 0; w < 4; w++) {
#pragma unroll
					for (int jb = 0; jb < 32 / KB; jb++) {
						const uint32_t c = piece * (128 / KB) + w * (32 / KB) + jb;
						const uint32_t cd = (wds[w] >> (jb * KB)) & KMASK;
						key_code_step<D>(p, __uint_as_float(cd | 0x4b000000u) - 8388608.0f,
								 c, had, t, h, gv, ng, qr, wq, sec, bf, a, ga);
					}
				}
			}
			key_logits(p, oscar, had, pinned, t, sec, bias, a, lg);
		}
		__syncwarp();
		if (!softmax_unit<EPL, RQ>(st, lg, pbuf, lane))
			continue;

		/* values: lane owns channels lane*EPL..; all in one value group */
		const uint32_t vg = (lane * EPL) / gv;
		const uint16_t *vs = (const uint16_t *)(sec + p.v_scale_off);
		const uint16_t *vz = (const uint16_t *)(sec + p.v_zero_off);
		const uint8_t *vc = sec + p.v_codes_off + ((size_t)h * p.B + sb * 32) * VROW;
		float zacc[RQ] = {0.0f, 0.0f, 0.0f, 0.0f};
		float acc2[RQ][EPL];
#pragma unroll
		for (int q = 0; q < RQ; q++)
#pragma unroll
			for (int e = 0; e < EPL; e++)
				acc2[q][e] = 0.0f;
#pragma unroll 4
		for (int jj = 0; jj < 32; jj++) {
			const size_t tok = (size_t)h * p.B + sb * 32 + jj;
			float4 pq = *(const float4 *)(pbuf + jj * RQ);
			float s = kvt_d_widen16(vs[tok * ng + vg], bf);
			float z = kvt_d_widen16(vz[tok * ng + vg], bf);
			const uint8_t *row = vc + (size_t)jj * VROW;
			uint64_t bits;
			if constexpr (VB == 3)
				bits = v3_lane_codes<EPL>(row, lane, D);
			else if constexpr (VLB == 64)
				bits = *(const uint64_t *)(row + lane * 8);
			else if constexpr (VLB == 32)
				bits = *(const uint32_t *)(row + lane * 4);
			else if constexpr (VLB == 16)
				bits = *(const uint16_t *)(row + lane * 2);
			else if constexpr (VLB == 8)
				bits = row[lane];
			else
				bits = (row[lane >> 1] >> ((lane & 1) * 4)) & 0xf;
			float w0 = pq.x * s, w1 = pq.y * s, w2 = pq.z * s, w3 = pq.w * s;
			zacc[0] = fmaf(pq.x, z, zacc[0]);
			zacc[1] = fmaf(pq.y, z, zacc[1]);
			zacc[2] = fmaf(pq.z, z, zacc[2]);
			zacc[3] = fmaf(pq.w, z, zacc[3]);
#pragma unroll
			for (int e = 0; e < EPL; e++) {
				float x = __uint_as_float((uint32_t)((bits >> (e * VB)) & VMASK) |
							  0x4b000000u) -
					  8388608.0f;
				acc2[0][e] = fmaf(w0, x, acc2[0][e]);
				acc2[1][e] = fmaf(w1, x, acc2[1][e]);
				acc2[2][e] = fmaf(w2, x, acc2[2][e]);
				acc2[3][e] = fmaf(w3, x, acc2[3][e]);
			}
		}
#pragma unroll
		for (int q = 0; q < RQ; q++)
#pragma unroll
			for (int e = 0; e < EPL; e++)
				st.acc[q][e] += acc2[q][e] + zacc[q];
		__syncwarp();
	}
	}
}

template <int D, int KB, int VB>
__global__ void __launch_bounds__(ATT_THREADS) attend_kernel(att_params_base p)
{
	constexpr int EPL = D / 32;
	__shared__ __align__(16) float qo[RQ * D];           /* scaled query, original basis */
	__shared__ __align__(16) float qr[RQ * D];           /* scaled query, rotated basis */
	__shared__ __align__(16) float wq[ATT_WARPS][D * RQ]; /* per warp: q' * key scale */
	__shared__ __align__(16) float pbuf[ATT_WARPS][32 * RQ];
	__shared__ float red_m[ATT_WARPS][RQ], red_l[ATT_WARPS][RQ];
	__shared__ __align__(16) float red_acc[ATT_WARPS][RQ * D];

	const att_item_dev it = p.items[blockIdx.x];
	const att_req_dev rq = p.reqs[it.req];
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

	/* prologue: load, scale and (for rotated schemes) rotate the item's query heads. The same
	 * as att_load_queries, written out: through the helper ptxas gives the KB 16 (scheme
	 * none) instantiations more shared memory and other register counts (e.g. <128,16,16>
	 * 72 -> 78), and this kernel's speed has already moved with such changes (docs/gpu.md) */
	for (int q = warp; q < RQ; q += ATT_WARPS) {
		float x[EPL];
#pragma unroll
		for (int e = 0; e < EPL; e++)
			x[e] = (uint32_t)q < it.nq
				       ? kvt_d_ld(rq.q, (size_t)(it.q_base + q) * D + lane * EPL + e,
						  rq.q_dtype) * rq.scale
				       : 0.0f;
#pragma unroll
		for (int e = 0; e < EPL; e++)
			qo[q * D + lane * EPL + e] = x[e];
		if (p.rotk)
			kvt_d_fwht<EPL>(x, lane, p.inv_sqrt_d);
#pragma unroll
		for (int e = 0; e < EPL; e++)
			qr[q * D + lane * EPL + e] = x[e];
	}
	__syncthreads();

	warp_state<EPL, RQ> st;
	state_init<EPL, RQ>(st);

	if (it.kind == ITEM_CODED) {
		uint32_t units = it.count * (p.B / 32);
		uint32_t per = (units + ATT_WARPS - 1) / ATT_WARPS;
		uint32_t u0 = min(units, warp * per), u1 = min(units, u0 + per);
		attend_coded<D, KB, VB>(p, it, st, u0, u1, qr, wq[warp], pbuf[warp], lane);
	} else if (it.kind == ITEM_EXACT) {
		/* tokens split evenly over the warps */
		uint32_t per = (it.count + ATT_WARPS - 1) / ATT_WARPS;
		uint32_t t0 = min(it.count, warp * per), t1 = min(it.count, t0 + per);
		size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
		size_t stride = (size_t)p.H * D, off = ((size_t)t0 * stride + (size_t)it.kv_head * D) * ws;
		attend_rows<D, RQ>(p, st, it.xk + off, it.xv + off, t1 - t0, stride, qo, pbuf[warp], lane);
	} else if constexpr (KB == 16) {
		/* scheme none: a chunk's rows are [H][B][d] exact; one warp per chunk. Only in its
		 * own instantiations (KB 16) since session 16: without this loop the coded ones
		 * compile to fewer spills and ran 2-9% faster on the H200 */
		size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
		for (uint32_t c = warp; c < it.count; c += ATT_WARPS) {
			const uint8_t *sec = p.chunks[it.first + c].sec;
			size_t off = (size_t)it.kv_head * p.B * D * ws;
			attend_rows<D, RQ>(p, st, sec + p.k_codes_off + off, sec + p.v_codes_off + off,
					   p.B, D, qo, pbuf[warp], lane);
		}
	}
	state_store<D, RQ>(st, red_m[warp], red_l[warp], red_acc[warp], lane);
	block_merge<D, RQ>(p, &red_m[0][0], &red_l[0][0], &red_acc[0][0]);
}

/* Resident blocks per multiprocessor of the packed kernel at d128 with KB-bit keys and values
 * (4 or 8) and 4 query heads per item, for the plan's work split; asked once per process
 * and instantiation (one kind of GPU per process; racing threads store the same number).
 * Its shared memory stays under 48 KB there, so no attribute is needed first. */
template <int KB, int GV> static int mma_occupancy_d128(void)
{
	static int cached;
	int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
	if (v > 0)
		return v;
	constexpr int bytes = mma_smem<128, KB, GV, RQ>::BYTES;
	static_assert(bytes <= 48 * 1024, "no dynamic shared memory attribute needed");
	if ((v = att_blocks_per_sm(attend_mma_kernel<128, KB, KB, GV, RQ>, bytes)) > 0)
		__atomic_store_n(&cached, v, __ATOMIC_RELAXED);
	return v;
}

static int mma_blocks_per_sm_d128(uint32_t kb, uint32_t gv)
{
	if (kb == 8)
		return gv == 32 ? mma_occupancy_d128<8, 32>() : gv == 64 ? mma_occupancy_d128<8, 64>()
								 : mma_occupancy_d128<8, 128>();
	return gv == 32 ? mma_occupancy_d128<4, 32>() : gv == 64 ? mma_occupancy_d128<4, 64>()
							 : mma_occupancy_d128<4, 128>();
}

/* One block per (group, query head): CMB_W warps, each merging every CMB_W-th item with a
 * running maximum (its loads never wait on another load: no separate max pass), then the
 * warps merge through shared memory, the quantized-value sum is rotated back (H is its own
 * inverse) and normalised. A group of 65 items costs about two memory round trips, if the
 * loads of a batch are in flight together: ALL (session 10) makes sure they are. */
#define CMB_W 8
#define CMB_B 8 /* items per warp whose loads are in flight together */

/* ALL's loads of the partials: volatile (ld.volatile: the compiler keeps them in program
 * order; served by L2 like ld.cg) */
__device__ __forceinline__ void cmb_ld4(const float *a, float &x, float &y, float &z, float &w)
{
	asm volatile("ld.volatile.global.v4.f32 {%0, %1, %2, %3}, [%4];"
		     : "=f"(x), "=f"(y), "=f"(z), "=f"(w)
		     : "l"(a));
}

__device__ __forceinline__ void cmb_ld2(const float *a, float &x, float &y)
{
	asm volatile("ld.volatile.global.v2.f32 {%0, %1}, [%2];" : "=f"(x), "=f"(y) : "l"(a));
}

__device__ __forceinline__ float cmb_ld1(const float *a)
{
	float x;
	asm volatile("ld.volatile.global.f32 %0, [%1];" : "=f"(x) : "l"(a));
	return x;
}

/* ALL (plan->cmb_all, long groups): a batch's loads really all in flight before the first
 * use. Without it (the form before session 10, kept for short groups) the compiler sinks
 * each item's loads below the batch's `break` at the group's end: one L2 round trip per item
 * a warp merges (session 10 timeline, H200, 1 x 131072, 6-7 items per warp: 1.8 us from the
 * wait to warp 0's items merged; ALL: 0.77 us). ALL issues the loads of the batch's repeats
 * of item i0 past the group's end too (weight 0), which cost more than the round trips they
 * save when a warp has one item (8 x 32768: +0.9 to +1.3 us per step). */
template <int D, int N, bool ALL = false>
__global__ void __launch_bounds__(32 * CMB_W) combine_kernel(att_params p)
{
	constexpr int EPL = D / 32;
	__shared__ float s_m[CMB_W], s_l[CMB_W];
	__shared__ __align__(16) float s_rot[CMB_W][D], s_ex[CMB_W][D];
	const att_group_dev g = p.groups[blockIdx.x];
	const int q = blockIdx.y;
	if ((uint32_t)q >= g.nq)
		return; /* uniform over the block */
	const int lane = threadIdx.x & 31, part = threadIdx.x >> 5;
	float *out = p.reqs[g.req].out; /* loaded now, used at the end */
	const size_t tlc = ((size_t)blockIdx.x * gridDim.y + blockIdx.y) * ATT_TLC_SLOTS;
	(void)tlc;
	if (threadIdx.x == 0)
		ATT_TL(p.tlc, tlc);
	/* the next step's INT2 kernel (plan->chain) may launch now: its blocks read no data of
	 * this step before their own wait, which returns once this grid has ended. With
	 * p.cmb_trig0 (session 11) that launch is allowed at this block's start, so the next
	 * step's blocks take the multiprocessors the INT2 kernel's blocks leave during its tail
	 * and, on an early run, copy their first units then; else after this block's wait. */
	if (p.cmb_trig0)
		kvt_grid_dep_launch();
	/* launched as a programmatic dependent of the INT2 kernel (plan->pdl): the block may
	 * start before that grid ends; wait for it (and its writes) here, after the plan loads
	 * (a no-op for an ordinary launch) */
	kvt_grid_dep_wait();
	if (!p.cmb_trig0)
		kvt_grid_dep_launch();
	if (threadIdx.x == 0)
		ATT_TL(p.tlc, tlc + 1);
	float Mw = -INFINITY, L = 0.0f, rot[EPL], ex[EPL];
#pragma unroll
	for (int e = 0; e < EPL; e++)
		rot[e] = ex[e] = 0.0f;
	/* items in batches of CMB_B per warp (a loop with one item per trip waited one memory
	 * round trip per item: 7.4 us for 65 items at 1 x 131072, measured) */
	for (uint32_t i0 = g.item_begin + part; i0 < g.item_end; i0 += CMB_B * CMB_W) {
		float mb[CMB_B], lb[CMB_B], av[CMB_B][EPL];
		if constexpr (ALL) {
			/* the values first, then the maxima the exponentials need: nothing of the
			 * batch branches on the item count, and the volatile loads stay in this
			 * order (plain loads were scheduled after the first exponentials) */
#pragma unroll
			for (int b = 0; b < CMB_B; b++) {
				const uint32_t i = i0 + b * CMB_W < g.item_end ? i0 + b * CMB_W : i0;
				const float *a = p.part_acc + ((size_t)i * N + q) * D + lane * EPL;
				if constexpr (EPL % 4 == 0) {
#pragma unroll
					for (int e = 0; e < EPL; e += 4)
						cmb_ld4(a + e, av[b][e], av[b][e + 1], av[b][e + 2],
							av[b][e + 3]);
				} else {
#pragma unroll
					for (int e = 0; e < EPL; e++)
						av[b][e] = cmb_ld1(a + e);
				}
			}
#pragma unroll
			for (int b = 0; b < CMB_B; b++) {
				const uint32_t i = i0 + b * CMB_W < g.item_end ? i0 + b * CMB_W : i0;
				cmb_ld2(p.part_ml + ((size_t)i * N + q) * 2, mb[b], lb[b]);
			}
			/* the batch's maximum first, so that its exponentials do not wait on each
			 * other; the repeats of item i0 do not change it */
			float Mn = Mw;
#pragma unroll
			for (int b = 0; b < CMB_B; b++)
				Mn = fmaxf(Mn, mb[b]);
			/* rescale what is merged; no branch around an exponential (one let the
			 * compiler issue the value loads after it) */
			const float fo = __expf(Mw == Mn ? 0.0f : Mw - Mn);
			Mw = Mn;
			L *= fo;
#pragma unroll
			for (int e = 0; e < EPL; e++) {
				rot[e] *= fo;
				ex[e] *= fo;
			}
#pragma unroll
			for (int b = 0; b < CMB_B; b++) {
				const uint32_t i = i0 + b * CMB_W;
				const float m = mb[b];
				/* a repeat of item i0 (past the group's end) weighs exp(-inf) = 0 */
				const float f =
					__expf(i >= g.item_end || m == -INFINITY ? -INFINITY : m - Mn);
				L = fmaf(lb[b], f, L);
				/* quantized chunk runs hold rotated values (when the codec rotates
				 * them) */
				const float fr = i < g.exact_begin && p.rotv ? f : 0.0f, fe = f - fr;
#pragma unroll
				for (int e = 0; e < EPL; e++) {
					rot[e] = fmaf(av[b][e], fr, rot[e]);
					ex[e] = fmaf(av[b][e], fe, ex[e]);
				}
			}
		} else {
#pragma unroll
			for (int b = 0; b < CMB_B; b++) {
				const uint32_t i = i0 + b * CMB_W < g.item_end ? i0 + b * CMB_W : i0;
				const float2 ml = *(const float2 *)(p.part_ml + ((size_t)i * N + q) * 2);
				mb[b] = ml.x;
				lb[b] = ml.y;
				const float *a = p.part_acc + ((size_t)i * N + q) * D + lane * EPL;
				if constexpr (EPL % 4 == 0) {
#pragma unroll
					for (int e = 0; e < EPL; e += 4) {
						const float4 v = *(const float4 *)(a + e);
						av[b][e] = v.x;
						av[b][e + 1] = v.y;
						av[b][e + 2] = v.z;
						av[b][e + 3] = v.w;
					}
				} else {
#pragma unroll
					for (int e = 0; e < EPL; e++)
						av[b][e] = a[e];
				}
			}
#pragma unroll
			for (int b = 0; b < CMB_B; b++) {
				const uint32_t i = i0 + b * CMB_W;
				if (i >= g.item_end)
					break;
				const float m = mb[b], l = lb[b];
				const float Mn = fmaxf(Mw, m);
				/* rescale what is merged */
				const float fo = Mw == Mn ? 1.0f : __expf(Mw - Mn);
				const float f = m == -INFINITY ? 0.0f : __expf(m - Mn);
				Mw = Mn;
				L = fmaf(l, f, L * fo);
				/* quantized chunk runs hold rotated values (when the codec rotates
				 * them) */
				const float fr = i < g.exact_begin && p.rotv ? f : 0.0f, fe = f - fr;
#pragma unroll
				for (int e = 0; e < EPL; e++) {
					rot[e] = fmaf(av[b][e], fr, rot[e] * fo);
					ex[e] = fmaf(av[b][e], fe, ex[e] * fo);
				}
			}
		}
	}
	if (threadIdx.x == 0)
		ATT_TL(p.tlc, tlc + 2);
	if (lane == 0) {
		s_m[part] = Mw;
		s_l[part] = L;
	}
#pragma unroll
	for (int e = 0; e < EPL; e++) {
		s_rot[part][lane * EPL + e] = rot[e];
		s_ex[part][lane * EPL + e] = ex[e];
	}
	__syncthreads();
	if (part != 0)
		return;
	float M = -INFINITY;
#pragma unroll
	for (int w = 0; w < CMB_W; w++)
		M = fmaxf(M, s_m[w]);
	L = 0.0f;
#pragma unroll
	for (int e = 0; e < EPL; e++)
		rot[e] = ex[e] = 0.0f;
#pragma unroll
	for (int w = 0; w < CMB_W; w++) {
		const float f = s_m[w] == -INFINITY ? 0.0f : __expf(s_m[w] - M);
		L = fmaf(s_l[w], f, L);
#pragma unroll
		for (int e = 0; e < EPL; e++) {
			rot[e] = fmaf(s_rot[w][lane * EPL + e], f, rot[e]);
			ex[e] = fmaf(s_ex[w][lane * EPL + e], f, ex[e]);
		}
	}
	/* the flag is per plan (rotate_v of the codec): uniform across the warp */
	if (p.rotv)
		kvt_d_fwht<EPL>(rot, lane, p.inv_sqrt_d);
	const float inv = L > 0.0f ? 1.0f / L : 0.0f;
	float *o = out + (size_t)(g.q_base + q) * D + lane * EPL;
#pragma unroll
	for (int e = 0; e < EPL; e++)
		o[e] = (rot[e] + ex[e]) * inv;
	if (lane == 0)
		ATT_TL(p.tlc, tlc + 3);
}

/* ---- Host: plan ---------------------------------------------------------------------------- */

/* An exact item over one chunk's pinned tokens (their K/V copies in the original basis): a block
 * of its own, or staged by the coded item that covers the chunk when pins are folded. */
static att_item_dev pinned_item(const att_item_dev &base, const att_chunk_dev *cd)
{
	att_item_dev x = base;
	x.kind = ITEM_EXACT;
	x.count = cd->n_pinned;
	x.xk = cd->sec + cd->k_exact_off;
	x.xv = cd->sec + cd->v_exact_off;
	return x;
}

static bool same_codec(const struct kvt_codec_config *a, const struct kvt_codec_config *b)
{
	return a->scheme == b->scheme && a->key_bits == b->key_bits &&
	       a->value_bits == b->value_bits && a->group == b->group &&
	       a->chunk_tokens == b->chunk_tokens && a->n_kv_heads == b->n_kv_heads &&
	       a->head_dim == b->head_dim && a->dtype == b->dtype && a->rotate_v == b->rotate_v;
}

#define GROW(arr, n, cap)                                                                  \
	do {                                                                               \
		if ((n) == (cap)) {                                                        \
			size_t nc_ = (cap) ? (cap) * 2 : 64;                               \
			void *np_ = realloc((arr), nc_ * sizeof(*(arr)));                   \
			if (!np_) {                                                        \
				rc = kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory"); \
				goto out;                                                  \
			}                                                                  \
			(arr) = (__typeof__(arr))np_;                                      \
			(cap) = nc_;                                                       \
		}                                                                          \
	} while (0)

extern "C" int kvt_cuda_attend_plan_build(kvt_cuda_ctx *c,
					  const struct kvt_cuda_attend_request *reqs,
					  size_t n_reqs, kvt_cuda_attend_plan **out, char *err,
					  size_t errlen)
{
	int rc = 0;
	char why[200];
	att_item_dev *items = NULL;
	att_chunk_dev *chunks = NULL;
	att_group_dev *groups = NULL;
	att_req_dev *rds = NULL;
	att_item_dev *pins = NULL; /* folded pin descriptors, appended to items at the end */
	size_t n_pins = 0, cap_pins = 0, n_launch = 0;
	uint64_t n_folded_tails = 0; /* tail tokens x groups */
	size_t n_items = 0, cap_items = 0, n_chunks = 0, cap_chunks = 0, n_groups = 0,
	       cap_groups = 0;
	kvt_cuda_attend_plan *plan = NULL;
	uint64_t read_bytes = 0;
	*out = NULL;
	if (!c || !reqs || n_reqs == 0)
		return kvt_cuda_errf(err, errlen, -EINVAL, "ctx or reqs is NULL, or n_reqs is 0");
	/* the ctx's device before any CUDA call (the occupancy queries, the plan's upload) */
	if ((rc = kvt_cuda_check(cudaSetDevice(c->device), "cudaSetDevice", err, errlen)))
		return rc;
	const struct kvt_codec_config *cfg = reqs[0].cfg;
	if (!cfg)
		return kvt_cuda_errf(err, errlen, -EINVAL, "request 0: cfg is NULL");
	if ((rc = kvt_codec_config_validate(cfg, why, sizeof(why))))
		return kvt_cuda_errf(err, errlen, rc, "request 0: %s", why);
	const bool none = cfg->scheme == KVT_SCHEME_NONE;
	/* key / value bits: equal (2, 3, 4, 8), or a split with 3 on one side and 2, 3 or 4 on
	 * the other (the default codec keeps 3-bit keys and 2-bit values). Each pair is an
	 * instantiation of attend_kernel per head_dim; the other splits (2/4, x/8) are left to
	 * the CPU to keep this file's compile time down. */
	if (!none && cfg->key_bits != cfg->value_bits &&
	    !((cfg->key_bits == 3 || cfg->value_bits == 3) && cfg->key_bits <= 4 &&
	      cfg->value_bits <= 4))
		return kvt_cuda_errf(err, errlen, -EOPNOTSUPP,
				     "key_bits %u / value_bits %u: the GPU attention kernel takes "
				     "equal bits or a 3/2, 2/3, 3/4, 4/3 split; use the CPU path",
				     cfg->key_bits, cfg->value_bits);
	const uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, D = cfg->head_dim;
	const size_t ws = kvt_dtype_size(cfg->dtype);
	uint32_t max_ratio = 0;
	for (size_t r = 0; r < n_reqs; r++) {
		const uint32_t ratio = H ? reqs[r].n_q_heads / H : 0;
		max_ratio = ratio > max_ratio ? ratio : max_ratio;
	}
	const bool per_channel = cfg->scheme == KVT_SCHEME_OSCAR || cfg->scheme == KVT_SCHEME_KIVI;
	/* the INT2 kernel's swapped loop takes f16 sessions too since session 21 (their scales
	 * split in two exact parts, one more MMA each: attend_i2_kernel's F16);
	 * KVTIER_CUDA_NO_I2_F16=1 leaves them to the packed kernel (A/B runs), and so does the
	 * keys-as-B loop (KVTIER_CUDA_I2_SWAP=0), which has no f16 form */
	const char *swe = getenv("KVTIER_CUDA_I2_SWAP");
	const bool swap = !swe || atoi(swe) != 0;
	const bool i2_dtype = cfg->dtype == KVT_DTYPE_BF16 ||
			      (cfg->dtype == KVT_DTYPE_F16 && swap &&
			       getenv("KVTIER_CUDA_NO_I2_F16") == NULL);
	/* more than 4 query heads per KV head (GQA 8: Llama 3 70B, Qwen2 72B; 7: Qwen2.5 7B)
	 * take the INT2 kernel too since session 21, their query heads cut into groups of 4,
	 * each group its own items (so each reads the chunks); KVTIER_CUDA_I2_GQA_SPLIT=0 leaves
	 * them to the packed kernel's 8-head items, as before (A/B runs) */
	const char *gse = getenv("KVTIER_CUDA_I2_GQA_SPLIT");
	const bool i2_ratio = max_ratio <= RQ || !gse || atoi(gse) != 0;
	/* 3-bit keys with 2-bit values (kvtier-int2, the daemon's default codec), bf16 or f16,
	 * head_dim 128: the INT2 kernel with its 3-bit key path (KVTIER_CUDA_NO_K3_MMA=1: the
	 * CUDA-core kernel, for A/B runs) */
	const bool k3 = per_channel && cfg->key_bits == 3 && cfg->value_bits == 2 && D == 128 &&
			i2_dtype && i2_ratio &&
			getenv("KVTIER_CUDA_NO_MMA") == NULL && getenv("KVTIER_CUDA_NO_I2") == NULL &&
			getenv("KVTIER_CUDA_NO_K3_MMA") == NULL;
	/* the tensor-core kernels take per-channel keys with equal key and value bits, INT2 or
	 * INT4 (their fragments read 2/4-bit rows), and 3-bit keys with 2-bit values: head_dim
	 * 128, and since session 15 head_dim 64 and 256 on the packed kernel (attend_mma_kernel;
	 * the INT2 kernels below are 128 only); other 3-bit splits and mixed widths take the
	 * CUDA-core kernel */
	const bool mma_shape = per_channel && (D == 64 || D == 128 || D == 256) &&
			       getenv("KVTIER_CUDA_NO_MMA") == NULL;
	/* K3 V2 where the INT2 kernel does not take it (head_dim 64 or 256; before session 21
	 * f16 sessions and more than 4 query heads per KV head): the packed kernel's 3-bit key
	 * path (session 15; before, the CUDA-core kernel) */
	const bool k3p = mma_shape && !k3 && cfg->key_bits == 3 && cfg->value_bits == 2 &&
			 getenv("KVTIER_CUDA_NO_K3_MMA") == NULL;
	/* INT8 (session 19): head_dim 64 and 128 only (a d256 lane would hold 64 key words), in
	 * the packed form only (its f16 low parts are scaled apart, split_h2<true>): more than 4
	 * query heads per KV head are cut into groups of 4 (rqn below) */
	/* hadamard (session 20): its per-token key groups on the packed kernel (HK), INT2 / INT4
	 * at head_dim 64 / 128 / 256; KVTIER_CUDA_NO_HAD_MMA=1 the CUDA-core kernel, as before
	 * (A/B runs) */
	const bool had_mma = cfg->scheme == KVT_SCHEME_HADAMARD && (D == 64 || D == 128 || D == 256) &&
			     (cfg->key_bits == 2 || cfg->key_bits == 4) &&
			     cfg->value_bits == cfg->key_bits && getenv("KVTIER_CUDA_NO_MMA") == NULL &&
			     getenv("KVTIER_CUDA_NO_HAD_MMA") == NULL;
	const bool mma = k3 || k3p || had_mma ||
			 (mma_shape && (cfg->key_bits == 2 || cfg->key_bits == 4) &&
			  cfg->value_bits == cfg->key_bits) ||
			 (mma_shape && D <= 128 && cfg->key_bits == 8 && cfg->value_bits == 8 &&
			  getenv("KVTIER_CUDA_NO_INT8_MMA") == NULL);
	/* scheme none, f16 or bf16, head_dim 64 or 128: the exact rows' tensor-core kernel
	 * (session 17, kvt_cuda_attend_exact.cu; the CUDA-core kernel before, and with
	 * KVTIER_CUDA_NO_MMA or KVTIER_CUDA_NO_EXACT_MMA). It reads rows 16 bytes at a time, so
	 * every tail must be 16-byte aligned (the daemon's are; the API allows element
	 * alignment). A chunk's rows are: chunks are 16-byte aligned (checked below), their
	 * sections KVT_CHUNK_ALIGN aligned, a KV head's rows B x d x 2 bytes apart. */
	static_assert(KVT_CHUNK_ALIGN % 16 == 0, "16-byte aligned chunk sections");
	bool tails_aligned = true;
	for (size_t r = 0; r < n_reqs; r++)
		if (reqs[r].n_tail &&
		    (((uintptr_t)reqs[r].tail_k_dev | (uintptr_t)reqs[r].tail_v_dev) & 15))
			tails_aligned = false;
	const bool xmma = none && tails_aligned && (D == 64 || D == 128) &&
			  (cfg->dtype == KVT_DTYPE_BF16 || cfg->dtype == KVT_DTYPE_F16) &&
			  getenv("KVTIER_CUDA_NO_MMA") == NULL &&
			  getenv("KVTIER_CUDA_NO_EXACT_MMA") == NULL;
	/* INT2 with bf16 or f16 scales: the scales-on-codes kernel (attend_i2_kernel; its
	 * products are exact for 2-bit codes, or 3-bit keys, times 8 significant bits of a scale:
	 * a bf16 scale, or each part of an f16 scale), 4 query heads per item */
	const bool i2_int2 = mma && per_channel && cfg->key_bits == 2 && cfg->value_bits == 2 &&
			     i2_dtype && D == 128 && i2_ratio && getenv("KVTIER_CUDA_NO_I2") == NULL;
	/* the packed tensor-core kernel takes 8 query heads per item, or 4 packed with their f16
	 * low parts in the other 4 fragment rows (half the MMAs) when no request has more than 4
	 * query heads per KV head; the exact rows' kernel 8 where a request has more than 4
	 * (a KV head's query heads are cut into groups of rqn either way) */
	const uint32_t rqn = (mma && !k3 && !i2_int2 && cfg->key_bits != 8 &&
			      (max_ratio > RQ || getenv("KVTIER_CUDA_MMA_RQ8"))) ||
					     (xmma && max_ratio > RQ)
				     ? RQ8
				     : RQ;
	const bool i2 = k3 || i2_int2;
	/* the INT2 kernel is the keys-as-B kernel, p.i2 = 2, or its swapped unit loop, p.i2 = 3
	 * (session 2's kernel, variant 1, was removed in session 5, the bulk-copy staging variant
	 * 3 after session 6) */
	const int ccm = c->cc_major; /* compute capability major (programmatic launches: 9) */
	/* INT2 and 3-bit keys run the swapped key orientation (p.i2 = 3: keys as the A operand,
	 * p through movmatrix; kvt_cuda_attend_i2.cu; INT2 since session 8: -8 to -10% per step
	 * on the H200, 3-bit keys since session 9: docs/gpu.md); KVTIER_CUDA_I2_SWAP=0 (read per
	 * plan, for A/B runs) the keys-as-B loop */
	const uint32_t i2v = i2 ? (swap ? 3 : 2) : 0;
	/* fold each chunk's pinned tokens into the coded item that covers the chunk (keys-as-B
	 * kernel; KVTIER_CUDA_FOLD_PINS=0: one exact item per chunk with pins, as before) */
	const char *fp = getenv("KVTIER_CUDA_FOLD_PINS");
	const bool fold = i2v >= 2 && (!fp || atoi(fp) != 0);
	const char *ft = getenv("KVTIER_CUDA_FOLD_TAIL");
	const bool fold_tails = !ft || atoi(ft) != 0;
	/* what a folded tail token costs its item's merge, in 32-token units of the unit loop
	 * (H200, session 18: 8 units per 32-token run fit INT2 and K3 V2 alike; 4 and 12 within
	 * 0.7 us of it); KVTIER_CUDA_TAIL_UNITS overrides it, 0 cuts as if the tail were free
	 * (before session 18; A/B runs) */
	const char *tue = getenv("KVTIER_CUDA_TAIL_UNITS");
	const double tail_units = tue && atof(tue) >= 0.0 ? atof(tue) : 0.25;
	struct kvt_chunk_layout lay0;
	if ((rc = kvt_chunk_layout(cfg, 0, &lay0)))
		return kvt_cuda_errf(err, errlen, rc, "request 0: no chunk layout for its cfg");
	rds = (att_req_dev *)calloc(n_reqs, sizeof(*rds));
	if (!rds)
		return kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");

	/* How many chunks one item takes. Blocks run in waves of `resident` (multiprocessors x
	 * blocks each can hold): pick the chunks per item that minimise waves x (longest item
	 * + a per-item overhead of ~3 units: prologue, first load, merge), so that e.g. 384
	 * (session, head) runs on 528 slots are cut into pieces that fill whole waves instead
	 * of leaving a half-empty second wave. KVTIER_CUDA_IPS (blocks per multiprocessor)
	 * and KVTIER_CUDA_CPI (chunks per item) override it for tuning runs and tests. */
	int bps = 4;
	if (mma && !i2v && D == 256)
		bps = 2; /* the packed kernel at d256: compiled for 2 blocks (mma_smem::MINB) */
	/* the packed kernel at d128 with 4- or 8-bit codes (INT8 is compiled for 3 blocks:
	 * mma_smem::MINB): what the device holds (session 19) */
	if (mma && !i2v && D == 128 && rqn == RQ && (cfg->key_bits == 4 || cfg->key_bits == 8)) {
		const int nb = mma_blocks_per_sm_d128(cfg->key_bits, cfg->group < D ? cfg->group : D);
		if (nb > 0)
			bps = nb;
	}
	/* resident blocks per multiprocessor of the INT2 kernel, per (variant, G) (asked once:
	 * the first query costs milliseconds) */
	static int occ_cache[6][3][2]; /* [4], [5]: the 3-bit key path, keys-as-B / swapped;
				       * [f16] */
	const int occ_i = cfg->group >= 128 ? 2 : cfg->group >= 64 ? 1 : 0;
	const uint32_t occ_v = k3 ? (i2v == 3 ? 5 : 4) : i2v;
	const bool f16 = cfg->dtype == KVT_DTYPE_F16;
	if (i2v && occ_cache[occ_v][occ_i][f16] > 0) {
		bps = occ_cache[occ_v][occ_i][f16];
	} else if (i2v) {
		const int nb = kvt_att_i2_blocks_per_sm(i2v, cfg->group < 128 ? cfg->group : 128,
							k3 ? 3 : 2, f16);
		if (nb > 0)
			bps = occ_cache[occ_v][occ_i][f16] = nb;
	}
	if (xmma) {
		/* asked once per process like the INT2 kernel's (one kind of GPU per process);
		 * threads may race to fill it with the same number */
		static int occ_x[2][2][2]; /* [d128][bf16][8 query heads] */
		int *nb = &occ_x[D == 128][cfg->dtype == KVT_DTYPE_BF16][rqn == RQ8];
		int v = __atomic_load_n(nb, __ATOMIC_RELAXED);
		if (v <= 0 && (v = kvt_att_exact_blocks_per_sm(D, cfg->dtype, rqn)) > 0)
			__atomic_store_n(nb, v, __ATOMIC_RELAXED);
		if (v > 0)
			bps = v;
	}
	if (getenv("KVTIER_CUDA_IPS") && atoi(getenv("KVTIER_CUDA_IPS")) > 0)
		bps = atoi(getenv("KVTIER_CUDA_IPS"));
	const uint64_t resident = (uint64_t)c->sm_count * (uint64_t)bps;
	const uint32_t upc0 = B >= 32 ? B / 32 : 1;
	uint32_t max_nc = 0;
	for (size_t r = 0; r < n_reqs; r++)
		max_nc = reqs[r].n_chunks > max_nc ? reqs[r].n_chunks : max_nc;
	/* The keys-as-B kernel (i2v) takes a per-multiprocessor model instead (session 5, att6;
	 * KVTIER_CUDA_SPLIT=old: the wave model above for it too, A/B runs). It is issue bound,
	 * so what a multiprocessor does is its items' units shared among the blocks resident on
	 * it: n = ceil(items / SMs) items on the busiest one, each len units + a per-item cost
	 * of `ov` units (prologue: query load, rotation, fragments; pins; merge; partial write;
	 * its share of the combine), run bps at a time at full rate, a last round of fewer
	 * blocks (or n < bps) at rate r1 (one block) or r2 (more, short of bps) of a full
	 * multiprocessor's. Fitted on the H200 to 15 forced cuts of the five benchmark cases
	 * (KVTIER_CUDA_CPI 16-128: 1-12 items per multiprocessor): ov 8 units, r1 0.70, r2
	 * 0.94, 3% rms error, where the wave model was off by 46% (it took a part-filled wave
	 * for a full one: 256 items of 32 chunks at 1 x 131072 measured 1.05x the 392 of 21,
	 * it predicted 1.5x). Both cut the benchmark cases alike (docs/gpu.md "Session 5: work
	 * split"). KVTIER_CUDA_SPLIT_OV / _R1 / _R2 override them (tuning runs). */
	const char *sm_env = getenv("KVTIER_CUDA_SPLIT");
	const bool sm_model = i2v && !(sm_env && !strcmp(sm_env, "old"));
	double ov = 8.0, r1 = 0.70, r2 = 0.94;
	if (getenv("KVTIER_CUDA_SPLIT_OV") && atof(getenv("KVTIER_CUDA_SPLIT_OV")) >= 0)
		ov = atof(getenv("KVTIER_CUDA_SPLIT_OV"));
	if (getenv("KVTIER_CUDA_SPLIT_R1") && atof(getenv("KVTIER_CUDA_SPLIT_R1")) > 0)
		r1 = atof(getenv("KVTIER_CUDA_SPLIT_R1"));
	if (getenv("KVTIER_CUDA_SPLIT_R2") && atof(getenv("KVTIER_CUDA_SPLIT_R2")) > 0)
		r2 = atof(getenv("KVTIER_CUDA_SPLIT_R2"));
	const uint64_t n_sm = c->sm_count > 0 ? (uint64_t)c->sm_count : 1;
	uint32_t cpi = 1;
	double best = INFINITY;
	for (uint32_t x = 1; x <= max_nc && x <= 4096; x++) {
		uint64_t items = 0;
		uint32_t len = 0;
		for (size_t r = 0; r < n_reqs; r++) {
			const uint32_t nc = reqs[r].n_chunks;
			if (!nc)
				continue;
			const uint32_t k = (nc + x - 1) / x, l = (nc + k - 1) / k;
			items += (uint64_t)k * H * ((reqs[r].n_q_heads / (H ? H : 1) + rqn - 1) / rqn);
			len = l > len ? l : len;
		}
		double cost = (double)((items + resident - 1) / resident) * ((double)len * upc0 + 3.0);
		if (sm_model) {
			const uint64_t n = (items + n_sm - 1) / n_sm, nb = (uint64_t)bps;
			const double w = (double)len * upc0 + ov;
			const uint64_t rem = n < nb ? n : n % nb;
			cost = (double)(n - rem) * w;
			if (rem)
				cost += (double)rem * w / (rem == 1 ? r1 : r2);
		}
		if (cost <= best) {
			best = cost;
			cpi = x;
		}
	}
	/* chunks per item forced (tests: long items on small batches) */
	if (getenv("KVTIER_CUDA_CPI") && atoi(getenv("KVTIER_CUDA_CPI")) > 0)
		cpi = (uint32_t)atoi(getenv("KVTIER_CUDA_CPI"));

	for (size_t r = 0; r < n_reqs; r++) {
		const struct kvt_cuda_attend_request *rq = &reqs[r];
		if (!rq->cfg || (rq->cfg != cfg && !same_codec(rq->cfg, cfg))) {
			rc = kvt_cuda_errf(err, errlen, -EINVAL,
					   "request %zu: cfg differs from request 0's (a batch "
					   "shares one codec and shape)", r);
			goto out;
		}
		if (rq->layer >= rq->cfg->n_layers || rq->n_q_heads == 0 ||
		    rq->n_q_heads % H || !rq->q_dev || !rq->out_dev ||
		    !kvt_dtype_size(rq->q_dtype) || !isfinite(rq->softmax_scale) ||
		    (rq->n_chunks && (!rq->chunks_dev || !rq->chunk_hdrs)) ||
		    (rq->n_tail && (!rq->tail_k_dev || !rq->tail_v_dev)) ||
		    rq->n_chunks + rq->n_tail == 0) {
			rc = kvt_cuda_errf(err, errlen, -EINVAL,
					   "request %zu: layer %u (of %u), n_q_heads %u (a multiple "
					   "of %u), q/out/chunks/tail pointers, q_dtype %u, "
					   "softmax_scale or token count (%u chunks + %u tail) is "
					   "invalid", r, rq->layer, rq->cfg->n_layers, rq->n_q_heads,
					   H, rq->q_dtype, rq->n_chunks, rq->n_tail);
			goto out;
		}
		rds[r].q = rq->q_dev;
		rds[r].out = rq->out_dev;
		rds[r].scale = rq->softmax_scale;
		rds[r].q_dtype = rq->q_dtype;

		/* this request's chunks */
		size_t chunk0 = n_chunks;
		for (uint32_t i = 0; i < rq->n_chunks; i++) {
			const struct kvt_chunk_header *hd = rq->chunk_hdrs[i];
			struct kvt_chunk_layout lay;
			if (!hd || !rq->chunks_dev[i] || ((uintptr_t)rq->chunks_dev[i] & 15) ||
			    hd->magic != KVT_CHUNK_MAGIC ||
			    hd->scheme != cfg->scheme || hd->group != cfg->group ||
			    hd->chunk_tokens != B || hd->n_kv_heads != H || hd->head_dim != D ||
			    hd->dtype != cfg->dtype || hd->rotate_v != cfg->rotate_v ||
			    hd->n_layers != rq->cfg->n_layers ||
			    (!none && (hd->key_bits != cfg->key_bits ||
				       hd->value_bits != cfg->value_bits)) ||
			    kvt_chunk_layout(rq->cfg, hd->n_pinned, &lay) ||
			    lay.k_codes_off != lay0.k_codes_off || lay.v_codes_off != lay0.v_codes_off ||
			    lay.layer_bytes != hd->layer_bytes || lay.data_offset != hd->data_offset ||
			    (i && hd->first_token != rq->chunk_hdrs[i - 1]->first_token + B)) {
				rc = kvt_cuda_errf(err, errlen, -EINVAL,
						   "request %zu: chunks[%u] is NULL, not 16-byte aligned, not "
						   "consecutive or its header differs from cfg", r, i);
				goto out;
			}
			GROW(chunks, n_chunks, cap_chunks);
			const uint8_t *sec = (const uint8_t *)rq->chunks_dev[i] + lay.data_offset +
					     (size_t)rq->layer * lay.layer_bytes;
			chunks[n_chunks].sec = sec;
			chunks[n_chunks].pins = (const uint16_t *)((const uint8_t *)rq->chunks_dev[i] +
								   KVT_CHUNK_HEADER_BYTES);
			chunks[n_chunks].n_pinned = hd->n_pinned;
			chunks[n_chunks].k_exact_off = (uint32_t)lay.k_exact_off;
			chunks[n_chunks].v_exact_off = (uint32_t)lay.v_exact_off;
			n_chunks++;
			read_bytes += lay.norms_bytes + 2 * lay.k_scale_bytes + 2 * lay.v_scale_bytes +
				      lay.k_codes_bytes + lay.v_codes_bytes + 2 * lay.exact_bytes;
		}
		read_bytes += 2ull * rq->n_tail * H * D * ws;

		const uint32_t R = rq->n_q_heads / H;
		for (uint32_t h = 0; h < H; h++) {
			for (uint32_t qb = 0; qb < R; qb += rqn) {
				GROW(groups, n_groups, cap_groups);
				att_group_dev *g = &groups[n_groups++];
				g->req = (uint32_t)r;
				g->q_base = h * R + qb;
				g->nq = R - qb < rqn ? R - qb : rqn;
				g->item_begin = (uint32_t)n_items;
				att_item_dev base;
				memset(&base, 0, sizeof(base));
				base.group = (uint32_t)(n_groups - 1);
				base.req = (uint32_t)r;
				base.kv_head = h;
				base.q_base = g->q_base;
				base.nq = g->nq;
				/* chunk runs */
				uint32_t nc = rq->n_chunks;
				uint32_t k = (nc + cpi - 1) / cpi;
				/* folded (session 16): the tail goes to the group's last coded items,
				 * whose merges attend it (16-bit rows read 16 bytes at a time, so only
				 * 16-byte aligned tails; KVTIER_CUDA_FOLD_TAIL=0: exact items, A/B):
				 * runs of ~32 tokens to the last nt items, since a merge takes ~1.7 us
				 * per 32 tokens and the items run side by side */
				const bool fold_tail = fold && fold_tails && k && rq->n_tail &&
						       !(((uintptr_t)rq->tail_k_dev |
							  (uintptr_t)rq->tail_v_dev) & 15);
				const uint32_t nt = fold_tail ? min(k, (rq->n_tail + 31) / 32) : 0;
				/* ... and those items take fewer chunks, so that a group's items end
				 * together: a run costs tail_units per tail token (in 32-token units of
				 * the unit loop), tw chunks; the cut spreads nc + nt tw over the k items.
				 * tw is capped at nc / k - 1, so that the boundaries stay strictly
				 * increasing (every item keeps at least one chunk). H200,
				 * session 18, same call: INT2 1 x 131072 + 127 tail tokens 45.5-46.3 ->
				 * 39.6-39.9 us (no tail: 39.0), K3 V2 + 63 49.7 -> 48.3-48.6; before, the
				 * tail items ended ~3 us after the others and, with the combine's early
				 * launch of the next step, one next-step block found no free slot for
				 * 25 us (docs/gpu.md "Session 18") */
				double tw = nt ? (double)rq->n_tail / nt * tail_units / upc0 : 0.0;
				if (tw > (double)nc / k - 1.0)
					tw = (double)nc / k - 1.0;
				auto cut = [&](uint32_t s) -> uint32_t {
					if (tw <= 0.0 || s == 0 || s >= k)
						return (uint32_t)((uint64_t)nc * s / k);
					double b = (nc + nt * tw) * s / k;
					if (s > k - nt)
						b -= (s - (k - nt)) * tw;
					const uint32_t bi = (uint32_t)llround(b);
					return bi < s ? s : bi > nc - (k - s) ? nc - (k - s) : bi;
				};
				for (uint32_t s = 0; s < k; s++) {
					uint32_t b0 = cut(s);
					uint32_t b1 = cut(s + 1);
					GROW(items, n_items, cap_items);
					att_item_dev *it = &items[n_items++];
					*it = base;
					it->kind = none ? ITEM_NONE_CHUNKS : ITEM_CODED;
					it->first = (uint32_t)chunk0 + b0;
					it->count = b1 - b0;
					if (!fold)
						continue;
					it->xb = (uint32_t)n_pins; /* made absolute below */
					for (uint32_t i = b0; i < b1; i++) {
						const att_chunk_dev *cd = &chunks[chunk0 + i];
						if (!cd->n_pinned)
							continue;
						GROW(pins, n_pins, cap_pins);
						pins[n_pins++] = pinned_item(base, cd);
					}
					/* the last nt items take tail runs r = 0 .. nt - 1: [ta, tb) */
					uint32_t ta = 0, tb = 0;
					if (s + nt >= k) {
						const uint64_t r = s + nt - k;
						ta = (uint32_t)(rq->n_tail * r / nt);
						tb = (uint32_t)(rq->n_tail * (r + 1) / nt);
					}
					for (uint32_t t0 = ta; t0 < tb; t0 += 1024) {
						GROW(pins, n_pins, cap_pins);
						att_item_dev *x = &pins[n_pins++];
						*x = base;
						x->kind = ITEM_TAIL;
						x->count = tb - t0 < 1024 ? tb - t0 : 1024;
						n_folded_tails += x->count;
						x->xk = (const uint8_t *)rq->tail_k_dev + (size_t)t0 * H * D * ws;
						x->xv = (const uint8_t *)rq->tail_v_dev + (size_t)t0 * H * D * ws;
					}
					items[n_items - 1].xn = (uint32_t)n_pins - items[n_items - 1].xb;
				}
				/* folded: the coded items' partials are in the original basis */
				g->exact_begin = fold ? g->item_begin : (uint32_t)n_items;
				/* pinned tokens of each chunk, exact */
				for (uint32_t i = 0; i < nc && !fold; i++) {
					const att_chunk_dev *cd = &chunks[chunk0 + i];
					if (!cd->n_pinned)
						continue;
					GROW(items, n_items, cap_items);
					items[n_items++] = pinned_item(base, cd);
				}
				/* the tail, in runs of at most 1024 tokens (unless folded) */
				for (uint32_t t0 = 0; !fold_tail && t0 < rq->n_tail; t0 += 1024) {
					GROW(items, n_items, cap_items);
					att_item_dev *it = &items[n_items++];
					*it = base;
					it->kind = ITEM_EXACT;
					it->count = rq->n_tail - t0 < 1024 ? rq->n_tail - t0 : 1024;
					it->xk = (const uint8_t *)rq->tail_k_dev + (size_t)t0 * H * D * ws;
					it->xv = (const uint8_t *)rq->tail_v_dev + (size_t)t0 * H * D * ws;
				}
				g->item_end = (uint32_t)n_items;
			}
		}
	}
	/* the folded pin descriptors go past the launched items */
	n_launch = n_items;
	for (size_t i = 0; i < n_launch; i++)
		if (items[i].xn)
			items[i].xb += (uint32_t)n_launch;
	for (size_t i = 0; i < n_pins; i++) {
		GROW(items, n_items, cap_items);
		items[n_items++] = pins[i];
	}
	plan = (kvt_cuda_attend_plan *)calloc(1, sizeof(*plan));
	if (!plan) {
		rc = kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");
		goto out;
	}
	{
		size_t sz_items = n_items * sizeof(att_item_dev), sz_chunks = n_chunks * sizeof(att_chunk_dev);
		size_t sz_groups = n_groups * sizeof(att_group_dev), sz_reqs = n_reqs * sizeof(att_req_dev);
		size_t o_items = 0, o_chunks = (o_items + sz_items + 255) & ~(size_t)255;
		size_t o_groups = (o_chunks + sz_chunks + 255) & ~(size_t)255;
		size_t o_reqs = (o_groups + sz_groups + 255) & ~(size_t)255;
		size_t o_cnt = (o_reqs + sz_reqs + 255) & ~(size_t)255;
		size_t o_ml = (o_cnt + n_groups * 4 + 255) & ~(size_t)255; /* counters upload as 0 */
		size_t o_acc = (o_ml + n_launch * rqn * 2 * 4 + 255) & ~(size_t)255;
		size_t total = o_acc + n_launch * rqn * D * 4;
#ifdef KVT_ATT_TIMELINE
		const size_t o_tl = (total + 255) & ~(size_t)255, o_tlc = o_tl + n_launch * ATT_TL_SLOTS * 8;
		total = o_tlc + n_groups * rqn * ATT_TLC_SLOTS * 8;
#endif
		char *host = (char *)calloc(1, o_ml);
		if (!host) {
			rc = kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");
			goto out;
		}
		memcpy(host + o_items, items, sz_items);
		memcpy(host + o_chunks, chunks, sz_chunks);
		memcpy(host + o_groups, groups, sz_groups);
		memcpy(host + o_reqs, rds, sz_reqs);
		rc = kvt_cuda_check(cudaMalloc(&plan->dev_block, total), "plan alloc", err, errlen);
		/* on the ctx's stream, then waited for: a plain cudaMemcpy from pageable memory may
		 * return before its DMA has landed, and it is not ordered with the ctx's
		 * (non-blocking) stream, where the INT2 kernel reads the descriptors, since session
		 * 10 even before its grid-dependency wait */
		cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
		if (!rc)
			rc = kvt_cuda_check(cudaMemcpyAsync(plan->dev_block, host, o_ml,
							    cudaMemcpyHostToDevice, st),
					    "plan upload", err, errlen);
		if (!rc)
			rc = kvt_cuda_check(cudaStreamSynchronize(st), "plan upload", err,
					    errlen);
		free(host);
		if (rc)
			goto out;
		char *db = (char *)plan->dev_block;
		att_params &p = plan->p;
		p.items = (const att_item_dev *)(db + o_items);
		p.chunks = (const att_chunk_dev *)(db + o_chunks);
		p.groups = (const att_group_dev *)(db + o_groups);
		p.reqs = (const att_req_dev *)(db + o_reqs);
		p.counters = (uint32_t *)(db + o_cnt);
		/* Fused combine (the block that completes a group merges it: one launch per step)
		 * for short groups only. H200, keys-as-B kernel, same call: 1 x 131072 (65 items per
		 * group) 61.3 us fused vs 58.1 separate (the completing block merges 65 partials x 4
		 * heads with 4 warps, on the critical path); 8 x 32768 (9 per group) 106.0 vs 107.3;
		 * 48 x 4096 (5 per group) 100.1 vs 101.9. Since the PDL combine (session 4) and the
		 * 3-block cutting (session 5), same call: groups of 1 item (48 x 4096) fused 75.6-76.3
		 * vs 79.0 separate, of 5 equal (session 4), of 6 (8 x 32768) fused 95.9-96.5 vs 95.4:
		 * fused up to 4. KVTIER_CUDA_FUSED_COMBINE=1 / 0 forces it on / off (tests, A/B runs). */
		uint32_t longest = 0;
		for (size_t gi = 0; gi < n_groups; gi++) {
			const uint32_t n = groups[gi].item_end - groups[gi].item_begin;
			longest = n > longest ? n : longest;
		}
		/* the separate combine after the INT2 kernel as a programmatic dependent launch
		 * (sm_90; KVTIER_CUDA_PDL=0 turns it off). H200, same call: 1 x 131072 55.1 us
		 * vs 56.7 / 57.3 as an ordinary launch (docs/gpu.md, session 4). Without it the
		 * fused combine stays the choice up to 16 items per group (the session-2 numbers). */
		const char *pd = getenv("KVTIER_CUDA_PDL");
		const bool pdl_ok = i2 && ccm >= 9 && (!pd || atoi(pd) != 0);
		const char *fz = getenv("KVTIER_CUDA_FUSED_COMBINE");
		p.fused = i2 && (fz ? atoi(fz) != 0 : longest <= (pdl_ok ? 4u : 16u));
		/* Every group one item, pins folded (48 x 4096): the item's merge writes the output
		 * (p.fused 2, no partial, counter or combine). H200, session 9, same call: INT2
		 * 57.4-57.6 vs 59.9-60.0 us (main) / 59.9-60.6 (fused combine, same build), K3 V2
		 * 71.5-71.7 vs 74.9-75.0 / 73.9-74.0. KVTIER_CUDA_FUSED_COMBINE=2 asks for it where it
		 * applies (else 1), =1 / 0 force the fused combine / the separate one. A two-level
		 * fused merge for long groups (subsets of ~sqrt(n) items merged by their last block,
		 * then the subset results by the last subset's) measured slower than the separate
		 * combine (docs/gpu.md, session 9). */
		const bool solo = i2 && fold && longest == 1;
		if (solo && (!fz || atoi(fz) >= 2))
			p.fused = 2;
		/* the folded tail on tensor cores (session 18, i3_tail_mma, the swapped loop) where
		 * every group is one item, so that each item carries its request's whole tail:
		 * H200, same call, 48 x 4096 + 127 tail tokens 59.6-59.9 vs 67.8-68.1 us (INT2), K3
		 * V2 + 63 70.9-71.2 vs 73.7-73.8. Where groups are several items (runs of ~32 tail
		 * tokens on each of the last few, e.g. 1 x 131072) the kernel built for it measured
		 * slower, 47.6-47.7 vs 45.3-45.6 us: its unit loop is compiled longer
		 * (i2_launch_g). KVTIER_CUDA_TAIL_TC=1 takes it for every plan with a folded tail,
		 * =0 for none (tests, A/B runs). */
		const char *ttc = getenv("KVTIER_CUDA_TAIL_TC");
		p.tail_tc = i2v == 3 && n_folded_tails && (ttc ? atoi(ttc) != 0 : solo);
		/* The INT2 plan's separate combine with all of a batch's loads in flight (session
		 * 10, H200, same call: 40.4 / 40.8 vs 41.2 / 41.2 us at 1 x 131072, 49 items per
		 * group; K3 V2 50.1 / 50.4 vs 50.6 / 51.0) for groups longer than 2 CMB_W, i.e.
		 * where a warp merges 3 items or more; with one item per warp (8 x 32768, 6 per
		 * group) it measured slower, 73.5 / 73.8 vs 72.6 / 72.5 (the loads of the batch's
		 * repeats). KVTIER_CUDA_COMBINE_ALL=1 / 0 forces it on / off (tests, A/B runs). */
		const char *ca = getenv("KVTIER_CUDA_COMBINE_ALL");
		plan->cmb_all = ca ? atoi(ca) != 0 : longest > 2 * CMB_W;
		p.fold = fold;
		plan->pdl = pdl_ok && !p.fused;
		/* the INT2 kernel itself as a programmatic dependent launch (KVTIER_CUDA_PDL_CHAIN=0
		 * turns it off): back-to-back steps no longer pay a kernel launch between the
		 * previous step's end and the first block (docs/gpu.md "Session 9") */
		const char *pc = getenv("KVTIER_CUDA_PDL_CHAIN");
		plan->chain = pdl_ok && (!pc || atoi(pc) != 0);
		/* session 11: runs right after an attention run copy their first units before the
		 * grid dependency wait (kvt_cuda_attend_run), and the combine lets the next step
		 * launch at its start; KVTIER_CUDA_EARLY=0 / KVTIER_CUDA_CMB_TRIG0=0 turn either off
		 * (A/B runs). plan->early: 0 never, 1 two units (the default), 2 one unit */
		const char *ce = getenv("KVTIER_CUDA_EARLY"), *ct = getenv("KVTIER_CUDA_CMB_TRIG0");
		/* session 12, A/B only, both measured no faster: KVTIER_CUDA_EARLY=2 copies one
		 * unit before the wait instead of two, KVTIER_CUDA_WAIT1=1 waits in thread 0 alone
		 * (docs/gpu.md "Session 12: the step boundary") */
		const int cev = ce ? atoi(ce) : 1;
		plan->early = !plan->chain ? 0u : (uint32_t)(cev < 0 ? 0 : cev > 2 ? 2 : cev);
		const char *w1 = getenv("KVTIER_CUDA_WAIT1");
		p.wait1 = w1 && atoi(w1) != 0;
		p.cmb_trig0 = plan->pdl && (!ct || atoi(ct) != 0);
		p.part_ml = (float *)(db + o_ml);
		p.part_acc = (float *)(db + o_acc);
#ifdef KVT_ATT_TIMELINE
		p.tl = (unsigned long long *)(db + o_tl);
		p.tlc = (unsigned long long *)(db + o_tlc);
		if (cudaMemset(db + o_tl, 0, total - o_tl) != cudaSuccess) {
			rc = kvt_cuda_errf(err, errlen, -EIO, "timeline memset");
			goto out;
		}
#endif
		p.B = B;
		p.G = cfg->group;
		p.H = H;
		p.scheme = cfg->scheme;
		p.dtype = cfg->dtype;
		p.sbf = cfg->dtype == KVT_DTYPE_BF16;
		p.rotk = cfg->scheme == KVT_SCHEME_OSCAR || cfg->scheme == KVT_SCHEME_HADAMARD;
		p.rotv = !none && cfg->rotate_v;
		p.kb = none ? 16 : cfg->key_bits;
		p.rqn = rqn;
		p.mma = mma;
		p.xmma = xmma;
		p.i2 = i2v;
		p.gsh = cfg->group >= 128 ? 2 : cfg->group >= 64 ? 1 : 0;
		p.vb = none ? 16 : cfg->value_bits;
		p.norms_off = (uint32_t)lay0.norms_off;
		p.k_scale_off = (uint32_t)lay0.k_scale_off;
		p.k_zero_off = (uint32_t)lay0.k_zero_off;
		p.v_scale_off = (uint32_t)lay0.v_scale_off;
		p.v_zero_off = (uint32_t)lay0.v_zero_off;
		p.k_codes_off = (uint32_t)lay0.k_codes_off;
		p.v_codes_off = (uint32_t)lay0.v_codes_off;
		p.inv_sqrt_d = (float)(1.0 / sqrt((double)D));
		plan->D = D;
		plan->n_items = (uint32_t)n_launch;
		plan->folded_tail_tokens = n_folded_tails;
		plan->n_groups = (uint32_t)n_groups;
		plan->read_bytes = read_bytes;
	}
	*out = plan;
	plan = NULL;
out:
	if (plan) {
		if (plan->dev_block)
			cudaFree(plan->dev_block);
		free(plan);
	}
	free(items);
	free(pins);
	free(chunks);
	free(groups);
	free(rds);
	return rc;
}

template <int D, int KB, int VB>
static cudaError_t att_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	const att_params_base pb = pl->p; /* session 1's parameter block (see att_params_base) */
	attend_kernel<D, KB, VB><<<pl->n_items, ATT_THREADS, 0, s>>>(pb);
	cudaError_t e = cudaGetLastError();
	if (e != cudaSuccess)
		return e;
	combine_kernel<D, RQ><<<dim3(pl->n_groups, RQ), 32 * CMB_W, 0, s>>>(pl->p);
	return cudaGetLastError();
}

/* the (key, value) bit pairs the plan admits (kvt_cuda_attend_plan_build) */
template <int D>
static cudaError_t att_launch_bits(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	switch (pl->p.kb * 16 + pl->p.vb) {
	case 2 * 16 + 2:
		return att_launch<D, 2, 2>(pl, s);
	case 4 * 16 + 4:
		return att_launch<D, 4, 4>(pl, s);
	case 8 * 16 + 8:
		return att_launch<D, 8, 8>(pl, s);
	case 3 * 16 + 3:
		return att_launch<D, 3, 3>(pl, s);
	case 3 * 16 + 2:
		return att_launch<D, 3, 2>(pl, s);
	case 2 * 16 + 3:
		return att_launch<D, 2, 3>(pl, s);
	case 3 * 16 + 4:
		return att_launch<D, 3, 4>(pl, s);
	case 4 * 16 + 3:
		return att_launch<D, 4, 3>(pl, s);
	default:
		return att_launch<D, 16, 16>(pl, s);
	}
}

/* one instantiation of the packed kernel (mma_kernel_launch), then the combine */
template <int D, int KB, int VB, int GV, int NQ>
static cudaError_t att_launch_mma_nq(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	cudaError_t e = mma_kernel_launch<D, KB, VB, GV, NQ, 0>(pl, s);
	if (e != cudaSuccess)
		return e;
	combine_kernel<D, NQ><<<dim3(pl->n_groups, NQ), 32 * CMB_W, 0, s>>>(pl->p);
	return cudaGetLastError();
}

template <int D, int KB, int VB, int GV>
static cudaError_t att_launch_mma(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	if constexpr (KB == 8) /* the packed form only (plan build) */
		return att_launch_mma_nq<D, KB, VB, GV, RQ>(pl, s);
	else
		return pl->p.rqn == RQ ? att_launch_mma_nq<D, KB, VB, GV, RQ>(pl, s)
				       : att_launch_mma_nq<D, KB, VB, GV, RQ8>(pl, s);
}

/* the packed tensor-core kernel for one head_dim and (key, value) bits */
template <int D, int KB, int VB>
static cudaError_t att_launch_mma_d(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	return with_gv<D>(pl->p.G, [&](auto gv) { return att_launch_mma<D, KB, VB, decltype(gv)::value>(pl, s); });
}

template <int D>
static cudaError_t att_launch_mma_bits(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	if constexpr (D <= 128)
		if (pl->p.kb == 8)
			return att_launch_mma_d<D, 8, 8>(pl, s);
	return pl->p.kb == 2   ? att_launch_mma_d<D, 2, 2>(pl, s)
	       : pl->p.kb == 3 ? att_launch_mma_d<D, 3, 2>(pl, s)
			       : att_launch_mma_d<D, 4, 4>(pl, s);
}

cudaError_t kvt_att_combine_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	/* programmatic dependent launch (plan->pdl): the combine's launch and block start
	 * overlap the end of the attention kernel, whose blocks allow it at their start
	 * (kvt_grid_dep_launch); else an ordinary launch */
	cudaLaunchAttribute at;
	const cudaLaunchConfig_t lc =
		kvt_launch_config(dim3(pl->n_groups, RQ), dim3(32 * CMB_W), 0, s, pl->pdl != 0, &at);
	const cudaError_t e = cudaLaunchKernelEx(
		&lc, pl->cmb_all ? combine_kernel<128, RQ, true> : combine_kernel<128, RQ, false>,
		pl->p);
	return e == cudaSuccess ? cudaGetLastError() : e;
}

cudaError_t kvt_att_combine_launch_dq(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	const dim3 grid(pl->n_groups, pl->p.rqn), block(32 * CMB_W);
	if (pl->D == 64)
		pl->p.rqn == RQ ? combine_kernel<64, RQ><<<grid, block, 0, s>>>(pl->p)
				: combine_kernel<64, RQ8><<<grid, block, 0, s>>>(pl->p);
	else if (pl->D == 128)
		pl->p.rqn == RQ ? combine_kernel<128, RQ><<<grid, block, 0, s>>>(pl->p)
				: combine_kernel<128, RQ8><<<grid, block, 0, s>>>(pl->p);
	else
		pl->p.rqn == RQ ? combine_kernel<256, RQ><<<grid, block, 0, s>>>(pl->p)
				: combine_kernel<256, RQ8><<<grid, block, 0, s>>>(pl->p);
	return cudaGetLastError();
}

static cudaError_t att_launch_mma_any(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	if (pl->p.i2)
		return kvt_att_i2_launch(pl, s);
	if (pl->p.scheme == KVT_SCHEME_HADAMARD)
		return kvt_att_had_launch(pl, s);
	return pl->D == 64    ? att_launch_mma_bits<64>(pl, s)
	       : pl->D == 128 ? att_launch_mma_bits<128>(pl, s)
			      : att_launch_mma_bits<256>(pl, s);
}

extern "C" int kvt_cuda_attend_run(kvt_cuda_ctx *c, const kvt_cuda_attend_plan *pl, char *err,
				   size_t errlen)
{
	if (!c || !pl)
		return kvt_cuda_errf(err, errlen, -EINVAL, "ctx or plan is NULL");
	if (pl->n_items == 0)
		return 0;
	/* this run's copy of the plan with its one per-run field (session 11): early when the
	 * chained INT2 kernel follows the stream's previous attention run (c->after_attend:
	 * whatever wrote the chunks ran before that run's first kernel, whose blocks waited for
	 * it before they let anything after them launch) */
	kvt_cuda_attend_plan run = *pl;
	run.p.early = c->after_attend ? pl->early : 0u;
	/* the ctx's device (a thread that also drives another GPU may have switched its
	 * current device since the plan was built) */
	cudaError_t e = cudaSetDevice(c->device);
	if (e != cudaSuccess)
		return kvt_cuda_check(e, "cudaSetDevice", err, errlen);
	if (run.p.mma) {
		e = att_launch_mma_any(&run, c->stream);
	} else if (run.p.xmma) {
		e = kvt_att_exact_launch(&run, c->stream);
	} else {
		switch (run.D) {
		case 64:
			e = att_launch_bits<64>(&run, c->stream);
			break;
		case 128:
			e = att_launch_bits<128>(&run, c->stream);
			break;
		default:
			e = att_launch_bits<256>(&run, c->stream);
			break;
		}
	}
	c->after_attend = e == cudaSuccess;
	if (e == cudaSuccess && run.p.early) /* the plan's one field a run writes (a counter) */
		const_cast<kvt_cuda_attend_plan *>(pl)->early_runs++;
	return kvt_cuda_check(e, "attention launch", err, errlen);
}

extern "C" void kvt_cuda_attend_plan_destroy(kvt_cuda_attend_plan *pl)
{
	if (!pl)
		return;
	if (pl->dev_block)
		cudaFree(pl->dev_block);
	free(pl);
}

#ifdef KVT_ATT_TIMELINE
static int tl_cmp(const void *a, const void *b)
{
	const double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* min / median / max of v[0..n) in us, as JSON members named k */
static void tl_stats(FILE *f, const char *k, double *v, size_t n)
{
	if (!n)
		return;
	qsort(v, n, sizeof(*v), tl_cmp);
	fprintf(f, ",\"%s_us\":[%.2f,%.2f,%.2f]", k, v[0] / 1e3, v[n / 2] / 1e3, v[n - 1] / 1e3);
}

/* the earliest and latest end of block i's unit loops (its warps' ATT_TL_LOOP stamps) */
static void tl_loop_ends(const unsigned long long *t, size_t i, double *lo, double *hi)
{
	*lo = *hi = (double)t[i * ATT_TL_SLOTS + ATT_TL_LOOP];
	for (int w = 1; w < ATT_WARPS; w++) {
		const double x = (double)t[i * ATT_TL_SLOTS + ATT_TL_LOOP + w];
		*lo = x < *lo ? x : *lo;
		*hi = x > *hi ? x : *hi;
	}
}

/* the unit-loop times (from the block's prologue) of the warps that rank (blocks' ranks on their
 * multiprocessor) selects, rank[i] == r, or else of the warps on scheduler r; into w, counted */
static size_t tl_warp_loops(const unsigned long long *t, size_t ni, const int *rank, int r,
			    double *w)
{
	size_t n = 0;
	for (size_t i = 0; i < ni; i++) {
		const unsigned long long *b = t + i * ATT_TL_SLOTS;
		for (int ww = 0; ww < ATT_WARPS; ww++)
			if (rank ? rank[i] == r
				 : ((b[ATT_TL_WHERE] >> (32 + 8 * ww)) & 0xff) % 4 == (unsigned)r)
				w[n++] = (double)(b[ATT_TL_LOOP + ww] - b[ATT_TL_PROLOGUE]);
	}
	return n;
}

/* Session 9 (tail10; docs/gpu.md "Session 9: balancing the unit loops"): where the loop ends
 * spread from. Blocks per multiprocessor (%smid); the latest loop end of blocks by their
 * multiprocessor's block count; each busiest multiprocessor's last loop end (what the grid
 * waits for); warps' loop times by their block's rank on its multiprocessor (0: the lowest
 * block index there, the oldest: its warps are issued first); the Pearson correlation of a
 * block's latest loop end with its entry and with its item's units; warps' loop times by
 * scheduler (%warpid % 4). KVT_TL_DUMP=FILE appends every block's raw stamps (ns from the
 * first entry) to FILE (tests/bench/tl_analyze.py reads it). */
static void tl_where(FILE *f, const kvt_cuda_attend_plan *pl, const unsigned long long *t,
		     unsigned long long t0, const char *label)
{
	const size_t ni = pl->n_items;
	enum { NSM = 256 };
	/* block i's multiprocessor (its ATT_TL_WHERE bytes 0-1), as an index below NSM */
	auto sm_of = [t](size_t i) {
		return (int)((t[i * ATT_TL_SLOTS + ATT_TL_WHERE] & 0xffff) % NSM);
	};
	int cnt[NSM] = {0};
	att_item_dev *it = (att_item_dev *)malloc(ni * sizeof(*it));
	double *e = (double *)malloc((ni + NSM) * sizeof(double));
	if (!it || !e || cudaMemcpy(it, pl->p.items, ni * sizeof(*it), cudaMemcpyDeviceToHost) !=
				 cudaSuccess) {
		free(it);
		free(e);
		return;
	}
	for (size_t i = 0; i < ni; i++)
		cnt[sm_of(i)]++;
	int hist[6] = {0};
	for (int s = 0; s < NSM; s++)
		hist[cnt[s] < 5 ? cnt[s] : 5]++;
	fprintf(f, ",\"sms_with_0_1_2_3_4_5plus_blocks\":[%d,%d,%d,%d,%d,%d]", hist[0], hist[1],
		hist[2], hist[3], hist[4], hist[5]);
	/* latest loop end per block, by the block count of its multiprocessor */
	for (int k = 1; k <= 4; k++) {
		size_t n = 0;
		for (size_t i = 0; i < ni; i++) {
			double lo, hi;
			if (cnt[sm_of(i)] != k)
				continue;
			tl_loop_ends(t, i, &lo, &hi);
			e[n++] = hi - (double)t0;
		}
		char k_[32];
		snprintf(k_, sizeof(k_), "loop_end_sm%d", k);
		tl_stats(f, k_, e, n);
	}
	/* the busiest multiprocessors' last loop ends; warps' loop times by block rank */
	{
		int most = 0, seen[NSM] = {0};
		double last[NSM];
		for (int s = 0; s < NSM; s++) {
			most = cnt[s] > most ? cnt[s] : most;
			last[s] = 0.0;
		}
		for (size_t i = 0; i < ni; i++) {
			double lo, hi;
			tl_loop_ends(t, i, &lo, &hi);
			const int s = sm_of(i);
			last[s] = hi - (double)t0 > last[s] ? hi - (double)t0 : last[s];
		}
		size_t n = 0;
		for (int s = 0; s < NSM; s++)
			if (cnt[s] == most)
				e[n++] = last[s];
		tl_stats(f, "sm_last_loop_end", e, n);
		double *wr = (double *)malloc(ni * ATT_WARPS * sizeof(double));
		int *rk = (int *)malloc(ni * sizeof(int));
		for (size_t i = 0; wr && rk && i < ni; i++)
			rk[i] = seen[sm_of(i)]++;
		for (int r = 0; wr && rk && r < most && r < 4; r++) {
			n = tl_warp_loops(t, ni, rk, r, wr);
			char k_[32];
			snprintf(k_, sizeof(k_), "warp_loop_rank%d", r);
			tl_stats(f, k_, wr, n);
		}
		free(wr);
		free(rk);
	}
	/* correlations over blocks: loop end with entry, with units */
	double sx = 0, sy = 0, sz = 0, sxx = 0, syy = 0, szz = 0, sxy = 0, syz = 0;
	for (size_t i = 0; i < ni; i++) {
		double lo, hi;
		tl_loop_ends(t, i, &lo, &hi);
		const double y = hi - (double)t0, x = (double)(t[i * ATT_TL_SLOTS] - t0),
			     z = (double)it[i].count;
		sx += x, sy += y, sz += z, sxx += x * x, syy += y * y, szz += z * z;
		sxy += x * y, syz += y * z;
	}
	const double N = (double)ni, vx = sxx / N - sx * sx / N / N, vy = syy / N - sy * sy / N / N,
		     vz = szz / N - sz * sz / N / N;
	fprintf(f, ",\"corr_end_entry\":%.3f,\"corr_end_units\":%.3f",
		vx > 0 && vy > 0 ? (sxy / N - sx * sy / N / N) / sqrt(vx * vy) : 0.0,
		vz > 0 && vy > 0 ? (syz / N - sz * sy / N / N) / sqrt(vz * vy) : 0.0);
	/* warps' loop ends (from their block's prologue) by scheduler */
	double *w = (double *)malloc(ni * ATT_WARPS * sizeof(double));
	for (int q = 0; w && q < 4; q++) {
		const size_t n = tl_warp_loops(t, ni, NULL, q, w);
		char k_[32];
		snprintf(k_, sizeof(k_), "warp_loop_sched%d", q);
		tl_stats(f, k_, w, n);
	}
	free(w);
	const char *dp = getenv("KVT_TL_DUMP");
	FILE *d = dp ? fopen(dp, "a") : NULL;
	if (d) {
		/* block smid warpids(hex) group kv_head first count entry prologue loop0-3 merge */
		for (size_t i = 0; i < ni; i++) {
			const unsigned long long *b = t + i * ATT_TL_SLOTS;
			fprintf(d, "%zu %u %08llx %u %u %u %u %llu %llu %llu %llu %llu %llu %llu\n", i,
				(unsigned)(b[ATT_TL_WHERE] & 0xffff), b[ATT_TL_WHERE] >> 32,
				it[i].group, it[i].kv_head, it[i].first, it[i].count,
				b[ATT_TL_ENTRY] - t0, b[ATT_TL_PROLOGUE] - t0, b[ATT_TL_LOOP] - t0,
				b[ATT_TL_LOOP + 1] - t0, b[ATT_TL_LOOP + 2] - t0, b[ATT_TL_LOOP + 3] - t0,
				b[ATT_TL_MERGE] - t0);
		}
		fprintf(d, "end %zu %s\n", ni, label);
		fclose(d);
	}
	free(it);
	free(e);
}

/* The last run's stamps (docs/gpu.md, "Session 8: where the step's time goes"): every time
 * is in us from the first block's entry; [min, median, max] over blocks (or warps, or
 * combine blocks). */
extern "C" int kvt_cuda_attend_timeline_print(const kvt_cuda_attend_plan *pl, FILE *f,
					      const char *label)
{
	const size_t ni = pl->n_items, nc = (size_t)pl->n_groups * pl->p.rqn;
	unsigned long long *t =
		(unsigned long long *)malloc((ni * ATT_TL_SLOTS + nc * ATT_TLC_SLOTS) * 8);
	double *v = (double *)malloc((ni * ATT_WARPS + nc + 1) * sizeof(double));
	int rc = -ENOMEM;
	if (!t || !v)
		goto out;
	rc = -EIO;
	if (cudaMemcpy(t, pl->p.tl, ni * ATT_TL_SLOTS * 8, cudaMemcpyDeviceToHost) != cudaSuccess ||
	    cudaMemcpy(t + ni * ATT_TL_SLOTS, pl->p.tlc, nc * ATT_TLC_SLOTS * 8,
		       cudaMemcpyDeviceToHost) !=
		    cudaSuccess)
		goto out;
	{
		const unsigned long long *tc = t + ni * ATT_TL_SLOTS;
		unsigned long long t0 = ~0ull;
		for (size_t i = 0; i < ni; i++)
			t0 = t[i * ATT_TL_SLOTS] < t0 ? t[i * ATT_TL_SLOTS] : t0;
		fprintf(f, "{\"bench\":\"gpu\",\"op\":\"attend_timeline\",\"case\":\"%s\",\"blocks\":%zu",
			label, ni);
#define TL(i, s) ((double)(t[(i) * ATT_TL_SLOTS + (s)] - t0))
		size_t n = 0;
		for (size_t i = 0; i < ni; i++)
			v[n++] = TL(i, ATT_TL_ENTRY);
		tl_stats(f, "entry", v, n);
		n = 0; /* resident before the first entry: negative */
		for (size_t i = 0; i < ni; i++)
			v[n++] = (double)(long long)(t[i * ATT_TL_SLOTS + ATT_TL_RESIDENT] - t0);
		tl_stats(f, "resident", v, n);
		n = 0;
		for (size_t i = 0; i < ni; i++)
			v[n++] = TL(i, ATT_TL_PROLOGUE) - TL(i, ATT_TL_ENTRY);
		tl_stats(f, "prologue", v, n);
		n = 0;
		for (size_t i = 0; i < ni; i++)
			for (int w = 0; w < ATT_WARPS; w++)
				v[n++] = TL(i, ATT_TL_LOOP + w) - TL(i, ATT_TL_PROLOGUE);
		tl_stats(f, "warp_loop", v, n);
		n = 0;
		for (size_t i = 0; i < ni; i++) {
			double lo, hi;
			tl_loop_ends(t, i, &lo, &hi);
			v[n++] = hi - lo;
		}
		tl_stats(f, "warp_skew", v, n);
		n = 0;
		for (size_t i = 0; i < ni; i++) {
			double lo, hi;
			tl_loop_ends(t, i, &lo, &hi);
			v[n++] = (double)t[i * ATT_TL_SLOTS + ATT_TL_MERGE] - hi;
		}
		tl_stats(f, "merge", v, n);
		n = 0;
		for (size_t i = 0; i < ni; i++)
			v[n++] = TL(i, ATT_TL_MERGE);
		tl_stats(f, "block_end", v, n);
#undef TL
		tl_where(f, pl, t, t0, label);
		/* the combine's blocks (session 10): entry (resident, before its wait), wait
		 * done, its warp 0's items merged, output written */
		static const char *const cn[ATT_TLC_SLOTS] = {"combine_entry", "combine_start",
							      "combine_loaded", "combine_end"};
		for (int k = 0; k < ATT_TLC_SLOTS; k++) {
			n = 0;
			for (size_t i = 0; i < nc; i++)
				if (tc[ATT_TLC_SLOTS * i + k])
					v[n++] = (double)tc[ATT_TLC_SLOTS * i + k] - (double)t0;
			tl_stats(f, cn[k], v, n);
		}
		fprintf(f, "}\n");
	}
	rc = 0;
out:
	free(t);
	free(v);
	return rc;
}
#endif

extern "C" void kvt_cuda_attend_plan_info(const kvt_cuda_attend_plan *pl,
					  struct kvt_cuda_attend_plan_info *info)
{
	info->read_bytes = pl->read_bytes;
	info->n_items = pl->n_items;
	info->n_groups = pl->n_groups;
	info->kernel = pl->p.xmma ? KVT_CUDA_ATT_EXACT_MMA
		       : !pl->p.mma ? KVT_CUDA_ATT_CUDA_CORES
		       : pl->p.i2 == 0 ? KVT_CUDA_ATT_MMA
		       : pl->p.i2 == 3 ? KVT_CUDA_ATT_SWAPPED : KVT_CUDA_ATT_KEYS_AS_B;
	info->chained = pl->chain; /* set for INT2 plans only */
	info->early = pl->early != 0;
	info->early_runs = pl->early_runs;
	info->folded_tail_tokens = pl->folded_tail_tokens;
	info->tail_on_tensor_cores = pl->p.tail_tc;
}

extern "C" int kvt_cuda_attend(kvt_cuda_ctx *c, const struct kvt_cuda_attend_request *reqs,
			       size_t n_reqs, char *err, size_t errlen)
{
	kvt_cuda_attend_plan *pl;
	int rc = kvt_cuda_attend_plan_build(c, reqs, n_reqs, &pl, err, errlen);
	if (rc)
		return rc;
	rc = kvt_cuda_attend_run(c, pl, err, errlen);
	if (!rc)
		rc = kvt_cuda_sync(c, err, errlen);
	kvt_cuda_attend_plan_destroy(pl);
	return rc;
}

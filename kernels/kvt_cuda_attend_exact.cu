/*
 * kvt_cuda_attend_exact.cu - decode attention over exact rows on tensor cores (session 17):
 * scheme none (f16 / bf16 chunks, head_dim 64 / 128) with its exact tail, in a translation
 * unit of its own so that the other attention kernels compile as they did before it.
 *
 * Until session 17 scheme none ran on the CUDA-core kernel (one lane per token for the
 * logits, one lane per channel for the values): 0.5-0.6x bf16 SDPA on the H200, although it
 * reads the same bytes. Here one warp takes 16 tokens at a time with mma.sync m16n8k16 (f32
 * accumulation), and nothing but the rows comes from memory:
 *
 *  - scores S = Q K^T: A = the query heads (rows 0-7 the f16 / bf16 high parts of up to 8
 *    heads, rows 8-15 their low parts, so that one MMA gives both halves of a ~16-bit
 *    product and S = row g + row g + 8), B = 8 key rows read straight from memory: lane
 *    (g, t) of a quad reads the 16-byte pieces t, t + 4, ... of row g. The pieces' channel
 *    order is the MMA's k order for both operands (any order gives the same dot product), so
 *    no shuffle or shared memory stands between a load and its MMA;
 *  - softmax online per query head, the running maximum kept unless a tile exceeds it (one
 *    vote per tile; a rescale only then);
 *  - values O += P V: A = p (high parts in rows 0-7, low parts in rows 8-15 again: the same
 *    register layout the score accumulators come out in), B = the value rows as loaded,
 *    transposed 8 x 8 at a time by movmatrix. Each output tile's 8 columns are the channels
 *    the load gave the lanes, so the partial lands in channel order at the end.
 *
 * H200 (session 17, bf16, Hq 32, Hkv 8; SDPA and the copy in the same call): d128 1 x 131072
 * 126.2-126.5 us (1.01x SDPA; the CUDA-core kernel 263 us), 8 x 32768 242-243 (0.99x), 48 x
 * 4096 187 (1.02x), d64 1 x 131072 69.7 (0.97x). Tried: two tiles per step (all their loads
 * in flight together) needs 232 registers at d128, 2 blocks per multiprocessor: slower.
 *
 * The INT2 kernel's folded tail does the same tiles through kvt_cuda_attend.cuh's
 * ex_query_frags / ex_tile_load / ex_tile_attend / ex_partial_store, which hold this
 * kernel's code. This kernel keeps its own copy: with the load or the tile helper in it
 * (session 18) ptxas compiled its tile loop to 447 instead of 356 instructions at d128,
 * rebuilding the loads' addresses every tile, as a session-17 form with the tile in a
 * function did (20% slower on the H200).
 *
 * Items: ITEM_NONE_CHUNKS (a run of chunks, a KV head's rows [B][d] contiguous in each) and
 * ITEM_EXACT (a run of the tail, rows [token][H][d]); warp w takes the item's 16-token tiles
 * w, w + 4, ...; the block merges its warps like the other kernels (block_merge) and the
 * combine merges the items of a group.
 */
#include "kvt_cuda_attend.cuh"

template <int D, uint32_t DT, int NQ>
__global__ void __launch_bounds__(ATT_THREADS) attend_exact_kernel(att_params p)
{
	static_assert(NQ <= 8, "the score MMA's rows 0-7 hold the query heads");
	constexpr int PPL = D / 32; /* 16-byte pieces of a row per lane of a quad */
	constexpr int KS = D / 16;  /* k steps of the score MMA */
	__shared__ __align__(16) float qo[NQ * D];
	__shared__ __align__(16) uint4 qf[KS][32]; /* the score MMA's A fragments, per lane */
	__shared__ float red_m[ATT_WARPS][NQ], red_l[ATT_WARPS][NQ];
	__shared__ __align__(16) float red_acc[ATT_WARPS][NQ * D];

	const att_item_dev it = p.items[blockIdx.x];
	const att_req_dev rq = p.reqs[it.req];
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	const int g = lane >> 2, t4 = lane & 3;
	att_load_queries<D, NQ>(
		p, it, rq, [&](int q, int c) -> float & { return qo[q * D + c]; },
		[&](int q, int c) -> float & { return qo[q * D + c]; });
	__syncthreads();
	/* A fragments: k step j = 2 pc + h of lane (gg, tt) holds head gg's channels
	 * 8 (tt + 4 pc) + 4 h + 0..3: the ones its quad partner loads from a key row as words
	 * 2h, 2h + 1 of piece pc (high parts in rows 0-7, the rest in rows 8-15) */
	for (int i = threadIdx.x; i < KS * 32; i += ATT_THREADS) {
		const int j = i / 32, gg = (i % 32) >> 2, tt = i & 3;
		const int c0 = 8 * (tt + 4 * (j >> 1)) + 4 * (j & 1);
		float x[4];
#pragma unroll
		for (int e = 0; e < 4; e++)
			x[e] = gg < NQ ? qo[gg * D + c0 + e] : 0.0f;
		uint4 f;
		ex_split<DT>(x[0], x[1], f.x, f.y);
		ex_split<DT>(x[2], x[3], f.z, f.w);
		qf[j][i % 32] = f;
	}
	__syncthreads();

	constexpr size_t WS = 2;
	uint32_t n;
	size_t row_bytes; /* from one row of the item to the next within a run */
	if (it.kind == ITEM_EXACT) {
		n = it.count;
		row_bytes = (size_t)p.H * D * WS;
	} else {
		n = it.count * p.B;
		row_bytes = (size_t)D * WS;
	}
	const uint32_t tiles = (n + 15) / 16;
	/* f16 sessions: p goes into the value MMA times 2^14 (at most 16384), so that small
	 * weights keep f16's full precision instead of becoming subnormal (bf16 has float's
	 * exponent range); the partial is scaled back at the end */
	constexpr float PSC = DT == KVT_DTYPE_F16 ? 16384.0f : 1.0f;

	float acc[4 * PPL][4]; /* output tile (piece i, word w): channels 8 (t4 + 4 i) + 2 w + {0,1} */
#pragma unroll
	for (int i = 0; i < 4 * PPL; i++)
		acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
	float m = -INFINITY, l = 0.0f; /* head g's running maximum and sum (this lane's tokens) */

	/* chunk runs: the tile's chunk c and row rr in it, walked along (no division), and the
	 * chunk's section, loaded when c changes and one tile ahead of its use, so that no
	 * tile's loads wait for a descriptor (H200, with the L2 hint: 131.0 -> 126.3 us at
	 * d128 1 x 131072, 73.2 -> 69.7 at d64) */
	const bool chunked = it.kind != ITEM_EXACT;
	uint32_t c = 0, rr = 16 * warp;
	while (rr >= p.B)
		rr -= p.B, c++;
	const uint8_t *sec = chunked && warp < tiles ? p.chunks[it.first + c].sec : NULL;
	for (uint32_t tt = warp; tt < tiles; tt += ATT_WARPS) {
		const uint32_t r0 = tt * 16;
		const uint8_t *kb, *vb; /* row r0 */
		if (!chunked) {
			const size_t off = ((size_t)r0 * p.H + it.kv_head) * D * WS;
			kb = it.xk + off;
			vb = it.xv + off;
		} else {
			const size_t off = ((size_t)it.kv_head * p.B + rr) * D * WS;
			kb = sec + p.k_codes_off + off;
			vb = sec + p.v_codes_off + off;
			rr += 16 * ATT_WARPS;
			if (rr >= p.B) {
				while (rr >= p.B)
					rr -= p.B, c++;
				if (tt + ATT_WARPS < tiles)
					sec = p.chunks[it.first + c].sec;
			}
		}
		/* rows r0 + g and r0 + 8 + g: key and value pieces t4, t4 + 4, ... */
		uint4 kw[2][PPL], vw[2][PPL];
#pragma unroll
		for (int hf = 0; hf < 2; hf++) {
			const uint32_t r = 8 * hf + g;
			const bool ok = r0 + r < n;
			const size_t o = (size_t)r * row_bytes + 16 * t4;
#pragma unroll
			for (int i = 0; i < PPL; i++) {
				kw[hf][i] = ok ? ex_ld(kb + o + 64 * i) : make_uint4(0, 0, 0, 0);
				vw[hf][i] = ok ? ex_ld(vb + o + 64 * i) : make_uint4(0, 0, 0, 0);
			}
		}
		/* scores: s[hf] rows g (high parts) and g + 8 (the rest) of head g, tokens
		 * r0 + 8 hf + 2 t4 + {0, 1} */
		float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
		for (int j = 0; j < KS; j++) {
			const uint4 a = qf[j][lane];
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
		ex_split<DT>(PSC * pr[0][0], PSC * pr[0][1], pa.x, pa.y);
		ex_split<DT>(PSC * pr[1][0], PSC * pr[1][1], pa.z, pa.w);
#pragma unroll
		for (int i = 0; i < PPL; i++)
#pragma unroll
			for (int w = 0; w < 4; w++)
				ex_mma<DT>(acc[4 * i + w], pa, ex_trans(u4_word(vw[0][i], w)),
					   ex_trans(u4_word(vw[1][i], w)));
	}

	/* the warp's partial: head g's maximum, sum (over the quad) and channels */
	l += __shfl_xor_sync(KVT_FULL_MASK, l, 1);
	l += __shfl_xor_sync(KVT_FULL_MASK, l, 2);
	if (g < NQ) {
		if (t4 == 0) {
			red_m[warp][g] = m;
			red_l[warp][g] = l;
		}
		float *ra = &red_acc[warp][g * D];
		constexpr float UN = 1.0f / PSC;
		/* channel 8 (t4 + 4 i) + 2 w + e: output tile 4 i + w, columns e (high parts) and
		 * 2 + e (the rest) */
		auto ch = [&](int i, int w, int e) { return UN * (acc[4 * i + w][e] + acc[4 * i + w][2 + e]); };
#pragma unroll
		for (int i = 0; i < PPL; i++) {
			const int c0 = 8 * (t4 + 4 * i);
			*(float4 *)&ra[c0] = make_float4(ch(i, 0, 0), ch(i, 0, 1), ch(i, 1, 0), ch(i, 1, 1));
			*(float4 *)&ra[c0 + 4] = make_float4(ch(i, 2, 0), ch(i, 2, 1), ch(i, 3, 0), ch(i, 3, 1));
		}
	}
	block_merge<D, NQ>(p, &red_m[0][0], &red_l[0][0], &red_acc[0][0]);
}

namespace {

template <int D, int NQ> int ex_occupancy_dt(uint32_t dtype)
{
	return dtype == KVT_DTYPE_BF16 ? att_blocks_per_sm(attend_exact_kernel<D, KVT_DTYPE_BF16, NQ>)
				       : att_blocks_per_sm(attend_exact_kernel<D, KVT_DTYPE_F16, NQ>);
}

template <int D, uint32_t DT, int NQ>
cudaError_t ex_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	attend_exact_kernel<D, DT, NQ><<<pl->n_items, ATT_THREADS, 0, s>>>(pl->p);
	return cudaGetLastError();
}

template <int D, int NQ> cudaError_t ex_launch_dt(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	return pl->p.dtype == KVT_DTYPE_BF16 ? ex_launch<D, KVT_DTYPE_BF16, NQ>(pl, s)
					     : ex_launch<D, KVT_DTYPE_F16, NQ>(pl, s);
}

} // namespace

int kvt_att_exact_blocks_per_sm(uint32_t d, uint32_t dtype, uint32_t nq)
{
	if (d == 64)
		return nq == RQ ? ex_occupancy_dt<64, RQ>(dtype) : ex_occupancy_dt<64, RQ8>(dtype);
	return nq == RQ ? ex_occupancy_dt<128, RQ>(dtype) : ex_occupancy_dt<128, RQ8>(dtype);
}

cudaError_t kvt_att_exact_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	cudaError_t e;
	if (pl->D == 64)
		e = pl->p.rqn == RQ ? ex_launch_dt<64, RQ>(pl, s) : ex_launch_dt<64, RQ8>(pl, s);
	else
		e = pl->p.rqn == RQ ? ex_launch_dt<128, RQ>(pl, s) : ex_launch_dt<128, RQ8>(pl, s);
	return e == cudaSuccess ? kvt_att_combine_launch_dq(pl, s) : e;
}

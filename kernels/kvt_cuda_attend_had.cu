/*
 * kvt_cuda_attend_had.cu - hadamard (rotation, per-token key and value groups) on the packed
 * tensor-core kernel (session 20), in a translation unit of its own: its 48 instantiations
 * compile beside kvt_cuda_attend.cu's instead of after them.
 *
 * Until session 20 hadamard ran on the CUDA-core kernel: 0.29-0.30x bf16 SDPA on the H200,
 * slower than the uncompressed cache it stands in for. The packed kernel's per-channel key
 * path folds the key scales into the query (w = q' * s per key group of tokens); hadamard's
 * scales vary per token, so they go onto the codes instead (attend_coded_mma's HK: A = code x
 * s_k, exact, in two parts where it needs more than f16's 11 bits; B = q' split hi / lo once
 * per item; the zeros through per-group sums of q'). Values are per-token groups in every
 * scheme, so that path is the same.
 */
#include "kvt_cuda_attend_mma.cuh"

/* HK 1 (one MMA per key tile, A = code x s exact) for 2-bit codes with bf16 scales; HK 2 (the
 * scale split in two MMAs) where code x s needs more than f16's 11 significant bits */
template <int D, int BITS, int GV, int HK>
static cudaError_t had_launch_nq(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	return pl->p.rqn == RQ ? mma_kernel_launch<D, BITS, BITS, GV, RQ, HK>(pl, s)
			       : mma_kernel_launch<D, BITS, BITS, GV, RQ8, HK>(pl, s);
}

/* key and value groups of min(G, D) channels */
template <int D, int BITS, int HK>
static cudaError_t had_launch_gv(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	return with_gv<D>(pl->p.G,
			  [&](auto gv) { return had_launch_nq<D, BITS, decltype(gv)::value, HK>(pl, s); });
}

template <int D> static cudaError_t had_launch_bits(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	if (pl->p.kb == 4)
		return had_launch_gv<D, 4, 2>(pl, s);
	return pl->p.sbf ? had_launch_gv<D, 2, 1>(pl, s) : had_launch_gv<D, 2, 2>(pl, s);
}

cudaError_t kvt_att_had_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	const cudaError_t e = pl->D == 64    ? had_launch_bits<64>(pl, s)
			      : pl->D == 128 ? had_launch_bits<128>(pl, s)
					     : had_launch_bits<256>(pl, s);
	return e == cudaSuccess ? kvt_att_combine_launch_dq(pl, s) : e;
}

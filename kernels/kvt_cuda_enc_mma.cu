/*
 * kvt_cuda_enc_mma.cu - the tensor-core encoder (session 6): the chunk bytes of
 * CHUNK_FORMAT.md from the same math as the CPU encoder in a different float order, so codes
 * may differ from kvt_encode_chunk's at rounding ties (by one, decoded values within one
 * quantization step; test_gpu_codec measures the fraction). KVTIER_CUDA_ENC_EXACT=1 keeps
 * the byte-exact fe_kernel (kvt_cuda.h).
 *
 * The rotation. Sylvester's H_d factors over the bits of the channel index (H[i][j] =
 * (-1)^popcount(i & j)), so any four bits can be transformed by one m16n8k16 MMA with a
 * +-1 matrix (exact in bf16 / f16, fp32 accumulation, straight from the input words) and
 * the other log2(d) - 4 bits by add/sub stages on the accumulators in registers. The bits
 * are chosen so that the MMA's operand layout matches plain 16-byte loads: with RUN = d / 8,
 * lane t (= lane & 3) loads "runs" of RUN consecutive channels at RUN * t and d/2 + RUN * t;
 * inside a run, channel bit 0 is the low/high half of a 32-bit word (the MMA's k bit 0) and
 * the word index w (RUN / 2 words) is the register-stage block; t gives k bits 1-2 and the
 * run k bit 3. On the output side a thread then holds whole runs of RUN consecutive
 * channels, so codes pack into words without shuffles.
 *  - keys: C = A * X^T with A the +-1 matrix and X^T's fragment the token rows (tokens along
 *    C's columns): a thread holds runs of 8 tokens of a channel set, the per-channel min/max
 *    over the G = 32 tokens is in registers plus two xor shuffles;
 *  - values: C = X * B (tokens along rows), per-token groups of 32 channels: one or two xor
 *    shuffles.
 * The 1/sqrt(d) factor is folded out: keys are divided by the norm of the unscaled rotated
 * row (y / |y| = (y/sqrt d) / n), values' min/max are scaled once per group and the factor
 * goes into the code multiplier.
 *
 * The norm n_t over all heads equals the norm of the unrotated token (the rotation is
 * orthonormal): each block stages its key tile (G tokens x H heads x d, the input dtype) in
 * shared memory by cp.async, sums squares from there, then every warp rotates and quantizes
 * whole heads from the tile. Value rows come from global memory while the tile is in
 * flight. Codes: u = sat(x * a + b) (one fma; sat clamps to [0, 1] and sends NaN to 0, as
 * kvt_qcode does) with a = 1/(s qmax), b = -z/(s qmax), then u * qmax rounded by adding
 * 1.5 * 2^23 (a second fma), packed by shift-add (mx_qp: exact half-way values may round
 * either way). Scales and zeros follow kvt_d_qparam (the CPU's rule, IEEE operations) from
 * the group's min/max.
 */
#include "cuda_internal.cuh"
#include "kvt_cuda_enc.cuh"

#include <stdlib.h>

#define MX_WARPS 4
#define MX_THREADS (MX_WARPS * 32)
#define MX_G 32
#define MX_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define MX_MAGIC_BITS 0x4B400000u
#define MX_SMEM_MAX (200 * 1024)

/* D = C + A * B, m16n8k16, f32 accumulators from zero, bf16 or f16 operands */
template <bool F16>
__device__ __forceinline__ void mx_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
				       uint32_t a3, uint32_t b0, uint32_t b1)
{
	const float z = 0.0f;
	if (F16)
		asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
		    "{%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
		    : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
		    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z), "f"(z), "f"(z),
		      "f"(z));
	else
		asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
		    "{%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
		    : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
		    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z), "f"(z), "f"(z),
		      "f"(z));
}

/* +1, -1 or 0 in the operand dtype */
template <bool F16>
__device__ __forceinline__ uint32_t mx_pm(int v)
{
	const uint32_t one = F16 ? 0x3C00u : 0x3F80u;
	return v == 0 ? 0u : v > 0 ? one : (one | 0x8000u);
}

/* The key matrix A[i][k]: output row i pairs its bit 3 with input bit 0 (channel bit 0) and
 * its bits 0-2 with input bits 1-3 (the thread / run bits), so a thread's C rows g and g + 8
 * are channels RUN * g + 2w and RUN * g + 2w + 1 of the output. Identity without rotation. */
__device__ __forceinline__ int mx_akey(int i, int k, bool rot)
{
	const int ki = ((i >> 3) & 1) | ((i & 7) << 1);
	if (!rot)
		return ki == k ? 1 : 0;
	return (__popc(ki & k) & 1) ? -1 : 1;
}

/* The value matrix B[k][n]: natural Sylvester H16 (n bit 0 = channel bit 0 of the output,
 * bits 1-2 the thread, bit 3 the n-tile / run). Identity without rotation. */
__device__ __forceinline__ int mx_bval(int k, int n, bool rot)
{
	if (!rot)
		return k == n ? 1 : 0;
	return (__popc(k & n) & 1) ? -1 : 1;
}

/* The register stages: butterflies over the NB blocks (output block bit b = input bit b) */
template <int NB>
__device__ __forceinline__ void mx_bfly(float (&x)[NB][4])
{
#pragma unroll
	for (int s = 1; s < NB; s <<= 1)
#pragma unroll
		for (int b = 0; b < NB; b++)
			if (!(b & s))
#pragma unroll
				for (int e = 0; e < 4; e++) {
					const float u = x[b][e], v = x[b | s][e];
					x[b][e] = __fadd_rn(u, v);
					x[b | s][e] = __fsub_rn(u, v);
				}
}

__device__ __forceinline__ void mx_cp16(void *smem, const void *gmem)
{
	const uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem);
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem));
}

/* chunk swizzle inside a (token, head) row of the tile: the key loads of lanes g and g + 1
 * (tokens 8 nt + g) land in different banks */
template <int D>
__device__ __forceinline__ uint32_t mx_swz(uint32_t tok)
{
	return (tok & 1u) * (D == 64 ? 4u : 1u);
}

/* The code of x, the bits of M + code: a, b are the group's coefficients over qmax (mx_qp),
 * so u = sat(x a + b) is clamped to [0, 1] by the fma itself (NaN -> +0), and u qmax + M
 * rounds it: two fma-pipe instructions (session 6: fma, add M, fmin, fmax) */
template <int BITS>
__device__ __forceinline__ uint32_t mx_code_bits(float x, float a, float b)
{
	float u;
	asm("fma.rn.sat.f32 %0, %1, %2, %3;" : "=f"(u) : "f"(x), "f"(a), "f"(b));
	return __float_as_uint(__fmaf_rn(u, (float)((1 << BITS) - 1), MX_MAGIC));
}

/* sum over e < n of (MAGIC_BITS << (bits * e)) mod 2^32: what packing by addition adds */
template <int BITS, int N>
__device__ __forceinline__ constexpr uint32_t mx_bias()
{
	uint32_t s = 0;
	for (int e = 0; e < N; e++)
		s += MX_MAGIC_BITS << (BITS * e);
	return s;
}

/* One run of RUN codes packed little end first: RUN * BITS / 32 words (at least one; a d 64
 * INT2 run fills 16 bits). v[e] are the values of channels e = 0..RUN-1. */
template <int RUN, int BITS>
__device__ __forceinline__ void mx_pack(const float (&v)[RUN], const float (&a)[RUN],
					const float (&b)[RUN], uint32_t (&w)[2])
{
	constexpr int PER = 32 / BITS; /* codes per word */
	constexpr int NW = (RUN * BITS + 31) / 32;
	constexpr int IN = RUN < PER ? RUN : PER;
#pragma unroll
	for (int k = 0; k < NW; k++) {
		uint32_t acc = 0u - mx_bias<BITS, IN>();
#pragma unroll
		for (int e = 0; e < IN; e++)
			acc += mx_code_bits<BITS>(v[k * PER + e], a[k * PER + e], b[k * PER + e])
			       << (BITS * e);
		w[k] = acc;
	}
	if (NW == 1)
		w[1] = 0;
}

/* Stores one run's codes (RUN * bits / 8 bytes) */
template <int RUN>
__device__ __forceinline__ void mx_store_run(uint8_t *dst, uint32_t bits, const uint32_t (&w)[2])
{
	const uint32_t nb = RUN * bits / 8;
	if (nb == 8)
		*(uint2 *)dst = make_uint2(w[0], w[1]);
	else if (nb == 4)
		*(uint32_t *)dst = w[0];
	else
		*(uint16_t *)dst = (uint16_t)w[0];
}

/* qparams of a group: stored halves, and the code coefficients for values x * mult: the codes
 * are rint(y) clamped to [0, qmax], y = x mult / s - z / s, computed as u = sat(x a + b) with
 * a = mult / (s qmax), b = -z / (s qmax), then u qmax rounded (mx_code_bits). Codes equal the
 * CPU's but at rounding ties: besides the float order, an exact half-way y (common with bf16
 * data and 16-bit scales) comes out of u = RN(y / qmax) one ulp off the tie and may round
 * either way (test_gpu_codec's check_ties holds every differing code to a tie). */
__device__ __forceinline__ void mx_qp(float mn, float mx, bool any, float qmax, bool bf,
				      float mult, uint16_t *sb, uint16_t *zb, float *a, float *b)
{
	float s, z;
	kvt_d_qparam(mn, mx, any, qmax, bf, sb, zb, &s, &z);
	const float rs = __frcp_rn(s);
	if (s != 0.0f && isfinite(rs)) {
		const float rq = __fmul_rn(rs, 1.0f / qmax);
		*a = __fmul_rn(mult, rq);
		*b = -__fmul_rn(z, rq);
	} else {
		*a = 0.0f;
		*b = 0.0f;
	}
}

/* A key item's codes: channel-outer (the coefficients of one channel gathered from the lane
 * that computed them, then its code added into the 8 token rows' words), so only two
 * coefficients are live next to the accumulators. acc[nt][b][2o + u] is channel 2b + o of
 * the lane's run, token 8 nt + 2t + u; dst is the run's place in token t0's row. */
template <int RUN, int NB, int BITS>
__device__ __forceinline__ void mx_kcodes(const float (&acc)[4][NB][4], const float (&la)[RUN / 4],
					  const float (&lb)[RUN / 4], int lane, uint32_t t0,
					  uint32_t n_pin, uint8_t *dst, uint32_t rowb)
{
	constexpr int PER = 32 / BITS;
	constexpr int NW = (RUN * BITS + 31) / 32;
	constexpr int IN = RUN < PER ? RUN : PER;
	const int t = lane & 3;
	uint32_t w[8][NW];
#pragma unroll
	for (int r = 0; r < 8; r++)
#pragma unroll
		for (int k = 0; k < NW; k++)
			w[r][k] = 0u - mx_bias<BITS, IN>();
#pragma unroll
	for (int c = 0; c < RUN; c++) {
		const float a = __shfl_sync(KVT_FULL_MASK, la[c / 4], (lane & ~3) | (c % 4));
		const float b = __shfl_sync(KVT_FULL_MASK, lb[c / 4], (lane & ~3) | (c % 4));
#pragma unroll
		for (int nt = 0; nt < 4; nt++)
#pragma unroll
			for (int u = 0; u < 2; u++)
				w[2 * nt + u][c / PER] +=
					mx_code_bits<BITS>(acc[nt][c / 2][2 * (c % 2) + u], a, b)
					<< (BITS * (c % PER));
	}
#pragma unroll
	for (int nt = 0; nt < 4; nt++)
#pragma unroll
		for (int u = 0; u < 2; u++) {
			const uint32_t tok = 8 * nt + 2 * t + u;
			uint32_t pk[2] = {w[2 * nt + u][0], NW > 1 ? w[2 * nt + u][NW - 1] : 0u};
			if (t0 + tok < n_pin)
				pk[0] = pk[1] = 0;
			mx_store_run<RUN>(dst + (size_t)tok * rowb, BITS, pk);
		}
}

template <int D, bool F16, int KB, int VB>
__global__ void __launch_bounds__(MX_THREADS, 3) mx_kernel(enc_params p)
{
	constexpr int NB = D / 16;  /* register-stage blocks = words per run */
	constexpr int RUN = D / 8;  /* consecutive channels per run */
	constexpr int RC = RUN / 8; /* 16-byte chunks per run */
	constexpr int S = 32 / RUN; /* lanes sharing a 32-channel value group */
	extern __shared__ uint4 mx_smem[];
	const uint32_t H = p.H, B = p.B;
	const uint32_t gi = blockIdx.x, l = blockIdx.y;
	const enc_job_dev &j = p.jobs[blockIdx.z];
	const uint32_t t0 = gi * MX_G;
	constexpr uint32_t row_chunks = D / 8;
	const uint32_t tok_chunks = H * row_chunks;
	uint4 *ktile = mx_smem;
	float *rnrm = (float *)(mx_smem + MX_G * tok_chunks);
	const size_t row = (size_t)H * D * 2;
	const uint8_t *kin = (const uint8_t *)j.k + ((size_t)l * B + t0) * row;
	const uint8_t *vin = (const uint8_t *)j.v + ((size_t)l * B + t0) * row;
	uint8_t *sec = j.out + j.hdr_bytes + (size_t)l * j.layer_bytes;
	const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
	const bool oscar = p.scheme == KVT_SCHEME_OSCAR, rotv = p.rotate_v != 0, bf = p.sbf != 0;
	const uint32_t n_pin = j.n_pin;
	static_assert((KB == 2 || KB == 4) && (VB == 2 || VB == 4), "2- or 4-bit codes");
	/* the crc pass, this grid's programmatic dependent, may start once every block has
	 * started (it waits on the per-chunk counters bumped at the end, so never on a block
	 * that is not resident) */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.launch_dependents;");
#endif
	const uint32_t kbits = KB, vbits = VB;

	/* 1. the key tile into shared memory */
	for (uint32_t i = tid; i < MX_G * tok_chunks; i += MX_THREADS) {
		const uint32_t tok = i / tok_chunks, c = i % tok_chunks;
		mx_cp16(&ktile[tok * tok_chunks + (c ^ mx_swz<D>(tok))], kin + (size_t)i * 16);
	}
	asm volatile("cp.async.commit_group;\n" ::);

	/* exact copies of pinned tokens (original basis, wire dtype) */
	if (t0 < n_pin) {
		const uint32_t np = min(n_pin - t0, (uint32_t)MX_G);
		const uint32_t wpr = (uint32_t)(row / 4);
		for (uint32_t i = tid; i < np * wpr; i += MX_THREADS) {
			const uint32_t tt = i / wpr, w = i % wpr;
			const size_t dst = (size_t)(t0 + tt) * wpr + w;
			((uint32_t *)(sec + j.k_exact_off))[dst] = ((const uint32_t *)kin)[(size_t)tt * wpr + w];
			((uint32_t *)(sec + j.v_exact_off))[dst] = ((const uint32_t *)vin)[(size_t)tt * wpr + w];
		}
	}

	/* 2. values: warp items (head, all 32 tokens) straight from global memory */
	{
		uint32_t bv[2][2];
#pragma unroll
		for (int nt = 0; nt < 2; nt++) {
			const int n = g + 8 * nt;
			bv[nt][0] = mx_pm<F16>(mx_bval(2 * t, n, rotv)) |
				    (mx_pm<F16>(mx_bval(2 * t + 1, n, rotv)) << 16);
			bv[nt][1] = mx_pm<F16>(mx_bval(2 * t + 8, n, rotv)) |
				    (mx_pm<F16>(mx_bval(2 * t + 9, n, rotv)) << 16);
		}
		const float vmult = rotv ? p.inv_sqrt_d : 1.0f;
		const float vqmax = (float)((1u << vbits) - 1);
		const uint32_t vrowb = D * vbits / 8, ng = D / 32;
		for (uint32_t h = warp; h < H; h += MX_WARPS) {
			/* words [m-tile][token g / g + 8][run][word], every load issued first */
			uint32_t w[2][2][2][NB];
#pragma unroll
			for (int m = 0; m < 2; m++)
#pragma unroll
				for (int s = 0; s < 2; s++) {
					const uint32_t tok = 16 * m + 8 * s + g;
					const uint8_t *rp = vin + ((size_t)tok * H + h) * D * 2;
#pragma unroll
					for (int r = 0; r < 2; r++)
#pragma unroll
						for (int q = 0; q < RC; q++) {
							const uint4 v = *(const uint4 *)(rp + (RUN * t + (D / 2) * r + 8 * q) * 2);
							w[m][s][r][4 * q] = v.x;
							w[m][s][r][4 * q + 1] = v.y;
							w[m][s][r][4 * q + 2] = v.z;
							w[m][s][r][4 * q + 3] = v.w;
						}
				}
#pragma unroll
			for (int m = 0; m < 2; m++) {
				float acc[2][NB][4];
#pragma unroll
				for (int nt = 0; nt < 2; nt++)
#pragma unroll
					for (int b = 0; b < NB; b++)
						mx_mma<F16>(acc[nt][b], w[m][0][0][b], w[m][1][0][b], w[m][0][1][b],
							    w[m][1][1][b], bv[nt][0], bv[nt][1]);
				if (rotv) {
					mx_bfly<NB>(acc[0]);
					mx_bfly<NB>(acc[1]);
				}
				/* acc[nt][b][2s + o]: token 16m + 8s + g, channel RUN t + d/2 nt + 2b + o */
				float mn[2][2], mx[2][2];
#pragma unroll
				for (int s = 0; s < 2; s++)
#pragma unroll
					for (int nt = 0; nt < 2; nt++) {
						float a0 = fminf(acc[nt][0][2 * s], acc[nt][0][2 * s + 1]);
						float a1 = fmaxf(acc[nt][0][2 * s], acc[nt][0][2 * s + 1]);
#pragma unroll
						for (int b = 1; b < NB; b++) {
							a0 = fminf(a0, fminf(acc[nt][b][2 * s], acc[nt][b][2 * s + 1]));
							a1 = fmaxf(a1, fmaxf(acc[nt][b][2 * s], acc[nt][b][2 * s + 1]));
						}
#pragma unroll
						for (int o = 1; o < S; o <<= 1) {
							a0 = fminf(a0, __shfl_xor_sync(KVT_FULL_MASK, a0, o));
							a1 = fmaxf(a1, __shfl_xor_sync(KVT_FULL_MASK, a1, o));
						}
						mn[s][nt] = a0;
						mx[s][nt] = a1;
					}
				/* the S lanes of a group share its 4 (token, n-tile) qparams: lane t
				 * computes combos c = k S + t % S, then every lane gathers all four */
				float la[4 / S], lb[4 / S];
#pragma unroll
				for (int k = 0; k < 4 / S; k++) {
					const int c = k * S + (t % S), s = c >> 1, nt = c & 1;
					const float cmn = s ? (nt ? mn[1][1] : mn[1][0]) : (nt ? mn[0][1] : mn[0][0]);
					const float cmx = s ? (nt ? mx[1][1] : mx[1][0]) : (nt ? mx[0][1] : mx[0][0]);
					const uint32_t tok = 16 * m + 8 * s + g;
					const bool any = t0 + tok >= n_pin;
					uint16_t sb, zb;
					mx_qp(__fmul_rn(cmn, vmult), __fmul_rn(cmx, vmult), any, vqmax, bf,
					      vmult, &sb, &zb, &la[k], &lb[k]);
					const size_t si = ((size_t)h * B + t0 + tok) * ng +
							  (RUN * t + (D / 2) * nt) / 32;
					((uint16_t *)(sec + p.v_scale_off))[si] = sb;
					((uint16_t *)(sec + p.v_zero_off))[si] = zb;
				}
				float ca[4], cb[4];
#pragma unroll
				for (int c = 0; c < 4; c++) {
					const int src = (lane & ~(S - 1)) | (c % S);
					ca[c] = __shfl_sync(KVT_FULL_MASK, la[c / S], src);
					cb[c] = __shfl_sync(KVT_FULL_MASK, lb[c / S], src);
				}
#pragma unroll
				for (int s = 0; s < 2; s++)
#pragma unroll
					for (int nt = 0; nt < 2; nt++) {
						const int c = 2 * s + nt;
						float v[RUN], av[RUN], bw[RUN];
#pragma unroll
						for (int b = 0; b < NB; b++)
#pragma unroll
							for (int o = 0; o < 2; o++) {
								v[2 * b + o] = acc[nt][b][2 * s + o];
								av[2 * b + o] = ca[c];
								bw[2 * b + o] = cb[c];
							}
						uint32_t pk[2];
						if (vbits == 2)
							mx_pack<RUN, 2>(v, av, bw, pk);
						else
							mx_pack<RUN, 4>(v, av, bw, pk);
						const uint32_t tok = 16 * m + 8 * s + g;
						if (t0 + tok < n_pin)
							pk[0] = pk[1] = 0;
						mx_store_run<RUN>(sec + p.v_codes_off + ((size_t)h * B + t0 + tok) * vrowb +
									  (RUN * t + (D / 2) * nt) * vbits / 8,
								  vbits, pk);
					}
			}
		}
	}

	asm volatile("cp.async.wait_all;\n" ::);
	__syncthreads();

	/* 3. token norms over all heads from the unrotated tile (4 threads per token) */
	if (oscar) {
		const uint32_t tok = tid >> 2, jj = tid & 3;
		const uint4 *tp = ktile + tok * tok_chunks;
		float s0 = 0.0f, s1 = 0.0f;
		for (uint32_t i = jj; i < tok_chunks; i += 4) {
			const uint4 v = tp[i ^ ((tok & 1) * 4)];
			const uint32_t wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
			for (int k = 0; k < 4; k++) {
				float lo, hi;
				if (F16) {
					const float2 f = __half22float2(*(const __half2 *)&wv[k]);
					lo = f.x;
					hi = f.y;
				} else {
					lo = __uint_as_float(wv[k] << 16);
					hi = __uint_as_float(wv[k] & 0xffff0000u);
				}
				s0 = __fmaf_rn(lo, lo, s0);
				s1 = __fmaf_rn(hi, hi, s1);
			}
		}
		float ss = __fadd_rn(s0, s1);
		ss = __fadd_rn(ss, __shfl_xor_sync(KVT_FULL_MASK, ss, 1));
		ss = __fadd_rn(ss, __shfl_xor_sync(KVT_FULL_MASK, ss, 2));
		if (jj == 0) {
			float n = __fsqrt_rn(ss);
			if (n == 0.0f || !isfinite(n))
				n = 1.0f;
			((float *)(sec + p.norms_off))[t0 + tok] = n;
			/* the rotated rows are unscaled (|y| = sqrt(d) n): y / (sqrt(d) n) */
			rnrm[tok] = __fdiv_rn(p.inv_sqrt_d, n);
		}
		__syncthreads();
	}

	/* 4. keys: warp items (head, 32 tokens) from the tile */
	{
		uint32_t ak[4];
		ak[0] = mx_pm<F16>(mx_akey(g, 2 * t, oscar)) | (mx_pm<F16>(mx_akey(g, 2 * t + 1, oscar)) << 16);
		ak[1] = mx_pm<F16>(mx_akey(g + 8, 2 * t, oscar)) |
			(mx_pm<F16>(mx_akey(g + 8, 2 * t + 1, oscar)) << 16);
		ak[2] = mx_pm<F16>(mx_akey(g, 2 * t + 8, oscar)) |
			(mx_pm<F16>(mx_akey(g, 2 * t + 9, oscar)) << 16);
		ak[3] = mx_pm<F16>(mx_akey(g + 8, 2 * t + 8, oscar)) |
			(mx_pm<F16>(mx_akey(g + 8, 2 * t + 9, oscar)) << 16);
		const float kqmax = (float)((1u << kbits) - 1);
		const uint32_t krowb = D * kbits / 8, NG = B / MX_G;
		const bool any = n_pin < t0 + MX_G;
		const bool pinned_here = t0 < n_pin;
		const float INF = __int_as_float(0x7f800000);
		for (uint32_t h = warp; h < H; h += MX_WARPS) {
			float acc[4][NB][4];
#pragma unroll
			for (int nt = 0; nt < 4; nt++) {
				const uint32_t tok = 8 * nt + g;
				const uint4 *rp = ktile + tok * tok_chunks + h * row_chunks;
				uint32_t w[2][NB];
#pragma unroll
				for (int r = 0; r < 2; r++)
#pragma unroll
					for (int q = 0; q < RC; q++) {
						const uint32_t c = (RUN * t + (D / 2) * r) / 8 + q;
						const uint4 v = rp[c ^ mx_swz<D>(tok)];
						w[r][4 * q] = v.x;
						w[r][4 * q + 1] = v.y;
						w[r][4 * q + 2] = v.z;
						w[r][4 * q + 3] = v.w;
					}
#pragma unroll
				for (int b = 0; b < NB; b++)
					mx_mma<F16>(acc[nt][b], ak[0], ak[1], ak[2], ak[3], w[0][b], w[1][b]);
				if (oscar) {
					mx_bfly<NB>(acc[nt]);
					/* acc[nt][b][2o + u]: channel RUN g + 2b + o, token 8nt + 2t + u */
					const float r0 = rnrm[8 * nt + 2 * t], r1 = rnrm[8 * nt + 2 * t + 1];
#pragma unroll
					for (int b = 0; b < NB; b++) {
						acc[nt][b][0] = __fmul_rn(acc[nt][b][0], r0);
						acc[nt][b][1] = __fmul_rn(acc[nt][b][1], r1);
						acc[nt][b][2] = __fmul_rn(acc[nt][b][2], r0);
						acc[nt][b][3] = __fmul_rn(acc[nt][b][3], r1);
					}
				}
			}
			/* per-channel min / max over the unpinned tokens of the group; lane t keeps
			 * channels c = 4k + t of the run for its qparams (the others only pass by) */
			float smn[RUN / 4], smx[RUN / 4];
#pragma unroll
			for (int b = 0; b < NB; b++)
#pragma unroll
				for (int o = 0; o < 2; o++) {
					float a0 = INF, a1 = -INF;
#pragma unroll
					for (int nt = 0; nt < 4; nt++)
#pragma unroll
						for (int u = 0; u < 2; u++) {
							float x = acc[nt][b][2 * o + u];
							if (pinned_here) {
								const bool pin = t0 + 8 * nt + 2 * t + u < n_pin;
								a0 = fminf(a0, pin ? INF : x);
								a1 = fmaxf(a1, pin ? -INF : x);
							} else {
								a0 = fminf(a0, x);
								a1 = fmaxf(a1, x);
							}
						}
					a0 = fminf(a0, __shfl_xor_sync(KVT_FULL_MASK, a0, 1));
					a1 = fmaxf(a1, __shfl_xor_sync(KVT_FULL_MASK, a1, 1));
					a0 = fminf(a0, __shfl_xor_sync(KVT_FULL_MASK, a0, 2));
					a1 = fmaxf(a1, __shfl_xor_sync(KVT_FULL_MASK, a1, 2));
					const int c = 2 * b + o;
					if (c % 4 == 0) {
						smn[c / 4] = a0;
						smx[c / 4] = a1;
					} else if (t == c % 4) {
						smn[c / 4] = a0;
						smx[c / 4] = a1;
					}
				}
			float la[RUN / 4], lb[RUN / 4];
#pragma unroll
			for (int k = 0; k < RUN / 4; k++) {
				uint16_t sb, zb;
				mx_qp(smn[k], smx[k], any, kqmax, bf, 1.0f, &sb, &zb, &la[k], &lb[k]);
				const size_t si = ((size_t)h * NG + gi) * D + RUN * g + 4 * k + t;
				((uint16_t *)(sec + p.k_scale_off))[si] = sb;
				((uint16_t *)(sec + p.k_zero_off))[si] = zb;
			}
			uint8_t *kdst = sec + p.k_codes_off + ((size_t)h * B + t0) * krowb + RUN * g * kbits / 8;
			if (kbits == 2)
				mx_kcodes<RUN, NB, 2>(acc, la, lb, lane, t0, n_pin, kdst, krowb);
			else
				mx_kcodes<RUN, NB, 4>(acc, la, lb, lane, t0, n_pin, kdst, krowb);
		}
	}
	/* this block's bytes are written: count it for the crc pass (a release: the barrier
	 * orders every thread's stores before thread 0's fence, which is cumulative) */
	__syncthreads();
	if (tid == 0) {
		__threadfence();
		atomicAdd(p.work_ctr + CRC_SYNC_JOB + blockIdx.z, 1u);
	}
}

static size_t mx_smem_bytes(uint32_t H, uint32_t D)
{
	return (size_t)MX_G * H * D * 2 + MX_G * 4;
}

bool kvt_mx_supports(const struct kvt_codec_config *cfg)
{
	if (cfg->scheme != KVT_SCHEME_OSCAR && cfg->scheme != KVT_SCHEME_KIVI)
		return false;
	if (cfg->dtype != KVT_DTYPE_BF16 && cfg->dtype != KVT_DTYPE_F16)
		return false;
	if (cfg->head_dim != 64 && cfg->head_dim != 128)
		return false;
	if (cfg->group != MX_G)
		return false;
	if ((cfg->key_bits != 2 && cfg->key_bits != 4) ||
	    (cfg->value_bits != 2 && cfg->value_bits != 4))
		return false;
	if (cfg->scheme == KVT_SCHEME_KIVI && cfg->rotate_v)
		return false;
	return mx_smem_bytes(cfg->n_kv_heads, cfg->head_dim) <= MX_SMEM_MAX;
}

/* one instantiation per (d, dtype, key bits, value bits): each kernel holds only its own
 * code paths (one kernel for all bit widths, branching at run time, measured 7.6-8 us slower
 * per call on the H200; it was KVTIER_CUDA_MX_RT=1 until the end of session 6) */
template <int D, bool F16, int KB, int VB>
static cudaError_t mx_launch1(const enc_params &p, uint32_t n_jobs, cudaStream_t s)
{
	const size_t sm = mx_smem_bytes(p.H, D);
	cudaError_t e = cudaFuncSetAttribute(mx_kernel<D, F16, KB, VB>,
					     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
	if (e != cudaSuccess)
		return e;
	dim3 grid(p.B / MX_G, p.L, n_jobs);
	mx_kernel<D, F16, KB, VB><<<grid, MX_THREADS, sm, s>>>(p);
	return cudaGetLastError();
}

template <int D, bool F16>
static cudaError_t mx_launch_b(const enc_params &p, uint32_t n_jobs, cudaStream_t s)
{
	if (p.kb == 2)
		return p.vb == 2 ? mx_launch1<D, F16, 2, 2>(p, n_jobs, s)
				 : mx_launch1<D, F16, 2, 4>(p, n_jobs, s);
	return p.vb == 2 ? mx_launch1<D, F16, 4, 2>(p, n_jobs, s)
			 : mx_launch1<D, F16, 4, 4>(p, n_jobs, s);
}

cudaError_t kvt_mx_launch(const enc_params &p, uint32_t n_jobs, uint32_t head_dim,
			  cudaStream_t s)
{
	const bool f16 = p.dtype == KVT_DTYPE_F16;
	if (head_dim == 64)
		return f16 ? mx_launch_b<64, true>(p, n_jobs, s) : mx_launch_b<64, false>(p, n_jobs, s);
	return f16 ? mx_launch_b<128, true>(p, n_jobs, s) : mx_launch_b<128, false>(p, n_jobs, s);
}

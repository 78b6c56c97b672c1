/*
 * kvt_cuda_attend_mma.cuh - the packed tensor-core attention kernel (attend_mma_kernel), in a
 * header of its own so that two translation units instantiate it: kvt_cuda_attend.cu the
 * per-channel key schemes (oscar, kivi), kvt_cuda_attend_had.cu the per-token key groups of
 * hadamard (session 20); each file compiles in about the time one did before.
 */
#ifndef KVT_CUDA_ATTEND_MMA_CUH
#define KVT_CUDA_ATTEND_MMA_CUH

#include <type_traits>

#include "kvt_cuda_attend.cuh"

/* ---- Tensor-core path: per-channel keys (oscar, kivi), INT2/INT4 and 3-bit keys with 2-bit
 * values, head_dim 64 / 128 / 256 (64, 256 and 3-bit keys since session 15); INT8 at head_dim
 * 64 / 128 (session 19); hadamard's per-token key groups, INT2 / INT4 (session 20: HK below)
 * ----------------------------------------------------------------------------------------------
 *
 * mma.sync m16n8k16 (f16 in, f32 accumulate). Keys: A = codes [16 tokens][16 channels] read
 * straight from the packed rows (each quad of lanes shares a token row, each lane 1/4 of it;
 * channels c and c + 16/BITS of a 32-bit word sit at bits b and b + 16, so an and-or and one
 * HFMA2 make a pair of f16 codes (codes_h2; 8-bit: a byte permute and a subtraction); 3-bit
 * keys add the high plane's two bits, codes3_h2), B = w = q' * s split into f16 hi +
 * lo parts (two MMAs, ~fp32 products) with the channel order matching A's; 8 query heads
 * per item. Values: A = p * s_v (hi + lo), rows = query heads, B = codes [16 tokens][8
 * channels of one value group] staged through shared memory. Softmax is online per warp.
 */
#define RQ8 8
/* rotated query rows in shared memory, padded so that (d128) lane (gid, tig) reading channel
 * tig*32 + c of row gid hits bank (gid + 8*tig + c) % 32: no conflicts (d64 and d256 use the
 * same padding; their strides are also 1 mod 32) */
#define QR_STRIDE(D) ((D) <= 128 ? 161 : (D) + (D) / 4 + 1) /* = 1 mod 32 */
#define QR_AT(q, c, D) ((q) * QR_STRIDE(D) + (c) + ((c) / 32) * 8)


/* 3-bit keys (two planes, CHUNK_FORMAT.md): the pair (channel j, channel j + 8) of a low-plane
 * word u (codes at bits 2j, 2j + 16) with its high bits from hx (channel j at bit j, j + 8 at
 * bit 16 + j) -> f16x2 of the 3-bit codes, exact (j is a constant once the caller's loop is
 * unrolled, so the shifts are immediates) */
__device__ __forceinline__ uint32_t codes3_h2(uint32_t u, uint32_t hx, int j)
{
	const uint32_t lo = (u >> (2 * j)) & 0x00030003u;
	const uint32_t hb = (j >= 2 ? hx >> (j - 2) : hx << (2 - j)) & 0x00040004u;
	uint32_t x = lo | hb | 0x64006400u;
	__half2 h = __hsub2(*(__half2 *)&x, __half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400)));
	return *(uint32_t *)&h;
}

/* A unit's 32 tokens x N 16-bit quantizer scales and as many zeros (64 N bytes each: the
 * values', and hadamard's keys) into shared memory, asynchronously, in 16-byte pieces over the
 * warp (N 8 at d256 G32: two a lane) */
template <int N>
__device__ __forceinline__ void stage_unit_params(uint8_t *ds, uint8_t *dz, const uint8_t *ss,
						  const uint8_t *sz, int lane)
{
#pragma unroll
	for (int i = lane; i < 8 * N; i += 32) {
		if (i < 4 * N)
			cp_async16(ds + 16 * i, ss + 16 * i);
		else
			cp_async16(dz + 16 * (i - 4 * N), sz + 16 * (i - 4 * N));
	}
}

/* an f16 pair times an f16 pair (hadamard keys: the codes times their token's group scale,
 * exact where attend_coded_mma's HK uses it) */
__device__ __forceinline__ uint32_t h2_mul(uint32_t a, __half2 b)
{
	const __half2 r = __hmul2(*(const __half2 *)&a, b);
	return *(const uint32_t *)&r;
}

/* A key A fragment (a[0], a[2]: token row gid; a[1], a[3]: row gid + 8) times its rows' scale
 * pairs st (row gid) and sb (row gid + 8) of the key groups la (a[0], a[1]) and lb (a[2],
 * a[3]); o may be a, each element reads only its own */
__device__ __forceinline__ void rows_scaled(uint32_t (&o)[4], const uint32_t (&a)[4],
					    const __half2 *st, const __half2 *sb, int la, int lb)
{
	o[0] = h2_mul(a[0], st[la]);
	o[1] = h2_mul(a[1], sb[la]);
	o[2] = h2_mul(a[2], st[lb]);
	o[3] = h2_mul(a[3], sb[lb]);
}

/* The packed kernel's value groups (and hadamard's key groups) of min(G, D) channels: calls
 * f with std::integral_constant<int, GV> for the instantiated widths (d64: 32 or 64) */
template <int D, class F> static cudaError_t with_gv(uint32_t G, F f)
{
	const uint32_t gv = G < D ? G : D;
	if constexpr (D == 64)
		return gv == 32 ? f(std::integral_constant<int, 32>{})
				: f(std::integral_constant<int, 64>{});
	else
		return gv == 32	  ? f(std::integral_constant<int, 32>{})
		       : gv == 64 ? f(std::integral_constant<int, 64>{})
				  : f(std::integral_constant<int, 128>{});
}

/* the key A fragment register of channel pair pa of the lane's quarter row: its words w (the
 * low plane for 3-bit keys) and, for 3-bit keys, their spread high bits hx */
template <int KB>
__device__ __forceinline__ uint32_t key_pair_rt(const uint32_t *w, const uint32_t *hx, int pa)
{
	constexpr int PPW = KB == 3 ? 8 : 16 / KB;
	if constexpr (KB == 3)
		return codes3_h2(w[pa / PPW], hx[pa / PPW], pa % PPW);
	else
		return codes_h2<KB>(w[pa / PPW], (pa % PPW) * KB);
}

/* N (4 or 8) bytes of shared memory at an N-aligned address, as the low bits of a word */
template <int N> __device__ __forceinline__ uint64_t ld_piece(const uint8_t *a)
{
	static_assert(N == 4 || N == 8, "a word or two");
	if constexpr (N == 4)
		return *(const uint32_t *)a;
	else
		return *(const uint64_t *)a;
}

/* HK (session 20): hadamard's per-token key groups (a scale and a zero per token and GV-channel
 * group, laid out like the values'), 0 for the per-channel schemes. B is then the bare q'
 * (hi + lo, built once per item), the scale goes onto the codes, A = code x s_k, and the zero
 * is added per token in fp32 through per-group sums of q'. A stays exact as the per-channel
 * path's: HK 1 (2-bit codes, bf16 scales: 10 significant bits) in one MMA; HK 2 (4-bit codes or
 * f16 scales, up to 15 bits) as code x s_hi + code x s_lo, the scale's top 11 - KB significant
 * bits and the rest, each exact in f16, in two MMAs. Tried first on the H200 (session 20): A =
 * code x s_k rounded to f16 (1.2-2.9e-3 against the 1e-3 bound: the zero term's cancellation
 * amplifies the rounding), and A = f16(code x s_k + z_k), an f16 cache's precision (INT4 in f16
 * sessions up to 2.1e-3). INT2 / INT4 only: an 8-bit code times a scale can pass f16's range
 * under the GPU tier's scale limit (KVT_CUDA_ATTEND_SCALE_MAX). */
template <int D, int KB, int VB, int GV, int NQ, int HK>
__device__ void attend_coded_mma(const att_params &p, const att_item_dev &it, uint32_t u0,
				 uint32_t u1, const float *qr, float *pbuf, float *alpha_s,
				 uint8_t *vst, float *rm, float *rl, float *racc, int lane)
{
	static_assert(D == 64 || D == 128 || D == 256, "head_dim 64, 128 or 256");
	static_assert(KB == VB || (KB == 3 && VB == 2), "equal bits, or 3-bit keys and 2-bit values");
	constexpr int BITS = VB;             /* the value rows' bits (the value path below) */
	constexpr int KL = KB == 3 ? 2 : KB; /* key bits in the (low) plane the fragments read */
	constexpr int NKS = D / 16;          /* k-steps over channels (keys) */
	constexpr int NW = D * KL / 128;     /* 32-bit words of a key row (plane) per lane */
	constexpr int PPW = 16 / KL;         /* channel pairs per word */
	constexpr int CPW = 32 / KL;         /* channels per word */
	constexpr int RBK = D * KB / 8;      /* bytes per key row (3 bits: 2-bit plane + 1-bit) */
	constexpr int RB = D * VB / 8;       /* bytes per value row */
	constexpr int NG = D / GV;           /* value groups */
	constexpr int CT = GV / 8;           /* channels per lane per value group */
	constexpr int NT = D / 8;            /* value n-tiles */
	constexpr int TB = CT * BITS;        /* bits per lane per group per token */
	constexpr int NPC = TB > 64 ? TB / 64 : 1; /* 64-bit pieces of them (8-bit codes, GV 128) */
	constexpr int TBP = TB / NPC;        /* bits per piece */
	constexpr int NSL = TBP > 16 ? TBP / 16 : 1; /* 16-bit slices per piece */
	constexpr int CPS = TB > 16 ? 16 / BITS : CT; /* codes per 16-bit slice */
	const int gid = lane >> 2, tig = lane & 3;
	/* NQ == 4 (packed): at most 4 query heads, so the fragment rows / columns that would hold
	 * heads 4..7 hold the f16 low parts instead: row / column gid of a fragment is head
	 * gid & 3, its high part for gid < 4 and its low part for gid >= 4. One MMA then does
	 * what the hi and lo MMAs did, and the two halves are summed in fp32 afterwards. */
	constexpr bool PK = NQ == 4;
	/* INT8 (packed only): the low parts scaled by 2^11 (split_h2<true>), unscaled when the
	 * halves are summed (without it INT8 batches missed 1e-3: 1.0-1.5e-3; with it 1-3e-6).
	 * For every bit width it would take INT4's worst from ~2e-4 to ~2e-5 but cost the other
	 * packed shapes 4-12% (session 19), so it stays INT8's */
	constexpr bool LOX = PK && BITS == 8;
	static_assert(!HK || (KB == VB && (KB == 2 || KB == 4)), "hadamard keys: INT2 / INT4");
	static_assert(HK != 1 || KB == 2, "one MMA per key tile: exact for 2-bit codes only");
	constexpr bool HKS = HK == 2; /* hadamard keys with the scale split in two */
	constexpr int NGK = D / GV;                        /* hadamard: key groups per token */
	constexpr int NGL = D / 4 > GV ? D / 4 / GV : 1;   /* ... in a lane's quarter row */
	static_assert(BITS != 8 || PK, "INT8 takes the packed form (<= 4 query heads per item)");
	const int hq = PK ? (gid & 3) : gid; /* the query head of fragment row / column gid */
	const bool lo_half = PK && gid >= 4;
	const int sq = PK ? (tig & 1) : tig; /* logits: this lane's heads are 2sq, 2sq + 1 */
	const bool sq_owner = !PK || tig < 2;
	const uint32_t upc = p.B / 32, h = it.kv_head;
	const bool bf = p.sbf, oscar = p.scheme == KVT_SCHEME_OSCAR;

	float m2[2] = {-INFINITY, -INFINITY}, l2[2] = {0.0f, 0.0f};
	float vacc[NT][2], vz0 = 0.0f, vz1 = 0.0f;
	float zacc[NG];
#pragma unroll
	for (int n = 0; n < NT; n++)
		vacc[n][0] = vacc[n][1] = 0.0f;
#pragma unroll
	for (int g = 0; g < NG; g++)
		zacc[g] = 0.0f;
	uint32_t bkh[NKS][2], bkl[PK ? 1 : NKS][2];
	float biasA = 0.0f, biasB = 0.0f;
	uint32_t cached = 0xffffffffu;
	/* B fragment pair pr of the keys: w0, w1 (q' times the key scale, or q' alone for
	 * hadamard) as f16 hi + lo: in rows gid < 4 / gid >= 4 packed, else bkh and bkl */
	auto key_b_pair = [&](int pr, float w0, float w1) {
		if constexpr (PK) {
			uint32_t hi2, lo2;
			split_h2<LOX>(w0, w1, hi2, lo2);
			bkh[pr / 2][pr % 2] = lo_half ? lo2 : hi2;
		} else {
			split_h2(w0, w1, bkh[pr / 2][pr % 2], bkl[pr / 2][pr % 2]);
		}
	};
	/* hadamard: the sums of q' over each key group for this lane's heads 2sq, 2sq + 1 */
	float qz[2][HK ? NGK : 1];
	if constexpr (HK != 0) {
		/* channels g GV + gid + 8 i per lane, then across the 8 gids */
#pragma unroll
		for (int j = 0; j < 2; j++) {
#pragma unroll
			for (int gg = 0; gg < NGK; gg++) {
				float sum = 0.0f;
#pragma unroll
				for (int i = 0; i < GV / 8; i++)
					sum += qr[QR_AT(2 * sq + j, gg * GV + gid + 8 * i, D)];
				sum += __shfl_xor_sync(KVT_FULL_MASK, sum, 4);
				sum += __shfl_xor_sync(KVT_FULL_MASK, sum, 8);
				sum += __shfl_xor_sync(KVT_FULL_MASK, sum, 16);
				qz[j][gg] = sum;
			}
		}
		/* B = q' (no scale), once, with the same hi / lo split as w = q' * s */
#pragma unroll
		for (int pr = 0; pr < D / 8; pr++) {
			const int c0 = (pr / PPW) * CPW + (pr % PPW), c1 = c0 + PPW;
			key_b_pair(pr, qr[QR_AT(hq, tig * (D / 4) + c0, D)],
				   qr[QR_AT(hq, tig * (D / 4) + c1, D)]);
		}
	}
	uint8_t *vsS = vst + 32 * RB, *vzS = vsS + 64 * NG; /* staged value scales, zeros */
	uint8_t *ksS = vzS + 64 * NG, *kzS = ksS + 2 * D;   /* staged key scales, zeros */
	att_chunk_dev ch_next;
	if (u0 < u1)
		ch_next = p.chunks[it.first + u0 / upc];

	for (uint32_t u = u0; u < u1; u++) {
		const uint32_t ci = it.first + u / upc, sb = u % upc;
		const att_chunk_dev ch = ch_next;
		if (u + 1 < u1)
			ch_next = p.chunks[it.first + (u + 1) / upc]; /* prefetch */
		const uint8_t *sec = ch.sec;
		const uint32_t g = (sb * 32) / p.G;
		const bool new_group = !HK && ci * 64 + g != cached;

		/* every load of the unit is issued here, before any of them is used: one memory
		 * round trip per unit. Keys to registers ... */
		uint32_t r0[2][NW], r1[2][NW];
		/* 3-bit keys: the high bits of the words' channels, spread (channel j of word w at
		 * bit j, j + 8 at bit 16 + j: where codes3_h2 wants them) */
		uint32_t x0[2][KB == 3 ? NW : 1], x1[2][KB == 3 ? NW : 1];
		float nrm[2][2];
		const uint8_t *kc = sec + p.k_codes_off + (size_t)h * p.B * RBK + tig * (D * KL / 32);
#pragma unroll
		for (int mt = 0; mt < 2; mt++) {
			const uint32_t t0 = sb * 32 + mt * 16 + gid, t1 = t0 + 8;
			if constexpr (NW == 1) {
				r0[mt][0] = *(const uint32_t *)(kc + (size_t)t0 * RBK);
				r1[mt][0] = *(const uint32_t *)(kc + (size_t)t1 * RBK);
			} else if constexpr (NW == 2) {
				uint2 a = *(const uint2 *)(kc + (size_t)t0 * RBK), b = *(const uint2 *)(kc + (size_t)t1 * RBK);
				r0[mt][0] = a.x; r0[mt][1] = a.y; r1[mt][0] = b.x; r1[mt][1] = b.y;
			} else {
#pragma unroll
				for (int v = 0; v < NW / 4; v++) { /* NW 4, or 8 for INT4 at d256 */
					uint4 a = *(const uint4 *)(kc + (size_t)t0 * RBK + 16 * v),
					      b = *(const uint4 *)(kc + (size_t)t1 * RBK + 16 * v);
					r0[mt][4 * v] = a.x; r0[mt][4 * v + 1] = a.y; r0[mt][4 * v + 2] = a.z; r0[mt][4 * v + 3] = a.w;
					r1[mt][4 * v] = b.x; r1[mt][4 * v + 1] = b.y; r1[mt][4 * v + 2] = b.z; r1[mt][4 * v + 3] = b.w;
				}
			}
			if constexpr (KB == 3) {
				/* the high plane: byte D/4 + c/8 of the row; this lane's D/32 bytes */
				const uint8_t *hc = kc - tig * (D * KL / 32) + D / 4 + tig * (D / 32);
				uint64_t h0, h1; /* D/32 bytes: 2, 4 or 8 */
				if constexpr (D == 64) {
					h0 = *(const uint16_t *)(hc + (size_t)t0 * RBK);
					h1 = *(const uint16_t *)(hc + (size_t)t1 * RBK);
				} else if constexpr (D == 128) {
					h0 = *(const uint32_t *)(hc + (size_t)t0 * RBK);
					h1 = *(const uint32_t *)(hc + (size_t)t1 * RBK);
				} else {
					h0 = *(const uint64_t *)(hc + (size_t)t0 * RBK);
					h1 = *(const uint64_t *)(hc + (size_t)t1 * RBK);
				}
#pragma unroll
				for (int w = 0; w < NW; w++) {
					const uint32_t a = (uint32_t)(h0 >> (16 * w)) & 0xffffu,
						       b = (uint32_t)(h1 >> (16 * w)) & 0xffffu;
					x0[mt][w] = (a & 0xffu) | ((a & 0xff00u) << 8);
					x1[mt][w] = (b & 0xffu) | ((b & 0xff00u) << 8);
				}
			}
			nrm[mt][0] = oscar ? ((const float *)(sec + p.norms_off))[t0] : 1.0f;
			nrm[mt][1] = oscar ? ((const float *)(sec + p.norms_off))[t1] : 1.0f;
		}
		if (new_group) {
			/* the key group's D scales and D zeros (2 x 2D bytes) in 16-byte pieces: D/8
			 * of each (d64: lanes 0-15 copy one; d256: every lane two) */
			constexpr int KP = D / 8;
			const size_t ko = ((size_t)h * (p.B / p.G) + g) * D * 2;
#pragma unroll
			for (int i = lane; i < 2 * KP; i += 32) {
				if (i < KP)
					cp_async16(ksS + 16 * i, sec + p.k_scale_off + ko + 16 * i);
				else
					cp_async16(kzS + 16 * (i - KP), sec + p.k_zero_off + ko + 16 * (i - KP));
			}
		}
		if constexpr (HK != 0) {
			/* hadamard: the unit's 32 x NGK key scales and zeros, laid out like the
			 * values' (64 NGK bytes each: at most the 2D the per-channel ones take) */
			const size_t ko = ((size_t)h * p.B + sb * 32) * NGK * 2;
			stage_unit_params<NGK>(ksS, kzS, sec + p.k_scale_off + ko, sec + p.k_zero_off + ko,
					       lane);
		}
		/* ... values, their scales and zeros to shared memory, asynchronously */
		{
			const uint8_t *src = sec + p.v_codes_off + ((size_t)h * p.B + sb * 32) * RB;
#pragma unroll
			for (int i = 0; i < 32 * RB / 16 / 32; i++)
				cp_async16(vst + 16 * (lane + 32 * i), src + 16 * (lane + 32 * i));
			const size_t so = ((size_t)h * p.B + sb * 32) * NG * 2;
			stage_unit_params<NG>(vsS, vzS, sec + p.v_scale_off + so, sec + p.v_zero_off + so,
					      lane);
		}

		if (new_group) {
			cached = ci * 64 + g;
			cp_async_wait_all();
			__syncwarp();
			/* w = q' * s for query head gid over this lane's quarter of the channels */
			/* this lane's quarter of row hq (QR_AT per channel: a d256 quarter crosses the
			 * padding every 32 channels) */
			auto qrow = [&](int c) -> float { return qr[QR_AT(hq, tig * (D / 4) + c, D)]; };
			const uint16_t *kss = (const uint16_t *)ksS + tig * (D / 4);
			const uint16_t *kzs = (const uint16_t *)kzS + tig * (D / 4);
			float bias = 0.0f;
#pragma unroll
			for (int pr = 0; pr < D / 8; pr++) {
				const int c0 = (pr / PPW) * CPW + (pr % PPW), c1 = c0 + PPW;
				float s0 = kvt_d_widen16(kss[c0], bf), s1 = kvt_d_widen16(kss[c1], bf);
				float z0 = kvt_d_widen16(kzs[c0], bf), z1 = kvt_d_widen16(kzs[c1], bf);
				key_b_pair(pr, qrow(c0) * s0, qrow(c1) * s1);
				bias = fmaf(qrow(c0), z0, fmaf(qrow(c1), z1, bias));
			}
			bias += __shfl_xor_sync(KVT_FULL_MASK, bias, 1);
			bias += __shfl_xor_sync(KVT_FULL_MASK, bias, 2);
			biasA = __shfl_sync(KVT_FULL_MASK, bias, (2 * sq) * 4);
			biasB = __shfl_sync(KVT_FULL_MASK, bias, (2 * sq + 1) * 4);
		}

		/* keys: two 16-token tiles; lg[mt][0..3] = (tok gid, q 2tig), (gid, 2tig+1),
		 * (gid+8, 2tig), (gid+8, 2tig+1) */
		float lg[2][4];
		if constexpr (HK != 0) {
			cp_async_wait_all(); /* the unit's key scales and zeros */
			__syncwarp();
		}
#pragma unroll
		for (int mt = 0; mt < 2; mt++) {
			const uint32_t t0 = sb * 32 + mt * 16 + gid, t1 = t0 + 8;
			float sacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
			/* hadamard: rows t0 / t1's scales of the lane's key groups as f16 pairs (HK 2:
			 * their top 11 - KB significant bits, and the rest), and the rows' zero terms
			 * for heads 2sq, 2sq + 1 */
			__half2 sk0[NGL], sk1[NGL], sl0[HKS ? NGL : 1], sl1[HKS ? NGL : 1];
			float bz0[2] = {0.0f, 0.0f}, bz1[2] = {0.0f, 0.0f};
			if constexpr (HK != 0) {
				const uint16_t *kss = (const uint16_t *)ksS, *kzs = (const uint16_t *)kzS;
				const int ra = (mt * 16 + gid) * NGK, rb = ra + 8 * NGK;
#pragma unroll
				for (int l = 0; l < NGL; l++) {
					const int gk = tig * (D / 4) / GV + l;
					const __half s0 = __float2half_rn(kvt_d_widen16(kss[ra + gk], bf)),
						     s1 = __float2half_rn(kvt_d_widen16(kss[rb + gk], bf));
					if constexpr (HKS) {
						/* clearing the low KB of the 10 mantissa bits leaves
						 * 11 - KB significant bits; the difference is exact */
						constexpr unsigned short LM = (unsigned short)~((1u << KB) - 1u);
						const __half h0 = __ushort_as_half(__half_as_ushort(s0) & LM),
							     h1 = __ushort_as_half(__half_as_ushort(s1) & LM);
						sk0[l] = __half2half2(h0);
						sk1[l] = __half2half2(h1);
						sl0[l] = __half2half2(__hsub(s0, h0));
						sl1[l] = __half2half2(__hsub(s1, h1));
					} else {
						sk0[l] = __half2half2(s0);
						sk1[l] = __half2half2(s1);
					}
				}
#pragma unroll
				for (int gk = 0; gk < NGK; gk++) {
					const float za = kvt_d_widen16(kzs[ra + gk], bf),
						    zb = kvt_d_widen16(kzs[rb + gk], bf);
#pragma unroll
					for (int j = 0; j < 2; j++) {
						bz0[j] = fmaf(za, qz[j][gk], bz0[j]);
						bz1[j] = fmaf(zb, qz[j][gk], bz1[j]);
					}
				}
			}
#pragma unroll
			for (int k = 0; k < NKS; k++) {
				const int pa = 2 * k, pb = 2 * k + 1;
				uint32_t a[4];
				a[0] = key_pair_rt<KB>(r0[mt], x0[mt], pa);
				a[1] = key_pair_rt<KB>(r1[mt], x1[mt], pa);
				a[2] = key_pair_rt<KB>(r0[mt], x0[mt], pb);
				a[3] = key_pair_rt<KB>(r1[mt], x1[mt], pb);
				if constexpr (HK != 0) {
					/* the pairs' word's key group (a word never spans two) */
					const int la = (pa / PPW) * CPW / GV, lb = (pb / PPW) * CPW / GV;
					if constexpr (HKS) {
						uint32_t al[4]; /* the scales' low parts first */
						rows_scaled(al, a, sl0, sl1, la, lb);
						mma16816(sacc, al, bkh[k][0], bkh[k][1]);
						if constexpr (!PK)
							mma16816(sacc, al, bkl[k][0], bkl[k][1]);
					}
					rows_scaled(a, a, sk0, sk1, la, lb);
				}
				mma16816(sacc, a, bkh[k][0], bkh[k][1]);
				if constexpr (!PK)
					mma16816(sacc, a, bkl[k][0], bkl[k][1]);
			}
			if constexpr (LOX) {
				/* the same, the lo part (lanes tig >= 2) times 2^-11 */
				const float own = tig >= 2 ? KVT_LO_UNSCALE : 1.0f,
					    oth = tig >= 2 ? 1.0f : KVT_LO_UNSCALE;
#pragma unroll
				for (int i = 0; i < 4; i++)
					sacc[i] = fmaf(__shfl_xor_sync(KVT_FULL_MASK, sacc[i], 2), oth,
						       sacc[i] * own);
			} else if constexpr (PK) {
				/* columns 2tig, 2tig+1 of lanes tig and tig ^ 2 are the hi and lo parts of
				 * the same two heads */
#pragma unroll
				for (int i = 0; i < 4; i++)
					sacc[i] += __shfl_xor_sync(KVT_FULL_MASK, sacc[i], 2);
			}
			bool pin0 = false, pin1 = false;
			for (uint32_t i = 0; i < ch.n_pinned; i++) {
				uint32_t pt = ch.pins[i];
				pin0 |= pt == t0;
				pin1 |= pt == t1;
			}
			if constexpr (HK != 0) {
				lg[mt][0] = pin0 ? -INFINITY : sacc[0] + bz0[0];
				lg[mt][1] = pin0 ? -INFINITY : sacc[1] + bz0[1];
				lg[mt][2] = pin1 ? -INFINITY : sacc[2] + bz1[0];
				lg[mt][3] = pin1 ? -INFINITY : sacc[3] + bz1[1];
			} else {
				const float n0 = nrm[mt][0], n1 = nrm[mt][1];
				lg[mt][0] = pin0 ? -INFINITY : n0 * (sacc[0] + biasA);
				lg[mt][1] = pin0 ? -INFINITY : n0 * (sacc[1] + biasB);
				lg[mt][2] = pin1 ? -INFINITY : n1 * (sacc[2] + biasA);
				lg[mt][3] = pin1 ? -INFINITY : n1 * (sacc[3] + biasB);
			}
		}

		/* online softmax for query heads 2tig, 2tig+1 over the unit's 32 tokens */
#pragma unroll
		for (int qi = 0; qi < 2; qi++) {
			float mx = fmaxf(fmaxf(lg[0][qi], lg[0][qi + 2]), fmaxf(lg[1][qi], lg[1][qi + 2]));
			mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 4));
			mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 8));
			mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 16));
			float mn = fmaxf(m2[qi], mx), alpha = 1.0f;
			float pv[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
			if (mn != -INFINITY) {
				alpha = __expf(m2[qi] - mn);
#pragma unroll
				for (int mt = 0; mt < 2; mt++) {
					pv[mt][0] = lg[mt][qi] == -INFINITY ? 0.0f : __expf(lg[mt][qi] - mn);
					pv[mt][1] = lg[mt][qi + 2] == -INFINITY ? 0.0f : __expf(lg[mt][qi + 2] - mn);
				}
				l2[qi] = l2[qi] * alpha + pv[0][0] + pv[0][1] + pv[1][0] + pv[1][1];
				m2[qi] = mn;
			}
			const int q = 2 * sq + qi;
			if (gid == 0 && sq_owner)
				alpha_s[q] = alpha;
			if (sq_owner) {
#pragma unroll
				for (int mt = 0; mt < 2; mt++) {
					pbuf[q * 32 + mt * 16 + gid] = pv[mt][0];
					pbuf[q * 32 + mt * 16 + gid + 8] = pv[mt][1];
				}
			}
		}
		__syncwarp();

		/* values: O[q = gid][c] += sum_t (p * s_v)[q][t] * code[t][c] + p * z_v */
		cp_async_wait_all();
		__syncwarp();
		const float al = alpha_s[hq];
#pragma unroll
		for (int n = 0; n < NT; n++) {
			vacc[n][0] *= al;
			vacc[n][1] *= al;
		}
#pragma unroll
		for (int gg = 0; gg < NG; gg++)
			zacc[gg] *= al;
		const uint16_t *vs = (const uint16_t *)vsS, *vz = (const uint16_t *)vzS;
#pragma unroll
		for (int kk = 0; kk < 2; kk++) {
			const int ta = kk * 16 + 2 * tig, tb = ta + 1, tc = ta + 8, td = ta + 9;
			const float pa = pbuf[hq * 32 + ta], pb = pbuf[hq * 32 + tb];
			const float pc = pbuf[hq * 32 + tc], pd = pbuf[hq * 32 + td];
#pragma unroll
			for (int gg = 0; gg < NG; gg++) {
				float sa = kvt_d_widen16(vs[ta * NG + gg], bf), sb_ = kvt_d_widen16(vs[tb * NG + gg], bf);
				float sc = kvt_d_widen16(vs[tc * NG + gg], bf), sd = kvt_d_widen16(vs[td * NG + gg], bf);
				float za = kvt_d_widen16(vz[ta * NG + gg], bf), zb = kvt_d_widen16(vz[tb * NG + gg], bf);
				float zc = kvt_d_widen16(vz[tc * NG + gg], bf), zd = kvt_d_widen16(vz[td * NG + gg], bf);
				zacc[gg] = fmaf(pa, za, fmaf(pb, zb, fmaf(pc, zc, fmaf(pd, zd, zacc[gg]))));
				uint32_t ah[4], alo[4];
				split_h2<LOX>(pa * sa, pb * sb_, ah[0], alo[0]);
				split_h2<LOX>(pc * sc, pd * sd, ah[2], alo[2]);
				ah[1] = ah[3] = alo[1] = alo[3] = 0u;
				if constexpr (PK) {
					ah[0] = lo_half ? alo[0] : ah[0];
					ah[2] = lo_half ? alo[2] : ah[2];
				}
				/* this lane's CT channels of group gg for the four tokens, in pieces of
				 * up to 64 bits (8-bit codes at GV 128: two) */
				const int boff = (gg * GV + gid * CT) * BITS / 8;
#pragma unroll
				for (int pc = 0; pc < NPC; pc++) {
					uint64_t ca = 0, cb = 0, cc = 0, cd = 0;
					if constexpr (BITS == 8) {
						/* whole words: boff is a multiple of the piece (TB / 8
						 * bytes, at most 8), and so are the rows (RB = D) */
						const int o = boff + 8 * pc;
						ca = ld_piece<TBP / 8>(vst + ta * RB + o);
						cb = ld_piece<TBP / 8>(vst + tb * RB + o);
						cc = ld_piece<TBP / 8>(vst + tc * RB + o);
						cd = ld_piece<TBP / 8>(vst + td * RB + o);
					} else {
#pragma unroll
						for (int i = 0; i < TB / 8; i++) {
							ca |= (uint64_t)vst[ta * RB + boff + i] << (8 * i);
							cb |= (uint64_t)vst[tb * RB + boff + i] << (8 * i);
							cc |= (uint64_t)vst[tc * RB + boff + i] << (8 * i);
							cd |= (uint64_t)vst[td * RB + boff + i] << (8 * i);
						}
					}
#pragma unroll
					for (int sl = 0; sl < NSL; sl++) {
						uint32_t uab = (uint32_t)((ca >> (16 * sl)) & 0xffff) | ((uint32_t)((cb >> (16 * sl)) & 0xffff) << 16);
						uint32_t ucd = (uint32_t)((cc >> (16 * sl)) & 0xffff) | ((uint32_t)((cd >> (16 * sl)) & 0xffff) << 16);
#pragma unroll
						for (int j = 0; j < CPS; j++) {
							const int nt = gg * CT + (pc * NSL + sl) * CPS + j;
							uint32_t b0 = codes_h2<BITS>(uab, j * BITS);
							uint32_t b1 = codes_h2<BITS>(ucd, j * BITS);
							mma16816_top(vacc[nt][0], vacc[nt][1], vz0, vz1, ah, b0, b1);
							if constexpr (!PK)
								mma16816_top(vacc[nt][0], vacc[nt][1], vz0, vz1, alo, b0, b1);
						}
					}
				}
			}
		}
		__syncwarp();
	}

	/* the warp's partial in the lane-per-channel reduction layout: q = gid */
#pragma unroll
	for (int gg = 0; gg < NG; gg++) {
		zacc[gg] += __shfl_xor_sync(KVT_FULL_MASK, zacc[gg], 1);
		zacc[gg] += __shfl_xor_sync(KVT_FULL_MASK, zacc[gg], 2);
	}
	if constexpr (PK) {
		/* rows gid and gid + 4 (lane ^ 16) are the hi and lo parts of head gid & 3 (LOX:
		 * the lo part times 2^-11) */
		const float own = LOX && gid >= 4 ? KVT_LO_UNSCALE : 1.0f,
			    oth = LOX && gid < 4 ? KVT_LO_UNSCALE : 1.0f;
#pragma unroll
		for (int n = 0; n < NT; n++) {
			const float x0 = __shfl_xor_sync(KVT_FULL_MASK, vacc[n][0], 16),
				    x1 = __shfl_xor_sync(KVT_FULL_MASK, vacc[n][1], 16);
			if constexpr (LOX) {
				vacc[n][0] = fmaf(x0, oth, vacc[n][0] * own);
				vacc[n][1] = fmaf(x1, oth, vacc[n][1] * own);
			} else {
				vacc[n][0] += x0;
				vacc[n][1] += x1;
			}
		}
	}
	if (!PK || gid < 4) {
#pragma unroll
		for (int n = 0; n < NT; n++) {
			const int gg = n / CT, j = n % CT;
			const int c0 = gg * GV + (2 * tig) * CT + j, c1 = gg * GV + (2 * tig + 1) * CT + j;
			racc[gid * D + c0] = vacc[n][0] + zacc[gg];
			racc[gid * D + c1] = vacc[n][1] + zacc[gg];
		}
	}
#pragma unroll
	for (int qi = 0; qi < 2; qi++) {
		float l = l2[qi];
		l += __shfl_xor_sync(KVT_FULL_MASK, l, 4);
		l += __shfl_xor_sync(KVT_FULL_MASK, l, 8);
		l += __shfl_xor_sync(KVT_FULL_MASK, l, 16);
		if (gid == 0 && sq_owner) {
			rm[2 * sq + qi] = m2[qi];
			rl[2 * sq + qi] = l;
		}
	}
}

/* The packed kernel's shared memory, dynamic (d256 needs more than the 48 KB a static
 * allocation may have): float arrays, then per warp the staged value codes [32][RB], value
 * scales and zeros [32][D/GV] each and the key group's scales and zeros [D] each. */
template <int D, int VB, int GV, int NQ> struct mma_smem {
	static constexpr int QO = 0, QR = QO + NQ * D, PB = QR + NQ * QR_STRIDE(D),
			     AL = PB + ATT_WARPS * 32 * NQ, RM = AL + ATT_WARPS * NQ,
			     RL = RM + ATT_WARPS * NQ, RA = RL + ATT_WARPS * NQ,
			     FLOATS = (RA + ATT_WARPS * NQ * D + 3) & ~3; /* 16-byte aligned end */
	static constexpr int VST = 32 * (D * VB / 8) + 128 * (D / GV) + 4 * D; /* per warp */
	static constexpr int BYTES = FLOATS * 4 + ATT_WARPS * VST;
	/* blocks per multiprocessor the kernel is compiled for: d256 2 (its registers); d128
	 * INT8 3 (H200, session 19: 98 / 166 us at 1 x 131072 / 48 x 4096, 4 blocks 132 / 206;
	 * d128 INT4 stays at 4: 3 blocks were 103.5 / 173 us vs 101.5 / 161) */
	static constexpr int MINB = D == 256 ? 2 : D == 128 && VB == 8 ? 3 : 4;
};

template <int D, int KB, int VB, int GV, int NQ, int HK = 0>
__global__ void __launch_bounds__(ATT_THREADS, (mma_smem<D, VB, GV, NQ>::MINB))
	attend_mma_kernel(att_params p)
{
	constexpr int EPL = D / 32;
	using L = mma_smem<D, VB, GV, NQ>;
	static_assert(L::VST % 16 == 0, "16-byte staging pieces");
	extern __shared__ __align__(16) float mma_sm[];
	float *qo = mma_sm + L::QO, *qr = mma_sm + L::QR;
	float(*pbuf)[32 * NQ] = (float(*)[32 * NQ])(mma_sm + L::PB);
	float(*alpha_s)[NQ] = (float(*)[NQ])(mma_sm + L::AL);
	float(*red_m)[NQ] = (float(*)[NQ])(mma_sm + L::RM);
	float(*red_l)[NQ] = (float(*)[NQ])(mma_sm + L::RL);
	float(*red_acc)[NQ * D] = (float(*)[NQ * D])(mma_sm + L::RA);
	uint8_t(*vst)[L::VST] = (uint8_t(*)[L::VST])(mma_sm + L::FLOATS);

	const att_item_dev it = p.items[blockIdx.x];
	const att_req_dev rq = p.reqs[it.req];
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	att_load_queries<D, NQ>(
		p, it, rq, [&](int q, int c) -> float & { return qo[q * D + c]; },
		[&](int q, int c) -> float & { return qr[QR_AT(q, c, D)]; });
	__syncthreads();

	if (it.kind == ITEM_CODED) {
		uint32_t units = it.count * (p.B / 32);
		uint32_t per = (units + ATT_WARPS - 1) / ATT_WARPS;
		uint32_t u0 = min(units, warp * per), u1 = min(units, u0 + per);
		attend_coded_mma<D, KB, VB, GV, NQ, HK>(p, it, u0, u1, qr, pbuf[warp], alpha_s[warp], vst[warp],
					   red_m[warp], red_l[warp], red_acc[warp], lane);
	} else {
		warp_state<EPL, NQ> st;
		state_init<EPL, NQ>(st);
		uint32_t per = (it.count + ATT_WARPS - 1) / ATT_WARPS;
		uint32_t t0 = min(it.count, warp * per), t1 = min(it.count, t0 + per);
		size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
		size_t stride = (size_t)p.H * D, off = ((size_t)t0 * stride + (size_t)it.kv_head * D) * ws;
		attend_rows<D, NQ>(p, st, it.xk + off, it.xv + off, t1 - t0, stride, qo, pbuf[warp], lane);
		state_store<D, NQ>(st, red_m[warp], red_l[warp], red_acc[warp], lane);
	}
	block_merge<D, NQ>(p, &red_m[0][0], &red_l[0][0], &red_acc[0][0]);
}

/* One launch of the packed kernel (no combine), with its dynamic shared memory: above 48 KB
 * the kernel must be allowed it first, once per instantiation and device (the attribute
 * belongs to the kernel's module in one device's context, so a process attending on two GPUs
 * sets it on each; devices past 63 every launch; a repeat from a racing thread is harmless) */
template <int D, int KB, int VB, int GV, int NQ, int HK>
static cudaError_t mma_kernel_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	constexpr int bytes = mma_smem<D, VB, GV, NQ>::BYTES;
	cudaError_t e;
	if constexpr (bytes > 48 * 1024) {
		static unsigned long long allowed;
		int dev = 0;
		if ((e = cudaGetDevice(&dev)) != cudaSuccess)
			return e;
		const unsigned long long bit = dev >= 0 && dev < 64 ? 1ull << dev : 0;
		if (!bit || !(__atomic_load_n(&allowed, __ATOMIC_ACQUIRE) & bit)) {
			e = cudaFuncSetAttribute(attend_mma_kernel<D, KB, VB, GV, NQ, HK>,
						 cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
			if (e != cudaSuccess)
				return e;
			__atomic_fetch_or(&allowed, bit, __ATOMIC_RELEASE);
		}
	}
	attend_mma_kernel<D, KB, VB, GV, NQ, HK><<<pl->n_items, ATT_THREADS, bytes, s>>>(pl->p);
	return cudaGetLastError();
}

#endif

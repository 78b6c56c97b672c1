/*
 * kvt_cuda_attend_i2.cu - the INT2 tensor-core decode-attention kernel (oscar/kivi INT2, or
 * 3-bit keys with 2-bit values, bf16 or (since session 21, swapped loop) f16 scales, head_dim
 * 128, 4 query heads per item: a KV head with more is cut into groups of 4), in its own
 * translation unit so that the other attention kernels compile as they did before it existed.
 */
#include <stdlib.h>

#include <type_traits>

#include "kvt_cuda_attend.cuh"


/* ---- INT2 tensor-core path with the scales on the code side (oscar/kivi INT2, bf16 scales,
 * head_dim 128, at most 4 query heads per KV head) -------------------------------------------
 *
 * Why a second kernel: in attend_mma_kernel the key scale sits in the query-side fragment
 * (w = q' * s), rebuilt for every 32-token key group, and the value scale in the p-side
 * fragment (p * s_v), rebuilt per (16 tokens, value group): ~1,100 of its ~2,200 warp
 * instructions per 32-token unit. Here the scales go to the code side instead, where they
 * cost one HFMA2 per pair of codes and are exact: a 2-bit code times a bf16 scale (8-bit
 * significand) fits f16's 11 bits, so -code * s / 4 = fma(-(1 + code/4), s, s) rounds
 * nothing (the -(1 + code/4) comes from one shift and one and-or with 0xBC00). The query-side fragment
 * is then q' itself (f16 hi + lo, built once per item) and the p-side fragment p (hi + lo,
 * built once per unit). (Session 2's form of it, keys A = code * s_k / 4, B = q', p through
 * shared memory, was `KVTIER_CUDA_I2_VARIANT=1` until session 5; the keys-as-B form below
 * replaced it: docs/gpu.md.)
 * Every byte of a unit (codes, norms, scales, zeros) is staged into shared memory by
 * cp.async one unit ahead (double buffer per warp), so loads overlap the previous unit's
 * arithmetic.
 * f16 sessions (F16, session 21): an f16 scale has 11 significant bits, so code * s would
 * round; it is split into s_hi (its top 8 bits: the low 3 of the significand masked off) and
 * s_lo = s - s_hi (3 bits, an exact f16 difference), and each code pair's x = -(1 + code *
 * 2^(SP - 10)) is scaled by both (two HFMA2, both exact: 2- or 3-bit codes times 8 or 3
 * bits) into two A fragments, one MMA each against the same B. The key scales' low parts
 * sit in the word area the swapped loop leaves free (its zeros live in afr), the value
 * scales are split where the value step reads them. H200: INT2 G32 52.9-53.8 us at
 * 1 x 131072 against 102.5-103.2 on the packed kernel before (docs/gpu.md "Session 21"). */
#define I2_KC 0
#define I2_VC 1024
#define I2_NR 2048
#define I2_KS 2176
#define I2_KZ 2432
#define I2_VS 2688
/* value zeros at I2_VS + 64 * NG: every piece after the codes lies at I2_NR + 16 * piece */
#define I2_BUF 3200 /* one unit's bytes (at 4 value groups) */

__device__ __forceinline__ void cp_async_commit(void)
{
	asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_wait1(void)
{
	asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

/* A warp's value partial in the reduction layout racc[head][channel]: the lanes holding the
 * two halves of each column pair add theirs (xor 2), the
 * value-zero term goes through zsm to the lanes that own the channels, and vacc, which holds
 * -sum p * code * s / 4 (the sign i3_deq gives the codes), becomes
 * sum p * (code * s + z). D 128; vg is the value group of this lane's channels. */
template <int NG>
__device__ __forceinline__ void i2_store_partial(float (&vacc)[8][4], float (&zacc)[2], float *zsm,
						 float *racc, int gid, int tig, int vg)
{
	constexpr int D = 128;
#pragma unroll
	for (int i = 0; i < 8; i++)
#pragma unroll
		for (int j = 0; j < 4; j++)
			vacc[i][j] += __shfl_xor_sync(KVT_FULL_MASK, vacc[i][j], 2);
	zacc[0] += __shfl_xor_sync(KVT_FULL_MASK, zacc[0], 2);
	zacc[1] += __shfl_xor_sync(KVT_FULL_MASK, zacc[1], 2);
	if (gid < NG && tig < 2) {
		zsm[(2 * tig) * 4 + gid] = zacc[0];
		zsm[(2 * tig + 1) * 4 + gid] = zacc[1];
	}
	__syncwarp();
	if (tig < 2) {
		const float za = zsm[(2 * tig) * 4 + vg], zb = zsm[(2 * tig + 1) * 4 + vg];
		float *oa = racc + (2 * tig) * D + 16 * gid, *ob = oa + D;
#pragma unroll
		for (int i = 0; i < 8; i++) {
			oa[i] = fmaf(-4.0f, vacc[i][0], za);
			ob[i] = fmaf(-4.0f, vacc[i][1], zb);
			oa[i + 8] = fmaf(-4.0f, vacc[i][2], za);
			ob[i + 8] = fmaf(-4.0f, vacc[i][3], zb);
		}
	}
}

/* The combine step inside the block that finished a group's last item: warp w merges items
 * w, w + ATT_WARPS, ... for every query head with a running maximum (no load waits on
 * another), the warps meet in shared memory (sm: RQ * ATT_WARPS * (2 + 2 D) floats) and
 * warp q finalises head q: rotation back, normalisation, store. Partials written by other
 * blocks are read through L2 (ld.cg). */
template <int D>
__device__ void combine_group_in_block(const att_params &p, uint32_t gi, float *sm)
{
	constexpr int EPL = D / 32, N = RQ;
	const att_group_dev g = p.groups[gi];
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	float *s_ml = sm, *s_rot = sm + N * ATT_WARPS * 2, *s_ex = s_rot + N * ATT_WARPS * D;
	float Mw[N], L[N], rot[N][EPL], ex[N][EPL];
#pragma unroll
	for (int q = 0; q < N; q++) {
		Mw[q] = -INFINITY;
		L[q] = 0.0f;
#pragma unroll
		for (int e = 0; e < EPL; e++)
			rot[q][e] = ex[q][e] = 0.0f;
	}
#pragma unroll 2
	for (uint32_t i = g.item_begin + w; i < g.item_end; i += ATT_WARPS) {
		const bool ro = i < g.exact_begin && p.rotv;
#pragma unroll
		for (int q = 0; q < N; q++) {
			const float2 ml = __ldcg((const float2 *)(p.part_ml + ((size_t)i * N + q) * 2));
			const float4 av = __ldcg((const float4 *)(p.part_acc + ((size_t)i * N + q) * D + lane * EPL));
			const float a4[4] = {av.x, av.y, av.z, av.w};
			const float Mn = fmaxf(Mw[q], ml.x);
			const float fo = Mw[q] == Mn ? 1.0f : __expf(Mw[q] - Mn);
			const float f = ml.x == -INFINITY ? 0.0f : __expf(ml.x - Mn);
			Mw[q] = Mn;
			L[q] = fmaf(ml.y, f, L[q] * fo);
			const float fr = ro ? f : 0.0f, fe = f - fr;
#pragma unroll
			for (int e = 0; e < EPL; e++) {
				rot[q][e] = fmaf(a4[e], fr, rot[q][e] * fo);
				ex[q][e] = fmaf(a4[e], fe, ex[q][e] * fo);
			}
		}
	}
#pragma unroll
	for (int q = 0; q < N; q++) {
		if (lane == 0) {
			s_ml[(q * ATT_WARPS + w) * 2] = Mw[q];
			s_ml[(q * ATT_WARPS + w) * 2 + 1] = L[q];
		}
#pragma unroll
		for (int e = 0; e < EPL; e++) {
			s_rot[(q * ATT_WARPS + w) * D + lane * EPL + e] = rot[q][e];
			s_ex[(q * ATT_WARPS + w) * D + lane * EPL + e] = ex[q][e];
		}
	}
	__syncthreads();
	const int q = w;
	if ((uint32_t)q >= g.nq)
		return;
	float M = -INFINITY;
#pragma unroll
	for (int v = 0; v < ATT_WARPS; v++)
		M = fmaxf(M, s_ml[(q * ATT_WARPS + v) * 2]);
	float Lt = 0.0f, r[EPL], x[EPL];
#pragma unroll
	for (int e = 0; e < EPL; e++)
		r[e] = x[e] = 0.0f;
#pragma unroll
	for (int v = 0; v < ATT_WARPS; v++) {
		const float mv = s_ml[(q * ATT_WARPS + v) * 2];
		const float f = mv == -INFINITY ? 0.0f : __expf(mv - M);
		Lt = fmaf(s_ml[(q * ATT_WARPS + v) * 2 + 1], f, Lt);
#pragma unroll
		for (int e = 0; e < EPL; e++) {
			r[e] = fmaf(s_rot[(q * ATT_WARPS + v) * D + lane * EPL + e], f, r[e]);
			x[e] = fmaf(s_ex[(q * ATT_WARPS + v) * D + lane * EPL + e], f, x[e]);
		}
	}
	if (p.rotv)
		kvt_d_fwht<EPL>(r, lane, p.inv_sqrt_d);
	const float inv = Lt > 0.0f ? 1.0f / Lt : 0.0f;
	float *o = p.reqs[g.req].out + (size_t)(g.q_base + q) * D + lane * EPL;
#pragma unroll
	for (int e = 0; e < EPL; e++)
		o[e] = (r[e] + x[e]) * inv;
}

/* ---- The keys-as-B INT2 kernel (p.i2 == 2: KVTIER_CUDA_I2_SWAP=0; p.i2 == 3, the default
 * since session 8 (INT2) and session 9 (3-bit keys), swaps the key MMA's operands in the same
 * kernel: see below) ----
 *
 * Same exact code * scale products as session 2's kernel, but the key MMA has its operands
 * swapped, which removes the shared-memory round trip of p and most of the softmax shuffles,
 * and the code -> f16 step needs one shift per 3-4 code pairs instead of one per pair:
 *   keys:   A = q' [4 heads f16 hi (rows 0-3, again 4-7), the same heads' lo parts (rows 8-15)]
 *           [16 channels], built once per item into shared memory, prescaled by -4 log2(e);
 *           B = -code * s_k / 4 [16 channels][8 tokens]: four MMAs per k-step cover the unit's
 *           32 tokens. C row gid + C row gid + 8 (same lane) = hi + lo: the lane (gid, tig)
 *           ends with the log2-domain logits of head gid & 3 at tokens 8j + 2tig, 8j + 2tig + 1,
 *           which is exactly where the value MMA's B fragment (p) wants them: no transpose;
 *           the zero term <q', z_k> is one more MMA per k-step with B = -z_k / 4;
 *   values: A = -code * s_v / 4 [16 channels][16 tokens], B = p [16 tokens][4 heads hi, lo]
 *           (tokens in natural pairs), zero term by one MMA.
 * A code pair at half-word bits S' (4, 6 or 8, after at most one shift of the 32-bit word by
 * 6) is (word & mask) | 0xBC00 = -(1 + code * 2^(S' - 10)); fma(x, s', s') with
 * s' = s * 2^(8 - S') gives -code * s / 4 exactly. The s' words (f16 pairs in fragment order,
 * the factor included) are converted once per key group / unit by the whole warp into shared
 * memory (each lane converts 4 of the 128 key words and NG of the value words) instead of by
 * every lane for its own fragment. Scales up to 4096 (65504 / 16) stay exact. */
#define I3_KZ 64   /* per-warp conversion area (32-bit words): key scales [0, 64), key zeros */
#define I3_VS 128  /* [64, 128), value scales [128, 128 + 16 NG), value zeros after them */
#define I3_CW 256  /* words per warp */
#define I3_LOG2E 1.4426950408889634f

__device__ __forceinline__ float i3_ex2(float x)
{
	float y;
	asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
	return y;
}

/* fma(x, s, s) = -(code * s' * 2^(SP - 10)) for the x = -(1 + code * 2^(SP - 10)) of a code
 * pair (x + 1 is exact, so the product rounds only where code * s' needs more than 11 bits) */
__device__ __forceinline__ uint32_t i3_scale(uint32_t x, uint32_t s2)
{
	__half2 s = *(__half2 *)&s2;
	__half2 r = __hfma2(*(__half2 *)&x, s, s);
	return *(uint32_t *)&r;
}

/* the code pair at half-word bits SP of w -> -(code * s' * 2^(SP - 10)) for the pair of s2;
 * RAW: the x = -(1 + code * 2^(SP - 10)) before the scale (f16 sessions scale it twice) */
template <int SP, bool RAW = false>
__device__ __forceinline__ uint32_t i3_deq(uint32_t w, uint32_t s2, uint32_t magic)
{
	uint32_t x;
	asm("lop3.b32 %0, %1, %2, %3, 0xEA;"
	    : "=r"(x)
	    : "r"(w), "n"((3u << SP) | (3u << (SP + 16))), "r"(magic));
	return RAW ? x : i3_scale(x, s2);
}

/* pair e (0..7) of a 16-channel code word: e = 0, 1 from w << 6 at 6, 8; 2, 3, 4 from w at 4,
 * 6, 8; 5, 6, 7 from w >> 6 at 4, 6, 8. wl = w << 6, wr = w >> 6. */
template <int E, bool RAW = false>
__device__ __forceinline__ uint32_t i3_pair(uint32_t wl, uint32_t w, uint32_t wr, uint32_t s2,
					    uint32_t magic)
{
	if constexpr (E == 0)
		return i3_deq<6, RAW>(wl, s2, magic);
	else if constexpr (E == 1)
		return i3_deq<8, RAW>(wl, s2, magic);
	else if constexpr (E == 2)
		return i3_deq<4, RAW>(w, s2, magic);
	else if constexpr (E == 3)
		return i3_deq<6, RAW>(w, s2, magic);
	else if constexpr (E == 4)
		return i3_deq<8, RAW>(w, s2, magic);
	else if constexpr (E == 5)
		return i3_deq<4, RAW>(wr, s2, magic);
	else if constexpr (E == 6)
		return i3_deq<6, RAW>(wr, s2, magic);
	else
		return i3_deq<8, RAW>(wr, s2, magic);
}

/* the scale factor 2^(8 - S') of pair e, as an f16 pair */
__host__ __device__ constexpr uint32_t i3_factor(int e)
{
	return (e == 2 || e == 5) ? 0x4C004C00u /* 16 */
	       : (e == 1 || e == 4 || e == 7) ? 0x3C003C00u /* 1 */
					       : 0x44004400u /* 4 */;
}

/* ---- 3-bit keys (kvtier-int2's K3 V2) on the same kernel: KB = 3 ----------------------------
 * A 3-bit row is the 2-bit row of the low bits (the low plane, read exactly as INT2 codes)
 * plus a plane of high bits, channel c at bit c % 8 of byte d / 4 + c / 8 (CHUNK_FORMAT.md).
 * The code low + 4 high goes into the f16 mantissa in one piece: the low pair at half-word
 * bits SP, SP + 1 (one of three shifts of the low word: SP 3, 5 or 7), the high bit at SP + 2
 * (the high plane's bytes respaced by one byte permute so that channels e and e + 8 sit 16
 * bits apart, then one shift per pair), under the 0xBC00 of i3_deq: x = -(1 + code *
 * 2^(SP - 10)), and fma(x, s', s') with s' = s * 2^(8 - SP) is -code * s / 4 exactly (a 3-bit
 * code times an 8-bit significand fits f16's 11 bits). Two more LOP3s and one shift per pair
 * than INT2; the value path, softmax, staging, pins and combine are the INT2 kernel's. The
 * unit's high planes are staged apart from the low planes (I3_KH), so the low plane keeps
 * INT2's 32-byte rows in shared memory. Scales up to 2047 (65504 / 32) stay exact. */
#define I3_KH 3200 /* 3-bit keys: the unit's high planes [32 tokens][16 bytes] */
template <int KB> __host__ __device__ constexpr int i3_buf_bytes(void)
{
	return KB == 3 ? I3_KH + 512 : I2_BUF; /* one unit's bytes */
}

/* the scale factor 2^(8 - SP) of 3-bit key pair e: SP = 3, 5, 7, 3, 5, 7, 3, 5 */
__host__ __device__ constexpr uint32_t i3_factor3(int e)
{
	return e % 3 == 0 ? 0x50005000u /* 32 */ : e % 3 == 1 ? 0x48004800u /* 8 */
							      : 0x40004000u /* 2 */;
}

/* -(code * s' * 2^(SP - 10)) for the 3-bit codes of a pair: low bits at SP (and SP + 16) of
 * w, the high bits at SP + 2 (and SP + 18) of hs; other bits of w and hs are masked off */
template <int SP, bool RAW = false>
__device__ __forceinline__ uint32_t i3_deq3(uint32_t w, uint32_t hs, uint32_t s2, uint32_t magic)
{
	uint32_t hm, x;
	asm("lop3.b32 %0, %1, %2, %3, 0xEA;"
	    : "=r"(hm)
	    : "r"(hs), "n"((1u << (SP + 2)) | (1u << (SP + 18))), "r"(magic));
	asm("lop3.b32 %0, %1, %2, %3, 0xEA;"
	    : "=r"(x)
	    : "r"(w), "n"((3u << SP) | (3u << (SP + 16))), "r"(hm));
	return RAW ? x : i3_scale(x, s2);
}

/* 3-bit pair e (channels e, e + 8 of a 16-channel word): the low word's shifts wa = w << 3
 * (pairs 0, 1, 2 at SP 3, 5, 7), wb = w >> 3 (3, 4, 5), wc = w >> 9 (6, 7); hx holds the
 * high bits of channel e at bit e and of e + 8 at bit 16 + e */
template <int E, bool RAW = false>
__device__ __forceinline__ uint32_t i3_pair3(uint32_t wa, uint32_t wb, uint32_t wc, uint32_t hx,
					     uint32_t s2, uint32_t magic)
{
	if constexpr (E == 0)
		return i3_deq3<3, RAW>(wa, hx << 5, s2, magic);
	else if constexpr (E == 1)
		return i3_deq3<5, RAW>(wa, hx << 6, s2, magic);
	else if constexpr (E == 2)
		return i3_deq3<7, RAW>(wa, hx << 7, s2, magic);
	else if constexpr (E == 3)
		return i3_deq3<3, RAW>(wb, hx << 2, s2, magic);
	else if constexpr (E == 4)
		return i3_deq3<5, RAW>(wb, hx << 3, s2, magic);
	else if constexpr (E == 5)
		return i3_deq3<7, RAW>(wb, hx << 4, s2, magic);
	else if constexpr (E == 6)
		return i3_deq3<3, RAW>(wc, hx >> 1, s2, magic);
	else
		return i3_deq3<5, RAW>(wc, hx, s2, magic);
}

__device__ __forceinline__ uint32_t i3_hmul2(uint32_t a, uint32_t b)
{
	__half2 r = __hmul2(*(__half2 *)&a, *(__half2 *)&b);
	return *(uint32_t *)&r;
}

/* two f32 -> the f16 pair (x, y) (lo == 0) or the f16 pair of what that leaves (lo == 1) */
__device__ __forceinline__ uint32_t i3_split(float x, float y, float lo)
{
	__half2 h = __floats2half2_rn(x, y);
	const float2 hf = __half22float2(h);
	__half2 r = __floats2half2_rn(fmaf(-lo, hf.x, x), fmaf(-lo, hf.y, y));
	return *(uint32_t *)&r;
}

/* pair E of a key code word, KB-bit keys (i3_pair for 2, i3_pair3 for 3: khx unused for 2) */
template <int E, int KB, bool RAW = false>
__device__ __forceinline__ uint32_t i3_key_pair(uint32_t wl, uint32_t w, uint32_t wr, uint32_t hx,
						uint32_t s2, uint32_t magic)
{
	if constexpr (KB == 3)
		return i3_pair3<E, RAW>(wl, w, wr, hx, s2, magic);
	else
		return i3_pair<E, RAW>(wl, w, wr, s2, magic);
}

/* Key k-step K: channel pairs 2K (k slots 2tig, 2tig + 1) and 2K + 1 (2tig + 8, 2tig + 9) of
 * the lane's 32 channels, for the unit's four 8-token column tiles; plus the zero term. */
template <int K, int KB>
__device__ __forceinline__ void i3_kstep(float (&acc)[4][4], float (&cb)[4], const uint32_t (&kwl)[4],
					 const uint32_t (&kw)[4], const uint32_t (&kwr)[4],
					 const uint32_t (&khx)[4], const uint4 *afr,
					 const uint32_t *cw, int lane, int tig, uint32_t magic)
{
	const uint4 a4 = afr[K * 32 + lane];
	const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
	const uint2 s2 = *(const uint2 *)(cw + tig * 16 + 2 * K);
	const uint2 z2 = *(const uint2 *)(cw + I3_KZ + tig * 16 + 2 * K);
	mma16816(cb, a, z2.x, z2.y);
	constexpr int E = 2 * (K & 3);
#pragma unroll
	for (int j = 0; j < 4; j++) {
		const uint32_t b0 = i3_key_pair<E, KB>(kwl[j], kw[j], kwr[j], khx[j], s2.x, magic);
		const uint32_t b1 = i3_key_pair<E + 1, KB>(kwl[j], kw[j], kwr[j], khx[j], s2.y, magic);
		mma16816(acc[j], a, b0, b1);
	}
}

/* Value channel tile I (channels 16 gid + I, 16 gid + 8 + I) of one 16-token step; F16: the
 * scales are f16, split into a high part s (8 significant bits: a 2-bit code times it is exact
 * in f16, as for a bf16 scale) and the rest sl (3 bits), one MMA each */
template <int I, bool F16>
__device__ __forceinline__ void i3_vstep(float (&vacc)[8][4], const uint32_t (&ul)[4],
					 const uint32_t (&u)[4], const uint32_t (&ur)[4],
					 const uint32_t (&s)[2][3], const uint32_t (&sl)[2][3],
					 uint32_t b0, uint32_t b1, uint32_t magic)
{
	/* the scale variant of pair I: factor 1, 4 or 16 */
	constexpr int F = i3_factor(I) == 0x3C003C00u ? 0 : i3_factor(I) == 0x44004400u ? 1 : 2;
	uint32_t a[4];
	a[0] = i3_pair<I, F16>(ul[0], u[0], ur[0], s[0][F], magic);
	a[1] = i3_pair<I, F16>(ul[1], u[1], ur[1], s[0][F], magic);
	a[2] = i3_pair<I, F16>(ul[2], u[2], ur[2], s[1][F], magic);
	a[3] = i3_pair<I, F16>(ul[3], u[3], ur[3], s[1][F], magic);
	if constexpr (F16) {
		const uint32_t al[4] = {i3_scale(a[0], sl[0][F]), i3_scale(a[1], sl[0][F]),
					i3_scale(a[2], sl[1][F]), i3_scale(a[3], sl[1][F])};
#pragma unroll
		for (int r = 0; r < 4; r++)
			a[r] = i3_scale(a[r], s[r >> 1][F]);
		mma16816(vacc[I], al, b0, b1);
	}
	mma16816(vacc[I], a, b0, b1);
}

/* ---- The unit loop (session 6, att7): two units in flight ---------------------------------
 * Same arithmetic, same bytes, same results as session 5's loop (attend_coded_i3, removed
 * after session 6 with its bulk-copy staging variant, and with session 6's first loop, one
 * unit in flight, KVTIER_CUDA_I3_PIPE=0: commit d5a5da5 has all three); what changed
 * (counted in the SASS of the INT2 G32 build; docs/gpu.md "Session 6: attention"):
 * - staging: a lane's pieces are grouped by kind so that each of its copies has one stride:
 *   copy 0 of every lane is a key scale / zero piece (16 + 16 of them: offset + key group x
 *   256), copy 1 a value scale / zero piece (8 NG, lanes < 8 NG: + block x 64 NG), copy 2 a
 *   norm piece (lanes < 8, oscar: + block x 128), besides the 2 (3-bit: 3) key code and 2
 *   value code pieces. Each copy's source is then the block index times a constant on the
 *   chunk's base pointer; the base pointers are set when the staged unit enters a new chunk
 *   (every B / 32 units), whose descriptor was loaded one chunk ahead (the section pointer
 *   and pin count only; the pins themselves are read where a chunk has any);
 * - the stage buffers are read by 32-bit shared addresses with immediate offsets (ptxas
 *   rebuilt each generic buffer pointer's shared-window address, per use);
 * - the key-scale factors stay in registers (opaque moves); the key group changes when the
 *   block index crosses a multiple of G / 32 (no chunk-index compare);
 * - kivi (no norms): both buffers' norm slots hold 1.0 from the start, so the logits always
 *   multiply by the staged norm (no per-unit selects);
 * - two units in flight: unit u + 1's wait and scale conversions sit between unit u's key
 *   MMAs and its softmax (see the loop). INT2 G32: 897 -> 824 static instructions in the loop,
 *   727 -> 629 per benchmark unit; H200 -9 to -10% per step (docs/gpu.md). */
/* the f16 pair (bf16 half hi of a, the same half of b): the low halves (hi false) or the
 * high halves of two words of bf16 pairs */
__device__ __forceinline__ uint32_t i4_bf2h(uint32_t a, uint32_t b, bool hi)
{
	const __half2 t = __floats2half2_rn(__uint_as_float(hi ? a & 0xffff0000u : a << 16),
					    __uint_as_float(hi ? b & 0xffff0000u : b << 16));
	return *(const uint32_t *)&t;
}

template <int OFF> __device__ __forceinline__ uint32_t i4_lds32(uint32_t a)
{
	uint32_t v;
	asm volatile("ld.shared.u32 %0, [%1+%2];" : "=r"(v) : "r"(a), "n"(OFF));
	return v;
}

template <int OFF> __device__ __forceinline__ uint2 i4_lds64(uint32_t a)
{
	uint2 v;
	asm volatile("ld.shared.v2.u32 {%0,%1}, [%2+%3];" : "=r"(v.x), "=r"(v.y) : "r"(a), "n"(OFF));
	return v;
}

template <int OFF> __device__ __forceinline__ uint4 i4_lds128(uint32_t a)
{
	uint4 v;
	asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4+%5];"
		     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
		     : "r"(a), "n"(OFF));
	return v;
}

/* The unit copies stream ~100 MB through the 50 MB L2 once per step: marked evict-first, they
 * leave the lines that are read again in L2 (the items' partials, read back by the combine,
 * and the descriptors); H200, session 10: -0.5 to -1.4 us per step in every benchmark case
 * (docs/gpu.md). The policy is made once per thread (createpolicy). */
__device__ __forceinline__ uint64_t i4_stream_policy(void)
{
	uint64_t pol;
	asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
	return pol;
}

template <int SO, int GO>
__device__ __forceinline__ void i4_cp16(uint32_t s, const uint8_t *g, uint64_t pol)
{
	asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0+%2], [%1+%3], 16, %4;\n" ::"r"(s),
		     "l"(g), "n"(SO), "n"(GO), "l"(pol));
}

/* a 4-byte copy (cp.async.cg copies 16 bytes only; .ca also 4 and 8) */
__device__ __forceinline__ void i4_cp4(uint32_t s, const uint8_t *g, uint64_t pol)
{
	asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %2;\n" ::"r"(s),
		     "l"(g), "l"(pol));
}

/* a value the compiler cannot rematerialise (it stays in a register) */
__device__ __forceinline__ uint32_t i4_opaque(uint32_t x)
{
	uint32_t y;
	asm volatile("mov.b32 %0, %1;" : "=r"(y) : "r"(x));
	return y;
}

/* ---- The swapped key orientation (p.i2 == 3, the default; session 8, att9; 3-bit keys: 9) ---
 * H200, INT2 G32 Hq 32 Hkv 8: 45.2-45.6 vs 49.4-49.7 us at 1 x 131072, 78.2-78.6 vs 86.4-86.7 at
 * 8 x 32768, 62.9-63.0 vs 69.2-69.3 at 48 x 4096 (same call; docs/gpu.md "Session 8").
 * KVTIER_CUDA_I2_SWAP=0: the keys-as-B loop, for A/B runs.
 * INT2 or 3-bit keys (the same code words, shifts and pair conversions, i3_pair / i3_pair3,
 * as the keys-as-B loop). The unit loop above with three pieces swapped:
 *   keys:   A = -code * s_k / 4 [16 tokens (gid, gid + 8 of a 16-token half)][16 channels],
 *           with the k permutation of the keys-as-B loop (k slots 2tig, 2tig + 1 = the pair
 *           (e, e + 8) the lane's code word holds), so the lane reads and converts the very
 *           same words with the same fixed shifts; B = q' [16 channels][8 columns: head 0 hi,
 *           head 0 lo, head 1 hi, ...], 16 registers per lane taken once per item from the
 *           prologue's A fragments (afr). 2 halves x 8 k-steps = 16 MMAs per unit (was 32, half
 *           of every A a duplicate row), C[token][2h] + C[token][2h + 1] = head h's logit: the
 *           lane (gid, tig) holds head tig's hi and lo at tokens gid, gid + 8 (+ 16): added in
 *           the lane. Key zeros: A = -z_k / 4 in every row, B = q', one MMA per k-step;
 *           The key MMAs accumulate in four chains (k-step parity x token half), four deep;
 *           INT2 since session 9 in two (token half), eight deep: 8 FADD fewer per unit
 *           (581 -> 573 instructions, 163 -> 157 registers), H200 -0.4 / -1.0 / -0.55 us per
 *           step at 1 x 131072 / 8 x 32768 / 48 x 4096 (docs/gpu.md "Session 9: four blocks
 *           per SM"); 3-bit keys keep the four;
 *           the zeros are stored as (x, x, y, y) A fragments in rows padded against bank
 *           conflicts (without the padding the swapped loop was 2-3% slower than keys-as-B);
 *   softmax: head tig at 4 tokens gid + 8j per lane (was 8 logits, each twice in the warp):
 *           4 ex2; lazy rescaling (the reference maximum moves only when a logit passes it
 *           by I5_SLACK: one vote per unit instead of the shuffles and alpha), and when it
 *           moves, the maximum over the gid bits (xor 4, 8, 16), alpha local (no SHFL.IDX);
 *   p:      the f16 pair (hi, lo) of p at token gid + 8j is row gid, columns 2tig, 2tig + 1 of
 *           the 8 x 8 tile P_j[token][2h + {hi, lo}], the m8n8 fragment layout; movmatrix.trans
 *           gives lane (gid, tig) P_j[2tig, 2tig + 1][gid] = the value MMA's B fragment
 *           (k = tokens, n = gid = head gid / 2 hi or lo): 4 movmatrix per unit;
 *   values: unchanged A; the columns of vacc are head tig's hi and lo parts, added in the lane
 *           when the partial is stored (i5_store_partial). */
#define I5_ZROW 144u /* bytes per tig row of the key zeros: 8 k-steps x 16 + 16 of padding */
static_assert(4 * I5_ZROW <= 1024, "a warp's key zeros fit its quarter of afr");
/* 16 bytes of 1.0f: the norm pieces of a kivi chunk (no norms) in the swapped loop's staging */
__device__ __align__(16) const float i5_ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
#define I5_SLACK 8.0f /* log2 domain: p up to 256 before the reference moves */
__device__ __forceinline__ uint32_t i5_trans(uint32_t x)
{
	uint32_t y;
	asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
	return y;
}

/* the f16 pair (hi, lo) of x: hi = f16(x), lo = f16(x - hi) */
__device__ __forceinline__ uint32_t i5_hilo(float x)
{
	const float h = __half2float(__float2half_rn(x));
	__half2 r = __floats2half2_rn(x, x - h);
	return *(uint32_t *)&r;
}

/* Key k-step K of the swapped orientation: tokens gid + 8j (word j), channel pairs 2K, 2K + 1
 * of the lane's words; qb: the lane's q' B fragments; kdr: the shared address of the lane's
 * row of key zeros ((x, x, y, y) at 16 K); plus the zero term. */
template <int K, int KB, bool F16>
__device__ __forceinline__ void i5_kstep(float (&acc)[2][2][4], float (&cz)[4],
					 const uint32_t (&kwl)[4], const uint32_t (&kw)[4],
					 const uint32_t (&kwr)[4], const uint32_t (&khx)[4], uint32_t qb0,
					 uint32_t qb1,
					 const uint32_t *cw, int tig, uint32_t kdr, uint32_t magic)
{
	const uint2 s2 = *(const uint2 *)(cw + tig * 16 + 2 * K);
	const uint4 z4 = i4_lds128<16 * K>(kdr);
	const uint32_t az[4] = {z4.x, z4.y, z4.z, z4.w};
	mma16816(cz, az, qb0, qb1);
	constexpr int E = 2 * (K & 3);
#pragma unroll
	for (int h = 0; h < 2; h++) {
		const int j0 = 2 * h, j1 = 2 * h + 1; /* words of tokens gid, gid + 8 of half h */
		uint32_t a[4] = {
			i3_key_pair<E, KB, F16>(kwl[j0], kw[j0], kwr[j0], khx[j0], s2.x, magic),
			i3_key_pair<E, KB, F16>(kwl[j1], kw[j1], kwr[j1], khx[j1], s2.x, magic),
			i3_key_pair<E + 1, KB, F16>(kwl[j0], kw[j0], kwr[j0], khx[j0], s2.y, magic),
			i3_key_pair<E + 1, KB, F16>(kwl[j1], kw[j1], kwr[j1], khx[j1], s2.y, magic)};
		if constexpr (F16) {
			/* f16 scales: high parts s2 (cw), the rest sl (cw + I3_KZ, free in the
			 * swapped loop: its zeros live in afr), one MMA each, in chains of their
			 * own (acc[1]) */
			const uint2 sl = *(const uint2 *)(cw + I3_KZ + tig * 16 + 2 * K);
			const uint32_t al[4] = {i3_scale(a[0], sl.x), i3_scale(a[1], sl.x),
						i3_scale(a[2], sl.y), i3_scale(a[3], sl.y)};
			a[0] = i3_scale(a[0], s2.x);
			a[1] = i3_scale(a[1], s2.x);
			a[2] = i3_scale(a[2], s2.y);
			a[3] = i3_scale(a[3], s2.y);
			mma16816(acc[1][h], al, qb0, qb1);
			mma16816(acc[0][h], a, qb0, qb1);
		} else {
			/* INT2: two chains (token half); 3-bit keys: four (k-step parity x token
			 * half) */
			mma16816(acc[KB == 2 ? 0 : K & 1][h], a, qb0, qb1);
		}
	}
}

/* The swapped loop's value partial in the reduction layout racc[head][channel]: lane (gid, tig)
 * holds head tig's hi and lo columns for channels 16 gid + i, 16 gid + 8 + i; the value-zero
 * term of value group g sits in lane (g, tig) (zacc rows >= NG repeat row gid % NG). */
template <int NG>
__device__ __forceinline__ void i5_store_partial(const float (&vacc)[8][4], const float (&zacc)[2],
						 float *racc, int gid, int tig, int vg)
{
	constexpr int D = 128;
	const float z = __shfl_sync(KVT_FULL_MASK, zacc[0] + zacc[1], 4 * vg + tig);
	float o[16];
#pragma unroll
	for (int i = 0; i < 8; i++) {
		o[i] = fmaf(-4.0f, vacc[i][0] + vacc[i][1], z);
		o[i + 8] = fmaf(-4.0f, vacc[i][2] + vacc[i][3], z);
	}
	float4 *dst = (float4 *)(racc + tig * D + 16 * gid);
#pragma unroll
	for (int i = 0; i < 4; i++)
		dst[i] = make_float4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
}

/* SW: the swapped key orientation (p.i2 == 3; see above). (Session 9's LEAN form of it for 4
 * blocks per SM, KVTIER_CUDA_MINB4=1, measured slower than 3 blocks and was removed: 65258f4
 * has it; docs/gpu.md "Session 9: four blocks per SM".) */
template <int GV, int KB, bool SW, bool F16, class Pre, class Mid>
__device__ __forceinline__ void attend_coded_i4(const att_params &p, const att_item_dev &it,
						uint32_t u0, uint32_t u1, const uint4 *afr,
						uint8_t *stage, uint32_t *cw, float *zsm, float *rm,
						float *rl, float *racc, uint32_t *vs2, int lane,
						Pre &&pre, Mid &&mid)
{
	constexpr int D = 128, NG = D / GV, BUF = i3_buf_bytes<KB>();
	constexpr uint32_t KSTR = KB == 3 ? 1536 : 1024; /* key code bytes of a 32-token block */
	static_assert(!F16 || SW, "f16 sessions take the swapped loop only");
	const int gid = lane >> 2, tig = lane & 3;
	/* B fragment column gid: f16 lo part (opaque values below stay in registers: ptxas
	 * would rebuild them per unit) */
	const float lo_f = __uint_as_float(i4_opaque(gid >= 4 ? 0x3f800000u : 0u));
	const uint32_t zero = i4_opaque(0u);
	const uint32_t upc = p.B / 32, h = it.kv_head;
	const bool oscar = p.scheme == KVT_SCHEME_OSCAR;
	const int vg = (16 * gid) / GV; /* the value group of this lane's value channels */
	/* key group of block sb: sb >> gsh, gsh = log2(G / 32) (GV = G below 128: gsh 0 or 1) */
	const uint32_t gsh = GV == 32 ? 0u : GV == 64 ? 1u : p.gsh, gmask = (1u << gsh) - 1u;

	/* key-word converter: lane converts words 4 half .. 4 half + 3 of the 16-channel block
	 * blk of the scales (kind 0) or zeros (kind 1) */
	const int ckind = lane >> 4, cblk = (lane >> 1) & 7, chalf = lane & 1;
	uint32_t cfac[4];
#pragma unroll
	for (int e = 0; e < 4; e++)
		cfac[e] = i4_opaque(ckind ? 0xB400B400u /* -1/4 */
				    : KB == 3 ? (chalf ? i3_factor3(4 + e) : i3_factor3(e))
					      : chalf ? i3_factor(4 + e) : i3_factor(e));

	float m2 = -INFINITY, l2 = 0.0f; /* head gid & 3, log2 domain */
	float vacc[8][4], zacc[2] = {0.0f, 0.0f}, zs0 = 0.0f, zs1 = 0.0f;
#pragma unroll
	for (int i = 0; i < 8; i++)
		vacc[i][0] = vacc[i][1] = vacc[i][2] = vacc[i][3] = 0.0f;

	/* this lane's copies: source offsets in the layer section at block 0 of the item's key
	 * group base, shared destinations at the buffer's start */
	const uint32_t hB = h * p.B, kgbase = h * (p.B >> 5 >> p.gsh) * 256;
	const uint32_t oK = p.k_codes_off + hB * (KB == 3 ? 48 : 32) + 16 * lane;
	const uint32_t oV = p.v_codes_off + hB * 32 + 16 * lane;
	const uint32_t o0 = (lane < 16 ? p.k_scale_off + 16 * lane : p.k_zero_off + 16 * (lane - 16)) +
			    kgbase;
	const uint32_t o1 = (lane < 4 * NG ? p.v_scale_off + 16 * lane
					   : p.v_zero_off + 16 * (lane - 4 * NG)) +
			    hB * NG * 2;
	/* the norm pieces: swapped keys, 4 bytes a lane (token lane); else 16 bytes, lanes 0-7 */
	const uint32_t o2 = p.norms_off + (SW ? 4 : 16) * lane;
	const bool on1 = lane < 8 * NG, on2 = oscar && lane < 8;
	uint32_t kd[3] = {0u, 0u, 0u}; /* 3-bit keys: the key pieces' destinations */
	if constexpr (KB == 3) {
#pragma unroll
		for (int j = 0; j < 3; j++) {
			const uint32_t pc = lane + 32 * j, t = pc / 3, part = pc - 3 * t;
			kd[j] = part < 2 ? I2_KC + 32 * t + 16 * part : I3_KH + 16 * t;
		}
	}
	const uint32_t s0 = (uint32_t)__cvta_generic_to_shared(stage);
	const uint32_t bx = i4_opaque(s0 ^ (s0 + BUF)); /* buffer toggle */
	if (!SW && !oscar) { /* kivi: the norm slots of both buffers hold 1.0 (never staged; the
			      * swapped loop stages 1.0 from i5_ones with every unit) */
		*(float *)(stage + I2_NR + 4 * lane) = 1.0f;
		*(float *)(stage + BUF + I2_NR + 4 * lane) = 1.0f;
	}

	/* the staged unit's chunk cs and block ss; the next chunk's descriptor, loaded ahead */
	const uint32_t cend = it.first + it.count;
	uint32_t cs = it.first + u0 / upc, ss = u0 % upc, np_s = 0, nnp = 0;
	const uint8_t *bK = NULL, *bV = NULL, *b0 = NULL, *b1 = NULL, *b2 = NULL, *nsec = NULL;
	auto rebase = [&](const uint8_t *sec) {
		bK = sec + oK;
		bV = sec + oV;
		b0 = sec + o0;
		b1 = sec + o1;
		b2 = SW && !oscar ? (const uint8_t *)i5_ones + 4 * (lane & 3) : sec + o2;
	};
	/* swapped keys: the norm copy without a branch around it (ptxas gives a branched-around
	 * copy a block and an LDGSTS preamble of its own: 5 instructions per unit): every lane
	 * copies its token's 4 bytes (kivi: 1.0 from i5_ones, stride 0). Sessions 9-10 copied 16
	 * bytes in lanes 0-7 while lanes 8-31 zero-filled a scratch slot of their own, which the
	 * copies of two units in flight both wrote: racecheck's write-write hazards (docs/gpu.md,
	 * session 11) */
	const uint32_t kdb = (uint32_t)__cvta_generic_to_shared(afr) + 1024u * (threadIdx.x >> 5);
	const uint32_t nstr = oscar ? 128u : 0u;
	const uint64_t pol = i4_stream_policy(); /* the unit copies: L2 evict-first */
	auto stage_unit = [&](uint32_t sb, uint32_t blk) {
		/* sb: the buffer's shared address */
		const uint8_t *pk = bK + blk * KSTR, *pv = bV + blk * 1024u;
		const uint32_t sl = sb + 16 * lane;
		if constexpr (KB == 3) {
			i4_cp16<0, 0>(sb + kd[0], pk, pol);
			i4_cp16<0, 512>(sb + kd[1], pk, pol);
			i4_cp16<0, 1024>(sb + kd[2], pk, pol);
		} else {
			i4_cp16<I2_KC, 0>(sl, pk, pol);
			i4_cp16<I2_KC + 512, 512>(sl, pk, pol);
		}
		i4_cp16<I2_VC, 0>(sl, pv, pol);
		i4_cp16<I2_VC + 512, 512>(sl, pv, pol);
		i4_cp16<I2_KS, 0>(sl, b0 + (blk >> gsh) * 256u, pol);
		if (on1)
			i4_cp16<I2_VS, 0>(sl, b1 + blk * (64u * NG), pol);
		if constexpr (SW)
			i4_cp4(sb + I2_NR + 4 * lane, b2 + blk * nstr, pol);
		else if (on2)
			i4_cp16<I2_NR, 0>(sl, b2 + blk * 128u, pol);
	};
	/* the block prologue (session 10): the chunk descriptors are read before the grid
	 * dependency wait (pre: the wait, then the query loads), the first two units are staged
	 * right after it, and the query rotation and fragments (mid) run while they arrive */
	if (u0 < u1) {
		rebase(p.chunks[cs].sec);
		np_s = p.chunks[cs].n_pinned;
		if (cs + 1 < cend) {
			nsec = p.chunks[cs + 1].sec;
			nnp = p.chunks[cs + 1].n_pinned;
		}
	}
	/* p.early (session 11: the stream's previous op was an attention run, so nothing still
	 * running writes chunk bytes; kvt_cuda_attend_run): the first two units are copied before
	 * the wait, while the kernel ahead (the previous step's combine) ends; else right after
	 * the wait and the query loads */
	const uint32_t early = p.early; /* 1: two units before the wait; 2: one (A/B only) */
	if (!early)
		pre();
	if (u0 < u1)
		stage_unit(s0, ss);
	cp_async_commit();
	/* opaque to the compiler: stays in a register, else ptxas splits (x & mask) | magic into
	 * two LOP3s with an immediate each */
	uint32_t magic;
	asm volatile("mov.b32 %0, 0xBC00BC00;" : "=r"(magic));
	/* per-lane read offsets in a buffer; kro, vwo, vso and vzb opaque: ptxas rebuilt them from
	 * the lane index in every unit (14 ALU instructions per unit; session 10, with the early
	 * rescale below: -0.8 to -1.8 us per step, docs/gpu.md) */
	const uint32_t kro = i4_opaque(gid * 32 + tig * 8), khro = I3_KH + gid * 16 + tig * 4;
	const uint32_t kcs = i4_opaque((ckind ? I2_KZ : I2_KS) + 2 * (16 * cblk + 4 * chalf));
	/* the zero term's A rows >= NG (gid >= NG) are never read (i2_store_partial): they may
	 * repeat row gid % NG instead of holding zeros */
	const uint32_t vzo = (uint32_t)(gid & (NG - 1));
	const uint32_t vcs = I2_VS + ckind * (64 * NG) + (2 * (lane & 15)) * NG * 2;
	const uint32_t vwo = i4_opaque(I2_VC + 4 * gid + 64 * tig);
	uint32_t bcur = s0; /* this unit's buffer */
	/* Two units in flight: unit u + 1's wait and conversions
	 * are issued between unit u's key MMAs and its softmax, so the scheduler has them
	 * to interleave with the softmax's shuffle / ex2 chain; unit u's value codes are
	 * read into registers before unit u + 2 is staged into its buffer; the value scale
	 * words alternate between the warp's word area and vs2 (the rotated query's shared
	 * memory, unused after the prologue). */
	const uint32_t va0 = (uint32_t)__cvta_generic_to_shared(cw + I3_VS);
	const uint32_t vx = i4_opaque(va0 ^ (uint32_t)__cvta_generic_to_shared(vs2));
	const uint32_t vso = i4_opaque(4 * (tig * NG + vg)),
		       vzb = i4_opaque(64 * NG + 4 * (tig * NG + vzo));
	const uint32_t vdo = 64 * NG * ckind + 4 * (lane & 15) * NG;
	/* swapped keys: the warp's key zeros [tig][k-step][x, x, y, y] in the prologue's
	 * A-fragment area (afr: 256 words a warp, free once qb is read below), so that the zero
	 * MMA's A fragment (x, x, y, y) is one LDS.128 (from [x, y] pairs ptxas builds it with 4
	 * moves per k-step); the scales stay in cw. Rows of I5_ZROW bytes: the 4 addresses of a
	 * k-step's read (one per tig) fall in different banks (one wavefront, not four); kdb: the
	 * warp's quarter of afr (above) */
	const uint32_t kdw = kdb + I5_ZROW * (cblk >> 1) + 64 * (cblk & 1) + 32 * chalf;
	const uint32_t kdr = kdb + I5_ZROW * tig; /* the reader's row */
	/* f16 sessions: a scale's high part keeps its top 8 significant bits (the rest goes to
	 * the low part, exact: an f16 difference of the low 3 bits); zeros are not split */
	const uint32_t hmask = ckind ? 0xffffffffu : 0xfff8fff8u; /* conv_key's lane kind */
	/* an f16 pair -> its high part under mask m (returned) and the rest (lo) */
	auto f16_split = [](uint32_t pr, uint32_t &lo, uint32_t m = 0xfff8fff8u) {
		const uint32_t hi = pr & m;
		const __half2 r = __hsub2(*(const __half2 *)&pr, *(const __half2 *)&hi);
		lo = *(const uint32_t *)&r;
		return hi;
	};
	auto conv_key = [&](uint32_t bf) {
		const uint32_t ka = bf + kcs;
		const uint2 x = i4_lds64<0>(ka), y = i4_lds64<16>(ka);
		uint4 o, ol;
		uint32_t *ow = (uint32_t *)&o, *olw = (uint32_t *)&ol;
#pragma unroll
		for (int e = 0; e < 4; e++) {
			const uint32_t wx = e < 2 ? x.x : x.y, wy = e < 2 ? y.x : y.y;
			if constexpr (F16) {
				uint32_t lo;
				const uint32_t hi =
					f16_split(__byte_perm(wx, wy, e & 1 ? 0x7632 : 0x5410), lo, hmask);
				ow[e] = i3_hmul2(hi, cfac[e]);
				olw[e] = i3_hmul2(lo, cfac[e]);
			} else {
				const float fx = __uint_as_float(e & 1 ? wx & 0xffff0000u : wx << 16);
				const float fy = __uint_as_float(e & 1 ? wy & 0xffff0000u : wy << 16);
				__half2 hh = __floats2half2_rn(fx, fy);
				ow[e] = i3_hmul2(*(uint32_t *)&hh, cfac[e]);
			}
		}
		if (SW && ckind) /* zeros as duplicated pairs (x, x, y, y) per k-step */
			asm volatile("st.shared.v4.u32 [%0], {%1,%1,%2,%2};\n"
				     "st.shared.v4.u32 [%0+16], {%3,%3,%4,%4};" ::"r"(kdw),
				     "r"(o.x), "r"(o.y), "r"(o.z), "r"(o.w));
		else
			*(uint4 *)(cw + ckind * I3_KZ + cblk * 8 + 4 * chalf) = o;
		if (F16 && !ckind) /* the scales' low parts where keys-as-B keeps its zeros */
			*(uint4 *)(cw + I3_KZ + cblk * 8 + 4 * chalf) = ol;
	};
	auto conv_val = [&](uint32_t bf, uint32_t vdst) {
		const uint32_t d = vdst + vdo;
		if constexpr (F16) { /* the f16 pairs (token 2P, 2P + 1) of each group, as they are */
			if constexpr (NG == 4) {
				const uint4 v = i4_lds128<0>(bf + vcs);
				asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(d),
					     "r"(__byte_perm(v.x, v.z, 0x5410)), "r"(__byte_perm(v.x, v.z, 0x7632)),
					     "r"(__byte_perm(v.y, v.w, 0x5410)), "r"(__byte_perm(v.y, v.w, 0x7632)));
			} else if constexpr (NG == 2) {
				const uint2 v = i4_lds64<0>(bf + vcs);
				asm volatile("st.shared.v2.u32 [%0], {%1,%2};" ::"r"(d),
					     "r"(__byte_perm(v.x, v.y, 0x5410)), "r"(__byte_perm(v.x, v.y, 0x7632)));
			} else {
				asm volatile("st.shared.u32 [%0], %1;" ::"r"(d), "r"(i4_lds32<0>(bf + vcs)));
			}
			return;
		}
		if constexpr (NG == 4) {
			const uint4 v = i4_lds128<0>(bf + vcs); /* tokens 2P (x, y), 2P + 1 (z, w) */
			asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(d),
				     "r"(i4_bf2h(v.x, v.z, false)), "r"(i4_bf2h(v.x, v.z, true)),
				     "r"(i4_bf2h(v.y, v.w, false)), "r"(i4_bf2h(v.y, v.w, true)));
		} else if constexpr (NG == 2) {
			const uint2 v = i4_lds64<0>(bf + vcs); /* tokens 2P (x), 2P + 1 (y) */
			asm volatile("st.shared.v2.u32 [%0], {%1,%2};" ::"r"(d),
				     "r"(i4_bf2h(v.x, v.y, false)), "r"(i4_bf2h(v.x, v.y, true)));
		} else {
			const uint32_t v = i4_lds32<0>(bf + vcs); /* tokens 2P (low), 2P + 1 */
			__half2 t = __floats2half2_rn(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
			asm volatile("st.shared.u32 [%0], %1;" ::"r"(d), "r"(*(uint32_t *)&t));
		}
	};
	uint32_t rem = u1 - u0;
	uint32_t sbc = ss, ccc = cs, npc = np_s; /* the computed unit's block, chunk, pins */
	/* INT2: the next chunk's descriptor through a pointer that lives across the loop, cnx =
	 * chunk min(cs + 1, cend - 1), read unpredicated. Read through a temporary address (the
	 * form 3-bit keys keep), the address registers were rewritten a few instructions after
	 * the load, and a register a load reads may be rewritten only once the load has left the
	 * memory queue, which the unit copies keep long: ncu put 2% of all warp time on that
	 * wait. H200, session 10: INT2 -0.4 to -0.8 us per step; 3-bit keys +0.1 to +0.4 (their
	 * loop allocates differently), so they keep the old form (docs/gpu.md). */
	constexpr bool CNX = KB == 2;
	const att_chunk_dev *cnx = p.chunks + (cs + 1 < cend ? cs + 1 : cend - 1);
	auto advance = [&]() {
		if (++ss == upc) { /* the staged unit starts a chunk */
			ss = 0;
			cs++;
			rebase(nsec);
			np_s = nnp;
			if constexpr (CNX) {
				cnx += cs + 1 < cend ? 1 : 0;
				nsec = cnx->sec;
				nnp = cnx->n_pinned;
			} else if (cs + 1 < cend) {
				nsec = p.chunks[cs + 1].sec;
				nnp = p.chunks[cs + 1].n_pinned;
			}
		}
	};
	if (early == 2)
		pre();
	if (rem > 1) {
		advance();
		stage_unit(s0 ^ bx, ss);
	}
	cp_async_commit();
	if (early == 1)
		pre();
	mid();
	uint32_t vcur = va0; /* this unit's value scale words */
	/* swapped keys: the lane's q' B fragments (head gid / 2, f16 hi at even gid, lo at odd) are
	 * the prologue's A fragments of lane (gid / 2, tig): hi parts in .x, .z, lo in .y, .w */
	uint32_t qb[8][2];
	if constexpr (SW) {
#pragma unroll
		for (int k = 0; k < 8; k++) {
			const uint4 f = afr[k * 32 + (gid >> 1) * 4 + tig];
			qb[k][0] = i4_opaque(gid & 1 ? f.y : f.x);
			qb[k][1] = i4_opaque(gid & 1 ? f.w : f.z);
		}
		__syncthreads(); /* every warp has its fragments: afr takes the key words */
	}
	if (rem) {
		cp_async_wait1();
		__syncwarp();
		conv_key(s0);
		conv_val(s0, vcur);
		__syncwarp();
	}
	for (; rem; rem--) {
		/* keys of this unit */
		float acc[4][4], cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
		uint32_t kwl[4], kw[4], kwr[4];
#pragma unroll
		for (int j = 0; j < 4; j++)
			acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
		uint2 kr[4];
		uint32_t kh[4] = {0u, 0u, 0u, 0u}, khx[4] = {0u, 0u, 0u, 0u};
		{
			const uint32_t ka = bcur + kro;
			kr[0] = i4_lds64<0>(ka);
			kr[1] = i4_lds64<256>(ka);
			kr[2] = i4_lds64<512>(ka);
			kr[3] = i4_lds64<768>(ka);
			if constexpr (KB == 3) {
				const uint32_t kha = bcur + khro;
				kh[0] = i4_lds32<0>(kha);
				kh[1] = i4_lds32<128>(kha);
				kh[2] = i4_lds32<256>(kha);
				kh[3] = i4_lds32<384>(kha);
			}
		}
		/* swapped keys: [k-step parity][token half]: four accumulator chains of four MMAs
		 * (INT2: [0][token half], two chains of eight) */
		float sacc[2][2][4], cz[4] = {0.0f, 0.0f, 0.0f, 0.0f};
		if constexpr (SW) {
#pragma unroll
			for (int h = 0; h < 4; h++)
				sacc[h >> 1][h & 1][0] = sacc[h >> 1][h & 1][1] = sacc[h >> 1][h & 1][2] =
					sacc[h >> 1][h & 1][3] = 0.0f;
		}
		/* the code words of k-steps 4 H .. 4 H + 3 (H = 0: the low words kr[].x, 1: .y) and
		 * their shifts, then those four k-steps in the loop's orientation */
		auto key_half = [&](auto hc) {
			constexpr int H = decltype(hc)::value;
#pragma unroll
			for (int j = 0; j < 4; j++) {
				kw[j] = H ? kr[j].y : kr[j].x;
				if constexpr (KB == 3) {
					kwl[j] = kw[j] << 3;
					kwr[j] = kw[j] >> 9;
					kw[j] = kw[j] >> 3;
					khx[j] = __byte_perm(kh[j], 0, H ? 0x4342 : 0x4140);
				} else {
					kwl[j] = kw[j] << 6;
					kwr[j] = kw[j] >> 6;
				}
			}
			if constexpr (SW) {
				i5_kstep<4 * H, KB, F16>(sacc, cz, kwl, kw, kwr, khx, qb[4 * H][0], qb[4 * H][1],
						    cw, tig, kdr, magic);
				i5_kstep<4 * H + 1, KB, F16>(sacc, cz, kwl, kw, kwr, khx, qb[4 * H + 1][0],
							qb[4 * H + 1][1], cw, tig, kdr, magic);
				i5_kstep<4 * H + 2, KB, F16>(sacc, cz, kwl, kw, kwr, khx, qb[4 * H + 2][0],
							qb[4 * H + 2][1], cw, tig, kdr, magic);
				i5_kstep<4 * H + 3, KB, F16>(sacc, cz, kwl, kw, kwr, khx, qb[4 * H + 3][0],
							qb[4 * H + 3][1], cw, tig, kdr, magic);
			} else {
				i3_kstep<4 * H, KB>(acc, cb, kwl, kw, kwr, khx, afr, cw, lane, tig, magic);
				i3_kstep<4 * H + 1, KB>(acc, cb, kwl, kw, kwr, khx, afr, cw, lane, tig, magic);
				i3_kstep<4 * H + 2, KB>(acc, cb, kwl, kw, kwr, khx, afr, cw, lane, tig, magic);
				i3_kstep<4 * H + 3, KB>(acc, cb, kwl, kw, kwr, khx, afr, cw, lane, tig, magic);
			}
		};
		key_half(std::integral_constant<int, 0>());
		key_half(std::integral_constant<int, 1>());

		const float bias = cb[0] + cb[2];
		float lg[4][2], slg[4]; /* slg: swapped, head tig at token gid + 8j */
		if constexpr (SW) {
			/* token gid + 8j: sacc[.][j / 2][2 (j & 1)] hi, [.. + 1] lo; the norms at 4 token */
			const float sbias = cz[0] + cz[1];
			const uint32_t na = bcur + 4 * gid;
			const float nr[4] = {__uint_as_float(i4_lds32<I2_NR>(na)),
					     __uint_as_float(i4_lds32<I2_NR + 32>(na)),
					     __uint_as_float(i4_lds32<I2_NR + 64>(na)),
					     __uint_as_float(i4_lds32<I2_NR + 96>(na))};
#pragma unroll
			for (int j = 0; j < 4; j++) {
				const int h = j >> 1, c = 2 * (j & 1);
				if constexpr (KB == 2 && !F16) /* two key chains (session 9) */
					slg[j] = (sacc[0][h][c] + sacc[0][h][c + 1] + sbias) * nr[j];
				else
					slg[j] = ((sacc[0][h][c] + sacc[1][h][c]) +
						  (sacc[0][h][c + 1] + sacc[1][h][c + 1]) + sbias) * nr[j];
			}
		} else {
			const uint32_t na = bcur + 8 * tig;
			uint2 nr[4];
			nr[0] = i4_lds64<I2_NR>(na);
			nr[1] = i4_lds64<I2_NR + 32>(na);
			nr[2] = i4_lds64<I2_NR + 64>(na);
			nr[3] = i4_lds64<I2_NR + 96>(na);
#pragma unroll
			for (int j = 0; j < 4; j++) {
				lg[j][0] = (acc[j][0] + acc[j][2] + bias) * __uint_as_float(nr[j].x);
				lg[j][1] = (acc[j][1] + acc[j][3] + bias) * __uint_as_float(nr[j].y);
			}
		}
		/* this unit's value codes, before the buffer takes unit u + 2 */
		uint32_t vcw[2][4];
		{
			const uint32_t va = bcur + vwo;
			vcw[0][0] = i4_lds32<0>(va);
			vcw[0][1] = i4_lds32<32>(va);
			vcw[0][2] = i4_lds32<256>(va);
			vcw[0][3] = i4_lds32<288>(va);
			vcw[1][0] = i4_lds32<512>(va);
			vcw[1][1] = i4_lds32<512 + 32>(va);
			vcw[1][2] = i4_lds32<512 + 256>(va);
			vcw[1][3] = i4_lds32<512 + 288>(va);
		}
		if (npc) {
			const uint16_t *pins = p.chunks[ccc].pins;
			for (uint32_t i = 0; i < npc; i++) {
				const uint32_t pt = pins[i];
#pragma unroll
				for (int j = 0; j < 4; j++) {
					if constexpr (SW) {
						if (pt == sbc * 32 + 8 * j + gid)
							slg[j] = -INFINITY;
						continue;
					}
					const uint32_t t = sbc * 32 + 8 * j + 2 * tig;
					if (pt == t)
						lg[j][0] = -INFINITY;
					if (pt == t + 1)
						lg[j][1] = -INFINITY;
				}
			}
		}
		/* swapped keys: the softmax's lazy rescaling of unit u, here before the staging and
		 * the conversions of unit u + 1 rather than after them, so that its branch does not
		 * end the block they share with the ex2 / hi-lo / movmatrix chain below (ptxas
		 * schedules within a block: the conversions' shared loads now overlap that chain).
		 * The reference m2 moves only when a logit exceeds it by more than I5_SLACK
		 * (p <= 2^I5_SLACK otherwise, exact in the f16 hi / lo split and fp32 sums), so the
		 * common unit needs no cross-lane maximum and no alpha. */
		if constexpr (SW) {
			float mx = fmaxf(fmaxf(slg[0], slg[1]), fmaxf(slg[2], slg[3]));
			if (__any_sync(KVT_FULL_MASK, mx > m2 + I5_SLACK)) {
				mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 4));
				mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 8));
				mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 16));
				const float mn = fmaxf(m2, mx);
				const float alpha = i3_ex2(m2 - (mn == -INFINITY ? 0.0f : mn));
#pragma unroll
				for (int i = 0; i < 8; i++)
#pragma unroll
					for (int j = 0; j < 4; j++)
						vacc[i][j] *= alpha;
				zacc[0] *= alpha;
				zacc[1] *= alpha;
				l2 *= alpha;
				m2 = mn;
			}
		}
		__syncwarp(); /* every lane is done with this buffer */
		const uint32_t sbn = ss, ccn = cs, npn = np_s; /* unit u + 1 */
		if (rem > 2) {
			advance();
			stage_unit(bcur, ss);
		}
		cp_async_commit();
		/* unit u + 1: its bytes, its conversions (the last iteration converts stale
		 * bytes of a finished buffer into words nobody reads) */
		cp_async_wait1();
		__syncwarp();
		if (GV == 32 || (sbn & gmask) == 0)
			conv_key(bcur ^ bx);
		conv_val(bcur ^ bx, vcur ^ vx);

		/* online softmax of unit u */
		uint32_t pt[4]; /* swapped: the value B fragments of the unit's 4 token tiles */
		float pv[4][2];
		if constexpr (SW) {
			const float ms = m2 == -INFINITY ? 0.0f : m2;
			float ls = 0.0f;
#pragma unroll
			for (int j = 0; j < 4; j++) {
				const float pj = i3_ex2(slg[j] - ms);
				ls += pj;
				pt[j] = i5_trans(i5_hilo(pj));
			}
			l2 += ls;
		} else {
			float mx = fmaxf(fmaxf(fmaxf(lg[0][0], lg[0][1]), fmaxf(lg[1][0], lg[1][1])),
					 fmaxf(fmaxf(lg[2][0], lg[2][1]), fmaxf(lg[3][0], lg[3][1])));
			mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 1));
			mx = fmaxf(mx, __shfl_xor_sync(KVT_FULL_MASK, mx, 2));
			const float mn = fmaxf(m2, mx);
			const float ms = mn == -INFINITY ? 0.0f : mn;
			const float alpha = i3_ex2(m2 - ms);
			float ls = 0.0f;
#pragma unroll
			for (int j = 0; j < 4; j++) {
				pv[j][0] = i3_ex2(lg[j][0] - ms);
				pv[j][1] = i3_ex2(lg[j][1] - ms);
				ls += pv[j][0] + pv[j][1];
			}
			l2 = fmaf(l2, alpha, ls);
			m2 = mn;
			if (!__all_sync(KVT_FULL_MASK, alpha == 1.0f)) {
				const float a0 = __shfl_sync(KVT_FULL_MASK, alpha, 8 * (tig & 1));
				const float a1 = __shfl_sync(KVT_FULL_MASK, alpha, 8 * (tig & 1) + 4);
#pragma unroll
				for (int i = 0; i < 8; i++) {
					vacc[i][0] *= a0;
					vacc[i][1] *= a1;
					vacc[i][2] *= a0;
					vacc[i][3] *= a1;
				}
				zacc[0] *= a0;
				zacc[1] *= a1;
			}
		}
#pragma unroll
		for (int kk = 0; kk < 2; kk++) {
			uint32_t b0, b1;
			if constexpr (SW) {
				b0 = pt[2 * kk];
				b1 = pt[2 * kk + 1];
			} else {
				b0 = i3_split(pv[2 * kk][0], pv[2 * kk][1], lo_f);
				b1 = i3_split(pv[2 * kk + 1][0], pv[2 * kk + 1][1], lo_f);
			}
			uint32_t u[4], ul[4], ur[4];
			u[0] = __byte_perm(vcw[kk][0], vcw[kk][1], 0x5410);
			u[1] = __byte_perm(vcw[kk][0], vcw[kk][1], 0x7632);
			u[2] = __byte_perm(vcw[kk][2], vcw[kk][3], 0x5410);
			u[3] = __byte_perm(vcw[kk][2], vcw[kk][3], 0x7632);
#pragma unroll
			for (int r = 0; r < 4; r++) {
				ul[r] = u[r] << 6;
				ur[r] = u[r] >> 6;
			}
			uint32_t s[2][3];
			uint32_t az[4];
			if (kk == 0) {
				s[0][0] = i4_lds32<0>(vcur + vso);
				s[1][0] = i4_lds32<16 * NG>(vcur + vso);
				az[0] = i4_lds32<0>(vcur + vzb);
				az[2] = i4_lds32<16 * NG>(vcur + vzb);
			} else {
				s[0][0] = i4_lds32<32 * NG>(vcur + vso);
				s[1][0] = i4_lds32<48 * NG>(vcur + vso);
				az[0] = i4_lds32<32 * NG>(vcur + vzb);
				az[2] = i4_lds32<48 * NG>(vcur + vzb);
			}
			az[1] = az[3] = zero;
			uint32_t sl[2][3]; /* f16 sessions: the scales' low parts */
#pragma unroll
			for (int r = 0; r < 2; r++) {
				if constexpr (F16) {
					s[r][0] = f16_split(s[r][0], sl[r][0]);
					sl[r][1] = i3_hmul2(sl[r][0], 0x44004400u);
					sl[r][2] = i3_hmul2(sl[r][0], 0x4C004C00u);
				}
				s[r][1] = i3_hmul2(s[r][0], 0x44004400u);
				s[r][2] = i3_hmul2(s[r][0], 0x4C004C00u);
			}
			i3_vstep<0, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<1, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<2, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<3, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<4, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<5, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<6, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			i3_vstep<7, F16>(vacc, ul, u, ur, s, sl, b0, b1, magic);
			mma16816_top(zacc[0], zacc[1], zs0, zs1, az, b0, b1);
		}
		bcur ^= bx;
		vcur ^= vx;
		sbc = sbn;
		ccc = ccn;
		npc = npn;
		__syncwarp(); /* unit u + 1's words are visible */
	}

	float l = l2;
	if constexpr (SW) { /* head tig; the lanes of one tig hold 4 tokens each */
		i5_store_partial<NG>(vacc, zacc, racc, gid, tig, vg);
		l += __shfl_xor_sync(KVT_FULL_MASK, l, 4);
		l += __shfl_xor_sync(KVT_FULL_MASK, l, 8);
		l += __shfl_xor_sync(KVT_FULL_MASK, l, 16);
		if (gid == 0) {
			rm[tig] = m2 * 0.69314718055994531f; /* back to the natural-log domain */
			rl[tig] = l;
		}
		return;
	}
	i2_store_partial<NG>(vacc, zacc, zsm, racc, gid, tig, vg);
	l += __shfl_xor_sync(KVT_FULL_MASK, l, 1);
	l += __shfl_xor_sync(KVT_FULL_MASK, l, 2);
	if (gid < 4 && tig == 0) {
		rm[gid] = m2 * 0.69314718055994531f; /* back to the natural-log domain */
		rl[gid] = l;
	}
}

/* ---- Pins folded into the coded items (p.fold) --------------------------------------------
 * The pinned tokens of an item's chunks (attention sinks: 4 per session in the benchmark)
 * used to be one exact item (one block) per chunk; at 48 x 4096 that is 384 of 1920 blocks,
 * each paying a full prologue for 4 tokens. Now the coded item's block stages their exact
 * rows (this KV head's K and V rows, up to I3_PMAX tokens; more are read from global memory)
 * into shared memory by cp.async in its prologue, and its merge (warp q = head q) rotates the
 * merged value partial back to the original basis (H is its own inverse; the combine then
 * rotates nothing) and adds the pinned tokens to the same online softmax. */
#define I3_PMAX 8

/* prologue: stages up to I3_PMAX pinned rows of the item's folded pin descriptors; returns
 * how many (uniform over the block). x0: the first descriptor (it.xb), read by the caller
 * before the grid dependency wait, so that its rows' copies wait for no load */
template <int D>
__device__ __forceinline__ uint32_t i3_pins_stage(const att_params &p, const att_item_dev &it,
						  uint16_t (*pinrow)[2][D], const att_item_dev &x0)
{
	uint32_t np = 0;
	auto rows = [&](const att_item_dev &xi) {
		/* a folded tail (after the pins) is read in the merge, not staged */
		const uint32_t n = xi.kind == ITEM_TAIL ? 0 : min(xi.count, I3_PMAX - np);
		for (uint32_t i = threadIdx.x; i < n * 32; i += ATT_THREADS) {
			const uint32_t t = i >> 5, kv = (i >> 4) & 1, pc = i & 15;
			const uint8_t *src = (kv ? xi.xv : xi.xk) +
					     ((size_t)t * p.H * D + (size_t)it.kv_head * D) * 2 + 16 * pc;
			cp_async16(&pinrow[np + t][kv][8 * pc], src);
		}
		np += n;
	};
	rows(x0);
	for (uint32_t x = it.xb + 1; x < it.xb + it.xn && np < I3_PMAX; x++)
		rows(p.items[x]);
	return np;
}

/* the low / high 16-bit element of a word of a session's exact rows (pins, tails), widened:
 * bf16, or f16 in f16 sessions */
template <bool F16> __device__ __forceinline__ float i3_lo16(uint32_t w)
{
	if constexpr (F16)
		return __half2float(__ushort_as_half((uint16_t)w));
	else
		return __uint_as_float(w << 16);
}

template <bool F16> __device__ __forceinline__ float i3_hi16(uint32_t w)
{
	if constexpr (F16)
		return __half2float(__ushort_as_half((uint16_t)(w >> 16)));
	else
		return __uint_as_float(w & 0xffff0000u);
}

/* a folded tail run (ITEM_TAIL) in the fold merge of warp q (head q; lane: channels lane*EPL..),
 * 32 tokens at a time: the logits by half warps (half h: tokens 16h + i, i = 0..15, each lane
 * 16 bytes of the row, so every load is two whole rows; summed over the half by shuffles and
 * kept by lane 16h + i), one online-softmax step for the 32, then the value rows (weights by
 * shuffle, the lane's channels). bf16 rows, 16-byte aligned (the plan folds no other tail).
 * Before session 16 a tail was exact items of its own: blocks with a full prologue, and a
 * combine where the group had been one item (127 tail tokens: INT2 1 x 131072 64.0 us
 * instead of 38.9, 48 x 4096 102.6 instead of 53.3; docs/gpu.md "Session 16"). Measured and
 * not taken: a lane reading its own row (32 rows in flight per load: ~3 us per 32 tokens),
 * and the tail split over the warps for every head with a second merge through shared
 * memory (its registers cost the unit loops 2-3 us in every case). */
template <int D, bool F16>
__device__ __forceinline__ void i3_tail_rows(const att_params &p, const att_item_dev &it,
					     const att_item_dev &xi, const float *qv, float &M,
					     float &L, float (&a)[D / 32], int lane)
{
	constexpr int EPL = D / 32, VB = 16; /* value rows in flight */
	static_assert(EPL == 4 && D / 8 == 16, "d 128: 4 channels a lane, a row in 16 pieces");
	const size_t sb = (size_t)p.H * D * 2; /* bytes per token row */
	const int half = lane >> 4, piece = lane & 15;
	const uint8_t *kb = xi.xk + (size_t)it.kv_head * D * 2 + piece * 16;
	const uint8_t *vb = xi.xv + (size_t)it.kv_head * D * 2 + lane * EPL * 2;
	const float4 c0 = *(const float4 *)(qv + 8 * piece);
	const float4 c1 = *(const float4 *)(qv + 8 * piece + 4);
	for (uint32_t t0 = 0; t0 < xi.count; t0 += 32) {
		const uint32_t n = min(32u, xi.count - t0);
		uint4 w[16];
#pragma unroll
		for (int i = 0; i < 16; i++) {
			const uint32_t r = 16 * half + i;
			w[i] = r < n ? __ldg((const uint4 *)(kb + (size_t)(t0 + r) * sb))
				     : make_uint4(0u, 0u, 0u, 0u);
		}
		float s = -INFINITY;
#pragma unroll
		for (int i = 0; i < 16; i++) {
			float x = c0.x * i3_lo16<F16>(w[i].x);
			x = fmaf(c0.y, i3_hi16<F16>(w[i].x), x);
			x = fmaf(c0.z, i3_lo16<F16>(w[i].y), x);
			x = fmaf(c0.w, i3_hi16<F16>(w[i].y), x);
			x = fmaf(c1.x, i3_lo16<F16>(w[i].z), x);
			x = fmaf(c1.y, i3_hi16<F16>(w[i].z), x);
			x = fmaf(c1.z, i3_lo16<F16>(w[i].w), x);
			x = fmaf(c1.w, i3_hi16<F16>(w[i].w), x);
			x += __shfl_xor_sync(KVT_FULL_MASK, x, 8);
			x += __shfl_xor_sync(KVT_FULL_MASK, x, 4);
			x += __shfl_xor_sync(KVT_FULL_MASK, x, 2);
			x += __shfl_xor_sync(KVT_FULL_MASK, x, 1);
			if (piece == i && (uint32_t)lane < n)
				s = x;
		}
		const float Mn = fmaxf(M, warp_max(s));
		const float fo = __expf(M - Mn); /* exp(-inf) = 0 */
		const float pt = (uint32_t)lane < n ? __expf(s - Mn) : 0.0f;
		L = fmaf(L, fo, warp_sum(pt));
		M = Mn;
#pragma unroll
		for (int e = 0; e < EPL; e++)
			a[e] *= fo;
		for (uint32_t j0 = 0; j0 < n; j0 += VB) { /* uniform */
			uint2 vv[VB];
#pragma unroll
			for (int j = 0; j < VB; j++)
				vv[j] = j0 + j < n ? __ldg((const uint2 *)(vb + (size_t)(t0 + j0 + j) * sb))
						   : make_uint2(0u, 0u);
#pragma unroll
			for (int j = 0; j < VB; j++) {
				const float pj = __shfl_sync(KVT_FULL_MASK, pt, j0 + j); /* 0 past n */
				a[0] = fmaf(pj, i3_lo16<F16>(vv[j].x), a[0]);
				a[1] = fmaf(pj, i3_hi16<F16>(vv[j].x), a[1]);
				a[2] = fmaf(pj, i3_lo16<F16>(vv[j].y), a[2]);
				a[3] = fmaf(pj, i3_hi16<F16>(vv[j].y), a[3]);
			}
		}
	}
}

/* The folded tail (ITEM_TAIL descriptors of the item) on tensor cores, by the whole block
 * (session 18): warp w takes the runs' 16-token tiles w, w + 4, ... for all of the item's
 * query heads at once, the way the exact kernel does (kvt_cuda_attend_exact.cu: A = the
 * heads' high parts in rows 0-7 and the rest in rows 8-15, B = key rows straight from
 * memory, values transposed by movmatrix), and leaves its partial for head g (maximum, sum,
 * channels; natural-log domain) in tm / tl / tacc [warp][g]; the caller merges the warps'.
 * qfr: [D / 16][32] A fragments built here from qo (the original-basis scaled queries);
 * every thread of the block calls it. bf16 (F16: f16) rows, 16-byte aligned (the plan folds
 * no other tail).
 * Sessions 16-17 attended the tail with one warp per query head on CUDA cores (16-byte
 * loads, shuffle sums): ~1,300 instructions per warp per 32 tokens, all of a head's tokens
 * in one warp. At 48 x 4096 every item carries the whole tail and every block reaches its
 * merge at once, so that work was 11.6 us of the step's 67.8 (H200, session 18's timeline
 * of main). */
template <int D, bool F16>
__device__ __forceinline__ void i3_tail_mma(const att_params &p, const att_item_dev &it,
					    const float *qo, uint4 *qfr, float *tm, float *tl,
					    float *tacc, int lane, int warp)
{
	constexpr uint32_t DT = F16 ? KVT_DTYPE_F16 : KVT_DTYPE_BF16;
	constexpr int PPL = D / 32; /* 16-byte pieces of a row per lane of a quad */
	static_assert(RQ <= 8, "the score MMA's rows 0-7 hold the query heads");
	ex_query_frags<D, DT, RQ>(qo, qfr); /* qo is 0 past the item's heads */
	__syncthreads();
	float acc[4 * PPL][4]; /* ex_tile_attend's output tiles */
#pragma unroll
	for (int i = 0; i < 4 * PPL; i++)
		acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
	float m = -INFINITY, l = 0.0f; /* head lane / 4's running maximum and sum */
	const size_t row_bytes = (size_t)p.H * D * 2;
	for (uint32_t x = it.xb; x < it.xb + it.xn; x++) {
		const att_item_dev xi = p.items[x];
		if (xi.kind != ITEM_TAIL)
			continue;
		const uint32_t n = xi.count, tiles = (n + 15) / 16;
		for (uint32_t tt = warp; tt < tiles; tt += ATT_WARPS) {
			const uint32_t r0 = tt * 16;
			const size_t off = ((size_t)r0 * p.H + it.kv_head) * D * 2;
			uint4 kw[2][PPL], vw[2][PPL];
			ex_tile_load<PPL>(kw, vw, xi.xk + off, xi.xv + off, row_bytes, r0, n, lane);
			ex_tile_attend<D, DT>(qfr, kw, vw, r0, n, m, l, acc, lane);
		}
	}
	ex_partial_store<D, RQ>(m, l, acc, 1.0f / ex_p_scale<DT>(), tm + warp * RQ, tl + warp * RQ,
				tacc + (size_t)warp * RQ * D, lane);
}

/* the merge of a folded item: warp q merges head q over the warps, rotates it back (coded
 * items), adds the pinned tokens and the folded tail (i3_tail_mma; natural-log domain,
 * original-basis scaled query qo) and writes the item's partial, or, when every group of the
 * plan is one item (p.fused 2), the normalised output itself (out: the request's): no
 * partial, no counter, no combine (session 9, H200: -2.4 us per step at 48 x 4096 INT2, -3.4
 * K3 V2, against the fused combine of one item, which fenced, counted and merged the partial
 * back; docs/gpu.md).
 * red_m / red_l [ATT_WARPS][RQ], warp w's partial at red_acc + w * wstride ([RQ][D]); the
 * pinned rows staged are visible (waited and synced by the caller's cp_async_wait_all and the
 * barrier here). A folded tail reuses red_m / red_l, the stage under red_acc and qfr (the
 * unit loop's A fragments, [D / 16][32]) once every warp has read its partials. */
template <int D, bool TC, bool F16>
__device__ __forceinline__ void i3_fold_merge(const att_params &p, const att_item_dev &it,
					      float *red_m, float *red_l, float *red_acc,
					      size_t wstride, const float *qo, uint4 *qfr,
					      const uint16_t (*pinrow)[2][D], uint32_t np, float *out)
{
	static_assert(RQ == ATT_WARPS && D == 128, "one warp per query head, 4 channels a lane");
	constexpr int EPL = D / 32;
	__syncthreads();
	const int lane = threadIdx.x & 31, q = threadIdx.x >> 5;
	float M = -INFINITY;
#pragma unroll
	for (int w = 0; w < ATT_WARPS; w++)
		M = fmaxf(M, red_m[w * RQ + q]);
	float L = 0.0f, a[EPL] = {0.0f, 0.0f, 0.0f, 0.0f};
	if (M != -INFINITY) {
#pragma unroll
		for (int w = 0; w < ATT_WARPS; w++) {
			const float f = __expf(red_m[w * RQ + q] - M);
			const float4 v = *(const float4 *)(red_acc + (size_t)w * wstride + q * D + lane * EPL);
			L += red_l[w * RQ + q] * f;
			a[0] += v.x * f;
			a[1] += v.y * f;
			a[2] += v.z * f;
			a[3] += v.w * f;
		}
	}
	if (it.kind == ITEM_CODED && p.rotv) /* uniform */
		kvt_d_fwht<EPL>(a, lane, p.inv_sqrt_d);
	bool tail = false; /* uniform: every warp walks the same descriptors */
	if (it.xn) {
		const float4 qv = *(const float4 *)(qo + q * D + lane * EPL);
		uint32_t j = 0; /* pinned token index over the item's descriptors */
		for (uint32_t x = it.xb; x < it.xb + it.xn; x++) {
			const att_item_dev xi = p.items[x];
			if (xi.kind == ITEM_TAIL) {
				if constexpr (TC)
					tail = true;
				else
					i3_tail_rows<D, F16>(p, it, xi, qo + q * D, M, L, a, lane);
				continue;
			}
			for (uint32_t t = 0; t < xi.count; t++, j++) {
				uint2 kk, vv;
				if (j < np) {
					kk = *(const uint2 *)&pinrow[j][0][lane * EPL];
					vv = *(const uint2 *)&pinrow[j][1][lane * EPL];
				} else {
					const size_t o = ((size_t)t * p.H * D + (size_t)it.kv_head * D + lane * EPL) * 2;
					kk = *(const uint2 *)(xi.xk + o);
					vv = *(const uint2 *)(xi.xv + o);
				}
				float s = qv.x * i3_lo16<F16>(kk.x);
				s = fmaf(qv.y, i3_hi16<F16>(kk.x), s);
				s = fmaf(qv.z, i3_lo16<F16>(kk.y), s);
				s = fmaf(qv.w, i3_hi16<F16>(kk.y), s);
				s = warp_sum(s);
				const float Mn = fmaxf(M, s);
				const float fo = __expf(M - Mn), pt = __expf(s - Mn); /* exp(-inf) = 0 */
				M = Mn;
				L = fmaf(L, fo, pt);
				a[0] = fmaf(a[0], fo, pt * i3_lo16<F16>(vv.x));
				a[1] = fmaf(a[1], fo, pt * i3_hi16<F16>(vv.x));
				a[2] = fmaf(a[2], fo, pt * i3_lo16<F16>(vv.y));
				a[3] = fmaf(a[3], fo, pt * i3_hi16<F16>(vv.y));
			}
		}
	}
	if (TC && tail) {
		__syncthreads(); /* every warp has read its partials: red_* are free */
		i3_tail_mma<D, F16>(p, it, qo, qfr, red_m, red_l, red_acc, lane, q);
		__syncthreads();
		float Mx = M;
#pragma unroll
		for (int w = 0; w < ATT_WARPS; w++)
			Mx = fmaxf(Mx, red_m[w * RQ + q]);
		if (Mx != -INFINITY) {
			const float f0 = __expf(M - Mx); /* exp(-inf) = 0 */
			L *= f0;
#pragma unroll
			for (int e = 0; e < EPL; e++)
				a[e] *= f0;
#pragma unroll
			for (int w = 0; w < ATT_WARPS; w++) {
				const float f = __expf(red_m[w * RQ + q] - Mx);
				const float4 v = *(const float4 *)(red_acc + (size_t)(w * RQ + q) * D + lane * EPL);
				L = fmaf(red_l[w * RQ + q], f, L);
				a[0] = fmaf(v.x, f, a[0]);
				a[1] = fmaf(v.y, f, a[1]);
				a[2] = fmaf(v.z, f, a[2]);
				a[3] = fmaf(v.w, f, a[3]);
			}
			M = Mx;
		}
	}
	if (p.fused == 2) { /* uniform */
		if ((uint32_t)q < it.nq) {
			const float inv = L > 0.0f ? 1.0f / L : 0.0f;
			float *o = out + (size_t)(it.q_base + q) * D + lane * EPL;
#pragma unroll
			for (int e = 0; e < EPL; e++)
				o[e] = a[e] * inv;
		}
		return;
	}
	*(float4 *)(p.part_acc + ((size_t)blockIdx.x * RQ + q) * D + lane * EPL) =
		make_float4(a[0], a[1], a[2], a[3]);
	if (lane == 0) {
		p.part_ml[((size_t)blockIdx.x * RQ + q) * 2] = M;
		p.part_ml[((size_t)blockIdx.x * RQ + q) * 2 + 1] = L;
	}
}

/* V 2: attend_coded_i4 (session 6: two units in flight); V 3: the same loop with the swapped
 * key orientation (session 8; 3-bit keys since session 9); V 1 (session 2's kernel), the first
 * V 3 (bulk-copy staging), V 4 (session 5's loop) and V 5 (one unit in flight) were removed in
 * sessions 5 and 6; MINB: blocks per SM the registers must allow; KB: key bits (2 or 3); TC:
 * the folded tail on tensor cores; F16: an f16 session (scales, exact rows; swapped loop only,
 * session 21), else bf16 */
template <int GV, int V, int MINB, int KB = 2, bool TC = false, bool F16 = false>
__global__ void __launch_bounds__(ATT_THREADS, MINB) attend_i2_kernel(att_params p)
{
	constexpr int D = 128, EPL = D / 32, BUF = i3_buf_bytes<KB>();
	static_assert(V == 2 || V == 3, "keys-as-B, or swapped keys");
	__shared__ __align__(16) float qo[RQ * D]; /* scaled query, original basis */
	__shared__ __align__(16) float qf[RQ * D]; /* scaled query, rotated basis */
	__shared__ __align__(16) uint8_t stage[ATT_WARPS][2 * BUF];
	__shared__ __align__(16) uint4 afr[8 * 32]; /* q' key A fragments [k][lane] */
	__shared__ __align__(16) uint32_t cw[ATT_WARPS][I3_CW];
	__shared__ float zsm[ATT_WARPS][16];
	__shared__ float red_m[ATT_WARPS][RQ], red_l[ATT_WARPS][RQ];
	__shared__ __align__(16) uint16_t pinrow[I3_PMAX][2][D]; /* folded pins */
	/* the warps' partial outputs [RQ][D] reuse their own stage buffers once done */
	float *red_acc = (float *)&stage[0][0];
	static_assert(RQ * D * 4 <= 2 * BUF, "red_acc fits a warp's stage");
	static_assert(ATT_WARPS * RQ * D * 4 <= sizeof(stage) && D / 16 * 32 <= 8 * 32,
		      "the folded tail's partials fit the stages, its A fragments afr");

	/* launched as a programmatic dependent of the previous step's last kernel (plan->chain):
	 * the plan's descriptors (item, request, chunks) are read before the grid dependency wait
	 * (session 10): they are written once, by the plan build's upload (waited for before the
	 * build returns), and never by a kernel, so the kernel before this one cannot change
	 * them; everything else (queries, chunk bytes, exact rows) is read after the wait, which
	 * returns once that grid has completed and its writes are visible (a no-op for an
	 * ordinary launch); then the combine may launch once every block has started */
	if (threadIdx.x == 0)
		ATT_TL(p.tl, blockIdx.x * ATT_TL_SLOTS + ATT_TL_RESIDENT);
	const att_item_dev it = p.items[blockIdx.x];
	const att_req_dev rq = p.reqs[it.req];
	att_item_dev x0; /* the first folded pin descriptor (set and read only when it.xn) */
	if (it.xn)
		x0 = p.items[it.xb];
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	static_assert(RQ == ATT_WARPS, "warp q loads query head q");
	/* pre: the wait, then warp q's loads of query head q (raw bits: widened in mid, so that
	 * no instruction waits for them before the first units' copies are issued) */
	uint32_t xr[EPL];
	/* p.wait1 (KVTIER_CUDA_WAIT1=1, A/B only, session 12): thread 0 alone waits (the wait
	 * makes the previous grid's writes visible to this grid) and the block meets it at a
	 * barrier */
	auto pre = [&]() {
		if (!p.wait1 || threadIdx.x == 0)
			kvt_grid_dep_wait();
		if (p.wait1)
			__syncthreads();
		kvt_grid_dep_launch();
		if (threadIdx.x == 0)
			ATT_TL(p.tl, blockIdx.x * ATT_TL_SLOTS + ATT_TL_ENTRY);
		ATT_TL_AT(p.tl, blockIdx.x * ATT_TL_SLOTS + ATT_TL_WHERE, warp, lane);
		const size_t qi = (size_t)(it.q_base + warp) * D + lane * EPL;
#pragma unroll
		for (int e = 0; e < EPL; e++)
			xr[e] = (uint32_t)warp >= it.nq ? 0u : kvt_d_ld_raw(rq.q, qi + e, rq.q_dtype);
	};
	/* mid: the folded pins' rows (copied while the loop starts: the next commit takes them),
	 * the query rotation, then every lane's q' fragments */
	uint32_t npin = 0;
	auto mid = [&]() {
		if (it.xn) /* folded pins (p.fold): their rows, for the merge */
			npin = i3_pins_stage<D>(p, it, pinrow, x0);
		float x[EPL];
#pragma unroll
		for (int e = 0; e < EPL; e++) {
			const float v = kvt_d_widen(xr[e], rq.q_dtype);
			x[e] = (uint32_t)warp < it.nq ? v * rq.scale : 0.0f;
			qo[warp * D + lane * EPL + e] = x[e];
		}
		if (p.rotk)
			kvt_d_fwht<EPL>(x, lane, p.inv_sqrt_d);
#pragma unroll
		for (int e = 0; e < EPL; e++)
			qf[warp * D + lane * EPL + e] = x[e];
		__syncthreads();
		/* warp w builds k-steps 2w, 2w + 1 of every lane's q' fragment: head gid & 3,
		 * channel pairs 2k, 2k + 1, f16 hi and lo of q' * -4 log2(e) */
		const int gid = lane >> 2, tig = lane & 3, hq = gid & 3;
		const float sc = -4.0f * I3_LOG2E;
#pragma unroll
		for (int kk = 0; kk < 2; kk++) {
			const int k = 2 * warp + kk;
			uint32_t f[4];
#pragma unroll
			for (int j = 0; j < 2; j++) {
				const int pr = 2 * k + j, c0 = tig * 32 + (pr / 8) * 16 + pr % 8;
				split_h2(qf[hq * D + c0] * sc, qf[hq * D + c0 + 8] * sc, f[2 * j], f[2 * j + 1]);
			}
			afr[k * 32 + lane] = make_uint4(f[0], f[1], f[2], f[3]);
		}
		__syncthreads();
		if (threadIdx.x == 0)
			ATT_TL(p.tl, blockIdx.x * ATT_TL_SLOTS + ATT_TL_PROLOGUE);
	};
	/* a warp's reduction slot is the start of its own stage: its own copies are done */
	float *racc = (float *)&stage[warp][0];
	if (it.kind == ITEM_CODED) {
		uint32_t units = it.count * (p.B / 32);
		uint32_t per = (units + ATT_WARPS - 1) / ATT_WARPS;
		uint32_t u0 = min(units, warp * per), u1 = min(units, u0 + per);
		attend_coded_i4<GV, KB, V == 3, F16>(p, it, u0, u1, afr, &stage[warp][0], cw[warp],
						zsm[warp], red_m[warp], red_l[warp], racc,
						(uint32_t *)qf + warp * 128, lane, pre, mid);
		cp_async_wait_all();
		__syncwarp();
	} else {
		pre();
		mid();
		cp_async_commit();
		warp_state<EPL, RQ> st;
		state_init<EPL, RQ>(st);
		float *pbuf = (float *)&stage[warp][RQ * D * 4]; /* 32 x RQ floats after racc */
		uint32_t per = (it.count + ATT_WARPS - 1) / ATT_WARPS;
		uint32_t t0 = min(it.count, warp * per), t1 = min(it.count, t0 + per);
		size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
		size_t stride = (size_t)p.H * D, off = ((size_t)t0 * stride + (size_t)it.kv_head * D) * ws;
		/* element loads, as before session 16: this kernel's unit loop is compiled
		 * around this branch (with the vector form its 3-bit-key loop ran 2-3% slower);
		 * tails are folded into the coded items' merge instead (i3_tail_mma) */
		attend_rows_scalar<D, RQ>(p, st, it.xk + off, it.xv + off, t1 - t0, stride, qo, pbuf,
					  lane);
		state_store<D, RQ>(st, red_m[warp], red_l[warp], racc, lane);
	}
	if (lane == 0)
		ATT_TL(p.tl, blockIdx.x * ATT_TL_SLOTS + ATT_TL_LOOP + warp);
	if (p.fold)
		i3_fold_merge<D, TC, F16>(p, it, &red_m[0][0], &red_l[0][0], red_acc, 2 * BUF / 4, qo,
				     afr, pinrow, npin, rq.out);
	else
		block_merge<D, RQ>(p, &red_m[0][0], &red_l[0][0], red_acc, 2 * BUF / 4);
	if (threadIdx.x == 0)
		ATT_TL(p.tl, blockIdx.x * ATT_TL_SLOTS + ATT_TL_MERGE);
	if (p.fused != 1) /* 2: the output is written (i3_fold_merge) */
		return;
	/* fused combine: the block that completes its group merges it */
	__shared__ uint32_t s_last;
	__threadfence(); /* this block's partial is visible before it is counted */
	__syncthreads();
	if (threadIdx.x == 0) {
		const att_group_dev g = p.groups[it.group];
		const uint32_t done = atomicAdd(&p.counters[it.group], 1u) + 1u;
		s_last = done == g.item_end - g.item_begin;
		if (s_last)
			p.counters[it.group] = 0; /* every item of this run has counted */
	}
	__syncthreads();
	if (!s_last)
		return;
	__threadfence();
	static_assert(RQ * ATT_WARPS * (2 + 2 * D) * 4 <= ATT_WARPS * 2 * BUF, "fits the stages");
	combine_group_in_block<D>(p, it.group, (float *)&stage[0][0]);
}


/* p.i2: 2 the keys-as-B loop, 3 its swapped key orientation (INT2 and 3-bit keys). MINB 5
 * for the keys-as-B kernel (96 registers, 152 bytes of spills, 5 blocks per SM) measured
 * slower on the H200: 68.0 vs 58.1 us at 1 x 131072, 124.8 vs 106.9 at 8 x 32768, 110.0 vs 99.8 at 48 x 4096. MINB 3
 * (session 5, the default since: 157-168 registers, no spills) measured faster than 4, same
 * call: INT2 53.9 vs 54.8 us at 1 x 131072, 75.8 vs 86.2 at 48 x 4096 (most of that from the
 * plan cutting for 3 resident blocks: fewer, longer items; 4 with that cutting: 77.2), K3 V2
 * 60.3 vs 64.2 at 1 x 131072 (63.1 with MINB 4 and the same cutting) (docs/gpu.md). Session 9,
 * the swapped INT2 G32 loop at MINB 4 (a lean form, 128 registers, no spills, the same 573
 * instructions per unit as MINB 3, 512 items instead of 392 at 1 x 131072) measured slower
 * than at MINB 3, same call: 45.2-45.3 vs 44.3-44.5 us at 1 x 131072, 77.2-77.7 vs 75.9-76.6
 * at 8 x 32768, 62.3-62.5 vs 61.0-61.8 at 48 x 4096; removed again (65258f4 has it). */
template <int GV, int V, int MINB, int KB = 2, bool TC = false, bool F16 = false>
static cudaError_t i2_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	/* plan->chain: a programmatic dependent launch, so that the blocks are resident (waiting
	 * in kvt_grid_dep_wait) when the kernel before them ends, instead of being launched then */
	cudaLaunchAttribute at;
	const cudaLaunchConfig_t lc = kvt_launch_config(dim3(pl->n_items), dim3(ATT_THREADS), 0, s,
							pl->chain != 0, &at);
	cudaError_t e = cudaLaunchKernelEx(&lc, attend_i2_kernel<GV, V, MINB, KB, TC, F16>, pl->p);
	if (e == cudaSuccess)
		e = cudaGetLastError();
	if (e != cudaSuccess || pl->p.fused)
		return e;
	return kvt_att_combine_launch(pl, s);
}

template <int V, int MINB, int KB = 2, bool TC = false, bool F16 = false>
static cudaError_t i2_launch_gt(const kvt_cuda_attend_plan *pl, cudaStream_t s, uint32_t gv)
{
	return gv == 32	  ? i2_launch<32, V, MINB, KB, TC, F16>(pl, s)
	       : gv == 64 ? i2_launch<64, V, MINB, KB, TC, F16>(pl, s)
			  : i2_launch<128, V, MINB, KB, TC, F16>(pl, s);
}

/* p.tail_tc (the folded tail on tensor cores, plan build) has instantiations of its own, for
 * the swapped loop only: with that code in the merge, ptxas compiles the unit loop ~5% longer
 * (INT2 G32: 929 instead of 880 instructions; H200, session 18: +1.4 us at 1 x 131072 with
 * no tail), so plans that do not take it keep the kernel they had */
template <int V, int MINB, int KB = 2>
static cudaError_t i2_launch_g(const kvt_cuda_attend_plan *pl, cudaStream_t s, uint32_t gv)
{
	if constexpr (V == 3 && MINB == 3) {
		if (pl->p.dtype == KVT_DTYPE_F16) /* f16 sessions (session 21): their own forms */
			return pl->p.tail_tc ? i2_launch_gt<V, MINB, KB, true, true>(pl, s, gv)
					     : i2_launch_gt<V, MINB, KB, false, true>(pl, s, gv);
		if (pl->p.tail_tc)
			return i2_launch_gt<V, MINB, KB, true>(pl, s, gv);
	}
	return i2_launch_gt<V, MINB, KB, false>(pl, s, gv);
}

/* The unit loops are compiled for 3 blocks per SM (up to 168 registers; session 6's keys-as-B
 * loop: INT2 G32 154, K3 G64 158; session 9's swapped INT2 G32 loop 157; no spills).
 * KVTIER_CUDA_MINB4=1 (A/B runs) takes the keys-as-B loop built for 4 (128 registers) at the
 * benchmark shapes (INT2 G32, K3 G64; with KVTIER_CUDA_I2_SWAP=0). The launch, the occupancy
 * query and hence the plan's cut follow the same choice. */
static bool i2_minb4(uint32_t kb, uint32_t gv, uint32_t variant)
{
	static int on = -1;
	if (on < 0)
		on = getenv("KVTIER_CUDA_MINB4") && atoi(getenv("KVTIER_CUDA_MINB4")) != 0;
	return on && variant == 2 && ((kb == 3 && gv == 64) || (kb == 2 && gv == 32));
}

cudaError_t kvt_att_i2_launch(const kvt_cuda_attend_plan *pl, cudaStream_t s)
{
	const uint32_t gv = pl->p.G < 128 ? pl->p.G : 128;
	if (i2_minb4(pl->p.kb, gv, pl->p.i2))
		return pl->p.kb == 3 ? i2_launch<64, 2, 4, 3>(pl, s) : i2_launch<32, 2, 4, 2>(pl, s);
	if (pl->p.kb == 3) /* p.i2 3: the swapped key orientation */
		return pl->p.i2 == 3 ? i2_launch_g<3, 3, 3>(pl, s, gv) : i2_launch_g<2, 3, 3>(pl, s, gv);
	return pl->p.i2 == 3 ? i2_launch_g<3, 3>(pl, s, gv) : i2_launch_g<2, 3>(pl, s, gv);
}

template <int GV, int V, int MINB, int KB = 2, bool F16 = false> static int i2_occupancy(void)
{
	return att_blocks_per_sm(attend_i2_kernel<GV, V, MINB, KB, false, F16>);
}

template <int V, int MINB, int KB = 2, bool F16 = false> static int i2_occupancy_g(uint32_t gv)
{
	return gv == 32	  ? i2_occupancy<32, V, MINB, KB, F16>()
	       : gv == 64 ? i2_occupancy<64, V, MINB, KB, F16>()
			  : i2_occupancy<128, V, MINB, KB, F16>();
}

int kvt_att_i2_blocks_per_sm(uint32_t variant, uint32_t gv, uint32_t kb, bool f16)
{
	if (f16) /* the swapped loop only (the plan takes no other for f16 sessions) */
		return kb == 3 ? i2_occupancy_g<3, 3, 3, true>(gv) : i2_occupancy_g<3, 3, 2, true>(gv);
	if (i2_minb4(kb, gv, variant))
		return kb == 3 ? i2_occupancy<64, 2, 4, 3>() : i2_occupancy<32, 2, 4, 2>();
	if (kb == 3)
		return variant == 3 ? i2_occupancy_g<3, 3, 3>(gv) : i2_occupancy_g<2, 3, 3>(gv);
	return variant == 3 ? i2_occupancy_g<3, 3>(gv) : i2_occupancy_g<2, 3>(gv);
}

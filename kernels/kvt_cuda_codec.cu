/*
 * kvt_cuda_codec.cu - the CUDA context, device memory helpers, chunk encode and decode
 * (OSCAR.md section 2, the chunk layout of kvt_codec.h), and the chunk crc32c on the GPU.
 *
 * Encode: the tensor-core encoder mx_kernel (kvt_cuda_enc_mma.cu; the default for oscar /
 * kivi f16/bf16 d 64/128 G 32 2/4-bit, codes equal to the CPU's except at rounding ties), else
 * fe_kernel (oscar / kivi when the key tile fits in shared memory) or enc_kernel (everything
 * else, and KVTIER_CUDA_CODEC_OLD=1); those two follow the CPU's float operations
 * (cuda_internal.cuh), so their bytes match kvt_encode_chunk's (fe_kernel: up to which zero a
 * -0 / +0 tie of a min or max keeps); KVTIER_CUDA_ENC_EXACT=1 takes them for every config.
 * The crc32c is computed on the GPU from per-segment CRCs combined by GF(2) polynomial
 * multiplication (crc10_kernel, its table lookups by shfl from registers, launched as the
 * tensor-core encoder's programmatic dependent so that it hashes finished chunks during the
 * encoder's last wave), so the chunk never visits the host. Decode: fd_kernel (R lanes per row) or
 * dec_kernel (KVTIER_CUDA_CODEC_OLD=1), both exact. docs/gpu.md "session 3" has the numbers.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.cuh"
#include "kvt_cuda_enc.cuh"

#define STAGE_BYTES (4u << 20)

int kvt_cuda_errf(char *err, size_t errlen, int rc, const char *fmt, ...)
{
	if (err && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return rc;
}

int kvt_cuda_check(cudaError_t e, const char *what, char *err, size_t errlen)
{
	if (e == cudaSuccess)
		return 0;
	int rc = e == cudaErrorMemoryAllocation ? -ENOMEM
		 : (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) ? -ENODEV
		 : e == cudaErrorInvalidValue ? -EINVAL
						 : -EIO;
	return kvt_cuda_errf(err, errlen, rc, "%s: %s (%s)", what, cudaGetErrorString(e),
			     cudaGetErrorName(e));
}

#define CK(call, what)                                                                     \
	do {                                                                               \
		int rc_ = kvt_cuda_check((call), (what), err, errlen);                     \
		if (rc_)                                                                   \
			return rc_;                                                        \
	} while (0)

/* ---- crc32c (Castagnoli, reflected 0x82F63B78) -------------------------------------------- */

#define CRC_POLY 0x82f63b78u
#define CRC_SEG 1024 /* bytes per thread */

__device__ uint32_t g_crc_table[8][256];
__device__ uint32_t g_crc_x2n[32];
/* the crc pass's regions of CRC_REGION bytes, laid from the chunk's end: g_crc_reg[r] moves a
 * crc over r regions (x^(8 CRC_REGION r); multiplication by x^(8n) mod P is linear over
 * GF(2)) */
#define CRC_REGION 8192
#define CRC_NREG 8192 /* regions in the table: chunks up to 64 MiB; longer ones compute it */
__device__ uint32_t g_crc_reg[CRC_NREG];
/* crc10_kernel's, per stage size SB = 4096 >> z (lane runs of SB / 32 bytes, two chains of
 * SB / 64 bytes each; z = 1 is not instantiated): g_crc10_xh[z] = x^(8 SB / 64) (chain A onto
 * B's end), g_crc10_lane[z][l] = x^(8 (SB / 32) (31 - l)) (lane l's run onto the stage's end);
 * the lookup tables, one entry per lane (read by shfl): g_crc10_t[p][v] = raw crc of the
 * 16-byte word whose bits 5p .. 5p + 4 are v (the rest 0), p = 0..25; g_crc10_g[z][p][v] = the
 * map of the 32-bit value v << 5p over SB - SB / 64 bytes (a chain to its run in the next
 * stage), p = 0..6 */
__device__ uint32_t g_crc10_xh[2];
__device__ uint32_t g_crc10_lane[2][32];
__device__ uint32_t g_crc10_t[26][32];
__device__ uint32_t g_crc10_g[2][7][32];

/* a * b mod P in the reflected representation (a != 0), as zlib's multmodp */
__host__ __device__ static uint32_t crc_multmodp(uint32_t a, uint32_t b)
{
	uint32_t m = 1u << 31, p = 0;
	for (;;) {
		if (a & m) {
			p ^= b;
			if ((a & (m - 1)) == 0)
				break;
		}
		m >>= 1;
		b = (b & 1) ? (b >> 1) ^ CRC_POLY : b >> 1;
	}
	return p;
}

/* x^(n * 2^k) mod P */
__device__ static uint32_t crc_x2nmodp(uint64_t n, unsigned k)
{
	uint32_t p = 1u << 31;
	while (n) {
		if (n & 1)
			p = crc_multmodp(g_crc_x2n[k & 31], p);
		n >>= 1;
		k++;
	}
	return p;
}

static int crc_tables_upload(char *err, size_t errlen)
{
	static uint32_t t[8][256], x2n[32];
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (CRC_POLY & (0u - (c & 1u)));
		t[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int s = 1; s < 8; s++)
			t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
	uint32_t p = 1u << 30; /* x^1 */
	x2n[0] = p;
	for (int n = 1; n < 32; n++)
		x2n[n] = p = crc_multmodp(p, p);
	CK(cudaMemcpyToSymbol(g_crc_table, t, sizeof(t)), "crc table upload");
	CK(cudaMemcpyToSymbol(g_crc_x2n, x2n, sizeof(x2n)), "crc table upload");
	/* x^(8 n) for n = 16, 128, 512, 1008, CRC_REGION * r, by repeated multiplication */
	uint32_t x16 = 1u << 31;
	for (uint32_t b = 0; b < 8 * 16; b++) /* x^1 multiplied in 128 times */
		x16 = crc_multmodp(1u << 30, x16);
	uint32_t x512 = 1u << 31;
	for (int k = 0; k < 32; k++)
		x512 = crc_multmodp(x16, x512);
	uint32_t x1008 = x512;
	for (int k = 0; k < 31; k++) /* 512 + 31 * 16 */
		x1008 = crc_multmodp(x16, x1008);
	uint32_t one_reg = crc_multmodp(x1008, x16); /* x^(8 * 1024), squared three times */
	for (int k = 0; k < 3; k++)
		one_reg = crc_multmodp(one_reg, one_reg);
	static uint32_t reg[CRC_NREG];
	reg[0] = 1u << 31;
	for (int r = 1; r < CRC_NREG; r++)
		reg[r] = crc_multmodp(one_reg, reg[r - 1]);
	CK(cudaMemcpyToSymbol(g_crc_reg, reg, sizeof(reg)), "crc table upload");
	/* crc10: for SB = 4096, 2048: x^(8 SB / 64) = x16^(SB / 1024), x^(8 (SB - SB / 64)) =
	 * (x^(8 SB / 64))^63 (as a 4-table map gm9, then per 5-bit piece), x^(8 (SB / 32) (31 - l)) */
	static uint32_t gm9[2][4][256], xh9[2], lane9[2][32];
	for (int z = 0; z < 2; z++) {
		const int sb = 4096 >> z;
		uint32_t xh = 1u << 31;
		for (int k = 0; k < sb / 1024; k++)
			xh = crc_multmodp(x16, xh);
		uint32_t xg = 1u << 31;
		for (int k = 0; k < 63; k++)
			xg = crc_multmodp(xh, xg);
		const uint32_t xrun = crc_multmodp(xh, xh);
		xh9[z] = xh;
		for (int jb = 0; jb < 4; jb++)
			for (uint32_t b = 0; b < 256; b++)
				gm9[z][jb][b] = crc_multmodp(xg, b << (8 * jb));
		lane9[z][31] = 1u << 31;
		for (int l = 30; l >= 0; l--)
			lane9[z][l] = crc_multmodp(xrun, lane9[z][l + 1]);
	}
	static uint32_t t10[26][32], g10[2][7][32];
	for (int q = 0; q < 26; q++)
		for (uint32_t v = 0; v < 32; v++) {
			uint8_t m[16] = {0};
			for (int bit = 0; bit < 5; bit++)
				if ((v >> bit) & 1 && 5 * q + bit < 128)
					m[(5 * q + bit) >> 3] |= (uint8_t)(1u << ((5 * q + bit) & 7));
			uint32_t c = 0;
			for (int k = 0; k < 16; k++)
				c = (c >> 8) ^ t[0][(c ^ m[k]) & 0xff];
			t10[q][v] = c;
		}
	for (int z = 0; z < 2; z++)
		for (int q = 0; q < 7; q++)
			for (uint32_t v = 0; v < 32; v++) {
				const uint32_t x = (uint32_t)((uint64_t)v << (5 * q));
				g10[z][q][v] = gm9[z][0][x & 0xff] ^ gm9[z][1][(x >> 8) & 0xff] ^
					       gm9[z][2][(x >> 16) & 0xff] ^ gm9[z][3][x >> 24];
			}
	CK(cudaMemcpyToSymbol(g_crc10_t, t10, sizeof(t10)), "crc table upload");
	CK(cudaMemcpyToSymbol(g_crc10_g, g10, sizeof(g10)), "crc table upload");
	CK(cudaMemcpyToSymbol(g_crc10_xh, xh9, sizeof(xh9)), "crc table upload");
	CK(cudaMemcpyToSymbol(g_crc10_lane, lane9, sizeof(lane9)), "crc table upload");
	return 0;
}

/* ---- Context ------------------------------------------------------------------------------ */

extern "C" int kvt_cuda_device_count(void)
{
	int n = 0;
	if (cudaGetDeviceCount(&n) != cudaSuccess) {
		(void)cudaGetLastError();
		return 0;
	}
	return n;
}

extern "C" int kvt_cuda_ctx_create(int device, kvt_cuda_ctx **out, char *err, size_t errlen)
{
	*out = NULL;
	int n = kvt_cuda_device_count();
	if (n == 0)
		return kvt_cuda_errf(err, errlen, -ENODEV, "no CUDA device is present");
	if (device < 0 || device >= n)
		return kvt_cuda_errf(err, errlen, -EINVAL, "device %d is not in 0..%d", device,
				     n - 1);
	kvt_cuda_ctx *c = (kvt_cuda_ctx *)calloc(1, sizeof(*c));
	if (!c)
		return kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");
	int rc;
	cudaDeviceProp prop;
	c->device = device;
	if ((rc = kvt_cuda_check(cudaSetDevice(device), "cudaSetDevice", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaGetDeviceProperties(&prop, device), "device properties",
				 err, errlen)))
		goto fail;
	if (prop.major < 7) {
		rc = kvt_cuda_errf(err, errlen, -ENODEV,
				   "device %d (%s) has compute capability %d.%d; 7.5+ needed",
				   device, prop.name, prop.major, prop.minor);
		goto fail;
	}
	c->sm_count = prop.multiProcessorCount;
	c->cc_major = prop.major;
	snprintf(c->name, sizeof(c->name), "%s", prop.name);
	c->stage_bytes = STAGE_BYTES;
	if ((rc = kvt_cuda_check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
				 "stream create", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaHostAlloc(&c->stage_host, c->stage_bytes,
					       cudaHostAllocDefault),
				 "pinned staging alloc", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMalloc(&c->stage_dev, c->stage_bytes), "staging alloc",
				 err, errlen)) ||
	    (rc = kvt_cuda_check(cudaEventCreateWithFlags(&c->stage_done,
							  cudaEventDisableTiming),
				 "event create", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMalloc((void **)&c->crc_acc_dev,
					    KVT_CUDA_MAX_JOBS * sizeof(uint32_t)),
				 "crc scratch alloc", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMalloc((void **)&c->work_ctr_dev,
					    CRC_SYNC_WORDS * sizeof(uint32_t)), "counter alloc",
				 err, errlen)) ||
	    (rc = crc_tables_upload(err, errlen)))
		goto fail;
	*out = c;
	return 0;
fail:
	kvt_cuda_ctx_destroy(c);
	return rc;
}

extern "C" void kvt_cuda_ctx_destroy(kvt_cuda_ctx *c)
{
	if (!c)
		return;
	cudaSetDevice(c->device);
	if (c->stream)
		cudaStreamSynchronize(c->stream);
	if (c->crc_acc_dev)
		cudaFree(c->crc_acc_dev);
	if (c->work_ctr_dev)
		cudaFree(c->work_ctr_dev);
	if (c->stage_done)
		cudaEventDestroy(c->stage_done);
	if (c->stage_dev)
		cudaFree(c->stage_dev);
	if (c->stage_host)
		cudaFreeHost(c->stage_host);
	if (c->stream)
		cudaStreamDestroy(c->stream);
	(void)cudaGetLastError();
	free(c);
}

extern "C" int kvt_cuda_ctx_info(kvt_cuda_ctx *c, char *name, size_t namelen, int *sm_count)
{
	if (name && namelen)
		snprintf(name, namelen, "%s", c->name);
	if (sm_count)
		*sm_count = c->sm_count;
	return 0;
}

extern "C" int kvt_cuda_sync(kvt_cuda_ctx *c, char *err, size_t errlen)
{
	CK(cudaStreamSynchronize(kvt_cuda_stream(c)), "stream synchronize");
	CK(cudaGetLastError(), "asynchronous kernel error");
	return 0;
}

extern "C" int kvt_cuda_mem_info(kvt_cuda_ctx *c, uint64_t *free_bytes, uint64_t *total_bytes,
				 char *err, size_t errlen)
{
	size_t f = 0, t = 0;
	*free_bytes = *total_bytes = 0;
	CK(cudaSetDevice(c->device), "cudaSetDevice");
	CK(cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
	*free_bytes = f;
	*total_bytes = t;
	return 0;
}

extern "C" int kvt_cuda_alloc(kvt_cuda_ctx *c, size_t bytes, void **dev, char *err,
			      size_t errlen)
{
	*dev = NULL;
	CK(cudaSetDevice(c->device), "cudaSetDevice");
	CK(cudaMalloc(dev, bytes ? bytes : 1), "device alloc");
	return 0;
}

extern "C" void kvt_cuda_free(kvt_cuda_ctx *c, void *dev)
{
	if (dev)
		cudaFree(dev);
}

extern "C" int kvt_cuda_alloc_host(kvt_cuda_ctx *c, size_t bytes, void **host, char *err,
				   size_t errlen)
{
	*host = NULL;
	CK(cudaHostAlloc(host, bytes ? bytes : 1, cudaHostAllocDefault), "pinned host alloc");
	return 0;
}

extern "C" void kvt_cuda_free_host(kvt_cuda_ctx *c, void *host)
{
	if (host)
		cudaFreeHost(host);
}

extern "C" int kvt_cuda_upload(kvt_cuda_ctx *c, void *dev, const void *host, size_t bytes,
			       char *err, size_t errlen)
{
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	CK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, st), "upload");
	CK(cudaStreamSynchronize(st), "upload");
	return 0;
}

extern "C" int kvt_cuda_download(kvt_cuda_ctx *c, void *host, const void *dev, size_t bytes,
				 char *err, size_t errlen)
{
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	CK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, st), "download");
	CK(cudaStreamSynchronize(st), "download");
	return 0;
}

extern "C" int kvt_cuda_copy_async(kvt_cuda_ctx *c, void *dst, const void *src, size_t bytes,
				   char *err, size_t errlen)
{
	CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, kvt_cuda_stream(c)), "copy");
	return 0;
}

extern "C" int kvt_cuda_memset_async(kvt_cuda_ctx *c, void *dev, int value, size_t bytes,
				     char *err, size_t errlen)
{
	CK(cudaMemsetAsync(dev, value, bytes, kvt_cuda_stream(c)), "memset");
	return 0;
}

int kvt_cuda_stage_acquire(kvt_cuda_ctx *c, char *err, size_t errlen)
{
	CK(cudaEventSynchronize(c->stage_done), "staging wait");
	return 0;
}

int kvt_cuda_stage_push(kvt_cuda_ctx *c, size_t bytes, char *err, size_t errlen)
{
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	CK(cudaMemcpyAsync(c->stage_dev, c->stage_host, bytes, cudaMemcpyHostToDevice, st),
	   "staging copy");
	CK(cudaEventRecord(c->stage_done, st), "staging event");
	return 0;
}

/* KVTIER_CUDA_CODEC_OLD=1: the session-2 encode and decode kernels (A/B runs, not for
 * production); read at every call so a benchmark can switch inside one process */
static bool kvt_cuda_codec_old(void)
{
	const char *s = getenv("KVTIER_CUDA_CODEC_OLD");
	return s && s[0] == '1';
}

/* KVTIER_CUDA_ENC_EXACT=1: the byte-exact encoders only (kvt_cuda.h) */
static bool kvt_cuda_enc_exact(void)
{
	const char *s = getenv("KVTIER_CUDA_ENC_EXACT");
	return s && s[0] == '1';
}

extern "C" int kvt_cuda_encode_is_exact(const struct kvt_codec_config *cfg)
{
	if (!cfg)
		return 0;
	return kvt_cuda_codec_old() || kvt_cuda_enc_exact() || !kvt_mx_supports(cfg);
}

/* ---- Encode ------------------------------------------------------------------------------- */

#define ENC_THREADS 256
/* shared-memory row strides: xs rows of D+1 floats and c8 rows of D+4 bytes, so threads that
 * walk different tokens of one column hit different banks */
#define XS_STRIDE(D) ((D) + 1)
#define C8_STRIDE(D) ((D) + 4)
#define ENC_WARPS (ENC_THREADS / 32)
/* Header + pin table copy (block x == L) and the zeroing of the gaps between arrays of each
 * layer section (blocks x < L); also clears the crc accumulator. */
__global__ void enc_prep_kernel(enc_params p)
{
	const enc_job_dev &j = p.jobs[blockIdx.y];
	if (blockIdx.x == p.L) {
		for (uint32_t i = threadIdx.x; i < j.hdr_bytes; i += blockDim.x)
			j.out[i] = j.hdr_src[i];
		if (threadIdx.x == 0)
			p.crc_acc[blockIdx.y] = 0;
		/* fe_kernel's counter and the crc pass's (kvt_cuda_enc.cuh) */
		if (blockIdx.y == 0 && p.work_ctr)
			for (uint32_t i = threadIdx.x; i < CRC_SYNC_JOB; i += blockDim.x)
				p.work_ctr[i] = 0;
		if (threadIdx.x == 0 && p.work_ctr)
			p.work_ctr[CRC_SYNC_JOB + blockIdx.y] = 0;
		return;
	}
	uint8_t *sec = j.out + j.hdr_bytes + (size_t)blockIdx.x * j.layer_bytes;
	for (uint32_t g = 0; g < j.n_gaps; g++)
		for (uint32_t i = threadIdx.x; i < j.gap_len[g]; i += blockDim.x)
			sec[j.gap_off[g] + i] = 0;
}

/* Loads the G token rows of head h (warp per row), optionally rotates them and divides by
 * the token norms, into xs [G][D] f32. */
template <int D>
__device__ void enc_load_rows(const enc_params &p, const uint8_t *src, uint32_t h, bool rotate,
			      const float *nrm, float *xs)
{
	constexpr int EPL = D / 32;
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	for (uint32_t t = warp; t < p.G; t += ENC_WARPS) {
		size_t base = ((size_t)t * p.H + h) * D + (size_t)lane * EPL;
		float x[EPL];
#pragma unroll
		for (int e = 0; e < EPL; e++)
			x[e] = kvt_d_ld(src, base + e, p.dtype);
		if (rotate)
			kvt_d_fwht<EPL>(x, lane, p.inv_sqrt_d);
		if (nrm) {
#pragma unroll
			for (int e = 0; e < EPL; e++)
				x[e] = __fdiv_rn(x[e], nrm[t]);
		}
#pragma unroll
		for (int e = 0; e < EPL; e++)
			xs[t * XS_STRIDE(D) + lane * EPL + e] = x[e];
	}
}

/* Per-token quantization of xs rows in groups of gv channels (kvt_minmax8's lane order):
 * scales/zeros to [h][B][D/gv] at scale/zero, unpacked codes to c8 [G][D]. */
template <int D>
__device__ void enc_quant_rows(const enc_params &p, const float *xs, uint32_t t0, uint32_t h,
			       uint32_t bits, uint16_t *scale, uint16_t *zero, uint8_t *c8)
{
	const uint32_t gv = p.G < D ? p.G : D, ng = D / gv;
	const float qmax = (float)((1u << bits) - 1);
	const bool bf = p.sbf;
	for (uint32_t i = threadIdx.x; i < p.G * ng; i += ENC_THREADS) {
		uint32_t t = i % p.G, g = i / p.G;
		size_t sidx = ((size_t)h * p.B + t0 + t) * ng + g;
		uint8_t *cg = c8 + t * C8_STRIDE(D) + g * gv;
		if (t0 + t < p.jobs[blockIdx.z].n_pin) {
			scale[sidx] = 0;
			zero[sidx] = 0;
			for (uint32_t c = 0; c < gv; c++)
				cg[c] = 0;
			continue;
		}
		const float *xg = xs + t * XS_STRIDE(D) + g * gv;
		float mn[8], mx[8];
#pragma unroll
		for (int j = 0; j < 8; j++) {
			mn[j] = __int_as_float(0x7f800000);
			mx[j] = -__int_as_float(0x7f800000);
		}
		for (uint32_t c = 0; c < gv; c += 8) {
#pragma unroll
			for (int j = 0; j < 8; j++) {
				float v = xg[c + j];
				mn[j] = v < mn[j] ? v : mn[j];
				mx[j] = v > mx[j] ? v : mx[j];
			}
		}
#pragma unroll
		for (int w = 4; w >= 1; w >>= 1)
#pragma unroll
			for (int j = 0; j < w; j++) {
				mn[j] = mn[j] < mn[j + w] ? mn[j] : mn[j + w];
				mx[j] = mx[j] > mx[j + w] ? mx[j] : mx[j + w];
			}
		uint16_t sb, zb;
		float s, z;
		kvt_d_qparam(mn[0], mx[0], true, qmax, bf, &sb, &zb, &s, &z);
		scale[sidx] = sb;
		zero[sidx] = zb;
		for (uint32_t c = 0; c < gv; c++)
			cg[c] = (uint8_t)kvt_d_qcode(xg[c], s, z, qmax);
	}
}

/* Packs c8 [G][D] rows into codes [h][B][D*bits/8], little end first. 3-bit rows are two
 * planes: bytes [0, D/4) the low 2 bits of each code as a 2-bit row, bytes [D/4, 3D/8) the
 * high bit (channel c at bit c % 8 of byte D/4 + c/8). */
template <int D>
__device__ void enc_pack(const enc_params &p, const uint8_t *c8, uint32_t t0, uint32_t h,
			 uint32_t bits, uint8_t *codes)
{
	const uint32_t rowb = D * bits / 8, per = bits == 3 ? 4 : 8 / bits;
	for (uint32_t i = threadIdx.x; i < p.G * rowb; i += ENC_THREADS) {
		uint32_t t = i / rowb, b = i % rowb;
		uint32_t v = 0;
		if (bits == 3 && b >= D / 4) {
			for (uint32_t k = 0; k < 8; k++)
				v |= (uint32_t)(c8[t * C8_STRIDE(D) + (b - D / 4) * 8 + k] >> 2) << k;
		} else if (bits == 3) {
			for (uint32_t k = 0; k < 4; k++)
				v |= (uint32_t)(c8[t * C8_STRIDE(D) + b * 4 + k] & 3) << (k * 2);
		} else {
			for (uint32_t k = 0; k < per; k++)
				v |= (uint32_t)c8[t * C8_STRIDE(D) + b * per + k] << (k * bits);
		}
		codes[((size_t)h * p.B + t0 + t) * rowb + b] = (uint8_t)v;
	}
}

template <int D>
__global__ void __launch_bounds__(ENC_THREADS) enc_kernel(enc_params p)
{
	extern __shared__ float smem[];
	const enc_job_dev &j = p.jobs[blockIdx.z];
	const uint32_t l = blockIdx.y, gi = blockIdx.x, t0 = gi * p.G;
	const size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
	const size_t row = (size_t)p.H * D;
	const uint8_t *kin = (const uint8_t *)j.k + ((size_t)l * p.B + t0) * row * ws;
	const uint8_t *vin = (const uint8_t *)j.v + ((size_t)l * p.B + t0) * row * ws;
	uint8_t *sec = j.out + j.hdr_bytes + (size_t)l * j.layer_bytes;
	const int tid = threadIdx.x;

	if (p.scheme == KVT_SCHEME_NONE) {
		/* [B][H][d] -> [H][B][d], 4-byte words (rows are at least 128 bytes) */
		const uint32_t wpr = (uint32_t)(D * ws / 4);
		for (uint32_t i = tid; i < p.G * p.H * wpr; i += ENC_THREADS) {
			uint32_t w = i % wpr, r = i / wpr, t = r / p.H, h = r % p.H;
			size_t src = ((size_t)t * p.H + h) * wpr + w;
			size_t dst = ((size_t)h * p.B + t0 + t) * wpr + w;
			((uint32_t *)(sec + p.k_codes_off))[dst] = ((const uint32_t *)kin)[src];
			((uint32_t *)(sec + p.v_codes_off))[dst] = ((const uint32_t *)vin)[src];
		}
		return;
	}

	/* pinned (sink) tokens of this group: exact copies, pin index == chunk token */
	if (t0 < j.n_pin) {
		uint32_t np = min(j.n_pin - t0, p.G);
		uint32_t wpr = (uint32_t)(row * ws / 4);
		for (uint32_t i = tid; i < np * wpr; i += ENC_THREADS) {
			uint32_t t = i / wpr, w = i % wpr;
			size_t dst = (size_t)(t0 + t) * wpr + w;
			((uint32_t *)(sec + j.k_exact_off))[dst] = ((const uint32_t *)kin)[(size_t)t * wpr + w];
			((uint32_t *)(sec + j.v_exact_off))[dst] = ((const uint32_t *)vin)[(size_t)t * wpr + w];
		}
	}

	float *xs = smem;                                      /* [G][D+1] */
	float *acc8 = xs + (size_t)p.G * XS_STRIDE(D);         /* [G][8] */
	float *nrm = acc8 + (size_t)p.G * 8;                   /* [G] */
	uint8_t *c8 = (uint8_t *)(nrm + p.G);                  /* [G][D+4] */
	const bool oscar = p.scheme == KVT_SCHEME_OSCAR;
	const bool rotk = oscar || p.scheme == KVT_SCHEME_HADAMARD;
	uint16_t *kscale = (uint16_t *)(sec + p.k_scale_off);
	uint16_t *kzero = (uint16_t *)(sec + p.k_zero_off);

	if (oscar) {
		/* joint norm over all heads: 8 summation lanes (index % 8) in index order, as
		 * the CPU's sumsq over the token's H*d rotated row */
		for (uint32_t i = tid; i < p.G * 8; i += ENC_THREADS)
			acc8[i] = 0.0f;
		for (uint32_t h = 0; h < p.H; h++) {
			__syncthreads();
			enc_load_rows<D>(p, kin, h, true, NULL, xs);
			__syncthreads();
			for (uint32_t i = tid; i < p.G * 8; i += ENC_THREADS) {
				uint32_t t = i % p.G, ln = i / p.G;
				float a = acc8[t * 8 + ln];
				for (uint32_t c = ln; c < D; c += 8) {
					float x = xs[t * XS_STRIDE(D) + c];
					a = __fadd_rn(a, __fmul_rn(x, x));
				}
				acc8[t * 8 + ln] = a;
			}
		}
		__syncthreads();
		for (uint32_t t = tid; t < p.G; t += ENC_THREADS) {
			const float *a = acc8 + t * 8;
			float s = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[4]), __fadd_rn(a[2], a[6])),
					    __fadd_rn(__fadd_rn(a[1], a[5]), __fadd_rn(a[3], a[7])));
			float n = __fsqrt_rn(s);
			if (n == 0.0f || !isfinite(n))
				n = 1.0f;
			nrm[t] = n;
			((float *)(sec + p.norms_off))[t0 + t] = n;
		}
	}

	const float kqmax = (float)((1u << p.kb) - 1);
	for (uint32_t h = 0; h < p.H; h++) {
		__syncthreads();
		enc_load_rows<D>(p, kin, h, rotk, oscar ? nrm : NULL, xs);
		__syncthreads();
		if (p.scheme == KVT_SCHEME_HADAMARD) {
			enc_quant_rows<D>(p, xs, t0, h, p.kb, kscale, kzero, c8);
		} else {
			/* per channel over the G tokens, pinned tokens left out */
			bool any = j.n_pin < t0 + p.G;
			for (uint32_t c = tid; c < D; c += ENC_THREADS) {
				float mn = __int_as_float(0x7f800000), mx = -mn;
				for (uint32_t t = 0; t < p.G; t++) {
					if (t0 + t < j.n_pin)
						continue;
					float v = xs[t * XS_STRIDE(D) + c];
					mn = v < mn ? v : mn;
					mx = v > mx ? v : mx;
				}
				uint16_t sb, zb;
				float s, z;
				kvt_d_qparam(mn, mx, any, kqmax, p.sbf, &sb, &zb, &s, &z);
				size_t pidx = ((size_t)h * (p.B / p.G) + gi) * D + c;
				kscale[pidx] = sb;
				kzero[pidx] = zb;
				for (uint32_t t = 0; t < p.G; t++)
					c8[t * C8_STRIDE(D) + c] =
						t0 + t < j.n_pin
							? 0
							: (uint8_t)kvt_d_qcode(xs[t * XS_STRIDE(D) + c], s, z,
									       kqmax);
			}
		}
		__syncthreads();
		enc_pack<D>(p, c8, t0, h, p.kb, sec + p.k_codes_off);
	}

	uint16_t *vscale = (uint16_t *)(sec + p.v_scale_off);
	uint16_t *vzero = (uint16_t *)(sec + p.v_zero_off);
	for (uint32_t h = 0; h < p.H; h++) {
		__syncthreads();
		enc_load_rows<D>(p, vin, h, p.rotate_v != 0, NULL, xs);
		__syncthreads();
		enc_quant_rows<D>(p, xs, t0, h, p.vb, vscale, vzero, c8);
		__syncthreads();
		enc_pack<D>(p, c8, t0, h, p.vb, sec + p.v_codes_off);
	}
}

/* Raw (init 0, no final xor) crc of each thread's CRC_SEG bytes, moved to its place in the
 * chunk by multiplying with x^(8 * bytes after it), xor-ed into the job's accumulator. */
__global__ void __launch_bounds__(256) crc_kernel(const enc_job_dev *jobs, uint32_t *acc)
{
	__shared__ uint32_t tab[8][256];
	for (int i = threadIdx.x; i < 8 * 256; i += blockDim.x)
		tab[i / 256][i % 256] = g_crc_table[i / 256][i % 256];
	__syncthreads();
	const enc_job_dev &j = jobs[blockIdx.y];
	uint64_t start = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) * CRC_SEG;
	if (start >= j.total_bytes)
		return;
	uint64_t len = j.total_bytes - start < CRC_SEG ? j.total_bytes - start : CRC_SEG;
	const uint2 *w = (const uint2 *)(j.out + start); /* chunks are 64-byte multiples */
	uint32_t crc = 0;
	for (uint64_t i = 0; i < len / 8; i++) {
		uint2 v = w[i];
		uint32_t lo = v.x ^ crc, hi = v.y;
		crc = tab[7][lo & 0xff] ^ tab[6][(lo >> 8) & 0xff] ^ tab[5][(lo >> 16) & 0xff] ^
		      tab[4][lo >> 24] ^ tab[3][hi & 0xff] ^ tab[2][(hi >> 8) & 0xff] ^
		      tab[1][(hi >> 16) & 0xff] ^ tab[0][hi >> 24];
	}
	uint64_t after = j.total_bytes - start - len;
	atomicXor(&acc[blockIdx.y], crc_multmodp(crc_x2nmodp(after, 3), crc));
}

/*
 * The crc pass (crc10_kernel below): the raw crc sum (init 0, no final xor; crc_finish_kernel
 * completes it) in work items of CRC10_R regions of CRC_REGION bytes, laid from the chunk's
 * end, claimed in chunk order from a grid-wide counter; each item's sum is moved onto the
 * chunk's end by g_crc_reg and xor-ed into the chunk's accumulator. Zeros before a chunk's
 * start (its first region may be short) lead their chains: a raw crc from 0 stays 0.
 *
 * After the tensor-core encoder it runs as the encoder's programmatic dependent: its blocks
 * start once every encoder block has started (mx_kernel allows it at its start), so they run
 * in the encoder's last wave on the slots finished blocks leave, and wait for a chunk's encoder
 * blocks by the per-chunk counters the encoder bumps at its end. The wait always ends: every
 * encoder block is then resident or done. After the other encoders (which count nothing), or
 * with KVTIER_CUDA_CRC_PDL=0, it is a plain launch after the encoder. Session 7's pass (crc8:
 * lanes striding over a region, byte tables in shared memory; 357.7-359.9 us per encode call
 * against crc10's 334.5-339.8) is in the history up to commit fd8eeb8; docs/gpu.md "Session
 * 7: encode crc" and "Session 8: encode crc" have the numbers.
 */
#define CRC10_R 2 /* regions per item */

/* the crc pass's work items for a chunk of `bytes` */
static uint64_t crc_items(uint64_t bytes)
{
	return ((bytes + CRC_REGION - 1) / CRC_REGION + CRC10_R - 1) / CRC10_R;
}

struct crc_args {
	const enc_job_dev *jobs;
	uint32_t n_jobs, n_items;
	uint32_t rpi; /* regions per item (CRC10_R) */
	uint32_t need; /* encoder blocks per chunk to wait for (0: the chunks are written) */
	uint32_t *acc, *sync;
};

__device__ __forceinline__ uint32_t crc_ld_acquire(const uint32_t *p)
{
	uint32_t v;
	asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
	return v;
}

__device__ __forceinline__ uint32_t crc_ld_relaxed(const uint32_t *p)
{
	uint32_t v;
	asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
	return v;
}

__device__ __forceinline__ void crc_cp16(void *smem, const void *gmem, bool valid)
{
	const uint32_t sa = (uint32_t)__cvta_generic_to_shared(smem);
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem),
		     "r"(valid ? 16 : 0)
		     : "memory");
}

__global__ void crc_finish_kernel(const enc_job_dev *jobs, const uint32_t *acc, uint32_t n,
				  uint32_t field_off)
{
	uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= n)
		return;
	const enc_job_dev &j = jobs[i];
	uint32_t crc = ~(acc[i] ^ crc_multmodp(crc_x2nmodp(j.total_bytes, 3), 0xffffffffu));
	*(uint32_t *)(j.out + field_off) = crc;
}

/*
 * crc10 (session 8): the items above, each lane's bytes contiguous and the table lookups done
 * by shfl from registers (session 7's crc8 had lanes striding over a region and byte tables
 * in shared memory).
 * - Stage = SB bytes (4 KiB); lane l owns the stage's bytes [128 l, 128 l + 128): two chains,
 *   A on the first 64 bytes and B on the last 64, each stepping 16 bytes at a time (c' = crc of
 *   the word with c xored into its first 4 bytes, a sum of table lookups of which only those on
 *   the first 35 bits depend on c) and moved over the 4032 bytes to its run in the next stage
 *   by one map per stage (crc8: per 16 bytes).
 * - The cp.async writes a stage swizzled (16-byte word w at slot w ^ ((w >> 3) & 7)), so the
 *   coalesced global reads and the lanes' strided shared reads (lane l's word k at
 *   8 l + (k ^ (l & 7))) are both conflict-free per quarter warp.
 * - Lookups (crc10_lk): tables of 32 entries indexed by 5 bits, entry v of table p in lane v's
 *   register t[p], read by one shfl (no bank conflicts; crc8's byte-indexed tables in shared
 *   memory cost ~3 wavefronts per lookup): 26 per 16-byte word, 7 per map.
 * - At the item's end: c = A x^(8 * 64) + B (lane l's run), times x^(8 * 128 (31 - l)) (onto
 *   the stage's end), xor over the warp, times the item's region multiplier (g_crc_reg).
 * - The chunk of a claimed item by a lane-parallel search (crc8 walked the chunks one
 *   dependent load at a time, up to 31 on a warp's first claim of the last chunk).
 * docs/gpu.md "Session 8: encode crc" has the numbers (ncu: crc8 alone 76.6 us, shared-memory
 * pipe ~70% busy with 3-way conflicts; crc10 alone 51.7 us).
 */
/* The chunk of item idx, searching from chunk jc on: 32 chunks' first items per step, one
 * load per lane */
__device__ __forceinline__ uint32_t crc10_job_of(const crc_args &a, uint32_t jc, uint32_t idx)
{
	const uint32_t lane = threadIdx.x & 31;
	for (;;) {
		const uint32_t jj = jc + 1 + lane;
		const bool in = jj < a.n_jobs && idx >= a.jobs[jj].crc_item0;
		/* first items increase with the chunk, so `in` holds for a prefix of the lanes */
		const uint32_t n = __popc(__ballot_sync(KVT_FULL_MASK, in));
		jc += n;
		if (n < 32)
			return jc;
	}
}

__device__ uint32_t crc10_claim(const crc_args &a, uint32_t *jc)
{
	const int lane = threadIdx.x & 31;
	uint32_t idx = 0, j = *jc;
	if (lane == 0)
		idx = atomicAdd(a.sync + CRC_SYNC_WORK, 1u);
	idx = __shfl_sync(KVT_FULL_MASK, idx, 0);
	if (idx >= a.n_items)
		return idx;
	j = crc10_job_of(a, j, idx);
	/* Polled by relaxed loads (an acquire load invalidates the SM's L1, which the encoder
	 * blocks beside it use), then one acquire that orders this lane's reads of the chunk
	 * after the encoder's stores. */
	if (a.need) {
		while (crc_ld_relaxed(a.sync + CRC_SYNC_JOB + j) < a.need)
			__nanosleep(256);
		(void)crc_ld_acquire(a.sync + CRC_SYNC_JOB + j);
	}
	*jc = j;
	return idx;
}

/* shfl.sync.idx reads the source lane from the index's bits 0-4 only (PTX ISA: bval = b[4:0]) */
__device__ __forceinline__ uint32_t crc_shfl(uint32_t t, uint32_t i)
{
	uint32_t r;
	asm("shfl.sync.idx.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(r) : "r"(t), "r"(i));
	return r;
}

/* crc10's lookups: 5-bit-indexed tables held one entry per lane in registers, read by shfl
 * (one per lookup, no bank conflicts): a 16-byte word is 26 lookups (slicing-by-16 from
 * shared memory: 16 at ~3 wavefronts each), of which the 7 on the word's first 35 bits depend
 * on the chain */
struct crc10_lk {
	uint32_t t[26], g[7];
	__device__ __forceinline__ uint32_t map(uint32_t c) const
	{
		uint32_t r0 = 0, r1 = 0;
#pragma unroll
		for (int q = 0; q < 7; q++) {
			const uint32_t v = crc_shfl(g[q], c >> (5 * q));
			if (q & 1)
				r1 ^= v;
			else
				r0 ^= v;
		}
		return r0 ^ r1;
	}
	/* table q's entry for bits 5q .. 5q + 4 of the 128-bit word x (x[4] = 0) */
	__device__ __forceinline__ uint32_t lookup(int q, const uint32_t (&x)[5]) const
	{
		const int b = 5 * q, i = b >> 5, sh = b & 31;
		return crc_shfl(t[q], sh <= 27 ? x[i] >> sh : __funnelshift_r(x[i], x[i + 1], sh));
	}
	__device__ __forceinline__ uint32_t word(uint32_t c, uint4 w) const
	{
		const uint32_t x[5] = {w.x ^ c, w.y, w.z, w.w, 0u};
		uint32_t ri[2] = {0, 0}, rd[2] = {0, 0};
#pragma unroll
		for (int q = 7; q < 26; q++) /* independent of the chain */
			ri[q & 1] ^= lookup(q, x);
#pragma unroll
		for (int q = 0; q < 7; q++)
			rd[q & 1] ^= lookup(q, x);
		return (ri[0] ^ ri[1]) ^ (rd[0] ^ rd[1]);
	}
};

/* SB: stage bytes (4096 or 2048); lane l's run is RUN = SB / 32 bytes, RW = RUN / 16 words */
template <int ST, int SB, class LK>
__device__ void crc10_warp(const crc_args &a, const LK &L, uint4 *buf, uint32_t *meta)
{
	constexpr int RW = SB / 512, Z = SB == 4096 ? 0 : 1, SPR = CRC_REGION / SB;
	static_assert(SB == 4096 || SB == 2048, "stage size");
	const int lane = threadIdx.x & 31;
	const uint32_t lmul = g_crc10_lane[Z][lane], xh = g_crc10_xh[Z];
	const uint32_t sw = ((RW * lane) >> 3) & (RW - 1);
	uint32_t jc = 0, r_end = 0, nh = 0, hs = 0;
	int64_t ms = 0;
	const uint8_t *src = NULL;
	bool more = true;
	uint32_t issued = 0, computed = 0, ca = 0, cb = 0;
	auto issue = [&](uint32_t slot) -> bool {
		if (hs == nh) {
			const uint32_t idx = crc10_claim(a, &jc);
			if (idx >= a.n_items)
				return false;
			const enc_job_dev &j = a.jobs[jc];
			const uint32_t k = idx - j.crc_item0;
			const uint64_t nr = (j.total_bytes + CRC_REGION - 1) / CRC_REGION;
			const uint32_t nreg = (uint32_t)(nr - (uint64_t)k * a.rpi < a.rpi
								 ? nr - (uint64_t)k * a.rpi
								 : a.rpi);
			r_end = k * a.rpi;
			ms = (int64_t)j.total_bytes - (int64_t)CRC_REGION * (r_end + nreg);
			src = j.out;
			nh = SPR * nreg;
			hs = 0;
		}
		uint4 *dst = buf + slot * (SB / 16);
#pragma unroll
		for (int i = 0; i < SB / 512; i++) {
			const uint32_t wd = 32 * i + lane;
			const int64_t off = ms + SB * (int64_t)hs + 16 * wd;
			crc_cp16(dst + (wd ^ ((wd >> 3) & (RW - 1))), off >= 0 ? src + off : src,
				  off >= 0);
		}
		if (lane == 0) {
			meta[2 * slot] = jc;
			meta[2 * slot + 1] = r_end | (hs + 1 == nh ? 0x80000000u : 0u);
		}
		hs++;
		return true;
	};
	for (int q = 0; q < ST - 1; q++) {
		if (more && (more = issue(issued % ST)))
			issued++;
		asm volatile("cp.async.commit_group;\n" ::);
	}
	while (computed < issued) {
		__syncwarp();
		if (more && (more = issue(issued % ST)))
			issued++;
		asm volatile("cp.async.commit_group;\n" ::);
		asm volatile("cp.async.wait_group %0;\n" ::"n"(ST - 1));
		__syncwarp();
		const uint32_t slot = computed % ST;
		const uint4 *b = buf + slot * (SB / 16) + RW * lane;
		ca = L.map(ca);
		cb = L.map(cb);
#pragma unroll
		for (uint32_t k = 0; k < RW / 2; k++) {
			const uint4 wa = b[k ^ sw], wb = b[(k + RW / 2) ^ sw];
			ca = L.word(ca, wa);
			cb = L.word(cb, wb);
		}
		const uint32_t m1 = meta[2 * slot + 1];
		if (m1 & 0x80000000u) {
			uint32_t c = ca ? crc_multmodp(xh, ca) ^ cb : cb;
			if (c)
				c = crc_multmodp(lmul, c);
#pragma unroll
			for (int m = 16; m >= 1; m >>= 1)
				c ^= __shfl_xor_sync(KVT_FULL_MASK, c, m);
			if (lane == 0 && c) {
				const uint32_t r = m1 & 0x7fffffffu;
				const uint32_t mul = r < CRC_NREG ? g_crc_reg[r]
								   : crc_x2nmodp((uint64_t)r * CRC_REGION, 3);
				atomicXor(a.acc + meta[2 * slot], crc_multmodp(mul, c));
			}
			ca = cb = 0;
		}
		computed++;
	}
}

/* W warps, each with a ring of ST stages (no tables in shared memory) */
template <int W, int ST, int SB>
__global__ void __launch_bounds__(W * 32) crc10_kernel(crc_args a)
{
	extern __shared__ uint4 crc10_dyn[];
	const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	crc10_lk L;
#pragma unroll
	for (int q = 0; q < 26; q++)
		L.t[q] = g_crc10_t[q][lane];
#pragma unroll
	for (int q = 0; q < 7; q++)
		L.g[q] = g_crc10_g[SB == 4096 ? 0 : 1][q][lane];
	uint4 *buf = crc10_dyn + (size_t)w * ST * (SB / 16);
	uint32_t *meta = (uint32_t *)(crc10_dyn + (size_t)W * ST * (SB / 16)) + w * 2 * ST;
	crc10_warp<ST, SB>(a, L, buf, meta);
}

/* on as many blocks per SM as fit (persistent; the blocks claim items) */
template <int W, int ST, int SB>
static cudaError_t crc10_launch(const crc_args &a, int sm_count, bool pdl,
				cudaStream_t s)
{
	const size_t dyn = (size_t)W * ST * (SB + 8);
	cudaError_t e = cudaFuncSetAttribute(crc10_kernel<W, ST, SB>,
					     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn);
	if (e != cudaSuccess)
		return e;
	static int per_sm = 0;
	if (!per_sm &&
	    (e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, crc10_kernel<W, ST, SB>,
								W * 32, dyn)) != cudaSuccess)
		return e;
	if (per_sm < 1)
		return cudaErrorInvalidConfiguration;
	cudaLaunchAttribute at;
	const cudaLaunchConfig_t lc = kvt_launch_config(dim3((unsigned)per_sm * (unsigned)sm_count),
							dim3(W * 32), dyn, s, pdl, &at);
	return cudaLaunchKernelEx(&lc, crc10_kernel<W, ST, SB>, a);
}

/* KVTIER_CUDA_CRC_PDL=0: the crc pass as a plain launch after the tensor-core encoder too
 * (A/B; the default launches it as the encoder's programmatic dependent on sm_90+) */
static bool crc_pdl_off(void)
{
	const char *s = getenv("KVTIER_CUDA_CRC_PDL");
	return s && s[0] == '0';
}

static size_t enc_smem_bytes(uint32_t G, uint32_t D)
{
	return (size_t)G * XS_STRIDE(D) * 4 + (size_t)G * 8 * 4 + (size_t)G * 4 +
	       (size_t)G * C8_STRIDE(D);
}

template <int D>
static cudaError_t enc_launch(const enc_params &p, uint32_t n_jobs, cudaStream_t s)
{
	size_t sm = enc_smem_bytes(p.G, D);
	cudaError_t e = cudaFuncSetAttribute(enc_kernel<D>,
					     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
	if (e != cudaSuccess)
		return e;
	dim3 grid(p.B / p.G, p.L, n_jobs);
	enc_kernel<D><<<grid, ENC_THREADS, sm, s>>>(p);
	return cudaGetLastError();
}

/* ---- Fast encode (session 3) -------------------------------------------------------------
 *
 * One persistent block per SM, 768 threads in two roles that never wait for each other:
 *  - 16 "K warps" walk key tiles (chunk, layer, key group of G tokens, every head). Phase 1:
 *    rows (token, head) are rotated (R = D/32 lanes per row, 32 consecutive channels per
 *    lane: 5 butterfly stages in registers, log2(R) by shuffles, the CPU's stage order) into a
 *    shared-memory tile of f32. Phase 2 (oscar): one thread per (token, summation lane j)
 *    runs the CPU's sumsq chain (h-major, channel j + 8k ascending, acc + x*x) and the
 *    kvt_reduce8 tree by three xor shuffles, so the norm is the CPU's to the bit. Phase 3:
 *    one thread per (head, channel pair) walks the G tokens twice: x / n (IEEE division,
 *    written back), the per-channel min/max in token order, then codes packed in registers
 *    (2-bit: two threads' nibbles joined by one shuffle) and written row by row.
 *  - 8 "V warps" stream value rows (all jobs, layers, tokens, heads; the K warps join them
 *    when the tiles are done; units from a grid-wide counter): load, rotate
 *    (rotate_v), kvt_minmax8 per group in the CPU's lane order (lanes of one group combined
 *    earlier-wins), qparam, codes, one vector store per lane.
 * Codes use a reciprocal multiply, and the IEEE division only when the product lies within
 * 1e-4 of a rounding boundary, so every code is still rint((x - z) / s) exactly: the chunk
 * bytes equal the CPU's. Used for oscar / kivi with f16/bf16/f32, head_dim 64/128/256, when
 * R * H divides 32 (or H * R is a multiple of 32) and the tile fits in shared memory; other
 * configs (and KVTIER_CUDA_CODEC_OLD=1) take enc_kernel.
 */
#define FE_THREADS 768
#define FE_KWARPS 16
#define FE_KTHREADS (FE_KWARPS * 32)
#define FE_SEG 36 /* floats per 32-channel segment in the tile: 16-byte stores conflict-free */
#define FE_TPAD 8 /* floats after each token's rows: the chain's 4 tokens x 8 lanes hit 32 banks */

__device__ __forceinline__ void fe_ld32(const uint8_t *p, uint32_t dt, float (&x)[32])
{
	if (dt == KVT_DTYPE_F32) {
#pragma unroll
		for (int i = 0; i < 8; i++) {
			float4 v = ((const float4 *)p)[i];
			x[4 * i] = v.x;
			x[4 * i + 1] = v.y;
			x[4 * i + 2] = v.z;
			x[4 * i + 3] = v.w;
		}
		return;
	}
#pragma unroll
	for (int i = 0; i < 4; i++) {
		uint4 v = ((const uint4 *)p)[i];
		uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
		for (int k = 0; k < 4; k++) {
			if (dt == KVT_DTYPE_BF16) {
				x[8 * i + 2 * k] = __uint_as_float(w[k] << 16);
				x[8 * i + 2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
			} else {
				x[8 * i + 2 * k] = __half2float(__ushort_as_half((uint16_t)(w[k] & 0xffff)));
				x[8 * i + 2 * k + 1] = __half2float(__ushort_as_half((uint16_t)(w[k] >> 16)));
			}
		}
	}
}

/* The cross-lane butterflies of the CPU's fwht over lane bits 1, 2, ... < R: the upper lane
 * gets y - x, the lower x + y, each one rounding as fsub / fadd. */
template <int R>
__device__ __forceinline__ void fe_fwht_lanes(float (&x)[32], int lane)
{
#pragma unroll
	for (int m = 1; m < R; m <<= 1) {
		const float sg = (lane & m) ? -1.0f : 1.0f;
#pragma unroll
		for (int e = 0; e < 32; e++) {
			float y = __shfl_xor_sync(KVT_FULL_MASK, x[e], m);
			x[e] = __fmaf_rn(x[e], sg, y);
		}
	}
}

__device__ __forceinline__ void fe_scale32(float (&x)[32], float mult)
{
#pragma unroll
	for (int e = 0; e < 32; e++)
		x[e] = __fmul_rn(x[e], mult);
}

/* The CPU's fwht on a row spread over R lanes (lane % R = which 32 channels), then * mult. */
template <int R>
__device__ __forceinline__ void fe_fwht(float (&x)[32], int lane, float mult)
{
	kvt_d_fwht_reg<32, 1, 32>(x);
	fe_fwht_lanes<R>(x, lane);
	fe_scale32(x, mult);
}

/* kvt_d_qcode(x, s, z, qmax) for s != 0, rs = 1/s and x in the group's [min, max] (so |q|
 * stays far below 2^22): q = (x - z) * rs rounded to an integer by adding 1.5 * 2^23. The
 * product's error is below 3e-5 for |q| <= 1024; when it lies within 1e-4 of a half-integer
 * (or is NaN / infinite) the IEEE division decides, so the code is the CPU's exactly. With
 * EXACT false that check is skipped: codes may differ from the CPU's at such near-ties. */
template <bool EXACT>
__device__ __forceinline__ int fe_qcode(float x, float s, float rs, float z, int qmax)
{
	const float M = 12582912.0f;
	const float d = __fsub_rn(x, z);
	const float q = __fmul_rn(d, rs);
	const float y = __fadd_rn(q, M);
	if (EXACT) {
		const float t = __fsub_rn(q, __fsub_rn(y, M));
		if (!(fabsf(t) < 0.4999f)) {
			float r = rintf(__fdiv_rn(d, s));
			r = r > 0.0f ? r : 0.0f;
			r = r < (float)qmax ? r : (float)qmax;
			return (int)r;
		}
	}
	const int ci = __float_as_int(y) - 0x4B400000;
	return min(max(ci, 0), qmax);
}

/* One row per R lanes, per-token groups of gv channels (gv >= 32: a lane's 32 channels are in
 * one group): values, or nothing else for now. Lanes whose row is out of range pass valid =
 * false but still take part in the shuffles. */
template <int R, int bits, bool EXACT>
__device__ __forceinline__ void fe_quant_row(float (&x)[32], int lane, bool valid, bool pinned,
					     uint32_t gv, bool bf, uint16_t *scale, uint16_t *zero,
					     uint8_t *codes)
{
	const int q = lane % R;
	const uint32_t lpg = gv / 32; /* lanes per group: 1, 2, 4 (8 for gv 256) */
	float mn[8], mx[8];
#pragma unroll
	for (int j = 0; j < 8; j++) {
		mn[j] = __int_as_float(0x7f800000);
		mx[j] = -__int_as_float(0x7f800000);
	}
	/* fminf / fmaxf: the CPU's compare-selects except for which zero a tie of -0 and +0
	 * keeps (then the stored zero may be -0 for +0: the same decoded value) */
#pragma unroll
	for (int c = 0; c < 32; c += 8)
#pragma unroll
		for (int j = 0; j < 8; j++) {
			mn[j] = fminf(mn[j], x[c + j]);
			mx[j] = fmaxf(mx[j], x[c + j]);
		}
	/* the lanes of one group continue each other's summation lanes: earlier wins ties */
#pragma unroll
	for (int m = 1; m < R; m <<= 1) {
		if ((uint32_t)m >= lpg)
			break;
#pragma unroll
		for (int j = 0; j < 8; j++) {
			mn[j] = fminf(mn[j], __shfl_xor_sync(KVT_FULL_MASK, mn[j], m));
			mx[j] = fmaxf(mx[j], __shfl_xor_sync(KVT_FULL_MASK, mx[j], m));
		}
	}
#pragma unroll
	for (int w = 4; w >= 1; w >>= 1)
#pragma unroll
		for (int j = 0; j < w; j++) {
			mn[j] = fminf(mn[j], mn[j + w]);
			mx[j] = fmaxf(mx[j], mx[j + w]);
		}
	if (!valid)
		return;
	const float qmax = (float)((1u << bits) - 1);
	const int qmi = (1 << bits) - 1;
	uint16_t sb = 0, zb = 0;
	float s = 0.0f, z = 0.0f;
	if (!pinned)
		kvt_d_qparam(mn[0], mx[0], true, qmax, bf, &sb, &zb, &s, &z);
	if ((q % lpg) == 0) {
		scale[q / lpg] = sb;
		zero[q / lpg] = zb;
	}
	const float rs = __frcp_rn(s);
	const bool use = s != 0.0f && isfinite(rs);
	uint32_t w[8];
#pragma unroll
	for (int i = 0; i < 8; i++)
		w[i] = 0;
	if (bits == 3) {
		/* two planes: w[0..1] the low 2 bits of the 32 codes (a 2-bit row's 8 bytes at
		 * q * 8), w[2] their high bits (4 bytes at D/4 + q * 4) */
		if (use) {
#pragma unroll
			for (int e = 0; e < 32; e++) {
				const uint32_t cd = (uint32_t)fe_qcode<EXACT>(x[e], s, rs, z, 7);
				w[e / 16] |= (cd & 3u) << ((e % 16) * 2);
				w[2] |= (cd >> 2) << e;
			}
		} else if (s != 0.0f) {
#pragma unroll
			for (int e = 0; e < 32; e++) {
				const uint32_t cd = kvt_d_qcode(x[e], s, z, 7.0f);
				w[e / 16] |= (cd & 3u) << ((e % 16) * 2);
				w[2] |= (cd >> 2) << e;
			}
		}
		*(uint2 *)(codes + q * 8) = make_uint2(w[0], w[1]);
		*(uint32_t *)(codes + R * 8 + q * 4) = w[2];
		return;
	}
	if (use) {
#pragma unroll
		for (int e = 0; e < 32; e++)
			w[e * bits / 32] |= (uint32_t)fe_qcode<EXACT>(x[e], s, rs, z, qmi)
					    << ((e * bits) % 32);
	} else if (s != 0.0f) {
#pragma unroll
		for (int e = 0; e < 32; e++)
			w[e * bits / 32] |= kvt_d_qcode(x[e], s, z, qmax) << ((e * bits) % 32);
	}
	if (bits == 2) {
		*(uint2 *)(codes + q * 8) = make_uint2(w[0], w[1]);
	} else if (bits == 4) {
		*(uint4 *)(codes + q * 16) = make_uint4(w[0], w[1], w[2], w[3]);
	} else {
		((uint4 *)(codes + q * 32))[0] = make_uint4(w[0], w[1], w[2], w[3]);
		((uint4 *)(codes + q * 32))[1] = make_uint4(w[4], w[5], w[6], w[7]);
	}
}

struct fe_params {
	enc_params p;
	uint32_t *vctr; /* value units handed out (zeroed by enc_prep_kernel) */
	uint32_t n_jobs, n_tiles, tile_floats, tok_stride;
};
#define FE_VTOK 16 /* tokens per value unit */

/* Value rows in units of (job, layer, FE_VTOK tokens) x every head, taken from a counter
 * shared by the grid (the K warps join when their tiles are done, so neither role waits for
 * the other); a warp pass is RPW consecutive rows of the unit's [token][head] order. */
template <int D, bool EXACT, bool HAS3>
__device__ void fe_values(const fe_params &f, int lane)
{
	constexpr int R = D / 32, RPW = 32 / R;
	const enc_params &p = f.p;
	const uint32_t upl = p.B / FE_VTOK, n_units = f.n_jobs * p.L * upl;
	const uint32_t rows = FE_VTOK * p.H;
	const size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
	const int q = lane % R;
	const uint32_t gv = p.G < D ? p.G : D, ng = D / gv;
	const float mult = p.inv_sqrt_d;
	for (;;) {
		uint32_t un = 0;
		if (lane == 0)
			un = atomicAdd(f.vctr, 1u);
		un = __shfl_sync(KVT_FULL_MASK, un, 0);
		if (un >= n_units)
			return;
		const uint32_t jb = un / (p.L * upl), l = (un / upl) % p.L;
		const uint32_t tb = (un % upl) * FE_VTOK;
		const enc_job_dev &j = p.jobs[jb];
		const uint8_t *vin = (const uint8_t *)j.v + ((size_t)l * p.B + tb) * p.H * D * ws;
		uint8_t *sec = j.out + j.hdr_bytes + (size_t)l * j.layer_bytes;
		uint32_t t = tb + (lane / R) / p.H, h = (lane / R) % p.H;
		for (uint32_t r0 = 0; r0 < rows; r0 += RPW) {
			const uint32_t r = r0 + lane / R;
			float x[32];
			fe_ld32(vin + ((size_t)r * D + q * 32) * ws, p.dtype, x);
			if (p.rotate_v)
				fe_fwht<R>(x, lane, mult);
			const size_t ridx = (size_t)h * p.B + t;
			uint16_t *vs = (uint16_t *)(sec + p.v_scale_off) + ridx * ng;
			uint16_t *vz = (uint16_t *)(sec + p.v_zero_off) + ridx * ng;
			uint8_t *vc = sec + p.v_codes_off + ridx * (D * p.vb / 8);
			const bool pin = t < j.n_pin;
			if (p.vb == 2)
				fe_quant_row<R, 2, EXACT>(x, lane, true, pin, gv, p.sbf != 0, vs, vz, vc);
			else if (HAS3 && p.vb == 3)
				fe_quant_row<R, 3, EXACT>(x, lane, true, pin, gv, p.sbf != 0, vs, vz, vc);
			else if (p.vb == 4)
				fe_quant_row<R, 4, EXACT>(x, lane, true, pin, gv, p.sbf != 0, vs, vz, vc);
			else
				fe_quant_row<R, 8, EXACT>(x, lane, true, pin, gv, p.sbf != 0, vs, vz, vc);
			/* next pass: RPW rows on */
			h += RPW;
			while (h >= p.H) {
				h -= p.H;
				t++;
			}
		}
	}
}

/* named barrier of the K warps only (the V warps never wait) */
__device__ __forceinline__ void fe_kbar() { asm volatile("bar.sync 1, %0;" ::"n"(FE_KTHREADS)); }

template <int D, bool EXACT, bool HAS3>
__device__ void fe_keys(const fe_params &f, float *tile, float *nrm, int ktid)
{
	float *rnrm = nrm + f.p.G;
	constexpr int R = D / 32, RPW = 32 / R;
	const enc_params &p = f.p;
	const int lane = ktid & 31, kw = ktid >> 5, q = lane % R;
	const size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
	const bool oscar = p.scheme == KVT_SCHEME_OSCAR;
	const uint32_t NG = p.B / p.G, H = p.H, G = p.G;
	const float kqmax = (float)((1u << p.kb) - 1);
	const int kqmi = (1 << p.kb) - 1;
	const uint32_t rowb = D * p.kb / 8;
	for (uint32_t tile_i = blockIdx.x; tile_i < f.n_tiles; tile_i += gridDim.x) {
		const uint32_t jb = tile_i / (p.L * NG), rem = tile_i % (p.L * NG);
		const uint32_t l = rem / NG, gi = rem % NG, t0 = gi * G;
		const enc_job_dev &j = p.jobs[jb];
		const size_t row = (size_t)H * D;
		const uint8_t *kin = (const uint8_t *)j.k + ((size_t)l * p.B + t0) * row * ws;
		uint8_t *sec = j.out + j.hdr_bytes + (size_t)l * j.layer_bytes;

		/* exact copies of pinned tokens (K; the V warps' rows write no exact copies) */
		if (t0 < j.n_pin) {
			const uint8_t *vin = (const uint8_t *)j.v + ((size_t)l * p.B + t0) * row * ws;
			uint32_t np = min(j.n_pin - t0, G);
			uint32_t wpr = (uint32_t)(row * ws / 4);
			for (uint32_t i = ktid; i < np * wpr; i += FE_KTHREADS) {
				uint32_t t = i / wpr, w = i % wpr;
				size_t dst = (size_t)(t0 + t) * wpr + w;
				((uint32_t *)(sec + j.k_exact_off))[dst] = ((const uint32_t *)kin)[(size_t)t * wpr + w];
				((uint32_t *)(sec + j.v_exact_off))[dst] = ((const uint32_t *)vin)[(size_t)t * wpr + w];
			}
		}

		/* phase 1: rotated rows into the tile */
		const uint32_t n_rows = G * H;
		for (uint32_t r0 = kw * RPW; r0 < n_rows; r0 += FE_KWARPS * RPW) {
			uint32_t r = r0 + lane / R;
			const bool valid = r < n_rows;
			if (!valid)
				r = n_rows - 1;
			const uint32_t t = r / H, h = r % H;
			float x[32];
			fe_ld32(kin + ((size_t)r * D + q * 32) * ws, p.dtype, x);
			if (oscar)
				fe_fwht<R>(x, lane, p.inv_sqrt_d);
			if (valid) {
				float4 *dst = (float4 *)(tile + t * f.tok_stride + (h * R + q) * FE_SEG);
#pragma unroll
				for (int i = 0; i < 8; i++)
					dst[i] = make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
			}
		}
		fe_kbar();

		/* phase 2: norms, the CPU's summation order */
		if (oscar) {
			for (uint32_t i = ktid; i < G * 8; i += FE_KTHREADS) {
				const uint32_t t = i / 8, jl = i % 8;
				const float *xt = tile + t * f.tok_stride;
				float a = 0.0f;
				/* channel jl + 8k: segment k / 4, offset jl + 8 (k % 4) */
				for (uint32_t h = 0; h < H; h++) {
					const float *xh = xt + h * R * FE_SEG + jl;
#pragma unroll
					for (int k = 0; k < D / 8; k++) {
						float v = xh[(k / 4) * FE_SEG + 8 * (k % 4)];
						a = __fadd_rn(a, __fmul_rn(v, v));
					}
				}
				/* kvt_reduce8: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)) */
				a = __fadd_rn(a, __shfl_xor_sync(KVT_FULL_MASK, a, 4));
				a = __fadd_rn(a, __shfl_xor_sync(KVT_FULL_MASK, a, 2));
				a = __fadd_rn(a, __shfl_xor_sync(KVT_FULL_MASK, a, 1));
				float n = __fsqrt_rn(a);
				if (n == 0.0f || !isfinite(n))
					n = 1.0f;
				if (jl == 0) {
					nrm[t] = n;
					rnrm[t] = __frcp_rn(n);
					((float *)(sec + p.norms_off))[t0 + t] = n;
				}
			}
			fe_kbar();
		}

		/* phase 3: per-channel min/max over the group's unpinned tokens, codes */
		const bool any = j.n_pin < t0 + G;
		for (uint32_t i = ktid; i < H * D / 2; i += FE_KTHREADS) {
			const uint32_t h = i / (D / 2), c = 2 * (i % (D / 2));
			float *col = tile + (h * R + c / 32) * FE_SEG + c % 32;
			float mn0 = __int_as_float(0x7f800000), mx0 = -mn0, mn1 = mn0, mx1 = mx0;
			for (uint32_t t = 0; t < G; t++) {
				float2 v = *(float2 *)(col + t * f.tok_stride);
				if (oscar) {
					/* x / n correctly rounded: q = x * RN(1/n), then one correction
					 * q + (x - q n) / n (Markstein; the remainder is exact by fma) */
					const float n = nrm[t], rn = rnrm[t];
					float qx = __fmul_rn(v.x, rn), qy = __fmul_rn(v.y, rn);
					qx = __fmaf_rn(__fmaf_rn(-qx, n, v.x), rn, qx);
					qy = __fmaf_rn(__fmaf_rn(-qy, n, v.y), rn, qy);
					v = make_float2(qx, qy);
					*(float2 *)(col + t * f.tok_stride) = v;
				}
				if (t0 + t >= j.n_pin) {
					mn0 = fminf(mn0, v.x);
					mx0 = fmaxf(mx0, v.x);
					mn1 = fminf(mn1, v.y);
					mx1 = fmaxf(mx1, v.y);
				}
			}
			uint16_t sb0, zb0, sb1, zb1;
			float s0, z0, s1, z1;
			kvt_d_qparam(mn0, mx0, any, kqmax, p.sbf, &sb0, &zb0, &s0, &z0);
			kvt_d_qparam(mn1, mx1, any, kqmax, p.sbf, &sb1, &zb1, &s1, &z1);
			const size_t pidx = ((size_t)h * NG + gi) * D + c;
			*(uint32_t *)((uint16_t *)(sec + p.k_scale_off) + pidx) = sb0 | ((uint32_t)sb1 << 16);
			*(uint32_t *)((uint16_t *)(sec + p.k_zero_off) + pidx) = zb0 | ((uint32_t)zb1 << 16);
			const float rs0 = __frcp_rn(s0), rs1 = __frcp_rn(s1);
			const bool f0 = s0 != 0.0f && isfinite(rs0), f1 = s1 != 0.0f && isfinite(rs1);
			uint8_t *crow = sec + p.k_codes_off + ((size_t)h * p.B + t0) * rowb;
			const bool fast = f0 && f1;
			for (uint32_t t = 0; t < G; t++) {
				float2 v = *(float2 *)(col + t * f.tok_stride);
				uint32_t c0 = 0, c1 = 0;
				if (fast) {
					c0 = (uint32_t)fe_qcode<EXACT>(v.x, s0, rs0, z0, kqmi);
					c1 = (uint32_t)fe_qcode<EXACT>(v.y, s1, rs1, z1, kqmi);
				} else {
					c0 = f0 ? (uint32_t)fe_qcode<EXACT>(v.x, s0, rs0, z0, kqmi)
						: kvt_d_qcode(v.x, s0, z0, kqmax);
					c1 = f1 ? (uint32_t)fe_qcode<EXACT>(v.y, s1, rs1, z1, kqmi)
						: kvt_d_qcode(v.y, s1, z1, kqmax);
				}
				if (t0 + t < j.n_pin)
					c0 = c1 = 0;
				const uint32_t pk = c0 | (c1 << p.kb);
				uint8_t *dst = crow + (size_t)t * rowb;
				if (p.kb == 2) {
					uint32_t hi = __shfl_xor_sync(KVT_FULL_MASK, pk, 1);
					if (!(i & 1))
						dst[c / 4] = (uint8_t)(pk | (hi << 4));
				} else if (HAS3 && p.kb == 3) {
					/* low plane as a 2-bit row (two threads' pairs per byte), high
					 * plane at D/4 (four threads' pairs per byte; D/2 is a multiple
					 * of 4, so i & 3 is (c / 2) & 3) */
					const uint32_t lo = (c0 & 3u) | ((c1 & 3u) << 2);
					const uint32_t lo2 = __shfl_xor_sync(KVT_FULL_MASK, lo, 1);
					uint32_t hb = ((c0 >> 2) | ((c1 >> 2) << 1)) << ((i & 3) * 2);
					hb |= __shfl_xor_sync(KVT_FULL_MASK, hb, 1);
					hb |= __shfl_xor_sync(KVT_FULL_MASK, hb, 2);
					if (!(i & 1))
						dst[c / 4] = (uint8_t)(lo | (lo2 << 4));
					if (!(i & 3))
						dst[D / 4 + c / 8] = (uint8_t)hb;
				} else if (p.kb == 4) {
					dst[c / 2] = (uint8_t)pk;
				} else {
					*(uint16_t *)(dst + c) = (uint16_t)pk;
				}
			}
		}
		fe_kbar(); /* the tile is rewritten by the next one */
	}
}

/* HAS3: 3-bit keys or values (a separate instantiation: with the 3-bit branches in, ptxas
 * spilled more in the 2/4/8-bit kernels, 8 instead of 4 bytes at d 128) */
template <int D, bool EXACT, bool HAS3>
__global__ void __launch_bounds__(FE_THREADS, 1) fe_kernel(fe_params f)
{
	extern __shared__ float smem[];
	const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
	if (warp < FE_KWARPS)
		fe_keys<D, EXACT, HAS3>(f, smem, smem + f.tile_floats, threadIdx.x);
	fe_values<D, EXACT, HAS3>(f, lane);
}

/* Tile geometry, or 0 when the fast path does not take this config. */
static size_t fe_smem_bytes(const struct kvt_codec_config *cfg, uint32_t *tile_floats,
			    uint32_t *tok_stride)
{
	if (cfg->scheme != KVT_SCHEME_OSCAR && cfg->scheme != KVT_SCHEME_KIVI)
		return 0;
	const uint32_t D = cfg->head_dim, R = D / 32, H = cfg->n_kv_heads;
	if (D != 64 && D != 128 && D != 256)
		return 0;
	const uint32_t ts = H * R * FE_SEG + FE_TPAD;
	const uint32_t tf = cfg->group * ts;
	const size_t bytes = ((size_t)tf + 2 * cfg->group) * 4;
	if (cfg->chunk_tokens % FE_VTOK)
		return 0;
	if (bytes > 200 * 1024)
		return 0;
	*tile_floats = tf;
	*tok_stride = ts;
	return bytes;
}

template <int D, bool EXACT, bool HAS3>
static cudaError_t fe_launch1(const fe_params &f, size_t smem, int sms, cudaStream_t s)
{
	cudaError_t e = cudaFuncSetAttribute(fe_kernel<D, EXACT, HAS3>,
					     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
	if (e != cudaSuccess)
		return e;
	unsigned grid = (unsigned)sms;
	if (grid > f.n_tiles)
		grid = f.n_tiles;
	fe_kernel<D, EXACT, HAS3><<<grid, FE_THREADS, smem, s>>>(f);
	return cudaGetLastError();
}

/* KVTIER_CUDA_ENC_INEXACT=1: codes from the reciprocal product alone (no near-tie check;
 * codes may then differ from the CPU's at rounding ties, as issue 4 allows). A/B runs. */
template <int D>
static cudaError_t fe_launch(const fe_params &f, size_t smem, int sms, cudaStream_t s)
{
	if (f.p.kb == 3 || f.p.vb == 3) /* exact only (the A/B switch is for the INT2 kernel) */
		return fe_launch1<D, true, true>(f, smem, sms, s);
	const char *e = getenv("KVTIER_CUDA_ENC_INEXACT");
	if (e && e[0] == '1')
		return fe_launch1<D, false, false>(f, smem, sms, s);
	return fe_launch1<D, true, false>(f, smem, sms, s);
}

static void fill_gaps(const struct kvt_chunk_layout *lay, enc_job_dev *j)
{
	const size_t offs[9] = {lay->norms_off,   lay->k_scale_off, lay->k_zero_off,
				lay->v_scale_off, lay->v_zero_off,  lay->k_codes_off,
				lay->v_codes_off, lay->k_exact_off, lay->v_exact_off};
	const size_t sizes[9] = {lay->norms_bytes,   lay->k_scale_bytes, lay->k_scale_bytes,
				 lay->v_scale_bytes, lay->v_scale_bytes, lay->k_codes_bytes,
				 lay->v_codes_bytes, lay->exact_bytes,   lay->exact_bytes};
	j->n_gaps = 0;
	if (offs[0] > 0) {
		j->gap_off[j->n_gaps] = 0;
		j->gap_len[j->n_gaps++] = (uint32_t)offs[0];
	}
	for (int i = 0; i < 9; i++) {
		size_t end = offs[i] + sizes[i];
		size_t next = i < 8 ? offs[i + 1] : lay->layer_bytes;
		if (next > end) {
			j->gap_off[j->n_gaps] = (uint32_t)end;
			j->gap_len[j->n_gaps++] = (uint32_t)(next - end);
		}
	}
}

extern "C" int kvt_cuda_encode(kvt_cuda_ctx *c, const struct kvt_codec_config *cfg,
			       const struct kvt_cuda_encode_job *jobs, size_t n_jobs,
			       int64_t *sizes, char *err, size_t errlen)
{
	int rc;
	char why[200];
	if (!c || !cfg || (n_jobs && (!jobs || !sizes)))
		return kvt_cuda_errf(err, errlen, -EINVAL, "ctx, cfg, jobs or sizes is NULL");
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	if ((rc = kvt_codec_config_validate(cfg, why, sizeof(why))))
		return kvt_cuda_errf(err, errlen, rc, "%s", why);
	if (cfg->pin_detect_ratio > 0.0f && cfg->pin_detect_max > 0)
		return kvt_cuda_errf(err, errlen, -EOPNOTSUPP,
				     "pin detection (pin_detect_ratio %g) is CPU-only: encode "
				     "this session on the CPU",
				     (double)cfg->pin_detect_ratio);
	if (cfg->key_rounding != KVT_ROUNDING_MINMAX)
		return kvt_cuda_errf(err, errlen, -EOPNOTSUPP,
				     "key_rounding %s is CPU-only: encode this session on the CPU",
				     kvt_rounding_name(cfg->key_rounding));
	if (n_jobs > KVT_CUDA_MAX_JOBS)
		return kvt_cuda_errf(err, errlen, -EINVAL, "n_jobs %zu is above %d", n_jobs,
				     KVT_CUDA_MAX_JOBS);
	if (n_jobs == 0)
		return 0;
	const uint32_t B = cfg->chunk_tokens, D = cfg->head_dim;
	const bool none = cfg->scheme == KVT_SCHEME_NONE;
	if (enc_smem_bytes(cfg->group, D) > 200 * 1024)
		return kvt_cuda_errf(err, errlen, -EOPNOTSUPP, "group %u x head_dim %u is too "
				     "large for one GPU block", cfg->group, D);

	if ((rc = kvt_cuda_stage_acquire(c, err, errlen)))
		return rc;
	uint8_t *sh = (uint8_t *)c->stage_host;
	size_t desc_bytes = (n_jobs * sizeof(enc_job_dev) + 63) & ~(size_t)63;
	size_t used = desc_bytes;
	enc_job_dev *jd = (enc_job_dev *)sh;
	struct kvt_chunk_layout lay0;
	if (kvt_chunk_layout(cfg, 0, &lay0))
		return kvt_cuda_errf(err, errlen, -EINVAL, "config has no chunk layout");
	uint64_t max_total = 0, n_items = 0;
	for (size_t i = 0; i < n_jobs; i++) {
		const struct kvt_cuda_encode_job *jb = &jobs[i];
		if (!jb->k_dev || !jb->v_dev || !jb->out_dev)
			return kvt_cuda_errf(err, errlen, -EINVAL, "job %zu: %s is NULL", i,
					     !jb->k_dev ? "k_dev" : !jb->v_dev ? "v_dev" : "out_dev");
		if (((uintptr_t)jb->out_dev & 15) || ((uintptr_t)jb->k_dev & 15) ||
		    ((uintptr_t)jb->v_dev & 15))
			return kvt_cuda_errf(err, errlen, -EINVAL,
					     "job %zu: out_dev, k_dev and v_dev must be 16-byte aligned", i);
		if (jb->first_token > UINT64_MAX - B)
			return kvt_cuda_errf(err, errlen, -EINVAL, "job %zu: first_token overflows",
					     i);
		uint32_t n_pin = 0;
		if (!none && jb->first_token < cfg->n_sinks) {
			uint64_t np = cfg->n_sinks - jb->first_token;
			n_pin = (uint32_t)(np < B ? np : B);
		}
		struct kvt_chunk_layout lay;
		if (kvt_chunk_layout(cfg, n_pin, &lay))
			return kvt_cuda_errf(err, errlen, -EINVAL, "job %zu: no layout", i);
		if (jb->out_cap < lay.total_bytes)
			return kvt_cuda_errf(err, errlen, -ENOSPC,
					     "job %zu: out_cap %zu is below the chunk's %zu bytes", i,
					     jb->out_cap, lay.total_bytes);
		if (lay.data_offset > c->stage_bytes - used)
			return kvt_cuda_errf(err, errlen, -ENOSPC, "staging buffer full");
		/* header and pin table, exactly as the CPU writes them (crc 0 for now) */
		uint8_t *hb = sh + used;
		memset(hb, 0, lay.data_offset);
		struct kvt_chunk_header h;
		memset(&h, 0, sizeof(h));
		h.magic = KVT_CHUNK_MAGIC;
		h.version = KVT_CHUNK_VERSION;
		h.header_bytes = KVT_CHUNK_HEADER_BYTES;
		h.scheme = (uint8_t)cfg->scheme;
		h.key_bits = (uint8_t)(none ? 16 : cfg->key_bits);
		h.value_bits = (uint8_t)(none ? 16 : cfg->value_bits);
		h.dtype = (uint8_t)cfg->dtype;
		h.rotate_v = (uint8_t)cfg->rotate_v;
		h.scale_dtype = (uint8_t)kvt_sdt_of(cfg->dtype);
		h.group = (uint16_t)cfg->group;
		h.chunk_tokens = (uint16_t)B;
		h.n_layers = (uint16_t)cfg->n_layers;
		h.n_kv_heads = (uint16_t)cfg->n_kv_heads;
		h.head_dim = (uint16_t)D;
		h.n_pinned = (uint16_t)n_pin;
		h.n_sinks = (uint16_t)cfg->n_sinks;
		h.first_token = jb->first_token;
		h.layer_bytes = (uint32_t)lay.layer_bytes;
		h.data_offset = (uint32_t)lay.data_offset;
		h.total_bytes = lay.total_bytes;
		memcpy(hb, &h, sizeof(h));
		for (uint32_t t = 0; t < n_pin; t++) {
			uint16_t v = (uint16_t)t;
			memcpy(hb + KVT_CHUNK_HEADER_BYTES + 2 * t, &v, 2);
		}
		enc_job_dev *d = &jd[i];
		memset(d, 0, sizeof(*d));
		d->k = jb->k_dev;
		d->v = jb->v_dev;
		d->out = (uint8_t *)jb->out_dev;
		d->hdr_src = (const uint8_t *)c->stage_dev + used;
		d->hdr_bytes = (uint32_t)lay.data_offset;
		d->n_pin = n_pin;
		d->layer_bytes = lay.layer_bytes;
		d->total_bytes = lay.total_bytes;
		d->k_exact_off = lay.k_exact_off;
		d->v_exact_off = lay.v_exact_off;
		fill_gaps(&lay, d);
		d->crc_item0 = (uint32_t)n_items;
		n_items += crc_items(lay.total_bytes);
		used += (lay.data_offset + 63) & ~(size_t)63;
		sizes[i] = (int64_t)lay.total_bytes;
		if (lay.total_bytes > max_total)
			max_total = lay.total_bytes;
	}
	if (n_items > UINT32_MAX / 2) /* 8 KiB regions in items of CRC10_R: ~2^44 bytes */
		return kvt_cuda_errf(err, errlen, -EINVAL, "%llu crc items in one call (at most %u)",
				     (unsigned long long)n_items, UINT32_MAX / 2);
	if ((rc = kvt_cuda_stage_push(c, used, err, errlen)))
		return rc;

	enc_params p;
	memset(&p, 0, sizeof(p));
	p.jobs = (const enc_job_dev *)c->stage_dev;
	p.crc_acc = c->crc_acc_dev;
	p.work_ctr = c->work_ctr_dev;
	p.B = B;
	p.G = cfg->group;
	p.H = cfg->n_kv_heads;
	p.L = cfg->n_layers;
	p.scheme = cfg->scheme;
	p.kb = cfg->key_bits;
	p.vb = cfg->value_bits;
	p.dtype = cfg->dtype;
	p.rotate_v = cfg->rotate_v;
	p.sbf = cfg->dtype == KVT_DTYPE_BF16;
	p.crc_field_off = (uint32_t)offsetof(struct kvt_chunk_header, crc32c);
	p.norms_off = (uint32_t)lay0.norms_off;
	p.k_scale_off = (uint32_t)lay0.k_scale_off;
	p.k_zero_off = (uint32_t)lay0.k_zero_off;
	p.v_scale_off = (uint32_t)lay0.v_scale_off;
	p.v_zero_off = (uint32_t)lay0.v_zero_off;
	p.k_codes_off = (uint32_t)lay0.k_codes_off;
	p.v_codes_off = (uint32_t)lay0.v_codes_off;
	p.inv_sqrt_d = (float)(1.0 / sqrt((double)D));

	CK(cudaSetDevice(c->device), "cudaSetDevice");
	enc_prep_kernel<<<dim3(p.L + 1, (unsigned)n_jobs), 256, 0, st>>>(p);
	CK(cudaGetLastError(), "encode prep launch");
	const bool mx = !kvt_cuda_codec_old() && !kvt_cuda_enc_exact() && kvt_mx_supports(cfg);
	/* the crc pass as the encoder's programmatic dependent: only mx_kernel counts its
	 * finished blocks per chunk and allows the dependent's launch (sm_90+) */
	const bool pdl = mx && c->cc_major >= 9 && !crc_pdl_off();
	crc_args ca;
	ca.jobs = p.jobs;
	ca.n_jobs = (uint32_t)n_jobs;
	ca.n_items = (uint32_t)n_items;
	ca.rpi = CRC10_R;
	ca.need = pdl ? (B / 32) * p.L : 0; /* mx_kernel's blocks per chunk */
	ca.acc = p.crc_acc;
	ca.sync = c->work_ctr_dev;
	cudaError_t e;
	uint32_t fe_tf = 0, fe_ts = 0;
	const size_t fe_sm = fe_smem_bytes(cfg, &fe_tf, &fe_ts);
	if (mx) {
		e = kvt_mx_launch(p, (uint32_t)n_jobs, D, st);
	} else if (fe_sm && !kvt_cuda_codec_old()) {
		fe_params f;
		memset(&f, 0, sizeof(f));
		f.p = p;
		f.vctr = c->work_ctr_dev;
		f.n_jobs = (uint32_t)n_jobs;
		f.n_tiles = (uint32_t)n_jobs * p.L * (B / p.G);
		f.tile_floats = fe_tf;
		f.tok_stride = fe_ts;
		e = D == 64    ? fe_launch<64>(f, fe_sm, c->sm_count, st)
		    : D == 128 ? fe_launch<128>(f, fe_sm, c->sm_count, st)
			       : fe_launch<256>(f, fe_sm, c->sm_count, st);
	} else switch (D) {
	case 64:
		e = enc_launch<64>(p, (uint32_t)n_jobs, st);
		break;
	case 128:
		e = enc_launch<128>(p, (uint32_t)n_jobs, st);
		break;
	default:
		e = enc_launch<256>(p, (uint32_t)n_jobs, st);
		break;
	}
	CK(e, "encode launch");
	if (kvt_cuda_codec_old()) {
		unsigned crc_blocks = (unsigned)((max_total + 256 * CRC_SEG - 1) / (256 * CRC_SEG));
		crc_kernel<<<dim3(crc_blocks, (unsigned)n_jobs), 256, 0, st>>>(p.jobs,
										      p.crc_acc);
	} else {
		CK((crc10_launch<8, 2, 4096>(ca, c->sm_count, pdl, st)), "crc launch");
	}
	CK(cudaGetLastError(), "crc launch");
	crc_finish_kernel<<<(unsigned)((n_jobs + 127) / 128), 128, 0, st>>>(
		p.jobs, p.crc_acc, (uint32_t)n_jobs, p.crc_field_off);
	CK(cudaGetLastError(), "crc finish launch");
	return 0;
}

/* The crc pass alone, for test_gpu_codec's direct test (not public API): the crc32c of len
 * bytes at align_off of a device buffer, by crc10_kernel as a plain launch. */
extern "C" int kvt_cuda_crc_test(kvt_cuda_ctx *c, const void *host, size_t len, size_t align_off,
				 uint32_t *crc, char *err, size_t errlen)
{
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	if (len == 0 || len % 64 || align_off % 16)
		return kvt_cuda_errf(err, errlen, -EINVAL,
				     "crc test: len %zu (a positive multiple of 64), align_off %zu "
				     "(a multiple of 16)",
				     len, align_off);
	uint8_t *buf = NULL;
	enc_job_dev *jd = NULL;
	int rc = 0;
	enc_job_dev job;
	memset(&job, 0, sizeof(job));
	crc_args ca;
	memset(&ca, 0, sizeof(ca));
	if ((rc = kvt_cuda_check(cudaMalloc((void **)&buf, align_off + len + 64), "crc test alloc",
				 err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMalloc((void **)&jd, sizeof(*jd)), "crc test alloc", err,
				 errlen)))
		goto out;
	job.out = buf + align_off;
	job.total_bytes = len;
	ca.jobs = jd;
	ca.n_jobs = 1;
	ca.n_items = (uint32_t)crc_items(len);
	ca.rpi = CRC10_R;
	ca.acc = c->crc_acc_dev;
	ca.sync = c->work_ctr_dev;
	if ((rc = kvt_cuda_check(cudaMemcpy(buf + align_off, host, len, cudaMemcpyHostToDevice),
				 "crc test copy", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMemcpy(jd, &job, sizeof(job), cudaMemcpyHostToDevice),
				 "crc test copy", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMemsetAsync(c->crc_acc_dev, 0, sizeof(uint32_t), st),
				 "crc test memset", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMemsetAsync(c->work_ctr_dev, 0,
						 CRC_SYNC_WORDS * sizeof(uint32_t), st),
				 "crc test memset", err, errlen)) ||
	    (rc = kvt_cuda_check(crc10_launch<8, 2, 4096>(ca, c->sm_count, false, st),
				 "crc test launch", err, errlen)))
		goto out;
	crc_finish_kernel<<<1, 128, 0, st>>>(jd, c->crc_acc_dev, 1, (uint32_t)len);
	if ((rc = kvt_cuda_check(cudaGetLastError(), "crc test finish", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMemcpyAsync(crc, buf + align_off + len, 4,
					       cudaMemcpyDeviceToHost, st),
				 "crc test copy back", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaStreamSynchronize(st), "crc test sync", err, errlen)))
		goto out;
out:
	if (buf)
		cudaFree(buf);
	if (jd)
		cudaFree(jd);
	return rc;
}

/* ---- Decode ------------------------------------------------------------------------------- */

#define DEC_THREADS 256
#define DEC_TOKENS 16 /* tokens per block */

struct dec_job_dev {
	const uint8_t *chunk;
	const uint16_t *pins;
	void *k_out, *v_out;
	uint64_t data_offset, layer_bytes, k_exact_off, v_exact_off;
	uint32_t n_pinned, tb, te, lb, le, out_dtype;
};

struct dec_params {
	const dec_job_dev *jobs;
	uint32_t B, G, H, scheme, kb, vb, dtype, rotate_v, sbf;
	uint32_t norms_off, k_scale_off, k_zero_off, v_scale_off, v_zero_off, k_codes_off,
		v_codes_off;
	float inv_sqrt_d;
};

/* A lane's EPL consecutive elements of a row, as f32, with one vector load. */
template <int EPL>
__device__ __forceinline__ void ld_vec(const uint8_t *row, int lane, uint32_t dt, float (&x)[EPL])
{
	if (dt == KVT_DTYPE_F32) {
		const float4 *p4 = (const float4 *)(row + (size_t)lane * EPL * 4);
		if constexpr (EPL == 2) {
			float2 v = *(const float2 *)(row + (size_t)lane * 8);
			x[0] = v.x;
			x[1] = v.y;
		} else {
#pragma unroll
			for (int i = 0; i < EPL / 4; i++) {
				float4 v = p4[i];
				x[4 * i] = v.x;
				x[4 * i + 1] = v.y;
				x[4 * i + 2] = v.z;
				x[4 * i + 3] = v.w;
			}
		}
		return;
	}
	uint32_t w[EPL / 2];
	if constexpr (EPL == 2) {
		w[0] = *(const uint32_t *)(row + (size_t)lane * 4);
	} else if constexpr (EPL == 4) {
		uint2 v = *(const uint2 *)(row + (size_t)lane * 8);
		w[0] = v.x;
		w[1] = v.y;
	} else {
		uint4 v = *(const uint4 *)(row + (size_t)lane * 16);
		w[0] = v.x;
		w[1] = v.y;
		w[2] = v.z;
		w[3] = v.w;
	}
#pragma unroll
	for (int i = 0; i < EPL; i++) {
		uint16_t hbits = (uint16_t)(i & 1 ? w[i / 2] >> 16 : w[i / 2] & 0xffff);
		x[i] = dt == KVT_DTYPE_BF16 ? __uint_as_float((uint32_t)hbits << 16)
					    : __half2float(__ushort_as_half(hbits));
	}
}

/* Stores a lane's EPL consecutive elements with one vector store (16-bit types packed). */
template <int EPL>
__device__ __forceinline__ void st_vec(uint8_t *row, int lane, uint32_t dt, const float (&x)[EPL])
{
	if (dt == KVT_DTYPE_F32) {
		if constexpr (EPL == 2) {
			*(float2 *)(row + (size_t)lane * 8) = make_float2(x[0], x[1]);
		} else {
#pragma unroll
			for (int i = 0; i < EPL / 4; i++)
				((float4 *)(row + (size_t)lane * EPL * 4))[i] =
					make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
		}
		return;
	}
	uint32_t w[EPL / 2];
#pragma unroll
	for (int i = 0; i < EPL / 2; i++) {
		uint32_t lo = kvt_d_round16(x[2 * i], dt == KVT_DTYPE_BF16);
		uint32_t hi = kvt_d_round16(x[2 * i + 1], dt == KVT_DTYPE_BF16);
		w[i] = lo | (hi << 16);
	}
	if constexpr (EPL == 2)
		*(uint32_t *)(row + (size_t)lane * 4) = w[0];
	else if constexpr (EPL == 4)
		*(uint2 *)(row + (size_t)lane * 8) = make_uint2(w[0], w[1]);
	else
		*(uint4 *)(row + (size_t)lane * 16) = make_uint4(w[0], w[1], w[2], w[3]);
}

/* A lane's EPL codes of a packed row (EPL * bits = 4..64 bits, contiguous). */
template <int EPL>
__device__ __forceinline__ uint64_t ld_codes(const uint8_t *row, int lane, uint32_t bits)
{
	switch (EPL * bits) {
	case 4:
		return (row[lane >> 1] >> ((lane & 1) * 4)) & 0xf;
	case 8:
		return row[lane];
	case 16:
		return ((const uint16_t *)row)[lane];
	case 32:
		return ((const uint32_t *)row)[lane];
	default:
		return ((const uint64_t *)row)[lane];
	}
}

/* The same for a 3-bit row (low plane at 0, high plane at D/4), returned as 3-bit fields. */
template <int EPL>
__device__ __forceinline__ uint64_t ld_codes3(const uint8_t *row, int lane, uint32_t D)
{
	const uint32_t lo = (uint32_t)ld_codes<EPL>(row, lane, 2);
	const uint32_t hi = (uint32_t)(EPL == 8 ? row[D / 4 + lane]
				       : (row[D / 4 + lane * EPL / 8] >> ((lane * EPL) % 8)) &
						 ((1u << EPL) - 1));
	uint64_t v = 0;
#pragma unroll
	for (int e = 0; e < EPL; e++)
		v |= (uint64_t)(((lo >> (2 * e)) & 3u) | (((hi >> e) & 1u) << 2)) << (3 * e);
	return v;
}

#define DEC_ROWS 4 /* rows per warp iteration: their loads are all in flight together */

template <int D>
__global__ void __launch_bounds__(DEC_THREADS) dec_kernel(dec_params p)
{
	constexpr int EPL = D / 32;
	__shared__ int16_t pidx[KVT_MAX_CHUNK_TOKENS];
	const dec_job_dev &j = p.jobs[blockIdx.z];
	const uint32_t l = j.lb + blockIdx.y;
	const uint32_t tb = j.tb + blockIdx.x * DEC_TOKENS;
	if (l >= j.le || tb >= j.te)
		return;
	const uint32_t te = min(tb + DEC_TOKENS, j.te);
	for (uint32_t t = threadIdx.x; t < p.B; t += DEC_THREADS)
		pidx[t] = -1;
	__syncthreads();
	for (uint32_t i = threadIdx.x; i < j.n_pinned; i += DEC_THREADS)
		pidx[j.pins[i]] = (int16_t)i;
	__syncthreads();

	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	const size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
	const size_t os = j.out_dtype == KVT_DTYPE_F32 ? 4 : 2;
	const uint8_t *sec = j.chunk + j.data_offset + (size_t)l * j.layer_bytes;
	const uint32_t nt = j.te - j.tb, gv = p.G < D ? p.G : D, ng = D / gv;
	const bool bf = p.sbf;
	const uint32_t rows = (te - tb) * p.H * 2;
	const uint32_t c0 = lane * EPL;
	for (uint32_t r0 = warp * DEC_ROWS; r0 < rows; r0 += DEC_ROWS * (DEC_THREADS / 32)) {
		float x[DEC_ROWS][EPL];
		float mult[DEC_ROWS];
		bool rot[DEC_ROWS];
		uint8_t *dst[DEC_ROWS];
		/* loads of DEC_ROWS rows first */
#pragma unroll
		for (int rr = 0; rr < DEC_ROWS; rr++) {
			const uint32_t r = r0 + rr;
			dst[rr] = NULL;
			rot[rr] = false;
			mult[rr] = p.inv_sqrt_d;
			if (r >= rows)
				continue;
			const bool is_v = r & 1;
			const uint32_t th = r >> 1, t = tb + th / p.H, h = th % p.H;
			void *out = is_v ? j.v_out : j.k_out;
			if (!out)
				continue;
			dst[rr] = (uint8_t *)out + ((((size_t)(l - j.lb) * nt + (t - j.tb)) * p.H + h) * D) * os;
			if (p.scheme == KVT_SCHEME_NONE) {
				ld_vec<EPL>(sec + (is_v ? p.v_codes_off : p.k_codes_off) + ((size_t)h * p.B + t) * D * ws,
					    lane, p.dtype, x[rr]);
				continue;
			}
			if (pidx[t] >= 0) {
				ld_vec<EPL>(sec + (is_v ? j.v_exact_off : j.k_exact_off) +
						    ((size_t)pidx[t] * p.H + h) * D * ws,
					    lane, p.dtype, x[rr]);
				continue;
			}
			const size_t idx = (size_t)h * p.B + t;
			const uint32_t bits = is_v ? p.vb : p.kb;
			const uint8_t *crow = sec + (is_v ? p.v_codes_off : p.k_codes_off) +
					      idx * (D * bits / 8);
			const uint64_t cb = bits == 3 ? ld_codes3<EPL>(crow, lane, D)
						      : ld_codes<EPL>(crow, lane, bits);
			const uint16_t *sc = (const uint16_t *)(sec + (is_v ? p.v_scale_off : p.k_scale_off));
			const uint16_t *zr = (const uint16_t *)(sec + (is_v ? p.v_zero_off : p.k_zero_off));
			const uint32_t mask = (1u << bits) - 1;
			if (!is_v && p.scheme != KVT_SCHEME_HADAMARD) {
				/* per-channel scale and zero: EPL consecutive halves */
				const size_t si = ((size_t)h * (p.B / p.G) + t / p.G) * D;
				float s[EPL], z[EPL];
				ld_vec<EPL>((const uint8_t *)(sc + si), lane, bf ? KVT_DTYPE_BF16 : KVT_DTYPE_F16, s);
				ld_vec<EPL>((const uint8_t *)(zr + si), lane, bf ? KVT_DTYPE_BF16 : KVT_DTYPE_F16, z);
#pragma unroll
				for (int e = 0; e < EPL; e++)
					x[rr][e] = __fadd_rn(__fmul_rn((float)((cb >> (e * bits)) & mask), s[e]), z[e]);
			} else {
				/* per-token group: the lane's EPL channels share one */
				const size_t si = idx * ng + c0 / gv;
				const float s = kvt_d_widen16(sc[si], bf), z = kvt_d_widen16(zr[si], bf);
#pragma unroll
				for (int e = 0; e < EPL; e++)
					x[rr][e] = __fadd_rn(__fmul_rn((float)((cb >> (e * bits)) & mask), s), z);
			}
			if (is_v) {
				rot[rr] = p.rotate_v != 0;
			} else {
				rot[rr] = p.scheme == KVT_SCHEME_OSCAR || p.scheme == KVT_SCHEME_HADAMARD;
				if (p.scheme == KVT_SCHEME_OSCAR)
					mult[rr] = __fmul_rn(((const float *)(sec + p.norms_off))[t], p.inv_sqrt_d);
			}
		}
		/* then the transforms and the stores */
#pragma unroll
		for (int rr = 0; rr < DEC_ROWS; rr++) {
			/* rot is uniform across the warp (one row per warp at a time) */
			if (rot[rr])
				kvt_d_fwht<EPL>(x[rr], lane, mult[rr]);
			if (dst[rr])
				st_vec<EPL>(dst[rr], lane, j.out_dtype, x[rr]);
		}
	}
}

/* ---- Fast decode (session 3) -------------------------------------------------------------
 *
 * One block per (job, layer, 32 chunk tokens aligned to 32); a warp pass is 32/R rows of one
 * (K or V, head) at consecutive tokens, R = D/32 lanes per row, 32 consecutive channels per
 * lane: the codes are one 8/16/32-byte load per lane, per-channel key scales are the same
 * for the whole pass (a key group holds >= 32 aligned tokens), the transform is 5 butterfly
 * stages in registers and log2(R) by shuffles (the CPU's order), and each lane writes its 32
 * outputs with 16-byte stores. Same float operations as the CPU decoder (code * s is exact,
 * so one fma equals the CPU's multiply-then-add).
 */
#define FD_THREADS 256
#define FD_TOK 32

__device__ __forceinline__ void fd_st32(uint8_t *p, uint32_t dt, const float (&x)[32])
{
	if (dt == KVT_DTYPE_F32) {
#pragma unroll
		for (int i = 0; i < 8; i++)
			((float4 *)p)[i] = make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
		return;
	}
	uint32_t w[16];
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (dt == KVT_DTYPE_BF16) {
			__nv_bfloat162 b = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
			w[i] = *(uint32_t *)&b;
		} else {
			__half2 hh = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
			w[i] = *(uint32_t *)&hh;
		}
	}
#pragma unroll
	for (int i = 0; i < 4; i++)
		((uint4 *)p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
}

/* A lane's 32 codes -> code * s + z: per-channel s, z (32 consecutive halves at sc, zr) or
 * one per-token group value (sc[0], zr[0]). */
template <int BITS, bool FMA>
__device__ __forceinline__ void fd_dequant(const uint8_t *cr, const uint16_t *sc,
					   const uint16_t *zr, bool per_ch, bool bf, float (&x)[32])
{
	constexpr uint32_t NW = BITS, MASK = (1u << BITS) - 1; /* 32 * BITS / 32 words */
	uint32_t w[NW];
	if (BITS == 2) {
		uint2 v = *(const uint2 *)cr;
		w[0] = v.x;
		w[1] = v.y;
	} else {
#pragma unroll
		for (int i = 0; i < (int)NW / 4; i++) {
			uint4 v = ((const uint4 *)cr)[i];
			w[4 * i] = v.x;
			w[4 * i + 1] = v.y;
			w[4 * i + 2] = v.z;
			w[4 * i + 3] = v.w;
		}
	}
	if (per_ch) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			uint4 sv = ((const uint4 *)sc)[i], zv = ((const uint4 *)zr)[i];
			const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w}, zw[4] = {zv.x, zv.y, zv.z, zv.w};
#pragma unroll
			for (int k = 0; k < 8; k++) {
				const int e = 8 * i + k;
				const uint32_t cd = (w[e * BITS / 32] >> ((e * BITS) % 32)) & MASK;
				const uint16_t sb = (uint16_t)(k & 1 ? sw[k / 2] >> 16 : sw[k / 2] & 0xffff);
				const uint16_t zb = (uint16_t)(k & 1 ? zw[k / 2] >> 16 : zw[k / 2] & 0xffff);
				/* code * s is exact (<= 8 + 11 significant bits): one fma rounds as
				 * the CPU's multiply-then-add */
				if (FMA)
					x[e] = __fmaf_rn((float)cd, kvt_d_widen16(sb, bf), kvt_d_widen16(zb, bf));
				else
					x[e] = __fadd_rn(__fmul_rn((float)cd, kvt_d_widen16(sb, bf)),
							 kvt_d_widen16(zb, bf));
			}
		}
	} else {
		const float s = kvt_d_widen16(sc[0], bf), z = kvt_d_widen16(zr[0], bf);
#pragma unroll
		for (int e = 0; e < 32; e++) {
			const uint32_t cd = (w[e * BITS / 32] >> ((e * BITS) % 32)) & MASK;
			x[e] = __fmaf_rn((float)cd, s, z);
		}
	}
}

/* fd_dequant for a 3-bit row: lo = the lane's 64 low-plane bits (8 bytes at q * 8), hi its 32
 * high-plane bits (4 bytes at D/4 + q * 4) */
template <bool FMA>
__device__ __forceinline__ void fd_dequant3(const uint8_t *lo, const uint8_t *hi,
					    const uint16_t *sc, const uint16_t *zr, bool per_ch,
					    bool bf, float (&x)[32])
{
	const uint2 lv = *(const uint2 *)lo;
	const uint32_t hv = *(const uint32_t *)hi;
	uint32_t cds[32];
#pragma unroll
	for (int e = 0; e < 32; e++)
		cds[e] = (((e < 16 ? lv.x : lv.y) >> ((e % 16) * 2)) & 3u) | (((hv >> e) & 1u) << 2);
	if (per_ch) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			uint4 sv = ((const uint4 *)sc)[i], zv = ((const uint4 *)zr)[i];
			const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w}, zw[4] = {zv.x, zv.y, zv.z, zv.w};
#pragma unroll
			for (int k = 0; k < 8; k++) {
				const int e = 8 * i + k;
				const uint16_t sb = (uint16_t)(k & 1 ? sw[k / 2] >> 16 : sw[k / 2] & 0xffff);
				const uint16_t zb = (uint16_t)(k & 1 ? zw[k / 2] >> 16 : zw[k / 2] & 0xffff);
				if (FMA)
					x[e] = __fmaf_rn((float)cds[e], kvt_d_widen16(sb, bf), kvt_d_widen16(zb, bf));
				else
					x[e] = __fadd_rn(__fmul_rn((float)cds[e], kvt_d_widen16(sb, bf)),
							 kvt_d_widen16(zb, bf));
			}
		}
	} else {
		const float s = kvt_d_widen16(sc[0], bf), z = kvt_d_widen16(zr[0], bf);
#pragma unroll
		for (int e = 0; e < 32; e++)
			x[e] = __fmaf_rn((float)cds[e], s, z);
	}
}

/* A decode block's table of the chunk's pinned tokens: pidx[t] = which exact row token t is
 * restored from, -1 for a coded token (every thread of the block calls it). */
__device__ __forceinline__ void fd_pin_index(const dec_params &p, const dec_job_dev &j, int16_t *pidx)
{
	if (j.n_pinned) {
		for (uint32_t t = threadIdx.x; t < p.B; t += FD_THREADS)
			pidx[t] = -1;
		__syncthreads();
		for (uint32_t i = threadIdx.x; i < j.n_pinned; i += FD_THREADS)
			pidx[j.pins[i]] = (int16_t)i;
		__syncthreads();
	}
}

/* HAS3: a config with 3-bit keys or values (a separate instantiation, so the 2/4/8-bit
 * kernels compile exactly as before) */
template <int D, bool FMA, int MINB, bool HAS3 = false>
__global__ void __launch_bounds__(FD_THREADS, MINB) fd_kernel(dec_params p)
{
	constexpr int R = D / 32, RPW = 32 / R, PPT = FD_TOK / RPW; /* passes per (kv, head) */
	__shared__ int16_t pidx[KVT_MAX_CHUNK_TOKENS];
	const dec_job_dev &j = p.jobs[blockIdx.z];
	const uint32_t l = j.lb + blockIdx.y;
	const uint32_t T0 = (j.tb & ~(uint32_t)(FD_TOK - 1)) + blockIdx.x * FD_TOK;
	if (l >= j.le || T0 >= j.te)
		return;
	fd_pin_index(p, j, pidx);
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, q = lane % R;
	const size_t ws = p.dtype == KVT_DTYPE_F32 ? 4 : 2;
	const size_t os = j.out_dtype == KVT_DTYPE_F32 ? 4 : 2;
	const uint8_t *sec = j.chunk + j.data_offset + (size_t)l * j.layer_bytes;
	const uint32_t nt = j.te - j.tb, gv = p.G < D ? p.G : D, ng = D / gv;
	const bool bf = p.sbf, none = p.scheme == KVT_SCHEME_NONE;
	const uint32_t n_pass = 2 * p.H * PPT;

	for (uint32_t ps = warp; ps < n_pass; ps += FD_THREADS / 32) {
		const uint32_t task = ps / PPT, sub = ps % PPT;
		const bool is_v = task & 1;
		const uint32_t h = task >> 1;
		const uint32_t t = T0 + sub * RPW + lane / R;
		const bool valid = t >= j.tb && t < j.te;
		const uint32_t tc = valid ? t : j.tb; /* a row to read for the shuffles */
		void *out = is_v ? j.v_out : j.k_out;
		if (!out)
			continue; /* uniform over the warp */
		const size_t idx = (size_t)h * p.B + tc;
		float x[32];
		bool rot = false;
		float mult = p.inv_sqrt_d;
		if (none) {
			fe_ld32(sec + (is_v ? p.v_codes_off : p.k_codes_off) + (idx * D + q * 32) * ws,
				p.dtype, x);
		} else {
			const uint32_t bits = is_v ? p.vb : p.kb;
			const uint8_t *cr = sec + (is_v ? p.v_codes_off : p.k_codes_off) +
					    idx * (D * bits / 8) + q * 4 * bits;
			const uint16_t *sc = (const uint16_t *)(sec + (is_v ? p.v_scale_off : p.k_scale_off));
			const uint16_t *zr = (const uint16_t *)(sec + (is_v ? p.v_zero_off : p.k_zero_off));
			const bool per_ch = !is_v && p.scheme != KVT_SCHEME_HADAMARD;
			/* per channel: the pass's tokens share one key group */
			const size_t si = per_ch ? ((size_t)h * (p.B / p.G) + tc / p.G) * D + q * 32
						 : idx * ng + q * 32 / gv;
			if (HAS3 && bits == 3) /* cr is the row + q * 12: the row's planes */
				fd_dequant3<FMA>(cr - q * 4, cr - q * 8 + D / 4, sc + si, zr + si,
						 per_ch, bf, x);
			else if (bits == 2)
				fd_dequant<2, FMA>(cr, sc + si, zr + si, per_ch, bf, x);
			else if (bits == 4)
				fd_dequant<4, FMA>(cr, sc + si, zr + si, per_ch, bf, x);
			else
				fd_dequant<8, FMA>(cr, sc + si, zr + si, per_ch, bf, x);
			if (is_v) {
				rot = p.rotate_v != 0;
			} else {
				rot = p.scheme == KVT_SCHEME_OSCAR || p.scheme == KVT_SCHEME_HADAMARD;
				if (p.scheme == KVT_SCHEME_OSCAR)
					mult = __fmul_rn(((const float *)(sec + p.norms_off))[tc], p.inv_sqrt_d);
			}
		}
		if (rot) /* uniform: one (kv, head) per pass */
			fe_fwht<R>(x, lane, mult);
		if (!valid)
			continue;
		if (!none && j.n_pinned && pidx[t] >= 0)
			fe_ld32(sec + (is_v ? j.v_exact_off : j.k_exact_off) +
					(((size_t)pidx[t] * p.H + h) * D + q * 32) * ws,
				p.dtype, x);
		uint8_t *dst = (uint8_t *)out +
			       ((((size_t)(l - j.lb) * nt + (t - j.tb)) * p.H + h) * D + q * 32) * os;
		fd_st32(dst, j.out_dtype, x);
	}
}

/* ---- Decode, session 5 (fd3_kernel) -------------------------------------------------------
 *
 * fd_kernel's grid and block (one block per (job, layer, 32 aligned chunk tokens), 8 warps,
 * D = 128: 4 lanes per row, 8 rows per warp pass), but for oscar / kivi with 2- or 4-bit keys
 * and values (the same bits), 16-bit data and output, the pass structure is fixed instead of
 * computed per pass: warp w always decodes the rows of tokens T0 + (w % 4) * 8 + lane / 4,
 * K then V, and walks the heads h = w / 4, + 2, ..., so the per-pass index math, the K/V and scheme
 * branches and the norm load leave the loop (fd_kernel spent ~7 of its 23 instructions per
 * element there). A lane holds four blocks of 8 consecutive channels: with CL (coalesced
 * layout) block k is channels 32k + 8q .. +7 (q = lane % 4), so the 4 lanes of a row write 64
 * contiguous bytes per 16-byte store and the butterflies run strides 1, 2, 4 in registers,
 * 8 and 16 across the row's lanes (shuffles), 32 and 64 in registers: the CPU's stage order,
 * so every value is the CPU's bit for bit. Without CL block k is channels 32q + 8k (the
 * session-3 layout: strides 1..16 in registers, 32 and 64 by shuffles).
 */
template <bool BF>
__device__ __forceinline__ float fd3_lo(uint32_t w)
{
	return BF ? __uint_as_float(w << 16) : __half2float(__ushort_as_half((uint16_t)(w & 0xffff)));
}

template <bool BF>
__device__ __forceinline__ float fd3_hi(uint32_t w)
{
	return BF ? __uint_as_float(w & 0xffff0000u) : __half2float(__ushort_as_half((uint16_t)(w >> 16)));
}

/* 8 codes of BITS bits (8 * BITS bits at p, aligned to their size) */
template <int BITS>
__device__ __forceinline__ uint32_t fd3_ldc(const uint8_t *p)
{
	return BITS == 2 ? *(const uint16_t *)p : *(const uint32_t *)p;
}

/* The lane's 32 codes as floats, x[8k + i] = code i of block k, without I2F (a quarter-rate
 * conversion): one shift and mask puts a code in the low bits of each of a word's 4 bytes,
 * one byte permute per byte makes the float 2^23 + code, minus 2^23 is the code (exact). */
template <int BITS>
__device__ __forceinline__ void fd3_codes(const uint32_t (&cw)[4], float (&x)[32])
{
	constexpr uint32_t BM = BITS == 2 ? 0x03030303u : 0x0f0f0f0fu;
#pragma unroll
	for (int wi = 0; wi < BITS; wi++) {
		/* 2 bits: blocks 2wi, 2wi + 1 (4 codes per byte); 4 bits: block wi (2 per byte) */
		const uint32_t W = BITS == 2 ? __byte_perm(cw[2 * wi], cw[2 * wi + 1], 0x5410) : cw[wi];
#pragma unroll
		for (int jj = 0; jj < 8 / BITS; jj++) {
			const uint32_t y = (W >> (BITS * jj)) & BM;
#pragma unroll
			for (int b = 0; b < 4; b++) {
				const int e = BITS == 2 ? 8 * (2 * wi + b / 2) + 4 * (b % 2) + jj
							: 8 * wi + 2 * b + jj;
				x[e] = __fadd_rn(__uint_as_float(__byte_perm(y, 0x4B000000u, 0x7540 + b)),
						 -8388608.0f);
			}
		}
	}
}

/* a lane's 8 16-bit values at p (16 bytes) widened */
template <bool BF>
__device__ __forceinline__ void fd3_ld8(const uint8_t *p, float *x)
{
	const uint4 v = *(const uint4 *)p;
	const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
	for (int i = 0; i < 4; i++) {
		x[2 * i] = fd3_lo<BF>(w[i]);
		x[2 * i + 1] = fd3_hi<BF>(w[i]);
	}
}

/* The CPU's fwht over a row held as described above, then * mult. */
template <bool CL>
__device__ __forceinline__ void fd3_fwht(float (&x)[32], int lane, float mult)
{
	/* in-register strides over the lane's element index e = 8k + i: 1, 2, 4 are channel
	 * bits 0-2 either way; 8, 16 are channel bits 5-6 with CL, 3-4 without */
	kvt_d_fwht_reg<32, 1, (CL ? 8 : 32)>(x);
	fe_fwht_lanes<4>(x, lane);
	if constexpr (CL)
		kvt_d_fwht_reg<32, 8, 32>(x);
	fe_scale32(x, mult);
}

__device__ __forceinline__ void fd3_st8(uint8_t *p, const float *x, bool obf)
{
	uint32_t w[4];
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (obf) {
			__nv_bfloat162 b = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
			w[i] = *(uint32_t *)&b;
		} else {
			__half2 hh = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
			w[i] = *(uint32_t *)&hh;
		}
	}
	*(uint4 *)p = make_uint4(w[0], w[1], w[2], w[3]);
}

/* IS_V: value rows (per-token groups of G channels), else key rows (per-channel scales of the
 * tokens' key group of G). SBF: bf16 scales and data (else f16); obf (uniform): bf16 output
 * (else f16). */
template <int BITS, bool IS_V, bool SBF, bool CL, int G>
__device__ __forceinline__ void fd3_rows(const dec_params &p, const dec_job_dev &j,
					 const uint8_t *sec, uint8_t *out, uint32_t l, uint32_t t,
					 bool valid, int pin, int lane, uint32_t h0, bool obf)
{
	constexpr int D = 128, RB = D * BITS / 8; /* code bytes per row */
	const int q = lane & 3;
	const uint32_t off0 = CL ? 8 * q : 32 * q, kst = CL ? 32 : 8; /* block k: off0 + k * kst */
	const uint32_t tc = valid ? t : j.tb;
	const uint8_t *cr = sec + (IS_V ? p.v_codes_off : p.k_codes_off) +
			    ((size_t)h0 * p.B + tc) * RB + off0 * BITS / 8;
	const size_t cstep = (size_t)2 * p.B * RB; /* per step: 2 heads */
	const uint16_t *sc, *zr;
	size_t sstep;
	constexpr uint32_t NG = D / G; /* value groups per row */
	if (IS_V) {
		sc = (const uint16_t *)(sec + p.v_scale_off) + ((size_t)h0 * p.B + tc) * NG;
		zr = (const uint16_t *)(sec + p.v_zero_off) + ((size_t)h0 * p.B + tc) * NG;
		sstep = (size_t)2 * p.B * NG;
	} else {
		const size_t si = ((size_t)h0 * (p.B / G) + tc / G) * D + off0;
		sc = (const uint16_t *)(sec + p.k_scale_off) + si;
		zr = (const uint16_t *)(sec + p.k_zero_off) + si;
		sstep = (size_t)2 * (p.B / G) * D;
	}
	const bool rot = IS_V ? p.rotate_v != 0 : p.scheme == KVT_SCHEME_OSCAR;
	const float mult = IS_V || p.scheme != KVT_SCHEME_OSCAR
				   ? p.inv_sqrt_d
				   : __fmul_rn(((const float *)(sec + p.norms_off))[tc], p.inv_sqrt_d);
	const uint32_t nt = j.te - j.tb;
	uint8_t *dst = out + ((((size_t)(l - j.lb) * nt + (tc - j.tb)) * p.H + h0) * D + off0) * 2;
	const uint8_t *ex = pin >= 0 ? sec + (IS_V ? j.v_exact_off : j.k_exact_off) +
					       (((size_t)pin * p.H + h0) * D + off0) * 2
				     : nullptr;
	for (uint32_t h = h0; h < p.H; h += 2) {
		float x[32];
		uint32_t cw[4];
#pragma unroll
		for (int k = 0; k < 4; k++)
			cw[k] = fd3_ldc<BITS>(cr + k * kst * BITS / 8);
		fd3_codes<BITS>(cw, x);
		if (IS_V) {
#pragma unroll
			for (int k = 0; k < 4; k++) {
				/* block k's group: a constant with CL (G >= 32 > 8q) */
				const uint32_t g = (CL ? 32 * k : off0 + k * kst) / G;
				const float s = kvt_d_widen16(sc[g], SBF), z = kvt_d_widen16(zr[g], SBF);
#pragma unroll
				for (int i = 0; i < 8; i++)
					x[8 * k + i] = __fmaf_rn(x[8 * k + i], s, z);
			}
		} else {
#pragma unroll
			for (int k = 0; k < 4; k++) {
				const uint4 sv = *(const uint4 *)(sc + k * kst), zv = *(const uint4 *)(zr + k * kst);
				const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w}, zw[4] = {zv.x, zv.y, zv.z, zv.w};
#pragma unroll
				for (int i = 0; i < 8; i++) {
					const float s = i & 1 ? fd3_hi<SBF>(sw[i / 2]) : fd3_lo<SBF>(sw[i / 2]);
					const float z = i & 1 ? fd3_hi<SBF>(zw[i / 2]) : fd3_lo<SBF>(zw[i / 2]);
					/* code * s is exact: multiply then add, as the CPU */
					x[8 * k + i] = __fadd_rn(__fmul_rn(x[8 * k + i], s), z);
				}
			}
		}
		if (rot) /* uniform */
			fd3_fwht<CL>(x, lane, mult);
		if (pin >= 0) { /* the row's 4 lanes agree: the exact copy replaces it */
#pragma unroll
			for (int k = 0; k < 4; k++)
				fd3_ld8<SBF>(ex + k * kst * 2, x + 8 * k);
			ex += 2 * D * 2;
		}
		if (valid) {
#pragma unroll
			for (int k = 0; k < 4; k++)
				fd3_st8(dst + k * kst * 2, x + 8 * k, obf);
		}
		cr += cstep;
		sc += sstep;
		zr += sstep;
		dst += 2 * D * 2;
	}
}

template <int BITS, bool SBF, bool CL, int G>
__global__ void __launch_bounds__(FD_THREADS, 4) fd3_kernel(dec_params p)
{
	__shared__ int16_t pidx[KVT_MAX_CHUNK_TOKENS];
	const dec_job_dev &j = p.jobs[blockIdx.z];
	const uint32_t l = j.lb + blockIdx.y;
	const uint32_t T0 = (j.tb & ~(uint32_t)(FD_TOK - 1)) + blockIdx.x * FD_TOK;
	if (l >= j.le || T0 >= j.te)
		return;
	fd_pin_index(p, j, pidx);
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	const uint32_t t = T0 + (warp & 3) * 8 + lane / 4;
	const bool valid = t >= j.tb && t < j.te;
	const int pin = j.n_pinned && valid ? pidx[t] : -1;
	const uint8_t *sec = j.chunk + j.data_offset + (size_t)l * j.layer_bytes;
	const bool obf = j.out_dtype == KVT_DTYPE_BF16;
	/* warps w and w + 4 split the heads (even / odd), each doing their K and V rows: the
	 * K rows cost more (per-channel scales), so no warp idles at the block's end */
	if (j.k_out)
		fd3_rows<BITS, false, SBF, CL, G>(p, j, sec, (uint8_t *)j.k_out, l, t, valid, pin,
						  lane, warp >> 2, obf);
	if (j.v_out)
		fd3_rows<BITS, true, SBF, CL, G>(p, j, sec, (uint8_t *)j.v_out, l, t, valid, pin,
						 lane, warp >> 2, obf);
}

template <int D>
static void fd_launch_d(int var, dim3 g, cudaStream_t st, const dec_params &p)
{
	if (p.kb == 3 || p.vb == 3) {
		fd_kernel<D, false, 4, true><<<g, FD_THREADS, 0, st>>>(p);
		return;
	}
	switch (var) {
	case 1:
		fd_kernel<D, true, 4><<<g, FD_THREADS, 0, st>>>(p);
		break;
	case 2:
		fd_kernel<D, true, 3><<<g, FD_THREADS, 0, st>>>(p);
		break;
	case 3:
		fd_kernel<D, false, 3><<<g, FD_THREADS, 0, st>>>(p);
		break;
	default:
		fd_kernel<D, false, 4><<<g, FD_THREADS, 0, st>>>(p);
		break;
	}
}

static void fd_launch(uint32_t d, int var, dim3 g, cudaStream_t st, const dec_params &p)
{
	if (d == 64)
		fd_launch_d<64>(var, g, st, p);
	else if (d == 128)
		fd_launch_d<128>(var, g, st, p);
	else
		fd_launch_d<256>(var, g, st, p);
}

/* fd3_kernel by group, bits and scale/data dtype (kvt_cuda_decode says which calls take it);
 * without cl (A/B only) the session-3 channel layout, one instantiation */
template <int BITS, bool SBF>
static void fd3_launch_b(uint32_t group, dim3 g, cudaStream_t st, const dec_params &p)
{
	if (group == 32)
		fd3_kernel<BITS, SBF, true, 32><<<g, FD_THREADS, 0, st>>>(p);
	else if (group == 64)
		fd3_kernel<BITS, SBF, true, 64><<<g, FD_THREADS, 0, st>>>(p);
	else
		fd3_kernel<BITS, SBF, true, 128><<<g, FD_THREADS, 0, st>>>(p);
}

static bool fd3_launch(bool cl, dim3 g, cudaStream_t st, const dec_params &p)
{
	if (!cl) {
		if (p.kb != 2 || !p.sbf || p.G != 32)
			return false;
		fd3_kernel<2, true, false, 32><<<g, FD_THREADS, 0, st>>>(p);
	} else if (p.sbf) {
		p.kb == 2 ? fd3_launch_b<2, true>(p.G, g, st, p) : fd3_launch_b<4, true>(p.G, g, st, p);
	} else {
		p.kb == 2 ? fd3_launch_b<2, false>(p.G, g, st, p) : fd3_launch_b<4, false>(p.G, g, st, p);
	}
	return true;
}

static int header_config(const struct kvt_chunk_header *h, struct kvt_codec_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->scheme = h->scheme;
	cfg->key_bits = h->scheme == KVT_SCHEME_NONE ? 0 : h->key_bits;
	cfg->value_bits = h->scheme == KVT_SCHEME_NONE ? 0 : h->value_bits;
	cfg->group = h->group;
	cfg->chunk_tokens = h->chunk_tokens;
	cfg->n_layers = h->n_layers;
	cfg->n_kv_heads = h->n_kv_heads;
	cfg->head_dim = h->head_dim;
	cfg->dtype = h->dtype;
	cfg->rotate_v = h->rotate_v;
	cfg->n_sinks = h->n_sinks;
	if (h->magic != KVT_CHUNK_MAGIC || h->version != KVT_CHUNK_VERSION)
		return -EBADMSG;
	return kvt_codec_config_validate(cfg, NULL, 0) ? -EBADMSG : 0;
}

extern "C" int kvt_cuda_decode(kvt_cuda_ctx *c, const struct kvt_cuda_decode_job *jobs,
			       size_t n_jobs, char *err, size_t errlen)
{
	int rc;
	if (!c || (n_jobs && !jobs))
		return kvt_cuda_errf(err, errlen, -EINVAL, "ctx or jobs is NULL");
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	if (n_jobs > KVT_CUDA_MAX_JOBS)
		return kvt_cuda_errf(err, errlen, -EINVAL, "n_jobs %zu is above %d", n_jobs,
				     KVT_CUDA_MAX_JOBS);
	if (n_jobs == 0)
		return 0;
	struct kvt_codec_config cfg0;
	if (!jobs[0].hdr || header_config(jobs[0].hdr, &cfg0))
		return kvt_cuda_errf(err, errlen, -EINVAL, "job 0: hdr is NULL or not a chunk");
	if ((rc = kvt_cuda_stage_acquire(c, err, errlen)))
		return rc;
	dec_job_dev *jd = (dec_job_dev *)c->stage_host;
	uint32_t max_tok = 0, max_lay = 0, max_span = 0, out_dts = 0;
	struct kvt_chunk_layout lay0;
	kvt_chunk_layout(&cfg0, 0, &lay0);
	for (size_t i = 0; i < n_jobs; i++) {
		const struct kvt_cuda_decode_job *jb = &jobs[i];
		struct kvt_codec_config cfg;
		struct kvt_chunk_layout lay;
		if (!jb->hdr || header_config(jb->hdr, &cfg))
			return kvt_cuda_errf(err, errlen, -EINVAL, "job %zu: hdr is not a chunk", i);
		if (cfg.scheme != cfg0.scheme || cfg.key_bits != cfg0.key_bits ||
		    cfg.value_bits != cfg0.value_bits || cfg.group != cfg0.group ||
		    cfg.chunk_tokens != cfg0.chunk_tokens || cfg.n_kv_heads != cfg0.n_kv_heads ||
		    cfg.head_dim != cfg0.head_dim || cfg.dtype != cfg0.dtype ||
		    cfg.rotate_v != cfg0.rotate_v)
			return kvt_cuda_errf(err, errlen, -EINVAL,
					     "job %zu: codec or shape differs from job 0's (one "
					     "call decodes one codec)", i);
		if (jb->hdr->n_pinned > cfg.chunk_tokens ||
		    kvt_chunk_layout(&cfg, jb->hdr->n_pinned, &lay))
			return kvt_cuda_errf(err, errlen, -EINVAL, "job %zu: bad n_pinned %u", i,
					     jb->hdr->n_pinned);
		if (!jb->chunk_dev || jb->tok_begin >= jb->tok_end ||
		    jb->tok_end > cfg.chunk_tokens || jb->layer_begin >= jb->layer_end ||
		    jb->layer_end > cfg.n_layers)
			return kvt_cuda_errf(err, errlen, -EINVAL,
					     "job %zu: token range [%u, %u) of %u or layer range "
					     "[%u, %u) of %u is empty or out of range (or chunk_dev "
					     "is NULL)", i, jb->tok_begin, jb->tok_end,
					     cfg.chunk_tokens, jb->layer_begin, jb->layer_end,
					     cfg.n_layers);
		if (((uintptr_t)jb->chunk_dev & 15) || ((uintptr_t)jb->k_out_dev & 15) ||
		    ((uintptr_t)jb->v_out_dev & 15))
			return kvt_cuda_errf(err, errlen, -EINVAL,
					     "job %zu: chunk_dev, k_out_dev and v_out_dev must be "
					     "16-byte aligned", i);
		if (!kvt_dtype_size(jb->out_dtype))
			return kvt_cuda_errf(err, errlen, -EINVAL,
					     "job %zu: out_dtype %u is not f16, bf16 or f32", i,
					     jb->out_dtype);
		dec_job_dev *d = &jd[i];
		memset(d, 0, sizeof(*d));
		d->chunk = (const uint8_t *)jb->chunk_dev;
		d->pins = (const uint16_t *)((const uint8_t *)jb->chunk_dev + KVT_CHUNK_HEADER_BYTES);
		d->k_out = jb->k_out_dev;
		d->v_out = jb->v_out_dev;
		d->data_offset = lay.data_offset;
		d->layer_bytes = lay.layer_bytes;
		d->k_exact_off = lay.k_exact_off;
		d->v_exact_off = lay.v_exact_off;
		d->n_pinned = jb->hdr->n_pinned;
		d->tb = jb->tok_begin;
		d->te = jb->tok_end;
		d->lb = jb->layer_begin;
		d->le = jb->layer_end;
		d->out_dtype = jb->out_dtype;
		out_dts |= 1u << jb->out_dtype;
		if (jb->tok_end - (jb->tok_begin & ~(uint32_t)(FD_TOK - 1)) > max_span)
			max_span = jb->tok_end - (jb->tok_begin & ~(uint32_t)(FD_TOK - 1));
		if (jb->tok_end - jb->tok_begin > max_tok)
			max_tok = jb->tok_end - jb->tok_begin;
		if (jb->layer_end - jb->layer_begin > max_lay)
			max_lay = jb->layer_end - jb->layer_begin;
	}
	if ((rc = kvt_cuda_stage_push(c, n_jobs * sizeof(dec_job_dev), err, errlen)))
		return rc;
	dec_params p;
	memset(&p, 0, sizeof(p));
	p.jobs = (const dec_job_dev *)c->stage_dev;
	p.B = cfg0.chunk_tokens;
	p.G = cfg0.group;
	p.H = cfg0.n_kv_heads;
	p.scheme = cfg0.scheme;
	p.kb = cfg0.key_bits;
	p.vb = cfg0.value_bits;
	p.dtype = cfg0.dtype;
	p.rotate_v = cfg0.rotate_v;
	p.sbf = cfg0.dtype == KVT_DTYPE_BF16;
	p.norms_off = (uint32_t)lay0.norms_off;
	p.k_scale_off = (uint32_t)lay0.k_scale_off;
	p.k_zero_off = (uint32_t)lay0.k_zero_off;
	p.v_scale_off = (uint32_t)lay0.v_scale_off;
	p.v_zero_off = (uint32_t)lay0.v_zero_off;
	p.k_codes_off = (uint32_t)lay0.k_codes_off;
	p.v_codes_off = (uint32_t)lay0.v_codes_off;
	p.inv_sqrt_d = (float)(1.0 / sqrt((double)cfg0.head_dim));
	CK(cudaSetDevice(c->device), "cudaSetDevice");
	if (!kvt_cuda_codec_old()) {
		dim3 fgrid((max_span + FD_TOK - 1) / FD_TOK, max_lay, (unsigned)n_jobs);
		/* KVTIER_CUDA_DEC_VARIANT (A/B runs), fd_kernel: 0 per-channel code * s + z as
		 * multiply then add, 4 blocks/SM (64 registers, the session-3 default); 1 one fma
		 * (same result: the product is exact), 4 blocks; 2 fma, 3 blocks (80 registers); 3
		 * multiply-add, 3 blocks */
		const char *ve = getenv("KVTIER_CUDA_DEC_VARIANT");
		const int var = ve && ve[0] >= '0' && ve[0] <= '9' ? ve[0] - '0' : -1;
		/* fd3_kernel (session 5, the default where it applies): d 128, oscar / kivi, 2 or 4
		 * bits for both keys and values, 16-bit data, every job's output 16-bit. Variant 4
		 * is it with the session-3 channel layout (2 bits, G 32, bf16 only; A/B); 0..3 are
		 * fd_kernel's variants (0 = the session-3 default). */
		const bool fd3_ok =
			cfg0.head_dim == 128 &&
			(cfg0.scheme == KVT_SCHEME_OSCAR || cfg0.scheme == KVT_SCHEME_KIVI) &&
			cfg0.key_bits == cfg0.value_bits && (cfg0.key_bits == 2 || cfg0.key_bits == 4) &&
			cfg0.dtype != KVT_DTYPE_F32 &&
			(cfg0.group == 32 || cfg0.group == 64 || cfg0.group == 128) &&
			!(out_dts & (1u << KVT_DTYPE_F32));
		if (!(fd3_ok && (var < 0 || var >= 4) && fd3_launch(var != 4, fgrid, st, p)))
			fd_launch(cfg0.head_dim, var >= 0 && var <= 3 ? var : 0, fgrid, st, p);
		CK(cudaGetLastError(), "decode launch");
		return 0;
	}
	dim3 grid((max_tok + DEC_TOKENS - 1) / DEC_TOKENS, max_lay, (unsigned)n_jobs);
	switch (cfg0.head_dim) {
	case 64:
		dec_kernel<64><<<grid, DEC_THREADS, 0, st>>>(p);
		break;
	case 128:
		dec_kernel<128><<<grid, DEC_THREADS, 0, st>>>(p);
		break;
	default:
		dec_kernel<256><<<grid, DEC_THREADS, 0, st>>>(p);
		break;
	}
	CK(cudaGetLastError(), "decode launch");
	return 0;
}

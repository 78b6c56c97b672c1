/*
 * bench_gpu.c - `kvtier-bench gpu`.
 *
 *   kvtier-bench gpu [--sdpa FILE] [--iters N] [--attend-only] [--codec-only] [--schemes-only]
 *                    [--packed-only]
 *
 * Measures, on device 0:
 *   copy     device-to-device cudaMemcpy bandwidth (bytes read + written per second): the
 *            memory ceiling every other figure is compared with;
 *   attend   one decode step of attention, oscar INT2 G32 (and INT4 G128), Hq 32, Hkv 8,
 *            d 128, bf16 queries, at batch x tokens = 1 x 131072, 8 x 32768, 48 x 4096:
 *            us per step, chunk bytes read per second, the ratio to the copy bandwidth, and
 *            the speedup over torch SDPA bf16 from FILE (bench_gpu_sdpa.py, same machine,
 *            same run); then the packed kernel's shapes (INT4 and INT8 at d128, d64, d256)
 *            and f16 sessions at d128 and GQA 8 (the INT2 kernel's f16 form and query-head
 *            groups, and the packed kernel they took before; --packed-only: those alone),
 *            the other schemes (none, hadamard, kivi) and
 *            the INT2 / K3 V2 cases with an exact tail after the chunks, as real sessions
 *            hold them (--schemes-only: those alone; KVT_BENCH_TAIL=N: tails of N tokens);
 *   encode   bf16 input bytes per second (32 chunks x 32 layers, oscar INT2 G32);
 *   decode   bf16 output bytes per second (the same chunks, every layer and token).
 *   Both measured twice: "kernel":"fast" (default) and "session2" (KVTIER_CUDA_CODEC_OLD=1).
 * Times are host wall clock around N enqueued runs and one synchronisation, the median of
 * 5 trials, after warm-up; every run reads inputs larger than the L2 cache.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "kvt_codec.h"
#include "kvt_cuda.h"

#define TRIALS 5

static kvt_cuda_ctx *ctx;
static int iters = 30;
static long tail_tokens = -1; /* KVT_BENCH_TAIL, read with the flags; -1: the cases' own */
static int attend_only; /* --attend-only: the INT2 G32 and K3 V2 G64 attention cases alone (A/B runs) */
static int codec_only;  /* --codec-only: copy + encode/decode alone (A/B runs, ncu) */
static int schemes_only; /* --schemes-only: copy + bench_other_schemes alone */
static int packed_only;  /* --packed-only: copy + bench_packed alone (A/B runs) */
static char err[512];

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

typedef int (*run_fn)(void *arg);

/* Median seconds per run over TRIALS trials of n enqueued runs each. */
static double time_runs(run_fn fn, void *arg, int n)
{
	double t[TRIALS];
	for (int w = 0; w < 3; w++)
		if (fn(arg))
			return -1.0;
	if (kvt_cuda_sync(ctx, err, sizeof(err)))
		return -1.0;
	for (int i = 0; i < TRIALS; i++) {
		double t0 = now_s();
		for (int r = 0; r < n; r++)
			if (fn(arg))
				return -1.0;
		if (kvt_cuda_sync(ctx, err, sizeof(err)))
			return -1.0;
		t[i] = (now_s() - t0) / n;
	}
	qsort(t, TRIALS, sizeof(double), cmp_d);
	return t[TRIALS / 2];
}

static uint16_t bf16_of(float f) { return kvt_f32_to_bf16(f); }

static float randn(uint64_t *s)
{
	/* xorshift + Box-Muller: deterministic, fine for timing data */
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	double u1 = ((x >> 11) + 1) * 0x1p-53, u2 = ((x * 0x9e3779b97f4a7c15ull) >> 11) * 0x1p-53;
	return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- copy ---------------------------------------------------------------------------------- */

struct copy_arg {
	void *a, *b;
	size_t bytes;
};

static int run_copy(void *p)
{
	struct copy_arg *c = p;
	return kvt_cuda_copy_async(ctx, c->b, c->a, c->bytes, err, sizeof(err));
}

static double bench_copy(void)
{
	struct copy_arg c = {NULL, NULL, (size_t)1 << 30};
	if (kvt_cuda_alloc(ctx, c.bytes, &c.a, err, sizeof(err)) ||
	    kvt_cuda_alloc(ctx, c.bytes, &c.b, err, sizeof(err)))
		return -1.0;
	kvt_cuda_memset_async(ctx, c.a, 0x3c, c.bytes, err, sizeof(err));
	double t = time_runs(run_copy, &c, 10);
	kvt_cuda_free(ctx, c.a);
	kvt_cuda_free(ctx, c.b);
	if (t <= 0)
		return -1.0;
	double bw = 2.0 * (double)c.bytes / t;
	printf("{\"bench\":\"gpu\",\"op\":\"copy_d2d\",\"bytes\":%zu,\"us\":%.1f,"
	       "\"tb_per_s\":%.3f,\"counting\":\"read+write\"}\n",
	       c.bytes, t * 1e6, bw / 1e12);
	return bw;
}

/* ---- sdpa reference (from bench_gpu_sdpa.py) ----------------------------------------------- */

struct sdpa_row {
	int batch, tokens, d, hq; /* d: head_dim (rows without one are 128); hq: query heads
				   * (rows without one are 32) */
	double us;
	char backend[32];
};
static struct sdpa_row sdpa[16];
static int n_sdpa;

static void load_sdpa(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		fprintf(stderr, "cannot open %s: %s\n", path, strerror(errno));
		return;
	}
	char line[2048];
	while (fgets(line, sizeof(line), f) && n_sdpa < 16) {
		struct sdpa_row r;
		memset(&r, 0, sizeof(r));
		char *p;
		if (!(p = strstr(line, "\"batch\":")) || sscanf(p + 8, "%d", &r.batch) != 1)
			continue;
		if (!(p = strstr(line, "\"tokens\":")) || sscanf(p + 9, "%d", &r.tokens) != 1)
			continue;
		if (!(p = strstr(line, "\"us_best\":")) || sscanf(p + 10, "%lf", &r.us) != 1)
			continue;
		if ((p = strstr(line, "\"best\":\"")))
			sscanf(p + 8, "%31[^\"]", r.backend);
		if (!(p = strstr(line, "\"d\":")) || sscanf(p + 4, "%d", &r.d) != 1)
			r.d = 128;
		if (!(p = strstr(line, "\"hq\":")) || sscanf(p + 5, "%d", &r.hq) != 1)
			r.hq = 32;
		sdpa[n_sdpa++] = r;
	}
	fclose(f);
}

static const struct sdpa_row *find_sdpa(int batch, int tokens, int d, int hq)
{
	for (int i = 0; i < n_sdpa; i++)
		if (sdpa[i].batch == batch && sdpa[i].tokens == tokens && sdpa[i].d == d &&
		    sdpa[i].hq == hq)
			return &sdpa[i];
	return NULL;
}

/* ---- attention ----------------------------------------------------------------------------- */

struct att_arg {
	kvt_cuda_attend_plan *plan;
};

static int run_att(void *p)
{
	return kvt_cuda_attend_run(ctx, ((struct att_arg *)p)->plan, err, sizeof(err));
}

#define N_TEMPLATES 64

/* enum kvt_cuda_attend_kernel (the plan says which kernel it launches) */
static const char *const kernel_names[KVT_CUDA_ATT_EXACT_MMA + 1] = {
	"cuda_cores", "mma", "mma_i2_v1", "mma_i2", "mma_i2_bulk", "mma_i2_swapped", "mma_exact"};

/* One attention case: batch sessions of `tokens` encoded tokens (bits = key bits, vbits =
 * value bits: the default codec kvtier-int2 splits them 3 / 2; scheme none stores exact
 * values, bits 16), plus `tail` exact tokens after the chunks (a session's unsealed tail) */
struct att_case {
	uint32_t scheme, bits, vbits, group, B, D, dtype;
	int batch, tokens;
	uint32_t tail;
	uint32_t hq; /* query heads over the 8 KV heads (0: 32; SDPA is measured for 32, and for
		      * 64 at d128 1 x 131072) */
};

static int bench_attend_case(const struct att_case *ac, double copy_bw)
{
	const uint32_t scheme = ac->scheme, bits = ac->bits, vbits = ac->vbits, group = ac->group;
	const uint32_t B = ac->B, D = ac->D, dtype = ac->dtype, tail = ac->tail;
	const int batch = ac->batch, tokens = ac->tokens;
	const uint32_t H = 8, HQ = ac->hq ? ac->hq : 32;
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, 1, H, D, dtype);
	cfg.scheme = scheme;
	cfg.rotate_v = scheme == KVT_SCHEME_HADAMARD || scheme == KVT_SCHEME_OSCAR;
	cfg.key_bits = bits;
	cfg.value_bits = vbits;
	cfg.group = group;
	cfg.chunk_tokens = B;
	int rc = -1;
	const size_t row = (size_t)H * D, per_in = (size_t)B * row * 2;
	const uint32_t nc = (uint32_t)tokens / B;
	const size_t cap = kvt_chunk_max_bytes(&cfg);
	void *din = NULL, *tmpl = NULL, *arena = NULL, *qd = NULL, *outd = NULL, *taild = NULL;
	uint16_t *hin = malloc(per_in * N_TEMPLATES * 2);
	struct kvt_chunk_header *hdrs = calloc((size_t)batch * nc, sizeof(*hdrs));
	const struct kvt_chunk_header **hp = calloc((size_t)batch * nc, sizeof(*hp));
	const void **cp = calloc((size_t)batch * nc, sizeof(*cp));
	struct kvt_cuda_attend_request *reqs = calloc((size_t)batch, sizeof(*reqs));
	struct kvt_chunk_header th[N_TEMPLATES];
	int64_t sizes[N_TEMPLATES];
	struct kvt_cuda_encode_job jobs[N_TEMPLATES];
	kvt_cuda_attend_plan *plan = NULL;
	if (!hin || !hdrs || !hp || !cp || !reqs)
		goto out;
	/* templates: random K/V (keys with outlier channels), template 0 holds the sinks */
	uint64_t s = 0x1234567ull + (uint64_t)tokens * 31 + bits;
	for (size_t i = 0; i < per_in * N_TEMPLATES; i++) {
		const float x = randn(&s) * ((i % D) % 16 == 3 ? 6.0f : 1.0f);
		if (dtype == KVT_DTYPE_F16)
			kvt_convert(&x, KVT_DTYPE_F32, &hin[i], KVT_DTYPE_F16, 1);
		else
			hin[i] = bf16_of(x);
	}
	if (kvt_cuda_alloc(ctx, per_in * N_TEMPLATES * 2, &din, err, sizeof(err)) ||
	    kvt_cuda_upload(ctx, din, hin, per_in * N_TEMPLATES * 2, err, sizeof(err)) ||
	    kvt_cuda_alloc(ctx, cap * N_TEMPLATES, &tmpl, err, sizeof(err)))
		goto out;
	for (int i = 0; i < N_TEMPLATES; i++) {
		jobs[i].first_token = (uint64_t)i * B;
		jobs[i].k_dev = (uint8_t *)din + (size_t)i * 2 * per_in;
		jobs[i].v_dev = (uint8_t *)din + (size_t)i * 2 * per_in + per_in;
		jobs[i].out_dev = (uint8_t *)tmpl + (size_t)i * cap;
		jobs[i].out_cap = cap;
	}
	if (kvt_cuda_encode(ctx, &cfg, jobs, N_TEMPLATES, sizes, err, sizeof(err)) ||
	    kvt_cuda_sync(ctx, err, sizeof(err)))
		goto out;
	for (int i = 0; i < N_TEMPLATES; i++)
		if (kvt_cuda_download(ctx, &th[i], jobs[i].out_dev, sizeof(th[i]), err, sizeof(err)))
			goto out;
	/* the sessions' chunks: copies of the templates in one arena, 256-byte aligned */
	size_t slot = (cap + 255) & ~(size_t)255;
	if (kvt_cuda_alloc(ctx, slot * batch * nc, &arena, err, sizeof(err)))
		goto out;
	for (int b = 0; b < batch; b++)
		for (uint32_t c = 0; c < nc; c++) {
			size_t i = (size_t)b * nc + c;
			int t = c == 0 ? 0 : 1 + (int)((i * 7 + c) % (N_TEMPLATES - 1));
			void *dst = (uint8_t *)arena + i * slot;
			if (kvt_cuda_copy_async(ctx, dst, jobs[t].out_dev, (size_t)sizes[t], err,
						sizeof(err)))
				goto out;
			hdrs[i] = th[t];
			hdrs[i].first_token = (uint64_t)c * B;
			hp[i] = &hdrs[i];
			cp[i] = dst;
		}
	/* queries bf16, outputs f32 */
	size_t qn = (size_t)batch * HQ * D;
	uint16_t *hq = malloc(qn * 2);
	if (!hq)
		goto out;
	for (size_t i = 0; i < qn; i++)
		hq[i] = bf16_of(randn(&s));
	int qrc = kvt_cuda_alloc(ctx, qn * 2, &qd, err, sizeof(err));
	qrc = qrc ? qrc : kvt_cuda_upload(ctx, qd, hq, qn * 2, err, sizeof(err));
	free(hq);
	if (qrc || kvt_cuda_alloc(ctx, qn * 4, &outd, err, sizeof(err)))
		goto out;
	/* each session's exact tail: [t][H][d] keys then values, random rows of the templates'
	 * input (tail < B, so one template's keys hold it) */
	const size_t tail_bytes = (size_t)tail * row * 2;
	if (tail) {
		if (tail >= B) {
			snprintf(err, sizeof(err), "tail %u is not below B %u", tail, B);
			goto out;
		}
		if (kvt_cuda_alloc(ctx, tail_bytes * 2 * batch, &taild, err, sizeof(err)))
			goto out;
		for (int b = 0; b < batch; b++)
			for (int kv = 0; kv < 2; kv++) {
				const uint8_t *src = (const uint8_t *)din +
						     (size_t)(b % N_TEMPLATES) * 2 * per_in +
						     (size_t)kv * per_in;
				if (kvt_cuda_copy_async(ctx, (uint8_t *)taild + ((size_t)b * 2 + kv) * tail_bytes,
							src, tail_bytes, err, sizeof(err)))
					goto out;
			}
	}
	for (int b = 0; b < batch; b++)
		reqs[b] = (struct kvt_cuda_attend_request){
			.cfg = &cfg, .layer = 0, .n_q_heads = HQ, .softmax_scale = 1.0f / sqrtf((float)D),
			.q_dev = (uint8_t *)qd + (size_t)b * HQ * D * 2, .q_dtype = KVT_DTYPE_BF16,
			.chunks_dev = cp + (size_t)b * nc, .chunk_hdrs = hp + (size_t)b * nc,
			.n_chunks = nc, .out_dev = (float *)outd + (size_t)b * HQ * D,
			.n_tail = tail,
			.tail_k_dev = tail ? (uint8_t *)taild + (size_t)b * 2 * tail_bytes : NULL,
			.tail_v_dev = tail ? (uint8_t *)taild + ((size_t)b * 2 + 1) * tail_bytes : NULL};
	double tb0 = now_s();
	if (kvt_cuda_attend_plan_build(ctx, reqs, (size_t)batch, &plan, err, sizeof(err)))
		goto out;
	double plan_us = (now_s() - tb0) * 1e6;
	struct kvt_cuda_attend_plan_info info;
	kvt_cuda_attend_plan_info(plan, &info);
	struct att_arg a = {plan};
	double t = time_runs(run_att, &a, iters);
	if (t <= 0)
		goto out;
	double bw = (double)info.read_bytes / t;
	const struct sdpa_row *sr = find_sdpa(batch, tokens, (int)D, (int)HQ);
	printf("{\"bench\":\"gpu\",\"op\":\"attend\",\"scheme\":\"%s\",\"dtype\":\"%s\","
	       "\"bits\":%u,\"value_bits\":%u,\"G\":%u,\"B\":%u,\"hq\":%u,\"hkv\":%u,\"d\":%u,\"batch\":%d,\"tokens\":%d,\"tail\":%u,"
	       "\"us_per_step\":%.1f,\"read_bytes\":%" PRIu64 ",\"tb_per_s\":%.3f,"
	       "\"copy_tb_per_s\":%.3f,\"ratio_to_copy\":%.3f,\"items\":%u,\"plan_build_us\":%.0f,"
	       "\"kernel\":\"%s\"",
	       kvt_scheme_name(scheme), dtype == KVT_DTYPE_F16 ? "f16" : "bf16", bits, vbits, group, B,
	       HQ, H, D, batch,
	       tokens, tail, t * 1e6, info.read_bytes, bw / 1e12,
	       copy_bw / 1e12, bw / copy_bw, info.n_items, plan_us,
	       info.kernel <= KVT_CUDA_ATT_EXACT_MMA ? kernel_names[info.kernel] : "?");
	if (sr)
		printf(",\"sdpa_bf16_us\":%.1f,\"sdpa_backend\":\"%s\",\"speedup_vs_sdpa\":%.2f",
		       sr->us, sr->backend, sr->us / (t * 1e6));
	printf("}\n");
#ifdef KVT_ATT_TIMELINE
	{
		char label[64];
		snprintf(label, sizeof(label), "K%uV%u G%u %dx%d", bits, vbits, group, batch, tokens);
		kvt_cuda_attend_timeline_print(plan, stdout, label);
	}
#endif
	rc = 0;
out:
	if (rc)
		fprintf(stderr, "attend %dx%d: %s\n", batch, tokens, err);
	kvt_cuda_attend_plan_destroy(plan);
	kvt_cuda_free(ctx, din);
	kvt_cuda_free(ctx, tmpl);
	kvt_cuda_free(ctx, arena);
	kvt_cuda_free(ctx, qd);
	kvt_cuda_free(ctx, outd);
	kvt_cuda_free(ctx, taild);
	free(hin);
	free(hdrs);
	free(hp);
	free(cp);
	free(reqs);
	return rc;
}

static int bench_attend_split(uint32_t bits, uint32_t vbits, uint32_t group, uint32_t B, int batch,
			      int tokens, uint32_t D, uint32_t dtype, double copy_bw)
{
	const struct att_case c = {.scheme = KVT_SCHEME_OSCAR, .bits = bits, .vbits = vbits,
				   .group = group, .B = B, .D = D, .dtype = dtype, .batch = batch,
				   .tokens = tokens};
	return bench_attend_case(&c, copy_bw);
}

static int bench_attend(uint32_t bits, uint32_t group, int batch, int tokens, double copy_bw)
{
	return bench_attend_split(bits, bits, group, 128, batch, tokens, 128, KVT_DTYPE_BF16, copy_bw);
}

/* exact storage (scheme none: what a session without compression attends over), hadamard's
 * per-token groups, kivi, and the INT2 shapes with an unsealed tail */
static int bench_other_schemes(double copy_bw)
{
	int rc = 0;
	static const struct att_case others[] = {
		{.scheme = KVT_SCHEME_NONE, .bits = 16, .vbits = 16, .batch = 1, .tokens = 131072},
		{.scheme = KVT_SCHEME_NONE, .bits = 16, .vbits = 16, .batch = 8, .tokens = 32768},
		{.scheme = KVT_SCHEME_NONE, .bits = 16, .vbits = 16, .batch = 48, .tokens = 4096},
		{.scheme = KVT_SCHEME_NONE, .bits = 16, .vbits = 16, .batch = 1, .tokens = 131072,
		 .tail = 127},
		{.scheme = KVT_SCHEME_NONE, .bits = 16, .vbits = 16, .batch = 1, .tokens = 131072,
		 .D = 64},
		{.scheme = KVT_SCHEME_HADAMARD, .bits = 2, .vbits = 2, .batch = 1, .tokens = 131072},
		{.scheme = KVT_SCHEME_HADAMARD, .bits = 2, .vbits = 2, .batch = 48, .tokens = 4096},
		{.scheme = KVT_SCHEME_HADAMARD, .bits = 4, .vbits = 4, .batch = 1, .tokens = 131072},
		{.scheme = KVT_SCHEME_KIVI, .bits = 2, .vbits = 2, .batch = 1, .tokens = 131072},
		/* the benchmark's INT2 shapes with an unsealed tail of 127 exact tokens (B - 1,
		 * the most a session without a recent window holds) */
		{.scheme = KVT_SCHEME_OSCAR, .bits = 2, .vbits = 2, .batch = 1, .tokens = 131072,
		 .tail = 127},
		{.scheme = KVT_SCHEME_OSCAR, .bits = 2, .vbits = 2, .batch = 48, .tokens = 4096,
		 .tail = 127},
		/* the default codec (kvtier-int2: K3 V2, G = B = 64) with a 63-token tail */
		{.scheme = KVT_SCHEME_OSCAR, .bits = 3, .vbits = 2, .group = 64, .B = 64, .batch = 1,
		 .tokens = 131072, .tail = 63},
		{.scheme = KVT_SCHEME_OSCAR, .bits = 3, .vbits = 2, .group = 64, .B = 64, .batch = 48,
		 .tokens = 4096, .tail = 63},
		/* ... and at head_dim 64 (SmolLM2's shape; the packed kernel: tails are exact items) */
		{.scheme = KVT_SCHEME_OSCAR, .bits = 3, .vbits = 2, .group = 64, .B = 64, .batch = 1,
		 .tokens = 131072, .D = 64},
		{.scheme = KVT_SCHEME_OSCAR, .bits = 3, .vbits = 2, .group = 64, .B = 64, .batch = 1,
		 .tokens = 131072, .D = 64, .tail = 63},
	};
	/* KVT_BENCH_TAIL=N: the tail cases with N tokens instead (tuning runs) */
	for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++) {
		struct att_case c = others[i];
		if (c.tail && tail_tokens >= 0)
			c.tail = (uint32_t)tail_tokens;
		c.group = c.group ? c.group : 32;
		c.B = c.B ? c.B : 128;
		c.D = c.D ? c.D : 128;
		c.dtype = KVT_DTYPE_BF16;
		rc |= bench_attend_case(&c, copy_bw);
	}
	return rc;
}

/* f16 sessions at head_dim 128 (session 21: the INT2 kernel's swapped loop in its f16 form;
 * the packed kernel before, measured again here with KVTIER_CUDA_NO_I2_F16=1): INT2 G32 and
 * the default codec's K3 V2 */
static int bench_f16(double copy_bw)
{
	int rc = 0;
	rc |= bench_attend_split(2, 2, 32, 128, 1, 131072, 128, KVT_DTYPE_F16, copy_bw);
	rc |= bench_attend_split(2, 2, 32, 128, 48, 4096, 128, KVT_DTYPE_F16, copy_bw);
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 128, KVT_DTYPE_F16, copy_bw);
	setenv("KVTIER_CUDA_NO_I2_F16", "1", 1);
	rc |= bench_attend_split(2, 2, 32, 128, 1, 131072, 128, KVT_DTYPE_F16, copy_bw);
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 128, KVT_DTYPE_F16, copy_bw);
	unsetenv("KVTIER_CUDA_NO_I2_F16");
	return rc;
}

/* 8 query heads per KV head (Llama 3 70B's ratio), INT2 G32 and K3 V2 at 1 x 131072: the INT2
 * kernel with the query heads in two groups of 4 (session 21), and the packed kernel's 8-head
 * items they took before (KVTIER_CUDA_I2_GQA_SPLIT=0); SDPA at 64 query heads is the
 * reference */
static int bench_gqa8(double copy_bw)
{
	int rc = 0;
	struct att_case c = {.scheme = KVT_SCHEME_OSCAR, .bits = 2, .vbits = 2, .group = 32,
			     .B = 128, .D = 128, .dtype = KVT_DTYPE_BF16, .batch = 1,
			     .tokens = 131072, .hq = 64};
	struct att_case k3 = c;
	k3.bits = 3;
	k3.group = k3.B = 64;
	for (int old = 0; old < 2; old++) {
		if (old)
			setenv("KVTIER_CUDA_I2_GQA_SPLIT", "0", 1);
		rc |= bench_attend_case(&c, copy_bw);
		rc |= bench_attend_case(&k3, copy_bw);
	}
	unsetenv("KVTIER_CUDA_I2_GQA_SPLIT");
	return rc;
}

/* the packed tensor-core kernel's cases: INT4 and INT8 (since session 19; the CUDA-core
 * kernel before) at head_dim 128, and since session 15 head_dim 64 (small models, SmolLM2
 * among them) INT2, INT4 and the default codec's K3 V2, head_dim 256; then the f16 cases */
static int bench_packed(double copy_bw)
{
	int rc = 0;
	rc |= bench_attend(4, 128, 1, 131072, copy_bw);
	rc |= bench_attend(4, 128, 48, 4096, copy_bw);
	rc |= bench_attend(8, 128, 1, 131072, copy_bw);
	rc |= bench_attend(8, 128, 48, 4096, copy_bw);
	/* INT8 with 8 query heads per KV head (two items of 4 per KV head on the packed kernel) */
	const struct att_case gqa8 = {.scheme = KVT_SCHEME_OSCAR, .bits = 8, .vbits = 8, .group = 128,
				      .B = 128, .D = 128, .dtype = KVT_DTYPE_BF16, .batch = 1,
				      .tokens = 131072, .hq = 64};
	rc |= bench_attend_case(&gqa8, copy_bw);
	rc |= bench_attend_split(2, 2, 32, 128, 1, 131072, 64, KVT_DTYPE_BF16, copy_bw);
	rc |= bench_attend_split(4, 4, 128, 128, 1, 131072, 64, KVT_DTYPE_BF16, copy_bw);
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 64, KVT_DTYPE_BF16, copy_bw);
	rc |= bench_attend_split(2, 2, 32, 128, 1, 131072, 256, KVT_DTYPE_BF16, copy_bw);
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 256, KVT_DTYPE_BF16, copy_bw);
	rc |= bench_f16(copy_bw);
	rc |= bench_gqa8(copy_bw);
	return rc;
}

/* ---- encode / decode ------------------------------------------------------------------------ */

#define ED_CHUNKS 32

struct enc_arg {
	const struct kvt_codec_config *cfg;
	struct kvt_cuda_encode_job *jobs;
	int64_t *sizes;
};

static int run_enc(void *p)
{
	struct enc_arg *e = p;
	return kvt_cuda_encode(ctx, e->cfg, e->jobs, ED_CHUNKS, e->sizes, err, sizeof(err));
}

struct dec_arg {
	struct kvt_cuda_decode_job *jobs;
};

static int run_dec(void *p)
{
	return kvt_cuda_decode(ctx, ((struct dec_arg *)p)->jobs, ED_CHUNKS, err, sizeof(err));
}

/* kernel: "fast" (default: the tensor-core encoder, fd3 decode), "exact" (the byte-exact
 * encoder, KVTIER_CUDA_ENC_EXACT=1) or "session2" (KVTIER_CUDA_CODEC_OLD=1, the previous
 * kernels, measured in the same run for the record) */
static int bench_encode_decode(double copy_bw, const char *kernel)
{
	const uint32_t L = 32, H = 8, D = 128, B = 128;
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, L, H, D, KVT_DTYPE_BF16);
	const size_t per = (size_t)L * B * H * D * 2; /* one of K or V, bytes */
	const size_t cap = kvt_chunk_max_bytes(&cfg);
	void *in = NULL, *out = NULL, *dec = NULL;
	int rc = -1;
	uint16_t *h = malloc(2 * per);
	struct kvt_cuda_encode_job jobs[ED_CHUNKS];
	struct kvt_cuda_decode_job djobs[ED_CHUNKS];
	struct kvt_chunk_header hdrs[ED_CHUNKS];
	int64_t sizes[ED_CHUNKS];
	if (!h)
		goto out;
	uint64_t s = 0xfeedull;
	for (size_t i = 0; i < per; i++)
		h[i] = bf16_of(randn(&s) * ((i % D) % 16 == 3 ? 6.0f : 1.0f));
	if (kvt_cuda_alloc(ctx, 2 * per * ED_CHUNKS, &in, err, sizeof(err)) ||
	    kvt_cuda_alloc(ctx, cap * ED_CHUNKS, &out, err, sizeof(err)) ||
	    kvt_cuda_alloc(ctx, 2 * per * ED_CHUNKS, &dec, err, sizeof(err)) ||
	    kvt_cuda_upload(ctx, in, h, 2 * per, err, sizeof(err)))
		goto out;
	for (int i = 1; i < 2 * ED_CHUNKS; i++)
		if (kvt_cuda_copy_async(ctx, (uint8_t *)in + i * per, in, per, err, sizeof(err)))
			goto out;
	for (int i = 0; i < ED_CHUNKS; i++)
		jobs[i] = (struct kvt_cuda_encode_job){(uint64_t)(i + 1) * B,
						       (uint8_t *)in + (size_t)2 * i * per,
						       (uint8_t *)in + (size_t)(2 * i + 1) * per,
						       (uint8_t *)out + (size_t)i * cap, cap};
	struct enc_arg ea = {&cfg, jobs, sizes};
	double te = time_runs(run_enc, &ea, 10);
	if (te <= 0)
		goto out;
	double in_bytes = 2.0 * per * ED_CHUNKS;
	printf("{\"bench\":\"gpu\",\"op\":\"encode\",\"kernel\":\"%s\",\"scheme\":\"oscar\","
	       "\"bits\":2,\"G\":32,\"H\":%u,\"d\":%u,\"B\":%u,"
	       "\"chunks\":%d,\"layers\":%u,\"in_bytes_bf16\":%.0f,\"us\":%.1f,"
	       "\"tb_per_s_bf16_in\":%.3f,\"copy_tb_per_s\":%.3f,\"ratio_to_copy\":%.3f,"
	       "\"chunk_bytes\":%lld}\n",
	       kernel, H, D, B, ED_CHUNKS, L, in_bytes, te * 1e6, in_bytes / te / 1e12,
	       copy_bw / 1e12, in_bytes / te / copy_bw, (long long)sizes[0]);
	/* the last timed call's chunks pass kvt_chunk_parse (crc included) */
	{
		int parsed = 0;
		uint8_t *hc = malloc((size_t)sizes[0] + 64);
		for (int i = 0; hc && i < ED_CHUNKS; i++) {
			struct kvt_codec_config pc;
			char perr[256];
			if (sizes[i] > sizes[0] ||
			    kvt_cuda_download(ctx, hc, jobs[i].out_dev, (size_t)sizes[i], err,
					      sizeof(err)))
				break;
			if (kvt_chunk_parse(hc, (size_t)sizes[i], &pc, NULL, perr, sizeof(perr)) == 0)
				parsed++;
			else
				fprintf(stderr, "encode %s: chunk %d: %s\n", kernel, i, perr);
		}
		free(hc);
		printf("{\"bench\":\"gpu\",\"op\":\"encode_parse\",\"kernel\":\"%s\","
		       "\"chunks_parse\":%d,\"chunks\":%d}\n", kernel, parsed, ED_CHUNKS);
		if (parsed != ED_CHUNKS)
			goto out;
	}
	for (int i = 0; i < ED_CHUNKS; i++) {
		if (kvt_cuda_download(ctx, &hdrs[i], jobs[i].out_dev, sizeof(hdrs[i]), err,
				      sizeof(err)))
			goto out;
		djobs[i] = (struct kvt_cuda_decode_job){jobs[i].out_dev, &hdrs[i], 0, B, 0, L,
							KVT_DTYPE_BF16,
							(uint8_t *)dec + (size_t)2 * i * per,
							(uint8_t *)dec + (size_t)(2 * i + 1) * per};
	}
	struct dec_arg da = {djobs};
	double td = time_runs(run_dec, &da, 10);
	if (td <= 0)
		goto out;
	printf("{\"bench\":\"gpu\",\"op\":\"decode\",\"kernel\":\"%s\",\"scheme\":\"oscar\","
	       "\"bits\":2,\"G\":32,\"H\":%u,\"d\":%u,\"B\":%u,"
	       "\"chunks\":%d,\"layers\":%u,\"out_bytes_bf16\":%.0f,\"us\":%.1f,"
	       "\"tb_per_s_bf16_out\":%.3f,\"copy_tb_per_s\":%.3f,\"ratio_to_copy\":%.3f}\n",
	       kernel, H, D, B, ED_CHUNKS, L, in_bytes, td * 1e6, in_bytes / td / 1e12,
	       copy_bw / 1e12, in_bytes / td / copy_bw);
	rc = 0;
out:
	if (rc)
		fprintf(stderr, "encode/decode: %s\n", err);
	kvt_cuda_free(ctx, in);
	kvt_cuda_free(ctx, out);
	kvt_cuda_free(ctx, dec);
	free(h);
	return rc;
}

int kvt_bench_gpu(int argc, char **argv)
{
	unsigned long u;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--sdpa") && i + 1 < argc)
			load_sdpa(argv[++i]);
		else if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
			/* atoi took "abc" as 0 and "-5" as -5: no timed run at all */
			if (kvt_bench_parse_uint(argv[i], argv[i + 1], 1, 100000, &u))
				return 2;
			iters = (int)u;
			i++;
		} else if (!strcmp(argv[i], "--attend-only"))
			attend_only = 1;
		else if (!strcmp(argv[i], "--codec-only"))
			codec_only = 1;
		else if (!strcmp(argv[i], "--schemes-only"))
			schemes_only = 1;
		else if (!strcmp(argv[i], "--packed-only"))
			packed_only = 1;
		else {
			fprintf(stderr, "usage: %s [--sdpa FILE] [--iters N] [--attend-only] [--codec-only] "
				"[--schemes-only] [--packed-only]\n",
				argv[0]);
			return 2;
		}
	}
	/* a tail is below B, and B is at most 1024 (the cases' own check names their B) */
	const char *te = getenv("KVT_BENCH_TAIL");
	if (te) {
		if (kvt_bench_parse_uint("KVT_BENCH_TAIL", te, 0, 1023, &u))
			return 2;
		tail_tokens = (long)u;
	}
	if (kvt_cuda_device_count() == 0) {
		fprintf(stderr, "no CUDA device\n");
		return 77;
	}
	if (kvt_cuda_ctx_create(0, &ctx, err, sizeof(err))) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	char name[128];
	int sms = 0;
	kvt_cuda_ctx_info(ctx, name, sizeof(name), &sms);
	printf("{\"bench\":\"gpu\",\"op\":\"device\",\"name\":\"%s\",\"sms\":%d}\n", name, sms);
	int rc = 0;
	double bw = bench_copy();
	if (bw <= 0) {
		fprintf(stderr, "copy: %s\n", err);
		rc = 1;
		goto out;
	}
	if (codec_only)
		goto codec;
	if (schemes_only) {
		rc |= bench_other_schemes(bw);
		goto out;
	}
	if (packed_only) {
		rc |= bench_packed(bw);
		goto out;
	}
	static const int cases[][2] = {{1, 131072}, {8, 32768}, {48, 4096}};
	for (int i = 0; i < 3; i++)
		rc |= bench_attend(2, 32, cases[i][0], cases[i][1], bw);
	/* the daemon's default codec (kvtier-int2: 3-bit keys, 2-bit values, G = B = 64) */
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 128, KVT_DTYPE_BF16, bw);
	if (attend_only) {
		rc |= bench_attend_split(3, 2, 64, 64, 48, 4096, 128, KVT_DTYPE_BF16, bw);
		goto out;
	}
	rc |= bench_packed(bw);
	/* the CUDA-core kernel on some of the same cases, for the record */
	setenv("KVTIER_CUDA_NO_MMA", "1", 1);
	rc |= bench_attend(2, 32, 1, 131072, bw);
	rc |= bench_attend_split(2, 2, 32, 128, 1, 131072, 64, KVT_DTYPE_BF16, bw);
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 64, KVT_DTYPE_BF16, bw);
	rc |= bench_attend_split(3, 2, 64, 64, 1, 131072, 128, KVT_DTYPE_F16, bw);
	rc |= bench_attend_split(2, 2, 32, 128, 1, 131072, 256, KVT_DTYPE_BF16, bw);
	unsetenv("KVTIER_CUDA_NO_MMA");
	rc |= bench_other_schemes(bw);
codec:
	/* the default (tensor-core encoder since session 6), then the byte-exact encoder
	 * (KVTIER_CUDA_ENC_EXACT=1), then the session-2 kernels, all against the same copy */
	rc |= bench_encode_decode(bw, "fast");
	/* the crc pass as a plain launch after the encoder (A/B of its programmatic launch) */
	setenv("KVTIER_CUDA_CRC_PDL", "0", 1);
	rc |= bench_encode_decode(bw, "fast_crc_plain");
	unsetenv("KVTIER_CUDA_CRC_PDL");
	if (getenv("KVT_BENCH_FAST_ONLY")) /* A/B runs of the default path only */
		goto out;
	setenv("KVTIER_CUDA_ENC_EXACT", "1", 1);
	rc |= bench_encode_decode(bw, "exact");
	unsetenv("KVTIER_CUDA_ENC_EXACT");
	setenv("KVTIER_CUDA_CODEC_OLD", "1", 1);
	rc |= bench_encode_decode(bw, "session2");
	unsetenv("KVTIER_CUDA_CODEC_OLD");
out:
	kvt_cuda_ctx_destroy(ctx);
	return rc ? 1 : 0;
}

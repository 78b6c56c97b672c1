/*
 * test_gpu_attend_real.c - GPU decode attention on a real model's K, V and queries (issue 4:
 * "plus a real-model K/V dump when available").
 *
 * Input: a directory written by tests/realmodel/dump_kvq.py (k.npy, v.npy [layers][tokens]
 * [kv_heads][head_dim], q.npy [layers][tokens][q_heads][head_dim], post-RoPE, meta.json with
 * softmax_scale), named by KVTIER_REAL_KVQ_DIR or argv[1]. ctest passes the dump that the
 * realmodel_kvq_dump fixture makes (SmolLM2-135M: 3 KV heads, 9 query heads, head_dim 64).
 *
 * For each codec (the kvtier-int2 and oscar-int2 presets, oscar INT4, kivi INT2, hadamard INT2
 * and INT4, exact none),
 * f16 and bf16 sessions: the CPU encodes the dump's chunks (all kept layers), then one batched
 * launch attends every (layer, query position) pair as its own session: query token p reads
 * tokens 0..p, sealed into chunks as kvt_seq seals them (the last recent_exact_tokens stay
 * exact) plus the exact tail. The reference is naive attention in double over
 * kvt_decode_chunk's output and the tail: the GPU's relative error must be <= 1e-3 (fp32
 * accumulation), as in test_gpu_attend; kvt_attend (the CPU kernel) is held to the same
 * bound on the same inputs. Printed, not asserted: each codec's error against attention over
 * the unquantized K/V (what the codec costs on this model).
 *
 * Exits 77 without a GPU or without the dump. `--cpu DIR` checks only kvt_attend (runs
 * anywhere: ctest's realmodel_attend_cpu).
 */
#include <math.h>
#include <unistd.h>

#include "gpu_test_util.h"

#include "kvt_npy.h"

#define N_POS 6 /* query positions per layer: the last token and 5 random ones */

static kvt_cuda_ctx *ctx; /* NULL: --cpu, kvt_attend only */
static struct kvt_npy K, V, Q;
static uint32_t L, T, H, HQ, D;
static float softmax_scale;

/* softmax_scale from meta.json (the only field the test needs) */
static int read_scale(const char *dir, float *out)
{
	char path[4096], buf[8192];
	snprintf(path, sizeof(path), "%s/meta.json", dir);
	FILE *f = fopen(path, "r");
	if (!f)
		return -errno;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	const char *p = strstr(buf, "\"softmax_scale\"");
	if (!p || !(p = strchr(p, ':')))
		return -EINVAL;
	*out = strtof(p + 1, NULL);
	return *out > 0.0f ? 0 : -EINVAL;
}

static int load(const char *dir)
{
	char path[4096], err[512];
	struct kvt_npy *arr[3] = {&K, &V, &Q};
	const char *names[3] = {"k", "v", "q"};
	for (int i = 0; i < 3; i++) {
		snprintf(path, sizeof(path), "%s/%s.npy", dir, names[i]);
		if (kvt_npy_read_f32(path, arr[i], err, sizeof(err))) {
			printf("# %s\n", err);
			return -1;
		}
		KVT_CHECK(arr[i]->ndim == 4, "%s: %u dimensions, want 4", path, arr[i]->ndim);
		if (arr[i]->ndim != 4)
			return -1;
	}
	L = (uint32_t)K.shape[0];
	T = (uint32_t)K.shape[1];
	H = (uint32_t)K.shape[2];
	D = (uint32_t)K.shape[3];
	HQ = (uint32_t)Q.shape[2];
	const bool same = V.shape[0] == L && V.shape[1] == T && V.shape[2] == H && V.shape[3] == D &&
			  Q.shape[0] == L && Q.shape[1] == T && Q.shape[3] == D && HQ % H == 0;
	KVT_CHECK(same, "k/v/q shapes disagree");
	if (read_scale(dir, &softmax_scale)) {
		printf("# %s/meta.json: no positive softmax_scale\n", dir);
		return -1;
	}
	return same ? 0 : -1;
}

struct req_data {
	uint32_t layer, pos, n_chunks, n_tail;
	void *q_dev, *tail_k_dev, *tail_v_dev;
	float *out_dev;
};

/* One codec on the whole dump in one batched launch. */
static void one_codec(const char *name, const struct kvt_codec_config *cfg, uint32_t q_dtype,
		      const uint32_t *pos)
{
	const uint32_t B = cfg->chunk_tokens, W = cfg->recent_exact_tokens;
	const size_t row = (size_t)H * D, ws = kvt_dtype_size(cfg->dtype);
	const size_t qs = kvt_dtype_size(q_dtype), cap = kvt_chunk_max_bytes(cfg);
	const uint32_t n_chunks_max = T / B;
	char desc[200], err[256];
	describe(cfg, desc, sizeof(desc));
	int rc = 0;

	/* the dump in the session dtype (what a worker would send), and back to f32: the exact
	 * rows the codec and the tail see */
	const size_t nkv = (size_t)L * T * row;
	void *kw = malloc(nkv * ws), *vw = malloc(nkv * ws);
	float *kx = malloc(nkv * 4), *vx = malloc(nkv * 4);
	kvt_convert(K.data, KVT_DTYPE_F32, kw, cfg->dtype, nkv);
	kvt_convert(V.data, KVT_DTYPE_F32, vw, cfg->dtype, nkv);
	kvt_convert(kw, cfg->dtype, kx, KVT_DTYPE_F32, nkv);
	kvt_convert(vw, cfg->dtype, vx, KVT_DTYPE_F32, nkv);

	/* chunks: tokens [cB, (c + 1)B) of every layer, CPU-encoded, uploaded; decoded per layer
	 * into kd/vd [L][T][H][D] for the reference */
	uint8_t **chunks = calloc(n_chunks_max + 1, sizeof(*chunks));
	void **chunks_dev = calloc(n_chunks_max + 1, sizeof(*chunks_dev));
	struct kvt_chunk_header *hdrs = calloc(n_chunks_max + 1, sizeof(*hdrs));
	const struct kvt_chunk_header **hdr_ptrs = calloc(n_chunks_max + 1, sizeof(*hdr_ptrs));
	float *kd = malloc(nkv * 4), *vd = malloc(nkv * 4);
	void *ck = malloc((size_t)L * B * row * ws), *cv = malloc((size_t)L * B * row * ws);
	uint64_t pinned = 0;
	for (uint32_t c = 0; c < n_chunks_max && !rc; c++) {
		for (uint32_t l = 0; l < L; l++) {
			const size_t src = ((size_t)l * T + (size_t)c * B) * row * ws;
			memcpy((uint8_t *)ck + (size_t)l * B * row * ws, (uint8_t *)kw + src, B * row * ws);
			memcpy((uint8_t *)cv + (size_t)l * B * row * ws, (uint8_t *)vw + src, B * row * ws);
		}
		chunks[c] = malloc(cap);
		int64_t n = kvt_encode_chunk(cfg, (uint64_t)c * B, ck, cv, chunks[c], cap, err, sizeof(err));
		KVT_CHECK(n > 0, "%s: encode chunk %u: %s", desc, c, err);
		if (n <= 0) {
			rc = -1;
			break;
		}
		memcpy(&hdrs[c], chunks[c], sizeof(hdrs[c]));
		hdr_ptrs[c] = &hdrs[c];
		pinned += hdrs[c].n_pinned;
		if (ctx) {
			rc = kvt_cuda_alloc(ctx, (size_t)n, &chunks_dev[c], err, sizeof(err));
			rc = rc ? rc : kvt_cuda_upload(ctx, chunks_dev[c], chunks[c], (size_t)n, err, sizeof(err));
		}
		for (uint32_t l = 0; l < L && !rc; l++) {
			const size_t dst = ((size_t)l * T + (size_t)c * B) * row;
			rc = kvt_decode_chunk(chunks[c], 0, B, l, l + 1, KVT_DTYPE_F32, kd + dst, vd + dst,
					      err, sizeof(err));
		}
		KVT_CHECK(rc == 0, "%s: chunk %u: %s", desc, c, err);
	}

	/* requests: every kept layer x N_POS query positions, sealed as kvt_seq seals */
	const uint32_t n_req = L * N_POS;
	struct req_data *rd = calloc(n_req, sizeof(*rd));
	struct kvt_cuda_attend_request *reqs = calloc(n_req, sizeof(*reqs));
	for (uint32_t r = 0; r < n_req && !rc; r++) {
		struct req_data *x = &rd[r];
		x->layer = r / N_POS;
		x->pos = pos[r % N_POS];
		const uint32_t n = x->pos + 1;
		x->n_chunks = n > W ? (n - W) / B : 0;
		x->n_tail = n - x->n_chunks * B;
		const size_t tb = (size_t)(x->n_tail ? x->n_tail : 1) * row * ws;
		const size_t t0 = ((size_t)x->layer * T + (size_t)x->n_chunks * B) * row * ws;
		const size_t q0 = ((size_t)x->layer * T + x->pos) * HQ * D;
		if (!ctx)
			continue;
		void *qh = malloc((size_t)HQ * D * qs);
		kvt_convert((const float *)Q.data + q0, KVT_DTYPE_F32, qh, q_dtype, (size_t)HQ * D);
		rc = kvt_cuda_alloc(ctx, tb, &x->tail_k_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_alloc(ctx, tb, &x->tail_v_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_upload(ctx, x->tail_k_dev, (uint8_t *)kw + t0, x->n_tail * row * ws, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_upload(ctx, x->tail_v_dev, (uint8_t *)vw + t0, x->n_tail * row * ws, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_alloc(ctx, (size_t)HQ * D * qs, &x->q_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_upload(ctx, x->q_dev, qh, (size_t)HQ * D * qs, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_alloc(ctx, (size_t)HQ * D * 4, (void **)&x->out_dev, err, sizeof(err));
		rc = rc ? rc : kvt_cuda_memset_async(ctx, x->out_dev, 0xff, (size_t)HQ * D * 4, err, sizeof(err));
		free(qh);
		reqs[r] = (struct kvt_cuda_attend_request){
			.cfg = cfg, .layer = x->layer, .n_q_heads = HQ, .softmax_scale = softmax_scale,
			.q_dev = x->q_dev, .q_dtype = q_dtype, .chunks_dev = (const void *const *)chunks_dev,
			.chunk_hdrs = hdr_ptrs, .n_chunks = x->n_chunks, .tail_k_dev = x->tail_k_dev,
			.tail_v_dev = x->tail_v_dev, .n_tail = x->n_tail, .out_dev = x->out_dev};
	}
	KVT_CHECK(rc == 0, "%s: setup: %s", desc, err);

	uint32_t kernel = 99;
	if (!rc && ctx) {
		kvt_cuda_attend_plan *pl = NULL;
		rc = kvt_cuda_attend_plan_build(ctx, reqs, n_req, &pl, err, sizeof(err));
		if (!rc) {
			struct kvt_cuda_attend_plan_info info;
			kvt_cuda_attend_plan_info(pl, &info);
			kernel = info.kernel;
			rc = kvt_cuda_attend_run(ctx, pl, err, sizeof(err));
			rc = rc ? rc : kvt_cuda_sync(ctx, err, sizeof(err));
			kvt_cuda_attend_plan_destroy(pl);
		}
		KVT_CHECK(rc == 0, "%s: kvt_cuda_attend (%u requests): %s", desc, n_req, err);
	}

	double worst = 0.0, worst_cpu = 0.0, worst_codec = 0.0, sum_codec = 0.0;
	float *out = malloc((size_t)HQ * D * 4), *ref = malloc((size_t)HQ * D * 4);
	float *exact = malloc((size_t)HQ * D * 4), *qf = malloc((size_t)HQ * D * 4);
	float *krows = malloc((size_t)T * row * 4), *vrows = malloc((size_t)T * row * 4);
	for (uint32_t r = 0; r < n_req && !rc; r++) {
		const struct req_data *x = &rd[r];
		/* the query as the GPU read it (rounded to q_dtype) */
		const size_t q0 = ((size_t)x->layer * T + x->pos) * HQ * D;
		void *qh = malloc((size_t)HQ * D * qs);
		kvt_convert((const float *)Q.data + q0, KVT_DTYPE_F32, qh, q_dtype, (size_t)HQ * D);
		kvt_convert(qh, q_dtype, qf, KVT_DTYPE_F32, (size_t)HQ * D);
		free(qh);
		/* decoded chunk rows, then the exact tail */
		const size_t nc = (size_t)x->n_chunks * B, lb = (size_t)x->layer * T * row;
		memcpy(krows, kd + lb, nc * row * 4);
		memcpy(vrows, vd + lb, nc * row * 4);
		memcpy(krows + nc * row, kx + lb + nc * row, (size_t)x->n_tail * row * 4);
		memcpy(vrows + nc * row, vx + lb + nc * row, (size_t)x->n_tail * row * 4);
		naive_attention(qf, HQ, krows, vrows, x->pos + 1, H, D, softmax_scale, ref);
		/* the CPU kernel on the same chunks, tail and query */
		const size_t t0 = ((size_t)x->layer * T + nc) * row * ws;
		struct kvt_attend_request cr = {
			.cfg = cfg, .layer = x->layer, .n_q_heads = HQ, .softmax_scale = softmax_scale,
			.q = qf, .chunks = (const void *const *)chunks, .n_chunks = x->n_chunks,
			.tail_k = (uint8_t *)kw + t0, .tail_v = (uint8_t *)vw + t0, .n_tail = x->n_tail,
			.out = out};
		rc = kvt_attend(&cr, 1, err, sizeof(err));
		KVT_CHECK(rc == 0, "%s: kvt_attend: %s", desc, err);
		const double ecpu = rc ? INFINITY : rel_err(out, ref, (size_t)HQ * D);
		worst_cpu = ecpu > worst_cpu ? ecpu : worst_cpu;
		KVT_CHECK(ecpu <= 1e-3, "%s: layer %u query %u (%u chunks + %u tail): kvt_attend "
			  "relative error %.3e", desc, x->layer, x->pos, x->n_chunks, x->n_tail, ecpu);
		if (ctx) {
			rc = kvt_cuda_download(ctx, out, x->out_dev, (size_t)HQ * D * 4, err, sizeof(err));
			KVT_CHECK(rc == 0, "download: %s", err);
			const double e = rc ? INFINITY : rel_err(out, ref, (size_t)HQ * D);
			worst = e > worst ? e : worst;
			KVT_CHECK(e <= 1e-3, "%s q %s: layer %u query %u (%u chunks + %u tail): GPU "
				  "relative error %.3e against the CPU reference over the same decoded "
				  "values", desc, kvt_dtype_name(q_dtype), x->layer, x->pos, x->n_chunks,
				  x->n_tail, e);
		}
		/* what the codec costs here (the GPU's output, or the CPU's with --cpu): the
		 * unquantized rows */
		naive_attention(qf, HQ, kx + lb, vx + lb, x->pos + 1, H, D, softmax_scale, exact);
		const double ec = rel_err(out, exact, (size_t)HQ * D);
		worst_codec = ec > worst_codec ? ec : worst_codec;
		sum_codec += ec;
	}
	char gpu[96] = "GPU not run (--cpu)";
	if (ctx)
		snprintf(gpu, sizeof(gpu), "GPU %.3e (kernel %u)", worst, kernel);
	printf("# %-12s %s q %s: %u requests (%u layers x %u positions, %u chunks, %llu pinned "
	       "tokens): worst relative error vs the reference: %s, kvt_attend %.3e; %s output vs "
	       "attention over the unquantized K/V: mean %.3e, worst %.3e\n", name, desc,
	       kvt_dtype_name(q_dtype), n_req, L, N_POS, n_chunks_max, (unsigned long long)pinned, gpu,
	       worst_cpu, ctx ? "GPU" : "CPU", sum_codec / n_req, worst_codec);

	for (uint32_t r = 0; r < n_req && ctx; r++) {
		kvt_cuda_free(ctx, rd[r].q_dev);
		kvt_cuda_free(ctx, rd[r].tail_k_dev);
		kvt_cuda_free(ctx, rd[r].tail_v_dev);
		kvt_cuda_free(ctx, rd[r].out_dev);
	}
	for (uint32_t c = 0; c < n_chunks_max; c++) {
		free(chunks[c]);
		if (ctx)
			kvt_cuda_free(ctx, chunks_dev[c]);
	}
	free(rd);
	free(reqs);
	free(chunks);
	free(chunks_dev);
	free(hdrs);
	free(hdr_ptrs);
	free(kd);
	free(vd);
	free(ck);
	free(cv);
	free(kw);
	free(vw);
	free(kx);
	free(vx);
	free(out);
	free(ref);
	free(exact);
	free(qf);
	free(krows);
	free(vrows);
}

static void test_real_model(void)
{
	/* the last token (the longest context) and 5 fresh random positions >= 1 */
	uint32_t pos[N_POS];
	pos[0] = T - 1;
	for (int i = 1; i < N_POS; i++)
		pos[i] = 1 + kvt_rand_below(T - 1);
	printf("# query positions:");
	for (int i = 0; i < N_POS; i++)
		printf(" %u", pos[i]);
	printf("\n");

	static const struct {
		const char *name, *preset;
		uint32_t scheme, key_bits, value_bits, group;
	} codecs[] = {
		{"kvtier-int2", "kvtier-int2", 0, 0, 0, 0},
		{"oscar-int2", "oscar-int2", 0, 0, 0, 0},
		{"oscar INT4", NULL, KVT_SCHEME_OSCAR, 4, 4, 128},
		{"kivi INT2", NULL, KVT_SCHEME_KIVI, 2, 2, 32},
		/* hadamard's per-token key groups (the packed kernel's HK forms since session 20) */
		{"hadamard INT2", NULL, KVT_SCHEME_HADAMARD, 2, 2, 32},
		{"hadamard INT4", NULL, KVT_SCHEME_HADAMARD, 4, 4, 32},
		{"none", NULL, KVT_SCHEME_NONE, 16, 16, 32},
	};
	static const uint32_t qdts[] = {KVT_DTYPE_F16, KVT_DTYPE_BF16, KVT_DTYPE_F32};
	static const uint32_t wire[] = {KVT_DTYPE_F16, KVT_DTYPE_BF16};
	char err[256];
	for (size_t i = 0; i < sizeof(codecs) / sizeof(codecs[0]); i++)
		for (int w = 0; w < 2; w++) {
			struct kvt_codec_config cfg;
			kvt_codec_config_default(&cfg, L, H, D, wire[w]);
			if (codecs[i].preset) {
				KVT_CHECK(kvt_codec_preset(&cfg, codecs[i].preset, err, sizeof(err)) == 0,
					  "preset %s: %s", codecs[i].preset, err);
			} else {
				cfg.scheme = codecs[i].scheme;
				cfg.key_bits = codecs[i].key_bits;
				cfg.value_bits = codecs[i].value_bits;
				cfg.group = codecs[i].group;
				cfg.chunk_tokens = codecs[i].group < 64 ? 64 : codecs[i].group;
				cfg.rotate_v = cfg.scheme == KVT_SCHEME_OSCAR ||
					       cfg.scheme == KVT_SCHEME_HADAMARD;
			}
			one_codec(codecs[i].name, &cfg, qdts[kvt_rand_below(3)], pos);
		}
}

int main(int argc, char **argv)
{
	kvt_test_init();
	const bool cpu_only = argc > 1 && strcmp(argv[1], "--cpu") == 0;
	const char *dir = argc > 1 + cpu_only ? argv[1 + cpu_only] : getenv("KVTIER_REAL_KVQ_DIR");
	if (!cpu_only && kvt_cuda_device_count() == 0) {
		printf("# no CUDA device: skipped\n");
		return GPU_SKIP;
	}
	char path[4096], err[256];
	snprintf(path, sizeof(path), "%s/k.npy", dir ? dir : "");
	if (!dir || !*dir || access(path, R_OK) != 0) {
		printf("# no real-model K/V/Q dump (KVTIER_REAL_KVQ_DIR or the last argument: a "
		       "directory written by tests/realmodel/dump_kvq.py): skipped\n");
		return GPU_SKIP;
	}
	if (!cpu_only && kvt_cuda_ctx_create(0, &ctx, err, sizeof(err))) {
		printf("# no usable CUDA device (%s): skipped\n", err);
		return GPU_SKIP;
	}
	if (load(dir) == 0) {
		printf("# %s: %u layers x %u tokens, %u KV heads, %u query heads, head_dim %u, "
		       "softmax scale %g%s\n", dir, L, T, H, HQ, D, softmax_scale,
		       ctx ? "" : " (--cpu: kvt_attend only)");
		KVT_RUN(test_real_model);
	}
	kvt_npy_free(&K);
	kvt_npy_free(&V);
	kvt_npy_free(&Q);
	if (ctx)
		kvt_cuda_ctx_destroy(ctx);
	return kvt_test_done();
}

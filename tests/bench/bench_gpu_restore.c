/*
 * bench_gpu_restore.c - `kvtier-bench gpu-restore`: restoring a session from host memory into
 * GPU memory (compressed H2D copy + decode on the GPU) against a plain pinned cudaMemcpy of
 * the same bf16 bytes, measured in the same run.
 *
 * Rows (one JSON line each):
 *   memcpy_pinned   the reference: pinned host -> device cudaMemcpy of bf16 bytes (GB/s)
 *   direct_pinned   kvt_cuda_restore in this process, chunks in pinned memory (H2D reads them
 *                   in place), logical bf16 GB/s and the ratio to memcpy_pinned
 *   direct_pageable the same from ordinary (pageable) memory: chunks go through the pinned
 *                   staging slots, filled by the copy threads (what the daemon does)
 *   daemon          RestoreToDevice through kvtierd (--kvtierd PATH; the session is stored
 *                   with StoreEncoded), time around the call and the daemon's elapsed_us
 * Chunks are encoded on the GPU (same bytes as the CPU encoder) from synthetic bf16 K/V with
 * sinks and outlier channels. A spot check compares one restored chunk with the CPU decode.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "kvt_codec.h"
#include "kvt_cuda.h"
#ifdef KVT_BENCH_HAVE_CLIENT
#include "kvtier_client.h"
#endif

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof *v, cmp_d);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct opts {
	unsigned long tokens, layers, heads, dim, bits, group, chunk, iters, staging_mib, threads;
	const char *kvtierd;
};

static void usage(FILE *f)
{
	fprintf(f, "usage: kvtier-bench gpu-restore [--tokens N (32768)] [--layers L (32)] "
		   "[--heads H (8)] [--dim d (128)] [--bits b (2)] [--group G (32)] [--chunk B "
		   "(128)] [--iters N (10)] [--staging-mib M (64)] [--threads N (8)] "
		   "[--kvtierd PATH]\n");
}

#define CKR(x)                                                                             \
	do {                                                                               \
		if ((x) != 0) {                                                            \
			fprintf(stderr, "kvtier-bench gpu-restore: %s: %s\n", #x, err);     \
			return 1;                                                          \
		}                                                                          \
	} while (0)

static char err[512];

#ifdef KVT_BENCH_HAVE_CLIENT
static pid_t spawn_daemon(const char *bin, const char *dir, const struct opts *o)
{
	char sock[300], log[300], staging[64], threads[64];
	snprintf(sock, sizeof sock, "--socket=%s/kvtierd.sock", dir);
	snprintf(log, sizeof log, "%s/kvtierd.log", dir);
	snprintf(staging, sizeof staging, "--gpu_staging_bytes=%luMiB", o->staging_mib);
	snprintf(threads, sizeof threads, "--gpu_restore_threads=%lu", o->threads);
	char *argv[] = {(char *)bin, sock, (char *)"--host_capacity_bytes=50%", staging, threads,
			(char *)"--max_message_bytes=16MiB", (char *)"--max_append_bytes=16GiB",
			NULL};
	pid_t pid = fork();
	if (pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execv(bin, argv);
		_exit(127);
	}
	return pid;
}

static void stop_daemon(pid_t pid)
{
	int status;
	kill(pid, SIGTERM);
	for (int i = 0; i < 3000 && waitpid(pid, &status, WNOHANG) == 0; i++) {
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	if (waitpid(pid, &status, WNOHANG) == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
	}
}

static int daemon_case(const struct opts *o, const struct kvt_codec_config *cfg,
		       uint8_t *const *chunk_ptr, const size_t *chunk_size, size_t n_chunks,
		       void *k_dev, void *v_dev, double logical, double memcpy_gbs)
{
	char dir[] = "/tmp/kvtier-bench-restore-XXXXXX";
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	pid_t pid = spawn_daemon(o->kvtierd, dir, o);
	char target[320], sock[300];
	snprintf(sock, sizeof sock, "%s/kvtierd.sock", dir);
	snprintf(target, sizeof target, "unix:%s", sock);
	struct kvt_client *c = NULL;
	struct kvt_client_status st;
	struct kvt_client_options co = {.target = target, .connect_timeout_ms = 20000,
					.call_timeout_ms = 600000,
					.max_message_bytes = 16u << 20,
					.max_receive_bytes = 64u << 20};
	struct stat sb;
	for (int i = 0; i < 2000 && stat(sock, &sb) != 0; i++) {
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	int rc = 1;
	if (kvt_client_connect(&co, &c, &st)) {
		fprintf(stderr, "kvtier-bench gpu-restore: connect: %s (log %s/kvtierd.log)\n",
			st.message, dir);
		goto out;
	}
	struct kvt_client_session_params p;
	kvt_client_session_params_init(&p, "bench-restore", cfg->n_layers, cfg->n_kv_heads,
				       cfg->head_dim, cfg->dtype);
	p.codec.scheme = KVT_CLIENT_SCHEME_OSCAR;
	p.codec.key_bits = cfg->key_bits;
	p.codec.value_bits = cfg->value_bits;
	p.codec.group = cfg->group;
	p.codec.chunk_tokens = cfg->chunk_tokens;
	p.codec.rotate_v = (int32_t)cfg->rotate_v;
	p.codec.n_sinks = (int32_t)cfg->n_sinks;
	p.codec.pin_detect_max = 0;
	p.codec.pin_detect_ratio = 0;
	p.ttl_seconds = 0;
	struct kvt_client_encoded enc;
	memset(&enc, 0, sizeof enc);
	enc.n_chunks = n_chunks;
	enc.chunks = calloc(n_chunks, sizeof *enc.chunks);
	for (size_t i = 0; i < n_chunks; i++) {
		enc.chunks[i].chunk_index = (uint32_t)i;
		enc.chunks[i].n_bytes = chunk_size[i];
		enc.chunks[i].bytes = chunk_ptr[i];
	}
	enc.tail_token_begin = n_chunks * cfg->chunk_tokens;
	struct kvt_client_session_info info;
	double t0 = kvt_bench_now_s();
	if (kvt_client_store_encoded(c, &p, &enc, &info, &st)) {
		fprintf(stderr, "kvtier-bench gpu-restore: store_encoded: %s\n", st.message);
		free(enc.chunks);
		goto out;
	}
	fprintf(stderr, "# daemon: stored %zu chunks in %.2f s\n", n_chunks, kvt_bench_now_s() - t0);
	free(enc.chunks);
	struct kvt_client_restore r;
	memset(&r, 0, sizeof r);
	r.session_id = "bench-restore";
	r.layout = 1;
	r.token_end = KVT_CLIENT_END;
	r.layer_end = KVT_CLIENT_ALL_LAYERS;
	r.dtype = KVT_DTYPE_BF16;
	r.device_ordinal = -1;
	int n = (int)o->iters;
	double *wall = calloc((size_t)n, sizeof *wall), *srv = calloc((size_t)n, sizeof *srv);
	for (int i = -2; i < n; i++) {
		struct kvt_client_restore_result res;
		double a = kvt_bench_now_s();
		if (kvt_client_restore_to_device_ptr(c, &r, k_dev, v_dev, &res, &st)) {
			fprintf(stderr, "kvtier-bench gpu-restore: restore: %s\n", st.message);
			free(wall);
			free(srv);
			goto out;
		}
		if (i >= 0) {
			wall[i] = kvt_bench_now_s() - a;
			srv[i] = res.elapsed_us * 1e-6;
		}
	}
	double tw = median(wall, n), ts = median(srv, n);
	free(wall);
	free(srv);
	struct kvt_bench_json j;
	kvt_bench_json_begin(&j, "gpu-restore");
	kvt_bench_json_str(&j, "case", "daemon");
	kvt_bench_json_int(&j, "tokens", (long long)(n_chunks * cfg->chunk_tokens));
	kvt_bench_json_num(&j, "logical_bytes", logical);
	kvt_bench_json_num(&j, "ms", tw * 1e3);
	kvt_bench_json_num(&j, "logical_gbs", logical / tw / 1e9);
	kvt_bench_json_num(&j, "server_ms", ts * 1e3);
	kvt_bench_json_num(&j, "server_logical_gbs", logical / ts / 1e9);
	kvt_bench_json_num(&j, "memcpy_pinned_gbs", memcpy_gbs);
	kvt_bench_json_num(&j, "speedup_vs_memcpy", logical / tw / 1e9 / memcpy_gbs);
	kvt_bench_json_end(&j);
	rc = 0;
out:
	if (c)
		kvt_client_close(c);
	stop_daemon(pid);
	char path[320];
	snprintf(path, sizeof path, "%s/kvtierd.log", dir);
	if (rc) {
		FILE *f = fopen(path, "r");
		char line[512];
		while (f && fgets(line, sizeof line, f))
			fputs(line, stderr);
		if (f)
			fclose(f);
	}
	unlink(path);
	rmdir(dir);
	return rc;
}
#endif

int kvt_bench_gpu_restore(int argc, char **argv)
{
	struct opts o = {32768, 32, 8, 128, 2, 32, 128, 10, 64, 8, NULL};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		unsigned long *dst = NULL;
		unsigned long lo = 1, hi = 1ul << 30;
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			return 0;
		}
		if (!strcmp(a, "--kvtierd") && v) {
			o.kvtierd = v;
			i++;
			continue;
		}
		if (!strcmp(a, "--tokens"))
			dst = &o.tokens;
		else if (!strcmp(a, "--layers"))
			dst = &o.layers, hi = KVT_MAX_LAYERS;
		else if (!strcmp(a, "--heads"))
			dst = &o.heads, hi = KVT_MAX_KV_HEADS;
		else if (!strcmp(a, "--dim"))
			dst = &o.dim, hi = 256;
		else if (!strcmp(a, "--bits"))
			dst = &o.bits, lo = 2, hi = 8;
		else if (!strcmp(a, "--group"))
			dst = &o.group, lo = 32, hi = 128;
		else if (!strcmp(a, "--chunk"))
			dst = &o.chunk, lo = 32, hi = 1024;
		else if (!strcmp(a, "--iters"))
			dst = &o.iters, hi = 1000;
		else if (!strcmp(a, "--staging-mib"))
			dst = &o.staging_mib, lo = 4, hi = 4096;
		else if (!strcmp(a, "--threads"))
			dst = &o.threads, hi = 32;
		if (!dst || !v || kvt_bench_parse_uint(a, v, lo, hi, dst)) {
			usage(stderr);
			return 2;
		}
		i++;
	}
	if (kvt_cuda_device_count() == 0) {
		fprintf(stderr, "kvtier-bench gpu-restore: no CUDA device\n");
		return 1;
	}
	struct kvt_codec_config cfg;
	kvt_codec_config_default(&cfg, (uint32_t)o.layers, (uint32_t)o.heads, (uint32_t)o.dim,
				 KVT_DTYPE_BF16);
	cfg.scheme = KVT_SCHEME_OSCAR;
	cfg.key_bits = cfg.value_bits = (uint32_t)o.bits;
	cfg.group = (uint32_t)o.group;
	cfg.chunk_tokens = (uint32_t)o.chunk;
	cfg.pin_detect_ratio = 0;
	cfg.pin_detect_max = 0;
	if (kvt_codec_config_validate(&cfg, err, sizeof err)) {
		fprintf(stderr, "kvtier-bench gpu-restore: %s\n", err);
		return 2;
	}
	const uint32_t B = cfg.chunk_tokens, L = cfg.n_layers, H = cfg.n_kv_heads, D = cfg.head_dim;
	const size_t n_chunks = o.tokens / B, T = n_chunks * B;
	const size_t in_elems = (size_t)L * B * H * D, row = (size_t)H * D;
	const double logical = 2.0 * L * T * row * 2; /* K + V, bf16 */
	kvt_cuda_ctx *ctx;
	CKR(kvt_cuda_ctx_create(0, &ctx, err, sizeof err));
	char name[256];
	int sms = 0;
	kvt_cuda_ctx_info(ctx, name, sizeof name, &sms);

	/* 4 distinct inputs, cycled over the chunks */
	enum { NIN = 4 };
	uint16_t *hin = kvt_bench_alloc(in_elems * 2);
	void *din_k[NIN], *din_v[NIN];
	uint64_t seed = 0x5eed;
	for (int s = 0; s < NIN; s++) {
		for (int kv = 0; kv < 2; kv++) {
			for (size_t i = 0; i < in_elems; i++) {
				size_t ch = i % D, t = (i / row) % B;
				float x = (float)kvt_bench_normal(&seed);
				if (kv == 0 && ch % 29 == 3)
					x *= 6.0f;
				if (s == 0 && t < 4)
					x *= 0.1f;
				hin[i] = kvt_f32_to_bf16(x);
			}
			void **dst = kv ? &din_v[s] : &din_k[s];
			CKR(kvt_cuda_alloc(ctx, in_elems * 2, dst, err, sizeof err));
			CKR(kvt_cuda_upload(ctx, *dst, hin, in_elems * 2, err, sizeof err));
		}
	}
	/* encode every chunk on the GPU, then down to pinned host memory */
	size_t cap = (kvt_chunk_max_bytes(&cfg) + 255) & ~(size_t)255;
	size_t batch = 64;
	void *denc;
	CKR(kvt_cuda_alloc(ctx, cap * batch, &denc, err, sizeof err));
	uint8_t *pinned;
	CKR(kvt_cuda_alloc_host(ctx, cap * n_chunks, (void **)&pinned, err, sizeof err));
	uint8_t **chunk_ptr = calloc(n_chunks, sizeof *chunk_ptr);
	size_t *chunk_size = calloc(n_chunks, sizeof *chunk_size);
	struct kvt_cuda_encode_job jobs[64];
	int64_t sizes[64];
	size_t off = 0, enc_bytes = 0;
	for (size_t c0 = 0; c0 < n_chunks; c0 += batch) {
		size_t nb = n_chunks - c0 < batch ? n_chunks - c0 : batch;
		for (size_t i = 0; i < nb; i++) {
			jobs[i].first_token = (uint64_t)(c0 + i) * B;
			jobs[i].k_dev = din_k[(c0 + i) % NIN];
			jobs[i].v_dev = din_v[(c0 + i) % NIN];
			jobs[i].out_dev = (uint8_t *)denc + i * cap;
			jobs[i].out_cap = cap;
		}
		CKR(kvt_cuda_encode(ctx, &cfg, jobs, nb, sizes, err, sizeof err));
		CKR(kvt_cuda_sync(ctx, err, sizeof err));
		for (size_t i = 0; i < nb; i++) {
			chunk_ptr[c0 + i] = pinned + off;
			chunk_size[c0 + i] = (size_t)sizes[i];
			CKR(kvt_cuda_download(ctx, pinned + off, (uint8_t *)denc + i * cap,
					      (size_t)sizes[i], err, sizeof err));
			off += ((size_t)sizes[i] + 255) & ~(size_t)255;
			enc_bytes += (size_t)sizes[i];
		}
	}
	kvt_cuda_free(ctx, denc);
	for (int s = 0; s < NIN; s++) {
		kvt_cuda_free(ctx, din_k[s]);
		kvt_cuda_free(ctx, din_v[s]);
	}
	/* pageable copies of the same chunks */
	uint8_t *pageable = kvt_bench_alloc(off);
	memcpy(pageable, pinned, off);

	void *k_dev, *v_dev;
	size_t kv_bytes = (size_t)L * T * row * 2;
	CKR(kvt_cuda_alloc(ctx, kv_bytes, &k_dev, err, sizeof err));
	CKR(kvt_cuda_alloc(ctx, kv_bytes, &v_dev, err, sizeof err));

	/* reference: pinned memcpy of the same logical bytes, through a 1 GiB pinned buffer */
	size_t ref_buf = kv_bytes < (1ul << 30) ? kv_bytes : (1ul << 30);
	uint8_t *pref;
	CKR(kvt_cuda_alloc_host(ctx, ref_buf, (void **)&pref, err, sizeof err));
	memset(pref, 0x3c, ref_buf);
	int n = (int)o.iters;
	double *t = calloc((size_t)n, sizeof *t);
	for (int i = -2; i < n; i++) {
		double a = kvt_bench_now_s();
		for (int kv = 0; kv < 2; kv++)
			for (size_t done = 0; done < kv_bytes; done += ref_buf) {
				size_t len = kv_bytes - done < ref_buf ? kv_bytes - done : ref_buf;
				CKR(kvt_cuda_upload(ctx, (uint8_t *)(kv ? v_dev : k_dev) + done, pref, len,
						    err, sizeof err));
			}
		if (i >= 0)
			t[i] = kvt_bench_now_s() - a;
	}
	double t_ref = median(t, n), memcpy_gbs = logical / t_ref / 1e9;
	struct kvt_bench_json j;
	kvt_bench_json_begin(&j, "gpu-restore");
	kvt_bench_json_str(&j, "case", "memcpy_pinned");
	kvt_bench_json_str(&j, "device", name);
	kvt_bench_json_num(&j, "bytes", logical);
	kvt_bench_json_num(&j, "ms", t_ref * 1e3);
	kvt_bench_json_num(&j, "gbs", memcpy_gbs);
	kvt_bench_json_end(&j);

	kvt_cuda_restorer *rst;
	CKR(kvt_cuda_restorer_create(ctx, o.staging_mib << 20, (unsigned)o.threads, &rst, err,
				     sizeof err));
	struct kvt_cuda_restore_chunk *rc_ = calloc(n_chunks, sizeof *rc_);
	struct kvt_cuda_layout dst = {.k_dev = k_dev, .v_dev = v_dev,
				      .layer_stride = (uint64_t)T * row * 2,
				      .row_bytes = (uint32_t)(row * 2), .token_begin = 0};
	for (int pinned_case = 1; pinned_case >= 0; pinned_case--) {
		for (size_t i = 0; i < n_chunks; i++) {
			uint8_t *base = pinned_case ? pinned : pageable;
			rc_[i].host = base + (chunk_ptr[i] - pinned);
			rc_[i].bytes = chunk_size[i];
			rc_[i].hdr = (const struct kvt_chunk_header *)rc_[i].host;
		}
		struct kvt_cuda_restore_args ra = {
			.chunks = rc_, .n_chunks = n_chunks, .chunks_pinned = pinned_case,
			.token_begin = 0, .token_end = T, .layer_begin = 0, .layer_end = L,
			.out_dtype = KVT_DTYPE_BF16, .dst = &dst};
		struct kvt_cuda_restore_stats rs;
		for (int i = -2; i < n; i++) {
			CKR(kvt_cuda_memset_async(ctx, k_dev, 0xff, 4096, err, sizeof err));
			CKR(kvt_cuda_sync(ctx, err, sizeof err));
			double a = kvt_bench_now_s();
			CKR(kvt_cuda_restore(ctx, rst, &ra, &rs, err, sizeof err));
			if (i >= 0)
				t[i] = kvt_bench_now_s() - a;
		}
		double tr = median(t, n);
		kvt_bench_json_begin(&j, "gpu-restore");
		kvt_bench_json_str(&j, "case", pinned_case ? "direct_pinned" : "direct_pageable");
		kvt_bench_json_str(&j, "codec", "oscar");
		kvt_bench_json_int(&j, "bits", (long long)o.bits);
		kvt_bench_json_int(&j, "group", (long long)o.group);
		kvt_bench_json_int(&j, "layers", L);
		kvt_bench_json_int(&j, "kv_heads", H);
		kvt_bench_json_int(&j, "head_dim", D);
		kvt_bench_json_int(&j, "tokens", (long long)T);
		kvt_bench_json_num(&j, "encoded_bytes", (double)enc_bytes);
		kvt_bench_json_num(&j, "compression", logical / (double)enc_bytes);
		kvt_bench_json_num(&j, "ms", tr * 1e3);
		kvt_bench_json_num(&j, "logical_gbs", logical / tr / 1e9);
		kvt_bench_json_num(&j, "h2d_gbs", (double)rs.h2d_bytes / tr / 1e9);
		kvt_bench_json_num(&j, "memcpy_pinned_gbs", memcpy_gbs);
		kvt_bench_json_num(&j, "speedup_vs_memcpy", logical / tr / 1e9 / memcpy_gbs);
		kvt_bench_json_int(&j, "copy_threads", (long long)o.threads);
		kvt_bench_json_end(&j);
	}
	/* spot check: chunk n/2, every layer, against the CPU decode */
	{
		size_t ci = n_chunks / 2;
		size_t cb = (size_t)L * B * row * 2;
		uint16_t *ck = malloc(cb), *cv = malloc(cb), *gk = malloc(B * row * 2);
		size_t bad = 0;
		CKR(kvt_decode_chunk(chunk_ptr[ci], 0, B, 0, L, KVT_DTYPE_BF16, ck, cv, err,
				     sizeof err));
		for (uint32_t l = 0; l < L; l++) {
			CKR(kvt_cuda_download(ctx, gk, (uint8_t *)k_dev + dst.layer_stride * l +
						       ci * B * row * 2, B * row * 2, err, sizeof err));
			for (size_t e = 0; e < B * row; e++) {
				float a = kvt_bf16_to_f32(gk[e]), b = kvt_bf16_to_f32(ck[l * B * row + e]);
				if (fabsf(a - b) > fabsf(b) / 128 + 1e-6f)
					bad++;
			}
		}
		kvt_bench_json_begin(&j, "gpu-restore");
		kvt_bench_json_str(&j, "case", "spot_check");
		kvt_bench_json_int(&j, "chunk", (long long)ci);
		kvt_bench_json_int(&j, "mismatches", (long long)bad);
		kvt_bench_json_end(&j);
		free(ck);
		free(cv);
		free(gk);
	}
	int rc = 0;
#ifdef KVT_BENCH_HAVE_CLIENT
	if (o.kvtierd)
		rc = daemon_case(&o, &cfg, chunk_ptr, chunk_size, n_chunks, k_dev, v_dev, logical,
				 memcpy_gbs);
#else
	if (o.kvtierd)
		fprintf(stderr, "kvtier-bench gpu-restore: built without libkvtier: no daemon case\n");
#endif
	kvt_cuda_restorer_destroy(rst);
	free(rc_);
	free(t);
	kvt_cuda_free(ctx, k_dev);
	kvt_cuda_free(ctx, v_dev);
	kvt_cuda_free_host(ctx, pref);
	kvt_cuda_free_host(ctx, pinned);
	free(chunk_ptr);
	free(chunk_size);
	kvt_cuda_ctx_destroy(ctx);
	return rc;
}

/*
 * test_gpu_restore.c - RestoreToDevice across two processes on one GPU, and the GPU tier.
 *
 * This process is the worker: it owns device buffers (cudaMalloc through kvt_cuda.h) and
 * starts a real kvtierd (another process) that opens them through CUDA IPC. Each random case
 * (codec, shape, wire dtype, tier host or gpu, out dtype f16/bf16, contiguous or paged layout
 * with a shuffled block table, one shared allocation or two, random token and layer
 * sub-ranges, extra layer stride) poisons the buffers, restores through
 * kvt_client_restore_to_device_ptr, and checks element by element against the CPU decode
 * (kvt_decode_chunk) of the same session's chunks fetched with FetchEncoded, the exact tail
 * bit for bit, and every byte outside the restored rows still poisoned.
 *
 * The GPU tier: a GPU-resident session (tier "gpu") attends on the GPU (Stats gpu.attends
 * counts it) within 1e-3 of the CPU's kvt_attend over the same chunks, with and without a
 * staged new token; a daemon with a small arena keeps the chunks that do not fit on the host
 * (tier "gpu+host"), falls back to the CPU for Attend, restores from a mix of arena and host
 * chunks, and gives every arena byte back when the session is dropped.
 *
 * A worker killed while it restores (test_killed_worker): the daemon keeps serving, restores
 * stay right, and the mappings of the dead worker's buffers are closed within a maintenance
 * tick (not after the 60 s idle time), so that its device memory, which those mappings kept
 * alive, goes back to the device.
 *
 * Exits 77 when there is no CUDA device.
 */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvt_cuda.h"
#include "kvt_it.h"

#define POISON 0xA5

static struct kvt_cuda_ctx *g_ctx;
static struct kvt_daemon g_d;
static struct kvt_client *g_c;
static size_t g_exact, g_total;

static float tol_for(uint32_t dtype, float ref, float rowmax)
{
	float rel = dtype == KVT_DTYPE_BF16 ? 1.0f / 128 : 1.0f / 1024;
	return rel * fabsf(ref) + 1e-6f * rowmax + 1e-30f;
}

static const uint32_t wire_scheme[] = {KVT_CLIENT_SCHEME_OSCAR, KVT_CLIENT_SCHEME_OSCAR,
				       KVT_CLIENT_SCHEME_KIVI, KVT_CLIENT_SCHEME_HADAMARD};

struct sess {
	char id[64];
	struct kvt_client_session_info info;
	struct kvt_codec_config cfg;
	uint64_t n;
	/* the CPU decode of the whole session in out dtype, [L][n][H][d], K and V */
	uint8_t *ref_k, *ref_v;
	uint32_t ref_dtype;
	uint64_t sealed; /* tokens in chunks (the rest is the exact tail) */
	struct kvt_client_encoded *enc;
};

static int open_fill(struct kvt_client *c, struct sess *s, const char *id,
		     const struct kvt_client_session_params *p, uint64_t n)
{
	struct kvt_client_status st;
	memset(s, 0, sizeof *s);
	snprintf(s->id, sizeof s->id, "%s", id);
	if (kvt_client_open(c, p, &s->info, &st)) {
		printf("# open %s: %s\n", id, st.message);
		return -1;
	}
	it_config_from_info(&s->info, &s->cfg);
	struct kvt_client_shape shape = it_shape(&s->info);
	size_t b = kvt_client_kv_bytes(&shape, n);
	void *k = it_xmalloc(b), *v = it_xmalloc(b);
	it_gen_kv(shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.dtype, 0, (uint32_t)n,
		  k, v);
	int rc = kvt_client_append(c, id, &shape, k, v, (uint32_t)n, NULL, NULL, &st);
	free(k);
	free(v);
	if (rc) {
		printf("# append %s: %s\n", id, st.message);
		return -1;
	}
	s->n = n;
	if (kvt_client_fetch_encoded(c, id, 0, KVT_CLIENT_ALL_CHUNKS, 1, &s->enc, &st)) {
		printf("# fetch_encoded %s: %s\n", id, st.message);
		return -1;
	}
	return 0;
}

/* The CPU decode of the whole session into out dtype. */
static int build_ref(struct sess *s, uint32_t odt)
{
	const struct kvt_codec_config *cfg = &s->cfg;
	uint32_t L = cfg->n_layers, B = cfg->chunk_tokens;
	size_t row = (size_t)cfg->n_kv_heads * cfg->head_dim, os = kvt_dtype_size(odt);
	free(s->ref_k);
	free(s->ref_v);
	s->ref_k = it_xmalloc(L * s->n * row * os + 1);
	s->ref_v = it_xmalloc(L * s->n * row * os + 1);
	s->ref_dtype = odt;
	uint8_t *ck = it_xmalloc((size_t)L * B * row * os), *cv = it_xmalloc((size_t)L * B * row * os);
	char err[256];
	s->sealed = 0;
	for (size_t i = 0; i < s->enc->n_chunks; i++) {
		int rc = kvt_decode_chunk(s->enc->chunks[i].bytes, 0, B, 0, L, odt, ck, cv, err,
					  sizeof err);
		if (rc) {
			printf("# cpu decode: %s\n", err);
			free(ck);
			free(cv);
			return -1;
		}
		for (uint32_t l = 0; l < L; l++) {
			memcpy(s->ref_k + ((size_t)l * s->n + i * B) * row * os,
			       ck + (size_t)l * B * row * os, B * row * os);
			memcpy(s->ref_v + ((size_t)l * s->n + i * B) * row * os,
			       cv + (size_t)l * B * row * os, B * row * os);
		}
		s->sealed += B;
	}
	free(ck);
	free(cv);
	uint32_t nt = s->enc->tail_tokens;
	if (s->sealed + nt != s->n) {
		printf("# chunks + tail = %llu + %u tokens, session %llu\n",
		       (unsigned long long)s->sealed, nt, (unsigned long long)s->n);
		return -1;
	}
	size_t ws = kvt_dtype_size(cfg->dtype);
	for (uint32_t l = 0; l < L && nt; l++) {
		kvt_convert((uint8_t *)s->enc->tail_k + (size_t)l * nt * row * ws, cfg->dtype,
			    s->ref_k + ((size_t)l * s->n + s->sealed) * row * os, odt, nt * row);
		kvt_convert((uint8_t *)s->enc->tail_v + (size_t)l * nt * row * ws, cfg->dtype,
			    s->ref_v + ((size_t)l * s->n + s->sealed) * row * os, odt, nt * row);
	}
	return 0;
}

static void sess_free(struct sess *s)
{
	free(s->ref_k);
	free(s->ref_v);
	kvt_client_encoded_free(s->enc);
	s->ref_k = s->ref_v = NULL;
	s->enc = NULL;
}

struct layout {
	int paged;
	uint32_t bs;
	uint32_t *table;
	size_t n_table;
	uint64_t stride; /* layer stride */
	uint64_t span;   /* bytes of one layer region (stride >= span) */
};

static uint64_t row_of(const struct layout *ly, uint64_t t, uint64_t tb)
{
	return ly->paged ? (uint64_t)ly->table[t / ly->bs] * ly->bs + t % ly->bs : t - tb;
}

/* Compares the restored rows of one of K/V in img (a host copy of the region starting at the
 * K or V base) with the reference, then re-poisons them; returns mismatches. */
static size_t check_rows(struct sess *s, uint8_t *img, const uint8_t *ref,
			 const struct layout *ly, uint64_t tb, uint64_t te, uint32_t lb,
			 uint32_t le, const char *what, const char *desc)
{
	const struct kvt_codec_config *cfg = &s->cfg;
	uint32_t odt = s->ref_dtype, d = cfg->head_dim;
	size_t row = (size_t)cfg->n_kv_heads * d, os = kvt_dtype_size(odt);
	size_t bad = 0, bad_tail = 0;
	float *a = it_xmalloc(row * 4), *b = it_xmalloc(row * 4);
	for (uint32_t l = lb; l < le; l++)
		for (uint64_t t = tb; t < te; t++) {
			uint8_t *got = img + (l - lb) * ly->stride + row_of(ly, t, tb) * row * os;
			const uint8_t *want = ref + ((size_t)l * s->n + t) * row * os;
			if (t >= s->sealed) {
				/* exact tail: bit for bit */
				if (memcmp(got, want, row * os))
					bad_tail++;
			} else {
				kvt_convert(got, odt, a, KVT_DTYPE_F32, row);
				kvt_convert(want, odt, b, KVT_DTYPE_F32, row);
				for (size_t h = 0; h < row; h += d) {
					float rowmax = 0.0f;
					for (uint32_t c = 0; c < d; c++)
						rowmax = fmaxf(rowmax, fabsf(b[h + c]));
					for (uint32_t c = 0; c < d; c++) {
						float x = a[h + c], y = b[h + c];
						g_total++;
						if (memcmp(&x, &y, 4) == 0)
							g_exact++;
						else if (!(fabsf(x - y) <= tol_for(odt, y, rowmax)))
							bad++;
					}
				}
			}
			memset(got, POISON, row * os);
		}
	free(a);
	free(b);
	KVT_CHECK(bad == 0 && bad_tail == 0,
		  "%s %s: %zu decoded values beyond one %s step, %zu tail rows not exact", desc,
		  what, bad, kvt_dtype_name(odt), bad_tail);
	return bad + bad_tail;
}

static size_t count_not_poison(const uint8_t *p, size_t n)
{
	size_t bad = 0;
	for (size_t i = 0; i < n; i++)
		bad += p[i] != POISON;
	return bad;
}

/* One restore of a random range and layout of s into fresh buffers, checked. */
static void restore_case(struct sess *s, int case_no)
{
	const struct kvt_codec_config *cfg = &s->cfg;
	uint32_t L = cfg->n_layers;
	uint32_t odt = it_rand_below(2) ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
	KVT_REQUIRE(build_ref(s, odt) == 0, "reference");
	size_t row_b = (size_t)cfg->n_kv_heads * cfg->head_dim * 2;
	uint64_t tb = it_rand_below((uint32_t)s->n), te = tb + 1 + it_rand_below((uint32_t)(s->n - tb));
	if (it_rand_below(4) == 0) {
		tb = 0;
		te = s->n;
	}
	uint32_t lb = it_rand_below(L), le = lb + 1 + it_rand_below(L - lb);
	struct layout ly = {0};
	ly.paged = (int)it_rand_below(2);
	if (ly.paged) {
		static const uint32_t sizes[] = {1, 3, 16, 16, 32, 64, 128, 256};
		ly.bs = sizes[it_rand_below(8)];
		ly.n_table = (te + ly.bs - 1) / ly.bs + it_rand_below(3);
		uint64_t pool = ly.n_table + it_rand_below(8);
		uint32_t *perm = it_xmalloc(pool * sizeof *perm);
		for (uint64_t i = 0; i < pool; i++)
			perm[i] = (uint32_t)i;
		for (uint64_t i = pool - 1; i > 0; i--) {
			uint64_t j = it_rand_below((uint32_t)(i + 1));
			uint32_t x = perm[i];
			perm[i] = perm[j];
			perm[j] = x;
		}
		/* sometimes physically consecutive blocks (merged runs) */
		if (it_rand_below(3) == 0)
			for (uint64_t i = 0; i < pool; i++)
				perm[i] = (uint32_t)i;
		ly.table = perm;
		ly.span = pool * ly.bs * row_b;
	} else {
		ly.span = (te - tb) * row_b;
	}
	ly.stride = ly.span + (it_rand_below(2) ? 0 : 16 * (1 + it_rand_below(64)));
	uint64_t region = (uint64_t)(le - lb - 1) * ly.stride + ly.span;
	int shared = (int)it_rand_below(2);
	uint64_t k_off = 256 * it_rand_below(8) + 16 * it_rand_below(16);
	uint64_t v_off = shared ? ((k_off + region + 255) & ~255ull) + 16 * it_rand_below(4)
				: 16 * it_rand_below(8);
	uint64_t k_alloc = shared ? v_off + region + 256 : k_off + region + 256;
	uint64_t v_alloc = shared ? 0 : v_off + region + 256;
	char desc[256];
	snprintf(desc, sizeof desc,
		 "case %d (%s k%u v%u G%u B%u L%u H%u d%u %s n %llu%s -> %s %s bs %u t [%llu,%llu) "
		 "l [%u,%u) %s)",
		 case_no, kvt_scheme_name(cfg->scheme), cfg->key_bits, cfg->value_bits, cfg->group,
		 cfg->chunk_tokens, L, cfg->n_kv_heads, cfg->head_dim, kvt_dtype_name(cfg->dtype),
		 (unsigned long long)s->n, s->info.tier[0] ? s->info.tier : "?",
		 kvt_dtype_name(odt), ly.paged ? "paged" : "contiguous", ly.bs,
		 (unsigned long long)tb, (unsigned long long)te, lb, le,
		 shared ? "one allocation" : "two allocations");
	char err[256];
	void *kbuf = NULL, *vbuf = NULL;
	int rc = kvt_cuda_alloc(g_ctx, k_alloc, &kbuf, err, sizeof err);
	if (rc == 0 && !shared)
		rc = kvt_cuda_alloc(g_ctx, v_alloc, &vbuf, err, sizeof err);
	KVT_REQUIRE(rc == 0, "alloc: %s", err);
	kvt_cuda_memset_async(g_ctx, kbuf, POISON, k_alloc, err, sizeof err);
	if (vbuf)
		kvt_cuda_memset_async(g_ctx, vbuf, POISON, v_alloc, err, sizeof err);
	KVT_REQUIRE(kvt_cuda_sync(g_ctx, err, sizeof err) == 0, "poison: %s", err);
	uint8_t *kd = (uint8_t *)kbuf + k_off, *vd = (uint8_t *)(shared ? kbuf : vbuf) + v_off;

	struct kvt_client_restore r;
	memset(&r, 0, sizeof r);
	r.session_id = s->id;
	r.layout = ly.paged ? 2 : 1;
	r.block_size = ly.bs;
	r.block_table = ly.table;
	r.n_block_table = ly.n_table;
	r.token_begin = tb;
	r.token_end = te;
	r.layer_begin = lb;
	r.layer_end = le;
	r.dtype = odt;
	r.device_ordinal = it_rand_below(2) ? 0 : -1;
	r.layer_stride_bytes = ly.stride;
	struct kvt_client_restore_result res;
	struct kvt_client_status st;
	rc = kvt_client_restore_to_device_ptr(g_c, &r, kd, vd, &res, &st);
	KVT_CHECK(rc == 0, "%s: restore: %s %s", desc, kvt_client_code_name(st.code), st.message);
	if (rc == 0) {
		KVT_CHECK(res.n_tokens == te - tb, "%s: n_tokens %llu", desc,
			  (unsigned long long)res.n_tokens);
		KVT_CHECK(res.bytes_written == 2 * (te - tb) * (le - lb) * row_b,
			  "%s: bytes_written %llu", desc, (unsigned long long)res.bytes_written);
		uint8_t *ik = it_xmalloc(k_alloc), *iv = shared ? NULL : it_xmalloc(v_alloc);
		KVT_REQUIRE(kvt_cuda_download(g_ctx, ik, kbuf, k_alloc, err, sizeof err) == 0 &&
				    (shared || kvt_cuda_download(g_ctx, iv, vbuf, v_alloc, err,
								 sizeof err) == 0),
			    "download: %s", err);
		check_rows(s, ik + k_off, s->ref_k, &ly, tb, te, lb, le, "K", desc);
		check_rows(s, (shared ? ik : iv) + v_off, s->ref_v, &ly, tb, te, lb, le, "V", desc);
		size_t stray = count_not_poison(ik, k_alloc) + (iv ? count_not_poison(iv, v_alloc) : 0);
		KVT_CHECK(stray == 0, "%s: %zu bytes written outside the restored rows", desc, stray);
		free(ik);
		free(iv);
	}
	kvt_cuda_free(g_ctx, kbuf);
	kvt_cuda_free(g_ctx, vbuf);
	free(ly.table);
}

static void test_restore_random(void)
{
	int n_cases = getenv("KVT_GPU_RESTORE_CASES") ? atoi(getenv("KVT_GPU_RESTORE_CASES")) : 24;
	for (int i = 0; i < n_cases; i++) {
		static const uint32_t groups[] = {32, 64, 128}, dims[] = {64, 128, 256, 128},
				      heads[] = {1, 2, 4, 8}, wdt[] = {KVT_DTYPE_F16, KVT_DTYPE_BF16,
								       KVT_DTYPE_F32, KVT_DTYPE_BF16};
		struct kvt_client_session_params p;
		char id[64];
		snprintf(id, sizeof id, "restore-%d", i);
		uint32_t L = 1 + it_rand_below(4), H = heads[it_rand_below(4)],
			 d = dims[it_rand_below(4)];
		kvt_client_session_params_init(&p, id, L, H, d, wdt[it_rand_below(4)]);
		p.codec.scheme = wire_scheme[it_rand_below(4)];
		static const uint32_t bits[] = {2, 3, 4};
		p.codec.key_bits = bits[it_rand_below(3)];
		p.codec.value_bits = bits[it_rand_below(3)];
		p.codec.group = groups[it_rand_below(3)];
		p.codec.chunk_tokens = p.codec.group * (1u << it_rand_below(3));
		if (p.codec.chunk_tokens < 32)
			p.codec.chunk_tokens = 32;
		p.codec.n_sinks = (int32_t)it_rand_below(2) * 4;
		p.tier = it_rand_below(2) ? "gpu" : "host";
		uint64_t n = 1 + it_rand_below(5 * p.codec.chunk_tokens);
		struct sess s;
		if (open_fill(g_c, &s, id, &p, n)) {
			KVT_CHECK(0, "case %d: session setup", i);
			sess_free(&s);
			continue;
		}
		struct kvt_client_status st;
		kvt_client_stat(g_c, id, &s.info, &st);
		KVT_CHECK(strcmp(s.info.tier, p.tier) == 0, "case %d: tier \"%s\" (asked %s)", i,
			  s.info.tier, p.tier);
		restore_case(&s, i);
		restore_case(&s, i); /* again: the mappings come from the daemon's cache */
		sess_free(&s);
		kvt_client_drop(g_c, id, NULL, &st);
	}
	printf("# decoded values bit-identical to the CPU decode: %zu of %zu (%.6f)\n", g_exact,
	       g_total, g_total ? (double)g_exact / g_total : 0.0);
}

/* Bad handles and lies about the buffer, with a GPU. */
static void test_restore_errors(void)
{
	struct kvt_client_session_params p;
	struct kvt_client_status st;
	struct sess s;
	kvt_client_session_params_init(&p, "restore-err", 2, 2, 64, KVT_DTYPE_F16);
	KVT_REQUIRE(open_fill(g_c, &s, "restore-err", &p, 300) == 0, "setup");
	void *buf = NULL;
	char err[256];
	size_t need = 2 * 2 * 300 * 2 * 64 * 2;
	KVT_REQUIRE(kvt_cuda_alloc(g_ctx, need, &buf, err, sizeof err) == 0, "alloc");
	uint8_t h[64];
	uint64_t off, bytes;
	KVT_REQUIRE(kvt_cuda_ipc_export(buf, h, &off, &bytes, err, sizeof err) == 0, "export: %s",
		    err);
	struct kvt_client_restore r;
	memset(&r, 0, sizeof r);
	r.session_id = s.id;
	r.ipc_mem_handle = h;
	r.ipc_mem_handle_bytes = 64;
	r.layout = 1;
	r.token_end = KVT_CLIENT_END;
	r.layer_end = KVT_CLIENT_ALL_LAYERS;
	r.dtype = KVT_DTYPE_F16;
	r.device_ordinal = -1;
	r.k_offset_bytes = off;
	r.v_offset_bytes = off + need / 2;
	r.buffer_bytes = bytes;
	KVT_CHECK(kvt_client_restore_to_device(g_c, &r, NULL, &st) == 0, "raw handle restore: %s",
		  st.message);
	r.v_offset_bytes = bytes;
	r.buffer_bytes = 1ull << 40; /* a lie: the daemon checks the true size */
	KVT_CHECK(kvt_client_restore_to_device(g_c, &r, NULL, &st) != 0 &&
			  st.code == KVT_CODE_INVALID_ARGUMENT && strstr(st.message, "V allocation"),
		  "beyond the true allocation: %s %s", kvt_client_code_name(st.code), st.message);
	r.v_offset_bytes = off + need / 2;
	r.device_ordinal = 7;
	KVT_CHECK(kvt_client_restore_to_device(g_c, &r, NULL, &st) != 0 &&
			  st.code == KVT_CODE_INVALID_ARGUMENT && strstr(st.message, "device_ordinal 7"),
		  "wrong device: %s %s", kvt_client_code_name(st.code), st.message);
	r.device_ordinal = -1;
	uint8_t junk[64];
	for (int i = 0; i < 64; i++)
		junk[i] = (uint8_t)it_rand_u64();
	r.ipc_mem_handle = junk;
	KVT_CHECK(kvt_client_restore_to_device(g_c, &r, NULL, &st) != 0 &&
			  st.code == KVT_CODE_INVALID_ARGUMENT && strstr(st.message, "ipc_mem_handle"),
		  "junk handle: %s %s", kvt_client_code_name(st.code), st.message);
	KVT_CHECK(kvt_client_health(g_c, "", 0, &(int){0}, &st) == 0, "still serving");
	kvt_cuda_free(g_ctx, buf);
	kvt_client_drop(g_c, s.id, NULL, &st);
	sess_free(&s);
}

static double rel_err(const float *a, const float *b, size_t n)
{
	double num = 0, den = 0;
	for (size_t i = 0; i < n; i++) {
		num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
		den += (double)b[i] * b[i];
	}
	return sqrt(num / (den > 0 ? den : 1e-300));
}

/* Attend on s (every layer) against kvt_attend over its fetched chunks + tail. */
static void attend_vs_cpu(struct kvt_client *c, struct sess *s, const char *what,
			  double *worst)
{
	const struct kvt_codec_config *cfg = &s->cfg;
	uint32_t L = cfg->n_layers, H = cfg->n_kv_heads, d = cfg->head_dim, nq = 4 * H;
	size_t qn = (size_t)nq * d;
	struct kvt_client_attend_item *items = calloc(L, sizeof *items);
	float *q = it_xmalloc(L * qn * 4), *out = it_xmalloc(L * qn * 4), *ref = it_xmalloc(qn * 4);
	for (size_t i = 0; i < L * qn; i++)
		q[i] = it_rand_normal();
	for (uint32_t l = 0; l < L; l++) {
		items[l].session_id = s->id;
		items[l].layer = l;
		items[l].n_q_heads = nq;
		items[l].q = q + l * qn;
		items[l].q_bytes = qn * 4;
		items[l].out = out + l * qn;
		items[l].out_cap = qn * 4;
	}
	struct kvt_client_status st;
	int rc = kvt_client_attend(c, items, L, 0, &st);
	KVT_CHECK(rc == 0, "%s: attend: %s", what, st.message);
	const void **chunks = calloc(s->enc->n_chunks + 1, sizeof *chunks);
	for (size_t i = 0; i < s->enc->n_chunks; i++)
		chunks[i] = s->enc->chunks[i].bytes;
	size_t tl = (size_t)s->enc->tail_tokens * H * d * kvt_dtype_size(cfg->dtype);
	for (uint32_t l = 0; l < L && rc == 0; l++) {
		struct kvt_attend_request ar = {
			.cfg = cfg, .layer = l, .n_q_heads = nq, .softmax_scale = 1.0f / sqrtf((float)d),
			.q = q + l * qn, .chunks = chunks, .n_chunks = (uint32_t)s->enc->n_chunks,
			.tail_k = s->enc->tail_k ? (uint8_t *)s->enc->tail_k + l * tl : NULL,
			.tail_v = s->enc->tail_v ? (uint8_t *)s->enc->tail_v + l * tl : NULL,
			.n_tail = s->enc->tail_tokens, .out = ref};
		char err[256];
		KVT_REQUIRE(kvt_attend(&ar, 1, err, sizeof err) == 0, "cpu attend: %s", err);
		double e = rel_err(out + l * qn, ref, qn);
		if (e > *worst)
			*worst = e;
		KVT_CHECK(e <= 1e-3, "%s layer %u: relative error %.3g vs the CPU (bound 1e-3)", what,
			  l, e);
	}
	free(chunks);
	free(items);
	free(q);
	free(out);
	free(ref);
}

static void test_resident_attend(void)
{
	double worst = 0;
	for (int i = 0; i < 6; i++) {
		struct kvt_client_session_params p;
		char id[64];
		snprintf(id, sizeof id, "resident-%d", i);
		static const uint32_t wdt[] = {KVT_DTYPE_BF16, KVT_DTYPE_F16};
		kvt_client_session_params_init(&p, id, 2, i % 3 == 0 ? 8 : 2, i % 2 ? 64 : 128,
					       wdt[i % 2]);
		p.codec.scheme = wire_scheme[it_rand_below(4)];
		/* 2/2, 3/2 (the default codec's split), 3/3, 4/4, 3/2, 2/3 */
		static const uint32_t kbits[] = {2, 3, 3, 4, 3, 2}, vbits[] = {2, 2, 3, 4, 2, 3};
		p.codec.key_bits = kbits[i];
		p.codec.value_bits = vbits[i];
		p.codec.group = 32;
		p.codec.chunk_tokens = 128;
		p.tier = "gpu";
		struct sess s;
		uint64_t before = it_counter(g_c, "gpu.attends");
		KVT_REQUIRE(open_fill(g_c, &s, id, &p, 128 * (2 + it_rand_below(6)) + it_rand_below(128)) == 0,
			    "setup");
		struct kvt_client_status st;
		KVT_CHECK(kvt_client_stat(g_c, id, &s.info, &st) == 0 && !strcmp(s.info.tier, "gpu"),
			  "%s tier \"%s\"", id, s.info.tier);
		attend_vs_cpu(g_c, &s, id, &worst);
		uint64_t after = it_counter(g_c, "gpu.attends");
		KVT_CHECK(after - before == s.cfg.n_layers, "%s: %llu GPU attends (want %u)", id,
			  (unsigned long long)(after - before), s.cfg.n_layers);
		kvt_client_drop(g_c, id, NULL, &st);
		sess_free(&s);
	}
	printf("# GPU-resident Attend vs CPU kvt_attend: worst relative error %.3g\n", worst);
}

/* A small arena: chunks that do not fit stay on the host. */
static void test_arena_full(void)
{
	struct kvt_daemon d2;
	struct kvt_client *c2;
	static const char *const args[] = {"--gpu_arena_bytes=4MiB", "--gpu_staging_bytes=8MiB",
					   NULL};
	KVT_REQUIRE(kvt_daemon_start(&d2, args) == 0, "second daemon");
	KVT_REQUIRE(kvt_daemon_client(&d2, 0, &c2) == 0, "connect");
	struct kvt_client_session_params p;
	kvt_client_session_params_init(&p, "big", 2, 8, 128, KVT_DTYPE_BF16);
	p.tier = "gpu";
	struct sess s;
	KVT_REQUIRE(open_fill(c2, &s, "big", &p, 128 * 40 + 77) == 0, "setup");
	struct kvt_client_status st;
	KVT_CHECK(kvt_client_stat(c2, "big", &s.info, &st) == 0 && !strcmp(s.info.tier, "gpu+host"),
		  "tier \"%s\" with a full arena", s.info.tier);
	struct kvt_client_stats stats;
	KVT_REQUIRE(kvt_client_stats(c2, &stats, &st) == 0, "stats");
	KVT_CHECK(stats.gpu && stats.n_tiers == 2 && !strcmp(stats.tiers[1].name, "gpu") &&
			  stats.tiers[1].used_bytes > 0 &&
			  stats.tiers[1].used_bytes <= stats.tiers[1].capacity_bytes &&
			  stats.tiers[1].chunks > 0 && stats.tiers[1].chunks < s.info.n_chunks,
		  "gpu tier stats: %llu of %llu bytes, %llu of the session's %u chunks",
		  (unsigned long long)stats.tiers[1].used_bytes,
		  (unsigned long long)stats.tiers[1].capacity_bytes,
		  (unsigned long long)stats.tiers[1].chunks, s.info.n_chunks);
	kvt_client_stats_free(&stats);
	double worst = 0;
	uint64_t fb = it_counter(c2, "gpu.attend_host_fallbacks");
	attend_vs_cpu(c2, &s, "gpu+host attend", &worst);
	KVT_CHECK(it_counter(c2, "gpu.attend_host_fallbacks") > fb, "Attend fell back to the CPU");
	/* restore from a mix of arena and host chunks */
	struct kvt_client *saved = g_c;
	g_c = c2;
	restore_case(&s, 1000);
	g_c = saved;
	KVT_CHECK(kvt_client_drop(c2, "big", NULL, &st) == 0, "drop");
	KVT_REQUIRE(kvt_client_stats(c2, &stats, &st) == 0, "stats");
	KVT_CHECK(stats.n_tiers == 2 && stats.tiers[1].used_bytes == 0 && stats.tiers[1].chunks == 0,
		  "arena empty after the drop: %llu bytes", (unsigned long long)stats.tiers[1].used_bytes);
	kvt_client_stats_free(&stats);
	sess_free(&s);
	kvt_client_close(c2);
	KVT_CHECK(kvt_daemon_stop(&d2) == 0, "second daemon exit 0");
}


/* ---- A worker killed while it restores -------------------------------------------------- */

/* The child worker: this binary run again as `--restore-worker TARGET SESSION MIB` (a CUDA
 * context does not survive fork). It allocates MIB MiB of device memory, restores the whole
 * session into it (K, then V after it) over and over, and prints each finished restore's
 * number on stdout; it runs until it is killed. Exits 2 on a setup error, 3 on a failed
 * restore (both on stderr). */
static int restore_worker(const char *target, const char *sid, unsigned mib)
{
	char err[256];
	struct kvt_cuda_ctx *ctx;
	if (kvt_cuda_ctx_create(0, &ctx, err, sizeof err)) {
		fprintf(stderr, "worker: CUDA context: %s\n", err);
		return 2;
	}
	const struct kvt_client_options o = {
		.target = target, .connect_timeout_ms = 5000, .own_connection = 1};
	struct kvt_client *c;
	struct kvt_client_status st;
	struct kvt_client_session_info info;
	if (kvt_client_connect(&o, &c, &st) || kvt_client_stat(c, sid, &info, &st)) {
		fprintf(stderr, "worker: %s\n", st.message);
		return 2;
	}
	const struct kvt_client_shape shape = it_shape(&info);
	size_t region = kvt_client_kv_bytes(&shape, info.n_tokens); /* one of K, V */
	size_t v_off = (region + 255) & ~(size_t)255, bytes = (size_t)mib << 20;
	void *buf;
	if (bytes < v_off + region || kvt_cuda_alloc(ctx, bytes, &buf, err, sizeof err)) {
		fprintf(stderr, "worker: %zu bytes for a %zu-byte restore: %s\n", bytes,
			2 * region, err);
		return 2;
	}
	/* the whole session, contiguous, in its own dtype */
	const struct kvt_client_restore r = {.session_id = sid,
					     .layout = 1,
					     .token_end = KVT_CLIENT_END,
					     .layer_end = KVT_CLIENT_ALL_LAYERS,
					     .device_ordinal = -1};
	for (unsigned long long n = 1;; n++) {
		struct kvt_client_restore_result res;
		if (kvt_client_restore_to_device_ptr(c, &r, buf, (uint8_t *)buf + v_off, &res, &st)) {
			fprintf(stderr, "worker: restore %llu: %s %s\n", n,
				kvt_client_code_name(st.code), st.message);
			return 3;
		}
		printf("%llu\n", n);
		fflush(stdout);
	}
}

static uint64_t device_free(void)
{
	uint64_t f = 0, t = 0;
	char err[256];
	KVT_CHECK(kvt_cuda_mem_info(g_ctx, &f, &t, err, sizeof err) == 0, "mem_info: %s", err);
	return f;
}

/* The worker's stdout, a restore count per line: the last complete line's number. */
struct count_reader {
	char line[64];
	size_t len;
	unsigned long long last;
};

static void count_feed(struct count_reader *r, const char *b, ssize_t n)
{
	for (ssize_t i = 0; i < n; i++) {
		if (b[i] != '\n') {
			if (r->len + 1 < sizeof r->line)
				r->line[r->len++] = b[i];
			continue;
		}
		r->line[r->len] = 0;
		r->len = 0;
		r->last = strtoull(r->line, NULL, 10);
	}
}

/* Starts a restore worker on session sid, waits until it has finished min_restores restores,
 * lets it run for another delay_us (so that the kill lands at a random point of a restore,
 * most likely inside one: the worker spends its time in them) and SIGKILLs it. 0 when it died
 * by that signal, with its restore count in *restores. */
static int kill_worker_mid_restore(const struct kvt_daemon *d, const char *sid, unsigned mib,
				   unsigned min_restores, unsigned delay_us,
				   unsigned long long *restores)
{
	int fds[2];
	if (pipe(fds) != 0) {
		KVT_CHECK(0, "pipe: %s", strerror(errno));
		return -1;
	}
	char mibs[16];
	snprintf(mibs, sizeof mibs, "%u", mib);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		KVT_CHECK(0, "fork: %s", strerror(errno));
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		dup2(fds[1], 1);
		close(fds[0]);
		close(fds[1]);
		execl("/proc/self/exe", "test_gpu_restore", "--restore-worker", d->target, sid, mibs,
		      (char *)NULL);
		_exit(127);
	}
	close(fds[1]);
	struct count_reader cr = {.len = 0, .last = 0};
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	int done = 0;
	while (!done) {
		struct pollfd pf = {.fd = fds[0], .events = POLLIN};
		int pr = poll(&pf, 1, 1000);
		struct timespec t1;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (t1.tv_sec - t0.tv_sec > 60)
			break;
		if (pr <= 0)
			continue;
		char b[256];
		ssize_t n = read(fds[0], b, sizeof b);
		if (n <= 0)
			break; /* the worker ended by itself */
		count_feed(&cr, b, n);
		done = cr.last >= min_restores;
	}
	if (done)
		usleep(delay_us);
	kill(pid, SIGKILL);
	int ws = 0;
	waitpid(pid, &ws, 0);
	/* what it printed after min_restores: the count at the kill */
	for (;;) {
		char b[256];
		ssize_t n = read(fds[0], b, sizeof b);
		if (n <= 0)
			break;
		count_feed(&cr, b, n);
	}
	close(fds[0]);
	*restores = cr.last;
	KVT_CHECK(done, "worker on %s: %llu restores before it %s (exit status %d)", sid, cr.last,
		  WIFEXITED(ws) ? "exited" : "was killed", WIFEXITED(ws) ? WEXITSTATUS(ws) : -1);
	return done && WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL ? 0 : -1;
}

static void test_killed_worker(void)
{
	struct kvt_daemon d3;
	struct kvt_client *c3;
	/* the default idle time (60 s) is far longer than this test: a dead worker's mappings
	 * must go because the worker is gone (its pid, sent with each restore) */
	static const char *const args[] = {"--gpu_arena_bytes=256MiB", "--gpu_staging_bytes=32MiB",
					   NULL};
	KVT_REQUIRE(kvt_daemon_start(&d3, args) == 0, "daemon");
	KVT_REQUIRE(kvt_daemon_client(&d3, 0, &c3) == 0, "connect");
	/* one session per tier: host chunks go H2D then decode, arena chunks decode in place */
	static const char *const tiers[2] = {"host", "gpu"};
	struct sess s[2];
	for (int i = 0; i < 2; i++) {
		struct kvt_client_session_params p;
		char id[16];
		snprintf(id, sizeof id, "kw-%s", tiers[i]);
		kvt_client_session_params_init(&p, id, 4, 8, 128, KVT_DTYPE_BF16);
		p.tier = tiers[i];
		KVT_REQUIRE(open_fill(c3, &s[i], id, &p, 128 * 48 + 77) == 0, "session %s", id);
	}
	const unsigned mib = 1024; /* the worker's allocation, large enough to see it come back */
	uint64_t free0 = device_free();
	struct kvt_client *saved = g_c;
	g_c = c3;
	for (int round = 0; round < 4; round++) {
		struct sess *ss = &s[round % 2];
		unsigned long long n = 0;
		unsigned delay = 200 + it_rand_below(3000);
		int rc = kill_worker_mid_restore(&d3, ss->id, mib, 2, delay, &n);
		uint64_t held = device_free();
		printf("# round %d: worker on %s killed %u us after restore 2, after %llu restores; "
		       "device free %.0f MiB below the start while the daemon's mapping holds its "
		       "memory\n",
		       round, ss->id, delay, n, ((double)free0 - (double)held) / 1048576.0);
		KVT_CHECK(rc == 0, "round %d: the worker did not die by SIGKILL mid-run", round);
		int serving = 0;
		struct kvt_client_status st;
		KVT_CHECK(kvt_client_health(c3, "", 5000, &serving, &st) == 0 && serving == 1,
			  "round %d: daemon serves after the kill: %s", round, st.message);
		/* the same session, restored into this process's memory, element by element */
		restore_case(ss, 3000 + round);
	}
	g_c = saved;
	/* the killed workers' memory given back to the device within seconds, not after the
	 * 60 s idle time (the test's own mappings stay cached: its process lives). A dead
	 * worker's mapping is closed within a maintenance tick (1 s) of its death, or earlier
	 * when the next worker's allocation reuses its address range (a stale remap closes every
	 * cached mapping); the last worker's can only go the first way. */
	uint64_t dead = 0, freed = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int t = 0; t < 100; t++) {
		dead = it_counter(c3, "gpu.ipc_dead_worker_closes");
		freed = device_free();
		if (dead >= 1 && freed + (256ull << 20) >= free0)
			break;
		usleep(100 * 1000);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	const double waited =
		(double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
	KVT_CHECK(dead >= 1, "mappings closed as their workers died: %llu (the last worker's, at least)",
		  (unsigned long long)dead);
	KVT_CHECK(freed + (256ull << 20) >= free0,
		  "device memory back: %.0f MiB free vs %.0f MiB before the workers",
		  (double)freed / 1048576.0, (double)free0 / 1048576.0);
	printf("# killed workers: %llu mappings closed as their workers died, %llu stale remaps "
	       "(%llu opened in all); device free %.0f MiB vs %.0f before, %.1f s after the last "
	       "kill\n",
	       (unsigned long long)dead, (unsigned long long)it_counter(c3, "gpu.ipc_stale_remaps"),
	       (unsigned long long)it_counter(c3, "gpu.ipc_opens"),
	       (double)freed / 1048576.0, (double)free0 / 1048576.0, waited);
	for (int i = 0; i < 2; i++)
		sess_free(&s[i]);
	kvt_client_close(c3);
	KVT_CHECK(kvt_daemon_stop(&d3) == 0, "daemon exit 0 after the killed workers");
}

int main(int argc, char **argv)
{
	char err[256];
	if (argc == 5 && !strcmp(argv[1], "--restore-worker"))
		return restore_worker(argv[2], argv[3], (unsigned)atoi(argv[4]));
	kvt_test_init();
	it_seed(0);
	if (kvt_cuda_device_count() == 0) {
		printf("# no CUDA device: skipped\n");
		return 77;
	}
	if (kvt_cuda_ctx_create(0, &g_ctx, err, sizeof err)) {
		printf("# CUDA context: %s: skipped\n", err);
		return 77;
	}
	static const char *const args[] = {"--gpu_arena_bytes=256MiB", "--gpu_staging_bytes=32MiB",
					   "--gpu_restore_threads=4", NULL};
	if (kvt_daemon_start_client(&g_d, args, &g_c) != 0)
		return 1;
	KVT_RUN(test_restore_random);
	KVT_RUN(test_restore_errors);
	KVT_RUN(test_resident_attend);
	kvt_client_close(g_c);
	KVT_CHECK(kvt_daemon_stop(&g_d) == 0, "daemon exit 0 after SIGTERM");
	KVT_RUN(test_arena_full);
	KVT_RUN(test_killed_worker);
	kvt_cuda_ctx_destroy(g_ctx);
	return kvt_test_done();
}

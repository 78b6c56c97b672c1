/*
 * RestoreToDevice and the GPU tier on a daemon without a GPU (runs everywhere, CI included):
 * kvtierd is started with --gpu_enable=no, so the answer is the same on machines with a
 * device. Every malformed field is refused with INVALID_ARGUMENT naming it (checked before
 * the GPU is consulted), a well-formed request gets FAILED_PRECONDITION with the reason, the
 * session is unchanged and the daemon keeps serving. OpenSession with tier "gpu" falls back
 * to the host and says so; an unknown tier is INVALID_ARGUMENT; Stats reports no GPU.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "kvt_it.h"

static struct kvt_daemon g_d;
static struct kvt_client *g_c;

#define SID "restore-nogpu"
#define L 3
#define H 2
#define D 64
#define NTOK 300

static struct kvt_client_restore base_req(uint8_t *handle)
{
	struct kvt_client_restore r;
	memset(&r, 0, sizeof r);
	r.session_id = SID;
	r.ipc_mem_handle = handle;
	r.ipc_mem_handle_bytes = 64;
	r.buffer_bytes = 64 << 20;
	r.layout = 1;
	r.token_end = KVT_CLIENT_END;
	r.layer_end = KVT_CLIENT_ALL_LAYERS;
	r.dtype = KVT_DTYPE_BF16;
	r.device_ordinal = -1;
	return r;
}

/* Sends r; expects code and a message containing `needle`. */
static void expect(const struct kvt_client_restore *r, int code, const char *needle,
		   const char *what)
{
	struct kvt_client_status st;
	memset(&st, 0, sizeof st);
	int rc = kvt_client_restore_to_device(g_c, r, NULL, &st);
	KVT_CHECK(rc != 0 && !st.local && st.code == code && strstr(st.message, needle),
		  "%s: want %s with \"%s\", got rc %d %s \"%s\"", what, kvt_client_code_name(code),
		  needle, rc, kvt_client_code_name(st.code), st.message);
}

static void test_restore_refused(void)
{
	struct kvt_client_session_params p;
	struct kvt_client_session_info info;
	struct kvt_client_status st;
	struct kvt_client_shape shape = {L, H, D, KVT_DTYPE_F16};
	kvt_client_session_params_init(&p, SID, L, H, D, KVT_DTYPE_F16);
	KVT_REQUIRE(kvt_client_open(g_c, &p, &info, &st) == 0, "open: %s", st.message);
	size_t b = kvt_client_kv_bytes(&shape, NTOK);
	void *k = it_xmalloc(b), *v = it_xmalloc(b);
	it_gen_kv(L, H, D, KVT_DTYPE_F16, 0, NTOK, k, v);
	KVT_REQUIRE(kvt_client_append(g_c, SID, &shape, k, v, NTOK, NULL, NULL, &st) == 0,
		    "append: %s", st.message);

	uint8_t handle[72]; /* a 64-byte handle, and room for the 65-byte one the checks send */
	for (size_t i = 0; i < sizeof handle; i++)
		handle[i] = (uint8_t)it_rand_u64();
	struct kvt_client_restore r;
	const int IA = KVT_CODE_INVALID_ARGUMENT;

	r = base_req(handle);
	r.session_id = "no-such-session";
	expect(&r, KVT_CODE_NOT_FOUND, "not found", "unknown session");
	r = base_req(handle);
	r.ipc_mem_handle_bytes = 63;
	expect(&r, IA, "ipc_mem_handle is 63 bytes", "short handle");
	r = base_req(handle);
	r.ipc_mem_handle = NULL;
	expect(&r, IA, "ipc_mem_handle is absent", "no handle");
	r = base_req(handle);
	r.ipc_mem_handle_v = handle;
	r.ipc_mem_handle_v_bytes = 65;
	expect(&r, IA, "ipc_mem_handle_v is 65 bytes", "long V handle");
	r = base_req(handle);
	r.dtype = KVT_DTYPE_F32;
	expect(&r, IA, "is not DTYPE_F16", "f32 out");
	r = base_req(handle);
	r.layout = 0;
	expect(&r, IA, "layout 0", "no layout");
	r = base_req(handle);
	r.layout = 7;
	expect(&r, IA, "layout 7", "unknown layout");
	r = base_req(handle);
	r.token_begin = 10;
	r.token_end = NTOK + 1;
	expect(&r, IA, "token range [10, 301)", "past the end");
	r = base_req(handle);
	r.token_begin = 20;
	r.token_end = 10;
	expect(&r, IA, "token range [20, 10)", "reversed");
	r = base_req(handle);
	r.layer_begin = 2;
	r.layer_end = 2;
	expect(&r, IA, "layer range [2, 2)", "empty layers");
	r = base_req(handle);
	r.layer_end = L + 1;
	expect(&r, IA, "layer range [0, 4)", "too many layers");
	r = base_req(handle);
	r.k_offset_bytes = 8;
	expect(&r, IA, "multiples of 16", "misaligned offset");
	r = base_req(handle);
	r.buffer_bytes = 0;
	expect(&r, IA, "buffer_bytes", "no buffer_bytes");
	/* K = 3 layers x 300 tokens x 2 x 64 x 2 bytes = 230400 */
	r = base_req(handle);
	r.buffer_bytes = 230400 + 1024;
	r.v_offset_bytes = 2048;
	expect(&r, IA, "beyond buffer_bytes 231424", "V out of bounds");
	r = base_req(handle);
	r.layer_stride_bytes = 1000;
	expect(&r, IA, "layer_stride_bytes 1000", "stride below one layer");
	uint32_t table[40];
	for (int i = 0; i < 40; i++)
		table[i] = (uint32_t)(39 - i);
	r = base_req(handle);
	r.block_table = table;
	r.n_block_table = 40;
	expect(&r, IA, "DEVICE_LAYOUT_PAGED only", "block table with contiguous");
	r = base_req(handle);
	r.layout = 2;
	r.block_table = table;
	r.n_block_table = 40;
	expect(&r, IA, "block_size 0", "paged without block_size");
	r = base_req(handle);
	r.layout = 2;
	r.block_size = 16;
	r.block_table = table;
	r.n_block_table = 18;
	r.layer_stride_bytes = 1 << 20;
	expect(&r, IA, "block_table has 18 entries", "short block table");
	r = base_req(handle);
	r.layout = 2;
	r.block_size = 16;
	r.block_table = table;
	r.n_block_table = 40;
	expect(&r, IA, "layer_stride_bytes is required", "paged multi-layer without stride");
	table[5] = table[3];
	r.layer_stride_bytes = 1 << 20;
	expect(&r, IA, "block_table[3] and block_table[5] are both block 36", "duplicate block");
	table[5] = 34;
	r.buffer_bytes = 1 << 20;
	expect(&r, IA, "beyond buffer_bytes", "paged pool out of bounds");

	/* well-formed: the GPU is what is missing */
	r = base_req(handle);
	/* the reason: gpu_enable = no here, or no CUDA at build time */
	expect(&r, KVT_CODE_FAILED_PRECONDITION,
#ifdef KVT_IT_HAVE_CUDA
	       "the GPU is disabled (gpu_enable = no)",
#else
	       "built without CUDA",
#endif
	       "contiguous, no GPU");
	r.layout = 2;
	r.block_size = 16;
	r.block_table = table;
	r.n_block_table = 40;
	r.layer_stride_bytes = 40 * 16 * H * D * 2;
	r.buffer_bytes = 3 * r.layer_stride_bytes + 4096;
	r.token_begin = 17;
	r.token_end = 250;
	r.layer_begin = 1;
	r.dtype = KVT_DTYPE_F16;
	expect(&r, KVT_CODE_FAILED_PRECONDITION, "RestoreToDevice needs a GPU", "paged, no GPU");

	/* the device-pointer helper: a host pointer is not exportable device memory */
	struct kvt_client_status st2;
	memset(&st2, 0, sizeof st2);
	r = base_req(handle);
	int rc = kvt_client_restore_to_device_ptr(g_c, &r, k, NULL, NULL, &st2);
	KVT_CHECK(rc != 0 && st2.local, "restore_to_device_ptr with a host pointer: rc %d %s %s",
		  rc, kvt_client_code_name(st2.code), st2.message);

	/* nothing changed, still serving */
	KVT_CHECK(kvt_client_stat(g_c, SID, &info, &st) == 0 && info.n_tokens == NTOK,
		  "session intact: %llu tokens", (unsigned long long)info.n_tokens);
	KVT_CHECK(strcmp(info.tier, "host") == 0, "tier \"%s\"", info.tier);
	free(k);
	free(v);
}

static void test_tier_fallback(void)
{
	struct kvt_client_session_params p;
	struct kvt_client_session_info info;
	struct kvt_client_status st;
	struct kvt_client_stats s;
	kvt_client_session_params_init(&p, "tier-gpu", 1, 1, 64, KVT_DTYPE_F16);
	p.tier = "gpu";
	KVT_CHECK(kvt_client_open(g_c, &p, &info, &st) == 0 && strcmp(info.tier, "host") == 0,
		  "tier gpu without a GPU tier lives on the host: %s \"%s\"", st.message, info.tier);
	kvt_client_session_params_init(&p, "tier-bad", 1, 1, 64, KVT_DTYPE_F16);
	p.tier = "nvme";
	int rc = kvt_client_open(g_c, &p, &info, &st);
	KVT_CHECK(rc != 0 && st.code == KVT_CODE_INVALID_ARGUMENT && strstr(st.message, "nvme"),
		  "unknown tier: %s %s", kvt_client_code_name(st.code), st.message);
	KVT_REQUIRE(kvt_client_stats(g_c, &s, &st) == 0, "stats: %s", st.message);
	KVT_CHECK(s.gpu == 0, "Stats.gpu false");
	KVT_CHECK(s.n_tiers == 1 && strcmp(s.tiers[0].name, "host") == 0, "only the host tier");
	KVT_CHECK(kvt_client_stats_counter(&s, "gpu.restores") == 0, "no restores counted");
	kvt_client_stats_free(&s);
}

int main(void)
{
	static const char *const args[] = {"--gpu_enable=no", "--gpu_arena_bytes=64MiB", NULL};
	kvt_test_init();
	it_seed(0);
	if (kvt_daemon_start_client(&g_d, args, &g_c) != 0)
		return 1;
	KVT_RUN(test_restore_refused);
	KVT_RUN(test_tier_fallback);
	kvt_client_close(g_c);
	KVT_CHECK(kvt_daemon_stop(&g_d) == 0, "daemon exit 0 after SIGTERM");
	return kvt_test_done();
}

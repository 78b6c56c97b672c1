/* Unit tests of the GPU tier's arena allocator (tiers/tier_gpu.h), which needs no device:
 * first fit, alignment, accounting, coalescing with both neighbours, exact reuse of the holes
 * a same-size workload leaves, -ENOSPC with the fragmentation visible in largest_free, and a
 * long random alloc/free run checked against a byte map (no two live blocks overlap, every
 * block inside the arena, the free list sorted and never adjacent). Also the RestoreToDevice
 * extent arithmetic. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_test.h"
#include "tier_gpu.h"

static void check_free_list(const struct kvt_arena *a)
{
	uint64_t sum = 0;
	for (size_t i = 0; i < a->n_free; i++) {
		KVT_CHECK(a->free[i].len > 0 && a->free[i].off % KVT_ARENA_ALIGN == 0,
			  "extent %zu nonempty and aligned", i);
		KVT_CHECK(a->free[i].off + a->free[i].len <= a->capacity, "extent %zu inside", i);
		if (i)
			KVT_CHECK(a->free[i - 1].off + a->free[i - 1].len < a->free[i].off,
				  "extents %zu, %zu sorted and not adjacent", i - 1, i);
		sum += a->free[i].len;
	}
	KVT_CHECK(sum + a->used == a->capacity, "free %llu + used %llu == capacity %llu",
		  (unsigned long long)sum, (unsigned long long)a->used,
		  (unsigned long long)a->capacity);
}

static void test_basic(void)
{
	struct kvt_arena a;
	uint64_t o1, o2, o3, o4;
	KVT_REQUIRE(kvt_arena_init(&a, 4096) == 0, "init");
	KVT_CHECK(kvt_arena_alloc(&a, 1, &o1) == 0 && o1 == 0, "first fit at 0");
	KVT_CHECK(kvt_arena_alloc(&a, 300, &o2) == 0 && o2 == 256, "rounded to 256: %llu",
		  (unsigned long long)o2);
	KVT_CHECK(kvt_arena_alloc(&a, 256, &o3) == 0 && o3 == 768, "next: %llu",
		  (unsigned long long)o3);
	KVT_CHECK(a.used == 1024 && a.allocations == 3, "used %llu", (unsigned long long)a.used);
	kvt_arena_free(&a, o2, 300);
	check_free_list(&a);
	KVT_CHECK(a.n_free == 2, "hole + tail: %zu extents", a.n_free);
	KVT_CHECK(kvt_arena_alloc(&a, 512, &o4) == 0 && o4 == 256, "hole reused first fit");
	kvt_arena_free(&a, o4, 512);
	kvt_arena_free(&a, o1, 1);
	check_free_list(&a);
	KVT_CHECK(a.n_free == 2 && a.free[0].off == 0 && a.free[0].len == 768,
		  "coalesced with the right neighbour");
	kvt_arena_free(&a, o3, 256);
	check_free_list(&a);
	KVT_CHECK(a.n_free == 1 && a.free[0].len == 4096 && a.used == 0,
		  "coalesced with both neighbours: one extent");
	KVT_CHECK(kvt_arena_alloc(&a, 4097, &o1) == -ENOSPC, "too large: -ENOSPC");
	/* shrink: an allocation made for the largest chunk gives its unused end back and
	 * stays one allocation */
	KVT_CHECK(kvt_arena_alloc(&a, 2000, &o1) == 0 && o1 == 0, "room for the largest");
	kvt_arena_shrink(&a, o1, 2000, 600);
	check_free_list(&a);
	KVT_CHECK(a.used == 768 && a.allocations == 1 && a.n_free == 1 && a.free[0].off == 768,
		  "shrunk to 768 bytes: used %llu, %llu allocations", (unsigned long long)a.used,
		  (unsigned long long)a.allocations);
	kvt_arena_free(&a, o1, 600);
	check_free_list(&a);
	KVT_CHECK(a.used == 0 && a.allocations == 0 && a.n_free == 1, "freed whole");
	kvt_arena_destroy(&a);

	KVT_REQUIRE(kvt_arena_init(&a, 0) == 0, "empty arena");
	KVT_CHECK(kvt_arena_alloc(&a, 1, &o1) == -ENOSPC, "empty arena refuses");
	kvt_arena_destroy(&a);
}

/* Sessions of one codec: equal chunk sizes leave holes the next session fills exactly. */
static void test_fragmentation(void)
{
	struct kvt_arena a;
	const uint64_t chunk = 3 * 1000 * 1000 + 17, n = 40;
	KVT_REQUIRE(kvt_arena_init(&a, n * ((chunk + 255) & ~255ull)) == 0, "init");
	uint64_t off[40];
	for (uint64_t i = 0; i < n; i++)
		KVT_REQUIRE(kvt_arena_alloc(&a, chunk, &off[i]) == 0, "fill %llu",
			    (unsigned long long)i);
	uint64_t extra;
	KVT_CHECK(kvt_arena_alloc(&a, 1, &extra) == -ENOSPC && a.n_free == 0, "full");
	/* free every other chunk: half free, but no hole bigger than one chunk */
	for (uint64_t i = 0; i < n; i += 2)
		kvt_arena_free(&a, off[i], chunk);
	check_free_list(&a);
	uint64_t lf = kvt_arena_largest_free(&a);
	KVT_CHECK(lf == ((chunk + 255) & ~255ull), "largest hole is one chunk: %llu",
		  (unsigned long long)lf);
	uint64_t big;
	KVT_CHECK(kvt_arena_alloc(&a, 2 * chunk, &big) == -ENOSPC,
		  "a two-chunk object does not fit in half-free, fragmented arena");
	for (uint64_t i = 0; i < n; i += 2)
		KVT_CHECK(kvt_arena_alloc(&a, chunk, &off[i]) == 0, "same-size chunk reuses hole");
	KVT_CHECK(a.n_free == 0, "exactly full again: %zu extents", a.n_free);
	for (uint64_t i = 0; i < n; i++)
		kvt_arena_free(&a, off[i], chunk);
	KVT_CHECK(a.n_free == 1 && a.used == 0, "all free: one extent");
	kvt_arena_destroy(&a);
}

static void test_random(void)
{
	struct kvt_arena a;
	const uint64_t cap = 1 << 22;
	KVT_REQUIRE(kvt_arena_init(&a, cap) == 0, "init");
	uint8_t *map = calloc(cap / KVT_ARENA_ALIGN, 1);
	enum { MAXB = 512 };
	uint64_t offs[MAXB], lens[MAXB];
	int live[MAXB] = {0};
	size_t fails = 0;
	for (int step = 0; step < 40000; step++) {
		int i = (int)kvt_rand_below(MAXB);
		if (live[i]) {
			kvt_arena_free(&a, offs[i], lens[i]);
			for (uint64_t u = offs[i] / 256; u < (offs[i] + lens[i] + 255) / 256; u++)
				map[u] = 0;
			live[i] = 0;
		} else {
			uint64_t len = 1 + kvt_rand_below(kvt_rand_below(4) ? 40000 : 400000);
			if (kvt_arena_alloc(&a, len, &offs[i]) == 0) {
				int bad = offs[i] % 256 || offs[i] + len > cap;
				for (uint64_t u = offs[i] / 256; u < (offs[i] + len + 255) / 256; u++) {
					bad |= map[u];
					map[u] = 1;
				}
				if (bad)
					fails++;
				lens[i] = len;
				live[i] = 1;
			} else {
				KVT_CHECK(kvt_arena_largest_free(&a) < ((len + 255) & ~255ull),
					  "-ENOSPC only when no hole fits");
			}
		}
		if (step % 5000 == 0)
			check_free_list(&a);
	}
	KVT_CHECK(fails == 0, "%zu overlapping or out-of-arena blocks", fails);
	for (int i = 0; i < MAXB; i++)
		if (live[i])
			kvt_arena_free(&a, offs[i], lens[i]);
	check_free_list(&a);
	KVT_CHECK(a.used == 0 && a.n_free == 1 && a.allocations == 0, "balanced at the end");
	free(map);
	kvt_arena_destroy(&a);
}

static void test_extent(void)
{
	struct kvt_gpu_restore r;
	memset(&r, 0, sizeof r);
	r.token_begin = 10;
	r.token_end = 30;
	r.layer_begin = 1;
	r.layer_end = 4;
	r.layer_stride = 1 << 20;
	KVT_CHECK(kvt_gpu_restore_extent(&r, 512) == 2 * (1 << 20) + 20 * 512,
		  "contiguous: (L-1) strides + rows");
	uint32_t table[4] = {7, 2, 9, 1};
	r.block_size = 8;
	r.block_table = table;
	r.n_block_table = 4;
	/* tokens 10..29 use blocks 1..3 -> physical 2, 9, 1: max 9 -> 10 blocks of 8 rows */
	KVT_CHECK(kvt_gpu_restore_extent(&r, 512) == 2 * (1 << 20) + 10 * 8 * 512,
		  "paged: up to the highest block used");
	r.token_end = r.token_begin;
	KVT_CHECK(kvt_gpu_restore_extent(&r, 512) == 0, "empty range writes nothing");
}

/* A tier that cannot use a GPU (gpu_enable = no, as on CI or any build) says why and refuses
 * every device operation with -ENODEV (Attend: -EAGAIN, the caller's CPU path). */
static void test_unavailable(void)
{
	struct kvt_tier_gpu_config cfg = {.enable = 0, .device = 0, .arena_bytes = 1 << 20,
					  .staging_bytes = 64 << 20, .ipc_idle_ms = 1000,
					  .copy_threads = 2};
	struct kvt_tier_gpu *g = NULL;
	KVT_REQUIRE(kvt_tier_gpu_init(&cfg, &g) == 0 && g, "init never fails for lack of a GPU");
	KVT_CHECK(!kvt_tier_gpu_usable(g) && !kvt_tier_gpu_tier_enabled(g), "unusable, no tier");
	const char *why = kvt_tier_gpu_reason(g);
	KVT_CHECK(strstr(why, "gpu_enable = no") || strstr(why, "without CUDA"), "reason: %s", why);
	struct kvt_codec_config cc;
	kvt_codec_config_default(&cc, 1, 1, 64, KVT_DTYPE_F16);
	struct kvt_seq *seq = NULL;
	char err[256];
	KVT_REQUIRE(kvt_seq_create(&cc, NULL, &seq, err, sizeof err) == 0, "seq: %s", err);
	struct kvt_gpu_mirror *m = NULL;
	KVT_CHECK(kvt_tier_gpu_mirror_sync(g, &m, seq, NULL, KVT_GPU_SYNC_USE, err, sizeof err) ==
				  -ENODEV && !m,
		  "mirror sync refused");
	KVT_CHECK(!strcmp(kvt_tier_gpu_mirror_tier(g, m, 0), "host"), "tier host");
	float q[64] = {0}, out[64];
	struct kvt_gpu_attend_item it = {.m = m, .seq = seq, .layer = 0, .n_q_heads = 1,
					 .softmax_scale = 0.125f, .q = q, .out = out};
	KVT_CHECK(kvt_tier_gpu_attend_batch(g, &it, 1, err, sizeof err) == 0 && it.rc == -EAGAIN,
		  "attend falls back");
	uint8_t h[KVT_GPU_IPC_HANDLE_BYTES] = {0};
	struct kvt_gpu_restore r = {.handle_k = h, .handle_v = h, .buffer_bytes = 1 << 20,
				    .layer_end = 1, .dtype = KVT_DTYPE_F16, .device_ordinal = -1};
	struct kvt_gpu_restore_result res;
	KVT_CHECK(kvt_tier_gpu_restore(g, seq, m, &r, &res, err, sizeof err) == -ENODEV &&
			  strstr(err, why) != NULL,
		  "restore refused with the reason: %s", err);
	struct kvt_tier_stats st;
	kvt_tier_gpu_stats(g, &st, NULL);
	KVT_CHECK(st.capacity_bytes == 0 && st.used_bytes == 0, "no arena");
	kvt_tier_gpu_maintain(g, 0);
	kvt_tier_gpu_forget_owner(g, seq);
	kvt_seq_destroy(seq);
	kvt_tier_gpu_destroy(g);
}

int main(void)
{
	kvt_test_init();
	KVT_RUN(test_basic);
	KVT_RUN(test_fragmentation);
	KVT_RUN(test_random);
	KVT_RUN(test_extent);
	KVT_RUN(test_unavailable);
	return kvt_test_done();
}

#include "tier_host.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/*
 * Large objects (chunks, tails, Append staging) come straight from the kernel in whole pages.
 * Through malloc they would be rounded up to the allocator's size class (jemalloc: 4 classes
 * per doubling, so a 790 KB chunk takes an 896 KiB extent, and recycled extents are resident
 * to the last page), and freed staging would stay resident as dirty pages until decay. With
 * mmap a chunk costs its size rounded to a page and a free returns the memory at once, so the
 * process's RSS tracks used_bytes. Smaller objects stay with malloc; if mmap fails (e.g. the
 * map count limit) malloc is the fallback, and the free path tells the two apart by the size
 * class it recorded, never by guessing.
 */
/* Stays on in release builds: a broken tag means a double free or a wrong size. */
#define HOST_ASSERT(cond)                                                                 \
	do {                                                                              \
		if (!(cond)) {                                                            \
			fprintf(stderr, "tier_host: %s:%d: assertion failed: %s\n", __FILE__, \
				__LINE__, #cond);                                         \
			abort();                                                          \
		}                                                                         \
	} while (0)

#define PAGE_ALLOC_MIN_BYTES (256u * 1024u)

struct page_tag {
	uint64_t magic;  /* PAGE_TAG_MAGIC for mmap'd objects, MALLOC_TAG_MAGIC otherwise */
	uint64_t map_bytes;
	uint8_t pad[48];
};
_Static_assert(sizeof(struct page_tag) == 64, "the tag keeps 64-byte alignment");
#define PAGE_TAG_MAGIC 0x6b76747061676573ull   /* "kvtpages" */
#define MALLOC_TAG_MAGIC 0x6b76746d616c6c63ull /* "kvtmallc" */

static size_t page_bytes(void)
{
	static size_t pg;
	if (!pg) {
		long v = sysconf(_SC_PAGESIZE);
		pg = v > 0 ? (size_t)v : 4096;
	}
	return pg;
}

/* An object of `rounded` bytes (a multiple of 64): mmap'd behind a 64-byte tag when large. */
static void *host_obj_alloc(size_t rounded)
{
	if (rounded >= PAGE_ALLOC_MIN_BYTES) {
		size_t pg = page_bytes();
		size_t map = (rounded + sizeof(struct page_tag) + pg - 1) & ~(pg - 1);
		void *m = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
			       0);
		if (m != MAP_FAILED) {
			struct page_tag *t = m;
			t->magic = PAGE_TAG_MAGIC;
			t->map_bytes = map;
			return t + 1;
		}
		struct page_tag *t = aligned_alloc(64, rounded + sizeof(*t));
		if (!t)
			return NULL;
		t->magic = MALLOC_TAG_MAGIC;
		t->map_bytes = 0;
		return t + 1;
	}
	return aligned_alloc(64, rounded);
}

static void host_obj_free(void *p, size_t rounded)
{
	if (rounded >= PAGE_ALLOC_MIN_BYTES) {
		struct page_tag *t = (struct page_tag *)p - 1;
		if (t->magic == PAGE_TAG_MAGIC) {
			size_t map = t->map_bytes;
			t->magic = 0;
			HOST_ASSERT(munmap(t, map) == 0);
			return;
		}
		HOST_ASSERT(t->magic == MALLOC_TAG_MAGIC);
		t->magic = 0;
		free(t);
		return;
	}
	free(p);
}

static void *seq_alloc_hook(void *ctx, size_t bytes)
{
	return kvt_tier_host_alloc(ctx, bytes);
}

static void seq_free_hook(void *ctx, void *p, size_t bytes)
{
	kvt_tier_host_free(ctx, p, bytes);
}

void kvt_tier_host_init(struct kvt_tier_host *t, uint64_t capacity_bytes)
{
	*t = (struct kvt_tier_host){.capacity_bytes = capacity_bytes};
	t->seq_alloc.alloc = seq_alloc_hook;
	t->seq_alloc.free = seq_free_hook;
	t->seq_alloc.ctx = t;
}

void kvt_tier_host_set_capacity(struct kvt_tier_host *t, uint64_t capacity_bytes)
{
	__atomic_store_n(&t->capacity_bytes, capacity_bytes, __ATOMIC_RELAXED);
}

void kvt_tier_host_set_reclaim(struct kvt_tier_host *t, kvt_tier_reclaim_fn fn, void *ctx)
{
	t->reclaim = fn;
	t->reclaim_ctx = ctx;
}

static int try_charge(struct kvt_tier_host *t, uint64_t bytes)
{
	uint64_t cap = __atomic_load_n(&t->capacity_bytes, __ATOMIC_RELAXED);
	uint64_t used = __atomic_load_n(&t->used_bytes, __ATOMIC_RELAXED);
	do {
		if (bytes > cap || used > cap - bytes)
			return -ENOMEM;
	} while (!__atomic_compare_exchange_n(&t->used_bytes, &used, used + bytes, 1,
					      __ATOMIC_RELAXED, __ATOMIC_RELAXED));
	return 0;
}

int kvt_tier_host_charge(struct kvt_tier_host *t, uint64_t bytes)
{
	if (try_charge(t, bytes) == 0)
		return 0;
	if (t->reclaim) {
		uint64_t cap = __atomic_load_n(&t->capacity_bytes, __ATOMIC_RELAXED);
		uint64_t used = __atomic_load_n(&t->used_bytes, __ATOMIC_RELAXED);
		uint64_t need = used + bytes > cap ? used + bytes - cap : bytes;
		if (bytes <= cap && t->reclaim(t->reclaim_ctx, need) > 0 && try_charge(t, bytes) == 0)
			return 0;
	}
	__atomic_fetch_add(&t->refused, 1, __ATOMIC_RELAXED);
	return -ENOMEM;
}

void kvt_tier_host_uncharge(struct kvt_tier_host *t, uint64_t bytes)
{
	uint64_t before = __atomic_fetch_sub(&t->used_bytes, bytes, __ATOMIC_RELAXED);
	assert(before >= bytes && "host tier uncharged more than it charged");
	(void)before;
}

void *kvt_tier_host_alloc(struct kvt_tier_host *t, size_t bytes)
{
	/* aligned_alloc wants a multiple of the alignment; charge what we really take. */
	size_t rounded = (bytes + 63) & ~(size_t)63;
	if (rounded == 0)
		rounded = 64;
	if (kvt_tier_host_charge(t, rounded) != 0)
		return NULL;
	void *p = host_obj_alloc(rounded);
	if (!p) {
		kvt_tier_host_uncharge(t, rounded);
		return NULL;
	}
	__atomic_fetch_add(&t->allocations, 1, __ATOMIC_RELAXED);
	return p;
}

void kvt_tier_host_free(struct kvt_tier_host *t, void *p, size_t bytes)
{
	if (!p)
		return;
	size_t rounded = (bytes + 63) & ~(size_t)63;
	if (rounded == 0)
		rounded = 64;
	host_obj_free(p, rounded);
	__atomic_fetch_sub(&t->allocations, 1, __ATOMIC_RELAXED);
	kvt_tier_host_uncharge(t, rounded);
}

void kvt_tier_host_stats(const struct kvt_tier_host *t, struct kvt_tier_stats *out)
{
	out->name = "host";
	out->capacity_bytes = __atomic_load_n(&t->capacity_bytes, __ATOMIC_RELAXED);
	out->used_bytes = __atomic_load_n(&t->used_bytes, __ATOMIC_RELAXED);
	out->allocations = __atomic_load_n(&t->allocations, __ATOMIC_RELAXED);
	out->chunks = 0;
	out->refused = __atomic_load_n(&t->refused, __ATOMIC_RELAXED);
}

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
	uint32_t pinned; /* the mapping is registered through the pin hook (GPU DMA) */
	uint8_t pad[44];
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

/* Takes a cached mapping of exactly map bytes, or NULL. */
static struct page_tag *cache_take(struct kvt_tier_host *t, size_t map)
{
	struct page_tag *found = NULL;
	pthread_mutex_lock(&t->cache_mu);
	for (uint32_t i = t->page_cache_n; i-- > 0;) {
		struct page_tag *g = t->page_cache[i];
		if (g->map_bytes != map)
			continue;
		found = g;
		for (uint32_t j = i + 1; j < t->page_cache_n; j++)
			t->page_cache[j - 1] = t->page_cache[j];
		t->page_cache_n--;
		t->page_cache_bytes -= map;
		break;
	}
	pthread_mutex_unlock(&t->cache_mu);
	return found;
}

/* Unmaps the oldest cached mappings until `room` more bytes and one more slot fit (room 0
 * and cap 0: everything). */
static void cache_trim_locked(struct kvt_tier_host *t, uint64_t room, void **out, uint32_t *n_out)
{
	while (t->page_cache_n > 0 &&
	       (t->page_cache_n >= KVT_TIER_HOST_CACHE_SLOTS ||
		t->page_cache_bytes + room > t->page_cache_cap || t->page_cache_cap == 0)) {
		struct page_tag *g = t->page_cache[0];
		for (uint32_t j = 1; j < t->page_cache_n; j++)
			t->page_cache[j - 1] = t->page_cache[j];
		t->page_cache_n--;
		t->page_cache_bytes -= g->map_bytes;
		out[(*n_out)++] = g;
	}
}

/* Unregisters a pinned mapping (never unmap registered memory) and unmaps it. */
static void unmap_one(struct kvt_tier_host *t, struct page_tag *g)
{
	if (g->pinned && t->unpin)
		t->unpin(g);
	g->pinned = 0;
	HOST_ASSERT(munmap(g, g->map_bytes) == 0);
}

static void unmap_all(struct kvt_tier_host *t, void **maps, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		unmap_one(t, maps[i]);
}

/* Keeps a freed mapping for reuse when it fits the cache; else unmaps it. */
static void cache_put(struct kvt_tier_host *t, struct page_tag *g)
{
	void *drop[KVT_TIER_HOST_CACHE_SLOTS];
	uint32_t n_drop = 0;
	int kept = 0;
	pthread_mutex_lock(&t->cache_mu);
	if (g->map_bytes <= t->page_cache_cap) {
		cache_trim_locked(t, g->map_bytes, drop, &n_drop);
		t->page_cache[t->page_cache_n++] = g;
		t->page_cache_bytes += g->map_bytes;
		kept = 1;
	}
	pthread_mutex_unlock(&t->cache_mu);
	unmap_all(t, drop, n_drop);
	if (!kept)
		unmap_one(t, g);
}

void kvt_tier_host_set_page_cache(struct kvt_tier_host *t, uint64_t bytes)
{
	void *drop[KVT_TIER_HOST_CACHE_SLOTS];
	uint32_t n_drop = 0;
	pthread_mutex_lock(&t->cache_mu);
	t->page_cache_cap = bytes;
	cache_trim_locked(t, 0, drop, &n_drop);
	pthread_mutex_unlock(&t->cache_mu);
	unmap_all(t, drop, n_drop);
}

void kvt_tier_host_set_pin(struct kvt_tier_host *t, int (*pin)(void *p, size_t bytes),
			   void (*unpin)(void *p))
{
	t->pin = pin;
	t->unpin = unpin;
}

/* Session data (chunks, tails) is pinned when a pin hook is set, so a GPU reads it by DMA in
 * place; a failed pin only means the slower staged copy. */
static void maybe_pin(struct kvt_tier_host *t, struct page_tag *g, int want_pin)
{
	if (want_pin && t->pin && !g->pinned)
		g->pinned = t->pin(g, g->map_bytes) == 0;
}

/* An object of `rounded` bytes (a multiple of 64): mmap'd behind a 64-byte tag when large. */
static void *host_obj_alloc(struct kvt_tier_host *t, size_t rounded, int want_pin)
{
	if (rounded >= PAGE_ALLOC_MIN_BYTES) {
		size_t pg = page_bytes();
		size_t map = (rounded + sizeof(struct page_tag) + pg - 1) & ~(pg - 1);
		struct page_tag *c = cache_take(t, map);
		if (c) {
			c->magic = PAGE_TAG_MAGIC;
			maybe_pin(t, c, want_pin);
			return c + 1;
		}
		void *m = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
			       0);
		if (m != MAP_FAILED) {
			struct page_tag *g = m;
			g->magic = PAGE_TAG_MAGIC;
			g->map_bytes = map;
			g->pinned = 0;
			maybe_pin(t, g, want_pin);
			return g + 1;
		}
		struct page_tag *g = aligned_alloc(64, rounded + sizeof(*g));
		if (!g)
			return NULL;
		g->magic = MALLOC_TAG_MAGIC;
		g->map_bytes = 0;
		return g + 1;
	}
	return aligned_alloc(64, rounded);
}

static void host_obj_free(struct kvt_tier_host *t, void *p, size_t rounded)
{
	if (rounded >= PAGE_ALLOC_MIN_BYTES) {
		struct page_tag *g = (struct page_tag *)p - 1;
		if (g->magic == PAGE_TAG_MAGIC) {
			g->magic = 0;
			cache_put(t, g);
			return;
		}
		HOST_ASSERT(g->magic == MALLOC_TAG_MAGIC);
		g->magic = 0;
		free(g);
		return;
	}
	free(p);
}

static void *host_alloc(struct kvt_tier_host *t, size_t bytes, int want_pin);

static void *seq_alloc_hook(void *ctx, size_t bytes)
{
	return host_alloc(ctx, bytes, 1);
}

static void seq_free_hook(void *ctx, void *p, size_t bytes)
{
	kvt_tier_host_free(ctx, p, bytes);
}

void kvt_tier_host_init(struct kvt_tier_host *t, uint64_t capacity_bytes)
{
	*t = (struct kvt_tier_host){.capacity_bytes = capacity_bytes};
	pthread_mutex_init(&t->cache_mu, NULL);
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
	return host_alloc(t, bytes, 0);
}

static void *host_alloc(struct kvt_tier_host *t, size_t bytes, int want_pin)
{
	/* aligned_alloc wants a multiple of the alignment; charge what we really take. */
	size_t rounded = (bytes + 63) & ~(size_t)63;
	if (rounded == 0)
		rounded = 64;
	if (kvt_tier_host_charge(t, rounded) != 0)
		return NULL;
	void *p = host_obj_alloc(t, rounded, want_pin);
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
	host_obj_free(t, p, rounded);
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

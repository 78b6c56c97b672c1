#include "tier_host.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>

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
	void *p = aligned_alloc(64, rounded);
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
	free(p);
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

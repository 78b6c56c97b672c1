/*
 * tier_host.h - the host DRAM tier: byte capacity accounting and the allocator hooks that
 * kvt_seq (kernels/kvt_seq.h) draws its tails and chunks from.
 *
 * Every byte a session holds in host memory (tail buffers, sealed chunks) and every byte an
 * Append stream stages is charged here before it is allocated, so the daemon's memory use is
 * bounded by capacity_bytes. When a charge does not fit, the tier asks its reclaimer (the
 * session table, which drops the coldest idle unpinned sessions when the policy allows it)
 * to free room, then retries once; a refused charge makes the caller fail with -ENOMEM and
 * change nothing.
 *
 * This file is the first of the tiers; gpu and nvme tiers will sit beside it with the same
 * shape (capacity, used, chunks, a name) so the tier manager can treat them alike.
 *
 * Threads: every function may be called from any thread; the counters are atomics. The
 * reclaimer is called without any tier lock held.
 */
#ifndef KVT_TIER_HOST_H
#define KVT_TIER_HOST_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kvt_seq.h"

/* Frees at least `bytes` of host memory if it can (never the caller's own session, which it
 * holds busy); returns the bytes it freed. */
typedef uint64_t (*kvt_tier_reclaim_fn)(void *ctx, uint64_t bytes);

struct kvt_tier_stats {
	const char *name;
	uint64_t capacity_bytes;
	uint64_t used_bytes;
	uint64_t chunks;       /* kvt_chunk objects alive in this tier */
	uint64_t allocations;  /* live allocations of any kind */
	uint64_t refused;      /* charges refused for lack of room since start */
};

#define KVT_TIER_HOST_CACHE_SLOTS 16

struct kvt_tier_host {
	uint64_t capacity_bytes; /* atomic: SIGHUP may change it */
	uint64_t used_bytes;     /* atomic */
	uint64_t allocations;    /* atomic */
	uint64_t refused;        /* atomic */
	kvt_tier_reclaim_fn reclaim;
	void *reclaim_ctx;
	struct kvt_seq_alloc seq_alloc; /* hooks handed to kvt_seq_create / kvt_seq_fork */
	/* Freed page-backed objects kept for reuse by an allocation of the same page count
	 * (an Append's staging is freed and the next one takes the same size: reusing it costs
	 * no page faults). Not charged: they hold no session data. Bounded by page_cache_cap
	 * bytes and KVT_TIER_HOST_CACHE_SLOTS entries; the oldest goes first. */
	pthread_mutex_t cache_mu;
	uint64_t page_cache_cap;
	uint64_t page_cache_bytes;
	uint32_t page_cache_n;
	void *page_cache[KVT_TIER_HOST_CACHE_SLOTS];
	/* Optional (the GPU tier sets them): page-locks the mappings of session data (chunks and
	 * tails, through seq_alloc) so GPU copies read them by DMA in place; unpin runs before a
	 * pinned mapping is unmapped. Set once at start, before any allocation. */
	int (*pin)(void *p, size_t bytes);
	void (*unpin)(void *p);
};

void kvt_tier_host_init(struct kvt_tier_host *t, uint64_t capacity_bytes);
void kvt_tier_host_set_capacity(struct kvt_tier_host *t, uint64_t capacity_bytes);
/* Bytes of freed page-backed objects kept for reuse (0 = none; lowering it unmaps the
 * excess at once). */
void kvt_tier_host_set_page_cache(struct kvt_tier_host *t, uint64_t bytes);
void kvt_tier_host_set_reclaim(struct kvt_tier_host *t, kvt_tier_reclaim_fn fn, void *ctx);
void kvt_tier_host_set_pin(struct kvt_tier_host *t, int (*pin)(void *p, size_t bytes),
			   void (*unpin)(void *p));

/* Reserves bytes against the capacity (reclaiming once when it does not fit). 0 or -ENOMEM. */
int kvt_tier_host_charge(struct kvt_tier_host *t, uint64_t bytes);
void kvt_tier_host_uncharge(struct kvt_tier_host *t, uint64_t bytes);

/* Charged, 64-byte aligned allocation (the kvt_seq_alloc hooks call these). */
void *kvt_tier_host_alloc(struct kvt_tier_host *t, size_t bytes);
void kvt_tier_host_free(struct kvt_tier_host *t, void *p, size_t bytes);

void kvt_tier_host_stats(const struct kvt_tier_host *t, struct kvt_tier_stats *out);

#endif

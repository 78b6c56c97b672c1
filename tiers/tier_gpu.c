#include "tier_gpu.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef KVT_HAVE_CUDA
#include "kvt_cuda.h"
#endif

/* ---- arena allocator ---------------------------------------------------------------------- */

static uint64_t round_up(uint64_t n)
{
	return (n + KVT_ARENA_ALIGN - 1) & ~(uint64_t)(KVT_ARENA_ALIGN - 1);
}

int kvt_arena_init(struct kvt_arena *a, uint64_t capacity)
{
	memset(a, 0, sizeof *a);
	a->capacity = capacity & ~(uint64_t)(KVT_ARENA_ALIGN - 1);
	a->cap_free = 16;
	a->free = calloc(a->cap_free, sizeof *a->free);
	if (!a->free)
		return -ENOMEM;
	if (a->capacity) {
		a->free[0].off = 0;
		a->free[0].len = a->capacity;
		a->n_free = 1;
	}
	return 0;
}

void kvt_arena_destroy(struct kvt_arena *a)
{
	free(a->free);
	memset(a, 0, sizeof *a);
}

int kvt_arena_alloc(struct kvt_arena *a, uint64_t bytes, uint64_t *off)
{
	uint64_t n = round_up(bytes ? bytes : 1);
	for (size_t i = 0; i < a->n_free; i++) {
		struct kvt_arena_extent *e = &a->free[i];
		if (e->len < n)
			continue;
		*off = e->off;
		e->off += n;
		e->len -= n;
		if (e->len == 0) {
			memmove(e, e + 1, (a->n_free - i - 1) * sizeof *e);
			a->n_free--;
		}
		a->used += n;
		a->allocations++;
		return 0;
	}
	return -ENOSPC;
}

void kvt_arena_free(struct kvt_arena *a, uint64_t off, uint64_t bytes)
{
	uint64_t n = round_up(bytes ? bytes : 1);
	/* first extent after off */
	size_t lo = 0, hi = a->n_free;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (a->free[mid].off < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	size_t i = lo;
	/* a double free or a wrong size would overlap a neighbour: that is a bug */
	if ((i > 0 && a->free[i - 1].off + a->free[i - 1].len > off) ||
	    (i < a->n_free && off + n > a->free[i].off) || off + n > a->capacity) {
		fprintf(stderr, "tier_gpu: arena free of [%llu, +%llu) overlaps a free extent\n",
			(unsigned long long)off, (unsigned long long)n);
		abort();
	}
	a->used -= n;
	a->allocations--;
	int join_prev = i > 0 && a->free[i - 1].off + a->free[i - 1].len == off;
	int join_next = i < a->n_free && off + n == a->free[i].off;
	if (join_prev && join_next) {
		a->free[i - 1].len += n + a->free[i].len;
		memmove(&a->free[i], &a->free[i + 1], (a->n_free - i - 1) * sizeof *a->free);
		a->n_free--;
	} else if (join_prev) {
		a->free[i - 1].len += n;
	} else if (join_next) {
		a->free[i].off = off;
		a->free[i].len += n;
	} else {
		if (a->n_free == a->cap_free) {
			size_t nc = a->cap_free * 2;
			struct kvt_arena_extent *nf = realloc(a->free, nc * sizeof *nf);
			if (!nf) {
				/* Losing a hole is safe (the bytes stay unusable), not corrupting. */
				fprintf(stderr, "tier_gpu: out of memory: %llu arena bytes lost\n",
					(unsigned long long)n);
				return;
			}
			a->free = nf;
			a->cap_free = nc;
		}
		memmove(&a->free[i + 1], &a->free[i], (a->n_free - i) * sizeof *a->free);
		a->free[i].off = off;
		a->free[i].len = n;
		a->n_free++;
	}
}

uint64_t kvt_arena_largest_free(const struct kvt_arena *a)
{
	uint64_t m = 0;
	for (size_t i = 0; i < a->n_free; i++)
		if (a->free[i].len > m)
			m = a->free[i].len;
	return m;
}

/* ---- restore extents (pure arithmetic) ---------------------------------------------------- */

uint64_t kvt_gpu_restore_extent(const struct kvt_gpu_restore *r, uint32_t row_bytes)
{
	uint64_t nl = r->layer_end - r->layer_begin;
	if (r->token_end <= r->token_begin || nl == 0)
		return 0;
	unsigned __int128 rows;
	if (r->block_size == 0) {
		rows = r->token_end - r->token_begin;
	} else {
		uint64_t b0 = r->token_begin / r->block_size;
		uint64_t b1 = (r->token_end + r->block_size - 1) / r->block_size;
		uint64_t mx = 0;
		for (uint64_t b = b0; b < b1 && b < r->n_block_table; b++)
			if (r->block_table[b] > mx)
				mx = r->block_table[b];
		rows = (unsigned __int128)(mx + 1) * r->block_size;
	}
	unsigned __int128 e = (unsigned __int128)(nl - 1) * r->layer_stride + rows * row_bytes;
	return e > UINT64_MAX ? UINT64_MAX : (uint64_t)e;
}

/* ---- the tier ----------------------------------------------------------------------------- */

#define IPC_CACHE_SLOTS 64

struct ipc_entry {
	uint8_t handle[KVT_GPU_IPC_HANDLE_BYTES];
	void *base;
	uint64_t bytes;
	uint64_t last_ms;
	const void *owner;
	int live;
};

struct mirror_entry {
	const struct kvt_chunk *chunk; /* referenced */
	uint64_t off, bytes;           /* arena */
	int resident;
};

struct kvt_gpu_mirror {
	struct mirror_entry *e;
	uint32_t n, cap;
	uint64_t bytes;
	uint32_t n_resident;
};

struct kvt_tier_gpu {
	struct kvt_tier_gpu_config cfg;
	pthread_mutex_t mu;
	char reason[256];
	int usable;
	int ctx_failed;
#ifdef KVT_HAVE_CUDA
	kvt_cuda_ctx *ctx;
	kvt_cuda_restorer *restorer;
	uint8_t *arena_dev;
	void *scratch;
	size_t scratch_bytes;
#endif
	struct kvt_arena arena;
	uint64_t arena_chunks;
	struct ipc_entry ipc[IPC_CACHE_SLOTS];
	/* counters (under mu) */
	uint64_t n_restores, restore_bytes, restore_h2d_bytes, ipc_opens, ipc_closes;
	uint64_t n_attends, n_attend_fallbacks, n_chunk_fallbacks, ipc_stale_closes;
	uint64_t restore_pinned_chunks, restore_staged_chunks;
};

#ifdef KVT_HAVE_CUDA
static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

/* mu held. Creates the context, the restore staging and the arena on first use. */
static int ensure_ctx(struct kvt_tier_gpu *g, char *err, size_t errlen)
{
	if (g->ctx)
		return kvt_cuda_ctx_bind(g->ctx, err, errlen);
	if (!g->usable || g->ctx_failed) {
		snprintf(err, errlen, "%s", g->reason);
		return -ENODEV;
	}
	char e[300] = "";
	int rc = kvt_cuda_ctx_create(g->cfg.device, &g->ctx, e, sizeof e);
	if (rc == 0)
		rc = kvt_cuda_restorer_create(g->ctx, g->cfg.staging_bytes, g->cfg.copy_threads,
					      &g->restorer, e,
					      sizeof e);
	if (rc == 0 && g->cfg.arena_bytes) {
		void *p = NULL;
		rc = kvt_cuda_alloc(g->ctx, g->cfg.arena_bytes, &p, e, sizeof e);
		g->arena_dev = p;
	}
	if (rc) {
		snprintf(g->reason, sizeof g->reason, "the CUDA device %d could not be set up: %s",
			 g->cfg.device, e);
		g->ctx_failed = 1;
		if (g->restorer)
			kvt_cuda_restorer_destroy(g->restorer);
		g->restorer = NULL;
		kvt_cuda_ctx_destroy(g->ctx);
		g->ctx = NULL;
		snprintf(err, errlen, "%s", g->reason);
		return -ENODEV;
	}
	return 0;
}
#endif

int kvt_tier_gpu_init(const struct kvt_tier_gpu_config *cfg, struct kvt_tier_gpu **out)
{
	struct kvt_tier_gpu *g = calloc(1, sizeof *g);
	if (!g)
		return -ENOMEM;
	g->cfg = *cfg;
	pthread_mutex_init(&g->mu, NULL);
	if (kvt_arena_init(&g->arena, 0)) {
		free(g);
		return -ENOMEM;
	}
#ifdef KVT_HAVE_CUDA
	if (!cfg->enable) {
		snprintf(g->reason, sizeof g->reason, "the GPU is disabled (gpu_enable = no)");
	} else {
		int n = kvt_cuda_device_count();
		if (n == 0)
			snprintf(g->reason, sizeof g->reason,
				 "no CUDA device is present (or no driver)");
		else if (cfg->device >= n)
			snprintf(g->reason, sizeof g->reason,
				 "gpu_device %d is not present (%d device%s)", cfg->device, n,
				 n == 1 ? "" : "s");
		else
			g->usable = 1;
	}
	if (g->usable && cfg->arena_bytes) {
		kvt_arena_destroy(&g->arena);
		if (kvt_arena_init(&g->arena, cfg->arena_bytes)) {
			free(g);
			return -ENOMEM;
		}
		char e[300];
		pthread_mutex_lock(&g->mu);
		if (ensure_ctx(g, e, sizeof e)) {
			/* the reason says why; the GPU tier is off, the host serves */
			kvt_arena_destroy(&g->arena);
			kvt_arena_init(&g->arena, 0);
		}
		pthread_mutex_unlock(&g->mu);
	}
#else
	snprintf(g->reason, sizeof g->reason,
		 "this kvtierd was built without CUDA (no nvcc at build time)");
#endif
	*out = g;
	return 0;
}

void kvt_tier_gpu_destroy(struct kvt_tier_gpu *g)
{
	if (!g)
		return;
#ifdef KVT_HAVE_CUDA
	for (int i = 0; i < IPC_CACHE_SLOTS; i++)
		if (g->ipc[i].live)
			kvt_cuda_ipc_close(g->ctx, g->ipc[i].base);
	if (g->ctx) {
		kvt_cuda_free(g->ctx, g->scratch);
		kvt_cuda_free(g->ctx, g->arena_dev);
		kvt_cuda_restorer_destroy(g->restorer);
		kvt_cuda_ctx_destroy(g->ctx);
	}
#endif
	kvt_arena_destroy(&g->arena);
	pthread_mutex_destroy(&g->mu);
	free(g);
}

int kvt_tier_gpu_usable(struct kvt_tier_gpu *g)
{
	return g && g->usable && !g->ctx_failed;
}

int kvt_tier_gpu_tier_enabled(struct kvt_tier_gpu *g)
{
#ifdef KVT_HAVE_CUDA
	return g && g->arena_dev != NULL;
#else
	return 0;
#endif
}

const char *kvt_tier_gpu_reason(struct kvt_tier_gpu *g)
{
	return g ? g->reason : "no GPU tier";
}

void kvt_tier_gpu_stats(struct kvt_tier_gpu *g, struct kvt_tier_stats *out,
			uint64_t *largest_free)
{
	memset(out, 0, sizeof *out);
	out->name = "gpu";
	pthread_mutex_lock(&g->mu);
	out->capacity_bytes = kvt_tier_gpu_tier_enabled(g) ? g->arena.capacity : 0;
	out->used_bytes = g->arena.used;
	out->chunks = g->arena_chunks;
	out->allocations = g->arena.allocations;
	out->refused = g->n_chunk_fallbacks;
	if (largest_free)
		*largest_free = kvt_arena_largest_free(&g->arena);
	pthread_mutex_unlock(&g->mu);
}

void kvt_tier_gpu_counters(struct kvt_tier_gpu *g,
			   void (*fn)(void *ctx, const char *name, uint64_t value), void *ctx)
{
	pthread_mutex_lock(&g->mu);
	uint64_t v[8] = {g->n_restores,       g->restore_bytes,     g->restore_h2d_bytes,
			 g->ipc_opens,        g->ipc_closes,        g->n_attends,
			 g->n_attend_fallbacks, g->n_chunk_fallbacks};
	uint64_t cached = 0;
	for (int i = 0; i < IPC_CACHE_SLOTS; i++)
		cached += g->ipc[i].live != 0;
	pthread_mutex_unlock(&g->mu);
	static const char *names[8] = {"gpu.restores",      "gpu.restore_bytes",
				       "gpu.restore_h2d_bytes", "gpu.ipc_opens",
				       "gpu.ipc_closes",    "gpu.attends",
				       "gpu.attend_host_fallbacks", "gpu.chunks_kept_on_host"};
	for (int i = 0; i < 8; i++)
		fn(ctx, names[i], v[i]);
	fn(ctx, "gpu.ipc_cached", cached);
	pthread_mutex_lock(&g->mu);
	uint64_t stale = g->ipc_stale_closes;
	pthread_mutex_unlock(&g->mu);
	fn(ctx, "gpu.ipc_stale_remaps", stale);
	pthread_mutex_lock(&g->mu);
	uint64_t pc = g->restore_pinned_chunks, sc = g->restore_staged_chunks;
	pthread_mutex_unlock(&g->mu);
	fn(ctx, "gpu.restore_dma_chunks", pc);
	fn(ctx, "gpu.restore_staged_chunks", sc);
}

static void ipc_close_locked(struct kvt_tier_gpu *g, struct ipc_entry *e)
{
#ifdef KVT_HAVE_CUDA
	kvt_cuda_ipc_close(g->ctx, e->base);
#endif
	memset(e, 0, sizeof *e);
	g->ipc_closes++;
}

void kvt_tier_gpu_maintain(struct kvt_tier_gpu *g, uint64_t now)
{
	if (!g)
		return;
	pthread_mutex_lock(&g->mu);
	for (int i = 0; i < IPC_CACHE_SLOTS; i++)
		if (g->ipc[i].live && now - g->ipc[i].last_ms >= g->cfg.ipc_idle_ms)
			ipc_close_locked(g, &g->ipc[i]);
	pthread_mutex_unlock(&g->mu);
}

void kvt_tier_gpu_forget_owner(struct kvt_tier_gpu *g, const void *owner)
{
	if (!g)
		return;
	pthread_mutex_lock(&g->mu);
	for (int i = 0; i < IPC_CACHE_SLOTS; i++)
		if (g->ipc[i].live && g->ipc[i].owner == owner)
			ipc_close_locked(g, &g->ipc[i]);
	pthread_mutex_unlock(&g->mu);
}

int kvt_tier_gpu_pin_host(void *p, size_t bytes)
{
#ifdef KVT_HAVE_CUDA
	return kvt_cuda_host_register(p, bytes);
#else
	(void)p;
	(void)bytes;
	return -ENODEV;
#endif
}

void kvt_tier_gpu_unpin_host(void *p)
{
#ifdef KVT_HAVE_CUDA
	kvt_cuda_host_unregister(p);
#else
	(void)p;
#endif
}

/* ---- mirrors ------------------------------------------------------------------------------ */

static void mirror_release(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m, uint32_t i)
{
	struct mirror_entry *e = &m->e[i];
	if (e->resident) {
		kvt_arena_free(&g->arena, e->off, e->bytes);
		g->arena_chunks--;
		m->bytes -= round_up(e->bytes);
		m->n_resident--;
	}
	if (e->chunk)
		kvt_chunk_put(e->chunk);
	memset(e, 0, sizeof *e);
}

void kvt_tier_gpu_mirror_free(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m)
{
	if (!m)
		return;
	pthread_mutex_lock(&g->mu);
	for (uint32_t i = 0; i < m->n; i++)
		mirror_release(g, m, i);
	pthread_mutex_unlock(&g->mu);
	free(m->e);
	free(m);
}

const char *kvt_tier_gpu_mirror_tier(const struct kvt_gpu_mirror *m, uint32_t n_chunks)
{
	if (!m)
		return "host";
	if (m->n_resident == n_chunks)
		return "gpu";
	return m->n_resident ? "gpu+host" : "host";
}

uint64_t kvt_tier_gpu_mirror_bytes(const struct kvt_gpu_mirror *m)
{
	return m ? m->bytes : 0;
}

int kvt_tier_gpu_mirror_sync(struct kvt_tier_gpu *g, struct kvt_gpu_mirror **mp,
			     const struct kvt_seq *seq, char *err, size_t errlen)
{
#ifdef KVT_HAVE_CUDA
	if (!kvt_tier_gpu_tier_enabled(g)) {
		snprintf(err, errlen, "no GPU tier: %s",
			 g->reason[0] ? g->reason : "gpu_arena_bytes is 0");
		return -ENODEV;
	}
	struct kvt_gpu_mirror *m = *mp;
	if (!m) {
		m = calloc(1, sizeof *m);
		if (!m)
			return -ENOMEM;
		*mp = m;
	}
	uint32_t n = kvt_seq_n_chunks(seq);
	if (n > m->cap) {
		uint32_t nc = n < 16 ? 16 : n * 2;
		struct mirror_entry *ne = realloc(m->e, nc * sizeof *ne);
		if (!ne)
			return -ENOMEM;
		memset(ne + m->cap, 0, (nc - m->cap) * sizeof *ne);
		m->e = ne;
		m->cap = nc;
	}
	int rc = 0;
	pthread_mutex_lock(&g->mu);
	if ((rc = kvt_cuda_ctx_bind(g->ctx, err, errlen))) {
		pthread_mutex_unlock(&g->mu);
		return rc;
	}
	for (uint32_t i = n; i < m->n; i++)
		mirror_release(g, m, i);
	for (uint32_t i = 0; i < n && rc == 0; i++) {
		const struct kvt_chunk *c = kvt_seq_chunk(seq, i);
		struct mirror_entry *e = &m->e[i];
		if (e->chunk != c)
			mirror_release(g, m, i);
		if (e->resident)
			continue;
		if (!e->chunk)
			e->chunk = kvt_chunk_get(c);
		uint64_t off;
		if (kvt_arena_alloc(&g->arena, c->size_bytes, &off)) {
			g->n_chunk_fallbacks++;
			continue; /* stays on the host; retried at the next sync */
		}
		rc = kvt_cuda_upload(g->ctx, g->arena_dev + off, c->bytes, c->size_bytes, err,
				     errlen);
		if (rc) {
			kvt_arena_free(&g->arena, off, c->size_bytes);
			break;
		}
		e->off = off;
		e->bytes = c->size_bytes;
		e->resident = 1;
		g->arena_chunks++;
		m->bytes += round_up(c->size_bytes);
		m->n_resident++;
	}
	m->n = n;
	pthread_mutex_unlock(&g->mu);
	return rc;
#else
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

/* ---- attend ------------------------------------------------------------------------------- */

#ifdef KVT_HAVE_CUDA
static int scratch(struct kvt_tier_gpu *g, size_t bytes, char *err, size_t errlen)
{
	if (bytes <= g->scratch_bytes)
		return 0;
	kvt_cuda_free(g->ctx, g->scratch);
	g->scratch = NULL;
	g->scratch_bytes = 0;
	size_t n = bytes < (1u << 20) ? (1u << 20) : bytes;
	int rc = kvt_cuda_alloc(g->ctx, n, &g->scratch, err, errlen);
	if (rc == 0)
		g->scratch_bytes = n;
	return rc;
}
#endif

int kvt_tier_gpu_attend(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m,
			const struct kvt_seq *seq, uint32_t layer, uint32_t n_q_heads,
			float softmax_scale, const float *q, const void *tail_k,
			const void *tail_v, uint32_t n_tail, float *out, char *err,
			size_t errlen)
{
#ifdef KVT_HAVE_CUDA
	uint32_t n = kvt_seq_n_chunks(seq);
	if (!kvt_tier_gpu_tier_enabled(g))
		return -EAGAIN;
	if (!m || m->n != n || m->n_resident != n) {
		pthread_mutex_lock(&g->mu);
		g->n_attend_fallbacks++;
		pthread_mutex_unlock(&g->mu);
		return -EAGAIN;
	}
	const struct kvt_codec_config *cfg = kvt_seq_config(seq);
	size_t qb = (size_t)n_q_heads * cfg->head_dim * sizeof(float);
	size_t tb = (size_t)n_tail * cfg->n_kv_heads * cfg->head_dim * kvt_dtype_size(cfg->dtype);
	size_t tb_al = (tb + 255) & ~(size_t)255, qb_al = (qb + 255) & ~(size_t)255;
	const void **chunks = calloc(n ? n : 1, sizeof *chunks);
	const struct kvt_chunk_header **hdrs = calloc(n ? n : 1, sizeof *hdrs);
	int rc = 0;
	if (!chunks || !hdrs) {
		rc = -ENOMEM;
		goto out_free;
	}
	pthread_mutex_lock(&g->mu);
	if ((rc = kvt_cuda_ctx_bind(g->ctx, err, errlen)))
		goto out;
	for (uint32_t i = 0; i < n; i++) {
		if (m->e[i].chunk != kvt_seq_chunk(seq, i) || !m->e[i].resident) {
			rc = -EAGAIN;
			goto out;
		}
		chunks[i] = g->arena_dev + m->e[i].off;
		hdrs[i] = (const struct kvt_chunk_header *)m->e[i].chunk->bytes;
	}
	if ((rc = scratch(g, 2 * qb_al + 2 * tb_al, err, errlen)))
		goto out;
	uint8_t *s = g->scratch;
	uint8_t *q_dev = s, *out_dev = s + qb_al, *tk = s + 2 * qb_al, *tv = tk + tb_al;
	if ((rc = kvt_cuda_upload(g->ctx, q_dev, q, qb, err, errlen)))
		goto out;
	if (n_tail && ((rc = kvt_cuda_upload(g->ctx, tk, tail_k, tb, err, errlen)) ||
		       (rc = kvt_cuda_upload(g->ctx, tv, tail_v, tb, err, errlen))))
		goto out;
	struct kvt_cuda_attend_request r = {
		.cfg = cfg, .layer = layer, .n_q_heads = n_q_heads,
		.softmax_scale = softmax_scale, .q_dev = q_dev, .q_dtype = KVT_DTYPE_F32,
		.chunks_dev = chunks, .chunk_hdrs = hdrs, .n_chunks = n,
		.tail_k_dev = n_tail ? tk : NULL, .tail_v_dev = n_tail ? tv : NULL,
		.n_tail = n_tail, .out_dev = (float *)out_dev};
	if ((rc = kvt_cuda_attend(g->ctx, &r, 1, err, errlen)))
		goto out;
	rc = kvt_cuda_download(g->ctx, out, out_dev, qb, err, errlen);
	if (rc == 0)
		g->n_attends++;
out:
	if (rc == -EAGAIN)
		g->n_attend_fallbacks++;
	pthread_mutex_unlock(&g->mu);
out_free:
	free(chunks);
	free(hdrs);
	return rc;
#else
	return -EAGAIN;
#endif
}

/* ---- restore ------------------------------------------------------------------------------ */

#ifdef KVT_HAVE_CUDA
/* -EINVAL naming `field` when offset + extent bytes (overflow included) do not fit the `side`
 * allocation of `bytes`. */
static int check_extent(const char *field, const char *side, uint64_t offset, uint64_t extent,
			uint64_t bytes, char *err, size_t errlen)
{
	if (offset + extent <= bytes && offset + extent >= offset)
		return 0;
	snprintf(err, errlen, "%s %llu + %llu bytes to write exceed the %s allocation's %llu bytes",
		 field, (unsigned long long)offset, (unsigned long long)extent, side,
		 (unsigned long long)bytes);
	return -EINVAL;
}

/* mu held: the mapping of handle (opened now or cached). */
static int ipc_get(struct kvt_tier_gpu *g, const uint8_t *handle, const void *owner,
		   const struct ipc_entry *keep, struct ipc_entry **out, const char *which,
		   char *err, size_t errlen)
{
	uint64_t now = now_ms();
	struct ipc_entry *free_slot = NULL, *lru = NULL;
	for (int i = 0; i < IPC_CACHE_SLOTS; i++) {
		struct ipc_entry *e = &g->ipc[i];
		if (!e->live) {
			if (!free_slot)
				free_slot = e;
			continue;
		}
		if (memcmp(e->handle, handle, KVT_GPU_IPC_HANDLE_BYTES) == 0) {
			e->last_ms = now;
			e->owner = owner;
			*out = e;
			return 0;
		}
		if (e != keep && (!lru || e->last_ms < lru->last_ms))
			lru = e;
	}
	if (!free_slot) {
		ipc_close_locked(g, lru);
		free_slot = lru;
	}
	char e2[300] = "";
	void *base;
	uint64_t bytes;
	int rc = kvt_cuda_ipc_open(g->ctx, handle, &base, &bytes, e2, sizeof e2);
	if (rc == -EADDRINUSE) {
		/* The worker freed an allocation we still had mapped and reallocated its range:
		 * every other cached mapping may be that stale one; close them and retry. */
		for (int i = 0; i < IPC_CACHE_SLOTS; i++)
			if (g->ipc[i].live && &g->ipc[i] != keep)
				ipc_close_locked(g, &g->ipc[i]);
		g->ipc_stale_closes++;
		free_slot = NULL;
		for (int i = 0; i < IPC_CACHE_SLOTS && !free_slot; i++)
			if (!g->ipc[i].live)
				free_slot = &g->ipc[i];
		rc = kvt_cuda_ipc_open(g->ctx, handle, &base, &bytes, e2, sizeof e2);
	}
	if (rc) {
		snprintf(err, errlen, "%s: %s", which, e2);
		return rc;
	}
	memcpy(free_slot->handle, handle, KVT_GPU_IPC_HANDLE_BYTES);
	free_slot->base = base;
	free_slot->bytes = bytes;
	free_slot->last_ms = now;
	free_slot->owner = owner;
	free_slot->live = 1;
	g->ipc_opens++;
	*out = free_slot;
	return 0;
}
#endif

int kvt_tier_gpu_restore(struct kvt_tier_gpu *g, const struct kvt_seq *seq,
			 struct kvt_gpu_mirror *m, const struct kvt_gpu_restore *r,
			 struct kvt_gpu_restore_result *res, char *err, size_t errlen)
{
	memset(res, 0, sizeof *res);
#ifdef KVT_HAVE_CUDA
	uint64_t t_start = now_us();
	const struct kvt_codec_config *cfg = kvt_seq_config(seq);
	uint32_t row_bytes = cfg->n_kv_heads * cfg->head_dim * (uint32_t)kvt_dtype_size(r->dtype);
	uint64_t extent = kvt_gpu_restore_extent(r, row_bytes);
	uint32_t n_chunks = kvt_seq_n_chunks(seq);
	struct kvt_cuda_restore_chunk *chunks = calloc(n_chunks ? n_chunks : 1, sizeof *chunks);
	uint32_t nl = r->layer_end - r->layer_begin;
	const void **tails = calloc(2 * (size_t)nl, sizeof *tails);
	int rc = 0;
	if (!chunks || !tails) {
		free(chunks);
		free(tails);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	pthread_mutex_lock(&g->mu);
	if ((rc = ensure_ctx(g, err, errlen)))
		goto out;
	if (r->device_ordinal >= 0 && r->device_ordinal != g->cfg.device) {
		snprintf(err, errlen,
			 "device_ordinal %d: this kvtierd serves CUDA device %d (gpu_device); "
			 "ordinals are as this process numbers them (CUDA_VISIBLE_DEVICES)",
			 r->device_ordinal, g->cfg.device);
		rc = -EINVAL;
		goto out;
	}
	struct ipc_entry *ek = NULL, *ev = NULL;
	if ((rc = ipc_get(g, r->handle_k, r->owner, NULL, &ek, "ipc_mem_handle", err, errlen)))
		goto out;
	if ((rc = ipc_get(g, r->handle_v, r->owner, ek, &ev, "ipc_mem_handle_v", err, errlen)))
		goto out;
	/* the true allocation sizes bound what we write, whatever buffer_bytes said */
	if ((rc = check_extent("k_offset_bytes", "K", r->k_offset, extent, ek->bytes, err,
			       errlen)) ||
	    (rc = check_extent("v_offset_bytes", "V", r->v_offset, extent, ev->bytes, err,
			       errlen)))
		goto out;
	size_t nc = 0;
	for (uint32_t i = 0; i < n_chunks; i++) {
		const struct kvt_chunk *c = kvt_seq_chunk(seq, i);
		const struct kvt_chunk_header *h = (const struct kvt_chunk_header *)c->bytes;
		if (h->first_token + h->chunk_tokens <= r->token_begin ||
		    h->first_token >= r->token_end)
			continue;
		chunks[nc].hdr = h;
		chunks[nc].bytes = c->size_bytes;
		chunks[nc].host = c->bytes;
		if (m && i < m->n && m->e[i].chunk == c && m->e[i].resident)
			chunks[nc].dev = g->arena_dev + m->e[i].off;
		nc++;
	}
	uint32_t n_tail = kvt_seq_tail_tokens(seq);
	for (uint32_t l = 0; l < nl && n_tail; l++) {
		tails[l] = kvt_seq_tail_k(seq, r->layer_begin + l);
		tails[nl + l] = kvt_seq_tail_v(seq, r->layer_begin + l);
	}
	struct kvt_cuda_layout dst = {
		.k_dev = (uint8_t *)ek->base + r->k_offset,
		.v_dev = (uint8_t *)ev->base + r->v_offset,
		.layer_stride = r->layer_stride,
		.row_bytes = row_bytes,
		.block_size = r->block_size,
		.block_table = r->block_table,
		.n_block_table = r->n_block_table,
		.token_begin = r->token_begin};
	struct kvt_cuda_restore_args a = {
		.chunks = chunks, .n_chunks = nc, .chunks_pinned = 0,
		.token_begin = r->token_begin, .token_end = r->token_end,
		.layer_begin = r->layer_begin, .layer_end = r->layer_end,
		.out_dtype = r->dtype, .dst = &dst,
		.tail_k = tails, .tail_v = tails + nl,
		.tail_first = kvt_seq_tokens(seq) - n_tail, .n_tail = n_tail,
		.tail_dtype = cfg->dtype};
	struct kvt_cuda_restore_stats st;
	if (r->token_end > r->token_begin) {
		rc = kvt_cuda_restore(g->ctx, g->restorer, &a, &st, err, errlen);
		if (rc == 0) {
			res->bytes_written = st.out_bytes;
			res->h2d_bytes = st.h2d_bytes;
			g->n_restores++;
			g->restore_bytes += st.out_bytes;
			g->restore_h2d_bytes += st.h2d_bytes;
			g->restore_pinned_chunks += st.pinned_chunks;
			g->restore_staged_chunks += st.staged_chunks;
		}
	}
out:
	pthread_mutex_unlock(&g->mu);
	free(chunks);
	free(tails);
	res->elapsed_us = now_us() - t_start;
	return rc;
#else
	(void)seq;
	(void)m;
	(void)r;
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

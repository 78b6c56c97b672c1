#include "tier_gpu.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* Declarations only (no CUDA types): the device calls below are made only with
 * KVT_HAVE_CUDA; the request struct is shared with the emulated device. */
#include "kvt_cuda.h"

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

/* Returns [off, off + n) (n a multiple of the unit) to the free list; `whole` says it ends an
 * allocation (kvt_arena_free) rather than trimming one (kvt_arena_shrink). */
static void arena_release(struct kvt_arena *a, uint64_t off, uint64_t n, int whole)
{
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
	if (whole)
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

void kvt_arena_free(struct kvt_arena *a, uint64_t off, uint64_t bytes)
{
	arena_release(a, off, round_up(bytes ? bytes : 1), 1);
}

void kvt_arena_shrink(struct kvt_arena *a, uint64_t off, uint64_t old_bytes, uint64_t new_bytes)
{
	uint64_t o = round_up(old_bytes ? old_bytes : 1), n = round_up(new_bytes ? new_bytes : 1);
	if (n < o)
		arena_release(a, off + n, o - n, 0);
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
	pid_t pid; /* the exporting process when known (same pid namespace), else 0 */
	int live;
};

struct mirror_entry {
	const struct kvt_chunk *chunk; /* referenced */
	uint64_t off, bytes;           /* arena */
	int resident;
	int in_range; /* its scales and zeros fit the tensor-core kernels' f16 (KVT_CUDA_ATTEND_*) */
};

/* 1 when the chunk's quantizer parameters are within what the GPU attention kernels hold */
static int chunk_in_range(const struct kvt_chunk *c)
{
	float sm, zm;
	return kvt_chunk_param_max(c->bytes, &sm, &zm) == 0 && sm <= KVT_CUDA_ATTEND_SCALE_MAX &&
	       zm <= KVT_CUDA_ATTEND_ZERO_MAX;
}

/* A chunk kvt_tier_gpu_encode wrote into the arena, waiting for its sealing to commit: the
 * next sync adopts it for the sequence's chunk with the same header (the header's crc32c
 * covers the whole chunk) or frees it (the append failed). */
struct pre_encoded {
	uint8_t hdr[KVT_CHUNK_HEADER_BYTES];
	uint64_t off, bytes;
};

struct kvt_gpu_mirror {
	struct mirror_entry *e;
	uint32_t n, cap;
	uint64_t bytes;
	uint32_t n_resident;
	/* the tier's list of mirrors (the arena policy's candidates) */
	struct kvt_gpu_mirror *prev, *next;
	uint64_t last_use;         /* the tier's use tick at the last KVT_GPU_SYNC_USE */
	const uint32_t *pinned;    /* the session's pinned flag (atomic) or NULL */
	struct pre_encoded *pre;
	uint32_t n_pre, cap_pre;
};

struct kvt_tier_gpu {
	struct kvt_tier_gpu_config cfg;
	pthread_mutex_t mu;
	char reason[256];
	int usable;
	int ctx_failed;
	int emulate; /* KVTIER_TEST_GPU_EMULATE: host memory stands in for the device */
#ifdef KVT_HAVE_CUDA
	kvt_cuda_ctx *ctx;
	kvt_cuda_restorer *restorer;
#endif
	uint8_t *arena_dev; /* device memory (or host memory when emulated) */
	void *scratch;
	size_t scratch_bytes;
	struct kvt_arena arena;
	uint64_t arena_chunks;
	struct kvt_gpu_mirror *mirrors; /* every live mirror */
	uint64_t tick;
	struct ipc_entry ipc[IPC_CACHE_SLOTS];
	uint64_t pid_ns; /* inode of this process's pid namespace (0: unknown) */
	/* counters (under mu) */
	uint64_t n_restores, restore_bytes, restore_h2d_bytes, ipc_opens, ipc_closes;
	uint64_t n_attends, n_attend_fallbacks, n_chunk_fallbacks, ipc_stale_closes, ipc_dead_closes;
	uint64_t n_attend_range_fallbacks; /* of n_attend_fallbacks: parameters out of range */
	uint64_t restore_pinned_chunks, restore_staged_chunks;
	uint64_t n_attend_plans, n_attend_batches, n_attend_errors;
	uint64_t n_encodes, n_encodes_arena, n_encodes_cpu, n_encode_errors;
	uint64_t n_demotions, n_demoted_chunks, n_uploads;
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
	struct stat ns;
	g->pid_ns = stat("/proc/self/ns/pid", &ns) == 0 ? (uint64_t)ns.st_ino : 0;
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
	const char *em = getenv("KVTIER_TEST_GPU_EMULATE");
	if (em && *em && strcmp(em, "0") && cfg->arena_bytes && !kvt_tier_gpu_tier_enabled(g)) {
		kvt_arena_destroy(&g->arena);
		if (kvt_arena_init(&g->arena, cfg->arena_bytes)) {
			free(g);
			return -ENOMEM;
		}
		g->arena_dev = aligned_alloc(KVT_ARENA_ALIGN, g->arena.capacity ? g->arena.capacity
										 : KVT_ARENA_ALIGN);
		if (!g->arena_dev) {
			kvt_arena_destroy(&g->arena);
			free(g);
			return -ENOMEM;
		}
		g->emulate = 1;
		g->usable = 0;
		snprintf(g->reason, sizeof g->reason,
			 "the GPU tier is emulated in host memory (KVTIER_TEST_GPU_EMULATE): no "
			 "device");
	}
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
	if (g->emulate) {
		free(g->scratch);
		free(g->arena_dev);
	}
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
	return g && g->arena_dev != NULL;
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
	uint64_t stale = g->ipc_stale_closes, dead = g->ipc_dead_closes;
	uint64_t rf = g->n_attend_range_fallbacks;
	uint64_t pc = g->restore_pinned_chunks, sc = g->restore_staged_chunks;
	pthread_mutex_unlock(&g->mu);
	fn(ctx, "gpu.ipc_stale_remaps", stale);
	fn(ctx, "gpu.ipc_dead_worker_closes", dead);
	fn(ctx, "gpu.attend_range_fallbacks", rf);
	fn(ctx, "gpu.restore_dma_chunks", pc);
	fn(ctx, "gpu.restore_staged_chunks", sc);
	pthread_mutex_lock(&g->mu);
	uint64_t w[11] = {g->n_attend_plans,   g->n_attend_batches, g->n_attend_errors,
			  g->n_encodes,        g->n_encodes_arena,  g->n_encodes_cpu,
			  g->n_encode_errors,  g->n_demotions,      g->n_demoted_chunks,
			  g->n_uploads,        (uint64_t)g->emulate};
	pthread_mutex_unlock(&g->mu);
	static const char *wn[11] = {"gpu.attend_plans",        "gpu.attend_batches",
				     "gpu.attend_errors",       "gpu.encoded_chunks",
				     "gpu.encoded_into_arena",  "gpu.encoded_on_cpu",
				     "gpu.encode_errors",       "gpu.arena_demotions",
				     "gpu.arena_demoted_chunks", "gpu.arena_uploaded_chunks",
				     "gpu.emulated"};
	for (int i = 0; i < 11; i++)
		fn(ctx, wn[i], w[i]);
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
	for (int i = 0; i < IPC_CACHE_SLOTS; i++) {
		struct ipc_entry *e = &g->ipc[i];
		if (!e->live)
			continue;
		if (now - e->last_ms >= g->cfg.ipc_idle_ms) {
			ipc_close_locked(g, e);
		} else if (e->pid > 0 && kill(e->pid, 0) != 0 && errno == ESRCH) {
			/* the worker that exported it is gone: our mapping is all that keeps its
			 * memory allocated (a recycled pid only delays this to the idle time) */
			ipc_close_locked(g, e);
			g->ipc_dead_closes++;
		}
	}
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

/* ---- device operations: CUDA, or host memory when emulated (mu held) -------------------- */

static int dev_bind(struct kvt_tier_gpu *g, char *err, size_t errlen)
{
	if (g->emulate)
		return 0;
#ifdef KVT_HAVE_CUDA
	return kvt_cuda_ctx_bind(g->ctx, err, errlen);
#else
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

static int dev_upload(struct kvt_tier_gpu *g, void *dst, const void *src, size_t n, char *err,
		      size_t errlen)
{
	if (g->emulate) {
		memcpy(dst, src, n);
		return 0;
	}
#ifdef KVT_HAVE_CUDA
	return kvt_cuda_upload(g->ctx, dst, src, n, err, errlen);
#else
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

static int dev_download(struct kvt_tier_gpu *g, void *dst, const void *src, size_t n, char *err,
			size_t errlen)
{
	if (g->emulate) {
		memcpy(dst, src, n);
		return 0;
	}
#ifdef KVT_HAVE_CUDA
	return kvt_cuda_download(g->ctx, dst, src, n, err, errlen);
#else
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

/* The device scratch of Attend and encode (grown, never shrunk). */
static int dev_scratch(struct kvt_tier_gpu *g, size_t bytes, char *err, size_t errlen)
{
	if (bytes <= g->scratch_bytes)
		return 0;
	size_t n = bytes < (1u << 20) ? (1u << 20) : (size_t)round_up(bytes);
	if (g->emulate) {
		free(g->scratch);
		g->scratch = aligned_alloc(KVT_ARENA_ALIGN, n);
		g->scratch_bytes = g->scratch ? n : 0;
		if (!g->scratch) {
			snprintf(err, errlen, "out of memory for %zu bytes of scratch", n);
			return -ENOMEM;
		}
		return 0;
	}
#ifdef KVT_HAVE_CUDA
	kvt_cuda_free(g->ctx, g->scratch);
	g->scratch = NULL;
	g->scratch_bytes = 0;
	int rc = kvt_cuda_alloc(g->ctx, n, &g->scratch, err, errlen);
	if (rc == 0)
		g->scratch_bytes = n;
	return rc;
#else
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

/* Encodes one chunk from host k, v (dense [L][B][H][d]) on the device into out_dev, or into
 * scratch when out_dev is NULL; *dst says where, *size how many bytes. -EOPNOTSUPP: a config
 * the CUDA encoder does not take. */
static int dev_encode(struct kvt_tier_gpu *g, const struct kvt_codec_config *cfg,
		      uint64_t first_token, const void *k, const void *v, void *out_dev,
		      size_t out_cap, int64_t *size, void **dst, char *err, size_t errlen)
{
	size_t in = (size_t)cfg->n_layers * cfg->chunk_tokens * cfg->n_kv_heads * cfg->head_dim *
		    kvt_dtype_size(cfg->dtype);
	size_t in_al = round_up(in), cap_al = round_up(out_cap);
	int rc = dev_scratch(g, 2 * in_al + (out_dev ? 0 : cap_al), err, errlen);
	if (rc)
		return rc;
	uint8_t *kd = g->scratch, *vd = kd + in_al;
	*dst = out_dev ? out_dev : (void *)(vd + in_al);
	if (g->emulate) {
		/* the emulated device encodes from the host input directly */
		int64_t r = kvt_encode_chunk(cfg, first_token, k, v, *dst, out_cap, err, errlen);
		if (r < 0)
			return (int)r;
		*size = r;
		return 0;
	}
#ifdef KVT_HAVE_CUDA
	if ((rc = kvt_cuda_upload(g->ctx, kd, k, in, err, errlen)) ||
	    (rc = kvt_cuda_upload(g->ctx, vd, v, in, err, errlen)))
		return rc;
	struct kvt_cuda_encode_job j = {.first_token = first_token, .k_dev = kd, .v_dev = vd,
					.out_dev = *dst, .out_cap = out_cap};
	int64_t sz = 0;
	if ((rc = kvt_cuda_encode(g->ctx, cfg, &j, 1, &sz, err, errlen)) ||
	    (rc = kvt_cuda_sync(g->ctx, err, errlen)))
		return rc;
	*size = sz;
	return 0;
#else
	(void)first_token;
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
#endif
}

/* Attention over a batch of one codec: pointers are device memory (host memory when
 * emulated); q f32. One plan, one launch pair. */
static int dev_attend(struct kvt_tier_gpu *g, const struct kvt_cuda_attend_request *reqs,
		      size_t n, char *err, size_t errlen)
{
	if (g->emulate) {
		struct kvt_attend_request *a = calloc(n, sizeof *a);
		if (!a) {
			snprintf(err, errlen, "out of memory");
			return -ENOMEM;
		}
		for (size_t i = 0; i < n; i++) {
			const struct kvt_cuda_attend_request *r = &reqs[i];
			struct kvt_attend_request x = {
				.cfg = r->cfg, .layer = r->layer, .n_q_heads = r->n_q_heads,
				.softmax_scale = r->softmax_scale, .q = r->q_dev,
				.chunks = r->chunks_dev, .n_chunks = r->n_chunks,
				.tail_k = r->tail_k_dev, .tail_v = r->tail_v_dev,
				.n_tail = r->n_tail, .out = r->out_dev};
			a[i] = x;
		}
		int rc = kvt_attend(a, n, err, errlen);
		free(a);
		return rc;
	}
#ifdef KVT_HAVE_CUDA
	return kvt_cuda_attend(g->ctx, reqs, n, err, errlen);
#else
	snprintf(err, errlen, "%s", g->reason);
	return -ENODEV;
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

static void pre_free_all(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m)
{
	for (uint32_t i = 0; i < m->n_pre; i++)
		kvt_arena_free(&g->arena, m->pre[i].off, m->pre[i].bytes);
	m->n_pre = 0;
}

/* Frees every arena copy of m (its host copies stay); the chunk references stay, so the next
 * sync uploads the same chunks again. */
static void mirror_demote(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m)
{
	for (uint32_t i = 0; i < m->n; i++) {
		struct mirror_entry *e = &m->e[i];
		if (!e->resident)
			continue;
		kvt_arena_free(&g->arena, e->off, e->bytes);
		g->arena_chunks--;
		e->resident = 0;
		g->n_demoted_chunks++;
	}
	m->bytes = 0;
	m->n_resident = 0;
	pre_free_all(g, m);
	g->n_demotions++;
}

static int demotable(const struct kvt_gpu_mirror *v, const struct kvt_gpu_mirror *self)
{
	return v != self && (v->n_resident > 0 || v->n_pre > 0) &&
	       !(v->pinned && __atomic_load_n(v->pinned, __ATOMIC_RELAXED));
}

/*
 * mu held. An arena allocation of `bytes` for self. When the arena has no hole and evicting
 * is allowed (policy lru and a use of self), demotes the least recently used demotable
 * sessions one by one until it fits, but only when the free bytes plus everything demotable
 * cover `need` (all that self still lacks): demoting others for a session that cannot become
 * resident anyway would only lose their copies.
 */
static int arena_alloc_for(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *self, uint64_t bytes,
			   uint64_t need, int allow_evict, uint64_t *off)
{
	if (kvt_arena_alloc(&g->arena, bytes, off) == 0)
		return 0;
	if (!allow_evict || g->cfg.arena_keep)
		return -ENOSPC;
	uint64_t avail = g->arena.capacity - g->arena.used;
	for (struct kvt_gpu_mirror *v = g->mirrors; v; v = v->next)
		if (demotable(v, self)) {
			avail += v->bytes;
			for (uint32_t i = 0; i < v->n_pre; i++)
				avail += round_up(v->pre[i].bytes);
		}
	if (need > avail)
		return -ENOSPC;
	for (;;) {
		struct kvt_gpu_mirror *victim = NULL;
		for (struct kvt_gpu_mirror *v = g->mirrors; v; v = v->next)
			if (demotable(v, self) && (!victim || v->last_use < victim->last_use))
				victim = v;
		if (!victim)
			return -ENOSPC;
		mirror_demote(g, victim);
		if (kvt_arena_alloc(&g->arena, bytes, off) == 0)
			return 0;
	}
}

/* mu held: the session's mirror, made and linked on first use. */
static struct kvt_gpu_mirror *mirror_get(struct kvt_tier_gpu *g, struct kvt_gpu_mirror **mp,
					 const uint32_t *pinned)
{
	struct kvt_gpu_mirror *m = *mp;
	if (!m) {
		m = calloc(1, sizeof *m);
		if (!m)
			return NULL;
		m->next = g->mirrors;
		if (g->mirrors)
			g->mirrors->prev = m;
		g->mirrors = m;
		m->last_use = ++g->tick;
		*mp = m;
	}
	if (pinned)
		m->pinned = pinned;
	return m;
}

/* mu held: bytes of the chunks m tracks that are not in the arena. */
static uint64_t mirror_missing(const struct kvt_gpu_mirror *m)
{
	uint64_t b = 0;
	for (uint32_t i = 0; i < m->n; i++)
		if (!m->e[i].resident && m->e[i].chunk)
			b += round_up(m->e[i].chunk->size_bytes);
	return b;
}

void kvt_tier_gpu_mirror_free(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m)
{
	if (!m)
		return;
	pthread_mutex_lock(&g->mu);
	for (uint32_t i = 0; i < m->n; i++)
		mirror_release(g, m, i);
	pre_free_all(g, m);
	if (m->prev)
		m->prev->next = m->next;
	else
		g->mirrors = m->next;
	if (m->next)
		m->next->prev = m->prev;
	pthread_mutex_unlock(&g->mu);
	free(m->e);
	free(m->pre);
	free(m);
}

const char *kvt_tier_gpu_mirror_tier(struct kvt_tier_gpu *g, const struct kvt_gpu_mirror *m,
				     uint32_t n_chunks)
{
	if (!m || !g)
		return "host";
	pthread_mutex_lock(&g->mu);
	uint32_t r = m->n_resident;
	pthread_mutex_unlock(&g->mu);
	if (r == n_chunks)
		return "gpu";
	return r ? "gpu+host" : "host";
}

uint64_t kvt_tier_gpu_mirror_bytes(struct kvt_tier_gpu *g, const struct kvt_gpu_mirror *m)
{
	if (!m || !g)
		return 0;
	pthread_mutex_lock(&g->mu);
	uint64_t b = m->bytes;
	pthread_mutex_unlock(&g->mu);
	return b;
}

/* mu held: a chunk kvt_tier_gpu_encode left in the arena becomes entry i's copy when the
 * headers (whose crc32c covers the chunk) match; the newest record wins. */
static int adopt_pre(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m, uint32_t i)
{
	struct mirror_entry *e = &m->e[i];
	for (uint32_t j = m->n_pre; j-- > 0;) {
		struct pre_encoded *p = &m->pre[j];
		if (p->bytes != e->chunk->size_bytes ||
		    memcmp(p->hdr, e->chunk->bytes, KVT_CHUNK_HEADER_BYTES))
			continue;
		e->off = p->off;
		e->bytes = p->bytes;
		e->resident = 1;
		g->arena_chunks++;
		m->bytes += round_up(p->bytes);
		m->n_resident++;
		m->pre[j] = m->pre[--m->n_pre];
		return 1;
	}
	return 0;
}

int kvt_tier_gpu_mirror_sync(struct kvt_tier_gpu *g, struct kvt_gpu_mirror **mp,
			     const struct kvt_seq *seq, const uint32_t *pinned, unsigned flags,
			     char *err, size_t errlen)
{
	if (!kvt_tier_gpu_tier_enabled(g)) {
		snprintf(err, errlen, "no GPU tier: %s",
			 g->reason[0] ? g->reason : "gpu_arena_bytes is 0");
		return -ENODEV;
	}
	uint32_t n = kvt_seq_n_chunks(seq);
	int rc = 0;
	pthread_mutex_lock(&g->mu);
	struct kvt_gpu_mirror *m = mirror_get(g, mp, pinned);
	if (!m) {
		snprintf(err, errlen, "out of memory for a GPU mirror");
		rc = -ENOMEM;
		goto out;
	}
	if (n > m->cap) {
		/* under mu: the arena policy walks other sessions' entries */
		uint32_t nc = n < 16 ? 16 : n * 2;
		struct mirror_entry *ne = realloc(m->e, nc * sizeof *ne);
		if (!ne) {
			snprintf(err, errlen, "out of memory for %u mirror entries", nc);
			rc = -ENOMEM;
			goto out;
		}
		memset(ne + m->cap, 0, (nc - m->cap) * sizeof *ne);
		m->e = ne;
		m->cap = nc;
	}
	if ((rc = dev_bind(g, err, errlen)))
		goto out;
	if (flags & KVT_GPU_SYNC_USE)
		m->last_use = ++g->tick;
	for (uint32_t i = n; i < m->n; i++)
		mirror_release(g, m, i);
	for (uint32_t i = 0; i < n; i++) {
		const struct kvt_chunk *c = kvt_seq_chunk(seq, i);
		struct mirror_entry *e = &m->e[i];
		if (e->chunk != c)
			mirror_release(g, m, i);
		if (!e->chunk) {
			e->chunk = kvt_chunk_get(c);
			e->in_range = chunk_in_range(c);
		}
		if (!e->resident && m->n_pre)
			adopt_pre(g, m, i);
	}
	m->n = n;
	/* what was encoded for an append that did not commit */
	pre_free_all(g, m);
	/* uploads only for a use: a look at the session (StatSession) moves no data */
	uint64_t need = mirror_missing(m);
	for (uint32_t i = 0; i < n && rc == 0 && (flags & KVT_GPU_SYNC_USE); i++) {
		struct mirror_entry *e = &m->e[i];
		const struct kvt_chunk *c = e->chunk;
		if (e->resident)
			continue;
		uint64_t off;
		if (arena_alloc_for(g, m, c->size_bytes, need, 1, &off)) {
			g->n_chunk_fallbacks++;
			continue; /* stays on the host; retried at the next sync */
		}
		need -= round_up(c->size_bytes);
		rc = dev_upload(g, g->arena_dev + off, c->bytes, c->size_bytes, err, errlen);
		if (rc) {
			kvt_arena_free(&g->arena, off, c->size_bytes);
			break;
		}
		e->off = off;
		e->bytes = c->size_bytes;
		e->resident = 1;
		g->arena_chunks++;
		g->n_uploads++;
		m->bytes += round_up(c->size_bytes);
		m->n_resident++;
	}
out:
	pthread_mutex_unlock(&g->mu);
	return rc;
}

/* ---- encode ------------------------------------------------------------------------------- */

int64_t kvt_tier_gpu_encode(struct kvt_tier_gpu *g, struct kvt_gpu_mirror **mp,
			    const uint32_t *pinned, const struct kvt_codec_config *cfg,
			    uint64_t first_token, const void *k, const void *v, void *out,
			    size_t out_cap, char *err, size_t errlen)
{
	if (!kvt_tier_gpu_tier_enabled(g))
		goto cpu;
	if ((cfg->pin_detect_ratio > 0.0f && cfg->pin_detect_max > 0) ||
	    cfg->key_rounding != KVT_ROUNDING_MINMAX) {
		/* CPU-only encoder features (kvt_cuda_encode answers -EOPNOTSUPP) */
		pthread_mutex_lock(&g->mu);
		g->n_encodes_cpu++;
		pthread_mutex_unlock(&g->mu);
		goto cpu;
	}
	char e2[300] = "";
	int rc;
	pthread_mutex_lock(&g->mu);
	struct kvt_gpu_mirror *m = mirror_get(g, mp, pinned);
	if (!m || (rc = dev_bind(g, e2, sizeof e2))) {
		g->n_encode_errors++;
		pthread_mutex_unlock(&g->mu);
		goto cpu;
	}
	m->last_use = ++g->tick;
	uint64_t maxb = kvt_chunk_max_bytes(cfg), off = 0;
	int in_arena = 0;
	struct pre_encoded *np = m->pre;
	if (m->n_pre == m->cap_pre) {
		uint32_t nc = m->cap_pre ? 2 * m->cap_pre : 8;
		np = realloc(m->pre, nc * sizeof *np);
		if (np) {
			m->pre = np;
			m->cap_pre = nc;
		}
	}
	/* only free room: the sync after the append knows the whole session's need and
	 * demotes others then (a chunk encoded into scratch is uploaded by it) */
	if (np && arena_alloc_for(g, m, maxb, round_up(maxb), 0, &off) == 0)
		in_arena = 1;
	int64_t size = 0;
	void *dst = NULL;
	rc = dev_encode(g, cfg, first_token, k, v, in_arena ? g->arena_dev + off : NULL, maxb,
			&size, &dst, e2, sizeof e2);
	if (rc == 0 && (size <= 0 || (uint64_t)size > out_cap || (uint64_t)size > maxb)) {
		snprintf(e2, sizeof e2, "device encode returned %lld bytes (room %zu)",
			 (long long)size, out_cap);
		rc = -EIO;
	}
	if (rc == 0)
		rc = dev_download(g, out, dst, (size_t)size, e2, sizeof e2);
	if (rc) {
		if (in_arena)
			kvt_arena_free(&g->arena, off, maxb);
		if (rc == -EOPNOTSUPP)
			g->n_encodes_cpu++;
		else
			g->n_encode_errors++;
		pthread_mutex_unlock(&g->mu);
		goto cpu;
	}
	g->n_encodes++;
	if (in_arena) {
		kvt_arena_shrink(&g->arena, off, maxb, (uint64_t)size);
		struct pre_encoded *p = &m->pre[m->n_pre++];
		memcpy(p->hdr, out, KVT_CHUNK_HEADER_BYTES);
		p->off = off;
		p->bytes = (uint64_t)size;
		g->n_encodes_arena++;
	}
	pthread_mutex_unlock(&g->mu);
	return size;
cpu:
	return kvt_encode_chunk(cfg, first_token, k, v, out, out_cap, err, errlen);
}

/* ---- attend ------------------------------------------------------------------------------- */

/* What kvt_cuda_attend_plan_build requires to share between a batch's requests. */
static int same_codec(const struct kvt_codec_config *a, const struct kvt_codec_config *b)
{
	return a->scheme == b->scheme && a->key_bits == b->key_bits &&
	       a->value_bits == b->value_bits && a->group == b->group &&
	       a->chunk_tokens == b->chunk_tokens && a->n_kv_heads == b->n_kv_heads &&
	       a->head_dim == b->head_dim && a->dtype == b->dtype && a->rotate_v == b->rotate_v;
}

enum { ITEM_READY = 0, ITEM_NOT_RESIDENT = 1, ITEM_OUT_OF_RANGE = 2 };

/* mu held: ITEM_READY when item it can run from the arena now; ITEM_OUT_OF_RANGE when a
 * chunk's scales or zeros are past the GPU kernels' f16 range (KVT_CUDA_ATTEND_*). */
static int attend_item_ready(const struct kvt_gpu_attend_item *it)
{
	const struct kvt_codec_config *cfg = kvt_seq_config(it->seq);
	const struct kvt_gpu_mirror *m = it->m;
	if (it->n_chunks + it->n_tail == 0 || !m || m->n < it->n_chunks)
		return ITEM_NOT_RESIDENT;
	/* the GPU kernel takes equal bits, or a split with 3 on one side and 2-4 on the other
	 * (kvt_cuda_attend_plan_build: the default codec's 3/2 among them) */
	if (cfg->scheme != KVT_SCHEME_NONE && cfg->key_bits != cfg->value_bits &&
	    !((cfg->key_bits == 3 || cfg->value_bits == 3) && cfg->key_bits <= 4 &&
	      cfg->value_bits <= 4))
		return ITEM_NOT_RESIDENT;
	int out_of_range = 0;
	for (uint32_t c = 0; c < it->n_chunks; c++) {
		if (!m->e[c].resident || m->e[c].chunk != kvt_seq_chunk(it->seq, c))
			return ITEM_NOT_RESIDENT;
		out_of_range |= !m->e[c].in_range;
	}
	return out_of_range ? ITEM_OUT_OF_RANGE : ITEM_READY;
}

int kvt_tier_gpu_attend_batch(struct kvt_tier_gpu *g, struct kvt_gpu_attend_item *items,
			      size_t n, char *err, size_t errlen)
{
	for (size_t i = 0; i < n; i++)
		items[i].rc = -EAGAIN;
	if (!kvt_tier_gpu_tier_enabled(g) || n == 0)
		return 0;
	/* per item: its offset in the staging (q, tail K, tail V) and in the output region */
	size_t *in_off = calloc(n, sizeof *in_off), *out_off = calloc(n, sizeof *out_off);
	int *group = calloc(n, sizeof *group);
	uint8_t *host_in = NULL, *host_out = NULL;
	struct kvt_cuda_attend_request *reqs = NULL;
	const void **cptr = NULL;
	const struct kvt_chunk_header **hptr = NULL;
	int rc = 0;
	if (!in_off || !out_off || !group) {
		free(in_off);
		free(out_off);
		free(group);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	pthread_mutex_lock(&g->mu);
	if ((rc = dev_bind(g, err, errlen)))
		goto out;
	size_t in_bytes = 0, out_bytes = 0, n_ok = 0, max_chunks = 0;
	for (size_t i = 0; i < n; i++) {
		struct kvt_gpu_attend_item *it = &items[i];
		group[i] = -1;
		const int why = attend_item_ready(it);
		if (why != ITEM_READY) {
			g->n_attend_fallbacks++;
			g->n_attend_range_fallbacks += why == ITEM_OUT_OF_RANGE;
			continue;
		}
		const struct kvt_codec_config *cfg = kvt_seq_config(it->seq);
		size_t qb = (size_t)it->n_q_heads * cfg->head_dim * sizeof(float);
		size_t tb = (size_t)it->n_tail * cfg->n_kv_heads * cfg->head_dim *
			    kvt_dtype_size(cfg->dtype);
		in_off[i] = in_bytes;
		in_bytes += round_up(qb) + 2 * round_up(tb ? tb : 1);
		out_off[i] = out_bytes;
		out_bytes += round_up(qb);
		group[i] = 0;
		n_ok++;
		max_chunks += it->n_chunks;
	}
	if (n_ok == 0)
		goto out;
	host_in = malloc(in_bytes);
	host_out = malloc(out_bytes);
	reqs = calloc(n_ok, sizeof *reqs);
	cptr = calloc(max_chunks + 1, sizeof *cptr);
	hptr = calloc(max_chunks + 1, sizeof *hptr);
	if (!host_in || !host_out || !reqs || !cptr || !hptr) {
		snprintf(err, errlen, "out of memory for a batch of %zu items", n_ok);
		rc = -ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		const struct kvt_gpu_attend_item *it = &items[i];
		if (group[i] < 0)
			continue;
		const struct kvt_codec_config *cfg = kvt_seq_config(it->seq);
		size_t qb = (size_t)it->n_q_heads * cfg->head_dim * sizeof(float);
		size_t tb = (size_t)it->n_tail * cfg->n_kv_heads * cfg->head_dim *
			    kvt_dtype_size(cfg->dtype);
		uint8_t *p = host_in + in_off[i];
		memcpy(p, it->q, qb);
		if (tb) {
			memcpy(p + round_up(qb), it->tail_k, tb);
			memcpy(p + round_up(qb) + round_up(tb), it->tail_v, tb);
		}
	}
	if ((rc = dev_scratch(g, in_bytes + out_bytes, err, errlen)) ||
	    (rc = dev_upload(g, g->scratch, host_in, in_bytes, err, errlen)))
		goto out;
	uint8_t *s_in = g->scratch, *s_out = s_in + in_bytes;
	/* one plan per codec: items in request order within each */
	size_t done = 0, n_chunk_used = 0, n_all = n_ok;
	int next_group = 1;
	while (done < n_all && rc == 0) {
		size_t first = 0;
		while (group[first] != 0)
			first++;
		const struct kvt_codec_config *c0 = kvt_seq_config(items[first].seq);
		size_t nr = 0;
		for (size_t i = first; i < n; i++) {
			struct kvt_gpu_attend_item *it = &items[i];
			if (group[i] != 0 || !same_codec(kvt_seq_config(it->seq), c0))
				continue;
			group[i] = next_group;
			const struct kvt_codec_config *cfg = kvt_seq_config(it->seq);
			size_t qb = (size_t)it->n_q_heads * cfg->head_dim * sizeof(float);
			size_t tb = (size_t)it->n_tail * cfg->n_kv_heads * cfg->head_dim *
				    kvt_dtype_size(cfg->dtype);
			const void **cp = cptr + n_chunk_used;
			const struct kvt_chunk_header **hp = hptr + n_chunk_used;
			for (uint32_t c = 0; c < it->n_chunks; c++) {
				cp[c] = g->arena_dev + it->m->e[c].off;
				hp[c] = (const struct kvt_chunk_header *)it->m->e[c].chunk->bytes;
			}
			n_chunk_used += it->n_chunks;
			uint8_t *qd = s_in + in_off[i];
			struct kvt_cuda_attend_request r = {
				.cfg = cfg, .layer = it->layer, .n_q_heads = it->n_q_heads,
				.softmax_scale = it->softmax_scale, .q_dev = qd,
				.q_dtype = KVT_DTYPE_F32,
				.chunks_dev = cp, .chunk_hdrs = hp, .n_chunks = it->n_chunks,
				.tail_k_dev = tb ? qd + round_up(qb) : NULL,
				.tail_v_dev = tb ? qd + round_up(qb) + round_up(tb) : NULL,
				.n_tail = it->n_tail, .out_dev = (float *)(s_out + out_off[i])};
			reqs[nr++] = r;
		}
		done += nr;
		rc = dev_attend(g, reqs, nr, err, errlen);
		if (rc == -EOPNOTSUPP) {
			/* a codec the kernel does not take (yet): these items go to the CPU,
			 * the other codecs' plans still run */
			for (size_t i = first; i < n; i++)
				if (group[i] == next_group) {
					group[i] = -1;
					n_ok--;
					g->n_attend_fallbacks++;
				}
			rc = 0;
		} else {
			g->n_attend_plans++;
		}
		next_group++;
	}
	if (rc == 0 && n_ok)
		rc = dev_download(g, host_out, s_out, out_bytes, err, errlen);
	if (rc == 0) {
		for (size_t i = 0; i < n; i++) {
			struct kvt_gpu_attend_item *it = &items[i];
			if (group[i] < 0)
				continue;
			size_t qb = (size_t)it->n_q_heads * kvt_seq_config(it->seq)->head_dim *
				    sizeof(float);
			memcpy(it->out, host_out + out_off[i], qb);
			it->rc = 0;
		}
		g->n_attends += n_ok;
		if (n_ok)
			g->n_attend_batches++;
	} else {
		g->n_attend_errors++;
	}
out:
	pthread_mutex_unlock(&g->mu);
	free(in_off);
	free(out_off);
	free(group);
	free(host_in);
	free(host_out);
	free(reqs);
	free(cptr);
	free(hptr);
	return rc;
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
static int ipc_get(struct kvt_tier_gpu *g, const uint8_t *handle, const void *owner, pid_t pid,
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
			e->pid = pid;
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
	free_slot->pid = pid;
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
	/* the exporter's pid counts only when it is a pid of our namespace */
	const pid_t pid = r->worker_pid && g->pid_ns && r->worker_pid_ns == g->pid_ns
				  ? (pid_t)r->worker_pid
				  : 0;
	if ((rc = ipc_get(g, r->handle_k, r->owner, pid, NULL, &ek, "ipc_mem_handle", err,
			  errlen)))
		goto out;
	if ((rc = ipc_get(g, r->handle_v, r->owner, pid, ek, &ev, "ipc_mem_handle_v", err,
			  errlen)))
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

/*
 * tier_gpu.h - the GPU tier: one device arena allocated at start, a chunk allocator over it,
 * device mirrors of GPU-resident sessions' sealed chunks, Attend on them with the GPU
 * attention kernel, and RestoreToDevice (decode into another process's buffer through CUDA
 * IPC). Plain C: the CUDA work is behind kernels/kvt_cuda.h, and this file compiles to a
 * "no GPU" tier when kvtier was built without CUDA (KVT_HAVE_CUDA undefined).
 *
 * Availability: kvt_tier_gpu_init never fails for lack of a GPU. Without CUDA at build time,
 * with gpu_enable off, or without a device, the tier is "unavailable" with a reason
 * (kvt_tier_gpu_reason) and every GPU request answers -ENODEV with that reason; the daemon
 * then behaves exactly as without this file. The CUDA context is created lazily, on the first
 * request that needs it (or at init when the arena is enabled), so a daemon that never sees a
 * GPU request holds no device memory.
 *
 * Threads: one mutex serializes every use of the device (the context, its stream, the arena,
 * the IPC cache). A request holds it for its device work only. Lock order: a session's lock,
 * then the tier's mutex (never the other way round).
 */
#ifndef KVT_TIER_GPU_H
#define KVT_TIER_GPU_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kvt_seq.h"
#include "tier_host.h"

/* ---- the arena allocator (pure C, no device needed) ------------------------------------- */

/*
 * First-fit over a free list of extents kept sorted by offset; frees coalesce with both
 * neighbours, so the free list holds only maximal holes. Every size is rounded up to
 * KVT_ARENA_ALIGN (256 bytes). A session's chunks share one size (give or take the pin
 * table), so the holes a dropped session leaves are reused exactly by the next session of
 * the same codec; mixed sizes fragment the way any first-fit does: external fragmentation is
 * reported (largest_free vs free_bytes) and an allocation that finds no hole fails (the caller
 * keeps that chunk on the host). O(extents) per alloc/free.
 */
#define KVT_ARENA_ALIGN 256

struct kvt_arena_extent {
	uint64_t off, len;
};
struct kvt_arena {
	uint64_t capacity;
	uint64_t used;
	uint64_t allocations;
	struct kvt_arena_extent *free; /* sorted by off, never adjacent */
	size_t n_free, cap_free;
};
int kvt_arena_init(struct kvt_arena *a, uint64_t capacity);
void kvt_arena_destroy(struct kvt_arena *a);
/* 0 and *off, or -ENOSPC (no hole large enough) / -ENOMEM (bookkeeping). */
int kvt_arena_alloc(struct kvt_arena *a, uint64_t bytes, uint64_t *off);
void kvt_arena_free(struct kvt_arena *a, uint64_t off, uint64_t bytes);
/* Gives back the end of an allocation of old_bytes at off so that it holds new_bytes (<=
 * old_bytes); it stays one allocation (a chunk encoded into room for the largest chunk). */
void kvt_arena_shrink(struct kvt_arena *a, uint64_t off, uint64_t old_bytes, uint64_t new_bytes);
uint64_t kvt_arena_largest_free(const struct kvt_arena *a);

/* ---- the tier --------------------------------------------------------------------------- */

struct kvt_tier_gpu_config {
	int enable;              /* gpu_enable */
	int device;              /* gpu_device */
	uint64_t arena_bytes;    /* gpu_arena_bytes: 0 = no GPU tier (restore still works) */
	uint64_t staging_bytes;  /* gpu_staging_bytes: pinned restore staging */
	uint64_t ipc_idle_ms;    /* gpu_ipc_idle_seconds * 1000 */
	unsigned copy_threads;   /* gpu_restore_threads: host -> pinned staging copiers */
	int arena_keep;          /* gpu_arena_policy keep (1): a full arena demotes nobody;
				  * lru (0): see "Arena policy" below */
};

/*
 * Test mode (KVTIER_TEST_GPU_EMULATE=1 in the environment, any build): with gpu_arena_bytes >
 * 0 the arena lives in host memory and the tier's device work is done by the CPU codec
 * (attention by kvt_attend, encode by kvt_encode_chunk), so the arena, mirrors, batched
 * Attend, the encode hook and the arena policy run in CI without a GPU. The tier then reports
 * itself not usable (RestoreToDevice answers as without a device) but enabled.
 */

struct kvt_tier_gpu;

/* Always succeeds unless out of host memory (-ENOMEM); see "Availability" above. */
int kvt_tier_gpu_init(const struct kvt_tier_gpu_config *cfg, struct kvt_tier_gpu **out);
void kvt_tier_gpu_destroy(struct kvt_tier_gpu *g);
/* 1 when a device can be used (the context may not exist yet). */
int kvt_tier_gpu_usable(struct kvt_tier_gpu *g);
/* 1 when the GPU tier (arena) is up. */
int kvt_tier_gpu_tier_enabled(struct kvt_tier_gpu *g);
/* Why the GPU cannot be used ("" when it can). */
const char *kvt_tier_gpu_reason(struct kvt_tier_gpu *g);
/* Arena bytes / chunks; name "gpu". */
void kvt_tier_gpu_stats(struct kvt_tier_gpu *g, struct kvt_tier_stats *out,
			uint64_t *largest_free);
/* Counters for Stats: restores, restore bytes, IPC opens / closes / cached, attends, fallbacks. */
void kvt_tier_gpu_counters(struct kvt_tier_gpu *g,
			   void (*fn)(void *ctx, const char *name, uint64_t value), void *ctx);
/* Pin hooks for the host tier (kvt_tier_host_set_pin): page-lock session data so restores
 * copy it by DMA in place. Only for a usable GPU; without CUDA pin fails (-ENODEV). */
int kvt_tier_gpu_pin_host(void *p, size_t bytes);
void kvt_tier_gpu_unpin_host(void *p);
/* Closes IPC mappings idle for longer than ipc_idle_ms (the maintenance loop calls it). */
void kvt_tier_gpu_maintain(struct kvt_tier_gpu *g, uint64_t now_ms);
/* Closes the IPC mappings a session last used (DropSession / eviction). */
void kvt_tier_gpu_forget_owner(struct kvt_tier_gpu *g, const void *owner);

/* ---- GPU-resident sessions -------------------------------------------------------------- */

/*
 * A session's device mirror: for each sealed chunk i, the chunk (a reference is held, so its
 * identity cannot be reused) and its arena copy, or none when the arena had no room (that
 * chunk is served from the host). kvt_tier_gpu_mirror_sync brings it up to date with the
 * sequence (new chunks copied in, or adopted when kvt_tier_gpu_encode already wrote them into
 * the arena; chunks that are no longer the sequence's released, e.g. after Truncate). The
 * caller holds the session's lock. Every mirror field is read and written under the tier's
 * mutex, because the arena policy may demote another session's mirror.
 *
 * A sync without KVT_GPU_SYNC_USE (a look at the session: StatSession) only does the
 * bookkeeping (releases, adoptions) and moves no data; a sync flagged KVT_GPU_SYNC_USE
 * (Append, StoreEncoded, Attend, Prefetch, RestoreToDevice) uploads what is missing.
 *
 * Arena policy (gpu_arena_policy): with lru (the default), a KVT_GPU_SYNC_USE sync that finds
 * the arena full demotes whole sessions, least recently used first, until the chunks fit
 * (the GPU encoder itself only takes free room; the sync after the append, which knows the
 * whole session's need, makes room and uploads the rest): their arena copies
 * are freed (the host copies stay the source of truth; their tier becomes "host") and come
 * back at their own next use, when room exists or can be made. Sessions whose *pinned flag
 * is set and the session being synced are never demoted, and nobody is demoted unless that
 * makes the whole session fit (a session larger than the free + demotable arena stays
 * "gpu+host" without evicting anyone). With keep, new chunks that find no room stay on the
 * host (the tier says "gpu+host").
 */
struct kvt_gpu_mirror;
#define KVT_GPU_SYNC_USE 1u
/* pinned: the session's pinned flag (read atomically while the mirror lives; may be NULL). */
int kvt_tier_gpu_mirror_sync(struct kvt_tier_gpu *g, struct kvt_gpu_mirror **m,
			     const struct kvt_seq *seq, const uint32_t *pinned, unsigned flags,
			     char *err, size_t errlen);
void kvt_tier_gpu_mirror_free(struct kvt_tier_gpu *g, struct kvt_gpu_mirror *m);
/* "gpu" when every sealed chunk is in the arena, "gpu+host" when some are not, "host" when
 * none is (or no mirror). */
const char *kvt_tier_gpu_mirror_tier(struct kvt_tier_gpu *g, const struct kvt_gpu_mirror *m,
				     uint32_t n_chunks);
uint64_t kvt_tier_gpu_mirror_bytes(struct kvt_tier_gpu *g, const struct kvt_gpu_mirror *m);

/*
 * The kvt_seq encoder of a GPU-resident session (the daemon sets it with kvt_seq_set_encoder;
 * same contract as kvt_encode_chunk, session lock held): when the config is one the CUDA
 * encoder takes (no pin detection, minmax key rounding), the chunk is encoded on the device
 * straight into the arena (room for kvt_chunk_max_bytes, shrunk to the chunk; free room only)
 * and its bytes copied back to `out` (the host copy, which
 * Fetch / FetchEncoded serve); the next mirror sync adopts the arena copy instead of
 * uploading it. Without room the chunk is still encoded on the device (in scratch) and only
 * copied back. Configs the CUDA encoder refuses, and any device error, encode on the CPU.
 * The bytes are kvt_encode_chunk's either way.
 */
int64_t kvt_tier_gpu_encode(struct kvt_tier_gpu *g, struct kvt_gpu_mirror **m,
			    const uint32_t *pinned, const struct kvt_codec_config *cfg,
			    uint64_t first_token, const void *k, const void *v, void *out,
			    size_t out_cap, char *err, size_t errlen);

/*
 * One Attend item for the GPU: chunks [0, n_chunks) of seq (all must be in m's arena copy
 * when the batch runs) + the exact tail given here (host [n_tail][H][d] in the wire dtype:
 * the caller's own copy, e.g. the sequence's tail plus a staged token), q f32
 * [n_q_heads][d] (host), out f32 [n_q_heads][d] (host). rc is set by the batch.
 */
struct kvt_gpu_attend_item {
	struct kvt_gpu_mirror *m;
	const struct kvt_seq *seq;
	uint32_t n_chunks;
	uint32_t layer;
	uint32_t n_q_heads;
	float softmax_scale;
	const float *q;
	const void *tail_k;
	const void *tail_v;
	uint32_t n_tail;
	float *out;
	int rc; /* 0: out holds the result; -EAGAIN: not run on the GPU (use the CPU path) */
};

/*
 * Runs a batch of Attend items on the GPU: every query and tail uploaded in one copy, one
 * attention plan (kvt_cuda_attend: one launch pair) per codec among the items, every output
 * downloaded in one copy. An item whose chunks are not all resident (or demoted since it was
 * collected), whose session holds no tokens, or whose codec the GPU kernel does not take
 * (key_bits != value_bits, or a plan build answering -EOPNOTSUPP) gets rc -EAGAIN. A device failure gives every item -EAGAIN and is
 * returned (err says it) so the caller can log it; the CPU path then serves. The caller holds
 * the lock of every item's session. Counters: gpu.attends (items), gpu.attend_plans,
 * gpu.attend_batches, gpu.attend_host_fallbacks.
 */
int kvt_tier_gpu_attend_batch(struct kvt_tier_gpu *g, struct kvt_gpu_attend_item *items,
			      size_t n, char *err, size_t errlen);

/* ---- RestoreToDevice --------------------------------------------------------------------- */

struct kvt_gpu_restore {
	const void *owner;            /* the session: IPC mappings are tagged with it */
	const uint8_t *handle_k;      /* KVT_GPU_IPC_HANDLE_BYTES */
	const uint8_t *handle_v;      /* may equal handle_k's bytes */
	uint64_t k_offset, v_offset;
	uint64_t buffer_bytes;        /* what the client says the allocation holds */
	uint64_t layer_stride;        /* bytes */
	uint32_t block_size;          /* 0 = contiguous */
	const uint32_t *block_table;
	size_t n_block_table;
	uint64_t token_begin, token_end;
	uint32_t layer_begin, layer_end;
	uint32_t dtype;               /* f16 or bf16 */
	int device_ordinal;           /* -1: any (the daemon's) */
	uint32_t worker_pid;          /* the exporting process, 0: unknown (RestoreToDevice) */
	uint64_t worker_pid_ns;       /* inode of its pid namespace: worker_pid counts only in ours */
};
#define KVT_GPU_IPC_HANDLE_BYTES 64

/* Bytes past k_offset (or v_offset) the restore writes: the bound checked against
 * buffer_bytes. Pure arithmetic (no device), for validation before any work. */
uint64_t kvt_gpu_restore_extent(const struct kvt_gpu_restore *r, uint32_t row_bytes);

struct kvt_gpu_restore_result {
	uint64_t bytes_written;
	uint64_t h2d_bytes;
	uint64_t elapsed_us;
};
/*
 * Opens (or reuses) the mappings, checks the extents against the true allocation sizes, and
 * decodes the range of seq into them (chunks from the arena when resident, else copied from
 * the host; the exact tail copied). Session lock held. Errors: -ENODEV (no GPU: the reason in
 * err), -EINVAL (a handle, a bound or the device ordinal; err names it), -E2BIG, -EIO.
 */
int kvt_tier_gpu_restore(struct kvt_tier_gpu *g, const struct kvt_seq *seq,
			 struct kvt_gpu_mirror *m, const struct kvt_gpu_restore *r,
			 struct kvt_gpu_restore_result *res, char *err, size_t errlen);

#endif

/*
 * kvt_cuda.h - the OScaR codec and decode attention on a CUDA GPU, behind a plain-C API.
 *
 * The same chunk bytes as the CPU codec (kvt_codec.h): a chunk encoded here parses with
 * kvt_chunk_parse and decodes with kvt_decode_chunk, and the CPU's chunks decode and attend
 * here. Nothing in this header names a CUDA type: the daemon links kvt_kernels_cuda when it
 * was built and otherwise uses the CPU path.
 *
 * A context (kvt_cuda_ctx) owns one device, one stream and small staging buffers. All work
 * is enqueued on that stream in call order; kvt_cuda_sync() waits for it and reports the
 * first asynchronous error. A context is used by one thread at a time (the daemon gives each
 * GPU worker its own). Pointers named *_dev are device memory (kvt_cuda_alloc); every other
 * pointer is host memory, borrowed for the call only.
 *
 * Alignment: device chunks 16 bytes (64 recommended, as on the CPU), decode outputs 16 bytes
 * (kvt_cuda_alloc gives 256); -EINVAL otherwise.
 *
 * Errors: 0 (or a byte count) on success, a negative errno on failure, with a message in
 * `err` when it is non-NULL: -EINVAL bad argument (the message names it), -ENODEV no usable
 * GPU, -EOPNOTSUPP a configuration only the CPU codec handles (named in the message), -ENOMEM
 * device or pinned memory exhausted, -EIO any other CUDA failure (the CUDA message is
 * included). Nothing here exits or aborts on an operating error.
 */
#ifndef KVT_CUDA_H
#define KVT_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kvt_codec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most jobs one encode/decode call takes (the staging buffers are sized for it). */
#define KVT_CUDA_MAX_JOBS 1024

typedef struct kvt_cuda_ctx kvt_cuda_ctx;

/* Number of CUDA devices this process can use; 0 when there is no driver or no device
 * (never an error: callers fall back to the CPU). */
int kvt_cuda_device_count(void);

int kvt_cuda_ctx_create(int device, kvt_cuda_ctx **out, char *err, size_t errlen);
void kvt_cuda_ctx_destroy(kvt_cuda_ctx *ctx);
/* Device name and multiprocessor count, for logs and benchmarks. */
int kvt_cuda_ctx_info(kvt_cuda_ctx *ctx, char *name, size_t namelen, int *sm_count);
/* The device's free and total memory in bytes (cudaMemGetInfo): what every process on it
 * leaves free, e.g. to see that memory another process held is given back. */
int kvt_cuda_mem_info(kvt_cuda_ctx *ctx, uint64_t *free_bytes, uint64_t *total_bytes, char *err,
		      size_t errlen);
/* Waits for everything enqueued on the context's stream. */
int kvt_cuda_sync(kvt_cuda_ctx *ctx, char *err, size_t errlen);

/* Device memory and copies (synchronous unless named _async). */
int kvt_cuda_alloc(kvt_cuda_ctx *ctx, size_t bytes, void **dev, char *err, size_t errlen);
void kvt_cuda_free(kvt_cuda_ctx *ctx, void *dev);
int kvt_cuda_alloc_host(kvt_cuda_ctx *ctx, size_t bytes, void **host, char *err, size_t errlen);
void kvt_cuda_free_host(kvt_cuda_ctx *ctx, void *host);
int kvt_cuda_upload(kvt_cuda_ctx *ctx, void *dev, const void *host, size_t bytes, char *err,
		    size_t errlen);
int kvt_cuda_download(kvt_cuda_ctx *ctx, void *host, const void *dev, size_t bytes, char *err,
		      size_t errlen);
int kvt_cuda_copy_async(kvt_cuda_ctx *ctx, void *dst, const void *src, size_t bytes, char *err,
			size_t errlen);
int kvt_cuda_memset_async(kvt_cuda_ctx *ctx, void *dev, int value, size_t bytes, char *err,
			  size_t errlen);

/* ---- Encode ------------------------------------------------------------------------------ */

/* One chunk to encode: k_dev / v_dev dense [n_layers][B][H][d] in cfg->dtype (keys
 * post-RoPE); the chunk is written to out_dev (out_cap bytes). */
struct kvt_cuda_encode_job {
	uint64_t first_token;
	const void *k_dev;
	const void *v_dev;
	void *out_dev;
	size_t out_cap;
};

/*
 * Enqueues the encoding of n_jobs chunks of one config; sizes[i] receives chunk i's size in
 * bytes. The chunk layout (header, pin table, every offset and dtype) is kvt_encode_chunk's
 * and its crc32c (computed on the GPU) is that of the bytes written. Two encoders:
 *  - the tensor-core encoder (default for oscar / kivi, f16 / bf16 input, head_dim 64 or 128,
 *    G 32, 2- or 4-bit keys and values, G x H x d key tile <= 200 KB; session 6): the CPU's
 *    math in another float order, so codes may differ from the CPU's at rounding ties (by
 *    one; exact half-way values may round either way; decoded values within one quantization
 *    step), scales / zeros by a rounding of the
 *    16-bit dtype (a zero by one step where its rint(-mn / s) was a tie; in such a group the
 *    two grids differ and codes may be more than one apart, decoded values still within one
 *    step), norms by a few f32 ulps; NaN inputs give unspecified codes;
 *  - the byte-exact encoder (every other config, or KVTIER_CUDA_ENC_EXACT=1): bytes equal to
 *    kvt_encode_chunk's, except that where a group's min or max is a zero reached by both -0
 *    and +0 the stored zero may carry the other sign (same decoded values).
 * kvt_cuda_encode_is_exact(cfg) says which one a call takes now. Sinks are pinned as on the
 * CPU; pin detection (pin_detect_ratio > 0) is CPU-only for now: -EOPNOTSUPP.
 * Switches read at each call: KVTIER_CUDA_ENC_EXACT=1 (the byte-exact encoder for every
 * config); A/B switches (not for production): KVTIER_CUDA_CODEC_OLD=1 (session 2's
 * encode, crc and decode kernels), KVTIER_CUDA_ENC_INEXACT=1 (the byte-exact encoder's codes
 * from a reciprocal product alone), KVTIER_CUDA_CRC_PDL=0 (the crc pass as a plain launch
 * after the tensor-core encoder instead of its programmatic dependent; session 7),
 * KVTIER_CUDA_DEC_VARIANT=0..3.
 */
int kvt_cuda_encode(kvt_cuda_ctx *ctx, const struct kvt_codec_config *cfg,
		    const struct kvt_cuda_encode_job *jobs, size_t n_jobs, int64_t *sizes,
		    char *err, size_t errlen);

/* 1 when kvt_cuda_encode, called now with cfg, writes kvt_encode_chunk's bytes (the
 * byte-exact encoder: cfg outside the tensor-core encoder's set, or KVTIER_CUDA_ENC_EXACT=1
 * or KVTIER_CUDA_CODEC_OLD=1 in the environment), 0 when it takes the tensor-core encoder. */
int kvt_cuda_encode_is_exact(const struct kvt_codec_config *cfg);

/* ---- Decode ------------------------------------------------------------------------------ */

/*
 * One chunk range to decode: tokens [tok_begin, tok_end) (chunk-relative) of layers
 * [layer_begin, layer_end) to out_dtype (f16, bf16 or f32) in the original basis. k_out_dev /
 * v_out_dev (either may be NULL) are dense [layer_end-layer_begin][tok_end-tok_begin][H][d].
 * hdr is a host copy of the chunk's header (the daemon keeps one per chunk); the chunk must
 * have passed kvt_chunk_parse when its bytes arrived.
 */
struct kvt_cuda_decode_job {
	const void *chunk_dev;
	const struct kvt_chunk_header *hdr;
	uint32_t tok_begin, tok_end, layer_begin, layer_end;
	uint32_t out_dtype;
	void *k_out_dev;
	void *v_out_dev;
};
int kvt_cuda_decode(kvt_cuda_ctx *ctx, const struct kvt_cuda_decode_job *jobs, size_t n_jobs,
		    char *err, size_t errlen);

/* ---- Decode attention --------------------------------------------------------------------- */

/*
 * One decode step of one layer of one session, as kvt_attend_request but with device data:
 * q_dev [n_q_heads][d] in q_dtype (f16, bf16 or f32), original basis; chunks_dev[i] the
 * device copy of chunk i and chunk_hdrs[i] a host copy of its header (consecutive chunks in
 * token order); tail_k_dev / tail_v_dev [n_tail][H][d] in the wire dtype (this layer only);
 * out_dev f32 [n_q_heads][d].
 */
struct kvt_cuda_attend_request {
	const struct kvt_codec_config *cfg;
	uint32_t layer;
	uint32_t n_q_heads;
	float softmax_scale;
	const void *q_dev;
	uint32_t q_dtype;
	const void *const *chunks_dev;
	const struct kvt_chunk_header *const *chunk_hdrs;
	uint32_t n_chunks;
	const void *tail_k_dev;
	const void *tail_v_dev;
	uint32_t n_tail;
	float *out_dev;
};

/*
 * A plan: the device-side descriptors of a batch of requests (every request shares one
 * codec and shape: scheme, bits, G, B, H, d, dtype, rotate_v), split FlashDecoding-style into
 * work items that fill every multiprocessor, plus the scratch the combine step reads. Build
 * it once per step (or keep it while the chunk lists and pointers stay the same: the kernels
 * read q, chunks and tails when they run, so a plan can be replayed step after step).
 */
typedef struct kvt_cuda_attend_plan kvt_cuda_attend_plan;

int kvt_cuda_attend_plan_build(kvt_cuda_ctx *ctx, const struct kvt_cuda_attend_request *reqs,
			       size_t n_reqs, kvt_cuda_attend_plan **out, char *err,
			       size_t errlen);
/* Enqueues the attention kernel and its combine step (two launches for the whole batch).
 * The chunks a plan reads must not change while it may run. When the op enqueued right
 * before on ctx is itself an attention run (a decode loop's steps, layer after layer), the
 * INT2 kernel copies its first units' chunk bytes while the kernel ahead of it still runs
 * (an "early" run; every other input, queries and tail included, is read after that kernel
 * has completed): whatever wrote the chunks ran before that earlier run's first kernel
 * (session 11, docs/gpu.md). A/B switches (not for production) are listed in docs/gpu.md
 * ("What exists"; session 6 removed KVTIER_CUDA_I3_OLD, KVTIER_CUDA_I3_PIPE and
 * KVTIER_CUDA_I2_VARIANT=3 with the unit loops they selected). */
int kvt_cuda_attend_run(kvt_cuda_ctx *ctx, const kvt_cuda_attend_plan *plan, char *err,
			size_t errlen);
void kvt_cuda_attend_plan_destroy(kvt_cuda_attend_plan *plan);

/* What a plan reads per run: the codes, scales, zeros, norms and exact tokens of the
 * requested layer (the figure benchmarks divide by time), its work item count, and which
 * kernel it launches (tests and benchmarks say which path a batch took). */
enum kvt_cuda_attend_kernel {
	KVT_CUDA_ATT_CUDA_CORES = 0, /* any codec */
	KVT_CUDA_ATT_MMA = 1,        /* tensor cores, INT2 / INT4 / 3-bit keys + 2-bit values,
				      * head_dim 64 / 128 / 256, scales on the query side; INT8
				      * at head_dim 64 / 128 (session 19); hadamard INT2 / INT4,
				      * its key scales on the codes (session 20) */
	KVT_CUDA_ATT_I2 = 2,         /* session 2's INT2 kernel (removed in session 5; unused) */
	KVT_CUDA_ATT_KEYS_AS_B = 3,  /* the keys-as-B kernel: INT2, or 3-bit keys + 2-bit values
				      * (bf16 sessions, head_dim 128, 4 query heads per item) */
	KVT_CUDA_ATT_KEYS_AS_B_BULK = 4, /* the same with bulk-copy staging (removed after
					  * session 6; unused) */
	KVT_CUDA_ATT_SWAPPED = 5,    /* the same kernel with the swapped key orientation (keys as
				      * the MMA's A operand): INT2, or 3-bit keys + 2-bit values;
				      * bf16, and f16 sessions since session 21 */
	KVT_CUDA_ATT_EXACT_MMA = 6,  /* tensor cores over exact rows: scheme none, f16 / bf16,
				      * head_dim 64 / 128, 16-byte aligned tails (session 17) */
};
/* The tensor-core attention kernels hold a chunk's quantizer scales and zeros in f16 (the INT2
 * kernel a scale times up to 32, the packed kernel a scale times the query): chunks whose
 * largest |scale| or |zero| (kvt_chunk_param_max) passes these attend elsewhere (the GPU tier
 * sends them to the CPU; docs/gpu.md "Known limit"). Real models' K/V stay far below. */
#define KVT_CUDA_ATTEND_SCALE_MAX 2047.0f
#define KVT_CUDA_ATTEND_ZERO_MAX 16383.0f

struct kvt_cuda_attend_plan_info {
	uint64_t read_bytes;
	uint32_t n_items;
	uint32_t n_groups;
	uint32_t kernel; /* enum kvt_cuda_attend_kernel */
	uint32_t chained;    /* 1: its INT2 kernel is a programmatic dependent launch (sm_90+) */
	uint32_t early;      /* 1: chained, and its runs may start early (KVTIER_CUDA_EARLY not 0) */
	uint32_t early_runs; /* runs so far that copied chunk bytes ahead of the kernel before
			      * them (kvt_cuda_attend_run) */
	uint64_t folded_tail_tokens; /* tail tokens (summed over the groups of query heads)
				      * attended by the INT2 kernel's coded items instead of
				      * items of their own (16-byte aligned tails, session 16) */
	uint32_t tail_on_tensor_cores; /* 1: those tokens are attended on tensor cores (the
					* plans whose groups are one item each; session 18), 0: on
					* CUDA cores */
};
void kvt_cuda_attend_plan_info(const kvt_cuda_attend_plan *plan,
			       struct kvt_cuda_attend_plan_info *info);
#ifdef KVT_ATT_TIMELINE
#include <stdio.h>
/* Diagnostic builds only (-DKVT_ATT_TIMELINE for C and CUDA): prints one JSON line with the
 * last run's per-block phase times (docs/gpu.md, "Session 8: where the step's time goes"). */
int kvt_cuda_attend_timeline_print(const kvt_cuda_attend_plan *plan, FILE *f, const char *label);
#endif

/* Build + run + sync + destroy, for callers with one batch and no reuse. */
int kvt_cuda_attend(kvt_cuda_ctx *ctx, const struct kvt_cuda_attend_request *reqs,
		    size_t n_reqs, char *err, size_t errlen);

/* ---- CUDA IPC and restore into another buffer's layout (kvt_cuda_restore.cu) ------------- */

/* Makes ctx's device current on the calling thread (a context created on one thread and
 * used from another, as the daemon's request threads do). */
int kvt_cuda_ctx_bind(kvt_cuda_ctx *ctx, char *err, size_t errlen);

/* Page-locks host memory for DMA (cudaHostRegister, portable to every context) / undoes it.
 * 0 or a negative errno. kvt_cuda_host_is_pinned: 1 when p lies in pinned or registered
 * host memory. */
int kvt_cuda_host_register(void *p, size_t bytes);
void kvt_cuda_host_unregister(void *p);
int kvt_cuda_host_is_pinned(const void *p);

/* sizeof(cudaIpcMemHandle_t) */
#define KVT_CUDA_IPC_HANDLE_BYTES 64

/*
 * In the process that owns the memory (the worker): exports the cudaMalloc allocation that
 * holds dev_ptr. handle receives KVT_CUDA_IPC_HANDLE_BYTES bytes (the allocation's
 * cudaIpcMemHandle_t), *offset dev_ptr's byte offset inside that allocation and *alloc_bytes
 * its size (either may be NULL). -EINVAL when dev_ptr is not device memory of this process or
 * is not exportable (VMM / expandable segments, managed memory); -ENODEV without a device.
 */
int kvt_cuda_ipc_export(const void *dev_ptr, void *handle, uint64_t *offset,
			uint64_t *alloc_bytes, char *err, size_t errlen);
/* In the daemon: maps a handle exported by another process on ctx's device. *base is the
 * allocation's start, *alloc_bytes its true size (bounds checks use it). -EINVAL for a handle
 * that is not a live allocation of another process; -EADDRINUSE when a mapping this process
 * still holds (of an allocation the exporter has freed since) covers the range: close stale
 * mappings and retry. Close with kvt_cuda_ipc_close. */
int kvt_cuda_ipc_open(kvt_cuda_ctx *ctx, const void *handle, void **base,
		      uint64_t *alloc_bytes, char *err, size_t errlen);
void kvt_cuda_ipc_close(kvt_cuda_ctx *ctx, void *base);

/*
 * A destination layout for restore. Row r of layer l (one token: [H][d] in the out dtype,
 * row_bytes bytes) of K lives at k_dev + l * layer_stride + r * row_bytes (V likewise at
 * v_dev; either may be NULL to skip it), l relative to the restored layer range. Contiguous
 * (block_size 0): token t is row t - token_begin. Paged (block_size > 0): token t (absolute
 * position) is row block_table[t / block_size] * block_size + t % block_size, i.e. every
 * layer's pool is [n_blocks][block_size][H][d]; block_table is host memory with at least
 * ceil(token_end / block_size) entries. Addresses and strides 16-byte aligned.
 */
struct kvt_cuda_layout {
	void *k_dev;
	void *v_dev;
	uint64_t layer_stride;
	uint32_t row_bytes;
	uint32_t block_size;
	const uint32_t *block_table;
	size_t n_block_table;
	uint64_t token_begin;
};

/* One encoded chunk to restore: its bytes in host memory (host, bytes) or already on the
 * device (dev: no copy), and a host copy of its header (hdr; may point at host). */
struct kvt_cuda_restore_chunk {
	const void *host;
	const void *dev;
	size_t bytes;
	const struct kvt_chunk_header *hdr;
};

/*
 * Tokens [token_begin, token_end) of layers [layer_begin, layer_end) to out_dtype at dst:
 * the chunks that overlap the range (token order) are decoded (pinned tokens from their exact
 * copies) and the exact tail (tail_k[l] / tail_v[l]: host [n_tail][H][d] in tail_dtype for
 * layer layer_begin + l, first token tail_first) is converted and copied. chunks_pinned = 1
 * says every chunk's host bytes are pinned memory: the H2D copy then reads them in place
 * instead of through the staging slots.
 */
struct kvt_cuda_restore_args {
	const struct kvt_cuda_restore_chunk *chunks;
	size_t n_chunks;
	int chunks_pinned;
	uint64_t token_begin, token_end;
	uint32_t layer_begin, layer_end;
	uint32_t out_dtype;
	const struct kvt_cuda_layout *dst;
	const void *const *tail_k;
	const void *const *tail_v;
	uint64_t tail_first;
	uint32_t n_tail;
	uint32_t tail_dtype;
};
struct kvt_cuda_restore_stats {
	uint64_t rows;      /* token-layer rows written (each of K and V) */
	uint64_t h2d_bytes; /* encoded bytes copied host -> device */
	uint64_t out_bytes; /* bytes written at the destination */
	uint64_t pinned_chunks; /* copied by DMA straight from pinned host memory */
	uint64_t staged_chunks; /* copied through the pinned staging slots */
};

/* Pinned host + device staging (staging_bytes each, split into slots), a copy stream and
 * copy_threads threads (the caller's included) that fill the pinned slots from unpinned
 * memory: create once, reuse for every restore on the same context (one thread at a time). */
typedef struct kvt_cuda_restorer kvt_cuda_restorer;
int kvt_cuda_restorer_create(kvt_cuda_ctx *ctx, size_t staging_bytes, unsigned copy_threads,
			     kvt_cuda_restorer **out, char *err, size_t errlen);
void kvt_cuda_restorer_destroy(kvt_cuda_restorer *r);
/* Runs the whole restore and waits for it (H2D copies pipelined with the decode). -E2BIG
 * when a chunk is larger than one staging slot (staging_bytes / 4). */
int kvt_cuda_restore(kvt_cuda_ctx *ctx, kvt_cuda_restorer *r,
		     const struct kvt_cuda_restore_args *args, struct kvt_cuda_restore_stats *stats,
		     char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif

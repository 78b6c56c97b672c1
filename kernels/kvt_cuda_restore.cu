/*
 * kvt_cuda_restore.cu - CUDA IPC (export a worker's allocation, open it in the daemon) and
 * restore: encoded chunks from host memory to the device and decoded straight into another
 * buffer's layout (contiguous [layer][token][H][d] or paged blocks), the exact tail copied in.
 *
 * The pipeline (kvt_cuda_restore): chunks are grouped into batches that fit one slot of a
 * ring of KVT_RESTORE_SLOTS pinned host slots and as many device slots. For each batch the
 * host copies the chunk bytes into its pinned slot (skipped when the caller says the chunks
 * are pinned already: then the H2D copy reads them in place), the copy stream moves the slot
 * to the device, and the context's stream waits for that copy and decodes the batch into the
 * destination rows with kvt_cuda_decode (one job per chunk x layer x run of consecutive
 * destination rows). A slot is reused only after the decode that read it has finished, so
 * the host copy of batch i+2, the H2D copy of batch i+1 and the decode of batch i overlap.
 *
 * The decode kernel is kvt_cuda_codec.cu's: it writes dense rows, and a run of consecutive
 * destination rows of one layer is exactly a dense output, so no new kernel is needed.
 */
#include <cuda.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.cuh"

#define CK(call, what)                                                                       \
	do {                                                                                 \
		int rc_ = kvt_cuda_check((call), (what), err, errlen);                       \
		if (rc_)                                                                     \
			return rc_;                                                          \
	} while (0)

static_assert(sizeof(cudaIpcMemHandle_t) == KVT_CUDA_IPC_HANDLE_BYTES, "IPC handle size");

extern "C" int kvt_cuda_ctx_bind(kvt_cuda_ctx *c, char *err, size_t errlen)
{
	CK(cudaSetDevice(c->device), "cudaSetDevice");
	return 0;
}

extern "C" int kvt_cuda_host_register(void *p, size_t bytes)
{
	cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterPortable);
	if (e != cudaSuccess) {
		(void)cudaGetLastError();
		return e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
	}
	return 0;
}

extern "C" void kvt_cuda_host_unregister(void *p)
{
	if (cudaHostUnregister(p) != cudaSuccess)
		(void)cudaGetLastError();
}

extern "C" int kvt_cuda_host_is_pinned(const void *p)
{
	cudaPointerAttributes a;
	if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
		(void)cudaGetLastError();
		return 0;
	}
	return a.type == cudaMemoryTypeHost;
}

/* ---- IPC ---------------------------------------------------------------------------------- */

/* cuMemGetAddressRange through the runtime's driver entry point: no link against libcuda, so
 * binaries still load where there is no driver. */
typedef CUresult (*addr_range_fn)(CUdeviceptr *base, size_t *size, CUdeviceptr ptr);

static int address_range(const void *ptr, void **base, size_t *bytes, char *err, size_t errlen)
{
	static addr_range_fn fn;
	if (!fn) {
		void *f = NULL;
		cudaDriverEntryPointQueryResult q;
		CK(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000,
						    cudaEnableDefault, &q),
		   "driver entry point cuMemGetAddressRange");
		if (!f || q != cudaDriverEntryPointSuccess)
			return kvt_cuda_errf(err, errlen, -EIO,
					     "the driver has no cuMemGetAddressRange");
		fn = (addr_range_fn)f;
	}
	CUdeviceptr b = 0;
	size_t n = 0;
	CUresult r = fn(&b, &n, (CUdeviceptr)(uintptr_t)ptr);
	if (r != CUDA_SUCCESS)
		return kvt_cuda_errf(err, errlen, -EINVAL,
				     "%p is not device memory of this process (CUresult %d)", ptr,
				     (int)r);
	*base = (void *)(uintptr_t)b;
	*bytes = n;
	return 0;
}

extern "C" int kvt_cuda_ipc_export(const void *dev_ptr, void *handle, uint64_t *offset,
				   uint64_t *alloc_bytes, char *err, size_t errlen)
{
	void *base;
	size_t n;
	int rc;
	if (!dev_ptr || !handle)
		return kvt_cuda_errf(err, errlen, -EINVAL, "dev_ptr or handle is NULL");
	if (kvt_cuda_device_count() == 0)
		return kvt_cuda_errf(err, errlen, -ENODEV, "no CUDA device is present");
	if ((rc = address_range(dev_ptr, &base, &n, err, errlen)))
		return rc;
	cudaIpcMemHandle_t h;
	CK(cudaIpcGetMemHandle(&h, base),
	   "cudaIpcGetMemHandle (memory from cudaMalloc is exportable; VMM / expandable "
	   "segments and managed memory are not)");
	memcpy(handle, &h, sizeof h);
	if (offset)
		*offset = (uint64_t)((const uint8_t *)dev_ptr - (const uint8_t *)base);
	if (alloc_bytes)
		*alloc_bytes = n;
	return 0;
}

extern "C" int kvt_cuda_ipc_open(kvt_cuda_ctx *c, const void *handle, void **base,
				 uint64_t *alloc_bytes, char *err, size_t errlen)
{
	*base = NULL;
	cudaIpcMemHandle_t h;
	memcpy(&h, handle, sizeof h);
	CK(cudaSetDevice(c->device), "cudaSetDevice");
	cudaError_t e = cudaIpcOpenMemHandle(base, h, cudaIpcMemLazyEnablePeerAccess);
	if (e == cudaErrorAlreadyMapped) {
		/* A mapping this process still holds covers the range: the exporter freed an
		 * allocation we had open and got the same range again. The caller closes its
		 * stale mappings and retries. */
		(void)cudaGetLastError();
		return kvt_cuda_errf(err, errlen, -EADDRINUSE,
				     "cudaIpcOpenMemHandle: a stale mapping of this range is open");
	}
	if (e != cudaSuccess) {
		(void)cudaGetLastError();
		/* Invalid handles (garbage bytes, a freed allocation, our own process's memory)
		 * come back as several codes; all of them are the caller's argument. */
		return kvt_cuda_errf(err, errlen, e == cudaErrorMemoryAllocation ? -ENOMEM : -EINVAL,
				     "cudaIpcOpenMemHandle: %s (%s): the handle is not a live "
				     "allocation exported by another process on device %d",
				     cudaGetErrorString(e), cudaGetErrorName(e), c->device);
	}
	size_t n = 0;
	void *b2;
	int rc = address_range(*base, &b2, &n, err, errlen);
	if (rc) {
		cudaIpcCloseMemHandle(*base);
		*base = NULL;
		return rc;
	}
	*alloc_bytes = n;
	return 0;
}

extern "C" void kvt_cuda_ipc_close(kvt_cuda_ctx *c, void *base)
{
	if (!base)
		return;
	cudaSetDevice(c->device);
	cudaIpcCloseMemHandle(base);
	(void)cudaGetLastError();
}

/* ---- Restore ------------------------------------------------------------------------------ */

#define KVT_RESTORE_SLOTS 4
#define KVT_RESTORE_MAX_THREADS 32

/*
 * Copies into the pinned slots run on copy_threads threads: one thread's memcpy reaches
 * ~10 GB/s, below the PCIe link, so a single thread would make the host copy the bottleneck
 * of every restore from unpinned (host tier) memory. A batch's copies are cut into equal byte
 * ranges, one per thread; the caller's thread takes the first.
 */
struct copy_seg {
	uint8_t *dst;
	const uint8_t *src;
	size_t len;
};
struct copy_pool {
	pthread_mutex_t mu;
	pthread_cond_t go, done;
	unsigned n_threads; /* helpers (the caller is one more) */
	pthread_t th[KVT_RESTORE_MAX_THREADS];
	uint64_t gen;
	unsigned pending;
	int stop;
	const struct copy_seg *segs;
	size_t n_segs;
	size_t total;
	unsigned parts;
};

/* Copies bytes [lo, hi) of the concatenation of segs. */
static void copy_range(const struct copy_seg *segs, size_t n, size_t lo, size_t hi)
{
	size_t pos = 0;
	for (size_t i = 0; i < n && pos < hi; i++) {
		size_t a = pos, b = pos + segs[i].len;
		pos = b;
		if (b <= lo)
			continue;
		size_t x = a > lo ? a : lo, y = b < hi ? b : hi;
		memcpy(segs[i].dst + (x - a), segs[i].src + (x - a), y - x);
	}
}

struct copy_arg {
	struct copy_pool *p;
	unsigned index;
};

static void *copy_main(void *arg)
{
	struct copy_pool *p = ((struct copy_arg *)arg)->p;
	unsigned me = ((struct copy_arg *)arg)->index;
	free(arg);
	uint64_t seen = 0;
	pthread_mutex_lock(&p->mu);
	for (;;) {
		while (!p->stop && p->gen == seen)
			pthread_cond_wait(&p->go, &p->mu);
		if (p->stop)
			break;
		seen = p->gen;
		const struct copy_seg *segs = p->segs;
		size_t n = p->n_segs, total = p->total;
		unsigned parts = p->parts;
		pthread_mutex_unlock(&p->mu);
		size_t lo = total * (me + 1) / parts, hi = total * (me + 2) / parts;
		copy_range(segs, n, lo, hi);
		pthread_mutex_lock(&p->mu);
		if (--p->pending == 0)
			pthread_cond_signal(&p->done);
	}
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

static void pool_copy(struct copy_pool *p, const struct copy_seg *segs, size_t n)
{
	size_t total = 0;
	for (size_t i = 0; i < n; i++)
		total += segs[i].len;
	if (p->n_threads == 0 || total < (1u << 20)) {
		copy_range(segs, n, 0, total);
		return;
	}
	unsigned parts = p->n_threads + 1;
	pthread_mutex_lock(&p->mu);
	p->segs = segs;
	p->n_segs = n;
	p->total = total;
	p->parts = parts;
	p->pending = p->n_threads;
	p->gen++;
	pthread_cond_broadcast(&p->go);
	pthread_mutex_unlock(&p->mu);
	copy_range(segs, n, 0, total / parts);
	pthread_mutex_lock(&p->mu);
	while (p->pending)
		pthread_cond_wait(&p->done, &p->mu);
	pthread_mutex_unlock(&p->mu);
}

static void pool_stop(struct copy_pool *p)
{
	pthread_mutex_lock(&p->mu);
	p->stop = 1;
	pthread_cond_broadcast(&p->go);
	pthread_mutex_unlock(&p->mu);
	for (unsigned i = 0; i < p->n_threads; i++)
		pthread_join(p->th[i], NULL);
	pthread_mutex_destroy(&p->mu);
	pthread_cond_destroy(&p->go);
	pthread_cond_destroy(&p->done);
}

static int pool_start(struct copy_pool *p, unsigned threads)
{
	memset(p, 0, sizeof *p);
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->go, NULL);
	pthread_cond_init(&p->done, NULL);
	if (threads > KVT_RESTORE_MAX_THREADS)
		threads = KVT_RESTORE_MAX_THREADS;
	for (unsigned i = 0; i + 1 < threads; i++) {
		struct copy_arg *a = (struct copy_arg *)malloc(sizeof *a);
		if (!a)
			break;
		a->p = p;
		a->index = i;
		if (pthread_create(&p->th[i], NULL, copy_main, a)) {
			free(a);
			break;
		}
		p->n_threads++;
	}
	return 0;
}

struct kvt_cuda_restorer {
	int device;
	size_t slot_bytes;
	uint8_t *host;           /* pinned, KVT_RESTORE_SLOTS * slot_bytes */
	uint8_t *dev;            /* device, same */
	uint8_t *tail_host;      /* pinned, for the converted tail */
	size_t tail_bytes;
	cudaStream_t copy;
	cudaEvent_t copied[KVT_RESTORE_SLOTS];
	cudaEvent_t decoded[KVT_RESTORE_SLOTS];
	int used[KVT_RESTORE_SLOTS];
	struct kvt_cuda_decode_job *jobs; /* KVT_CUDA_MAX_JOBS */
	struct copy_pool pool;
	int pool_up;
	struct copy_seg *segs;
	size_t cap_segs;
	uint64_t n_pinned_chunks, n_staged_chunks; /* of the current restore */
};

extern "C" void kvt_cuda_restorer_destroy(kvt_cuda_restorer *r)
{
	if (!r)
		return;
	if (r->pool_up)
		pool_stop(&r->pool);
	free(r->segs);
	cudaSetDevice(r->device);
	if (r->copy)
		cudaStreamSynchronize(r->copy);
	for (int i = 0; i < KVT_RESTORE_SLOTS; i++) {
		if (r->copied[i])
			cudaEventSynchronize(r->copied[i]), cudaEventDestroy(r->copied[i]);
		if (r->decoded[i])
			cudaEventSynchronize(r->decoded[i]), cudaEventDestroy(r->decoded[i]);
	}
	if (r->copy)
		cudaStreamDestroy(r->copy);
	if (r->host)
		cudaFreeHost(r->host);
	if (r->tail_host)
		cudaFreeHost(r->tail_host);
	if (r->dev)
		cudaFree(r->dev);
	(void)cudaGetLastError();
	free(r->jobs);
	free(r);
}

extern "C" int kvt_cuda_restorer_create(kvt_cuda_ctx *c, size_t staging_bytes,
					unsigned copy_threads, kvt_cuda_restorer **out, char *err,
					size_t errlen)
{
	*out = NULL;
	if (staging_bytes < (size_t)KVT_RESTORE_SLOTS << 20)
		return kvt_cuda_errf(err, errlen, -EINVAL, "staging_bytes %zu is below %d MiB",
				     staging_bytes, KVT_RESTORE_SLOTS);
	kvt_cuda_restorer *r = (kvt_cuda_restorer *)calloc(1, sizeof *r);
	if (!r)
		return kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");
	r->device = c->device;
	r->slot_bytes = (staging_bytes / KVT_RESTORE_SLOTS) & ~(size_t)255;
	r->tail_bytes = 0;
	r->jobs = (struct kvt_cuda_decode_job *)calloc(KVT_CUDA_MAX_JOBS, sizeof *r->jobs);
	int rc = 0;
	if (!r->jobs) {
		rc = kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");
		goto fail;
	}
	if ((rc = kvt_cuda_check(cudaSetDevice(c->device), "cudaSetDevice", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaHostAlloc((void **)&r->host,
					       r->slot_bytes * KVT_RESTORE_SLOTS,
					       cudaHostAllocDefault),
				 "pinned restore staging", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaMalloc((void **)&r->dev, r->slot_bytes * KVT_RESTORE_SLOTS),
				 "device restore staging", err, errlen)) ||
	    (rc = kvt_cuda_check(cudaStreamCreateWithFlags(&r->copy, cudaStreamNonBlocking),
				 "stream create", err, errlen)))
		goto fail;
	for (int i = 0; i < KVT_RESTORE_SLOTS; i++) {
		if ((rc = kvt_cuda_check(cudaEventCreateWithFlags(&r->copied[i],
								  cudaEventDisableTiming),
					 "event create", err, errlen)) ||
		    (rc = kvt_cuda_check(cudaEventCreateWithFlags(&r->decoded[i],
								  cudaEventDisableTiming),
					 "event create", err, errlen)))
			goto fail;
	}
	pool_start(&r->pool, copy_threads ? copy_threads : 1);
	r->pool_up = 1;
	*out = r;
	return 0;
fail:
	kvt_cuda_restorer_destroy(r);
	return rc;
}

/* Destination row of token t (absolute) in layer l (relative to the range): byte address, and
 * how many rows from t on are consecutive in memory (within the range end). */
static uint8_t *row_addr(const struct kvt_cuda_layout *d, uint8_t *base, uint32_t l, uint64_t t,
			 uint64_t t_end, uint64_t *run)
{
	uint64_t slot;
	if (d->block_size == 0) {
		slot = t - d->token_begin;
		*run = t_end - t;
	} else {
		uint64_t bs = d->block_size, b = t / bs;
		slot = (uint64_t)d->block_table[b] * bs + t % bs;
		uint64_t n = bs - t % bs;
		/* physically consecutive blocks continue the run */
		while (t + n < t_end && d->block_table[b + 1] == d->block_table[b] + 1) {
			b++;
			n += bs;
		}
		*run = t + n < t_end ? n : t_end - t;
	}
	return base + (uint64_t)l * d->layer_stride + slot * d->row_bytes;
}

static int flush_jobs(kvt_cuda_ctx *c, kvt_cuda_restorer *r, size_t *n_jobs, char *err,
		      size_t errlen)
{
	if (*n_jobs == 0)
		return 0;
	int rc = kvt_cuda_decode(c, r->jobs, *n_jobs, err, errlen);
	*n_jobs = 0;
	return rc;
}

/* Adds the decode jobs of one chunk (its bytes at dev) to r->jobs, flushing when full. */
static int chunk_jobs(kvt_cuda_ctx *c, kvt_cuda_restorer *r, const struct kvt_cuda_restore_args *a,
		      const struct kvt_cuda_restore_chunk *ch, const void *dev, size_t *n_jobs,
		      uint64_t *rows, char *err, size_t errlen)
{
	const struct kvt_chunk_header *h = ch->hdr;
	uint64_t c0 = h->first_token, c1 = c0 + h->chunk_tokens;
	uint64_t x = c0 > a->token_begin ? c0 : a->token_begin;
	uint64_t y = c1 < a->token_end ? c1 : a->token_end;
	const struct kvt_cuda_layout *d = a->dst;
	for (uint64_t t = x; t < y;) {
		uint64_t run = 0;
		for (uint32_t l = a->layer_begin; l < a->layer_end; l++) {
			uint32_t lr = l - a->layer_begin;
			uint8_t *kd = d->k_dev ? row_addr(d, (uint8_t *)d->k_dev, lr, t, y, &run) : NULL;
			uint8_t *vd = d->v_dev ? row_addr(d, (uint8_t *)d->v_dev, lr, t, y, &run) : NULL;
			if (*n_jobs == KVT_CUDA_MAX_JOBS) {
				int rc = flush_jobs(c, r, n_jobs, err, errlen);
				if (rc)
					return rc;
			}
			struct kvt_cuda_decode_job *j = &r->jobs[(*n_jobs)++];
			j->chunk_dev = dev;
			j->hdr = h;
			j->tok_begin = (uint32_t)(t - c0);
			j->tok_end = (uint32_t)(t - c0 + run);
			j->layer_begin = l;
			j->layer_end = l + 1;
			j->out_dtype = a->out_dtype;
			j->k_out_dev = kd;
			j->v_out_dev = vd;
		}
		*rows += run * (a->layer_end - a->layer_begin);
		t += run;
	}
	return 0;
}

static int check_args(const struct kvt_cuda_restore_args *a, char *err, size_t errlen)
{
	const struct kvt_cuda_layout *d = a->dst;
	if (!d || (!d->k_dev && !d->v_dev))
		return kvt_cuda_errf(err, errlen, -EINVAL, "no destination");
	if (a->token_begin > a->token_end || a->layer_begin >= a->layer_end)
		return kvt_cuda_errf(err, errlen, -EINVAL, "empty or reversed range");
	if (a->out_dtype != KVT_DTYPE_F16 && a->out_dtype != KVT_DTYPE_BF16 &&
	    a->out_dtype != KVT_DTYPE_F32)
		return kvt_cuda_errf(err, errlen, -EINVAL, "out_dtype %u", a->out_dtype);
	if (((uintptr_t)d->k_dev | (uintptr_t)d->v_dev | d->layer_stride | d->row_bytes) & 15)
		return kvt_cuda_errf(err, errlen, -EINVAL,
				     "destination addresses and strides must be 16-byte aligned");
	if (d->block_size) {
		if (!d->block_table ||
		    d->n_block_table < (a->token_end + d->block_size - 1) / d->block_size)
			return kvt_cuda_errf(err, errlen, -EINVAL, "block table too short");
	} else if (d->token_begin != a->token_begin) {
		return kvt_cuda_errf(err, errlen, -EINVAL, "contiguous token_begin mismatch");
	}
	for (size_t i = 0; i < a->n_chunks; i++)
		if (!a->chunks[i].hdr || (!a->chunks[i].host && !a->chunks[i].dev))
			return kvt_cuda_errf(err, errlen, -EINVAL, "chunk %zu has no bytes", i);
	return 0;
}

/* The exact tail: converted on the host into the out dtype (pinned), then one 2D copy per
 * run of destination rows covering every layer. */
static int restore_tail(kvt_cuda_ctx *c, kvt_cuda_restorer *r,
			const struct kvt_cuda_restore_args *a, uint64_t *rows, char *err,
			size_t errlen)
{
	cudaStream_t stream = kvt_cuda_stream(c); /* any op but an attention run */
	uint64_t t0 = a->tail_first, t1 = a->tail_first + a->n_tail;
	uint64_t x = t0 > a->token_begin ? t0 : a->token_begin;
	uint64_t y = t1 < a->token_end ? t1 : a->token_end;
	if (x >= y)
		return 0;
	const struct kvt_cuda_layout *d = a->dst;
	uint32_t nl = a->layer_end - a->layer_begin;
	uint64_t n = y - x;
	size_t need = 2 * (size_t)nl * n * d->row_bytes;
	if (need > r->tail_bytes) {
		CK(cudaStreamSynchronize(stream), "restore tail wait");
		if (r->tail_host)
			cudaFreeHost(r->tail_host);
		r->tail_host = NULL;
		r->tail_bytes = 0;
		CK(cudaHostAlloc((void **)&r->tail_host, need, cudaHostAllocDefault),
		   "pinned tail staging");
		r->tail_bytes = need;
	}
	size_t elems = (size_t)d->row_bytes / kvt_dtype_size(a->out_dtype);
	size_t lb = n * d->row_bytes; /* one layer's tail rows in the staging */
	for (int kv = 0; kv < 2; kv++) {
		uint8_t *base = (uint8_t *)(kv ? d->v_dev : d->k_dev);
		if (!base)
			continue;
		const void *const *src = kv ? a->tail_v : a->tail_k;
		uint8_t *st = r->tail_host + (size_t)kv * nl * lb;
		for (uint32_t l = 0; l < nl; l++)
			kvt_convert((const uint8_t *)src[l] +
					    (x - t0) * elems * kvt_dtype_size(a->tail_dtype),
				    a->tail_dtype, st + l * lb, a->out_dtype, n * elems);
		for (uint64_t t = x; t < y;) {
			uint64_t run;
			uint8_t *dst = row_addr(d, base, 0, t, y, &run);
			size_t w = run * d->row_bytes;
			CK(cudaMemcpy2DAsync(dst, nl > 1 ? d->layer_stride : w,
					     st + (t - x) * d->row_bytes, lb, w, nl,
					     cudaMemcpyHostToDevice, stream),
			   "tail copy");
			t += run;
		}
	}
	*rows += n * nl;
	return 0;
}

extern "C" int kvt_cuda_restore(kvt_cuda_ctx *c, kvt_cuda_restorer *r,
				const struct kvt_cuda_restore_args *a,
				struct kvt_cuda_restore_stats *stats, char *err, size_t errlen)
{
	cudaStream_t st = kvt_cuda_stream(c); /* any op but an attention run */
	int rc;
	if ((rc = check_args(a, err, errlen)))
		return rc;
	CK(cudaSetDevice(c->device), "cudaSetDevice");
	r->n_pinned_chunks = r->n_staged_chunks = 0;
	uint64_t rows = 0, h2d = 0;
	size_t n_jobs = 0;
	size_t i = 0;
	unsigned slot = 0;
	while (i < a->n_chunks) {
		const struct kvt_cuda_restore_chunk *ch = &a->chunks[i];
		if (ch->dev) { /* already on the device (GPU tier) */
			if ((rc = chunk_jobs(c, r, a, ch, ch->dev, &n_jobs, &rows, err, errlen)))
				return rc;
			i++;
			continue;
		}
		/* a batch: consecutive host chunks that fit one slot */
		size_t j = i, used = 0;
		while (j < a->n_chunks && !a->chunks[j].dev) {
			size_t b = (a->chunks[j].bytes + 255) & ~(size_t)255;
			if (used + b > r->slot_bytes)
				break;
			used += b;
			j++;
		}
		if (j == i)
			return kvt_cuda_errf(err, errlen, -E2BIG,
					     "chunk %zu is %zu bytes, above the restore staging "
					     "slot (%zu bytes: raise gpu_staging_bytes)", i,
					     ch->bytes, r->slot_bytes);
		/* the slot is free once the decode that last read it has finished */
		if (r->used[slot])
			CK(cudaEventSynchronize(r->decoded[slot]), "restore slot wait");
		uint8_t *hs = r->host + (size_t)slot * r->slot_bytes;
		uint8_t *ds = r->dev + (size_t)slot * r->slot_bytes;
		size_t off = 0;
		if (j - i > r->cap_segs) {
			struct copy_seg *ns =
				(struct copy_seg *)realloc(r->segs, (j - i) * sizeof *ns);
			if (!ns)
				return kvt_cuda_errf(err, errlen, -ENOMEM, "out of memory");
			r->segs = ns;
			r->cap_segs = j - i;
		}
		/* pinned chunks are read in place by the copy engine; the others are copied into
		 * the pinned slot by the copy threads first */
		size_t n_segs = 0;
		for (size_t k = i; k < j; k++) {
			const struct kvt_cuda_restore_chunk *ck = &a->chunks[k];
			if (a->chunks_pinned || kvt_cuda_host_is_pinned(ck->host)) {
				CK(cudaMemcpyAsync(ds + off, ck->host, ck->bytes,
						   cudaMemcpyHostToDevice, r->copy),
				   "restore H2D copy");
				r->n_pinned_chunks++;
			} else {
				r->segs[n_segs].dst = hs + off;
				r->segs[n_segs].src = (const uint8_t *)ck->host;
				r->segs[n_segs].len = ck->bytes;
				n_segs++;
			}
			off += (ck->bytes + 255) & ~(size_t)255;
		}
		if (n_segs) {
			pool_copy(&r->pool, r->segs, n_segs);
			for (size_t k = 0; k < n_segs; k++)
				CK(cudaMemcpyAsync(ds + (r->segs[k].dst - hs), r->segs[k].dst,
						   r->segs[k].len, cudaMemcpyHostToDevice, r->copy),
				   "restore H2D copy");
			r->n_staged_chunks += n_segs;
		}
		h2d += off;
		CK(cudaEventRecord(r->copied[slot], r->copy), "event record");
		CK(cudaStreamWaitEvent(st, r->copied[slot], 0), "stream wait");
		off = 0;
		for (size_t k = i; k < j; k++) {
			if ((rc = chunk_jobs(c, r, a, &a->chunks[k], ds + off, &n_jobs, &rows, err,
					     errlen)))
				return rc;
			off += (a->chunks[k].bytes + 255) & ~(size_t)255;
		}
		if ((rc = flush_jobs(c, r, &n_jobs, err, errlen)))
			return rc;
		CK(cudaEventRecord(r->decoded[slot], st), "event record");
		r->used[slot] = 1;
		slot = (slot + 1) % KVT_RESTORE_SLOTS;
		i = j;
	}
	if ((rc = flush_jobs(c, r, &n_jobs, err, errlen)))
		return rc;
	if (a->n_tail && (rc = restore_tail(c, r, a, &rows, err, errlen)))
		return rc;
	CK(cudaStreamSynchronize(st), "restore");
	CK(cudaGetLastError(), "restore (asynchronous error)");
	if (stats) {
		stats->rows = rows;
		stats->h2d_bytes = h2d;
		stats->pinned_chunks = r->n_pinned_chunks;
		stats->staged_chunks = r->n_staged_chunks;
		stats->out_bytes = rows * a->dst->row_bytes * ((a->dst->k_dev ? 1 : 0) +
							      (a->dst->v_dev ? 1 : 0));
	}
	return 0;
}

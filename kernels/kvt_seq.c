/*
 * kvt_seq.c - one session's KV cache in host memory: tail + refcounted sealed chunks.
 *
 * Invariants (checked by seq_check() after every mutation):
 *   tokens = n_chunks * B + n_tail, n_tail <= tail_max, chunk i holds tokens [i*B, (i+1)*B),
 *   where tail_max is B - 1 without a recent window (recent_exact_tokens W = 0) and W with one.
 * Without a window a full tail is encoded in place ([L][B][H][d] is a chunk's input layout).
 * With one the tail buffer holds W tokens per layer; an append that would leave more than W
 * unsealed seals the oldest B at a time from a gathered copy, then moves the survivors to the
 * front of each layer's row at commit time (so the tail stays contiguous from token 0 for
 * kvt_seq_tail_k/v and kvt_attend).
 * Every mutating call first acquires everything it may need (chunk objects, a larger pointer
 * array, the tail buffer, scratch) and only then changes the sequence, so a failure anywhere
 * leaves it exactly as it was. The one exception is harmless: append may write new tokens
 * into the tail buffer beyond n_tail before it knows it will succeed; those bytes are not part
 * of the sequence until n_tail moves.
 *
 * Memory the sequence holds (the object, the chunk pointer array, the tail buffer, chunks)
 * comes from the caller's hooks. Transient scratch that never outlives a call (the encoder's
 * output before the exact-size chunk exists, gathered input, decoded prefixes) comes from
 * malloc, so the daemon's capacity accounting sees only what stays.
 */
#include "kvt_seq.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Assertions that stay on in release builds: a broken invariant here corrupts caches. */
#define SEQ_ASSERT(cond)                                                                  \
	do {                                                                              \
		if (!(cond)) {                                                            \
			fprintf(stderr, "kvt_seq: %s:%d: assertion failed: %s\n", __FILE__, \
				__LINE__, #cond);                                         \
			abort();                                                          \
		}                                                                         \
	} while (0)

struct kvt_seq {
	struct kvt_codec_config cfg;
	struct kvt_seq_alloc alloc;
	struct kvt_chunk **chunks;
	uint32_t n_chunks;
	uint32_t cap_chunks;
	uint32_t n_tail;
	uint8_t *tail;             /* K [L][cap][H][d] then V [L][cap][H][d]; may be NULL when
				    * n_tail is 0 */
	uint32_t tail_cap;         /* tokens per layer row of the tail buffer: W, or B */
	uint32_t tail_max;         /* most tokens the tail may hold: W, or B - 1 */
	size_t token_bytes;        /* one token of one layer, K or V: H * d * dtype size */
	size_t layer_tail_bytes;   /* tail_cap * token_bytes */
	size_t tail_half_bytes;    /* L * layer_tail_bytes: the K half (the V half follows) */
	uint64_t chunk_bytes;      /* sum of alloc_bytes of the referenced chunks */
	uint64_t generation;       /* bumped by every change other than kvt_seq_append */
	struct kvt_seq_encoder encoder; /* encode NULL: kvt_encode_chunk */
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static void *default_alloc(void *ctx, size_t bytes)
{
	(void)ctx;
	return aligned_alloc(KVT_CHUNK_ALIGN, (bytes + KVT_CHUNK_ALIGN - 1) &
						      ~(size_t)(KVT_CHUNK_ALIGN - 1));
}

static void default_free(void *ctx, void *p, size_t bytes)
{
	(void)ctx;
	(void)bytes;
	free(p);
}

static void *hook_alloc(const struct kvt_seq_alloc *a, size_t bytes)
{
	void *p = a->alloc(a->ctx, bytes);

	/* The hook contract promises 64-byte alignment; chunk bytes[] depend on it. */
	SEQ_ASSERT(((uintptr_t)p & (KVT_CHUNK_ALIGN - 1)) == 0);
	return p;
}

static void hook_free(const struct kvt_seq_alloc *a, void *p, size_t bytes)
{
	if (p)
		a->free(a->ctx, p, bytes);
}

/* ---- chunks -------------------------------------------------------------------------- */

static struct kvt_chunk *chunk_new(const struct kvt_seq_alloc *a, const void *bytes,
				   size_t size)
{
	size_t padded = (size + KVT_CHUNK_ALIGN - 1) & ~(size_t)(KVT_CHUNK_ALIGN - 1);
	size_t alloc_bytes = sizeof(struct kvt_chunk) + padded;
	struct kvt_chunk *c = hook_alloc(a, alloc_bytes);

	if (!c)
		return NULL;
	memset(c, 0, sizeof(*c));
	c->refcount = 1;
	c->size_bytes = size;
	c->alloc_bytes = alloc_bytes;
	c->owner = *a;
	memcpy(c->bytes, bytes, size);
	/* Zero the padding so a chunk written out whole (NVMe slot) carries no stale memory. */
	memset(c->bytes + size, 0, padded - size);
	return c;
}

const struct kvt_chunk *kvt_chunk_get(const struct kvt_chunk *c)
{
	/* The count is the one mutable field of an otherwise immutable object. */
	uint32_t *rc = &((struct kvt_chunk *)c)->refcount;
	uint32_t old = __atomic_fetch_add(rc, 1, __ATOMIC_RELAXED);

	SEQ_ASSERT(old > 0 && old < UINT32_MAX);
	return c;
}

void kvt_chunk_put(const struct kvt_chunk *c)
{
	struct kvt_chunk *m = (struct kvt_chunk *)c;
	uint32_t old;

	if (!c)
		return;
	old = __atomic_fetch_sub(&m->refcount, 1, __ATOMIC_ACQ_REL);
	SEQ_ASSERT(old > 0);
	if (old == 1) {
		struct kvt_seq_alloc owner = m->owner;

		owner.free(owner.ctx, m, m->alloc_bytes);
	}
}

uint32_t kvt_chunk_refcount(const struct kvt_chunk *c)
{
	return __atomic_load_n(&c->refcount, __ATOMIC_ACQUIRE);
}

/* ---- bookkeeping helpers --------------------------------------------------------------- */

static uint64_t seq_sealed(const struct kvt_seq *seq)
{
	return (uint64_t)seq->n_chunks * seq->cfg.chunk_tokens;
}

static void seq_check(const struct kvt_seq *seq)
{
	SEQ_ASSERT(seq->n_tail <= seq->tail_max);
	SEQ_ASSERT(seq->n_chunks <= seq->cap_chunks);
	SEQ_ASSERT(seq->n_tail == 0 || seq->tail);
}

/* A chunk pointer array with room for `need` entries, or NULL when the current one has room
 * (*fresh = 0). -ENOMEM when the hook refuses. The caller installs it with install_array. */
static int grow_array(const struct kvt_seq *seq, uint64_t need, struct kvt_chunk ***fresh,
		      uint32_t *fresh_cap, char *err, size_t errlen)
{
	uint64_t cap;

	*fresh = NULL;
	*fresh_cap = 0;
	if (need <= seq->cap_chunks)
		return 0;
	if (need > UINT32_MAX) {
		set_err(err, errlen, "chunk count %" PRIu64 " exceeds the limit %" PRIu32, need,
			UINT32_MAX);
		return -EINVAL;
	}
	cap = seq->cap_chunks ? (uint64_t)seq->cap_chunks * 2 : 16;
	if (cap < need)
		cap = need;
	if (cap > UINT32_MAX)
		cap = UINT32_MAX;
	*fresh = hook_alloc(&seq->alloc, cap * sizeof(**fresh));
	if (!*fresh) {
		set_err(err, errlen, "allocator refused %" PRIu64 " bytes for the chunk table",
			cap * (uint64_t)sizeof(**fresh));
		return -ENOMEM;
	}
	*fresh_cap = (uint32_t)cap;
	return 0;
}

static void install_array(struct kvt_seq *seq, struct kvt_chunk **fresh, uint32_t fresh_cap)
{
	if (!fresh)
		return;
	if (seq->n_chunks)
		memcpy(fresh, seq->chunks, seq->n_chunks * sizeof(*fresh));
	hook_free(&seq->alloc, seq->chunks, seq->cap_chunks * sizeof(*seq->chunks));
	seq->chunks = fresh;
	seq->cap_chunks = fresh_cap;
}

/* Allocates the tail buffer when the sequence has none. *made tells the caller to free it
 * again (drop_tail) if the call fails later. */
static int ensure_tail(struct kvt_seq *seq, int *made, char *err, size_t errlen)
{
	*made = 0;
	if (seq->tail)
		return 0;
	seq->tail = hook_alloc(&seq->alloc, 2 * seq->tail_half_bytes);
	if (!seq->tail) {
		set_err(err, errlen, "allocator refused %zu bytes for the tail buffer",
			2 * seq->tail_half_bytes);
		return -ENOMEM;
	}
	*made = 1;
	return 0;
}

static void drop_tail(struct kvt_seq *seq)
{
	SEQ_ASSERT(seq->n_tail == 0);
	hook_free(&seq->alloc, seq->tail, 2 * seq->tail_half_bytes);
	seq->tail = NULL;
}

/* Copies `count` tokens of every layer between two [L][*][H][d] tensors whose token
 * dimensions (strides) differ. */
static void copy_tokens(uint8_t *dst, size_t dst_tokens, size_t dst_tok0, const uint8_t *src,
			size_t src_tokens, size_t src_tok0, size_t count, uint32_t n_layers,
			size_t token_bytes)
{
	if (count == 0)
		return;
	for (uint32_t l = 0; l < n_layers; l++)
		memcpy(dst + ((size_t)l * dst_tokens + dst_tok0) * token_bytes,
		       src + ((size_t)l * src_tokens + src_tok0) * token_bytes,
		       count * token_bytes);
}

/* ---- create / destroy / accessors -------------------------------------------------------- */

int kvt_seq_create(const struct kvt_codec_config *cfg, const struct kvt_seq_alloc *alloc,
		   struct kvt_seq **out, char *err, size_t errlen)
{
	struct kvt_seq_alloc a = { default_alloc, default_free, NULL };
	struct kvt_seq *seq;
	int rc;

	if (!cfg || !out) {
		set_err(err, errlen, "cfg and out must not be NULL");
		return -EINVAL;
	}
	*out = NULL;
	rc = kvt_codec_config_validate(cfg, err, errlen);
	if (rc < 0)
		return rc;
	if (alloc) {
		if (!alloc->alloc || !alloc->free) {
			set_err(err, errlen, "alloc hooks: alloc and free must both be set");
			return -EINVAL;
		}
		a = *alloc;
	}
	seq = hook_alloc(&a, sizeof(*seq));
	if (!seq) {
		set_err(err, errlen, "allocator refused %zu bytes for the sequence",
			sizeof(*seq));
		return -ENOMEM;
	}
	memset(seq, 0, sizeof(*seq));
	seq->cfg = *cfg;
	seq->alloc = a;
	seq->token_bytes = (size_t)cfg->n_kv_heads * cfg->head_dim * kvt_dtype_size(cfg->dtype);
	seq->tail_cap = cfg->recent_exact_tokens ? cfg->recent_exact_tokens : cfg->chunk_tokens;
	seq->tail_max = cfg->recent_exact_tokens ? cfg->recent_exact_tokens
						 : cfg->chunk_tokens - 1;
	seq->layer_tail_bytes = (size_t)seq->tail_cap * seq->token_bytes;
	seq->tail_half_bytes = (size_t)cfg->n_layers * seq->layer_tail_bytes;
	SEQ_ASSERT(seq->token_bytes > 0);
	*out = seq;
	return 0;
}

void kvt_seq_destroy(struct kvt_seq *seq)
{
	struct kvt_seq_alloc a;

	if (!seq)
		return;
	a = seq->alloc;
	for (uint32_t i = 0; i < seq->n_chunks; i++)
		kvt_chunk_put(seq->chunks[i]);
	hook_free(&a, seq->chunks, seq->cap_chunks * sizeof(*seq->chunks));
	hook_free(&a, seq->tail, 2 * seq->tail_half_bytes);
	hook_free(&a, seq, sizeof(*seq));
}

const struct kvt_codec_config *kvt_seq_config(const struct kvt_seq *seq)
{
	return &seq->cfg;
}

uint64_t kvt_seq_tokens(const struct kvt_seq *seq)
{
	return seq_sealed(seq) + seq->n_tail;
}

uint32_t kvt_seq_n_chunks(const struct kvt_seq *seq)
{
	return seq->n_chunks;
}

uint32_t kvt_seq_tail_tokens(const struct kvt_seq *seq)
{
	return seq->n_tail;
}

const struct kvt_chunk *kvt_seq_chunk(const struct kvt_seq *seq, uint32_t i)
{
	return i < seq->n_chunks ? seq->chunks[i] : NULL;
}

const void *kvt_seq_tail_k(const struct kvt_seq *seq, uint32_t layer)
{
	if (!seq->tail || layer >= seq->cfg.n_layers)
		return NULL;
	return seq->tail + (size_t)layer * seq->layer_tail_bytes;
}

const void *kvt_seq_tail_v(const struct kvt_seq *seq, uint32_t layer)
{
	if (!seq->tail || layer >= seq->cfg.n_layers)
		return NULL;
	return seq->tail + seq->tail_half_bytes + (size_t)layer * seq->layer_tail_bytes;
}

void kvt_seq_set_encoder(struct kvt_seq *seq, const struct kvt_seq_encoder *enc)
{
	if (enc && enc->encode)
		seq->encoder = *enc;
	else
		memset(&seq->encoder, 0, sizeof(seq->encoder));
}

uint64_t kvt_seq_bytes(const struct kvt_seq *seq)
{
	return (seq->tail ? 2 * (uint64_t)seq->tail_half_bytes : 0) + seq->chunk_bytes;
}

/* ---- append -------------------------------------------------------------------------- */

/* Encodes one chunk from dense [L][B][H][d] k and v into scratch, then into a chunk object
 * of the exact size. */
static int seal_one(const struct kvt_seq *seq, uint64_t first_token, const void *k,
		    const void *v, void *scratch, size_t scratch_cap, struct kvt_chunk **out,
		    char *err, size_t errlen)
{
	int64_t size = seq->encoder.encode
			       ? seq->encoder.encode(seq->encoder.ctx, &seq->cfg, first_token, k, v,
						     scratch, scratch_cap, err, errlen)
			       : kvt_encode_chunk(&seq->cfg, first_token, k, v, scratch,
						  scratch_cap, err, errlen);

	*out = NULL;
	if (size < 0)
		return (int)size;
	SEQ_ASSERT((uint64_t)size <= scratch_cap);
	*out = chunk_new(&seq->alloc, scratch, (size_t)size);
	if (!*out) {
		set_err(err, errlen,
			"allocator refused %zu bytes for the chunk at token %" PRIu64,
			sizeof(struct kvt_chunk) + (size_t)size, first_token);
		return -ENOMEM;
	}
	return 0;
}

/* Copies `count` tokens starting at index v0 of the concatenation (the tail's n_tail tokens,
 * then the input's n) into a dense [L][B] buffer at token 0: what chunk v0 / B of an append
 * seals. */
static void gather_virtual(const struct kvt_seq *seq, uint8_t *dst, const uint8_t *tail,
			   const uint8_t *in, uint32_t n, uint64_t v0, uint32_t count)
{
	const uint32_t L = seq->cfg.n_layers, B = seq->cfg.chunk_tokens;
	uint32_t from_tail = 0;

	if (v0 < seq->n_tail)
		from_tail = (uint32_t)(seq->n_tail - v0 < count ? seq->n_tail - v0 : count);
	copy_tokens(dst, B, 0, tail, seq->tail_cap, (size_t)v0, from_tail, L, seq->token_bytes);
	copy_tokens(dst, B, from_tail, in, n, (size_t)(v0 + from_tail - seq->n_tail),
		    count - from_tail, L, seq->token_bytes);
}

/* kvt_seq_append with a recent window W: seal the oldest B unsealed tokens while more than W
 * would stay exact. Everything that can fail happens before the first change (the chunks are
 * encoded from gathered copies; the tail is rearranged only at commit). */
/* The end of a successful append: the grown chunk array and the chunks sealed into it. */
static void commit_sealed(struct kvt_seq *seq, struct kvt_chunk **fresh, uint32_t fresh_cap,
			  struct kvt_chunk **made, uint32_t n_seal)
{
	install_array(seq, fresh, fresh_cap);
	for (uint32_t j = 0; j < n_seal; j++) {
		seq->chunks[seq->n_chunks++] = made[j];
		seq->chunk_bytes += made[j]->alloc_bytes;
	}
}

/* A failed append leaves the session as it was: the chunks it sealed, the array it grew and
 * a tail buffer it allocated are given back. */
static void abort_sealing(struct kvt_seq *seq, struct kvt_chunk **made, uint32_t n_made,
			  struct kvt_chunk **fresh, uint32_t fresh_cap, int tail_made)
{
	for (uint32_t j = 0; j < n_made; j++)
		kvt_chunk_put(made[j]);
	free(made);
	hook_free(&seq->alloc, fresh, (size_t)fresh_cap * sizeof(*fresh));
	if (tail_made)
		drop_tail(seq);
}

static int append_window(struct kvt_seq *seq, const uint8_t *kin, const uint8_t *vin,
			 uint32_t n, char *err, size_t errlen)
{
	const uint32_t B = seq->cfg.chunk_tokens, L = seq->cfg.n_layers, W = seq->tail_max;
	const size_t tb = seq->token_bytes, chunk_half = (size_t)L * B * tb;
	const uint64_t total = (uint64_t)seq->n_tail + n;
	struct kvt_chunk **fresh = NULL, **made = NULL;
	uint32_t fresh_cap = 0, n_made = 0, n_seal, rem;
	uint8_t *gather = NULL;
	void *scratch = NULL;
	size_t scratch_cap;
	int tail_made = 0, rc;

	rc = ensure_tail(seq, &tail_made, err, errlen);
	if (rc < 0)
		return rc;
	if (total <= W) {
		copy_tokens(seq->tail, seq->tail_cap, seq->n_tail, kin, n, 0, n, L, tb);
		copy_tokens(seq->tail + seq->tail_half_bytes, seq->tail_cap, seq->n_tail, vin, n, 0,
			    n, L, tb);
		seq->n_tail = (uint32_t)total;
		seq_check(seq);
		return 0;
	}
	/* The fewest whole chunks that bring the exact tokens down to W or fewer. */
	n_seal = (uint32_t)((total - W + B - 1) / B);
	rem = (uint32_t)(total - (uint64_t)n_seal * B);
	SEQ_ASSERT(rem <= W && rem + B > W);

	rc = grow_array(seq, (uint64_t)seq->n_chunks + n_seal, &fresh, &fresh_cap, err, errlen);
	if (rc < 0)
		goto fail;
	scratch_cap = kvt_chunk_max_bytes(&seq->cfg);
	scratch = aligned_alloc(KVT_CHUNK_ALIGN, (scratch_cap + KVT_CHUNK_ALIGN - 1) &
							 ~(size_t)(KVT_CHUNK_ALIGN - 1));
	made = calloc(n_seal, sizeof(*made));
	gather = aligned_alloc(KVT_CHUNK_ALIGN, 2 * chunk_half);
	if (!scratch || !made || !gather) {
		set_err(err, errlen, "out of memory for %u chunk(s) of encode scratch", n_seal);
		rc = -ENOMEM;
		goto fail;
	}
	for (uint32_t j = 0; j < n_seal; j++) {
		uint64_t v0 = (uint64_t)j * B;

		gather_virtual(seq, gather, seq->tail, kin, n, v0, B);
		gather_virtual(seq, gather + chunk_half, seq->tail + seq->tail_half_bytes, vin, n,
			       v0, B);
		rc = seal_one(seq, seq_sealed(seq) + v0, gather, gather + chunk_half, scratch,
			      scratch_cap, &made[j], err, errlen);
		if (rc < 0)
			goto fail;
		n_made++;
	}

	/* Commit: nothing below can fail. */
	commit_sealed(seq, fresh, fresh_cap, made, n_seal);
	{
		const uint64_t cut = (uint64_t)n_seal * B; /* first token index that stays */
		uint32_t kept = 0, in0 = 0;

		if (cut < seq->n_tail) {
			/* Survivors of the old tail move to the front of each layer's row. */
			kept = (uint32_t)(seq->n_tail - cut);
			for (uint32_t l = 0; l < L; l++)
				for (int half = 0; half < 2; half++) {
					uint8_t *row = seq->tail + half * seq->tail_half_bytes +
						       (size_t)l * seq->layer_tail_bytes;

					memmove(row, row + (size_t)cut * tb, (size_t)kept * tb);
				}
		} else {
			in0 = (uint32_t)(cut - seq->n_tail);
		}
		copy_tokens(seq->tail, seq->tail_cap, kept, kin, n, in0, n - in0, L, tb);
		copy_tokens(seq->tail + seq->tail_half_bytes, seq->tail_cap, kept, vin, n, in0,
			    n - in0, L, tb);
		SEQ_ASSERT(kept + (n - in0) == rem);
	}
	seq->n_tail = rem;
	seq_check(seq);
	free(made);
	free(gather);
	free(scratch);
	return 0;

fail:
	abort_sealing(seq, made, n_made, fresh, fresh_cap, tail_made);
	free(gather);
	free(scratch);
	return rc;
}

int kvt_seq_append(struct kvt_seq *seq, const void *k, const void *v, uint32_t n, char *err,
		   size_t errlen)
{
	const uint32_t B = seq->cfg.chunk_tokens, L = seq->cfg.n_layers;
	const size_t tb = seq->token_bytes;
	const uint8_t *kin = k, *vin = v;
	uint64_t total = (uint64_t)seq->n_tail + n;
	uint32_t n_seal = (uint32_t)(total / B), rem = (uint32_t)(total % B);
	/* Input tokens before the first chunk that comes whole from the input. */
	const uint32_t head = seq->n_tail ? B - seq->n_tail : 0;
	struct kvt_chunk **fresh = NULL, **made = NULL;
	uint32_t fresh_cap = 0, n_made = 0;
	void *scratch = NULL;
	uint8_t *gather = NULL;
	size_t scratch_cap = 0;
	int tail_made = 0, rc;

	if (n == 0)
		return 0;
	if (!k || !v) {
		set_err(err, errlen, "k and v must not be NULL");
		return -EINVAL;
	}
	if (seq->cfg.recent_exact_tokens)
		return append_window(seq, kin, vin, n, err, errlen);
	/* The tail buffer exists only while tokens stay in it: an append that ends on a chunk
	 * boundary needs none (a prefill of whole chunks never allocates one). */
	if (rem || seq->n_tail) {
		rc = ensure_tail(seq, &tail_made, err, errlen);
		if (rc < 0)
			return rc;
	}
	if (n_seal == 0) {
		copy_tokens(seq->tail, B, seq->n_tail, kin, n, 0, n, L, tb);
		copy_tokens(seq->tail + seq->tail_half_bytes, B, seq->n_tail, vin, n, 0, n, L,
			    tb);
		seq->n_tail += n;
		seq_check(seq);
		return 0;
	}

	rc = grow_array(seq, (uint64_t)seq->n_chunks + n_seal, &fresh, &fresh_cap, err, errlen);
	if (rc < 0)
		goto fail;
	scratch_cap = kvt_chunk_max_bytes(&seq->cfg);
	scratch = aligned_alloc(KVT_CHUNK_ALIGN, (scratch_cap + KVT_CHUNK_ALIGN - 1) &
							 ~(size_t)(KVT_CHUNK_ALIGN - 1));
	made = calloc(n_seal, sizeof(*made));
	/* A chunk taken whole from the input is encoded in place when the input is exactly one
	 * chunk ([L][B][H][d] already); otherwise its tokens are gathered out of the wider
	 * input first. */
	int need_gather = n != B || seq->n_tail != 0 ? (n_seal > (seq->n_tail ? 1u : 0u)) : 0;
	if (need_gather)
		gather = aligned_alloc(KVT_CHUNK_ALIGN, 2 * seq->tail_half_bytes);
	if (!scratch || !made || (need_gather && !gather)) {
		set_err(err, errlen, "out of memory for %u chunk(s) of encode scratch", n_seal);
		rc = -ENOMEM;
		goto fail;
	}

	for (uint32_t j = 0; j < n_seal; j++) {
		uint64_t first = seq_sealed(seq) + (uint64_t)j * B;

		if (j == 0 && seq->n_tail) {
			/* The tail's free slots take the first input tokens; the old tail
			 * tokens are not overwritten, so a failure below leaves them intact. */
			copy_tokens(seq->tail, B, seq->n_tail, kin, n, 0, head, L, tb);
			copy_tokens(seq->tail + seq->tail_half_bytes, B, seq->n_tail, vin, n, 0,
				    head, L, tb);
			rc = seal_one(seq, first, seq->tail, seq->tail + seq->tail_half_bytes,
				      scratch, scratch_cap, &made[j], err, errlen);
		} else if (!need_gather) {
			rc = seal_one(seq, first, kin, vin, scratch, scratch_cap, &made[j], err,
				      errlen);
		} else {
			size_t src0 = (size_t)head + (size_t)(j - (seq->n_tail ? 1 : 0)) * B;

			copy_tokens(gather, B, 0, kin, n, src0, B, L, tb);
			copy_tokens(gather + seq->tail_half_bytes, B, 0, vin, n, src0, B, L, tb);
			rc = seal_one(seq, first, gather, gather + seq->tail_half_bytes, scratch,
				      scratch_cap, &made[j], err, errlen);
		}
		if (rc < 0)
			goto fail;
		n_made++;
	}

	/* Commit: nothing below can fail. */
	commit_sealed(seq, fresh, fresh_cap, made, n_seal);
	seq->n_tail = rem;
	if (rem) {
		copy_tokens(seq->tail, B, 0, kin, n, n - rem, rem, L, tb);
		copy_tokens(seq->tail + seq->tail_half_bytes, B, 0, vin, n, n - rem, rem, L, tb);
	} else if (seq->tail) {
		/* The tail emptied on a seal: give its B tokens of every layer back until a
		 * token needs it again. */
		drop_tail(seq);
	}
	seq_check(seq);
	free(made);
	free(gather);
	free(scratch);
	return 0;

fail:
	abort_sealing(seq, made, n_made, fresh, fresh_cap, tail_made);
	free(gather);
	free(scratch);
	return rc;
}

/* Scheme none stores key_bits 16 in the chunk header while a config may say 0 or 16. */
static uint32_t norm_bits(uint32_t scheme, uint32_t bits)
{
	return scheme == KVT_SCHEME_NONE ? 16 : bits;
}

int kvt_seq_append_chunk(struct kvt_seq *seq, const void *chunk, size_t len, char *err,
			 size_t errlen)
{
	const struct kvt_codec_config *s = &seq->cfg;
	struct kvt_codec_config c;
	struct kvt_chunk_header hdr;
	struct kvt_chunk **fresh = NULL;
	struct kvt_chunk *obj;
	uint32_t fresh_cap = 0;
	int rc;

	if (!chunk) {
		set_err(err, errlen, "chunk must not be NULL");
		return -EINVAL;
	}
	if (seq->n_tail != 0) {
		set_err(err, errlen,
			"the session's tail holds %u tokens; encoded chunks can only be stored "
			"while the tail is empty",
			seq->n_tail);
		return -EINVAL;
	}
	rc = kvt_chunk_parse(chunk, len, &c, &hdr, err, errlen); /* len == total_bytes too */
	if (rc < 0)
		return rc;
#define SEQ_SAME(field, a, b)                                                             \
	do {                                                                              \
		if ((a) != (b)) {                                                         \
			set_err(err, errlen, "chunk " field " %u differs from the session's %u", \
				(unsigned)(a), (unsigned)(b));                            \
			return -EINVAL;                                                   \
		}                                                                         \
	} while (0)
	SEQ_SAME("scheme", c.scheme, s->scheme);
	SEQ_SAME("key_bits", norm_bits(c.scheme, c.key_bits), norm_bits(s->scheme, s->key_bits));
	SEQ_SAME("value_bits", norm_bits(c.scheme, c.value_bits),
		 norm_bits(s->scheme, s->value_bits));
	SEQ_SAME("group", c.group, s->group);
	SEQ_SAME("chunk_tokens", c.chunk_tokens, s->chunk_tokens);
	SEQ_SAME("n_layers", c.n_layers, s->n_layers);
	SEQ_SAME("n_kv_heads", c.n_kv_heads, s->n_kv_heads);
	SEQ_SAME("head_dim", c.head_dim, s->head_dim);
	SEQ_SAME("dtype", c.dtype, s->dtype);
	SEQ_SAME("rotate_v", c.rotate_v, s->rotate_v);
	SEQ_SAME("n_sinks", c.n_sinks, s->n_sinks);
#undef SEQ_SAME
	if (hdr.first_token != kvt_seq_tokens(seq)) {
		set_err(err, errlen,
			"chunk first_token %" PRIu64 " is not the session's next token %" PRIu64,
			(uint64_t)hdr.first_token, kvt_seq_tokens(seq));
		return -EINVAL;
	}
	rc = grow_array(seq, (uint64_t)seq->n_chunks + 1, &fresh, &fresh_cap, err, errlen);
	if (rc < 0)
		return rc;
	obj = chunk_new(&seq->alloc, chunk, len);
	if (!obj) {
		hook_free(&seq->alloc, fresh, (size_t)fresh_cap * sizeof(*fresh));
		set_err(err, errlen, "allocator refused %zu bytes for the chunk at token %" PRIu64,
			sizeof(struct kvt_chunk) + len, (uint64_t)hdr.first_token);
		return -ENOMEM;
	}
	install_array(seq, fresh, fresh_cap);
	seq->chunks[seq->n_chunks++] = obj;
	seq->chunk_bytes += obj->alloc_bytes;
	seq->generation++;
	seq_check(seq);
	return 0;
}

/* ---- fetch / attend ---------------------------------------------------------------------- */

int kvt_seq_fetch(const struct kvt_seq *seq, uint64_t t0, uint64_t t1, uint32_t l0,
		  uint32_t l1, uint32_t out_dtype, void *k_out, void *v_out, char *err,
		  size_t errlen)
{
	const uint32_t B = seq->cfg.chunk_tokens;
	const uint64_t tokens = kvt_seq_tokens(seq), sealed = seq_sealed(seq);
	const size_t hd = (size_t)seq->cfg.n_kv_heads * seq->cfg.head_dim;
	size_t os = kvt_dtype_size(out_dtype), out_tok;
	uint64_t nt;
	uint8_t *ko = k_out, *vo = v_out;

	if (os == 0) {
		set_err(err, errlen, "out_dtype %u is not one of f16 (1), bf16 (2), f32 (3)",
			out_dtype);
		return -EINVAL;
	}
	if (t0 > t1 || t1 > tokens) {
		set_err(err, errlen,
			"token range [t0 %" PRIu64 ", t1 %" PRIu64 ") is not inside the "
			"session's %" PRIu64 " tokens",
			t0, t1, tokens);
		return -EINVAL;
	}
	if (l0 > l1 || l1 > seq->cfg.n_layers) {
		set_err(err, errlen,
			"layer range [l0 %u, l1 %u) is not inside the session's n_layers %u", l0,
			l1, seq->cfg.n_layers);
		return -EINVAL;
	}
	if (!k_out && !v_out) {
		set_err(err, errlen, "k_out and v_out are both NULL");
		return -EINVAL;
	}
	nt = t1 - t0;
	out_tok = hd * os;
	if (nt == 0 || l0 == l1)
		return 0;

	for (uint64_t c = t0 / B; c < seq->n_chunks && c * B < t1; c++) {
		const uint8_t *bytes = seq->chunks[c]->bytes;
		uint32_t a = (uint32_t)((t0 > c * B ? t0 : c * B) - c * B);
		uint32_t b = (uint32_t)((t1 < (c + 1) * B ? t1 : (c + 1) * B) - c * B);
		uint64_t at = c * B + a - t0; /* output token index of chunk token a */
		int rc;

		if (nt == b - a) {
			/* The whole request sits in this chunk: the output layout is the
			 * decoder's, one call for every layer. */
			rc = kvt_decode_chunk(bytes, a, b, l0, l1, out_dtype, ko, vo, err,
					      errlen);
			if (rc < 0)
				return rc;
			continue;
		}
		for (uint32_t l = l0; l < l1; l++) {
			size_t off = ((size_t)(l - l0) * nt + at) * out_tok;

			rc = kvt_decode_chunk(bytes, a, b, l, l + 1, out_dtype,
					      ko ? ko + off : NULL, vo ? vo + off : NULL, err,
					      errlen);
			if (rc < 0)
				return rc;
		}
	}
	if (t1 > sealed) {
		uint64_t ts = t0 > sealed ? t0 : sealed;
		size_t n = (size_t)(t1 - ts);

		for (uint32_t l = l0; l < l1; l++) {
			size_t off = ((size_t)(l - l0) * nt + (ts - t0)) * out_tok;
			size_t src = (size_t)l * seq->layer_tail_bytes +
				     (size_t)(ts - sealed) * seq->token_bytes;

			if (ko)
				kvt_convert(seq->tail + src, seq->cfg.dtype, ko + off, out_dtype,
					    n * hd);
			if (vo)
				kvt_convert(seq->tail + seq->tail_half_bytes + src,
					    seq->cfg.dtype, vo + off, out_dtype, n * hd);
		}
	}
	return 0;
}

int kvt_seq_attend(const struct kvt_seq *seq, uint32_t layer, uint32_t n_q_heads,
		   float softmax_scale, const float *q, float *out, char *err, size_t errlen)
{
	struct kvt_attend_request req;
	const void *local[64];
	const void **ptrs = local;
	int rc;

	if (layer >= seq->cfg.n_layers) {
		set_err(err, errlen, "layer %u is out of range (n_layers %u)", layer,
			seq->cfg.n_layers);
		return -EINVAL;
	}
	if (n_q_heads == 0 || n_q_heads % seq->cfg.n_kv_heads != 0) {
		set_err(err, errlen, "n_q_heads %u is not a positive multiple of n_kv_heads %u",
			n_q_heads, seq->cfg.n_kv_heads);
		return -EINVAL;
	}
	if (!q || !out) {
		set_err(err, errlen, "q and out must not be NULL");
		return -EINVAL;
	}
	if (kvt_seq_tokens(seq) == 0) {
		set_err(err, errlen, "the session holds no tokens to attend to");
		return -EINVAL;
	}
	/* Short sessions (up to 64 chunks, 8K tokens at B 128) attend without a malloc. */
	if (seq->n_chunks > sizeof(local) / sizeof(local[0])) {
		ptrs = malloc(seq->n_chunks * sizeof(*ptrs));
		if (!ptrs) {
			set_err(err, errlen, "out of memory for %u chunk pointers", seq->n_chunks);
			return -ENOMEM;
		}
	}
	for (uint32_t i = 0; i < seq->n_chunks; i++)
		ptrs[i] = seq->chunks[i]->bytes;
	memset(&req, 0, sizeof(req));
	req.cfg = &seq->cfg;
	req.layer = layer;
	req.n_q_heads = n_q_heads;
	req.softmax_scale = softmax_scale;
	req.q = q;
	req.chunks = seq->n_chunks ? ptrs : NULL;
	req.n_chunks = seq->n_chunks;
	req.tail_k = kvt_seq_tail_k(seq, layer);
	req.tail_v = kvt_seq_tail_v(seq, layer);
	req.n_tail = seq->n_tail;
	req.out = out;
	rc = kvt_attend(&req, 1, err, errlen);
	if (ptrs != local)
		free(ptrs);
	return rc;
}

/* ---- fork / truncate ---------------------------------------------------------------------- */

/* Decodes tokens [0, rem) of chunk c (all layers) into dst's tail, layer by layer, in the
 * wire dtype. dst->tail must exist. Pinned tokens come back exact from the decoder. */
static int decode_prefix_into(struct kvt_seq *dst, uint8_t *tail, const struct kvt_chunk *c,
			      uint32_t rem, char *err, size_t errlen)
{
	for (uint32_t l = 0; l < dst->cfg.n_layers; l++) {
		size_t off = (size_t)l * dst->layer_tail_bytes;
		int rc = kvt_decode_chunk(c->bytes, 0, rem, l, l + 1, dst->cfg.dtype, tail + off,
					  tail + dst->tail_half_bytes + off, err, errlen);

		if (rc < 0)
			return rc;
	}
	return 0;
}

int kvt_seq_fork(const struct kvt_seq *src, uint64_t n_tokens,
		 const struct kvt_seq_alloc *alloc, struct kvt_seq **out, char *err,
		 size_t errlen)
{
	const uint32_t B = src->cfg.chunk_tokens;
	const uint64_t sealed = seq_sealed(src);
	struct kvt_seq *dst = NULL;
	struct kvt_chunk **fresh = NULL;
	uint32_t fresh_cap = 0, n_full, rem;
	int made, rc;

	if (!out) {
		set_err(err, errlen, "out must not be NULL");
		return -EINVAL;
	}
	*out = NULL;
	if (n_tokens > kvt_seq_tokens(src)) {
		set_err(err, errlen,
			"fork n_tokens %" PRIu64 " exceeds the source's %" PRIu64 " tokens",
			n_tokens, kvt_seq_tokens(src));
		return -EINVAL;
	}
	rc = kvt_seq_create(&src->cfg, alloc, &dst, err, errlen);
	if (rc < 0)
		return rc;
	if (n_tokens <= sealed) {
		n_full = (uint32_t)(n_tokens / B);
		rem = (uint32_t)(n_tokens % B);
	} else {
		n_full = src->n_chunks;
		rem = (uint32_t)(n_tokens - sealed);
	}
	rc = grow_array(dst, n_full, &fresh, &fresh_cap, err, errlen);
	if (rc < 0)
		goto fail;
	install_array(dst, fresh, fresh_cap);
	if (rem) {
		/* A fresh sequence: kvt_seq_destroy frees the tail on failure. */
		rc = ensure_tail(dst, &made, err, errlen);
		(void)made;
		if (rc < 0)
			goto fail;
		if (n_tokens <= sealed) {
			rc = decode_prefix_into(dst, dst->tail, src->chunks[n_full], rem, err,
						errlen);
			if (rc < 0)
				goto fail;
		} else {
			copy_tokens(dst->tail, dst->tail_cap, 0, src->tail, src->tail_cap, 0, rem,
				    src->cfg.n_layers, src->token_bytes);
			copy_tokens(dst->tail + dst->tail_half_bytes, dst->tail_cap, 0,
				    src->tail + src->tail_half_bytes, src->tail_cap, 0, rem,
				    src->cfg.n_layers, src->token_bytes);
		}
		dst->n_tail = rem;
	}
	for (uint32_t i = 0; i < n_full; i++) {
		dst->chunks[i] = (struct kvt_chunk *)kvt_chunk_get(src->chunks[i]);
		dst->chunk_bytes += src->chunks[i]->alloc_bytes;
	}
	dst->n_chunks = n_full;
	seq_check(dst);
	*out = dst;
	return 0;

fail:
	kvt_seq_destroy(dst);
	return rc;
}

int kvt_seq_truncate(struct kvt_seq *seq, uint64_t n_tokens, char *err, size_t errlen)
{
	const uint32_t B = seq->cfg.chunk_tokens;
	const uint64_t sealed = seq_sealed(seq);
	uint32_t n_full, rem;
	uint8_t *scratch = NULL;
	int made = 0, rc;

	if (n_tokens > kvt_seq_tokens(seq)) {
		set_err(err, errlen,
			"truncate n_tokens %" PRIu64 " exceeds the session's %" PRIu64 " tokens",
			n_tokens, kvt_seq_tokens(seq));
		return -EINVAL;
	}
	if (n_tokens == kvt_seq_tokens(seq))
		return 0;
	if (n_tokens >= sealed) {
		seq->n_tail = (uint32_t)(n_tokens - sealed);
		seq->generation++;
		seq_check(seq);
		return 0;
	}
	n_full = (uint32_t)(n_tokens / B);
	rem = (uint32_t)(n_tokens % B);
	if (rem) {
		/* Decode the kept prefix aside first: the current tail stays intact until
		 * nothing can fail any more. */
		rc = ensure_tail(seq, &made, err, errlen);
		if (rc < 0)
			return rc;
		scratch = aligned_alloc(KVT_CHUNK_ALIGN, 2 * seq->tail_half_bytes);
		if (!scratch) {
			set_err(err, errlen, "out of memory for %zu bytes of decode scratch",
				2 * seq->tail_half_bytes);
			rc = -ENOMEM;
			goto fail;
		}
		rc = decode_prefix_into(seq, scratch, seq->chunks[n_full], rem, err, errlen);
		if (rc < 0)
			goto fail;
	}
	for (uint32_t i = n_full; i < seq->n_chunks; i++) {
		seq->chunk_bytes -= seq->chunks[i]->alloc_bytes;
		kvt_chunk_put(seq->chunks[i]);
		seq->chunks[i] = NULL;
	}
	seq->n_chunks = n_full;
	if (rem) {
		copy_tokens(seq->tail, seq->tail_cap, 0, scratch, seq->tail_cap, 0, rem,
			    seq->cfg.n_layers, seq->token_bytes);
		copy_tokens(seq->tail + seq->tail_half_bytes, seq->tail_cap, 0,
			    scratch + seq->tail_half_bytes, seq->tail_cap, 0, rem, seq->cfg.n_layers,
			    seq->token_bytes);
	}
	seq->n_tail = rem;
	seq->generation++;
	free(scratch);
	seq_check(seq);
	return 0;

fail:
	free(scratch);
	if (made)
		drop_tail(seq);
	return rc;
}

void kvt_seq_savepoint(const struct kvt_seq *seq, struct kvt_seq_savepoint *sp)
{
	memset(sp, 0, sizeof(*sp));
	sp->tokens = kvt_seq_tokens(seq);
	sp->generation = seq->generation;
	sp->n_chunks = seq->n_chunks;
}

int kvt_seq_rollback(struct kvt_seq *seq, const struct kvt_seq_savepoint *sp, char *err,
		     size_t errlen)
{
	if (sp->generation != seq->generation || sp->tokens > kvt_seq_tokens(seq)) {
		set_err(err, errlen,
			"savepoint at %" PRIu64 " tokens is stale: the session was truncated or "
			"stored into since",
			sp->tokens);
		return -ESTALE;
	}
	if (sp->n_chunks != seq->n_chunks) {
		set_err(err, errlen,
			"savepoint at %" PRIu64 " tokens is stale: %u chunk(s) were sealed since; "
			"an exact rollback is impossible (truncate instead)",
			sp->tokens, seq->n_chunks - sp->n_chunks);
		return -ESTALE;
	}
	SEQ_ASSERT(sp->tokens >= seq_sealed(seq));
	seq->n_tail = (uint32_t)(sp->tokens - seq_sealed(seq));
	seq_check(seq);
	return 0;
}

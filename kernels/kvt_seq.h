/*
 * kvt_seq.h - one session's KV cache in host memory: the sealing state machine.
 *
 * A sequence holds sealed chunks (immutable, reference counted, shared between forks) and an
 * exact tail, in the wire dtype. Every token is encoded exactly once, and a chunk never
 * changes; chunk i always holds tokens [i*B, (i+1)*B).
 *
 * When to seal depends on the config's recent_exact_tokens W:
 * - W = 0 (every config written before W existed): the tail holds fewer than B tokens, laid
 *   out [layer][B][H][d] so a full tail is encoded in place; each time it reaches B tokens it
 *   is sealed. The newest 0..B-1 tokens are exact.
 * - W in B..1024 (a recent window): the tail holds at most W tokens; an append that would
 *   leave more than W unsealed seals the oldest B, as many times as needed. After any append
 *   the newest min(tokens, W-B+1)..W tokens are exact (e.g. B 32, W 128: 97..128), whatever
 *   the append sizes: the chunk boundaries depend only on the session length. Fork,
 *   truncate and rollback never seal, so they may leave fewer exact tokens; the window fills
 *   again with the next appends.
 *
 * Ownership and threads: a kvt_seq is not locked; the caller serializes every call on one
 * sequence (the daemon holds the session's lock). Chunks are shared between sequences by an
 * atomic reference count, so different sequences may be used from different threads. Memory
 * comes from the caller's allocator hooks (the daemon charges its host-tier capacity there);
 * a hook that returns NULL makes the call fail with -ENOMEM and change nothing.
 */
#ifndef KVT_SEQ_H
#define KVT_SEQ_H

#include "kvt_codec.h"

#ifdef __cplusplus
extern "C" {
#endif

struct kvt_seq_alloc {
	void *(*alloc)(void *ctx, size_t bytes);  /* 64-byte aligned, or NULL to refuse */
	void (*free)(void *ctx, void *p, size_t bytes);
	void *ctx;
};

/* An immutable encoded chunk shared by reference count. bytes[] is 64-byte aligned. The chunk
 * remembers the allocator it came from (owner), so the last kvt_chunk_put frees it there even
 * when the sequence that made it is gone and the holder of the last reference used other
 * hooks (a fork made with different hooks). */
struct kvt_chunk {
	uint32_t refcount;      /* atomic; kvt_chunk_get / kvt_chunk_put */
	uint32_t reserved;
	uint64_t size_bytes;    /* encoded size (header total_bytes) */
	uint64_t alloc_bytes;   /* what the allocator charged for this object */
	struct kvt_seq_alloc owner; /* hooks that allocated this object (put frees through them) */
	uint8_t pad[16];
	uint8_t bytes[];        /* the chunk, exactly as on the wire */
};
_Static_assert(sizeof(struct kvt_chunk) == 64, "kvt_chunk bytes[] must start 64-byte aligned");

/* Takes one more reference (thread-safe; the chunk's contents never change, so a const
 * pointer is enough). Returns c. */
const struct kvt_chunk *kvt_chunk_get(const struct kvt_chunk *c);
/* Drops one reference; the last one frees the chunk through c->owner. Thread-safe. */
void kvt_chunk_put(const struct kvt_chunk *c);
/* The current count (an atomic load; only meaningful while the caller holds a reference). */
uint32_t kvt_chunk_refcount(const struct kvt_chunk *c);

struct kvt_seq;

/* alloc may be NULL (aligned malloc/free). cfg is copied. */
int kvt_seq_create(const struct kvt_codec_config *cfg, const struct kvt_seq_alloc *alloc,
		   struct kvt_seq **out, char *err, size_t errlen);
void kvt_seq_destroy(struct kvt_seq *seq);

const struct kvt_codec_config *kvt_seq_config(const struct kvt_seq *seq);
uint64_t kvt_seq_tokens(const struct kvt_seq *seq);     /* sealed + tail */
uint32_t kvt_seq_n_chunks(const struct kvt_seq *seq);
uint32_t kvt_seq_tail_tokens(const struct kvt_seq *seq);
const struct kvt_chunk *kvt_seq_chunk(const struct kvt_seq *seq, uint32_t i);
/* The tail of layer l: [n_tail][H][d], wire dtype (dense: the rows of the buffer are
 * max(W, B) tokens apart, but the n_tail tokens of one layer are contiguous). The tail buffer is allocated by the call
 * that leaves tokens in it and freed when an append seals it empty, so these may return NULL
 * whenever n_tail is 0 (a prefill of whole chunks, a fork at a chunk boundary, a sequence
 * filled by kvt_seq_append_chunk). */
const void *kvt_seq_tail_k(const struct kvt_seq *seq, uint32_t layer);
const void *kvt_seq_tail_v(const struct kvt_seq *seq, uint32_t layer);
/* Bytes this sequence holds: its tail buffer plus every chunk it references (alloc_bytes of
 * each; a chunk shared by two sequences counts in both). */
uint64_t kvt_seq_bytes(const struct kvt_seq *seq);

/*
 * Appends n tokens. k and v are dense [n_layers][n][H][d] in the wire dtype. Seals a chunk
 * each time the tail fills (W = 0) or would exceed W tokens (W > 0). All or nothing: on
 * failure the sequence is unchanged.
 */
int kvt_seq_append(struct kvt_seq *seq, const void *k, const void *v, uint32_t n,
		   char *err, size_t errlen);

/*
 * An encoder that seals this sequence's chunks in place of kvt_encode_chunk (the daemon's GPU
 * tier encodes GPU-resident sessions on the device). encode has kvt_encode_chunk's contract
 * and must write its bytes: k and v dense [n_layers][B][H][d] in the wire dtype, the chunk
 * at first_token written to out (out_cap >= kvt_chunk_max_bytes), its size or a negative
 * errno (the append then fails and changes nothing). It is called under the caller's
 * serialization of this sequence. kvt_seq_set_encoder(seq, NULL) restores the CPU encoder
 * (the default). Forks do not inherit an encoder.
 */
struct kvt_seq_encoder {
	int64_t (*encode)(void *ctx, const struct kvt_codec_config *cfg, uint64_t first_token,
			  const void *k, const void *v, void *out, size_t out_cap, char *err,
			  size_t errlen);
	void *ctx;
};
void kvt_seq_set_encoder(struct kvt_seq *seq, const struct kvt_seq_encoder *enc);

/* Appends encoded chunks (StoreEncoded): only when the tail is empty and the chunk's
 * first_token equals kvt_seq_tokens(); the chunk's config must equal the sequence's. */
int kvt_seq_append_chunk(struct kvt_seq *seq, const void *chunk, size_t len, char *err,
			 size_t errlen);

/* Decodes tokens [t0, t1) of layers [l0, l1) to out_dtype, [l1-l0][t1-t0][H][d] each
 * (either output may be NULL). Sealed tokens come from the chunks, tail tokens exact. */
int kvt_seq_fetch(const struct kvt_seq *seq, uint64_t t0, uint64_t t1, uint32_t l0,
		  uint32_t l1, uint32_t out_dtype, void *k_out, void *v_out, char *err,
		  size_t errlen);

/* One decode step of attention for layer `layer` over everything the sequence holds. */
int kvt_seq_attend(const struct kvt_seq *seq, uint32_t layer, uint32_t n_q_heads,
		   float softmax_scale, const float *q, float *out, char *err, size_t errlen);

/* A new sequence holding the first n_tokens of src: whole chunks are shared (refcount), the
 * rest of the prefix is copied into the new tail (a partial chunk is decoded; its pinned
 * tokens stay exact). */
int kvt_seq_fork(const struct kvt_seq *src, uint64_t n_tokens,
		 const struct kvt_seq_alloc *alloc, struct kvt_seq **out, char *err,
		 size_t errlen);

/* Shortens the sequence to n_tokens (same rule for a cut inside a chunk as fork). */
int kvt_seq_truncate(struct kvt_seq *seq, uint64_t n_tokens, char *err, size_t errlen);

/*
 * Savepoints (speculative decoding: keep the draft tokens or roll them back). A savepoint is a
 * plain value that records the sequence's length; taking one costs nothing and holds nothing.
 * kvt_seq_rollback returns the sequence exactly to that length when only appends happened
 * since and no chunk was sealed in between (the dropped tokens are all in the tail). It fails
 * and changes nothing with -ESTALE when a chunk was sealed since (rolling back into it would
 * decode lossy tokens: use kvt_seq_truncate if that is acceptable) or when the sequence was
 * truncated, forked into or stored into since (its length no longer means the same tokens).
 */
struct kvt_seq_savepoint {
	uint64_t tokens;
	uint64_t generation;   /* the sequence's count of non-append changes */
	uint32_t n_chunks;
	uint32_t reserved;
};
void kvt_seq_savepoint(const struct kvt_seq *seq, struct kvt_seq_savepoint *sp);
int kvt_seq_rollback(struct kvt_seq *seq, const struct kvt_seq_savepoint *sp, char *err,
		     size_t errlen);

#ifdef __cplusplus
}
#endif
#endif

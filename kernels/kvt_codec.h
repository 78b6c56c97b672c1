/*
 * kvt_codec.h - the OScaR codec and decode attention: the one header the rest of kvtier
 * includes from kernels/.
 *
 * A session's KV cache is cut into chunks of B consecutive tokens x all layers. A chunk is
 * encoded once (when the session's exact tail reaches B tokens) and never re-encoded; its
 * bytes are identical in every tier, on the wire (FetchEncoded) and on the GPU. The byte
 * layout is documented below and in kernels/CHUNK_FORMAT.md; kvt_chunk_layout() computes
 * every offset so no caller hard-codes one.
 *
 * Tensors on the wire and in this API are little-endian, dense, [layer][token][kv_head][dim]
 * in the session's dtype unless a function says otherwise. Queries and attention outputs are
 * f32 [q_head][dim] in the original (unrotated) basis.
 *
 * Alignment: tensors are aligned to their element size; chunk buffers to at least 4 bytes
 * (64 recommended: every array inside a chunk is 64-byte aligned relative to its start).
 *
 * Ownership: every pointer is borrowed for the duration of the call; nothing here allocates
 * memory that outlives a call, keeps a pointer, or touches global state other than the
 * instruction-set choice (kvt_codec_set_isa), which is read once per call.
 *
 * Errors: functions return 0 (or a byte count) on success and a negative errno on failure.
 * -EINVAL means a bad config, shape, range or buffer; when `err` is non-NULL a message that
 * names the field and the allowed values is written there ("head_dim 96 is not one of 64,
 * 128, 256"). -EBADMSG means a chunk failed its magic/version/crc32c/shape checks. -ENOSPC
 * means an output buffer is too small.
 */
#ifndef KVT_CODEC_H
#define KVT_CODEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum kvt_scheme {
	KVT_SCHEME_NONE = 0,     /* exact copy in the wire dtype */
	KVT_SCHEME_KIVI = 1,     /* per-channel keys, per-token values, no rotation, no norm */
	KVT_SCHEME_HADAMARD = 2, /* rotation; per-token groups for keys and values; no norm */
	KVT_SCHEME_OSCAR = 3,    /* rotation + per-token joint norm + per-channel keys */
};

enum kvt_dtype {
	KVT_DTYPE_F16 = 1,
	KVT_DTYPE_BF16 = 2,
	KVT_DTYPE_F32 = 3,
};

/* Hard limits of the format (the daemon's configuration may set lower ones). */
#define KVT_MAX_LAYERS 256
#define KVT_MAX_KV_HEADS 64
#define KVT_MAX_CHUNK_TOKENS 1024
#define KVT_MAX_SINKS 64
#define KVT_MAX_RECENT_EXACT 1024

/*
 * A codec configuration: the shape of a session and how its chunks are encoded.
 * kvt_codec_config_validate() accepts exactly:
 *   scheme      none | kivi | hadamard | oscar
 *   key_bits    2, 3, 4, 8 (ignored and must be 0 or 16 for scheme none)
 *   value_bits  2, 3, 4, 8 (same; may differ from key_bits: a bit split between K and V)
 *   group       G = 32, 64, 128 (key groups span G tokens of one channel; value groups span
 *               min(G, head_dim) channels of one token and head)
 *   chunk_tokens B: a multiple of G, 32..1024 (the default is 128)
 *   n_layers 1..256, n_kv_heads 1..64, head_dim 64, 128, 256, dtype f16 | bf16 | f32
 *   rotate_v    0 or 1 (hadamard and oscar only; must be 0 for none and kivi)
 *   n_sinks     S = 0..min(64, B): tokens 0..S-1 of a session are pinned exact
 *   pin_detect_ratio  0 = off; else in (0, 1): a token of a chunk whose key norm (all heads
 *               of one layer) is below ratio x that layer's median over the chunk, in any
 *               layer, is pinned exact (at most pin_detect_max per chunk, lowest norms first)
 *   pin_detect_max    0..B
 *   recent_exact_tokens  W = 0 or B..1024: a property of the session, not of a chunk (the
 *               encoder ignores it and kvt_chunk_parse leaves it 0). 0: a chunk is sealed as
 *               soon as B tokens are unsealed, so the newest 0..B-1 tokens are exact. W: the
 *               oldest B unsealed tokens are sealed only when more than W would stay exact,
 *               so after any append the newest min(tokens, W-B+1) .. W tokens are exact
 *               (kvt_seq.h).
 *   key_rounding  how the encoder picks each key group's scale and zero (an encoder choice:
 *               not in the chunk header, decoders ignore it, kvt_chunk_parse leaves it 0):
 *               KVT_ROUNDING_MINMAX (0): OScaR's rule, the group's [min, max] with the
 *               zero on the scale's grid (CHUNK_FORMAT.md "Quantizer");
 *               KVT_ROUNDING_MSE (1): the range with the least squared error over a fixed
 *               set of narrower ranges that keep every element within half a step,
 *               min-max included (CHUNK_FORMAT.md "Key rounding"), so no group's error is
 *               above min-max's. Needs a quantizing scheme (0 for none). The CUDA encoder
 *               does not implement it (-EOPNOTSUPP).
 */
struct kvt_codec_config {
	uint32_t scheme;
	uint32_t key_bits;
	uint32_t value_bits;
	uint32_t group;
	uint32_t chunk_tokens;
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t dtype;
	uint32_t rotate_v;
	uint32_t n_sinks;
	uint32_t pin_detect_max;
	float pin_detect_ratio;
	uint32_t recent_exact_tokens; /* W; 0 = seal every B tokens (added last: zero keeps the
				       * behaviour of configs written before it existed) */
	uint32_t key_rounding;        /* enum kvt_rounding; 0 = min-max (added last, as W) */
};

enum kvt_rounding {
	KVT_ROUNDING_MINMAX = 0, /* OScaR: [min, max] of the group, zero on the scale's grid */
	KVT_ROUNDING_MSE = 1,    /* least squared error over a fixed set of clipped ranges */
};
const char *kvt_rounding_name(uint32_t rounding); /* "minmax", "mse"; NULL when unknown */
int kvt_rounding_parse(const char *name);         /* enum value, or -EINVAL */

/* Fills cfg with kvtier's defaults for the shape (oscar, 2/2 bits, G 32, B 128, rotate_v,
 * S 4, detection off). */
void kvt_codec_config_default(struct kvt_codec_config *cfg, uint32_t n_layers,
			      uint32_t n_kv_heads, uint32_t head_dim, uint32_t dtype);
int kvt_codec_config_validate(const struct kvt_codec_config *cfg, char *err, size_t errlen);

/*
 * Named codec settings. A preset fixes every codec field (scheme, bits, group, chunk_tokens,
 * rotate_v, n_sinks, pin_detect_*, recent_exact_tokens, key_rounding) and leaves the shape
 * (n_layers, n_kv_heads, head_dim, dtype) as cfg has it. Exact copies of pinned tokens are kept in the
 * session's wire dtype, so a preset costs what docs/realmodel/int2.md says only in f16/bf16.
 *   "kvtier-int2"  oscar, key_bits 3, value_bits 2, G 64, B 64, rotate_v, S 8, detection
 *                  off, W 128, key_rounding minmax: the daemon's default codec (3.0840
 *                  bits/elem per chunk on head_dim 64; docs/realmodel/int2.md has the
 *                  evidence; key_rounding mse is an option, not in the preset: it did not
 *                  generalize to held-out texts)
 *   "oscar-int2"   the faithful OScaR INT2 baseline: oscar, 2/2 bits, G 32, B 128, rotate_v,
 *                  S 0, detection off, W 0, key_rounding minmax
 * kvt_codec_preset returns 0, or -EINVAL (err lists the names) for an unknown name.
 * kvt_codec_preset_name returns the name of the preset whose codec fields equal cfg's, or
 * NULL. kvt_codec_preset_names is the list for messages ("kvtier-int2, oscar-int2").
 */
int kvt_codec_preset(struct kvt_codec_config *cfg, const char *name, char *err, size_t errlen);
const char *kvt_codec_preset_name(const struct kvt_codec_config *cfg);
const char *kvt_codec_preset_names(void);

const char *kvt_scheme_name(uint32_t scheme);  /* "oscar", ...; NULL when unknown */
int kvt_scheme_parse(const char *name);        /* enum value, or -EINVAL */
const char *kvt_dtype_name(uint32_t dtype);    /* "f16", "bf16", "f32"; NULL when unknown */
int kvt_dtype_parse(const char *name);         /* enum value, or -EINVAL */
size_t kvt_dtype_size(uint32_t dtype);         /* 2, 2, 4; 0 when unknown */

/* ---- Chunk byte layout ------------------------------------------------------------------
 *
 *   [header 64 B][pin table: n_pinned x u16 token offsets, padded to 64 B]
 *   [layer 0 section][layer 1 section] ... [layer L-1 section]
 *
 * Every layer section has the same size (layer_bytes) and the same internal offsets, so
 * layer l starts at data_offset + l * layer_bytes. Inside a layer section, each array starts
 * on a 64-byte boundary (absent arrays have size 0):
 *   norms     f32 [B]                          oscar only: joint key norm per token
 *   k_scale   s16 [H][B/G][d]                  kivi, oscar: per channel per token group
 *             s16 [H][B][d/gv]                 hadamard: per token per channel group
 *   k_zero    same shape as k_scale
 *   v_scale   s16 [H][B][d/gv]                 gv = min(G, d)
 *   v_zero    same shape as v_scale
 *   k_codes   u8  [H][B][d*kb/8]               packed, little end first: channel c of a
 *   v_codes   u8  [H][B][d*vb/8]               byte sits at bits (c % (8/b)) * b; 3 bits:
 *                                              bytes [0, d/4) hold the low 2 bits as a 2-bit
 *                                              row, bytes [d/4, 3d/8) the high bit of
 *                                              channel c at bit c % 8 of byte d/4 + c/8
 *   k_exact   wire dtype [n_pinned][H][d]      original basis, exact (pinned tokens)
 *   v_exact   wire dtype [n_pinned][H][d]
 * For scheme none, k_codes / v_codes hold the exact tensors [H][B][d] in the wire dtype and
 * there are no norms, scales, zeros or pins. s16 is the scale dtype: bf16 when the wire dtype
 * is bf16, else f16. Pinned tokens (sinks and detected ones) have codes of 0, are left out of
 * every group's min/max, and decode from their exact copies.
 */
#define KVT_CHUNK_MAGIC 0x4354564bu /* "KVTC" little-endian */
#define KVT_CHUNK_VERSION 1
#define KVT_CHUNK_HEADER_BYTES 64
#define KVT_CHUNK_ALIGN 64

struct kvt_chunk_header {
	uint32_t magic;          /* KVT_CHUNK_MAGIC */
	uint16_t version;        /* KVT_CHUNK_VERSION */
	uint16_t header_bytes;   /* 64 */
	uint8_t scheme;
	uint8_t key_bits;        /* 16 for scheme none */
	uint8_t value_bits;
	uint8_t dtype;
	uint8_t rotate_v;
	uint8_t scale_dtype;     /* KVT_DTYPE_F16 or KVT_DTYPE_BF16 */
	uint16_t group;
	uint16_t chunk_tokens;   /* B */
	uint16_t n_layers;
	uint16_t n_kv_heads;
	uint16_t head_dim;
	uint16_t n_pinned;       /* entries in the pin table */
	uint16_t n_sinks;        /* the session's S (for the record; pins hold the tokens) */
	uint32_t reserved0;      /* zero (first_token's 8-byte alignment, made explicit) */
	uint64_t first_token;    /* session position of the chunk's token 0 */
	uint32_t layer_bytes;    /* stride between layer sections */
	uint32_t data_offset;    /* offset of layer 0's section */
	uint64_t total_bytes;    /* the whole chunk, header included */
	uint32_t crc32c;         /* over the whole chunk with this field read as 0 */
	uint8_t reserved[4];     /* zero */
};
_Static_assert(sizeof(struct kvt_chunk_header) == KVT_CHUNK_HEADER_BYTES, "chunk header");

/* Byte offsets inside one layer section, and sizes. */
struct kvt_chunk_layout {
	size_t header_bytes, pin_table_bytes, data_offset, layer_bytes, total_bytes;
	size_t norms_off, k_scale_off, k_zero_off, v_scale_off, v_zero_off;
	size_t k_codes_off, v_codes_off, k_exact_off, v_exact_off;
	size_t norms_bytes, k_scale_bytes, v_scale_bytes, k_codes_bytes, v_codes_bytes;
	size_t exact_bytes; /* each of k_exact and v_exact */
};

/* Layout of a chunk of this config holding n_pinned pinned tokens. cfg must be valid. */
int kvt_chunk_layout(const struct kvt_codec_config *cfg, uint32_t n_pinned,
		     struct kvt_chunk_layout *out);
/* Largest chunk this config can produce (pins at their maximum). */
size_t kvt_chunk_max_bytes(const struct kvt_codec_config *cfg);

/* Checks magic, version, shape consistency, sizes, the pin table and the crc32c of the chunk
 * in chunk[0, len). len is the chunk's exact length, not a buffer's capacity: len !=
 * total_bytes (a byte missing, or trailing bytes after the chunk) is -EBADMSG naming both, so a
 * chunk from the wire is accepted only as the exact bytes its header describes. A caller
 * holding a chunk in a larger buffer passes the size it was given (kvt_encode_chunk's result,
 * the upload's length), never the buffer's. Fills cfg (pin_detect_* left 0) and hdr when
 * non-NULL. -EBADMSG with a message on any mismatch; -EINVAL for a NULL chunk or len
 * SIZE_MAX. */
int kvt_chunk_parse(const void *chunk, size_t len, struct kvt_codec_config *cfg,
		    struct kvt_chunk_header *hdr, char *err, size_t errlen);

/* The largest magnitude among a parsed chunk's quantizer scales (*scale_max) and zeros
 * (*zero_max), keys and values of every layer; both 0 for scheme none. A non-finite parameter
 * gives INFINITY. What the GPU tier checks against the tensor-core kernels' f16 range
 * (kvt_cuda.h KVT_CUDA_ATTEND_SCALE_MAX). -EINVAL for a chunk kvt_chunk_parse would refuse. */
int kvt_chunk_param_max(const void *chunk, float *scale_max, float *zero_max);

/* True bits per element of a chunk: total_bytes * 8 / (2 * B * L * H * d). */
double kvt_chunk_bits_per_element(const struct kvt_chunk_header *hdr);

/* ---- Encode / decode -------------------------------------------------------------------- */

/*
 * Encodes B tokens starting at session position first_token. k and v are dense
 * [n_layers][B][H][d] in cfg->dtype (keys post-RoPE). Writes the chunk to out (out_cap bytes,
 * kvt_chunk_max_bytes() always suffices) and returns its size in bytes, or a negative errno.
 * Session tokens below S that fall in the chunk are pinned as sinks; detection (when on) adds
 * more pins. Deterministic: the same input gives the same bytes on every code path.
 */
int64_t kvt_encode_chunk(const struct kvt_codec_config *cfg, uint64_t first_token,
			 const void *k, const void *v, void *out, size_t out_cap,
			 char *err, size_t errlen);

/*
 * Decodes tokens [tok_begin, tok_end) (chunk-relative, 0..B) of layers [layer_begin,
 * layer_end) to out_dtype in the original basis. k_out / v_out (either may be NULL) are dense
 * [layer_end-layer_begin][tok_end-tok_begin][H][d]. The chunk must already have passed
 * kvt_chunk_parse (decode does not re-check the crc; callers check once when bytes arrive).
 */
int kvt_decode_chunk(const void *chunk, uint32_t tok_begin, uint32_t tok_end,
		     uint32_t layer_begin, uint32_t layer_end, uint32_t out_dtype,
		     void *k_out, void *v_out, char *err, size_t errlen);

/* ---- Attention ---------------------------------------------------------------------------- */

/*
 * One decode step of one layer of one session: softmax(scale * q . K^T) V over the
 * session's pieces in token order: the encoded chunks (their pinned tokens read exact), then
 * the exact tail. GQA: query head i reads KV head i / (n_q_heads / H); n_q_heads must be a
 * multiple of H.
 */
struct kvt_attend_request {
	const struct kvt_codec_config *cfg;
	uint32_t layer;
	uint32_t n_q_heads;
	float softmax_scale;            /* usually 1/sqrt(head_dim) */
	const float *q;                 /* [n_q_heads][d], original basis */
	const void *const *chunks;      /* n_chunks parsed chunks, consecutive, token order */
	uint32_t n_chunks;
	const void *tail_k;             /* [n_tail][H][d] wire dtype, this layer only */
	const void *tail_v;
	uint32_t n_tail;
	float *out;                     /* [n_q_heads][d] */
};
int kvt_attend(const struct kvt_attend_request *reqs, size_t n_reqs, char *err,
	       size_t errlen);

/* In-place orthonormal Walsh-Hadamard transform of n vectors of length d (a power of two,
 * 2..256): x <- H_d x with H[i][j] = (-1)^popcount(i&j) / sqrt(d). Self-inverse. */
void kvt_hadamard_f32(float *x, size_t n, uint32_t d);
/* Rotates queries into the key basis (same transform; exposed under the name callers use). */
void kvt_rotate_queries(float *q, size_t n, uint32_t d);

/* ---- Dtype conversion and checksums ------------------------------------------------------- */
float kvt_f16_to_f32(uint16_t h);
uint16_t kvt_f32_to_f16(float f);   /* round to nearest even; overflow -> inf */
float kvt_bf16_to_f32(uint16_t h);
uint16_t kvt_f32_to_bf16(float f);  /* round to nearest even; NaN stays NaN */
/* n elements of dtype src_dtype -> dst_dtype (any pair, including identity). */
void kvt_convert(const void *src, uint32_t src_dtype, void *dst, uint32_t dst_dtype, size_t n);
uint32_t kvt_crc32c(uint32_t crc, const void *buf, size_t len);

/* ---- Instruction set ---------------------------------------------------------------------- */
enum kvt_isa { KVT_ISA_AUTO = 0, KVT_ISA_SCALAR = 1, KVT_ISA_AVX2 = 2 };
/* Forces a code path (tests compare them); -ENOTSUP when this CPU lacks it. */
int kvt_codec_set_isa(enum kvt_isa isa);
enum kvt_isa kvt_codec_active_isa(void); /* what AUTO resolved to, or the forced one */

#ifdef __cplusplus
}
#endif
#endif

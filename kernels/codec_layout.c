/*
 * codec_layout.c - where every array of a chunk lives (kvt_chunk_layout), and the checks a
 * chunk passes before anything reads it (kvt_chunk_parse). See CHUNK_FORMAT.md.
 */
#include <errno.h>
#include <stddef.h>

#include "codec_internal.h"

int kvt_chunk_layout(const struct kvt_codec_config *cfg, uint32_t n_pinned,
		     struct kvt_chunk_layout *out)
{
	if (kvt_codec_config_validate(cfg, NULL, 0) || n_pinned > cfg->chunk_tokens ||
	    (cfg->scheme == KVT_SCHEME_NONE && n_pinned))
		return -EINVAL;
	size_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim;
	size_t G = cfg->group, gv = kvt_value_group(cfg), ws = kvt_dtype_size(cfg->dtype);
	struct kvt_chunk_layout l;
	memset(&l, 0, sizeof(l));
	l.header_bytes = KVT_CHUNK_HEADER_BYTES;
	l.pin_table_bytes = KVT_ALIGN_UP((size_t)n_pinned * 2, KVT_CHUNK_ALIGN);
	l.data_offset = l.header_bytes + l.pin_table_bytes;

	switch (cfg->scheme) {
	case KVT_SCHEME_NONE:
		l.k_codes_bytes = l.v_codes_bytes = H * B * d * ws;
		break;
	case KVT_SCHEME_KIVI:
	case KVT_SCHEME_OSCAR:
		l.norms_bytes = cfg->scheme == KVT_SCHEME_OSCAR ? B * 4 : 0;
		l.k_scale_bytes = H * (B / G) * d * 2;
		break;
	case KVT_SCHEME_HADAMARD:
		l.k_scale_bytes = H * B * (d / gv) * 2;
		break;
	}
	if (cfg->scheme != KVT_SCHEME_NONE) {
		l.v_scale_bytes = H * B * (d / gv) * 2;
		l.k_codes_bytes = H * B * d * cfg->key_bits / 8;
		l.v_codes_bytes = H * B * d * cfg->value_bits / 8;
		l.exact_bytes = (size_t)n_pinned * H * d * ws;
	}
	size_t off = 0;
#define PLACE(field, bytes)                                                                 \
	do {                                                                                \
		off = KVT_ALIGN_UP(off, KVT_CHUNK_ALIGN);                                   \
		l.field = off;                                                              \
		off += (bytes);                                                             \
	} while (0)
	PLACE(norms_off, l.norms_bytes);
	PLACE(k_scale_off, l.k_scale_bytes);
	PLACE(k_zero_off, l.k_scale_bytes);
	PLACE(v_scale_off, l.v_scale_bytes);
	PLACE(v_zero_off, l.v_scale_bytes);
	PLACE(k_codes_off, l.k_codes_bytes);
	PLACE(v_codes_off, l.v_codes_bytes);
	PLACE(k_exact_off, l.exact_bytes);
	PLACE(v_exact_off, l.exact_bytes);
#undef PLACE
	l.layer_bytes = KVT_ALIGN_UP(off, KVT_CHUNK_ALIGN);
	l.total_bytes = l.data_offset + l.layer_bytes * cfg->n_layers;
	*out = l;
	return 0;
}

static uint32_t max_pins(const struct kvt_codec_config *cfg)
{
	if (cfg->scheme == KVT_SCHEME_NONE)
		return 0;
	uint32_t p = cfg->n_sinks + (cfg->pin_detect_ratio > 0.0f ? cfg->pin_detect_max : 0);
	return p < cfg->chunk_tokens ? p : cfg->chunk_tokens;
}

size_t kvt_chunk_max_bytes(const struct kvt_codec_config *cfg)
{
	struct kvt_chunk_layout l;
	if (kvt_chunk_layout(cfg, max_pins(cfg), &l))
		return 0;
	return l.total_bytes;
}

double kvt_chunk_bits_per_element(const struct kvt_chunk_header *hdr)
{
	double elems = 2.0 * hdr->chunk_tokens * hdr->n_layers * hdr->n_kv_heads * hdr->head_dim;
	return elems > 0 ? (double)hdr->total_bytes * 8.0 / elems : 0.0;
}

uint32_t kvt_chunk_crc(const void *chunk, size_t total_bytes)
{
	static const uint8_t zero4[4];
	const size_t at = offsetof(struct kvt_chunk_header, crc32c);
	const uint8_t *p = chunk;
	uint32_t crc = kvt_crc32c(0, p, at);
	crc = kvt_crc32c(crc, zero4, 4);
	return kvt_crc32c(crc, p + at + 4, total_bytes - at - 4);
}

#define BAD(...) kvt_codec_errf(err, errlen, -EBADMSG, __VA_ARGS__)

int kvt_chunk_view(const void *chunk, size_t len, struct kvt_codec_config *cfg_out,
		   struct kvt_chunk_header *hdr_out, struct kvt_chunk_layout *lay_out, char *err,
		   size_t errlen)
{
	struct kvt_chunk_header h;
	struct kvt_codec_config cfg;
	struct kvt_chunk_layout lay;
	char why[160];
	if (!chunk)
		return kvt_codec_errf(err, errlen, -EINVAL, "chunk is NULL");
	memcpy(&h, chunk, sizeof(h));
	if (h.magic != KVT_CHUNK_MAGIC)
		return BAD("chunk magic 0x%08x is not 0x%08x (KVTC)", h.magic, KVT_CHUNK_MAGIC);
	if (h.version != KVT_CHUNK_VERSION)
		return BAD("chunk version %u is not %u", h.version, KVT_CHUNK_VERSION);
	if (h.header_bytes != KVT_CHUNK_HEADER_BYTES)
		return BAD("chunk header_bytes %u is not %u", h.header_bytes,
			   KVT_CHUNK_HEADER_BYTES);
	if (h.reserved0)
		return BAD("chunk reserved0 is 0x%08x, not 0", h.reserved0);
	for (size_t i = 0; i < sizeof(h.reserved); i++)
		if (h.reserved[i])
			return BAD("chunk reserved byte %zu is %u, not 0", i, h.reserved[i]);
	memset(&cfg, 0, sizeof(cfg));
	cfg.scheme = h.scheme;
	cfg.key_bits = h.key_bits;
	cfg.value_bits = h.value_bits;
	cfg.group = h.group;
	cfg.chunk_tokens = h.chunk_tokens;
	cfg.n_layers = h.n_layers;
	cfg.n_kv_heads = h.n_kv_heads;
	cfg.head_dim = h.head_dim;
	cfg.dtype = h.dtype;
	cfg.rotate_v = h.rotate_v;
	cfg.n_sinks = h.n_sinks;
	if (kvt_codec_config_validate(&cfg, why, sizeof(why)))
		return BAD("chunk header: %s", why);
	if (cfg.scheme == KVT_SCHEME_NONE && (h.key_bits != 16 || h.value_bits != 16))
		return BAD("chunk of scheme none has key_bits %u / value_bits %u, not 16",
			   h.key_bits, h.value_bits);
	uint32_t sdt = cfg.dtype == KVT_DTYPE_BF16 ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
	if (h.scale_dtype != sdt)
		return BAD("chunk scale_dtype %u is not %u for dtype %s", h.scale_dtype, sdt,
			   kvt_dtype_name(cfg.dtype));
	if (h.n_pinned > cfg.chunk_tokens || (cfg.scheme == KVT_SCHEME_NONE && h.n_pinned))
		return BAD("chunk n_pinned %u is not in 0..%u", h.n_pinned,
			   cfg.scheme == KVT_SCHEME_NONE ? 0 : cfg.chunk_tokens);
	if (h.first_token > UINT64_MAX - cfg.chunk_tokens)
		return BAD("chunk first_token %llu overflows", (unsigned long long)h.first_token);
	KVT_ASSERT(kvt_chunk_layout(&cfg, h.n_pinned, &lay) == 0);
	if (h.data_offset != lay.data_offset || h.layer_bytes != lay.layer_bytes ||
	    h.total_bytes != lay.total_bytes)
		return BAD("chunk sizes (data_offset %u, layer_bytes %u, total_bytes %llu) do not "
			   "match its shape (%zu, %zu, %zu)",
			   h.data_offset, h.layer_bytes, (unsigned long long)h.total_bytes,
			   lay.data_offset, lay.layer_bytes, lay.total_bytes);
	/* SIZE_MAX: a chunk that was parsed when it arrived, whose buffer's size the caller no
	 * longer has. Otherwise the buffer is the chunk: a trailing byte is as suspect as a
	 * missing one (an upload's length and its header disagree). */
	if (len != SIZE_MAX && len < h.total_bytes)
		return BAD("chunk length %zu is shorter than its total_bytes %llu", len,
			   (unsigned long long)h.total_bytes);
	if (len != SIZE_MAX && len > h.total_bytes)
		return BAD("chunk length %zu is longer than its total_bytes %llu (trailing bytes)",
			   len, (unsigned long long)h.total_bytes);
	/* the pin table (decode and attend index with it): strictly ascending below B, zero
	 * padding */
	const uint8_t *p = (const uint8_t *)chunk + KVT_CHUNK_HEADER_BYTES;
	uint32_t prev = 0;
	for (uint32_t i = 0; i < h.n_pinned; i++) {
		uint16_t t;
		memcpy(&t, p + 2 * i, 2);
		if (t >= cfg.chunk_tokens || (i && t <= prev))
			return BAD("chunk pin table entry %u (token %u) is not ascending below %u",
				   i, t, cfg.chunk_tokens);
		prev = t;
	}
	for (size_t i = (size_t)h.n_pinned * 2; i < lay.pin_table_bytes; i++)
		if (p[i])
			return BAD("chunk pin table padding byte %zu is not 0", i);
	if (cfg_out)
		*cfg_out = cfg;
	if (hdr_out)
		*hdr_out = h;
	if (lay_out)
		*lay_out = lay;
	return 0;
}

/* max |x| of n 16-bit parameters of dtype sdt at p (INFINITY for inf or NaN) */
static float param_absmax(const uint8_t *p, size_t n, uint32_t sdt)
{
	float m = 0.0f;
	for (size_t i = 0; i < n; i++) {
		uint16_t h;
		memcpy(&h, p + 2 * i, 2);
		const float x = fabsf(kvt_widen16(h, sdt));
		if (!(x <= m)) /* also NaN */
			m = isnan(x) ? INFINITY : x;
	}
	return m;
}

int kvt_chunk_param_max(const void *chunk, float *scale_max, float *zero_max)
{
	struct kvt_chunk_header h;
	struct kvt_codec_config cfg;
	struct kvt_chunk_layout lay;
	if (kvt_chunk_view(chunk, SIZE_MAX, &cfg, &h, &lay, NULL, 0))
		return -EINVAL;
	float sm = 0.0f, zm = 0.0f;
	for (uint32_t l = 0; l < cfg.n_layers; l++) {
		const uint8_t *sec = (const uint8_t *)chunk + lay.data_offset + (size_t)l * lay.layer_bytes;
		sm = fmaxf(sm, param_absmax(sec + lay.k_scale_off, lay.k_scale_bytes / 2, h.scale_dtype));
		sm = fmaxf(sm, param_absmax(sec + lay.v_scale_off, lay.v_scale_bytes / 2, h.scale_dtype));
		zm = fmaxf(zm, param_absmax(sec + lay.k_zero_off, lay.k_scale_bytes / 2, h.scale_dtype));
		zm = fmaxf(zm, param_absmax(sec + lay.v_zero_off, lay.v_scale_bytes / 2, h.scale_dtype));
	}
	*scale_max = sm;
	*zero_max = zm;
	return 0;
}

int kvt_chunk_parse(const void *chunk, size_t len, struct kvt_codec_config *cfg_out,
		    struct kvt_chunk_header *hdr_out, char *err, size_t errlen)
{
	struct kvt_chunk_header h;
	struct kvt_codec_config cfg;
	struct kvt_chunk_layout lay;
	int rc;
	if (!chunk)
		return kvt_codec_errf(err, errlen, -EINVAL, "chunk is NULL");
	if (len == SIZE_MAX) /* kvt_chunk_view's "already parsed", never a buffer's length */
		return kvt_codec_errf(err, errlen, -EINVAL, "chunk length SIZE_MAX is not a length");
	if (len < KVT_CHUNK_HEADER_BYTES)
		return BAD("chunk length %zu is shorter than its %u-byte header", len,
			   KVT_CHUNK_HEADER_BYTES);
	if ((rc = kvt_chunk_view(chunk, len, &cfg, &h, &lay, err, errlen)))
		return rc;
	uint32_t crc = kvt_chunk_crc(chunk, h.total_bytes);
	if (crc != h.crc32c)
		return BAD("chunk crc32c 0x%08x does not match the computed 0x%08x", h.crc32c,
			   crc);
	const uint8_t *p = (const uint8_t *)chunk + KVT_CHUNK_HEADER_BYTES;
	if (cfg.scheme != KVT_SCHEME_NONE && h.first_token < cfg.n_sinks) {
		uint64_t end = cfg.n_sinks < h.first_token + cfg.chunk_tokens
				       ? cfg.n_sinks
				       : h.first_token + cfg.chunk_tokens;
		uint32_t want = (uint32_t)(end - h.first_token), found = 0;
		for (uint32_t i = 0; i < h.n_pinned; i++) {
			uint16_t t;
			memcpy(&t, p + 2 * i, 2);
			found += t < want;
		}
		if (found != want)
			return BAD("chunk pins %u of its %u sink tokens", found, want);
	}
	if (cfg_out)
		*cfg_out = cfg;
	if (hdr_out)
		*hdr_out = h;
	return 0;
}

/*
 * codec_decode.c - any token range x layer range of a chunk back to f16/bf16/f32 in the
 * original basis (OSCAR.md section 2.5). One row (token, head) at a time: unpack and
 * dequantize into an f32 row, rotate back (and multiply by the key norm), convert, store.
 */
#include <errno.h>

#include "codec_internal.h"

/* Pinned token t -> its index in the exact arrays, or -1. */
static void pin_index(const void *chunk, uint32_t n_pinned, int16_t *idx, uint32_t B)
{
	for (uint32_t t = 0; t < B; t++)
		idx[t] = -1;
	const uint8_t *p = (const uint8_t *)chunk + KVT_CHUNK_HEADER_BYTES;
	for (uint32_t i = 0; i < n_pinned; i++) {
		uint16_t t;
		memcpy(&t, p + 2 * i, 2);
		KVT_ASSERT(t < B);
		idx[t] = (int16_t)i;
	}
}

static void copy_row(const struct kvt_codec_ops *ops, const void *src, uint32_t sdtype,
		     void *dst, uint32_t ddtype, uint32_t d, float *tmp)
{
	if (sdtype == ddtype) {
		memcpy(dst, src, d * kvt_dtype_size(sdtype));
		return;
	}
	ops->load_f32(src, sdtype, tmp, d);
	ops->store_f32(tmp, dst, ddtype, d);
}

int kvt_decode_chunk(const void *chunk, uint32_t tok_begin, uint32_t tok_end,
		     uint32_t layer_begin, uint32_t layer_end, uint32_t out_dtype, void *k_out,
		     void *v_out, char *err, size_t errlen)
{
	struct kvt_codec_config cfg;
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	int rc;
	if ((rc = kvt_chunk_view(chunk, SIZE_MAX, &cfg, &hdr, &lay, err, errlen)))
		return rc;
	const uint32_t B = cfg.chunk_tokens, L = cfg.n_layers, H = cfg.n_kv_heads,
		       d = cfg.head_dim, G = cfg.group;
	if (tok_begin > tok_end || tok_end > B)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "token range [%u, %u) is not inside the chunk's 0..%u",
				      tok_begin, tok_end, B);
	if (layer_begin > layer_end || layer_end > L)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "layer range [%u, %u) is not inside 0..%u", layer_begin,
				      layer_end, L);
	if (!kvt_dtype_size(out_dtype))
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "out_dtype %u is not one of f16 (1), bf16 (2), f32 (3)",
				      out_dtype);
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	const size_t ws = kvt_dtype_size(cfg.dtype), os = kvt_dtype_size(out_dtype);
	const size_t nt = tok_end - tok_begin, row = (size_t)H * d;
	const uint32_t sdt = hdr.scale_dtype, gv = (uint32_t)kvt_value_group(&cfg), ng = d / gv;
	const float inv_sqrt_d = kvt_inv_sqrt_dim(d);
	int16_t pidx[KVT_MAX_CHUNK_TOKENS];
	pin_index(chunk, hdr.n_pinned, pidx, B);
	float tmp[256] __attribute__((aligned(64)));

	for (uint32_t l = layer_begin; l < layer_end; l++) {
		const uint8_t *sec = (const uint8_t *)chunk + lay.data_offset + (size_t)l * lay.layer_bytes;
		size_t obase = (size_t)(l - layer_begin) * nt * row;
		if (cfg.scheme == KVT_SCHEME_NONE) {
			for (uint32_t t = tok_begin; t < tok_end; t++)
				for (uint32_t h = 0; h < H; h++) {
					size_t src = ((size_t)h * B + t) * d * ws;
					size_t dst = (obase + ((t - tok_begin) * (size_t)H + h) * d) * os;
					if (k_out)
						copy_row(ops, sec + lay.k_codes_off + src, cfg.dtype,
							 (uint8_t *)k_out + dst, out_dtype, d, tmp);
					if (v_out)
						copy_row(ops, sec + lay.v_codes_off + src, cfg.dtype,
							 (uint8_t *)v_out + dst, out_dtype, d, tmp);
				}
			continue;
		}
		const float *norms = (const float *)(const void *)(sec + lay.norms_off);
		const uint16_t *kscale = (const uint16_t *)(const void *)(sec + lay.k_scale_off);
		const uint16_t *kzero = (const uint16_t *)(const void *)(sec + lay.k_zero_off);
		const uint16_t *vscale = (const uint16_t *)(const void *)(sec + lay.v_scale_off);
		const uint16_t *vzero = (const uint16_t *)(const void *)(sec + lay.v_zero_off);
		const size_t krow = (size_t)d * cfg.key_bits / 8, vrow = (size_t)d * cfg.value_bits / 8;
		const bool hadamard = cfg.scheme == KVT_SCHEME_HADAMARD;
		const bool oscar = cfg.scheme == KVT_SCHEME_OSCAR;
		/* token-major, so the output is written sequentially */
		for (uint32_t t = tok_begin; t < tok_end; t++) {
			for (uint32_t h = 0; h < H; h++) {
				size_t dst = (obase + ((t - tok_begin) * (size_t)H + h) * d) * os;
				size_t idx = (size_t)h * B + t;
				if (pidx[t] >= 0) {
					size_t src = ((size_t)pidx[t] * H + h) * d * ws;
					if (k_out)
						copy_row(ops, sec + lay.k_exact_off + src, cfg.dtype,
							 (uint8_t *)k_out + dst, out_dtype, d, tmp);
					if (v_out)
						copy_row(ops, sec + lay.v_exact_off + src, cfg.dtype,
							 (uint8_t *)v_out + dst, out_dtype, d, tmp);
					continue;
				}
				if (k_out) {
					const uint8_t *codes = sec + lay.k_codes_off + idx * krow;
					if (hadamard) {
						ops->decode_row(codes, d, cfg.key_bits, gv, kscale + idx * ng,
								kzero + idx * ng, sdt, true, inv_sqrt_d,
								(uint8_t *)k_out + dst, out_dtype);
					} else {
						size_t p = ((size_t)h * (B / G) + t / G) * d;
						ops->decode_row(codes, d, cfg.key_bits, 1, kscale + p, kzero + p,
								sdt, oscar,
								oscar ? norms[t] * inv_sqrt_d : 1.0f,
								(uint8_t *)k_out + dst, out_dtype);
					}
				}
				if (v_out)
					ops->decode_row(sec + lay.v_codes_off + idx * vrow, d,
							cfg.value_bits, gv, vscale + idx * ng,
							vzero + idx * ng, sdt, cfg.rotate_v, inv_sqrt_d,
							(uint8_t *)v_out + dst, out_dtype);
			}
		}
	}
	return 0;
}

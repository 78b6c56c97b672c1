/*
 * codec_decode.c - any token range x layer range of a chunk back to f16/bf16/f32 in the
 * original basis (OSCAR.md section 2.5). Each row (token, head): unpack and dequantize,
 * rotate back (and multiply by the key norm), convert, store; the kernels take runs of rows
 * of one head (decode_rows), the old one-row-per-call driver stays for the tests.
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

/* The header and the ranges, checked the same way by both drivers. */
static int decode_args(const void *chunk, uint32_t tok_begin, uint32_t tok_end,
		       uint32_t layer_begin, uint32_t layer_end, uint32_t out_dtype,
		       struct kvt_codec_config *cfg, struct kvt_chunk_header *hdr,
		       struct kvt_chunk_layout *lay, char *err, size_t errlen)
{
	int rc;
	if ((rc = kvt_chunk_view(chunk, SIZE_MAX, cfg, hdr, lay, err, errlen)))
		return rc;
	if (tok_begin > tok_end || tok_end > cfg->chunk_tokens)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "token range [%u, %u) is not inside the chunk's 0..%u",
				      tok_begin, tok_end, cfg->chunk_tokens);
	if (layer_begin > layer_end || layer_end > cfg->n_layers)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "layer range [%u, %u) is not inside 0..%u", layer_begin,
				      layer_end, cfg->n_layers);
	if (!kvt_dtype_size(out_dtype))
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "out_dtype %u is not one of f16 (1), bf16 (2), f32 (3)",
				      out_dtype);
	return 0;
}

/* Scheme none: the rows are the input, transposed to [H][B][d] in the wire dtype. */
static void decode_none(const struct kvt_codec_ops *ops, const struct kvt_codec_config *cfg,
			const struct kvt_chunk_layout *lay, const uint8_t *sec, size_t obase,
			uint32_t tok_begin, uint32_t tok_end, uint32_t out_dtype, void *k_out,
			void *v_out, float *tmp)
{
	const uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim;
	const size_t ws = kvt_dtype_size(cfg->dtype), os = kvt_dtype_size(out_dtype);
	for (uint32_t t = tok_begin; t < tok_end; t++)
		for (uint32_t h = 0; h < H; h++) {
			size_t src = ((size_t)h * B + t) * d * ws;
			size_t dst = (obase + ((t - tok_begin) * (size_t)H + h) * d) * os;
			if (k_out)
				copy_row(ops, sec + lay->k_codes_off + src, cfg->dtype,
					 (uint8_t *)k_out + dst, out_dtype, d, tmp);
			if (v_out)
				copy_row(ops, sec + lay->v_codes_off + src, cfg->dtype,
					 (uint8_t *)v_out + dst, out_dtype, d, tmp);
		}
}

/*
 * Per layer, per run of tokens inside one key group, per block of up to KVT_DECODE_HEADS_MAX
 * heads: the K rows and the V rows of the run go to ops->decode_rows in one call each
 * (per-channel key parameters are the same for the whole run), written token by token as the
 * output is laid out; pinned tokens are skipped there and copied from the exact arrays here.
 * Every row gets exactly the operations of kvt_decode_chunk_rowwise below.
 */
int kvt_decode_chunk(const void *chunk, uint32_t tok_begin, uint32_t tok_end,
		     uint32_t layer_begin, uint32_t layer_end, uint32_t out_dtype, void *k_out,
		     void *v_out, char *err, size_t errlen)
{
	struct kvt_codec_config cfg;
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	int rc;
	if ((rc = decode_args(chunk, tok_begin, tok_end, layer_begin, layer_end, out_dtype, &cfg,
			      &hdr, &lay, err, errlen)))
		return rc;
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	const uint32_t B = cfg.chunk_tokens, H = cfg.n_kv_heads, d = cfg.head_dim, G = cfg.group;
	const size_t ws = kvt_dtype_size(cfg.dtype), os = kvt_dtype_size(out_dtype);
	const size_t nt = tok_end - tok_begin, row = (size_t)H * d;
	const uint32_t sdt = hdr.scale_dtype, gv = (uint32_t)kvt_value_group(&cfg), ng = d / gv;
	const float inv_sqrt_d = kvt_inv_sqrt_dim(d);
	int16_t pidx[KVT_MAX_CHUNK_TOKENS];
	pin_index(chunk, hdr.n_pinned, pidx, B);
	float tmp[256] __attribute__((aligned(64)));
	const bool hadamard = cfg.scheme == KVT_SCHEME_HADAMARD;
	const bool oscar = cfg.scheme == KVT_SCHEME_OSCAR;
	const size_t krow = (size_t)d * cfg.key_bits / 8, vrow = (size_t)d * cfg.value_bits / 8;

	for (uint32_t l = layer_begin; l < layer_end; l++) {
		const uint8_t *sec = (const uint8_t *)chunk + lay.data_offset + (size_t)l * lay.layer_bytes;
		const size_t obase = (size_t)(l - layer_begin) * nt * row;
		if (cfg.scheme == KVT_SCHEME_NONE) {
			decode_none(ops, &cfg, &lay, sec, obase, tok_begin, tok_end, out_dtype, k_out,
				    v_out, tmp);
			continue;
		}
		const float *norms = (const float *)(const void *)(sec + lay.norms_off);
		const uint16_t *kscale = (const uint16_t *)(const void *)(sec + lay.k_scale_off);
		const uint16_t *kzero = (const uint16_t *)(const void *)(sec + lay.k_zero_off);
		const uint16_t *vscale = (const uint16_t *)(const void *)(sec + lay.v_scale_off);
		const uint16_t *vzero = (const uint16_t *)(const void *)(sec + lay.v_zero_off);
		for (uint32_t t0 = tok_begin; t0 < tok_end;) {
			const uint32_t t1 = (t0 / G + 1) * G < tok_end ? (t0 / G + 1) * G : tok_end;
			for (uint32_t h0 = 0; h0 < H; h0 += KVT_DECODE_HEADS_MAX) {
				const uint32_t nh = H - h0 < KVT_DECODE_HEADS_MAX ? H - h0
										  : KVT_DECODE_HEADS_MAX;
				const size_t idx = (size_t)h0 * B + t0;
				struct kvt_decode_rows j = {
					.pidx = pidx + t0,
					.out_stride = row * os,
					.head_out = (size_t)d * os,
					.n = t1 - t0,
					.n_heads = nh,
					.d = d,
					.sdt = sdt,
					.out_dtype = out_dtype,
				};
				const size_t dst = (obase + ((t0 - tok_begin) * (size_t)H + h0) * d) * os;
				if (k_out) {
					j.codes = sec + lay.k_codes_off + idx * krow;
					j.code_stride = krow;
					j.head_codes = (size_t)B * krow;
					j.bits = cfg.key_bits;
					j.out = (uint8_t *)k_out + dst;
					if (hadamard) {
						j.gv = gv;
						j.s16 = kscale + idx * ng;
						j.z16 = kzero + idx * ng;
						j.head_params = (size_t)B * ng;
						j.rot = true;
						j.norms = NULL;
						j.mult = inv_sqrt_d;
					} else {
						size_t p = ((size_t)h0 * (B / G) + t0 / G) * d;
						j.gv = 1;
						j.s16 = kscale + p;
						j.z16 = kzero + p;
						j.head_params = (size_t)(B / G) * d;
						j.rot = oscar;
						j.norms = oscar ? norms + t0 : NULL;
						j.mult = oscar ? inv_sqrt_d : 1.0f;
					}
					ops->decode_rows(&j);
				}
				if (v_out) {
					j.codes = sec + lay.v_codes_off + idx * vrow;
					j.code_stride = vrow;
					j.head_codes = (size_t)B * vrow;
					j.bits = cfg.value_bits;
					j.out = (uint8_t *)v_out + dst;
					j.gv = gv;
					j.s16 = vscale + idx * ng;
					j.z16 = vzero + idx * ng;
					j.head_params = (size_t)B * ng;
					j.rot = cfg.rotate_v;
					j.norms = NULL;
					j.mult = inv_sqrt_d;
					ops->decode_rows(&j);
				}
			}
			t0 = t1;
		}
		if (!hdr.n_pinned)
			continue;
		for (uint32_t t = tok_begin; t < tok_end; t++) {
			if (pidx[t] < 0)
				continue;
			for (uint32_t h = 0; h < H; h++) {
				size_t dst = (obase + ((t - tok_begin) * (size_t)H + h) * d) * os;
				size_t src = ((size_t)pidx[t] * H + h) * d * ws;
				if (k_out)
					copy_row(ops, sec + lay.k_exact_off + src, cfg.dtype,
						 (uint8_t *)k_out + dst, out_dtype, d, tmp);
				if (v_out)
					copy_row(ops, sec + lay.v_exact_off + src, cfg.dtype,
						 (uint8_t *)v_out + dst, out_dtype, d, tmp);
			}
		}
	}
	return 0;
}

int kvt_decode_chunk_rowwise(const struct kvt_codec_ops *ops, const void *chunk,
			     uint32_t tok_begin, uint32_t tok_end, uint32_t layer_begin,
			     uint32_t layer_end, uint32_t out_dtype, void *k_out, void *v_out,
			     char *err, size_t errlen)
{
	struct kvt_codec_config cfg;
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	int rc;
	if ((rc = decode_args(chunk, tok_begin, tok_end, layer_begin, layer_end, out_dtype, &cfg,
			      &hdr, &lay, err, errlen)))
		return rc;
	const uint32_t B = cfg.chunk_tokens, H = cfg.n_kv_heads, d = cfg.head_dim, G = cfg.group;
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
			decode_none(ops, &cfg, &lay, sec, obase, tok_begin, tok_end, out_dtype, k_out,
				    v_out, tmp);
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

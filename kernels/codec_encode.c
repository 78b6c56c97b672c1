/*
 * codec_encode.c - B tokens x all layers -> one chunk (OSCAR.md section 2, CHUNK_FORMAT.md).
 *
 * Work goes one layer and one token group (G tokens) at a time: a group is everything one
 * per-channel key group needs (its G tokens x H heads x d in f32), so the scratch stays in the
 * L2 cache (128 KiB at the defaults) however long the chunk is.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "codec_internal.h"

struct pin_cand {
	float ratio;
	uint32_t token;
};

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	/* NaN sorts last so it never becomes the median of a sane layer */
	if (isnan(x) || isnan(y))
		return isnan(x) - isnan(y);
	return (x > y) - (x < y);
}

static int cmp_cand(const void *a, const void *b)
{
	const struct pin_cand *x = a, *y = b;
	if (x->ratio != y->ratio)
		return x->ratio < y->ratio ? -1 : 1;
	return (x->token > y->token) - (x->token < y->token);
}

/*
 * Pin detection (CHUNK_FORMAT.md "Pins"): a token whose key norm (all heads of one layer,
 * original basis) is below ratio x the layer's median over the chunk, in any layer; at most
 * pin_detect_max per chunk, lowest norm/median first. Sinks are already pinned.
 */
static int detect_pins(const struct kvt_codec_ops *ops, const struct kvt_codec_config *cfg,
		       const void *k, uint8_t *pin)
{
	uint32_t B = cfg->chunk_tokens, L = cfg->n_layers, H = cfg->n_kv_heads,
		 d = cfg->head_dim;
	size_t ws = kvt_dtype_size(cfg->dtype), row = (size_t)H * d;
	float *tmp = malloc(row * 4);
	float *norms = malloc((size_t)B * 4), *sorted = malloc((size_t)B * 4);
	float *best = malloc((size_t)B * 4);
	struct pin_cand *cand = malloc((size_t)B * sizeof(*cand));
	int rc = -ENOMEM;
	if (!tmp || !norms || !sorted || !best || !cand)
		goto out;
	for (uint32_t t = 0; t < B; t++)
		best[t] = __builtin_inff();
	for (uint32_t l = 0; l < L; l++) {
		for (uint32_t t = 0; t < B; t++) {
			ops->load_f32((const uint8_t *)k + ((size_t)l * B + t) * row * ws,
				      cfg->dtype, tmp, row);
			norms[t] = sqrtf(ops->sumsq(tmp, row));
		}
		memcpy(sorted, norms, (size_t)B * 4);
		qsort(sorted, B, 4, cmp_float);
		float median = 0.5f * (sorted[B / 2 - 1] + sorted[B / 2]);
		if (!(median > 0.0f) || !isfinite(median))
			continue;
		for (uint32_t t = 0; t < B; t++) {
			float r = norms[t] / median;
			if (r < best[t])
				best[t] = r;
		}
	}
	uint32_t n = 0;
	for (uint32_t t = 0; t < B; t++)
		if (!pin[t] && best[t] < cfg->pin_detect_ratio)
			cand[n++] = (struct pin_cand){best[t], t};
	qsort(cand, n, sizeof(*cand), cmp_cand);
	for (uint32_t i = 0; i < n && i < cfg->pin_detect_max; i++)
		pin[cand[i].token] = 1;
	rc = 0;
out:
	free(tmp);
	free(norms);
	free(sorted);
	free(best);
	free(cand);
	return rc;
}

/* Zeroes the gaps between a layer section's arrays so the bytes (and crc) are determined. */
static void zero_gaps(uint8_t *sec, const struct kvt_chunk_layout *lay)
{
	const size_t offs[9] = {lay->norms_off,   lay->k_scale_off, lay->k_zero_off,
				lay->v_scale_off, lay->v_zero_off,  lay->k_codes_off,
				lay->v_codes_off, lay->k_exact_off, lay->v_exact_off};
	const size_t sizes[9] = {lay->norms_bytes,   lay->k_scale_bytes, lay->k_scale_bytes,
				 lay->v_scale_bytes, lay->v_scale_bytes, lay->k_codes_bytes,
				 lay->v_codes_bytes, lay->exact_bytes,   lay->exact_bytes};
	for (int i = 0; i < 9; i++) {
		size_t end = offs[i] + sizes[i];
		size_t next = i < 8 ? offs[i + 1] : lay->layer_bytes;
		KVT_ASSERT(next >= end);
		memset(sec + end, 0, next - end);
	}
}

/* Quantizes one row per token and head (values, and hadamard keys) of a token group. */
static void quant_token_rows(const struct kvt_codec_ops *ops, const float *x, uint32_t t0,
			     uint32_t ntok, const uint8_t *pin, const struct kvt_codec_config *cfg,
			     uint32_t bits, uint32_t sdt, uint16_t *scale, uint16_t *zero,
			     uint8_t *codes, uint8_t *codes8, bool mse)
{
	uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim;
	uint32_t gv = (uint32_t)kvt_value_group(cfg), ng = d / gv;
	size_t crow = (size_t)d * bits / 8;
	float qmax = (float)((1u << bits) - 1);
	for (uint32_t h = 0; h < H; h++) {
		size_t idx = (size_t)h * B + t0;
		ops->quant_rows(x + (size_t)h * d, (size_t)H * d, ntok, pin + t0, d, gv, bits, sdt,
				scale + idx * ng, zero + idx * ng, codes8);
		for (uint32_t t = 0; mse && t < ntok; t++) {
			if (pin[t0 + t])
				continue; /* scale 0, zero 0, codes 0 by rule */
			for (uint32_t g = 0; g < ng; g++)
				kvt_mse_group(x + (size_t)t * H * d + (size_t)h * d + (size_t)g * gv, 1,
					  gv, NULL, qmax, sdt, scale + (idx + t) * ng + g,
					  zero + (idx + t) * ng + g, codes8 + (size_t)t * d + g * gv, 1);
		}
		for (uint32_t t = 0; t < ntok; t++)
			ops->pack(codes8 + (size_t)t * d, d, bits, codes + (idx + t) * crow);
	}
}

int64_t kvt_encode_chunk(const struct kvt_codec_config *cfg, uint64_t first_token,
			 const void *k, const void *v, void *out, size_t out_cap, char *err,
			 size_t errlen)
{
	int rc;
	if ((rc = kvt_codec_config_validate(cfg, err, errlen)))
		return rc;
	if (!k || !v || !out)
		return kvt_codec_errf(err, errlen, -EINVAL, "%s is NULL",
				      !k ? "k" : !v ? "v" : "out");
	if (first_token > UINT64_MAX - cfg->chunk_tokens)
		return kvt_codec_errf(err, errlen, -EINVAL, "first_token %llu overflows",
				      (unsigned long long)first_token);
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	const uint32_t B = cfg->chunk_tokens, L = cfg->n_layers, H = cfg->n_kv_heads,
		       d = cfg->head_dim, G = cfg->group;
	const size_t ws = kvt_dtype_size(cfg->dtype), row = (size_t)H * d;
	const uint32_t sdt = cfg->dtype == KVT_DTYPE_BF16 ? KVT_DTYPE_BF16 : KVT_DTYPE_F16;
	const bool none = cfg->scheme == KVT_SCHEME_NONE;
	const bool mse = cfg->key_rounding == KVT_ROUNDING_MSE;

	uint8_t pin[KVT_MAX_CHUNK_TOKENS];
	memset(pin, 0, sizeof(pin));
	if (!none) {
		for (uint32_t t = 0; t < B && first_token + t < cfg->n_sinks; t++)
			pin[t] = 1;
		if (cfg->pin_detect_ratio > 0.0f && cfg->pin_detect_max > 0 &&
		    (rc = detect_pins(ops, cfg, k, pin)))
			return kvt_codec_errf(err, errlen, rc, "out of memory detecting pins");
	}
	uint16_t pins[KVT_MAX_CHUNK_TOKENS];
	uint32_t n_pinned = 0;
	for (uint32_t t = 0; t < B; t++)
		if (pin[t])
			pins[n_pinned++] = (uint16_t)t;

	struct kvt_chunk_layout lay;
	KVT_ASSERT(kvt_chunk_layout(cfg, n_pinned, &lay) == 0);
	if (out_cap < lay.total_bytes)
		return kvt_codec_errf(err, errlen, -ENOSPC,
				      "out_cap %zu is below the chunk's %zu bytes", out_cap,
				      lay.total_bytes);

	uint8_t *o = out;
	float *kx = NULL, *vx = NULL;
	uint8_t *codes8 = NULL;
	if (!none) {
		size_t blk = (size_t)G * row * 4;
		kx = aligned_alloc(64, blk);
		vx = aligned_alloc(64, blk);
		codes8 = aligned_alloc(64, KVT_ALIGN_UP((size_t)G * d, 64));
		if (!kx || !vx || !codes8) {
			rc = kvt_codec_errf(err, errlen, -ENOMEM, "out of memory (%zu bytes scratch)",
					    2 * blk);
			goto cleanup;
		}
	}

	memset(o, 0, lay.data_offset);
	memcpy(o + KVT_CHUNK_HEADER_BYTES, pins, (size_t)n_pinned * 2);

	const float inv_sqrt_d = kvt_inv_sqrt_dim(d);
	const size_t krow = (size_t)d * (none ? 0 : cfg->key_bits) / 8;
	for (uint32_t l = 0; l < L; l++) {
		uint8_t *sec = o + lay.data_offset + (size_t)l * lay.layer_bytes;
		const uint8_t *kl = (const uint8_t *)k + (size_t)l * B * row * ws;
		const uint8_t *vl = (const uint8_t *)v + (size_t)l * B * row * ws;
		zero_gaps(sec, &lay);
		if (none) {
			for (uint32_t h = 0; h < H; h++)
				for (uint32_t t = 0; t < B; t++) {
					size_t dst = ((size_t)h * B + t) * d * ws;
					size_t src = ((size_t)t * H + h) * d * ws;
					memcpy(sec + lay.k_codes_off + dst, kl + src, d * ws);
					memcpy(sec + lay.v_codes_off + dst, vl + src, d * ws);
				}
			continue;
		}
		float *norms = (float *)(void *)(sec + lay.norms_off);
		uint16_t *kscale = (uint16_t *)(void *)(sec + lay.k_scale_off);
		uint16_t *kzero = (uint16_t *)(void *)(sec + lay.k_zero_off);
		uint16_t *vscale = (uint16_t *)(void *)(sec + lay.v_scale_off);
		uint16_t *vzero = (uint16_t *)(void *)(sec + lay.v_zero_off);
		uint8_t *kcodes = sec + lay.k_codes_off, *vcodes = sec + lay.v_codes_off;
		for (uint32_t b = 0; b < B / G; b++) {
			uint32_t t0 = b * G;
			ops->load_f32(kl + (size_t)t0 * row * ws, cfg->dtype, kx, (size_t)G * row);
			if (kvt_scheme_rotates_keys(cfg->scheme))
				ops->fwht(kx, (size_t)G * H, d, inv_sqrt_d);
			if (cfg->scheme == KVT_SCHEME_OSCAR) {
				for (uint32_t t = 0; t < G; t++) {
					float n = sqrtf(ops->sumsq(kx + t * row, row));
					if (n == 0.0f || !isfinite(n))
						n = 1.0f;
					norms[t0 + t] = n;
					ops->div(kx + t * row, row, n);
				}
			}
			if (cfg->scheme == KVT_SCHEME_HADAMARD) {
				quant_token_rows(ops, kx, t0, G, pin, cfg, cfg->key_bits, sdt, kscale,
						 kzero, kcodes, codes8, mse);
			} else {
				for (uint32_t h = 0; h < H; h++) {
					size_t pidx = ((size_t)h * (B / G) + b) * d;
					ops->quant_cols(kx + (size_t)h * d, row, G, pin + t0, d,
							cfg->key_bits, sdt, kscale + pidx, kzero + pidx,
							codes8);
					if (mse)
						ops->mse_cols(kx + (size_t)h * d, row, G, pin + t0, d,
							      cfg->key_bits, sdt, kscale + pidx,
							      kzero + pidx, codes8);
					for (uint32_t t = 0; t < G; t++)
						ops->pack(codes8 + (size_t)t * d, d, cfg->key_bits,
							  kcodes + ((size_t)h * B + t0 + t) * krow);
				}
			}
			ops->load_f32(vl + (size_t)t0 * row * ws, cfg->dtype, vx, (size_t)G * row);
			if (cfg->rotate_v)
				ops->fwht(vx, (size_t)G * H, d, inv_sqrt_d);
			quant_token_rows(ops, vx, t0, G, pin, cfg, cfg->value_bits, sdt, vscale, vzero,
					 vcodes, codes8, false);
		}
		for (uint32_t i = 0; i < n_pinned; i++) {
			size_t src = (size_t)pins[i] * row * ws, dst = (size_t)i * row * ws;
			memcpy(sec + lay.k_exact_off + dst, kl + src, row * ws);
			memcpy(sec + lay.v_exact_off + dst, vl + src, row * ws);
		}
	}

	struct kvt_chunk_header h;
	memset(&h, 0, sizeof(h));
	h.magic = KVT_CHUNK_MAGIC;
	h.version = KVT_CHUNK_VERSION;
	h.header_bytes = KVT_CHUNK_HEADER_BYTES;
	h.scheme = (uint8_t)cfg->scheme;
	h.key_bits = (uint8_t)(none ? 16 : cfg->key_bits);
	h.value_bits = (uint8_t)(none ? 16 : cfg->value_bits);
	h.dtype = (uint8_t)cfg->dtype;
	h.rotate_v = (uint8_t)cfg->rotate_v;
	h.scale_dtype = (uint8_t)sdt;
	h.group = (uint16_t)G;
	h.chunk_tokens = (uint16_t)B;
	h.n_layers = (uint16_t)L;
	h.n_kv_heads = (uint16_t)H;
	h.head_dim = (uint16_t)d;
	h.n_pinned = (uint16_t)n_pinned;
	h.n_sinks = (uint16_t)cfg->n_sinks;
	h.first_token = first_token;
	h.layer_bytes = (uint32_t)lay.layer_bytes;
	h.data_offset = (uint32_t)lay.data_offset;
	h.total_bytes = lay.total_bytes;
	memcpy(o, &h, sizeof(h));
	h.crc32c = kvt_chunk_crc(o, lay.total_bytes);
	memcpy(o, &h, sizeof(h));
	rc = 0;
cleanup:
	free(kx);
	free(vx);
	free(codes8);
	return rc ? rc : (int64_t)lay.total_bytes;
}

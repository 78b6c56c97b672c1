/*
 * codec_attend.c - one decode step of attention over a session's encoded chunks and exact
 * tail, computed in the rotated basis (OSCAR.md section 3): the query is rotated once, each
 * key group's scale folds into the query (w = q' * s) and its zero into one constant
 * (<q', z>), so a token's logit is a dot product of w with its raw codes. Pinned tokens and
 * the tail are exact and use the original basis. Values of quantized tokens accumulate in the
 * rotated basis and are rotated back once at the end; exact values accumulate separately in
 * the original basis. Softmax is online (running max and sum) across chunks and the tail.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "codec_internal.h"

#define ATT_TAIL_BLOCK 128
#define ATT_MAX_Q_HEADS 4096
#define ATT_MAX_REP 64 /* query heads per KV head handled per dot_rows call */

struct att_state {
	uint32_t rep, d;
	float *qr;     /* [rep][d] rotated query (kivi, none: the query itself) */
	float *w;      /* [rep][d] q' * scale of the current key group */
	float *cz;     /* [rep] <q', zero> of the current key group */
	float *qsum;   /* [rep][d/gv] sum of q' over each channel group (hadamard keys) */
	float *acc_r;  /* [rep][d] value sum, rotated basis (quantized tokens) */
	float *acc_o;  /* [rep][d] value sum, original basis (exact tokens) */
	float *logits; /* [rep][max(B, ATT_TAIL_BLOCK)] */
	float *m, *l;  /* [rep] running max, running sum */
	float *ones;   /* [d] */
};

static bool same_shape(const struct kvt_codec_config *a, const struct kvt_codec_config *b)
{
	uint32_t ab = a->scheme == KVT_SCHEME_NONE ? 16 : a->key_bits;
	uint32_t av = a->scheme == KVT_SCHEME_NONE ? 16 : a->value_bits;
	return a->scheme == b->scheme && ab == b->key_bits && av == b->value_bits &&
	       a->group == b->group && a->chunk_tokens == b->chunk_tokens &&
	       a->n_layers == b->n_layers && a->n_kv_heads == b->n_kv_heads &&
	       a->head_dim == b->head_dim && a->dtype == b->dtype && a->rotate_v == b->rotate_v &&
	       a->n_sinks == b->n_sinks;
}

static int validate_req(const struct kvt_attend_request *r, size_t i, char *err, size_t errlen)
{
	char why[200];
	int rc;
	if (!r->cfg)
		return kvt_codec_errf(err, errlen, -EINVAL, "request %zu: cfg is NULL", i);
	if ((rc = kvt_codec_config_validate(r->cfg, why, sizeof(why))))
		return kvt_codec_errf(err, errlen, rc, "request %zu: %s", i, why);
	const struct kvt_codec_config *cfg = r->cfg;
	if (r->layer >= cfg->n_layers)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "request %zu: layer %u is not below n_layers %u", i, r->layer,
				      cfg->n_layers);
	if (r->n_q_heads == 0 || r->n_q_heads % cfg->n_kv_heads ||
	    r->n_q_heads > ATT_MAX_Q_HEADS)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "request %zu: n_q_heads %u is not a multiple of n_kv_heads %u "
				      "in 1..%u",
				      i, r->n_q_heads, cfg->n_kv_heads, ATT_MAX_Q_HEADS);
	if (!isfinite(r->softmax_scale))
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "request %zu: softmax_scale %g is not finite", i,
				      (double)r->softmax_scale);
	if (!r->q || !r->out)
		return kvt_codec_errf(err, errlen, -EINVAL, "request %zu: %s is NULL", i,
				      !r->q ? "q" : "out");
	if (r->n_chunks && !r->chunks)
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "request %zu: chunks is NULL with n_chunks %u", i, r->n_chunks);
	if (r->n_tail && (!r->tail_k || !r->tail_v))
		return kvt_codec_errf(err, errlen, -EINVAL,
				      "request %zu: %s is NULL with n_tail %u", i,
				      !r->tail_k ? "tail_k" : "tail_v", r->n_tail);
	uint64_t next = 0;
	for (uint32_t c = 0; c < r->n_chunks; c++) {
		struct kvt_codec_config ccfg;
		struct kvt_chunk_header hdr;
		if (!r->chunks[c])
			return kvt_codec_errf(err, errlen, -EINVAL, "request %zu: chunks[%u] is NULL",
					      i, c);
		if ((rc = kvt_chunk_view(r->chunks[c], SIZE_MAX, &ccfg, &hdr, NULL, why, sizeof(why))))
			return kvt_codec_errf(err, errlen, -EINVAL, "request %zu: chunks[%u]: %s", i,
					      c, why);
		if (!same_shape(cfg, &ccfg))
			return kvt_codec_errf(err, errlen, -EINVAL,
					      "request %zu: chunks[%u] shape/codec differs from cfg",
					      i, c);
		if (c && hdr.first_token != next)
			return kvt_codec_errf(err, errlen, -EINVAL,
					      "request %zu: chunks[%u] first_token %llu is not %llu "
					      "(chunks must be consecutive)",
					      i, c, (unsigned long long)hdr.first_token,
					      (unsigned long long)next);
		next = hdr.first_token + cfg->chunk_tokens;
	}
	return 0;
}

/* logits of one exact key row (original basis) for every query head of the group */
static void exact_logits(const struct kvt_codec_ops *ops, const float *qh, const float *k,
			 uint32_t rep, uint32_t d, float scale, float *logits, size_t lstride)
{
	float dots[ATT_MAX_REP];
	for (uint32_t i0 = 0; i0 < rep; i0 += ATT_MAX_REP) {
		uint32_t nr = rep - i0 < ATT_MAX_REP ? rep - i0 : ATT_MAX_REP;
		ops->dot_rows(qh + (size_t)i0 * d, d, nr, k, d, dots);
		for (uint32_t i = 0; i < nr; i++)
			logits[(i0 + i) * lstride] = scale * dots[i];
	}
}

/* Online softmax over one block of n logits per query head: the logits become p = exp(x -
 * m) and both accumulators are rescaled to the new running max. */
static void softmax_block(struct att_state *s, uint32_t n, size_t lstride)
{
	for (uint32_t i = 0; i < s->rep; i++) {
		float *lg = s->logits + i * lstride;
		float mb = -INFINITY;
		for (uint32_t t = 0; t < n; t++)
			mb = lg[t] > mb ? lg[t] : mb;
		float mnew = mb > s->m[i] ? mb : s->m[i];
		if (mnew == -INFINITY) {
			for (uint32_t t = 0; t < n; t++)
				lg[t] = 0.0f;
			continue;
		}
		float corr = expf(s->m[i] - mnew);
		if (corr != 1.0f) {
			s->l[i] = s->l[i] * corr;
			for (uint32_t c = 0; c < s->d; c++) {
				s->acc_r[i * s->d + c] = s->acc_r[i * s->d + c] * corr;
				s->acc_o[i * s->d + c] = s->acc_o[i * s->d + c] * corr;
			}
		}
		s->m[i] = mnew;
		for (uint32_t t = 0; t < n; t++) {
			float p = expf(lg[t] - mnew);
			s->l[i] = s->l[i] + p;
			lg[t] = p;
		}
	}
}

static void attend_chunk(const struct kvt_codec_ops *ops, const struct kvt_attend_request *r,
			 const void *chunk, uint32_t h, const float *qh, struct att_state *s,
			 size_t lstride)
{
	const struct kvt_codec_config *cfg = r->cfg;
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	KVT_ASSERT(kvt_chunk_view(chunk, SIZE_MAX, NULL, &hdr, &lay, NULL, 0) == 0);
	const uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim,
		       G = cfg->group, rep = s->rep;
	const size_t ws = kvt_dtype_size(cfg->dtype);
	const uint8_t *sec = (const uint8_t *)chunk + lay.data_offset + (size_t)r->layer * lay.layer_bytes;
	const float scale = r->softmax_scale;
	float tmp[256] __attribute__((aligned(64)));
	float zf[256] __attribute__((aligned(64)));

	int16_t pidx[KVT_MAX_CHUNK_TOKENS];
	for (uint32_t t = 0; t < B; t++)
		pidx[t] = -1;
	for (uint32_t i = 0; i < hdr.n_pinned; i++) {
		uint16_t t;
		memcpy(&t, (const uint8_t *)chunk + KVT_CHUNK_HEADER_BYTES + 2 * i, 2);
		pidx[t] = (int16_t)i;
	}

	if (cfg->scheme == KVT_SCHEME_NONE) {
		for (uint32_t t = 0; t < B; t++) {
			ops->load_f32(sec + lay.k_codes_off + ((size_t)h * B + t) * d * ws, cfg->dtype,
				      tmp, d);
			exact_logits(ops, qh, tmp, rep, d, scale, s->logits + t, lstride);
		}
		softmax_block(s, B, lstride);
		for (uint32_t t = 0; t < B; t++) {
			ops->load_f32(sec + lay.v_codes_off + ((size_t)h * B + t) * d * ws, cfg->dtype,
				      tmp, d);
			for (uint32_t i = 0; i < rep; i++)
				ops->axpy(s->acc_o + (size_t)i * d, tmp, s->logits[i * lstride + t], d);
		}
		return;
	}

	const float *norms = (const float *)(const void *)(sec + lay.norms_off);
	const uint16_t *kscale = (const uint16_t *)(const void *)(sec + lay.k_scale_off);
	const uint16_t *kzero = (const uint16_t *)(const void *)(sec + lay.k_zero_off);
	const uint16_t *vscale = (const uint16_t *)(const void *)(sec + lay.v_scale_off);
	const uint16_t *vzero = (const uint16_t *)(const void *)(sec + lay.v_zero_off);
	const size_t krow = (size_t)d * cfg->key_bits / 8, vrow = (size_t)d * cfg->value_bits / 8;
	const uint32_t sdt = hdr.scale_dtype, gv = (uint32_t)kvt_value_group(cfg), ng = d / gv;
	const bool oscar = cfg->scheme == KVT_SCHEME_OSCAR;

	/* keys -> logits */
	for (uint32_t t = 0; t < B; t++) {
		size_t idx = (size_t)h * B + t;
		if (cfg->scheme != KVT_SCHEME_HADAMARD && t % G == 0) {
			/* a new key group: fold its per-channel scale into the query */
			size_t p = ((size_t)h * (B / G) + t / G) * d;
			ops->load_f32(kscale + p, sdt, tmp, d);
			ops->load_f32(kzero + p, sdt, zf, d);
			for (uint32_t i = 0; i < rep; i++) {
				const float *q = s->qr + (size_t)i * d;
				float *w = s->w + (size_t)i * d;
				for (uint32_t c = 0; c < d; c++)
					w[c] = q[c] * tmp[c];
				s->cz[i] = ops->dot(q, zf, d);
			}
		}
		if (pidx[t] >= 0) {
			ops->load_f32(sec + lay.k_exact_off + ((size_t)pidx[t] * H + h) * d * ws,
				      cfg->dtype, tmp, d);
			exact_logits(ops, qh, tmp, rep, d, scale, s->logits + t, lstride);
			continue;
		}
		if (cfg->scheme == KVT_SCHEME_HADAMARD) {
			/* per channel group j: s_j <q'_j, codes_j> + z_j sum(q'_j), the dots of all
			 * query heads of this KV head in one pass over the codes */
			ops->unpack_f32(sec + lay.k_codes_off + idx * krow, d, cfg->key_bits, tmp);
			float sj[8], zj[8], dots[ATT_MAX_REP];
			for (uint32_t j = 0; j < ng; j++) {
				sj[j] = kvt_widen16(kscale[idx * ng + j], sdt);
				zj[j] = kvt_widen16(kzero[idx * ng + j], sdt);
			}
			for (uint32_t i = 0; i < rep; i++)
				s->logits[i * lstride + t] = 0.0f;
			for (uint32_t j = 0; j < ng; j++)
				for (uint32_t i0 = 0; i0 < rep; i0 += ATT_MAX_REP) {
					uint32_t nr = rep - i0 < ATT_MAX_REP ? rep - i0 : ATT_MAX_REP;
					ops->dot_rows(s->qr + (size_t)i0 * d + j * gv, d, nr, tmp + j * gv, gv,
						      dots);
					for (uint32_t i = 0; i < nr; i++) {
						float *lg = &s->logits[(i0 + i) * lstride + t];
						*lg = *lg + (sj[j] * dots[i] + zj[j] * s->qsum[(i0 + i) * ng + j]);
					}
				}
			for (uint32_t i = 0; i < rep; i++)
				s->logits[i * lstride + t] = scale * s->logits[i * lstride + t];
			continue;
		}
		ops->unpack_f32(sec + lay.k_codes_off + idx * krow, d, cfg->key_bits, tmp);
		float n = oscar ? norms[t] : 1.0f, dots[ATT_MAX_REP];
		for (uint32_t i0 = 0; i0 < rep; i0 += ATT_MAX_REP) {
			uint32_t nr = rep - i0 < ATT_MAX_REP ? rep - i0 : ATT_MAX_REP;
			ops->dot_rows(s->w + (size_t)i0 * d, d, nr, tmp, d, dots);
			for (uint32_t i = 0; i < nr; i++)
				s->logits[(i0 + i) * lstride + t] = scale * (n * (dots[i] + s->cz[i0 + i]));
		}
	}
	softmax_block(s, B, lstride);

	/* values */
	for (uint32_t t = 0; t < B; t++) {
		size_t idx = (size_t)h * B + t;
		if (pidx[t] >= 0) {
			ops->load_f32(sec + lay.v_exact_off + ((size_t)pidx[t] * H + h) * d * ws,
				      cfg->dtype, tmp, d);
			for (uint32_t i = 0; i < rep; i++)
				ops->axpy(s->acc_o + (size_t)i * d, tmp, s->logits[i * lstride + t], d);
			continue;
		}
		ops->accum_grp(sec + lay.v_codes_off + idx * vrow, d, cfg->value_bits, gv,
			       vscale + idx * ng, vzero + idx * ng, sdt, s->logits + t, lstride, rep,
			       s->acc_r, d);
	}
}

static void attend_tail(const struct kvt_codec_ops *ops, const struct kvt_attend_request *r,
			uint32_t h, const float *qh, struct att_state *s, size_t lstride)
{
	const struct kvt_codec_config *cfg = r->cfg;
	const uint32_t H = cfg->n_kv_heads, d = cfg->head_dim, rep = s->rep;
	const size_t ws = kvt_dtype_size(cfg->dtype);
	float tmp[256] __attribute__((aligned(64)));
	for (uint32_t t0 = 0; t0 < r->n_tail; t0 += ATT_TAIL_BLOCK) {
		uint32_t n = r->n_tail - t0 < ATT_TAIL_BLOCK ? r->n_tail - t0 : ATT_TAIL_BLOCK;
		for (uint32_t t = 0; t < n; t++) {
			ops->load_f32((const uint8_t *)r->tail_k + (((size_t)t0 + t) * H + h) * d * ws,
				      cfg->dtype, tmp, d);
			exact_logits(ops, qh, tmp, rep, d, r->softmax_scale, s->logits + t, lstride);
		}
		softmax_block(s, n, lstride);
		for (uint32_t t = 0; t < n; t++) {
			ops->load_f32((const uint8_t *)r->tail_v + (((size_t)t0 + t) * H + h) * d * ws,
				      cfg->dtype, tmp, d);
			for (uint32_t i = 0; i < rep; i++)
				ops->axpy(s->acc_o + (size_t)i * d, tmp, s->logits[i * lstride + t], d);
		}
	}
}

static int attend_one(const struct kvt_codec_ops *ops, const struct kvt_attend_request *r)
{
	const struct kvt_codec_config *cfg = r->cfg;
	const uint32_t H = cfg->n_kv_heads, d = cfg->head_dim, rep = r->n_q_heads / H;
	const uint32_t gv = (uint32_t)kvt_value_group(cfg), ng = d / gv;
	const size_t lstride = cfg->chunk_tokens > ATT_TAIL_BLOCK ? cfg->chunk_tokens : ATT_TAIL_BLOCK;
	const float inv_sqrt_d = kvt_inv_sqrt_dim(d);
	const bool rot = kvt_scheme_rotates_keys(cfg->scheme);
	struct att_state s = {.rep = rep, .d = d};
	size_t nf = (size_t)rep * d * 4 + rep + (size_t)rep * ng + (size_t)rep * lstride + 2 * rep + d;
	float *buf = aligned_alloc(64, KVT_ALIGN_UP(nf * 4, 64));
	if (!buf)
		return -ENOMEM;
	float *p = buf;
	s.qr = p, p += (size_t)rep * d;
	s.w = p, p += (size_t)rep * d;
	s.acc_r = p, p += (size_t)rep * d;
	s.acc_o = p, p += (size_t)rep * d;
	s.cz = p, p += rep;
	s.qsum = p, p += (size_t)rep * ng;
	s.logits = p, p += (size_t)rep * lstride;
	s.m = p, p += rep;
	s.l = p, p += rep;
	s.ones = p;
	for (uint32_t c = 0; c < d; c++)
		s.ones[c] = 1.0f;

	for (uint32_t h = 0; h < H; h++) {
		const float *qh = r->q + (size_t)h * rep * d;
		memcpy(s.qr, qh, (size_t)rep * d * 4);
		if (rot)
			ops->fwht(s.qr, rep, d, inv_sqrt_d);
		for (uint32_t i = 0; i < rep; i++) {
			for (uint32_t j = 0; j < ng; j++)
				s.qsum[i * ng + j] = ops->dot(s.qr + (size_t)i * d + j * gv, s.ones, gv);
			s.m[i] = -INFINITY;
			s.l[i] = 0.0f;
		}
		memset(s.acc_r, 0, (size_t)rep * d * 4);
		memset(s.acc_o, 0, (size_t)rep * d * 4);
		for (uint32_t c = 0; c < r->n_chunks; c++)
			attend_chunk(ops, r, r->chunks[c], h, qh, &s, lstride);
		attend_tail(ops, r, h, qh, &s, lstride);
		for (uint32_t i = 0; i < rep; i++) {
			float *acc_r = s.acc_r + (size_t)i * d, *acc_o = s.acc_o + (size_t)i * d;
			float *o = r->out + ((size_t)h * rep + i) * d;
			if (cfg->rotate_v)
				ops->fwht(acc_r, 1, d, inv_sqrt_d);
			float inv_l = s.l[i] > 0.0f ? 1.0f / s.l[i] : 0.0f;
			for (uint32_t c = 0; c < d; c++)
				o[c] = (acc_r[c] + acc_o[c]) * inv_l;
		}
	}
	free(buf);
	return 0;
}

int kvt_attend(const struct kvt_attend_request *reqs, size_t n_reqs, char *err, size_t errlen)
{
	int rc;
	if (n_reqs && !reqs)
		return kvt_codec_errf(err, errlen, -EINVAL, "reqs is NULL with n_reqs %zu", n_reqs);
	/* validate the whole batch first: a rejected batch writes no output */
	for (size_t i = 0; i < n_reqs; i++)
		if ((rc = validate_req(&reqs[i], i, err, errlen)))
			return rc;
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	for (size_t i = 0; i < n_reqs; i++)
		if ((rc = attend_one(ops, &reqs[i])))
			return kvt_codec_errf(err, errlen, rc, "request %zu: out of memory", i);
	return 0;
}

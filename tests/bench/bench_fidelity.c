/*
 * bench_fidelity.c - `kvtier-bench fidelity`: how much each codec changes K, V and the
 * attention output, on real post-RoPE K/V/Q (.npy) or on a seeded synthetic set with Token
 * Norm Imbalance (OSCAR.md section 1).
 *
 * Inputs (little-endian float .npy, C order; see client/kvt_npy.h):
 *   K, V  [layers][tokens][kv_heads][head_dim]  or  [tokens][kv_heads][head_dim] (1 layer)
 *   Q     [layers][n_q][q_heads][head_dim]; [n_q][q_heads][head_dim] or [q_heads][head_dim]
 *         when there is one layer; [layers][q_heads][head_dim] (one query per layer).
 * Query j of n_q is the query of position tokens - n_q + j and attends causally to tokens
 * 0..tokens-n_q+j (the decode steps at the end of the context). Keys must be post-RoPE.
 *
 * The data is rounded to f16 first (what a worker sends); that rounded data is the reference.
 * Chunks of B = 128 tokens x all layers are encoded and decoded through kvt_encode_chunk /
 * kvt_decode_chunk; the last tokens % 128 stay exact, as kvtier's tail does. Codecs run with
 * n_sinks = 0 by default (the paper pins nothing; --sinks S measures kvtier's pinning).
 *
 * Metrics (over every layer unless --layer-wise adds per-layer lines):
 *   key_rel_err        mean over quantized tokens of ||k^_t - k_t|| / ||k_t||, where k_t is
 *                      the token's key over all KV heads of the layer (the joint norm)
 *   key_rel_err_low1   the same over the 1% of tokens with the lowest key norm (per layer)
 *   key_rel_err_sink   the same over the synthetic set's sink tokens (null for .npy input)
 *   value_rel_err(_low1)  the same for values (lowest value norms)
 *   key/value_rel_err_fro  ||X^ - X||_F / ||X||_F
 *   attn_out_rel_err_{k,v,kv}  ||O^ - O||_F / ||O||_F with K only, V only, both quantized
 *   attn_kl            mean KL(p || p^) in nats of the attention weights, K quantized
 *   bits_per_element   true storage cost of the encoded chunks, all metadata included
 */
#include "bench.h"
#include "kvt_codec.h"
#include "kvt_npy.h"
#include "kvt_synth.h"
#include "kvt_text.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FID_B 128

struct dataset {
	uint32_t L, T, H, d, Hq, nq;
	float *K, *V, *Q;      /* [L][T][H][d], [L][T][H][d], [L][nq][Hq][d], f16-rounded */
	uint8_t *sink;         /* [T]: 1 for a synthetic sink token; NULL for .npy input */
	char source[16];
	uint64_t seed;
};

struct metrics {
	double k_err, k_n, k_low, k_low_n, k_sink, k_sink_n;
	double v_err, v_n, v_low, v_low_n;
	double k_fro_num, k_fro_den, v_fro_num, v_fro_den;
	double o_k, o_v, o_kv, o_den;
	double kl, kl_n;
};

struct codec_spec {
	int scheme, bits, group;
};

/* ---- small numeric helpers ----------------------------------------------------------------- */

static void axpy(float *y, const float *x, float a, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		y[i] += a * x[i];
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return x < y ? -1 : x > y;
}

struct norm_idx {
	float norm;
	uint32_t idx;
};

static int cmp_norm_idx(const void *a, const void *b)
{
	const struct norm_idx *x = a, *y = b;

	if (x->norm != y->norm)
		return x->norm < y->norm ? -1 : 1;
	return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static void round_f16(float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		x[i] = kvt_f16_to_f32(kvt_f32_to_f16(x[i]));
}

/* ---- the synthetic TNI set ------------------------------------------------------------- */

/* The set itself (what it models, how it compares with SmolLM2-135M) is client/kvt_synth.c,
 * shared with `kvtierctl demo` so both tools measure the same data for the same seed. */
static int make_synthetic(struct dataset *ds, uint64_t seed, uint32_t L, uint32_t T, uint32_t H,
			  uint32_t d, uint32_t Hq, uint32_t nq)
{
	const struct kvt_synth_shape sh = { .layers = L, .tokens = T, .kv_heads = H,
					    .head_dim = d, .q_heads = Hq, .queries = nq,
					    .q_pos0 = T - nq };

	memset(ds, 0, sizeof(*ds));
	ds->L = L;
	ds->T = T;
	ds->H = H;
	ds->d = d;
	ds->Hq = Hq;
	ds->nq = nq;
	ds->seed = seed;
	snprintf(ds->source, sizeof(ds->source), "synthetic");
	ds->K = malloc((size_t)L * T * H * d * sizeof(float));
	ds->V = malloc((size_t)L * T * H * d * sizeof(float));
	ds->Q = malloc((size_t)L * nq * Hq * d * sizeof(float));
	ds->sink = calloc(T, 1);
	if (!ds->K || !ds->V || !ds->Q || !ds->sink) {
		fprintf(stderr, "kvtier-bench: out of memory for the synthetic set\n");
		return -1;
	}
	if (kvt_synth_tni(&sh, seed, ds->K, ds->V, ds->Q, ds->sink) < 0) {
		fprintf(stderr, "kvtier-bench: cannot make a synthetic set with head_dim %u (a "
				"multiple of 8, at least 16) and %u query heads over %u KV heads\n",
			d, Hq, H);
		return -1;
	}
	return 0;
}

/* ---- .npy input ----------------------------------------------------------------------- */

static int load_npy(struct dataset *ds, const char *kp, const char *vp, const char *qp)
{
	struct kvt_npy k, v, q;
	char err[512];
	uint32_t L, T, H, d;
	int rc = -1;

	memset(ds, 0, sizeof(*ds));
	memset(&v, 0, sizeof(v));
	memset(&q, 0, sizeof(q));
	if (kvt_npy_read_f32(kp, &k, err, sizeof(err)) < 0) {
		fprintf(stderr, "kvtier-bench: %s\n", err);
		return -1;
	}
	if (kvt_npy_read_f32(vp, &v, err, sizeof(err)) < 0 ||
	    kvt_npy_read_f32(qp, &q, err, sizeof(err)) < 0) {
		fprintf(stderr, "kvtier-bench: %s\n", err);
		goto out;
	}
	if (k.ndim == 4) {
		L = (uint32_t)k.shape[0];
		T = (uint32_t)k.shape[1];
		H = (uint32_t)k.shape[2];
		d = (uint32_t)k.shape[3];
	} else if (k.ndim == 3) {
		L = 1;
		T = (uint32_t)k.shape[0];
		H = (uint32_t)k.shape[1];
		d = (uint32_t)k.shape[2];
	} else {
		fprintf(stderr, "kvtier-bench: %s: K has %u dimensions; expected "
				"[layers][tokens][kv_heads][head_dim] or [tokens][kv_heads][head_dim]\n",
			kp, k.ndim);
		goto out;
	}
	if (v.ndim != k.ndim || memcmp(v.shape, k.shape, k.ndim * sizeof(k.shape[0])) != 0) {
		fprintf(stderr, "kvtier-bench: %s: V's shape differs from K's\n", vp);
		goto out;
	}
	if (T < 2 || H == 0 || d == 0) {
		fprintf(stderr, "kvtier-bench: %s: empty K\n", kp);
		goto out;
	}
	ds->L = L;
	ds->T = T;
	ds->H = H;
	ds->d = d;
	if (q.ndim == 4 && q.shape[0] == L && q.shape[3] == d) {
		ds->nq = (uint32_t)q.shape[1];
		ds->Hq = (uint32_t)q.shape[2];
	} else if (q.ndim == 3 && L == 1 && q.shape[2] == d) {
		ds->nq = (uint32_t)q.shape[0];
		ds->Hq = (uint32_t)q.shape[1];
	} else if (q.ndim == 3 && L > 1 && q.shape[0] == L && q.shape[2] == d) {
		ds->nq = 1;
		ds->Hq = (uint32_t)q.shape[1];
	} else if (q.ndim == 2 && L == 1 && q.shape[1] == d) {
		ds->nq = 1;
		ds->Hq = (uint32_t)q.shape[0];
	} else {
		fprintf(stderr, "kvtier-bench: %s: Q's shape does not match K (%u layers, head_dim "
				"%u): expected [layers][n_q][q_heads][head_dim]\n", qp, L, d);
		goto out;
	}
	if (ds->Hq == 0 || ds->Hq % H != 0) {
		fprintf(stderr, "kvtier-bench: %s: q_heads %u is not a multiple of kv_heads %u\n",
			qp, ds->Hq, H);
		goto out;
	}
	if (ds->nq == 0 || ds->nq > T) {
		fprintf(stderr, "kvtier-bench: %s: n_q %u must be 1..tokens (%u)\n", qp, ds->nq, T);
		goto out;
	}
	ds->K = k.data;
	ds->V = v.data;
	ds->Q = q.data;
	k.data = v.data = q.data = NULL;
	snprintf(ds->source, sizeof(ds->source), "npy");
	rc = 0;
out:
	kvt_npy_free(&k);
	kvt_npy_free(&v);
	kvt_npy_free(&q);
	return rc;
}

/* ---- evaluation -------------------------------------------------------------------------- */

struct exact_layer {
	float *P;    /* [nq][Hq][T] exact attention weights (0 beyond the causal limit) */
	float *O;    /* [nq][Hq][d] exact outputs */
};

struct stats {
	double sink_mass, low1_mass, first_mass, n, entropy, out_norm;
	double logit_min, logit_max, range_sum;
};

static void exact_attention(const struct dataset *ds, uint32_t l, struct exact_layer *ex,
			    const uint8_t *low1, struct stats *st)
{
	const uint32_t T = ds->T, H = ds->H, d = ds->d, Hq = ds->Hq, nq = ds->nq;
	const float scale = 1.0f / sqrtf((float)d);

	for (uint32_t j = 0; j < nq; j++) {
		uint32_t ntok = T - nq + j + 1;

		for (uint32_t i = 0; i < Hq; i++) {
			uint32_t kh = i / (Hq / H);
			const float *q = ds->Q + (((size_t)l * nq + j) * Hq + i) * d;
			float *p = ex->P + ((size_t)j * Hq + i) * T, *o = ex->O + ((size_t)j * Hq + i) * d;
			float mx = -INFINITY, mn = INFINITY;
			double sum = 0, sm = 0, lm = 0, ent = 0;

			for (uint32_t t = 0; t < ntok; t++) {
				p[t] = scale * kvt_synth_dot(q, ds->K + (((size_t)l * T + t) * H + kh) * d, d);
				mx = p[t] > mx ? p[t] : mx;
				mn = p[t] < mn ? p[t] : mn;
			}
			for (uint32_t t = ntok; t < T; t++)
				p[t] = 0;
			for (uint32_t t = 0; t < ntok; t++)
				sum += (p[t] = expf(p[t] - mx));
			memset(o, 0, d * sizeof(float));
			for (uint32_t t = 0; t < ntok; t++) {
				p[t] = (float)(p[t] / sum);
				axpy(o, ds->V + (((size_t)l * T + t) * H + kh) * d, p[t], d);
				if (ds->sink && ds->sink[t])
					sm += p[t];
				if (low1[t])
					lm += p[t];
				if (p[t] > 0)
					ent -= p[t] * log((double)p[t]);
			}
			st->entropy += ent;
			st->out_norm += sqrt(kvt_synth_dot(o, o, d));
			st->sink_mass += sm;
			st->low1_mass += lm;
			st->first_mass += p[0];
			st->n += 1;
			st->logit_min = mn < st->logit_min ? mn : st->logit_min;
			st->logit_max = mx > st->logit_max ? mx : st->logit_max;
			st->range_sum += mx - mn;
		}
	}
}

/* Lowest-norm 1% (at least one) of tokens [0, n) of layer l of X, by joint norm. */
static void lowest_one_percent(const float *X, uint32_t l, uint32_t T, uint32_t n, size_t row,
			       uint8_t *mark)
{
	struct norm_idx *ni = malloc(n * sizeof(*ni));
	uint32_t cnt = n / 100 ? n / 100 : 1;

	memset(mark, 0, T);
	for (uint32_t t = 0; t < n; t++) {
		const float *x = X + ((size_t)l * T + t) * row;

		ni[t].norm = sqrtf(kvt_synth_dot(x, x, (uint32_t)row));
		ni[t].idx = t;
	}
	qsort(ni, n, sizeof(*ni), cmp_norm_idx);
	for (uint32_t i = 0; i < cnt && i < n; i++)
		mark[ni[i].idx] = 1;
	free(ni);
}

/* Encodes every full chunk of the dataset with cfg and decodes it into Kh, Vh; the remainder
 * stays exact. Returns the mean bits per element of the chunks, or a negative value. */
static double quantize(const struct dataset *ds, const struct kvt_codec_config *cfg, float *Kh,
		       float *Vh)
{
	const uint32_t L = ds->L, T = ds->T, row = ds->H * ds->d, B = FID_B;
	const size_t per_layer = (size_t)B * row;
	uint16_t *kin = malloc(L * per_layer * 2), *vin = malloc(L * per_layer * 2);
	float *kout = malloc(L * per_layer * 4), *vout = malloc(L * per_layer * 4);
	size_t cap = kvt_chunk_max_bytes(cfg);
	uint8_t *enc = malloc(cap);
	double bpe = 0;
	uint32_t nc = T / B;
	char err[256];

	memcpy(Kh, ds->K, (size_t)L * T * row * sizeof(float));
	memcpy(Vh, ds->V, (size_t)L * T * row * sizeof(float));
	for (uint32_t c = 0; c < nc && bpe >= 0; c++) {
		struct kvt_chunk_header hdr;
		int64_t n;

		for (uint32_t l = 0; l < L; l++) {
			kvt_convert(ds->K + ((size_t)l * T + (size_t)c * B) * row, KVT_DTYPE_F32,
				    kin + l * per_layer, KVT_DTYPE_F16, per_layer);
			kvt_convert(ds->V + ((size_t)l * T + (size_t)c * B) * row, KVT_DTYPE_F32,
				    vin + l * per_layer, KVT_DTYPE_F16, per_layer);
		}
		n = kvt_encode_chunk(cfg, (uint64_t)c * B, kin, vin, enc, cap, err, sizeof(err));
		if (n < 0 || kvt_decode_chunk(enc, 0, B, 0, L, KVT_DTYPE_F32, kout, vout, err,
					      sizeof(err)) < 0) {
			fprintf(stderr, "kvtier-bench: %s %u-bit: %s\n", kvt_scheme_name(cfg->scheme),
				cfg->key_bits, err);
			bpe = -1;
			break;
		}
		memcpy(&hdr, enc, sizeof(hdr));
		bpe += kvt_chunk_bits_per_element(&hdr) / nc;
		for (uint32_t l = 0; l < L; l++) {
			memcpy(Kh + ((size_t)l * T + (size_t)c * B) * row, kout + l * per_layer,
			       per_layer * 4);
			memcpy(Vh + ((size_t)l * T + (size_t)c * B) * row, vout + l * per_layer,
			       per_layer * 4);
		}
	}
	free(kin);
	free(vin);
	free(kout);
	free(vout);
	free(enc);
	return bpe;
}

static void token_errors(const struct dataset *ds, uint32_t l, const float *Kh, const float *Vh,
			 const uint8_t *klow, const uint8_t *vlow, struct metrics *m)
{
	const uint32_t T = ds->T, row = ds->H * ds->d, Tq = T / FID_B * FID_B;

	for (uint32_t t = 0; t < Tq; t++) {
		size_t at = ((size_t)l * T + t) * row;
		double ek = 0, nk = 0, ev = 0, nv = 0, rk, rv;

		for (uint32_t c = 0; c < row; c++) {
			double dk = (double)Kh[at + c] - ds->K[at + c];
			double dv = (double)Vh[at + c] - ds->V[at + c];

			ek += dk * dk;
			nk += (double)ds->K[at + c] * ds->K[at + c];
			ev += dv * dv;
			nv += (double)ds->V[at + c] * ds->V[at + c];
		}
		rk = nk > 0 ? sqrt(ek / nk) : (ek > 0 ? 1 : 0);
		rv = nv > 0 ? sqrt(ev / nv) : (ev > 0 ? 1 : 0);
		m->k_err += rk;
		m->k_n += 1;
		m->v_err += rv;
		m->v_n += 1;
		m->k_fro_num += ek;
		m->k_fro_den += nk;
		m->v_fro_num += ev;
		m->v_fro_den += nv;
		if (klow[t]) {
			m->k_low += rk;
			m->k_low_n += 1;
		}
		if (vlow[t]) {
			m->v_low += rv;
			m->v_low_n += 1;
		}
		if (ds->sink && ds->sink[t]) {
			m->k_sink += rk;
			m->k_sink_n += 1;
		}
	}
}

static void attention_errors(const struct dataset *ds, uint32_t l, const float *Kh,
			     const float *Vh, const struct exact_layer *ex, float *pq, float *o3,
			     struct metrics *m)
{
	const uint32_t T = ds->T, H = ds->H, d = ds->d, Hq = ds->Hq, nq = ds->nq;
	const float scale = 1.0f / sqrtf((float)d);

	for (uint32_t j = 0; j < nq; j++) {
		uint32_t ntok = T - nq + j + 1;

		for (uint32_t i = 0; i < Hq; i++) {
			uint32_t kh = i / (Hq / H);
			const float *q = ds->Q + (((size_t)l * nq + j) * Hq + i) * d;
			const float *p = ex->P + ((size_t)j * Hq + i) * T;
			const float *o = ex->O + ((size_t)j * Hq + i) * d;
			float *ok = o3, *ov = o3 + d, *okv = o3 + 2 * d, mx = -INFINITY;
			double sum = 0, kl = 0;

			for (uint32_t t = 0; t < ntok; t++) {
				pq[t] = scale * kvt_synth_dot(q, Kh + (((size_t)l * T + t) * H + kh) * d, d);
				mx = pq[t] > mx ? pq[t] : mx;
			}
			for (uint32_t t = 0; t < ntok; t++)
				sum += (pq[t] = expf(pq[t] - mx));
			memset(o3, 0, 3 * d * sizeof(float));
			for (uint32_t t = 0; t < ntok; t++) {
				const float *v = ds->V + (((size_t)l * T + t) * H + kh) * d;
				const float *vh = Vh + (((size_t)l * T + t) * H + kh) * d;

				pq[t] = (float)(pq[t] / sum);
				if (p[t] > 0)
					kl += p[t] * (log((double)p[t]) -
						      log(pq[t] > 1e-38f ? (double)pq[t] : 1e-38));
				axpy(ok, v, pq[t], d);
				axpy(ov, vh, p[t], d);
				axpy(okv, vh, pq[t], d);
			}
			for (uint32_t c = 0; c < d; c++) {
				m->o_k += ((double)ok[c] - o[c]) * ((double)ok[c] - o[c]);
				m->o_v += ((double)ov[c] - o[c]) * ((double)ov[c] - o[c]);
				m->o_kv += ((double)okv[c] - o[c]) * ((double)okv[c] - o[c]);
				m->o_den += (double)o[c] * o[c];
			}
			m->kl += kl > 0 ? kl : 0;
			m->kl_n += 1;
		}
	}
}

static void metrics_add(struct metrics *a, const struct metrics *b)
{
	double *x = (double *)a;
	const double *y = (const double *)b;

	for (size_t i = 0; i < sizeof(*a) / sizeof(double); i++)
		x[i] += y[i];
}

static double ratio(double a, double n)
{
	return n > 0 ? a / n : NAN;
}

struct summary {
	double k, k_low, k_sink, v, v_low, k_fro, v_fro, o_k, o_v, o_kv, kl;
};

static struct summary summarize(const struct metrics *m)
{
	struct summary s = {
		.k = ratio(m->k_err, m->k_n),
		.k_low = ratio(m->k_low, m->k_low_n),
		.k_sink = ratio(m->k_sink, m->k_sink_n),
		.v = ratio(m->v_err, m->v_n),
		.v_low = ratio(m->v_low, m->v_low_n),
		.k_fro = sqrt(ratio(m->k_fro_num, m->k_fro_den)),
		.v_fro = sqrt(ratio(m->v_fro_num, m->v_fro_den)),
		.o_k = sqrt(ratio(m->o_k, m->o_den)),
		.o_v = sqrt(ratio(m->o_v, m->o_den)),
		.o_kv = sqrt(ratio(m->o_kv, m->o_den)),
		.kl = ratio(m->kl, m->kl_n),
	};
	return s;
}

static void print_codec(const struct dataset *ds, const struct kvt_codec_config *cfg,
			const char *layer, double bpe, const struct summary *s)
{
	struct kvt_bench_json j;

	kvt_bench_json_begin(&j, "fidelity");
	kvt_bench_json_str(&j, "kind", "codec");
	kvt_bench_json_str(&j, "source", ds->source);
	kvt_bench_json_str(&j, "layer", layer);
	kvt_bench_json_str(&j, "scheme", kvt_scheme_name(cfg->scheme));
	kvt_bench_json_int(&j, "bits", cfg->scheme == KVT_SCHEME_NONE ? 16 : (long long)cfg->key_bits);
	kvt_bench_json_int(&j, "group", cfg->group);
	kvt_bench_json_int(&j, "sinks", cfg->n_sinks);
	kvt_bench_json_num(&j, "bits_per_element", bpe);
	kvt_bench_json_num(&j, "key_rel_err", s->k);
	kvt_bench_json_num(&j, "key_rel_err_low1", s->k_low);
	kvt_bench_json_num(&j, "key_rel_err_sink", s->k_sink);
	kvt_bench_json_num(&j, "key_rel_err_fro", s->k_fro);
	kvt_bench_json_num(&j, "value_rel_err", s->v);
	kvt_bench_json_num(&j, "value_rel_err_low1", s->v_low);
	kvt_bench_json_num(&j, "value_rel_err_fro", s->v_fro);
	kvt_bench_json_num(&j, "attn_out_rel_err_k", s->o_k);
	kvt_bench_json_num(&j, "attn_out_rel_err_v", s->o_v);
	kvt_bench_json_num(&j, "attn_out_rel_err_kv", s->o_kv);
	kvt_bench_json_num(&j, "attn_kl", s->kl);
	kvt_bench_json_end(&j);
}

/* One evaluated criterion. kind "check" (OSCAR.md 7.7, fails the run under --check) or
 * "target" (the INT2 targets: printed with their verdict; fatal only under --strict). */
static int print_check(const char *kind, const char *name, double value, const char *rel,
		       double limit, const char *what)
{
	struct kvt_bench_json j;
	int pass = (!strcmp(rel, "<=") ? value <= limit : value >= limit) && isfinite(value);

	kvt_bench_json_begin(&j, "fidelity");
	kvt_bench_json_str(&j, "kind", kind);
	kvt_bench_json_str(&j, "check", name);
	kvt_bench_json_num(&j, "value", value);
	kvt_bench_json_str(&j, "rel", rel);
	kvt_bench_json_num(&j, "limit", limit);
	kvt_bench_json_bool(&j, "pass", pass);
	kvt_bench_json_str(&j, "what", what);
	kvt_bench_json_end(&j);
	return pass;
}

/* Median of per-head norms of X over tokens where sel(t) holds (sel NULL: all tokens). */
static double head_norm_median(const struct dataset *ds, const float *X, const uint8_t *sel,
			       int want)
{
	size_t n = 0, cap = (size_t)ds->L * ds->T * ds->H;
	float *v = malloc(cap * sizeof(float));
	double med;

	for (uint32_t l = 0; l < ds->L; l++)
		for (uint32_t t = 0; t < ds->T; t++) {
			if (sel && (sel[t] != 0) != want)
				continue;
			for (uint32_t h = 0; h < ds->H; h++) {
				const float *x = X + (((size_t)l * ds->T + t) * ds->H + h) * ds->d;

				v[n++] = sqrtf(kvt_synth_dot(x, x, ds->d));
			}
		}
	if (n == 0) {
		free(v);
		return NAN;
	}
	qsort(v, n, sizeof(float), cmp_float);
	med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
	free(v);
	return med;
}

/* Median over (layer, head) of the norm of the mean value vector: how much of a value is a
 * shared component (it decides how much attention averaging cancels). */
static double value_mean_norm_median(const struct dataset *ds)
{
	size_t n = (size_t)ds->L * ds->H;
	float *v = malloc(n * sizeof(float));
	double *mean = calloc(ds->d, sizeof(double)), med;

	for (uint32_t l = 0; l < ds->L; l++)
		for (uint32_t h = 0; h < ds->H; h++) {
			double s = 0;

			memset(mean, 0, ds->d * sizeof(double));
			for (uint32_t t = 0; t < ds->T; t++)
				for (uint32_t c = 0; c < ds->d; c++)
					mean[c] += ds->V[(((size_t)l * ds->T + t) * ds->H + h) * ds->d + c];
			for (uint32_t c = 0; c < ds->d; c++)
				s += (mean[c] / ds->T) * (mean[c] / ds->T);
			v[(size_t)l * ds->H + h] = (float)sqrt(s);
		}
	qsort(v, n, sizeof(float), cmp_float);
	med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
	free(v);
	free(mean);
	return med;
}

static void fidelity_usage(FILE *f)
{
	fprintf(f,
		"usage: kvtier-bench fidelity [--k K.npy --v V.npy --q Q.npy | --synthetic]\n"
		"         [--seed N] [--layers L --tokens T --kv-heads H --head-dim D --q-heads HQ\n"
		"          --queries NQ] [--schemes none,kivi,hadamard,oscar] [--bits 2,4]\n"
		"         [--groups 32,128] [--sinks S] [--layer-wise] [--check|--strict]\n"
		"         [--dump-dir DIR]\n"
		"K, V: [layers][tokens][kv_heads][head_dim] (or without layers), post-RoPE;\n"
		"Q: [layers][n_q][q_heads][head_dim] (see bench_fidelity.c); f16/f32/f64 .npy.\n"
		"--synthetic (the default without --k): a seeded Token Norm Imbalance set; --seed 0\n"
		"picks one from the clock (printed). --check evaluates OSCAR.md 7.7 (exit 1 when it\n"
		"fails) and prints the INT2 targets with their verdict; --strict also fails on a\n"
		"missed target. --dump-dir writes the synthetic set as K.npy, V.npy, Q.npy.\n");
}

/* A comma list of at most max (<= 4) numbers out of allowed[], each decimal (atoi read "2x"
 * as 2). */
static int parse_int_list(const char *opt, const char *s, int *out, int max, const int *allowed,
			  int n_allowed)
{
	char buf[128], *items[4], q[512], list[64] = "";
	int n = kvt_bench_split_list(opt, s, buf, sizeof buf, items, max);

	for (int i = 0; i < n_allowed; i++)
		snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%d", i ? ", " : "",
			 allowed[i]);
	for (int i = 0; i < n; i++) {
		uint64_t v;
		int ok = !kvt_text_parse_dec(items[i], items[i] + strlen(items[i]), INT_MAX, &v);
		int found = 0;

		for (int j = 0; ok && j < n_allowed; j++)
			found |= allowed[j] == (int)v;
		if (!found) {
			fprintf(stderr, "kvtier-bench: %s \"%s\": expected decimal numbers out of %s\n",
				opt, kvt_text_escape(q, sizeof q, items[i], KVT_TEXT_BACKSLASH), list);
			return -1;
		}
		out[i] = (int)v;
	}
	return n;
}

int kvt_bench_fidelity(int argc, char **argv)
{
	const char *kp = NULL, *vp = NULL, *qp = NULL, *dump = NULL;
	unsigned long seed = 1, L = 4, T = 2048, H = 8, D = 128, Hq = 32, nq = 8, sinks = 0;
	int layer_wise = 0, check = 0, strict = 0, synthetic = 0;
	int schemes[4] = { KVT_SCHEME_NONE, KVT_SCHEME_KIVI, KVT_SCHEME_HADAMARD, KVT_SCHEME_OSCAR };
	int n_schemes = 4, bits[2] = { 2, 4 }, n_bits = 2, groups[3] = { 32, 128 }, n_groups = 2;
	static const int ok_bits[] = { 2, 3, 4, 8 }, ok_groups[] = { 32, 64, 128 };
	struct dataset ds;
	struct codec_spec specs[64];
	int n_specs = 0, rc = 0;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
		unsigned long *num = NULL;
		unsigned long lo = 1, hi = 1u << 20;

		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			fidelity_usage(stdout);
			return 0;
		} else if (!strcmp(a, "--k") || !strcmp(a, "--v") || !strcmp(a, "--q") ||
			   !strcmp(a, "--dump-dir")) {
			if (!val) {
				fprintf(stderr, "kvtier-bench: %s needs a path\n", a);
				return 2;
			}
			*(a[2] == 'k' ? &kp : a[2] == 'v' ? &vp : a[2] == 'q' ? &qp : &dump) = val;
			i++;
			continue;
		} else if (!strcmp(a, "--synthetic")) {
			synthetic = 1;
			continue;
		} else if (!strcmp(a, "--layer-wise")) {
			layer_wise = 1;
			continue;
		} else if (!strcmp(a, "--check")) {
			check = 1;
			continue;
		} else if (!strcmp(a, "--strict")) {
			check = strict = 1;
			continue;
		} else if (!strcmp(a, "--schemes")) {
			if ((n_schemes = kvt_bench_parse_names(a, val, 128, kvt_scheme_parse,
							       "none, kivi, hadamard or oscar",
							       schemes, 4)) < 0)
				return 2;
			i++;
			continue;
		} else if (!strcmp(a, "--bits")) {
			if ((n_bits = parse_int_list(a, val, bits, 2, ok_bits, 4)) < 0)
				return 2;
			i++;
			continue;
		} else if (!strcmp(a, "--groups")) {
			if ((n_groups = parse_int_list(a, val, groups, 3, ok_groups, 3)) < 0)
				return 2;
			i++;
			continue;
		} else if (!strcmp(a, "--seed")) {
			num = &seed;
			lo = 0;
			hi = (unsigned long)-1;
		} else if (!strcmp(a, "--layers")) {
			num = &L;
			hi = KVT_MAX_LAYERS;
		} else if (!strcmp(a, "--tokens")) {
			num = &T;
			lo = FID_B;
		} else if (!strcmp(a, "--kv-heads")) {
			num = &H;
			hi = KVT_MAX_KV_HEADS;
		} else if (!strcmp(a, "--head-dim")) {
			num = &D;
			lo = 64;
			hi = 256;
		} else if (!strcmp(a, "--q-heads")) {
			num = &Hq;
			hi = 1024;
		} else if (!strcmp(a, "--queries")) {
			num = &nq;
			hi = 4096;
		} else if (!strcmp(a, "--sinks")) {
			num = &sinks;
			lo = 0;
			hi = KVT_MAX_SINKS;
		} else {
			char q[256];

			fprintf(stderr, "kvtier-bench fidelity: unknown option \"%s\"\n",
				kvt_text_escape(q, sizeof q, a, KVT_TEXT_BACKSLASH));
			fidelity_usage(stderr);
			return 2;
		}
		if (kvt_bench_parse_uint(a, val, lo, hi, num) < 0)
			return 2;
		i++;
	}
	if ((kp || vp || qp) && (!kp || !vp || !qp || synthetic)) {
		fprintf(stderr, "kvtier-bench: give all of --k, --v, --q (or --synthetic alone)\n");
		return 2;
	}
	if (kp) {
		if (load_npy(&ds, kp, vp, qp) < 0)
			return 2;
	} else {
		if (seed == 0)
			seed = (unsigned long)(kvt_bench_now_s() * 1e6);
		if (Hq % H != 0 || nq >= T) {
			fprintf(stderr, "kvtier-bench: --q-heads %lu must be a multiple of --kv-heads "
					"%lu and --queries %lu below --tokens %lu\n", Hq, H, nq, T);
			return 2;
		}
		if (make_synthetic(&ds, seed, (uint32_t)L, (uint32_t)T, (uint32_t)H, (uint32_t)D,
				   (uint32_t)Hq, (uint32_t)nq) < 0)
			return 2;
	}
	round_f16(ds.K, (size_t)ds.L * ds.T * ds.H * ds.d);
	round_f16(ds.V, (size_t)ds.L * ds.T * ds.H * ds.d);
	if (dump && ds.sink) {
		uint64_t kvs[4] = { ds.L, ds.T, ds.H, ds.d }, qs[4] = { ds.L, ds.nq, ds.Hq, ds.d };
		char path[1024], err[512];
		const char *names[3] = { "K.npy", "V.npy", "Q.npy" };
		const float *arrs[3] = { ds.K, ds.V, ds.Q };

		for (int i = 0; i < 3; i++) {
			snprintf(path, sizeof(path), "%s/%s", dump, names[i]);
			if (kvt_npy_write(path, KVT_DTYPE_F32, 4, i < 2 ? kvs : qs, arrs[i], err,
					  sizeof(err)) < 0) {
				fprintf(stderr, "kvtier-bench: %s\n", err);
				return 2;
			}
		}
	}
	if (ds.T < FID_B) {
		fprintf(stderr, "kvtier-bench: %u tokens: at least one chunk of %d is needed\n", ds.T,
			FID_B);
		return 2;
	}

	for (int s = 0; s < n_schemes; s++)
		for (int b = 0; b < n_bits; b++)
			for (int g = 0; g < n_groups; g++) {
				if (schemes[s] == KVT_SCHEME_NONE && (b > 0 || g > 0))
					continue;
				specs[n_specs++] = (struct codec_spec){ schemes[s], bits[b], groups[g] };
			}

	{
		const uint32_t T_ = ds.T, row = ds.H * ds.d, Tq = T_ / FID_B * FID_B;
		size_t kv = (size_t)ds.L * T_ * row;
		float *Kh = malloc(kv * sizeof(float)), *Vh = malloc(kv * sizeof(float));
		float *pq = malloc(T_ * sizeof(float)), *o3 = malloc(3 * ds.d * sizeof(float));
		struct exact_layer *ex = calloc(ds.L, sizeof(*ex));
		uint8_t *klow = malloc((size_t)ds.L * T_), *vlow = malloc((size_t)ds.L * T_);
		struct stats st = { .logit_min = INFINITY, .logit_max = -INFINITY };
		struct kvt_bench_json j;
		char sinkpos[64] = "";
		struct summary kivi2 = { NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN };
		struct summary oscar2 = kivi2;

		if (!Kh || !Vh || !pq || !o3 || !ex || !klow || !vlow) {
			fprintf(stderr, "kvtier-bench: out of memory\n");
			return 2;
		}
		for (uint32_t l = 0; l < ds.L; l++) {
			uint8_t *all_low = malloc(T_);

			lowest_one_percent(ds.K, l, T_, Tq, row, klow + (size_t)l * T_);
			lowest_one_percent(ds.V, l, T_, Tq, row, vlow + (size_t)l * T_);
			lowest_one_percent(ds.K, l, T_, T_, row, all_low);
			ex[l].P = malloc((size_t)ds.nq * ds.Hq * T_ * sizeof(float));
			ex[l].O = malloc((size_t)ds.nq * ds.Hq * ds.d * sizeof(float));
			if (!ex[l].P || !ex[l].O) {
				fprintf(stderr, "kvtier-bench: out of memory for attention weights\n");
				return 2;
			}
			exact_attention(&ds, l, &ex[l], all_low, &st);
			free(all_low);
		}
		for (uint32_t t = 0; ds.sink && t < T_; t++)
			if (ds.sink[t])
				snprintf(sinkpos + strlen(sinkpos), sizeof(sinkpos) - strlen(sinkpos),
					 "%s%u", sinkpos[0] ? "," : "", t);
		kvt_bench_json_begin(&j, "fidelity");
		kvt_bench_json_str(&j, "kind", "dataset");
		kvt_bench_json_str(&j, "source", ds.source);
		if (ds.sink)
			kvt_bench_json_int(&j, "seed", (long long)ds.seed);
		kvt_bench_json_int(&j, "layers", ds.L);
		kvt_bench_json_int(&j, "tokens", ds.T);
		kvt_bench_json_int(&j, "quantized_tokens", Tq);
		kvt_bench_json_int(&j, "kv_heads", ds.H);
		kvt_bench_json_int(&j, "head_dim", ds.d);
		kvt_bench_json_int(&j, "q_heads", ds.Hq);
		kvt_bench_json_int(&j, "queries", ds.nq);
		kvt_bench_json_str(&j, "sink_positions", sinkpos);
		kvt_bench_json_num(&j, "sink_mass", ds.sink ? st.sink_mass / st.n : NAN);
		kvt_bench_json_num(&j, "low1_mass", st.low1_mass / st.n);
		kvt_bench_json_num(&j, "first_token_mass", st.first_mass / st.n);
		kvt_bench_json_num(&j, "logit_min", st.logit_min);
		kvt_bench_json_num(&j, "logit_max", st.logit_max);
		kvt_bench_json_num(&j, "logit_range_mean", st.range_sum / st.n);
		kvt_bench_json_num(&j, "attn_entropy_mean", st.entropy / st.n);
		kvt_bench_json_num(&j, "value_mean_vs_value_norm",
				   value_mean_norm_median(&ds) / head_norm_median(&ds, ds.V, NULL, 0));
		kvt_bench_json_num(&j, "out_norm_vs_value_norm",
				   st.out_norm / st.n / head_norm_median(&ds, ds.V, NULL, 0));
		kvt_bench_json_num(&j, "key_norm_head_median", head_norm_median(&ds, ds.K, ds.sink, 0));
		kvt_bench_json_num(&j, "key_norm_head_sink",
				   ds.sink ? head_norm_median(&ds, ds.K, ds.sink, 1) : NAN);
		kvt_bench_json_num(&j, "value_norm_head_median",
				   head_norm_median(&ds, ds.V, ds.sink, 0));
		kvt_bench_json_num(&j, "value_norm_head_sink",
				   ds.sink ? head_norm_median(&ds, ds.V, ds.sink, 1) : NAN);
		kvt_bench_json_end(&j);

		for (int c = 0; c < n_specs && rc == 0; c++) {
			struct kvt_codec_config cfg;
			struct metrics total;
			struct summary sum;
			char err[256], lname[16];
			double bpe;

			kvt_codec_config_default(&cfg, ds.L, ds.H, ds.d, KVT_DTYPE_F16);
			cfg.scheme = (uint32_t)specs[c].scheme;
			cfg.key_bits = cfg.value_bits = (uint32_t)specs[c].bits;
			cfg.group = (uint32_t)specs[c].group;
			cfg.chunk_tokens = FID_B;
			cfg.n_sinks = (uint32_t)sinks;
			if (cfg.scheme == KVT_SCHEME_NONE)
				cfg.key_bits = cfg.value_bits = 0;
			if (cfg.scheme == KVT_SCHEME_NONE || cfg.scheme == KVT_SCHEME_KIVI)
				cfg.rotate_v = 0;
			if (kvt_codec_config_validate(&cfg, err, sizeof(err)) < 0) {
				fprintf(stderr, "kvtier-bench: %s\n", err);
				rc = 2;
				break;
			}
			bpe = quantize(&ds, &cfg, Kh, Vh);
			if (bpe < 0) {
				rc = 2;
				break;
			}
			memset(&total, 0, sizeof(total));
			for (uint32_t l = 0; l < ds.L; l++) {
				struct metrics m;

				memset(&m, 0, sizeof(m));
				token_errors(&ds, l, Kh, Vh, klow + (size_t)l * T_, vlow + (size_t)l * T_,
					     &m);
				attention_errors(&ds, l, Kh, Vh, &ex[l], pq, o3, &m);
				metrics_add(&total, &m);
				if (layer_wise) {
					sum = summarize(&m);
					snprintf(lname, sizeof(lname), "%u", l);
					print_codec(&ds, &cfg, lname, bpe, &sum);
				}
			}
			sum = summarize(&total);
			print_codec(&ds, &cfg, "all", bpe, &sum);
			if (cfg.key_bits == 2 && cfg.group == 32 && cfg.scheme == KVT_SCHEME_KIVI)
				kivi2 = sum;
			if (cfg.key_bits == 2 && cfg.group == 32 && cfg.scheme == KVT_SCHEME_OSCAR)
				oscar2 = sum;
		}
		if (check && rc == 0) {
			int ok = 1, tok = 1;

			if (!isfinite(kivi2.o_kv) || !isfinite(oscar2.o_kv)) {
				fprintf(stderr, "kvtier-bench: --check needs kivi and oscar at 2 bits, "
						"group 32 in the run\n");
				rc = 2;
			} else {
				if (ds.sink) {
					ok &= print_check("check", "oscar_int2_sink_key_err_vs_mean",
							  oscar2.k_sink / oscar2.k, "<=", 1.5,
							  "OSCAR 7.7: oscar sink-token key error near the "
							  "population mean (ratio to it)");
					ok &= print_check("check", "kivi_int2_sink_key_err", kivi2.k_sink,
							  ">=", 0.7,
							  "OSCAR 7.7: kivi sink-token key error near 100%");
				}
				ok &= print_check("check", "oscar_vs_kivi_int2_attn_out_err_k",
						  oscar2.o_k / kivi2.o_k, "<=", 0.9,
						  "OSCAR 7.7: attention-output error (K quantized) clearly "
						  "lower with oscar (ratio)");
				tok &= print_check("target", "oscar_vs_kivi_int2_attn_out_err_kv",
						   oscar2.o_kv / kivi2.o_kv, "<=", 0.6,
						   "target: oscar attention-output error (K and V) <= 0.6x "
						   "kivi's");
				/* Not a check: the K-and-V ratio oscar would reach if its values
				 * were exact (its K-only error over kivi's K-and-V error). Values
				 * are quantized alike by both schemes, so this is the floor of
				 * the target above on this data. */
				print_check("bound", "oscar_int2_kv_floor_vs_kivi",
					    oscar2.o_k / kivi2.o_kv, "<=", 0.6,
					    "oscar's K-only error / kivi's K-and-V error: the best "
					    "K-and-V ratio any value codec could give oscar here");
				tok &= print_check("target", "oscar_int2_low1_key_err_vs_all",
						   oscar2.k_low / oscar2.k, "<=", 1.5,
						   "target: oscar lowest-norm-1% key error within 1.5x of "
						   "its all-token error");
				if (strict)
					ok &= tok;
				if (!ok) {
					if (ds.sink)
						fprintf(stderr, "kvtier-bench: a fidelity check failed "
								"(seed %llu)\n",
							(unsigned long long)ds.seed);
					else
						fprintf(stderr, "kvtier-bench: a fidelity check failed\n");
					rc = 1;
				}
			}
		}
		for (uint32_t l = 0; l < ds.L; l++) {
			free(ex[l].P);
			free(ex[l].O);
		}
		free(ex);
		free(Kh);
		free(Vh);
		free(pq);
		free(o3);
		free(klow);
		free(vlow);
	}
	free(ds.K);
	free(ds.V);
	free(ds.Q);
	free(ds.sink);
	return rc;
}

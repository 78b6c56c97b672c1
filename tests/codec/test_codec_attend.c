/*
 * test_codec_attend.c - kvt_attend against a plain reference (decode to f32, then naive
 * softmax attention in double) on random codecs, GQA, several chunks and an exact tail; the
 * two instruction-set paths against each other; request validation; and OSCAR.md 7.5: with
 * quantization off, rotation + norm scaling + rotate_v reproduce exact attention.
 */
#include "codec_test_util.h"

struct session {
	struct kvt_codec_config cfg;
	uint32_t n_chunks, n_tail, n_q;
	uint8_t *chunks[4];
	void *tail_k, *tail_v; /* [n_tail][H][d] of one layer */
	float *q;
	uint32_t layer;
};

static void session_free(struct session *s)
{
	for (uint32_t c = 0; c < s->n_chunks; c++)
		free(s->chunks[c]);
	free(s->tail_k);
	free(s->tail_v);
	free(s->q);
}

static bool session_make(struct session *s)
{
	memset(s, 0, sizeof(*s));
	random_config(&s->cfg);
	struct kvt_codec_config *cfg = &s->cfg;
	s->n_chunks = kvt_rand_below(4);
	s->n_tail = kvt_rand_below(3) ? kvt_rand_below(300) : 0;
	if (s->n_chunks == 0 && s->n_tail == 0)
		s->n_tail = 1;
	s->n_q = cfg->n_kv_heads * (1 + kvt_rand_below(4));
	s->layer = kvt_rand_below(cfg->n_layers);
	for (uint32_t c = 0; c < s->n_chunks; c++) {
		uint32_t low[1] = {kvt_rand_below(cfg->chunk_tokens)};
		void *k = random_kv(cfg, cfg->chunk_tokens, 1.0f, low, c == 0);
		void *v = random_kv(cfg, cfg->chunk_tokens, 1.0f, NULL, 0);
		size_t len;
		s->chunks[c] = encode_new(cfg, (uint64_t)c * cfg->chunk_tokens, k, v, &len);
		free(k);
		free(v);
		if (!s->chunks[c])
			return false;
	}
	struct kvt_codec_config one = *cfg;
	one.n_layers = 1;
	s->tail_k = random_kv(&one, s->n_tail, 1.0f, NULL, 0);
	s->tail_v = random_kv(&one, s->n_tail, 1.0f, NULL, 0);
	s->q = malloc((size_t)s->n_q * cfg->head_dim * 4);
	fill_f32(s->q, (size_t)s->n_q * cfg->head_dim, 1.0f);
	return true;
}

static struct kvt_attend_request session_req(const struct session *s, float *out)
{
	struct kvt_attend_request r = {
		.cfg = &s->cfg,
		.layer = s->layer,
		.n_q_heads = s->n_q,
		.softmax_scale = 1.0f / sqrtf((float)s->cfg.head_dim) * 2.0f,
		.q = s->q,
		.chunks = (const void *const *)s->chunks,
		.n_chunks = s->n_chunks,
		.tail_k = s->tail_k,
		.tail_v = s->tail_v,
		.n_tail = s->n_tail,
		.out = out,
	};
	return r;
}

/* decode to f32, then softmax attention in double */
static void reference(const struct session *s, float scale, double *out)
{
	const struct kvt_codec_config *cfg = &s->cfg;
	const uint32_t B = cfg->chunk_tokens, H = cfg->n_kv_heads, d = cfg->head_dim;
	const size_t row = (size_t)H * d, T = (size_t)s->n_chunks * B + s->n_tail;
	float *K = malloc(T * row * 4), *V = malloc(T * row * 4);
	for (uint32_t c = 0; c < s->n_chunks; c++)
		KVT_CHECK(kvt_decode_chunk(s->chunks[c], 0, B, s->layer, s->layer + 1, KVT_DTYPE_F32,
					   K + (size_t)c * B * row, V + (size_t)c * B * row, NULL,
					   0) == 0,
			  "decode");
	kvt_convert(s->tail_k, cfg->dtype, K + (size_t)s->n_chunks * B * row, KVT_DTYPE_F32,
		    (size_t)s->n_tail * row);
	kvt_convert(s->tail_v, cfg->dtype, V + (size_t)s->n_chunks * B * row, KVT_DTYPE_F32,
		    (size_t)s->n_tail * row);
	double *lg = malloc(T * sizeof(double));
	uint32_t rep = s->n_q / H;
	for (uint32_t i = 0; i < s->n_q; i++) {
		uint32_t h = i / rep;
		const float *q = s->q + (size_t)i * d;
		double m = -INFINITY, sum = 0;
		for (size_t t = 0; t < T; t++) {
			double acc = 0;
			for (uint32_t c = 0; c < d; c++)
				acc += (double)q[c] * K[t * row + (size_t)h * d + c];
			lg[t] = acc * scale;
			m = fmax(m, lg[t]);
		}
		for (uint32_t c = 0; c < d; c++)
			out[(size_t)i * d + c] = 0;
		for (size_t t = 0; t < T; t++) {
			double p = exp(lg[t] - m);
			sum += p;
			for (uint32_t c = 0; c < d; c++)
				out[(size_t)i * d + c] += p * V[t * row + (size_t)h * d + c];
		}
		for (uint32_t c = 0; c < d; c++)
			out[(size_t)i * d + c] /= sum;
	}
	free(lg);
	free(K);
	free(V);
}

static void test_attend_vs_reference(void)
{
	for (int it = 0; it < 40 && !kvt_test_failures; it++) {
		struct session s;
		KVT_REQUIRE(session_make(&s), "session");
		size_t n = (size_t)s.n_q * s.cfg.head_dim;
		float *out = malloc(n * 4);
		double *want = malloc(n * sizeof(double));
		struct kvt_attend_request r = session_req(&s, out);
		char err[256] = "";
		int rc = kvt_attend(&r, 1, err, sizeof(err));
		KVT_CHECK(rc == 0, "attend rc %d: %s", rc, err);
		reference(&s, r.softmax_scale, want);
		double scale = 0, worst = 0;
		for (size_t i = 0; i < n; i++)
			scale = fmax(scale, fabs(want[i]));
		for (size_t i = 0; i < n; i++)
			worst = fmax(worst, fabs(out[i] - want[i]));
		KVT_CHECK(worst <= 1e-4 * scale, "max |attend - ref| %g (scale %g) chunks %u tail %u "
			  "nq %u (%s)", worst, scale, s.n_chunks, s.n_tail, s.n_q, cfg_str(&s.cfg));
		free(out);
		free(want);
		session_free(&s);
	}
}

static void test_attend_batch_and_paths(void)
{
	bool avx2 = have_avx2();
	struct session s[3];
	struct kvt_attend_request r[2][3];
	float *out[2][3];
	for (int i = 0; i < 3; i++)
		KVT_REQUIRE(session_make(&s[i]), "session");
	for (int p = 0; p < 2; p++) {
		kvt_codec_set_isa(p && avx2 ? KVT_ISA_AVX2 : KVT_ISA_SCALAR);
		for (int i = 0; i < 3; i++) {
			out[p][i] = malloc((size_t)s[i].n_q * s[i].cfg.head_dim * 4);
			r[p][i] = session_req(&s[i], out[p][i]);
		}
		KVT_CHECK(kvt_attend(r[p], 3, NULL, 0) == 0, "batch attend");
	}
	kvt_codec_set_isa(KVT_ISA_AUTO);
	for (int i = 0; i < 3; i++) {
		size_t n = (size_t)s[i].n_q * s[i].cfg.head_dim;
		double worst = 0, scale = 0;
		for (size_t j = 0; j < n; j++) {
			worst = fmax(worst, fabs(out[0][i][j] - out[1][i][j]));
			scale = fmax(scale, fabs(out[0][i][j]));
		}
		KVT_CHECK(worst <= 1e-5 * scale, "paths differ by %g (%s)", worst, cfg_str(&s[i].cfg));
		/* stronger than asked: the two paths perform the same float operations */
		KVT_CHECK(!avx2 || memcmp(out[0][i], out[1][i], n * 4) == 0,
			  "paths not bit-identical (max diff %g) (%s)", worst, cfg_str(&s[i].cfg));
		/* a batch gives what single requests give */
		float *one = malloc(n * 4);
		struct kvt_attend_request single = session_req(&s[i], one);
		KVT_CHECK(kvt_attend(&single, 1, NULL, 0) == 0, "single");
		KVT_CHECK(memcmp(one, out[avx2][i], n * 4) == 0 || !avx2, "batch == single");
		free(one);
		for (int p = 0; p < 2; p++)
			free(out[p][i]);
		session_free(&s[i]);
	}
}

static void test_attend_validation(void)
{
	struct session s;
	do {
		KVT_REQUIRE(session_make(&s), "session");
		if (s.n_chunks >= 2 && s.n_tail > 0)
			break;
		session_free(&s);
	} while (1);
	size_t n = (size_t)s.n_q * s.cfg.head_dim;
	float *out = malloc(n * 4);
	for (size_t i = 0; i < n; i++)
		out[i] = 42.0f;
	char err[256];
	struct kvt_attend_request good = session_req(&s, out), r[2];
	struct kvt_codec_config other = s.cfg;
	other.head_dim = other.head_dim == 64 ? 128 : 64;
	const void *swapped[4] = {s.chunks[1], s.chunks[0], s.chunks[2], s.chunks[3]};
	struct {
		int field;
		const char *want;
	} cases[] = {
		{0, "layer"}, {1, "n_q_heads"}, {2, "tail_k"}, {3, "consecutive"}, {4, "differs"},
		{5, "q is NULL"}, {6, "softmax_scale"}, {7, "chunks[1] is NULL"}, {8, "head_dim"},
	};
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		r[0] = good;
		r[1] = good;
		struct kvt_attend_request *b = &r[1];
		const void *nulls[4] = {s.chunks[0], NULL, NULL, NULL};
		struct kvt_codec_config bad = s.cfg;
		switch (cases[c].field) {
		case 0: b->layer = s.cfg.n_layers; break;
		case 1: b->n_q_heads = s.cfg.n_kv_heads + (s.cfg.n_kv_heads > 1 ? 1 : 0) + (s.cfg.n_kv_heads == 1) * 0; break;
		case 2: b->tail_k = NULL; break;
		case 3: b->chunks = swapped; break;
		case 4: b->cfg = &other; break;
		case 5: b->q = NULL; break;
		case 6: b->softmax_scale = NAN; break;
		case 7: b->chunks = nulls; break;
		case 8: bad.head_dim = 100; b->cfg = &bad; break;
		}
		if (cases[c].field == 1 && s.cfg.n_kv_heads == 1)
			b->n_q_heads = 0;
		err[0] = 0;
		int rc = kvt_attend(r, 2, err, sizeof(err));
		KVT_CHECK(rc == -EINVAL, "case %zu rc %d", c, rc);
		KVT_CHECK(strstr(err, cases[c].want) && strstr(err, "request 1"),
			  "case %zu: '%s' lacks '%s'", c, err, cases[c].want);
		bool untouched = true;
		for (size_t i = 0; i < n; i++)
			untouched &= out[i] == 42.0f;
		KVT_CHECK(untouched, "case %zu: a rejected batch wrote output", c);
	}
	KVT_CHECK(kvt_attend(NULL, 1, err, sizeof(err)) == -EINVAL, "NULL reqs");
	KVT_CHECK(kvt_attend(NULL, 0, err, sizeof(err)) == 0, "empty batch");
	free(out);
	session_free(&s);
}

/*
 * OSCAR.md 7.5: quantization off (16-bit passthrough). Keys rotated and divided by their
 * joint norm, stored in f16; values rotated and stored in f16; attention in the rotated basis
 * (q' = H q, logit = scale * n * <q', k''>, o = H sum p v') equals exact attention to f16
 * rounding. Uses the codec's own transform and norm kernels.
 */
static void test_passthrough_reproduces_exact_attention(void)
{
	const struct kvt_codec_ops *ops = kvt_codec_ops_get();
	for (int it = 0; it < 20; it++) {
		uint32_t d = 64u << kvt_rand_below(3), H = 1 + kvt_rand_below(4), T = 1 + kvt_rand_below(200);
		uint32_t rep = 1 + kvt_rand_below(3), nq = H * rep;
		size_t row = (size_t)H * d;
		float *k = malloc(T * row * 4), *v = malloc(T * row * 4), *q = malloc(nq * d * 4);
		fill_f32(k, T * row, 1.0f);
		fill_f32(v, T * row, 1.0f);
		fill_f32(q, (size_t)nq * d, 1.0f);
		for (size_t c = 0; c < row; c++)
			k[c] *= 0.1f; /* a low-norm sink at token 0 */
		float *kr = malloc(T * row * 4), *vr = malloc(T * row * 4), *norms = malloc(T * 4);
		uint16_t *k16 = malloc(T * row * 2), *v16 = malloc(T * row * 2);
		memcpy(kr, k, T * row * 4);
		memcpy(vr, v, T * row * 4);
		kvt_hadamard_f32(kr, (size_t)T * H, d);
		kvt_hadamard_f32(vr, (size_t)T * H, d);
		for (uint32_t t = 0; t < T; t++) {
			float nrm = sqrtf(ops->sumsq(kr + t * row, row));
			norms[t] = nrm == 0.0f || !isfinite(nrm) ? 1.0f : nrm;
			ops->div(kr + t * row, row, norms[t]);
		}
		kvt_convert(kr, KVT_DTYPE_F32, k16, KVT_DTYPE_F16, T * row);
		kvt_convert(vr, KVT_DTYPE_F32, v16, KVT_DTYPE_F16, T * row);
		float scale = 1.0f / sqrtf((float)d);
		double worst = 0, mag = 0;
		for (uint32_t i = 0; i < nq; i++) {
			uint32_t h = i / rep;
			float qr[256];
			memcpy(qr, q + (size_t)i * d, d * 4);
			kvt_rotate_queries(qr, 1, d);
			double *le = malloc(T * 8), *lo = malloc(T * 8), me = -INFINITY, mo = -INFINITY;
			for (uint32_t t = 0; t < T; t++) {
				double e = 0, o = 0;
				for (uint32_t c = 0; c < d; c++) {
					e += (double)q[(size_t)i * d + c] * k[t * row + h * d + c];
					o += (double)qr[c] * kvt_f16_to_f32(k16[t * row + h * d + c]);
				}
				le[t] = scale * e;
				lo[t] = scale * norms[t] * o;
				me = fmax(me, le[t]);
				mo = fmax(mo, lo[t]);
			}
			double se = 0, so = 0, oe[256] = {0};
			float orot[256] = {0};
			double orot_d[256] = {0};
			for (uint32_t t = 0; t < T; t++) {
				double pe = exp(le[t] - me), po = exp(lo[t] - mo);
				se += pe;
				so += po;
				for (uint32_t c = 0; c < d; c++) {
					oe[c] += pe * v[t * row + h * d + c];
					orot_d[c] += po * kvt_f16_to_f32(v16[t * row + h * d + c]);
				}
			}
			for (uint32_t c = 0; c < d; c++)
				orot[c] = (float)(orot_d[c] / so);
			kvt_hadamard_f32(orot, 1, d); /* rotate the output back once */
			for (uint32_t c = 0; c < d; c++) {
				double e = oe[c] / se;
				worst = fmax(worst, fabs(orot[c] - e));
				mag = fmax(mag, fabs(e));
			}
			free(le);
			free(lo);
		}
		KVT_CHECK(worst <= 5e-3 * mag, "passthrough d %u H %u T %u: |o - exact| %g (max %g)", d,
			  H, T, worst, mag);
		free(k);
		free(v);
		free(q);
		free(kr);
		free(vr);
		free(norms);
		free(k16);
		free(v16);
	}
}

int main(void)
{
	kvt_test_init();
	KVT_RUN(test_attend_vs_reference);
	KVT_RUN(test_attend_batch_and_paths);
	KVT_RUN(test_attend_validation);
	KVT_RUN(test_passthrough_reproduces_exact_attention);
	return kvt_test_done();
}

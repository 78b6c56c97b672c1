/*
 * kvt_synth.c - the synthetic Token Norm Imbalance KV set (see kvt_synth.h).
 *
 * Keys of ordinary tokens: a per-head mean direction mu (|mu| ~ 13, in the slow RoPE
 * channels, which barely rotate over the context: the "massive channel" structure of real
 * keys) + N(0, 0.8^2) per channel + two noisy outlier channels (std 3.5), times a per-token
 * factor exp(0.12 N) shared by every head of the layer: per-head key norm ~17.
 * Sinks (token 0 and one delimiter-like token in the middle): key 2.5 * u, u a unit direction
 * in the slow channels orthogonal to mu; value norm ~0.6 against ~12 for ordinary tokens, whose
 * values share a per-head mean of norm 0.4 x sqrt(d) (SmolLM2-135M: 0.40 x the median value
 * norm), so attention outputs keep a realistic size instead of averaging to noise.
 * Measured on the SmolLM2-135M dumps (chat, 389 tokens) with the statistics `kvtier-bench
 * fidelity` prints: first-token attention mass 0.35, mean logit range 14.2, attention entropy
 * 2.9 nats, |O| / median |v| 0.36; this set (seed 1, 4 x 2048 tokens): sink mass 0.43, logit
 * range 14.6, entropy 3.8, |O| / median |v| 0.23.
 * Queries: -alpha mu^ + beta u + N(0, 1.5^2): ordinary logits sit low and spread (the query's
 * noise sees the keys' per-channel spread, as a real query is correlated with real keys), the
 * sink logit is beta * 2.5 * scale, with beta drawn per query head from [6, 24] so heads range
 * from little to most of their mass on the sinks.
 *
 * The draw order is part of the contract: kvtier-bench fidelity's output for a seed must not
 * change when this file does, unless the change is deliberate and documented.
 */
#include "kvt_synth.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t kvt_synth_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

double kvt_synth_normal(uint64_t *s)
{
	double u1 = ((kvt_synth_rand(s) >> 11) + 0.5) * 0x1p-53;
	double u2 = (kvt_synth_rand(s) >> 11) * 0x1p-53;

	return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Llama-style rotate-half RoPE on one head vector. */
static void rope(float *x, uint32_t d, double pos, double base)
{
	for (uint32_t i = 0; i < d / 2; i++) {
		double th = pos * pow(base, -2.0 * i / d), c = cos(th), s = sin(th);
		double a = x[i], b = x[i + d / 2];

		x[i] = (float)(a * c - b * s);
		x[i + d / 2] = (float)(a * s + b * c);
	}
}

float kvt_synth_dot(const float *a, const float *b, uint32_t n)
{
	float s[8] = { 0 };
	uint32_t i = 0;

	for (; i + 8 <= n; i += 8)
		for (int j = 0; j < 8; j++)
			s[j] += a[i + j] * b[i + j];
	for (; i < n; i++)
		s[0] += a[i] * b[i];
	return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static void normalize(float *x, uint32_t d)
{
	double n = 0;

	for (uint32_t i = 0; i < d; i++)
		n += (double)x[i] * x[i];
	n = sqrt(n);
	for (uint32_t i = 0; i < d; i++)
		x[i] = (float)(x[i] / n);
}

int kvt_synth_tni(const struct kvt_synth_shape *sh, uint64_t seed, float *K, float *V, float *Q,
		  uint8_t *sink)
{
	const double base = 500000.0, alpha = 4.0, sigma_q = 1.5, sigma_k = 0.8;
	const uint32_t L = sh->layers, T = sh->tokens, H = sh->kv_heads, d = sh->head_dim;
	const uint32_t Hq = sh->q_heads, nq = sh->queries;
	const uint32_t slow0 = d * 3 / 8; /* channels [3d/8, d/2) and their RoPE pairs */
	uint32_t delim = T / 2 + 7;
	uint64_t rng = seed;
	float *mu, *u, *vm, *fac;

	if (!L || !T || !H || !Hq || Hq % H || d < 16 || d % 8)
		return -EINVAL;
	mu = calloc((size_t)H * d, sizeof(float));
	u = calloc((size_t)H * d, sizeof(float));
	vm = calloc((size_t)H * d, sizeof(float));
	fac = malloc(T * sizeof(float));
	if (!mu || !u || !vm || !fac) {
		free(mu);
		free(u);
		free(vm);
		free(fac);
		return -ENOMEM;
	}
	memset(sink, 0, T);
	sink[0] = 1;
	if (delim < T && delim < sh->q_pos0)
		sink[delim] = 1;

	for (uint32_t l = 0; l < L; l++) {
		for (uint32_t h = 0; h < H; h++) {
			float *m = mu + (size_t)h * d, *w = u + (size_t)h * d;
			double mnorm = 13.0 * (0.85 + 0.3 * (kvt_synth_rand(&rng) >> 11) * 0x1p-53);
			double proj = 0;

			memset(m, 0, d * sizeof(float));
			for (int k = 0; k < 6; k++) {
				uint32_t c = slow0 + (uint32_t)(kvt_synth_rand(&rng) % (d / 2 - slow0));

				c += (kvt_synth_rand(&rng) & 1) ? d / 2 : 0;
				m[c] += (float)kvt_synth_normal(&rng);
			}
			normalize(m, d);
			for (uint32_t c = 0; c < d; c++)
				w[c] = ((c >= slow0 && c < d / 2) || c >= d / 2 + slow0) ?
					       (float)kvt_synth_normal(&rng) : 0.0f;
			for (uint32_t c = 0; c < d; c++)
				proj += (double)w[c] * m[c];
			for (uint32_t c = 0; c < d; c++)
				w[c] -= (float)(proj * m[c]);
			normalize(w, d);
			for (uint32_t c = 0; c < d; c++)
				m[c] *= (float)mnorm;
		}
		for (uint32_t t = 0; t < T; t++)
			fac[t] = (float)exp(0.12 * kvt_synth_normal(&rng));
		/* values share a per-head mean direction of norm ~0.4 x theirs, as real ones do */
		for (uint32_t h = 0; h < H; h++) {
			float *w = vm + (size_t)h * d;

			for (uint32_t c = 0; c < d; c++)
				w[c] = (float)kvt_synth_normal(&rng);
			normalize(w, d);
			for (uint32_t c = 0; c < d; c++)
				w[c] *= 0.4f * sqrtf((float)d);
		}
		for (uint32_t h = 0; h < H; h++) {
			/* two outlier channels per head, in the middle frequencies */
			uint32_t o1 = d / 8 + (uint32_t)(kvt_synth_rand(&rng) % (d / 8));
			uint32_t o2 = o1 + d / 2;
			const float *m = mu + (size_t)h * d, *w = u + (size_t)h * d;

			for (uint32_t t = 0; t < T; t++) {
				float *k = K + (((size_t)l * T + t) * H + h) * d;
				float *v = V + (((size_t)l * T + t) * H + h) * d;

				if (sink[t]) {
					for (uint32_t c = 0; c < d; c++)
						k[c] = w[c] + 0.05f * (float)kvt_synth_normal(&rng);
					normalize(k, d);
					for (uint32_t c = 0; c < d; c++) {
						k[c] *= 2.5f;
						v[c] = 0.05f * (float)kvt_synth_normal(&rng);
					}
				} else {
					for (uint32_t c = 0; c < d; c++) {
						double sd = (c == o1 || c == o2) ? 3.5 : sigma_k;

						k[c] = fac[t] * (float)(m[c] + sd * kvt_synth_normal(&rng));
						v[c] = vm[(size_t)h * d + c] +
						       (float)kvt_synth_normal(&rng);
					}
				}
				rope(k, d, t, base);
			}
		}
		for (uint32_t i = 0; i < Hq; i++) {
			uint32_t kh = i / (Hq / H);
			const float *m = mu + (size_t)kh * d, *w = u + (size_t)kh * d;
			double mn = sqrt(kvt_synth_dot(m, m, d));
			double beta = 6.0 + 18.0 * (kvt_synth_rand(&rng) >> 11) * 0x1p-53;

			for (uint32_t j = 0; j < nq; j++) {
				float *q = Q + (((size_t)l * nq + j) * Hq + i) * d;

				for (uint32_t c = 0; c < d; c++)
					q[c] = (float)(-alpha * m[c] / mn + beta * w[c] +
						       sigma_q * kvt_synth_normal(&rng));
				rope(q, d, sh->q_pos0 + j, base);
			}
		}
	}
	free(mu);
	free(u);
	free(vm);
	free(fac);
	return 0;
}

/*
 * kvt_synth.h - the synthetic Token Norm Imbalance (TNI) KV set shared by `kvtierctl demo`
 * and `kvtier-bench fidelity --synthetic`, so both tools measure the codecs on the same data
 * (same seed and shape: same K, V, Q, bit for bit). See kvt_synth.c for what it models and
 * how it compares with a real model (SmolLM2-135M), OSCAR.md 1 and 7.7.
 */
#ifndef KVT_SYNTH_H
#define KVT_SYNTH_H

#include <stddef.h>
#include <stdint.h>

struct kvt_synth_shape {
	uint32_t layers, tokens, kv_heads, head_dim, q_heads;
	uint32_t queries;   /* queries per layer (decode steps) */
	uint32_t q_pos0;    /* query j has position q_pos0 + j (fidelity: tokens - queries) */
};

/*
 * Fills K, V [layers][tokens][kv_heads][head_dim], Q [layers][queries][q_heads][head_dim]
 * (f32, post-RoPE, not rounded) and sink [tokens] (1 for a sink token) from seed. Sinks:
 * token 0 and token tokens/2 + 7 when that is below q_pos0. Buffers are the caller's.
 * Returns 0, -EINVAL for a shape it cannot make (head_dim not a multiple of 16, q_heads not a
 * multiple of kv_heads, a zero size), -ENOMEM.
 */
int kvt_synth_tni(const struct kvt_synth_shape *s, uint64_t seed, float *K, float *V, float *Q,
		  uint8_t *sink);

/* The splitmix64 generator and standard normal the set is drawn with (reproducible). */
uint64_t kvt_synth_rand(uint64_t *state);
double kvt_synth_normal(uint64_t *state);

/* Dot product with 8 independent partial sums in a fixed order (the set's query norms and
 * the fidelity bench's logits use it, so both are bit-reproducible; without -ffast-math the
 * compiler cannot reassociate a single accumulator). */
float kvt_synth_dot(const float *a, const float *b, uint32_t n);

#endif

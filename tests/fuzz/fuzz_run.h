/*
 * fuzz_run.h - how long a fuzz test runs: DEFAULT iterations (a short run for every ctest),
 * KVT_FUZZ_ITERS=<n> iterations, or KVT_FUZZ_SECONDS=<s> seconds (no iteration cap unless
 * KVT_FUZZ_ITERS is also set). Header-only: one fuzz test per executable.
 */
#ifndef KVT_FUZZ_RUN_H
#define KVT_FUZZ_RUN_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

struct fuzz_run {
	uint64_t iters;
	double seconds; /* 0: no time limit */
	struct timespec t0;
};

static inline double fuzz_run_elapsed(const struct fuzz_run *r)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - r->t0.tv_sec) + (double)(t.tv_nsec - r->t0.tv_nsec) * 1e-9;
}

/* Reads the environment and starts the clock. */
static inline void fuzz_run_start(struct fuzz_run *r, uint64_t default_iters)
{
	const char *e;
	r->iters = default_iters;
	r->seconds = 0;
	if ((e = getenv("KVT_FUZZ_ITERS")) && *e)
		r->iters = strtoull(e, NULL, 0);
	if ((e = getenv("KVT_FUZZ_SECONDS")) && *e) {
		r->seconds = strtod(e, NULL);
		if (!getenv("KVT_FUZZ_ITERS"))
			r->iters = UINT64_MAX;
	}
	clock_gettime(CLOCK_MONOTONIC, &r->t0);
}

/* Whether iteration it (counting from 0) runs: under the cap and, looked at every 16
 * iterations (reading the clock costs more than a fast iteration), within the time. */
static inline bool fuzz_run_more(const struct fuzz_run *r, uint64_t it)
{
	if (it >= r->iters)
		return false;
	return !(r->seconds > 0 && it && (it & 15) == 0 && fuzz_run_elapsed(r) >= r->seconds);
}

#endif

/*
 * kvt_test.h - the tiny TAP-style harness every C test uses.
 *
 * A test file defines test functions, calls them from main() through KVT_RUN(), and returns
 * kvt_test_done(). Random inputs come from kvt_rand_*() seeded once per process from
 * KVT_SEED (when set) or the clock; the seed is printed on any failure so a run can be
 * replayed with KVT_SEED=<seed>. Checks never abort: a test records failures and continues,
 * except KVT_REQUIRE, which returns from the current test function.
 */
#ifndef KVT_TEST_H
#define KVT_TEST_H

#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int kvt_test_failures;
static int kvt_test_checks;
static uint64_t kvt_test_seed;
static uint64_t kvt_rand_state;
static const char *kvt_test_current = "";

static inline uint64_t kvt_rand_u64(void)
{
	/* splitmix64: small, fast, good enough for test data */
	uint64_t z = (kvt_rand_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Independent random streams for the fuzz tests: the generator state for item n of stream
 * `stream` comes from the run's seed alone, so one item (an iteration, a seed chunk) replays
 * from KVT_SEED and its number without running the items before it. */
static inline uint64_t kvt_mix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline void kvt_rand_stream(uint64_t stream, uint64_t n)
{
	kvt_rand_state = kvt_mix64(kvt_test_seed ^ kvt_mix64(stream ^ kvt_mix64(n)));
}

static inline uint32_t kvt_rand_below(uint32_t n) { return (uint32_t)(kvt_rand_u64() % n); }
static inline float kvt_rand_uniform(void) { return (float)((kvt_rand_u64() >> 40) * 0x1p-24); }
static inline float kvt_rand_normal(void)
{
	float u1 = kvt_rand_uniform(), u2 = kvt_rand_uniform();
	if (u1 < 1e-12f)
		u1 = 1e-12f;
	return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

static inline void kvt_test_init(void)
{
	const char *s = getenv("KVT_SEED");
	if (s && *s) {
		kvt_test_seed = strtoull(s, NULL, 0);
	} else {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		kvt_test_seed = (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec;
	}
	kvt_rand_state = kvt_test_seed;
	printf("# seed %" PRIu64 " (replay with KVT_SEED=%" PRIu64 ")\n", kvt_test_seed,
	       kvt_test_seed);
}

#define KVT_CHECK(cond, ...)                                                              \
	do {                                                                              \
		kvt_test_checks++;                                                        \
		if (!(cond)) {                                                            \
			kvt_test_failures++;                                              \
			printf("not ok - %s: %s:%d: %s: ", kvt_test_current, __FILE__,    \
			       __LINE__, #cond);                                          \
			printf(__VA_ARGS__);                                              \
			printf(" (seed %" PRIu64 ")\n", kvt_test_seed);                   \
		}                                                                         \
	} while (0)

/* KVT_CHECK that also calls on_fail() when it fails (the fuzz tests print the iteration and
 * its replay line there). */
#define KVT_CHECK_OR(on_fail, cond, ...)                                                  \
	do {                                                                              \
		int kvt_fails_before_ = kvt_test_failures;                                \
		KVT_CHECK(cond, __VA_ARGS__);                                             \
		if (kvt_test_failures != kvt_fails_before_)                               \
			on_fail();                                                        \
	} while (0)

#define KVT_REQUIRE(cond, ...)                                                            \
	do {                                                                              \
		int kvt_ok_ = (cond);                                                     \
		KVT_CHECK(kvt_ok_, __VA_ARGS__);                                          \
		if (!kvt_ok_)                                                             \
			return;                                                           \
	} while (0)

#define KVT_RUN(fn)                                                                       \
	do {                                                                              \
		int before_ = kvt_test_failures;                                          \
		kvt_test_current = #fn;                                                   \
		fn();                                                                     \
		printf("%s - %s\n", kvt_test_failures == before_ ? "ok" : "not ok", #fn); \
		fflush(stdout);                                                           \
	} while (0)

static inline int kvt_test_done(void)
{
	printf("# %d checks, %d failed\n", kvt_test_checks, kvt_test_failures);
	return kvt_test_failures ? 1 : 0;
}

#endif

/*
 * bench.h - kvtier-bench: shared pieces of the benchmark tool.
 *
 * kvtier-bench is one binary with subcommands (`kvtier-bench codec ...`). Each subcommand is
 * one function `int kvt_bench_<name>(int argc, char **argv)` in its own file
 * tests/bench/bench_<name>.c (argv[0] is the subcommand's name; return 0, 1 when a --check
 * fails, 2 on a usage error) and one row of the table in bench_main.c. The rows for `service`
 * and `gpu` already exist and point at weak declarations below: adding the file that defines
 * the function is enough to enable them (CMake globs bench_*.c; bench_gpu*.c is compiled only
 * when the CUDA kernels library exists). Link extra libraries in tests/bench/CMakeLists.txt.
 *
 * Output rules (CONVENTIONS.md): one JSON object per line on stdout per measurement, with the
 * reference measured in the same run and the ratio to it; diagnostics go to stderr.
 */
#ifndef KVT_BENCH_H
#define KVT_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct kvt_bench_cmd {
	const char *name;
	const char *summary;
	int (*run)(int argc, char **argv);
};

int kvt_bench_codec(int argc, char **argv);
int kvt_bench_fidelity(int argc, char **argv);
/* Defined by their owners' files when those are built in; NULL otherwise. */
int kvt_bench_service(int argc, char **argv) __attribute__((weak));
int kvt_bench_gpu(int argc, char **argv) __attribute__((weak));
int kvt_bench_gpu_restore(int argc, char **argv) __attribute__((weak)); /* bench_gpu_restore.c */

/* ---- helpers (bench_util.c) ------------------------------------------------------------- */

double kvt_bench_now_s(void);             /* CLOCK_MONOTONIC seconds */
void *kvt_bench_alloc(size_t bytes);      /* 64-byte aligned, pages touched; exits on OOM */
unsigned kvt_bench_ncpu(void);
size_t kvt_bench_l3_bytes(void);          /* 0 when unknown */

/* The value s of flag opt (NULL: it was missing) as a decimal number in lo..hi: "1.5" / "12",
 * digits and (for a double) one '.', nothing else (no sign, blank, exponent, hex, trailing
 * junk), no overflow; integers through common/kvt_text.h's kvt_text_parse_dec, as kvtierctl
 * reads its flags. 0 on success, -1 with a message naming opt and the limits on stderr (the
 * caller exits 2). */
int kvt_bench_parse_double(const char *opt, const char *s, double lo, double hi, double *out);
int kvt_bench_parse_uint(const char *opt, const char *s, unsigned long lo, unsigned long hi,
			 unsigned long *out);

/* The value s of list flag opt (NULL: it was missing) split at its commas: s is copied into
 * buf (len bytes: the longest list is len - 1 bytes) and items[] gets up to max entries,
 * pointers into buf. Every entry must be non-empty and the whole list must fit: strtok_r
 * skipped empty entries ("2,,4", ",2", "2,") and snprintf cut a long list silently. Returns
 * the number of entries (>= 1), or -1 with a message naming opt and what was wrong (and the
 * limit) on stderr (the caller exits 2). The caller checks each entry's value. */
int kvt_bench_split_list(const char *opt, const char *s, char *buf, size_t len, char **items,
			 int max);

/* A list flag of names: kvt_bench_split_list with a list of at most len - 1 (<= 255) bytes
 * and max (<= 4) entries, each of which parse() turns into out[i] >= 0 (expect names the
 * choices for the message). Returns the number of entries or -1 (message on stderr). */
int kvt_bench_parse_names(const char *opt, const char *s, size_t len, int (*parse)(const char *),
			  const char *expect, int *out, int max);

/* Runs fn(thread_index, arg) on n threads released together by a barrier; each returns the
 * bytes it processed and its own elapsed seconds. Returns the total bytes / the slowest
 * thread's seconds (bytes per second; conservative when threads do not overlap perfectly).
 * Per-thread setup belongs before the call (or in an earlier, untimed run). */
struct kvt_bench_result {
	double bytes;
	double seconds;
};
typedef struct kvt_bench_result (*kvt_bench_thread_fn)(unsigned thread, void *arg);
double kvt_bench_run_threads(unsigned n, kvt_bench_thread_fn fn, void *arg);

/* Small JSON writer for one line: kvt_bench_json_begin(), fields, kvt_bench_json_end(). */
struct kvt_bench_json {
	char buf[2048];
	size_t len;
	int fields;
};
void kvt_bench_json_begin(struct kvt_bench_json *j, const char *bench);
void kvt_bench_json_str(struct kvt_bench_json *j, const char *key, const char *val);
void kvt_bench_json_num(struct kvt_bench_json *j, const char *key, double val); /* NaN->null */
void kvt_bench_json_int(struct kvt_bench_json *j, const char *key, long long val);
void kvt_bench_json_bool(struct kvt_bench_json *j, const char *key, int val);
void kvt_bench_json_end(struct kvt_bench_json *j); /* prints the line and flushes */

/* A small splitmix64 generator (per thread; reproducible from a seed). */
static inline uint64_t kvt_bench_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}
double kvt_bench_normal(uint64_t *s); /* standard normal */

#endif

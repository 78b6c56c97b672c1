/* bench_util.c - timing, threads, argument parsing and JSON lines for kvtier-bench. */
#include "bench.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvt_text.h"

double kvt_bench_now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void *kvt_bench_alloc(size_t bytes)
{
	size_t n = (bytes + 63) & ~(size_t)63;
	void *p = aligned_alloc(64, n ? n : 64);

	if (!p) {
		fprintf(stderr, "kvtier-bench: out of memory for %zu bytes\n", bytes);
		exit(1);
	}
	/* Touch every page now so first-touch faults are not timed. */
	memset(p, 0, n);
	return p;
}

unsigned kvt_bench_ncpu(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n > 0 ? (unsigned)n : 1;
}

size_t kvt_bench_l3_bytes(void)
{
	long n = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
	n = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
	return n > 0 ? (size_t)n : 0;
}

/* A decimal number as a person types one: digits with at most one '.', at least one digit.
 * strtod alone also took blanks, a sign, "inf", "nan", "1e3" and hex ("0x1p-3"). */
static int is_decimal(const char *s)
{
	int digits = 0, dots = 0;
	for (; *s; s++) {
		if (*s >= '0' && *s <= '9')
			digits++;
		else if (*s == '.' && !dots)
			dots++;
		else
			return 0;
	}
	return digits > 0;
}

int kvt_bench_parse_double(const char *opt, const char *s, double lo, double hi, double *out)
{
	char q[256];
	double v;

	if (!s) {
		fprintf(stderr, "kvtier-bench: %s needs a value\n", opt);
		return -1;
	}
	v = is_decimal(s) ? strtod(s, NULL) : NAN;
	if (!(v >= lo && v <= hi)) {
		fprintf(stderr, "kvtier-bench: %s \"%s\": expected a decimal number in %g..%g\n",
			opt, kvt_text_escape(q, sizeof q, s, KVT_TEXT_BACKSLASH), lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

int kvt_bench_parse_uint(const char *opt, const char *s, unsigned long lo, unsigned long hi,
			 unsigned long *out)
{
	char q[256];
	uint64_t v;

	if (!s) {
		fprintf(stderr, "kvtier-bench: %s needs a value\n", opt);
		return -1;
	}
	if (kvt_text_parse_dec(s, s + strlen(s), hi, &v) || v < lo) {
		fprintf(stderr, "kvtier-bench: %s \"%s\": expected a decimal number in %lu..%lu\n",
			opt, kvt_text_escape(q, sizeof q, s, KVT_TEXT_BACKSLASH), lo, hi);
		return -1;
	}
	*out = (unsigned long)v;
	return 0;
}

int kvt_bench_split_list(const char *opt, const char *s, char *buf, size_t len, char **items,
			 int max)
{
	char q[512];
	size_t n_bytes;
	int n = 0;

	if (!s) {
		fprintf(stderr, "kvtier-bench: %s needs a comma-separated list\n", opt);
		return -1;
	}
	n_bytes = strlen(s);
	if (n_bytes >= len) {
		fprintf(stderr, "kvtier-bench: %s: a list of %zu bytes, at most %zu\n", opt, n_bytes,
			len - 1);
		return -1;
	}
	kvt_text_escape(q, sizeof q, s, KVT_TEXT_BACKSLASH);
	memcpy(buf, s, n_bytes + 1);
	for (char *p = buf, *comma;; p = comma + 1) {
		comma = strchr(p, ',');
		if (comma)
			*comma = '\0';
		if (!*p) {
			fprintf(stderr, "kvtier-bench: %s \"%s\": entry %d of the comma-separated "
					"list is empty\n", opt, q, n + 1);
			return -1;
		}
		if (n < max)
			items[n] = p;
		n++;
		if (!comma)
			break;
	}
	if (n > max) {
		fprintf(stderr, "kvtier-bench: %s \"%s\": %d entries, at most %d\n", opt, q, n, max);
		return -1;
	}
	return n;
}

int kvt_bench_parse_names(const char *opt, const char *s, size_t len, int (*parse)(const char *),
			  const char *expect, int *out, int max)
{
	char buf[256], *items[4], q[512];
	int n;

	if (len > sizeof buf || max > 4)
		return -1;
	if ((n = kvt_bench_split_list(opt, s, buf, len, items, max)) < 0)
		return -1;
	for (int i = 0; i < n; i++) {
		if ((out[i] = parse(items[i])) < 0) {
			fprintf(stderr, "kvtier-bench: %s \"%s\": expected %s\n", opt,
				kvt_text_escape(q, sizeof q, items[i], KVT_TEXT_BACKSLASH), expect);
			return -1;
		}
	}
	return n;
}

struct run_ctx {
	pthread_barrier_t barrier;
	kvt_bench_thread_fn fn;
	void *arg;
};

struct run_thread {
	struct run_ctx *ctx;
	unsigned index;
	pthread_t tid;
	struct kvt_bench_result res;
};

static void *thread_main(void *p)
{
	struct run_thread *t = p;

	pthread_barrier_wait(&t->ctx->barrier);
	t->res = t->ctx->fn(t->index, t->ctx->arg);
	return NULL;
}

double kvt_bench_run_threads(unsigned n, kvt_bench_thread_fn fn, void *arg)
{
	struct run_ctx ctx = { .fn = fn, .arg = arg };
	struct run_thread *ts = calloc(n, sizeof(*ts));
	double bytes = 0, slowest = 0;

	if (!ts || pthread_barrier_init(&ctx.barrier, NULL, n) != 0) {
		fprintf(stderr, "kvtier-bench: cannot start %u threads\n", n);
		exit(1);
	}
	for (unsigned i = 0; i < n; i++) {
		ts[i].ctx = &ctx;
		ts[i].index = i;
		if (pthread_create(&ts[i].tid, NULL, thread_main, &ts[i]) != 0) {
			fprintf(stderr, "kvtier-bench: pthread_create failed\n");
			exit(1);
		}
	}
	for (unsigned i = 0; i < n; i++) {
		pthread_join(ts[i].tid, NULL);
		bytes += ts[i].res.bytes;
		if (ts[i].res.seconds > slowest)
			slowest = ts[i].res.seconds;
	}
	pthread_barrier_destroy(&ctx.barrier);
	free(ts);
	return slowest > 0 ? bytes / slowest : 0;
}

static void json_raw(struct kvt_bench_json *j, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void json_raw(struct kvt_bench_json *j, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (j->len >= sizeof(j->buf))
		return;
	va_start(ap, fmt);
	n = vsnprintf(j->buf + j->len, sizeof(j->buf) - j->len, fmt, ap);
	va_end(ap);
	if (n > 0)
		j->len += (size_t)n;
	if (j->len >= sizeof(j->buf))
		j->len = sizeof(j->buf) - 1;
}

static void json_key(struct kvt_bench_json *j, const char *key)
{
	json_raw(j, "%s\"%s\":", j->fields++ ? "," : "", key);
}

void kvt_bench_json_begin(struct kvt_bench_json *j, const char *bench)
{
	j->len = 0;
	j->fields = 0;
	json_raw(j, "{");
	kvt_bench_json_str(j, "bench", bench);
}

void kvt_bench_json_str(struct kvt_bench_json *j, const char *key, const char *val)
{
	json_key(j, key);
	json_raw(j, "\"");
	for (const char *p = val; *p; p++) {
		unsigned char c = (unsigned char)*p;

		if (c == '"' || c == '\\')
			json_raw(j, "\\%c", c);
		else if (c < 0x20)
			json_raw(j, "\\u%04x", c);
		else
			json_raw(j, "%c", c);
	}
	json_raw(j, "\"");
}

void kvt_bench_json_num(struct kvt_bench_json *j, const char *key, double val)
{
	json_key(j, key);
	if (isfinite(val))
		json_raw(j, "%.6g", val);
	else
		json_raw(j, "null");
}

void kvt_bench_json_int(struct kvt_bench_json *j, const char *key, long long val)
{
	json_key(j, key);
	json_raw(j, "%lld", val);
}

void kvt_bench_json_bool(struct kvt_bench_json *j, const char *key, int val)
{
	json_key(j, key);
	json_raw(j, "%s", val ? "true" : "false");
}

void kvt_bench_json_end(struct kvt_bench_json *j)
{
	json_raw(j, "}");
	fprintf(stdout, "%s\n", j->buf);
	fflush(stdout);
}

double kvt_bench_normal(uint64_t *s)
{
	double u1 = ((kvt_bench_rand(s) >> 11) + 0.5) * 0x1p-53;
	double u2 = (kvt_bench_rand(s) >> 11) * 0x1p-53;

	return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

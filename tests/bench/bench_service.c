/*
 * bench_service.c - `kvtier-bench service`: kvtierd end to end over its unix socket, against
 * Redis used as a blob store for the same fp16 bytes, measured in the same run.
 *
 * The run: start redis-server (the Debian binary) on a unix socket in a temporary directory,
 * and kvtierd the same way unless --socket names a running one; record both servers' VmRSS;
 * then, with --threads client threads (one libkvtier client and one hiredis connection each):
 *   append         Append of one batch (--tokens tokens x all layers, f16 K and V) into the
 *                  thread's sessions, until the data set (--sessions x --session-tokens per
 *                  thread) is loaded; Redis: SET of the same bytes (K then V) per batch key.
 *   memory         both servers' VmRSS growth for the same data set (kvtierd at its codec,
 *                  Redis holding the fp16 bytes).
 *   fetch          libkvtier's default fetch of one batch's tokens, all layers, fp16 out
 *                  (local decode: FetchEncoded of the batch's chunks, decoded in the client;
 *                  KVTIER_CLIENT_FETCH=server makes it the Fetch RPC; the JSON's "path" says
 *                  which); Redis: GET of the batch.
 *   fetch_rpc      the same batch through the Fetch RPC (the daemon decodes); Redis: GET.
 *   fetch_restore  the default fetch of --restore-tokens tokens (what a worker restores after a
 *                  preemption), all layers, fp16 out; Redis: GET of the same batches'
 *                  keys, pipelined in one round trip.
 *   fetch_encoded  FetchEncoded of one sealed chunk (its logical fp16 bytes counted); Redis:
 *                  GET of the same tokens' fp16 bytes.
 *   attend         one Attend request of every layer of one session (GQA 2 query heads per KV
 *                  head); Redis: GET of that session's fp16 K and V, which a worker would need
 *                  to attend locally (logical bytes: the session's K/V).
 * Each workload and its Redis reference run interleaved (--rounds segments each, the order
 * alternating; the load in rounds of its batches), so both see the same machine load.
 * Each workload prints one JSON line: requests/s, logical fp16 GB/s, p50/p99 latency for
 * kvtierd and for Redis, the ratio (kvtierd / Redis throughput; Redis / kvtierd memory) and
 * the target it is reported against (never asserted): fetch >= 1.0x Redis GET, fetch_encoded
 * >= 3x, append >= 0.7x Redis SET, memory >= 4.5x less at INT2 G32.
 *
 * Every client thread has its own connection to each server (a local gRPC subchannel pool, as
 * each hiredis context has its own socket), unless --shared-connection puts all threads'
 * calls on one HTTP/2 connection (gRPC's default for channels with the same target); the JSON
 * says which ("connections").
 *
 * Correctness is checked on the way (a benchmark of wrong answers is worthless): every reply
 * has the expected size, the scheme-none path compares bytes, Stats agrees on token counts.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "kvt_codec.h"
#include "kvtier_client.h"

#define MAX_THREADS 64
#define CONNECT_WAIT_S 30.0

struct svc_opts {
	const char *socket_path;   /* a running kvtierd; NULL: start --kvtierd */
	const char *kvtierd_bin;
	const char *redis_bin;
	unsigned threads;
	unsigned layers, heads, head_dim;
	unsigned tokens;           /* per batch (append, fetch) */
	unsigned restore_tokens;   /* per fetch_restore (a multiple of tokens; 0: skip) */
	int shared_connection;     /* all threads on one gRPC connection */
	unsigned sessions;         /* per thread */
	unsigned session_tokens;   /* per session */
	double seconds;            /* per timed read workload */
	const char *scheme;
	unsigned bits, group, chunk_tokens, sinks;
	int redis;                 /* 0: --no-redis */
	unsigned rounds;           /* read workloads: alternating kvtierd / Redis segments */
	const char *only;          /* --workloads: the read workloads to run (NULL: all) */
};

struct lat {
	double *us;
	size_t n, cap;
};

static void lat_add(struct lat *l, double us)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 4096;
		double *p = realloc(l->us, cap * sizeof(*p));
		if (!p) {
			fprintf(stderr, "kvtier-bench service: out of memory\n");
			exit(1);
		}
		l->us = p;
		l->cap = cap;
	}
	l->us[l->n++] = us;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* Nearest-rank percentile of the merged latencies of every thread. */
static double lat_pct(struct lat *all, double p)
{
	if (!all->n)
		return NAN;
	size_t i = (size_t)ceil(p / 100.0 * (double)all->n);
	return all->us[i ? i - 1 : 0];
}

/* ---- processes ------------------------------------------------------------------------------ */

static long vm_rss_bytes(pid_t pid)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "r");
	long kb = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "VmRSS:", 6)) {
			kb = strtol(line + 6, NULL, 10);
			break;
		}
	fclose(f);
	return kb < 0 ? -1 : kb * 1024;
}

/* The pid of the process listening on a unix socket: connect and ask SO_PEERCRED. */
static pid_t peer_pid(const char *path)
{
	struct sockaddr_un a;
	struct ucred cred;
	socklen_t len = sizeof(cred);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	pid_t pid = -1;
	if (fd < 0)
		return -1;
	memset(&a, 0, sizeof(a));
	a.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(a.sun_path))
		goto out;
	strcpy(a.sun_path, path);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
		pid = cred.pid;
out:
	close(fd);
	return pid;
}

static pid_t spawn(char *const argv[], const char *log_path)
{
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execv(argv[0], argv);
		_exit(127);
	}
	return pid;
}

/* Waits (bounded) until a unix socket accepts connections, or the child exits. */
static int wait_socket(const char *path, pid_t child, const char *what)
{
	double t0 = kvt_bench_now_s();
	while (kvt_bench_now_s() - t0 < CONNECT_WAIT_S) {
		if (peer_pid(path) > 0)
			return 0;
		int status;
		if (child > 0 && waitpid(child, &status, WNOHANG) == child) {
			fprintf(stderr, "kvtier-bench service: %s exited (status %d) before listening "
					"on %s\n", what, status, path);
			return -1;
		}
		struct timespec ts = {0, 20 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
	fprintf(stderr, "kvtier-bench service: %s not listening on %s after %.0f s\n", what, path,
		CONNECT_WAIT_S);
	return -1;
}

static void stop_child(pid_t pid)
{
	int status;
	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	double t0 = kvt_bench_now_s();
	while (waitpid(pid, &status, WNOHANG) == 0) {
		if (kvt_bench_now_s() - t0 > 30) {
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			return;
		}
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}

/* ---- the workloads -------------------------------------------------------------------------- */

enum workload { W_APPEND, W_FETCH, W_FETCH_RPC, W_FETCH_ENCODED, W_ATTEND, W_REDIS_SET, W_REDIS_GET,
		W_REDIS_GET_SESSION };

struct svc;

struct worker {
	struct svc *svc;
	unsigned index;
	struct kvt_client *kc;
	redisContext *rc;
	uint16_t *k, *v;           /* one batch: [L][tokens][H][d] f16 */
	uint8_t *rbuf;             /* Redis value: K then V of one batch */
	uint8_t *fk, *fv;          /* fetch outputs */
	float *q, *out;            /* attend: [L][2H][d] each */
	uint64_t rng;
	struct lat lat;
	uint64_t ops;
	double bytes, seconds;
	int failed;
	char err[320];
};

struct svc {
	struct svc_opts o;
	char tmpdir[64];
	char kv_sock[128], redis_sock[128];
	pid_t kv_child, redis_child, kv_pid;
	struct worker w[MAX_THREADS];
	struct kvt_client_shape shape;
	size_t batch_bytes;        /* K (or V) bytes of one batch */
	unsigned batches_per_session;
	enum workload wl;
	unsigned fetch_batches;    /* batches per fetch (1, or restore_tokens / tokens) */
	unsigned op_lo, op_hi;     /* append / SET: the batches [op_lo, op_hi) of each thread */
	unsigned sealed_chunks;    /* chunks sealed in every session once loaded (Stat) */
	double deadline_s;         /* read workloads run until this many seconds have passed */
	pthread_barrier_t barrier;
};

static void session_name(char *buf, size_t n, unsigned thread, unsigned s)
{
	snprintf(buf, n, "bench-%d-t%u-s%u", (int)getpid(), thread, s);
}

static int fail(struct worker *w, const char *what, const struct kvt_client_status *st)
{
	w->failed = 1;
	snprintf(w->err, sizeof(w->err), "%s: %s: %s", what,
		 st ? kvt_client_code_name(st->code) : "", st ? st->message : "");
	return -1;
}

static int redis_fail(struct worker *w, const char *what, redisReply *r)
{
	w->failed = 1;
	snprintf(w->err, sizeof(w->err), "redis %s: %s", what,
		 r && r->type == REDIS_REPLY_ERROR ? r->str : (w->rc->err ? w->rc->errstr : "bad reply"));
	if (r)
		freeReplyObject(r);
	return -1;
}

static int one_op(struct worker *w, unsigned i)
{
	struct svc *s = w->svc;
	struct kvt_client_status st;
	char name[96], key[128];
	unsigned sess, batch;
	const struct svc_opts *o = &s->o;
	size_t batch_kv = 2 * s->batch_bytes;

	switch (s->wl) {
	case W_APPEND: {
		sess = i / s->batches_per_session;
		session_name(name, sizeof(name), w->index, sess);
		struct kvt_client_append_result res;
		if (kvt_client_append(w->kc, name, &s->shape, w->k, w->v, o->tokens, NULL, &res, &st))
			return fail(w, "append", &st);
		if (res.appended != o->tokens)
			return fail(w, "append: short", NULL);
		w->bytes += (double)batch_kv;
		return 0;
	}
	case W_REDIS_SET: {
		sess = i / s->batches_per_session;
		batch = i % s->batches_per_session;
		snprintf(key, sizeof(key), "bench:t%u:s%u:b%u", w->index, sess, batch);
		redisReply *r = redisCommand(w->rc, "SET %s %b", key, w->rbuf, batch_kv);
		if (!r || r->type != REDIS_REPLY_STATUS)
			return redis_fail(w, "SET", r);
		freeReplyObject(r);
		w->bytes += (double)batch_kv;
		return 0;
	}
	case W_FETCH:
	case W_FETCH_RPC: {
		unsigned nb = s->fetch_batches;
		size_t want = s->batch_bytes * nb;
		sess = (unsigned)(kvt_bench_rand(&w->rng) % o->sessions);
		batch = (unsigned)(kvt_bench_rand(&w->rng) % (s->batches_per_session - nb + 1));
		session_name(name, sizeof(name), w->index, sess);
		struct kvt_client_fetch_range r;
		struct kvt_client_fetch_result fr;
		kvt_client_fetch_range_init(&r);
		r.token_begin = (uint64_t)batch * o->tokens;
		r.token_end = r.token_begin + (uint64_t)nb * o->tokens;
		r.layer_begin = 0;
		r.layer_end = o->layers;
		r.dtype = KVT_CLIENT_DTYPE_F16;
		r.decode_local = s->wl == W_FETCH_RPC ? KVT_CLIENT_FETCH_SERVER
						      : KVT_CLIENT_FETCH_DEFAULT;
		/* every field given: no Stat round trip; the reply lands in fk / fv */
		if (kvt_client_fetch(w->kc, name, &r, w->fk, want, w->fv, want, &fr, &st))
			return fail(w, "fetch", &st);
		if (fr.k_bytes != want || fr.v_bytes != want)
			return fail(w, "fetch: short reply", NULL);
		w->bytes += 2.0 * (double)want;
		return 0;
	}
	case W_FETCH_ENCODED: {
		sess = (unsigned)(kvt_bench_rand(&w->rng) % o->sessions);
		/* a sealed chunk (an exact recent window keeps the newest tokens unsealed) */
		unsigned c = (unsigned)(kvt_bench_rand(&w->rng) % s->sealed_chunks);
		session_name(name, sizeof(name), w->index, sess);
		struct kvt_client_encoded *enc = NULL;
		if (kvt_client_fetch_encoded(w->kc, name, c, c + 1, 0, &enc, &st))
			return fail(w, "fetch_encoded", &st);
		int ok = enc->n_chunks == 1 && enc->chunks[0].n_bytes > KVT_CHUNK_HEADER_BYTES;
		kvt_client_encoded_free(enc);
		if (!ok)
			return fail(w, "fetch_encoded: not one chunk", NULL);
		/* logical: the chunk's tokens as fp16 K and V */
		w->bytes += 2.0 * o->chunk_tokens * o->layers * o->heads * o->head_dim * 2;
		return 0;
	}
	case W_ATTEND: {
		struct kvt_client_attend_item items[256];
		sess = (unsigned)(kvt_bench_rand(&w->rng) % o->sessions);
		session_name(name, sizeof(name), w->index, sess);
		size_t qn = (size_t)2 * o->heads * o->head_dim;
		memset(items, 0, sizeof(items));
		for (unsigned l = 0; l < o->layers; l++) {
			items[l].session_id = name;
			items[l].layer = l;
			items[l].n_q_heads = 2 * o->heads;
			items[l].q = w->q + l * qn;
			items[l].q_bytes = qn * 4;
			items[l].out = w->out + l * qn;
			items[l].out_cap = qn * 4;
		}
		if (kvt_client_attend(w->kc, items, o->layers, 0, &st))
			return fail(w, "attend", &st);
		for (unsigned l = 0; l < o->layers; l++)
			if (items[l].out_bytes != qn * 4 ||
			    items[l].n_tokens_attended != o->session_tokens)
				return fail(w, "attend: wrong result size or token count", NULL);
		w->bytes += 2.0 * o->session_tokens * o->layers * o->heads * o->head_dim * 2;
		return 0;
	}
	case W_REDIS_GET:
	case W_REDIS_GET_SESSION: {
		sess = (unsigned)(kvt_bench_rand(&w->rng) % o->sessions);
		unsigned n = s->wl == W_REDIS_GET ? s->fetch_batches : s->batches_per_session;
		unsigned b0 = s->wl == W_REDIS_GET
				      ? (unsigned)(kvt_bench_rand(&w->rng) %
						   (s->batches_per_session - n + 1))
				      : 0;
		/* A fetch's keys in one round trip (pipelined: the fastest way hiredis gets them);
		 * a whole session's keys (attend's reference) one at a time as before. */
		unsigned depth = s->wl == W_REDIS_GET ? n : 1;
		for (unsigned b = b0; b < b0 + n; b++) {
			if ((b - b0) % depth == 0)
				for (unsigned q = b; q < b + depth && q < b0 + n; q++) {
					snprintf(key, sizeof(key), "bench:t%u:s%u:b%u", w->index,
						 sess, q);
					if (redisAppendCommand(w->rc, "GET %s", key) != REDIS_OK)
						return redis_fail(w, "GET", NULL);
				}
			redisReply *r = NULL;
			if (redisGetReply(w->rc, (void **)&r) != REDIS_OK || !r ||
			    r->type != REDIS_REPLY_STRING || (size_t)r->len != batch_kv)
				return redis_fail(w, "GET", r);
			freeReplyObject(r);
			w->bytes += (double)batch_kv;
		}
		return 0;
	}
	}
	return -1;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct svc *s = w->svc;
	int bounded = s->wl == W_APPEND || s->wl == W_REDIS_SET;
	pthread_barrier_wait(&s->barrier);
	double t0 = kvt_bench_now_s();
	for (unsigned i = bounded ? s->op_lo : 0;; i++) {
		if (bounded ? i >= s->op_hi : kvt_bench_now_s() - t0 >= s->deadline_s)
			break;
		double a = kvt_bench_now_s();
		if (one_op(w, i))
			break;
		lat_add(&w->lat, (kvt_bench_now_s() - a) * 1e6);
		w->ops++;
	}
	w->seconds = kvt_bench_now_s() - t0;
	return NULL;
}

struct measured {
	double req_per_s, gb_per_s, p50_us, p99_us, seconds;
	double server_cpu_us, client_cpu_us; /* per request */
	uint64_t requests;
	int ok;
};

/* What segments of one workload add up to. */
struct acc {
	struct lat all;
	double bytes, secs;
	double server_cpu_s, client_cpu_s; /* CPU time of the server process / this process */
	uint64_t requests;
	int failed;
};

/* A process's CPU time (user + system, every thread) from /proc/PID/stat; -1 if unreadable. */
static double proc_cpu_s(pid_t pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	/* fields after the command name (which may hold spaces): state is field 3 */
	char *p = strrchr(buf, ')');
	unsigned long long ut = 0, st = 0;
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut,
			 &st) != 2)
		return -1;
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double self_cpu_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One segment: every thread runs wl (until seconds pass, for read workloads). */
static void run_segment(struct svc *s, enum workload wl, double seconds, struct acc *a)
{
	pthread_t th[MAX_THREADS];
	double secs = 0;
	int redis_wl = wl == W_REDIS_SET || wl == W_REDIS_GET || wl == W_REDIS_GET_SESSION;
	pid_t server = redis_wl ? s->redis_child : s->kv_pid;
	double server0 = proc_cpu_s(server), client0 = self_cpu_s();
	s->wl = wl;
	s->deadline_s = seconds;
	pthread_barrier_init(&s->barrier, NULL, s->o.threads);
	for (unsigned i = 0; i < s->o.threads; i++) {
		struct worker *w = &s->w[i];
		w->lat.n = 0;
		w->ops = 0;
		w->bytes = 0;
		w->failed = 0;
		if (pthread_create(&th[i], NULL, worker_main, w)) {
			fprintf(stderr, "kvtier-bench service: pthread_create failed\n");
			exit(1);
		}
	}
	for (unsigned i = 0; i < s->o.threads; i++) {
		struct worker *w = &s->w[i];
		pthread_join(th[i], NULL);
		if (w->failed) {
			fprintf(stderr, "kvtier-bench service: thread %u: %s\n", i, w->err);
			a->failed = 1;
		}
		for (size_t j = 0; j < w->lat.n; j++)
			lat_add(&a->all, w->lat.us[j]);
		a->requests += w->ops;
		a->bytes += w->bytes;
		secs = w->seconds > secs ? w->seconds : secs; /* the slowest thread: conservative */
	}
	a->secs += secs;
	a->server_cpu_s += proc_cpu_s(server) - server0;
	a->client_cpu_s += self_cpu_s() - client0;
	pthread_barrier_destroy(&s->barrier);
}

static struct measured acc_result(struct acc *a)
{
	struct measured m;
	memset(&m, 0, sizeof(m));
	qsort(a->all.us, a->all.n, sizeof(double), cmp_double);
	m.ok = !a->failed;
	m.requests = a->requests;
	m.seconds = a->secs;
	m.req_per_s = a->secs > 0 ? (double)a->requests / a->secs : NAN;
	m.gb_per_s = a->secs > 0 ? a->bytes / a->secs / 1e9 : NAN;
	m.p50_us = lat_pct(&a->all, 50);
	m.p99_us = lat_pct(&a->all, 99);
	m.server_cpu_us = a->requests ? a->server_cpu_s * 1e6 / (double)a->requests : NAN;
	m.client_cpu_us = a->requests ? a->client_cpu_s * 1e6 / (double)a->requests : NAN;
	free(a->all.us);
	return m;
}

/*
 * The load (append, and Redis SET of the same batches), interleaved like run_pair: round r
 * of --rounds loads batches [r, r + 1) x total / rounds of every thread into both servers,
 * the order alternating.
 */
static void run_load(struct svc *s, struct measured *kv, struct measured *redis)
{
	struct acc ak, ar;
	unsigned total = s->o.sessions * s->batches_per_session;
	unsigned rounds = s->o.redis ? s->o.rounds : 1;
	if (rounds > total)
		rounds = total;
	memset(&ak, 0, sizeof(ak));
	memset(&ar, 0, sizeof(ar));
	for (unsigned r = 0; r < rounds && !ak.failed && !ar.failed; r++) {
		s->op_lo = (unsigned)((uint64_t)total * r / rounds);
		s->op_hi = (unsigned)((uint64_t)total * (r + 1) / rounds);
		if (s->o.redis && r % 2 == 1)
			run_segment(s, W_REDIS_SET, 0, &ar);
		run_segment(s, W_APPEND, 0, &ak);
		if (s->o.redis && r % 2 == 0)
			run_segment(s, W_REDIS_SET, 0, &ar);
	}
	*kv = acc_result(&ak);
	if (s->o.redis)
		*redis = acc_result(&ar);
	else
		free(ar.all.us);
}

/*
 * A read workload and its Redis reference, interleaved: --rounds rounds of seconds / rounds
 * each, alternating which server goes first, so both see the same share of whatever else
 * the machine is doing (the development box is shared; a minute of drift between two
 * back-to-back runs would otherwise decide the ratio).
 */
static void run_pair(struct svc *s, enum workload kv_wl, enum workload redis_wl,
		     struct measured *kv, struct measured *redis)
{
	struct acc ak, ar;
	unsigned rounds = s->o.redis ? s->o.rounds : 1;
	double seg = s->o.seconds / rounds;
	memset(&ak, 0, sizeof(ak));
	memset(&ar, 0, sizeof(ar));
	for (unsigned r = 0; r < rounds && !ak.failed && !ar.failed; r++) {
		if (s->o.redis && r % 2 == 0)
			run_segment(s, redis_wl, seg, &ar);
		run_segment(s, kv_wl, seg, &ak);
		if (s->o.redis && r % 2 == 1)
			run_segment(s, redis_wl, seg, &ar);
	}
	*kv = acc_result(&ak);
	if (s->o.redis)
		*redis = acc_result(&ar);
	else
		free(ar.all.us);
}

/* Whether --workloads asks for this read workload (every one when not given). */
static int wanted(const struct svc *s, const char *name)
{
	const char *p = s->o.only;
	size_t n = strlen(name);
	if (!p)
		return 1;
	while (*p) {
		const char *e = strchr(p, ',');
		size_t len = e ? (size_t)(e - p) : strlen(p);
		if (len == n && !strncmp(p, name, n))
			return 1;
		p += len + (e ? 1 : 0);
	}
	return 0;
}

static void common_fields(struct kvt_bench_json *j, const struct svc *s, const char *workload)
{
	kvt_bench_json_begin(j, "service");
	kvt_bench_json_str(j, "workload", workload);
	kvt_bench_json_int(j, "threads", s->o.threads);
	kvt_bench_json_int(j, "layers", s->o.layers);
	kvt_bench_json_int(j, "kv_heads", s->o.heads);
	kvt_bench_json_int(j, "head_dim", s->o.head_dim);
	kvt_bench_json_int(j, "batch_tokens", s->o.tokens);
	kvt_bench_json_int(j, "fetch_tokens", (long long)s->fetch_batches * s->o.tokens);
	kvt_bench_json_int(j, "session_tokens", s->o.session_tokens);
	kvt_bench_json_str(j, "connections", s->o.shared_connection
						     ? "one gRPC connection shared by all threads"
						     : "one per client thread (kvtierd and Redis)");
	kvt_bench_json_str(j, "scheme", s->o.scheme);
	kvt_bench_json_int(j, "bits", s->o.bits);
	kvt_bench_json_int(j, "group", s->o.group);
}

static void report(const struct svc *s, const char *workload, const struct measured *k,
		   const struct measured *r, const char *redis_op, double target)
{
	struct kvt_bench_json j;
	common_fields(&j, s, workload);
	kvt_bench_json_int(&j, "requests", (long long)k->requests);
	kvt_bench_json_num(&j, "seconds", k->seconds);
	kvt_bench_json_num(&j, "requests_per_s", k->req_per_s);
	kvt_bench_json_num(&j, "logical_gb_per_s", k->gb_per_s);
	kvt_bench_json_num(&j, "latency_us_p50", k->p50_us);
	kvt_bench_json_num(&j, "latency_us_p99", k->p99_us);
	kvt_bench_json_num(&j, "server_cpu_us_per_request", k->server_cpu_us);
	kvt_bench_json_num(&j, "client_cpu_us_per_request", k->client_cpu_us);
	if (!strcmp(workload, "fetch_rpc")) {
		kvt_bench_json_str(&j, "path", "server decode (Fetch RPC)");
	} else if (!strncmp(workload, "fetch", 5) && strcmp(workload, "fetch_encoded")) {
		/* libkvtier's default path: local unless the environment says server */
		const char *e = getenv("KVTIER_CLIENT_FETCH");
		kvt_bench_json_str(&j, "path", e && !strcmp(e, "server")
						       ? "server decode (Fetch RPC)"
						       : "local decode (FetchEncoded)");
	}
	kvt_bench_json_str(&j, "reference", redis_op);
	if (r) {
		kvt_bench_json_num(&j, "redis_server_cpu_us_per_request", r->server_cpu_us);
		kvt_bench_json_num(&j, "redis_client_cpu_us_per_request", r->client_cpu_us);
		kvt_bench_json_num(&j, "redis_requests_per_s", r->req_per_s);
		kvt_bench_json_num(&j, "redis_gb_per_s", r->gb_per_s);
		kvt_bench_json_num(&j, "redis_latency_us_p50", r->p50_us);
		kvt_bench_json_num(&j, "redis_latency_us_p99", r->p99_us);
		double ratio = r->gb_per_s > 0 ? k->gb_per_s / r->gb_per_s : NAN;
		kvt_bench_json_num(&j, "ratio_vs_redis", ratio);
		if (target > 0) {
			kvt_bench_json_num(&j, "target_ratio", target);
			kvt_bench_json_bool(&j, "meets_target", ratio >= target);
		}
	}
	kvt_bench_json_bool(&j, "ok", k->ok && (!r || r->ok));
	kvt_bench_json_end(&j);
}

/* ---- set-up --------------------------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kvtier-bench service (--socket PATH | --kvtierd BIN) [options]\n"
		"  --socket PATH          a running kvtierd's unix socket\n"
		"  --kvtierd BIN          start this kvtierd on a socket in a temporary directory\n"
		"  --redis-server BIN     default /usr/bin/redis-server; --no-redis skips Redis\n"
		"  --threads N            client threads (default 4)\n"
		"  --layers N --kv-heads N --head-dim N   shape (default 8, 8, 128), f16\n"
		"  --tokens N             tokens per append / fetch batch (default 128)\n"
		"  --restore-tokens N     tokens per fetch_restore (default 1024 or the session's\n"
		"                         length if smaller; 0 skips it)\n"
		"  --shared-connection    all client threads on one gRPC connection\n"
		"  --sessions N           sessions per thread (default 2)\n"
		"  --session-tokens N     tokens per session (default 4096)\n"
		"  --seconds S            per read workload and server (default 2)\n"
		"  --rounds N             read workloads alternate kvtierd and Redis in N segments\n"
		"                         of seconds / N each (default 4)\n"
		"  --workloads LIST       read workloads to run after the load, comma separated\n"
		"                         (fetch,fetch_rpc,fetch_restore,fetch_encoded,attend;\n"
		"                         default all)\n"
		"  --scheme NAME --bits N --group N --chunk-tokens N --sinks N   the codec\n"
		"                         (default oscar, 2, 32, 128, 4)\n");
}

static int parse(struct svc_opts *o, int argc, char **argv)
{
	unsigned long u;
	o->redis_bin = "/usr/bin/redis-server";
	o->threads = 4;
	o->layers = 8;
	o->heads = 8;
	o->head_dim = 128;
	o->tokens = 128;
	o->restore_tokens = UINT32_MAX; /* default: 1024, or less in a smaller session */
	o->sessions = 2;
	o->session_tokens = 4096;
	o->seconds = 2;
	o->scheme = "oscar";
	o->bits = 2;
	o->group = 32;
	o->chunk_tokens = 128;
	o->sinks = 4;
	o->redis = 1;
	o->rounds = 4;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;
#define UINT_OPT(name, field, lo, hi)                                                        \
	if (!strcmp(a, name)) {                                                             \
		if (!val || kvt_bench_parse_uint(name, val, lo, hi, &u))                    \
			return 2;                                                           \
		o->field = (unsigned)u;                                                     \
		i++;                                                                        \
		continue;                                                                   \
	}
		UINT_OPT("--threads", threads, 1, MAX_THREADS)
		UINT_OPT("--layers", layers, 1, 256)
		UINT_OPT("--kv-heads", heads, 1, 64)
		UINT_OPT("--head-dim", head_dim, 64, 256)
		UINT_OPT("--tokens", tokens, 1, 65536)
		UINT_OPT("--restore-tokens", restore_tokens, 0, 1u << 24)
		UINT_OPT("--sessions", sessions, 1, 4096)
		UINT_OPT("--session-tokens", session_tokens, 1, 1u << 24)
		UINT_OPT("--bits", bits, 2, 8)
		UINT_OPT("--group", group, 32, 128)
		UINT_OPT("--chunk-tokens", chunk_tokens, 32, 1024)
		UINT_OPT("--sinks", sinks, 0, 64)
		UINT_OPT("--rounds", rounds, 1, 1000)
#undef UINT_OPT
		if (!strcmp(a, "--seconds")) {
			if (!val || kvt_bench_parse_double(a, val, 0.01, 3600, &o->seconds))
				return 2;
			i++;
		} else if (!strcmp(a, "--socket") && val) {
			o->socket_path = argv[++i];
		} else if (!strcmp(a, "--kvtierd") && val) {
			o->kvtierd_bin = argv[++i];
		} else if (!strcmp(a, "--redis-server") && val) {
			o->redis_bin = argv[++i];
		} else if (!strcmp(a, "--scheme") && val) {
			o->scheme = argv[++i];
		} else if (!strcmp(a, "--workloads") && val) {
			o->only = argv[++i];
		} else if (!strcmp(a, "--no-redis")) {
			o->redis = 0;
		} else if (!strcmp(a, "--shared-connection")) {
			o->shared_connection = 1;
		} else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout);
			exit(0);
		} else {
			fprintf(stderr, "kvtier-bench service: unknown or incomplete option '%s'\n", a);
			usage(stderr);
			return 2;
		}
	}
	if (!o->socket_path == !o->kvtierd_bin) {
		fprintf(stderr, "kvtier-bench service: give exactly one of --socket, --kvtierd\n");
		return 2;
	}
	if (o->session_tokens % o->tokens || o->session_tokens % o->chunk_tokens) {
		fprintf(stderr, "kvtier-bench service: --session-tokens %u must be a multiple of "
				"--tokens %u and --chunk-tokens %u\n",
			o->session_tokens, o->tokens, o->chunk_tokens);
		return 2;
	}
	for (const char *p = o->only; p && *p;) {
		static const char *const known[] = {"fetch", "fetch_rpc", "fetch_restore",
						     "fetch_encoded", "attend"};
		const char *e = strchr(p, ',');
		size_t len = e ? (size_t)(e - p) : strlen(p);
		int ok = 0;
		for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++)
			ok |= strlen(known[k]) == len && !strncmp(p, known[k], len);
		if (!ok) {
			fprintf(stderr, "kvtier-bench service: --workloads: unknown workload '%.*s' "
					"(fetch, fetch_rpc, fetch_restore, fetch_encoded, "
					"attend)\n",
				(int)len, p);
			return 2;
		}
		p += len + (e ? 1 : 0);
	}
	if (o->restore_tokens == UINT32_MAX) {
		unsigned r = o->session_tokens < 1024 ? o->session_tokens : 1024;
		o->restore_tokens = r - r % o->tokens;
	}
	if (o->restore_tokens % o->tokens || o->restore_tokens > o->session_tokens) {
		fprintf(stderr, "kvtier-bench service: --restore-tokens %u must be a multiple of "
				"--tokens %u and at most --session-tokens %u\n",
			o->restore_tokens, o->tokens, o->session_tokens);
		return 2;
	}
	if (o->layers > 256 || 2 * o->heads > 8 * 64) {
		fprintf(stderr, "kvtier-bench service: shape out of range\n");
		return 2;
	}
	return 0;
}

static uint32_t scheme_wire(const char *name)
{
	if (!strcmp(name, "none"))
		return KVT_CLIENT_SCHEME_NONE;
	if (!strcmp(name, "kivi"))
		return KVT_CLIENT_SCHEME_KIVI;
	if (!strcmp(name, "hadamard"))
		return KVT_CLIENT_SCHEME_HADAMARD;
	if (!strcmp(name, "oscar"))
		return KVT_CLIENT_SCHEME_OSCAR;
	return 0;
}

static int start_servers(struct svc *s)
{
	char log_path[192];
	strcpy(s->tmpdir, "/tmp/kvtier-bench-XXXXXX");
	if (!mkdtemp(s->tmpdir)) {
		fprintf(stderr, "kvtier-bench service: mkdtemp: %s\n", strerror(errno));
		return -1;
	}
	if (s->o.kvtierd_bin) {
		char sock_arg[192];
		snprintf(s->kv_sock, sizeof(s->kv_sock), "%s/kvtierd.sock", s->tmpdir);
		snprintf(sock_arg, sizeof(sock_arg), "--socket=%s", s->kv_sock);
		snprintf(log_path, sizeof(log_path), "%s/kvtierd.log", s->tmpdir);
		char *argv[] = {(char *)s->o.kvtierd_bin, sock_arg, "--log_level=warn", NULL};
		s->kv_child = spawn(argv, log_path);
		if (s->kv_child < 0 || wait_socket(s->kv_sock, s->kv_child, "kvtierd"))
			return -1;
	} else {
		snprintf(s->kv_sock, sizeof(s->kv_sock), "%s", s->o.socket_path);
	}
	s->kv_pid = peer_pid(s->kv_sock);
	if (s->o.redis) {
		snprintf(s->redis_sock, sizeof(s->redis_sock), "%s/redis.sock", s->tmpdir);
		snprintf(log_path, sizeof(log_path), "%s/redis.log", s->tmpdir);
		char *argv[] = {(char *)s->o.redis_bin, "--port", "0", "--unixsocket", s->redis_sock,
				"--unixsocketperm", "700", "--save", "", "--appendonly", "no",
				"--dir", s->tmpdir, "--daemonize", "no", "--loglevel", "warning",
				"--maxmemory", "0", NULL};
		s->redis_child = spawn(argv, log_path);
		if (s->redis_child < 0 || wait_socket(s->redis_sock, s->redis_child, "redis-server"))
			return -1;
	}
	return 0;
}

static void stop_servers(struct svc *s)
{
	char p[192];
	stop_child(s->redis_child);
	stop_child(s->kv_child);
	const char *files[] = {"kvtierd.log", "redis.log", "kvtierd.sock", "redis.sock"};
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		snprintf(p, sizeof(p), "%s/%s", s->tmpdir, files[i]);
		unlink(p);
	}
	rmdir(s->tmpdir);
}

static int setup_workers(struct svc *s)
{
	const struct svc_opts *o = &s->o;
	size_t n = (size_t)o->layers * o->tokens * o->heads * o->head_dim;
	size_t qn = (size_t)o->layers * 2 * o->heads * o->head_dim;
	for (unsigned i = 0; i < o->threads; i++) {
		struct worker *w = &s->w[i];
		struct kvt_client_options co;
		struct kvt_client_status st;
		char target[160];
		memset(w, 0, sizeof(*w));
		w->svc = s;
		w->index = i;
		w->rng = 0x6b76746965726265ull + i;
		memset(&co, 0, sizeof(co));
		snprintf(target, sizeof(target), "unix:%s", s->kv_sock);
		co.target = target;
		co.own_connection = !o->shared_connection;
		if (kvt_client_connect(&co, &w->kc, &st)) {
			fprintf(stderr, "kvtier-bench service: connect %s: %s\n", target, st.message);
			return -1;
		}
		if (o->redis) {
			w->rc = redisConnectUnix(s->redis_sock);
			if (!w->rc || w->rc->err) {
				fprintf(stderr, "kvtier-bench service: redis connect: %s\n",
					w->rc ? w->rc->errstr : "out of memory");
				return -1;
			}
		}
		w->k = kvt_bench_alloc(n * 2);
		w->v = kvt_bench_alloc(n * 2);
		size_t fn = n * (o->restore_tokens > o->tokens ? o->restore_tokens / o->tokens : 1);
		w->fk = kvt_bench_alloc(fn * 2);
		w->fv = kvt_bench_alloc(fn * 2);
		w->rbuf = kvt_bench_alloc(n * 4);
		w->q = kvt_bench_alloc(qn * 4);
		w->out = kvt_bench_alloc(qn * 4);
		/* keys with a few large channels, like post-RoPE keys; values plain normal */
		for (size_t e = 0; e < n; e++) {
			float kx = (float)kvt_bench_normal(&w->rng);
			if (e % o->head_dim < o->head_dim / 16)
				kx *= 4.0f;
			w->k[e] = kvt_f32_to_f16(kx);
			w->v[e] = kvt_f32_to_f16((float)kvt_bench_normal(&w->rng));
		}
		memcpy(w->rbuf, w->k, n * 2);
		memcpy(w->rbuf + n * 2, w->v, n * 2);
		for (size_t e = 0; e < qn; e++)
			w->q[e] = (float)kvt_bench_normal(&w->rng);
		for (unsigned sess = 0; sess < o->sessions; sess++) {
			struct kvt_client_session_params p;
			struct kvt_client_session_info info;
			char name[96];
			session_name(name, sizeof(name), i, sess);
			kvt_client_session_params_init(&p, name, o->layers, o->heads, o->head_dim,
						       KVT_CLIENT_DTYPE_F16);
			p.codec.scheme = scheme_wire(o->scheme);
			if (p.codec.scheme != KVT_CLIENT_SCHEME_NONE) {
				p.codec.key_bits = p.codec.value_bits = o->bits;
				p.codec.n_sinks = (int32_t)o->sinks;
			}
			p.codec.group = o->group;
			p.codec.chunk_tokens = o->chunk_tokens;
			if (kvt_client_open(w->kc, &p, &info, &st)) {
				fprintf(stderr, "kvtier-bench service: open %s: %s %s\n", name,
					kvt_client_code_name(st.code), st.message);
				return -1;
			}
		}
	}
	return 0;
}

static void teardown_workers(struct svc *s)
{
	for (unsigned i = 0; i < s->o.threads; i++) {
		struct worker *w = &s->w[i];
		for (unsigned sess = 0; sess < s->o.sessions && w->kc; sess++) {
			char name[96];
			session_name(name, sizeof(name), i, sess);
			kvt_client_drop(w->kc, name, NULL, NULL);
		}
		if (w->kc)
			kvt_client_close(w->kc);
		if (w->rc)
			redisFree(w->rc);
		free(w->k);
		free(w->v);
		free(w->fk);
		free(w->fv);
		free(w->rbuf);
		free(w->q);
		free(w->out);
		free(w->lat.us);
	}
}

/* Checks the loaded data through the daemon: the token count, and for scheme none the bytes. */
/* Redis' RSS growth over kvtierd's (NAN when kvtierd did not grow). */
static double growth_ratio(long redis, long redis0, long kv, long kv0)
{
	return kv - kv0 > 0 ? (double)(redis - redis0) / (double)(kv - kv0) : NAN;
}

/* The fields the memory rows share: the data set, kvtierd's accounting and RSS growth, and
 * Redis' growth with the ratio (when Redis runs). */
static void memory_fields(struct kvt_bench_json *j, double logical, uint64_t bytes_held,
			  long kv, long kv0, int redis_on, long redis, long redis0)
{
	kvt_bench_json_num(j, "logical_bytes", logical);
	kvt_bench_json_int(j, "kvtierd_bytes_held", (long long)bytes_held);
	kvt_bench_json_int(j, "kvtierd_rss_bytes", kv);
	kvt_bench_json_int(j, "kvtierd_rss_delta_bytes", kv - kv0);
	if (redis_on) {
		kvt_bench_json_int(j, "redis_rss_bytes", redis);
		kvt_bench_json_int(j, "redis_rss_delta_bytes", redis - redis0);
		kvt_bench_json_num(j, "ratio_vs_redis", growth_ratio(redis, redis0, kv, kv0));
	}
}

static int verify_load(struct svc *s)
{
	const struct svc_opts *o = &s->o;
	struct worker *w = &s->w[0];
	struct kvt_client_session_info info;
	struct kvt_client_status st;
	char name[96];
	session_name(name, sizeof(name), 0, 0);
	if (kvt_client_stat(w->kc, name, &info, &st)) {
		fprintf(stderr, "kvtier-bench service: stat %s: %s\n", name, st.message);
		return -1;
	}
	s->sealed_chunks = info.n_chunks;
	if (info.n_chunks == 0 || info.n_chunks > o->session_tokens / o->chunk_tokens) {
		fprintf(stderr, "kvtier-bench service: %s has %u sealed chunks (expected 1..%u)\n",
			name, info.n_chunks, o->session_tokens / o->chunk_tokens);
		return -1;
	}
	if (info.n_tokens != o->session_tokens) {
		fprintf(stderr, "kvtier-bench service: %s holds %llu tokens, not %u\n", name,
			(unsigned long long)info.n_tokens, o->session_tokens);
		return -1;
	}
	{
		/* the default fetch (local decode) returns the Fetch RPC's bytes (a batch that
		 * straddles the sealed chunks and the tail when there is one) */
		struct kvt_client_fetch_range r;
		struct kvt_client_fetch_result fr;
		size_t n = s->batch_bytes;
		uint8_t *k2 = kvt_bench_alloc(n), *v2 = kvt_bench_alloc(n);
		kvt_client_fetch_range_init(&r);
		r.token_end = o->session_tokens;
		r.token_begin = r.token_end - o->tokens;
		r.layer_end = o->layers;
		r.dtype = KVT_CLIENT_DTYPE_F16;
		r.decode_local = KVT_CLIENT_FETCH_SERVER;
		int bad = kvt_client_fetch(w->kc, name, &r, w->fk, n, w->fv, n, &fr, &st);
		r.decode_local = KVT_CLIENT_FETCH_LOCAL;
		bad = bad || kvt_client_fetch(w->kc, name, &r, k2, n, v2, n, &fr, &st) ||
		      fr.k_bytes != n || memcmp(w->fk, k2, n) || memcmp(w->fv, v2, n);
		free(k2);
		free(v2);
		if (bad) {
			fprintf(stderr, "kvtier-bench service: the local-decode fetch differs from "
					"Fetch: %s\n", st.message);
			return -1;
		}
	}
	if (!strcmp(o->scheme, "none")) {
		struct kvt_client_fetch_range r;
		struct kvt_client_fetch_result fr;
		kvt_client_fetch_range_init(&r);
		r.token_end = o->tokens;
		if (kvt_client_fetch(w->kc, name, &r, w->fk, s->batch_bytes, w->fv, s->batch_bytes,
				     &fr, &st) ||
		    memcmp(w->fk, w->k, s->batch_bytes) || memcmp(w->fv, w->v, s->batch_bytes)) {
			fprintf(stderr, "kvtier-bench service: scheme none fetch differs from what "
					"was appended\n");
			return -1;
		}
	}
	return 0;
}

int kvt_bench_service(int argc, char **argv)
{
	static struct svc s;
	int rc;
	memset(&s, 0, sizeof(s));
	if ((rc = parse(&s.o, argc, argv)))
		return rc;
	const struct svc_opts *o = &s.o;
	if (!scheme_wire(o->scheme)) {
		fprintf(stderr, "kvtier-bench service: --scheme %s is not none, kivi, hadamard, "
				"oscar\n", o->scheme);
		return 2;
	}
	s.shape = (struct kvt_client_shape){o->layers, o->heads, o->head_dim, KVT_CLIENT_DTYPE_F16};
	s.batch_bytes = (size_t)o->layers * o->tokens * o->heads * o->head_dim * 2;
	s.batches_per_session = o->session_tokens / o->tokens;
	s.fetch_batches = 1;
	rc = 1;
	if (start_servers(&s))
		goto out;
	long kv_rss0 = vm_rss_bytes(s.kv_pid);
	long redis_rss0 = o->redis ? vm_rss_bytes(s.redis_child) : -1;
	if (setup_workers(&s))
		goto out;

	struct measured app, set = {0};
	run_load(&s, &app, &set);
	report(&s, "append", &app, o->redis ? &set : NULL, "redis SET of the batch's f16 K+V", 0.7);
	if (!app.ok || (o->redis && !set.ok) || verify_load(&s))
		goto out;

	/* memory: both servers hold the same data set now */
	struct kvt_client_stats stats;
	struct kvt_client_status st;
	memset(&stats, 0, sizeof(stats));
	if (kvt_client_stats(s.w[0].kc, &stats, &st)) {
		fprintf(stderr, "kvtier-bench service: stats: %s\n", st.message);
		goto out;
	}
	double logical = 2.0 * o->threads * o->sessions * o->session_tokens * o->layers * o->heads *
			 o->head_dim * 2;
	long kv_rss = vm_rss_bytes(s.kv_pid), redis_rss = o->redis ? vm_rss_bytes(s.redis_child) : -1;
	struct kvt_bench_json j;
	common_fields(&j, &s, "memory");
	memory_fields(&j, logical, stats.bytes_held, kv_rss, kv_rss0, o->redis, redis_rss,
		      redis_rss0);
	kvt_bench_json_str(&j, "codec_isa", stats.codec_isa);
	kvt_bench_json_str(&j, "reference", "redis-server RSS holding the same f16 bytes");
	if (o->redis) {
		double ratio = growth_ratio(redis_rss, redis_rss0, kv_rss, kv_rss0);
		kvt_bench_json_num(&j, "target_ratio", 4.5);
		kvt_bench_json_bool(&j, "meets_target", ratio >= 4.5);
		/* Beside the measured ratio (not instead of it): how much the kvtierd RSS
		 * sample moves when taken again after the load settles (5 samples 0.2 s apart),
		 * and Redis' growth over the daemon's own byte accounting. */
		long lo = kv_rss, hi = kv_rss;
		for (int i = 0; i < 5; i++) {
			struct timespec ts = {0, 200 * 1000 * 1000};
			nanosleep(&ts, NULL);
			long x = vm_rss_bytes(s.kv_pid);
			lo = x < lo ? x : lo;
			hi = x > hi ? x : hi;
		}
		kvt_bench_json_int(&j, "kvtierd_rss_delta_settled_min_bytes", lo - kv_rss0);
		kvt_bench_json_int(&j, "kvtierd_rss_delta_settled_max_bytes", hi - kv_rss0);
		kvt_bench_json_num(&j, "ratio_vs_redis_settled_min",
				   growth_ratio(redis_rss, redis_rss0, hi, kv_rss0));
		kvt_bench_json_num(&j, "ratio_vs_redis_settled_max",
				   growth_ratio(redis_rss, redis_rss0, lo, kv_rss0));
		kvt_bench_json_num(&j, "ratio_redis_rss_vs_bytes_held",
				   stats.bytes_held ? (double)(redis_rss - redis_rss0) /
							      (double)stats.bytes_held
						    : NAN);
		kvt_bench_json_int(&j, "kvtierd_rss_baseline_bytes", kv_rss0);
	}
	kvt_bench_json_end(&j);
	int tokens_ok = stats.tokens >= (uint64_t)o->threads * o->sessions * o->session_tokens;
	kvt_client_stats_free(&stats);
	if (!tokens_ok) {
		fprintf(stderr, "kvtier-bench service: Stats counts fewer tokens than were loaded\n");
		goto out;
	}

	struct measured get = {0}, get_s = {0}, get_r = {0}, get_e = {0}, restore = {0};
	struct measured fetch = {0}, fenc = {0}, att = {0};
	fetch.ok = fenc.ok = att.ok = get.ok = get_s.ok = get_e.ok = 1;
	s.fetch_batches = 1;
	if (wanted(&s, "fetch")) {
		run_pair(&s, W_FETCH, W_REDIS_GET, &fetch, &get);
		report(&s, "fetch", &fetch, o->redis ? &get : NULL,
		       "redis GET of the batch's f16 K+V", 1.0);
	}
	struct measured local = {0}, get_l = {0};
	local.ok = get_l.ok = 1;
	if (wanted(&s, "fetch_rpc")) {
		run_pair(&s, W_FETCH_RPC, W_REDIS_GET, &local, &get_l);
		report(&s, "fetch_rpc", &local, o->redis ? &get_l : NULL,
		       "redis GET of the batch's f16 K+V", 1.0);
	}
	restore.ok = 1;
	get_r.ok = 1;
	if (o->restore_tokens && wanted(&s, "fetch_restore")) {
		s.fetch_batches = o->restore_tokens / o->tokens;
		run_pair(&s, W_FETCH, W_REDIS_GET, &restore, &get_r);
		report(&s, "fetch_restore", &restore, o->redis ? &get_r : NULL,
		       "redis GET of the same batches' f16 K+V, pipelined", 1.0);
		s.fetch_batches = 1;
	}
	if (wanted(&s, "fetch_encoded")) {
		run_pair(&s, W_FETCH_ENCODED, W_REDIS_GET, &fenc, &get_e);
		report(&s, "fetch_encoded", &fenc, o->redis ? &get_e : NULL,
		       "redis GET of the same tokens' f16 K+V (logical bytes)", 3.0);
	}
	if (wanted(&s, "attend")) {
		run_pair(&s, W_ATTEND, W_REDIS_GET_SESSION, &att, &get_s);
		report(&s, "attend", &att, o->redis ? &get_s : NULL,
		       "redis GET of the whole session's f16 K+V (logical bytes attended)", 0);
	}
	{
		/* The memory row again after the read workloads (informational, no target): the
		 * same data set, so a difference from the memory row is RSS the daemon's
		 * allocator holds beyond its own accounting (bytes_held), not stored data. */
		struct kvt_client_stats st2;
		struct kvt_client_status sst;
		memset(&st2, 0, sizeof(st2));
		if (kvt_client_stats(s.w[0].kc, &st2, &sst) == 0) {
			long kv_end = vm_rss_bytes(s.kv_pid);
			long redis_end = o->redis ? vm_rss_bytes(s.redis_child) : -1;
			struct kvt_bench_json jm;
			common_fields(&jm, &s, "memory_after_reads");
			memory_fields(&jm, logical, st2.bytes_held, kv_end, kv_rss0, o->redis,
				      redis_end, redis_rss0);
			kvt_bench_json_end(&jm);
			kvt_client_stats_free(&st2);
		}
	}
	rc = fetch.ok && local.ok && restore.ok && fenc.ok && att.ok &&
			     (!o->redis || (get.ok && get_s.ok && get_r.ok && get_e.ok && get_l.ok))
		     ? 0
		     : 1;
out:
	teardown_workers(&s);
	stop_servers(&s);
	return rc;
}

/*
 * test_fault.c - faults against a real kvtierd (ctest label `fault`). The standard: a fault
 * loses no acknowledged data that the design promises to keep and never serves corrupt KV.
 * The host tier is volatile by design (no NVMe tier, warm restart or crash recovery yet), so
 * a killed daemon keeps nothing; everything else must hold.
 *
 *  1. A client process SIGKILLed in the middle of a large multi-message Append stream: the
 *     session keeps exactly its acknowledged tokens (Fetch byte-equal to the local kvt_seq
 *     reference), the next Append succeeds, the stream's staging is released (host tier
 *     used bytes back to the level before it) and the daemon serves Health.
 *  2. A client process SIGKILLed in the middle of a large Fetch stream (server decode, small
 *     messages): the daemon serves on, its reply pool stays within reply_pool_buffers, and
 *     another client's Fetch is byte-exact.
 *  3. A chunk with one payload byte flipped (header crc kept) offered through StoreEncoded:
 *     INVALID_ARGUMENT naming the crc32c, and nothing changes (a new target session does
 *     not appear, an existing empty one stays empty).
 *  4. The daemon SIGKILLed and restarted on the same socket path: the stale socket file does
 *     not stop it, it serves Health, and the old sessions are gone (NOT_FOUND).
 *
 * The killed clients are child processes that exec this binary in a child mode (no gRPC
 * after fork). "In the middle" is observed on the daemon, never assumed: the parent kills
 * the child once the stream is under way (Append: the host tier's used bytes grew, i.e. the
 * daemon staged data; Fetch: the child's output, a file shared with the parent, got its
 * first block), then waits until the daemon has ended the call and checks that it ended
 * with a code other than OK; a stream that completed before the kill is retried.
 */
#define _GNU_SOURCE
#include "kvt_it.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define L 4
#define H 4
#define D 128
#define DT KVT_DTYPE_F16
#define TOKEN_BYTES ((size_t)L * H * D * 2) /* one token of every layer, K or V */

static struct kvt_daemon g_d;
static struct kvt_client *g_c;
static const char *const g_args[] = { "--max_append_bytes=1GiB", "--reply_pool_buffers=8",
				      NULL };

/* ---- small helpers ---------------------------------------------------------------------- */

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The pause between two polls of a bounded wait (each wait re-checks its condition). */
static void poll_pause(void)
{
	struct timespec ts = { 0, 2 * 1000 * 1000 };
	nanosleep(&ts, NULL);
}

/* Calls of one method the daemon has ended, all codes (*ok: those that ended OK). */
static uint64_t method_calls(struct kvt_client *c, const char *method, uint64_t *ok)
{
	struct kvt_client_stats s;
	struct kvt_client_status st;
	char prefix[64], okname[80];
	uint64_t n = 0;
	*ok = UINT64_MAX;
	if (kvt_client_stats(c, &s, &st))
		return UINT64_MAX;
	snprintf(prefix, sizeof prefix, "rpc.%s.", method);
	snprintf(okname, sizeof okname, "rpc.%s.OK", method);
	for (size_t i = 0; i < s.n_counters; i++)
		if (strncmp(s.counters[i].name, prefix, strlen(prefix)) == 0)
			n += s.counters[i].value;
	*ok = kvt_client_stats_counter(&s, okname);
	kvt_client_stats_free(&s);
	return n;
}

static void print_method_counters(struct kvt_client *c, const char *method)
{
	struct kvt_client_stats s;
	struct kvt_client_status st;
	char prefix[64];
	if (kvt_client_stats(c, &s, &st))
		return;
	snprintf(prefix, sizeof prefix, "rpc.%s.", method);
	for (size_t i = 0; i < s.n_counters; i++)
		if (strncmp(s.counters[i].name, prefix, strlen(prefix)) == 0)
			printf("#   %s = %llu\n", s.counters[i].name,
			       (unsigned long long)s.counters[i].value);
	kvt_client_stats_free(&s);
}

static int serving(struct kvt_client *c)
{
	struct kvt_client_status st;
	int sv = 0;
	if (kvt_client_health(c, "", 5000, &sv, &st)) {
		printf("# health: %s %s\n", kvt_client_code_name(st.code), st.message);
		return 0;
	}
	return sv == 1;
}

/* Forks and execs this binary with argv (argv[0] is replaced); the child uses gRPC only
 * after exec. */
static pid_t spawn_child(const char **argv)
{
	char self[512];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n <= 0)
		return -1;
	self[n] = '\0';
	argv[0] = self;
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		execv(self, (char *const *)argv);
		_exit(127);
	}
	return pid;
}

/* SIGKILL and reap; 1 when the child died by that signal (not before it on its own). */
static int kill_child(pid_t pid)
{
	int status = 0;
	kill(pid, SIGKILL);
	if (waitpid(pid, &status, 0) != pid)
		return 0;
	return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
}

static int child_exited(pid_t pid)
{
	int status;
	return waitpid(pid, &status, WNOHANG) == pid;
}

/* Waits (bounded) until the daemon has ended one more call of method than `before`; returns
 * 1 when that call ended OK, 0 when it ended with another code, -1 on timeout. */
static int wait_call_end(const char *method, uint64_t before, uint64_t ok_before)
{
	uint64_t deadline = now_ms() + 15000, ok = 0, n = 0;
	while (now_ms() < deadline) {
		n = method_calls(g_c, method, &ok);
		if (n != UINT64_MAX && n > before)
			return ok > ok_before ? 1 : 0;
		poll_pause();
	}
	printf("# the daemon did not end the killed %s call within 15 s (calls %llu, before %llu)\n",
	       method, (unsigned long long)n, (unsigned long long)before);
	return -1;
}

struct it_session {
	char id[64];
	struct kvt_client_session_info info;
	struct kvt_seq *ref;
};

static int open_session(struct it_session *s, const char *id)
{
	struct kvt_client_session_params p;
	struct kvt_client_status st;
	struct kvt_codec_config cfg;
	char err[256];

	memset(s, 0, sizeof *s);
	snprintf(s->id, sizeof s->id, "%s", id);
	kvt_client_session_params_init(&p, s->id, L, H, D, DT);
	if (kvt_client_open(g_c, &p, &s->info, &st)) {
		printf("# open %s: %s %s\n", id, kvt_client_code_name(st.code), st.message);
		return -1;
	}
	it_config_from_info(&s->info, &cfg);
	if (kvt_seq_create(&cfg, NULL, &s->ref, err, sizeof err)) {
		printf("# kvt_seq_create: %s\n", err);
		return -1;
	}
	return 0;
}

static void close_session(struct it_session *s)
{
	struct kvt_client_status st;
	kvt_client_drop(g_c, s->id, NULL, &st);
	kvt_seq_destroy(s->ref);
	s->ref = NULL;
}

/* Appends n fresh tokens to the daemon session (guarded by the reference's length) and, once
 * acknowledged, to the local reference. */
static int append_both(struct it_session *s, uint32_t n)
{
	struct kvt_client_shape sh = it_shape(&s->info);
	size_t bytes = kvt_client_kv_bytes(&sh, n);
	void *k = it_xmalloc(bytes), *v = it_xmalloc(bytes);
	struct kvt_client_append_opts o;
	struct kvt_client_append_result res;
	struct kvt_client_status st;
	char err[256];
	int rc;

	kvt_client_append_opts_init(&o);
	o.token_begin = kvt_seq_tokens(s->ref);
	it_gen_kv(L, H, D, DT, kvt_seq_tokens(s->ref), n, k, v);
	rc = kvt_client_append(g_c, s->id, &sh, k, v, n, &o, &res, &st);
	if (rc) {
		printf("# append %u to %s: %s %s\n", n, s->id, kvt_client_code_name(st.code),
		       st.message);
		goto out;
	}
	rc = kvt_seq_append(s->ref, k, v, n, err, sizeof err);
	if (rc)
		printf("# local append: %s\n", err);
	else if (res.n_tokens != kvt_seq_tokens(s->ref))
		rc = -EPROTO;
out:
	free(k);
	free(v);
	return rc;
}

static int stat_matches(struct it_session *s)
{
	struct kvt_client_session_info i;
	struct kvt_client_status st;
	if (kvt_client_stat(g_c, s->id, &i, &st)) {
		printf("# stat %s: %s %s\n", s->id, kvt_client_code_name(st.code), st.message);
		return 0;
	}
	if (i.n_tokens != kvt_seq_tokens(s->ref) || i.n_chunks != kvt_seq_n_chunks(s->ref) ||
	    i.tail_tokens != kvt_seq_tail_tokens(s->ref)) {
		printf("# stat %s: tokens %llu chunks %u tail %u; acknowledged %llu %u %u\n", s->id,
		       (unsigned long long)i.n_tokens, i.n_chunks, i.tail_tokens,
		       (unsigned long long)kvt_seq_tokens(s->ref), kvt_seq_n_chunks(s->ref),
		       kvt_seq_tail_tokens(s->ref));
		return 0;
	}
	return 1;
}

static int whole_fetch_equals(struct kvt_client *c, struct it_session *s)
{
	return it_fetch_equals(c, s->id, s->ref, 0, kvt_seq_tokens(s->ref), 0, L, DT);
}

/* ---- child modes (run after exec) ------------------------------------------------------- */

static struct kvt_client *child_connect(const char *target)
{
	struct kvt_client_options o = { 0 };
	struct kvt_client_status st;
	struct kvt_client *c = NULL;
	o.target = target;
	o.connect_timeout_ms = 5000;
	o.own_connection = 1;
	if (kvt_client_connect(&o, &c, &st)) {
		printf("# child connect: %s\n", st.message);
		return NULL;
	}
	return c;
}

/* --child-append TARGET SESSION N_TOKENS TOKEN_BEGIN MESSAGE_BYTES: one Append stream of
 * N_TOKENS tokens (a 64-token block tiled) in messages below MESSAGE_BYTES. */
static int child_append(char **argv)
{
	struct kvt_client *c = child_connect(argv[2]);
	uint32_t n = (uint32_t)strtoul(argv[4], NULL, 0);
	struct kvt_client_shape sh = { L, H, D, DT };
	struct kvt_client_append_opts o;
	struct kvt_client_status st;
	size_t row = (size_t)H * D * 2, blk = 64 * row;
	uint8_t *k, *v, *bk = it_xmalloc(L * blk), *bv = it_xmalloc(L * blk);
	if (!c)
		return 3;
	k = it_xmalloc((size_t)n * TOKEN_BYTES);
	v = it_xmalloc((size_t)n * TOKEN_BYTES);
	it_seed(99);
	it_gen_kv(L, H, D, DT, 1000, 64, bk, bv);
	for (uint32_t l = 0; l < L; l++)
		for (uint32_t t = 0; t < n; t += 64) {
			size_t m = (n - t < 64 ? n - t : 64) * row;
			memcpy(k + ((size_t)l * n + t) * row, bk + l * blk, m);
			memcpy(v + ((size_t)l * n + t) * row, bv + l * blk, m);
		}
	kvt_client_append_opts_init(&o);
	o.token_begin = strtoull(argv[5], NULL, 0);
	o.max_message_bytes = (uint32_t)strtoul(argv[6], NULL, 0);
	int rc = kvt_client_append(c, argv[3], &sh, k, v, n, &o, NULL, &st);
	printf("# child append returned %d %s\n", rc, st.message);
	kvt_client_close(c);
	return rc ? 2 : 0;
}

/* --child-fetch TARGET SESSION OUT_PATH MESSAGE_BYTES: Fetch of the whole session (daemon
 * decode) in messages below MESSAGE_BYTES, K then V written into the file OUT_PATH (mapped
 * shared, so the parent sees each block land). */
static int child_fetch(char **argv)
{
	struct kvt_client *c = child_connect(argv[2]);
	struct kvt_client_session_info i;
	struct kvt_client_status st;
	struct kvt_client_fetch_range r;
	if (!c || kvt_client_stat(c, argv[3], &i, &st))
		return 3;
	size_t bytes = (size_t)i.n_tokens * TOKEN_BYTES;
	int fd = open(argv[4], O_RDWR);
	if (fd < 0)
		return 3;
	uint8_t *m = mmap(NULL, 2 * bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		return 3;
	kvt_client_fetch_range_init(&r);
	r.token_end = i.n_tokens;
	r.layer_end = L;
	r.dtype = DT;
	r.decode_local = KVT_CLIENT_FETCH_SERVER;
	r.max_message_bytes = (uint32_t)strtoul(argv[5], NULL, 0);
	int rc = kvt_client_fetch(c, argv[3], &r, m, bytes, m + bytes, bytes, NULL, &st);
	printf("# child fetch returned %d %s\n", rc, st.message);
	kvt_client_close(c);
	return rc ? 2 : 0;
}

/* ---- 1. client killed mid-Append ------------------------------------------------------- */

static void test_client_killed_mid_append(void)
{
	struct it_session s = { 0 };
	struct kvt_client_status st;
	uint32_t n_stream = 16384; /* 128 MiB of K+V, 2048 messages of 64 KiB */
	int confirmed = 0;

	for (int attempt = 0; attempt < 3 && !confirmed; attempt++) {
		char nbuf[32], tbuf[32];
		uint64_t ok0, calls0, base, used = 0, deadline;
		int started = 0;

		KVT_REQUIRE(open_session(&s, "fault-append") == 0, "open");
		/* two acknowledged appends, the second leaving a tail (not chunk-aligned) */
		KVT_REQUIRE(append_both(&s, 1024) == 0, "append 1");
		KVT_REQUIRE(append_both(&s, 300) == 0, "append 2");
		base = it_tier_used(g_c, "host", NULL);
		calls0 = method_calls(g_c, "Append", &ok0);
		KVT_REQUIRE(base != UINT64_MAX && calls0 != UINT64_MAX, "stats");

		snprintf(nbuf, sizeof nbuf, "%u", n_stream);
		snprintf(tbuf, sizeof tbuf, "%llu", (unsigned long long)kvt_seq_tokens(s.ref));
		const char *argv[] = { NULL, "--child-append", g_d.target, s.id, nbuf, tbuf,
				       "65536", NULL };
		pid_t pid = spawn_child(argv);
		KVT_REQUIRE(pid > 0, "fork");
		/* under way: the daemon has staged part of the stream */
		deadline = now_ms() + 20000;
		while (now_ms() < deadline && !child_exited(pid)) {
			used = it_tier_used(g_c, "host", NULL);
			if (used != UINT64_MAX && used > base) {
				started = 1;
				break;
			}
			poll_pause();
		}
		int killed = started && kill_child(pid);
		if (!started) {
			kill_child(pid);
			printf("# attempt %d: the stream was not seen staging (used %llu, before %llu)\n",
			       attempt, (unsigned long long)used, (unsigned long long)base);
		}
		int end = wait_call_end("Append", calls0, ok0);
		KVT_REQUIRE(end >= 0, "the daemon ends the killed Append call");
		if (!killed || end == 1) {
			printf("# attempt %d: the %u-token stream completed before the kill; retrying "
			       "with a longer one\n", attempt, n_stream);
			close_session(&s);
			n_stream = 32768;
			continue;
		}
		confirmed = 1;
		printf("# killed the Append child mid-stream (host used %llu > %llu before)\n",
		       (unsigned long long)used, (unsigned long long)base);
		print_method_counters(g_c, "Append");

		/* acknowledged data kept, nothing of the killed stream */
		KVT_CHECK(stat_matches(&s), "token count == acknowledged");
		KVT_CHECK(whole_fetch_equals(g_c, &s), "fetch == reference");
		/* the staging is released (bounded wait: freed when the call is cleaned up) */
		deadline = now_ms() + 10000;
		while (now_ms() < deadline && (used = it_tier_used(g_c, "host", NULL)) != base)
			poll_pause();
		KVT_CHECK(used == base, "host used %llu returns to %llu", (unsigned long long)used,
			  (unsigned long long)base);
		/* the session takes new data, guarded by the acknowledged length */
		KVT_CHECK(append_both(&s, 200) == 0, "append after the kill");
		KVT_CHECK(stat_matches(&s), "stat after the new append");
		KVT_CHECK(whole_fetch_equals(g_c, &s), "fetch after the new append");
		KVT_CHECK(serving(g_c), "health SERVING");
		close_session(&s);
	}
	KVT_CHECK(confirmed, "an Append stream was killed mid-stream in 3 attempts");
	(void)st;
}

/* ---- 2. client killed mid-Fetch -------------------------------------------------------- */

static void test_client_killed_mid_fetch(void)
{
	struct it_session s;
	char path[400];
	const uint32_t n_tok = 4096; /* 16 MiB each of K and V, ~4000 messages of 8 KiB */
	size_t bytes = (size_t)n_tok * TOKEN_BYTES;
	int confirmed = 0;

	KVT_REQUIRE(open_session(&s, "fault-fetch") == 0, "open");
	for (int i = 0; i < 4; i++)
		KVT_REQUIRE(append_both(&s, n_tok / 4) == 0, "append");
	snprintf(path, sizeof path, "%s/fetch.out", g_d.dir);

	for (int attempt = 0; attempt < 6 && confirmed < 2; attempt++) {
		uint64_t ok0, calls0 = method_calls(g_c, "Fetch", &ok0), deadline;
		int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600), started = 0;
		KVT_REQUIRE(fd >= 0 && ftruncate(fd, (off_t)(2 * bytes)) == 0, "output file");
		const volatile uint8_t *m = mmap(NULL, 2 * bytes, PROT_READ, MAP_SHARED, fd, 0);
		close(fd);
		KVT_REQUIRE(m != MAP_FAILED, "mmap");
		const char *argv[] = { NULL, "--child-fetch", g_d.target, s.id, path, "8192", NULL };
		pid_t pid = spawn_child(argv);
		KVT_REQUIRE(pid > 0, "fork");
		/* under way: the first block (layer 0, token 0 onward) has landed */
		deadline = now_ms() + 20000;
		while (!started && now_ms() < deadline && !child_exited(pid)) {
			for (size_t i = 0; i < 4096 && !started; i++)
				started = m[i] != 0;
			if (!started)
				poll_pause();
		}
		int killed = started && kill_child(pid);
		if (!started)
			kill_child(pid);
		munmap((void *)m, 2 * bytes);
		int end = wait_call_end("Fetch", calls0, ok0);
		KVT_REQUIRE(end >= 0, "the daemon ends the killed Fetch call");
		if (!killed || end == 1) {
			printf("# attempt %d: the Fetch completed before the kill\n", attempt);
			continue;
		}
		confirmed++;
	}
	KVT_CHECK(confirmed == 2, "two Fetch streams killed mid-stream (%d)", confirmed);
	print_method_counters(g_c, "Fetch");
	KVT_CHECK(serving(g_c), "health SERVING");
	uint64_t resident = it_counter(g_c, "rpc.reply_pool_resident");
	KVT_CHECK(resident <= 8, "reply pool resident %llu <= reply_pool_buffers 8",
		  (unsigned long long)resident);
	/* another client (its own connection) reads the session exactly */
	struct kvt_client *other = NULL;
	struct kvt_client_options o = { 0 };
	struct kvt_client_status st;
	o.target = g_d.target;
	o.own_connection = 1;
	KVT_REQUIRE(kvt_client_connect(&o, &other, &st) == 0, "connect: %s", st.message);
	KVT_CHECK(whole_fetch_equals(other, &s), "other client's fetch == reference");
	kvt_client_close(other);
	KVT_CHECK(stat_matches(&s), "session unchanged");
	close_session(&s);
}

/* ---- 3. a corrupt chunk through StoreEncoded ------------------------------------------- */

static void test_store_encoded_corrupt_chunk(void)
{
	struct it_session s, empty;
	struct kvt_client_encoded *enc = NULL;
	struct kvt_client_session_params p;
	struct kvt_client_session_info before, after, i;
	struct kvt_client_stats s0, s1;
	struct kvt_client_status st;
	int rc;

	KVT_REQUIRE(open_session(&s, "fault-store-src") == 0, "open");
	KVT_REQUIRE(append_both(&s, 1000) == 0, "append");
	KVT_REQUIRE(open_session(&empty, "fault-store-empty") == 0, "open");
	KVT_REQUIRE(kvt_client_fetch_encoded(g_c, s.id, 0, KVT_CLIENT_ALL_CHUNKS, 1, &enc, &st) == 0,
		    "fetch_encoded: %s", st.message);
	KVT_REQUIRE(enc->n_chunks >= 2, "%zu chunks", enc->n_chunks);
	/* one payload byte of the last chunk (past the 64-byte header), crc left as it was */
	struct kvt_client_encoded_chunk *ch = &enc->chunks[enc->n_chunks - 1];
	size_t at = KVT_CHUNK_HEADER_BYTES + it_rand_below((uint32_t)(ch->n_bytes -
								    KVT_CHUNK_HEADER_BYTES));
	uint8_t bit = (uint8_t)(1u << it_rand_below(8));
	printf("# flipping bit 0x%02x of byte %zu of chunk %u (%zu bytes)\n", bit, at,
	       ch->chunk_index, ch->n_bytes);
	ch->bytes[at] ^= bit;

	KVT_REQUIRE(kvt_client_stats(g_c, &s0, &st) == 0, "stats");
	KVT_REQUIRE(kvt_client_stat(g_c, empty.id, &before, &st) == 0, "stat");
	for (int target = 0; target < 2; target++) {
		const char *id = target ? empty.id : "fault-store-new";
		kvt_client_session_params_init(&p, id, L, H, D, DT);
		p.codec = enc->info.codec;
		rc = kvt_client_store_encoded(g_c, &p, enc, NULL, &st);
		KVT_CHECK(rc != 0 && st.code == KVT_CODE_INVALID_ARGUMENT && !st.local,
			  "store into %s: rc %d, %s (want INVALID_ARGUMENT from the daemon)", id, rc,
			  kvt_client_code_name(st.code));
		KVT_CHECK(strstr(st.message, "crc32c") != NULL, "message names the crc: %s",
			  st.message);
	}
	/* nothing changed: the new id does not exist, the empty session is still empty */
	rc = kvt_client_stat(g_c, "fault-store-new", &i, &st);
	KVT_CHECK(rc != 0 && st.code == KVT_CODE_NOT_FOUND, "fault-store-new: %s",
		  kvt_client_code_name(st.code));
	KVT_CHECK(kvt_client_stat(g_c, empty.id, &after, &st) == 0 && it_same_state(&before, &after) &&
			  after.n_tokens == 0,
		  "empty target unchanged (tokens %llu)", (unsigned long long)after.n_tokens);
	KVT_REQUIRE(kvt_client_stats(g_c, &s1, &st) == 0, "stats");
	KVT_CHECK(s0.sessions == s1.sessions && s0.tokens == s1.tokens &&
			  s0.bytes_held == s1.bytes_held,
		  "daemon totals unchanged: sessions %llu/%llu tokens %llu/%llu",
		  (unsigned long long)s0.sessions, (unsigned long long)s1.sessions,
		  (unsigned long long)s0.tokens, (unsigned long long)s1.tokens);
	kvt_client_stats_free(&s0);
	kvt_client_stats_free(&s1);
	KVT_CHECK(whole_fetch_equals(g_c, &s), "source unchanged");

	/* the same stream with the byte restored is accepted and reads back exactly: the flip
	 * was the only fault */
	ch->bytes[at] ^= bit;
	kvt_client_session_params_init(&p, empty.id, L, H, D, DT);
	p.codec = enc->info.codec;
	KVT_CHECK(kvt_client_store_encoded(g_c, &p, enc, NULL, &st) == 0, "store intact: %s",
		  st.message);
	KVT_CHECK(it_fetch_equals(g_c, empty.id, s.ref, 0, kvt_seq_tokens(s.ref), 0, L, DT),
		  "stored copy == reference");
	kvt_client_encoded_free(enc);
	close_session(&s);
	close_session(&empty);
}

/* ---- 4. daemon killed and restarted ----------------------------------------------------- */

static void test_daemon_killed_restarted(void)
{
	struct it_session s;
	struct kvt_client_status st;
	struct kvt_client_session_info i;
	struct stat sb;

	KVT_REQUIRE(open_session(&s, "fault-volatile") == 0, "open");
	KVT_REQUIRE(append_both(&s, 500) == 0, "append");
	kvt_client_close(g_c);
	g_c = NULL;
	KVT_REQUIRE(kvt_daemon_kill(&g_d) == 0, "daemon died by SIGKILL");
	KVT_CHECK(stat(g_d.socket_path, &sb) == 0 && S_ISSOCK(sb.st_mode),
		  "the dead daemon's socket file is left behind");
	KVT_REQUIRE(kvt_daemon_restart(&g_d, g_args) == 0, "restart on the same socket");
	KVT_REQUIRE(kvt_daemon_client(&g_d, 0, &g_c) == 0, "connect");
	KVT_CHECK(serving(g_c), "health SERVING");
	/* volatile by design until the NVMe tier: the old session is gone */
	int rc = kvt_client_stat(g_c, s.id, &i, &st);
	KVT_CHECK(rc != 0 && st.code == KVT_CODE_NOT_FOUND, "old session: %s",
		  kvt_client_code_name(st.code));
	KVT_CHECK(it_counter(g_c, "sessions.evicted") == 0, "fresh counters");
	struct kvt_client_stats ss;
	KVT_REQUIRE(kvt_client_stats(g_c, &ss, &st) == 0, "stats");
	KVT_CHECK(ss.sessions == 0 && ss.tokens == 0, "no sessions after restart (%llu)",
		  (unsigned long long)ss.sessions);
	kvt_client_stats_free(&ss);
	/* the new daemon takes data */
	kvt_seq_destroy(s.ref);
	KVT_REQUIRE(open_session(&s, "fault-volatile") == 0, "reopen");
	KVT_CHECK(append_both(&s, 300) == 0, "append");
	KVT_CHECK(whole_fetch_equals(g_c, &s), "fetch == reference");
	close_session(&s);
}

int main(int argc, char **argv)
{
	if (argc == 7 && strcmp(argv[1], "--child-append") == 0)
		return child_append(argv);
	if (argc == 6 && strcmp(argv[1], "--child-fetch") == 0)
		return child_fetch(argv);
	signal(SIGPIPE, SIG_IGN);
	kvt_test_init();
	it_seed(0);
	if (kvt_daemon_start_client(&g_d, g_args, &g_c) != 0)
		return 1;
	KVT_RUN(test_client_killed_mid_append);
	KVT_RUN(test_client_killed_mid_fetch);
	KVT_RUN(test_store_encoded_corrupt_chunk);
	KVT_RUN(test_daemon_killed_restarted);
	if (g_c)
		kvt_client_close(g_c);
	KVT_CHECK(kvt_daemon_stop(&g_d) == 0, "daemon exit 0 after SIGTERM");
	return kvt_test_done();
}

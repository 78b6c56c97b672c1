/* Unit tests of the session table: open/re-open/conflict, limits, refcounted drop, ordered
 * listing with paging, TTL expiry, capacity reclaim (drop-coldest vs reject), and a
 * many-thread run over shared sessions with the host tier balancing to zero at the end. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_test.h"
#include "session.h"
#include "tier_host.h"

#define L 2
#define H 2
#define D 64

static void shape(struct kvt_codec_config *c)
{
	kvt_codec_config_default(c, L, H, D, KVT_DTYPE_F16);
}

static size_t token_bytes(void)
{
	return (size_t)L * H * D * 2;
}

/* Appends n random tokens; returns the kvt_seq_append result. */
static int append_tokens(struct kvt_session *s, uint32_t n)
{
	size_t b = token_bytes() * n;
	uint16_t *k = malloc(b), *v = malloc(b);
	for (size_t i = 0; i < b / 2; i++) {
		k[i] = (uint16_t)(0x3c00 | kvt_rand_below(0x200));
		v[i] = (uint16_t)(0x3c00 | kvt_rand_below(0x200));
	}
	char err[256];
	kvt_session_lock(s);
	int rc = kvt_seq_append(s->seq, k, v, n, err, sizeof err);
	kvt_session_unlock(s);
	free(k);
	free(v);
	return rc;
}

static void test_open_reopen_conflict(void)
{
	struct kvt_tier_host host;
	struct kvt_sessions t;
	kvt_tier_host_init(&host, 1ull << 30);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	struct kvt_codec_config c;
	shape(&c);
	struct kvt_session *s = NULL, *s2 = NULL;
	int created = 0;
	char err[256] = "";
	KVT_CHECK(kvt_sessions_open(&t, "local", "a", &c, 60, 0, 10, &s, &created, err,
				    sizeof err) == 0 && created,
		  "create: %s", err);
	KVT_CHECK(kvt_sessions_open(&t, "local", "a", &c, 60, 0, 10, &s2, &created, err,
				    sizeof err) == 0 && !created && s2 == s,
		  "re-open returns the same session");
	kvt_session_put(s2);
	struct kvt_codec_config other = c;
	other.head_dim = 128;
	s2 = NULL;
	KVT_CHECK(kvt_sessions_open(&t, "local", "a", &other, 60, 0, 10, &s2, &created, err,
				    sizeof err) == -EEXIST && s2 == NULL,
		  "conflict");
	KVT_CHECK(strstr(err, "head_dim 64") && strstr(err, "128"), "field named: %s", err);
	other = c;
	other.key_bits = 4;
	KVT_CHECK(kvt_sessions_open(&t, "local", "a", &other, 60, 0, 10, &s2, &created, err,
				    sizeof err) == -EEXIST && strstr(err, "key_bits"),
		  "codec conflict: %s", err);
	/* Another tenant has its own namespace. */
	KVT_CHECK(kvt_sessions_open(&t, "other", "a", &other, 60, 0, 10, &s2, &created, err,
				    sizeof err) == 0 && created && s2 != s,
		  "tenants are separate");
	kvt_session_put(s2);
	KVT_CHECK(kvt_sessions_count(&t) == 2, "count %llu",
		  (unsigned long long)kvt_sessions_count(&t));
	/* max_sessions */
	KVT_CHECK(kvt_sessions_open(&t, "local", "b", &c, 60, 0, 2, &s2, &created, err,
				    sizeof err) == -EMFILE && strstr(err, "max_sessions"),
		  "max_sessions: %s", err);
	KVT_CHECK(kvt_sessions_count(&t) == 2, "refused open changed nothing");
	kvt_session_put(s);
	kvt_sessions_destroy(&t);
	KVT_CHECK(host.used_bytes == 0, "host tier back to 0, %llu left",
		  (unsigned long long)host.used_bytes);
}

static void test_drop_while_referenced(void)
{
	struct kvt_tier_host host;
	struct kvt_sessions t;
	kvt_tier_host_init(&host, 1ull << 30);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	struct kvt_codec_config c;
	shape(&c);
	struct kvt_session *s = NULL, *g = NULL;
	int created;
	char err[256];
	KVT_REQUIRE(kvt_sessions_open(&t, "local", "x", &c, 0, 0, 10, &s, &created, err,
				      sizeof err) == 0, "open");
	kvt_session_put(s);
	KVT_REQUIRE(kvt_sessions_get(&t, "local", "x", &g) == 0, "get");
	KVT_CHECK(append_tokens(g, 10) == 0, "append");
	uint64_t held = 0;
	KVT_CHECK(kvt_sessions_drop(&t, "local", "x", &held) == 0 && held > 0, "drop");
	KVT_CHECK(kvt_sessions_get(&t, "local", "x", &s) == -ENOENT, "gone from the table");
	KVT_CHECK(kvt_sessions_drop(&t, "local", "x", NULL) == -ENOENT, "second drop");
	/* The reader still has a valid sequence. */
	kvt_session_lock(g);
	KVT_CHECK(kvt_seq_tokens(g->seq) == 10, "data still readable");
	kvt_session_unlock(g);
	KVT_CHECK(host.used_bytes > 0, "memory kept while referenced");
	kvt_session_put(g);
	KVT_CHECK(host.used_bytes == 0, "freed with the last reference: %llu",
		  (unsigned long long)host.used_bytes);
	kvt_sessions_destroy(&t);
}

static void test_list_paging(void)
{
	struct kvt_tier_host host;
	struct kvt_sessions t;
	kvt_tier_host_init(&host, 1ull << 30);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	struct kvt_codec_config c;
	shape(&c);
	const char *ids[] = {"s03", "x1", "s01", "s10", "s02", "s"};
	for (size_t i = 0; i < 6; i++) {
		struct kvt_session *s;
		int created;
		char err[256];
		KVT_REQUIRE(kvt_sessions_open(&t, "local", ids[i], &c, 0, 0, 100, &s, &created, err,
					      sizeof err) == 0, "open %s", ids[i]);
		kvt_session_put(s);
	}
	const char *want[] = {"s", "s01", "s02", "s03", "s10"};
	const char *after = "";
	size_t seen = 0;
	char last[200] = "";
	for (int page = 0; page < 10; page++) {
		struct kvt_session **list;
		size_t n;
		int more;
		KVT_REQUIRE(kvt_sessions_list(&t, "local", "s", after, 2, &list, &n, &more) == 0,
			    "list");
		for (size_t i = 0; i < n; i++) {
			KVT_CHECK(seen < 5 && !strcmp(list[i]->id, want[seen]), "page %d item %zu: %s",
				  page, i, list[i]->id);
			seen++;
		}
		if (n)
			snprintf(last, sizeof last, "%s", list[n - 1]->id);
		for (size_t i = 0; i < n; i++)
			kvt_session_put(list[i]);
		free(list);
		after = last;
		if (!more)
			break;
	}
	KVT_CHECK(seen == 5, "all prefixed sessions listed once: %zu", seen);
	kvt_sessions_destroy(&t);
}

static void test_ttl_expiry(void)
{
	struct kvt_tier_host host;
	struct kvt_sessions t;
	kvt_tier_host_init(&host, 1ull << 30);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	struct kvt_codec_config c;
	shape(&c);
	struct kvt_session *a, *b, *p, *held;
	int created;
	char err[256];
	KVT_REQUIRE(kvt_sessions_open(&t, "local", "ttl1", &c, 1, 0, 100, &a, &created, err, sizeof err) == 0, "a");
	KVT_REQUIRE(kvt_sessions_open(&t, "local", "never", &c, 0, 0, 100, &b, &created, err, sizeof err) == 0, "b");
	KVT_REQUIRE(kvt_sessions_open(&t, "local", "pinned", &c, 1, 1, 100, &p, &created, err, sizeof err) == 0, "p");
	KVT_REQUIRE(kvt_sessions_open(&t, "local", "busy", &c, 1, 0, 100, &held, &created, err, sizeof err) == 0, "held");
	kvt_session_put(a);
	kvt_session_put(b);
	kvt_session_put(p);
	uint64_t now = kvt_now_ms();
	KVT_CHECK(kvt_sessions_expire(&t, now) == 0, "nothing expired yet");
	KVT_CHECK(kvt_sessions_expire(&t, now + 1500) == 1, "ttl1 expired (busy one kept)");
	struct kvt_session *g;
	KVT_CHECK(kvt_sessions_get(&t, "local", "ttl1", &g) == -ENOENT, "ttl1 gone");
	KVT_CHECK(kvt_sessions_get(&t, "local", "never", &g) == 0, "ttl 0 kept");
	kvt_session_put(g);
	KVT_CHECK(kvt_sessions_get(&t, "local", "pinned", &g) == 0, "pinned kept");
	kvt_session_put(g);
	kvt_session_put(held);
	KVT_CHECK(kvt_sessions_expire(&t, now + 1500) == 1, "busy one expires once idle");
	KVT_CHECK(t.expired == 2, "expired counter %llu", (unsigned long long)t.expired);
	kvt_sessions_destroy(&t);
}

static void fill_until_full(struct kvt_sessions *t, int *opened, int *failed_rc, int max)
{
	struct kvt_codec_config c;
	shape(&c);
	*failed_rc = 0;
	for (*opened = 0; *opened < max; (*opened)++) {
		char id[32], err[256];
		snprintf(id, sizeof id, "f%04d", *opened);
		struct kvt_session *s;
		int created;
		int rc = kvt_sessions_open(t, "local", id, &c, 0, 0, 100000, &s, &created, err,
					   sizeof err);
		if (rc == 0) {
			rc = append_tokens(s, 100);
			if (rc)
				kvt_sessions_unlink(t, s);
			kvt_session_put(s);
		}
		if (rc) {
			*failed_rc = rc;
			return;
		}
		/* Distinct access times without sleeping: the LRU key is set directly. */
		struct kvt_session *g;
		if (kvt_sessions_get(t, "local", id, &g) == 0) {
			g->last_access_ms = (uint64_t)*opened + 1;
			kvt_session_put(g);
		}
	}
}

static void test_capacity(void)
{
	struct kvt_tier_host host;
	struct kvt_sessions t;
	/* Reject: the table fills, then a refusal that changes nothing. */
	kvt_tier_host_init(&host, 4u << 20);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	kvt_tier_host_set_reclaim(&host, kvt_sessions_reclaim, &t);
	kvt_sessions_set_evict(&t, 0);
	int opened, rc;
	fill_until_full(&t, &opened, &rc, 1000);
	KVT_CHECK(rc == -ENOMEM, "reject policy refuses with -ENOMEM (rc %d after %d)", rc, opened);
	KVT_CHECK(opened > 1, "several sessions fit: %d", opened);
	KVT_CHECK(kvt_sessions_count(&t) == (uint64_t)opened, "refused session not kept");
	KVT_CHECK(host.used_bytes <= host.capacity_bytes, "never above capacity");
	KVT_CHECK(t.evicted == 0, "nothing evicted under reject");
	kvt_sessions_destroy(&t);
	KVT_CHECK(host.used_bytes == 0, "balanced: %llu", (unsigned long long)host.used_bytes);

	/* Drop-coldest: keeps going, dropping the least recently used unpinned sessions. */
	kvt_tier_host_init(&host, 4u << 20);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	kvt_tier_host_set_reclaim(&host, kvt_sessions_reclaim, &t);
	kvt_sessions_set_evict(&t, 1);
	struct kvt_codec_config c;
	shape(&c);
	struct kvt_session *pin;
	int created;
	char err[256];
	KVT_REQUIRE(kvt_sessions_open(&t, "local", "a-pinned", &c, 0, 1, 100000, &pin, &created,
				      err, sizeof err) == 0, "pinned");
	KVT_CHECK(append_tokens(pin, 100) == 0, "pinned append");
	pin->last_access_ms = 0; /* the coldest of all, but pinned */
	kvt_session_put(pin);
	int n_try = 3 * opened + 10;
	fill_until_full(&t, &opened, &rc, n_try);
	KVT_CHECK(rc == 0 && opened == n_try, "drop-coldest never refuses (rc %d at %d)", rc, opened);
	KVT_CHECK(t.evicted > 0, "some sessions evicted");
	struct kvt_session *g;
	KVT_CHECK(kvt_sessions_get(&t, "local", "a-pinned", &g) == 0, "pinned survived");
	kvt_session_put(g);
	char last[32];
	snprintf(last, sizeof last, "f%04d", n_try - 1);
	KVT_CHECK(kvt_sessions_get(&t, "local", last, &g) == 0, "newest kept");
	kvt_session_put(g);
	KVT_CHECK(kvt_sessions_get(&t, "local", "f0000", &g) == -ENOENT, "coldest dropped");
	/* The evicted ones are exactly the oldest: survivors form a suffix. */
	int seen_alive = 0, order_ok = 1;
	for (int i = 0; i < n_try; i++) {
		char id[32];
		snprintf(id, sizeof id, "f%04d", i);
		int alive = kvt_sessions_get(&t, "local", id, &g) == 0;
		if (alive)
			kvt_session_put(g);
		if (seen_alive && !alive)
			order_ok = 0;
		seen_alive |= alive;
	}
	KVT_CHECK(order_ok, "eviction followed LRU order");
	KVT_CHECK(host.used_bytes <= host.capacity_bytes, "never above capacity");
	kvt_sessions_destroy(&t);
	KVT_CHECK(host.used_bytes == 0, "balanced: %llu", (unsigned long long)host.used_bytes);
}

struct worker_arg {
	struct kvt_sessions *t;
	uint64_t seed;
	int errors;
};

static void *worker(void *p)
{
	struct worker_arg *a = p;
	uint64_t x = a->seed;
	struct kvt_codec_config c;
	shape(&c);
	for (int i = 0; i < 400; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		char id[16];
		snprintf(id, sizeof id, "c%02u", (unsigned)((x >> 33) % 16));
		unsigned op = (unsigned)((x >> 20) % 8);
		struct kvt_session *s;
		int created;
		char err[256];
		if (op < 4) {
			if (kvt_sessions_open(a->t, "local", id, &c, 0, 0, 1000, &s, &created, err,
					      sizeof err) == 0) {
				/* Appends on one session are serialized by its lock. */
				size_t b = token_bytes();
				uint8_t *k = calloc(1, b), *v = calloc(1, b);
				kvt_session_lock(s);
				uint64_t before = kvt_seq_tokens(s->seq);
				if (kvt_seq_append(s->seq, k, v, 1, err, sizeof err) ||
				    kvt_seq_tokens(s->seq) != before + 1)
					a->errors++;
				kvt_session_unlock(s);
				free(k);
				free(v);
				kvt_session_put(s);
			} else {
				a->errors++;
			}
		} else if (op < 6) {
			kvt_sessions_drop(a->t, "local", id, NULL);
		} else if (kvt_sessions_get(a->t, "local", id, &s) == 0) {
			struct kvt_session_info info;
			kvt_session_lock(s);
			kvt_session_info_locked(s, &info);
			kvt_session_unlock(s);
			kvt_session_put(s);
		}
	}
	return NULL;
}

static void test_threads(void)
{
	struct kvt_tier_host host;
	struct kvt_sessions t;
	kvt_tier_host_init(&host, 1ull << 30);
	KVT_REQUIRE(kvt_sessions_init(&t, &host) == 0, "init");
	pthread_t th[4];
	struct worker_arg args[4];
	for (int i = 0; i < 4; i++) {
		args[i] = (struct worker_arg){.t = &t, .seed = kvt_rand_u64()};
		pthread_create(&th[i], NULL, worker, &args[i]);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		KVT_CHECK(args[i].errors == 0, "worker %d errors %d", i, args[i].errors);
	}
	struct kvt_session **list;
	size_t n;
	int more;
	KVT_REQUIRE(kvt_sessions_list(&t, "local", "", NULL, 1000, &list, &n, &more) == 0, "list");
	KVT_CHECK(n == kvt_sessions_count(&t), "list %zu vs count %llu", n,
		  (unsigned long long)kvt_sessions_count(&t));
	for (size_t i = 0; i < n; i++) {
		KVT_CHECK(list[i]->refcount == 2, "only table + list hold %s", list[i]->id);
		kvt_session_put(list[i]);
	}
	free(list);
	kvt_sessions_destroy(&t);
	KVT_CHECK(host.used_bytes == 0, "balanced: %llu", (unsigned long long)host.used_bytes);
}

int main(void)
{
	kvt_test_init();
	KVT_RUN(test_open_reopen_conflict);
	KVT_RUN(test_drop_while_referenced);
	KVT_RUN(test_list_paging);
	KVT_RUN(test_ttl_expiry);
	KVT_RUN(test_capacity);
	KVT_RUN(test_threads);
	return kvt_test_done();
}

/* Integration smoke test: kvtierd on a unix socket in a temporary directory answers health
 * checks and a few session calls, then stops on SIGTERM with exit 0 and removes its socket.
 * A second run checks SIGHUP applies a reloadable option from the config file. */
#include "daemon_harness.h"
#include "grpc/health/v1/health.pb-c.h"
#include "kvt_test.h"
#include "kvtier/v1/kvtier.pb-c.h"

static const char *g_kvtierd;

static grpc_status_code health(struct kvt_harness *h, const char *service, int *status,
			       int wait_ready)
{
	Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
	req.service = (char *)service;
	uint8_t buf[256];
	size_t n = grpc__health__v1__health_check_request__pack(&req, buf);
	uint8_t *resp;
	size_t len;
	grpc_status_code st = kvt_harness_call(h, "/grpc.health.v1.Health/Check", buf, n, &resp,
					       &len, NULL, 0, wait_ready, 20000);
	*status = -1;
	if (st == GRPC_STATUS_OK) {
		Grpc__Health__V1__HealthCheckResponse *r =
			grpc__health__v1__health_check_response__unpack(NULL, len, resp);
		if (r) {
			*status = (int)r->status;
			grpc__health__v1__health_check_response__free_unpacked(r, NULL);
		}
	}
	free(resp);
	return st;
}

static grpc_status_code open_session(struct kvt_harness *h, const char *id, uint32_t head_dim,
				     int *created, char *details, size_t dlen)
{
	Kvtier__V1__OpenSessionRequest req = KVTIER__V1__OPEN_SESSION_REQUEST__INIT;
	req.session_id = (char *)id;
	req.has_n_layers = req.has_n_kv_heads = req.has_head_dim = req.has_dtype = 1;
	req.n_layers = 2;
	req.n_kv_heads = 2;
	req.head_dim = head_dim;
	req.dtype = KVTIER__V1__DTYPE__DTYPE_F16;
	uint8_t buf[512];
	size_t n = kvtier__v1__open_session_request__pack(&req, buf);
	uint8_t *resp;
	size_t len;
	grpc_status_code st = kvt_harness_call(h, "/kvtier.v1.KvTier/OpenSession", buf, n, &resp,
					       &len, details, dlen, 0, 10000);
	if (st == GRPC_STATUS_OK) {
		Kvtier__V1__SessionInfo *info = kvtier__v1__session_info__unpack(NULL, len, resp);
		*created = info && info->has_created && info->created;
		if (info)
			kvtier__v1__session_info__free_unpacked(info, NULL);
	}
	free(resp);
	return st;
}

static void test_start_health_stop(void)
{
	struct kvt_harness h;
	KVT_REQUIRE(kvt_harness_start(&h, g_kvtierd, NULL) == 0, "start");
	int status;
	grpc_status_code st = health(&h, "", &status, 1);
	KVT_CHECK(st == GRPC_STATUS_OK && status == 1, "Check(\"\") = %d status %d", st, status);
	st = health(&h, "kvtier.v1.KvTier", &status, 0);
	KVT_CHECK(st == GRPC_STATUS_OK && status == 1, "Check(kvtier) = %d status %d", st, status);
	st = health(&h, "no.such.Service", &status, 0);
	KVT_CHECK(st == GRPC_STATUS_NOT_FOUND, "unknown service -> NOT_FOUND, got %d", st);

	struct stat sb;
	KVT_CHECK(stat(h.sock, &sb) == 0 && S_ISSOCK(sb.st_mode) && (sb.st_mode & 0777) == 0660,
		  "socket mode %o", (unsigned)(sb.st_mode & 0777));

	char details[512] = "";
	st = kvt_harness_call(&h, "/kvtier.v1.KvTier/NoSuchMethod", "", 0, NULL, NULL, details,
			      sizeof details, 0, 5000);
	KVT_CHECK(st == GRPC_STATUS_UNIMPLEMENTED, "unknown method -> %d", st);

	int created = 0;
	st = open_session(&h, "smoke", 64, &created, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_OK && created, "open: %d %s", st, details);
	st = open_session(&h, "smoke", 64, &created, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_OK && !created, "re-open: %d %s", st, details);
	st = open_session(&h, "smoke", 128, &created, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_ALREADY_EXISTS && strstr(details, "head_dim"),
		  "conflict: %d %s", st, details);
	st = open_session(&h, "bad", 96, &created, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_INVALID_ARGUMENT && strstr(details, "head_dim 96"),
		  "bad head_dim: %d %s", st, details);

	int rc = kvt_harness_stop(&h, SIGTERM, 20000);
	KVT_CHECK(rc == 0, "SIGTERM exit code %d", rc);
	KVT_CHECK(access(h.sock, F_OK) != 0, "socket removed on exit");
	char *log = kvt_harness_log(&h);
	KVT_CHECK(log && strstr(log, "level=info msg=listening") && strstr(log, "msg=stopped"),
		  "logfmt lines: %s", log ? log : "(none)");
	KVT_CHECK(log && strstr(log, "ts=") == log, "every line starts with ts=");
	free(log);
	kvt_harness_cleanup(&h);
}

static void test_sighup_reload(void)
{
	struct kvt_harness h;
	char conf[] = "/tmp/kvtierd-conf-XXXXXX";
	int fd = mkstemp(conf);
	KVT_REQUIRE(fd >= 0, "mkstemp");
	const char *c1 = "max_sessions = 100\n";
	KVT_REQUIRE(write(fd, c1, strlen(c1)) == (ssize_t)strlen(c1), "write conf");
	close(fd);
	char arg[64];
	snprintf(arg, sizeof arg, "--config=%s", conf);
	char *extra[] = {arg, NULL};
	KVT_REQUIRE(kvt_harness_start(&h, g_kvtierd, extra) == 0, "start");
	int status, created;
	char details[512];
	KVT_CHECK(health(&h, "", &status, 1) == GRPC_STATUS_OK, "up");
	KVT_CHECK(open_session(&h, "one", 64, &created, details, sizeof details) == GRPC_STATUS_OK,
		  "first session");
	FILE *f = fopen(conf, "w");
	KVT_REQUIRE(f != NULL, "rewrite conf");
	fprintf(f, "max_sessions = 1\n");
	fclose(f);
	kill(h.pid, SIGHUP);
	/* The reload is asynchronous: retry until it shows, bounded. */
	grpc_status_code st = GRPC_STATUS_OK;
	for (int i = 0; i < 2000 && st == GRPC_STATUS_OK; i++) {
		st = open_session(&h, "two", 64, &created, details, sizeof details);
		if (st == GRPC_STATUS_OK) {
			/* Not applied yet: undo and try again. */
			Kvtier__V1__DropSessionRequest d = KVTIER__V1__DROP_SESSION_REQUEST__INIT;
			d.session_id = (char *)"two";
			uint8_t buf[64];
			size_t n = kvtier__v1__drop_session_request__pack(&d, buf);
			kvt_harness_call(&h, "/kvtier.v1.KvTier/DropSession", buf, n, NULL, NULL, NULL,
					 0, 0, 5000);
			struct timespec ts = {0, 5 * 1000 * 1000};
			nanosleep(&ts, NULL);
		}
	}
	KVT_CHECK(st == GRPC_STATUS_RESOURCE_EXHAUSTED && strstr(details, "max_sessions"),
		  "reloaded max_sessions applies: %d %s", st, details);
	int rc = kvt_harness_stop(&h, SIGINT, 20000);
	KVT_CHECK(rc == 0, "SIGINT exit code %d", rc);
	char *log = kvt_harness_log(&h);
	KVT_CHECK(log && strstr(log, "msg=\"config changed\" option=max_sessions old=100 new=1"),
		  "change logged: %s", log ? log : "(none)");
	free(log);
	unlink(conf);
	kvt_harness_cleanup(&h);
}


/* Appends one message (a client stream of one message is one batch, like a unary call). */
static grpc_status_code append_raw(struct kvt_harness *h, const uint8_t *msg, size_t n,
				   uint64_t *n_tokens, char *details, size_t dlen)
{
	uint8_t *resp;
	size_t len;
	grpc_status_code st = kvt_harness_call(h, "/kvtier.v1.KvTier/Append", msg, n, &resp, &len,
					       details, dlen, 0, 10000);
	*n_tokens = 0;
	if (st == GRPC_STATUS_OK) {
		Kvtier__V1__AppendResponse *r = kvtier__v1__append_response__unpack(NULL, len, resp);
		if (r) {
			*n_tokens = r->n_tokens;
			kvtier__v1__append_response__free_unpacked(r, NULL);
		}
	}
	free(resp);
	return st;
}

static uint8_t *put_tag_len(uint8_t *p, unsigned field, size_t len)
{
	*p++ = (uint8_t)(field << 3 | 2);
	while (len >= 0x80) {
		*p++ = (uint8_t)(len | 0x80);
		len >>= 7;
	}
	*p++ = (uint8_t)len;
	return p;
}

static uint8_t *put_tag_varint(uint8_t *p, unsigned field, uint64_t v)
{
	*p++ = (uint8_t)(field << 3);
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

static uint64_t stats_counter(struct kvt_harness *h, const char *name)
{
	Kvtier__V1__StatsRequest req = KVTIER__V1__STATS_REQUEST__INIT;
	uint8_t buf[16], *resp;
	size_t n = kvtier__v1__stats_request__pack(&req, buf), len;
	uint64_t v = UINT64_MAX;
	if (kvt_harness_call(h, "/kvtier.v1.KvTier/Stats", buf, n, &resp, &len, NULL, 0, 0,
			     10000) != GRPC_STATUS_OK)
		return v;
	Kvtier__V1__StatsResponse *r = kvtier__v1__stats_response__unpack(NULL, len, resp);
	for (size_t i = 0; r && i < r->n_counters; i++)
		if (!strcmp(r->counters[i]->name, name))
			v = r->counters[i]->value;
	if (r)
		kvtier__v1__stats_response__free_unpacked(r, NULL);
	free(resp);
	return v;
}

/* The Append parser reads gRPC's slices in place for the usual field order and falls back to
 * protobuf-c for any other: both must stage the same bytes. */
static void test_append_layouts(void)
{
	enum { NL = 2, NH = 1, HD = 64, NT = 3 };
	struct kvt_harness h;
	KVT_REQUIRE(kvt_harness_start(&h, g_kvtierd, NULL) == 0, "start");
	int status;
	KVT_REQUIRE(health(&h, "", &status, 1) == GRPC_STATUS_OK, "up");
	Kvtier__V1__OpenSessionRequest o = KVTIER__V1__OPEN_SESSION_REQUEST__INIT;
	Kvtier__V1__CodecConfig cc = KVTIER__V1__CODEC_CONFIG__INIT;
	cc.has_scheme = 1;
	cc.scheme = KVTIER__V1__SCHEME__SCHEME_NONE;
	o.session_id = (char *)"lay";
	o.has_n_layers = o.has_n_kv_heads = o.has_head_dim = o.has_dtype = 1;
	o.n_layers = NL;
	o.n_kv_heads = NH;
	o.head_dim = HD;
	o.dtype = KVTIER__V1__DTYPE__DTYPE_F16;
	o.codec = &cc;
	uint8_t ob[256];
	size_t on = kvtier__v1__open_session_request__pack(&o, ob);
	char details[512] = "";
	KVT_REQUIRE(kvt_harness_call(&h, "/kvtier.v1.KvTier/OpenSession", ob, on, NULL, NULL,
				     details, sizeof details, 0, 10000) == GRPC_STATUS_OK,
		    "open: %s", details);

	const size_t tb = NL * NT * NH * HD * 2;
	uint16_t k[2][NL * NT * NH * HD], v[2][NL * NT * NH * HD];
	for (int m = 0; m < 2; m++)
		for (size_t i = 0; i < tb / 2; i++) {
			k[m][i] = (uint16_t)(0x3800 + kvt_rand_below(0x800));
			v[m][i] = (uint16_t)(0x3800 + kvt_rand_below(0x800));
		}
	/* Message 1: the canonical order, as protobuf-c writes it. */
	Kvtier__V1__KvBlock b = KVTIER__V1__KV_BLOCK__INIT;
	b.has_n_tokens = b.has_n_layers = b.has_k = b.has_v = 1;
	b.n_tokens = NT;
	b.n_layers = NL;
	b.k.data = (uint8_t *)k[0];
	b.k.len = tb;
	b.v.data = (uint8_t *)v[0];
	b.v.len = tb;
	Kvtier__V1__AppendRequest a = KVTIER__V1__APPEND_REQUEST__INIT;
	a.session_id = (char *)"lay";
	a.block = &b;
	static uint8_t m1[8192], m2[8192];
	size_t n1 = kvtier__v1__append_request__pack(&a, m1);
	uint64_t nt = 0;
	grpc_status_code st = append_raw(&h, m1, n1, &nt, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_OK && nt == NT, "canonical append: %d %s", st, details);
	KVT_CHECK(stats_counter(&h, "append.messages_zero_copy") == 1, "read in place");

	/* Message 2: block before session_id, v before k, the scalars last. */
	uint8_t blk[8192], *p = blk;
	p = put_tag_len(p, 7, tb);
	memcpy(p, v[1], tb);
	p += tb;
	p = put_tag_len(p, 6, tb);
	memcpy(p, k[1], tb);
	p += tb;
	p = put_tag_varint(p, 4, NL);
	p = put_tag_varint(p, 1, NT); /* token_begin guard */
	p = put_tag_varint(p, 2, NT);
	size_t bl = (size_t)(p - blk);
	uint8_t *q = put_tag_len(m2, 2, bl);
	memcpy(q, blk, bl);
	q += bl;
	q = put_tag_len(q, 1, 3);
	memcpy(q, "lay", 3);
	q += 3;
	st = append_raw(&h, m2, (size_t)(q - m2), &nt, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_OK && nt == 2 * NT, "reordered append: %d %s", st, details);
	KVT_CHECK(stats_counter(&h, "append.messages_parsed") == 1, "parsed by protobuf-c");

	/* Both are exact (scheme none): fetch everything back in one block. */
	Kvtier__V1__FetchRequest f = KVTIER__V1__FETCH_REQUEST__INIT;
	f.session_id = (char *)"lay";
	uint8_t fb[64], *resp;
	size_t fn = kvtier__v1__fetch_request__pack(&f, fb), len;
	st = kvt_harness_call(&h, "/kvtier.v1.KvTier/Fetch", fb, fn, &resp, &len, details,
			      sizeof details, 0, 10000);
	KVT_REQUIRE(st == GRPC_STATUS_OK, "fetch: %d %s", st, details);
	Kvtier__V1__KvBlock *r = kvtier__v1__kv_block__unpack(NULL, len, resp);
	KVT_REQUIRE(r && r->n_tokens == 2 * NT && r->n_layers == NL && r->k.len == 2 * tb,
		    "one block of everything");
	int same = 1;
	for (int l = 0; l < NL; l++)
		for (int m = 0; m < 2; m++) {
			size_t run = NT * NH * HD * 2;
			const uint8_t *gk = r->k.data + ((size_t)l * 2 * NT + (size_t)m * NT) * NH * HD * 2;
			const uint8_t *gv = r->v.data + ((size_t)l * 2 * NT + (size_t)m * NT) * NH * HD * 2;
			same &= !memcmp(gk, (const uint8_t *)k[m] + l * run, run);
			same &= !memcmp(gv, (const uint8_t *)v[m] + l * run, run);
		}
	KVT_CHECK(same, "both layouts staged the same bytes, layer by layer");
	kvtier__v1__kv_block__free_unpacked(r, NULL);
	free(resp);
	KVT_CHECK(kvt_harness_stop(&h, SIGTERM, 20000) == 0, "exit 0");
	kvt_harness_cleanup(&h);
}

/* Mutated Append messages (byte flips, truncations, inserted varints) against the in-place
 * parser: every answer is OK or INVALID_ARGUMENT (never a crash, never INTERNAL), and the
 * session only ever grows by whole accepted appends. */
static void test_append_mutations(void)
{
	enum { NL = 2, NH = 1, HD = 64, NT = 2 };
	struct kvt_harness h;
	KVT_REQUIRE(kvt_harness_start(&h, g_kvtierd, NULL) == 0, "start");
	int status, created;
	char details[512] = "";
	KVT_REQUIRE(health(&h, "", &status, 1) == GRPC_STATUS_OK, "up");
	KVT_REQUIRE(open_session(&h, "mut", HD, &created, details, sizeof details) ==
			    GRPC_STATUS_OK,
		    "open: %s", details);
	/* open_session makes 2 layers x 2 heads: size the block for that shape. */
	const size_t tb = (size_t)NL * NT * 2 * HD * 2;
	static uint8_t kv[2][NL * NT * 2 * HD * 2];
	for (size_t i = 0; i < tb; i++) {
		kv[0][i] = (uint8_t)kvt_rand_below(256);
		kv[1][i] = (uint8_t)kvt_rand_below(256);
	}
	Kvtier__V1__KvBlock b = KVTIER__V1__KV_BLOCK__INIT;
	b.has_n_tokens = b.has_n_layers = b.has_k = b.has_v = 1;
	b.n_tokens = NT;
	b.n_layers = NL;
	b.k.data = kv[0];
	b.k.len = tb;
	b.v.data = kv[1];
	b.v.len = tb;
	Kvtier__V1__AppendRequest a = KVTIER__V1__APPEND_REQUEST__INIT;
	a.session_id = (char *)"mut";
	a.block = &b;
	static uint8_t good[8192], bad[8192 + 16];
	size_t n = kvtier__v1__append_request__pack(&a, good);
	uint64_t accepted = 0, len_now = 0;
	int bad_codes = 0;
	for (int it = 0; it < 300; it++) {
		size_t m = n;
		memcpy(bad, good, n);
		switch (kvt_rand_below(3)) {
		case 0: /* flip a few bytes, mostly in the framing */
			for (int f = 0; f < 1 + (int)kvt_rand_below(3); f++) {
				size_t at = kvt_rand_below(2) ? kvt_rand_below(24) : kvt_rand_below((uint32_t)n);
				bad[at] ^= (uint8_t)(1 + kvt_rand_below(255));
			}
			break;
		case 1: /* truncate */
			m = kvt_rand_below((uint32_t)n);
			break;
		default: { /* insert a stray varint field */
			size_t at = kvt_rand_below(24);
			memmove(bad + at + 2, bad + at, n - at);
			bad[at] = (uint8_t)(kvt_rand_below(16) << 3);
			bad[at + 1] = (uint8_t)kvt_rand_below(128);
			m = n + 2;
			break;
		}
		}
		uint64_t nt = 0;
		grpc_status_code st = append_raw(&h, bad, m, &nt, details, sizeof details);
		if (st == GRPC_STATUS_OK) {
			accepted++;
			if (nt < len_now + 1)
				bad_codes++;
			len_now = nt;
		} else if (st != GRPC_STATUS_INVALID_ARGUMENT && st != GRPC_STATUS_NOT_FOUND &&
			   st != GRPC_STATUS_RESOURCE_EXHAUSTED) {
			bad_codes++;
			printf("# mutation %d: status %d %s\n", it, st, details);
		}
	}
	KVT_CHECK(bad_codes == 0, "%d answers outside OK / INVALID_ARGUMENT / NOT_FOUND", bad_codes);
	uint64_t nt = 0;
	grpc_status_code st = append_raw(&h, good, n, &nt, details, sizeof details);
	KVT_CHECK(st == GRPC_STATUS_OK && nt == len_now + NT, "a good append still works: %d %s",
		  st, details);
	printf("# %llu of 300 mutated messages were still valid appends\n",
	       (unsigned long long)accepted);
	KVT_CHECK(health(&h, "", &status, 0) == GRPC_STATUS_OK && status == 1, "still serving");
	KVT_CHECK(kvt_harness_stop(&h, SIGTERM, 20000) == 0, "exit 0");
	kvt_harness_cleanup(&h);
}

int main(int argc, char **argv)
{
	kvt_test_init();
	g_kvtierd = argc > 1 ? argv[1] : "kvtierd";
	grpc_init();
	KVT_RUN(test_start_health_stop);
	KVT_RUN(test_sighup_reload);
	KVT_RUN(test_append_layouts);
	KVT_RUN(test_append_mutations);
	grpc_shutdown();
	return kvt_test_done();
}

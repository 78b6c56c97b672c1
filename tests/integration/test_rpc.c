/*
 * test_rpc.c - every kvtier.v1 request through libkvtier against a real kvtierd, with values
 * checked against the codec reference built locally from the same input: Fetch equals
 * kvt_seq_fetch, Attend equals kvt_seq_attend, FetchEncoded chunks equal the local chunks
 * byte for byte; Fork / Truncate / Drop / Pin / TTL / List semantics; capacity policies.
 */
#include "kvt_it.h"

#include <time.h>

static struct kvt_daemon g_d;
static struct kvt_client *g_c;

struct it_session {
	char id[64];
	struct kvt_client_session_info info;
	struct kvt_seq *ref;
};

/* Opens id with the given shape and codec and builds the matching local reference. */
static int open_session(struct kvt_client *c, struct it_session *s, const char *id, uint32_t L,
			uint32_t H, uint32_t d, uint32_t dtype, const struct kvt_client_codec *codec)
{
	struct kvt_client_session_params p;
	struct kvt_client_status st;
	struct kvt_codec_config cfg;
	char err[256];
	int rc;

	memset(s, 0, sizeof(*s));
	snprintf(s->id, sizeof(s->id), "%s", id);
	kvt_client_session_params_init(&p, s->id, L, H, d, dtype);
	if (codec)
		p.codec = *codec;
	rc = kvt_client_open(c, &p, &s->info, &st);
	if (rc) {
		printf("# open %s: %d %s: %s\n", id, rc, kvt_client_code_name(st.code), st.message);
		return rc;
	}
	it_config_from_info(&s->info, &cfg);
	rc = kvt_seq_create(&cfg, NULL, &s->ref, err, sizeof(err));
	if (rc)
		printf("# local kvt_seq_create for %s: %s\n", id, err);
	return rc;
}

/* Appends n fresh tokens to both the daemon session and the local reference. */
static int append_both(struct kvt_client *c, struct it_session *s, uint32_t n,
		       const struct kvt_client_append_opts *opts)
{
	struct kvt_client_shape sh = it_shape(&s->info);
	size_t bytes = kvt_client_kv_bytes(&sh, n);
	void *k = it_xmalloc(bytes), *v = it_xmalloc(bytes);
	struct kvt_client_append_result res;
	struct kvt_client_status st;
	char err[256];
	int rc;

	it_gen_kv(sh.n_layers, sh.n_kv_heads, sh.head_dim, sh.dtype, kvt_seq_tokens(s->ref), n, k, v);
	rc = kvt_client_append(c, s->id, &sh, k, v, n, opts, &res, &st);
	if (rc) {
		printf("# append %u to %s: %d %s: %s\n", n, s->id, rc, kvt_client_code_name(st.code),
		       st.message);
		goto out;
	}
	rc = kvt_seq_append(s->ref, k, v, n, err, sizeof(err));
	if (rc) {
		printf("# local append: %s\n", err);
		goto out;
	}
	if (res.n_tokens != kvt_seq_tokens(s->ref) || res.appended != n) {
		printf("# append result n_tokens %llu appended %llu, expected %llu / %u\n",
		       (unsigned long long)res.n_tokens, (unsigned long long)res.appended,
		       (unsigned long long)kvt_seq_tokens(s->ref), n);
		rc = -EPROTO;
	}
out:
	free(k);
	free(v);
	return rc;
}

static int stat_matches(struct kvt_client *c, struct it_session *s)
{
	struct kvt_client_session_info i;
	struct kvt_client_status st;
	if (kvt_client_stat(c, s->id, &i, &st)) {
		printf("# stat %s: %s %s\n", s->id, kvt_client_code_name(st.code), st.message);
		return 0;
	}
	if (i.n_tokens != kvt_seq_tokens(s->ref) || i.n_chunks != kvt_seq_n_chunks(s->ref) ||
	    i.tail_tokens != kvt_seq_tail_tokens(s->ref)) {
		printf("# stat %s: tokens %llu chunks %u tail %u; local %llu %u %u\n", s->id,
		       (unsigned long long)i.n_tokens, i.n_chunks, i.tail_tokens,
		       (unsigned long long)kvt_seq_tokens(s->ref), kvt_seq_n_chunks(s->ref),
		       kvt_seq_tail_tokens(s->ref));
		return 0;
	}
	return 1;
}

/* Attend with random queries on every layer; compare with kvt_seq_attend. */
static int attend_matches(struct kvt_client *c, struct it_session *s, uint32_t group)
{
	const struct kvt_codec_config *cfg = kvt_seq_config(s->ref);
	uint32_t L = cfg->n_layers, Hq = cfg->n_kv_heads * group, d = cfg->head_dim;
	size_t qn = (size_t)Hq * d;
	struct kvt_client_attend_item *items = calloc(L, sizeof(*items));
	float *q = it_xmalloc(L * qn * sizeof(float)), *out = it_xmalloc(L * qn * sizeof(float));
	float *ref = it_xmalloc(qn * sizeof(float));
	struct kvt_client_status st;
	char err[256];
	int ok = 1, rc;

	for (size_t i = 0; i < L * qn; i++)
		q[i] = it_rand_normal();
	for (uint32_t l = 0; l < L; l++) {
		items[l].session_id = s->id;
		items[l].layer = l;
		items[l].n_q_heads = Hq;
		items[l].q = q + l * qn;
		items[l].q_bytes = qn * sizeof(float);
		items[l].out = out + l * qn;
		items[l].out_cap = qn * sizeof(float);
	}
	rc = kvt_client_attend(c, items, L, 0, &st);
	if (rc) {
		printf("# attend %s: %d %s: %s\n", s->id, rc, kvt_client_code_name(st.code), st.message);
		ok = 0;
		goto out;
	}
	for (uint32_t l = 0; l < L && ok; l++) {
		float e;
		rc = kvt_seq_attend(s->ref, l, Hq, 1.0f / sqrtf((float)d), q + l * qn, ref, err,
				    sizeof(err));
		if (rc) {
			printf("# local attend: %s\n", err);
			ok = 0;
			break;
		}
		if (items[l].out_bytes != qn * sizeof(float) ||
		    items[l].n_tokens_attended != kvt_seq_tokens(s->ref)) {
			printf("# attend %s layer %u: %zu bytes, %llu tokens attended (expected %zu, %llu)\n",
			       s->id, l, items[l].out_bytes,
			       (unsigned long long)items[l].n_tokens_attended, qn * sizeof(float),
			       (unsigned long long)kvt_seq_tokens(s->ref));
			ok = 0;
		} else if (!it_close(out + l * qn, ref, qn, &e)) {
			printf("# attend %s layer %u differs from kvt_seq_attend by %g\n", s->id, l, e);
			ok = 0;
		}
	}
out:
	free(items);
	free(q);
	free(out);
	free(ref);
	return ok;
}

static void close_session(struct it_session *s)
{
	kvt_seq_destroy(s->ref);
	s->ref = NULL;
}

/* ---- tests ----------------------------------------------------------------------------------- */

static void test_health_and_stats(void)
{
	struct kvt_client_status st;
	struct kvt_client_stats s;
	int serving = 0;

	KVT_CHECK(kvt_client_health(g_c, "", 0, &serving, &st) == 0 && serving == 1,
		  "health \"\": %s %s serving %d", kvt_client_code_name(st.code), st.message, serving);
	serving = 0;
	KVT_CHECK(kvt_client_health(g_c, "kvtier.v1.KvTier", 0, &serving, &st) == 0 && serving == 1,
		  "health kvtier.v1.KvTier: %s %s", kvt_client_code_name(st.code), st.message);
	KVT_CHECK(kvt_client_health(g_c, "no.such.Service", 0, &serving, &st) == -ENOENT &&
			  st.code == KVT_CODE_NOT_FOUND,
		  "health of an unknown service: %s", kvt_client_code_name(st.code));
	KVT_REQUIRE(kvt_client_stats(g_c, &s, &st) == 0, "stats: %s", st.message);
	KVT_CHECK(s.version[0] != '\0', "stats has a version");
	KVT_CHECK(!strcmp(s.codec_isa, "avx2") || !strcmp(s.codec_isa, "scalar"),
		  "codec_isa \"%s\"", s.codec_isa);
	kvt_client_stats_free(&s);
}

/* Fetch after Append equals the codec reference, for every scheme, dtype, and for appends
 * split by tokens and by layer ranges. */
static void test_append_fetch_reference(void)
{
	struct {
		const char *id;
		uint32_t L, H, d, dtype, scheme, kb, vb, G, B, S;
		uint32_t max_msg; /* 0 = default; small values force splitting */
		int32_t W;        /* recent_exact_tokens; 0: the daemon's default */
		float pin_ratio;  /* pin_detect_ratio; 0: the daemon's default */
	} cases[] = {
		{ "ref-oscar-f16", 4, 2, 64, KVT_DTYPE_F16, 4, 2, 2, 32, 64, 4, 0, 0, 0 },
		{ "ref-oscar-bf16-split", 6, 4, 128, KVT_DTYPE_BF16, 4, 4, 2, 32, 64, 2, 64 * 1024, 0, 0 },
		{ "ref-kivi-f32", 2, 2, 64, KVT_DTYPE_F32, 2, 2, 4, 64, 128, 0, 0, 0, 0 },
		{ "ref-hadamard-f16-layers", 8, 4, 256, KVT_DTYPE_F16, 3, 4, 4, 128, 128, 4, 20 * 1024, 0, 0 },
		{ "ref-none-f16", 3, 1, 64, KVT_DTYPE_F16, 1, 0, 0, 32, 32, 0, 0, 0, 0 },
		/* 3-bit keys, a recent exact window, and detected pins: the local decode
		 * must give the daemon's bytes for each */
		{ "ref-oscar-k3-f16", 4, 2, 64, KVT_DTYPE_F16, 4, 3, 2, 32, 64, 4, 0, 0, 0 },
		{ "ref-oscar-recent-bf16", 3, 2, 128, KVT_DTYPE_BF16, 4, 2, 2, 32, 32, 4, 0, 64, 0 },
		{ "ref-oscar-pins-f16", 2, 2, 64, KVT_DTYPE_F16, 4, 2, 2, 32, 64, 0, 0, 0, 0.9f },
	};
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
		struct kvt_client_codec codec;
		struct kvt_client_append_opts o;
		struct it_session s;
		uint32_t B = cases[ci].B;
		uint32_t sizes[] = { 1, B - 1, 3, B + 5, 2 * B, 7 };

		kvt_client_codec_init(&codec);
		codec.scheme = cases[ci].scheme;
		codec.key_bits = cases[ci].kb;
		codec.value_bits = cases[ci].vb;
		codec.group = cases[ci].G;
		codec.chunk_tokens = B;
		codec.n_sinks = (int32_t)cases[ci].S;
		if (cases[ci].W)
			codec.recent_exact_tokens = cases[ci].W;
		if (cases[ci].pin_ratio > 0) {
			codec.pin_detect_ratio = cases[ci].pin_ratio;
			codec.pin_detect_max = 8;
		}
		KVT_REQUIRE(open_session(g_c, &s, cases[ci].id, cases[ci].L, cases[ci].H, cases[ci].d,
					 cases[ci].dtype, &codec) == 0,
			    "open %s", cases[ci].id);
		KVT_CHECK(s.info.created == 1, "%s created", s.id);
		kvt_client_append_opts_init(&o);
		o.max_message_bytes = cases[ci].max_msg;
		for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			o.token_begin = (i % 2) ? kvt_seq_tokens(s.ref) : KVT_CLIENT_END;
			KVT_REQUIRE(append_both(g_c, &s, sizes[i], &o) == 0, "append %u to %s",
				    sizes[i], s.id);
		}
		KVT_CHECK(stat_matches(g_c, &s), "stat %s", s.id);
		uint64_t T = kvt_seq_tokens(s.ref);
		uint32_t L = cases[ci].L;
		KVT_CHECK(it_fetch_equals(g_c, s.id, s.ref, 0, T, 0, L, cases[ci].dtype),
			  "%s full fetch", s.id);
		KVT_CHECK(it_fetch_equals(g_c, s.id, s.ref, 1, T - 2, L / 2, L, KVT_DTYPE_F32),
			  "%s partial fetch as f32", s.id);
		KVT_CHECK(it_fetch_equals(g_c, s.id, s.ref, B - 3, B + 3, 0, 1, KVT_DTYPE_F16),
			  "%s fetch across a chunk edge", s.id);
		/* The local-decode Fetch gives the same bytes: whole, partial, across chunk
		 * edges and into the tail, every dtype, and random ranges. */
		KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, 0, T, 0, L, cases[ci].dtype, 1),
			  "%s full local fetch", s.id);
		KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, 1, T - 2, L / 2, L, KVT_DTYPE_F32,
					       1),
			  "%s partial local fetch as f32", s.id);
		KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, B - 3, B + 3, 0, 1, KVT_DTYPE_BF16,
					       1),
			  "%s local fetch across a chunk edge as bf16", s.id);
		KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, B, 2 * B, 0, L, KVT_DTYPE_F16, 1),
			  "%s local fetch of one whole chunk", s.id);
		KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, T - 1, T, 0, L, cases[ci].dtype, 1),
			  "%s local fetch of the last token", s.id);
		for (int k = 0; k < 12; k++) {
			uint64_t a = it_rand_below((uint32_t)T), b = a + 1 + it_rand_below((uint32_t)(T - a));
			uint32_t la = it_rand_below(L), lb = la + 1 + it_rand_below(L - la);
			uint32_t dt = 1 + it_rand_below(3);
			KVT_CHECK(it_fetch_equals(g_c, s.id, s.ref, a, b, la, lb, dt),
				  "%s default and server fetch [%llu, %llu) x [%u, %u) dtype %u", s.id,
				  (unsigned long long)a, (unsigned long long)b, la, lb, dt);
		}
		if (cases[ci].pin_ratio > 0) {
			/* the case is only worth its name if pins were detected beyond the sinks */
			struct kvt_client_encoded *e = NULL;
			struct kvt_client_status est;
			unsigned pinned = 0;
			KVT_REQUIRE(kvt_client_fetch_encoded(g_c, s.id, 0, KVT_CLIENT_ALL_CHUNKS, 0,
							     &e, &est) == 0,
				    "fetch_encoded %s: %s", s.id, est.message);
			for (size_t i = 0; i < e->n_chunks; i++) {
				struct kvt_codec_config ccfg;
				struct kvt_chunk_header h;
				char cerr[256];
				if (!kvt_chunk_parse(e->chunks[i].bytes, e->chunks[i].n_bytes, &ccfg,
						     &h, cerr, sizeof(cerr)))
					pinned += h.n_pinned;
			}
			kvt_client_encoded_free(e);
			KVT_CHECK(pinned > 0, "%s has detected pins (%u)", s.id, pinned);
		}
		KVT_CHECK(attend_matches(g_c, &s, 1), "%s attend MHA", s.id);
		KVT_CHECK(attend_matches(g_c, &s, 4), "%s attend GQA x4", s.id);
		close_session(&s);
	}
}

/* Which RPC a fetch used, by the daemon's counters: 'L' FetchEncoded (local decode), 'S'
 * Fetch (server decode), '?' neither or both. */
static char fetch_path(struct kvt_client *c, const char *id, int mode)
{
	struct kvt_client_stats a, b;
	struct kvt_client_status st;
	struct kvt_client_fetch_range r;
	static uint8_t k[4 * 64 * 2 * 64 * 2], v[sizeof(k)];
	char path = '?';
	if (kvt_client_stats(g_c, &a, &st))
		return '?';
	kvt_client_fetch_range_init(&r);
	r.token_end = 64;
	r.decode_local = mode;
	int rc = kvt_client_fetch(c, id, &r, k, sizeof(k), v, sizeof(v), NULL, &st);
	if (!rc && !kvt_client_stats(g_c, &b, &st)) {
		uint64_t fe = kvt_client_stats_counter(&b, "rpc.FetchEncoded.OK") -
			      kvt_client_stats_counter(&a, "rpc.FetchEncoded.OK");
		uint64_t f = kvt_client_stats_counter(&b, "rpc.Fetch.OK") -
			     kvt_client_stats_counter(&a, "rpc.Fetch.OK");
		path = fe == 1 && f == 0 ? 'L' : fe == 0 && f == 1 ? 'S' : '?';
		kvt_client_stats_free(&b);
	}
	kvt_client_stats_free(&a);
	return path;
}

/* The fetch path: local decode by default, the daemon's Fetch per call
 * (decode_local KVT_CLIENT_FETCH_SERVER), per client (options.fetch_mode) and by
 * KVTIER_CLIENT_FETCH; bad modes are refused at connect. */
static void test_fetch_modes(void)
{
	struct it_session s;
	struct kvt_client_codec codec;
	struct kvt_client_options o = { 0 };
	struct kvt_client_status st;
	struct kvt_client *c = NULL;

	kvt_client_codec_init(&codec);
	codec.group = 32; /* the default group is 64 (kvtier-int2) */
	codec.chunk_tokens = 32;
	KVT_REQUIRE(open_session(g_c, &s, "modes", 4, 2, 64, KVT_DTYPE_F16, &codec) == 0, "open");
	KVT_REQUIRE(append_both(g_c, &s, 80, NULL) == 0, "append");
	KVT_CHECK(fetch_path(g_c, s.id, KVT_CLIENT_FETCH_DEFAULT) == 'L', "default is local");
	KVT_CHECK(fetch_path(g_c, s.id, KVT_CLIENT_FETCH_SERVER) == 'S', "per call: server");
	KVT_CHECK(fetch_path(g_c, s.id, KVT_CLIENT_FETCH_LOCAL) == 'L', "per call: local");

	o.target = g_d.target;
	o.fetch_mode = KVT_CLIENT_FETCH_SERVER;
	KVT_REQUIRE(kvt_client_connect(&o, &c, &st) == 0, "connect: %s", st.message);
	KVT_CHECK(fetch_path(c, s.id, KVT_CLIENT_FETCH_DEFAULT) == 'S', "client mode server");
	KVT_CHECK(fetch_path(c, s.id, KVT_CLIENT_FETCH_LOCAL) == 'L', "per call overrides");
	KVT_CHECK(it_fetch_equals_mode(c, s.id, s.ref, 5, 80, 1, 4, KVT_DTYPE_F32,
				       KVT_CLIENT_FETCH_DEFAULT),
		  "client mode server: bytes");
	kvt_client_close(c);

	o.fetch_mode = KVT_CLIENT_FETCH_DEFAULT;
	setenv("KVTIER_CLIENT_FETCH", "server", 1);
	KVT_REQUIRE(kvt_client_connect(&o, &c, &st) == 0, "connect: %s", st.message);
	KVT_CHECK(fetch_path(c, s.id, KVT_CLIENT_FETCH_DEFAULT) == 'S', "environment server");
	kvt_client_close(c);
	setenv("KVTIER_CLIENT_FETCH", "local", 1);
	KVT_REQUIRE(kvt_client_connect(&o, &c, &st) == 0, "connect: %s", st.message);
	KVT_CHECK(fetch_path(c, s.id, KVT_CLIENT_FETCH_DEFAULT) == 'L', "environment local");
	kvt_client_close(c);
	o.fetch_mode = KVT_CLIENT_FETCH_LOCAL;
	setenv("KVTIER_CLIENT_FETCH", "server", 1);
	KVT_REQUIRE(kvt_client_connect(&o, &c, &st) == 0, "connect: %s", st.message);
	KVT_CHECK(fetch_path(c, s.id, KVT_CLIENT_FETCH_DEFAULT) == 'L',
		  "the option wins over the environment");
	kvt_client_close(c);
	c = NULL;
	o.fetch_mode = KVT_CLIENT_FETCH_DEFAULT;
	setenv("KVTIER_CLIENT_FETCH", "decode", 1);
	KVT_CHECK(kvt_client_connect(&o, &c, &st) == -EINVAL && st.local && !c &&
			  strstr(st.message, "KVTIER_CLIENT_FETCH"),
		  "a bad KVTIER_CLIENT_FETCH is refused: %s", st.message);
	unsetenv("KVTIER_CLIENT_FETCH");
	o.fetch_mode = 2;
	KVT_CHECK(kvt_client_connect(&o, &c, &st) == -EINVAL && st.local && !c &&
			  strstr(st.message, "fetch_mode"),
		  "a bad fetch_mode is refused: %s", st.message);
	/* max_message_bytes is the Fetch stream's own knob: such a range uses the Fetch RPC */
	{
		struct kvt_client_stats a, b;
		struct kvt_client_fetch_range r;
		static uint8_t k[4 * 80 * 2 * 64 * 2], v[sizeof(k)];
		KVT_REQUIRE(kvt_client_stats(g_c, &a, &st) == 0, "stats");
		kvt_client_fetch_range_init(&r);
		r.max_message_bytes = 64 * 1024;
		KVT_CHECK(kvt_client_fetch(g_c, s.id, &r, k, sizeof(k), v, sizeof(v), NULL, &st) == 0,
			  "fetch: %s", st.message);
		KVT_REQUIRE(kvt_client_stats(g_c, &b, &st) == 0, "stats");
		KVT_CHECK(kvt_client_stats_counter(&b, "rpc.Fetch.OK") ==
				  kvt_client_stats_counter(&a, "rpc.Fetch.OK") + 1,
			  "max_message_bytes: the Fetch RPC");
		kvt_client_stats_free(&a);
		kvt_client_stats_free(&b);
	}
	kvt_client_drop(g_c, s.id, NULL, &st);
	kvt_seq_destroy(s.ref);
}

/* Fetch replies honour a small max_message_bytes and still tile the range. */
static void test_fetch_small_messages(void)
{
	struct it_session s;
	struct kvt_client_fetch_range r;
	struct kvt_client_fetch_result res;
	struct kvt_client_status st;

	KVT_REQUIRE(open_session(g_c, &s, "fetch-small", 4, 4, 128, KVT_DTYPE_F16, NULL) == 0, "open");
	KVT_REQUIRE(append_both(g_c, &s, 300, NULL) == 0, "append");
	size_t n = (size_t)4 * 300 * 4 * 128 * 2;
	void *k = it_xmalloc(n), *v = it_xmalloc(n);
	kvt_client_fetch_range_init(&r);
	r.max_message_bytes = 64 * 1024;
	KVT_CHECK(kvt_client_fetch(g_c, s.id, &r, k, n, v, n, &res, &st) == 0, "fetch: %s", st.message);
	KVT_CHECK(res.messages >= n * 2 / (64 * 1024), "%u messages for %zu bytes under 64 KiB",
		  res.messages, 2 * n);
	/* A buffer one byte short: refused before anything is written. */
	memset(k, 0xab, n);
	r.token_end = 300;
	r.layer_end = 4;
	r.dtype = KVT_DTYPE_F16;
	KVT_CHECK(kvt_client_fetch(g_c, s.id, &r, k, n - 1, v, n, &res, &st) == -ENOSPC && st.local,
		  "short buffer: %s", st.message);
	size_t untouched = 0;
	while (untouched < n && ((uint8_t *)k)[untouched] == 0xab)
		untouched++;
	KVT_CHECK(untouched == n, "short buffer written at byte %zu", untouched);
	KVT_CHECK(kvt_client_health(g_c, "", 0, NULL, &st) == 0, "serving after a cancelled fetch");
	free(k);
	free(v);
	KVT_CHECK(it_fetch_equals(g_c, s.id, s.ref, 0, 300, 0, 4, KVT_DTYPE_F16), "content");
	close_session(&s);
}

/* Attend with new_k / new_v for every layer stages a token that then joins the session. */
static void test_attend_new_token(void)
{
	struct it_session s;
	struct kvt_client_status st;
	const uint32_t L = 3, H = 2, d = 64, Hq = 4;
	char err[256];

	KVT_REQUIRE(open_session(g_c, &s, "attend-new", L, H, d, KVT_DTYPE_F16, NULL) == 0, "open");
	KVT_REQUIRE(append_both(g_c, &s, 40, NULL) == 0, "append");
	size_t row = (size_t)H * d * 2, qn = (size_t)Hq * d;
	uint8_t *nk = it_xmalloc(L * row), *nv = it_xmalloc(L * row);
	it_gen_kv(L, H, d, KVT_DTYPE_F16, 40, 1, nk, nv); /* [L][1][H][d] */
	float *q = it_xmalloc(qn * sizeof(float)), *out = it_xmalloc(qn * sizeof(float));
	float *ref = it_xmalloc(qn * sizeof(float));
	for (size_t i = 0; i < qn; i++)
		q[i] = it_rand_normal();
	/* The reference: the session with the new token appended. */
	KVT_REQUIRE(kvt_seq_append(s.ref, nk, nv, 1, err, sizeof(err)) == 0, "%s", err);
	for (uint32_t l = 0; l < L; l++) {
		struct kvt_client_attend_item it = { 0 };
		float e;
		it.session_id = s.id;
		it.layer = l;
		it.n_q_heads = Hq;
		it.q = q;
		it.q_bytes = qn * sizeof(float);
		it.new_k = nk + l * row;
		it.new_k_bytes = row;
		it.new_v = nv + l * row;
		it.new_v_bytes = row;
		it.out = out;
		it.out_cap = qn * sizeof(float);
		KVT_REQUIRE(kvt_client_attend(g_c, &it, 1, 0, &st) == 0, "attend layer %u: %s", l,
			    st.message);
		KVT_CHECK(it.n_tokens_attended == 41, "layer %u attended %llu tokens, expected 41", l,
			  (unsigned long long)it.n_tokens_attended);
		KVT_REQUIRE(kvt_seq_attend(s.ref, l, Hq, 1.0f / 8.0f, q, ref, err, sizeof(err)) == 0,
			    "%s", err);
		KVT_CHECK(it_close(out, ref, qn, &e), "layer %u with the staged token: err %g", l, e);
	}
	KVT_CHECK(stat_matches(g_c, &s), "the staged token joined after every layer");
	KVT_CHECK(it_fetch_equals(g_c, s.id, s.ref, 0, 41, 0, L, KVT_DTYPE_F16), "content");
	free(nk);
	free(nv);
	free(q);
	free(out);
	free(ref);
	close_session(&s);
}

static void test_fork_truncate_drop(void)
{
	struct it_session a, f1, f2;
	struct kvt_client_status st;
	struct kvt_client_session_info i;
	struct kvt_codec_config cfg;
	char err[256];
	uint64_t freed = 0;

	struct kvt_client_codec codec;
	kvt_client_codec_init(&codec);
	codec.chunk_tokens = 64;
	codec.group = 32;
	KVT_REQUIRE(open_session(g_c, &a, "fork-src", 2, 2, 64, KVT_DTYPE_F16, &codec) == 0, "open");
	KVT_REQUIRE(append_both(g_c, &a, 200, NULL) == 0, "append");

	/* Fork inside a chunk and at a chunk boundary. */
	uint64_t cuts[2] = { 100, 128 };
	struct it_session *forks[2] = { &f1, &f2 };
	const char *names[2] = { "fork-mid", "fork-edge" };
	for (int j = 0; j < 2; j++) {
		struct it_session *f = forks[j];
		memset(f, 0, sizeof(*f));
		snprintf(f->id, sizeof(f->id), "%s", names[j]);
		KVT_REQUIRE(kvt_client_fork(g_c, a.id, f->id, cuts[j], -1, -1, &f->info, &st) == 0,
			    "fork %s: %s", f->id, st.message);
		KVT_CHECK(f->info.n_tokens == cuts[j], "fork length %llu",
			  (unsigned long long)f->info.n_tokens);
		KVT_REQUIRE(kvt_seq_fork(a.ref, cuts[j], NULL, &f->ref, err, sizeof(err)) == 0, "%s",
			    err);
		KVT_CHECK(stat_matches(g_c, f), "fork %s stat", f->id);
		KVT_CHECK(it_fetch_equals(g_c, f->id, f->ref, 0, cuts[j], 0, 2, KVT_DTYPE_F16),
			  "fork %s content", f->id);
	}
	/* Appending to a fork leaves the source alone (copy on write). */
	KVT_REQUIRE(append_both(g_c, &f1, 50, NULL) == 0, "append to fork");
	KVT_CHECK(it_fetch_equals(g_c, a.id, a.ref, 0, 200, 0, 2, KVT_DTYPE_F16), "source unchanged");
	KVT_CHECK(it_fetch_equals(g_c, f1.id, f1.ref, 0, 150, 0, 2, KVT_DTYPE_F16), "fork grown");
	KVT_CHECK(attend_matches(g_c, &f1, 2), "attend on a fork");

	/* Truncate inside a chunk, then grow again. */
	KVT_REQUIRE(kvt_client_truncate(g_c, a.id, 77, &i, &st) == 0, "truncate: %s", st.message);
	KVT_CHECK(i.n_tokens == 77, "truncated length %llu", (unsigned long long)i.n_tokens);
	KVT_REQUIRE(kvt_seq_truncate(a.ref, 77, err, sizeof(err)) == 0, "%s", err);
	KVT_CHECK(stat_matches(g_c, &a), "stat after truncate");
	KVT_CHECK(it_fetch_equals(g_c, a.id, a.ref, 0, 77, 0, 2, KVT_DTYPE_F16), "truncated content");
	KVT_REQUIRE(append_both(g_c, &a, 90, NULL) == 0, "append after truncate");
	KVT_CHECK(it_fetch_equals(g_c, a.id, a.ref, 0, 167, 0, 2, KVT_DTYPE_F16), "regrown content");
	KVT_CHECK(it_fetch_equals(g_c, f2.id, f2.ref, 0, 128, 0, 2, KVT_DTYPE_F16),
		  "fork intact after truncating its source");
	KVT_REQUIRE(kvt_client_truncate(g_c, a.id, 0, &i, &st) == 0, "truncate to 0: %s", st.message);
	KVT_CHECK(i.n_tokens == 0 && i.n_chunks == 0 && i.tail_tokens == 0, "empty after truncate 0");

	/* Drop: gone for stat, fetch and list; shared chunks of its fork survive. */
	KVT_REQUIRE(kvt_client_drop(g_c, f2.id, &freed, &st) == 0, "drop: %s", st.message);
	KVT_CHECK(kvt_client_stat(g_c, f2.id, &i, &st) == -ENOENT && st.code == KVT_CODE_NOT_FOUND,
		  "stat after drop: %s", kvt_client_code_name(st.code));
	KVT_CHECK(kvt_client_drop(g_c, f2.id, NULL, &st) == -ENOENT, "second drop NOT_FOUND");
	KVT_CHECK(kvt_client_drop(g_c, a.id, &freed, &st) == 0, "drop source: %s", st.message);
	KVT_CHECK(it_fetch_equals(g_c, f1.id, f1.ref, 0, 150, 0, 2, KVT_DTYPE_F16),
		  "fork intact after its source was dropped");
	it_config_from_info(&f1.info, &cfg);
	KVT_CHECK(cfg.chunk_tokens == 64, "fork keeps the codec");
	KVT_CHECK(kvt_client_drop(g_c, f1.id, &freed, &st) == 0 && freed > 0, "drop fork freed %llu",
		  (unsigned long long)freed);
	close_session(&a);
	close_session(&f1);
	close_session(&f2);
}

static void test_open_pin_ttl_list(void)
{
	struct kvt_client_session_params p;
	struct kvt_client_session_info i, *list = NULL;
	struct kvt_client_status st;
	size_t n = 0;
	char next[512];

	kvt_client_session_params_init(&p, "list-a", 2, 2, 64, KVT_DTYPE_F16);
	KVT_REQUIRE(kvt_client_open(g_c, &p, &i, &st) == 0, "open: %s", st.message);
	KVT_CHECK(i.created == 1, "created");
	/* The daemon's default codec is the preset kvtier-int2 (docs/realmodel/int2.md). */
	KVT_CHECK(i.codec.scheme == KVT_CLIENT_SCHEME_OSCAR && i.codec.key_bits == 3 &&
			  i.codec.value_bits == 2 && i.codec.group == 64 &&
			  i.codec.chunk_tokens == 64 && i.codec.n_sinks == 8 &&
			  i.codec.recent_exact_tokens == 128 && !strcmp(i.codec.preset, "kvtier-int2"),
		  "daemon defaults in SessionInfo (scheme %u bits %u B %u S %d W %d preset '%s')",
		  i.codec.scheme, i.codec.key_bits, i.codec.chunk_tokens, i.codec.n_sinks,
		  i.codec.recent_exact_tokens, i.codec.preset);
	KVT_REQUIRE(kvt_client_open(g_c, &p, &i, &st) == 0, "re-open: %s", st.message);
	KVT_CHECK(i.created == 0, "re-open of the same shape is not a create");
	for (int j = 0; j < 5; j++) {
		char id[32];
		snprintf(id, sizeof(id), "list-b%d", j);
		p.session_id = id;
		KVT_REQUIRE(kvt_client_open(g_c, &p, NULL, &st) == 0, "open %s", id);
	}
	KVT_REQUIRE(kvt_client_list(g_c, "list-b", &list, &n, &st) == 0, "list: %s", st.message);
	KVT_CHECK(n == 5, "prefix list has %zu sessions", n);
	for (size_t j = 0; j + 1 < n; j++)
		KVT_CHECK(strcmp(list[j].session_id, list[j + 1].session_id) < 0, "ordered by id");
	free(list);
	KVT_REQUIRE(kvt_client_list_page(g_c, "list-", 2, NULL, &list, &n, next, sizeof(next),
					 &st) == 0, "page: %s", st.message);
	KVT_CHECK(n == 2 && next[0], "first page of 2 with a next token (%zu)", n);
	KVT_CHECK(n == 2 && !strcmp(list[0].session_id, "list-a"), "first id");
	free(list);
	KVT_REQUIRE(kvt_client_list_page(g_c, "list-", 2, next, &list, &n, next, sizeof(next),
					 &st) == 0, "page 2: %s", st.message);
	KVT_CHECK(n == 2 && !strcmp(list[0].session_id, "list-b1"), "page 2 starts at list-b1");
	free(list);

	KVT_REQUIRE(kvt_client_pin(g_c, "list-a", &i, &st) == 0, "pin: %s", st.message);
	KVT_CHECK(i.pinned == 1, "pinned");
	KVT_REQUIRE(kvt_client_unpin(g_c, "list-a", &i, &st) == 0, "unpin: %s", st.message);
	KVT_CHECK(i.pinned == 0, "unpinned");
	KVT_REQUIRE(kvt_client_set_ttl(g_c, "list-a", 123, &i, &st) == 0, "ttl: %s", st.message);
	KVT_CHECK(i.ttl_seconds == 123, "ttl %u", i.ttl_seconds);
	for (int j = 0; j < 5; j++) {
		char id[32];
		snprintf(id, sizeof(id), "list-b%d", j);
		KVT_CHECK(kvt_client_drop(g_c, id, NULL, &st) == 0, "drop %s", id);
	}
	KVT_CHECK(kvt_client_drop(g_c, "list-a", NULL, &st) == 0, "drop list-a");
}

/* Prefetch answers the tier; Stats totals agree with the listing; RestoreToDevice without a
 * GPU is refused cleanly (the daemon keeps serving). */
static void test_prefetch_stats_restore(void)
{
	struct it_session a, b;
	struct kvt_client_status st;
	struct kvt_client_stats s;
	struct kvt_client_session_info *list = NULL;
	size_t n = 0;
	uint64_t tokens = 0;
	char tier[16] = "";
	int serving = 0;

	KVT_REQUIRE(open_session(g_c, &a, "pf-a", 2, 2, 64, KVT_DTYPE_F16, NULL) == 0, "open");
	KVT_REQUIRE(open_session(g_c, &b, "pf-b", 3, 1, 128, KVT_DTYPE_BF16, NULL) == 0, "open");
	KVT_REQUIRE(append_both(g_c, &a, 130, NULL) == 0, "append");
	KVT_REQUIRE(append_both(g_c, &b, 7, NULL) == 0, "append");
	KVT_CHECK(kvt_client_prefetch(g_c, a.id, tier, sizeof(tier), &st) == 0 && tier[0],
		  "prefetch: %s", st.message);
	KVT_CHECK(kvt_client_prefetch(g_c, "pf-missing", tier, sizeof(tier), &st) == -ENOENT,
		  "prefetch of an unknown session: %s", kvt_client_code_name(st.code));

	KVT_REQUIRE(kvt_client_stats(g_c, &s, &st) == 0, "stats: %s", st.message);
	KVT_REQUIRE(kvt_client_list(g_c, NULL, &list, &n, &st) == 0, "list: %s", st.message);
	for (size_t i = 0; i < n; i++)
		tokens += list[i].n_tokens;
	KVT_CHECK(s.sessions == n, "stats sessions %llu, listed %zu", (unsigned long long)s.sessions, n);
	KVT_CHECK(s.tokens == tokens, "stats tokens %llu, listed %llu", (unsigned long long)s.tokens,
		  (unsigned long long)tokens);
	KVT_CHECK(s.n_tiers >= 1 && s.n_counters >= 1, "%zu tiers, %zu counters", s.n_tiers,
		  s.n_counters);
	free(list);

	if (!s.gpu) {
		struct kvt_client_restore r;
		uint8_t handle[64] = { 0 };
		memset(&r, 0, sizeof(r));
		r.session_id = a.id;
		r.ipc_mem_handle = handle;
		r.ipc_mem_handle_bytes = sizeof(handle);
		r.buffer_bytes = 1 << 20;
		r.layout = 1;
		r.token_end = KVT_CLIENT_END;
		r.layer_end = KVT_CLIENT_ALL_LAYERS;
		r.dtype = KVT_DTYPE_F16;
		int rc = kvt_client_restore_to_device(g_c, &r, NULL, &st);
		KVT_CHECK(rc != 0 && !st.local &&
				  (st.code == KVT_CODE_UNIMPLEMENTED ||
				   st.code == KVT_CODE_FAILED_PRECONDITION),
			  "RestoreToDevice without a GPU: %s %s", kvt_client_code_name(st.code),
			  st.message);
	}
	kvt_client_stats_free(&s);
	KVT_CHECK(kvt_client_health(g_c, "", 0, &serving, &st) == 0 && serving == 1, "serving");
	KVT_CHECK(stat_matches(g_c, &a) && stat_matches(g_c, &b), "sessions intact");
	kvt_client_drop(g_c, a.id, NULL, &st);
	kvt_client_drop(g_c, b.id, NULL, &st);
	close_session(&a);
	close_session(&b);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void pause_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

/* Idle expiry: a session with ttl 1 s disappears (bounded poll); a pinned one never does. */
static void test_ttl_expiry(void)
{
	struct kvt_client_session_params p;
	struct kvt_client_session_info i;
	struct kvt_client_status st;
	uint64_t t0, deadline;
	int gone = 0;

	kvt_client_session_params_init(&p, "ttl-short", 1, 1, 64, KVT_DTYPE_F16);
	p.ttl_seconds = 1;
	KVT_REQUIRE(kvt_client_open(g_c, &p, &i, &st) == 0, "open: %s", st.message);
	KVT_CHECK(i.ttl_seconds == 1, "ttl 1");
	p.session_id = "ttl-pinned";
	p.pinned = 1;
	KVT_REQUIRE(kvt_client_open(g_c, &p, &i, &st) == 0, "open pinned: %s", st.message);
	t0 = now_ms();
	deadline = t0 + 15000;
	while (now_ms() < deadline) {
		/* Stat would touch the session and restart its idle clock: watch the listing. */
		struct kvt_client_session_info *list;
		size_t n;
		KVT_REQUIRE(kvt_client_list(g_c, "ttl-short", &list, &n, &st) == 0, "list: %s",
			    st.message);
		free(list);
		if (n == 0) {
			gone = 1;
			break;
		}
		pause_ms(50);
	}
	KVT_CHECK(gone, "ttl-short still listed 15 s after its 1 s ttl");
	KVT_CHECK(now_ms() - t0 >= 900, "expired after %llu ms, before its ttl",
		  (unsigned long long)(now_ms() - t0));
	KVT_CHECK(kvt_client_stat(g_c, "ttl-short", &i, &st) == -ENOENT, "expired: NOT_FOUND");
	KVT_CHECK(kvt_client_stat(g_c, "ttl-pinned", &i, &st) == 0, "pinned session survives: %s",
		  st.message);
	kvt_client_drop(g_c, "ttl-pinned", NULL, &st);
}

/* The daemon frees its pooled Fetch reply buffers after reply_pool_idle_ms (1500 ms here)
 * without a Fetch, not before, and a later Fetch refills the pool with the same bytes. */
static void test_reply_pool_trim(void)
{
	struct it_session s;
	struct kvt_client_codec codec;
	struct kvt_client_status st;
	uint64_t t0, resident = UINT64_MAX, deadline;

	kvt_client_codec_init(&codec);
	KVT_REQUIRE(open_session(g_c, &s, "pool-trim", 2, 2, 64, KVT_DTYPE_F16, &codec) == 0,
		    "open");
	KVT_REQUIRE(append_both(g_c, &s, 200, NULL) == 0, "append");
	t0 = now_ms();
	KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, 0, 200, 0, 2, KVT_DTYPE_F16,
				       KVT_CLIENT_FETCH_SERVER),
		  "server fetch before the trim");
	resident = it_counter(g_c, "rpc.reply_pool_resident");
	if (now_ms() - t0 < 1000) /* a stalled machine may have passed the idle time already */
		KVT_CHECK(resident >= 1 && resident != UINT64_MAX,
			  "a Fetch leaves its reply buffer pooled: %llu",
			  (unsigned long long)resident);
	deadline = t0 + 15000;
	while (now_ms() < deadline) {
		resident = it_counter(g_c, "rpc.reply_pool_resident");
		if (resident == 0)
			break;
		pause_ms(50);
	}
	KVT_CHECK(resident == 0, "pooled reply buffers freed after the idle time: %llu left",
		  (unsigned long long)resident);
	KVT_CHECK(now_ms() - t0 >= 1400, "trimmed after %llu ms, before reply_pool_idle_ms",
		  (unsigned long long)(now_ms() - t0));
	KVT_CHECK(it_fetch_equals_mode(g_c, s.id, s.ref, 3, 170, 1, 2, KVT_DTYPE_F32,
				       KVT_CLIENT_FETCH_SERVER),
		  "server fetch after the trim");
	KVT_CHECK(it_counter(g_c, "rpc.reply_pool_resident") >= 1, "the pool refills");
	kvt_client_drop(g_c, s.id, NULL, &st);
	close_session(&s);
}

/* FetchEncoded -> StoreEncoded into a new session -> identical Fetch; chunks byte-equal to the
 * local encoder's. */
static void test_encoded_roundtrip(void)
{
	struct it_session s;
	struct kvt_client_encoded *enc = NULL;
	struct kvt_client_session_params p;
	struct kvt_client_session_info i;
	struct kvt_client_status st;

	KVT_REQUIRE(open_session(g_c, &s, "enc-src", 4, 2, 128, KVT_DTYPE_BF16, NULL) == 0, "open");
	KVT_REQUIRE(append_both(g_c, &s, 3 * 128 + 45, NULL) == 0, "append");
	KVT_REQUIRE(kvt_client_fetch_encoded(g_c, s.id, 0, KVT_CLIENT_ALL_CHUNKS, 1, &enc, &st) == 0,
		    "fetch_encoded: %s", st.message);
	/* The default codec (kvtier-int2: B 64, W 128) seals 5 chunks of 429 tokens and keeps
	 * 109 exact; the local reference sequence has the same config. */
	const uint32_t ref_chunks = kvt_seq_n_chunks(s.ref), ref_tail = kvt_seq_tail_tokens(s.ref);
	KVT_CHECK(ref_chunks == 5 && ref_tail == 109, "reference: %u chunks + %u tail", ref_chunks,
		  ref_tail);
	KVT_CHECK(enc->n_chunks == ref_chunks && enc->tail_tokens == ref_tail,
		  "%u chunks + %u tail, got %zu + %u", ref_chunks, ref_tail, enc->n_chunks,
		  enc->tail_tokens);
	for (size_t j = 0; j < enc->n_chunks && j < kvt_seq_n_chunks(s.ref); j++) {
		const struct kvt_chunk *lc = kvt_seq_chunk(s.ref, (uint32_t)j);
		KVT_CHECK(enc->chunks[j].n_bytes == lc->size_bytes &&
				  !memcmp(enc->chunks[j].bytes, lc->bytes, lc->size_bytes),
			  "chunk %zu equals the local encoder's bytes", j);
	}
	KVT_CHECK(kvt_client_kv_bytes(&(struct kvt_client_shape){ 4, 2, 128, KVT_DTYPE_BF16 },
				      ref_tail) > 0 &&
			  !memcmp(enc->tail_k, kvt_seq_tail_k(s.ref, 0), (size_t)ref_tail * 2 * 128 * 2),
		  "tail layer 0 equals the local tail");

	kvt_client_session_params_init(&p, "enc-dst", 4, 2, 128, KVT_DTYPE_BF16);
	p.codec = enc->info.codec;
	KVT_REQUIRE(kvt_client_store_encoded(g_c, &p, enc, &i, &st) == 0, "store_encoded: %s",
		    st.message);
	KVT_CHECK(i.n_tokens == kvt_seq_tokens(s.ref) && i.n_chunks == ref_chunks &&
			  i.tail_tokens == ref_tail,
		  "stored session has %llu tokens", (unsigned long long)i.n_tokens);
	KVT_CHECK(it_fetch_equals(g_c, "enc-dst", s.ref, 0, kvt_seq_tokens(s.ref), 0, 4,
				  KVT_DTYPE_BF16),
		  "stored session fetches identically");
	KVT_CHECK(it_fetch_equals(g_c, "enc-dst", s.ref, 10, 300, 1, 3, KVT_DTYPE_F32),
		  "stored session partial fetch");
	kvt_client_encoded_free(enc);
	kvt_client_drop(g_c, "enc-dst", NULL, &st);
	kvt_client_drop(g_c, s.id, NULL, &st);
	close_session(&s);
}

/* Capacity: reject -> RESOURCE_EXHAUSTED and nothing changed; drop-coldest -> the coldest
 * unpinned session goes, a pinned one survives. */
static void test_capacity(int policy_reject)
{
	static const char *const reject_args[] = { "--host_capacity_bytes=1MiB",
						   "--max_append_bytes=256KiB",
						   "--capacity_policy=reject", NULL };
	static const char *const drop_args[] = { "--host_capacity_bytes=1MiB",
						 "--max_append_bytes=256KiB",
						 "--capacity_policy=drop-coldest", NULL };
	struct kvt_daemon d;
	struct kvt_client *c = NULL;
	struct kvt_client_status st;
	struct kvt_client_session_info after;
	struct kvt_client_codec codec;
	struct it_session s[12];
	int n_open = 0, rejected = -1, serving = 0;

	KVT_REQUIRE(kvt_daemon_start(&d, policy_reject ? reject_args : drop_args) == 0, "start");
	KVT_REQUIRE(kvt_daemon_client(&d, 0, &c) == 0, "connect");
	/* Exact sessions of 32 KiB per 64 tokens: 1 MiB holds a few dozen appends. */
	kvt_client_codec_init(&codec);
	codec.scheme = KVT_CLIENT_SCHEME_NONE;
	codec.chunk_tokens = 64;
	codec.group = 32;
	for (int j = 0; j < 12; j++) {
		char id[32];
		int rc;
		snprintf(id, sizeof(id), "cap-%02d", j);
		/* Either the open (its tail buffer) or the append (staging, then the tail) may be
		 * what no longer fits; both must be refused cleanly under reject. */
		{
			struct kvt_client_session_params p;
			struct kvt_client_session_info info;
			struct kvt_codec_config cfg;
			char err[256];
			kvt_client_session_params_init(&p, id, 4, 2, 128, KVT_DTYPE_F16);
			p.codec = codec;
			memset(&s[j], 0, sizeof(s[j]));
			snprintf(s[j].id, sizeof(s[j].id), "%s", id);
			rc = kvt_client_open(c, &p, &info, &st);
			if (rc == 0) {
				s[j].info = info;
				it_config_from_info(&info, &cfg);
				KVT_REQUIRE(kvt_seq_create(&cfg, NULL, &s[j].ref, err, sizeof(err)) == 0,
					    "%s", err);
				n_open++;
			}
		}
		if (rc == 0 && j == 0)
			KVT_REQUIRE(kvt_client_pin(c, s[0].id, NULL, &st) == 0, "pin: %s", st.message);
		if (rc == 0) {
			/* 60 tokens x 4 layers x 2 heads x 128 x 2 B x (K+V) = 240 KiB */
			struct kvt_client_shape sh = it_shape(&s[j].info);
			size_t bytes = kvt_client_kv_bytes(&sh, 60);
			void *k = it_xmalloc(bytes), *v = it_xmalloc(bytes);
			it_gen_kv(4, 2, 128, KVT_DTYPE_F16, 0, 60, k, v);
			rc = kvt_client_append(c, s[j].id, &sh, k, v, 60, NULL, NULL, &st);
			if (rc == 0) {
				char err[256];
				KVT_REQUIRE(kvt_seq_append(s[j].ref, k, v, 60, err, sizeof(err)) == 0, "%s",
					    err);
			}
			free(k);
			free(v);
			if (rc == 0)
				continue;
			KVT_CHECK(kvt_client_stat(c, s[j].id, &after, NULL) == 0 && after.n_tokens == 0,
				  "the rejected append changed nothing (%llu tokens)",
				  (unsigned long long)after.n_tokens);
		} else {
			struct kvt_client_status st2;
			KVT_CHECK(kvt_client_stat(c, id, &after, &st2) == -ENOENT,
				  "a rejected open created %s", id);
		}
		KVT_CHECK(policy_reject, "drop-coldest refused a request: %s %s",
			  kvt_client_code_name(st.code), st.message);
		KVT_CHECK(rc == -ENOSPC && st.code == KVT_CODE_RESOURCE_EXHAUSTED,
			  "full host tier: %s %s", kvt_client_code_name(st.code), st.message);
		KVT_CHECK(strstr(st.message, "host_capacity_bytes") != NULL,
			  "message names the limit: %s", st.message);
		rejected = j;
		break;
	}
	if (policy_reject) {
		KVT_CHECK(rejected > 0, "1 MiB never filled up (%d sessions of 240 KiB)", n_open);
		for (int j = 0; j < rejected; j++)
			KVT_CHECK(it_fetch_equals(c, s[j].id, s[j].ref, 0, 60, 0, 4, KVT_DTYPE_F16),
				  "%s intact after a rejection", s[j].id);
		KVT_CHECK(kvt_client_health(c, "", 0, &serving, &st) == 0 && serving == 1,
			  "serving after a rejection");
	} else {
		/* The first unpinned sessions (coldest) went; the pinned one and the newest stayed. */
		int present[12] = { 0 }, n_gone = 0;
		for (int j = 0; j < n_open; j++) {
			present[j] = kvt_client_stat(c, s[j].id, &after, &st) == 0;
			n_gone += !present[j];
		}
		KVT_CHECK(n_gone > 0, "nothing was dropped from a 1 MiB tier after %d x 240 KiB", n_open);
		KVT_CHECK(present[0], "the pinned session survived");
		KVT_CHECK(present[n_open - 1], "the newest session survived");
		KVT_CHECK(!present[1], "the coldest unpinned session (cap-01) was dropped");
		for (int j = 0; j < n_open; j++)
			if (present[j])
				KVT_CHECK(it_fetch_equals(c, s[j].id, s[j].ref, 0, 60, 0, 4, KVT_DTYPE_F16),
					  "%s content intact", s[j].id);
		/* Dropped in cold-to-hot order: once one survives, all newer ones survive too. */
		int seen_present = 0;
		for (int j = 1; j < n_open; j++) {
			if (present[j])
				seen_present = 1;
			else
				KVT_CHECK(!seen_present, "%s dropped while an older one survived", s[j].id);
		}
	}
	for (int j = 0; j < n_open; j++)
		if (s[j].ref)
			close_session(&s[j]);
	kvt_client_close(c);
	KVT_CHECK(kvt_daemon_stop(&d) == 0, "daemon exit 0 after SIGTERM");
}

static void test_capacity_reject(void) { test_capacity(1); }
static void test_capacity_drop_coldest(void) { test_capacity(0); }

int main(void)
{
	static const char *const args[] = { "--maintenance_interval_ms=50",
					    "--reply_pool_idle_ms=1500", NULL };
	kvt_test_init();
	it_seed(0);
	if (kvt_daemon_start_client(&g_d, args, &g_c) != 0)
		return 1;
	KVT_RUN(test_health_and_stats);
	KVT_RUN(test_append_fetch_reference);
	KVT_RUN(test_fetch_small_messages);
	KVT_RUN(test_fetch_modes);
	KVT_RUN(test_attend_new_token);
	KVT_RUN(test_fork_truncate_drop);
	KVT_RUN(test_open_pin_ttl_list);
	KVT_RUN(test_ttl_expiry);
	KVT_RUN(test_reply_pool_trim);
	KVT_RUN(test_encoded_roundtrip);
	KVT_RUN(test_prefetch_stats_restore);
	kvt_client_close(g_c);
	KVT_CHECK(kvt_daemon_stop(&g_d) == 0, "daemon exit 0 after SIGTERM");
	KVT_RUN(test_capacity_reject);
	KVT_RUN(test_capacity_drop_coldest);
	return kvt_test_done();
}

/*
 * kvtierctl - the command-line client of kvtierd, over libkvtier.
 *
 *   kvtierctl [--socket PATH | --target T] [--timeout-ms N] [--token TOKEN] COMMAND [ARGS]
 *
 * Commands: health, stats, sessions [PREFIX], stat ID, drop ID, put ID, get ID, demo, bench.
 * Exit status: 0 on success, 1 when the daemon answered with an error, 2 on a usage error.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvt_codec.h"
#include "kvtctl_npy.h"
#include "kvtier_client.h"

struct global_opts {
	const char *target;
	char target_buf[512];
	uint32_t timeout_ms;
	const char *token;
};

static void usage(FILE *out)
{
	fprintf(out,
		"usage: kvtierctl [--socket PATH | --target T] [--timeout-ms N] [--token TOKEN] COMMAND\n"
		"\n"
		"  --socket PATH     unix socket of kvtierd (default: $KVTIER_SOCKET, else\n"
		"                    $RUNTIME_DIRECTORY/kvtierd.sock, else ./run/kvtierd.sock)\n"
		"  --target T        any gRPC target: unix:PATH, 127.0.0.1:PORT\n"
		"\n"
		"commands:\n"
		"  health [--service S] [--wait-ms N]   SERVING or not (waits up to N ms for SERVING)\n"
		"  stats                                 daemon totals, tiers and counters\n"
		"  sessions [PREFIX]                     list sessions\n"
		"  stat ID                               one session\n"
		"  drop ID                               drop a session\n"
		"  put ID --k K.npy --v V.npy [--dtype f16|bf16|f32] [codec flags] [--ttl S] [--pin]\n"
		"        K, V: [layers][tokens][kv_heads][head_dim] float16 or float32 .npy\n"
		"        codec flags: --scheme none|kivi|hadamard|oscar --key-bits N --value-bits N\n"
		"                     --group G --chunk-tokens B --sinks S --no-rotate-v\n"
		"  get ID --out-k K.npy --out-v V.npy [--tokens A:B] [--layers A:B] [--dtype f16|f32]\n"
		"  demo [--sessions N] [--tokens T] [--layers L] [--kv-heads H] [--q-heads HQ]\n"
		"       [--head-dim D] [--block-tokens N] [--attend-steps N] [codec flags] [--keep]\n"
		"        synthetic TNI-like KV through the daemon: compression, bits per element,\n"
		"        attention error against exact fp16 attention, throughput\n"
		"  bench [demo flags]   the demo workload as JSON lines (one per measurement) with\n"
		"                       memcpy of the same bytes in the same run as the reference\n");
}

static int fail_status(const char *what, int rc, const struct kvt_client_status *st)
{
	fprintf(stderr, "kvtierctl: %s: %s (%d): %s\n", what, kvt_client_code_name(st->code), rc,
		st->message);
	return 1;
}

static int parse_u32(const char *s, uint32_t *out)
{
	char *e;
	unsigned long v;
	errno = 0;
	v = strtoul(s, &e, 0);
	if (errno || e == s || *e || v > UINT32_MAX)
		return -EINVAL;
	*out = (uint32_t)v;
	return 0;
}

static int parse_range(const char *s, uint64_t *a, uint64_t *b)
{
	char *e;
	const char *colon = strchr(s, ':');
	if (!colon)
		return -EINVAL;
	*a = colon == s ? 0 : strtoull(s, &e, 10);
	if (colon != s && e != colon)
		return -EINVAL;
	if (!colon[1]) {
		*b = KVT_CLIENT_END;
		return 0;
	}
	*b = strtoull(colon + 1, &e, 10);
	return *e ? -EINVAL : 0;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int connect_client(const struct global_opts *g, struct kvt_client **c)
{
	struct kvt_client_options o = { 0 };
	struct kvt_client_status st;
	int rc;

	o.target = g->target;
	o.call_timeout_ms = g->timeout_ms;
	o.connect_timeout_ms = 5000;
	o.bearer_token = g->token;
	rc = kvt_client_connect(&o, c, &st);
	if (rc)
		return fail_status(g->target, rc, &st);
	return 0;
}

/* ---- codec flags shared by put, demo, bench ------------------------------------------------- */

/* Returns 1 when argv[*i] was a codec flag (consuming its value), 0 when not, -1 on error. */
static int parse_codec_flag(int argc, char **argv, int *i, struct kvt_client_codec *c)
{
	const char *a = argv[*i];
	uint32_t v;
	if (!strcmp(a, "--no-rotate-v")) {
		c->rotate_v = 0;
		return 1;
	}
	if (strcmp(a, "--scheme") && strcmp(a, "--key-bits") && strcmp(a, "--value-bits") &&
	    strcmp(a, "--group") && strcmp(a, "--chunk-tokens") && strcmp(a, "--sinks"))
		return 0;
	if (*i + 1 >= argc) {
		fprintf(stderr, "kvtierctl: %s needs a value\n", a);
		return -1;
	}
	const char *val = argv[++*i];
	if (!strcmp(a, "--scheme")) {
		int s = kvt_scheme_parse(val);
		if (s < 0) {
			fprintf(stderr, "kvtierctl: --scheme %s is not none, kivi, hadamard or oscar\n",
				val);
			return -1;
		}
		c->scheme = (uint32_t)s + 1; /* the wire numbering starts at DEFAULT = 0 */
		return 1;
	}
	if (parse_u32(val, &v)) {
		fprintf(stderr, "kvtierctl: %s %s is not a number\n", a, val);
		return -1;
	}
	if (!strcmp(a, "--key-bits"))
		c->key_bits = v;
	else if (!strcmp(a, "--value-bits"))
		c->value_bits = v;
	else if (!strcmp(a, "--group"))
		c->group = v;
	else if (!strcmp(a, "--chunk-tokens"))
		c->chunk_tokens = v;
	else
		c->n_sinks = (int32_t)v;
	return 1;
}

static const char *wire_scheme_name(uint32_t s)
{
	return s >= 1 ? kvt_scheme_name(s - 1) : "default";
}

/* ---- simple commands --------------------------------------------------------------------------- */

static int cmd_health(const struct global_opts *g, int argc, char **argv)
{
	struct kvt_client_options o = { 0 };
	struct kvt_client *c;
	struct kvt_client_status st = { 0 };
	const char *service = "";
	uint32_t wait_ms = 0;
	int serving = 0, rc;
	double t_end;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--service") && i + 1 < argc)
			service = argv[++i];
		else if (!strcmp(argv[i], "--wait-ms") && i + 1 < argc && !parse_u32(argv[i + 1], &wait_ms))
			i++;
		else {
			usage(stderr);
			return 2;
		}
	}
	o.target = g->target;
	o.lazy = 1; /* health reports "not reachable" instead of failing to connect */
	o.bearer_token = g->token;
	rc = kvt_client_connect(&o, &c, &st);
	if (rc)
		return fail_status(g->target, rc, &st);
	t_end = now_s() + wait_ms / 1000.0;
	for (;;) {
		rc = kvt_client_health(c, service, 2000, &serving, &st);
		if (rc == 0 && serving == 1)
			break;
		if (now_s() >= t_end)
			break;
		/* bounded polling while the daemon starts: a short pause between attempts */
		usleep(100 * 1000);
	}
	kvt_client_close(c);
	if (rc) {
		printf("NOT REACHABLE %s: %s: %s\n", g->target, kvt_client_code_name(st.code),
		       st.message);
		return 1;
	}
	printf("%s\n", serving == 1 ? "SERVING" : serving == 2 ? "NOT_SERVING" : "UNKNOWN");
	return serving == 1 ? 0 : 1;
}

static void print_info(const struct kvt_client_session_info *i)
{
	printf("session_id        %s\n", i->session_id);
	printf("shape             layers %u, kv_heads %u, head_dim %u, dtype %s\n", i->n_layers,
	       i->n_kv_heads, i->head_dim, kvt_dtype_name(i->dtype) ? kvt_dtype_name(i->dtype) : "?");
	printf("codec             %s K%u/V%u G%u B%u sinks %d rotate_v %d pin_detect %.3f/%d\n",
	       wire_scheme_name(i->codec.scheme), i->codec.key_bits, i->codec.value_bits,
	       i->codec.group, i->codec.chunk_tokens, i->codec.n_sinks, i->codec.rotate_v,
	       i->codec.pin_detect_ratio, i->codec.pin_detect_max);
	printf("tokens            %" PRIu64 " (%u chunks sealed, %u in the exact tail)\n",
	       i->n_tokens, i->n_chunks, i->tail_tokens);
	printf("bytes_held        %" PRIu64 " (dense f16: %" PRIu64 ", %.2fx)\n", i->bytes_held,
	       i->logical_bytes,
	       i->bytes_held ? (double)i->logical_bytes / (double)i->bytes_held : 0.0);
	printf("bits_per_element  %.3f (sealed chunks)\n", i->bits_per_element);
	printf("pinned            %s\n", i->pinned ? "yes" : "no");
	printf("ttl_seconds       %u%s\n", i->ttl_seconds, i->ttl_seconds ? "" : " (never expires)");
	printf("idle_ms           %" PRIu64 "\n", i->idle_ms);
	printf("tier              %s\n", i->tier[0] ? i->tier : "-");
}

static int cmd_stats(const struct global_opts *g, int argc, char **argv)
{
	struct kvt_client *c;
	struct kvt_client_stats s;
	struct kvt_client_status st;
	int rc;

	if (argc != 1) {
		usage(stderr);
		return 2;
	}
	if (connect_client(g, &c))
		return 1;
	rc = kvt_client_stats(c, &s, &st);
	kvt_client_close(c);
	if (rc)
		return fail_status("stats", rc, &st);
	printf("version        %s\n", s.version);
	printf("uptime_ms      %" PRIu64 "\n", s.uptime_ms);
	printf("codec_isa      %s, gpu %s\n", s.codec_isa, s.gpu ? "yes" : "no");
	printf("sessions       %" PRIu64 "\n", s.sessions);
	printf("tokens         %" PRIu64 "\n", s.tokens);
	printf("bytes_held     %" PRIu64 " (dense f16: %" PRIu64 ", %.2fx)\n", s.bytes_held,
	       s.logical_bytes, s.bytes_held ? (double)s.logical_bytes / (double)s.bytes_held : 0.0);
	for (size_t i = 0; i < s.n_tiers; i++)
		printf("tier %-9s used %" PRIu64 " of %" PRIu64 " bytes, %" PRIu64 " chunks\n",
		       s.tiers[i].name, s.tiers[i].used_bytes, s.tiers[i].capacity_bytes,
		       s.tiers[i].chunks);
	for (size_t i = 0; i < s.n_counters; i++)
		printf("counter %-40s %" PRIu64 "\n", s.counters[i].name, s.counters[i].value);
	kvt_client_stats_free(&s);
	return 0;
}

static int cmd_sessions(const struct global_opts *g, int argc, char **argv)
{
	struct kvt_client *c;
	struct kvt_client_session_info *list;
	struct kvt_client_status st;
	size_t n;
	int rc;

	if (argc > 2) {
		usage(stderr);
		return 2;
	}
	if (connect_client(g, &c))
		return 1;
	rc = kvt_client_list(c, argc == 2 ? argv[1] : NULL, &list, &n, &st);
	kvt_client_close(c);
	if (rc)
		return fail_status("sessions", rc, &st);
	printf("%-40s %10s %8s %12s %7s %6s %s\n", "SESSION", "TOKENS", "CHUNKS", "BYTES", "RATIO",
	       "PINNED", "CODEC");
	for (size_t i = 0; i < n; i++)
		printf("%-40s %10" PRIu64 " %8u %12" PRIu64 " %6.2fx %6s %s/%u/%u\n",
		       list[i].session_id, list[i].n_tokens, list[i].n_chunks, list[i].bytes_held,
		       list[i].bytes_held ? (double)list[i].logical_bytes / (double)list[i].bytes_held :
					    0.0,
		       list[i].pinned ? "yes" : "no", wire_scheme_name(list[i].codec.scheme),
		       list[i].codec.key_bits, list[i].codec.value_bits);
	printf("%zu session%s\n", n, n == 1 ? "" : "s");
	free(list);
	return 0;
}

static int cmd_stat_drop(const struct global_opts *g, int argc, char **argv, int drop)
{
	struct kvt_client *c;
	struct kvt_client_session_info i;
	struct kvt_client_status st;
	uint64_t freed = 0;
	int rc;

	if (argc != 2) {
		usage(stderr);
		return 2;
	}
	if (connect_client(g, &c))
		return 1;
	rc = drop ? kvt_client_drop(c, argv[1], &freed, &st) : kvt_client_stat(c, argv[1], &i, &st);
	kvt_client_close(c);
	if (rc)
		return fail_status(argv[0], rc, &st);
	if (drop)
		printf("dropped %s (%" PRIu64 " bytes freed)\n", argv[1], freed);
	else
		print_info(&i);
	return 0;
}

/* ---- put / get --------------------------------------------------------------------------------- */

static int cmd_put(const struct global_opts *g, int argc, char **argv)
{
	const char *kpath = NULL, *vpath = NULL, *id;
	struct kvt_client_session_params p;
	struct kvt_client_codec codec;
	struct kvtctl_npy kn = { 0 }, vn = { 0 };
	struct kvt_client *c = NULL;
	struct kvt_client_session_info info;
	struct kvt_client_append_result res;
	struct kvt_client_status st;
	struct kvt_client_shape sh;
	uint32_t dtype = 0, ttl = 0;
	int has_ttl = 0, pin = -1, rc = 1;
	void *kw = NULL, *vw = NULL;
	char err[256];
	double t0;

	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	id = argv[1];
	kvt_client_codec_init(&codec);
	for (int i = 2; i < argc; i++) {
		int r = parse_codec_flag(argc, argv, &i, &codec);
		if (r < 0)
			return 2;
		if (r)
			continue;
		if (!strcmp(argv[i], "--k") && i + 1 < argc)
			kpath = argv[++i];
		else if (!strcmp(argv[i], "--v") && i + 1 < argc)
			vpath = argv[++i];
		else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
			int d = kvt_dtype_parse(argv[++i]);
			if (d < 0) {
				fprintf(stderr, "kvtierctl: --dtype %s is not f16, bf16 or f32\n", argv[i]);
				return 2;
			}
			dtype = (uint32_t)d;
		} else if (!strcmp(argv[i], "--ttl") && i + 1 < argc && !parse_u32(argv[i + 1], &ttl)) {
			has_ttl = 1;
			i++;
		} else if (!strcmp(argv[i], "--pin"))
			pin = 1;
		else {
			usage(stderr);
			return 2;
		}
	}
	if (!kpath || !vpath) {
		fprintf(stderr, "kvtierctl: put needs --k and --v\n");
		return 2;
	}
	if (kvtctl_npy_read(kpath, &kn, err, sizeof(err)) ||
	    kvtctl_npy_read(vpath, &vn, err, sizeof(err))) {
		fprintf(stderr, "kvtierctl: %s\n", err);
		goto out;
	}
	if (kn.ndim != 4 || vn.ndim != 4 || memcmp(kn.shape, vn.shape, sizeof(kn.shape)) ||
	    kn.dtype != vn.dtype) {
		fprintf(stderr, "kvtierctl: K and V must both be 4-D [layers][tokens][kv_heads][head_dim] of one dtype and shape\n");
		goto out;
	}
	if (kn.shape[1] == 0 || kn.shape[1] > UINT32_MAX) {
		fprintf(stderr, "kvtierctl: %" PRIu64 " tokens is outside 1..%u\n", kn.shape[1],
			UINT32_MAX);
		goto out;
	}
	if (!dtype)
		dtype = kn.dtype;
	sh.n_layers = (uint32_t)kn.shape[0];
	sh.n_kv_heads = (uint32_t)kn.shape[2];
	sh.head_dim = (uint32_t)kn.shape[3];
	sh.dtype = dtype;
	size_t n_el = kn.n_bytes / kvt_dtype_size(kn.dtype);
	kw = malloc(n_el * kvt_dtype_size(dtype));
	vw = malloc(n_el * kvt_dtype_size(dtype));
	if (!kw || !vw) {
		fprintf(stderr, "kvtierctl: out of memory\n");
		goto out;
	}
	kvt_convert(kn.data, kn.dtype, kw, dtype, n_el);
	kvt_convert(vn.data, vn.dtype, vw, dtype, n_el);
	if (connect_client(g, &c))
		goto out;
	kvt_client_session_params_init(&p, id, sh.n_layers, sh.n_kv_heads, sh.head_dim, dtype);
	p.codec = codec;
	p.pinned = pin;
	if (has_ttl)
		p.ttl_seconds = ttl;
	if ((rc = kvt_client_open(c, &p, &info, &st))) {
		rc = fail_status("open", rc, &st);
		goto out;
	}
	t0 = now_s();
	if ((rc = kvt_client_append(c, id, &sh, kw, vw, (uint32_t)kn.shape[1], NULL, &res, &st))) {
		rc = fail_status("append", rc, &st);
		goto out;
	}
	double dt = now_s() - t0;
	printf("%s: appended %" PRIu64 " tokens in %u messages (%.1f MB/s); session has %" PRIu64
	       " tokens, %u chunks sealed by this append\n",
	       id, res.appended, res.messages_sent, 2.0 * (double)kvt_client_kv_bytes(&sh, kn.shape[1]) / dt / 1e6,
	       res.n_tokens, res.chunks_sealed);
	rc = 0;
out:
	kvt_client_close(c);
	kvtctl_npy_free(&kn);
	kvtctl_npy_free(&vn);
	free(kw);
	free(vw);
	return rc;
}

static int cmd_get(const struct global_opts *g, int argc, char **argv)
{
	const char *kpath = NULL, *vpath = NULL, *id;
	struct kvt_client_fetch_range r;
	struct kvt_client_session_info info;
	struct kvt_client_fetch_result res;
	struct kvt_client_status st;
	struct kvt_client *c = NULL;
	uint64_t a, b;
	void *k = NULL, *v = NULL;
	char err[256];
	int rc = 1;

	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	id = argv[1];
	kvt_client_fetch_range_init(&r);
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--out-k") && i + 1 < argc)
			kpath = argv[++i];
		else if (!strcmp(argv[i], "--out-v") && i + 1 < argc)
			vpath = argv[++i];
		else if (!strcmp(argv[i], "--tokens") && i + 1 < argc && !parse_range(argv[i + 1], &a, &b)) {
			r.token_begin = a;
			r.token_end = b;
			i++;
		} else if (!strcmp(argv[i], "--layers") && i + 1 < argc &&
			   !parse_range(argv[i + 1], &a, &b) && a <= UINT32_MAX) {
			r.layer_begin = (uint32_t)a;
			r.layer_end = b == KVT_CLIENT_END ? KVT_CLIENT_ALL_LAYERS : (uint32_t)b;
			i++;
		} else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
			int d = kvt_dtype_parse(argv[++i]);
			if (d != KVT_DTYPE_F16 && d != KVT_DTYPE_F32) {
				fprintf(stderr, "kvtierctl: get --dtype must be f16 or f32 (.npy has no bf16)\n");
				return 2;
			}
			r.dtype = (uint32_t)d;
		} else {
			usage(stderr);
			return 2;
		}
	}
	if (!kpath && !vpath) {
		fprintf(stderr, "kvtierctl: get needs --out-k and/or --out-v\n");
		return 2;
	}
	if (connect_client(g, &c))
		return 1;
	if ((rc = kvt_client_stat(c, id, &info, &st))) {
		rc = fail_status("stat", rc, &st);
		goto out;
	}
	if (r.token_end == KVT_CLIENT_END)
		r.token_end = info.n_tokens;
	if (r.layer_end == KVT_CLIENT_ALL_LAYERS)
		r.layer_end = info.n_layers;
	if (!r.dtype)
		r.dtype = info.dtype == KVT_DTYPE_F32 ? KVT_DTYPE_F32 : KVT_DTYPE_F16;
	if (r.token_end < r.token_begin || r.layer_end < r.layer_begin) {
		fprintf(stderr, "kvtierctl: empty or reversed range\n");
		rc = 2;
		goto out;
	}
	uint64_t shape[4] = { r.layer_end - r.layer_begin, r.token_end - r.token_begin,
			      info.n_kv_heads, info.head_dim };
	size_t n = (size_t)(shape[0] * shape[1] * shape[2] * shape[3]) * kvt_dtype_size(r.dtype);
	k = malloc(n ? n : 1);
	v = malloc(n ? n : 1);
	if (!k || !v) {
		fprintf(stderr, "kvtierctl: out of memory for %zu bytes\n", 2 * n);
		rc = 1;
		goto out;
	}
	if ((rc = kvt_client_fetch(c, id, &r, k, n, v, n, &res, &st))) {
		rc = fail_status("fetch", rc, &st);
		goto out;
	}
	if ((kpath && kvtctl_npy_write(kpath, r.dtype, 4, shape, k, err, sizeof(err))) ||
	    (vpath && kvtctl_npy_write(vpath, r.dtype, 4, shape, v, err, sizeof(err)))) {
		fprintf(stderr, "kvtierctl: %s\n", err);
		rc = 1;
		goto out;
	}
	printf("%s: tokens [%" PRIu64 ", %" PRIu64 ") layers [%u, %u) as %s in %u messages\n", id,
	       r.token_begin, r.token_end, r.layer_begin, r.layer_end, kvt_dtype_name(r.dtype),
	       res.messages);
	rc = 0;
out:
	kvt_client_close(c);
	free(k);
	free(v);
	return rc;
}

/* ---- demo / bench ------------------------------------------------------------------------------ */

struct demo_opts {
	uint32_t sessions, tokens, layers, kv_heads, q_heads, head_dim, block_tokens, attend_steps;
	uint32_t dtype;
	struct kvt_client_codec codec;
	int keep;
	int json; /* bench */
};

/* splitmix64: reproducible synthetic data from a printed seed */
static uint64_t rng_state;
static uint64_t rng_u64(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}
static float rng_normal(void)
{
	float u1 = (float)((rng_u64() >> 40) * 0x1p-24), u2 = (float)((rng_u64() >> 40) * 0x1p-24);
	if (u1 < 1e-12f)
		u1 = 1e-12f;
	return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/*
 * TNI-like KV for one session, f32 [L][T][H][d]: ordinary keys have per-element std 1.5, a
 * small bias and a few outlier channels (x6), so key norms are ~17-25 at d = 128; tokens 0
 * and 1 are attention sinks: low-norm keys (norm ~2.5) along a per-head sink direction and
 * near-zero values, like the sinks of a real model; other values have a per-channel mean. Queries (demo_query) lean toward the sink
 * direction (and ordinary keys are orthogonal to it) so the sinks take a large share of the
 * attention mass with logits in a model-like range (the demo prints both).
 */
static void demo_gen(const struct demo_opts *o, float *k, float *v, float *sink_dir)
{
	uint32_t L = o->layers, T = o->tokens, H = o->kv_heads, d = o->head_dim;
	float *vmean = malloc((size_t)H * d * sizeof(float));
	if (!vmean)
		abort();
	for (size_t i = 0; i < (size_t)L * H; i++) {
		float *u = sink_dir + i * d, n = 0;
		for (uint32_t j = 0; j < d; j++) {
			u[j] = rng_normal();
			n += u[j] * u[j];
		}
		n = sqrtf(n);
		for (uint32_t j = 0; j < d; j++)
			u[j] /= n;
	}
	for (uint32_t l = 0; l < L; l++) {
		/* Real value caches carry a per-channel mean (bias) shared by a head's tokens, so
		 * an attention output is not just the average of zero-mean noise. */
		for (size_t i = 0; i < (size_t)H * d; i++)
			vmean[i] = rng_normal();
		for (uint32_t t = 0; t < T; t++)
			for (uint32_t h = 0; h < H; h++) {
				float *kr = k + (((size_t)l * T + t) * H + h) * d;
				float *vr = v + (((size_t)l * T + t) * H + h) * d;
				const float *u = sink_dir + ((size_t)l * H + h) * d;
				float dot = 0;
				for (uint32_t j = 0; j < d; j++) {
					if (t < 2) {
						kr[j] = 2.5f * u[j] + 0.02f * rng_normal();
						vr[j] = 0.05f * rng_normal();
					} else {
						float out = (j % 29 == 3) ? 6.0f : 1.0f;
						kr[j] = out * (1.5f * rng_normal() + 0.3f);
						vr[j] = vmean[(size_t)h * d + j] + rng_normal();
						dot += kr[j] * u[j];
					}
				}
				/* ordinary keys carry no component along the sink direction */
				for (uint32_t j = 0; t >= 2 && j < d; j++)
					kr[j] -= dot * u[j];
			}
	}
	free(vmean);
}

static void demo_query(const struct demo_opts *o, uint32_t l, const float *sink_dir, float *q)
{
	uint32_t Hq = o->q_heads, g = o->q_heads / o->kv_heads, d = o->head_dim;
	for (uint32_t h = 0; h < Hq; h++) {
		const float *u = sink_dir + ((size_t)l * o->kv_heads + h / g) * d;
		for (uint32_t j = 0; j < d; j++)
			q[(size_t)h * d + j] = 30.0f * u[j] + 0.5f * rng_normal();
	}
}

/* Exact attention over the fp16-rounded K, V of one layer (what an fp16 cache would give).
 * Also reports the attention mass on tokens 0..1 and the logit range. */
static void exact_attention(const struct demo_opts *o, const float *k16, const float *v16,
			    uint32_t l, const float *q, float *out, double *sink_mass,
			    float *lmin, float *lmax)
{
	uint32_t T = o->tokens, H = o->kv_heads, d = o->head_dim, g = o->q_heads / o->kv_heads;
	float scale = 1.0f / sqrtf((float)d);
	float *p = malloc(T * sizeof(float));
	if (!p)
		abort();
	*sink_mass = 0;
	for (uint32_t h = 0; h < o->q_heads; h++) {
		const float *qh = q + (size_t)h * d;
		uint32_t kh = h / g;
		float m = -INFINITY;
		double sum = 0;
		for (uint32_t t = 0; t < T; t++) {
			const float *kr = k16 + (((size_t)l * T + t) * H + kh) * d;
			float s = 0;
			for (uint32_t j = 0; j < d; j++)
				s += qh[j] * kr[j];
			p[t] = s * scale;
			if (p[t] > m)
				m = p[t];
			if (p[t] < *lmin)
				*lmin = p[t];
			if (p[t] > *lmax)
				*lmax = p[t];
		}
		for (uint32_t t = 0; t < T; t++) {
			p[t] = expf(p[t] - m);
			sum += p[t];
		}
		float *oh = out + (size_t)h * d;
		memset(oh, 0, d * sizeof(float));
		for (uint32_t t = 0; t < T; t++) {
			const float *vr = v16 + (((size_t)l * T + t) * H + kh) * d;
			float w = (float)(p[t] / sum);
			for (uint32_t j = 0; j < d; j++)
				oh[j] += w * vr[j];
		}
		*sink_mass += (p[0] + (T > 1 ? p[1] : 0)) / sum;
	}
	*sink_mass /= o->q_heads;
	free(p);
}

static double rel_l2(const float *a, const float *b, size_t n)
{
	double num = 0, den = 0;
	for (size_t i = 0; i < n; i++) {
		double e = (double)a[i] - b[i];
		num += e * e;
		den += (double)b[i] * b[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double memcpy_gbps(size_t bytes)
{
	void *a = malloc(bytes), *b = malloc(bytes);
	double t0, dt;
	if (!a || !b) {
		free(a);
		free(b);
		return 0;
	}
	memset(a, 1, bytes);
	memset(b, 2, bytes);
	t0 = now_s();
	for (int i = 0; i < 3; i++) {
		memcpy(b, a, bytes);
		/* keep the copy: the compiler may not drop a memcpy whose result is "used" */
		__asm__ volatile("" : : "r"(b) : "memory");
	}
	dt = now_s() - t0;
	free(a);
	free(b);
	return 3.0 * (double)bytes / dt / 1e9;
}

static int run_demo(const struct global_opts *g, const struct demo_opts *o)
{
	uint32_t L = o->layers, T = o->tokens, H = o->kv_heads, d = o->head_dim, Hq = o->q_heads;
	size_t n_el = (size_t)L * T * H * d, esz = kvt_dtype_size(o->dtype);
	size_t qn = (size_t)Hq * d;
	struct kvt_client *c = NULL;
	struct kvt_client_status st;
	float *kf = NULL, *vf = NULL, *k16 = NULL, *v16 = NULL, *sink = NULL, *fk = NULL, *fv = NULL;
	float *q = NULL, *out = NULL, *ref = NULL;
	void *kw = NULL, *vw = NULL, *gk = NULL, *gv = NULL;
	struct kvt_client_attend_item *items = NULL;
	double t_append = 0, t_fetch = 0, t_attend = 0, bytes_wire = 0;
	double err_sum = 0, err_max = 0, k_err = 0, v_err = 0, sink_mass = 0, dec_err_max = 0;
	uint64_t held = 0, logical = 0, n_attend = 0, n_ref = 0;
	double bpe_sum = 0;
	float lmin = INFINITY, lmax = -INFINITY;
	int rc = 1, tail_exact = 1;
	uint64_t seed;
	char ids[64][96];
	uint32_t n_open = 0;

	if (!L || !T || !H || !d || !Hq || Hq % H || !o->sessions || o->sessions > 64 || !esz) {
		fprintf(stderr, "kvtierctl: demo needs layers, tokens, kv-heads, head-dim > 0, q-heads a multiple of kv-heads, 1..64 sessions\n");
		return 2;
	}
	seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	rng_state = seed;
	kf = malloc(n_el * 4);
	vf = malloc(n_el * 4);
	k16 = malloc(n_el * 4);
	v16 = malloc(n_el * 4);
	fk = malloc(n_el * 4);
	fv = malloc(n_el * 4);
	kw = malloc(n_el * esz);
	vw = malloc(n_el * esz);
	gk = malloc(n_el * esz);
	gv = malloc(n_el * esz);
	sink = malloc((size_t)L * H * d * 4);
	q = malloc(L * qn * 4);
	out = malloc(L * qn * 4);
	ref = malloc(qn * 4);
	items = calloc(L, sizeof(*items));
	if (!kf || !vf || !k16 || !v16 || !fk || !fv || !kw || !vw || !gk || !gv || !sink || !q ||
	    !out || !ref || !items) {
		fprintf(stderr, "kvtierctl: out of memory for %u x %u x %u x %u tokens\n", L, T, H, d);
		goto out;
	}
	if (connect_client(g, &c))
		goto out;
	if (!o->json) {
		printf("demo: %u sessions x %u tokens, %u layers, %u KV heads (%u query heads), head_dim %u, wire %s, seed %" PRIu64 "\n",
		       o->sessions, T, L, H, Hq, d, kvt_dtype_name(o->dtype), seed);
		printf("demo: data: TNI-like synthetic KV (2 low-norm sink tokens per session, outlier channels)\n");
	}

	for (uint32_t s = 0; s < o->sessions; s++) {
		struct kvt_client_session_params p;
		struct kvt_client_session_info info;
		struct kvt_client_shape sh = { L, H, d, o->dtype };
		double t0;

		snprintf(ids[s], sizeof(ids[s]), "demo-%d-%u", (int)getpid(), s);
		demo_gen(o, kf, vf, sink);
		kvt_convert(kf, KVT_DTYPE_F32, kw, o->dtype, n_el);
		kvt_convert(vf, KVT_DTYPE_F32, vw, o->dtype, n_el);
		/* the exact fp16 cache the reference attends over */
		kvt_convert(kf, KVT_DTYPE_F32, gk, KVT_DTYPE_F16, n_el);
		kvt_convert(gk, KVT_DTYPE_F16, k16, KVT_DTYPE_F32, n_el);
		kvt_convert(vf, KVT_DTYPE_F32, gv, KVT_DTYPE_F16, n_el);
		kvt_convert(gv, KVT_DTYPE_F16, v16, KVT_DTYPE_F32, n_el);

		kvt_client_session_params_init(&p, ids[s], L, H, d, o->dtype);
		p.codec = o->codec;
		p.ttl_seconds = 3600;
		if ((rc = kvt_client_open(c, &p, &info, &st))) {
			rc = fail_status("open", rc, &st);
			goto out;
		}
		n_open++;
		if (s == 0 && !o->json)
			printf("demo: codec %s K%u/V%u G%u B%u sinks %d rotate_v %d\n",
			       wire_scheme_name(info.codec.scheme), info.codec.key_bits,
			       info.codec.value_bits, info.codec.group, info.codec.chunk_tokens,
			       info.codec.n_sinks, info.codec.rotate_v);

		/* Prefill in streaming blocks: each Append carries block_tokens tokens, itself cut
		 * into messages below the message limit by libkvtier. */
		t0 = now_s();
		for (uint32_t t = 0; t < T; t += o->block_tokens) {
			uint32_t n = T - t < o->block_tokens ? T - t : o->block_tokens;
			struct kvt_client_shape bs = sh;
			size_t row = (size_t)H * d * esz;
			/* [L][n][H][d] slice of [L][T][H][d] */
			for (uint32_t l = 0; l < L; l++) {
				memcpy((uint8_t *)gk + (size_t)l * n * row,
				       (uint8_t *)kw + ((size_t)l * T + t) * row, n * row);
				memcpy((uint8_t *)gv + (size_t)l * n * row,
				       (uint8_t *)vw + ((size_t)l * T + t) * row, n * row);
			}
			struct kvt_client_append_opts ao;
			kvt_client_append_opts_init(&ao);
			ao.token_begin = t;
			if ((rc = kvt_client_append(c, ids[s], &bs, gk, gv, n, &ao, NULL, &st))) {
				rc = fail_status("append", rc, &st);
				goto out;
			}
		}
		t_append += now_s() - t0;
		bytes_wire += 2.0 * (double)n_el * (double)esz;

		if ((rc = kvt_client_stat(c, ids[s], &info, &st))) {
			rc = fail_status("stat", rc, &st);
			goto out;
		}
		held += info.bytes_held;
		logical += info.logical_bytes;
		bpe_sum += info.bits_per_element;

		/* Fetch everything back (decoded, original basis) and measure the reconstruction. */
		t0 = now_s();
		struct kvt_client_fetch_range fr;
		kvt_client_fetch_range_init(&fr);
		fr.dtype = o->dtype;
		if ((rc = kvt_client_fetch(c, ids[s], &fr, gk, n_el * esz, gv, n_el * esz, NULL, &st))) {
			rc = fail_status("fetch", rc, &st);
			goto out;
		}
		t_fetch += now_s() - t0;
		kvt_convert(gk, o->dtype, fk, KVT_DTYPE_F32, n_el);
		kvt_convert(gv, o->dtype, fv, KVT_DTYPE_F32, n_el);
		k_err += rel_l2(fk, k16, n_el);
		v_err += rel_l2(fv, v16, n_el);
		/* the unsealed tail must come back bit-exact */
		uint32_t tail = info.tail_tokens;
		for (uint32_t l = 0; l < L && tail; l++) {
			size_t off = ((size_t)l * T + (T - tail)) * H * d * esz;
			if (memcmp((uint8_t *)gk + off, (uint8_t *)kw + off, (size_t)tail * H * d * esz) ||
			    memcmp((uint8_t *)gv + off, (uint8_t *)vw + off, (size_t)tail * H * d * esz))
				tail_exact = 0;
		}

		/* Attend: steps of one batched request with every layer; compare each output with
		 * exact fp16 attention computed here. */
		for (uint32_t step = 0; step < o->attend_steps; step++) {
			for (uint32_t l = 0; l < L; l++) {
				demo_query(o, l, sink, q + l * qn);
				items[l].session_id = ids[s];
				items[l].layer = l;
				items[l].n_q_heads = Hq;
				items[l].q = q + l * qn;
				items[l].q_bytes = qn * 4;
				items[l].out = out + l * qn;
				items[l].out_cap = qn * 4;
			}
			t0 = now_s();
			if ((rc = kvt_client_attend(c, items, L, 0, &st))) {
				rc = fail_status("attend", rc, &st);
				goto out;
			}
			t_attend += now_s() - t0;
			n_attend += L;
			for (uint32_t l = 0; l < L; l++) {
				double m, e;
				float dmin = INFINITY, dmax = -INFINITY;
				exact_attention(o, k16, v16, l, q + l * qn, ref, &m, &lmin, &lmax);
				e = rel_l2(out + l * qn, ref, qn);
				err_sum += e;
				if (e > err_max)
					err_max = e;
				sink_mass += m;
				n_ref++;
				/* The same attention over the cache as Fetch decodes it: what is left is
				 * the daemon's attention arithmetic, not quantization. */
				exact_attention(o, fk, fv, l, q + l * qn, ref, &m, &dmin, &dmax);
				e = rel_l2(out + l * qn, ref, qn);
				if (e > dec_err_max)
					dec_err_max = e;
			}
		}
	}

	double ratio = held ? (double)logical / (double)held : 0;
	double bpe = bpe_sum / o->sessions;
	double app_gbps = bytes_wire / t_append / 1e9, fet_gbps = bytes_wire / t_fetch / 1e9;
	double att_s = t_attend > 0 ? (double)n_attend / t_attend : 0;
	double err_mean = n_ref ? err_sum / (double)n_ref : 0;
	if (o->json) {
		double mc = memcpy_gbps((size_t)(bytes_wire / o->sessions));
		printf("{\"bench\":\"service_append\",\"sessions\":%u,\"tokens\":%u,\"layers\":%u,\"kv_heads\":%u,\"head_dim\":%u,\"dtype\":\"%s\",\"gbps\":%.4f,\"ref\":\"memcpy\",\"ref_gbps\":%.3f,\"ratio\":%.5f}\n",
		       o->sessions, T, L, H, d, kvt_dtype_name(o->dtype), app_gbps, mc, app_gbps / mc);
		printf("{\"bench\":\"service_fetch\",\"sessions\":%u,\"tokens\":%u,\"gbps\":%.4f,\"ref\":\"memcpy\",\"ref_gbps\":%.3f,\"ratio\":%.5f}\n",
		       o->sessions, T, fet_gbps, mc, fet_gbps / mc);
		printf("{\"bench\":\"service_attend\",\"tokens\":%u,\"q_heads\":%u,\"items_per_s\":%.1f,\"batch\":%u,\"rel_err_mean\":%.5f,\"decode_consistency_max\":%.5f,\"ref\":\"exact fp16 attention (local)\"}\n",
		       T, Hq, att_s, L, err_mean, dec_err_max);
		printf("{\"bench\":\"service_memory\",\"compression_ratio\":%.3f,\"bits_per_element\":%.3f,\"ref\":\"dense f16 (16 bits)\"}\n",
		       ratio, bpe);
	} else {
		printf("demo: appended %.1f MB of K+V in %.3f s: %.3f GB/s\n", bytes_wire / 1e6,
		       t_append, app_gbps);
		printf("demo: fetched back (decoded) in %.3f s: %.3f GB/s\n", t_fetch, fet_gbps);
		printf("demo: memory: %" PRIu64 " bytes held for %" PRIu64 " bytes of dense f16: compression %.2fx\n",
		       held, logical, ratio);
		printf("demo: true bits per element of sealed chunks: %.3f (f16: 16)\n", bpe);
		printf("demo: reconstruction error (relative L2) K %.4f, V %.4f; exact tail %s\n",
		       k_err / o->sessions, v_err / o->sessions, tail_exact ? "bit-exact" : "DIFFERS");
		printf("demo: attention output error vs exact fp16 attention (relative L2): mean %.4f, max %.4f over %" PRIu64 " head-batches\n",
		       err_mean, err_max, n_ref);
		printf("demo: Attend vs attention over the Fetch-decoded cache (consistency): max %.5f\n",
		       dec_err_max);
		printf("demo: synthetic set: sink attention mass %.2f, logits in [%.1f, %.1f]\n",
		       n_ref ? sink_mass / (double)n_ref : 0, lmin, lmax);
		printf("demo: attend throughput: %.1f items/s (%u layers per request, %u tokens each)\n",
		       att_s, L, T);
	}
	rc = tail_exact ? 0 : 1;
	if (!tail_exact)
		fprintf(stderr, "kvtierctl: demo: the exact tail came back different\n");
out:
	for (uint32_t s = 0; c && s < n_open && !o->keep; s++)
		kvt_client_drop(c, ids[s], NULL, &st);
	kvt_client_close(c);
	free(kf);
	free(vf);
	free(k16);
	free(v16);
	free(fk);
	free(fv);
	free(kw);
	free(vw);
	free(gk);
	free(gv);
	free(sink);
	free(q);
	free(out);
	free(ref);
	free(items);
	return rc;
}

static int cmd_demo(const struct global_opts *g, int argc, char **argv, int json)
{
	struct demo_opts o = { .sessions = 4, .tokens = 2048, .layers = 8, .kv_heads = 4,
			       .q_heads = 16, .head_dim = 128, .block_tokens = 512,
			       .attend_steps = 8, .dtype = KVT_DTYPE_F16 };
	o.json = json;
	kvt_client_codec_init(&o.codec);
	for (int i = 1; i < argc; i++) {
		uint32_t *dst = NULL;
		int r = parse_codec_flag(argc, argv, &i, &o.codec);
		if (r < 0)
			return 2;
		if (r)
			continue;
		if (!strcmp(argv[i], "--keep")) {
			o.keep = 1;
			continue;
		}
		if (!strcmp(argv[i], "--sessions"))
			dst = &o.sessions;
		else if (!strcmp(argv[i], "--tokens"))
			dst = &o.tokens;
		else if (!strcmp(argv[i], "--layers"))
			dst = &o.layers;
		else if (!strcmp(argv[i], "--kv-heads"))
			dst = &o.kv_heads;
		else if (!strcmp(argv[i], "--q-heads"))
			dst = &o.q_heads;
		else if (!strcmp(argv[i], "--head-dim"))
			dst = &o.head_dim;
		else if (!strcmp(argv[i], "--block-tokens"))
			dst = &o.block_tokens;
		else if (!strcmp(argv[i], "--attend-steps"))
			dst = &o.attend_steps;
		else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
			int d = kvt_dtype_parse(argv[++i]);
			if (d < 0) {
				fprintf(stderr, "kvtierctl: --dtype %s is not f16, bf16 or f32\n", argv[i]);
				return 2;
			}
			o.dtype = (uint32_t)d;
			continue;
		}
		if (!dst || i + 1 >= argc || parse_u32(argv[i + 1], dst)) {
			usage(stderr);
			return 2;
		}
		i++;
	}
	if (!o.block_tokens)
		o.block_tokens = o.tokens;
	return run_demo(g, &o);
}

int main(int argc, char **argv)
{
	struct global_opts g = { 0 };
	const char *sock = getenv("KVTIER_SOCKET");
	int i;

	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--socket") && i + 1 < argc)
			sock = argv[++i];
		else if (!strcmp(argv[i], "--target") && i + 1 < argc)
			g.target = argv[++i];
		else if (!strcmp(argv[i], "--timeout-ms") && i + 1 < argc &&
			 !parse_u32(argv[i + 1], &g.timeout_ms))
			i++;
		else if (!strcmp(argv[i], "--token") && i + 1 < argc)
			g.token = argv[++i];
		else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			return 0;
		} else {
			usage(stderr);
			return 2;
		}
	}
	if (i >= argc) {
		usage(stderr);
		return 2;
	}
	if (!g.target) {
		const char *rd = getenv("RUNTIME_DIRECTORY");
		if (sock && *sock)
			snprintf(g.target_buf, sizeof(g.target_buf), "unix:%s", sock);
		else if (rd && *rd)
			snprintf(g.target_buf, sizeof(g.target_buf), "unix:%s/kvtierd.sock", rd);
		else
			snprintf(g.target_buf, sizeof(g.target_buf), "unix:run/kvtierd.sock");
		g.target = g.target_buf;
	}
	argc -= i;
	argv += i;
	if (!strcmp(argv[0], "health"))
		return cmd_health(&g, argc, argv);
	if (!strcmp(argv[0], "stats"))
		return cmd_stats(&g, argc, argv);
	if (!strcmp(argv[0], "sessions"))
		return cmd_sessions(&g, argc, argv);
	if (!strcmp(argv[0], "stat"))
		return cmd_stat_drop(&g, argc, argv, 0);
	if (!strcmp(argv[0], "drop"))
		return cmd_stat_drop(&g, argc, argv, 1);
	if (!strcmp(argv[0], "put"))
		return cmd_put(&g, argc, argv);
	if (!strcmp(argv[0], "get"))
		return cmd_get(&g, argc, argv);
	if (!strcmp(argv[0], "demo"))
		return cmd_demo(&g, argc, argv, 0);
	if (!strcmp(argv[0], "bench"))
		return cmd_demo(&g, argc, argv, 1);
	fprintf(stderr, "kvtierctl: unknown command %s\n", argv[0]);
	usage(stderr);
	return 2;
}

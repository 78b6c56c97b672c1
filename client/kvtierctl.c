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
#include "kvt_synth.h"
#include "kvt_npy.h"
#include "kvt_text.h"
#include "kvtier_client.h"

/* User text in a message goes through common/kvt_text.h, as in kvtierd's log: a value (a
 * flag's, an id, a path, the target) through kvt_text_quote, or kvt_text_escape with
 * KVT_TEXT_BACKSLASH inside the message's own quotes; a sentence that carries some (the
 * daemon's status message, a .npy error naming its path) through kvt_text_escape. So a
 * control byte or an escape sequence shows as \xNN instead of acting on the terminal. A
 * string the daemon sends (a session id, a tier or counter name, the version) goes through
 * shown(): plain printable ASCII prints as it is, so scripts that read the listings still
 * match, and a buggy or hostile daemon cannot drive the terminal either. */
#define Q_MAX 512 /* a value in a message: longer ones are cut */

/* Room for a daemon string of n bytes (its NUL included) after escaping: \xNN per byte. */
#define SHOWN_MAX(n) (4 * (n))

static const char *shown(char *buf, size_t len, const char *s)
{
	return kvt_text_escape(buf, len, s, 0);
}

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
		"        codec flags: --scheme none|kivi|hadamard|oscar --key-bits 2|3|4|8 --value-bits 2|3|4|8\n"
		"                     --group G --chunk-tokens B --sinks S --no-rotate-v\n"
		"                     --recent-exact W (0 or B..1024: newest W-B+1..W tokens exact)\n"
		"                     --key-rounding minmax|mse (how key scales are chosen)\n"
		"                     --preset kvtier-int2|oscar-int2 (supplies the flags not given)\n"
		"  get ID --out-k K.npy --out-v V.npy [--tokens A:B] [--layers A:B] [--dtype f16|f32]\n"
		"  demo [--sessions N] [--tokens T] [--layers L] [--kv-heads H] [--q-heads HQ]\n"
		"       [--head-dim D] [--block-tokens N] [--attend-steps N] [codec flags]\n"
		"       [--seed S] [--dump-dir DIR] [--only] [--keep]\n"
		"        the synthetic TNI set of kvtier-bench fidelity through the daemon: T prefill\n"
		"        tokens, then N decode steps (Attend with the new token); for the codec (default:\n"
		"        the daemon's), the same at 4 bits and exact none (--only: the codec alone):\n"
		"        bits per element, memory, attention-output error vs exact attention,\n"
		"        throughput. --dump-dir writes session 0's K.npy V.npy Q.npy for\n"
		"        kvtier-bench fidelity --k --v --q\n"
		"  bench [demo flags]   the demo workload as JSON lines (one per measurement) with\n"
		"                       memcpy of the same bytes in the same run as the reference\n");
}

static int fail_status(const char *what, int rc, const struct kvt_client_status *st)
{
	char q[Q_MAX], m[4 * sizeof st->message];
	fprintf(stderr, "kvtierctl: %s: %s (%d): %s\n", kvt_text_quote(q, sizeof q, what),
		kvt_client_code_name(st->code), rc, kvt_text_escape(m, sizeof m, st->message, 0));
	return 1;
}

/* The value s of option opt (of command cmd; NULL for a global option) as a decimal number
 * <= max, or a message naming both and the limit: strtoul's base 0 read "010" as 8 and "0x10"
 * as 16, and took blanks and a sign. */
static int parse_num(const char *cmd, const char *opt, const char *s, uint64_t max,
		     uint64_t *out)
{
	if (kvt_text_parse_dec(s, s + strlen(s), max, out)) {
		char q[Q_MAX];
		fprintf(stderr, "kvtierctl: %s%s%s \"%s\": expected a decimal number <= %" PRIu64 "\n",
			cmd ? cmd : "", cmd ? " " : "", opt,
			kvt_text_escape(q, sizeof q, s, KVT_TEXT_BACKSLASH), max);
		return -EINVAL;
	}
	return 0;
}

static int parse_u32(const char *cmd, const char *opt, const char *s, uint32_t *out)
{
	uint64_t v;
	int rc = parse_num(cmd, opt, s, UINT32_MAX, &v);
	if (!rc)
		*out = (uint32_t)v;
	return rc;
}

/* "A:B", ":B", "A:" or ":" with A, B decimal and <= max; an absent B is KVT_CLIENT_END */
static int parse_range(const char *s, uint64_t max, uint64_t *a, uint64_t *b)
{
	const char *colon = strchr(s, ':');
	if (!colon)
		return -EINVAL;
	*a = 0;
	if (colon != s && kvt_text_parse_dec(s, colon, max, a))
		return -EINVAL;
	if (!colon[1]) {
		*b = KVT_CLIENT_END;
		return 0;
	}
	return kvt_text_parse_dec(colon + 1, colon + 1 + strlen(colon + 1), max, b);
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
	    strcmp(a, "--group") && strcmp(a, "--chunk-tokens") && strcmp(a, "--sinks") &&
	    strcmp(a, "--recent-exact") && strcmp(a, "--preset") && strcmp(a, "--key-rounding"))
		return 0;
	if (*i + 1 >= argc) {
		fprintf(stderr, "kvtierctl: %s needs a value\n", a);
		return -1;
	}
	const char *val = argv[++*i];
	char q[Q_MAX];
	if (!strcmp(a, "--scheme")) {
		int s = kvt_scheme_parse(val);
		if (s < 0) {
			fprintf(stderr, "kvtierctl: --scheme %s is not none, kivi, hadamard or oscar\n",
				kvt_text_quote(q, sizeof q, val));
			return -1;
		}
		c->scheme = (uint32_t)s + 1; /* the wire numbering starts at DEFAULT = 0 */
		return 1;
	}
	if (!strcmp(a, "--key-rounding")) {
		if (kvt_rounding_parse(val) < 0) {
			fprintf(stderr, "kvtierctl: --key-rounding %s is not minmax or mse\n",
				kvt_text_quote(q, sizeof q, val));
			return -1;
		}
		snprintf(c->key_rounding, sizeof c->key_rounding, "%s", val);
		return 1;
	}
	if (!strcmp(a, "--preset")) {
		struct kvt_codec_config probe;
		char perr[160];
		memset(&probe, 0, sizeof probe);
		if (kvt_codec_preset(&probe, val, perr, sizeof perr)) {
			fprintf(stderr, "kvtierctl: --%s\n", kvt_text_escape(q, sizeof q, perr, 0));
			return -1;
		}
		snprintf(c->preset, sizeof c->preset, "%s", val);
		return 1;
	}
	if (parse_u32(argv[0], a, val, &v))
		return -1;
	if (!strcmp(a, "--key-bits"))
		c->key_bits = v;
	else if (!strcmp(a, "--value-bits"))
		c->value_bits = v;
	else if (!strcmp(a, "--group"))
		c->group = v;
	else if (!strcmp(a, "--chunk-tokens"))
		c->chunk_tokens = v;
	else if (!strcmp(a, "--recent-exact"))
		c->recent_exact_tokens = (int32_t)v;
	else
		c->n_sinks = (int32_t)v;
	return 1;
}

static const char *wire_scheme_name(uint32_t s)
{
	const char *name = s >= 1 ? kvt_scheme_name(s - 1) : "default";

	return name ? name : "?"; /* a scheme this build does not know (printf of NULL) */
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
		else if (!strcmp(argv[i], "--wait-ms") && i + 1 < argc) {
			if (parse_u32(argv[0], argv[i], argv[i + 1], &wait_ms))
				return 2;
			i++;
		} else {
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
		char q[Q_MAX], m[4 * sizeof st.message];
		printf("NOT REACHABLE %s: %s: %s\n", kvt_text_quote(q, sizeof q, g->target),
		       kvt_client_code_name(st.code), kvt_text_escape(m, sizeof m, st.message, 0));
		return 1;
	}
	printf("%s\n", serving == 1 ? "SERVING" : serving == 2 ? "NOT_SERVING" : "UNKNOWN");
	return serving == 1 ? 0 : 1;
}

static void print_info(const struct kvt_client_session_info *i)
{
	char id[SHOWN_MAX(sizeof i->session_id)], kr[SHOWN_MAX(sizeof i->codec.key_rounding)];
	char pre[SHOWN_MAX(sizeof i->codec.preset)], tier[SHOWN_MAX(sizeof i->tier)];

	printf("session_id        %s\n", shown(id, sizeof id, i->session_id));
	printf("shape             layers %u, kv_heads %u, head_dim %u, dtype %s\n", i->n_layers,
	       i->n_kv_heads, i->head_dim, kvt_dtype_name(i->dtype) ? kvt_dtype_name(i->dtype) : "?");
	printf("codec             %s K%u/V%u G%u B%u sinks %d rotate_v %d pin_detect %.3f/%d "
	       "recent_exact %d key_rounding %s%s%s\n",
	       wire_scheme_name(i->codec.scheme), i->codec.key_bits, i->codec.value_bits,
	       i->codec.group, i->codec.chunk_tokens, i->codec.n_sinks, i->codec.rotate_v,
	       i->codec.pin_detect_ratio, i->codec.pin_detect_max, i->codec.recent_exact_tokens,
	       i->codec.key_rounding[0] ? shown(kr, sizeof kr, i->codec.key_rounding) : "?",
	       i->codec.preset[0] ? " preset " : "", shown(pre, sizeof pre, i->codec.preset));
	printf("tokens            %" PRIu64 " (%u chunks sealed, %u in the exact tail)\n",
	       i->n_tokens, i->n_chunks, i->tail_tokens);
	printf("bytes_held        %" PRIu64 " (dense f16: %" PRIu64 ", %.2fx)\n", i->bytes_held,
	       i->logical_bytes,
	       i->bytes_held ? (double)i->logical_bytes / (double)i->bytes_held : 0.0);
	printf("bits_per_element  %.3f (sealed chunks)\n", i->bits_per_element);
	printf("pinned            %s\n", i->pinned ? "yes" : "no");
	printf("ttl_seconds       %u%s\n", i->ttl_seconds, i->ttl_seconds ? "" : " (never expires)");
	printf("idle_ms           %" PRIu64 "\n", i->idle_ms);
	printf("tier              %s\n", i->tier[0] ? shown(tier, sizeof tier, i->tier) : "-");
}

static int cmd_stats(const struct global_opts *g, int argc, char **argv)
{
	struct kvt_client *c;
	struct kvt_client_stats s;
	struct kvt_client_status st;
	char q[SHOWN_MAX(sizeof s.counters[0].name)];
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
	printf("version        %s\n", shown(q, sizeof q, s.version));
	printf("uptime_ms      %" PRIu64 "\n", s.uptime_ms);
	printf("codec_isa      %s, gpu %s\n", shown(q, sizeof q, s.codec_isa), s.gpu ? "yes" : "no");
	printf("sessions       %" PRIu64 "\n", s.sessions);
	printf("tokens         %" PRIu64 "\n", s.tokens);
	printf("bytes_held     %" PRIu64 " (dense f16: %" PRIu64 ", %.2fx)\n", s.bytes_held,
	       s.logical_bytes, s.bytes_held ? (double)s.logical_bytes / (double)s.bytes_held : 0.0);
	for (size_t i = 0; i < s.n_tiers; i++)
		printf("tier %-9s used %" PRIu64 " of %" PRIu64 " bytes, %" PRIu64 " chunks\n",
		       shown(q, sizeof q, s.tiers[i].name), s.tiers[i].used_bytes,
		       s.tiers[i].capacity_bytes, s.tiers[i].chunks);
	for (size_t i = 0; i < s.n_counters; i++)
		printf("counter %-40s %" PRIu64 "\n", shown(q, sizeof q, s.counters[i].name),
		       s.counters[i].value);
	kvt_client_stats_free(&s);
	return 0;
}

static int cmd_sessions(const struct global_opts *g, int argc, char **argv)
{
	struct kvt_client *c;
	struct kvt_client_session_info *list;
	struct kvt_client_status st;
	char id[SHOWN_MAX(sizeof list->session_id)];
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
		       shown(id, sizeof id, list[i].session_id), list[i].n_tokens, list[i].n_chunks,
		       list[i].bytes_held,
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
	char q[Q_MAX];
	if (drop) /* the id as the listings show it (kvtierd refuses unprintable ids; a
		   * non-conforming server might not) */
		printf("dropped %s (%" PRIu64 " bytes freed)\n", shown(q, sizeof q, argv[1]), freed);
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
	struct kvt_npy kn = { 0 }, vn = { 0 };
	struct kvt_client *c = NULL;
	struct kvt_client_session_info info;
	struct kvt_client_append_result res;
	struct kvt_client_status st;
	struct kvt_client_shape sh;
	uint32_t dtype = 0, ttl = 0;
	int has_ttl = 0, pin = -1, rc = 1;
	void *kw = NULL, *vw = NULL;
	char err[256], q[4 * sizeof err];
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
				fprintf(stderr, "kvtierctl: --dtype %s is not f16, bf16 or f32\n",
					kvt_text_quote(q, sizeof q, argv[i]));
				return 2;
			}
			dtype = (uint32_t)d;
		} else if (!strcmp(argv[i], "--ttl") && i + 1 < argc) {
			if (parse_u32(argv[0], argv[i], argv[i + 1], &ttl))
				return 2;
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
	if (kvt_npy_read(kpath, &kn, err, sizeof(err)) ||
	    kvt_npy_read(vpath, &vn, err, sizeof(err))) {
		fprintf(stderr, "kvtierctl: %s\n", kvt_text_escape(q, sizeof q, err, 0));
		goto out;
	}
	if (kn.ndim != 4 || vn.ndim != 4 || memcmp(kn.shape, vn.shape, sizeof(kn.shape)) ||
	    kn.dtype != vn.dtype) {
		fprintf(stderr, "kvtierctl: K and V must both be 4-D [layers][tokens][kv_heads][head_dim] of one dtype and shape\n");
		goto out;
	}
	/* the session's shape fields and the token count are 32-bit: a larger dim must not wrap */
	for (int d = 0; d < 4; d++) {
		static const char *const names[4] = { "layers", "tokens", "kv_heads", "head_dim" };
		if (kn.shape[d] == 0 || kn.shape[d] > UINT32_MAX) {
			fprintf(stderr, "kvtierctl: %s: %s %" PRIu64 " is outside 1..%u\n",
				kvt_text_quote(q, sizeof q, kpath), names[d], kn.shape[d], UINT32_MAX);
			goto out;
		}
	}
	if (!dtype)
		dtype = kn.dtype;
	sh.n_layers = (uint32_t)kn.shape[0];
	sh.n_kv_heads = (uint32_t)kn.shape[2];
	sh.head_dim = (uint32_t)kn.shape[3];
	sh.dtype = dtype;
	size_t n_el = (size_t)kn.count;
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
	       shown(q, sizeof q, id), res.appended, res.messages_sent, 2.0 * (double)kvt_client_kv_bytes(&sh, kn.shape[1]) / dt / 1e6,
	       res.n_tokens, res.chunks_sealed);
	rc = 0;
out:
	kvt_client_close(c);
	kvt_npy_free(&kn);
	kvt_npy_free(&vn);
	free(kw);
	free(vw);
	return rc;
}

/* [begin, end) (open: up to the end) inside a session of n tokens or layers (what: "token" or
 * "layer", named by flag)? Else says so on stderr, naming the range and n. */
static int range_inside(const char *id, const char *what, const char *flag, uint64_t begin,
			uint64_t end, int open, uint64_t n)
{
	if (begin <= (open ? n : end) && (open || end <= n))
		return 1;
	char e[32] = "end", q[Q_MAX];
	if (!open)
		snprintf(e, sizeof(e), "%" PRIu64, end);
	fprintf(stderr, "kvtierctl: get %s: %s range [%" PRIu64 ", %s) is not inside the session's %"
		PRIu64 " %ss (%s A:B with A <= B <= %" PRIu64 ")\n", kvt_text_quote(q, sizeof q, id),
		what, begin, e, n, what, flag, n);
	return 0;
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
	char err[256], q[4 * sizeof err];
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
		else if ((!strcmp(argv[i], "--tokens") || !strcmp(argv[i], "--layers")) &&
			 i + 1 < argc) {
			/* token indices up to 2^64 - 2 (2^64 - 1 is KVT_CLIENT_END), layers up to
			 * 2^32 - 2 (a larger end was cut to 32 bits: 0:4294967298 read as 0:2) */
			const int tokens = argv[i][2] == 't';
			const uint64_t max = tokens ? UINT64_MAX - 1 : UINT32_MAX - 1;
			if (parse_range(argv[i + 1], max, &a, &b)) {
				fprintf(stderr, "kvtierctl: get %s \"%s\": expected A:B, A: or :B with A and B "
					"decimal numbers <= %" PRIu64 "\n", argv[i],
					kvt_text_escape(q, sizeof q, argv[i + 1], KVT_TEXT_BACKSLASH),
					max);
				return 2;
			}
			if (tokens) {
				r.token_begin = a;
				r.token_end = b;
			} else {
				r.layer_begin = (uint32_t)a;
				r.layer_end = b == KVT_CLIENT_END ? KVT_CLIENT_ALL_LAYERS : (uint32_t)b;
			}
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
	/* Checked against the session here, before the buffers are sized from the range: a
	 * range past the end was refused as "empty or reversed" (A: with A past the end) or
	 * as a shape too large or out of memory (a large B) before the daemon could name it. */
	if (!range_inside(id, "token", "--tokens", r.token_begin, r.token_end,
			  r.token_end == KVT_CLIENT_END, info.n_tokens) ||
	    !range_inside(id, "layer", "--layers", r.layer_begin, r.layer_end,
			  r.layer_end == KVT_CLIENT_ALL_LAYERS, info.n_layers)) {
		rc = 2;
		goto out;
	}
	if (r.token_end == KVT_CLIENT_END)
		r.token_end = info.n_tokens;
	if (r.layer_end == KVT_CLIENT_ALL_LAYERS)
		r.layer_end = info.n_layers;
	if (!r.dtype)
		r.dtype = info.dtype == KVT_DTYPE_F32 ? KVT_DTYPE_F32 : KVT_DTYPE_F16;
	uint64_t shape[4] = { r.layer_end - r.layer_begin, r.token_end - r.token_begin,
			      info.n_kv_heads, info.head_dim };
	size_t n;
	/* the shape comes from the daemon and the user's range: its product may wrap */
	if (kvt_npy_nbytes(r.dtype, 4, shape, &n, err, sizeof(err))) {
		fprintf(stderr, "kvtierctl: get %s [layers][tokens][kv_heads][head_dim]: %s\n",
			kvt_text_quote(q, sizeof q, id), err);
		rc = 1;
		goto out;
	}
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
	if ((kpath && kvt_npy_write(kpath, r.dtype, 4, shape, k, err, sizeof(err))) ||
	    (vpath && kvt_npy_write(vpath, r.dtype, 4, shape, v, err, sizeof(err)))) {
		fprintf(stderr, "kvtierctl: %s\n", kvt_text_escape(q, sizeof q, err, 0));
		rc = 1;
		goto out;
	}
	/* Which RPC answered and who decoded: by default the chunks come encoded (FetchEncoded)
	 * and are decoded here, KVTIER_CLIENT_FETCH=server has kvtierd decode (Fetch). */
	printf("%s: tokens [%" PRIu64 ", %" PRIu64 ") layers [%u, %u) as %s in %u %s message%s "
	       "(decoded %s)\n",
	       shown(q, sizeof q, id), r.token_begin, r.token_end, r.layer_begin, r.layer_end,
	       kvt_dtype_name(r.dtype),
	       res.messages, res.decoded_locally ? "FetchEncoded" : "Fetch",
	       res.messages == 1 ? "" : "s", res.decoded_locally ? "here" : "by kvtierd");
	rc = 0;
out:
	kvt_client_close(c);
	free(k);
	free(v);
	return rc;
}

/* ---- demo / bench ------------------------------------------------------------------------------ */

#define DEMO_MAX_CODECS 3

struct demo_opts {
	uint32_t sessions, tokens, layers, kv_heads, q_heads, head_dim, block_tokens, attend_steps;
	uint32_t dtype;
	uint64_t seed;          /* 0: from the clock */
	const char *dump_dir;   /* session 0's K, V, Q as .npy, for kvtier-bench fidelity */
	struct kvt_client_codec codec;
	int only;               /* the given codec alone: no INT4 and none rows */
	int keep;
	int json; /* bench */
};

/* What one codec did, summed over every session. */
struct demo_row {
	struct kvt_client_codec ask;    /* what OpenSession asks for */
	struct kvt_client_codec codec;  /* what the daemon resolved it to */
	int used;
	uint64_t held, logical;
	double bpe_sum, k_num, k_den, v_num, v_den, o_num, o_den, o_item_max, cons_max;
	double t_append, t_fetch, t_attend, bytes_wire;
	uint64_t n_steps, n_items;
};

/* Dataset statistics of the exact attention (OSCAR.md 7.7 asks for sink mass, logit range). */
struct demo_stats {
	double sink_mass, range_sum, entropy, n;
	float lmin, lmax;
};

/*
 * Attention of the Hq query heads q ([Hq][d]) over tokens [0, ntok) of layer l of K, V
 * ([L][Tt][H][d], f32), softmax scale 1/sqrt(d) (the daemon's default), GQA head h reads KV
 * head h / (Hq / H). p is scratch for ntok floats. st, when not NULL, accumulates statistics.
 */
static void demo_attention(const struct demo_opts *o, uint32_t Tt, const float *K, const float *V,
			   uint32_t l, uint32_t ntok, const float *q, const uint8_t *sink, float *p,
			   float *out, struct demo_stats *st)
{
	uint32_t H = o->kv_heads, d = o->head_dim, g = o->q_heads / o->kv_heads;
	float scale = 1.0f / sqrtf((float)d);

	for (uint32_t h = 0; h < o->q_heads; h++) {
		const float *qh = q + (size_t)h * d;
		float *oh = out + (size_t)h * d, mx = -INFINITY, mn = INFINITY;
		double sum = 0, sm = 0, ent = 0;

		for (uint32_t t = 0; t < ntok; t++) {
			const float *kr = K + (((size_t)l * Tt + t) * H + h / g) * d;
			float s = 0;
			for (uint32_t j = 0; j < d; j++)
				s += qh[j] * kr[j];
			p[t] = s * scale;
			mx = p[t] > mx ? p[t] : mx;
			mn = p[t] < mn ? p[t] : mn;
		}
		for (uint32_t t = 0; t < ntok; t++)
			sum += (p[t] = expf(p[t] - mx));
		memset(oh, 0, d * sizeof(float));
		for (uint32_t t = 0; t < ntok; t++) {
			const float *vr = V + (((size_t)l * Tt + t) * H + h / g) * d;
			float w = (float)(p[t] / sum);
			for (uint32_t j = 0; j < d; j++)
				oh[j] += w * vr[j];
			if (sink[t])
				sm += w;
			if (w > 0)
				ent -= w * log((double)w);
		}
		if (st) {
			st->sink_mass += sm;
			st->entropy += ent;
			st->range_sum += mx - mn;
			st->n += 1;
			st->lmin = mn < st->lmin ? mn : st->lmin;
			st->lmax = mx > st->lmax ? mx : st->lmax;
		}
	}
}

/* Sums of squared differences and of squared references over n elements (relative L2 parts). */
static void sq_err(const float *a, const float *ref, size_t n, double *num, double *den)
{
	for (size_t i = 0; i < n; i++) {
		double e = (double)a[i] - ref[i];
		*num += e * e;
		*den += (double)ref[i] * ref[i];
	}
}

static double rel_of(double num, double den)
{
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

static void codec_label(const struct kvt_client_codec *c, char *buf, size_t n)
{
	if (c->scheme == KVT_SCHEME_NONE + 1)
		snprintf(buf, n, "none (exact, check)");
	else
		snprintf(buf, n, "%s K%u/V%u G%u", wire_scheme_name(c->scheme), c->key_bits,
			 c->value_bits, c->group);
}

static int demo_dump(const struct demo_opts *o, uint32_t Tt, const float *K, const float *V,
		     const float *Q)
{
	uint64_t kvs[4] = { o->layers, Tt, o->kv_heads, o->head_dim };
	uint64_t qs[4] = { o->layers, o->attend_steps, o->q_heads, o->head_dim };
	const char *names[3] = { "K.npy", "V.npy", "Q.npy" };
	const float *arrs[3] = { K, V, Q };
	char path[1024], err[512], q[4 * sizeof err];

	for (int i = 0; i < 3; i++) {
		snprintf(path, sizeof(path), "%s/%s", o->dump_dir, names[i]);
		if (kvt_npy_write(path, KVT_DTYPE_F32, 4, i < 2 ? kvs : qs, arrs[i], err,
				  sizeof(err)) < 0) {
			fprintf(stderr, "kvtierctl: demo: %s\n", kvt_text_escape(q, sizeof q, err, 0));
			return -1;
		}
	}
	return 0;
}

/*
 * One session with one codec: prefill T tokens with Append (in block_tokens blocks), Stat,
 * Fetch everything back (reconstruction error), then attend_steps decode steps, each one
 * Attend request with every layer that carries the step's new token (new_k/new_v), so query j
 * (position T + j) attends over tokens 0..T+j exactly as kvtier-bench fidelity's query j does.
 */
static int demo_session(struct kvt_client *c, const struct demo_opts *o, const char *id,
			struct demo_row *w, int first, const float *kr, const float *vr,
			const void *kw, const void *vw, const float *Q, const float *ref,
			const uint8_t *sink, void *gk, void *gv, float *fk, float *fv, float *out,
			float *cons, float *p, struct kvt_client_attend_item *items, int *tail_exact)
{
	uint32_t L = o->layers, T = o->tokens, N = o->attend_steps, Tt = T + N, H = o->kv_heads;
	uint32_t d = o->head_dim, Hq = o->q_heads;
	size_t esz = kvt_dtype_size(o->dtype), rowb = (size_t)H * d * esz, row = (size_t)H * d;
	size_t qn = (size_t)Hq * d, n_el = (size_t)L * T * row;
	struct kvt_client_session_params sp;
	struct kvt_client_session_info info;
	struct kvt_client_status st;
	struct kvt_client_shape sh = { L, H, d, o->dtype };
	double t0;
	int rc;

	kvt_client_session_params_init(&sp, id, L, H, d, o->dtype);
	sp.codec = w->ask;
	sp.ttl_seconds = 3600;
	if ((rc = kvt_client_open(c, &sp, &info, &st)))
		return fail_status("open", rc, &st);
	if (first)
		w->codec = info.codec;

	t0 = now_s();
	for (uint32_t t = 0; t < T; t += o->block_tokens) {
		uint32_t n = T - t < o->block_tokens ? T - t : o->block_tokens;
		struct kvt_client_append_opts ao;
		/* [L][n][H][d] slice of [L][Tt][H][d] */
		for (uint32_t l = 0; l < L; l++) {
			memcpy((uint8_t *)gk + (size_t)l * n * rowb,
			       (const uint8_t *)kw + ((size_t)l * Tt + t) * rowb, n * rowb);
			memcpy((uint8_t *)gv + (size_t)l * n * rowb,
			       (const uint8_t *)vw + ((size_t)l * Tt + t) * rowb, n * rowb);
		}
		kvt_client_append_opts_init(&ao);
		ao.token_begin = t;
		if ((rc = kvt_client_append(c, id, &sh, gk, gv, n, &ao, NULL, &st)))
			return fail_status("append", rc, &st);
	}
	w->t_append += now_s() - t0;
	w->bytes_wire += 2.0 * (double)n_el * (double)esz;

	if ((rc = kvt_client_stat(c, id, &info, &st)))
		return fail_status("stat", rc, &st);
	w->held += info.bytes_held;
	w->logical += info.logical_bytes;
	w->bpe_sum += info.bits_per_element;

	/* Fetch the prefill back (decoded, original basis): reconstruction error. */
	t0 = now_s();
	struct kvt_client_fetch_range fr;
	kvt_client_fetch_range_init(&fr);
	fr.dtype = o->dtype;
	if ((rc = kvt_client_fetch(c, id, &fr, gk, n_el * esz, gv, n_el * esz, NULL, &st)))
		return fail_status("fetch", rc, &st);
	w->t_fetch += now_s() - t0;
	for (uint32_t l = 0; l < L; l++) {
		size_t at = (size_t)l * Tt * row;
		kvt_convert((uint8_t *)gk + (size_t)l * T * rowb, o->dtype, fk + at, KVT_DTYPE_F32,
			    (size_t)T * row);
		kvt_convert((uint8_t *)gv + (size_t)l * T * rowb, o->dtype, fv + at, KVT_DTYPE_F32,
			    (size_t)T * row);
		sq_err(fk + at, kr + at, (size_t)T * row, &w->k_num, &w->k_den);
		sq_err(fv + at, vr + at, (size_t)T * row, &w->v_num, &w->v_den);
		/* the decode steps' tokens join the exact tail */
		memcpy(fk + at + (size_t)T * row, kr + at + (size_t)T * row, (size_t)N * row * 4);
		memcpy(fv + at + (size_t)T * row, vr + at + (size_t)T * row, (size_t)N * row * 4);
		/* the unsealed tail must come back bit-exact */
		size_t off = ((size_t)l * T + (T - info.tail_tokens)) * rowb;
		size_t woff = ((size_t)l * Tt + (T - info.tail_tokens)) * rowb;
		if (memcmp((uint8_t *)gk + off, (const uint8_t *)kw + woff, info.tail_tokens * rowb) ||
		    memcmp((uint8_t *)gv + off, (const uint8_t *)vw + woff, info.tail_tokens * rowb))
			*tail_exact = 0;
	}

	for (uint32_t j = 0; j < N; j++) {
		for (uint32_t l = 0; l < L; l++) {
			struct kvt_client_attend_item *it = &items[l];
			memset(it, 0, sizeof(*it));
			it->session_id = id;
			it->layer = l;
			it->n_q_heads = Hq;
			it->q = Q + ((size_t)l * N + j) * qn;
			it->q_bytes = qn * 4;
			it->new_k = (const uint8_t *)kw + ((size_t)l * Tt + T + j) * rowb;
			it->new_v = (const uint8_t *)vw + ((size_t)l * Tt + T + j) * rowb;
			it->new_k_bytes = it->new_v_bytes = rowb;
			it->out = out + (size_t)l * qn;
			it->out_cap = qn * 4;
		}
		t0 = now_s();
		if ((rc = kvt_client_attend(c, items, L, 0, &st)))
			return fail_status("attend", rc, &st);
		w->t_attend += now_s() - t0;
		w->n_steps++;
		w->n_items += L;
		for (uint32_t l = 0; l < L; l++) {
			const float *r = ref + ((size_t)l * N + j) * qn;
			double num = 0, den = 0, cn = 0, cd = 0;
			if (items[l].n_tokens_attended != (uint64_t)T + j + 1) {
				fprintf(stderr, "kvtierctl: demo: step %u layer %u attended %" PRIu64
						" tokens, expected %u\n", j, l,
					items[l].n_tokens_attended, T + j + 1);
				return 1;
			}
			sq_err(out + (size_t)l * qn, r, qn, &num, &den);
			w->o_num += num;
			w->o_den += den;
			if (rel_of(num, den) > w->o_item_max)
				w->o_item_max = rel_of(num, den);
			if (j == 0) {
				/* The same attention over the cache as Fetch decodes it: what is left
				 * is the daemon's attention arithmetic, not quantization. */
				demo_attention(o, Tt, fk, fv, l, T + 1, Q + (size_t)l * N * qn, sink, p,
					       cons, NULL);
				sq_err(out + (size_t)l * qn, cons, qn, &cn, &cd);
				if (rel_of(cn, cd) > w->cons_max)
					w->cons_max = rel_of(cn, cd);
			}
		}
	}
	if (!o->keep)
		kvt_client_drop(c, id, NULL, &st);
	return 0;
}

static int run_demo(const struct global_opts *g, const struct demo_opts *o)
{
	uint32_t L = o->layers, T = o->tokens, N = o->attend_steps, Tt = T + N, H = o->kv_heads;
	uint32_t d = o->head_dim, Hq = o->q_heads;
	size_t row = (size_t)H * d, all = (size_t)L * Tt * row, esz = kvt_dtype_size(o->dtype);
	size_t qn = (size_t)Hq * d;
	struct kvt_client *c = NULL;
	float *kf = NULL, *vf = NULL, *fk = NULL, *fv = NULL, *Q = NULL, *ref = NULL, *out = NULL;
	float *cons = NULL, *p = NULL;
	void *kw = NULL, *vw = NULL, *gk = NULL, *gv = NULL;
	uint8_t *sink = NULL;
	struct kvt_client_attend_item *items = NULL;
	struct demo_row rows[DEMO_MAX_CODECS];
	struct demo_stats ds = { .lmin = INFINITY, .lmax = -INFINITY };
	int rc = 1, tail_exact = 1, n_rows = 1;
	uint64_t seed = o->seed;
	char sinkpos[64] = "";

	if (!L || !T || !N || !H || !d || !Hq || Hq % H || !o->sessions || o->sessions > 64 ||
	    !esz || d < 16 || d % 8) {
		fprintf(stderr, "kvtierctl: demo needs layers, tokens, attend-steps, kv-heads > 0, "
				"head-dim a multiple of 8 (>= 16), q-heads a multiple of kv-heads, "
				"1..64 sessions\n");
		return 2;
	}
	if (!seed)
		seed = ((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20)) & 0xffffffffffull;
	memset(rows, 0, sizeof(rows));
	rows[0].ask = o->codec;
	kf = malloc(all * 4);
	vf = malloc(all * 4);
	fk = malloc(all * 4);
	fv = malloc(all * 4);
	kw = malloc(all * esz);
	vw = malloc(all * esz);
	gk = malloc(all * esz);
	gv = malloc(all * esz);
	Q = malloc((size_t)L * N * qn * 4);
	ref = malloc((size_t)L * N * qn * 4);
	out = malloc((size_t)L * qn * 4);
	cons = malloc(qn * 4);
	p = malloc((size_t)Tt * 4);
	sink = malloc(Tt);
	items = calloc(L, sizeof(*items));
	if (!kf || !vf || !fk || !fv || !kw || !vw || !gk || !gv || !Q || !ref || !out || !cons ||
	    !p || !sink || !items) {
		fprintf(stderr, "kvtierctl: out of memory for %u x %u x %u x %u tokens\n", L, Tt, H, d);
		goto out;
	}
	if (connect_client(g, &c))
		goto out;

	for (uint32_t s = 0; s < o->sessions; s++) {
		struct kvt_synth_shape sh = { .layers = L, .tokens = Tt, .kv_heads = H, .head_dim = d,
					      .q_heads = Hq, .queries = N, .q_pos0 = T };
		if (kvt_synth_tni(&sh, seed + s, kf, vf, Q, sink) < 0) {
			fprintf(stderr, "kvtierctl: demo: out of memory for the synthetic set\n");
			goto out;
		}
		/* What a worker sends (wire dtype) is the reference: kf, vf become its f32 copy. */
		kvt_convert(kf, KVT_DTYPE_F32, kw, o->dtype, all);
		kvt_convert(vf, KVT_DTYPE_F32, vw, o->dtype, all);
		kvt_convert(kw, o->dtype, kf, KVT_DTYPE_F32, all);
		kvt_convert(vw, o->dtype, vf, KVT_DTYPE_F32, all);
		if (s == 0 && o->dump_dir && demo_dump(o, Tt, kf, vf, Q) < 0)
			goto out;
		/* exact attention of every decode step (query j over tokens 0..T+j) */
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t j = 0; j < N; j++)
				demo_attention(o, Tt, kf, vf, l, T + j + 1, Q + ((size_t)l * N + j) * qn,
					       sink, p, ref + ((size_t)l * N + j) * qn, &ds);
		if (s == 0) {
			for (uint32_t t = 0; t < Tt; t++)
				if (sink[t])
					snprintf(sinkpos + strlen(sinkpos),
						 sizeof(sinkpos) - strlen(sinkpos), "%s%u",
						 sinkpos[0] ? "," : "", t);
		}
		for (int r = 0; r < n_rows; r++) {
			char id[96];
			snprintf(id, sizeof(id), "demo-%d-%u-%d", (int)getpid(), s, r);
			if ((rc = demo_session(c, o, id, &rows[r], s == 0, kf, vf, kw, vw, Q, ref, sink,
					       gk, gv, fk, fv, out, cons, p, items, &tail_exact))) {
				kvt_client_drop(c, id, NULL, &(struct kvt_client_status){ 0 });
				goto out;
			}
			rows[r].used = 1;
			if (s == 0 && r == 0 && !o->only) {
				/* The comparison rows: the same codec at 4 bits, and exact storage. */
				const struct kvt_client_codec *c0 = &rows[0].codec;
				if (c0->scheme != KVT_SCHEME_NONE + 1 &&
				    (c0->key_bits != 4 || c0->value_bits != 4)) {
					rows[n_rows].ask = *c0;
					rows[n_rows].ask.key_bits = rows[n_rows].ask.value_bits = 4;
					n_rows++;
				}
				if (c0->scheme != KVT_SCHEME_NONE + 1) {
					kvt_client_codec_init(&rows[n_rows].ask);
					rows[n_rows].ask.scheme = KVT_SCHEME_NONE + 1;
					rows[n_rows].ask.chunk_tokens = c0->chunk_tokens;
					rows[n_rows].ask.n_sinks = c0->n_sinks;
					n_rows++;
				}
			}
		}
	}

	double sink_mass = ds.n ? ds.sink_mass / ds.n : 0, range = ds.n ? ds.range_sum / ds.n : 0;
	double entropy = ds.n ? ds.entropy / ds.n : 0;
	if (o->json) {
		double mc = memcpy_gbps((size_t)(rows[0].bytes_wire / o->sessions));
		printf("{\"bench\":\"demo_dataset\",\"generator\":\"kvt_synth_tni\",\"seed\":%" PRIu64 ",\"sessions\":%u,\"prefill_tokens\":%u,\"decode_steps\":%u,\"layers\":%u,\"kv_heads\":%u,\"q_heads\":%u,\"head_dim\":%u,\"sink_positions\":\"%s\",\"sink_mass\":%.4f,\"logit_min\":%.3f,\"logit_max\":%.3f,\"logit_range_mean\":%.3f,\"attn_entropy_mean\":%.3f}\n",
		       seed, o->sessions, T, N, L, H, Hq, d, sinkpos, sink_mass, ds.lmin, ds.lmax,
		       range, entropy);
		for (int r = 0; r < n_rows; r++) {
			const struct demo_row *w = &rows[r];
			char lab[64];
			double app = w->bytes_wire / w->t_append / 1e9, fet = w->bytes_wire / w->t_fetch / 1e9;
			codec_label(&w->codec, lab, sizeof(lab));
			printf("{\"bench\":\"service_append\",\"codec\":\"%s\",\"sessions\":%u,\"tokens\":%u,\"layers\":%u,\"kv_heads\":%u,\"head_dim\":%u,\"dtype\":\"%s\",\"gbps\":%.4f,\"ref\":\"memcpy\",\"ref_gbps\":%.3f,\"ratio\":%.5f}\n",
			       lab, o->sessions, T, L, H, d, kvt_dtype_name(o->dtype), app, mc, app / mc);
			printf("{\"bench\":\"service_fetch\",\"codec\":\"%s\",\"sessions\":%u,\"tokens\":%u,\"gbps\":%.4f,\"ref\":\"memcpy\",\"ref_gbps\":%.3f,\"ratio\":%.5f}\n",
			       lab, o->sessions, T, fet, mc, fet / mc);
			printf("{\"bench\":\"service_attend\",\"codec\":\"%s\",\"tokens\":%u,\"q_heads\":%u,\"steps_per_s\":%.2f,\"items_per_s\":%.1f,\"batch\":%u,\"attn_out_rel_err\":%.5f,\"attn_out_rel_err_item_max\":%.5f,\"decode_consistency_max\":%.5f,\"ref\":\"exact attention over the K/V as sent (local)\"}\n",
			       lab, T, Hq, w->n_steps / w->t_attend, w->n_items / w->t_attend, L,
			       rel_of(w->o_num, w->o_den), w->o_item_max, w->cons_max);
			printf("{\"bench\":\"service_memory\",\"codec\":\"%s\",\"compression_ratio\":%.3f,\"bits_per_element\":%.3f,\"key_rel_err\":%.5f,\"value_rel_err\":%.5f,\"ref\":\"dense f16 (16 bits)\"}\n",
			       lab, w->held ? (double)w->logical / (double)w->held : 0,
			       w->bpe_sum / o->sessions, rel_of(w->k_num, w->k_den),
			       rel_of(w->v_num, w->v_den));
		}
	} else {
		printf("demo: %u sessions, each %u prefill tokens + %u decode steps, %u layers, %u KV heads (%u query heads), head_dim %u, wire %s\n",
		       o->sessions, T, N, L, H, Hq, d, kvt_dtype_name(o->dtype));
		printf("demo: data: the synthetic TNI set of `kvtier-bench fidelity --synthetic` (client/kvt_synth.c), seed %" PRIu64 " (+1 per session); sinks at tokens %s\n",
		       seed, sinkpos);
		printf("demo: data: sink attention mass %.2f, logits in [%.1f, %.1f], mean logit range %.1f, attention entropy %.2f nats (SmolLM2-135M: first-token mass 0.35, range 14.2, entropy 2.9)\n",
		       sink_mass, ds.lmin, ds.lmax, range, entropy);
		printf("demo: same data offline (session 0): kvtier-bench fidelity --synthetic --seed %" PRIu64 " --layers %u --tokens %u --queries %u --kv-heads %u --q-heads %u --head-dim %u --sinks %d\n",
		       seed, L, Tt, N, H, Hq, d, rows[0].codec.n_sinks);
		printf("demo: attn-out err = ||O^ - O|| / ||O|| over all layers, query heads, decode steps and sessions (fidelity's attn_out_rel_err_kv); O = exact attention over the K/V as sent; K/V err = ||X^ - X|| / ||X|| of the prefill (key/value_rel_err_fro)\n");
		printf("demo: memory = bytes the daemon holds (chunks, exact sinks, tail, index) vs dense f16; bits/elem = sealed chunks only, all metadata included\n");
		printf("demo: %-22s %9s %8s %7s %7s %12s %11s %10s %10s\n", "codec", "bits/elem",
		       "memory", "K err", "V err", "attn-out err", "append GB/s", "fetch GB/s",
		       "decode/s");
		for (int r = 0; r < n_rows; r++) {
			const struct demo_row *w = &rows[r];
			char lab[64];
			codec_label(&w->codec, lab, sizeof(lab));
			printf("demo: %-22s %9.3f %7.2fx %7.4f %7.4f %12.4f %11.3f %10.3f %10.1f\n", lab,
			       w->bpe_sum / o->sessions,
			       w->held ? (double)w->logical / (double)w->held : 0,
			       rel_of(w->k_num, w->k_den), rel_of(w->v_num, w->v_den),
			       rel_of(w->o_num, w->o_den), w->bytes_wire / w->t_append / 1e9,
			       w->bytes_wire / w->t_fetch / 1e9, w->n_steps / w->t_attend);
		}
		printf("demo: decode/s = decode steps per second, each one Attend request with all %u layers (the step's new token included) over %u+ tokens\n",
		       L, T);
		for (int r = 0; r < n_rows; r++) {
			char lab[64];
			codec_label(&rows[r].codec, lab, sizeof(lab));
			printf("demo: %s: worst single (layer, step) attn-out err %.4f; Attend vs attention over the Fetch-decoded cache (consistency) max %.5f\n",
			       lab, rows[r].o_item_max, rows[r].cons_max);
		}
		printf("demo: exact tail %s\n", tail_exact ? "bit-exact" : "DIFFERS");
	}
	rc = tail_exact ? 0 : 1;
	if (!tail_exact)
		fprintf(stderr, "kvtierctl: demo: the exact tail came back different\n");
out:
	kvt_client_close(c);
	free(kf);
	free(vf);
	free(fk);
	free(fv);
	free(kw);
	free(vw);
	free(gk);
	free(gv);
	free(Q);
	free(ref);
	free(out);
	free(cons);
	free(p);
	free(sink);
	free(items);
	return rc;
}

static int cmd_demo(const struct global_opts *g, int argc, char **argv, int json)
{
	struct demo_opts o = { .sessions = 2, .tokens = 2048, .layers = 8, .kv_heads = 4,
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
		if (!strcmp(argv[i], "--only")) {
			o.only = 1;
			continue;
		}
		if (!strcmp(argv[i], "--seed") && i + 1 < argc) {
			if (parse_num(argv[0], argv[i], argv[i + 1], UINT64_MAX, &o.seed))
				return 2;
			i++;
			continue;
		}
		if (!strcmp(argv[i], "--dump-dir") && i + 1 < argc) {
			o.dump_dir = argv[++i];
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
				char q[Q_MAX];
				fprintf(stderr, "kvtierctl: --dtype %s is not f16, bf16 or f32\n",
					kvt_text_quote(q, sizeof q, argv[i]));
				return 2;
			}
			o.dtype = (uint32_t)d;
			continue;
		}
		if (!dst || i + 1 >= argc) {
			usage(stderr);
			return 2;
		}
		if (parse_u32(argv[0], argv[i], argv[i + 1], dst))
			return 2;
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
		else if (!strcmp(argv[i], "--timeout-ms") && i + 1 < argc) {
			if (parse_u32(NULL, argv[i], argv[i + 1], &g.timeout_ms))
				return 2;
			i++;
		} else if (!strcmp(argv[i], "--token") && i + 1 < argc)
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
	char q[Q_MAX];
	fprintf(stderr, "kvtierctl: unknown command %s\n", kvt_text_quote(q, sizeof q, argv[0]));
	usage(stderr);
	return 2;
}

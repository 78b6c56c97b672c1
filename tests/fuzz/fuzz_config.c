/*
 * fuzz_config.c - deterministic fuzzing of kvtierd's configuration loading (daemon/config.c):
 * the config file, KVTIER_* environment variables and command-line flags an operator writes,
 * then the cross-option rules of kvt_config_validate and the --print-config output.
 *
 * Each iteration generates a configuration from the option table (this file's rows[], checked
 * against kvt_config_n_options / kvt_config_option_name at start): for some options a final
 * value (coherent for the cross-option rules three times in four, so most loads pass them),
 * set by the config file (once or several times: the last line wins), the environment and/or
 * flags (--name=value, --name value, a bare --bool-name); the sources before the last get
 * other valid values. Values come in every accepted spelling: booleans as yes/true/1/on and
 * no/false/0/off, integers at, beside and between their bounds (leading zeros at times), sizes
 * in bytes, K/M/G/T with or without i/iB/B in either case and as N% of RAM, decimal doubles,
 * enum names, strings of 0..255 bytes (any bytes but NUL and newline: spaces, quotes, '#',
 * '=', non-ASCII, control bytes, which every source must refuse), quoted or not, with
 * comments, blank lines, CRLF and stray whitespace.
 * Mutations then add: unknown option names, values out of range by one, overflowing and
 * negative numbers, garbage suffixes, lines without '=', over-long lines (around the reader's
 * 1022 bytes), NUL and non-ASCII bytes inside lines, no final newline, duplicates, empty
 * values, unterminated quotes, unknown flags, arguments that are not --name, a value-less flag,
 * a trailing --config, a missing or directory config file, bad environment values, --help,
 * string flags and variables the file format cannot hold (a newline or another control byte,
 * a '"' followed by blanks and '#': refused), separate flag values spelled like a flag
 * (`--socket --print-config`, `--workers -c`: the option's value, never a flag as well).
 * Oracles:
 *   - a load never crashes (under ASan + UBSan too: tests/sanitize.sh);
 *   - the model: this file's reading of each value (spec_parse: what the table and the help
 *     text promise) applied in the loader's order (defaults < file lines < KVTIER_* in table
 *     order < flags in argv order, every value checked, the first bad one refuses the load),
 *     then the cross-option rules (model_rules). A load the model accepts returns 0 with every
 *     field of struct kvt_config, the sources array and the kvt_cmdline equal to the model's;
 *     one it refuses returns -EINVAL (-ENOENT / -EISDIR for a missing or directory file) with
 *     a non-empty message that names the file and line, the variable or the flag, and the
 *     option where one is involved (a rule: one of the options of a failing rule), quoting
 *     user text with its control bytes as \xNN: no message holds a raw control byte. Inputs
 *     the documentation leaves open (a blank before a size unit, hex doubles...) may go
 *     either way; the options they set are then not compared;
 *   - round trip: the kvt_config_print output (with or without sources, with a
 *     $RUNTIME_DIRECTORY holding a newline at times) of every accepted load, read back as a
 *     config file, gives the same value in every field and prints the same (strings the file
 *     format cannot hold are refused at load, so there is no exception);
 *   - error buffers of 0..16 bytes are never overrun (ASan) and stay NUL-terminated.
 * Every iteration draws from its own stream of (run seed, iteration), so KVT_SEED=<s>
 * KVT_FUZZ_ITER=<i> replays iteration i alone and prints its file, environment and argv. The
 * default run is a fixed number of iterations (a few seconds); KVT_FUZZ_ITERS=<n> or
 * KVT_FUZZ_SECONDS=<s> run longer.
 */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "fuzz_ctx.h"
#include "kvt_test_text.h"
#include "kvt_codec.h"
#include "kvt_test.h"
#include "kvt_test_text.h"

#define DEFAULT_ITERS 6000u
#define MAX_FAILING_ITERS 20
#define STR_MAX KVT_CONFIG_STR_MAX
#define READER_LINE_MAX 1022 /* config.c's longest line, its newline not counted */
#define LINE_CAP 1400
#define MAX_LINES 220
#define MAX_FLAGS 120
#define MAX_ARGS (2 * MAX_FLAGS + 4)
#define FILE_CAP (MAX_LINES * (LINE_CAP + 2))

static bool verbose;

/* ---- Randomness --------------------------------------------------------------------------- */

enum { STREAM_ITER = 1 };

static uint32_t rb(uint32_t n) { return kvt_rand_below(n); }
static bool coin(uint32_t n) { return kvt_rand_below(n) == 0; }
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define PICK(arr) (arr[rb((uint32_t)NELEM(arr))])

/* ---- The option table, as config.c's opts[] documents it ---------------------------------- */

enum ty { T_BOOL, T_U64, T_SIZE, T_DOUBLE, T_STRING, T_ENUM };

struct row {
	const char *name;
	enum ty ty;
	size_t off, size;
	uint64_t min, max;        /* U64, SIZE */
	double dmax;              /* DOUBLE: 0..dmax */
	const char *const *names; /* ENUM */
	uint64_t def;             /* BOOL, U64, SIZE, ENUM (strings default to "", doubles to 0) */
};

static const char *const policy_n[] = {"reject", "drop-coldest", NULL};
static const char *const scheme_n[] = {"none", "kivi", "hadamard", "oscar", NULL};
static const char *const rounding_n[] = {"minmax", "mse", NULL};
static const char *const level_n[] = {"debug", "info", "warn", "error", NULL};
static const char *const tier_n[] = {"host", "gpu", NULL};
static const char *const arena_n[] = {"lru", "keep", NULL};

#define KI ((uint64_t)1024)
#define MI (KI * 1024)
#define GI (MI * 1024)
#define TI (GI * 1024)
#define FLD(f) offsetof(struct kvt_config, f), sizeof(((struct kvt_config *)0)->f)
#define R_B(n, f, d) {n, T_BOOL, FLD(f), 0, 1, 0, NULL, d}
#define R_U(n, f, lo, hi, d) {n, T_U64, FLD(f), lo, hi, 0, NULL, d}
#define R_Z(n, f, lo, hi, d) {n, T_SIZE, FLD(f), lo, hi, 0, NULL, d}
#define R_E(n, f, names, d) {n, T_ENUM, FLD(f), 0, 0, 0, names, d}
#define R_S(n, f) {n, T_STRING, FLD(f), 0, 0, 0, NULL, 0}
#define R_D(n, f, hi) {n, T_DOUBLE, FLD(f), 0, 0, hi, NULL, 0}

static const struct row rows[] = {
	R_S("socket", socket_path),
	R_S("listen_tcp", listen_tcp),
	R_B("insecure_loopback", insecure_loopback, 0),
	R_U("cq_threads", cq_threads, 1, 64, 2),
	R_U("workers", workers, 0, 256, 0),
	R_Z("max_message_bytes", max_message_bytes, 256 * KI, 64 * MI, 4 * MI),
	R_U("max_concurrent_calls", max_concurrent_calls, 1, 65536, 1024),
	R_U("reply_pool_buffers", reply_pool_buffers, 0, 1024, 8),
	R_U("reply_pool_idle_ms", reply_pool_idle_ms, 0, 86400000, 10000),
	R_Z("host_capacity_bytes", host_capacity_bytes, MI, 64 * TI, 4 * GI),
	R_Z("host_page_cache_bytes", host_page_cache_bytes, 0, GI, 16 * MI),
	R_E("capacity_policy", capacity_policy, policy_n, 1),
	R_U("default_ttl_seconds", default_ttl_seconds, 0, 365 * 86400, 3600),
	R_U("max_ttl_seconds", max_ttl_seconds, 0, 365 * 86400, 604800),
	R_U("max_sessions", max_sessions, 1, 10000000, 65536),
	R_Z("max_append_bytes", max_append_bytes, 64 * KI, 64 * GI, 256 * MI),
	R_U("max_attend_items", max_attend_items, 1, 65536, 1024),
	R_E("default_scheme", default_scheme, scheme_n, 3),
	R_U("default_key_bits", default_key_bits, 2, 8, 3),
	R_U("default_value_bits", default_value_bits, 2, 8, 2),
	R_U("default_group", default_group, 32, 128, 64),
	R_U("default_chunk_tokens", default_chunk_tokens, 32, 1024, 64),
	R_U("default_n_sinks", default_n_sinks, 0, 64, 8),
	R_B("default_rotate_v", default_rotate_v, 1),
	R_D("default_pin_detect_ratio", default_pin_detect_ratio, 0.999),
	R_U("default_pin_detect_max", default_pin_detect_max, 0, 1024, 0),
	R_U("default_recent_exact_tokens", default_recent_exact_tokens, 0, KVT_MAX_RECENT_EXACT,
	    128),
	R_E("default_key_rounding", default_key_rounding, rounding_n, 0),
	R_E("log_level", log_level, level_n, 1),
	R_U("maintenance_interval_ms", maintenance_interval_ms, 10, 60000, 1000),
	R_U("shutdown_grace_ms", shutdown_grace_ms, 0, 600000, 10000),
	R_B("gpu_enable", gpu_enable, 1),
	R_U("gpu_device", gpu_device, 0, 63, 0),
	R_Z("gpu_arena_bytes", gpu_arena_bytes, 0, 1024 * GI, 0),
	R_Z("gpu_staging_bytes", gpu_staging_bytes, 4 * MI, 16 * GI, 64 * MI),
	R_U("gpu_ipc_idle_seconds", gpu_ipc_idle_seconds, 1, 86400, 60),
	R_E("gpu_default_tier", gpu_default_tier, tier_n, 0),
	R_U("gpu_restore_threads", gpu_restore_threads, 1, 32, 8),
	R_B("gpu_pin_host", gpu_pin_host, 1),
	R_E("gpu_arena_policy", gpu_arena_policy, arena_n, 0),
};
#define N_ROWS ((int)NELEM(rows))

/* rows the cross-option rules name */
static int ix_socket, ix_tcp, ix_insecure, ix_kbits, ix_vbits, ix_group, ix_chunk, ix_sinks,
	ix_pinmax, ix_recent, ix_dttl, ix_mttl, ix_append, ix_hostcap;

static uint64_t ram_bytes;

static int row_index(const char *name)
{
	for (int i = 0; i < N_ROWS; i++)
		if (!strcmp(rows[i].name, name))
			return i;
	printf("# fuzz_config: no row %s\n", name);
	abort();
}

/* The row a name written in a file or flag means (dashes are underscores), or -1. */
static int row_by_name(const char *name, size_t n)
{
	for (int i = 0; i < N_ROWS; i++) {
		const char *a = rows[i].name;
		size_t j = 0;
		while (j < n && a[j] && (name[j] == '-' ? '_' : name[j]) == a[j])
			j++;
		if (j == n && !a[j])
			return i;
	}
	return -1;
}

/* ---- Values and the model's reading of a value's text ------------------------------------- */

struct val {
	uint64_t u;
	double d;
	char s[STR_MAX];
};

enum out { O_OK, O_REFUSE, O_ANY }; /* O_ANY: the documentation leaves it open */

static bool is_digit(char c) { return c >= '0' && c <= '9'; }
static bool is_space(char c) /* isspace() in the C locale */
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

static bool all_digits(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!is_digit(s[i]))
			return false;
	return n > 0;
}

/* s[0..n) as a decimal u64; false on overflow */
static bool dec_u64(const char *s, size_t n, uint64_t *out)
{
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		if (__builtin_mul_overflow(v, 10, &v) ||
		    __builtin_add_overflow(v, (uint64_t)(s[i] - '0'), &v))
			return false;
	*out = v;
	return true;
}

static bool in_range(const struct row *r, uint64_t x) { return x >= r->min && x <= r->max; }

/* What daemon/README.md promises of a string: no control bytes (< 0x20, 0x7f), and no '"'
 * followed by blanks and '#' (a quoted value in the file would end at that quote). */
static bool file_writable(const char *t)
{
	for (const char *p = t; *p; p++) {
		if ((unsigned char)*p < 0x20 || *p == 0x7f)
			return false;
		if (*p == '"') {
			const char *q = p + 1;
			while (*q == ' ')
				q++;
			if (*q == '#')
				return false;
		}
	}
	return true;
}

static const char *const yes_words[] = {"yes", "true", "1", "on"};
static const char *const no_words[] = {"no", "false", "0", "off"};

/* digits, then "N%" (1..100 of RAM) or an optional unit: B, or K/M/G/T in either case
 * followed by nothing, i, iB, ib, B or b. A blank before the unit and an upper-case I are
 * not documented either way. */
static enum out spec_size(const struct row *r, const char *t, struct val *v)
{
	size_t k = 0;
	uint64_t num, mul = 1, x;
	while (is_digit(t[k]))
		k++;
	if (!k || !dec_u64(t, k, &num))
		return O_REFUSE;
	const char *u = t + k;
	if (u[0] == '%' && !u[1]) {
		if (num < 1 || num > 100)
			return O_REFUSE;
		v->u = ram_bytes / 100 * num;
		return in_range(r, v->u) ? O_OK : O_REFUSE;
	}
	bool gray = false;
	if (*u == ' ') {
		gray = true;
		while (*u == ' ')
			u++;
	}
	const char *units = "KMGTkmgt";
	if (*u && strchr(units, *u)) {
		mul = (uint64_t)1 << (10 * ((strchr(units, *u) - units) % 4 + 1));
		u++;
		if (!*u || !strcmp(u, "B") || !strcmp(u, "b") || !strcmp(u, "i") ||
		    !strcmp(u, "iB") || !strcmp(u, "ib"))
			;
		else if (u[0] == 'I' && (!u[1] || ((u[1] == 'B' || u[1] == 'b') && !u[2])))
			gray = true;
		else
			return O_REFUSE;
	} else if (*u && strcmp(u, "B") && strcmp(u, "b")) {
		return O_REFUSE;
	}
	if (__builtin_mul_overflow(num, mul, &x) || !in_range(r, x))
		return O_REFUSE;
	v->u = x;
	return gray ? O_ANY : O_OK;
}

/* [+-] digits [. digits] [e [+-] digits] */
static bool plain_decimal(const char *p)
{
	size_t a = 0, b = 0, e = 0;
	if (*p == '+' || *p == '-')
		p++;
	while (is_digit(*p))
		p++, a++;
	if (*p == '.')
		for (p++; is_digit(*p); p++)
			b++;
	if (!a && !b)
		return false;
	if (*p == 'e' || *p == 'E') {
		p++;
		if (*p == '+' || *p == '-')
			p++;
		while (is_digit(*p))
			p++, e++;
		if (!e)
			return false;
	}
	return !*p;
}

static enum out spec_double(const struct row *r, const char *t, struct val *v)
{
	if (!plain_decimal(t)) {
		const char *p = t;
		if (is_space(*p))
			return O_ANY; /* strtod skips leading blanks */
		if (*p == '+' || *p == '-')
			p++;
		return p[0] == '0' && (p[1] == 'x' || p[1] == 'X') ? O_ANY : O_REFUSE;
	}
	const double d = strtod(t, NULL);
	if (!isfinite(d))
		return O_REFUSE;
	bool nonzero = false;
	for (const char *p = t; *p && *p != 'e' && *p != 'E'; p++)
		nonzero |= *p >= '1' && *p <= '9';
	if (nonzero && fabs(d) < DBL_MIN)
		return O_ANY; /* underflow: ERANGE, not documented */
	v->d = d;
	return d < 0 || d > r->dmax ? O_REFUSE : O_OK;
}

/* What the loader must make of text as the value of row r. */
static enum out spec_parse(int ri, const char *t, struct val *v)
{
	const struct row *r = &rows[ri];
	const size_t n = strlen(t);
	v->u = 0;
	v->d = 0;
	v->s[0] = 0;
	switch (r->ty) {
	case T_BOOL:
		for (size_t i = 0; i < 4; i++) {
			if (!strcmp(t, yes_words[i]) || !strcmp(t, no_words[i])) {
				v->u = !strcmp(t, yes_words[i]);
				return O_OK;
			}
		}
		return O_REFUSE;
	case T_ENUM:
		for (uint64_t i = 0; r->names[i]; i++) {
			if (!strcmp(t, r->names[i])) {
				v->u = i;
				return O_OK;
			}
		}
		return O_REFUSE;
	case T_STRING:
		if (n >= STR_MAX || !file_writable(t))
			return O_REFUSE;
		memcpy(v->s, t, n + 1);
		return O_OK;
	case T_U64:
		if (!all_digits(t, n) || !dec_u64(t, n, &v->u))
			return O_REFUSE;
		return in_range(r, v->u) ? O_OK : O_REFUSE;
	case T_SIZE:
		return spec_size(r, t, v);
	case T_DOUBLE:
		return spec_double(r, t, v);
	}
	return O_REFUSE;
}

static void default_val(int ri, struct val *v)
{
	memset(v, 0, sizeof(*v));
	v->u = rows[ri].def;
}

/* the field of row ri in c equals v (doubles bit for bit) */
static bool field_eq(int ri, const struct kvt_config *c, const struct val *v)
{
	const char *p = (const char *)c + rows[ri].off;
	switch (rows[ri].ty) {
	case T_STRING:
		return memchr(p, 0, STR_MAX) && !strcmp(p, v->s);
	case T_DOUBLE:
		return !memcmp(p, &v->d, sizeof(double));
	default:
		return !memcmp(p, &v->u, sizeof(uint64_t));
	}
}

static void field_val(int ri, const struct kvt_config *c, struct val *v)
{
	const char *p = (const char *)c + rows[ri].off;
	memset(v, 0, sizeof(*v));
	if (rows[ri].ty == T_STRING)
		snprintf(v->s, sizeof(v->s), "%.*s", STR_MAX - 1, p);
	else if (rows[ri].ty == T_DOUBLE)
		memcpy(&v->d, p, sizeof(double));
	else
		memcpy(&v->u, p, sizeof(uint64_t));
}

/* printable, escaped: \xNN for other bytes */
static size_t esc(char *out, size_t cap, const char *b, size_t n)
{
	size_t o = 0;
	for (size_t i = 0; i < n && o + 5 < cap; i++) {
		const unsigned char c = (unsigned char)b[i];
		if (c >= 0x20 && c < 0x7f && c != '\\')
			out[o++] = (char)c;
		else
			o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
	}
	out[o] = 0;
	return o;
}

/* s as config.c's messages quote user text (kvtierd's log and kvtierctl alike), modelled from
 * kvt_test_text.h rather than common/kvt_text.c: a code point a terminal acts on (C0, DEL,
 * C1, a format character or separator) as \xNN per byte, a byte of no well-formed UTF-8
 * sequence as \xNN, '"' and '\\' after a backslash, the rest as is */
static void msg_esc(char *out, size_t cap, const char *s)
{
	size_t o = 0;
	const unsigned char *p = (const unsigned char *)s;
	while (*p && o + 17 < cap) {
		size_t w;
		const long cp = kvt_test_decode_utf8(p, &w);
		if (cp < 0)
			w = 1;
		if (cp < 0 || !kvt_test_shown_raw_ok(cp)) {
			for (size_t i = 0; i < w; i++)
				o += (size_t)snprintf(out + o, cap - o, "\\x%02x", p[i]);
		} else {
			if (cp == '"' || cp == '\\')
				out[o++] = '\\';
			memcpy(out + o, p, w);
			o += w;
		}
		p += w;
	}
	out[o] = 0;
}

static void show_val(int ri, const struct val *v, char *out, size_t cap)
{
	switch (rows[ri].ty) {
	case T_STRING: {
		char e[STR_MAX * 4 + 8];
		esc(e, sizeof(e), v->s, strlen(v->s));
		snprintf(out, cap, "\"%s\"", e);
		return;
	}
	case T_DOUBLE:
		snprintf(out, cap, "%.17g", v->d);
		return;
	default:
		snprintf(out, cap, "%" PRIu64, v->u);
		return;
	}
}

/* ---- The cross-option rules (kvt_config_validate's, from its documentation) --------------- */

static bool bits_ok(uint64_t b) { return b == 2 || b == 3 || b == 4 || b == 8; }

/* listen_tcp: empty, or host:port with a decimal port 0..65535 and a loopback host (127.x,
 * ::1, [::1], localhost), and then only with insecure_loopback */
static bool tcp_ok(const char *s, uint64_t insecure)
{
	if (!*s)
		return true;
	const char *c = strrchr(s, ':');
	uint64_t port;
	if (!c || c == s || !all_digits(c + 1, strlen(c + 1)) ||
	    !dec_u64(c + 1, strlen(c + 1), &port) || port > 65535)
		return false;
	const size_t hl = (size_t)(c - s);
	bool lo = (hl == 9 && !memcmp(s, "localhost", 9)) || (hl == 3 && !memcmp(s, "::1", 3)) ||
		  (hl == 5 && !memcmp(s, "[::1]", 5));
	if (hl >= 4 && !memcmp(s, "127.", 4)) {
		lo = true;
		for (size_t i = 4; i < hl; i++)
			lo &= is_digit(s[i]) || s[i] == '.';
	}
	return lo && insecure;
}

struct rules {
	const char *failing[12]; /* the first option of each failing rule */
	int n_failing;
	bool undecided; /* a rule over a row whose value is not known */
};

static void model_rules(const struct val *m, const bool *unknown, struct rules *out)
{
	const struct {
		int a, b; /* rows (b -1: none) */
	} deps[] = {
		{ix_kbits, -1}, {ix_vbits, -1}, {ix_group, -1}, {ix_chunk, ix_group},
		{ix_sinks, ix_chunk}, {ix_pinmax, ix_chunk}, {ix_recent, ix_chunk},
		{ix_dttl, ix_mttl}, {ix_append, ix_hostcap}, {ix_tcp, ix_insecure},
	};
	const uint64_t chunk = m[ix_chunk].u, group = m[ix_group].u;
	const bool fails[] = {
		!bits_ok(m[ix_kbits].u),
		!bits_ok(m[ix_vbits].u),
		group != 32 && group != 64 && group != 128,
		group && chunk % group != 0,
		m[ix_sinks].u > chunk,
		m[ix_pinmax].u > chunk,
		m[ix_recent].u && m[ix_recent].u < chunk,
		m[ix_mttl].u && m[ix_dttl].u > m[ix_mttl].u,
		m[ix_append].u > m[ix_hostcap].u,
		!tcp_ok(m[ix_tcp].s, m[ix_insecure].u),
	};
	out->n_failing = 0;
	out->undecided = false;
	for (size_t i = 0; i < NELEM(fails); i++) {
		if (unknown[deps[i].a] || (deps[i].b >= 0 && unknown[deps[i].b]))
			out->undecided = true;
		else if (fails[i])
			out->failing[out->n_failing++] = rows[deps[i].a].name;
	}
}

/* ---- Generated values and their spellings ------------------------------------------------- */

/* a value with, where the spelling is not free (doubles, N%), its text */
struct tv {
	struct val v;
	char text[64];
};

static uint64_t pick_between(uint64_t lo, uint64_t hi)
{
	switch (rb(8)) {
	case 0: return lo;
	case 1: return hi;
	case 2: return lo < hi ? lo + 1 : lo;
	case 3: return lo < hi ? hi - 1 : hi;
	default: {
		/* log-uniform over the span */
		const uint64_t span = hi - lo;
		const unsigned bits = span ? 64 - (unsigned)__builtin_clzll(span) : 0;
		const unsigned b = rb(bits + 1);
		const uint64_t mask = b >= 64 ? UINT64_MAX : ((uint64_t)1 << b) - 1;
		uint64_t x = kvt_rand_u64() & mask;
		return lo + (x > span ? span : x);
	}
	}
}

static uint64_t pick_size(uint64_t lo, uint64_t hi)
{
	if (coin(3))
		return pick_between(lo, hi);
	const uint64_t unit = (uint64_t)1 << (10 * (1 + rb(4)));
	const uint64_t a = (lo + unit - 1) / unit, b = hi / unit;
	return a <= b ? pick_between(a, b) * unit : pick_between(lo, hi);
}

static void gen_double_text(char *t, size_t cap)
{
	static const char *const fixed[] = {"0", "0.5", "0.999", ".25", "0.", "5e-1", "9.99e-1",
					    "0.0", "000.125", "+0.5", "-0", "1e-300", "0.1",
					    "0.99899999999999999", "2.5E-1", "0.000001"};
	switch (rb(4)) {
	case 0: snprintf(t, cap, "%s", PICK(fixed)); break;
	case 1: snprintf(t, cap, "0.%03u", rb(1000)); break;
	case 2: snprintf(t, cap, "%.17g", (double)kvt_rand_uniform() * 0.999); break;
	default:
		snprintf(t, cap, "%.*f", 1 + (int)rb(12), (double)kvt_rand_uniform() * 0.999);
		break;
	}
}

/* a byte below 0x20 or 0x7f; '\n' only with newline (a file line cannot hold one) */
static char control_byte(bool newline)
{
	for (;;) {
		const char c = coin(8) ? '\x7f' : (char)(1 + rb(0x1f));
		if (c != '\n' || newline)
			return c;
	}
}

/* a string for a string option: path-like or wild bytes (no NUL, no newline, so that it can
 * be put in a file line; control bytes at times, which the loader refuses); a '"' is never
 * followed by blanks and '#' (a file line cannot hold that: F_UNWRITABLE sends those by flag
 * and environment) */
static void gen_string(char *s, size_t len_cap)
{
	static const char plain[] = "abcdefghijklmnopqrstuvwxyz0123456789/._-";
	static const char wild[] = " \"#='\\:@%$!;,()[]{}";
	size_t n;
	switch (rb(10)) {
	case 0: n = 0; break;
	case 1: n = STR_MAX - 1; break;
	case 2: n = STR_MAX - 2 - rb(3); break;
	default: n = 1 + rb(60); break;
	}
	if (n > len_cap)
		n = len_cap;
	const bool is_wild = coin(3), ctl = is_wild && coin(3);
	for (size_t i = 0; i < n; i++) {
		const uint32_t r = rb(20);
		if (!is_wild || r < 12)
			s[i] = plain[rb(sizeof(plain) - 1)];
		else if (r < 17)
			s[i] = wild[rb(sizeof(wild) - 1)];
		else if (r < 19 || !ctl)
			s[i] = (char)(0x80 + rb(0x80));
		else
			s[i] = control_byte(false);
	}
	s[n] = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] != '"')
			continue;
		size_t j = i + 1;
		while (j < n && is_space(s[j]))
			j++;
		if (j < n && s[j] == '#')
			s[j] = '_';
	}
}

static void gen_tcp(char *s, size_t cap, bool valid)
{
	static const char *const lo_hosts[] = {"127.0.0.1", "127.1.2.3", "localhost", "::1",
					       "[::1]", "127.0.0.1"};
	static const char *const lo_ports[] = {"0", "80", "7000", "65535", "08080"};
	static const char *const hosts[] = {"127.0.0.1", "127.", "localhost", "::1", "[::1]",
					    "0.0.0.0", "10.1.2.3", "example.com", "[::]",
					    "127.0.0.1x", "LOCALHOST", "::", ""};
	static const char *const ports[] = {"0", "80", "7000", "65535", "65536", "99999", "",
					    "x", "08080", "70000", "8o",
					    "99999999999999999999999"};
	if (valid) {
		snprintf(s, cap, "%s:%s", PICK(lo_hosts), PICK(lo_ports));
		return;
	}
	switch (rb(10)) {
	case 0: snprintf(s, cap, "%s", PICK(hosts)); break;
	case 1: snprintf(s, cap, ":%s", PICK(ports)); break;
	default: snprintf(s, cap, "%s:%s", PICK(hosts), PICK(ports)); break;
	}
}

/* a random valid value of row ri */
static void gen_tv(int ri, struct tv *t)
{
	const struct row *r = &rows[ri];
	memset(t, 0, sizeof(*t));
	switch (r->ty) {
	case T_BOOL: t->v.u = rb(2); break;
	case T_ENUM: {
		uint32_t n = 0;
		while (r->names[n])
			n++;
		t->v.u = rb(n);
		break;
	}
	case T_U64: t->v.u = pick_between(r->min, r->max); break;
	case T_SIZE:
		if (coin(8)) {
			const uint32_t p = 1 + rb(100);
			if (in_range(r, ram_bytes / 100 * p)) {
				t->v.u = ram_bytes / 100 * p;
				snprintf(t->text, sizeof(t->text), "%u%%", p);
				break;
			}
		}
		t->v.u = pick_size(r->min, r->max);
		break;
	case T_DOUBLE:
		gen_double_text(t->text, sizeof(t->text));
		if (spec_parse(ri, t->text, &t->v) != O_OK)
			snprintf(t->text, sizeof(t->text), "0.5");
		t->v.d = strtod(t->text, NULL);
		break;
	case T_STRING:
		if (ri == ix_tcp)
			gen_tcp(t->v.s, sizeof(t->v.s), coin(2));
		else
			gen_string(t->v.s, STR_MAX - 1);
		break;
	}
}

static void spell_size(uint64_t v, char *out, size_t cap)
{
	static const char *const tails[] = {"", "B", "iB", "ib", "b", "i"};
	static const char *const bare[] = {"", "", "B", "b"};
	int maxu = 0;
	while (maxu < 4 && v % ((uint64_t)1 << (10 * (maxu + 1))) == 0)
		maxu++;
	const int u = (int)rb((uint32_t)maxu + 1);
	const uint64_t n = v >> (10 * u);
	if (!u)
		snprintf(out, cap, "%" PRIu64 "%s", n, PICK(bare));
	else
		snprintf(out, cap, "%" PRIu64 "%c%s", n, coin(3) ? "kmgt"[u - 1] : "KMGT"[u - 1],
			 PICK(tails));
}

/* one accepted spelling of t */
static void spell(int ri, const struct tv *t, char *out, size_t cap)
{
	const struct row *r = &rows[ri];
	if (t->text[0]) {
		snprintf(out, cap, "%s", t->text);
		return;
	}
	switch (r->ty) {
	case T_BOOL: snprintf(out, cap, "%s", t->v.u ? PICK(yes_words) : PICK(no_words)); break;
	case T_ENUM: snprintf(out, cap, "%s", r->names[t->v.u]); break;
	case T_U64: snprintf(out, cap, "%s%" PRIu64, coin(8) ? "00" : "", t->v.u); break;
	case T_SIZE: spell_size(t->v.u, out, cap); break;
	case T_STRING: snprintf(out, cap, "%s", t->v.s); break;
	case T_DOUBLE: snprintf(out, cap, "0"); break;
	}
}

/* Texts a row must refuse (or, for the gray ones, may take either way). */
enum bad { BAD_RANGE, BAD_OVERFLOW, BAD_NEGATIVE, BAD_SUFFIX, BAD_EMPTY, BAD_GRAY, N_BAD };
static const char *const bad_names[] = {"out of range by one", "overflowing", "negative",
					"garbage suffix", "empty", "undocumented spelling"};

static void bad_text(int ri, enum bad kind, char *out, size_t cap)
{
	const struct row *r = &rows[ri];
	char ok[STR_MAX + 64];
	struct tv t;
	gen_tv(ri, &t);
	spell(ri, &t, ok, sizeof(ok));
	switch (kind) {
	case BAD_RANGE:
		if (r->ty == T_DOUBLE) {
			static const char *const d[] = {"1", "0.9991", "-0.001", "1.5",
							"0.99900001"};
			snprintf(out, cap, "%s", PICK(d));
		} else if (r->ty == T_U64 || r->ty == T_SIZE) {
			if (r->min > 0 && coin(2))
				snprintf(out, cap, "%" PRIu64, r->min - 1);
			else if (r->ty == T_SIZE && r->max % KI == 0 && coin(2))
				spell_size((r->max / KI + 1) * KI, out, cap);
			else
				snprintf(out, cap, "%" PRIu64, r->max + 1);
		} else if (r->ty == T_STRING) {
			const size_t n = STR_MAX + (coin(2) ? 0 : rb(300));
			for (size_t i = 0; i < n && i + 1 < cap; i++)
				out[i] = "abc/"[rb(4)];
			out[n < cap ? n : cap - 1] = 0;
		} else {
			snprintf(out, cap, "%s%s", ok, "x");
		}
		return;
	case BAD_OVERFLOW: {
		static const char *const u[] = {"18446744073709551616", "99999999999999999999999",
						"18446744073709551615",
						"340282366920938463463374607431768211456"};
		static const char *const z[] = {"17179869184TiB", "18014398509481984K",
						"18446744073709551616", "99999999999999999999G"};
		static const char *const d[] = {"1e400", "-1e400", "1e99999"};
		const char *o = r->ty == T_SIZE ? PICK(z) : r->ty == T_DOUBLE ? PICK(d) : PICK(u);
		snprintf(out, cap, "%s", o);
		return;
	}
	case BAD_NEGATIVE:
		if (r->ty == T_DOUBLE)
			snprintf(out, cap, "%s", coin(2) ? "-0.5" : "-1e-3");
		else
			snprintf(out, cap, "-%s", ok);
		return;
	case BAD_SUFFIX: {
		static const char *const su[] = {"x", "abc", "%", ".5", "e3", " x", "-1", "k"};
		static const char *const sz[] = {"x", "Q", "/2", "%%", ".5", "KiBx", "BB"};
		static const char *const sb[] = {"x", "2", "_", "es"};
		static const char *const sd[] = {"x", "q", "%", "e", "e+", "/", "0x"};
		static const char *const ss[] = {"x", "/y", "\xc3\xa9", "=", ":", "0"};
		const char *s = r->ty == T_U64 ? PICK(su)
			      : r->ty == T_SIZE ? PICK(sz)
			      : r->ty == T_DOUBLE ? PICK(sd)
			      : r->ty == T_STRING ? PICK(ss)
			      : PICK(sb);
		snprintf(out, cap, "%s%s", ok, s);
		return;
	}
	case BAD_EMPTY:
		out[0] = 0;
		return;
	case BAD_GRAY: {
		static const char *const z[] = {"4 KiB", "4KIB", "16 M", "2 ", "1GIB"};
		static const char *const d[] = {"0x1p-2", " 0.5", "1e-320", "\t0.25"};
		static const char *const b[] = {"YES", "True", "On", "y", "2"};
		snprintf(out, cap, "%s", r->ty == T_SIZE ? PICK(z) : r->ty == T_DOUBLE ? PICK(d)
				       : r->ty == T_BOOL ? PICK(b) : "0x10");
		return;
	}
	case N_BAD:
		break;
	}
	out[0] = 0;
}

/* ---- A generated configuration: file lines, environment, argv ----------------------------- */

enum eff { E_NONE, E_SET, E_REFUSE, E_ANY };

struct line {
	size_t n;
	int row;                               /* the option it sets or refuses, -1 none */
	size_t name_off, name_len, val_off, val_len, com_off; /* val: inside the quotes */
	bool is_opt;                           /* an option line whose offsets are good */
	bool sticky;                           /* refused whatever its value */
	enum eff eff;
	struct val v;
	char must[160]; /* a refusal here must also name this */
	char b[LINE_CAP]; /* without the line end; last: the members above are reset with memset */
};

struct flag {
	int nargs; /* argv strings it takes */
	int row;
	enum eff eff;
	bool is_config;
	struct val v;
	char must[LINE_CAP]; /* a refusal here must name this */
	char a[LINE_CAP], b[LINE_CAP];
};

struct envv {
	bool set;
	char val[LINE_CAP];
	enum eff eff;
	struct val v;
};

enum file_kind { FK_OK, FK_MISSING, FK_DIR };

struct scen {
	struct line lines[MAX_LINES];
	int n_lines;
	bool use_file, crlf, final_nl;
	enum file_kind file_kind;
	const char *cfg_path; /* the last --config's */
	struct envv env[N_ROWS];
	bool stray_env;
	struct flag flags[MAX_FLAGS];
	int n_flags;
	bool tail_locked;     /* the last flag must stay last */
	char trailing[16];    /* "--config" / "-c" with no file after it, or "" */
	bool help, check, print, unreloadable;
	struct fuzz_desc desc;
	uint32_t kinds;       /* mutation kinds applied (bit per kind) */
};

static char dir[256], path[300], rt_path[300], missing_path[300];
static char bad_cfg_arg[400];

static void lput(struct line *L, const char *s, size_t n)
{
	if (L->n + n < LINE_CAP) {
		memcpy(L->b + L->n, s, n);
		L->n += n;
	}
}
static void lputs(struct line *L, const char *s) { lput(L, s, strlen(s)); }

static const char *ws(void)
{
	static const char *const w[] = {"", "", "", " ", "  ", "\t", " \t"};
	return PICK(w);
}

static bool needs_quotes(const char *v)
{
	const size_t n = strlen(v);
	return n && (is_space(v[0]) || is_space(v[n - 1]) || v[0] == '"' || strchr(v, '#'));
}

static void comment_text(struct line *L)
{
	static const char cs[] = "abc xyz=#\"'0123";
	lputs(L, "#");
	for (uint32_t k = rb(30); k > 0; k--) {
		const char c = coin(12) ? (char)(0x80 + rb(0x80)) : cs[rb(sizeof(cs) - 1)];
		lput(L, &c, 1);
	}
}

static void set_eff(struct line *L)
{
	if (L->sticky)
		return;
	L->row = row_by_name(L->b + L->name_off, L->name_len);
	if (L->row < 0) {
		L->eff = E_REFUSE;
		snprintf(L->must, sizeof(L->must), "%.*s", (int)L->name_len, L->b + L->name_off);
		return;
	}
	char t[LINE_CAP];
	snprintf(t, sizeof(t), "%.*s", (int)L->val_len, L->b + L->val_off);
	const enum out o = spec_parse(L->row, t, &L->v);
	L->eff = o == O_OK ? E_SET : o == O_REFUSE ? E_REFUSE : E_ANY;
	snprintf(L->must, sizeof(L->must), "%s", rows[L->row].name);
}

/* `name = value` with random blanks, quotes and a comment; name as written */
static void render_opt(struct line *L, const char *name, const char *val)
{
	const bool q = needs_quotes(val) || coin(5);
	memset(L, 0, offsetof(struct line, b));
	L->n = 0;
	L->sticky = false;
	if (coin(4))
		lputs(L, ws());
	L->name_off = L->n;
	lputs(L, name);
	L->name_len = L->n - L->name_off;
	lputs(L, ws());
	lputs(L, "=");
	lputs(L, ws());
	if (q)
		lputs(L, "\"");
	L->val_off = L->n;
	lputs(L, val);
	L->val_len = L->n - L->val_off;
	if (q)
		lputs(L, "\"");
	if (coin(4))
		lputs(L, ws());
	if (coin(4) && coin(2))
		lputs(L, " ");
	L->com_off = L->n; /* its '#', if any */
	if (coin(4))
		comment_text(L);
	L->is_opt = true;
	set_eff(L);
}

/* a line that sets nothing: blank, blanks only, a comment */
static void render_filler(struct line *L)
{
	memset(L, 0, offsetof(struct line, b));
	L->row = -1;
	L->eff = E_NONE;
	switch (rb(6)) {
	case 0: break;
	case 1: lputs(L, coin(2) ? "   " : "\t "); break;
	case 2: lputs(L, "#=#"); break;
	case 3: lputs(L, "   # x = y"); break;
	default: comment_text(L); break;
	}
	L->com_off = 0;
}

/* a raw line refused as a whole (no '=', unterminated quote, ...) */
static void render_raw(struct line *L, const char *text, const char *must)
{
	memset(L, 0, offsetof(struct line, b));
	lputs(L, text);
	L->row = -1;
	L->eff = E_REFUSE;
	L->sticky = true;
	snprintf(L->must, sizeof(L->must), "%s", must);
	L->com_off = L->n;
}

static struct line *line_insert(struct scen *s, int pos)
{
	if (s->n_lines >= MAX_LINES)
		return NULL;
	if (pos < 0 || pos > s->n_lines)
		pos = s->n_lines;
	memmove(&s->lines[pos + 1], &s->lines[pos],
		(size_t)(s->n_lines - pos) * sizeof(struct line));
	s->n_lines++;
	return &s->lines[pos];
}

static struct flag *flag_insert(struct scen *s, int pos)
{
	const int end = s->n_flags - (s->tail_locked ? 1 : 0);
	if (s->n_flags >= MAX_FLAGS)
		return NULL;
	if (pos < 0 || pos > end)
		pos = end;
	memmove(&s->flags[pos + 1], &s->flags[pos],
		(size_t)(s->n_flags - pos) * sizeof(struct flag));
	s->n_flags++;
	struct flag *f = &s->flags[pos];
	memset(f, 0, offsetof(struct flag, must));
	f->must[0] = f->a[0] = f->b[0] = 0;
	f->row = -1;
	return f;
}

static void flag_name(int ri, char *out, size_t cap)
{
	snprintf(out, cap, "%s", rows[ri].name);
	const uint32_t style = rb(4);
	for (char *p = out; *p; p++)
		if (*p == '_' && (style == 0 || (style == 1 && coin(2))))
			*p = '-';
}

static void file_name(int ri, char *out, size_t cap)
{
	snprintf(out, cap, "%s", rows[ri].name);
	if (coin(6))
		for (char *p = out; *p; p++)
			if (*p == '_' && coin(2))
				*p = '-';
}

/* --name=text, --name text, or a bare --name for a true boolean */
static void make_opt_flag(struct flag *f, int ri, const char *text)
{
	char nm[96];
	flag_name(ri, nm, sizeof(nm));
	f->row = ri;
	f->nargs = 1;
	snprintf(f->must, sizeof(f->must), "%s", rows[ri].name);
	struct val tmp;
	const bool is_true = rows[ri].ty == T_BOOL && spec_parse(ri, text, &tmp) == O_OK && tmp.u;
	if (is_true && coin(3)) {
		snprintf(f->a, sizeof(f->a), "--%s", nm);
		text = "yes";
	} else if (rows[ri].ty != T_BOOL && coin(4)) {
		snprintf(f->a, sizeof(f->a), "--%s", nm);
		snprintf(f->b, sizeof(f->b), "%s", text);
		f->nargs = 2;
	} else {
		snprintf(f->a, sizeof(f->a), "--%s=%s", nm, text);
	}
	const enum out o = spec_parse(ri, text, &f->v);
	f->eff = o == O_OK ? E_SET : o == O_REFUSE ? E_REFUSE : E_ANY;
}

static void env_name(int ri, char *out, size_t cap)
{
	snprintf(out, cap, "KVTIER_%s", rows[ri].name);
	for (char *p = out; *p; p++)
		if (*p >= 'a' && *p <= 'z')
			*p = (char)(*p - 'a' + 'A');
}

static void set_env(struct scen *s, int ri, const char *text)
{
	s->env[ri].set = true;
	snprintf(s->env[ri].val, sizeof(s->env[ri].val), "%s", text);
	const enum out o = spec_parse(ri, text, &s->env[ri].v);
	s->env[ri].eff = o == O_OK ? E_SET : o == O_REFUSE ? E_REFUSE : E_ANY;
}

/* rows that move together for the cross-option rules */
static int group_of(int ri)
{
	if (ri == ix_group || ri == ix_chunk || ri == ix_sinks || ri == ix_pinmax ||
	    ri == ix_recent)
		return 1;
	if (ri == ix_dttl || ri == ix_mttl)
		return 2;
	if (ri == ix_append || ri == ix_hostcap)
		return 3;
	if (ri == ix_tcp || ri == ix_insecure)
		return 4;
	return 0;
}

static void make_coherent(struct tv *t)
{
	static const uint64_t bits[] = {2, 3, 4, 8}, groups[] = {32, 64, 128};
	t[ix_kbits].v.u = PICK(bits);
	t[ix_vbits].v.u = PICK(bits);
	const uint64_t g = PICK(groups), chunk = g * (1 + rb((uint32_t)(1024 / g)));
	t[ix_group].v.u = g;
	t[ix_chunk].v.u = chunk;
	t[ix_sinks].v.u = pick_between(0, chunk < 64 ? chunk : 64);
	t[ix_pinmax].v.u = pick_between(0, chunk);
	t[ix_recent].v.u = coin(4) ? 0 : pick_between(chunk, KVT_MAX_RECENT_EXACT);
	if (coin(5)) {
		t[ix_mttl].v.u = 0;
	} else {
		if (t[ix_mttl].v.u == 0)
			t[ix_mttl].v.u = 1 + rb(1000);
		t[ix_dttl].v.u = pick_between(0, t[ix_mttl].v.u);
	}
	const uint64_t cap = t[ix_hostcap].v.u, hi = cap < 64 * GI ? cap : 64 * GI;
	if (t[ix_append].v.u > hi) {
		t[ix_append].v.u = pick_size(64 * KI, hi);
		t[ix_append].text[0] = 0;
	}
	if (coin(3)) {
		t[ix_tcp].v.s[0] = 0;
	} else {
		gen_tcp(t[ix_tcp].v.s, sizeof(t[ix_tcp].v.s), true);
		t[ix_insecure].v.u = 1;
	}
}

/* ---- Mutations ---------------------------------------------------------------------------- */

enum mkind {
	M_UNKNOWN_NAME, M_BAD_VALUE, M_NO_EQ, M_LONG, M_NUL, M_NONASCII, M_NO_FINAL_NL, M_DUP,
	M_EMPTY, M_BLANKS, M_UNTERMINATED, M_HASH, M_LONG_STRING,
	F_UNKNOWN, F_NOT_DASHDASH, F_NO_VALUE, F_BAD_VALUE, F_NEWLINE, F_UNWRITABLE,
	F_VALUE_IS_FLAG, F_TRAILING_CONFIG,
	F_BAD_FILE, F_HELP, ENV_BAD_VALUE, ENV_STRAY, N_KINDS
};

static const struct {
	const char *name;
	bool file;   /* needs a config file */
	uint32_t weight;
} kinds[N_KINDS] = {
	[M_UNKNOWN_NAME] = {"unknown name", true, 4},
	[M_BAD_VALUE] = {"bad value", true, 6},
	[M_NO_EQ] = {"line without =", true, 3},
	[M_LONG] = {"long line", true, 3},
	[M_NUL] = {"NUL byte", true, 3},
	[M_NONASCII] = {"non-ASCII byte", true, 4},
	[M_NO_FINAL_NL] = {"no final newline", true, 3},
	[M_DUP] = {"duplicate", true, 4},
	[M_EMPTY] = {"empty value", true, 3},
	[M_BLANKS] = {"blank lines", true, 2},
	[M_UNTERMINATED] = {"unterminated quote", true, 2},
	[M_HASH] = {"'#' in a quoted value", true, 3},
	[M_LONG_STRING] = {"string at or over the limit", true, 2},
	[F_UNKNOWN] = {"unknown flag", false, 3},
	[F_NOT_DASHDASH] = {"not --name", false, 2},
	[F_NO_VALUE] = {"flag without a value", false, 2},
	[F_BAD_VALUE] = {"bad flag value", false, 6},
	[F_NEWLINE] = {"newline in a string flag", false, 1},
	[F_UNWRITABLE] = {"string flag or variable a file cannot hold", false, 3},
	[F_VALUE_IS_FLAG] = {"separate value spelled like a flag", false, 3},
	[F_TRAILING_CONFIG] = {"trailing --config", false, 1},
	[F_BAD_FILE] = {"missing or directory config", false, 1},
	[F_HELP] = {"--help", false, 1},
	[ENV_BAD_VALUE] = {"bad environment value", false, 3},
	[ENV_STRAY] = {"stray KVTIER_ variable", false, 1},
};

static int pick_row_of(uint32_t types_mask)
{
	for (int tries = 0; tries < 200; tries++) {
		const int ri = (int)rb((uint32_t)N_ROWS);
		if (types_mask & (1u << rows[ri].ty))
			return ri;
	}
	return 3; /* cq_threads */
}

static void bad_name(char *out, size_t cap, bool for_flag)
{
	static const char *const fixed[] = {"no_such_option", "nosuch", "max-message",
					    "socket_path", "KVTIER_WORKERS", "check_config",
					    "print_config", "", "config_file", "helpme"};
	const char *rn = rows[rb((uint32_t)N_ROWS)].name;
	switch (rb(7)) {
	case 0: snprintf(out, cap, "%s", PICK(fixed)); break;
	case 1: snprintf(out, cap, "%sx", rn); break;
	case 2: snprintf(out, cap, "%.*s", (int)strlen(rn) - 1, rn); break;
	case 3:
		snprintf(out, cap, "%s", rn);
		for (char *p = out; *p; p++)
			if (*p >= 'a' && *p <= 'z')
				*p = (char)(*p - 'a' + 'A');
		break;
	case 4: snprintf(out, cap, "%s.", rn); break;
	case 5: snprintf(out, cap, "_%s", rn); break;
	default:
		snprintf(out, cap, "%s", rn);
		if (!for_flag && strchr(out, '_'))
			*strchr(out, '_') = ' ';
		else
			snprintf(out, cap, "%s_", rn);
		break;
	}
	if (row_by_name(out, strlen(out)) >= 0 || (for_flag && (!strcmp(out, "config") ||
	    !strcmp(out, "help") || !strcmp(out, "version") || !strcmp(out, "check-config") ||
	    !strcmp(out, "print-config"))))
		snprintf(out, cap, "no_such_option");
}

static int rand_line_pos(const struct scen *s) { return (int)rb((uint32_t)s->n_lines + 1); }

/* an existing line of s, or (one time in n, and always when s has none) a new filler line at
 * a random place; NULL when s is full */
static struct line *some_line(struct scen *s, uint32_t n)
{
	if (s->n_lines && coin(n) == false)
		return &s->lines[rb((uint32_t)s->n_lines)];
	struct line *L = line_insert(s, rand_line_pos(s));
	if (L)
		render_filler(L);
	return L;
}

/* an existing option line, or -1 */
static int pick_opt_line(const struct scen *s)
{
	if (!s->n_lines)
		return -1;
	for (int tries = 0; tries < 8; tries++) {
		const int i = (int)rb((uint32_t)s->n_lines);
		if (s->lines[i].is_opt && !s->lines[i].sticky)
			return i;
	}
	return -1;
}

/* inserts k bytes at off, inside region `in` (0 none, 1 name, 2 value, 3 comment) */
static bool line_ins(struct line *L, size_t off, const char *b, size_t k, int in)
{
	if (L->n + k >= LINE_CAP || off > L->n)
		return false;
	memmove(L->b + off + k, L->b + off, L->n - off);
	memcpy(L->b + off, b, k);
	L->n += k;
	if (in == 1)
		L->name_len += k;
	else if (off <= L->name_off)
		L->name_off += k;
	if (in == 2)
		L->val_len += k;
	else if (off <= L->val_off)
		L->val_off += k;
	if (in != 3 && off <= L->com_off)
		L->com_off += k;
	return true;
}

/* Applies mutation k; false when it does not apply here. */
static bool mutate(struct scen *s, enum mkind k)
{
	struct fuzz_desc *d = &s->desc;
	char t[LINE_CAP], nm[128];
	switch (k) {
	case M_UNKNOWN_NAME: {
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		bad_name(nm, sizeof(nm), false);
		render_opt(L, nm, coin(2) ? "1" : "yes");
		fuzz_desc_add(d, "unknown name '%s' at line %d; ", nm, (int)(L - s->lines) + 1);
		return true;
	}
	case M_BAD_VALUE: {
		const int ri = pick_row_of(coin(3) ? (1u << T_U64 | 1u << T_SIZE | 1u << T_DOUBLE)
					   : ~(1u << T_STRING));
		const enum bad b = (enum bad)rb(N_BAD);
		bad_text(ri, b, t, sizeof(t));
		int i = pick_opt_line(s);
		struct line *L = i >= 0 && coin(2) ? &s->lines[i]
						   : line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		file_name(ri, nm, sizeof(nm));
		render_opt(L, nm, t);
		char e[200];
		esc(e, sizeof(e), t, strlen(t) < 60 ? strlen(t) : 60);
		fuzz_desc_add(d, "%s value '%s' for %s at line %d; ", bad_names[b], e, rows[ri].name,
			      (int)(L - s->lines) + 1);
		return true;
	}
	case M_NO_EQ: {
		const char *rn = rows[rb((uint32_t)N_ROWS)].name;
		switch (rb(6)) {
		case 0: snprintf(t, sizeof(t), "%s 5", rn); break;
		case 1: snprintf(t, sizeof(t), "  %s", rn); break;
		case 2: snprintf(t, sizeof(t), "%s: 5", rn); break;
		case 3: snprintf(t, sizeof(t), "just some words"); break;
		case 4: snprintf(t, sizeof(t), "%s # = 5", rn); break;
		default: snprintf(t, sizeof(t), "\"%s\"\t", rn); break;
		}
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		render_raw(L, t, "");
		fuzz_desc_add(d, "no '=' at line %d; ", (int)(L - s->lines) + 1);
		return true;
	}
	case M_LONG: {
		struct line *L = some_line(s, 3);
		if (!L)
			return false;
		static const int targets[] = {1021, 1022, 1022, 1023, 1023, 1024, 1100, 1300};
		const size_t T = (size_t)PICK(targets), cur = L->n + (s->crlf ? 1 : 0);
		if (T <= cur)
			return false;
		const size_t pad = T - cur;
		memset(t, ' ', pad);
		const bool ok = L->is_opt ? line_ins(L, L->com_off, t, pad, 0)
					  : line_ins(L, L->n, t, pad, 0);
		if (!ok)
			return false;
		/* blanks only: build_expect refuses the line by its length as laid out */
		fuzz_desc_add(d, "line %d padded to %zu bytes; ", (int)(L - s->lines) + 1, T);
		return true;
	}
	case M_NUL: {
		struct line *L = some_line(s, 4);
		if (!L)
			return false;
		const size_t off = rb((uint32_t)L->n + 1);
		if (!line_ins(L, off, "", 1, 0))
			return false;
		L->eff = E_REFUSE;
		L->sticky = true;
		L->must[0] = 0;
		fuzz_desc_add(d, "NUL at byte %zu of line %d; ", off, (int)(L - s->lines) + 1);
		return true;
	}
	case M_NONASCII: {
		const int i = pick_opt_line(s);
		if (i < 0)
			return false;
		struct line *L = &s->lines[i];
		static const char bytes[] = "\x80\xa0\xc3\xe9\xff\x01\x07\x1b\x7f\x85";
		const char c = bytes[rb(sizeof(bytes) - 1)];
		const uint32_t where = rb(5);
		const char *wn;
		if (where == 0) {
			line_ins(L, L->name_off + rb((uint32_t)L->name_len + 1), &c, 1, 1);
			wn = "name";
		} else if (where == 1 && L->com_off < L->n) {
			line_ins(L, L->com_off + 1 + rb((uint32_t)(L->n - L->com_off)), &c, 1, 3);
			wn = "comment";
		} else {
			line_ins(L, L->val_off + rb((uint32_t)L->val_len + 1), &c, 1, 2);
			wn = "value";
		}
		set_eff(L);
		fuzz_desc_add(d, "byte 0x%02x in the %s of line %d; ", (unsigned char)c, wn, i + 1);
		return true;
	}
	case M_NO_FINAL_NL:
		s->final_nl = false;
		fuzz_desc_add(d, "no final newline; ");
		return true;
	case M_DUP: {
		const int ri = (int)rb((uint32_t)N_ROWS);
		struct tv v;
		gen_tv(ri, &v);
		spell(ri, &v, t, sizeof(t));
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		file_name(ri, nm, sizeof(nm));
		render_opt(L, nm, t);
		fuzz_desc_add(d, "another %s at line %d; ", rows[ri].name, (int)(L - s->lines) + 1);
		return true;
	}
	case M_EMPTY: {
		const int ri = (int)rb((uint32_t)N_ROWS);
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		file_name(ri, nm, sizeof(nm));
		render_opt(L, nm, "");
		fuzz_desc_add(d, "empty %s at line %d; ", rows[ri].name, (int)(L - s->lines) + 1);
		return true;
	}
	case M_BLANKS:
		for (uint32_t n = 1 + rb(4); n > 0; n--) {
			struct line *L = line_insert(s, rand_line_pos(s));
			if (L)
				render_filler(L);
		}
		fuzz_desc_add(d, "blank/comment lines; ");
		return true;
	case M_UNTERMINATED: {
		const int ri = (int)rb((uint32_t)N_ROWS);
		struct tv v;
		gen_tv(ri, &v);
		spell(ri, &v, t, sizeof(t));
		char line[LINE_CAP + 64];
		for (char *p = t; *p; p++)
			if (*p == '"' || *p == '#')
				*p = '_';
		file_name(ri, nm, sizeof(nm));
		snprintf(line, sizeof(line), "%s = \"%.1100s%s", nm, t, coin(2) ? " # note" : "");
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		render_raw(L, line, rows[ri].name);
		fuzz_desc_add(d, "unterminated quote for %s at line %d; ", rows[ri].name,
			      (int)(L - s->lines) + 1);
		return true;
	}
	case M_HASH: {
		const int ri = ix_socket;
		static const char *const v[] = {"/tmp/a#b", "#", "x # y", "/run/kvt#1.sock",
						"a#b#c", "#leading"};
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		file_name(ri, nm, sizeof(nm));
		render_opt(L, nm, PICK(v));
		fuzz_desc_add(d, "socket '%s' at line %d; ", L->v.s, (int)(L - s->lines) + 1);
		return true;
	}
	case M_LONG_STRING: {
		const int ri = ix_socket;
		const size_t n = STR_MAX - 2 + rb(4); /* 254..257 */
		for (size_t i = 0; i < n; i++)
			t[i] = "abcd/ "[rb(5)];
		t[n] = 0;
		struct line *L = line_insert(s, rand_line_pos(s));
		if (!L)
			return false;
		file_name(ri, nm, sizeof(nm));
		render_opt(L, nm, t);
		fuzz_desc_add(d, "socket of %zu bytes at line %d; ", n, (int)(L - s->lines) + 1);
		return true;
	}
	case F_UNKNOWN: {
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		if (!f)
			return false;
		bad_name(nm, sizeof(nm), true);
		for (char *p = nm; *p; p++)
			if (*p == '_' && coin(2))
				*p = '-';
		if (!strcmp(nm, "check-config") || !strcmp(nm, "print-config"))
			snprintf(nm, sizeof(nm), "no-such-option");
		if (coin(3) && nm[0]) /* a bare "--" ends the options (test_config.c tests it) */
			snprintf(f->a, sizeof(f->a), "--%s", nm);
		else
			snprintf(f->a, sizeof(f->a), "--%s=%s", nm, coin(2) ? "1" : "yes");
		f->nargs = 1;
		f->eff = E_REFUSE;
		snprintf(f->must, sizeof(f->must), "--%s", nm);
		fuzz_desc_add(d, "flag '%s'; ", f->a);
		return true;
	}
	case F_NOT_DASHDASH: {
		static const char *const a[] = {"workers=5", "-x", "5", "-", "x", "-workers=5",
						"\xe2\x80\x94workers=5", "kvtierd.conf"};
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		if (!f)
			return false;
		const char *arg = PICK(a);
		snprintf(f->a, sizeof(f->a), "%s", arg);
		f->nargs = 1;
		f->eff = E_REFUSE;
		snprintf(f->must, sizeof(f->must), "%s", arg);
		fuzz_desc_add(d, "argument '%s'; ", arg);
		return true;
	}
	case F_NO_VALUE: {
		if (s->tail_locked || s->trailing[0])
			return false;
		const int ri = pick_row_of(~(1u << T_BOOL));
		struct flag *f = flag_insert(s, s->n_flags);
		if (!f)
			return false;
		flag_name(ri, nm, sizeof(nm));
		snprintf(f->a, sizeof(f->a), "--%s", nm);
		f->nargs = 1;
		f->row = ri;
		f->eff = E_REFUSE;
		snprintf(f->must, sizeof(f->must), "%s", rows[ri].name);
		s->tail_locked = true;
		fuzz_desc_add(d, "'%s' last, without a value; ", f->a);
		return true;
	}
	case F_BAD_VALUE: {
		const int ri = pick_row_of(coin(3) ? (1u << T_U64 | 1u << T_SIZE | 1u << T_DOUBLE)
					   : ~0u);
		const enum bad b = (enum bad)rb(N_BAD);
		bad_text(ri, b, t, sizeof(t));
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		if (!f)
			return false;
		make_opt_flag(f, ri, t);
		char e[200];
		esc(e, sizeof(e), f->a, strlen(f->a) < 80 ? strlen(f->a) : 80);
		fuzz_desc_add(d, "%s flag '%s'; ", bad_names[b], e);
		return true;
	}
	case F_NEWLINE: {
		static const char *const v[] = {"a\nb", "\n", "/tmp/x\nworkers = 5", "a\r\nb"};
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		if (!f)
			return false;
		make_opt_flag(f, ix_socket, PICK(v));
		fuzz_desc_add(d, "socket flag with a newline; ");
		return true;
	}
	case F_UNWRITABLE: {
		/* a string with a control byte (a newline at times) or a '"', blanks and '#',
		 * by flag or environment: refused, naming the option */
		const int ri = coin(4) ? ix_tcp : ix_socket;
		gen_string(t, 60);
		const size_t n = strlen(t), at = rb((uint32_t)n + 1);
		char ins[8];
		if (coin(2)) {
			ins[0] = control_byte(true);
			ins[1] = 0;
		} else {
			snprintf(ins, sizeof(ins), "\"%.*s#", (int)rb(3), "  ");
		}
		const size_t kl = strlen(ins);
		memmove(t + at + kl, t + at, n - at + 1);
		memcpy(t + at, ins, kl);
		char e[200];
		esc(e, sizeof(e), t, strlen(t));
		if (coin(2)) {
			struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
			if (!f)
				return false;
			make_opt_flag(f, ri, t);
			fuzz_desc_add(d, "flag %s '%s'; ", rows[ri].name, e);
		} else {
			set_env(s, ri, t);
			fuzz_desc_add(d, "variable for %s '%s'; ", rows[ri].name, e);
		}
		return true;
	}
	case F_VALUE_IS_FLAG: {
		/* `--name VALUE` where VALUE reads like --config, -c, --print-config...: it is
		 * the option's value and nothing else (a string takes it; a number refuses it) */
		static const char *const v[] = {"--print-config", "--check-config", "-n", "--help",
						"-h", "--version", "-c", "--config", bad_cfg_arg,
						"--workers=3", "--insecure-loopback"};
		const int ri = coin(2) ? ix_socket : pick_row_of(~(1u << T_BOOL));
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		if (!f)
			return false;
		const char *text = PICK(v);
		flag_name(ri, nm, sizeof(nm));
		snprintf(f->a, sizeof(f->a), "--%s", nm);
		snprintf(f->b, sizeof(f->b), "%s", text);
		f->nargs = 2;
		f->row = ri;
		snprintf(f->must, sizeof(f->must), "%s", rows[ri].name);
		const enum out o = spec_parse(ri, text, &f->v);
		f->eff = o == O_OK ? E_SET : o == O_REFUSE ? E_REFUSE : E_ANY;
		fuzz_desc_add(d, "'%s' '%s'; ", f->a, f->b);
		return true;
	}
	case F_TRAILING_CONFIG:
		if (s->tail_locked)
			return false;
		snprintf(s->trailing, sizeof(s->trailing), "%s", coin(2) ? "--config" : "-c");
		fuzz_desc_add(d, "'%s' last; ", s->trailing);
		return true;
	case F_BAD_FILE:
		if (!s->use_file)
			return false;
		s->file_kind = coin(2) ? FK_MISSING : FK_DIR;
		fuzz_desc_add(d, "config file %s; ",
			      s->file_kind == FK_DIR ? "a directory" : "missing");
		return true;
	case F_HELP: {
		static const char *const h[] = {"--help", "-h", "--version"};
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		if (!f)
			return false;
		snprintf(f->a, sizeof(f->a), "%s", PICK(h));
		f->nargs = 1;
		f->eff = E_NONE;
		s->help = true;
		fuzz_desc_add(d, "'%s'; ", f->a);
		return true;
	}
	case ENV_BAD_VALUE: {
		const int ri = pick_row_of(~(1u << T_STRING));
		const enum bad b = (enum bad)rb(N_BAD);
		bad_text(ri, b, t, sizeof(t));
		set_env(s, ri, t);
		char e[200], en[96];
		esc(e, sizeof(e), t, strlen(t) < 60 ? strlen(t) : 60);
		env_name(ri, en, sizeof(en));
		fuzz_desc_add(d, "%s %s='%s'; ", bad_names[b], en, e);
		return true;
	}
	case ENV_STRAY:
		s->stray_env = true;
		fuzz_desc_add(d, "KVTIER_NO_SUCH_OPTION=1; ");
		return true;
	case N_KINDS:
		break;
	}
	return false;
}

/* ---- Generating one configuration --------------------------------------------------------- */

static void gen_scenario(struct scen *s)
{
	s->n_lines = s->n_flags = 0;
	s->use_file = !coin(5);
	s->crlf = coin(6);
	s->final_nl = true;
	s->file_kind = FK_OK;
	s->stray_env = s->tail_locked = s->help = s->check = s->print = s->unreloadable = false;
	s->trailing[0] = 0;
	s->desc.n = 0;
	s->desc.s[0] = 0;
	s->kinds = 0;
	for (int i = 0; i < N_ROWS; i++)
		s->env[i].set = false;

	struct tv tgt[N_ROWS];
	for (int i = 0; i < N_ROWS; i++)
		gen_tv(i, &tgt[i]);
	const bool coherent = !coin(4);
	if (coherent)
		make_coherent(tgt);
	static const uint32_t density[] = {5, 20, 50, 90};
	const uint32_t dens = PICK(density);
	bool touched[N_ROWS];
	for (int i = 0; i < N_ROWS; i++)
		touched[i] = rb(100) < dens;
	/* a coherent group is set whole (the defaults are coherent among themselves) */
	if (coherent)
		for (int i = 0; i < N_ROWS; i++)
			if (touched[i] && group_of(i))
				for (int j = 0; j < N_ROWS; j++)
					touched[j] |= group_of(j) == group_of(i);

	/* who sets each touched row: entries in the file and among the flags, shuffled below */
	int fe[MAX_LINES], n_fe = 0, fl[MAX_FLAGS], n_fl = 0;
	enum { S_FILE = 1, S_ENV = 2, S_FLAG = 4 };
	int last_src[N_ROWS];
	for (int i = 0; i < N_ROWS; i++) {
		last_src[i] = 0;
		if (!touched[i])
			continue;
		unsigned m = (s->use_file && rb(10) < 7 ? S_FILE : 0) | (coin(7) ? S_ENV : 0) |
			     (rb(100) < 45 ? S_FLAG : 0);
		if (!m)
			m = s->use_file ? S_FILE : S_FLAG;
		if (m & S_FILE)
			for (uint32_t k = 1 + (coin(6) ? rb(3) : 0); k && n_fe < MAX_LINES - 60; k--)
				fe[n_fe++] = i;
		if (m & S_FLAG)
			for (uint32_t k = 1 + (coin(8) ? 1 : 0); k && n_fl < MAX_FLAGS - 30; k--)
				fl[n_fl++] = i;
		last_src[i] = m & S_FLAG ? S_FLAG : m & S_ENV ? S_ENV : S_FILE;
		if (m & S_ENV) {
			char t[LINE_CAP];
			struct tv o;
			if (last_src[i] == S_ENV) {
				spell(i, &tgt[i], t, sizeof(t));
			} else {
				gen_tv(i, &o);
				spell(i, &o, t, sizeof(t));
			}
			set_env(s, i, t);
		}
	}
	for (int i = n_fe - 1; i > 0; i--) {
		const int j = (int)rb((uint32_t)i + 1), x = fe[i];
		fe[i] = fe[j];
		fe[j] = x;
	}
	for (int i = n_fl - 1; i > 0; i--) {
		const int j = (int)rb((uint32_t)i + 1), x = fl[i];
		fl[i] = fl[j];
		fl[j] = x;
	}

	/* the file: the last entry of a row whose last source is the file holds the target */
	if (s->use_file) {
		for (int e = 0; e < n_fe; e++) {
			while (coin(5) && s->n_lines < MAX_LINES - 70)
				render_filler(line_insert(s, s->n_lines));
			struct line *L = line_insert(s, s->n_lines);
			if (!L)
				break;
			const int ri = fe[e];
			bool last = last_src[ri] == S_FILE;
			for (int k = e + 1; k < n_fe && last; k++)
				last = fe[k] != ri;
			struct tv o;
			char t[LINE_CAP], nm[96];
			if (last) {
				spell(ri, &tgt[ri], t, sizeof(t));
			} else {
				gen_tv(ri, &o);
				spell(ri, &o, t, sizeof(t));
			}
			file_name(ri, nm, sizeof(nm));
			render_opt(L, nm, t);
		}
		if (coin(4) && s->n_lines < MAX_LINES)
			render_filler(line_insert(s, s->n_lines));
	}
	for (int e = 0; e < n_fl; e++) {
		const int ri = fl[e];
		bool last = last_src[ri] == S_FLAG;
		for (int k = e + 1; k < n_fl && last; k++)
			last = fl[k] != ri;
		struct tv o;
		char t[LINE_CAP];
		if (last) {
			spell(ri, &tgt[ri], t, sizeof(t));
		} else {
			gen_tv(ri, &o);
			spell(ri, &o, t, sizeof(t));
		}
		make_opt_flag(flag_insert(s, s->n_flags), ri, t);
	}
	/* flags that set no option */
	if (coin(6)) {
		static const char *const sp[] = {"--check-config", "-n", "--print-config"};
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		snprintf(f->a, sizeof(f->a), "%s", PICK(sp));
		f->nargs = 1;
		f->eff = E_NONE;
	}

	/* mutations: none in a third of the iterations */
	if (rb(3)) {
		uint32_t total = 0;
		for (int k = 0; k < N_KINDS; k++)
			total += kinds[k].weight;
		for (uint32_t n = 1 + (coin(3) ? rb(3) : 0); n > 0; n--) {
			for (int tries = 0; tries < 6; tries++) {
				uint32_t r = rb(total);
				int k = 0;
				while (r >= kinds[k].weight)
					r -= kinds[k++].weight;
				if (kinds[k].file && !s->use_file)
					continue;
				if (mutate(s, (enum mkind)k)) {
					s->kinds |= 1u << k;
					break;
				}
			}
		}
	}

	/* the --config flag(s), last: where the file is read from */
	if (s->use_file) {
		struct flag *f = flag_insert(s, (int)rb((uint32_t)s->n_flags + 1));
		f->is_config = true;
		f->eff = E_NONE;
		const char *p = s->file_kind == FK_MISSING ? missing_path
			      : s->file_kind == FK_DIR ? dir
			      : path;
		s->cfg_path = p;
		switch (rb(3)) {
		case 0:
			snprintf(f->a, sizeof(f->a), "--config=%s", p);
			f->nargs = 1;
			break;
		default:
			snprintf(f->a, sizeof(f->a), "%s", coin(2) ? "--config" : "-c");
			snprintf(f->b, sizeof(f->b), "%s", p);
			f->nargs = 2;
			break;
		}
		if (coin(20)) { /* an earlier --config: the last one wins */
			const int at = (int)(f - s->flags);
			struct flag *g = flag_insert(s, (int)rb((uint32_t)at + 1));
			g->is_config = true;
			g->eff = E_NONE;
			snprintf(g->a, sizeof(g->a), "%s", bad_cfg_arg);
			g->nargs = 1;
			fuzz_desc_add(&s->desc, "an earlier --config=%s; ", missing_path);
		}
	} else {
		s->cfg_path = NULL;
	}
	for (int i = 0; i < s->n_flags; i++) {
		const struct flag *f = &s->flags[i];
		s->check |= !strcmp(f->a, "--check-config") || !strcmp(f->a, "-n");
		s->print |= !strcmp(f->a, "--print-config");
	}
}

/* ---- Writing it out ----------------------------------------------------------------------- */

static char fbuf[FILE_CAP];
static char *argv_[MAX_ARGS + 1];
static int argc_;

static void write_file(const char *p, const char *b, size_t n)
{
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, b, n) != (ssize_t)n || close(fd) != 0) {
		printf("# cannot write %s: %s\n", p, strerror(errno));
		abort();
	}
}

static size_t lay_out_file(const struct scen *s)
{
	size_t n = 0;
	for (int i = 0; i < s->n_lines; i++) {
		const struct line *L = &s->lines[i];
		memcpy(fbuf + n, L->b, L->n);
		n += L->n;
		if (i + 1 < s->n_lines || s->final_nl) {
			if (s->crlf)
				fbuf[n++] = '\r';
			fbuf[n++] = '\n';
		}
	}
	return n;
}

static void build_argv(struct scen *s)
{
	argc_ = 0;
	argv_[argc_++] = "kvtierd";
	for (int i = 0; i < s->n_flags; i++) {
		argv_[argc_++] = s->flags[i].a;
		if (s->flags[i].nargs == 2)
			argv_[argc_++] = s->flags[i].b;
	}
	if (s->trailing[0])
		argv_[argc_++] = s->trailing;
	argv_[argc_] = NULL;
}

static void clear_env(void)
{
	char en[96];
	for (int i = 0; i < N_ROWS; i++) {
		env_name(i, en, sizeof(en));
		unsetenv(en);
	}
	unsetenv("KVTIER_NO_SUCH_OPTION");
}

static void apply_env(const struct scen *s)
{
	char en[96];
	clear_env();
	for (int i = 0; i < N_ROWS; i++) {
		if (!s->env[i].set)
			continue;
		env_name(i, en, sizeof(en));
		setenv(en, s->env[i].val, 1);
	}
	if (s->stray_env)
		setenv("KVTIER_NO_SUCH_OPTION", "1", 1);
}

/* ---- The model: what the load must do ----------------------------------------------------- */

enum xkind { WANT_OK, WANT_REFUSE, WANT_ANY };

struct expect {
	enum xkind kind;
	int rc;
	bool loose;      /* an undecided value came first: the refusal's words are not checked */
	char must[2][LINE_CAP + 64];
	int n_must;
	const char *any_of[12];
	int n_any;
	int line;        /* a refusal at this file line (1-based), 0 none */
	size_t line_len; /* its content length */
	struct val m[N_ROWS];
	bool unknown[N_ROWS];
	enum kvt_config_source src[N_ROWS];
};

static void x_must(struct expect *x, const char *s)
{
	if (x->n_must < 2 && s[0])
		snprintf(x->must[x->n_must++], sizeof(x->must[0]), "%s", s);
}

static void x_refuse(struct expect *x, int rc, bool loose)
{
	x->kind = WANT_REFUSE;
	x->rc = rc;
	x->loose = loose;
}

static void build_expect(const struct scen *s, struct expect *x)
{
	memset(x, 0, sizeof(*x));
	for (int i = 0; i < N_ROWS; i++) {
		default_val(i, &x->m[i]);
		x->src[i] = KVT_SRC_DEFAULT;
	}
	x->kind = WANT_OK;
	if (s->trailing[0]) {
		x_refuse(x, -EINVAL, false);
		x_must(x, s->trailing);
		return;
	}
	if (s->help)
		return;
	bool loose = false;
	if (s->use_file && s->file_kind != FK_OK) {
		x_refuse(x, s->file_kind == FK_DIR ? -EISDIR : -ENOENT, false);
		x_must(x, s->cfg_path);
		return;
	}
	for (int i = 0; s->use_file && i < s->n_lines; i++) {
		const struct line *L = &s->lines[i];
		const bool ended = i + 1 < s->n_lines || s->final_nl;
		const size_t len = L->n + (s->crlf && ended ? 1 : 0); /* its '\r' counts */
		enum eff e = L->eff;
		if (len > READER_LINE_MAX || memchr(L->b, 0, L->n))
			e = E_REFUSE;
		if (e == E_REFUSE) {
			char where[400];
			x_refuse(x, -EINVAL, loose);
			snprintf(where, sizeof(where), "%s:%d:", path, i + 1);
			x_must(x, where);
			if (e == L->eff && !memchr(L->b, 0, L->n) && len <= READER_LINE_MAX)
				x_must(x, L->must);
			x->line = i + 1;
			x->line_len = len;
			return;
		}
		if (e == E_SET || e == E_ANY) {
			x->m[L->row] = L->v;
			x->unknown[L->row] = e == E_ANY;
			x->src[L->row] = KVT_SRC_FILE;
			loose |= e == E_ANY;
		}
	}
	for (int i = 0; i < N_ROWS; i++) {
		const struct envv *v = &s->env[i];
		if (!v->set)
			continue;
		if (v->eff == E_REFUSE) {
			char en[96];
			env_name(i, en, sizeof(en));
			x_refuse(x, -EINVAL, loose);
			x_must(x, en);
			x_must(x, rows[i].name);
			return;
		}
		x->m[i] = v->v;
		x->unknown[i] = v->eff == E_ANY;
		x->src[i] = KVT_SRC_ENV;
		loose |= v->eff == E_ANY;
	}
	for (int i = 0; i < s->n_flags; i++) {
		const struct flag *f = &s->flags[i];
		if (f->eff == E_REFUSE) {
			x_refuse(x, -EINVAL, loose);
			x_must(x, f->must);
			return;
		}
		if (f->eff == E_SET || f->eff == E_ANY) {
			x->m[f->row] = f->v;
			x->unknown[f->row] = f->eff == E_ANY;
			x->src[f->row] = KVT_SRC_FLAG;
			loose |= f->eff == E_ANY;
		}
	}
	struct rules r;
	model_rules(x->m, x->unknown, &r);
	if (r.n_failing) {
		x_refuse(x, -EINVAL, loose || r.undecided);
		for (int i = 0; i < r.n_failing; i++)
			x->any_of[x->n_any++] = r.failing[i];
	} else if (r.undecided || loose) {
		x->kind = WANT_ANY;
	}
}

/* ---- Checks ------------------------------------------------------------------------------- */

static struct {
	uint64_t iters, ok, refused, any, must_refuse, rt, help, file_errors;
	uint64_t kind_n[N_KINDS], kind_acc[N_KINDS];
} st;

static void compare_fields(const char *who, const struct kvt_config *c, const struct val *m,
			   const bool *unknown)
{
	for (int i = 0; i < N_ROWS; i++) {
		if ((unknown && unknown[i]) || field_eq(i, c, &m[i]))
			continue;
		struct val got;
		char a[STR_MAX * 4 + 16], b[STR_MAX * 4 + 16];
		field_val(i, c, &got);
		show_val(i, &got, a, sizeof(a));
		show_val(i, &m[i], b, sizeof(b));
		FCHECK(false, "%s: %s = %.300s, expected %.300s", who, rows[i].name, a, b);
	}
}

static char *print_to_string(const struct kvt_config *c, const enum kvt_config_source *src,
			     size_t *len)
{
	char *buf = NULL;
	FILE *m = open_memstream(&buf, len);
	if (!m) {
		printf("# open_memstream: %s\n", strerror(errno));
		abort();
	}
	kvt_config_print(m, c, src);
	fclose(m);
	return buf;
}

/* kvt_config_print's output read back as a config file */
static void round_trip(const struct kvt_config *c, const enum kvt_config_source *src)
{
	st.rt++;
	const bool with_src = src && coin(2);
	size_t len, len2, len1;
	/* the socket line's comment shows $RUNTIME_DIRECTORY when the socket is empty: a
	 * newline in it must not start another line */
	if (coin(4)) {
		char g[48], rd[128];
		gen_string(g, 40);
		const int at = (int)rb((uint32_t)strlen(g) + 1);
		snprintf(rd, sizeof(rd), "%.*s\n%s%s", at, g, coin(2) ? "workers = 1 #" : "x",
			 g + at);
		setenv("RUNTIME_DIRECTORY", rd, 1);
	}
	char *text = print_to_string(c, with_src ? src : NULL, &len);
	write_file(rt_path, text, len);
	clear_env();
	char arg[400];
	snprintf(arg, sizeof(arg), "--config=%s", rt_path);
	char *av[] = {"kvtierd", arg, NULL};
	struct kvt_config c2;
	char err[512] = "";
	const int rc = kvt_config_load(&c2, 2, av, NULL, NULL, err, sizeof(err));
	FCHECK(rc == 0, "the print-config output (%s sources) reloads: rc %d '%s'",
	       with_src ? "with" : "without", rc, err);
	if (rc == 0) {
		struct val m[N_ROWS];
		for (int i = 0; i < N_ROWS; i++)
			field_val(i, c, &m[i]);
		compare_fields(with_src ? "print-config (with sources) reloaded"
					: "print-config reloaded",
			       &c2, m, NULL);
		char *p1 = print_to_string(c, NULL, &len1), *p2 = print_to_string(&c2, NULL, &len2);
		FCHECK(len1 == len2 && !memcmp(p1, p2, len1), "reloaded config prints differently");
		free(p1);
		free(p2);
	}
	unsetenv("RUNTIME_DIRECTORY");
	if (verbose) {
		printf("# print-config (%s sources):\n", with_src ? "with" : "without");
		char e[LINE_CAP * 5];
		for (const char *p = text, *q; *p; p = q + (*q == '\n')) {
			q = strchr(p, '\n');
			if (!q)
				q = p + strlen(p);
			esc(e, sizeof(e), p, (size_t)(q - p));
			printf("#   %s\n", e);
		}
	}
	free(text);
}

static size_t pick_errlen(void) { return coin(12) ? 0 : coin(8) ? 1 + rb(16) : 512; }

static void check_load(const struct scen *s, const struct expect *x)
{
	struct kvt_config c;
	struct kvt_cmdline cmd;
	enum kvt_config_source src[N_ROWS + 8];
	const bool use_cmd = !coin(8), use_src = !coin(4);
	const size_t el = pick_errlen();
	char errbuf[520];
	memset(errbuf, 'x', sizeof(errbuf));
	char *err = el ? errbuf : errbuf + 1; /* errlen 0: any write shows in errbuf */
	const int rc = kvt_config_load(&c, argc_, argv_, use_cmd ? &cmd : NULL,
				       use_src ? src : NULL, err, el);
	clear_env();
	if (verbose)
		printf("# rc %d '%s'\n", rc, rc && el == 512 ? err : "");
	if (el == 0)
		FCHECK(errbuf[0] == 'x' && errbuf[1] == 'x', "kvt_config_load wrote into a 0-byte "
		       "error buffer");
	else if (rc)
		FCHECK(memchr(err, 0, el) && (el < 2 || err[0]), "refused (rc %d) without a message "
		       "in a %zu-byte buffer", rc, el);
	if (el && rc && memchr(err, 0, el)) {
		bool ctl = false;
		for (const char *p = err; *p; p++)
			ctl |= (unsigned char)*p < 0x20 || (unsigned char)*p == 0x7f;
		char e[1200];
		esc(e, sizeof(e), err, strlen(err));
		FCHECK(!ctl, "the message holds a raw control byte: '%s'", e);
	}

	if (rc == 0) {
		st.ok++;
		FCHECK(x->kind != WANT_REFUSE, "accepted, but the model refuses (rc %d expected%s%s)",
		       x->rc, x->n_must ? ", naming " : "", x->n_must ? x->must[0] : "");
		if (x->kind == WANT_REFUSE)
			return;
		compare_fields("loaded", &c, x->m, x->unknown);
		if (use_src)
			for (int i = 0; i < N_ROWS; i++)
				FCHECK(src[i] == x->src[i], "source of %s is %d, expected %d",
				       rows[i].name, (int)src[i], (int)x->src[i]);
		if (use_cmd) {
			FCHECK(s->cfg_path ? cmd.config_file && !strcmp(cmd.config_file, s->cfg_path)
					   : !cmd.config_file,
			       "cmd.config_file '%s', expected '%s'",
			       cmd.config_file ? cmd.config_file : "(null)",
			       s->cfg_path ? s->cfg_path : "(null)");
			FCHECK(!!cmd.check_config == s->check && !!cmd.print_config == s->print &&
			       !!(cmd.help || cmd.version) == s->help,
			       "cmd: check %d print %d help %d version %d", cmd.check_config,
			       cmd.print_config, cmd.help, cmd.version);
		}
		char verr[512];
		FCHECK(kvt_config_validate(&c, verr, sizeof(verr)) == 0,
		       "accepted, but kvt_config_validate refuses it: %s", verr);
		if (s->help)
			st.help++;
		else
			round_trip(&c, use_src ? src : NULL);
		return;
	}

	st.refused++;
	FCHECK(x->kind != WANT_OK, "refused (rc %d '%s'), but the model accepts", rc,
	       el == 512 ? err : "");
	if (x->kind == WANT_OK)
		return;
	if (x->kind == WANT_ANY) {
		FCHECK(rc == -EINVAL, "refused with rc %d", rc);
		return;
	}
	FCHECK(rc == x->rc, "refused with rc %d, expected %d ('%s')", rc, x->rc,
	       el == 512 ? err : "");
	if (el != 512 || x->loose)
		return;
	for (int i = 0; i < x->n_must; i++) {
		char e[200], m[4 * sizeof(x->must[0])];
		esc(e, sizeof(e), x->must[i], strlen(x->must[i]) < 120 ? strlen(x->must[i]) : 120);
		msg_esc(m, sizeof(m), x->must[i]);
		FCHECK(strstr(err, m), "the message does not name '%s': '%s'", e, err);
	}
	bool any = x->n_any == 0;
	for (int i = 0; i < x->n_any; i++)
		any |= strstr(err, x->any_of[i]) != NULL;
	FCHECK(any, "the message names none of the options of a failing rule (%s...): '%s'",
	       x->n_any ? x->any_of[0] : "", err);
	if (x->line && x->line_len <= READER_LINE_MAX)
		FCHECK(!strstr(err, "longer than"), "line %d has %zu bytes, the message says: '%s'",
		       x->line, x->line_len, err);
}

/* ---- One iteration ------------------------------------------------------------------------ */

static struct scen sbuf;

static void show_scenario(const struct scen *s, size_t flen)
{
	char e[LINE_CAP * 5];
	printf("# file (%zu bytes, %s%s):\n", flen, s->crlf ? "CRLF" : "LF",
	       s->final_nl ? "" : ", no final newline");
	for (int i = 0; i < s->n_lines; i++) {
		esc(e, sizeof(e), s->lines[i].b, s->lines[i].n);
		static const char *const effs[] = {"-", "set", "refuse", "any"};
		printf("#   %3d [%s] %s\n", i + 1, effs[s->lines[i].eff], e);
	}
	for (int i = 0; i < N_ROWS; i++) {
		if (!s->env[i].set)
			continue;
		char en[96];
		env_name(i, en, sizeof(en));
		esc(e, sizeof(e), s->env[i].val, strlen(s->env[i].val));
		printf("# env %s='%s'\n", en, e);
	}
	printf("# argv:");
	for (int i = 1; i < argc_; i++) {
		esc(e, sizeof(e), argv_[i], strlen(argv_[i]));
		printf(" '%s'", e);
	}
	printf("\n");
}

static void run_iteration(uint64_t it)
{
	kvt_rand_stream(STREAM_ITER, it);
	struct scen *s = &sbuf;
	gen_scenario(s);
	size_t flen = 0;
	if (s->use_file) {
		flen = lay_out_file(s);
		write_file(path, fbuf, flen);
	}
	build_argv(s);
	struct expect x;
	build_expect(s, &x);

	char av[700];
	size_t an = 0;
	for (int i = 1; i < argc_ && an + 8 < sizeof(av); i++) {
		av[an++] = ' ';
		an += esc(av + an, sizeof(av) - an, argv_[i], strlen(argv_[i]));
	}
	av[an] = 0;
	int n_env = 0;
	for (int i = 0; i < N_ROWS; i++)
		n_env += s->env[i].set;
	char nl[32];
	snprintf(nl, sizeof(nl), s->use_file ? "%d file lines" : "no file", s->n_lines);
	const char *model = x.kind == WANT_OK ? "accept" : x.kind == WANT_ANY ? "either"
			  : x.loose ? "refuse (loosely)" : "refuse";
	ctx_set("iteration %llu: %s, %d env, argv%.400s; %s%.500smodel: %s; "
		"replay: KVT_SEED=%llu KVT_FUZZ_ITER=%llu\n",
		(unsigned long long)it, nl, n_env, av, s->desc.n ? "mutations: " : "unmutated; ",
		s->desc.s, model, (unsigned long long)kvt_test_seed, (unsigned long long)it);
	if (verbose) {
		printf("# %s", ctx);
		show_scenario(s, flen);
	}
	apply_env(s);
	const uint64_t ok_before = st.ok;
	check_load(s, &x);
	st.iters++;
	st.must_refuse += x.kind == WANT_REFUSE;
	st.any += x.kind == WANT_ANY;
	st.file_errors += s->use_file && s->file_kind != FK_OK;
	for (int k = 0; k < N_KINDS; k++) {
		if (!(s->kinds & (1u << k)))
			continue;
		st.kind_n[k]++;
		st.kind_acc[k] += st.ok != ok_before;
	}
}

/* ---- Driver ------------------------------------------------------------------------------- */

/* rows[] is config.c's table: same names in the same order, and its fields cover the struct */
static bool check_table(void)
{
	KVT_CHECK(kvt_config_n_options() == (size_t)N_ROWS,
		  "config.c has %zu options, this test %d", kvt_config_n_options(), N_ROWS);
	bool ok = kvt_config_n_options() == (size_t)N_ROWS;
	for (int i = 0; ok && i < N_ROWS; i++) {
		const char *n = kvt_config_option_name((size_t)i);
		KVT_CHECK(n && !strcmp(n, rows[i].name), "option %d is %s, this test's row %s", i,
			  n ? n : "(null)", rows[i].name);
		ok &= n && !strcmp(n, rows[i].name);
	}
	size_t covered = 0;
	for (int i = 0; i < N_ROWS; i++) {
		covered += rows[i].size;
		for (int j = 0; j < i; j++)
			KVT_CHECK(rows[i].off != rows[j].off, "%s and %s share a field",
				  rows[i].name, rows[j].name);
	}
	KVT_CHECK(covered == sizeof(struct kvt_config), "the rows cover %zu of the %zu bytes of "
		  "struct kvt_config: a field this test does not compare", covered,
		  sizeof(struct kvt_config));
	ok &= covered == sizeof(struct kvt_config);
	/* the defaults */
	char *av[] = {"kvtierd", NULL};
	struct kvt_config c;
	char err[512] = "";
	clear_env();
	const int rc = kvt_config_load(&c, 1, av, NULL, NULL, err, sizeof(err));
	KVT_CHECK(rc == 0, "defaults: rc %d '%s'", rc, err);
	struct val m[N_ROWS];
	for (int i = 0; i < N_ROWS; i++)
		default_val(i, &m[i]);
	const int before = kvt_test_failures;
	compare_fields("defaults", &c, m, NULL);
	return ok && rc == 0 && kvt_test_failures == before;
}

static void test_fuzz(void)
{
	if (!check_table())
		return;
	const double el = ctx_run(DEFAULT_ITERS, MAX_FAILING_ITERS, run_iteration);
	printf("# fuzz_config: %llu iterations in %.1f s (%.0f/s): accepted %llu, refused %llu "
	       "(model: must refuse %llu, either %llu); %llu round trips; %llu --help, %llu "
	       "missing or directory files; %d failing iterations\n",
	       (unsigned long long)st.iters, el, el > 0 ? (double)st.iters / el : 0.0,
	       (unsigned long long)st.ok, (unsigned long long)st.refused,
	       (unsigned long long)st.must_refuse, (unsigned long long)st.any,
	       (unsigned long long)st.rt,
	       (unsigned long long)st.help, (unsigned long long)st.file_errors, failing_iters);
	char line[1600];
	size_t n = 0;
	for (int k = 0; k < N_KINDS && n < sizeof(line); k++)
		n += (size_t)snprintf(line + n, sizeof(line) - n, "%s %s %llu/%llu", k ? "," : "",
				      kinds[k].name, (unsigned long long)st.kind_acc[k],
				      (unsigned long long)st.kind_n[k]);
	printf("# accepted/tried by mutation:%s\n", line);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	kvt_test_init();
	ctx_catch_crashes();
	ix_socket = row_index("socket");
	ix_tcp = row_index("listen_tcp");
	ix_insecure = row_index("insecure_loopback");
	ix_kbits = row_index("default_key_bits");
	ix_vbits = row_index("default_value_bits");
	ix_group = row_index("default_group");
	ix_chunk = row_index("default_chunk_tokens");
	ix_sinks = row_index("default_n_sinks");
	ix_pinmax = row_index("default_pin_detect_max");
	ix_recent = row_index("default_recent_exact_tokens");
	ix_dttl = row_index("default_ttl_seconds");
	ix_mttl = row_index("max_ttl_seconds");
	ix_append = row_index("max_append_bytes");
	ix_hostcap = row_index("host_capacity_bytes");
	const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
	ram_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
	unsetenv("RUNTIME_DIRECTORY"); /* round_trip sets its own at times */
	const char *tmp = getenv("TMPDIR");
	snprintf(dir, sizeof(dir), "%s/fuzz_config.XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(dir)) {
		printf("# mkdtemp %s: %s\n", dir, strerror(errno));
		return 1;
	}
	snprintf(path, sizeof(path), "%s/c.conf", dir);
	snprintf(rt_path, sizeof(rt_path), "%s/rt.conf", dir);
	snprintf(missing_path, sizeof(missing_path), "%s/missing.conf", dir);
	snprintf(bad_cfg_arg, sizeof(bad_cfg_arg), "--config=%s", missing_path);
	const char *one = getenv("KVT_FUZZ_ITER");
	if (one && *one) {
		verbose = true;
		if (check_table())
			run_iteration(strtoull(one, NULL, 0));
		ctx_clear();
	} else {
		KVT_RUN(test_fuzz);
	}
	clear_env();
	unlink(path);
	unlink(rt_path);
	rmdir(dir);
	return kvt_test_done();
}

#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvt_codec.h"
#include "kvt_text.h"
#include "log.h"

struct kvt_config kvt_config_live;

enum opt_type { OPT_BOOL, OPT_U64, OPT_SIZE, OPT_DOUBLE, OPT_STRING, OPT_ENUM };

struct opt {
	const char *name;
	enum opt_type type;
	size_t offset;
	uint64_t min, max;        /* U64, SIZE */
	double dmin, dmax;        /* DOUBLE */
	const char *const *enum_names; /* ENUM: NULL-terminated; the value is the index */
	const char *def;          /* default, written as a user would */
	int reloadable;
	const char *help;
};

static const char *const policy_names[] = {"reject", "drop-coldest", NULL};
/* Same order as enum kvt_scheme in kernels/kvt_codec.h. */
static const char *const scheme_names[] = {"none", "kivi", "hadamard", "oscar", NULL};
/* enum kvt_rounding order (kernels/kvt_codec.h) */
static const char *const rounding_names[] = {"minmax", "mse", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};
static const char *const tier_names[] = {"host", "gpu", NULL};
static const char *const arena_policy_names[] = {"lru", "keep", NULL};

#define OFF(f) offsetof(struct kvt_config, f)
#define KIB ((uint64_t)1024)
#define MIB (KIB * 1024)
#define GIB (MIB * 1024)
#define TIB (GIB * 1024)

static const struct opt opts[] = {
	{"socket", OPT_STRING, OFF(socket_path), 0, 0, 0, 0, NULL, "", 0,
	 "unix socket path (empty: $RUNTIME_DIRECTORY/kvtierd.sock, else ./run/kvtierd.sock)"},
	{"listen_tcp", OPT_STRING, OFF(listen_tcp), 0, 0, 0, 0, NULL, "", 0,
	 "also listen on TCP host:port (plaintext only on loopback with insecure_loopback)"},
	{"insecure_loopback", OPT_BOOL, OFF(insecure_loopback), 0, 1, 0, 0, NULL, "no", 0,
	 "allow plaintext TCP on a loopback address (TLS is not implemented yet)"},
	{"cq_threads", OPT_U64, OFF(cq_threads), 1, 64, 0, 0, NULL, "2", 0,
	 "completion-queue threads, each with its own queue, all serving every method"},
	{"workers", OPT_U64, OFF(workers), 0, 256, 0, 0, NULL, "0", 0,
	 "worker threads for Fetch decode, Append commit and Attend (0 = one per CPU core)"},
	{"max_message_bytes", OPT_SIZE, OFF(max_message_bytes), 256 * KIB, 64 * MIB, 0, 0, NULL,
	 "4MiB", 0, "largest gRPC message received or sent; Fetch splits replies below it"},
	{"max_concurrent_calls", OPT_U64, OFF(max_concurrent_calls), 1, 65536, 0, 0, NULL, "1024",
	 0, "calls in flight at once (new ones get RESOURCE_EXHAUSTED beyond it)"},
	{"reply_pool_buffers", OPT_U64, OFF(reply_pool_buffers), 0, 1024, 0, 0, NULL, "8", 0,
	 "Fetch reply buffers of max_message_bytes kept for reuse (no page faults per reply)"},
	{"reply_pool_idle_ms", OPT_U64, OFF(reply_pool_idle_ms), 0, 86400000ull, 0, 0, NULL,
	 "10000", 1,
	 "free the idle pooled reply buffers after this long without a Fetch needing one "
	 "(0 = keep them)"},
	{"host_capacity_bytes", OPT_SIZE, OFF(host_capacity_bytes), 1 * MIB, 64 * TIB, 0, 0, NULL,
	 "4GiB", 1, "host DRAM the sessions and append staging may use (N% = share of RAM)"},
	{"host_page_cache_bytes", OPT_SIZE, OFF(host_page_cache_bytes), 0, 1024 * MIB, 0, 0, NULL,
	 "16MiB", 1, "freed staging and chunk pages kept for reuse (saves page faults per Append)"},
	{"capacity_policy", OPT_ENUM, OFF(capacity_policy), 0, 0, 0, 0, policy_names,
	 "drop-coldest", 1,
	 "when host memory is full: reject (RESOURCE_EXHAUSTED) or drop-coldest unpinned sessions"},
	{"default_ttl_seconds", OPT_U64, OFF(default_ttl_seconds), 0, 365 * 86400ull, 0, 0, NULL,
	 "3600", 1, "idle expiry of sessions opened without ttl_seconds (0 = never)"},
	{"max_ttl_seconds", OPT_U64, OFF(max_ttl_seconds), 0, 365 * 86400ull, 0, 0, NULL,
	 "604800", 1, "largest ttl_seconds a client may ask for (0 = unlimited)"},
	{"max_sessions", OPT_U64, OFF(max_sessions), 1, 10000000, 0, 0, NULL, "65536", 1,
	 "sessions held at once (OpenSession beyond it: RESOURCE_EXHAUSTED)"},
	{"max_append_bytes", OPT_SIZE, OFF(max_append_bytes), 64 * KIB, 64 * GIB, 0, 0, NULL,
	 "256MiB", 1, "K+V bytes one Append stream may stage before its atomic commit"},
	{"max_attend_items", OPT_U64, OFF(max_attend_items), 1, 65536, 0, 0, NULL, "1024", 1,
	 "items in one Attend batch"},
	{"default_scheme", OPT_ENUM, OFF(default_scheme), 0, 0, 0, 0, scheme_names, "oscar", 1,
	 "codec scheme of sessions opened without one"},
	{"default_key_bits", OPT_U64, OFF(default_key_bits), 2, 8, 0, 0, NULL, "3", 1,
	 "default key bits: 2, 3, 4 or 8"},
	{"default_value_bits", OPT_U64, OFF(default_value_bits), 2, 8, 0, 0, NULL, "2", 1,
	 "default value bits: 2, 3, 4 or 8"},
	{"default_group", OPT_U64, OFF(default_group), 32, 128, 0, 0, NULL, "64", 1,
	 "default quantization group G: 32, 64 or 128"},
	{"default_chunk_tokens", OPT_U64, OFF(default_chunk_tokens), 32, 1024, 0, 0, NULL, "64",
	 1, "default chunk size B in tokens: a multiple of G"},
	{"default_n_sinks", OPT_U64, OFF(default_n_sinks), 0, 64, 0, 0, NULL, "8", 1,
	 "default count S of leading tokens kept exact (<= B)"},
	{"default_rotate_v", OPT_BOOL, OFF(default_rotate_v), 0, 1, 0, 0, NULL, "yes", 1,
	 "rotate values too (hadamard and oscar; ignored for none and kivi)"},
	{"default_pin_detect_ratio", OPT_DOUBLE, OFF(default_pin_detect_ratio), 0, 0, 0.0, 0.999,
	 NULL, "0", 1, "pin tokens whose key norm is below ratio x median (0 = off)"},
	{"default_pin_detect_max", OPT_U64, OFF(default_pin_detect_max), 0, 1024, 0, 0, NULL, "0",
	 1, "at most this many detected pins per chunk (<= B)"},
	{"default_recent_exact_tokens", OPT_U64, OFF(default_recent_exact_tokens), 0,
	 KVT_MAX_RECENT_EXACT, 0, 0, NULL, "128", 1,
	 "default recent window W: the newest W-B+1..W tokens stay exact (0 = seal every B; "
	 "else >= B)"},
	{"default_key_rounding", OPT_ENUM, OFF(default_key_rounding), 0, 0, 0, 0, rounding_names,
	 "minmax", 1,
	 "how the encoder picks key scales: minmax (OScaR) or mse (least squared error over "
	 "clipped ranges; ignored for scheme none)"},
	{"log_level", OPT_ENUM, OFF(log_level), 0, 0, 0, 0, level_names, "info", 1,
	 "least severe level logged: debug, info, warn, error"},
	{"maintenance_interval_ms", OPT_U64, OFF(maintenance_interval_ms), 10, 60000, 0, 0, NULL,
	 "1000", 0, "period of the TTL expiry scan"},
	{"shutdown_grace_ms", OPT_U64, OFF(shutdown_grace_ms), 0, 600000, 0, 0, NULL, "10000", 0,
	 "on SIGTERM, how long in-flight calls may run before they are cancelled"},
	/* GPU (issue 4): tiers/tier_gpu.h. Without a device or without CUDA at build time the
	 * daemon runs on the host and GPU requests answer FAILED_PRECONDITION. */
	{"gpu_enable", OPT_BOOL, OFF(gpu_enable), 0, 1, 0, 0, NULL, "yes", 0,
	 "use a CUDA device when one is present (RestoreToDevice, the GPU tier)"},
	{"gpu_device", OPT_U64, OFF(gpu_device), 0, 63, 0, 0, NULL, "0", 0,
	 "CUDA device ordinal (as CUDA_VISIBLE_DEVICES numbers them for kvtierd)"},
	{"gpu_arena_bytes", OPT_SIZE, OFF(gpu_arena_bytes), 0, 1024 * GIB, 0, 0, NULL, "0", 0,
	 "device arena of the GPU tier, allocated at start (0 = no GPU tier)"},
	{"gpu_staging_bytes", OPT_SIZE, OFF(gpu_staging_bytes), 4 * MIB, 16 * GIB, 0, 0, NULL,
	 "64MiB", 0, "pinned host + device staging of RestoreToDevice (4 slots; a chunk must fit one)"},
	{"gpu_ipc_idle_seconds", OPT_U64, OFF(gpu_ipc_idle_seconds), 1, 86400, 0, 0, NULL, "60",
	 0, "close a worker's CUDA IPC mapping unused for this long"},
	{"gpu_default_tier", OPT_ENUM, OFF(gpu_default_tier), 0, 0, 0, 0, tier_names, "host", 1,
	 "where sessions opened without a tier keep their sealed chunks: host or gpu"},
	{"gpu_restore_threads", OPT_U64, OFF(gpu_restore_threads), 1, 32, 0, 0, NULL, "8", 0,
	 "threads copying chunks into pinned staging during RestoreToDevice"},
	{"gpu_pin_host", OPT_BOOL, OFF(gpu_pin_host), 0, 1, 0, 0, NULL, "yes", 0,
	 "page-lock session chunks in host memory when a GPU is usable (restores copy by DMA)"},
	{"gpu_arena_policy", OPT_ENUM, OFF(gpu_arena_policy), 0, 0, 0, 0, arena_policy_names,
	 "lru", 0,
	 "a full GPU arena demotes the least recently used unpinned GPU sessions to the host "
	 "(lru) or keeps new chunks on the host (keep)"},
};
#define N_OPTS (sizeof opts / sizeof opts[0])

size_t kvt_config_n_options(void)
{
	return N_OPTS;
}

const char *kvt_config_option_name(size_t i)
{
	return i < N_OPTS ? opts[i].name : NULL;
}

int kvt_parse_size(const char *s, uint64_t *out)
{
	char *end;
	if (!isdigit((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno)
		return -EINVAL;
	if (*end == '%') {
		/* A share of physical memory: "50%" of this machine's RAM. */
		long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
		if (end[1] || v < 1 || v > 100 || pages <= 0 || page <= 0)
			return -EINVAL;
		*out = (uint64_t)pages * (uint64_t)page / 100 * v;
		return 0;
	}
	uint64_t mul = 1;
	while (*end == ' ')
		end++;
	switch (toupper((unsigned char)*end)) {
	case '\0':
		break;
	case 'K': mul = KIB; end++; break;
	case 'M': mul = MIB; end++; break;
	case 'G': mul = GIB; end++; break;
	case 'T': mul = TIB; end++; break;
	case 'B': break;
	default: return -EINVAL;
	}
	if (mul > 1 && *end == 'i')
		end++;
	if (*end == 'B' || *end == 'b')
		end++;
	if (*end)
		return -EINVAL;
	if (v > UINT64_MAX / mul)
		return -ERANGE;
	*out = v * mul;
	return 0;
}

static const struct opt *find_opt(const char *name, size_t len)
{
	for (size_t i = 0; i < N_OPTS; i++) {
		const char *a = opts[i].name;
		size_t j = 0;
		for (; j < len && a[j]; j++) {
			char c = name[j] == '-' ? '_' : name[j];
			if (c != a[j])
				break;
		}
		if (j == len && a[j] == '\0')
			return &opts[i];
	}
	return NULL;
}

static void fmt_size(char *buf, size_t len, uint64_t v)
{
	if (v && v % TIB == 0)
		snprintf(buf, len, "%" PRIu64 "TiB", v / TIB);
	else if (v && v % GIB == 0)
		snprintf(buf, len, "%" PRIu64 "GiB", v / GIB);
	else if (v && v % MIB == 0)
		snprintf(buf, len, "%" PRIu64 "MiB", v / MIB);
	else if (v && v % KIB == 0)
		snprintf(buf, len, "%" PRIu64 "KiB", v / KIB);
	else
		snprintf(buf, len, "%" PRIu64, v);
}

/* At most n bytes of s (up to its NUL) for an error message that quotes what the user gave (a
 * value, an option name, an argument, a file path): escaped as kvtierd's log and kvtierctl
 * escape user text (kvt_text_escape_n with KVT_TEXT_BACKSLASH: control bytes, C1 controls,
 * Unicode format characters and broken UTF-8 as \xNN, '"' and '\\' after a backslash), so
 * nothing in it acts on the terminal or the journal, and a typed "\x0a" does not read like an
 * escaped newline. Cut short rather than split an escape. Returns buf. */
static const char *esc(char *buf, size_t len, const char *s, size_t n)
{
	return kvt_text_escape_n(buf, len, s, n, KVT_TEXT_BACKSLASH);
}

static void enum_list(char *buf, size_t len, const char *const *names)
{
	size_t o = 0;
	buf[0] = '\0';
	for (int i = 0; names[i] && o < len; i++)
		o += (size_t)snprintf(buf + o, len - o, "%s%s", i ? ", " : "", names[i]);
}

/* Parses one value for one row into cfg. `where` names the source for the message. */
static int set_opt(struct kvt_config *cfg, const struct opt *o, const char *val,
		   const char *where, char *err, size_t errlen)
{
	char *base = (char *)cfg + o->offset;
	char lim[256], q[4 * KVT_CONFIG_STR_MAX]; /* q: val for a message, escaped */
	switch (o->type) {
	case OPT_BOOL: {
		uint64_t b;
		if (!strcmp(val, "yes") || !strcmp(val, "true") || !strcmp(val, "1") ||
		    !strcmp(val, "on"))
			b = 1;
		else if (!strcmp(val, "no") || !strcmp(val, "false") || !strcmp(val, "0") ||
			 !strcmp(val, "off"))
			b = 0;
		else {
			snprintf(err, errlen, "%s: %s = \"%s\" is not a boolean (yes/no)", where,
				 o->name, esc(q, sizeof q, val, SIZE_MAX));
			return -EINVAL;
		}
		memcpy(base, &b, sizeof b);
		return 0;
	}
	case OPT_U64:
	case OPT_SIZE: {
		uint64_t v = 0;
		int rc;
		if (o->type == OPT_SIZE) {
			rc = kvt_parse_size(val, &v);
		} else {
			char *end;
			errno = 0;
			v = isdigit((unsigned char)*val) ? strtoull(val, &end, 10) : 0;
			rc = (!isdigit((unsigned char)*val) || errno || *end) ? -EINVAL : 0;
		}
		if (rc) {
			snprintf(err, errlen, "%s: %s = \"%s\" is not %s", where, o->name,
				 esc(q, sizeof q, val, SIZE_MAX),
				 o->type == OPT_SIZE ? "a size (e.g. 4GiB, 512MiB, 65536, 25%)"
						     : "a non-negative integer");
			return -EINVAL;
		}
		if (v < o->min || v > o->max) {
			char a[32], b[32];
			if (o->type == OPT_SIZE) {
				fmt_size(a, sizeof a, o->min);
				fmt_size(b, sizeof b, o->max);
			} else {
				snprintf(a, sizeof a, "%" PRIu64, o->min);
				snprintf(b, sizeof b, "%" PRIu64, o->max);
			}
			snprintf(err, errlen, "%s: %s = %s is out of range %s..%s", where, o->name,
				 esc(q, sizeof q, val, SIZE_MAX), a, b);
			return -EINVAL;
		}
		memcpy(base, &v, sizeof v);
		return 0;
	}
	case OPT_DOUBLE: {
		char *end;
		errno = 0;
		double d = strtod(val, &end);
		if (errno || *end || end == val || !isfinite(d)) {
			snprintf(err, errlen, "%s: %s = \"%s\" is not a number", where, o->name,
				 esc(q, sizeof q, val, SIZE_MAX));
			return -EINVAL;
		}
		if (d < o->dmin || d > o->dmax) {
			snprintf(err, errlen, "%s: %s = %s is out of range %g..%g", where, o->name,
				 esc(q, sizeof q, val, SIZE_MAX), o->dmin, o->dmax);
			return -EINVAL;
		}
		memcpy(base, &d, sizeof d);
		return 0;
	}
	case OPT_STRING:
		if (strlen(val) >= KVT_CONFIG_STR_MAX) {
			snprintf(err, errlen, "%s: %s is %zu bytes long, the limit is %d", where,
				 o->name, strlen(val), KVT_CONFIG_STR_MAX - 1);
			return -EINVAL;
		}
		/* Every accepted string must print (--print-config) as a file line that reads
		 * back the same: a newline would end the line and start another option, and the
		 * file format has no escapes, so control bytes are refused wherever they come
		 * from; so is a '"' followed by blanks and '#', which a quoted value ends at. */
		for (size_t i = 0; val[i]; i++) {
			unsigned char ch = (unsigned char)val[i];
			if (ch < 0x20 || ch == 0x7f) {
				snprintf(err, errlen,
					 "%s: %s holds the control character 0x%02x at offset %zu "
					 "(strings may not contain control characters)",
					 where, o->name, ch, i);
				return -EINVAL;
			}
			if (ch == '"' && val[i + 1 + strspn(val + i + 1, " ")] == '#') {
				snprintf(err, errlen,
					 "%s: %s has a '\"' at offset %zu followed by '#': a config "
					 "file cannot hold that in a value (the quoted value ends there)",
					 where, o->name, i);
				return -EINVAL;
			}
		}
		snprintf(base, KVT_CONFIG_STR_MAX, "%s", val);
		return 0;
	case OPT_ENUM:
		for (uint64_t i = 0; o->enum_names[i]; i++) {
			if (!strcmp(val, o->enum_names[i])) {
				memcpy(base, &i, sizeof i);
				return 0;
			}
		}
		enum_list(lim, sizeof lim, o->enum_names);
		snprintf(err, errlen, "%s: %s = \"%s\" is not one of %s", where, o->name,
			 esc(q, sizeof q, val, SIZE_MAX), lim);
		return -EINVAL;
	}
	return -EINVAL;
}

static void format_value(const struct kvt_config *cfg, const struct opt *o, char *buf,
			 size_t len)
{
	const char *base = (const char *)cfg + o->offset;
	uint64_t v;
	double d;
	switch (o->type) {
	case OPT_BOOL:
		memcpy(&v, base, sizeof v);
		snprintf(buf, len, "%s", v ? "yes" : "no");
		return;
	case OPT_U64:
		memcpy(&v, base, sizeof v);
		snprintf(buf, len, "%" PRIu64, v);
		return;
	case OPT_SIZE:
		memcpy(&v, base, sizeof v);
		fmt_size(buf, len, v);
		return;
	case OPT_DOUBLE:
		memcpy(&d, base, sizeof d);
		/* The shortest text that reads back as the same double ("%g" kept 6 digits):
		 * --print-config reloads exactly, and apply_reload sees a change in any digit. */
		for (int prec = 6; prec <= 17; prec++) {
			snprintf(buf, len, "%.*g", prec, d);
			if (strtod(buf, NULL) == d)
				break;
		}
		return;
	case OPT_STRING:
		snprintf(buf, len, "%s", base);
		return;
	case OPT_ENUM:
		memcpy(&v, base, sizeof v);
		snprintf(buf, len, "%s", o->enum_names[v]);
		return;
	}
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

/* Reads one line, without its '\n', into buf (max + 1 bytes): returns its length, -1 at the end
 * of the file, or -2 past max bytes. Unlike fgets it sees NUL bytes (*nul): fgets hid the rest
 * of such a line, or called it too long. */
static int read_line(FILE *f, char *buf, size_t max, int *nul)
{
	size_t n = 0;
	int c;
	*nul = 0;
	while ((c = getc(f)) != EOF && c != '\n') {
		if (n == max)
			return -2;
		*nul |= c == '\0';
		buf[n++] = (char)c;
	}
	buf[n] = '\0';
	return c == EOF && n == 0 ? -1 : (int)n;
}

static int load_file(struct kvt_config *cfg, const char *path, enum kvt_config_source *sources,
		     char *err, size_t errlen)
{
	char qp[512]; /* path for a message, escaped */
	esc(qp, sizeof qp, path, SIZE_MAX);
	FILE *f = fopen(path, "r");
	if (!f) {
		int e = errno;
		snprintf(err, errlen, "config file %s: %s", qp, strerror(e));
		return -e;
	}
	char line[1024], qname[4 * sizeof line]; /* qname: an unknown name, escaped */
	char where[sizeof qp + 16];
	int lineno = 0, rc = 0, len, nul;
	while ((len = read_line(f, line, sizeof line - 2, &nul)) != -1) {
		lineno++;
		if (len == -2) {
			snprintf(err, errlen, "%s:%d: line longer than %zu bytes", qp, lineno,
				 sizeof line - 2);
			rc = -EINVAL;
			break;
		}
		if (nul) {
			snprintf(err, errlen, "%s:%d: NUL byte in the line (not a text file?)", qp,
				 lineno);
			rc = -EINVAL;
			break;
		}
		/* '#' starts a comment, except inside a quoted value, which runs to its closing
		 * quote: the first '"' followed only by blanks up to the end or a '#'. */
		char *eq = strchr(line, '='), *cut = strchr(line, '#');
		int quoted = 0; /* 1: a quoted value, -1: one without its closing quote */
		if (eq && (!cut || eq < cut)) {
			char *v = eq + 1;
			while (isspace((unsigned char)*v))
				v++;
			if (*v == '"') {
				quoted = -1;
				for (char *q = strchr(v + 1, '"'); q && quoted < 0; q = strchr(q + 1, '"')) {
					char *r = q + 1;
					while (isspace((unsigned char)*r))
						r++;
					if (!*r || *r == '#') {
						cut = q + 1;
						quoted = 1;
					}
				}
			}
		}
		if (cut && quoted >= 0)
			*cut = '\0';
		char *s = trim(line);
		if (!*s)
			continue;
		eq = strchr(s, '=');
		if (!eq) {
			snprintf(err, errlen, "%s:%d: expected `name = value`", qp, lineno);
			rc = -EINVAL;
			break;
		}
		*eq = '\0';
		char *name = trim(s), *val = trim(eq + 1);
		const struct opt *o = find_opt(name, strlen(name));
		if (!o) {
			snprintf(err, errlen, "%s:%d: unknown option \"%s\" (kvtierd --help lists them)",
				 qp, lineno, esc(qname, sizeof qname, name, SIZE_MAX));
			rc = -EINVAL;
			break;
		}
		if (quoted < 0) {
			snprintf(err, errlen, "%s:%d: %s: the quoted value has no closing quote", qp,
				 lineno, o->name);
			rc = -EINVAL;
			break;
		}
		if (quoted) {
			val[strlen(val) - 1] = '\0';
			val++;
		}
		snprintf(where, sizeof where, "%s:%d", qp, lineno);
		rc = set_opt(cfg, o, val, where, err, errlen);
		if (rc)
			break;
		if (sources)
			sources[o - opts] = KVT_SRC_FILE;
	}
	/* getc's EOF is also a read error (a directory: EISDIR), not only the end. */
	if (!rc && ferror(f)) {
		int e = errno ? errno : EIO;
		snprintf(err, errlen, "config file %s: %s", qp, strerror(e));
		rc = -e;
	}
	fclose(f);
	return rc;
}

/* One command-line argument, with its value when it takes one. */
enum arg_kind {
	ARG_CHECK, ARG_PRINT, ARG_HELP, ARG_VERSION, ARG_CONFIG, /* the first pass's */
	ARG_OPTION, ARG_UNKNOWN, ARG_NOT_OPTION,                 /* the second pass's */
	ARG_END                                                  /* "--": both passes stop */
};

struct arg {
	enum arg_kind kind;
	const char *text;     /* the argument as given */
	const struct opt *o;  /* ARG_OPTION */
	const char *val;      /* ARG_CONFIG, ARG_OPTION: the value; NULL when argv ended first */
	size_t name_len;      /* ARG_UNKNOWN: of the name after "--" */
};

/* Reads argv[*i] and, for --config / -c and a `--name` (no '=') of a non-bool option, the
 * next argument as its value; advances *i past both. Both passes of kvt_config_load walk argv
 * with this, so an argument read as a value (`--socket --config=x`: the socket is
 * "--config=x") is never also read as a flag by one of them. */
static void next_arg(int argc, char **argv, int *i, struct arg *a)
{
	const char *s = argv[(*i)++];
	memset(a, 0, sizeof *a);
	a->text = s;
	if (!strcmp(s, "--")) {
		a->kind = ARG_END;
	} else if (!strcmp(s, "--check-config") || !strcmp(s, "-n")) {
		a->kind = ARG_CHECK;
	} else if (!strcmp(s, "--print-config")) {
		a->kind = ARG_PRINT;
	} else if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
		a->kind = ARG_HELP;
	} else if (!strcmp(s, "--version")) {
		a->kind = ARG_VERSION;
	} else if (!strncmp(s, "--config=", 9)) {
		a->kind = ARG_CONFIG;
		a->val = s + 9;
	} else if (!strcmp(s, "--config") || !strcmp(s, "-c")) {
		a->kind = ARG_CONFIG;
		if (*i < argc)
			a->val = argv[(*i)++];
	} else if (strncmp(s, "--", 2) != 0) {
		a->kind = ARG_NOT_OPTION;
	} else {
		const char *name = s + 2, *eq = strchr(name, '=');
		a->name_len = eq ? (size_t)(eq - name) : strlen(name);
		a->o = find_opt(name, a->name_len);
		a->kind = a->o ? ARG_OPTION : ARG_UNKNOWN;
		if (!a->o)
			return;
		if (eq)
			a->val = eq + 1;
		else if (a->o->type == OPT_BOOL)
			a->val = "yes"; /* a bool never takes the next argument */
		else if (*i < argc)
			a->val = argv[(*i)++];
	}
}

int kvt_config_load(struct kvt_config *cfg, int argc, char **argv, struct kvt_cmdline *cmd,
		    enum kvt_config_source *sources, char *err, size_t errlen)
{
	struct kvt_cmdline local;
	if (!cmd)
		cmd = &local;
	memset(cmd, 0, sizeof *cmd);
	memset(cfg, 0, sizeof *cfg);
	int rc;
	for (size_t i = 0; i < N_OPTS; i++) {
		rc = set_opt(cfg, &opts[i], opts[i].def, "built-in default", err, errlen);
		if (rc)
			return rc; /* a bad row in the table: caught by the unit tests */
		if (sources)
			sources[i] = KVT_SRC_DEFAULT;
	}
	/* First pass over argv: the special flags and --config, which must be known before the
	 * file is read; option flags are applied after the file and the environment. */
	char q[4 * KVT_CONFIG_STR_MAX]; /* an argument for a message, escaped */
	struct arg a;
	for (int i = 1; i < argc;) {
		next_arg(argc, argv, &i, &a);
		if (a.kind == ARG_END) {
			/* What follows is not a flag, whatever it looks like, and kvtierd takes no
			 * operands: refused here, before --help or --version can answer, so
			 * `kvtierd --help -- x` fails like `kvtierd -- x` does. */
			if (i < argc) {
				snprintf(err, errlen, "unexpected argument \"%s\" after \"--\" "
					 "(kvtierd takes no arguments)",
					 esc(q, sizeof q, argv[i], SIZE_MAX));
				return -EINVAL;
			}
			break;
		}
		if (a.kind == ARG_CHECK)
			cmd->check_config = 1;
		else if (a.kind == ARG_PRINT)
			cmd->print_config = 1;
		else if (a.kind == ARG_HELP)
			cmd->help = 1;
		else if (a.kind == ARG_VERSION)
			cmd->version = 1;
		else if (a.kind == ARG_CONFIG) {
			if (!a.val) {
				snprintf(err, errlen, "%s needs a file name", a.text);
				return -EINVAL;
			}
			cmd->config_file = a.val;
		}
	}
	if (cmd->help || cmd->version)
		return 0;
	if (cmd->config_file) {
		rc = load_file(cfg, cmd->config_file, sources, err, errlen);
		if (rc)
			return rc < 0 ? rc : -EINVAL;
	}
	for (size_t i = 0; i < N_OPTS; i++) {
		char env[96], where[128];
		size_t j = (size_t)snprintf(env, sizeof env, "KVTIER_");
		for (const char *p = opts[i].name; *p && j + 1 < sizeof env; p++)
			env[j++] = (char)toupper((unsigned char)*p);
		env[j] = '\0';
		const char *v = getenv(env);
		if (!v)
			continue;
		snprintf(where, sizeof where, "environment %s", env);
		rc = set_opt(cfg, &opts[i], v, where, err, errlen);
		if (rc)
			return rc;
		if (sources)
			sources[i] = KVT_SRC_ENV;
	}
	for (int i = 1; i < argc;) {
		next_arg(argc, argv, &i, &a);
		if (a.kind == ARG_END)
			break; /* nothing follows it: the first pass refused anything that did */
		if (a.kind == ARG_NOT_OPTION) {
			snprintf(err, errlen, "unexpected argument \"%s\" (options are --name=value)",
				 esc(q, sizeof q, a.text, SIZE_MAX));
			return -EINVAL;
		}
		if (a.kind == ARG_UNKNOWN) {
			snprintf(err, errlen, "unknown option \"%s\" (kvtierd --help lists them)",
				 esc(q, sizeof q, a.text, a.name_len + 2));
			return -EINVAL;
		}
		if (a.kind != ARG_OPTION)
			continue; /* read by the first pass */
		if (!a.val) {
			snprintf(err, errlen, "option --%s needs a value", a.o->name);
			return -EINVAL;
		}
		rc = set_opt(cfg, a.o, a.val, "command line", err, errlen);
		if (rc)
			return rc;
		if (sources)
			sources[a.o - opts] = KVT_SRC_FLAG;
	}
	return kvt_config_validate(cfg, err, errlen);
}

static int is_loopback_host(const char *host, size_t len)
{
	if (len == 9 && !strncmp(host, "localhost", 9))
		return 1;
	if (len == 3 && !strncmp(host, "::1", 3))
		return 1;
	if (len == 5 && !strncmp(host, "[::1]", 5))
		return 1;
	if (len >= 4 && !strncmp(host, "127.", 4)) {
		for (size_t i = 4; i < len; i++)
			if (!isdigit((unsigned char)host[i]) && host[i] != '.')
				return 0;
		return 1;
	}
	return 0;
}

static int bits_ok(uint64_t b)
{
	return b == 2 || b == 3 || b == 4 || b == 8;
}

int kvt_config_validate(const struct kvt_config *c, char *err, size_t errlen)
{
	if (!bits_ok(c->default_key_bits)) {
		snprintf(err, errlen, "default_key_bits = %" PRIu64 " is not one of 2, 3, 4, 8",
			 c->default_key_bits);
		return -EINVAL;
	}
	if (!bits_ok(c->default_value_bits)) {
		snprintf(err, errlen, "default_value_bits = %" PRIu64 " is not one of 2, 3, 4, 8",
			 c->default_value_bits);
		return -EINVAL;
	}
	if (c->default_group != 32 && c->default_group != 64 && c->default_group != 128) {
		snprintf(err, errlen, "default_group = %" PRIu64 " is not one of 32, 64, 128",
			 c->default_group);
		return -EINVAL;
	}
	if (c->default_chunk_tokens % c->default_group) {
		snprintf(err, errlen,
			 "default_chunk_tokens = %" PRIu64 " is not a multiple of default_group = %" PRIu64,
			 c->default_chunk_tokens, c->default_group);
		return -EINVAL;
	}
	if (c->default_n_sinks > c->default_chunk_tokens) {
		snprintf(err, errlen,
			 "default_n_sinks = %" PRIu64 " exceeds default_chunk_tokens = %" PRIu64,
			 c->default_n_sinks, c->default_chunk_tokens);
		return -EINVAL;
	}
	if (c->default_pin_detect_max > c->default_chunk_tokens) {
		snprintf(err, errlen,
			 "default_pin_detect_max = %" PRIu64 " exceeds default_chunk_tokens = %" PRIu64,
			 c->default_pin_detect_max, c->default_chunk_tokens);
		return -EINVAL;
	}
	if (c->default_recent_exact_tokens &&
	    c->default_recent_exact_tokens < c->default_chunk_tokens) {
		snprintf(err, errlen,
			 "default_recent_exact_tokens = %" PRIu64 " is below default_chunk_tokens = "
			 "%" PRIu64 " (0 turns the window off)",
			 c->default_recent_exact_tokens, c->default_chunk_tokens);
		return -EINVAL;
	}
	if (c->max_ttl_seconds && c->default_ttl_seconds > c->max_ttl_seconds) {
		snprintf(err, errlen,
			 "default_ttl_seconds = %" PRIu64 " exceeds max_ttl_seconds = %" PRIu64,
			 c->default_ttl_seconds, c->max_ttl_seconds);
		return -EINVAL;
	}
	if (c->max_append_bytes > c->host_capacity_bytes) {
		snprintf(err, errlen,
			 "max_append_bytes = %" PRIu64 " exceeds host_capacity_bytes = %" PRIu64,
			 c->max_append_bytes, c->host_capacity_bytes);
		return -EINVAL;
	}
	if (c->listen_tcp[0]) {
		const char *colon = strrchr(c->listen_tcp, ':');
		char *end;
		if (!colon || colon == c->listen_tcp) {
			snprintf(err, errlen, "listen_tcp = \"%s\" is not host:port", c->listen_tcp);
			return -EINVAL;
		}
		errno = 0;
		unsigned long port = strtoul(colon + 1, &end, 10);
		if (errno || *end || colon[1] == '\0' || port > 65535) {
			snprintf(err, errlen, "listen_tcp = \"%s\": port is not 0..65535",
				 c->listen_tcp);
			return -EINVAL;
		}
		if (!is_loopback_host(c->listen_tcp, (size_t)(colon - c->listen_tcp))) {
			snprintf(err, errlen,
				 "listen_tcp = \"%s\": TLS is not implemented yet, so TCP is only "
				 "allowed on a loopback address (127.0.0.1, ::1, localhost) with "
				 "--insecure-loopback",
				 c->listen_tcp);
			return -EINVAL;
		}
		if (!c->insecure_loopback) {
			snprintf(err, errlen,
				 "listen_tcp = \"%s\" would serve plaintext TCP: TLS is not "
				 "implemented yet; pass --insecure-loopback to accept plaintext on "
				 "loopback",
				 c->listen_tcp);
			return -EINVAL;
		}
	}
	return 0;
}

static const char *source_name(enum kvt_config_source s)
{
	switch (s) {
	case KVT_SRC_DEFAULT: return "default";
	case KVT_SRC_FILE: return "file";
	case KVT_SRC_ENV: return "env";
	case KVT_SRC_FLAG: return "flag";
	}
	return "?";
}

void kvt_config_print(FILE *out, const struct kvt_config *cfg,
		      const enum kvt_config_source *sources)
{
	char buf[KVT_CONFIG_STR_MAX + 8];
	for (size_t i = 0; i < N_OPTS; i++) {
		format_value(cfg, &opts[i], buf, sizeof buf);
		if (opts[i].type == OPT_STRING)
			fprintf(out, "%s = \"%s\"", opts[i].name, buf);
		else
			fprintf(out, "%s = %s", opts[i].name, buf);
		if (sources)
			fprintf(out, "  # %s", source_name(sources[i]));
		if (opts[i].offset == OFF(socket_path)) {
			char path[KVT_CONFIG_STR_MAX + 32], shown[4 * sizeof path];
			kvt_config_socket_path(cfg, path, sizeof path);
			/* $RUNTIME_DIRECTORY is not checked like the options: a newline in it
			 * must not end this comment and start an option line (shown holds every
			 * byte escaped, so esc never cuts it) */
			fprintf(out, "%s listening on %s", sources ? ";" : "  #",
				esc(shown, sizeof shown, path, sizeof path));
		}
		if (opts[i].offset == OFF(default_key_rounding)) {
			/* Name the preset the default codec spells, if any. */
			struct kvt_codec_config d;
			memset(&d, 0, sizeof d);
			d.scheme = (uint32_t)cfg->default_scheme;
			d.key_bits = (uint32_t)cfg->default_key_bits;
			d.value_bits = (uint32_t)cfg->default_value_bits;
			d.group = (uint32_t)cfg->default_group;
			d.chunk_tokens = (uint32_t)cfg->default_chunk_tokens;
			d.rotate_v = (uint32_t)cfg->default_rotate_v;
			d.n_sinks = (uint32_t)cfg->default_n_sinks;
			d.pin_detect_ratio = (float)cfg->default_pin_detect_ratio;
			d.pin_detect_max = (uint32_t)cfg->default_pin_detect_max;
			d.recent_exact_tokens = (uint32_t)cfg->default_recent_exact_tokens;
			d.key_rounding = (uint32_t)cfg->default_key_rounding;
			const char *pn = kvt_codec_preset_name(&d);
			fprintf(out, "%s default codec: %s%s", sources ? ";" : "  #",
				pn ? "preset " : "custom (no preset)", pn ? pn : "");
		}
		fputc('\n', out);
	}
}

void kvt_config_help(FILE *out)
{
	fprintf(out,
		"usage: kvtierd [--config FILE] [--check-config] [--print-config] [--help]\n"
		"               [--name=value ...]\n\n"
		"Every option can be set (later wins) in the config file as `name = value`, in the\n"
		"environment as KVTIER_NAME, or on the command line as --name=value (or --name\n"
		"value; dashes and underscores are the same). [r] = applied on SIGHUP.\n\n");
	char lim[128], def[64];
	for (size_t i = 0; i < N_OPTS; i++) {
		const struct opt *o = &opts[i];
		switch (o->type) {
		case OPT_BOOL: snprintf(lim, sizeof lim, "yes|no"); break;
		case OPT_U64: snprintf(lim, sizeof lim, "%" PRIu64 "..%" PRIu64, o->min, o->max); break;
		case OPT_SIZE: {
			char a[32], b[32];
			fmt_size(a, sizeof a, o->min);
			fmt_size(b, sizeof b, o->max);
			snprintf(lim, sizeof lim, "size %s..%s", a, b);
			break;
		}
		case OPT_DOUBLE: snprintf(lim, sizeof lim, "%g..%g", o->dmin, o->dmax); break;
		case OPT_STRING: snprintf(lim, sizeof lim, "string"); break;
		case OPT_ENUM: {
			size_t p = 0;
			for (int k = 0; o->enum_names[k] && p < sizeof lim; k++)
				p += (size_t)snprintf(lim + p, sizeof lim - p, "%s%s", k ? "|" : "",
						      o->enum_names[k]);
			break;
		}
		}
		char flag[64];
		snprintf(flag, sizeof flag, "%s", o->name);
		for (char *p = flag; *p; p++)
			if (*p == '_')
				*p = '-';
		snprintf(def, sizeof def, "%s", o->def[0] ? o->def : "\"\"");
		fprintf(out, "  --%-26s %s (default %s)%s\n      %s\n", flag, lim, def,
			o->reloadable ? " [r]" : "", o->help);
	}
	fprintf(out, "\n  --config FILE      read options from FILE\n"
		     "  --check-config     validate the configuration and exit 0 (valid) or 1\n"
		     "  --print-config     print the effective configuration and exit\n"
		     "  --help, --version\n"
		     "  --                 end of the options (kvtierd takes no arguments after it)\n");
}

int kvt_config_apply_reload(const struct kvt_config *next)
{
	int changed = 0;
	char a[KVT_CONFIG_STR_MAX + 8], b[KVT_CONFIG_STR_MAX + 8], qa[300], qb[300];
	for (size_t i = 0; i < N_OPTS; i++) {
		const struct opt *o = &opts[i];
		format_value(&kvt_config_live, o, a, sizeof a);
		format_value(next, o, b, sizeof b);
		if (!strcmp(a, b))
			continue;
		if (!o->reloadable) {
			kvt_log_warn("config change needs a restart, ignored",
				     "option=%s old=%s new=%s", o->name,
				     kvt_log_quote(qa, sizeof qa, a), kvt_log_quote(qb, sizeof qb, b));
			continue;
		}
		/* Every reloadable option is an 8-byte scalar: one atomic store each. */
		uint64_t v;
		memcpy(&v, (const char *)next + o->offset, sizeof v);
		__atomic_store_n((uint64_t *)((char *)&kvt_config_live + o->offset), v,
				 __ATOMIC_RELAXED);
		kvt_log_info("config changed", "option=%s old=%s new=%s", o->name,
			     kvt_log_quote(qa, sizeof qa, a), kvt_log_quote(qb, sizeof qb, b));
		changed++;
	}
	return changed;
}

void kvt_config_socket_path(const struct kvt_config *cfg, char *out, size_t len)
{
	const char *rd = getenv("RUNTIME_DIRECTORY");
	if (cfg->socket_path[0])
		snprintf(out, len, "%s", cfg->socket_path);
	else if (rd && *rd) {
		/* systemd may pass several directories separated by ':'; the first is ours. */
		size_t n = strcspn(rd, ":");
		snprintf(out, len, "%.*s/kvtierd.sock", (int)n, rd);
	} else
		snprintf(out, len, "./run/kvtierd.sock");
}

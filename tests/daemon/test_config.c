/* Unit tests of the configuration table: defaults, bounds, source order, cross checks, and
 * the command-line modes of kvtierd (--check-config, --print-config, --help). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "kvt_test.h"
#include "kvt_test_proc.h"
#include "kvt_test_text.h"
#include "log.h"

static const char *g_kvtierd;
static char g_tmp[256];

static int run_kvtierd(char *const args[], char *out, size_t outlen);

static int load(struct kvt_config *cfg, char *err, size_t errlen, int argc, char **argv)
{
	struct kvt_cmdline cmd;
	return kvt_config_load(cfg, argc, argv, &cmd, NULL, err, errlen);
}

static void test_defaults(void)
{
	struct kvt_config c;
	char err[512] = "";
	char *argv[] = {"kvtierd", NULL};
	int rc = load(&c, err, sizeof err, 1, argv);
	KVT_REQUIRE(rc == 0, "defaults rejected: %s", err);
	KVT_CHECK(c.max_message_bytes == 4u << 20, "max_message_bytes %llu",
		  (unsigned long long)c.max_message_bytes);
	KVT_CHECK(c.host_capacity_bytes == 4ull << 30, "host_capacity_bytes");
	KVT_CHECK(c.cq_threads == 2, "cq_threads");
	/* The default codec spells the preset kvtier-int2 (K3 V2, G 64, B 64 with a window W 128). */
	KVT_CHECK(c.default_key_bits == 3 && c.default_value_bits == 2 &&
			  c.default_chunk_tokens == 64 && c.default_group == 64 &&
			  c.default_recent_exact_tokens == 128 && c.default_n_sinks == 8, "codec defaults");
	KVT_CHECK(c.default_scheme == 3, "oscar is the default scheme");
	KVT_CHECK(c.capacity_policy == KVT_POLICY_DROP_COLDEST, "policy");
	KVT_CHECK(c.socket_path[0] == '\0' && c.listen_tcp[0] == '\0', "listeners");
	for (size_t i = 0; i < kvt_config_n_options(); i++)
		KVT_CHECK(kvt_config_option_name(i) != NULL, "option %zu has a name", i);
}

static void test_bounds(void)
{
	struct kvt_config c;
	char err[512] = "";
	char *a1[] = {"kvtierd", "--max-message-bytes=1K", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 2, a1) == -EINVAL, "1K accepted");
	KVT_CHECK(strstr(err, "max_message_bytes") && strstr(err, "256KiB..64MiB"),
		  "message names option and limit: %s", err);
	char *a2[] = {"kvtierd", "--cq_threads", "0", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a2) == -EINVAL, "cq_threads 0 accepted");
	KVT_CHECK(strstr(err, "cq_threads") && strstr(err, "1..64"), "%s", err);
	char *a3[] = {"kvtierd", "--capacity-policy=maybe", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 2, a3) == -EINVAL, "bad enum accepted");
	KVT_CHECK(strstr(err, "reject, drop-coldest"), "%s", err);
	char *a4[] = {"kvtierd", "--host-capacity-bytes=2GiB", "--max-append-bytes=512M", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a4) == 0, "sizes: %s", err);
	KVT_CHECK(c.host_capacity_bytes == 2ull << 30 && c.max_append_bytes == 512ull << 20,
		  "size suffixes");
	char *a5[] = {"kvtierd", "--no-such-option=1", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 2, a5) == -EINVAL && strstr(err, "unknown option"),
		  "%s", err);
	char *a6[] = {"kvtierd", "--default-chunk-tokens=80", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 2, a6) == -EINVAL &&
			  strstr(err, "not a multiple of default_group"),
		  "%s", err);
	char *a7[] = {"kvtierd", "--default-ttl-seconds=100", "--max-ttl-seconds=10", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a7) == -EINVAL && strstr(err, "max_ttl_seconds"),
		  "%s", err);
	char *a8[] = {"kvtierd", "--default-key-bits=5", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 2, a8) == -EINVAL && strstr(err, "2, 3, 4, 8"), "%s", err);
	uint64_t v = 0;
	KVT_CHECK(kvt_parse_size("4GiB", &v) == 0 && v == 4ull << 30, "4GiB");
	KVT_CHECK(kvt_parse_size("512MB", &v) == 0 && v == 512ull << 20, "512MB");
	KVT_CHECK(kvt_parse_size("12x", &v) == -EINVAL, "12x");
	KVT_CHECK(kvt_parse_size("-1", &v) == -EINVAL, "-1");
	uint64_t ram = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
	KVT_CHECK(kvt_parse_size("50%", &v) == 0 && v == ram / 100 * 50, "50%% of RAM: %llu",
		  (unsigned long long)v);
	KVT_CHECK(kvt_parse_size("0%", &v) == -EINVAL && kvt_parse_size("101%", &v) == -EINVAL &&
			  kvt_parse_size("5%x", &v) == -EINVAL,
		  "bad shares");
}

static void test_tcp_rules(void)
{
	struct kvt_config c;
	char err[512] = "";
	char *a1[] = {"kvtierd", "--listen-tcp", "127.0.0.1:7000", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a1) == -EINVAL && strstr(err, "--insecure-loopback"),
		  "plaintext loopback without the flag: %s", err);
	char *a2[] = {"kvtierd", "--listen-tcp=0.0.0.0:7000", "--insecure-loopback", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a2) == -EINVAL && strstr(err, "loopback"),
		  "non-loopback accepted: %s", err);
	char *a3[] = {"kvtierd", "--listen-tcp=127.0.0.1:7000", "--insecure-loopback", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a3) == 0, "loopback + flag refused: %s", err);
	char *a4[] = {"kvtierd", "--listen-tcp=localhost:99999", "--insecure-loopback", NULL};
	KVT_CHECK(load(&c, err, sizeof err, 3, a4) == -EINVAL && strstr(err, "port"), "%s", err);
}

static void test_source_order(void)
{
	char path[300];
	snprintf(path, sizeof path, "%s/kvtierd.conf", g_tmp);
	FILE *f = fopen(path, "w");
	KVT_REQUIRE(f != NULL, "cannot write %s", path);
	fprintf(f, "# comment\ncq_threads = 3\nmax_sessions = 10 # trailing\n"
		   "default_ttl_seconds = 60\nlog_level = \"debug\"\n");
	fclose(f);
	char cfgarg[320];
	snprintf(cfgarg, sizeof cfgarg, "--config=%s", path);
	setenv("KVTIER_MAX_SESSIONS", "20", 1);
	setenv("KVTIER_DEFAULT_TTL_SECONDS", "70", 1);
	struct kvt_config c;
	enum kvt_config_source src[64];
	struct kvt_cmdline cmd;
	char err[512] = "";
	char *argv[] = {"kvtierd", cfgarg, "--default-ttl-seconds=80", NULL};
	int rc = kvt_config_load(&c, 3, argv, &cmd, src, err, sizeof err);
	unsetenv("KVTIER_MAX_SESSIONS");
	unsetenv("KVTIER_DEFAULT_TTL_SECONDS");
	KVT_REQUIRE(rc == 0, "load failed: %s", err);
	KVT_CHECK(c.cq_threads == 3, "file value: %llu", (unsigned long long)c.cq_threads);
	KVT_CHECK(c.max_sessions == 20, "env beats file: %llu", (unsigned long long)c.max_sessions);
	KVT_CHECK(c.default_ttl_seconds == 80, "flag beats env: %llu",
		  (unsigned long long)c.default_ttl_seconds);
	KVT_CHECK(c.log_level == 0, "quoted value");
	KVT_CHECK(cmd.config_file && !strcmp(cmd.config_file, path), "config file noted");

	f = fopen(path, "w");
	KVT_REQUIRE(f != NULL, "rewrite");
	fprintf(f, "cq_threads = 3\nbogus_option = 1\n");
	fclose(f);
	char *argv2[] = {"kvtierd", cfgarg, NULL};
	KVT_CHECK(kvt_config_load(&c, 2, argv2, &cmd, NULL, err, sizeof err) == -EINVAL &&
			  strstr(err, ":2:") && strstr(err, "bogus_option"),
		  "bad file line named: %s", err);
	unlink(path);
}

/* A config file that cannot be read is an error, not an empty file (a directory was loaded
 * as one: fgets' NULL on a read error was taken for the end of the file). */
static void test_file_read_error(void)
{
	struct kvt_config c;
	char err[512] = "", arg[320];
	snprintf(arg, sizeof arg, "--config=%s", g_tmp);
	char *argv[] = {"kvtierd", arg, NULL};
	int rc = kvt_config_load(&c, 2, argv, NULL, NULL, err, sizeof err);
	KVT_CHECK(rc == -EISDIR && strstr(err, g_tmp), "a directory as config file: rc %d '%s'", rc,
		  err);
	snprintf(arg, sizeof arg, "--config=%s/none.conf", g_tmp);
	rc = kvt_config_load(&c, 2, argv, NULL, NULL, err, sizeof err);
	KVT_CHECK(rc == -ENOENT && strstr(err, "none.conf"), "a missing file: rc %d '%s'", rc, err);
}

/* Writes n bytes to g_tmp/name and loads it as the config file. */
static int load_file_bytes(const char *name, const char *bytes, size_t n, struct kvt_config *c,
			   char *err, size_t errlen)
{
	char path[300], arg[320];
	snprintf(path, sizeof path, "%s/%s", g_tmp, name);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(bytes, 1, n, f) != n || fclose(f) != 0)
		return -EIO;
	snprintf(arg, sizeof arg, "--config=%s", path);
	char *argv[] = {"kvtierd", arg, NULL};
	int rc = kvt_config_load(c, 2, argv, NULL, NULL, err, errlen);
	unlink(path);
	return rc;
}

/* A NUL byte in a line is refused as such: fgets ignored what followed it on a last line
 * without a newline, and called any other such line "longer than 1022 bytes". */
static void test_file_nul(void)
{
	struct kvt_config c;
	char err[512] = "";
	static const char last[] = "workers = 5\0junk";
	int rc = load_file_bytes("nul1.conf", last, sizeof last - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "nul1.conf:1:") && strstr(err, "NUL"),
		  "NUL in a last line without newline: rc %d '%s'", rc, err);
	static const char mid[] = "workers = 5\0x\nworkers = 6\n";
	rc = load_file_bytes("nul2.conf", mid, sizeof mid - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "nul2.conf:1:") && strstr(err, "NUL") &&
			  !strstr(err, "longer than"),
		  "NUL in a short line: rc %d '%s'", rc, err);
	/* the length limit is unchanged: 1022 bytes and a newline, a last line without one */
	char buf[1100];
	memset(buf, ' ', sizeof buf);
	memcpy(buf, "workers = 7", 11);
	buf[1022] = '\n';
	rc = load_file_bytes("len1.conf", buf, 1023, &c, err, sizeof err);
	KVT_CHECK(rc == 0 && c.workers == 7, "a line of 1022 bytes: rc %d '%s'", rc, err);
	rc = load_file_bytes("len2.conf", buf, 1022, &c, err, sizeof err);
	KVT_CHECK(rc == 0 && c.workers == 7, "a last line of 1022 bytes: rc %d '%s'", rc, err);
	rc = load_file_bytes("len3.conf", buf, 1023 + 1, &c, err, sizeof err);
	KVT_CHECK(rc == 0, "1022 bytes, a newline, a blank: rc %d '%s'", rc, err);
	buf[1022] = ' ';
	buf[1023] = '\n';
	rc = load_file_bytes("len4.conf", buf, 1024, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "len4.conf:1: line longer than 1022 bytes"),
		  "a line of 1023 bytes: rc %d '%s'", rc, err);
	rc = load_file_bytes("len5.conf", buf, 1023, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "longer than"), "a last line of 1023 bytes: rc %d "
		  "'%s'", rc, err);
}

/* A quoted value runs to its closing quote, '#' included: the comment was cut first, so
 * `socket = "/tmp/a#b"` loaded the socket "/tmp/a (quote included), and a value with an
 * opening quote and no closing one was taken literally, its quote included. */
static void test_file_quotes(void)
{
	struct kvt_config c;
	char err[512] = "";
	static const char f1[] = "socket = \"/run/kvt#1.sock\"  # the \"first\" one\n"
				 "listen_tcp=\"127.0.0.1:7000\"# loopback\n"
				 "insecure_loopback = \"yes\"\n"
				 "log_level = \"warn\" \t\n";
	int rc = load_file_bytes("q1.conf", f1, sizeof f1 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "/run/kvt#1.sock") &&
			  !strcmp(c.listen_tcp, "127.0.0.1:7000") && c.log_level == 2,
		  "quoted values: rc %d '%s' socket '%s'", rc, err, c.socket_path);
	static const char f2[] = "socket = \"a\" b\" # c\n";
	rc = load_file_bytes("q2.conf", f2, sizeof f2 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "a\" b"), "inner quote: rc %d '%s' '%s'", rc,
		  err, c.socket_path);
	static const char f3[] = "workers = 4\nsocket = \"/tmp/a # no closing quote\n";
	rc = load_file_bytes("q3.conf", f3, sizeof f3 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "q3.conf:2:") && strstr(err, "socket") &&
			  strstr(err, "closing quote"),
		  "unterminated quote: rc %d '%s'", rc, err);
	/* what --print-config prints for a socket with '#' reads back */
	char *argv[] = {"kvtierd", "--socket=/tmp/x#y \"z\"", NULL};
	rc = load(&c, err, sizeof err, 2, argv);
	char *text = NULL;
	size_t len = 0;
	FILE *m = open_memstream(&text, &len);
	KVT_REQUIRE(rc == 0 && m, "load: rc %d '%s'", rc, err);
	kvt_config_print(m, &c, NULL);
	fclose(m);
	struct kvt_config c2;
	rc = load_file_bytes("q4.conf", text, len, &c2, err, sizeof err);
	KVT_CHECK(rc == 0 && !strcmp(c2.socket_path, "/tmp/x#y \"z\""),
		  "print-config output reloads the socket: rc %d '%s' '%s'", rc, err, c2.socket_path);
	free(text);
}

/* Loads argv, prints the result (with sources or not), reloads the text as a config file and
 * checks that the socket reads back as want and the text prints again the same. */
static void check_print_reload(char **argv, int argc, const char *want, int with_sources)
{
	struct kvt_config c, c2;
	enum kvt_config_source src[64];
	char err[512] = "";
	int rc = kvt_config_load(&c, argc, argv, NULL, src, err, sizeof err);
	KVT_REQUIRE(rc == 0, "load '%s': %s", want, err);
	char *text = NULL, *again = NULL;
	size_t len = 0, len2 = 0;
	FILE *m = open_memstream(&text, &len);
	KVT_REQUIRE(m != NULL, "open_memstream");
	kvt_config_print(m, &c, with_sources ? src : NULL);
	fclose(m);
	rc = load_file_bytes("rt.conf", text, len, &c2, err, sizeof err);
	KVT_CHECK(rc == 0 && !strcmp(c2.socket_path, want) && c2.workers == c.workers &&
			  !memcmp(&c, &c2, sizeof c),
		  "socket '%s' (sources %d) reloads as '%s' (workers %llu): rc %d '%s'", want,
		  with_sources, c2.socket_path, (unsigned long long)c2.workers, rc, err);
	m = open_memstream(&again, &len2);
	KVT_REQUIRE(m != NULL, "open_memstream");
	kvt_config_print(m, &c2, with_sources ? src : NULL);
	fclose(m);
	KVT_CHECK(len == len2 && !memcmp(text, again, len), "socket '%s' prints differently "
		  "after a reload", want);
	free(text);
	free(again);
}

/* Every string kvtierd accepts prints as a line that reloads to the same string: blanks at
 * either end, '#', '"' (but before blanks and '#'), '=', non-ASCII bytes and the empty string. */
static void test_print_strings(void)
{
	static const char *const vals[] = {
		"", " lead", "trail ", "  both  ", "#", "a#b", "#x#", "\"", "\"\"", "a\"b", "\"x",
		"x\"", "x\" ", "x\" y", " \" ", "#\"", "a\"b#", "= x = y", "caf\xc3\xa9 \xff",
		"/tmp/x#y \"z\""};
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
		char arg[300];
		snprintf(arg, sizeof arg, "--socket=%s", vals[i]);
		char *argv[] = {"kvtierd", arg, NULL};
		check_print_reload(argv, 2, vals[i], (int)(i & 1));
		check_print_reload(argv, 2, vals[i], !(i & 1));
	}
}

/* Control bytes in strings are refused wherever they come from, naming the source, the option
 * and the offset: a newline in --socket printed (--print-config) as a file that set another
 * option, `socket = "/tmp/a` then `workers = 9"`. */
static void test_string_controls(void)
{
	struct kvt_config c;
	char err[512] = "";
	char *a1[] = {"kvtierd", "--socket=/tmp/a\nworkers = 9", NULL};
	int rc = load(&c, err, sizeof err, 2, a1);
	KVT_CHECK(rc == -EINVAL && strstr(err, "command line: socket") && strstr(err, "0x0a") &&
			  strstr(err, "offset 6"),
		  "newline in a flag: rc %d '%s'", rc, err);
	char *a2[] = {"kvtierd", "--listen-tcp", "127.0.0.1:7000\r", "--insecure-loopback", NULL};
	rc = load(&c, err, sizeof err, 4, a2);
	KVT_CHECK(rc == -EINVAL && strstr(err, "listen_tcp") && strstr(err, "0x0d") &&
			  strstr(err, "offset 14"),
		  "CR in a separate flag value: rc %d '%s'", rc, err);
	char *a0[] = {"kvtierd", NULL};
	setenv("KVTIER_SOCKET", "/tmp/\x1b[31mred", 1);
	rc = load(&c, err, sizeof err, 1, a0);
	unsetenv("KVTIER_SOCKET");
	KVT_CHECK(rc == -EINVAL && strstr(err, "environment KVTIER_SOCKET") &&
			  strstr(err, "socket") && strstr(err, "0x1b") && strstr(err, "offset 5"),
		  "escape in the environment: rc %d '%s'", rc, err);
	setenv("KVTIER_SOCKET", "x\x7f", 1);
	rc = load(&c, err, sizeof err, 1, a0);
	unsetenv("KVTIER_SOCKET");
	KVT_CHECK(rc == -EINVAL && strstr(err, "0x7f") && strstr(err, "offset 1"),
		  "DEL in the environment: rc %d '%s'", rc, err);
	static const char f1[] = "workers = 3\nsocket = \"/tmp/a\tb\"\n";
	rc = load_file_bytes("ctl1.conf", f1, sizeof f1 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "ctl1.conf:2: socket") && strstr(err, "0x09") &&
			  strstr(err, "offset 6"),
		  "tab in a quoted file value: rc %d '%s'", rc, err);
	static const char f2[] = "socket = /tmp/a\x01z  # note\n";
	rc = load_file_bytes("ctl2.conf", f2, sizeof f2 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && strstr(err, "ctl2.conf:1: socket") && strstr(err, "0x01") &&
			  strstr(err, "offset 6"),
		  "control byte in an unquoted file value: rc %d '%s'", rc, err);
	/* CRLF files still load: the '\r' is a blank at the end of the line, not in the value */
	static const char f3[] = "socket = \"/tmp/q\"\r\nlisten_tcp = 127.0.0.1:7\r\n"
				 "insecure_loopback = yes\r\n";
	rc = load_file_bytes("ctl3.conf", f3, sizeof f3 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "/tmp/q") &&
			  !strcmp(c.listen_tcp, "127.0.0.1:7"),
		  "CRLF file: rc %d '%s' '%s' '%s'", rc, err, c.socket_path, c.listen_tcp);
	/* a '"' followed by blanks and '#' would end the printed quoted value there */
	char *a3[] = {"kvtierd", "--socket=/tmp/a\"  # b", NULL};
	rc = load(&c, err, sizeof err, 2, a3);
	KVT_CHECK(rc == -EINVAL && strstr(err, "command line: socket") && strstr(err, "offset 6") &&
			  strstr(err, "'#'"),
		  "quote, blanks, hash: rc %d '%s'", rc, err);
	setenv("KVTIER_SOCKET", "\"#", 1);
	rc = load(&c, err, sizeof err, 1, a0);
	unsetenv("KVTIER_SOCKET");
	KVT_CHECK(rc == -EINVAL && strstr(err, "environment KVTIER_SOCKET") &&
			  strstr(err, "offset 0"),
		  "quote, hash in the environment: rc %d '%s'", rc, err);
	/* what kvtierd itself does with the newline */
	char out[16384];
	char *a4[] = {(char *)g_kvtierd, "--print-config", "--socket=/tmp/a\nworkers = 9", NULL};
	rc = run_kvtierd(a4, out, sizeof out);
	KVT_CHECK(rc == 1 && strstr(out, "socket") && strstr(out, "0x0a") &&
			  !strstr(out, "\nworkers = 9"),
		  "kvtierd --print-config with a newline in --socket: exit %d '%.300s'", rc, out);
	/* $RUNTIME_DIRECTORY shows in a comment of the socket line: it must stay a comment */
	char *rd = getenv("RUNTIME_DIRECTORY");
	char saved[512];
	snprintf(saved, sizeof saved, "%s", rd ? rd : "");
	setenv("RUNTIME_DIRECTORY", "/run/a\nbogus_option = 1 #", 1);
	check_print_reload(a0, 1, "", 0);
	check_print_reload(a0, 1, "", 1);
	if (rd)
		setenv("RUNTIME_DIRECTORY", saved, 1);
	else
		unsetenv("RUNTIME_DIRECTORY");
}

/* 1 when s holds a control byte (< 0x20 or 0x7f). */
/* something in s a terminal would act on (kvt_test_raw_unsafe: C0, DEL, C1, format
 * characters, broken UTF-8) */
static int has_ctl(const char *s)
{
	return kvt_test_raw_unsafe(s, 0) >= 0;
}

/* Messages quote user text with control bytes as \xNN: a value that is not a string, an
 * unknown option name, an argument or a file path went to stderr (and the journal) as is, so
 * `--workers=$'5\n'` split the message and `KVTIER_WORKERS=$'\e[2J'` cleared the screen. */
static void test_error_escapes(void)
{
	struct kvt_config c;
	char err[512] = "";
	struct {
		const char *arg, *want; /* want: in the message */
	} flags[] = {
		{"--workers=5\n", "command line: workers = \"5\\x0a\" is not a non-negative integer"},
		{"--max-message-bytes=1M\x1b[2J", "max_message_bytes = \"1M\\x1b[2J\" is not a size"},
		{"--default-pin-detect-ratio=0.5\x7f", "\"0.5\\x7f\" is not a number"},
		{"--log-level=info\r", "log_level = \"info\\x0d\" is not one of"},
		{"--insecure-loopback=yes\t", "insecure_loopback = \"yes\\x09\" is not a boolean"},
		{"--no\x1b[31mred=1", "unknown option \"--no\\x1b[31mred\""},
		{"x\ny", "unexpected argument \"x\\x0ay\""},
		/* a typed backslash is doubled: "\x0a" as typed reads apart from a newline */
		{"--workers=5\\x0a", "command line: workers = \"5\\\\x0a\" is not a non-negative"},
		/* as kvtierd's log and kvtierctl escape them (kvt_text): a C1 control (CSI), a
		 * bidi override, broken UTF-8, and a quote inside the message's quotes */
		{"--log-level=info\xc2\x9b" "2J", "log_level = \"info\\xc2\\x9b2J\" is not one of"},
		{"--log-level=\xe2\x80\xaeofni", "log_level = \"\\xe2\\x80\\xaeofni\" is not one of"},
		{"--workers=5\xff", "workers = \"5\\xff\" is not a non-negative integer"},
		{"--workers=5\"", "workers = \"5\\\"\" is not a non-negative integer"},
	};
	for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
		char *a[] = {"kvtierd", (char *)flags[i].arg, NULL};
		int rc = load(&c, err, sizeof err, 2, a);
		KVT_CHECK(rc == -EINVAL && !has_ctl(err) && strstr(err, flags[i].want),
			  "flag %zu: rc %d, want '%s' in '%s'", i, rc, flags[i].want, err);
	}
	char *a0[] = {"kvtierd", NULL};
	setenv("KVTIER_WORKERS", "\x1b[2J", 1);
	int rc = load(&c, err, sizeof err, 1, a0);
	unsetenv("KVTIER_WORKERS");
	KVT_CHECK(rc == -EINVAL && !has_ctl(err) &&
			  strstr(err, "environment KVTIER_WORKERS: workers = \"\\x1b[2J\""),
		  "escape in the environment: rc %d '%s'", rc, err);
	static const char f1[] = "workers = 3\nmax_sessions = 9\x01\n";
	rc = load_file_bytes("esc1.conf", f1, sizeof f1 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && !has_ctl(err) &&
			  strstr(err, "esc1.conf:2: max_sessions = \"9\\x01\""),
		  "control byte in a file value: rc %d '%s'", rc, err);
	static const char f2[] = "wor\x1b[Kkers = 3\n";
	rc = load_file_bytes("esc2.conf", f2, sizeof f2 - 1, &c, err, sizeof err);
	KVT_CHECK(rc == -EINVAL && !has_ctl(err) &&
			  strstr(err, "esc2.conf:1: unknown option \"wor\\x1b[Kkers\""),
		  "control byte in a file option name: rc %d '%s'", rc, err);
	/* the file's path is an argument too */
	char arg[400];
	snprintf(arg, sizeof arg, "--config=%s/a\nb.conf", g_tmp);
	char *a1[] = {"kvtierd", arg, NULL};
	rc = load(&c, err, sizeof err, 2, a1);
	KVT_CHECK(rc == -ENOENT && !has_ctl(err) && strstr(err, "/a\\x0ab.conf: "),
		  "newline in a missing file's path: rc %d '%s'", rc, err);
	/* what kvtierd prints: one line */
	char out[4096];
	char *a2[] = {(char *)g_kvtierd, "--check-config", "--workers=5\n\x1b[2J", NULL};
	rc = run_kvtierd(a2, out, sizeof out);
	size_t n = strlen(out);
	KVT_CHECK(rc == 1 && n && out[n - 1] == '\n' && strchr(out, '\n') == out + n - 1 &&
			  !strchr(out, '\x1b') && strstr(out, "\"5\\x0a\\x1b[2J\""),
		  "kvtierd --check-config --workers=5\\n\\e[2J: exit %d '%s'", rc, out);
}

/* Loads argv with a kvt_cmdline; NULL-terminated argv. */
static int load_cmd(struct kvt_config *c, struct kvt_cmdline *cmd, char *err, size_t errlen,
		    char **argv)
{
	int argc = 0;
	while (argv[argc])
		argc++;
	return kvt_config_load(c, argc, argv, cmd, NULL, err, errlen);
}

/* An argument read as an option's separate value is not also a flag: the first pass over
 * argv read `--socket --config=x` as a config file and the second as the socket "--config=x",
 * `--socket --print-config` printed, `--socket -c FILE` loaded FILE and then refused "FILE". */
static void test_argv_values(void)
{
	char good[300], bad[300], good_eq[320], bad_eq[320], err[512] = "";
	snprintf(good, sizeof good, "%s/argv-good.conf", g_tmp);
	snprintf(bad, sizeof bad, "%s/argv-bad.conf", g_tmp);
	snprintf(good_eq, sizeof good_eq, "--config=%s", good);
	snprintf(bad_eq, sizeof bad_eq, "--config=%s", bad);
	FILE *f = fopen(good, "w");
	KVT_REQUIRE(f && fputs("workers = 7\n", f) >= 0 && fclose(f) == 0, "write %s", good);
	f = fopen(bad, "w");
	KVT_REQUIRE(f && fputs("bogus_option = 1\n", f) >= 0 && fclose(f) == 0, "write %s", bad);
	struct kvt_config c;
	struct kvt_cmdline cmd;
	int rc;

	char *a1[] = {"kvtierd", "--socket", good_eq, NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a1);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, good_eq) && !cmd.config_file && c.workers == 0,
		  "--socket --config=FILE: rc %d '%s' socket '%s' config_file %s workers %llu", rc,
		  err, c.socket_path, cmd.config_file ? cmd.config_file : "(none)",
		  (unsigned long long)c.workers);
	char *a2[] = {"kvtierd", "--socket", "--print-config", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a2);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "--print-config") && !cmd.print_config,
		  "--socket --print-config: rc %d '%s' socket '%s' print %d", rc, err,
		  c.socket_path, cmd.print_config);
	char *a3[] = {"kvtierd", "--socket", "-c", bad, NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a3);
	KVT_CHECK(rc == -EINVAL && strstr(err, "unexpected argument") && strstr(err, bad) &&
			  !strstr(err, "bogus_option"),
		  "--socket -c FILE: the socket is \"-c\", FILE is an argument of its own: rc %d '%s'",
		  rc, err);
	char *a4[] = {"kvtierd", "--socket", "-c", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a4);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "-c") && !cmd.config_file,
		  "--socket -c: rc %d '%s' socket '%s'", rc, err, c.socket_path);
	char *a5[] = {"kvtierd", "-c", good, "--socket", "-n", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a5);
	KVT_CHECK(rc == 0 && cmd.config_file && !strcmp(cmd.config_file, good) && c.workers == 7 &&
			  !strcmp(c.socket_path, "-n") && !cmd.check_config,
		  "-c FILE --socket -n: rc %d '%s' socket '%s' check %d", rc, err, c.socket_path,
		  cmd.check_config);
	char *a6[] = {"kvtierd", "--config", good, "--socket", "--config", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a6);
	KVT_CHECK(rc == 0 && cmd.config_file && !strcmp(cmd.config_file, good) && c.workers == 7 &&
			  !strcmp(c.socket_path, "--config"),
		  "--config FILE --socket --config: rc %d '%s' socket '%s'", rc, err, c.socket_path);
	char *a7[] = {"kvtierd", "--listen-tcp", bad_eq, NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a7);
	KVT_CHECK(rc == -EINVAL && strstr(err, "listen_tcp") && !strstr(err, "bogus_option") &&
			  !cmd.config_file,
		  "--listen-tcp --config=BAD: the value is the address: rc %d '%s'", rc, err);
	char *a8[] = {"kvtierd", "--socket", "--help", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a8);
	KVT_CHECK(rc == 0 && !cmd.help && !strcmp(c.socket_path, "--help"),
		  "--socket --help: rc %d help %d socket '%s'", rc, cmd.help, c.socket_path);
	char *a9[] = {"kvtierd", "--workers", "--version", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a9);
	KVT_CHECK(rc == -EINVAL && !cmd.version && strstr(err, "workers") &&
			  strstr(err, "--version"),
		  "--workers --version: rc %d version %d '%s'", rc, cmd.version, err);
	/* a bool never takes the next argument: the flags after it stay flags */
	char *a10[] = {"kvtierd", "--gpu-enable", "-c", good, "--insecure-loopback", "--print-config",
		       NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a10);
	KVT_CHECK(rc == 0 && cmd.config_file && c.workers == 7 && c.gpu_enable == 1 &&
			  c.insecure_loopback == 1 && cmd.print_config,
		  "bools before -c FILE and --print-config: rc %d '%s'", rc, err);
	char *a11[] = {"kvtierd", "--socket=--config=x", "--cq-threads", "3", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a11);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "--config=x") && !cmd.config_file &&
			  c.cq_threads == 3,
		  "--socket=--config=x: rc %d '%s'", rc, err);
	/* and kvtierd itself: checks the configuration, does not print it */
	char out[16384];
	char *a12[] = {(char *)g_kvtierd, "--socket", "--print-config", "--check-config", NULL};
	rc = run_kvtierd(a12, out, sizeof out);
	KVT_CHECK(rc == 0 && strstr(out, "configuration OK") && !strstr(out, "socket ="),
		  "kvtierd --socket --print-config --check-config: exit %d '%.200s'", rc, out);
	unlink(good);
	unlink(bad);
}

/* "--" ends the options (POSIX): what follows is never read as a flag, and since kvtierd takes
 * no operands it is refused by name. "--" was read as an unknown option with an empty name. */
static void test_argv_end(void)
{
	struct kvt_config c;
	struct kvt_cmdline cmd;
	char err[512] = "";
	int rc;

	char *a1[] = {"kvtierd", "--workers=3", "--", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a1);
	KVT_CHECK(rc == 0 && c.workers == 3, "--workers=3 --: rc %d '%s'", rc, err);
	char *a2[] = {"kvtierd", "--", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a2);
	KVT_CHECK(rc == 0, "--: rc %d '%s'", rc, err);
	char *a3[] = {"kvtierd", "--", "--check-config", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a3);
	KVT_CHECK(rc == -EINVAL && !cmd.check_config &&
			  strstr(err, "unexpected argument \"--check-config\" after \"--\""),
		  "-- --check-config: rc %d check %d '%s'", rc, cmd.check_config, err);
	char *a4[] = {"kvtierd", "--", "--help", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a4);
	KVT_CHECK(rc == -EINVAL && !cmd.help && strstr(err, "\"--help\""),
		  "-- --help: rc %d help %d '%s'", rc, cmd.help, err);
	char *a5[] = {"kvtierd", "--", "-c", "/nonexistent", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a5);
	KVT_CHECK(rc == -EINVAL && !cmd.config_file && strstr(err, "\"-c\" after"),
		  "-- -c FILE: rc %d '%s'", rc, err);
	char *a6[] = {"kvtierd", "--", "x\ny", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a6);
	KVT_CHECK(rc == -EINVAL && strstr(err, "\"x\\x0ay\""), "-- x\\ny: rc %d '%s'", rc, err);
	char *a7[] = {"kvtierd", "--", "--", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a7);
	KVT_CHECK(rc == -EINVAL && strstr(err, "unexpected argument \"--\" after"),
		  "-- --: rc %d '%s'", rc, err);
	/* a value is read before "--" is looked for: `--socket --` sets the socket to "--" */
	char *a8[] = {"kvtierd", "--socket", "--", "--workers=2", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a8);
	KVT_CHECK(rc == 0 && !strcmp(c.socket_path, "--") && c.workers == 2,
		  "--socket -- --workers=2: rc %d '%s' socket '%s'", rc, err, c.socket_path);

	/* --help and --version answer without reading the rest of the configuration, but an
	 * argument after "--" is refused all the same: `kvtierd --help -- junk` printed the
	 * help and exited 0. */
	char *a12[] = {"kvtierd", "--help", "--", "junk", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a12);
	KVT_CHECK(rc == -EINVAL && strstr(err, "unexpected argument \"junk\" after \"--\""),
		  "--help -- junk: rc %d '%s'", rc, err);
	char *a13[] = {"kvtierd", "-h", "--", "--help", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a13);
	KVT_CHECK(rc == -EINVAL && strstr(err, "\"--help\" after"), "-h -- --help: rc %d '%s'",
		  rc, err);
	char *a14[] = {"kvtierd", "--version", "--", "x\ny", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a14);
	KVT_CHECK(rc == -EINVAL && strstr(err, "\"x\\x0ay\""), "--version -- x\\ny: rc %d '%s'",
		  rc, err);
	char *a15[] = {"kvtierd", "--help", "--", NULL};
	rc = load_cmd(&c, &cmd, err, sizeof err, a15);
	KVT_CHECK(rc == 0 && cmd.help, "--help --: rc %d help %d '%s'", rc, cmd.help, err);

	/* kvtierd itself: a usage error exits 1 like the others */
	char out[16384];
	char *a9[] = {(char *)g_kvtierd, "--check-config", "--", NULL};
	rc = run_kvtierd(a9, out, sizeof out);
	KVT_CHECK(rc == 0 && strstr(out, "configuration OK"), "kvtierd --check-config --: exit %d "
		  "'%.200s'", rc, out);
	char *a10[] = {(char *)g_kvtierd, "--check-config", "--", "extra", NULL};
	rc = run_kvtierd(a10, out, sizeof out);
	KVT_CHECK(rc == 1 && strstr(out, "unexpected argument \"extra\" after \"--\""),
		  "kvtierd --check-config -- extra: exit %d '%.200s'", rc, out);
	char *a11[] = {(char *)g_kvtierd, "--", "--version", NULL};
	rc = run_kvtierd(a11, out, sizeof out);
	KVT_CHECK(rc == 1 && !strstr(out, "0.1") && strstr(out, "\"--version\""),
		  "kvtierd -- --version: exit %d '%.200s'", rc, out);
	char *a16[] = {(char *)g_kvtierd, "--help", "--", "junk", NULL};
	rc = run_kvtierd(a16, out, sizeof out);
	KVT_CHECK(rc == 1 && !strstr(out, "usage:") &&
			  strstr(out, "unexpected argument \"junk\" after \"--\""),
		  "kvtierd --help -- junk: exit %d '%.200s'", rc, out);
	char *a17[] = {(char *)g_kvtierd, "--version", "--", "junk", NULL};
	rc = run_kvtierd(a17, out, sizeof out);
	KVT_CHECK(rc == 1 && !strstr(out, "0.1") && strstr(out, "\"junk\""),
		  "kvtierd --version -- junk: exit %d '%.200s'", rc, out);
	char *a18[] = {(char *)g_kvtierd, "--help", "--", NULL};
	rc = run_kvtierd(a18, out, sizeof out);
	KVT_CHECK(rc == 0 && strstr(out, "usage:"), "kvtierd --help --: exit %d '%.200s'", rc,
		  out);
}

/* Doubles print with every digit they need: "%g" printed 0.1234567 as 0.123457, so
 * --print-config showed (and reloaded) another value, and a SIGHUP that changed the 7th digit
 * was not applied (kvt_config_apply_reload compares the printed values). */
static void test_print_double(void)
{
	struct kvt_config c, next;
	char err[512] = "";
	char *a1[] = {"kvtierd", "--default-pin-detect-ratio=0.1234567", NULL};
	int rc = load(&c, err, sizeof err, 2, a1);
	KVT_REQUIRE(rc == 0, "load: %s", err);
	char *text = NULL;
	size_t len = 0;
	FILE *m = open_memstream(&text, &len);
	KVT_REQUIRE(m != NULL, "open_memstream");
	kvt_config_print(m, &c, NULL);
	fclose(m);
	KVT_CHECK(strstr(text, "\ndefault_pin_detect_ratio = 0.1234567\n") != NULL,
		  "printed: %.40s", strstr(text, "default_pin_detect_ratio"));
	KVT_CHECK(strstr(text, "\nhost_capacity_bytes = 4GiB\n") != NULL, "sizes unchanged");
	free(text);
	char *a2[] = {"kvtierd", "--default-pin-detect-ratio=0.5", NULL};
	rc = load(&next, err, sizeof err, 2, a2);
	m = open_memstream(&text, &len);
	KVT_REQUIRE(rc == 0 && m, "load 0.5: %s", err);
	kvt_config_print(m, &next, NULL);
	fclose(m);
	KVT_CHECK(strstr(text, "\ndefault_pin_detect_ratio = 0.5\n") != NULL, "short values stay "
		  "short: %.40s", strstr(text, "default_pin_detect_ratio"));
	free(text);
	char *a3[] = {"kvtierd", "--default-pin-detect-ratio=0.1234568", NULL};
	rc = load(&next, err, sizeof err, 2, a3);
	KVT_REQUIRE(rc == 0, "load: %s", err);
	kvt_log_set_level(KVT_LOG_ERROR); /* the reload logs each change at info */
	kvt_config_live = c;
	int changed = kvt_config_apply_reload(&next);
	kvt_log_set_level(KVT_LOG_INFO);
	KVT_CHECK(changed == 1 && kvt_config_live.default_pin_detect_ratio == 0.1234568,
		  "a reload changing the 7th digit: %d changed, live %.17g", changed,
		  kvt_config_live.default_pin_detect_ratio);
}

/* Runs kvtierd with args; its exit status and output (kvt_test_run_capture). */
static int run_kvtierd(char *const args[], char *out, size_t outlen)
{
	return kvt_test_run_capture(g_kvtierd, args, out, outlen);
}

static void test_cli(void)
{
	char out[16384];
	char *a1[] = {(char *)g_kvtierd, "--check-config", NULL};
	KVT_CHECK(run_kvtierd(a1, out, sizeof out) == 0 && strstr(out, "OK"), "check ok: %s", out);
	char *a2[] = {(char *)g_kvtierd, "--check-config", "--max-message-bytes=1K", NULL};
	KVT_CHECK(run_kvtierd(a2, out, sizeof out) == 1 && strstr(out, "max_message_bytes") &&
			  strstr(out, "256KiB..64MiB"),
		  "check bad: %s", out);
	char *a3[] = {(char *)g_kvtierd, "--print-config", "--cq-threads=5", NULL};
	KVT_CHECK(run_kvtierd(a3, out, sizeof out) == 0 && strstr(out, "cq_threads = 5  # flag") &&
			  strstr(out, "max_message_bytes = 4MiB  # default"),
		  "print: %s", out);
	char *a4[] = {(char *)g_kvtierd, "--help", NULL};
	int rc = run_kvtierd(a4, out, sizeof out);
	KVT_CHECK(rc == 0, "help exit %d", rc);
	for (size_t i = 0; i < kvt_config_n_options(); i++) {
		char flag[80];
		snprintf(flag, sizeof flag, "--%s", kvt_config_option_name(i));
		for (char *p = flag + 2; *p; p++)
			if (*p == '_')
				*p = '-';
		KVT_CHECK(strstr(out, flag) != NULL, "--help lists %s", flag);
	}
}

int main(int argc, char **argv)
{
	kvt_test_init();
	g_kvtierd = argc > 1 ? argv[1] : "kvtierd";
	snprintf(g_tmp, sizeof g_tmp, "/tmp/kvt-config-XXXXXX");
	if (!mkdtemp(g_tmp)) {
		perror("mkdtemp");
		return 1;
	}
	KVT_RUN(test_defaults);
	KVT_RUN(test_bounds);
	KVT_RUN(test_tcp_rules);
	KVT_RUN(test_source_order);
	KVT_RUN(test_file_read_error);
	KVT_RUN(test_file_nul);
	KVT_RUN(test_file_quotes);
	KVT_RUN(test_print_double);
	KVT_RUN(test_print_strings);
	KVT_RUN(test_string_controls);
	KVT_RUN(test_error_escapes);
	KVT_RUN(test_argv_values);
	KVT_RUN(test_argv_end);
	KVT_RUN(test_cli);
	rmdir(g_tmp);
	return kvt_test_done();
}

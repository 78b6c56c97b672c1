/* kvtierctl's messages quote the user's text (flag values, ids, paths, the target) the way
 * kvtierd's log does: a control byte, an escape sequence, a C1 control or broken UTF-8 shows as
 * \xNN and never reaches the terminal raw. Every case fails before kvtierctl connects (or
 * asks health of a socket that does not exist), so no daemon is needed.
 * Usage: test_kvtierctl PATH_TO_KVTIERCTL */
#include <stdio.h>
#include <string.h>

#include "kvt_test.h"
#include "kvt_test_proc.h"
#include "kvt_test_text.h"

static const char *g_ctl;

/* Runs kvtierctl with args; its exit status and output (kvt_test_run_capture). */
static int run_ctl(char *const args[], char *out, size_t outlen)
{
	return kvt_test_run_capture(g_ctl, args, out, outlen);
}

struct ctl_case {
	const char *args[10]; /* after argv[0], NULL-terminated */
	int exit_code;
	const char *want;     /* in the output, escaped */
};

static void test_escapes(void)
{
	static const struct ctl_case cases[] = {
		/* a value printed bare is quoted once it needs escapes */
		{{"put", "s", "--scheme", "\x1b[31mred", NULL}, 2,
		 "--scheme \"\\x1b[31mred\" is not none"},
		{{"put", "s", "--key-rounding", "\xc2\x9b" "2J", NULL}, 2,
		 "--key-rounding \"\\xc2\\x9b2J\" is not"},
		{{"put", "s", "--dtype", "x\ny", NULL}, 2, "--dtype \"x\\x0ay\" is not"},
		{{"demo", "--dtype", "\xff", NULL}, 2, "--dtype \"\\xff\" is not"},
		{{"\x1b]0;title\a", NULL}, 2, "unknown command \"\\x1b]0;title\\x07\""},
		/* a format character: U+202E RIGHT-TO-LEFT OVERRIDE, U+2066 LRI */
		{{"put", "s", "--scheme", "a\xe2\x80\xae" "b\xe2\x81\xa6", NULL}, 2,
		 "--scheme \"a\\xe2\\x80\\xaeb\\xe2\\x81\\xa6\" is not"},
		/* inside the message's own quotes: escaped, '"' and '\\' with a backslash */
		{{"put", "s", "--key-bits", "1\x1b", NULL}, 2, "put --key-bits \"1\\x1b\": expected"},
		{{"put", "s", "--key-bits", "a\"b\\", NULL}, 2, "put --key-bits \"a\\\"b\\\\\": expected"},
		{{"--timeout-ms", "\x85", "health", NULL}, 2, "--timeout-ms \"\\x85\": expected"},
		{{"get", "s", "--out-k", "k.npy", "--tokens", "1:\x1b[2J", NULL}, 2,
		 "get --tokens \"1:\\x1b[2J\": expected A:B"},
		/* sentences that carry user text: the .npy reader's error, the preset's, libkvtier's */
		{{"put", "s", "--k", "/nonexistent/\x1b[2J.npy", "--v", "v.npy", NULL}, 1,
		 "/nonexistent/\\x1b[2J.npy: "},
		{{"put", "s", "--preset", "\x1b[1m", NULL}, 2, "--preset '\\x1b[1m' is not"},
		{{"--target", "unix:/nonexistent/\x1b[2J", "health", NULL}, 1,
		 "NOT REACHABLE \"unix:/nonexistent/\\x1b[2J\": "},
	};
	char out[8192];
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const struct ctl_case *c = &cases[i];
		char *args[12] = {(char *)g_ctl};
		for (size_t j = 0; c->args[j]; j++)
			args[j + 1] = (char *)c->args[j];
		int rc = run_ctl(args, out, sizeof out);
		long bad = kvt_test_raw_unsafe(out, 1);
		KVT_CHECK(rc == c->exit_code, "case %zu: exit %d, expected %d: '%s'", i, rc,
			  c->exit_code, out);
		KVT_CHECK(bad < 0, "case %zu: a byte a terminal acts on, 0x%02x at offset %ld of the "
			  "output (expected '%s')", i, bad < 0 ? 0 : (unsigned char)out[bad], bad,
			  c->want);
		KVT_CHECK(strstr(out, c->want) != NULL, "case %zu: '%s' not in the output '%s'", i,
			  c->want, bad < 0 ? out : "(raw bytes, not shown)");
	}
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s PATH_TO_KVTIERCTL\n", argv[0]);
		return 2;
	}
	g_ctl = argv[1];
	kvt_test_init();
	KVT_RUN(test_escapes);
	return kvt_test_done();
}

/* Unit tests of kvt_log_quote: what a log value may carry to a terminal or the journal (no
 * control byte, no C1 control, no broken UTF-8), and cutting short safely. */
#include <stdio.h>
#include <string.h>

#include "kvt_test.h"
#include "kvt_test_text.h"
#include "kvt_text.h"
#include "log.h"

static void check_eq(const char *in, const char *want)
{
	char buf[256];
	kvt_log_quote(buf, sizeof buf, in);
	KVT_CHECK(!strcmp(buf, want), "quote of %zu bytes: got '%s' want '%s'", strlen(in), buf,
		  want);
}

static void test_values(void)
{
	check_eq("plain", "plain");
	check_eq("", "\"\"");
	check_eq("a b", "\"a b\"");
	check_eq("k=v", "\"k=v\"");
	check_eq("say \"hi\"", "\"say \\\"hi\\\"\"");
	check_eq("a\\b", "\"a\\\\b\"");
	/* control bytes as \xNN, as config errors quote them (a newline included) */
	check_eq("x\ny", "\"x\\x0ay\"");
	check_eq("\x1b[2J", "\"\\x1b[2J\"");
	check_eq("tab\there", "\"tab\\x09here\"");
	check_eq("del\x7f", "\"del\\x7f\"");
	check_eq("\x7f", "\"\\x7f\"");
	/* C1 controls (U+0080..U+009F): CSI 0x9b acts like ESC [ on many terminals */
	check_eq("\xc2\x9b" "2J", "\"\\xc2\\x9b2J\"");
	check_eq("nel\xc2\x85", "\"nel\\xc2\\x85\"");
	check_eq("\xc2\x80", "\"\\xc2\\x80\"");
	check_eq("\xc2\x9f", "\"\\xc2\\x9f\"");
	/* well-formed UTF-8 passes unchanged, unquoted when nothing else asks for quotes */
	check_eq("\xc2\xa0", "\xc2\xa0"); /* U+00A0, just after the C1 block */
	check_eq("caf\xc3\xa9", "caf\xc3\xa9");
	check_eq("\xe2\x82\xac 5", "\"\xe2\x82\xac 5\"");
	check_eq("\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80");
	check_eq("\xf4\x8f\xbf\xbf", "\xf4\x8f\xbf\xbf"); /* U+10FFFF */
	check_eq("\xed\x9f\xbf", "\xed\x9f\xbf");         /* U+D7FF */
	/* a continuation byte alone (0x80..0x9f included) is not a C1 control: \xNN all the same */
	check_eq("\x85", "\"\\x85\"");
	check_eq("a\x9b" "b", "\"a\\x9bb\"");
	check_eq("\xc2", "\"\\xc2\"");
	check_eq("\xc2" "A", "\"\\xc2A\"");
	check_eq("\xe2\x82", "\"\\xe2\\x82\"");
	check_eq("\xe2\x82" "A", "\"\\xe2\\x82A\"");
	check_eq("\xc0\x80", "\"\\xc0\\x80\"");         /* overlong NUL */
	check_eq("\xc1\xbf", "\"\\xc1\\xbf\"");         /* overlong */
	check_eq("\xe0\x80\xaf", "\"\\xe0\\x80\\xaf\"");  /* overlong '/' */
	check_eq("\xf0\x80\x80\xaf", "\"\\xf0\\x80\\x80\\xaf\"");
	check_eq("\xed\xa0\x80", "\"\\xed\\xa0\\x80\"");  /* a surrogate */
	check_eq("\xf4\x90\x80\x80", "\"\\xf4\\x90\\x80\\x80\""); /* above U+10FFFF */
	check_eq("\xf5\x80\x80\x80", "\"\\xf5\\x80\\x80\\x80\"");
	check_eq("\xff", "\"\\xff\"");
	check_eq("\xc3\xa9\x85\xc3\xa9", "\"\xc3\xa9\\x85\xc3\xa9\"");
	/* Unicode format characters and separators, each byte as \xNN: U+202E RIGHT-TO-LEFT
	 * OVERRIDE made "user=\u202eevil" display reversed, U+2028 broke a line in viewers */
	check_eq("user\xe2\x80\xae" "evil", "\"user\\xe2\\x80\\xaeevil\"");
	check_eq("\xe2\x80\x8b", "\"\\xe2\\x80\\x8b\"");   /* U+200B ZERO WIDTH SPACE */
	check_eq("\xe2\x80\x8f", "\"\\xe2\\x80\\x8f\"");   /* U+200F RLM */
	check_eq("\xe2\x80\xa8", "\"\\xe2\\x80\\xa8\"");   /* U+2028 LINE SEPARATOR */
	check_eq("\xe2\x80\xa9", "\"\\xe2\\x80\\xa9\"");   /* U+2029 PARAGRAPH SEPARATOR */
	check_eq("\xe2\x80\xaa", "\"\\xe2\\x80\\xaa\"");   /* U+202A LRE */
	check_eq("\xe2\x81\xa6", "\"\\xe2\\x81\\xa6\"");   /* U+2066 LRI */
	check_eq("\xe2\x81\xa9", "\"\\xe2\\x81\\xa9\"");   /* U+2069 PDI */
	check_eq("\xe2\x81\xa0", "\"\\xe2\\x81\\xa0\"");   /* U+2060 WORD JOINER */
	check_eq("\xef\xbb\xbf" "x", "\"\\xef\\xbb\\xbfx\""); /* U+FEFF BOM */
	check_eq("\xd8\x9c", "\"\\xd8\\x9c\"");             /* U+061C ARABIC LETTER MARK */
	check_eq("\xc2\xad", "\"\\xc2\\xad\"");             /* U+00AD SOFT HYPHEN */
	check_eq("\xf3\xa0\x81\x81", "\"\\xf3\\xa0\\x81\\x81\""); /* U+E0041 TAG A */
	check_eq("\xf3\xa0\x80\x81", "\"\\xf3\\xa0\\x80\\x81\""); /* U+E0001 LANGUAGE TAG */
	/* their neighbours are ordinary characters and pass */
	check_eq("\xe2\x80\x8a", "\xe2\x80\x8a"); /* U+200A HAIR SPACE */
	check_eq("\xe2\x80\x90", "\xe2\x80\x90"); /* U+2010 HYPHEN */
	check_eq("\xe2\x80\xa7", "\xe2\x80\xa7"); /* U+2027 HYPHENATION POINT */
	check_eq("\xe2\x80\xaf", "\xe2\x80\xaf"); /* U+202F NARROW NO-BREAK SPACE */
	check_eq("\xe2\x81\xb0", "\xe2\x81\xb0"); /* U+2070 SUPERSCRIPT ZERO */
	check_eq("\xef\xbb\xbc", "\xef\xbb\xbc"); /* U+FEFC */
	check_eq("\xc2\xac", "\xc2\xac");           /* U+00AC NOT SIGN */
	check_eq("\xf3\xa0\x84\x80", "\xf3\xa0\x84\x80"); /* U+E0100 VARIATION SELECTOR-17 */
}

/* The boundaries of the units of a quoted value's content (no quotes): an escape, or one
 * UTF-8 sequence; the escapes of one well-formed sequence (a C1 control, a format character)
 * are one unit. Marks bound[i] = 1 at each. */
static void unit_bounds(const char *c, size_t n, unsigned char *bound)
{
	memset(bound, 0, n + 1);
	size_t i = 0;
	while (i < n) {
		bound[i] = 1;
		size_t w = 1;
		if (c[i] == '\\' && c[i + 1] == 'x') {
			/* the bytes of the run of \xNN escapes here, up to a sequence's 4 */
			unsigned char b[5] = {0};
			unsigned v;
			size_t k = 0, len;
			while (k < 4 && i + 4 * k + 4 <= n && !strncmp(c + i + 4 * k, "\\x", 2) &&
			       sscanf(c + i + 4 * k + 2, "%2x", &v) == 1)
				b[k++] = (unsigned char)v;
			w = kvt_test_decode_utf8(b, &len) >= 0 && len <= k ? 4 * len : 4;
		} else if (c[i] == '\\') {
			w = 2;
		} else {
			kvt_test_decode_utf8((const unsigned char *)c + i, &w);
		}
		i += w;
	}
	bound[n] = 1;
}

/* For every length from 0 to past the full value: NUL-terminated inside len, a quoted value
 * closed, the content a prefix of the full one cut at a unit boundary, and nothing a terminal
 * acts on. */
static void check_cuts(const char *in)
{
	char full[1024], buf[1024];
	unsigned char bound[1024];
	kvt_log_quote(full, sizeof full, in);
	size_t fl = strlen(full);
	int quoted = full[0] == '"';
	const char *fc = full + quoted;
	size_t fcl = fl - 2 * (size_t)quoted;
	unit_bounds(fc, fcl, bound);
	for (size_t len = 0; len <= fl + 2; len++) {
		memset(buf, 'Z', sizeof buf);
		kvt_log_quote(buf, len, in);
		if (len == 0) {
			KVT_CHECK(buf[0] == 'Z', "len 0 wrote into buf");
			continue;
		}
		size_t bl = strnlen(buf, len);
		KVT_REQUIRE(bl < len, "len %zu: not NUL-terminated", len);
		KVT_CHECK(buf[len] == 'Z' || len == sizeof buf, "len %zu: wrote past len", len);
		if (len > fl) {
			KVT_CHECK(!strcmp(buf, full), "len %zu: '%s' != '%s'", len, buf, full);
			continue;
		}
		if (quoted && len < 3) {
			KVT_CHECK(bl == 0, "len %zu: '%s' (no room for quotes)", len, buf);
			continue;
		}
		if (quoted) {
			int closed = bl >= 2 && buf[0] == '"' && buf[bl - 1] == '"';
			KVT_CHECK(closed, "len %zu: quotes not closed: '%s'", len, buf);
			if (!closed)
				continue;
		}
		size_t cl = bl - 2 * (size_t)quoted;
		KVT_CHECK(cl <= fcl && !memcmp(buf + quoted, fc, cl) && bound[cl],
			  "len %zu: '%s' is not '%s' cut at a unit", len, buf, full);
	}
	/* nothing raw that a terminal acts on; every byte >= 0x80 in a well-formed sequence */
	const unsigned char *p = (const unsigned char *)full;
	while (*p) {
		size_t w;
		long cp = kvt_test_decode_utf8(p, &w);
		KVT_REQUIRE(kvt_test_shown_raw_ok(cp),
			    "'%s' holds code point %ld (-1: broken UTF-8) raw at %zu", full, cp,
			    (size_t)(p - (const unsigned char *)full));
		p += w;
	}
}

static void test_cuts(void)
{
	static const char *const vals[] = {
		"plain", "", "a b", "say \"hi\" \\ there", "x\ny\x7fz", "\xc2\x85\xc2\x85",
		"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "\x85\xc2\xe2\x82" "A\xf4\x90\x80\x80",
		"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9", "\xf0\x9f\x98\x80\xf0\x9f\x98\x80",
		"a\xe2\x80\xae" "b\xe2\x81\xa6\xef\xbb\xbf\xf3\xa0\x81\x81\xe2\x80\xa8",
		"\xe2\x80\x8b\xe2\x80\x8a\xc2\xad\xc2\xac",
	};
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
		check_cuts(vals[i]);
	/* fresh random bytes, biased towards the interesting ones */
	static const unsigned char pick[] = {0x00, 0x0a, 0x1b, 0x20, '"', '=', '\\', 'a', 0x7f,
					     0x80, 0x81, 0x85, 0x9b, 0x9f, 0xa0, 0xa8, 0xad, 0xae,
					     0xbb, 0xbf, 0xc0, 0xc2, 0xc3, 0xdf, 0xe0, 0xe2, 0xed,
					     0xef, 0xf0, 0xf3, 0xf4, 0xf5, 0xff};
	char s[64];
	for (int it = 0; it < 3000; it++) {
		size_t n = kvt_rand_below(sizeof s - 1);
		for (size_t i = 0; i < n; i++) {
			s[i] = (char)(kvt_rand_below(2) ? pick[kvt_rand_below(sizeof pick)]
							: kvt_rand_below(256));
			if (!s[i])
				s[i] = 'x';
		}
		s[n] = '\0';
		check_cuts(s);
	}
}

/* kvt_text_escape, the core kvtierctl uses apart from the logfmt quoting: with
 * KVT_TEXT_BACKSLASH for a value inside the caller's quotes, without for a sentence that holds
 * its own (the daemon's "session \"x\" not found"), the same \xNN escapes either way. */
static void test_escape_flags(void)
{
	static const struct {
		const char *in, *plain, *backslash;
	} cases[] = {
		{"say \"hi\" \\ ok", "say \"hi\" \\ ok", "say \\\"hi\\\" \\\\ ok"},
		{"a\x1b[2Jb\n", "a\\x1b[2Jb\\x0a", "a\\x1b[2Jb\\x0a"},
		{"\xc2\x9b\xff caf\xc3\xa9", "\\xc2\\x9b\\xff caf\xc3\xa9",
		 "\\xc2\\x9b\\xff caf\xc3\xa9"},
		{"", "", ""},
	};
	char buf[128];
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		kvt_text_escape(buf, sizeof buf, cases[i].in, 0);
		KVT_CHECK(!strcmp(buf, cases[i].plain), "case %zu: '%s' want '%s'", i, buf,
			  cases[i].plain);
		kvt_text_escape(buf, sizeof buf, cases[i].in, KVT_TEXT_BACKSLASH);
		KVT_CHECK(!strcmp(buf, cases[i].backslash), "case %zu: '%s' want '%s'", i, buf,
			  cases[i].backslash);
	}
	/* cut before an escape, never inside: "ab" and the NUL fit in 6, "\x1b" does not */
	KVT_CHECK(!strcmp(kvt_text_escape(buf, 6, "ab\x1b", 0), "ab"), "cut: '%s'", buf);
	KVT_CHECK(!strcmp(kvt_text_escape(buf, 7, "ab\x1b", 0), "ab\\x1b"), "fit: '%s'", buf);
	memset(buf, 'Z', sizeof buf);
	kvt_text_escape(buf, 0, "ab", 0);
	KVT_CHECK(buf[0] == 'Z', "len 0 wrote into buf");
	/* kvt_text_escape_n (config.c's messages: a name out of a longer argument): at most n
	 * bytes of the input, a sequence that would reach past them left out whole */
	static const struct {
		const char *in;
		size_t n;
		const char *want;
	} bounded[] = {
		{"ab\ncd", 3, "ab\\x0a"},
		{"ab\ncd", 0, ""},
		{"a\xe2\x80\xae!", 3, "a"},
		{"a\xe2\x80\xae!", 4, "a\\xe2\\x80\\xae"},
		{"caf\xc3\xa9s", 4, "caf"},
		{"caf\xc3\xa9s", 5, "caf\xc3\xa9"},
		{"q\"x", SIZE_MAX, "q\\\"x"},
	};
	for (size_t i = 0; i < sizeof bounded / sizeof bounded[0]; i++) {
		kvt_text_escape_n(buf, sizeof buf, bounded[i].in, bounded[i].n, KVT_TEXT_BACKSLASH);
		KVT_CHECK(!strcmp(buf, bounded[i].want), "bounded %zu: '%s' want '%s'", i, buf,
			  bounded[i].want);
	}
}

int main(void)
{
	kvt_test_init();
	KVT_RUN(test_values);
	KVT_RUN(test_escape_flags);
	KVT_RUN(test_cuts);
	return kvt_test_done();
}

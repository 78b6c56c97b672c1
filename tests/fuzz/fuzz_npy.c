/*
 * fuzz_npy.c - deterministic mutation fuzzing of the .npy parser and readers (client/kvt_npy.c).
 * kvtierctl put and kvtier-bench fidelity read .npy files a user hands them, so every byte of
 * one is untrusted input.
 *
 * Each iteration generates a valid file the way a numpy could have written it: version 1.0,
 * 2.0 or 3.0; descr '<f2', '<f4', '<f8' (sometimes '|' or '=' byte order); rank 0..8 with dims
 * mostly small, some 0, and some large (up to 2^40) where a 0 dim keeps the data empty; the
 * keys in any order, either quote style, random spacing and padding, a trailing comma or not;
 * random data bytes. Most iterations then mutate it, either in the header text (the file is
 * then laid out again with the right header length, so the mutation reaches the parser): a
 * dim replaced by a huge, negative, signed, zero-padded, overflowing or non-decimal token, a
 * shape whose product overflows, keys duplicated, dropped, renamed or hidden in a value,
 * fortran_order and descr variants, broken structure, random characters; or in the bytes:
 * bit flips, byte sets, truncation, appended junk, the header length field, the version.
 * Oracles:
 *   - an unmutated file is accepted by kvt_npy_parse_header, kvt_npy_read (f2 and f4; f8 is
 *     refused with a message) and kvt_npy_read_f32 with exactly the generated version, descr,
 *     shape and data (read_f32: the data converted to f32, NaN for NaN);
 *   - a header mutation the format rules refuse (the ones marked "must reject" below) is
 *     refused by all three;
 *   - a refusal returns a negative errno, a non-empty message that fits the error buffer,
 *     and leaves data NULL;
 *   - an accepted file has ndim <= 8, and the product of its shape (computed here with
 *     overflow checks) times the element size equals the data bytes, which equal the file's
 *     size less the data offset its preamble announces; the data is the file's bytes there
 *     (read_f32: their conversion); kvt_npy_write of it reads back the same;
 *   - parse_header and the readers agree: a header the parser refuses is refused by both
 *     readers, one it accepts with the right data size is accepted (read: unless f8), and all
 *     three report the same header fields;
 *   - nothing reads or writes outside its buffer (run under ASan + UBSan: tests/sanitize.sh):
 *     the parser gets the file in a buffer of exactly its length, error buffers have their
 *     exact sizes (sometimes tiny or absent).
 * Every iteration draws from its own stream of (run seed, iteration), so KVT_SEED=<s>
 * KVT_FUZZ_ITER=<i> replays iteration i alone and prints the file's header. The default run
 * is a fixed number of iterations (a few seconds); KVT_FUZZ_ITERS=<n> or KVT_FUZZ_SECONDS=<s>
 * run longer.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz_ctx.h"
#include "kvt_codec.h"
#include "kvt_npy.h"
#include "kvt_test.h"

#define DEFAULT_ITERS 15000u
#define MAX_FAILING_ITERS 20
#define MAX_DATA_ELEMS 2048u     /* elements of a generated file: a read costs microseconds */
#define MAX_PAIRS 8
#define MAX_TOKS 14              /* shape tokens: 8 dims, more after a "too many" mutation */
#define TEXT_CAP 8192
#define FILE_CAP (16 + TEXT_CAP + 256 + MAX_DATA_ELEMS * 8 + 512)

static bool verbose;

static void *xalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p) {
		printf("# out of memory (%zu bytes)\n", n);
		abort();
	}
	return p;
}

/* ---- Randomness ------------------------------------------------------------------------- */

enum { STREAM_ITER = 1 };

static uint32_t rb(uint32_t n) { return kvt_rand_below(n); }
static bool coin(uint32_t n) { return kvt_rand_below(n) == 0; }
#define PICK(arr) (arr[rb((uint32_t)(sizeof(arr) / sizeof(arr[0])))])

/* ---- A generated file: the header as parts, then laid out ------------------------------- */

enum pair_kind { P_LITERAL, P_SHAPE };

struct pair {
	char key[96];   /* as written, quotes included */
	char val[1200]; /* as written (P_LITERAL) */
	enum pair_kind kind;
};

struct gen {
	/* what the file means */
	uint32_t version, esize, ndim;
	char descr[4];
	uint64_t shape[KVT_NPY_MAX_DIMS], count;
	uint8_t data[MAX_DATA_ELEMS * 8];
	size_t data_bytes;
	/* how its header is written */
	struct pair pairs[MAX_PAIRS];
	uint32_t n_pairs;
	char tok[MAX_TOKS][48]; /* the shape's items as written */
	uint32_t n_tok;
	bool tuple_comma, dict_comma;
	uint32_t pad_style;
};

struct text {
	char s[TEXT_CAP];
	size_t n;
};

static void tput(struct text *t, const char *s)
{
	size_t n = strlen(s);
	if (t->n + n < TEXT_CAP) {
		memcpy(t->s + t->n, s, n);
		t->n += n;
		t->s[t->n] = 0; /* kept NUL-terminated for the str* searches of mut_structure */
	}
}

/* Replaces t[off, off + len) with s. */
static void tsplice(struct text *t, size_t off, size_t len, const char *s, size_t sn)
{
	if (off > t->n || len > t->n - off || t->n - len + sn >= TEXT_CAP)
		return;
	memmove(t->s + off + sn, t->s + off + len, t->n - off - len);
	memcpy(t->s + off, s, sn);
	t->n = t->n - len + sn;
	t->s[t->n] = 0;
}

/* Spacing between tokens: mostly what numpy writes, sometimes more. */
static const char *sp(void)
{
	static const char *const s[] = { "", "", "", "", " ", " ", "  ", "   " };
	return PICK(s);
}

static const char *quote(void) { return coin(4) ? "\"" : "'"; }

static void quoted(char *buf, size_t cap, const char *s)
{
	const char *q = quote();
	snprintf(buf, cap, "%s%s%s", q, s, q);
}

static void render_shape(const struct gen *g, struct text *t)
{
	tput(t, "(");
	tput(t, sp());
	for (uint32_t i = 0; i < g->n_tok; i++) {
		tput(t, g->tok[i]);
		if (i + 1 < g->n_tok || g->tuple_comma) {
			tput(t, sp());
			tput(t, ",");
			tput(t, coin(3) ? sp() : " ");
		}
	}
	tput(t, sp());
	tput(t, ")");
}

/* The dict text, no padding. */
static void render_dict(const struct gen *g, struct text *t)
{
	t->n = 0;
	t->s[0] = 0;
	tput(t, "{");
	tput(t, sp());
	for (uint32_t i = 0; i < g->n_pairs; i++) {
		const struct pair *p = &g->pairs[i];
		tput(t, p->key);
		tput(t, sp());
		tput(t, ":");
		tput(t, coin(3) ? sp() : " ");
		if (p->kind == P_SHAPE)
			render_shape(g, t);
		else
			tput(t, p->val);
		if (i + 1 < g->n_pairs || g->dict_comma) {
			tput(t, sp());
			tput(t, ",");
			tput(t, coin(3) ? sp() : " ");
		}
	}
	tput(t, sp());
	tput(t, "}");
}

/* Preamble, dict text, padding and '\n', data: the whole file in out. */
static size_t lay_out(const struct gen *g, const struct text *dict, uint8_t *out)
{
	const size_t pre = g->version == 1 ? 10 : 12;
	size_t pad = 0, h = dict->n + 1;
	switch (g->pad_style) {
	case 0: /* numpy >= 1.9: data 64-byte aligned */
		pad = (64 - (pre + h) % 64) % 64;
		break;
	case 1: /* older numpy: 16-byte aligned */
		pad = (16 - (pre + h) % 16) % 16;
		break;
	case 2:
		pad = rb(80);
		break;
	default:
		pad = 0;
	}
	h += pad;
	memcpy(out, "\x93NUMPY", 6);
	out[6] = (uint8_t)g->version;
	out[7] = 0;
	for (size_t i = 0; i < pre - 8; i++)
		out[8 + i] = (uint8_t)(h >> (8 * i));
	memcpy(out + pre, dict->s, dict->n);
	memset(out + pre + dict->n, ' ', pad);
	out[pre + h - 1] = '\n';
	memcpy(out + pre + h, g->data, g->data_bytes);
	return pre + h + g->data_bytes;
}

static const uint64_t big_dims[] = {
	1ull << 40, (1ull << 40) - 1, 1ull << 32, (1ull << 32) - 1, (1ull << 32) + 1, 1ull << 31,
	65536, 1000000000000ull, 999999999999ull, 123456789,
};

static void gen_file(struct gen *g)
{
	static const uint32_t ranks[] = { 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 6, 7, 8 };
	static const char orders[] = { '<', '<', '<', '<', '<', '<', '|', '=' };

	memset(g, 0, sizeof(*g));
	g->version = coin(3) ? 2 + rb(2) : 1;
	g->esize = 2u << rb(3);
	snprintf(g->descr, sizeof(g->descr), "%cf%u", PICK(orders), g->esize);
	g->ndim = PICK(ranks);
	const bool empty = g->ndim && coin(6);
	for (uint32_t i = 0; i < g->ndim; i++)
		g->shape[i] = coin(4) ? 1 : 1 + rb(coin(4) ? 64 : 6);
	if (empty) {
		g->shape[rb(g->ndim)] = 0;
		for (uint32_t i = 0; i < g->ndim; i++)
			if (g->shape[i] && coin(3))
				g->shape[i] = coin(3) ? 1 + (kvt_rand_u64() % (1ull << 40))
						      : PICK(big_dims);
	} else {
		for (;;) { /* shrink the largest dim until the data is small */
			uint64_t c = 1;
			uint32_t big = 0;
			for (uint32_t i = 0; i < g->ndim; i++) {
				c *= g->shape[i];
				if (g->shape[i] > g->shape[big])
					big = i;
			}
			if (c <= MAX_DATA_ELEMS)
				break;
			g->shape[big] = (g->shape[big] + 1) / 2;
		}
	}
	g->count = empty ? 0 : 1;
	for (uint32_t i = 0; i < g->ndim && !empty; i++)
		g->count *= g->shape[i];
	g->data_bytes = (size_t)g->count * g->esize;
	for (size_t i = 0; i < g->data_bytes; i += 8) {
		uint64_t r = kvt_rand_u64();
		memcpy(g->data + i, &r, g->data_bytes - i < 8 ? g->data_bytes - i : 8);
	}
	g->n_tok = g->ndim;
	for (uint32_t i = 0; i < g->ndim; i++)
		snprintf(g->tok[i], sizeof(g->tok[i]), "%llu", (unsigned long long)g->shape[i]);
	g->tuple_comma = g->ndim == 1 || coin(4);
	g->dict_comma = coin(2);
	g->pad_style = rb(4);
	/* the three keys in a random order */
	const char *names[3] = { "descr", "fortran_order", "shape" };
	uint32_t order[3] = { 0, 1, 2 };
	for (uint32_t i = 2; i > 0; i--) {
		uint32_t j = rb(i + 1), s = order[i];
		order[i] = order[j];
		order[j] = s;
	}
	g->n_pairs = 3;
	for (uint32_t i = 0; i < 3; i++) {
		struct pair *p = &g->pairs[i];
		quoted(p->key, sizeof(p->key), names[order[i]]);
		p->kind = order[i] == 2 ? P_SHAPE : P_LITERAL;
		if (order[i] == 0)
			quoted(p->val, sizeof(p->val), g->descr);
		else if (order[i] == 1)
			snprintf(p->val, sizeof(p->val), "False");
	}
}

static int pair_of(const struct gen *g, const char *name)
{
	for (uint32_t i = 0; i < g->n_pairs; i++)
		if (!strncmp(g->pairs[i].key + 1, name, strlen(name)) &&
		    g->pairs[i].key[1 + strlen(name)] == g->pairs[i].key[0])
			return (int)i;
	return -1;
}

/* ---- Mutations -------------------------------------------------------------------------- */

struct mutant {
	struct gen *g;
	struct text dict;       /* the laid-out dict (header-text mutations edit it or g) */
	uint8_t *file;
	size_t len;
	bool must_reject;       /* the format rules refuse every result of this mutation */
	bool any;               /* a mutation was applied */
	struct fuzz_desc desc;
};

#define describe(m, ...) fuzz_desc_add(&(m)->desc, __VA_ARGS__)

/* Header-text mutations edit the parts (g) before the dict is laid out; text-level ones edit
 * m->dict after. Each returns whether the result must be refused. */

static bool mut_dim_token(struct mutant *m)
{
	/* tokens no Python int literal the format allows reads as */
	static const char *const bad[] = {
		"-1", "-0", "+3", "+0", "03", "00", "0x10", "0o7", "0b1", "1_0", "3.0", "3.", "1e3",
		"3L", "3j", "True", "None", "'3'", "\"3\"", "- 1", "1 2", "(2,)", "[2]", "\t3",
		"\xd9\xa3", "1099511627777", "2199023255552", "9223372036854775808",
		"9223372036854775807", "18446744073709551615", "18446744073709551616",
		"18446744073709551617", "340282366920938463463374607431768211456",
		"99999999999999999999999999999999999999999999999999", "0000000000000000000001",
		"-18446744073709551615", "-9223372036854775808",
	};
	/* the same value written with a sign, zero padding or a tab: a reader that takes
	 * them finds the data size right */
	static const char *const same[] = { "+", "0", "00", "\t", "+ ", "-" };
	/* valid ints: the header parses, the data size decides */
	static const char *const ok[] = { "0", "1", "2", "7", "64", "1099511627776", "4294967296" };
	struct gen *g = m->g;
	if (!g->n_tok)
		return false;
	const uint32_t i = rb(g->n_tok);
	char old[48];
	bool b = true;
	snprintf(old, sizeof(old), "%s", g->tok[i]);
	switch (rb(3)) {
	case 0: {
		const char *pre = PICK(same);
		if (pre[0] == '-' && strcmp(old, "0"))
			pre = "+";
		snprintf(g->tok[i], sizeof(g->tok[i]), "%s%.40s", pre, old);
		break;
	}
	case 1:
		snprintf(g->tok[i], sizeof(g->tok[i]), "%s", PICK(bad));
		if (g->n_tok > 1 && coin(2)) {
			/* another dim 0 and no data: a reader that reads the token as any number
			 * (-1 as 2^64 - 1, say) finds the data size right */
			const uint32_t j = (i + 1 + rb(g->n_tok - 1)) % g->n_tok;
			snprintf(g->tok[j], sizeof(g->tok[j]), "0");
			g->data_bytes = 0;
			describe(m, "shape[%u] := 0, no data, ", j);
		}
		break;
	default:
		snprintf(g->tok[i], sizeof(g->tok[i]), "%s", PICK(ok));
		b = false;
	}
	describe(m, "shape[%u] := '%s'", i, g->tok[i]);
	return b;
}

/* Dims each under the limit whose product is over it (some wrap to 0 or to the data size in
 * 64 bits), with the data cut to what the wrapped product would need. */
static bool mut_count_overflow(struct mutant *m)
{
	static const struct {
		uint32_t n;
		const char *d[4];
		uint64_t wrapped; /* the product mod 2^64 */
	} cases[] = {
		{ 2, { "4294967296", "4294967296" }, 0 },
		{ 2, { "9223372036854775808", "2" }, 0 },
		{ 2, { "1099511627776", "2" }, 1ull << 41 },
		{ 3, { "1048576", "1048576", "2" }, 1ull << 41 },
		{ 4, { "65536", "65536", "65536", "65536" }, 0 },
		{ 3, { "1099511627776", "1099511627776", "16777216" }, 0 },
		{ 2, { "18446744073709551615", "1" }, UINT64_MAX },
		{ 1, { "18446744073709551616" }, 0 },
		{ 2, { "6148914691236517206", "3" }, 2 },
	};
	struct gen *g = m->g;
	const uint32_t c = rb(sizeof(cases) / sizeof(cases[0]));
	g->n_tok = cases[c].n;
	for (uint32_t i = 0; i < g->n_tok; i++)
		snprintf(g->tok[i], sizeof(g->tok[i]), "%s", cases[c].d[i]);
	g->tuple_comma = g->n_tok == 1 || g->tuple_comma;
	/* the data a reader that multiplies in 64 bits would expect, if small */
	const uint64_t want = cases[c].wrapped * g->esize;
	g->data_bytes = want <= sizeof(g->data) ? (size_t)want : 0;
	describe(m, "shape := (%s%s%s%s%s%s%s) (product over 2^40), %zu data bytes",
		 cases[c].d[0], g->n_tok > 1 ? ", " : ",", g->n_tok > 1 ? cases[c].d[1] : "",
		 g->n_tok > 2 ? ", " : "", g->n_tok > 2 ? cases[c].d[2] : "",
		 g->n_tok > 3 ? ", " : "", g->n_tok > 3 ? cases[c].d[3] : "", g->data_bytes);
	return true;
}

static bool mut_key_dup(struct mutant *m)
{
	struct gen *g = m->g;
	if (g->n_pairs >= MAX_PAIRS)
		return false;
	const uint32_t s = rb(g->n_pairs), at = rb(g->n_pairs + 1);
	struct pair p = g->pairs[s];
	if (coin(3)) /* the same key in the other quote style */
		p.key[0] = p.key[strlen(p.key) - 1] = p.key[0] == '\'' ? '"' : '\'';
	memmove(&g->pairs[at + 1], &g->pairs[at], (g->n_pairs - at) * sizeof(p));
	g->pairs[at] = p;
	g->n_pairs++;
	describe(m, "key %s duplicated at position %u", p.key, at);
	return true;
}

static bool mut_key_drop(struct mutant *m)
{
	struct gen *g = m->g;
	const uint32_t s = rb(g->n_pairs);
	describe(m, "key %s dropped", g->pairs[s].key);
	memmove(&g->pairs[s], &g->pairs[s + 1], (g->n_pairs - s - 1) * sizeof(g->pairs[0]));
	g->n_pairs--;
	return true;
}

static bool mut_key_rename(struct mutant *m)
{
	static const char *const names[] = {
		"Descr", "descr ", " descr", "desc", "descrr", "DESCR", "fortran-order",
		"fortranorder", "fortran_orde", "Fortran_order", "shapes", "shap", "Shape", "",
		"x", "descr\\x00", "shape\t", "dtype", "order",
		"descr', 'shape", "shape': (1,), 'x", /* a key hidden in a key */
	};
	struct gen *g = m->g;
	const uint32_t s = rb(g->n_pairs);
	const char *q = quote();
	char old[96];
	snprintf(old, sizeof(old), "%s", g->pairs[s].key);
	if (coin(5)) { /* another valid key: a duplicate */
		static const char *const valid[] = { "descr", "fortran_order", "shape" };
		snprintf(g->pairs[s].key, sizeof(g->pairs[s].key), "%s%s%s", q, PICK(valid), q);
	} else {
		snprintf(g->pairs[s].key, sizeof(g->pairs[s].key), "%s%s%s", q, PICK(names), q);
	}
	describe(m, "key %s renamed %s", old, g->pairs[s].key);
	/* renaming a key to itself (or, in the other quote, the same key) changes nothing */
	return strcmp(old + 1, g->pairs[s].key + 1) != 0 &&
	       !(strlen(old) == strlen(g->pairs[s].key) &&
		 !strncmp(old + 1, g->pairs[s].key + 1, strlen(old) - 2));
}

/* A key (with a value) written inside a string value: a substring search finds it there. */
static bool mut_key_in_value(struct mutant *m)
{
	static const char *const hidden[] = {
		"'shape': (1,)", "'shape': (0,)", "'shape': (2, 3)", "'descr': '<f8'",
		"'descr': '<f2'", "'fortran_order': False", "'fortran_order': True",
		"\"shape\": (1,)", "'shape':(1,)",
	};
	struct gen *g = m->g;
	const char *h = PICK(hidden);
	const bool dq = strchr(h, '\'') != NULL; /* quote the value with the other quote */
	if (coin(2) || g->n_pairs >= MAX_PAIRS) {
		/* inside descr's value: no longer a dtype */
		int d = pair_of(g, "descr");
		if (d < 0)
			return false;
		snprintf(g->pairs[d].val, sizeof(g->pairs[d].val), "%s%s %s%s", dq ? "\"" : "'",
			 g->descr, h, dq ? "\"" : "'");
		describe(m, "descr := %s", g->pairs[d].val);
		return true;
	}
	/* in the value of an unknown key placed first, where a search finds it before the real
	 * one */
	memmove(&g->pairs[1], &g->pairs[0], g->n_pairs * sizeof(g->pairs[0]));
	g->n_pairs++;
	snprintf(g->pairs[0].key, sizeof(g->pairs[0].key), "'%s'", coin(2) ? "note" : "x");
	snprintf(g->pairs[0].val, sizeof(g->pairs[0].val), "%s%s%s", dq ? "\"" : "'", h,
		 dq ? "\"" : "'");
	g->pairs[0].kind = P_LITERAL;
	describe(m, "pair %s: %s added first", g->pairs[0].key, g->pairs[0].val);
	return true;
}

static bool mut_fortran(struct mutant *m)
{
	static const char *const vals[] = {
		"True", "Falsey", "false", "FALSE", "0", "1", "False_", "Fals", "'False'",
		"\"False\"", "None", "False False", "Fa lse", "False()", "not True", "(False)",
		"F", "", "False1", "Trueish",
	};
	struct gen *g = m->g;
	int f = pair_of(g, "fortran_order");
	if (f < 0)
		return false;
	snprintf(g->pairs[f].val, sizeof(g->pairs[f].val), "%s", PICK(vals));
	describe(m, "fortran_order := %s", g->pairs[f].val);
	return true;
}

static bool mut_descr(struct mutant *m)
{
	static const char *const bad[] = {
		">f4", ">f2", ">f8", "<i4", "<u2", "|u1", "<f16", "f4", "<f4 ", " <f4", "<f",
		"<c8", "float32", "float16", "<F4", "<f4<f4", "O", "<V4", "b1", "<f3", "<f0", "",
		"<M8[ns]", "<e", "<d",
	};
	static const char *const ok[] = { "<f2", "<f4", "<f8", "|f4", "=f2", "=f8" };
	struct gen *g = m->g;
	int d = pair_of(g, "descr");
	if (d < 0)
		return false;
	const bool b = !coin(3);
	const char *v = b ? PICK(bad) : PICK(ok);
	if (b && coin(8)) /* a list, as for a structured dtype */
		snprintf(g->pairs[d].val, sizeof(g->pairs[d].val), "[('a', '<f4')]");
	else
		quoted(g->pairs[d].val, sizeof(g->pairs[d].val), v);
	describe(m, "descr := %s", g->pairs[d].val);
	return b;
}

/* Python syntax broken around the values: edits of the laid-out dict text. */
static bool mut_structure(struct mutant *m)
{
	struct text *t = &m->dict;
	struct gen *g = m->g;
	char *p;
	switch (rb(16)) {
	case 0:
		tsplice(t, 0, 1, "", 0);
		describe(m, "'{' removed");
		return true;
	case 1:
		if (!(p = strrchr(t->s, '}')))
			return false;
		tsplice(t, (size_t)(p - t->s), 1, "", 0);
		describe(m, "'}' removed");
		return true;
	case 2:
		tsplice(t, 1, 0, ",", 1);
		describe(m, "',' after '{'");
		return true;
	case 3: /* a second ',' after a value */
		p = strchr(t->s, ':');
		while (p && *p != ',' && *p != '}')
			p++;
		if (!p || *p != ',' || (p[1] == ' ' && p[2] == '}') || p[1] == '}')
			return false;
		/* ", ," stays an error even before '}' */
		tsplice(t, (size_t)(p - t->s), 0, ",", 1);
		describe(m, "',,' after the first value");
		return true;
	case 4: { /* ':' dropped */
		size_t n = 0, k;
		for (size_t i = 0; i < t->n; i++)
			n += t->s[i] == ':';
		if (!n)
			return false;
		k = rb((uint32_t)n);
		for (size_t i = 0; i < t->n; i++)
			if (t->s[i] == ':' && k-- == 0) {
				tsplice(t, i, 1, "", 0);
				break;
			}
		describe(m, "a ':' removed");
		return true;
	}
	case 5: {
		static const char *const junk[] = { "x", "}", ",", "#", "{}", "\t", "\n", "\r", "0" };
		const char *j = PICK(junk);
		tput(t, " ");
		tput(t, j);
		describe(m, "'%s' after '}'", j[0] == '\n' ? "\\n" : j);
		return true;
	}
	case 6:
		tsplice(t, 1, 0, coin(2) ? "\t" : "\n", 1);
		describe(m, "tab or newline after '{'");
		return true;
	case 7: /* a bytes / unicode / raw string prefix on a key */
		tsplice(t, 1, 0, coin(2) ? " b" : " u", 2);
		describe(m, "string prefix on the first key");
		return true;
	case 8: { /* mismatched quotes on the first key */
		size_t i = 1;
		while (i < t->n && t->s[i] != '\'' && t->s[i] != '"')
			i++;
		size_t j = i + 1;
		while (j < t->n && t->s[j] != t->s[i])
			j++;
		if (j >= t->n)
			return false;
		t->s[j] = t->s[i] == '\'' ? '"' : '\'';
		describe(m, "the first key's closing quote swapped");
		return true;
	}
	case 9: /* more than 8 dims */
		g->n_tok = 9 + rb(MAX_TOKS - 8);
		for (uint32_t i = 0; i < g->n_tok; i++)
			snprintf(g->tok[i], sizeof(g->tok[i]), "1");
		render_dict(g, t);
		describe(m, "%u dims of 1", g->n_tok);
		return true;
	case 10: /* (3) is the int 3 */
		if (g->n_tok != 1)
			return false;
		g->tuple_comma = false;
		render_dict(g, t);
		describe(m, "one-dim shape without its comma");
		return true;
	case 11:
		p = strchr(t->s, '(');
		if (!p || pair_of(g, "shape") < 0)
			return false;
		tsplice(t, (size_t)(p - t->s) + 1, 0, ",", 1);
		describe(m, "',' after the shape's '('");
		return true;
	case 12: { /* shape as a list */
		char *a = strchr(t->s, '('), *b = a ? strchr(a, ')') : NULL;
		if (!b)
			return false;
		*a = '[';
		*b = ']';
		describe(m, "shape as a list");
		return true;
	}
	case 13:
		t->n = 0;
		tput(t, coin(2) ? "{}" : "");
		describe(m, "empty dict or header");
		return true;
	case 14: /* a NUL byte */
		if (t->n < 3)
			return false;
		t->s[1 + rb((uint32_t)t->n - 2)] = 0;
		describe(m, "a NUL byte in the dict");
		return true;
	default: /* the shape's ')' dropped */
		p = strchr(t->s, ')');
		if (!p)
			return false;
		tsplice(t, (size_t)(p - t->s), 1, "", 0);
		describe(m, "the shape's ')' removed");
		return true;
	}
}

/* 1..4 random characters inserted, removed or replaced in the dict text. */
static bool mut_chars(struct mutant *m)
{
	static const char cs[] = "{}()[],:'\" \t\n0123456789-+_.eExTFalsuerdcp\\#";
	struct text *t = &m->dict;
	for (uint32_t k = 1 + rb(4); k > 0 && t->n; k--) {
		const size_t at = rb((uint32_t)t->n);
		char c = cs[rb(sizeof(cs) - 1)];
		switch (rb(3)) {
		case 0:
			tsplice(t, at, 0, &c, 1);
			break;
		case 1:
			tsplice(t, at, 1, "", 0);
			break;
		default:
			t->s[at] = c;
		}
	}
	describe(m, "characters edited");
	return false;
}

/* ---- Byte mutations of the laid-out file (verdict unknown) ------------------------------ */

/* Where the data starts, read from the preamble as the format defines it (independent of
 * kvt_npy.c): 10 + a 2-byte length for version 1, 12 + a 4-byte one otherwise. */
static size_t header_end(const uint8_t *f, size_t len)
{
	if (len < 12)
		return len;
	if (f[6] == 1)
		return 10 + (size_t)(f[8] | f[9] << 8);
	return 12 + (size_t)(f[8] | f[9] << 8 | f[10] << 16 | (uint32_t)f[11] << 24);
}

static size_t pos_in_header(const struct mutant *m)
{
	size_t he = header_end(m->file, m->len);
	if (he > m->len)
		he = m->len;
	return coin(4) || he == 0 ? rb((uint32_t)m->len) : rb((uint32_t)he);
}

static bool mut_bitflip(struct mutant *m)
{
	if (!m->len)
		return false;
	for (uint32_t k = 1 + rb(coin(3) ? 8 : 2); k > 0; k--) {
		size_t at = pos_in_header(m);
		m->file[at] ^= (uint8_t)(1u << rb(8));
		describe(m, " flip@%zu", at);
	}
	return false;
}

static bool mut_byteset(struct mutant *m)
{
	static const uint8_t v[] = { 0, 0xff, 0x80, 0x7f, '\n', ' ', ',', ':', '(', ')', '{', '}',
				     '\'', '"', '-', '+', '0', '1', '9', 'T', 'F', '<', '>', '|' };
	if (!m->len)
		return false;
	for (uint32_t k = 1 + rb(4); k > 0; k--) {
		size_t at = pos_in_header(m);
		m->file[at] = PICK(v);
		describe(m, " [%zu]=0x%02x", at, m->file[at]);
	}
	return false;
}

static bool mut_truncate(struct mutant *m)
{
	if (!m->len)
		return false;
	const size_t he = header_end(m->file, m->len);
	size_t to;
	switch (rb(4)) {
	case 0:
		to = rb(12);
		break;
	case 1:
		to = rb((uint32_t)(he < m->len ? he : m->len));
		break;
	case 2: /* inside the data, often one element short */
		to = he < m->len ? m->len - 1 - rb((uint32_t)(m->len - he)) : rb((uint32_t)m->len);
		break;
	default:
		to = m->len - 1 - rb(m->len < 9 ? (uint32_t)m->len : 9);
	}
	if (to >= m->len)
		to = m->len - 1;
	describe(m, " cut %zu -> %zu", m->len, to);
	m->len = to;
	return false;
}

static bool mut_append(struct mutant *m)
{
	uint32_t n = coin(2) ? 1u << rb(4) : 1 + rb(300);
	if (m->len + n > FILE_CAP)
		return false;
	for (uint32_t i = 0; i < n; i++)
		m->file[m->len + i] = coin(2) ? (uint8_t)kvt_rand_u64() : ' ';
	m->len += n;
	describe(m, " +%u bytes", n);
	return false;
}

static bool mut_hlen(struct mutant *m)
{
	if (m->len < 12)
		return false;
	const bool v1 = m->file[6] == 1;
	uint32_t h = v1 ? (uint32_t)(m->file[8] | m->file[9] << 8)
			: (uint32_t)(m->file[8] | m->file[9] << 8 | m->file[10] << 16 |
				     (uint32_t)m->file[11] << 24);
	switch (rb(5)) {
	case 0:
		h += 1 + rb(8);
		break;
	case 1:
		h -= 1 + rb(8);
		break;
	case 2:
		h = (uint32_t)kvt_rand_u64();
		break;
	case 3: {
		static const uint32_t v[] = { 0, 1, 65535, 65536, 0x7fffffff, 0xffffffff, 10, 64 };
		h = PICK(v);
		break;
	}
	default: /* read as the other version's width */
		m->file[6] = v1 ? 2 : 1;
		describe(m, " version %u -> %u", v1 ? 1 : 2, m->file[6]);
		return false;
	}
	m->file[8] = (uint8_t)h;
	m->file[9] = (uint8_t)(h >> 8);
	if (!v1) {
		m->file[10] = (uint8_t)(h >> 16);
		m->file[11] = (uint8_t)(h >> 24);
	}
	describe(m, " header length := %u", v1 ? h & 0xffff : h);
	return false;
}

static bool mut_version(struct mutant *m)
{
	static const uint8_t v[] = { 0, 1, 2, 3, 4, 0xff };
	if (m->len < 8)
		return false;
	const uint32_t at = 6 + rb(2);
	m->file[at] = PICK(v);
	describe(m, " [%u] (version) := %u", at, m->file[at]);
	return false;
}

enum mclass { M_TEXT_PARTS, M_TEXT_DICT, M_BYTES };

static const struct kind {
	const char *name;
	bool (*fn)(struct mutant *);
	enum mclass cls;
} kinds[] = {
	{ "dim-token", mut_dim_token, M_TEXT_PARTS },
	{ "count-overflow", mut_count_overflow, M_TEXT_PARTS },
	{ "key-dup", mut_key_dup, M_TEXT_PARTS },
	{ "key-drop", mut_key_drop, M_TEXT_PARTS },
	{ "key-rename", mut_key_rename, M_TEXT_PARTS },
	{ "key-in-value", mut_key_in_value, M_TEXT_PARTS },
	{ "fortran", mut_fortran, M_TEXT_PARTS },
	{ "descr", mut_descr, M_TEXT_PARTS },
	{ "structure", mut_structure, M_TEXT_DICT },
	{ "chars", mut_chars, M_TEXT_DICT },
	{ "bitflip", mut_bitflip, M_BYTES },
	{ "byteset", mut_byteset, M_BYTES },
	{ "truncate", mut_truncate, M_BYTES },
	{ "append", mut_append, M_BYTES },
	{ "hlen", mut_hlen, M_BYTES },
	{ "version", mut_version, M_BYTES },
};
#define N_KINDS (sizeof(kinds) / sizeof(kinds[0]))

/* ---- Oracles ------------------------------------------------------------------------------- */

static char dir[256], path[300], path2[300];

static struct {
	uint64_t iters, valid, must_reject, kind_n[N_KINDS], kind_acc[N_KINDS];
	uint64_t read_acc, read_rej, f32_acc, f32_rej, rewrites;
} st;

static void write_file(const char *p, const uint8_t *b, size_t n)
{
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, b, n) != (ssize_t)n || close(fd) != 0) {
		printf("# cannot write %s: %s\n", p, strerror(errno));
		abort();
	}
}

static bool same_f32(float a, float b)
{
	uint32_t x, y;
	memcpy(&x, &a, 4);
	memcpy(&y, &b, 4);
	return x == y || (a != a && b != b);
}

/* The element count with overflow checks, or -1 past 2^63. */
static int64_t product(const uint64_t *shape, uint32_t ndim)
{
	uint64_t c = 1;
	bool zero = false, over = false;
	for (uint32_t i = 0; i < ndim; i++) {
		zero |= shape[i] == 0;
		over |= __builtin_mul_overflow(c, shape[i], &c);
	}
	return zero ? 0 : over || c > INT64_MAX ? -1 : (int64_t)c;
}

/* file element i (of esize bytes) as f32, as the f32 reader must convert it */
static float elem_f32(const uint8_t *p, uint32_t esize, size_t i)
{
	if (esize == 2) {
		uint16_t h;
		memcpy(&h, p + 2 * i, 2);
		return kvt_f16_to_f32(h);
	}
	if (esize == 4) {
		float f;
		memcpy(&f, p + 4 * i, 4);
		return f;
	}
	double d;
	memcpy(&d, p + 8 * i, 8);
	return (float)d;
}

/* An error buffer of exactly its size: usually 256 bytes, sometimes tiny, sometimes none. */
static size_t pick_errlen(void) { return coin(10) ? 0 : coin(10) ? 1 + rb(16) : 256; }

static void check_refusal(const char *who, int rc, const struct kvt_npy *a, const char *err,
			  size_t errlen)
{
	FCHECK(rc < 0, "%s: rc %d", who, rc);
	FCHECK(a->data == NULL, "%s refused (rc %d) but left data allocated", who, rc);
	if (errlen)
		FCHECK(memchr(err, 0, errlen) && (errlen < 2 || err[0]),
		       "%s refused (rc %d) without a message", who, rc);
}

/* What an accepted file must be. esize: the file's element size (the raw reader's dtype,
 * or the descr's digit for the f32 reader). */
static void check_accepted(const char *who, bool f32, const struct kvt_npy *a,
			   const uint8_t *file, size_t len)
{
	FCHECK(a->ndim <= KVT_NPY_MAX_DIMS, "%s: ndim %u", who, a->ndim);
	if (a->ndim > KVT_NPY_MAX_DIMS)
		return;
	const uint32_t esize = f32 ? (uint32_t)(uint8_t)(a->descr[2] - '0')
				   : (uint32_t)kvt_dtype_size(a->dtype);
	const bool esize_ok = esize == 2 || esize == 4 || (f32 && esize == 8);
	FCHECK(esize_ok, "%s: element size %u (dtype %u, descr '%.4s')", who, esize, a->dtype,
	       a->descr);
	if (!esize_ok)
		return;
	FCHECK(a->dtype == (f32 ? KVT_DTYPE_F32 : esize == 2 ? KVT_DTYPE_F16 : KVT_DTYPE_F32),
	       "%s: dtype %u", who, a->dtype);
	const int64_t p = product(a->shape, a->ndim);
	uint64_t need = 0, out_need = 0;
	const bool over = p < 0 || __builtin_mul_overflow((uint64_t)p, esize, &need) ||
			  __builtin_mul_overflow((uint64_t)p, f32 ? 4u : esize, &out_need);
	FCHECK(!over, "%s: accepted a shape whose element count overflows", who);
	if (over)
		return;
	const size_t off = header_end(file, len);
	FCHECK(len >= off && need == len - off && out_need == a->n_bytes,
	       "%s: shape x %u = %llu bytes, the file holds %lld after the header, read %zu", who,
	       esize, (unsigned long long)need, (long long)len - (long long)off, a->n_bytes);
	if (!(len >= off && need == len - off && out_need == a->n_bytes) || !a->data)
		return;
	size_t bad = (size_t)p;
	if (!f32) {
		for (size_t i = 0; i < a->n_bytes && bad == (size_t)p; i++)
			if (((const uint8_t *)a->data)[i] != file[off + i])
				bad = i / esize;
	} else {
		for (size_t i = 0; i < (size_t)p && bad == (size_t)p; i++)
			if (!same_f32(((const float *)a->data)[i], elem_f32(file + off, esize, i)))
				bad = i;
	}
	FCHECK(bad == (size_t)p, "%s: element %zu of %lld is not the file's", who, bad,
	       (long long)p);

	/* written back and read again: the same array */
	char err[256] = "";
	struct kvt_npy b;
	int rc = kvt_npy_write(path2, a->dtype, a->ndim, a->shape, a->data, err, sizeof(err));
	FCHECK(rc == 0, "%s: kvt_npy_write of what was read: rc %d '%s'", who, rc, err);
	if (rc)
		return;
	rc = f32 ? kvt_npy_read_f32(path2, &b, err, sizeof(err))
		 : kvt_npy_read(path2, &b, err, sizeof(err));
	FCHECK(rc == 0 && b.ndim == a->ndim && !memcmp(b.shape, a->shape, a->ndim * 8) &&
	       b.dtype == a->dtype && b.n_bytes == a->n_bytes &&
	       !memcmp(b.data, a->data, a->n_bytes), "%s: written back and read again: rc %d '%s'",
	       who, rc, err);
	st.rewrites++;
	kvt_npy_free(&b);
}

static bool same_header(const struct kvt_npy *a, const struct kvt_npy *b)
{
	return a->version == b->version && !strcmp(a->descr, b->descr) &&
	       a->elem_bytes == b->elem_bytes && a->ndim == b->ndim &&
	       !memcmp(a->shape, b->shape, sizeof(a->shape)) && a->count == b->count &&
	       a->data_offset == b->data_offset;
}

static void check_file(const struct gen *g, const uint8_t *file, size_t len, bool valid,
		       bool must_reject)
{
	write_file(path, file, len);

	/* the byte parser, on a buffer of exactly the file's length */
	uint8_t *exact = xalloc(len);
	memcpy(exact, file, len);
	size_t el = pick_errlen();
	char *err = el ? xalloc(el) : NULL;
	if (err)
		memset(err, 'x', el);
	struct kvt_npy ph;
	const int rp = kvt_npy_parse_header(exact, len, "m.npy", &ph, err, el);
	if (rp)
		check_refusal("parse_header", rp, &ph, err, el);
	free(exact);
	free(err);

	struct kvt_npy r, f;
	el = pick_errlen();
	err = el ? xalloc(el) : NULL;
	if (err)
		memset(err, 'x', el);
	const int rr = kvt_npy_read(path, &r, err, el);
	if (verbose)
		printf("# kvt_npy_read: rc %d '%s'\n", rr, rr && err && el == 256 ? err : "");
	if (rr) {
		check_refusal("kvt_npy_read", rr, &r, err, el);
		st.read_rej++;
	} else {
		st.read_acc++;
		check_accepted("kvt_npy_read", false, &r, file, len);
	}
	free(err);
	el = pick_errlen();
	err = el ? xalloc(el) : NULL;
	if (err)
		memset(err, 'x', el);
	const int rf = kvt_npy_read_f32(path, &f, err, el);
	if (verbose)
		printf("# kvt_npy_read_f32: rc %d '%s'\n", rf, rf && err && el == 256 ? err : "");
	if (rf) {
		check_refusal("kvt_npy_read_f32", rf, &f, err, el);
		st.f32_rej++;
	} else {
		st.f32_acc++;
		check_accepted("kvt_npy_read_f32", true, &f, file, len);
	}
	free(err);

	/* the parser and the readers agree */
	const bool size_ok = !rp && len >= ph.data_offset &&
			     len - ph.data_offset == ph.count * ph.elem_bytes;
	FCHECK(!rp || (rr && rf), "parse_header refuses (rc %d) but read rc %d, read_f32 rc %d",
	       rp, rr, rf);
	if (!rp)
		FCHECK(size_ok ? !rf && (!rr) == (ph.elem_bytes != 8) : rr && rf,
		       "parse_header accepts (data size %s) but read rc %d, read_f32 rc %d",
		       size_ok ? "right" : "wrong", rr, rf);
	if (!rr)
		FCHECK(!rp && same_header(&r, &ph), "kvt_npy_read's header fields differ from "
		       "parse_header's");
	if (!rf)
		FCHECK(!rp && same_header(&f, &ph), "kvt_npy_read_f32's header fields differ from "
		       "parse_header's");

	if (must_reject)
		FCHECK(rp && rr && rf, "a mutation the format refuses was accepted (parse rc %d, "
		       "read rc %d, read_f32 rc %d)", rp, rr, rf);
	if (valid) {
		FCHECK(!rp && ph.version == g->version && !strcmp(ph.descr, g->descr) &&
		       ph.ndim == g->ndim && !memcmp(ph.shape, g->shape, g->ndim * 8) &&
		       ph.count == g->count, "a valid file: parse rc %d, version %u descr '%s' "
		       "ndim %u", rp, ph.version, ph.descr, ph.ndim);
		FCHECK(g->esize == 8 ? rr < 0 : rr == 0 && r.n_bytes == g->data_bytes &&
		       !memcmp(r.data, g->data, g->data_bytes), "a valid file: kvt_npy_read rc %d",
		       rr);
		bool eq = rf == 0 && f.n_bytes == g->count * 4;
		for (size_t i = 0; eq && i < g->count; i++)
			eq = same_f32(((const float *)f.data)[i], elem_f32(g->data, g->esize, i));
		FCHECK(eq, "a valid file: kvt_npy_read_f32 rc %d, or its values differ", rf);
	}
	kvt_npy_free(&r);
	kvt_npy_free(&f);
}

/* ---- One iteration ----------------------------------------------------------------------- */

static struct gen gbuf;
static uint8_t *fbuf;

static void run_iteration(uint64_t it)
{
	kvt_rand_stream(STREAM_ITER, it);
	struct gen *g = &gbuf;
	gen_file(g);
	struct mutant m = { .g = g, .file = fbuf };
	uint32_t kind = UINT32_MAX;
	const uint32_t r = rb(20);
	/* 1 in 10 unmutated; the rest half header text, half bytes (after a text edit at times) */
	if (r >= 2 && r < 11) {
		kind = rb(10);
		if (kinds[kind].cls == M_TEXT_PARTS) {
			m.must_reject = kinds[kind].fn(&m);
			m.any = true;
			render_dict(g, &m.dict);
		} else {
			render_dict(g, &m.dict);
			m.must_reject = kinds[kind].fn(&m);
			m.any = true;
		}
		m.len = lay_out(g, &m.dict, m.file);
	} else {
		render_dict(g, &m.dict);
		if (r >= 11 && coin(4)) {
			m.any = true;
			describe(&m, "chars then ");
			mut_chars(&m);
		}
		m.len = lay_out(g, &m.dict, m.file);
		if (r >= 11) {
			kind = 10 + rb(N_KINDS - 10);
			for (uint32_t k = 1 + (coin(3) ? rb(3) : 0); k > 0; k--) {
				if (k == 1 || coin(2))
					kinds[kind].fn(&m);
				else
					kinds[10 + rb(N_KINDS - 10)].fn(&m);
			}
			m.any = true;
		}
	}
	if (m.any && !m.desc.n)
		describe(&m, "(not applicable here: unmutated)");
	const bool valid = !m.any;
	/* the header as text (printable) for replay and failures */
	char hshow[400];
	size_t hn = 0;
	const size_t he = header_end(m.file, m.len);
	const size_t h0 = m.len > 6 && m.file[6] != 1 ? 12 : 10;
	for (size_t i = h0; i < m.len && i < he && i < h0 + 150 && hn + 8 < sizeof(hshow); i++)
		hn += (size_t)snprintf(hshow + hn, sizeof(hshow) - hn,
				       m.file[i] >= 0x20 && m.file[i] < 0x7f ? "%c" : "\\x%02x",
				       m.file[i]);
	hshow[hn] = 0;
	ctx_set("iteration %llu: version %u descr %.3s ndim %u count %llu, "
		"%s: %.599s%s; %zu bytes, header '%.399s'; replay: KVT_SEED=%llu KVT_FUZZ_ITER=%llu\n",
		(unsigned long long)it, g->version, g->descr, g->ndim,
		(unsigned long long)g->count, kind == UINT32_MAX ? "unmutated" : kinds[kind].name,
		m.desc.s, m.must_reject ? " (must reject)" : "", m.len, hshow,
		(unsigned long long)kvt_test_seed, (unsigned long long)it);
	if (verbose)
		printf("# %s", ctx);
	const uint64_t acc_before = st.f32_acc;
	check_file(g, m.file, m.len, valid, m.must_reject);
	st.iters++;
	st.valid += valid;
	st.must_reject += m.must_reject;
	if (kind != UINT32_MAX) {
		st.kind_n[kind]++;
		st.kind_acc[kind] += st.f32_acc != acc_before;
	}
}

/* ---- Driver ---------------------------------------------------------------------------------- */

static void test_fuzz(void)
{
	const double el = ctx_run(DEFAULT_ITERS, MAX_FAILING_ITERS, run_iteration);
	printf("# fuzz_npy: %llu iterations in %.1f s (%.0f/s): %llu unmutated, %llu must-reject; "
	       "kvt_npy_read accepted %llu refused %llu, kvt_npy_read_f32 accepted %llu refused "
	       "%llu; %llu written back and read again; %d failing iterations\n",
	       (unsigned long long)st.iters, el, el > 0 ? (double)st.iters / el : 0.0,
	       (unsigned long long)st.valid, (unsigned long long)st.must_reject,
	       (unsigned long long)st.read_acc, (unsigned long long)st.read_rej,
	       (unsigned long long)st.f32_acc, (unsigned long long)st.f32_rej,
	       (unsigned long long)st.rewrites, failing_iters);
	char line[1200];
	size_t n = 0;
	for (uint32_t k = 0; k < N_KINDS && n < sizeof(line); k++)
		n += (size_t)snprintf(line + n, sizeof(line) - n, "%s %s %llu/%llu", k ? "," : "",
				      kinds[k].name, (unsigned long long)st.kind_acc[k],
				      (unsigned long long)st.kind_n[k]);
	printf("# accepted (read_f32)/tried by mutation:%s\n", line);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	kvt_test_init();
	ctx_catch_crashes();
	const char *tmp = getenv("TMPDIR");
	snprintf(dir, sizeof(dir), "%s/fuzz_npy.XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(dir)) {
		printf("# mkdtemp %s: %s\n", dir, strerror(errno));
		return 1;
	}
	snprintf(path, sizeof(path), "%s/m.npy", dir);
	snprintf(path2, sizeof(path2), "%s/w.npy", dir);
	fbuf = xalloc(FILE_CAP);
	const char *one = getenv("KVT_FUZZ_ITER");
	if (one && *one) {
		verbose = true;
		run_iteration(strtoull(one, NULL, 0));
		ctx_clear();
	} else {
		KVT_RUN(test_fuzz);
	}
	unlink(path);
	unlink(path2);
	rmdir(dir);
	free(fbuf);
	return kvt_test_done();
}

/*
 * kvt_test_text.h - what the tests expect of text shown to a person (kvtierd's log values,
 * kvtierctl's messages): written apart from common/kvt_text.c, from the Unicode definitions,
 * so the tests do not share the code they check.
 */
#ifndef KVT_TEST_TEXT_H
#define KVT_TEST_TEXT_H

#include <stddef.h>

/* Code point of the well-formed UTF-8 sequence at p (its length in *n), or -1 (*n = 1 when
 * the lead byte alone says so). Shortest form, no surrogates, <= U+10FFFF. */
static inline long kvt_test_decode_utf8(const unsigned char *p, size_t *n)
{
	unsigned char c = p[0];
	long cp, min;
	if (c < 0x80) {
		*n = 1;
		return c;
	}
	if ((c & 0xe0) == 0xc0) {
		*n = 2, cp = c & 0x1f, min = 0x80;
	} else if ((c & 0xf0) == 0xe0) {
		*n = 3, cp = c & 0x0f, min = 0x800;
	} else if ((c & 0xf8) == 0xf0) {
		*n = 4, cp = c & 0x07, min = 0x10000;
	} else {
		*n = 1;
		return -1;
	}
	for (size_t i = 1; i < *n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return -1;
		cp = cp << 6 | (p[i] & 0x3f);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return -1;
	return cp;
}

/* 1 when cp is a format character (Cf) or a line / paragraph separator (Zl, Zp) in Unicode
 * 15.1's UnicodeData.txt: the bidi controls (U+061C ALM, U+200E LRM, U+200F RLM, U+202A..U+202E
 * LRE RLE PDF LRO RLO, U+2066..U+2069 LRI RLI FSI PDI), the zero-width ones, U+2028 U+2029,
 * U+FEFF, the tags, ... */
static inline int kvt_test_is_format(long cp)
{
	static const long cf[][2] = {
		{0xad, 0xad},       /* SOFT HYPHEN */
		{0x600, 0x605},     /* ARABIC NUMBER SIGN .. ARABIC NUMBER MARK ABOVE */
		{0x61c, 0x61c},     /* ARABIC LETTER MARK */
		{0x6dd, 0x6dd},     /* ARABIC END OF AYAH */
		{0x70f, 0x70f},     /* SYRIAC ABBREVIATION MARK */
		{0x890, 0x891},     /* ARABIC POUND / PIASTRE MARK ABOVE */
		{0x8e2, 0x8e2},     /* ARABIC DISPUTED END OF AYAH */
		{0x180e, 0x180e},   /* MONGOLIAN VOWEL SEPARATOR */
		{0x200b, 0x200f},   /* ZERO WIDTH SPACE .. RIGHT-TO-LEFT MARK */
		{0x2028, 0x2028},   /* LINE SEPARATOR (Zl) */
		{0x2029, 0x2029},   /* PARAGRAPH SEPARATOR (Zp) */
		{0x202a, 0x202e},   /* LEFT-TO-RIGHT EMBEDDING .. RIGHT-TO-LEFT OVERRIDE */
		{0x2060, 0x2064},   /* WORD JOINER .. INVISIBLE PLUS */
		{0x2066, 0x206f},   /* LEFT-TO-RIGHT ISOLATE .. NOMINAL DIGIT SHAPES */
		{0xfeff, 0xfeff},   /* ZERO WIDTH NO-BREAK SPACE (BOM) */
		{0xfff9, 0xfffb},   /* INTERLINEAR ANNOTATION ANCHOR .. TERMINATOR */
		{0x110bd, 0x110bd}, /* KAITHI NUMBER SIGN */
		{0x110cd, 0x110cd}, /* KAITHI NUMBER SIGN ABOVE */
		{0x13430, 0x1343f}, /* EGYPTIAN HIEROGLYPH VERTICAL JOINER .. END WALLED ENCLOSURE */
		{0x1bca0, 0x1bca3}, /* SHORTHAND FORMAT LETTER OVERLAP .. UP STEP */
		{0x1d173, 0x1d17a}, /* MUSICAL SYMBOL BEGIN BEAM .. END PHRASE */
		{0xe0001, 0xe0001}, /* LANGUAGE TAG */
		{0xe0020, 0xe007f}, /* TAG SPACE .. CANCEL TAG */
	};
	for (size_t i = 0; i < sizeof cf / sizeof cf[0]; i++)
		if (cp >= cf[i][0] && cp <= cf[i][1])
			return 1;
	return 0;
}

/* 1 when code point cp may reach a terminal raw: not a control (C0, DEL, C1), not a format
 * character or separator (kvt_test_is_format). */
static inline int kvt_test_shown_raw_ok(long cp)
{
	return cp >= 0x20 && cp != 0x7f && !(cp >= 0x80 && cp <= 0x9f) && !kvt_test_is_format(cp);
}

/* Offset of the first thing in s that must not reach a terminal raw (a code point that
 * kvt_test_shown_raw_ok refuses, broken UTF-8; newlines allowed when lines is set), or -1. */
static inline long kvt_test_raw_unsafe(const char *s, int lines)
{
	const unsigned char *p = (const unsigned char *)s;
	while (*p) {
		size_t w;
		long cp = kvt_test_decode_utf8(p, &w);
		if (!(lines && cp == '\n') && (cp < 0 || !kvt_test_shown_raw_ok(cp)))
			return (long)(p - (const unsigned char *)s);
		for (size_t i = 0; i < w && *p; i++)
			p++;
	}
	return -1;
}

#endif

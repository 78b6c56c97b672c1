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

/* 1 when code point cp may reach a terminal raw: not a control (C0, DEL, C1). */
static inline int kvt_test_shown_raw_ok(long cp)
{
	return cp >= 0x20 && cp != 0x7f && !(cp >= 0x80 && cp <= 0x9f);
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

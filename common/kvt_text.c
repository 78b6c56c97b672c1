#include "kvt_text.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Bytes of the well-formed UTF-8 sequence at p (RFC 3629: no overlongs, no surrogates, nothing
 * above U+10FFFF), or 0. p is NUL-terminated and each byte is checked before the next is read. */
static size_t utf8_len(const unsigned char *p)
{
	unsigned char c = p[0], lo = 0x80, hi = 0xbf;
	size_t n;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4;
	else
		return 0;
	if (c == 0xe0)
		lo = 0xa0;
	else if (c == 0xed)
		hi = 0x9f;
	else if (c == 0xf0)
		lo = 0x90;
	else if (c == 0xf4)
		hi = 0x8f;
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i < n; i++)
		if (p[i] < 0x80 || p[i] > 0xbf)
			return 0;
	return n;
}

/* Unicode's format characters (general category Cf: bidi embeddings, overrides and isolates,
 * zero-width characters, the BOM, tags...) and the line and paragraph separators (Zl, Zp), as
 * of Unicode 15.1. A terminal or a log viewer shows them as nothing or acts on them: U+202E
 * reverses what follows, U+2028 breaks the line, so a value could make a log line read as
 * another. */
static const struct {
	uint32_t lo, hi;
} format_chars[] = {
	{0x00ad, 0x00ad},   {0x0600, 0x0605},   {0x061c, 0x061c},   {0x06dd, 0x06dd},
	{0x070f, 0x070f},   {0x0890, 0x0891},   {0x08e2, 0x08e2},   {0x180e, 0x180e},
	{0x200b, 0x200f},   {0x2028, 0x202e},   {0x2060, 0x2064},   {0x2066, 0x206f},
	{0xfeff, 0xfeff},   {0xfff9, 0xfffb},   {0x110bd, 0x110bd}, {0x110cd, 0x110cd},
	{0x13430, 0x1343f}, {0x1bca0, 0x1bca3}, {0x1d173, 0x1d17a}, {0xe0001, 0xe0001},
	{0xe0020, 0xe007f},
};

/* The code point of the well-formed sequence of n bytes at p is a format character. */
static int is_format(const unsigned char *p, size_t n)
{
	static const unsigned char lead_mask[5] = {0, 0, 0x1f, 0x0f, 0x07};
	uint32_t cp = p[0] & lead_mask[n];
	for (size_t i = 1; i < n; i++)
		cp = cp << 6 | (p[i] & 0x3fu);
	for (size_t i = 0; i < sizeof format_chars / sizeof format_chars[0]; i++)
		if (cp >= format_chars[i].lo && cp <= format_chars[i].hi)
			return 1;
	return 0;
}

enum unit_kind { UNIT_PLAIN, UNIT_BACKSLASH, UNIT_HEX };

/* The next unit of s: *raw bytes of s written as they are (printable ASCII, well-formed
 * UTF-8), after a backslash ('"' and '\\' with KVT_TEXT_BACKSLASH), or each as \xNN (a control
 * byte, 0x7f, a C1 control U+0080..U+009F, which a terminal acts on like ESC sequences, a
 * format character or separator, a byte of no well-formed sequence). Returns the characters
 * it writes. */
static size_t unit(const unsigned char *p, unsigned flags, size_t *raw, enum unit_kind *kind)
{
	unsigned char c = p[0];
	*raw = 1;
	if (c >= 0x80) {
		size_t n = utf8_len(p);
		if (n && !(c == 0xc2 && p[1] <= 0x9f) && !is_format(p, n)) {
			*raw = n;
			*kind = UNIT_PLAIN;
			return n;
		}
		if (n)
			*raw = n; /* a C1 control or a format character: all its bytes */
		*kind = UNIT_HEX;
		return 4 * *raw;
	}
	if (c < 0x20 || c == 0x7f) {
		*kind = UNIT_HEX;
		return 4;
	}
	*kind = (flags & KVT_TEXT_BACKSLASH) && (c == '"' || c == '\\') ? UNIT_BACKSLASH
									 : UNIT_PLAIN;
	return *kind == UNIT_BACKSLASH ? 2 : 1;
}

const char *kvt_text_escape(char *buf, size_t len, const char *s, unsigned flags)
{
	return kvt_text_escape_n(buf, len, s, SIZE_MAX, flags);
}

const char *kvt_text_escape_n(char *buf, size_t len, const char *s, size_t n, unsigned flags)
{
	size_t o = 0, raw;
	enum unit_kind kind;
	if (!len)
		return buf;
	/* Whole units only, with room kept for the NUL, none reaching past s + n. */
	const unsigned char *p0 = (const unsigned char *)s;
	for (const unsigned char *p = p0; *p; p += raw) {
		size_t w = unit(p, flags, &raw, &kind);
		if ((size_t)(p - p0) + raw > n || o + w >= len)
			break;
		if (kind == UNIT_HEX) {
			for (size_t i = 0; i < raw; i++)
				o += (size_t)snprintf(buf + o, len - o, "\\x%02x", p[i]);
			continue;
		}
		if (kind == UNIT_BACKSLASH)
			buf[o++] = '\\';
		memcpy(buf + o, p, raw);
		o += raw;
	}
	buf[o] = '\0';
	return buf;
}

const char *kvt_text_quote(char *buf, size_t len, const char *s)
{
	size_t raw;
	enum unit_kind kind;
	int quote = *s == '\0';
	if (!len)
		return buf;
	for (const unsigned char *p = (const unsigned char *)s; *p && !quote; p += raw) {
		unit(p, KVT_TEXT_BACKSLASH, &raw, &kind);
		quote = kind != UNIT_PLAIN || *p == ' ' || *p == '=';
	}
	if (!quote) {
		kvt_text_escape(buf, len, s, KVT_TEXT_BACKSLASH);
		return buf;
	}
	if (len < 3) {
		buf[0] = '\0';
		return buf;
	}
	/* the content gets len - 2: room for both quotes and the NUL, as one cut */
	size_t n = strlen(kvt_text_escape(buf + 1, len - 2, s, KVT_TEXT_BACKSLASH));
	buf[0] = '"';
	buf[n + 1] = '"';
	buf[n + 2] = '\0';
	return buf;
}

int kvt_text_parse_dec(const char *s, const char *end, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;
	if (s == end)
		return -EINVAL;
	for (; s < end; s++) {
		if (*s < '0' || *s > '9' || v > (max - (uint64_t)(*s - '0')) / 10)
			return -EINVAL;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return 0;
}

#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int log_level = KVT_LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};

void kvt_log_set_level(int level)
{
	__atomic_store_n(&log_level, level, __ATOMIC_RELAXED);
}

int kvt_log_get_level(void)
{
	return __atomic_load_n(&log_level, __ATOMIC_RELAXED);
}

int kvt_log_level_parse(const char *name)
{
	for (int i = 0; i < 4; i++)
		if (strcmp(name, level_names[i]) == 0)
			return i;
	return -EINVAL;
}

const char *kvt_log_level_name(int level)
{
	return level >= 0 && level < 4 ? level_names[level] : "unknown";
}

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

enum unit_kind { UNIT_PLAIN, UNIT_BACKSLASH, UNIT_HEX };

/* The next unit of s in a quoted value: *raw bytes of s written as they are (printable ASCII,
 * well-formed UTF-8), after a backslash ('"' and '\\'), or each as \xNN (a control byte, 0x7f,
 * a C1 control U+0080..U+009F, which a terminal acts on like ESC sequences, a byte of no
 * well-formed sequence). Returns the characters it writes. */
static size_t unit(const unsigned char *p, size_t *raw, enum unit_kind *kind)
{
	unsigned char c = p[0];
	*raw = 1;
	if (c >= 0x80) {
		size_t n = utf8_len(p);
		if (n && !(c == 0xc2 && p[1] <= 0x9f)) {
			*raw = n;
			*kind = UNIT_PLAIN;
			return n;
		}
		if (n)
			*raw = n; /* a C1 control: both bytes */
		*kind = UNIT_HEX;
		return 4 * *raw;
	}
	if (c < 0x20 || c == 0x7f) {
		*kind = UNIT_HEX;
		return 4;
	}
	*kind = c == '"' || c == '\\' ? UNIT_BACKSLASH : UNIT_PLAIN;
	return *kind == UNIT_BACKSLASH ? 2 : 1;
}

const char *kvt_log_quote(char *buf, size_t len, const char *s)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t o = 0, raw;
	enum unit_kind kind;
	int quote = *u == '\0';
	if (!len)
		return buf;
	for (const unsigned char *p = u; *p; p += raw) {
		unit(p, &raw, &kind);
		if (kind != UNIT_PLAIN || *p == ' ' || *p == '=')
			quote = 1;
	}
	if (quote) {
		if (len < 3) {
			buf[0] = '\0';
			return buf;
		}
		buf[o++] = '"';
	}
	/* Whole units only, with room kept for the closing quote and the NUL: a short buffer cuts
	 * the value before an escape or a UTF-8 sequence, never inside one. */
	for (const unsigned char *p = u; *p; p += raw) {
		size_t w = unit(p, &raw, &kind);
		if (o + w + (size_t)quote >= len)
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
	if (quote)
		buf[o++] = '"';
	buf[o] = '\0';
	return buf;
}

void kvt_log(int level, const char *msg, const char *fmt, ...)
{
	if (level < kvt_log_get_level())
		return;
	char line[2048];
	char qmsg[512];
	struct timespec ts;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	int n = snprintf(line, sizeof line,
			 "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s msg=%s",
			 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			 tm.tm_sec, ts.tv_nsec / 1000000, kvt_log_level_name(level),
			 kvt_log_quote(qmsg, sizeof qmsg, msg));
	if (n < 0)
		return;
	if ((size_t)n >= sizeof line - 2)
		n = (int)sizeof line - 2;
	if (fmt && *fmt) {
		line[n++] = ' ';
		va_list ap;
		va_start(ap, fmt);
		int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
		va_end(ap);
		if (m > 0)
			n += (size_t)m < sizeof line - (size_t)n - 1 ? m : (int)(sizeof line - (size_t)n - 2);
	}
	line[n++] = '\n';
	/* One write per line: concurrent threads never interleave inside a line. */
	ssize_t w = write(STDERR_FILENO, line, (size_t)n);
	(void)w;
}

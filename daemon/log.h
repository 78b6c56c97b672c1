/*
 * log.h - logfmt lines on stderr, one per event (journald and `kubectl logs` friendly):
 *   ts=2026-11-29T05:40:00.123Z level=info msg="listening" socket=/run/kvtier/kvtierd.sock
 * The caller formats the key=value tail itself (kvt_log_quote() helps with values that may
 * hold spaces). The level is a global that SIGHUP may change while other threads log, so it is
 * an atomic read; each line is written with one write(2) so lines never interleave.
 */
#ifndef KVT_LOG_H
#define KVT_LOG_H

#include <stddef.h>

enum kvt_log_level { KVT_LOG_DEBUG = 0, KVT_LOG_INFO = 1, KVT_LOG_WARN = 2, KVT_LOG_ERROR = 3 };

void kvt_log_set_level(int level);
int kvt_log_get_level(void);
int kvt_log_level_parse(const char *name); /* level, or -EINVAL */
const char *kvt_log_level_name(int level);

/* msg is quoted; fmt (may be NULL) produces the rest of the line: key=value pairs. */
void kvt_log(int level, const char *msg, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Writes s as a logfmt value into buf; returns buf. kvt_text_quote (common/kvt_text.h), the
 * one copy kvtierctl uses too: the value is quoted when s is empty or holds a space, '=', '"',
 * '\\' or a byte it escapes; inside the quotes '"' and '\\' take a backslash, and control bytes
 * (< 0x20, 0x7f), C1 controls in UTF-8 (0xc2 0x80..0x9f), Unicode format characters and
 * separators (bidi overrides and isolates, zero-width characters, U+2028/2029, the BOM: a client
 * cannot make a line read as another) and bytes of no well-formed UTF-8 sequence are written as
 * \xNN (as config errors quote user text), so no byte a terminal acts on reaches it; other
 * well-formed UTF-8 passes as is. A short buffer cuts the value before an
 * escape or a UTF-8 sequence, never inside one; buf is always NUL-terminated (len > 0) and a
 * quoted value always closed (len >= 3). */
const char *kvt_log_quote(char *buf, size_t len, const char *s);

#define kvt_log_debug(...) kvt_log(KVT_LOG_DEBUG, __VA_ARGS__)
#define kvt_log_info(...) kvt_log(KVT_LOG_INFO, __VA_ARGS__)
#define kvt_log_warn(...) kvt_log(KVT_LOG_WARN, __VA_ARGS__)
#define kvt_log_error(...) kvt_log(KVT_LOG_ERROR, __VA_ARGS__)

#endif

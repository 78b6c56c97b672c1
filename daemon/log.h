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

/* Writes s as a logfmt value (quoted and escaped when needed) into buf; returns buf. */
const char *kvt_log_quote(char *buf, size_t len, const char *s);

#define kvt_log_debug(...) kvt_log(KVT_LOG_DEBUG, __VA_ARGS__)
#define kvt_log_info(...) kvt_log(KVT_LOG_INFO, __VA_ARGS__)
#define kvt_log_warn(...) kvt_log(KVT_LOG_WARN, __VA_ARGS__)
#define kvt_log_error(...) kvt_log(KVT_LOG_ERROR, __VA_ARGS__)

#endif

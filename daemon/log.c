#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvt_text.h"

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

const char *kvt_log_quote(char *buf, size_t len, const char *s)
{
	return kvt_text_quote(buf, len, s);
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

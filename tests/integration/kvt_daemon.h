/*
 * kvt_daemon.h - integration-test helper: runs a real kvtierd on a unix socket in a fresh
 * temporary directory, waits (bounded) until it answers health SERVING, and stops it with
 * SIGTERM checking that it exits 0.
 *
 * The daemon binary is KVTIERD_PATH (set by CMake) unless $KVTIERD names another. Its stderr
 * goes to <dir>/kvtierd.log, printed when something goes wrong.
 */
#ifndef KVT_DAEMON_H
#define KVT_DAEMON_H

#include <sys/types.h>

#include "kvtier_client.h"

struct kvt_daemon {
	pid_t pid;
	char dir[256];
	char socket_path[320];
	char target[340];
	char log_path[320];
};

/* extra_args: NULL-terminated "--name=value" flags (may be NULL). Returns 0 when the daemon
 * serves, else a negative errno after printing why (and the log tail). */
int kvt_daemon_start(struct kvt_daemon *d, const char *const *extra_args);
/* SIGTERM, bounded wait. Returns the exit status (0 = clean), or -1 when it had to be killed
 * or died by a signal. Removes the temporary directory. */
int kvt_daemon_stop(struct kvt_daemon *d);
/* SIGKILL, reaped; keeps the directory (socket file and log) for kvt_daemon_restart. Returns 0
 * when the daemon died by that SIGKILL. */
int kvt_daemon_kill(struct kvt_daemon *d);
/* After kvt_daemon_kill: starts a new kvtierd in the same directory on the same socket path
 * (the dead one's socket file is still there), log appended; like kvt_daemon_start. */
int kvt_daemon_restart(struct kvt_daemon *d, const char *const *extra_args);
/* Connects a client to the daemon (connect timeout 5 s). */
int kvt_daemon_client(const struct kvt_daemon *d, uint32_t max_message_bytes,
		      struct kvt_client **out);
/* A test main's setup: kvt_daemon_start + kvt_daemon_client (default message limit). On
 * failure prints the TAP "not ok" line, stops a started daemon and returns -1. */
int kvt_daemon_start_client(struct kvt_daemon *d, const char *const *extra_args,
			    struct kvt_client **out);
/* Prints the last lines of the daemon's log (diagnostics on failure). */
void kvt_daemon_print_log(const struct kvt_daemon *d, int max_lines);

#endif

/*
 * kvt_daemon.c - start/stop a real kvtierd for integration tests (see kvt_daemon.h).
 */
#define _GNU_SOURCE
#include "kvt_daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef KVTIERD_PATH
#define KVTIERD_PATH "kvtierd"
#endif

#define START_TIMEOUT_MS 15000
#define STOP_TIMEOUT_MS 30000

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The short pause between two polls of a bounded wait (never used as synchronisation: every
 * wait re-checks its condition and fails loudly at its deadline). */
static void poll_pause(void)
{
	struct timespec ts = { 0, 20 * 1000 * 1000 };
	nanosleep(&ts, NULL);
}

void kvt_daemon_print_log(const struct kvt_daemon *d, int max_lines)
{
	char cmd[400];
	fprintf(stdout, "# ---- last %d lines of %s ----\n", max_lines, d->log_path);
	fflush(stdout);
	snprintf(cmd, sizeof(cmd), "tail -n %d '%s' | sed 's/^/# /'", max_lines, d->log_path);
	if (system(cmd) != 0)
		fprintf(stdout, "# (no log)\n");
	fflush(stdout);
}

static void remove_dir(const char *dir)
{
	char cmd[300];
	if (!dir[0] || strncmp(dir, "/tmp/kvtier-it-", 15) != 0)
		return; /* only ever what mkdtemp made here */
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stdout, "# could not remove %s\n", dir);
}

static int spawn(struct kvt_daemon *d, const char *const *extra_args, int log_flag);

int kvt_daemon_client(const struct kvt_daemon *d, uint32_t max_message_bytes,
		      struct kvt_client **out)
{
	struct kvt_client_options o = { 0 };
	struct kvt_client_status st;
	int rc;

	o.target = d->target;
	o.connect_timeout_ms = 5000;
	o.max_message_bytes = max_message_bytes;
	rc = kvt_client_connect(&o, out, &st);
	if (rc)
		printf("# connect %s: %d %s: %s\n", d->target, rc, kvt_client_code_name(st.code),
		       st.message);
	return rc;
}

int kvt_daemon_start_client(struct kvt_daemon *d, const char *const *extra_args,
			    struct kvt_client **out)
{
	if (kvt_daemon_start(d, extra_args) != 0) {
		printf("not ok - kvtierd did not start\n");
		return -1;
	}
	if (kvt_daemon_client(d, 0, out) != 0) {
		kvt_daemon_stop(d);
		printf("not ok - connect\n");
		return -1;
	}
	return 0;
}

int kvt_daemon_start(struct kvt_daemon *d, const char *const *extra_args)
{
	memset(d, 0, sizeof(*d));
	d->pid = -1;
	snprintf(d->dir, sizeof(d->dir), "/tmp/kvtier-it-XXXXXX");
	if (!mkdtemp(d->dir)) {
		printf("# mkdtemp: %s\n", strerror(errno));
		d->dir[0] = '\0';
		return -errno;
	}
	snprintf(d->socket_path, sizeof(d->socket_path), "%s/kvtierd.sock", d->dir);
	snprintf(d->target, sizeof(d->target), "unix:%s", d->socket_path);
	snprintf(d->log_path, sizeof(d->log_path), "%s/kvtierd.log", d->dir);
	return spawn(d, extra_args, O_TRUNC);
}

int kvt_daemon_kill(struct kvt_daemon *d)
{
	int status = 0;
	if (d->pid <= 0)
		return -1;
	kill(d->pid, SIGKILL);
	if (waitpid(d->pid, &status, 0) != d->pid)
		return -1;
	d->pid = -1;
	return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? 0 : -1;
}

int kvt_daemon_restart(struct kvt_daemon *d, const char *const *extra_args)
{
	if (d->pid > 0 || !d->dir[0])
		return -EINVAL; /* only after kvt_daemon_kill, in the directory it kept */
	return spawn(d, extra_args, O_APPEND);
}

/* Starts kvtierd in d->dir on d->socket_path (log opened with log_flag: O_TRUNC or O_APPEND)
 * and waits, bounded, until it answers health SERVING. */
static int spawn(struct kvt_daemon *d, const char *const *extra_args, int log_flag)
{
	const char *bin = getenv("KVTIERD");
	const char *argv[64];
	char sock_arg[400];
	int n = 0, logfd;
	uint64_t deadline;
	struct kvt_client *c = NULL;

	if (!bin || !*bin)
		bin = KVTIERD_PATH;
	snprintf(sock_arg, sizeof(sock_arg), "--socket=%s", d->socket_path);

	argv[n++] = bin;
	argv[n++] = sock_arg;
	for (int i = 0; extra_args && extra_args[i] && n < 62; i++)
		argv[n++] = extra_args[i];
	argv[n] = NULL;

	logfd = open(d->log_path, O_WRONLY | O_CREAT | log_flag | O_CLOEXEC, 0600);
	if (logfd < 0) {
		printf("# open %s: %s\n", d->log_path, strerror(errno));
		return -errno;
	}
	fflush(stdout);
	const pid_t parent = getpid();
	d->pid = fork();
	if (d->pid < 0) {
		close(logfd);
		return -errno;
	}
	if (d->pid == 0) {
		/* a test that dies (a sanitizer report, a ctest timeout) takes its daemon along
		 * instead of leaving it running with its socket and memory */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
			_exit(125);
		dup2(logfd, STDERR_FILENO);
		dup2(logfd, STDOUT_FILENO);
		if (chdir(d->dir) != 0)
			_exit(126);
		execv(bin, (char *const *)argv);
		fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
		_exit(127);
	}
	close(logfd);

	/* Bounded wait: the process must stay alive and answer health SERVING in time. */
	deadline = now_ms() + START_TIMEOUT_MS;
	for (;;) {
		int status, serving = 0;
		struct kvt_client_status st;
		pid_t w = waitpid(d->pid, &status, WNOHANG);
		if (w == d->pid) {
			printf("# kvtierd exited during start-up (status 0x%x)\n", status);
			kvt_daemon_print_log(d, 40);
			d->pid = -1;
			return -ECHILD;
		}
		if (!c) {
			struct kvt_client_options o = { 0 };
			o.target = d->target;
			o.lazy = 1;
			if (kvt_client_connect(&o, &c, &st) != 0) {
				printf("# client: %s\n", st.message);
				return -EIO;
			}
		}
		if (kvt_client_health(c, "", 1000, &serving, &st) == 0 && serving == 1)
			break;
		if (now_ms() > deadline) {
			printf("# kvtierd did not answer health SERVING within %d ms (last: %s %s)\n",
			       START_TIMEOUT_MS, kvt_client_code_name(st.code), st.message);
			kvt_daemon_print_log(d, 40);
			kvt_client_close(c);
			kill(d->pid, SIGKILL);
			waitpid(d->pid, NULL, 0);
			d->pid = -1;
			return -ETIMEDOUT;
		}
		poll_pause();
	}
	kvt_client_close(c);
	return 0;
}

int kvt_daemon_stop(struct kvt_daemon *d)
{
	uint64_t deadline;
	int status = 0, rc = -1;

	if (d->pid <= 0) {
		remove_dir(d->dir);
		return -1;
	}
	kill(d->pid, SIGTERM);
	deadline = now_ms() + STOP_TIMEOUT_MS;
	for (;;) {
		pid_t w = waitpid(d->pid, &status, WNOHANG);
		if (w == d->pid)
			break;
		if (now_ms() > deadline) {
			printf("# kvtierd did not exit within %d ms of SIGTERM; killing it\n",
			       STOP_TIMEOUT_MS);
			kvt_daemon_print_log(d, 40);
			kill(d->pid, SIGKILL);
			waitpid(d->pid, &status, 0);
			d->pid = -1;
			remove_dir(d->dir);
			return -1;
		}
		poll_pause();
	}
	d->pid = -1;
	if (WIFEXITED(status))
		rc = WEXITSTATUS(status);
	if (rc != 0) {
		printf("# kvtierd exit status 0x%x after SIGTERM\n", status);
		kvt_daemon_print_log(d, 40);
	}
	remove_dir(d->dir);
	return rc;
}

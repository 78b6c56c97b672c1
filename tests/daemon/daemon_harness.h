/*
 * daemon_harness.h - starts a real kvtierd on a unix socket in a temporary directory and
 * makes unary calls to it through the gRPC C core (tests of the daemon itself; the full RPC
 * matrix goes through libkvtier in tests/client).
 */
#ifndef KVT_DAEMON_HARNESS_H
#define KVT_DAEMON_HARNESS_H

#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <signal.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvt_raw_call.h"

struct kvt_harness {
	char dir[256];
	char sock[320];
	char log[320];
	pid_t pid;
	grpc_channel *ch;
	grpc_completion_queue *cq;
};

/* Starts kvtierd with extra args (NULL-terminated). */
static int kvt_harness_start(struct kvt_harness *h, const char *kvtierd, char *const extra[])
{
	memset(h, 0, sizeof *h);
	snprintf(h->dir, sizeof h->dir, "/tmp/kvtierd-test-XXXXXX");
	if (!mkdtemp(h->dir))
		return -errno;
	snprintf(h->sock, sizeof h->sock, "%s/kvtierd.sock", h->dir);
	snprintf(h->log, sizeof h->log, "%s/kvtierd.log", h->dir);
	char sockarg[400];
	snprintf(sockarg, sizeof sockarg, "--socket=%s", h->sock);
	char *argv[32];
	int n = 0;
	argv[n++] = (char *)kvtierd;
	argv[n++] = sockarg;
	for (int i = 0; extra && extra[i] && n < 30; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	const pid_t parent = getpid();
	h->pid = fork();
	if (h->pid < 0)
		return -errno;
	if (h->pid == 0) {
		/* dies with the test (see tests/integration/kvt_daemon.c) */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
			_exit(125);
		FILE *f = freopen(h->log, "w", stderr);
		(void)f;
		execv(kvtierd, argv);
		_exit(127);
	}
	char target[400];
	snprintf(target, sizeof target, "unix:%s", h->sock);
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	h->ch = grpc_channel_create(target, creds, NULL);
	grpc_channel_credentials_release(creds);
	h->cq = grpc_completion_queue_create_for_pluck(NULL);
	return 0;
}

/* One unary call to the harness's daemon (kvt_raw_unary); wait_ready is the bounded wait for
 * its start-up. */
static grpc_status_code kvt_harness_call(struct kvt_harness *h, const char *method,
					 const void *req, size_t req_len, uint8_t **resp,
					 size_t *resp_len, char *details, size_t dlen,
					 int wait_ready, int timeout_ms)
{
	return kvt_raw_unary(h->ch, h->cq, method, req, req_len, resp, resp_len, details, dlen,
			     wait_ready, timeout_ms);
}

/* Sends sig and waits (bounded) for the daemon to exit; returns its exit code or -1. */
static int kvt_harness_stop(struct kvt_harness *h, int sig, int timeout_ms)
{
	if (h->ch) {
		grpc_channel_destroy(h->ch);
		h->ch = NULL;
	}
	kill(h->pid, sig);
	for (int waited = 0;; waited += 10) {
		int st;
		pid_t r = waitpid(h->pid, &st, WNOHANG);
		if (r == h->pid)
			return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
		if (waited >= timeout_ms) {
			kill(h->pid, SIGKILL);
			waitpid(h->pid, &st, 0);
			return -2;
		}
		/* Polling the child's exit: the bounded wait itself, not a synchronisation. */
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}

static void kvt_harness_cleanup(struct kvt_harness *h)
{
	if (h->cq) {
		/* Every call was plucked to completion: nothing is left to drain. */
		grpc_completion_queue_shutdown(h->cq);
		grpc_completion_queue_destroy(h->cq);
		h->cq = NULL;
	}
	unlink(h->sock);
	unlink(h->log);
	rmdir(h->dir);
}

/* Reads the daemon's log (for checks on logfmt lines). */
static char *kvt_harness_log(struct kvt_harness *h)
{
	FILE *f = fopen(h->log, "r");
	if (!f)
		return NULL;
	char *buf = calloc(1, 1 << 20);
	size_t n = fread(buf, 1, (1 << 20) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

#endif

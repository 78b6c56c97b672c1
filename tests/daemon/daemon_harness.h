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

/*
 * One unary call. wait_ready makes the call wait (up to timeout_ms) for the daemon's socket
 * to come up instead of failing fast: the bounded wait for start-up. Returns the status code;
 * *resp (malloc'd) and *resp_len get the reply; details (if non-NULL) the message.
 */
static grpc_status_code kvt_harness_call(struct kvt_harness *h, const char *method,
					 const void *req, size_t req_len, uint8_t **resp,
					 size_t *resp_len, char *details, size_t dlen,
					 int wait_ready, int timeout_ms)
{
	gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
				       gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
	grpc_slice m = grpc_slice_from_copied_string(method);
	grpc_call *call = grpc_channel_create_call(h->ch, NULL, GRPC_PROPAGATE_DEFAULTS, h->cq, m,
						   NULL, dl, NULL);
	grpc_slice_unref(m);
	grpc_slice rs = grpc_slice_from_copied_buffer(req, req_len);
	grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&rs, 1);
	grpc_slice_unref(rs);
	grpc_byte_buffer *recv = NULL;
	grpc_metadata_array imd, tmd;
	grpc_metadata_array_init(&imd);
	grpc_metadata_array_init(&tmd);
	grpc_status_code status = GRPC_STATUS_UNKNOWN;
	grpc_slice sd = grpc_empty_slice();
	grpc_op ops[6];
	memset(ops, 0, sizeof ops);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[0].flags = wait_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &imd;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &recv;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
	ops[5].data.recv_status_on_client.status = &status;
	ops[5].data.recv_status_on_client.status_details = &sd;
	void *tag = (void *)call;
	if (grpc_call_start_batch(call, ops, 6, tag, NULL) == GRPC_CALL_OK)
		grpc_completion_queue_pluck(h->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	if (resp) {
		*resp = NULL;
		*resp_len = 0;
	}
	if (recv && resp) {
		grpc_byte_buffer_reader r;
		grpc_byte_buffer_reader_init(&r, recv);
		grpc_slice all = grpc_byte_buffer_reader_readall(&r);
		grpc_byte_buffer_reader_destroy(&r);
		*resp_len = GRPC_SLICE_LENGTH(all);
		*resp = malloc(*resp_len ? *resp_len : 1);
		memcpy(*resp, GRPC_SLICE_START_PTR(all), *resp_len);
		grpc_slice_unref(all);
	}
	if (details) {
		snprintf(details, dlen, "%.*s", (int)GRPC_SLICE_LENGTH(sd),
			 (const char *)GRPC_SLICE_START_PTR(sd));
	}
	if (recv)
		grpc_byte_buffer_destroy(recv);
	grpc_byte_buffer_destroy(send);
	grpc_slice_unref(sd);
	grpc_metadata_array_destroy(&imd);
	grpc_metadata_array_destroy(&tmd);
	grpc_call_unref(call);
	return status;
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

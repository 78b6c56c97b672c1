/* kvtierctl's messages quote the user's text (flag values, ids, paths, the target) the way
 * kvtierd's log does: a control byte, an escape sequence, a C1 control or broken UTF-8 shows as
 * \xNN and never reaches the terminal raw. Every case of test_escapes fails before kvtierctl
 * connects (or asks health of a socket that does not exist), so no daemon is needed.
 * test_daemon_text: what the daemon sends (session ids, stat and stats fields, a relayed error)
 * is escaped the same way; kvtierd itself refuses such session ids and sends only its own
 * names, so a fake daemon (a few lines of the gRPC C core, in a child process) answers with
 * hostile strings, and with plain printable ASCII that must print exactly as it came.
 * Usage: test_kvtierctl PATH_TO_KVTIERCTL */
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvtier/v1/kvtier.pb-c.h"
#include "kvt_test.h"
#include "kvt_test_proc.h"
#include "kvt_test_text.h"

static const char *g_ctl;

/* Runs kvtierctl with args; its exit status and output (kvt_test_run_capture). */
static int run_ctl(char *const args[], char *out, size_t outlen)
{
	return kvt_test_run_capture(g_ctl, args, out, outlen);
}

struct ctl_case {
	const char *args[10]; /* after argv[0], NULL-terminated */
	int exit_code;
	const char *want;     /* in the output, escaped */
};

static void test_escapes(void)
{
	static const struct ctl_case cases[] = {
		/* a value printed bare is quoted once it needs escapes */
		{{"put", "s", "--scheme", "\x1b[31mred", NULL}, 2,
		 "--scheme \"\\x1b[31mred\" is not none"},
		{{"put", "s", "--key-rounding", "\xc2\x9b" "2J", NULL}, 2,
		 "--key-rounding \"\\xc2\\x9b2J\" is not"},
		{{"put", "s", "--dtype", "x\ny", NULL}, 2, "--dtype \"x\\x0ay\" is not"},
		{{"demo", "--dtype", "\xff", NULL}, 2, "--dtype \"\\xff\" is not"},
		{{"\x1b]0;title\a", NULL}, 2, "unknown command \"\\x1b]0;title\\x07\""},
		/* a format character: U+202E RIGHT-TO-LEFT OVERRIDE, U+2066 LRI */
		{{"put", "s", "--scheme", "a\xe2\x80\xae" "b\xe2\x81\xa6", NULL}, 2,
		 "--scheme \"a\\xe2\\x80\\xaeb\\xe2\\x81\\xa6\" is not"},
		/* inside the message's own quotes: escaped, '"' and '\\' with a backslash */
		{{"put", "s", "--key-bits", "1\x1b", NULL}, 2, "put --key-bits \"1\\x1b\": expected"},
		{{"put", "s", "--key-bits", "a\"b\\", NULL}, 2, "put --key-bits \"a\\\"b\\\\\": expected"},
		{{"--timeout-ms", "\x85", "health", NULL}, 2, "--timeout-ms \"\\x85\": expected"},
		{{"get", "s", "--out-k", "k.npy", "--tokens", "1:\x1b[2J", NULL}, 2,
		 "get --tokens \"1:\\x1b[2J\": expected A:B"},
		/* sentences that carry user text: the .npy reader's error, the preset's, libkvtier's */
		{{"put", "s", "--k", "/nonexistent/\x1b[2J.npy", "--v", "v.npy", NULL}, 1,
		 "/nonexistent/\\x1b[2J.npy: "},
		{{"put", "s", "--preset", "\x1b[1m", NULL}, 2, "--preset '\\x1b[1m' is not"},
		{{"--target", "unix:/nonexistent/\x1b[2J", "health", NULL}, 1,
		 "NOT REACHABLE \"unix:/nonexistent/\\x1b[2J\": "},
	};
	char out[8192];
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const struct ctl_case *c = &cases[i];
		char *args[12] = {(char *)g_ctl};
		for (size_t j = 0; c->args[j]; j++)
			args[j + 1] = (char *)c->args[j];
		int rc = run_ctl(args, out, sizeof out);
		long bad = kvt_test_raw_unsafe(out, 1);
		KVT_CHECK(rc == c->exit_code, "case %zu: exit %d, expected %d: '%s'", i, rc,
			  c->exit_code, out);
		KVT_CHECK(bad < 0, "case %zu: a byte a terminal acts on, 0x%02x at offset %ld of the "
			  "output (expected '%s')", i, bad < 0 ? 0 : (unsigned char)out[bad], bad,
			  c->want);
		KVT_CHECK(strstr(out, c->want) != NULL, "case %zu: '%s' not in the output '%s'", i,
			  c->want, bad < 0 ? out : "(raw bytes, not shown)");
	}
}

/* ---- a fake daemon ----------------------------------------------------------------------- */

/* What the fake daemon sends: each hostile string holds a byte or a code point a terminal
 * acts on; PLAIN_ID is printable ASCII with a space, quotes and a backslash. */
#define PLAIN_ID "job 7 \"a\\x1b\""
#define EVIL_ID "evil\x1b]0;owned\a\x1b[2J"
#define EVIL_ROUNDING "mse\x1b[8m"
#define EVIL_PRESET "p\xc2\x9b" "31m"   /* C1 CSI */
#define EVIL_TIER "host\xe2\x80\xae"    /* U+202E RIGHT-TO-LEFT OVERRIDE */
#define EVIL_VERSION "1.0\x1b[5m"
#define EVIL_ISA "avx2\r"
#define EVIL_TIER_NAME "h\x7fst"
#define EVIL_COUNTER "requests\x1b[1A"
#define EVIL_ERROR "no session \x1b[2J here"

static void fake_info(Kvtier__V1__SessionInfo *i, Kvtier__V1__CodecConfig *c, const char *id)
{
	kvtier__v1__session_info__init(i);
	kvtier__v1__codec_config__init(c);
	i->session_id = (char *)id;
	i->codec = c;
	c->key_rounding = EVIL_ROUNDING;
	c->preset = EVIL_PRESET;
	c->has_scheme = 1;
	c->scheme = (Kvtier__V1__Scheme)99; /* a scheme this kvtierctl does not know */
	i->tier = EVIL_TIER;
}

/* The reply to method: a packed message, or NULL with *code and *details for an error. */
static grpc_byte_buffer *fake_reply(const char *method, grpc_status_code *code,
				    const char **details)
{
	Kvtier__V1__SessionInfo infos[2], *pinfos[2] = { &infos[0], &infos[1] };
	Kvtier__V1__CodecConfig codecs[2];
	Kvtier__V1__ListSessionsResponse list;
	Kvtier__V1__StatsResponse stats;
	Kvtier__V1__TierStats tier, *ptier = &tier;
	Kvtier__V1__Counter counter, *pcounter = &counter;
	ProtobufCMessage *m = NULL;
	uint8_t buf[4096];

	*code = GRPC_STATUS_OK;
	if (strstr(method, "/ListSessions")) {
		kvtier__v1__list_sessions_response__init(&list);
		fake_info(&infos[0], &codecs[0], PLAIN_ID);
		fake_info(&infos[1], &codecs[1], EVIL_ID);
		list.sessions = pinfos;
		list.n_sessions = 2;
		m = &list.base;
	} else if (strstr(method, "/StatSession")) {
		fake_info(&infos[0], &codecs[0], EVIL_ID);
		m = &infos[0].base;
	} else if (strstr(method, "/Stats")) {
		kvtier__v1__stats_response__init(&stats);
		kvtier__v1__tier_stats__init(&tier);
		kvtier__v1__counter__init(&counter);
		tier.name = EVIL_TIER_NAME;
		counter.name = EVIL_COUNTER;
		stats.tiers = &ptier;
		stats.n_tiers = 1;
		stats.counters = &pcounter;
		stats.n_counters = 1;
		stats.version = EVIL_VERSION;
		stats.codec_isa = EVIL_ISA;
		m = &stats.base;
	} else {
		*code = GRPC_STATUS_NOT_FOUND;
		*details = EVIL_ERROR;
		return NULL;
	}
	size_t n = protobuf_c_message_get_packed_size(m);
	if (n > sizeof buf)
		abort();
	protobuf_c_message_pack(m, buf);
	grpc_slice sl = grpc_slice_from_copied_buffer((const char *)buf, n);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
	grpc_slice_unref(sl);
	return bb;
}

static int fake_wait(grpc_completion_queue *cq, void *tag)
{
	grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	return ev.type == GRPC_OP_COMPLETE && ev.tag == tag && ev.success;
}

/* The child's life: serve every call on sock, one at a time, until killed. Writes one byte
 * to ready_fd once it listens. */
static void fake_daemon(const char *sock, int ready_fd)
{
	char addr[400];
	grpc_init();
	grpc_server *srv = grpc_server_create(NULL, NULL);
	grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
	grpc_server_register_completion_queue(srv, cq, NULL);
	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	snprintf(addr, sizeof addr, "unix:%s", sock);
	if (!grpc_server_add_http2_port(srv, addr, creds))
		_exit(3);
	grpc_server_credentials_release(creds);
	grpc_server_start(srv);
	if (write(ready_fd, "r", 1) != 1)
		_exit(3);
	close(ready_fd);
	for (;;) {
		grpc_call *call = NULL;
		grpc_call_details d;
		grpc_metadata_array md;
		grpc_byte_buffer *req = NULL, *reply;
		grpc_status_code code;
		const char *details = NULL;
		char method[128];
		grpc_op ops[4];
		size_t n = 0;
		int cancelled;

		grpc_call_details_init(&d);
		grpc_metadata_array_init(&md);
		if (grpc_server_request_call(srv, &call, &d, &md, cq, cq, (void *)1) != GRPC_CALL_OK ||
		    !fake_wait(cq, (void *)1))
			_exit(3);
		snprintf(method, sizeof method, "%.*s", (int)GRPC_SLICE_LENGTH(d.method),
			 (const char *)GRPC_SLICE_START_PTR(d.method));
		memset(ops, 0, sizeof ops);
		ops[0].op = GRPC_OP_RECV_MESSAGE;
		ops[0].data.recv_message.recv_message = &req;
		if (grpc_call_start_batch(call, ops, 1, (void *)2, NULL) != GRPC_CALL_OK ||
		    !fake_wait(cq, (void *)2))
			_exit(3);
		if (req)
			grpc_byte_buffer_destroy(req);
		reply = fake_reply(method, &code, &details);
		grpc_slice ds = grpc_slice_from_static_string(details ? details : "");
		memset(ops, 0, sizeof ops);
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		if (reply) {
			ops[n].op = GRPC_OP_SEND_MESSAGE;
			ops[n++].data.send_message.send_message = reply;
		}
		ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
		ops[n].data.send_status_from_server.status = code;
		ops[n++].data.send_status_from_server.status_details = details ? &ds : NULL;
		ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
		ops[n++].data.recv_close_on_server.cancelled = &cancelled;
		if (grpc_call_start_batch(call, ops, n, (void *)3, NULL) != GRPC_CALL_OK ||
		    !fake_wait(cq, (void *)3))
			_exit(3);
		if (reply)
			grpc_byte_buffer_destroy(reply);
		grpc_call_unref(call);
		grpc_call_details_destroy(&d);
		grpc_metadata_array_destroy(&md);
	}
}

static void test_daemon_text(void)
{
	static const struct ctl_case cases[] = {
		/* a plain id prints as it came (padded as before); a hostile one escaped */
		{{"sessions", NULL}, 0,
		 "\n" PLAIN_ID "                                     0        0"
		 "            0   0.00x     no ?/0/0\n"},
		{{"sessions", NULL}, 0,
		 "\nevil\\x1b]0;owned\\x07\\x1b[2J                       0        0 "},
		{{"sessions", NULL}, 0, "2 sessions\n"},
		{{"stat", "x", NULL}, 0, "session_id        evil\\x1b]0;owned\\x07\\x1b[2J\n"},
		{{"stat", "x", NULL}, 0, "codec             ? K0/V0"},
		{{"stat", "x", NULL}, 0, "key_rounding mse\\x1b[8m preset p\\xc2\\x9b31m\n"},
		{{"stat", "x", NULL}, 0, "tier              host\\xe2\\x80\\xae\n"},
		{{"stats", NULL}, 0, "version        1.0\\x1b[5m\n"},
		{{"stats", NULL}, 0, "codec_isa      avx2\\x0d, gpu no\n"},
		{{"stats", NULL}, 0, "tier h\\x7fst   used 0"},
		{{"stats", NULL}, 0, "counter requests\\x1b[1A"},
		/* an error the daemon sends (escaped already before: kept so) */
		{{"drop", "x", NULL}, 1, "NOT_FOUND (-2): no session \\x1b[2J here"},
	};
	char dir[] = "/tmp/kvtierctl-test-XXXXXX", sock[64], out[8192], ready;
	int pfd[2];

	KVT_REQUIRE(mkdtemp(dir) != NULL, "mkdtemp");
	snprintf(sock, sizeof sock, "%s/fake.sock", dir);
	KVT_REQUIRE(pipe(pfd) == 0, "pipe");
	const pid_t parent = getpid();
	pid_t pid = fork();
	KVT_REQUIRE(pid >= 0, "fork");
	if (pid == 0) {
		/* dies with the test */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
			_exit(125);
		close(pfd[0]);
		fake_daemon(sock, pfd[1]);
		_exit(0);
	}
	close(pfd[1]);
	/* the child writes once it listens; EOF when it died first */
	KVT_REQUIRE(read(pfd[0], &ready, 1) == 1, "the fake daemon did not start");
	close(pfd[0]);
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		const struct ctl_case *c = &cases[i];
		char *args[14] = { (char *)g_ctl, "--socket", sock };
		for (size_t j = 0; c->args[j]; j++)
			args[j + 3] = (char *)c->args[j];
		int rc = run_ctl(args, out, sizeof out);
		long bad = kvt_test_raw_unsafe(out, 1);
		KVT_CHECK(rc == c->exit_code, "case %zu: exit %d, expected %d: '%s'", i, rc,
			  c->exit_code, bad < 0 ? out : "(raw bytes, not shown)");
		KVT_CHECK(bad < 0, "case %zu: a byte a terminal acts on, 0x%02x at offset %ld of the "
			  "output (expected '%s')", i, bad < 0 ? 0 : (unsigned char)out[bad], bad,
			  c->want);
		KVT_CHECK(strstr(out, c->want) != NULL, "case %zu: '%s' not in the output '%s'", i,
			  c->want, bad < 0 ? out : "(raw bytes, not shown)");
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	unlink(sock);
	rmdir(dir);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s PATH_TO_KVTIERCTL\n", argv[0]);
		return 2;
	}
	g_ctl = argv[1];
	kvt_test_init();
	KVT_RUN(test_escapes);
	KVT_RUN(test_daemon_text);
	return kvt_test_done();
}

/*
 * Where kvtierd runs its handlers: a handler that blocks (here: Prefetch and RestoreToDevice
 * waiting for a session lock, as they would behind a long Append commit or while copying a
 * whole session) must run on the worker pool, so the completion-queue thread keeps serving
 * every other call.
 *
 * The daemon runs in this process (the kvt_daemon library, as kvtierd's main.c starts it) with
 * ONE completion-queue thread and ONE worker, on a unix socket in a temporary directory, so the
 * test can hold a session's lock itself. Synchronisation is by observable state only: the test
 * takes the session lock, sends the blocking call from a second thread, waits (bounded) until
 * the pool's one worker is running a task (kvt_pool_busy() == 1: the call has reached its
 * handler on the pool, and it cannot finish while the lock is held), then makes Health, Stat,
 * OpenSession and ListSessions calls that must all complete while the blocked call is still
 * in flight. Were the handler on the queue thread, the pool would stay idle (the bounded wait
 * fails) and those calls would hang until their deadline. Then the lock is released and the
 * blocked call must answer exactly what it answers unblocked (Prefetch: OK, tier "host";
 * RestoreToDevice without a GPU: FAILED_PRECONDITION).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc.h>

#include "config.h"
#include "kvt_codec.h"
#include "kvt_test.h"
#include "kvtier_client.h"
#include "rpc.h"
#include "session.h"
#include "tier_gpu.h"
#include "tier_host.h"

#define CALL_TIMEOUT_MS 30000
#define WAIT_S 30.0

static struct kvt_tier_host g_host;
static struct kvt_sessions g_sessions;
static struct kvt_tier_gpu *g_gpu;
static struct kvt_daemon g_d;
static struct kvt_rpc_server *g_srv;
static char g_dir[128], g_sock[192], g_target[256];
static struct kvt_client *g_c;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int start_daemon(void)
{
	char err[512];
	struct kvt_config cfg;
	struct kvt_cmdline cmd;
	snprintf(g_dir, sizeof g_dir, "/tmp/kvtierd-dispatch-XXXXXX");
	if (!mkdtemp(g_dir))
		return -1;
	snprintf(g_sock, sizeof g_sock, "--socket=%s/kvtierd.sock", g_dir);
	char *argv[] = {"kvtierd", g_sock, "--cq-threads=1", "--workers=1", "--gpu-enable=no",
			"--log-level=warn", NULL};
	memset(&cmd, 0, sizeof cmd);
	if (kvt_config_load(&cfg, 6, argv, &cmd, NULL, err, sizeof err)) {
		printf("# config: %s\n", err);
		return -1;
	}
	kvt_config_live = cfg;
	kvt_tier_host_init(&g_host, cfg.host_capacity_bytes);
	if (kvt_sessions_init(&g_sessions, &g_host))
		return -1;
	kvt_tier_host_set_reclaim(&g_host, kvt_sessions_reclaim, &g_sessions);
	struct kvt_tier_gpu_config gcfg = {.enable = 0, .staging_bytes = cfg.gpu_staging_bytes,
					   .ipc_idle_ms = 60000, .copy_threads = 1};
	if (kvt_tier_gpu_init(&gcfg, &g_gpu))
		return -1;
	g_sessions.gpu = g_gpu;
	g_d = (struct kvt_daemon){.sessions = &g_sessions, .host = &g_host,
				  .start_ms = kvt_now_ms(), .gpu = g_gpu};
	grpc_init();
	if (kvt_rpc_server_start(&cfg, &g_d, &g_srv, err, sizeof err)) {
		printf("# server: %s\n", err);
		return -1;
	}
	snprintf(g_target, sizeof g_target, "unix:%s/kvtierd.sock", g_dir);
	struct kvt_client_options o;
	struct kvt_client_status st;
	memset(&o, 0, sizeof o);
	o.target = g_target;
	o.call_timeout_ms = CALL_TIMEOUT_MS;
	if (kvt_client_connect(&o, &g_c, &st)) {
		printf("# connect: %s\n", st.message);
		return -1;
	}
	return 0;
}

static void stop_daemon(void)
{
	if (g_c)
		kvt_client_close(g_c);
	if (g_srv) {
		KVT_CHECK(kvt_rpc_server_stop(g_srv, 10000) == 0, "calls had to be cancelled");
		kvt_rpc_server_destroy(g_srv);
	}
	kvt_sessions_destroy(&g_sessions);
	if (g_gpu)
		kvt_tier_gpu_destroy(g_gpu);
	grpc_shutdown();
	rmdir(g_dir);
}

static void open_session(const char *id, uint32_t n_tokens)
{
	struct kvt_client_session_params p;
	struct kvt_client_session_info info;
	struct kvt_client_status st;
	struct kvt_client_shape shape = {2, 2, 64, KVT_CLIENT_DTYPE_F16};
	kvt_client_session_params_init(&p, id, 2, 2, 64, KVT_CLIENT_DTYPE_F16);
	KVT_REQUIRE(kvt_client_open(g_c, &p, &info, &st) == 0, "open %s: %s", id, st.message);
	if (!n_tokens)
		return;
	size_t n = kvt_client_kv_bytes(&shape, n_tokens);
	uint16_t *k = malloc(n), *v = malloc(n);
	KVT_REQUIRE(k && v, "out of memory");
	for (size_t i = 0; i < n / 2; i++) {
		k[i] = kvt_f32_to_f16(kvt_rand_normal());
		v[i] = kvt_f32_to_f16(kvt_rand_normal());
	}
	KVT_CHECK(kvt_client_append(g_c, id, &shape, k, v, n_tokens, NULL, NULL, &st) == 0,
		  "append %s: %s", id, st.message);
	free(k);
	free(v);
}

/* The blocked call, made from its own thread. */
enum blocked_kind { BLOCK_PREFETCH, BLOCK_RESTORE };
struct blocked {
	enum blocked_kind kind;
	const char *session;
	int rc;
	struct kvt_client_status st;
	char tier[32];
	int done; /* atomic */
};

static void *blocked_main(void *arg)
{
	struct blocked *b = arg;
	if (b->kind == BLOCK_PREFETCH) {
		b->rc = kvt_client_prefetch(g_c, b->session, b->tier, sizeof b->tier, &b->st);
	} else {
		uint8_t handle[64];
		memset(handle, 0x5a, sizeof handle);
		struct kvt_client_restore r;
		memset(&r, 0, sizeof r);
		r.session_id = b->session;
		r.ipc_mem_handle = handle;
		r.ipc_mem_handle_bytes = sizeof handle;
		r.buffer_bytes = 64 << 20;
		r.layout = 1;
		r.token_end = KVT_CLIENT_END;
		r.layer_end = KVT_CLIENT_ALL_LAYERS;
		r.device_ordinal = -1;
		b->rc = kvt_client_restore_to_device(g_c, &r, NULL, &b->st);
	}
	__atomic_store_n(&b->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/* Waits (bounded) until the pool's one worker runs `busy` tasks (1: the blocked call's
 * handler; 0: idle, as the previous call's worker may still be returning from its task after
 * the client got the reply). */
static int wait_pool_busy(unsigned busy)
{
	double t0 = now_s();
	while (kvt_pool_busy() != busy) {
		if (now_s() - t0 > WAIT_S)
			return -1;
		struct timespec ts = {0, 1000000};
		nanosleep(&ts, NULL);
	}
	return 0;
}

/* Light calls that run on the (single) completion-queue thread must all complete. */
static void light_calls_complete(const char *what, const struct blocked *b)
{
	struct kvt_client_status st;
	struct kvt_client_session_info info;
	char id[64];
	int serving = 0;
	double t0 = now_s();
	KVT_CHECK(kvt_client_health(g_c, "", CALL_TIMEOUT_MS, &serving, &st) == 0 && serving == 1,
		  "%s: Health while blocked: %s %s (serving %d)", what,
		  kvt_client_code_name(st.code), st.message, serving);
	KVT_CHECK(kvt_client_stat(g_c, "dispatch-other", &info, &st) == 0 && info.n_tokens == 40,
		  "%s: StatSession of another session while blocked: %s %s", what,
		  kvt_client_code_name(st.code), st.message);
	snprintf(id, sizeof id, "dispatch-new-%d", (int)b->kind);
	open_session(id, 0);
	KVT_CHECK(kvt_client_stat(g_c, id, &info, &st) == 0 && info.n_tokens == 0,
		  "%s: the session opened while blocked: %s", what, st.message);
	/* still blocked: the lock is held, so the call cannot have answered */
	KVT_CHECK(!__atomic_load_n(&b->done, __ATOMIC_ACQUIRE),
		  "%s: the blocked call answered while its session lock was held", what);
	printf("# %s: light calls took %.1f ms while the handler was blocked\n", what,
	       (now_s() - t0) * 1e3);
}

static void run_blocked(enum blocked_kind kind, const char *what)
{
	struct kvt_session *s = NULL;
	struct blocked b;
	pthread_t th;
	memset(&b, 0, sizeof b);
	b.kind = kind;
	b.session = "dispatch-held";
	KVT_REQUIRE(wait_pool_busy(0) == 0, "%s: the pool stays busy before the test", what);
	KVT_REQUIRE(kvt_sessions_get(&g_sessions, KVT_TENANT_LOCAL, b.session, &s) == 0,
		    "%s: the held session is not in the table", what);
	kvt_session_lock(s);
	KVT_REQUIRE(pthread_create(&th, NULL, blocked_main, &b) == 0, "pthread_create");
	int busy = wait_pool_busy(1);
	KVT_CHECK(busy == 0, "%s: its handler never reached the worker pool within %.0f s (it "
		  "runs on the completion-queue thread?)", what, WAIT_S);
	if (busy == 0)
		light_calls_complete(what, &b);
	kvt_session_unlock(s);
	kvt_session_put(s);
	pthread_join(th, NULL);
	if (kind == BLOCK_PREFETCH)
		KVT_CHECK(b.rc == 0 && !strcmp(b.tier, "host"),
			  "%s: after the release: rc %d %s %s, tier \"%s\"", what, b.rc,
			  kvt_client_code_name(b.st.code), b.st.message, b.tier);
	else
		KVT_CHECK(b.rc != 0 && !b.st.local && b.st.code == KVT_CODE_FAILED_PRECONDITION,
			  "%s: after the release: rc %d %s %s (want FAILED_PRECONDITION: no GPU)",
			  what, b.rc, kvt_client_code_name(b.st.code), b.st.message);
}

static void test_prefetch_blocked(void)
{
	run_blocked(BLOCK_PREFETCH, "Prefetch");
}

static void test_restore_blocked(void)
{
	run_blocked(BLOCK_RESTORE, "RestoreToDevice");
}

int main(void)
{
	kvt_test_init();
	signal(SIGPIPE, SIG_IGN);
	if (start_daemon()) {
		printf("not ok - in-process kvtierd did not start\n");
		stop_daemon();
		return 1;
	}
	open_session("dispatch-held", 40);
	open_session("dispatch-other", 40);
	KVT_RUN(test_prefetch_blocked);
	KVT_RUN(test_restore_blocked);
	stop_daemon();
	return kvt_test_done();
}

/*
 * main.c - kvtierd: configuration, start-up, the signal/maintenance loop, graceful stop.
 *
 * Signals are blocked in every thread and read from a signalfd by the main thread, which is
 * also the maintenance loop (TTL expiry): SIGTERM/SIGINT stop the daemon gracefully (exit 0),
 * SIGHUP re-reads the configuration and applies the reloadable options. No fork, no
 * daemon(3): systemd and Kubernetes supervise the foreground process.
 */
#include <errno.h>
#include <grpc/grpc.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "rpc_server.h"
#include "session.h"
#include "tier_host.h"

#define KVT_VERSION_STRING "0.1.0"

/*
 * jemalloc's start-up options (the MALLOC_CONF environment variable still overrides them).
 * Allocations of 256 KiB and more (gRPC's buffers of large Append messages, encode scratch)
 * go to jemalloc's oversize arena, which purges freed pages at once instead of keeping them
 * resident for the 10 s dirty decay: a KV cache daemon is judged by memory per session, and
 * those buffers are not reused soon enough to be worth holding (Fetch replies reuse their
 * own pool, chunks and staging come from whole pages in tiers/tier_host.c). Small objects
 * keep the default decay. Without jemalloc (AddressSanitizer builds) nothing reads this.
 */
const char *malloc_conf = "oversize_threshold:262144";

static void apply_live(struct kvt_tier_host *host, struct kvt_sessions *sessions)
{
	kvt_log_set_level((int)KVT_CFG(log_level));
	kvt_tier_host_set_capacity(host, KVT_CFG(host_capacity_bytes));
	kvt_tier_host_set_page_cache(host, KVT_CFG(host_page_cache_bytes));
	kvt_sessions_set_evict(sessions, KVT_CFG(capacity_policy) == KVT_POLICY_DROP_COLDEST);
}

static void reload(int argc, char **argv, struct kvt_tier_host *host,
		   struct kvt_sessions *sessions)
{
	struct kvt_config next;
	struct kvt_cmdline cmd;
	char err[512], q[600];
	if (kvt_config_load(&next, argc, argv, &cmd, NULL, err, sizeof err)) {
		kvt_log_error("config reload failed, keeping the running configuration", "error=%s",
			      kvt_log_quote(q, sizeof q, err));
		return;
	}
	int n = kvt_config_apply_reload(&next);
	apply_live(host, sessions);
	kvt_log_info("config reloaded", "changed=%d", n);
}

int main(int argc, char **argv)
{
	struct kvt_config cfg;
	struct kvt_cmdline cmd;
	enum kvt_config_source sources[64];
	char err[512], q[600];
	int exit_code = 0;

	if (kvt_config_n_options() > sizeof sources / sizeof sources[0]) {
		fprintf(stderr, "kvtierd: internal error: too many options\n");
		return 1;
	}
	if (kvt_config_load(&cfg, argc, argv, &cmd, sources, err, sizeof err)) {
		fprintf(stderr, "kvtierd: invalid configuration: %s\n", err);
		return 1;
	}
	if (cmd.help) {
		kvt_config_help(stdout);
		return 0;
	}
	if (cmd.version) {
		printf("kvtierd %s\n", KVT_VERSION_STRING);
		return 0;
	}
	if (cmd.print_config) {
		kvt_config_print(stdout, &cfg, sources);
		return 0;
	}
	if (cmd.check_config) {
		printf("kvtierd: configuration OK\n");
		return 0;
	}
	kvt_config_live = cfg;
	kvt_log_set_level((int)cfg.log_level);

	/* Every thread (gRPC's included) inherits this mask; only the signalfd sees them. */
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	if (pthread_sigmask(SIG_BLOCK, &mask, NULL) != 0) {
		fprintf(stderr, "kvtierd: cannot block signals\n");
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
	if (sfd < 0) {
		fprintf(stderr, "kvtierd: signalfd: %s\n", strerror(errno));
		return 1;
	}

	static struct kvt_tier_host host;
	static struct kvt_sessions sessions;
	kvt_tier_host_init(&host, cfg.host_capacity_bytes);
	if (kvt_sessions_init(&sessions, &host)) {
		fprintf(stderr, "kvtierd: out of memory\n");
		return 1;
	}
	kvt_tier_host_set_reclaim(&host, kvt_sessions_reclaim, &sessions);
	apply_live(&host, &sessions);

	/* The GPU: never fatal. Without CUDA or a device the tier says why and the host serves. */
	struct kvt_tier_gpu *gpu = NULL;
	struct kvt_tier_gpu_config gcfg = {
		.enable = (int)cfg.gpu_enable, .device = (int)cfg.gpu_device,
		.arena_bytes = cfg.gpu_arena_bytes, .staging_bytes = cfg.gpu_staging_bytes,
		.ipc_idle_ms = cfg.gpu_ipc_idle_seconds * 1000,
		.copy_threads = (unsigned)cfg.gpu_restore_threads,
		.arena_keep = cfg.gpu_arena_policy == 1};
	if (kvt_tier_gpu_init(&gcfg, &gpu)) {
		fprintf(stderr, "kvtierd: out of memory\n");
		return 1;
	}
	sessions.gpu = gpu;
	/* Chunks in pinned memory: RestoreToDevice copies them by DMA without a host copy. */
	if (kvt_tier_gpu_usable(gpu) && cfg.gpu_pin_host)
		kvt_tier_host_set_pin(&host, kvt_tier_gpu_pin_host, kvt_tier_gpu_unpin_host);
	if (!kvt_tier_gpu_usable(gpu))
		kvt_log_info("gpu", "usable=0 reason=%s",
			     kvt_log_quote(q, sizeof q, kvt_tier_gpu_reason(gpu)));
	else
		kvt_log_info("gpu", "usable=1 device=%llu arena_bytes=%llu tier=%d",
			     (unsigned long long)cfg.gpu_device,
			     (unsigned long long)cfg.gpu_arena_bytes,
			     kvt_tier_gpu_tier_enabled(gpu));
	if (cfg.gpu_arena_bytes && !kvt_tier_gpu_tier_enabled(gpu))
		kvt_log_warn("gpu tier off: sessions stay on the host", "reason=%s",
			     kvt_log_quote(q, sizeof q, kvt_tier_gpu_reason(gpu)));

	struct kvt_daemon d = {.sessions = &sessions, .host = &host, .start_ms = kvt_now_ms(),
			       .gpu = gpu};
	grpc_init();
	struct kvt_rpc_server *srv = NULL;
	if (kvt_rpc_server_start(&cfg, &d, &srv, err, sizeof err)) {
		kvt_log_error("cannot start", "error=%s", kvt_log_quote(q, sizeof q, err));
		grpc_shutdown();
		return 1;
	}
	kvt_log_info("kvtierd started",
		     "version=%s pid=%d host_capacity_bytes=%llu capacity_policy=%s isa=%s",
		     KVT_VERSION_STRING, (int)getpid(), (unsigned long long)cfg.host_capacity_bytes,
		     cfg.capacity_policy == KVT_POLICY_DROP_COLDEST ? "drop-coldest" : "reject",
		     kvt_codec_active_isa() == KVT_ISA_AVX2 ? "avx2" : "scalar");

	int stop = 0;
	while (!stop) {
		struct pollfd pfd = {.fd = sfd, .events = POLLIN};
		int pr = poll(&pfd, 1, (int)cfg.maintenance_interval_ms);
		if (pr < 0 && errno != EINTR) {
			kvt_log_error("poll failed", "error=%s", strerror(errno));
			exit_code = 1;
			break;
		}
		if (pr > 0 && (pfd.revents & POLLIN)) {
			struct signalfd_siginfo si;
			ssize_t n = read(sfd, &si, sizeof si);
			if (n == (ssize_t)sizeof si) {
				if (si.ssi_signo == SIGHUP) {
					kvt_log_info("SIGHUP: reloading the configuration", NULL);
					reload(argc, argv, &host, &sessions);
				} else {
					kvt_log_info("stopping", "signal=%s",
						     si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
					stop = 1;
				}
			}
		}
		kvt_tier_gpu_maintain(gpu, kvt_now_ms());
		kvt_rpc_reply_pool_trim(kvt_now_ms());
		uint64_t expired = kvt_sessions_expire(&sessions, kvt_now_ms());
		if (expired)
			kvt_log_info("sessions expired", "count=%llu", (unsigned long long)expired);
		/* A SIGHUP may have lowered host_capacity_bytes below what is held: under
		 * drop-coldest, shed the coldest sessions now rather than at the next request. */
		uint64_t cap = __atomic_load_n(&host.capacity_bytes, __ATOMIC_RELAXED);
		uint64_t used = __atomic_load_n(&host.used_bytes, __ATOMIC_RELAXED);
		if (used > cap && KVT_CFG(capacity_policy) == KVT_POLICY_DROP_COLDEST) {
			uint64_t before = sessions.evicted;
			kvt_sessions_reclaim(&sessions, used - cap);
			kvt_log_info("over capacity after a reload: dropped the coldest sessions",
				     "dropped=%llu used_bytes=%llu capacity_bytes=%llu",
				     (unsigned long long)(__atomic_load_n(&sessions.evicted,
									  __ATOMIC_RELAXED) -
							  before),
				     (unsigned long long)__atomic_load_n(&host.used_bytes,
									 __ATOMIC_RELAXED),
				     (unsigned long long)cap);
		}
	}
	int forced = kvt_rpc_server_stop(srv, cfg.shutdown_grace_ms);
	kvt_rpc_server_destroy(srv);
	kvt_sessions_destroy(&sessions);
	kvt_tier_gpu_destroy(gpu);
	grpc_shutdown();
	close(sfd);
	kvt_log_info("stopped", "forced=%d", forced);
	return exit_code;
}

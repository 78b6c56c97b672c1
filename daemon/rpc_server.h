/*
 * rpc_server.h - kvtierd's gRPC server, as the rest of the daemon sees it (no gRPC types
 * here: only daemon/rpc_*.c include gRPC headers).
 *
 * The server owns cq_threads completion-queue threads, each with its own queue, each serving
 * every method. kvt_rpc_server_start binds the listeners and starts the threads;
 * kvt_rpc_server_stop marks health NOT_SERVING, stops accepting, lets in-flight calls finish
 * (cancelling them after grace_ms), and joins the threads.
 */
#ifndef KVT_RPC_SERVER_H
#define KVT_RPC_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "session.h"
#include "tier_gpu.h"
#include "tier_host.h"

struct kvt_rpc_server;

struct kvt_daemon {
	struct kvt_sessions *sessions;
	struct kvt_tier_host *host;
	uint64_t start_ms;
	struct kvt_tier_gpu *gpu; /* never NULL in kvtierd; may be "unavailable" */
};

int kvt_rpc_server_start(const struct kvt_config *cfg, struct kvt_daemon *d,
			 struct kvt_rpc_server **out, char *err, size_t errlen);
/* Graceful stop; returns 0 when every call finished within grace_ms, 1 when some had to be
 * cancelled. */
int kvt_rpc_server_stop(struct kvt_rpc_server *srv, uint64_t grace_ms);
void kvt_rpc_server_destroy(struct kvt_rpc_server *srv);
/* Frees the idle pooled Fetch reply buffers once no buffer was taken from the pool for
 * reply_pool_idle_ms (called on the maintenance tick, which notes activity, so the hot path
 * reads no clock): a burst of large Fetches leaves no
 * resident reply memory behind when the daemon goes quiet; the next burst refaults it.
 * Returns how many were freed. */
uint64_t kvt_rpc_reply_pool_trim(uint64_t now_ms);
/* Pooled reply buffers in existence (idle or in flight): Stats' rpc.reply_pool_resident. */
uint64_t kvt_rpc_reply_pool_resident(void);

#endif

/*
 * rpc_health.c - grpc.health.v1.Health: Check and Watch for "" (the server) and
 * "kvtier.v1.KvTier". SERVING while the daemon runs, NOT_SERVING once shutdown begins.
 * Watch streams park between changes; a change resumes every parked watcher (under
 * kvt_rpc_watch_mu, which also guards their call state).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/health/v1/health.pb-c.h"
#include "log.h"
#include "rpc.h"

static int g_serving;        /* atomic */
static int g_shutdown;       /* under kvt_rpc_watch_mu */
static struct kvt_rpc_call *g_watchers; /* under kvt_rpc_watch_mu */

struct watch_state {
	int last_sent; /* -1 before the first message */
};

int kvt_rpc_health_serving(void)
{
	return __atomic_load_n(&g_serving, __ATOMIC_RELAXED);
}

static void resume_all_locked(void)
{
	for (struct kvt_rpc_call *c = g_watchers; c; c = c->watch_next)
		kvt_rpc_call_resume(c);
}

void kvt_rpc_health_set_serving(int serving)
{
	pthread_mutex_lock(&kvt_rpc_watch_mu);
	__atomic_store_n(&g_serving, serving, __ATOMIC_RELAXED);
	resume_all_locked();
	pthread_mutex_unlock(&kvt_rpc_watch_mu);
}

void kvt_rpc_health_shutdown(void)
{
	pthread_mutex_lock(&kvt_rpc_watch_mu);
	g_shutdown = 1;
	resume_all_locked();
	pthread_mutex_unlock(&kvt_rpc_watch_mu);
}

static int known_service(const char *s)
{
	return s == NULL || s[0] == '\0' || strcmp(s, "kvtier.v1.KvTier") == 0;
}

static Grpc__Health__V1__HealthCheckResponse__ServingStatus current(void)
{
	return kvt_rpc_health_serving() ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
					: GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static void check(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		  struct kvt_rpc_result *res)
{
	Grpc__Health__V1__HealthCheckRequest *r =
		kvt_rpc_unpack(&grpc__health__v1__health_check_request__descriptor, req, len, res);
	if (!r)
		return;
	if (!known_service(r->service)) {
		kvt_rpc_fail(res, GRPC_STATUS_NOT_FOUND, "unknown service \"%.128s\"", r->service);
	} else {
		Grpc__Health__V1__HealthCheckResponse out =
			GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
		out.status = current();
		kvt_rpc_reply(res, &out.base);
	}
	grpc__health__v1__health_check_request__free_unpacked(r, NULL);
}

static int watch_start(struct kvt_rpc_call *c, const uint8_t *req, size_t len,
		       struct kvt_rpc_result *res)
{
	Grpc__Health__V1__HealthCheckRequest *r =
		kvt_rpc_unpack(&grpc__health__v1__health_check_request__descriptor, req, len, res);
	if (!r)
		return -1;
	struct watch_state *w = calloc(1, sizeof *w);
	if (!w) {
		grpc__health__v1__health_check_request__free_unpacked(r, NULL);
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return -1;
	}
	/* An unknown service is watched as SERVICE_UNKNOWN (the protocol says so). */
	w->last_sent = known_service(r->service) ? -1 : -2;
	grpc__health__v1__health_check_request__free_unpacked(r, NULL);
	c->state = w;
	/* The framework holds kvt_rpc_watch_mu for parkable calls. */
	c->watch_next = g_watchers;
	g_watchers = c;
	return 0;
}

static int watch_next(struct kvt_rpc_call *c, grpc_byte_buffer **out, struct kvt_rpc_result *res)
{
	struct watch_state *w = c->state;
	Grpc__Health__V1__HealthCheckResponse msg = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
	if (w->last_sent == -2) {
		msg.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
		w->last_sent = -3;
	} else if (w->last_sent != -3 && (int)current() != w->last_sent) {
		msg.status = current();
		w->last_sent = (int)msg.status;
	} else if (g_shutdown) {
		kvt_rpc_fail(res, GRPC_STATUS_UNAVAILABLE, "kvtierd is shutting down");
		return KVT_STREAM_DONE;
	} else {
		return KVT_STREAM_PARK;
	}
	*out = kvt_rpc_pack(&msg.base);
	if (!*out) {
		kvt_rpc_fail(res, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
		return KVT_STREAM_DONE;
	}
	return KVT_STREAM_MSG;
}

static void watch_cleanup(struct kvt_rpc_call *c)
{
	for (struct kvt_rpc_call **pp = &g_watchers; *pp; pp = &(*pp)->watch_next) {
		if (*pp == c) {
			*pp = c->watch_next;
			break;
		}
	}
	c->watch_next = NULL;
	free(c->state);
}

const struct kvt_rpc_method kvt_rpc_health_methods[] = {
	{.path = "/grpc.health.v1.Health/Check", .name = "Health.Check", .kind = KVT_RPC_UNARY,
	 .unary = check},
	{.path = "/grpc.health.v1.Health/Watch", .name = "Health.Watch",
	 .kind = KVT_RPC_SERVER_STREAM, .start = watch_start, .next = watch_next,
	 .cleanup = watch_cleanup, .parkable = 1},
};
const size_t kvt_rpc_health_n_methods =
	sizeof kvt_rpc_health_methods / sizeof kvt_rpc_health_methods[0];

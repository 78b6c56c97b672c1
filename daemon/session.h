/*
 * session.h - the session table: every session of every tenant, sharded by a hash of
 * (tenant, session_id).
 *
 * A session owns one kvt_seq (its KV data) and a few attributes (pinned, ttl, last access).
 * Lifetime is a reference count: the table holds one reference while the session is linked,
 * and every request holds one from kvt_sessions_get() to kvt_session_put(). Dropping a session
 * (DropSession, TTL expiry, capacity eviction) unlinks it and releases the table's reference,
 * so a Fetch streaming from it keeps a valid sequence until its own put; the memory goes back
 * to the host tier with the last reference.
 *
 * Locks, in the only order they are ever taken: a session's `lock` (serializes every kvt_seq
 * call on it; held by the request for the duration of one step), then one shard lock (held for
 * table lookups only, never across a kvt_seq call). Capacity reclaim runs inside the host
 * tier's allocation hook, that is under some session's lock; it only evicts sessions nobody
 * else references (refcount 1, checked under the shard lock), so it never waits on another
 * session's lock.
 */
#ifndef KVT_SESSION_H
#define KVT_SESSION_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kvt_seq.h"
#include "tier_gpu.h"
#include "tier_host.h"

#define KVT_SESSION_ID_MAX 128
#define KVT_TENANT_MAX 64
#define KVT_SESSION_SHARDS 64

struct kvt_session {
	/* Immutable after creation. */
	char tenant[KVT_TENANT_MAX + 1];
	char id[KVT_SESSION_ID_MAX + 1];
	uint32_t id_len;
	uint64_t hash;
	struct kvt_codec_config cfg;
	struct kvt_sessions *table;

	/* Shard lock. */
	struct kvt_session *next;
	int linked;

	uint32_t refcount;       /* atomic */
	uint32_t pinned;         /* atomic */
	uint32_t ttl_seconds;    /* atomic */
	uint64_t last_access_ms; /* atomic, CLOCK_MONOTONIC */

	/* Session lock. */
	pthread_mutex_t lock;
	struct kvt_seq *seq;
	/* The next token staged layer by layer through Attend (new_k / new_v): [L][H][d] in the
	 * wire dtype, joined to the sequence once every layer has arrived. */
	uint8_t *stage_k, *stage_v;
	uint64_t stage_mask[(KVT_MAX_LAYERS + 63) / 64];
	uint32_t staged_layers;
	/* GPU tier (tiers/tier_gpu.h): set at open when the session asked for (or the policy
	 * gave it) tier "gpu"; the mirror of its sealed chunks in the device arena, synced after
	 * each change of the sequence. */
	int gpu_wanted;
	struct kvt_gpu_mirror *gpu_mirror;
};

struct kvt_session_shard {
	pthread_mutex_t lock;
	struct kvt_session **buckets;
	uint32_t n_buckets; /* power of two */
	uint32_t count;
};

struct kvt_sessions {
	struct kvt_session_shard shards[KVT_SESSION_SHARDS];
	struct kvt_tier_host *host;
	uint64_t count;         /* atomic: linked sessions */
	uint64_t evicted;       /* atomic: dropped to make room */
	uint64_t expired;       /* atomic: dropped by TTL */
	uint32_t allow_evict;   /* atomic: capacity_policy is drop-coldest */
	struct kvt_tier_gpu *gpu; /* NULL or the GPU tier (mirrors are freed with sessions) */
};

/* Everything StatSession reports, read under the session lock. */
struct kvt_session_info {
	struct kvt_codec_config cfg;
	uint64_t n_tokens;
	uint32_t n_chunks;
	uint32_t tail_tokens;
	uint64_t bytes_held;
	uint64_t logical_bytes;
	uint64_t chunk_bytes;
	double bits_per_element;
	uint32_t pinned;
	uint32_t ttl_seconds;
	uint64_t idle_ms;
};

int kvt_sessions_init(struct kvt_sessions *t, struct kvt_tier_host *host);
/* Drops every session (they must not be referenced by requests any more). */
void kvt_sessions_destroy(struct kvt_sessions *t);
void kvt_sessions_set_evict(struct kvt_sessions *t, int allow);
uint64_t kvt_sessions_count(struct kvt_sessions *t);

uint64_t kvt_now_ms(void);

/*
 * Creates the session, or returns the existing one when its config equals cfg (*created = 0).
 * A different config: -EEXIST, err names the first differing field. -EMFILE when max_sessions
 * are held, -ENOMEM when the host tier has no room. On success *out holds a reference.
 */
int kvt_sessions_open(struct kvt_sessions *t, const char *tenant, const char *id,
		      const struct kvt_codec_config *cfg, uint32_t ttl_seconds, int pinned,
		      uint64_t max_sessions, struct kvt_session **out, int *created, char *err,
		      size_t errlen);
/* A new session holding the first n_tokens of src (chunks shared). -EEXIST if new_id exists. */
int kvt_sessions_fork(struct kvt_sessions *t, struct kvt_session *src, const char *new_id,
		      uint64_t n_tokens, uint32_t ttl_seconds, int pinned, uint64_t max_sessions,
		      struct kvt_session **out, char *err, size_t errlen);
/* Looks up and references a session. -ENOENT when unknown. Requests that use the data call
 * kvt_session_touch() (Stat and List do not, so idle_ms stays meaningful). */
int kvt_sessions_get(struct kvt_sessions *t, const char *tenant, const char *id,
		     struct kvt_session **out);
void kvt_session_put(struct kvt_session *s);
/* Unlinks the session; its memory is freed when the last request lets go. -ENOENT. */
int kvt_sessions_drop(struct kvt_sessions *t, const char *tenant, const char *id,
		      uint64_t *bytes_held);
/* Unlinks s if it is still linked (used to roll back a StoreEncoded that created it). */
void kvt_sessions_unlink(struct kvt_sessions *t, struct kvt_session *s);

/* Up to `limit` referenced sessions of tenant whose id starts with prefix and sorts after
 * `after` (byte order), ascending. *n_out = count; *more = 1 when more follow. The caller puts
 * each and frees the array. */
int kvt_sessions_list(struct kvt_sessions *t, const char *tenant, const char *prefix,
		      const char *after, uint32_t limit, struct kvt_session ***out,
		      size_t *n_out, int *more);

/* Drops unpinned idle sessions whose ttl has passed; returns how many. */
uint64_t kvt_sessions_expire(struct kvt_sessions *t, uint64_t now_ms);
/* Drops the coldest idle unpinned sessions until `bytes` are freed (when allowed). */
uint64_t kvt_sessions_reclaim(void *table, uint64_t bytes);

/* Session-lock helpers. Callers lock, call kvt_seq, unlock. */
void kvt_session_lock(struct kvt_session *s);
void kvt_session_unlock(struct kvt_session *s);
void kvt_session_touch(struct kvt_session *s);
/* Fills info; the caller holds the lock. */
void kvt_session_info_locked(struct kvt_session *s, struct kvt_session_info *info);
/* Frees a partial Attend staging (e.g. on Truncate); lock held. */
void kvt_session_clear_stage_locked(struct kvt_session *s);

/* Totals over all sessions (for Stats). */
void kvt_sessions_totals(struct kvt_sessions *t, uint64_t *sessions, uint64_t *tokens,
			 uint64_t *bytes_held, uint64_t *logical_bytes, uint64_t *chunks);

/* Compares two configs; 0 when equal, else -EEXIST with err naming the field. */
int kvt_codec_config_compare(const struct kvt_codec_config *have,
			     const struct kvt_codec_config *want, char *err, size_t errlen);

#endif

#include "session.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

uint64_t kvt_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t hash_key(const char *tenant, const char *id)
{
	/* FNV-1a: ids are short and client-chosen; the table grows, so a simple hash is enough. */
	uint64_t h = 0xcbf29ce484222325ull;
	for (const char *p = tenant; *p; p++)
		h = (h ^ (uint8_t)*p) * 0x100000001b3ull;
	h = (h ^ 0xff) * 0x100000001b3ull;
	for (const char *p = id; *p; p++)
		h = (h ^ (uint8_t)*p) * 0x100000001b3ull;
	return h ^ (h >> 29);
}

int kvt_sessions_init(struct kvt_sessions *t, struct kvt_tier_host *host)
{
	memset(t, 0, sizeof *t);
	t->host = host;
	for (int i = 0; i < KVT_SESSION_SHARDS; i++) {
		struct kvt_session_shard *sh = &t->shards[i];
		pthread_mutex_init(&sh->lock, NULL);
		sh->n_buckets = 16;
		sh->buckets = calloc(sh->n_buckets, sizeof *sh->buckets);
		if (!sh->buckets) {
			for (int j = 0; j < i; j++)
				free(t->shards[j].buckets);
			return -ENOMEM;
		}
	}
	return 0;
}

static void session_free(struct kvt_session *s)
{
	kvt_session_clear_stage_locked(s);
	if (s->table && s->table->gpu) {
		kvt_tier_gpu_mirror_free(s->table->gpu, s->gpu_mirror);
		kvt_tier_gpu_forget_owner(s->table->gpu, s);
	}
	kvt_seq_destroy(s->seq);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

void kvt_sessions_destroy(struct kvt_sessions *t)
{
	for (int i = 0; i < KVT_SESSION_SHARDS; i++) {
		struct kvt_session_shard *sh = &t->shards[i];
		for (uint32_t b = 0; b < sh->n_buckets; b++) {
			struct kvt_session *s = sh->buckets[b];
			while (s) {
				struct kvt_session *n = s->next;
				s->linked = 0;
				kvt_session_put(s);
				s = n;
			}
		}
		free(sh->buckets);
		pthread_mutex_destroy(&sh->lock);
	}
}

void kvt_sessions_set_evict(struct kvt_sessions *t, int allow)
{
	__atomic_store_n(&t->allow_evict, (uint32_t)!!allow, __ATOMIC_RELAXED);
}

uint64_t kvt_sessions_count(struct kvt_sessions *t)
{
	return __atomic_load_n(&t->count, __ATOMIC_RELAXED);
}

static struct kvt_session_shard *shard_of(struct kvt_sessions *t, uint64_t hash)
{
	return &t->shards[hash % KVT_SESSION_SHARDS];
}

/* Shard lock held. */
static struct kvt_session *shard_find(struct kvt_session_shard *sh, uint64_t hash,
				      const char *tenant, const char *id)
{
	struct kvt_session *s = sh->buckets[(hash / KVT_SESSION_SHARDS) & (sh->n_buckets - 1)];
	for (; s; s = s->next)
		if (s->hash == hash && !strcmp(s->id, id) && !strcmp(s->tenant, tenant))
			return s;
	return NULL;
}

/* Shard lock held. Growth failure only makes chains longer, never loses an entry. */
static void shard_insert(struct kvt_session_shard *sh, struct kvt_session *s)
{
	if (sh->count + 1 > sh->n_buckets && sh->n_buckets < (1u << 24)) {
		uint32_t nb = sh->n_buckets * 2;
		struct kvt_session **nbk = calloc(nb, sizeof *nbk);
		if (nbk) {
			for (uint32_t b = 0; b < sh->n_buckets; b++) {
				struct kvt_session *e = sh->buckets[b];
				while (e) {
					struct kvt_session *n = e->next;
					uint32_t i = (uint32_t)((e->hash / KVT_SESSION_SHARDS) & (nb - 1));
					e->next = nbk[i];
					nbk[i] = e;
					e = n;
				}
			}
			free(sh->buckets);
			sh->buckets = nbk;
			sh->n_buckets = nb;
		}
	}
	uint32_t i = (uint32_t)((s->hash / KVT_SESSION_SHARDS) & (sh->n_buckets - 1));
	s->next = sh->buckets[i];
	sh->buckets[i] = s;
	s->linked = 1;
	sh->count++;
}

/* Shard lock held. */
static void shard_remove(struct kvt_session_shard *sh, struct kvt_session *s)
{
	assert(s->linked);
	struct kvt_session **pp =
		&sh->buckets[(s->hash / KVT_SESSION_SHARDS) & (sh->n_buckets - 1)];
	while (*pp && *pp != s)
		pp = &(*pp)->next;
	assert(*pp == s && "linked session missing from its bucket");
	*pp = s->next;
	s->next = NULL;
	s->linked = 0;
	sh->count--;
}

static struct kvt_session *session_new(struct kvt_sessions *t, const char *tenant,
				       const char *id, uint32_t ttl_seconds, int pinned)
{
	struct kvt_session *s = calloc(1, sizeof *s);
	if (!s)
		return NULL;
	snprintf(s->tenant, sizeof s->tenant, "%s", tenant);
	snprintf(s->id, sizeof s->id, "%s", id);
	s->id_len = (uint32_t)strlen(s->id);
	s->hash = hash_key(tenant, id);
	s->table = t;
	s->refcount = 1;
	s->pinned = (uint32_t)!!pinned;
	s->ttl_seconds = ttl_seconds;
	s->last_access_ms = kvt_now_ms();
	pthread_mutex_init(&s->lock, NULL);
	return s;
}

int kvt_codec_config_compare(const struct kvt_codec_config *a,
			     const struct kvt_codec_config *b, char *err, size_t errlen)
{
#define CMP(f)                                                                             \
	if (a->f != b->f) {                                                                \
		snprintf(err, errlen, "session exists with " #f " %u, the request has %u",   \
			 (unsigned)a->f, (unsigned)b->f);                                   \
		return -EEXIST;                                                            \
	}
#define CMP_NAMED(f, namefn)                                                               \
	if (a->f != b->f) {                                                                \
		const char *x = namefn(a->f), *y = namefn(b->f);                           \
		snprintf(err, errlen, "session exists with " #f " %s, the request has %s",   \
			 x ? x : "?", y ? y : "?");                                         \
		return -EEXIST;                                                            \
	}
	CMP(n_layers);
	CMP(n_kv_heads);
	CMP(head_dim);
	CMP_NAMED(dtype, kvt_dtype_name);
	CMP_NAMED(scheme, kvt_scheme_name);
#undef CMP_NAMED
	CMP(key_bits);
	CMP(value_bits);
	CMP(group);
	CMP(chunk_tokens);
	CMP(rotate_v);
	CMP(n_sinks);
	CMP(pin_detect_max);
	CMP(recent_exact_tokens);
	CMP(key_rounding);
#undef CMP
	if (a->pin_detect_ratio != b->pin_detect_ratio) {
		snprintf(err, errlen, "session exists with pin_detect_ratio %g, the request has %g",
			 (double)a->pin_detect_ratio, (double)b->pin_detect_ratio);
		return -EEXIST;
	}
	return 0;
}

/* Links s unless the id is taken; returns the existing session (referenced) in *existing. */
static int link_new(struct kvt_sessions *t, struct kvt_session *s, uint64_t max_sessions,
		    struct kvt_session **existing)
{
	struct kvt_session_shard *sh = shard_of(t, s->hash);
	int rc = 0;
	*existing = NULL;
	pthread_mutex_lock(&sh->lock);
	struct kvt_session *e = shard_find(sh, s->hash, s->tenant, s->id);
	if (e) {
		__atomic_fetch_add(&e->refcount, 1, __ATOMIC_RELAXED);
		__atomic_store_n(&e->last_access_ms, kvt_now_ms(), __ATOMIC_RELAXED);
		*existing = e;
		rc = -EEXIST;
	} else if (__atomic_add_fetch(&t->count, 1, __ATOMIC_RELAXED) > max_sessions) {
		__atomic_fetch_sub(&t->count, 1, __ATOMIC_RELAXED);
		rc = -EMFILE;
	} else {
		/* The table's reference. */
		__atomic_fetch_add(&s->refcount, 1, __ATOMIC_RELAXED);
		shard_insert(sh, s);
	}
	pthread_mutex_unlock(&sh->lock);
	return rc;
}

int kvt_sessions_open(struct kvt_sessions *t, const char *tenant, const char *id,
		      const struct kvt_codec_config *cfg, uint32_t ttl_seconds, int pinned,
		      uint64_t max_sessions, struct kvt_session **out, int *created, char *err,
		      size_t errlen)
{
	struct kvt_session *e = NULL;
	*out = NULL;
	*created = 0;
	/* The common re-open path first: no allocation. */
	if (kvt_sessions_get(t, tenant, id, &e) == 0) {
		int rc = kvt_codec_config_compare(&e->cfg, cfg, err, errlen);
		if (rc) {
			kvt_session_put(e);
			return rc;
		}
		kvt_session_touch(e);
		*out = e;
		return 0;
	}
	struct kvt_session *s = session_new(t, tenant, id, ttl_seconds, pinned);
	if (!s) {
		snprintf(err, errlen, "out of memory creating session");
		return -ENOMEM;
	}
	s->cfg = *cfg;
	/* The sequence's first allocation may reclaim other sessions: no shard lock held here. */
	int rc = kvt_seq_create(cfg, &t->host->seq_alloc, &s->seq, err, errlen);
	if (rc) {
		session_free(s);
		return rc;
	}
	rc = link_new(t, s, max_sessions, &e);
	if (rc == -EEXIST) {
		/* Lost a race with another open of the same id. */
		session_free(s);
		rc = kvt_codec_config_compare(&e->cfg, cfg, err, errlen);
		if (rc) {
			kvt_session_put(e);
			return rc;
		}
		*out = e;
		return 0;
	}
	if (rc == -EMFILE) {
		snprintf(err, errlen, "too many sessions: max_sessions is %llu",
			 (unsigned long long)max_sessions);
		session_free(s);
		return rc;
	}
	*out = s;
	*created = 1;
	return 0;
}

int kvt_sessions_fork(struct kvt_sessions *t, struct kvt_session *src, const char *new_id,
		      uint64_t n_tokens, uint32_t ttl_seconds, int pinned, uint64_t max_sessions,
		      struct kvt_session **out, char *err, size_t errlen)
{
	struct kvt_session *e = NULL;
	*out = NULL;
	if (kvt_sessions_get(t, src->tenant, new_id, &e) == 0) {
		kvt_session_put(e);
		snprintf(err, errlen, "new_session_id \"%s\" already exists", new_id);
		return -EEXIST;
	}
	struct kvt_session *s = session_new(t, src->tenant, new_id, ttl_seconds, pinned);
	if (!s) {
		snprintf(err, errlen, "out of memory creating session");
		return -ENOMEM;
	}
	s->cfg = src->cfg;
	kvt_session_lock(src);
	int rc = kvt_seq_fork(src->seq, n_tokens, &t->host->seq_alloc, &s->seq, err, errlen);
	kvt_session_unlock(src);
	if (rc) {
		session_free(s);
		return rc;
	}
	rc = link_new(t, s, max_sessions, &e);
	if (rc) {
		if (e)
			kvt_session_put(e);
		if (rc == -EEXIST)
			snprintf(err, errlen, "new_session_id \"%s\" already exists", new_id);
		else
			snprintf(err, errlen, "too many sessions: max_sessions is %llu",
				 (unsigned long long)max_sessions);
		session_free(s);
		return rc;
	}
	*out = s;
	return 0;
}

int kvt_sessions_get(struct kvt_sessions *t, const char *tenant, const char *id,
		     struct kvt_session **out)
{
	uint64_t h = hash_key(tenant, id);
	struct kvt_session_shard *sh = shard_of(t, h);
	pthread_mutex_lock(&sh->lock);
	struct kvt_session *s = shard_find(sh, h, tenant, id);
	if (s)
		__atomic_fetch_add(&s->refcount, 1, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&sh->lock);
	*out = s;
	return s ? 0 : -ENOENT;
}

void kvt_session_put(struct kvt_session *s)
{
	if (!s)
		return;
	uint32_t before = __atomic_fetch_sub(&s->refcount, 1, __ATOMIC_ACQ_REL);
	assert(before > 0 && "session reference count underflow");
	if (before == 1) {
		assert(!s->linked);
		session_free(s);
	}
}

/* Unlinks under the shard lock; returns 1 when this call unlinked it. */
static int unlink_session(struct kvt_sessions *t, struct kvt_session *s)
{
	struct kvt_session_shard *sh = shard_of(t, s->hash);
	int did = 0;
	pthread_mutex_lock(&sh->lock);
	if (s->linked) {
		shard_remove(sh, s);
		__atomic_fetch_sub(&t->count, 1, __ATOMIC_RELAXED);
		did = 1;
	}
	pthread_mutex_unlock(&sh->lock);
	return did;
}

void kvt_sessions_unlink(struct kvt_sessions *t, struct kvt_session *s)
{
	if (unlink_session(t, s))
		kvt_session_put(s); /* the table's reference */
}

int kvt_sessions_drop(struct kvt_sessions *t, const char *tenant, const char *id,
		      uint64_t *bytes_held)
{
	struct kvt_session *s;
	int rc = kvt_sessions_get(t, tenant, id, &s);
	if (rc)
		return rc;
	if (bytes_held) {
		kvt_session_lock(s);
		*bytes_held = kvt_seq_bytes(s->seq);
		kvt_session_unlock(s);
	}
	if (!unlink_session(t, s)) {
		kvt_session_put(s);
		return -ENOENT; /* dropped by someone else meanwhile */
	}
	kvt_session_put(s); /* the table's */
	kvt_session_put(s); /* ours: frees it unless a request still reads it */
	return 0;
}

struct list_ent {
	struct kvt_session *s;
};

static int cmp_ent(const void *a, const void *b)
{
	const struct kvt_session *x = ((const struct list_ent *)a)->s;
	const struct kvt_session *y = ((const struct list_ent *)b)->s;
	return strcmp(x->id, y->id);
}

int kvt_sessions_list(struct kvt_sessions *t, const char *tenant, const char *prefix,
		      const char *after, uint32_t limit, struct kvt_session ***out,
		      size_t *n_out, int *more)
{
	size_t cap = 64, n = 0;
	size_t plen = strlen(prefix);
	struct list_ent *ents = malloc(cap * sizeof *ents);
	*out = NULL;
	*n_out = 0;
	*more = 0;
	if (!ents)
		return -ENOMEM;
	for (int i = 0; i < KVT_SESSION_SHARDS; i++) {
		struct kvt_session_shard *sh = &t->shards[i];
		pthread_mutex_lock(&sh->lock);
		for (uint32_t b = 0; b < sh->n_buckets; b++) {
			for (struct kvt_session *s = sh->buckets[b]; s; s = s->next) {
				if (strcmp(s->tenant, tenant) || strncmp(s->id, prefix, plen))
					continue;
				if (after && *after && strcmp(s->id, after) <= 0)
					continue;
				if (n == cap) {
					struct list_ent *ne = realloc(ents, cap * 2 * sizeof *ents);
					if (!ne) {
						pthread_mutex_unlock(&sh->lock);
						for (size_t k = 0; k < n; k++)
							kvt_session_put(ents[k].s);
						free(ents);
						return -ENOMEM;
					}
					ents = ne;
					cap *= 2;
				}
				__atomic_fetch_add(&s->refcount, 1, __ATOMIC_RELAXED);
				ents[n++].s = s;
			}
		}
		pthread_mutex_unlock(&sh->lock);
	}
	qsort(ents, n, sizeof *ents, cmp_ent);
	size_t keep = n < limit ? n : limit;
	for (size_t k = keep; k < n; k++)
		kvt_session_put(ents[k].s);
	*more = n > keep;
	struct kvt_session **arr = malloc((keep ? keep : 1) * sizeof *arr);
	if (!arr) {
		for (size_t k = 0; k < keep; k++)
			kvt_session_put(ents[k].s);
		free(ents);
		return -ENOMEM;
	}
	for (size_t k = 0; k < keep; k++)
		arr[k] = ents[k].s;
	free(ents);
	*out = arr;
	*n_out = keep;
	return 0;
}

uint64_t kvt_sessions_expire(struct kvt_sessions *t, uint64_t now_ms)
{
	uint64_t n = 0;
	for (int i = 0; i < KVT_SESSION_SHARDS; i++) {
		struct kvt_session_shard *sh = &t->shards[i];
		struct kvt_session *victims = NULL;
		pthread_mutex_lock(&sh->lock);
		for (uint32_t b = 0; b < sh->n_buckets; b++) {
			struct kvt_session *s = sh->buckets[b];
			while (s) {
				struct kvt_session *nx = s->next;
				uint32_t ttl = __atomic_load_n(&s->ttl_seconds, __ATOMIC_RELAXED);
				uint64_t last = __atomic_load_n(&s->last_access_ms, __ATOMIC_RELAXED);
				/* refcount 1: only the table holds it, no request is using it. */
				if (ttl && !__atomic_load_n(&s->pinned, __ATOMIC_RELAXED) &&
				    __atomic_load_n(&s->refcount, __ATOMIC_ACQUIRE) == 1 &&
				    now_ms > last && now_ms - last >= (uint64_t)ttl * 1000) {
					shard_remove(sh, s);
					s->next = victims;
					victims = s;
				}
				s = nx;
			}
		}
		pthread_mutex_unlock(&sh->lock);
		while (victims) {
			struct kvt_session *nx = victims->next;
			victims->next = NULL;
			__atomic_fetch_sub(&t->count, 1, __ATOMIC_RELAXED);
			kvt_session_put(victims);
			n++;
			victims = nx;
		}
	}
	__atomic_fetch_add(&t->expired, n, __ATOMIC_RELAXED);
	return n;
}

uint64_t kvt_sessions_reclaim(void *table, uint64_t bytes)
{
	struct kvt_sessions *t = table;
	if (!__atomic_load_n(&t->allow_evict, __ATOMIC_RELAXED))
		return 0;
	uint64_t freed = 0;
	while (freed < bytes) {
		/* The coldest idle unpinned session over all shards: a scan, bounded by
		 * max_sessions; eviction is rare next to lookups, so no global LRU list to keep
		 * in order on every request. */
		uint64_t best_ms = UINT64_MAX;
		int best_shard = -1;
		char best_id[KVT_SESSION_ID_MAX + 1], best_tenant[KVT_TENANT_MAX + 1];
		uint64_t best_hash = 0;
		for (int i = 0; i < KVT_SESSION_SHARDS; i++) {
			struct kvt_session_shard *sh = &t->shards[i];
			pthread_mutex_lock(&sh->lock);
			for (uint32_t b = 0; b < sh->n_buckets; b++)
				for (struct kvt_session *s = sh->buckets[b]; s; s = s->next) {
					uint64_t last = __atomic_load_n(&s->last_access_ms,
									__ATOMIC_RELAXED);
					if (__atomic_load_n(&s->pinned, __ATOMIC_RELAXED) ||
					    __atomic_load_n(&s->refcount, __ATOMIC_ACQUIRE) != 1 ||
					    last >= best_ms)
						continue;
					best_ms = last;
					best_shard = i;
					best_hash = s->hash;
					memcpy(best_id, s->id, sizeof best_id);
					memcpy(best_tenant, s->tenant, sizeof best_tenant);
				}
			pthread_mutex_unlock(&sh->lock);
		}
		if (best_shard < 0)
			break;
		struct kvt_session_shard *sh = &t->shards[best_shard];
		pthread_mutex_lock(&sh->lock);
		struct kvt_session *s = shard_find(sh, best_hash, best_tenant, best_id);
		if (s && (__atomic_load_n(&s->pinned, __ATOMIC_RELAXED) ||
			  __atomic_load_n(&s->refcount, __ATOMIC_ACQUIRE) != 1))
			s = NULL; /* became busy meanwhile: look again */
		if (s)
			shard_remove(sh, s);
		pthread_mutex_unlock(&sh->lock);
		if (!s)
			continue;
		uint64_t before = __atomic_load_n(&t->host->used_bytes, __ATOMIC_RELAXED);
		__atomic_fetch_sub(&t->count, 1, __ATOMIC_RELAXED);
		__atomic_fetch_add(&t->evicted, 1, __ATOMIC_RELAXED);
		kvt_session_put(s);
		uint64_t after = __atomic_load_n(&t->host->used_bytes, __ATOMIC_RELAXED);
		/* Chunks shared with a fork stay; count what really came back (at least one byte
		 * so a session of shared chunks still makes progress through the loop). */
		freed += before > after ? before - after : 1;
	}
	return freed;
}

void kvt_session_lock(struct kvt_session *s)
{
	int rc = pthread_mutex_lock(&s->lock);
	assert(rc == 0);
	(void)rc;
}

void kvt_session_unlock(struct kvt_session *s)
{
	int rc = pthread_mutex_unlock(&s->lock);
	assert(rc == 0);
	(void)rc;
}

void kvt_session_touch(struct kvt_session *s)
{
	__atomic_store_n(&s->last_access_ms, kvt_now_ms(), __ATOMIC_RELAXED);
}

void kvt_session_clear_stage_locked(struct kvt_session *s)
{
	if (s->stage_k) {
		size_t bytes = (size_t)s->cfg.n_layers * s->cfg.n_kv_heads * s->cfg.head_dim *
			       kvt_dtype_size(s->cfg.dtype);
		kvt_tier_host_free(s->table->host, s->stage_k, bytes);
		kvt_tier_host_free(s->table->host, s->stage_v, bytes);
	}
	s->stage_k = s->stage_v = NULL;
	memset(s->stage_mask, 0, sizeof s->stage_mask);
	s->staged_layers = 0;
}

void kvt_session_info_locked(struct kvt_session *s, struct kvt_session_info *info)
{
	const struct kvt_codec_config *c = &s->cfg;
	memset(info, 0, sizeof *info);
	info->cfg = *c;
	info->n_tokens = kvt_seq_tokens(s->seq);
	info->n_chunks = kvt_seq_n_chunks(s->seq);
	info->tail_tokens = kvt_seq_tail_tokens(s->seq);
	info->bytes_held = kvt_seq_bytes(s->seq);
	uint64_t per_token = (uint64_t)c->n_layers * c->n_kv_heads * c->head_dim;
	info->logical_bytes = info->n_tokens * per_token * 2 /* f16 */ * 2 /* K and V */;
	uint64_t cb = 0;
	for (uint32_t i = 0; i < info->n_chunks; i++) {
		const struct kvt_chunk *ch = kvt_seq_chunk(s->seq, i);
		if (ch)
			cb += ch->size_bytes;
	}
	info->chunk_bytes = cb;
	if (info->n_chunks)
		info->bits_per_element =
			(double)cb * 8.0 /
			((double)info->n_chunks * c->chunk_tokens * (double)per_token * 2.0);
	info->pinned = __atomic_load_n(&s->pinned, __ATOMIC_RELAXED);
	info->ttl_seconds = __atomic_load_n(&s->ttl_seconds, __ATOMIC_RELAXED);
	uint64_t now = kvt_now_ms(), last = __atomic_load_n(&s->last_access_ms, __ATOMIC_RELAXED);
	info->idle_ms = now > last ? now - last : 0;
}

void kvt_sessions_totals(struct kvt_sessions *t, uint64_t *sessions, uint64_t *tokens,
			 uint64_t *bytes_held, uint64_t *logical_bytes, uint64_t *chunks)
{
	struct kvt_session **list = NULL;
	size_t n = 0;
	int more = 0;
	*sessions = *tokens = *bytes_held = *logical_bytes = *chunks = 0;
	/* Stats is rare; reuse the listing (all tenants share "local" for now). */
	if (kvt_sessions_list(t, "local", "", NULL, UINT32_MAX, &list, &n, &more))
		return;
	for (size_t i = 0; i < n; i++) {
		struct kvt_session_info info;
		kvt_session_lock(list[i]);
		kvt_session_info_locked(list[i], &info);
		kvt_session_unlock(list[i]);
		*tokens += info.n_tokens;
		*bytes_held += info.bytes_held;
		*logical_bytes += info.logical_bytes;
		*chunks += info.n_chunks;
		kvt_session_put(list[i]);
	}
	*sessions = n;
	free(list);
}

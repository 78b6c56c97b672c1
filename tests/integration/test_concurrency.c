/*
 * test_concurrency.c - many threads x many sessions on one shared libkvtier client: appends
 * interleaved with fetches and attends. Each thread owns its sessions' local references, so
 * every answer can be checked exactly while the daemon serves all threads at once; at the
 * end every session's content equals its reference.
 */
#include "kvt_it.h"

#include <pthread.h>
#include <stdatomic.h>

#define N_THREADS 8
#define SESSIONS_PER_THREAD 3
#define OPS_PER_THREAD 40
#define NL 3
#define NH 2
#define ND 64
#define NB 64

static struct kvt_daemon g_d;
static struct kvt_client *g_c;
static atomic_int g_failures;
static atomic_int g_ops;

struct worker {
	int idx;
	char ids[SESSIONS_PER_THREAD][32];
	struct kvt_seq *ref[SESSIONS_PER_THREAD];
	char why[1024];
};

#define WFAIL(w, ...)                                                        \
	do {                                                                 \
		snprintf((w)->why, sizeof((w)->why), __VA_ARGS__);           \
		atomic_fetch_add(&g_failures, 1);                            \
		return NULL;                                                 \
	} while (0)

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct kvt_client_status st;
	char err[256];
	const struct kvt_client_shape sh = { NL, NH, ND, KVT_DTYPE_F16 };

	it_seed((uint64_t)w->idx + 1);
	for (int s = 0; s < SESSIONS_PER_THREAD; s++) {
		struct kvt_client_session_params p;
		struct kvt_client_session_info info;
		struct kvt_codec_config cfg;
		snprintf(w->ids[s], sizeof(w->ids[s]), "conc-%d-%d", w->idx, s);
		kvt_client_session_params_init(&p, w->ids[s], NL, NH, ND, KVT_DTYPE_F16);
		p.codec.chunk_tokens = NB;
		p.codec.group = 32;
		if (kvt_client_open(g_c, &p, &info, &st))
			WFAIL(w, "open %s: %s%s %s", w->ids[s], st.local ? "local " : "",
			      kvt_client_code_name(st.code), st.message);
		it_config_from_info(&info, &cfg);
		if (kvt_seq_create(&cfg, NULL, &w->ref[s], err, sizeof(err)))
			WFAIL(w, "local: %s", err);
	}
	for (int op = 0; op < OPS_PER_THREAD; op++) {
		int s = (int)it_rand_below(SESSIONS_PER_THREAD);
		struct kvt_seq *ref = w->ref[s];
		uint64_t T = kvt_seq_tokens(ref);
		uint32_t kind = T == 0 ? 0 : it_rand_below(3);
		atomic_fetch_add(&g_ops, 1);
		if (kind == 0) {
			uint32_t n = 1 + it_rand_below(150);
			size_t bytes = kvt_client_kv_bytes(&sh, n);
			void *k = it_xmalloc(bytes), *v = it_xmalloc(bytes);
			struct kvt_client_append_opts o;
			kvt_client_append_opts_init(&o);
			o.token_begin = T;
			o.max_message_bytes = (it_rand_below(2) ? 16 : 4096) * 1024; /* some split */
			it_gen_kv(NL, NH, ND, KVT_DTYPE_F16, T, n, k, v);
			int rc = kvt_client_append(g_c, w->ids[s], &sh, k, v, n, &o, NULL, &st);
			if (!rc)
				rc = kvt_seq_append(ref, k, v, n, err, sizeof(err));
			free(k);
			free(v);
			if (rc)
				WFAIL(w, "append %u to %s: %s%s %s %s", n, w->ids[s],
				      st.local ? "local " : "", kvt_client_code_name(st.code),
				      st.message, err);
		} else if (kind == 1) {
			uint64_t t0 = it_rand_below((uint32_t)T), t1 = t0 + 1 + it_rand_below((uint32_t)(T - t0));
			uint32_t l0 = it_rand_below(NL), l1 = l0 + 1 + it_rand_below(NL - l0);
			if (!it_fetch_equals(g_c, w->ids[s], ref, t0, t1, l0, l1,
					     it_rand_below(2) ? KVT_DTYPE_F16 : KVT_DTYPE_F32))
				WFAIL(w, "fetch %s [%llu, %llu) x [%u, %u) differs", w->ids[s],
				      (unsigned long long)t0, (unsigned long long)t1, l0, l1);
		} else {
			struct kvt_client_attend_item items[NL];
			float q[NL][2 * NH * ND], out[NL][2 * NH * ND], r[2 * NH * ND], e = 0;
			for (uint32_t l = 0; l < NL; l++) {
				for (size_t i = 0; i < 2 * NH * ND; i++)
					q[l][i] = it_rand_normal();
				memset(&items[l], 0, sizeof(items[l]));
				items[l].session_id = w->ids[s];
				items[l].layer = l;
				items[l].n_q_heads = 2 * NH;
				items[l].q = q[l];
				items[l].q_bytes = sizeof(q[l]);
				items[l].out = out[l];
				items[l].out_cap = sizeof(out[l]);
			}
			if (kvt_client_attend(g_c, items, NL, 0, &st))
				WFAIL(w, "attend %s: %s%s %s", w->ids[s], st.local ? "local " : "",
				      kvt_client_code_name(st.code), st.message);
			for (uint32_t l = 0; l < NL; l++) {
				if (kvt_seq_attend(ref, l, 2 * NH, 1.0f / 8.0f, q[l], r, err, sizeof(err)))
					WFAIL(w, "local attend: %s", err);
				if (items[l].n_tokens_attended != T || !it_close(out[l], r, 2 * NH * ND, &e))
					WFAIL(w, "attend %s layer %u: %llu tokens, err %g", w->ids[s], l,
					      (unsigned long long)items[l].n_tokens_attended, e);
			}
		}
	}
	for (int s = 0; s < SESSIONS_PER_THREAD; s++) {
		uint64_t T = kvt_seq_tokens(w->ref[s]);
		if (T && !it_fetch_equals(g_c, w->ids[s], w->ref[s], 0, T, 0, NL, KVT_DTYPE_F16))
			WFAIL(w, "final content of %s differs", w->ids[s]);
	}
	return NULL;
}

static void test_threads_sessions(void)
{
	pthread_t th[N_THREADS];
	static struct worker w[N_THREADS];
	for (int i = 0; i < N_THREADS; i++) {
		memset(&w[i], 0, sizeof(w[i]));
		w[i].idx = i;
		KVT_REQUIRE(pthread_create(&th[i], NULL, worker_main, &w[i]) == 0, "pthread_create");
	}
	for (int i = 0; i < N_THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < N_THREADS; i++) {
		KVT_CHECK(w[i].why[0] == '\0', "thread %d: %s", i, w[i].why);
		for (int s = 0; s < SESSIONS_PER_THREAD; s++) {
			struct kvt_client_session_info info;
			struct kvt_client_status st;
			if (!w[i].ref[s])
				continue;
			KVT_CHECK(kvt_client_stat(g_c, w[i].ids[s], &info, &st) == 0 &&
					  info.n_tokens == kvt_seq_tokens(w[i].ref[s]),
				  "%s length", w[i].ids[s]);
			kvt_seq_destroy(w[i].ref[s]);
		}
	}
	printf("# %d operations from %d threads on %d sessions\n", atomic_load(&g_ops), N_THREADS,
	       N_THREADS * SESSIONS_PER_THREAD);
	KVT_CHECK(atomic_load(&g_failures) == 0, "%d threads failed", atomic_load(&g_failures));
	if (atomic_load(&g_failures))
		kvt_daemon_print_log(&g_d, 40); /* what the daemon saw (debug level) */
}

int main(void)
{
	kvt_test_init();
	/* debug: every failed request is logged, printed if a thread fails */
	static const char *const args[] = { "--log-level=debug", NULL };
	if (kvt_daemon_start_client(&g_d, args, &g_c) != 0)
		return 1;
	KVT_RUN(test_threads_sessions);
	kvt_client_close(g_c);
	KVT_CHECK(kvt_daemon_stop(&g_d) == 0, "daemon exit 0 after SIGTERM");
	return kvt_test_done();
}

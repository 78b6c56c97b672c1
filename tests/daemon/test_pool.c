/* Unit tests of kvtierd's worker pool (daemon/rpc_pool.c): every task runs exactly once from
 * many submitting threads; a waiter claims a task no worker has taken (and runs it on its
 * own thread, so waiting never deadlocks on a busy pool); cancel withdraws a queued task; a
 * full queue makes the submitter run the task (back-pressure); stop runs what is queued. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_test.h"
#include "rpc.h"

/* A task that blocks its worker until released: the pool's one worker is then busy. */
static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int started, release;
} g_gate = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0 };

static void gate_fn(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&g_gate.mu);
	g_gate.started = 1;
	pthread_cond_broadcast(&g_gate.cv);
	while (!g_gate.release)
		pthread_cond_wait(&g_gate.cv, &g_gate.mu);
	pthread_mutex_unlock(&g_gate.mu);
}

static void gate_block(struct kvt_task *t)
{
	g_gate.started = g_gate.release = 0;
	kvt_pool_submit(t, gate_fn, NULL);
	pthread_mutex_lock(&g_gate.mu);
	while (!g_gate.started)
		pthread_cond_wait(&g_gate.cv, &g_gate.mu);
	pthread_mutex_unlock(&g_gate.mu);
}

static void gate_open(struct kvt_task *t)
{
	pthread_mutex_lock(&g_gate.mu);
	g_gate.release = 1;
	pthread_cond_broadcast(&g_gate.cv);
	pthread_mutex_unlock(&g_gate.mu);
	kvt_pool_wait(t);
}

struct probe {
	struct kvt_task task;
	atomic_int runs;
	pthread_t ran_on;
};

static void probe_fn(void *arg)
{
	struct probe *p = arg;
	p->ran_on = pthread_self();
	atomic_fetch_add(&p->runs, 1);
}

#define N_SUBMITTERS 4
#define TASKS_EACH 500

static void *submitter(void *arg)
{
	struct probe *ps = arg;
	for (int i = 0; i < TASKS_EACH; i++)
		kvt_pool_submit(&ps[i].task, probe_fn, &ps[i]);
	for (int i = 0; i < TASKS_EACH; i++)
		kvt_pool_wait(&ps[i].task);
	return NULL;
}

static void test_every_task_once(void)
{
	KVT_REQUIRE(kvt_pool_start(3, 64) == 0, "start");
	struct probe *ps = calloc(N_SUBMITTERS * TASKS_EACH, sizeof *ps);
	pthread_t th[N_SUBMITTERS];
	for (int i = 0; i < N_SUBMITTERS; i++)
		KVT_REQUIRE(pthread_create(&th[i], NULL, submitter, ps + i * TASKS_EACH) == 0,
			    "pthread_create");
	for (int i = 0; i < N_SUBMITTERS; i++)
		pthread_join(th[i], NULL);
	int bad = 0;
	for (int i = 0; i < N_SUBMITTERS * TASKS_EACH; i++)
		bad += atomic_load(&ps[i].runs) != 1;
	KVT_CHECK(bad == 0, "%d of %d tasks did not run exactly once", bad,
		  N_SUBMITTERS * TASKS_EACH);
	kvt_pool_stop();
	free(ps);
}

static void test_claim_cancel_backpressure(void)
{
	struct kvt_task gate;
	struct probe a, b, c, d, e;
	memset(&a, 0, sizeof a);
	memset(&b, 0, sizeof b);
	memset(&c, 0, sizeof c);
	memset(&d, 0, sizeof d);
	memset(&e, 0, sizeof e);
	KVT_REQUIRE(kvt_pool_start(1, 2) == 0, "start");
	KVT_CHECK(kvt_pool_threads() == 1, "one worker (%u)", kvt_pool_threads());
	gate_block(&gate);
	KVT_CHECK(kvt_pool_idle() == 0, "the only worker is busy (idle %u)", kvt_pool_idle());

	/* claim: the worker is blocked, so the waiter runs the task itself */
	kvt_pool_submit(&a.task, probe_fn, &a);
	kvt_pool_wait(&a.task);
	KVT_CHECK(atomic_load(&a.runs) == 1 && pthread_equal(a.ran_on, pthread_self()),
		  "a queued task is claimed by its waiter (runs %d)", atomic_load(&a.runs));

	/* cancel: withdrawn before any worker took it, never runs */
	kvt_pool_submit(&b.task, probe_fn, &b);
	KVT_CHECK(kvt_pool_cancel(&b.task) == 0, "cancel of a queued task withdraws it");
	KVT_CHECK(atomic_load(&b.runs) == 0, "a withdrawn task never runs");

	/* back-pressure: a queue of 2 holds c and d; e runs on the submitter at once */
	uint64_t inline0 = kvt_pool_ran_inline();
	kvt_pool_submit(&c.task, probe_fn, &c);
	kvt_pool_submit(&d.task, probe_fn, &d);
	kvt_pool_submit(&e.task, probe_fn, &e);
	KVT_CHECK(atomic_load(&e.runs) == 1 && pthread_equal(e.ran_on, pthread_self()),
		  "a full queue makes the submitter run the task");
	KVT_CHECK(kvt_pool_ran_inline() == inline0 + 1, "ran_inline counts it");
	KVT_CHECK(atomic_load(&c.runs) == 0 && atomic_load(&d.runs) == 0,
		  "queued tasks wait for the worker");

	/* the worker comes back and takes the queue in order */
	gate_open(&gate);
	kvt_pool_wait(&c.task);
	kvt_pool_wait(&d.task);
	KVT_CHECK(atomic_load(&c.runs) == 1 && atomic_load(&d.runs) == 1, "queued tasks ran");
	KVT_CHECK(kvt_pool_cancel(&c.task) == 1, "cancel of a finished task reports it ran");
	kvt_pool_stop();
}

/* A detached task may free its own memory: the pool reads nothing of it afterwards. */
static atomic_int g_detached_runs;

static void detached_fn(void *arg)
{
	atomic_fetch_add(&g_detached_runs, 1);
	free(arg); /* the task struct is the first member of what arg points to */
}

static void test_stop_drains(void)
{
	struct kvt_task gate;
	KVT_REQUIRE(kvt_pool_start(1, 1000) == 0, "start");
	gate_block(&gate);
	atomic_store(&g_detached_runs, 0);
	for (int i = 0; i < 100; i++) {
		struct kvt_task *t = malloc(sizeof *t);
		kvt_pool_submit_detached(t, detached_fn, t);
	}
	gate_open(&gate);
	kvt_pool_stop(); /* runs the 100 queued tasks, then joins */
	KVT_CHECK(atomic_load(&g_detached_runs) == 100, "stop ran %d of 100 queued tasks",
		  atomic_load(&g_detached_runs));
	/* without workers every task runs on its submitter */
	struct probe p;
	memset(&p, 0, sizeof p);
	kvt_pool_submit(&p.task, probe_fn, &p);
	KVT_CHECK(atomic_load(&p.runs) == 1 && pthread_equal(p.ran_on, pthread_self()),
		  "a stopped pool runs tasks inline");
}

int main(void)
{
	kvt_test_init();
	KVT_RUN(test_every_task_once);
	KVT_RUN(test_claim_cancel_backpressure);
	KVT_RUN(test_stop_drains);
	return kvt_test_done();
}

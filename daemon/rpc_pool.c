/*
 * rpc_pool.c - kvtierd's worker pool (see rpc.h): the completion-queue threads hand heavy
 * steps of a call (Fetch's decode, Append's and StoreEncoded's commit, Attend) to it, so a
 * long step never holds up the other calls of a queue.
 *
 * One FIFO of tasks under one mutex; tasks are intrusive (the submitter owns the memory), so
 * a submit never allocates. The queue is bounded: when it holds queue_cap tasks, the
 * submitter runs the task itself (back-pressure lands on the thread that produced the work,
 * and nothing is ever dropped). A task that is still queued can be claimed by a thread that
 * needs its result (kvt_pool_wait) or withdrawn (kvt_pool_cancel): a thread waiting for
 * work it split off never waits for a task no worker has picked up, so waiting cannot
 * deadlock however many workers are busy.
 */
#include "rpc.h"

#include <assert.h>
#include <stdlib.h>

#include "log.h"

enum { TASK_IDLE = 0, TASK_QUEUED, TASK_RUNNING, TASK_DONE };

static struct {
	pthread_mutex_t mu;
	pthread_cond_t work_cv; /* a task was queued, or stop */
	pthread_cond_t done_cv; /* a task finished */
	struct kvt_task *head, *tail;
	size_t queued, cap;
	pthread_t *threads;
	unsigned n_threads;
	unsigned idle;          /* workers waiting for a task (atomic reads) */
	unsigned busy;          /* workers running a task (atomic reads) */
	int stop;
	uint64_t ran_inline; /* tasks run by their submitter because the queue was full */
} g_pool = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.work_cv = PTHREAD_COND_INITIALIZER,
	.done_cv = PTHREAD_COND_INITIALIZER,
};

static void unlink_locked(struct kvt_task *t)
{
	if (t->prev)
		t->prev->next = t->next;
	else
		g_pool.head = t->next;
	if (t->next)
		t->next->prev = t->prev;
	else
		g_pool.tail = t->prev;
	t->next = t->prev = NULL;
	__atomic_store_n(&g_pool.queued, g_pool.queued - 1, __ATOMIC_RELAXED);
}

static void run(struct kvt_task *t)
{
	/* A detached task may be freed by what it starts (a call step's batch completes and
	 * frees the call): nothing of it is read after fn. */
	if (t->detached) {
		t->fn(t->arg);
		return;
	}
	t->fn(t->arg);
	pthread_mutex_lock(&g_pool.mu);
	t->state = TASK_DONE;
	pthread_cond_broadcast(&g_pool.done_cv);
	pthread_mutex_unlock(&g_pool.mu);
}

static void *worker_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&g_pool.mu);
	for (;;) {
		while (!g_pool.head && !g_pool.stop) {
			__atomic_store_n(&g_pool.idle, g_pool.idle + 1, __ATOMIC_RELAXED);
			pthread_cond_wait(&g_pool.work_cv, &g_pool.mu);
			__atomic_store_n(&g_pool.idle, g_pool.idle - 1, __ATOMIC_RELAXED);
		}
		if (!g_pool.head)
			break; /* stop, and the queue is drained */
		struct kvt_task *t = g_pool.head;
		unlink_locked(t);
		t->state = TASK_RUNNING;
		__atomic_store_n(&g_pool.busy, g_pool.busy + 1, __ATOMIC_RELAXED);
		pthread_mutex_unlock(&g_pool.mu);
		run(t);
		pthread_mutex_lock(&g_pool.mu);
		__atomic_store_n(&g_pool.busy, g_pool.busy - 1, __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&g_pool.mu);
	return NULL;
}

int kvt_pool_start(unsigned n_threads, size_t queue_cap)
{
	assert(!g_pool.threads);
	g_pool.threads = calloc(n_threads ? n_threads : 1, sizeof(pthread_t));
	if (!g_pool.threads)
		return -1;
	g_pool.cap = queue_cap;
	g_pool.stop = 0;
	for (unsigned i = 0; i < n_threads; i++) {
		if (pthread_create(&g_pool.threads[i], NULL, worker_main, NULL)) {
			kvt_pool_stop();
			return -1;
		}
		g_pool.n_threads++;
	}
	return 0;
}

void kvt_pool_stop(void)
{
	pthread_mutex_lock(&g_pool.mu);
	g_pool.stop = 1;
	pthread_cond_broadcast(&g_pool.work_cv);
	pthread_mutex_unlock(&g_pool.mu);
	for (unsigned i = 0; i < g_pool.n_threads; i++)
		pthread_join(g_pool.threads[i], NULL);
	free(g_pool.threads);
	g_pool.threads = NULL;
	g_pool.n_threads = 0;
	assert(!g_pool.head);
}

unsigned kvt_pool_threads(void)
{
	return g_pool.n_threads;
}

unsigned kvt_pool_idle(void)
{
	/* Idle workers minus the tasks already queued for them: what a split may use. */
	unsigned idle = __atomic_load_n(&g_pool.idle, __ATOMIC_RELAXED);
	size_t queued = __atomic_load_n(&g_pool.queued, __ATOMIC_RELAXED);
	return idle > queued ? idle - (unsigned)queued : 0;
}

unsigned kvt_pool_busy(void)
{
	return __atomic_load_n(&g_pool.busy, __ATOMIC_RELAXED);
}

static void submit(struct kvt_task *t, void (*fn)(void *arg), void *arg, int detached)
{
	t->detached = detached;
	t->fn = fn;
	t->arg = arg;
	t->next = t->prev = NULL;
	pthread_mutex_lock(&g_pool.mu);
	if (!g_pool.n_threads || g_pool.stop || g_pool.queued >= g_pool.cap) {
		/* No pool, or it is full: the submitter does the work (back-pressure). */
		t->state = TASK_RUNNING;
		g_pool.ran_inline++;
		pthread_mutex_unlock(&g_pool.mu);
		run(t);
		return;
	}
	t->state = TASK_QUEUED;
	t->prev = g_pool.tail;
	if (g_pool.tail)
		g_pool.tail->next = t;
	else
		g_pool.head = t;
	g_pool.tail = t;
	__atomic_store_n(&g_pool.queued, g_pool.queued + 1, __ATOMIC_RELAXED);
	pthread_cond_signal(&g_pool.work_cv);
	pthread_mutex_unlock(&g_pool.mu);
}

void kvt_pool_submit(struct kvt_task *t, void (*fn)(void *arg), void *arg)
{
	submit(t, fn, arg, 0);
}

void kvt_pool_submit_detached(struct kvt_task *t, void (*fn)(void *arg), void *arg)
{
	submit(t, fn, arg, 1);
}

void kvt_pool_wait(struct kvt_task *t)
{
	pthread_mutex_lock(&g_pool.mu);
	if (t->state == TASK_QUEUED) {
		/* No worker has it yet: do it here rather than wait for one. */
		unlink_locked(t);
		t->state = TASK_RUNNING;
		pthread_mutex_unlock(&g_pool.mu);
		run(t);
		return;
	}
	while (t->state == TASK_RUNNING)
		pthread_cond_wait(&g_pool.done_cv, &g_pool.mu);
	pthread_mutex_unlock(&g_pool.mu);
}

int kvt_pool_cancel(struct kvt_task *t)
{
	int ran = 1;
	pthread_mutex_lock(&g_pool.mu);
	if (t->state == TASK_QUEUED) {
		unlink_locked(t);
		t->state = TASK_DONE;
		ran = 0;
	}
	while (t->state == TASK_RUNNING)
		pthread_cond_wait(&g_pool.done_cv, &g_pool.mu);
	pthread_mutex_unlock(&g_pool.mu);
	return ran;
}

uint64_t kvt_pool_ran_inline(void)
{
	pthread_mutex_lock(&g_pool.mu);
	uint64_t n = g_pool.ran_inline;
	pthread_mutex_unlock(&g_pool.mu);
	return n;
}

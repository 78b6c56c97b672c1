/*
 * fuzz_ctx.h - the failure context of a fuzz test: one line naming the iteration, its input
 * and how to replay it (KVT_SEED=... KVT_FUZZ_ITER=...), printed once before the first failing
 * check of that iteration (FCHECK), and written raw to stderr when the iteration crashes or a
 * sanitizer report ends the process, so that every failure says which input caused it.
 * Header-only: one fuzz test per executable.
 */
#ifndef KVT_FUZZ_CTX_H
#define KVT_FUZZ_CTX_H

#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include "fuzz_run.h"
#include "kvt_test.h"

static char ctx[1600];
static size_t ctx_len;   /* 0: no iteration running (nothing to name on a crash) */
static bool ctx_printed; /* printed for this iteration already */
static int failing_iters;

/* Starts an iteration's context (the line should end in '\n'). */
static void ctx_set(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ctx_set(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(ctx, sizeof(ctx), fmt, ap);
	va_end(ap);
	ctx_len = strlen(ctx);
	ctx_printed = false;
}

static inline void ctx_clear(void)
{
	ctx_len = 0;
}

static void fail_ctx(void)
{
	if (ctx_printed)
		return;
	ctx_printed = true;
	failing_iters++;
	printf("#   %s", ctx);
}

/* What a mutation did, in words, appended step by step (cut at the buffer's end). */
struct fuzz_desc {
	char s[700];
	size_t n;
};

static void fuzz_desc_add(struct fuzz_desc *d, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void fuzz_desc_add(struct fuzz_desc *d, const char *fmt, ...)
{
	if (d->n >= sizeof(d->s) - 1)
		return;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(d->s + d->n, sizeof(d->s) - d->n, fmt, ap);
	va_end(ap);
	if (n > 0)
		d->n += (size_t)n;
	if (d->n > sizeof(d->s) - 1)
		d->n = sizeof(d->s) - 1;
}

/* A check that names the iteration, its input and its replay when it fails. */
#define FCHECK(cond, ...) KVT_CHECK_OR(fail_ctx, cond, __VA_ARGS__)

static void ctx_write_raw(void)
{
	if (ctx_len) {
		ssize_t w = write(STDERR_FILENO, ctx, ctx_len);
		(void)w;
	}
}

static void ctx_on_fatal_signal(int sig)
{
	ctx_write_raw();
	signal(sig, SIG_DFL);
	raise(sig);
}

#if defined(__SANITIZE_ADDRESS__)
static void ctx_on_sanitizer_death(void)
{
	fflush(stdout);
	ctx_write_raw();
}
#endif

/* Names the running iteration on a crash or an ASan / UBSan report (under ASan the
 * sanitizer owns SIGSEGV and friends and calls back before it exits). */
static void ctx_catch_crashes(void)
{
#if defined(__SANITIZE_ADDRESS__)
	__sanitizer_set_death_callback(ctx_on_sanitizer_death);
	signal(SIGABRT, ctx_on_fatal_signal);
#else
	signal(SIGABRT, ctx_on_fatal_signal);
	signal(SIGSEGV, ctx_on_fatal_signal);
	signal(SIGBUS, ctx_on_fatal_signal);
	signal(SIGFPE, ctx_on_fatal_signal);
#endif
}

/* The fuzz loop: iteration(0), iteration(1), ... for as long as fuzz_run.h says, stopping
 * early after max_failing failing iterations. Returns the seconds it ran. */
static double ctx_run(uint64_t default_iters, int max_failing, void (*iteration)(uint64_t it))
{
	struct fuzz_run run;
	fuzz_run_start(&run, default_iters);
	for (uint64_t it = 0; fuzz_run_more(&run, it) && failing_iters < max_failing; it++)
		iteration(it);
	ctx_clear();
	return fuzz_run_elapsed(&run);
}

#endif

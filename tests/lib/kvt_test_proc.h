/* kvt_test_proc.h - running a program under test and capturing what it prints (tests that
 * check a binary's exit status and messages: kvtierd's arguments, kvtierctl's escaping). */
#ifndef KVT_TEST_PROC_H
#define KVT_TEST_PROC_H

#include <stdio.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Runs path with args (argv[0] included), its stdout and stderr together into out (cut to
 * outlen - 1 bytes, NUL-terminated; the rest is read and dropped, so the child never blocks
 * on a full pipe). Returns its exit status, or -1 when it could not run or did not exit. */
static inline int kvt_test_run_capture(const char *path, char *const args[], char *out,
				       size_t outlen)
{
	int pfd[2];
	if (pipe(pfd))
		return -1;
	pid_t pid = fork();
	if (pid < 0) {
		close(pfd[0]);
		close(pfd[1]);
		return -1;
	}
	if (pid == 0) {
		dup2(pfd[1], 1);
		dup2(pfd[1], 2);
		close(pfd[0]);
		execv(path, args);
		_exit(127);
	}
	close(pfd[1]);
	size_t n = 0;
	ssize_t r;
	while (n + 1 < outlen && (r = read(pfd[0], out + n, outlen - 1 - n)) > 0)
		n += (size_t)r;
	out[n] = '\0';
	char sink[256];
	while (read(pfd[0], sink, sizeof sink) > 0)
		;
	close(pfd[0]);
	int st;
	if (waitpid(pid, &st, 0) < 0)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

#endif

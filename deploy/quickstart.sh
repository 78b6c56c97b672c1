#!/usr/bin/env bash
# kvtier quick start, on a fresh Debian 12 machine as root: installs what is missing, builds,
# starts kvtierd on its built-in defaults (unix socket ./run/kvtierd.sock), waits for it to
# serve, runs a demo workload through it, and stops it with SIGTERM checking a clean exit.
# Usage: deploy/quickstart.sh [extra kvtierctl demo flags]     (BUILD_DIR overrides build/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
cd "$root"

step() { printf '\n==> %s\n' "$*"; }
daemon_pid=
cleanup() {
  # only on an error path: a daemon we started and did not stop yet
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    echo "quickstart: stopping kvtierd (pid $daemon_pid) after an error" >&2
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

step "1/6 installing dependencies (deploy/scripts/install-deps.sh)"
"$root/deploy/scripts/install-deps.sh" "$build"

step "2/6 configuring and building (cmake -B $build; cmake --build $build -j$(nproc))"
cmake -S "$root" -B "$build" -DKVTIER_PYTHON="$build/venv/bin/python" >/dev/null
cmake --build "$build" -j"$(nproc)"

kvtierd="$build/daemon/kvtierd"
kvtierctl="$build/client/kvtierctl"
socket="$root/run/kvtierd.sock"
log="$root/run/kvtierd.log"
for f in "$kvtierd" "$kvtierctl"; do
  [ -x "$f" ] || { echo "quickstart: $f was not built" >&2; exit 1; }
done

step "3/6 starting kvtierd on its defaults (socket $socket, log $log)"
mkdir -p "$root/run"
if "$kvtierctl" --socket "$socket" health >/dev/null 2>&1; then
  echo "quickstart: a kvtierd already serves $socket; stop it first" >&2
  exit 1
fi
# kvtierd's default socket is ./run/kvtierd.sock relative to its working directory.
env -u RUNTIME_DIRECTORY "$kvtierd" 2>"$log" &
daemon_pid=$!
echo "kvtierd pid $daemon_pid"

step "4/6 waiting (at most 30 s) for health SERVING"
if ! "$kvtierctl" --socket "$socket" health --wait-ms 30000; then
  echo "quickstart: kvtierd did not become healthy; last log lines:" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
fi

step "5/6 demo: the synthetic TNI set of kvtier-bench fidelity through the daemon: default codec, INT4, exact (kvtierctl demo $*)"
"$kvtierctl" --socket "$socket" demo "$@"
"$kvtierctl" --socket "$socket" stats

# ---- HOOK: real-model chat demo ---------------------------------------------------------------
# Added later by the model teammate: a real model's KV cache saved to and resumed from kvtierd.
# It runs here, while the daemon serves $socket. Keep this marker line:
# KVTIER_QUICKSTART_REALMODEL_HOOK
if [ -x "$root/deploy/scripts/quickstart-chat.sh" ]; then
  step "5b/6 real-model chat demo (deploy/scripts/quickstart-chat.sh)"
  KVTIER_SOCKET="$socket" "$root/deploy/scripts/quickstart-chat.sh"
fi
# ---- end of hook -------------------------------------------------------------------------------

step "6/6 stopping kvtierd with SIGTERM"
kill -TERM "$daemon_pid"
status=0
wait "$daemon_pid" || status=$?
daemon_pid=
if [ "$status" -ne 0 ]; then
  echo "quickstart: kvtierd exited with status $status; last log lines:" >&2
  tail -n 30 "$log" >&2 || true
  exit 1
fi
echo "kvtierd exited 0"
echo
echo "quickstart: done. Next: tests/run.sh runs the whole test suite."

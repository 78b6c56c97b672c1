#!/usr/bin/env bash
# The CPU test suite again under sanitizers: AddressSanitizer + UndefinedBehaviorSanitizer
# (default), or ThreadSanitizer (KVTIER_SANITIZE=thread). Builds a tree of its own
# (build-san-<kind>, CUDA off: compute-sanitizer covers the kernels on a GPU), runs every ctest
# label but bench and gpu, and fails when a test fails or when any process (kvtierd started by
# the integration and fault tests included, whose own exit status a test may not look at) wrote
# a sanitizer report. CI runs it after tests/run.sh.
# Usage: tests/sanitize.sh [extra ctest args]   (BUILD_DIR overrides the build folder)
# Python: the venv of the main build folder (build/venv, or PY_BUILD_DIR/venv), which the
# installer makes when tests/run.sh has not.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kind=${KVTIER_SANITIZE:-address,undefined}
build=${BUILD_DIR:-$root/build-san-${kind//,/-}}
pybuild=${PY_BUILD_DIR:-$root/build}
"$root/deploy/scripts/install-deps.sh" "$pybuild"
cmake -S "$root" -B "$build" -DKVTIER_SANITIZE="$kind" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVTIER_PYTHON="$pybuild/venv/bin/python" >/dev/null
cmake --build "$build" -j"$(nproc)"

logs="$build/sanitizer-logs"
rm -rf "$logs"
mkdir -p "$logs"
# Every process appends its reports to a file of its own under $logs.
export ASAN_OPTIONS="log_path=$logs/asan:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="log_path=$logs/ubsan:print_stacktrace=1:halt_on_error=1"
# gRPC core is not built with TSan: its own accesses and the interceptors it calls are
# ignored (ignore_noninstrumented_modules), kvtier's hand-overs through it are annotated
# (daemon/kvt_tsan.h), and the suppressions name only races whose top frame is in its libraries.
export TSAN_OPTIONS="log_path=$logs/tsan:ignore_noninstrumented_modules=1:second_deadlock_stack=1:suppressions=$root/tests/tsan.supp"

# ThreadSanitizer looks for races between threads: the daemon and its clients (integration,
# fault and the daemon's unit tests). The single-threaded codec, .npy and config fuzz tests
# only get 5-15x slower under it, so they run in the address/undefined pass only.
skip=()
case "$kind" in *thread*) skip=(-E '^(codec_|seq_|fuzz_chunk|fuzz_npy|fuzz_config|npy_unit|fidelity_|bench_codec_|bench_fidelity_)') ;; esac

cd "$build"
rc=0
ctest --output-on-failure --timeout 1200 -LE "bench|gpu" "${skip[@]}" -j"$(nproc)" "$@" || rc=$?
reports=$(find "$logs" -type f | sort)
if [ -n "$reports" ]; then
  for f in $reports; do
    echo "== sanitizer report $f"
    head -c 20000 "$f"
  done
  echo "sanitize: $(echo "$reports" | wc -l) process(es) wrote sanitizer reports" >&2
  rc=1
fi
[ "$rc" -eq 0 ] && echo "sanitize ($kind): all tests passed, no sanitizer reports"
exit "$rc"

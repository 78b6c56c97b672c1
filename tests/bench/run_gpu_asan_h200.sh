#!/bin/bash
# The GPU tests with the host side under AddressSanitizer + UndefinedBehaviorSanitizer (session 13).
# CI has no GPU, so tests/sanitize.sh cannot reach the GPU tier's C code (tiers/tier_gpu.c, the
# RestoreToDevice path in kvtierd, the tests' own host code); this runs it on a GPU machine.
# Build: cmake -DKVTIER_SANITIZE=address,undefined -DKVTIER_SANITIZE_CUDA=ON
#   -DCMAKE_CUDA_ARCHITECTURES=90 (the .cu files are not instrumented: compute-sanitizer covers
#   the device side in run_gpu_verify_h200.sh), then bundle kvtierd and test_gpu_{codec,attend,
#   attend_real,restore,tier,arena} unstripped (reports need their symbols) with
#   /work/shared/tools/device-bundle.sh B/lib BINARY..., plus kvtierd.sh, the Python client
#   (py/, pygen/), test_gpu_restore_torch.py and a real-model dump in kvq/ as for
#   run_gpu_verify_h200.sh. Run from anywhere with B=<bundle>; reports and outputs go to $OUT.
# Fails (exit 1) on a failing test or any sanitizer report from any process (kvtierd included).
B=${B:-$PWD/.devbundle-asan}; cd "$B" || exit 2
export LD_LIBRARY_PATH=$B/lib PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
logs=$OUT/sanitizer-logs; mkdir -p "$logs"
# protect_shadow_gap=0: the CUDA driver maps device memory where ASan's shadow gap would be
export ASAN_OPTIONS="log_path=$logs/asan:protect_shadow_gap=0:detect_leaks=1:strict_string_checks=1"
export UBSAN_OPTIONS="log_path=$logs/ubsan:print_stacktrace=1:halt_on_error=1"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
fail=0
r() {
	local n=$1; shift; local t0=$(date +%s)
	timeout "${T:-300}" "$@" > "$OUT/$n.txt" 2>&1; local rc=$?
	echo "== $n rc=$rc $(( $(date +%s) - t0 ))s"
	grep -E "^not ok" "$OUT/$n.txt" | head -10 | cut -c1-300
	grep -E "^# " "$OUT/$n.txt" | tail -"${N:-3}"
	[ "$rc" -ne 0 ] && fail=1
}
# fewer random configs and batches than the verification run: ASan slows the CPU reference
# the tests compare with
KVT_GPU_CONFIGS=${KVT_GPU_CONFIGS:-16} r codec ./test_gpu_codec
KVT_GPU_BATCHES=${KVT_GPU_BATCHES:-2} r attend ./test_gpu_attend
r attendreal ./test_gpu_attend_real "$B/kvq"
KVTIERD=$B/kvtierd.sh r restore ./test_gpu_restore
r arena ./test_gpu_arena
KVTIERD=$B/kvtierd.sh r tier ./test_gpu_tier
PYTHONPATH=$B/py KVTIER_PYGEN_DIR=$B/pygen KVTIERD=$B/kvtierd.sh r torch python3 test_gpu_restore_torch.py
n=$(find "$logs" -type f | wc -l)
echo "== sanitizer reports: $n"
for f in $(find "$logs" -type f | sort | head -5); do echo "-- $f"; head -c 4000 "$f"; done
[ "$n" -ne 0 ] && fail=1
echo "== asan gpu: $([ $fail -eq 0 ] && echo ok || echo FAILED)"
exit $fail

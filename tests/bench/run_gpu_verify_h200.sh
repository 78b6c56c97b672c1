#!/bin/bash
# lead, sessions 3-12: final verification of main on the H200: every GPU test, the sanitizers on the
# attention kernels, kvtier-bench gpu + gpu-restore
# Runs in the root of a copy of the repository on the device machine, from a bundle folder B
# holding kvtierd (+ kvtierd.sh), kvtier-bench, test_gpu_{codec,attend,restore,tier}, test_gpu_arena,
# test_gpu_restore_torch.py, bench_gpu_sdpa.py, the Python client (py/) and its generated
# modules (pygen/), test_gpu_attend_real with a real-model dump in kvq/ (build/realmodel/kvq-gpu,
# made by ctest's realmodel_kvq_dump), built with -DCMAKE_CUDA_ARCHITECTURES=90 and bundled with
# /work/shared/tools/device-bundle.sh B/lib BINARY...; results go to $OUT.
B=${B:-$PWD/.devbundle-lead}; cd $B
export LD_LIBRARY_PATH=$B/lib PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# every failing check is printed (stdout always comes back; only some of $OUT's files do),
# then the last N summary lines
r() { local n=$1; shift; local t0=$(date +%s); timeout ${T:-240} "$@" > $OUT/$n.txt 2>&1; local rc=$?; echo "== $n rc=$rc $(( $(date +%s)-t0 ))s"; grep -E "^not ok" $OUT/$n.txt | head -20 | cut -c1-400; grep -E "^# " $OUT/$n.txt | tail -${N:-6}; }
r codec ./test_gpu_codec
KVTIER_CUDA_ENC_EXACT=1 r codecexact ./test_gpu_codec
r attend ./test_gpu_attend
# the sanitizers on the attention kernels (4 fast batches: session 11's 2 missed racecheck's
# hazards in the swapped loop's norm copy, which 4 found): 0 errors and 0 hazards expected
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$CS" ]; then
	KVT_GPU_BATCHES=0 KVT_GPU_FAST_BATCHES=4 KVT_GPU_PACKED_BATCHES=8 KVT_GPU_EXACT_BATCHES=6 KVT_GPU_HAD_BATCHES=4 KVT_GPU_F16_BATCHES=2 T=300 r racecheck $CS --tool racecheck ./test_gpu_attend
	grep -E "SUMMARY" $OUT/racecheck.txt
	KVT_GPU_BATCHES=0 KVT_GPU_FAST_BATCHES=2 KVT_GPU_PACKED_BATCHES=10 KVT_GPU_EXACT_BATCHES=6 KVT_GPU_HAD_BATCHES=6 KVT_GPU_F16_BATCHES=2 T=300 r memcheck $CS --tool memcheck ./test_gpu_attend
	grep -E "SUMMARY" $OUT/memcheck.txt
fi
N=14 r attendreal ./test_gpu_attend_real $B/kvq
KVTIERD=$B/kvtierd.sh r restore ./test_gpu_restore
[ -x ./test_gpu_arena ] && r arena ./test_gpu_arena
KVTIERD=$B/kvtierd.sh r tier ./test_gpu_tier
PYTHONPATH=$B/py KVTIER_PYGEN_DIR=$B/pygen KVTIERD=$B/kvtierd.sh N=10 r torch python3 test_gpu_restore_torch.py; tail -4 $OUT/torch.txt
T=150 r sdpa python3 bench_gpu_sdpa.py
T=200 r bench ./kvtier-bench gpu --sdpa $OUT/sdpa.txt; grep -v '^#' $OUT/bench.txt | cut -c1-360
KVTIER_CUDA_NO_MMA=1 T=100 r benchcc ./kvtier-bench gpu --attend-only --sdpa $OUT/sdpa.txt; grep '"op":"attend"' $OUT/benchcc.txt | cut -c1-300
T=200 r restorebench ./kvtier-bench gpu-restore --kvtierd $B/kvtierd.sh --iters 10; grep -v '^#' $OUT/restorebench.txt | cut -c1-330

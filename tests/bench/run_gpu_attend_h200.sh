#!/bin/bash
# The H200 A/B run behind docs/gpu.md "Session 7: attention" (helper att8; sessions 4-6: attn4,
# att5, att7). It runs in the
# root of a copy of the repository on the device machine, from a bundle folder B holding the
# binaries built with -DCMAKE_CUDA_ARCHITECTURES=90 (test_gpu_attend, kvtier-bench,
# tests/bench/bench_gpu_sdpa.py) and their libraries (/work/shared/tools/device-bundle.sh
# B/lib BINARY...); results go to $OUT. Every variant is an environment switch of the same
# binaries, measured in this one call against the reference (SDPA, D2D copy) of the same call.
#   VARIANTS="name:ENV=1,ENV2=0 name2:..."  (default: the session-5 list below)
#   REPS=2 (each variant's bench repeated, interleaved), SAN=1 (memcheck + racecheck).
B=${B:-$PWD/.devbundle-att5}; cd $B
export LD_LIBRARY_PATH=$B/lib PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
L=$OUT/log.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee -a $L
r() { local n=$1; shift; local t0=$(date +%s); timeout ${T:-150} "$@" > $OUT/$n.txt 2>&1; local rc=$?; echo "== $n rc=$rc $(( $(date +%s)-t0 ))s" | tee -a $L; grep -E "^not ok|^# |ERROR SUMMARY|RACECHECK SUMMARY" $OUT/$n.txt | tail -${N:-4} | tee -a $L; cat $OUT/$n.txt >> $OUT/tests.txt; rm -f $OUT/$n.txt; }
b() { local n=$1; shift; env "$@" timeout 120 ./kvtier-bench gpu --attend-only --sdpa $OUT/sdpa.txt > $OUT/b.txt 2>&1; echo "== $n $*: $(grep '"op":"attend"' $OUT/b.txt | grep -oE '"batch":[0-9]+|"us_per_step":[0-9.]+|"ratio_to_copy":[0-9.]+|"speedup_vs_sdpa":[0-9.]+|"items":[0-9]+' | sed 's/"//g' | paste -sd' ')" | tee -a $L; grep '^{' $OUT/b.txt | grep '"op":"attend"' | sed "s/}\$/,\"variant\":\"$n\",\"env\":\"$*\"}/" >> $OUT/bench_all.jsonl; grep -v '^{' $OUT/b.txt | head -3; rm -f $OUT/b.txt; }
# tests of the default build (fresh seeds), then the previous default forced
r attend ./test_gpu_attend
# the real-model K/V/Q test where the bundle holds the dump (ctest -R realmodel_kvq_dump
# writes build/realmodel/kvq-gpu; copy it to B/kvq-gpu)
[ -x ./test_gpu_attend_real ] && [ -d kvq-gpu ] && export KVTIER_REAL_KVQ_DIR=$B/kvq-gpu && N=6 r attend_real ./test_gpu_attend_real
[ -n "$TEST_ENV" ] && { for e in $TEST_ENV; do env ${e//,/ } ./test_gpu_attend > $OUT/t.txt 2>&1; echo "== attend $e rc=$?: $(grep -E '^# (worst|[0-9]+ checks)' $OUT/t.txt | paste -sd' ')" | tee -a $L; cat $OUT/t.txt >> $OUT/tests.txt; done; rm -f $OUT/t.txt; }
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$CS" ] && [ "${SAN:-1}" = 1 ]; then
  # SAN_ENV="ENV=1,ENV2=0": the sanitizers on that variant
  SE=${SAN_ENV//,/ }
  ( [ -n "$SE" ] && export $SE; KVT_GPU_BATCHES=0 KVT_GPU_FAST_BATCHES=4 T=80 r memcheck $CS --tool memcheck ./test_gpu_attend )
  ( [ -n "$SE" ] && export $SE; KVT_GPU_BATCHES=0 KVT_GPU_FAST_BATCHES=2 T=100 r racecheck $CS --tool racecheck ./test_gpu_attend )
fi
T=100 r sdpa0 python3 bench_gpu_sdpa.py; grep '^{' $OUT/tests.txt | grep torch_sdpa > $OUT/sdpa.txt
cat $OUT/sdpa.txt | cut -c1-300 | tee -a $L
VARIANTS=${VARIANTS:-"k3cores:KVTIER_CUDA_NO_K3_MMA=1 default:X=0"}
for rep in $(seq ${REPS:-2}); do
  for v in $VARIANTS; do n=${v%%:*}; e=${v#*:}; b $n ${e//,/ }; done
done

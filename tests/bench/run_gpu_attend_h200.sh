#!/bin/bash
# The H200 run behind docs/gpu.md "Session 3: decode attention" (call 3). It runs in the root
# of a copy of the repository on the device machine, from a bundle folder B holding the
# binaries built with -DCMAKE_CUDA_ARCHITECTURES=90 (test_gpu_attend, test_gpu_codec,
# test_gpu_restore, kvtier-bench, kvtierd + kvtierd.sh, tests/bench/bench_gpu_sdpa.py) and
# their libraries (/work/shared/tools/device-bundle.sh B/lib BINARY...); results go to $OUT.
# attn (session 3) call 3: every GPU test + sanitizers on the new INT2 kernel + kvtier-bench gpu --sdpa + A/B + ncu
B=${B:-$PWD/.devbundle-attn}; cd $B
export LD_LIBRARY_PATH=$B/lib PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
L=$OUT/log.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a $L
r() { local n=$1; shift; local t0=$(date +%s); timeout ${T:-150} "$@" > $OUT/$n.txt 2>&1; local rc=$?; echo "== $n rc=$rc $(( $(date +%s)-t0 ))s" | tee -a $L; grep -E "^not ok|^# |ERROR SUMMARY|RACECHECK SUMMARY" $OUT/$n.txt | tail -${N:-4} | tee -a $L; cat $OUT/$n.txt >> $OUT/tests.txt; rm -f $OUT/$n.txt; }
b() { local n=$1; shift; env "$@" timeout 120 ./kvtier-bench gpu --attend-only --sdpa $OUT/sdpa.txt > $OUT/b.txt 2>&1; echo "== $n $*: $(grep '"op":"attend"' $OUT/b.txt | grep -oE '"batch":[0-9]+|"us_per_step":[0-9.]+|"ratio_to_copy":[0-9.]+|"speedup_vs_sdpa":[0-9.]+|"items":[0-9]+' | sed 's/"//g' | paste -sd' ')" | tee -a $L; cat $OUT/b.txt >> $OUT/bench_all.txt; rm -f $OUT/b.txt; }
r attend ./test_gpu_attend
r codec ./test_gpu_codec
T=200 KVTIERD=$B/kvtierd.sh r restore ./test_gpu_restore
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$CS" ]; then
  KVT_GPU_BATCHES=2 KVT_GPU_FAST_BATCHES=6 T=80 r memcheck $CS --tool memcheck ./test_gpu_attend
  KVT_GPU_BATCHES=0 KVT_GPU_FAST_BATCHES=3 T=100 r racecheck $CS --tool racecheck ./test_gpu_attend
fi
T=100 r sdpa0 python3 bench_gpu_sdpa.py; grep '^{' $OUT/tests.txt | grep torch_sdpa > $OUT/sdpa.txt
T=200 r full ./kvtier-bench gpu --sdpa $OUT/sdpa.txt; grep '^{' $OUT/tests.txt | grep '"bench":"gpu"' | cut -c1-420 | tee -a $L | tee $OUT/bench_all.txt > /dev/null
grep '"op":"attend"' $OUT/bench_all.txt | grep -oE '"batch":[0-9]+|"tokens":[0-9]+|"us_per_step":[0-9.]+|"ratio_to_copy":[0-9.]+|"sdpa_bf16_us":[0-9.]+|"speedup_vs_sdpa":[0-9.]+|"kernel":"[a-z_0-9]+"' | sed 's/"//g' | paste -sd' ' | tee -a $L
b v2 X=1
b v1 KVTIER_CUDA_I2_VARIANT=1
b cc KVTIER_CUDA_NO_MMA=1
b v2 X=2
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
M=sm__inst_executed.sum,gpu__time_duration.sum,launch__registers_per_thread,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed
timeout 100 $NCU --clock-control none -k regex:"attend_i2_kernel|combine_kernel" --launch-skip 6 --launch-count 2 --metrics $M ./kvtier-bench gpu --attend-only --iters 1 > $OUT/ncu.txt 2>&1
KVTIER_CUDA_NO_MMA=1 timeout 100 $NCU --clock-control none -k regex:"attend_kernel|combine_kernel" --launch-skip 6 --launch-count 2 --metrics $M ./kvtier-bench gpu --attend-only --iters 1 >> $OUT/ncu.txt 2>&1
grep -E "^  [a-z].*\(|^ +(sm__|smsp__|dram__|gpu__|launch__)" $OUT/ncu.txt | sed -E 's/\(att_params.*//' | awk '{print $1, $2, $NF}' | tee -a $L

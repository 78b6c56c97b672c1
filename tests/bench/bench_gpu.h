/*
 * bench_gpu.h - `kvtier-bench gpu`: decode attention, encode and decode on the GPU, each
 * against a reference measured in the same run (device-to-device copy bandwidth; torch SDPA
 * in bf16, measured by bench_gpu_sdpa.py and passed in with --sdpa FILE). One JSON object per
 * measurement on stdout.
 */
#ifndef KVT_BENCH_GPU_H
#define KVT_BENCH_GPU_H

int kvt_bench_gpu_main(int argc, char **argv);

#endif

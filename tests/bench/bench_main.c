/*
 * bench_main.c - kvtier-bench: dispatches to one subcommand per row of the table below.
 *
 * To add a subcommand: write tests/bench/bench_<name>.c defining
 * `int kvt_bench_<name>(int argc, char **argv)` (declared in bench.h), and add a row here.
 * `service` and `gpu` have rows already; their functions are weak, so the binary builds and
 * says "not built in" until the file that defines them is added.
 */
#include "bench.h"

#include <string.h>

static const struct kvt_bench_cmd commands[] = {
	{ "codec", "CPU encode/decode throughput of every scheme vs memcpy (GB/s of f16)",
	  kvt_bench_codec },
	{ "fidelity", "codec error on K/V/Q (.npy or synthetic TNI set): key, value, "
		      "attention-output errors, KL, bits per element",
	  kvt_bench_fidelity },
	{ "service", "end-to-end kvtierd throughput and latency (daemon team)", kvt_bench_service },
	{ "gpu", "CUDA encode/decode/attention kernels vs the CPU twins (CUDA team)",
	  kvt_bench_gpu },
	{ "gpu-restore", "restore host -> GPU (compressed H2D + decode) vs pinned cudaMemcpy, "
			 "in-process and through kvtierd RestoreToDevice",
	  kvt_bench_gpu_restore },
};

static void usage(FILE *f)
{
	fprintf(f, "usage: kvtier-bench <subcommand> [options]   (kvtier-bench <subcommand> "
		   "--help for its options)\n\nsubcommands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %-10s %s%s\n", commands[i].name, commands[i].summary,
			commands[i].run ? "" : " [not built in]");
	fprintf(f, "\nEvery measurement is one JSON object per line on stdout.\n");
}

int main(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[1], commands[i].name) != 0)
			continue;
		if (!commands[i].run) {
			fprintf(stderr, "kvtier-bench: subcommand '%s' is not built into this "
					"binary\n", argv[1]);
			return 2;
		}
		return commands[i].run(argc - 1, argv + 1);
	}
	fprintf(stderr, "kvtier-bench: unknown subcommand '%s'\n\n", argv[1]);
	usage(stderr);
	return 2;
}

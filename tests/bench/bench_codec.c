/*
 * bench_codec.c - `kvtier-bench codec`: CPU encode and decode throughput of every scheme,
 * against memcpy of the same f16 bytes measured in the same run with the same thread count.
 *
 * Throughput is counted in f16 bytes of K+V (the size of the uncompressed input of encode and
 * of the output of decode), so gbps and memcpy_gbps compare the same work: "how fast does a
 * chunk's worth of f16 KV move through the codec vs through memcpy". Every thread owns its own
 * chunks; the per-thread working set (--buffer-mib, default max(64 MiB, 2 x L3)) is larger
 * than the caches so both sides run at DRAM speed. Each measurement repeats for --seconds.
 * The memcpy_gbps of an encode or decode row is measured interleaved with it, chunk by chunk
 * (one chunk through the codec, then another chunk's memcpy, timed separately), so on a
 * shared machine both see the same load; the separate "memcpy" row is measured alone, first.
 */
#include "bench.h"
#include "kvt_codec.h"
#include "kvt_text.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SHAPES 8

enum op { OP_FILL, OP_ENCODE_ONCE, OP_ENCODE, OP_DECODE, OP_MEMCPY };

struct tstate {
	uint32_t n_chunks;
	uint16_t *in;      /* [n_chunks][K|V][L][B][H][d] f16 */
	uint16_t *out;     /* same shape: decode output and memcpy destination */
	uint8_t *enc;      /* [n_chunks][cap] */
	/* memcpy of the same bytes, interleaved chunk by chunk with the encode or decode being
	 * measured (so both see the same machine load): bytes and seconds spent in it */
	double mc_bytes, mc_seconds;
};

struct job {
	struct kvt_codec_config cfg;
	struct tstate *ts;
	size_t half_elems;  /* elements of K (or V) of one chunk */
	size_t cap;         /* encoded bytes per chunk slot */
	double seconds;
	enum op op;
	int failed;
	uint64_t seed;
};

static const char *op_name(enum op op)
{
	return op == OP_ENCODE ? "encode" : op == OP_DECODE ? "decode" : "memcpy";
}

/* Keys: N(0,1) with two outlier channels per head (mean 5), values N(0,1): the shape of real
 * post-RoPE caches, which matters little for speed but keeps the codec off degenerate paths. */
static void fill_chunk(uint16_t *p, size_t half, uint32_t d, uint64_t *rng)
{
	for (size_t i = 0; i < 2 * half; i++) {
		uint64_t r = kvt_bench_rand(rng);
		/* Irwin-Hall(4): cheap, close enough to normal for load data */
		float x = ((float)(r & 0xffff) + (float)((r >> 16) & 0xffff) +
			   (float)((r >> 32) & 0xffff) + (float)(r >> 48)) * (1.0f / 65536.0f) -
			  2.0f;
		uint32_t c = (uint32_t)(i % d);

		x *= 1.7320508f;
		if (i < half && (c == 3 || c == d / 2 + 5))
			x += 5.0f;
		p[i] = kvt_f32_to_f16(x);
	}
}

static struct kvt_bench_result thread_body(unsigned t, void *arg)
{
	struct job *j = arg;
	struct tstate *s = &j->ts[t];
	const size_t half = j->half_elems, chunk_elems = 2 * half;
	const uint32_t B = j->cfg.chunk_tokens;
	struct kvt_bench_result r = { 0, 0 };
	double t0 = kvt_bench_now_s(), now = t0;
	char err[256];

	if (j->op == OP_FILL) {
		uint64_t rng = j->seed + 0x1000003ull * (t + 1);

		for (uint32_t i = 0; i < s->n_chunks; i++)
			fill_chunk(s->in + i * chunk_elems, half, j->cfg.head_dim, &rng);
		return r;
	}
	if (j->op == OP_ENCODE_ONCE) {
		for (uint32_t i = 0; i < s->n_chunks; i++) {
			const uint16_t *k = s->in + i * chunk_elems;

			if (kvt_encode_chunk(&j->cfg, (uint64_t)(i + 1) * B, k, k + half,
					     s->enc + i * j->cap, j->cap, err, sizeof(err)) < 0) {
				fprintf(stderr, "kvtier-bench: encode: %s\n", err);
				j->failed = 1;
			}
		}
		return r;
	}
	s->mc_bytes = s->mc_seconds = 0;
	double busy = 0;
	for (uint64_t n = 0;; n++) {
		uint32_t i = (uint32_t)(n % s->n_chunks);
		const uint16_t *k = s->in + i * chunk_elems;
		uint16_t *o = s->out + i * chunk_elems;
		int64_t rc = 0;
		double t_op = kvt_bench_now_s();

		switch (j->op) {
		case OP_ENCODE:
			rc = kvt_encode_chunk(&j->cfg, (uint64_t)(i + 1) * B, k, k + half,
					      s->enc + i * j->cap, j->cap, err, sizeof(err));
			break;
		case OP_DECODE:
			rc = kvt_decode_chunk(s->enc + i * j->cap, 0, B, 0, j->cfg.n_layers,
					      KVT_DTYPE_F16, o, o + half, err, sizeof(err));
			break;
		default:
			memcpy(o, k, chunk_elems * 2);
			break;
		}
		if (rc < 0) {
			fprintf(stderr, "kvtier-bench: %s: %s\n", op_name(j->op), err);
			j->failed = 1;
			break;
		}
		r.bytes += (double)chunk_elems * 2;
		now = kvt_bench_now_s();
		busy += now - t_op;
		if (j->op != OP_MEMCPY) {
			/* the reference: another slot's chunk (not the one just written, which
			 * would still be in cache), right after */
			uint32_t m = (uint32_t)((n + s->n_chunks / 2) % s->n_chunks);
			double t_mc = now;

			memcpy(s->out + m * chunk_elems, s->in + m * chunk_elems, chunk_elems * 2);
			now = kvt_bench_now_s();
			s->mc_bytes += (double)chunk_elems * 2;
			s->mc_seconds += now - t_mc;
		}
		if (now - t0 >= j->seconds)
			break;
	}
	r.seconds = j->op == OP_MEMCPY ? now - t0 : busy;
	return r;
}

/* "LxHxD": each part decimal and inside its limit (sscanf's %u took a sign, blanks and
 * overflow: "2x2x-64" was 2x2x4294967232); kvt_codec_config_validate checks the rest. */
static int parse_shape(const char *s, uint32_t out[3])
{
	static const char *const names[3] = { "LAYERS", "KV_HEADS", "HEAD_DIM" };
	static const uint64_t max[3] = { KVT_MAX_LAYERS, KVT_MAX_KV_HEADS, 256 };
	const char *p = s ? s : "";
	char q[512];

	for (int i = 0; i < 3; i++) {
		const char *x = i < 2 ? strchr(p, 'x') : p + strlen(p);
		uint64_t v;

		if (!x || kvt_text_parse_dec(p, x, max[i], &v) || v == 0) {
			fprintf(stderr, "kvtier-bench: --shape \"%s\": expected "
					"LAYERSxKV_HEADSxHEAD_DIM (e.g. 32x8x128), %s a decimal number "
					"in 1..%" PRIu64 "\n",
				kvt_text_escape(q, sizeof q, s ? s : "", KVT_TEXT_BACKSLASH),
				names[i], max[i]);
			return -1;
		}
		out[i] = (uint32_t)v;
		p = x + 1;
	}
	return 0;
}

static int parse_bits(const char *s)
{
	return !strcmp(s, "2") ? 2 : !strcmp(s, "3") ? 3 : !strcmp(s, "4") ? 4 : !strcmp(s, "8") ? 8 : -1;
}

static void codec_usage(FILE *f)
{
	fprintf(f,
		"usage: kvtier-bench codec [--seconds S] [--threads N] [--shape LxHxD]...\n"
		"                          [--schemes none,kivi,hadamard,oscar] [--bits 2,3,4,8]\n"
		"                          [--group G] [--buffer-mib M] [--isa auto|scalar|avx2]\n"
		"Encode and decode throughput (B 128, f16 input) on 1 thread and on N threads (default:\n"
		"every CPU), each thread on its own chunks, vs memcpy of the same bytes (timed\n"
		"chunk by chunk between the codec's chunks, so both see the same load). Default\n"
		"shapes 32x8x128 and 30x3x64. One JSON object per line.\n");
}

int kvt_bench_codec(int argc, char **argv)
{
	double seconds = 1.0;
	unsigned long threads = kvt_bench_ncpu(), group = 32, buffer_mib = 0;
	uint32_t shapes[MAX_SHAPES][3];
	int n_shapes = 0, schemes[4] = { KVT_SCHEME_NONE, KVT_SCHEME_KIVI, KVT_SCHEME_HADAMARD,
					 KVT_SCHEME_OSCAR };
	int n_schemes = 4, bits[4] = { 2, 4 }, n_bits = 2;
	unsigned thread_counts[2];
	int n_counts, rc = 0;
	size_t l3 = kvt_bench_l3_bytes();

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			codec_usage(stdout);
			return 0;
		} else if (!strcmp(a, "--seconds")) {
			if (kvt_bench_parse_double(a, val, 0.001, 3600, &seconds) < 0)
				return 2;
			i++;
		} else if (!strcmp(a, "--threads")) {
			if (kvt_bench_parse_uint(a, val, 1, 1024, &threads) < 0)
				return 2;
			i++;
		} else if (!strcmp(a, "--group")) {
			if (kvt_bench_parse_uint(a, val, 32, 128, &group) < 0)
				return 2;
			i++;
		} else if (!strcmp(a, "--buffer-mib")) {
			if (kvt_bench_parse_uint(a, val, 1, 65536, &buffer_mib) < 0)
				return 2;
			i++;
		} else if (!strcmp(a, "--shape")) {
			if (n_shapes == MAX_SHAPES || parse_shape(val, shapes[n_shapes]) < 0)
				return 2;
			n_shapes++;
			i++;
		} else if (!strcmp(a, "--schemes")) {
			if ((n_schemes = kvt_bench_parse_names(a, val, 256, kvt_scheme_parse,
							       "none, kivi, hadamard or oscar",
							       schemes, 4)) < 0)
				return 2;
			i++;
		} else if (!strcmp(a, "--bits")) {
			if ((n_bits = kvt_bench_parse_names(a, val, 256, parse_bits, "2, 3, 4 or 8",
							    bits, 4)) < 0)
				return 2;
			i++;
		} else if (!strcmp(a, "--isa")) {
			int isa = !val ? -1 : !strcmp(val, "auto") ? KVT_ISA_AUTO :
					      !strcmp(val, "scalar") ? KVT_ISA_SCALAR :
					      !strcmp(val, "avx2") ? KVT_ISA_AVX2 : -1;

			if (isa < 0 || kvt_codec_set_isa((enum kvt_isa)isa) < 0) {
				char q[256];

				fprintf(stderr, "kvtier-bench: --isa \"%s\" is not available here (auto, "
						"scalar or avx2)\n",
					kvt_text_escape(q, sizeof q, val ? val : "", KVT_TEXT_BACKSLASH));
				return 2;
			}
			i++;
		} else {
			char q[256];

			fprintf(stderr, "kvtier-bench codec: unknown option \"%s\"\n",
				kvt_text_escape(q, sizeof q, a, KVT_TEXT_BACKSLASH));
			codec_usage(stderr);
			return 2;
		}
	}
	if (n_shapes == 0) {
		uint32_t def[2][3] = { { 32, 8, 128 }, { 30, 3, 64 } };

		memcpy(shapes, def, sizeof(def));
		n_shapes = 2;
	}
	if (buffer_mib == 0) {
		buffer_mib = 64;
		if (l3 && 2 * l3 / (1 << 20) > buffer_mib)
			buffer_mib = 2 * l3 / (1 << 20);
	}
	thread_counts[0] = 1;
	thread_counts[1] = (unsigned)threads;
	n_counts = threads > 1 ? 2 : 1;

	for (int si = 0; si < n_shapes && rc == 0; si++) {
		struct kvt_codec_config base;
		char shape_name[48], err[256];
		size_t half, chunk_bytes;

		kvt_codec_config_default(&base, shapes[si][0], shapes[si][1], shapes[si][2],
					 KVT_DTYPE_F16);
		base.group = (uint32_t)group;
		if (kvt_codec_config_validate(&base, err, sizeof(err)) < 0) {
			fprintf(stderr, "kvtier-bench: shape %ux%ux%u: %s\n", shapes[si][0],
				shapes[si][1], shapes[si][2], err);
			return 2;
		}
		snprintf(shape_name, sizeof(shape_name), "%ux%ux%u", shapes[si][0], shapes[si][1],
			 shapes[si][2]);
		half = (size_t)base.n_layers * base.chunk_tokens * base.n_kv_heads * base.head_dim;
		chunk_bytes = 2 * half * 2;

		for (int ci = 0; ci < n_counts && rc == 0; ci++) {
			unsigned nt = thread_counts[ci];
			struct tstate *ts = calloc(nt, sizeof(*ts));
			uint32_t per = (uint32_t)((buffer_mib << 20) / chunk_bytes);
			struct job job;
			size_t max_cap = 0;
			double memcpy_bps;

			if (per < 2)
				per = 2;
			/* Encoded slots sized for the largest config of this run. */
			for (int s = 0; s < n_schemes; s++)
				for (int b = 0; b < n_bits; b++) {
					struct kvt_codec_config c = base;

					c.scheme = (uint32_t)schemes[s];
					c.key_bits = c.value_bits = (uint32_t)bits[b];
					if (c.scheme == KVT_SCHEME_NONE)
						c.key_bits = c.value_bits = 0;
					if (c.scheme == KVT_SCHEME_NONE || c.scheme == KVT_SCHEME_KIVI)
						c.rotate_v = 0;
					if (kvt_codec_config_validate(&c, err, sizeof(err)) == 0 &&
					    kvt_chunk_max_bytes(&c) > max_cap)
						max_cap = kvt_chunk_max_bytes(&c);
				}
			max_cap = (max_cap + 63) & ~(size_t)63;
			for (unsigned t = 0; t < nt; t++) {
				ts[t].n_chunks = per;
				ts[t].in = kvt_bench_alloc(per * chunk_bytes);
				ts[t].out = kvt_bench_alloc(per * chunk_bytes);
				ts[t].enc = kvt_bench_alloc(per * max_cap);
			}
			memset(&job, 0, sizeof(job));
			job.cfg = base;
			job.ts = ts;
			job.half_elems = half;
			job.cap = max_cap;
			job.seconds = seconds;
			job.seed = 0x6b767469657231ull + (uint64_t)si;
			job.op = OP_FILL;
			kvt_bench_run_threads(nt, thread_body, &job);
			job.op = OP_MEMCPY;
			memcpy_bps = kvt_bench_run_threads(nt, thread_body, &job);
			{
				struct kvt_bench_json j;

				kvt_bench_json_begin(&j, "codec");
				kvt_bench_json_str(&j, "op", "memcpy");
				kvt_bench_json_str(&j, "shape", shape_name);
				kvt_bench_json_int(&j, "threads", nt);
				kvt_bench_json_num(&j, "gbps", memcpy_bps / 1e9);
				kvt_bench_json_num(&j, "working_set_mib_per_thread",
						   (double)per * chunk_bytes / (1 << 20));
				kvt_bench_json_end(&j);
			}
			for (int s = 0; s < n_schemes && rc == 0; s++) {
				for (int b = 0; b < n_bits && rc == 0; b++) {
					struct kvt_codec_config c = base;
					struct kvt_chunk_header hdr;
					double bpe;

					c.scheme = (uint32_t)schemes[s];
					c.key_bits = c.value_bits = (uint32_t)bits[b];
					if (c.scheme == KVT_SCHEME_NONE) {
						/* one row: "none" has no bit width */
						if (b > 0)
							break;
						c.key_bits = c.value_bits = 0;
					}
					if (c.scheme == KVT_SCHEME_NONE || c.scheme == KVT_SCHEME_KIVI)
						c.rotate_v = 0;
					if (kvt_codec_config_validate(&c, err, sizeof(err)) < 0) {
						fprintf(stderr, "kvtier-bench: %s\n", err);
						rc = 2;
						break;
					}
					job.cfg = c;
					job.op = OP_ENCODE_ONCE; /* warm-up; also fills the slots */
					kvt_bench_run_threads(nt, thread_body, &job);
					memcpy(&hdr, ts[0].enc, sizeof(hdr));
					bpe = kvt_chunk_bits_per_element(&hdr);
					for (enum op op = OP_ENCODE; op <= OP_DECODE && !job.failed;
					     op++) {
						struct kvt_bench_json j;
						double bps;

						double mc_bytes = 0, mc_slowest = 0, mc_bps;

						job.op = op;
						bps = kvt_bench_run_threads(nt, thread_body, &job);
						for (unsigned t = 0; t < nt; t++) {
							mc_bytes += ts[t].mc_bytes;
							if (ts[t].mc_seconds > mc_slowest)
								mc_slowest = ts[t].mc_seconds;
						}
						mc_bps = mc_slowest > 0 ? mc_bytes / mc_slowest : memcpy_bps;
						kvt_bench_json_begin(&j, "codec");
						kvt_bench_json_str(&j, "op", op_name(op));
						kvt_bench_json_str(&j, "scheme", kvt_scheme_name(c.scheme));
						kvt_bench_json_int(&j, "bits", c.scheme == KVT_SCHEME_NONE ?
										      16 : (long long)c.key_bits);
						kvt_bench_json_int(&j, "group", c.group);
						kvt_bench_json_str(&j, "shape", shape_name);
						kvt_bench_json_int(&j, "threads", nt);
						kvt_bench_json_num(&j, "gbps", bps / 1e9);
						kvt_bench_json_num(&j, "memcpy_gbps", mc_bps / 1e9);
						kvt_bench_json_num(&j, "vs_memcpy", bps / mc_bps);
						kvt_bench_json_num(&j, "bits_per_element", bpe);
						kvt_bench_json_str(&j, "isa", kvt_codec_active_isa() ==
										     KVT_ISA_AVX2 ? "avx2" : "scalar");
						kvt_bench_json_end(&j);
					}
					if (job.failed)
						rc = 1;
				}
			}
			for (unsigned t = 0; t < nt; t++) {
				free(ts[t].in);
				free(ts[t].out);
				free(ts[t].enc);
			}
			free(ts);
		}
	}
	return rc;
}

/*
 * fuzz_chunk.c - deterministic mutation fuzzing of kvt_chunk_parse and of what runs on a chunk
 * it accepts (kvt_decode_chunk, kvt_attend). Clients upload raw chunk bytes (StoreEncoded);
 * the daemon parses them once and later decodes and attends them (which re-check the header
 * and pin table, not the crc), so every byte of a chunk is untrusted input to all three.
 *
 * Seeds are valid chunks from the real encoder over random configs that the codec's own
 * validation accepts. Each iteration mutates one seed (bit flips, bursts, interesting bytes,
 * header fields at their boundaries, a header rewritten to another shape, cuts at every array
 * boundary, junk appended, pin table edits, NaN/Inf/huge/denormal scales, zeros, norms and
 * exact values, random codes, another seed's header, several of these at once), usually
 * recomputing the crc32c (CHUNK_FORMAT.md) so the mutation reaches the checks behind it, and
 * checks these oracles:
 *   - kvt_chunk_parse returns 0 or -EBADMSG with a message, and its verdict and the check
 *     that failed are those of a model of CHUNK_FORMAT.md's rules written here;
 *   - a burst of <= 32 bits (one bit flip, one byte) without the crc fix-up is rejected:
 *     CRC-32C detects every such burst;
 *   - a mutant that differs from its seed only in layer data (crc fixed) is accepted;
 *   - on an accepted chunk, kvt_decode_chunk (all layers and tokens to f16, bf16 and f32, and a
 *     random sub-range) and kvt_attend succeed, f16/bf16 outputs are the f32 output rounded,
 *     a sub-range equals the same slice of the whole, and the scalar and AVX2 paths agree
 *     (NaN equal to NaN); when only code bytes changed, every other row decodes exactly as
 *     the seed did and all values stay finite (codes are bounded, scales are untouched);
 *   - what the daemon does with an upload that parsed (check_seq): the chunk at token 0 goes
 *     into a sequence by kvt_seq_append_chunk (at another token it is refused), fetch equals
 *     the chunk's decode, attend succeeds, a fork and a truncate fetch what it decodes to;
 *   - nothing reads or writes outside its buffer: chunks, outputs, queries and error buffers
 *     have their exact sizes, and the test is meant to run under ASan + UBSan.
 * Every iteration draws from its own stream of (run seed, iteration), so KVT_SEED=<s>
 * KVT_FUZZ_ITER=<i> replays iteration i alone and prints what it does. The default run is a
 * fixed number of iterations (10-20 s under ASan on a 2-core machine); KVT_FUZZ_ITERS=<n> or
 * KVT_FUZZ_SECONDS=<s> run longer.
 */
#include <errno.h>
#include <stdarg.h>
#include <unistd.h>

#include "codec_test_util.h"
#include "fuzz_ctx.h"
#include "kvt_seq.h"

#define N_SEEDS 16
#define POOL_PERIOD 2048u            /* iterations per seed pool: long runs see many configs */
#define SEED_MAX_ELEMS 65536u        /* L*B*H*d of a seed: an accepted mutant costs ~ms */
#define MUTANT_MAX_BYTES (8u << 20)  /* a header may claim more; such mutants stay short */
#define DEFAULT_ITERS 5000u
#define MAX_FAILING_ITERS 20

#define OFF(f) offsetof(struct kvt_chunk_header, f)
#define FSIZE(f) sizeof(((struct kvt_chunk_header *)0)->f)

static bool verbose;

/* ---- Randomness ------------------------------------------------------------------------- */

enum { STREAM_SEED = 1, STREAM_ITER = 2 };

/* Each iteration and each seed of each pool has its own stream, so replaying one needs only
 * the run seed and its number. */
static void rng_stream(uint64_t stream, uint64_t n) { kvt_rand_stream(stream, n); }

static uint32_t rb(uint32_t n) { return kvt_rand_below(n); }
static bool coin(uint32_t n) { return kvt_rand_below(n) == 0; }

/* ---- Bytes of a chunk, read the way CHUNK_FORMAT.md says (little-endian) ---------------- */

static uint64_t get_le(const uint8_t *p, size_t off, size_t n)
{
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		v |= (uint64_t)p[off + i] << (8 * i);
	return v;
}

static void put_le(uint8_t *p, size_t off, size_t n, uint64_t v)
{
	for (size_t i = 0; i < n; i++)
		p[off + i] = (uint8_t)(v >> (8 * i));
}

#define HGET(p, f) get_le(p, OFF(f), FSIZE(f))
#define HPUT(p, f, v) put_le(p, OFF(f), FSIZE(f), v)

/* The crc32c of CHUNK_FORMAT.md: over [0, total) with the crc field read as 4 zero bytes. */
static uint32_t spec_crc(const uint8_t *p, uint64_t total)
{
	static const uint8_t zero4[4];
	uint32_t crc = kvt_crc32c(0, p, OFF(crc32c));
	crc = kvt_crc32c(crc, zero4, 4);
	return kvt_crc32c(crc, p + OFF(crc32c) + 4, total - OFF(crc32c) - 4);
}

static void header_cfg(const uint8_t *p, struct kvt_codec_config *c)
{
	memset(c, 0, sizeof(*c));
	c->scheme = (uint32_t)HGET(p, scheme);
	c->key_bits = (uint32_t)HGET(p, key_bits);
	c->value_bits = (uint32_t)HGET(p, value_bits);
	c->dtype = (uint32_t)HGET(p, dtype);
	c->rotate_v = (uint32_t)HGET(p, rotate_v);
	c->group = (uint32_t)HGET(p, group);
	c->chunk_tokens = (uint32_t)HGET(p, chunk_tokens);
	c->n_layers = (uint32_t)HGET(p, n_layers);
	c->n_kv_heads = (uint32_t)HGET(p, n_kv_heads);
	c->head_dim = (uint32_t)HGET(p, head_dim);
	c->n_sinks = (uint32_t)HGET(p, n_sinks);
}

/* ---- The model: what CHUNK_FORMAT.md says kvt_chunk_parse must do ----------------------- */

enum reason {
	R_ACCEPT,
	R_LENGTH,
	R_MAGIC,
	R_VERSION,
	R_HEADER_BYTES,
	R_RESERVED,
	R_SHAPE,
	R_NONE_BITS,
	R_SCALE_DTYPE,
	R_N_PINNED,
	R_FIRST_TOKEN,
	R_SIZES,
	R_CRC,
	R_PIN_TABLE,
	R_SINKS,
	R_UNKNOWN,
	R_COUNT
};

/* the reason's name in the summary, and how kvt_chunk_parse's message for it begins */
static const struct {
	const char *name, *prefix;
} reasons[R_COUNT] = {
	[R_ACCEPT] = {"accepted", ""},
	[R_LENGTH] = {"length", "chunk length "},
	[R_MAGIC] = {"magic", "chunk magic "},
	[R_VERSION] = {"version", "chunk version "},
	[R_HEADER_BYTES] = {"header_bytes", "chunk header_bytes "},
	[R_RESERVED] = {"reserved", "chunk reserved"},
	[R_SHAPE] = {"shape", "chunk header: "},
	[R_NONE_BITS] = {"none-bits", "chunk of scheme none "},
	[R_SCALE_DTYPE] = {"scale_dtype", "chunk scale_dtype "},
	[R_N_PINNED] = {"n_pinned", "chunk n_pinned "},
	[R_FIRST_TOKEN] = {"first_token", "chunk first_token "},
	[R_SIZES] = {"sizes", "chunk sizes "},
	[R_CRC] = {"crc32c", "chunk crc32c "},
	[R_PIN_TABLE] = {"pin-table", "chunk pin table "},
	[R_SINKS] = {"sinks", "chunk pins "},
	[R_UNKNOWN] = {"unknown", NULL},
};

/* "crc32c, sinks": the names of the checks in a *late mask of model_verdict */
static const char *late_names(unsigned late)
{
	static char buf[64];
	size_t n = 0;
	buf[0] = 0;
	for (int r = R_CRC; r <= R_SINKS; r++)
		if (late >> r & 1)
			n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%s", n ? ", " : "",
					      reasons[r].name);
	return buf;
}

static enum reason reason_of(const char *msg)
{
	for (int r = R_LENGTH; r < R_UNKNOWN; r++)
		if (strncmp(msg, reasons[r].prefix, strlen(reasons[r].prefix)) == 0)
			return (enum reason)r;
	return R_UNKNOWN;
}

/*
 * The header checks in CHUNK_FORMAT.md's order: R_ACCEPT or the first that fails. Once the
 * header is consistent and all its bytes are there, the checks on the bytes (crc, pin table,
 * sinks) are all evaluated and the failing ones collected in *late: kvt_chunk_parse may
 * report any one of them (it checks the pin table before the crc).
 */
static enum reason model_verdict(const uint8_t *p, size_t len, unsigned *late)
{
	*late = 0;
	if (len < KVT_CHUNK_HEADER_BYTES)
		return R_LENGTH;
	if (HGET(p, magic) != KVT_CHUNK_MAGIC)
		return R_MAGIC;
	if (HGET(p, version) != KVT_CHUNK_VERSION)
		return R_VERSION;
	if (HGET(p, header_bytes) != KVT_CHUNK_HEADER_BYTES)
		return R_HEADER_BYTES;
	if (HGET(p, reserved0) || get_le(p, OFF(reserved), 4))
		return R_RESERVED;
	struct kvt_codec_config c;
	header_cfg(p, &c);
	if (kvt_codec_config_validate(&c, NULL, 0))
		return R_SHAPE;
	const bool none = c.scheme == KVT_SCHEME_NONE;
	if (none && (c.key_bits != 16 || c.value_bits != 16))
		return R_NONE_BITS;
	if (HGET(p, scale_dtype) != (c.dtype == KVT_DTYPE_BF16 ? KVT_DTYPE_BF16 : KVT_DTYPE_F16))
		return R_SCALE_DTYPE;
	const uint32_t np = (uint32_t)HGET(p, n_pinned), B = c.chunk_tokens;
	if (np > B || (none && np))
		return R_N_PINNED;
	const uint64_t first = HGET(p, first_token);
	if (first > UINT64_MAX - B)
		return R_FIRST_TOKEN;
	struct kvt_chunk_layout lay;
	if (kvt_chunk_layout(&c, np, &lay))
		return R_UNKNOWN; /* cannot be: the config is valid and np in range */
	if (HGET(p, data_offset) != lay.data_offset || HGET(p, layer_bytes) != lay.layer_bytes ||
	    HGET(p, total_bytes) != lay.total_bytes)
		return R_SIZES;
	if (len != lay.total_bytes) /* a missing byte or a trailing one */
		return R_LENGTH;
	if (HGET(p, crc32c) != spec_crc(p, lay.total_bytes))
		*late |= 1u << R_CRC;
	uint8_t pinned[KVT_MAX_CHUNK_TOKENS] = {0};
	for (uint32_t i = 0; i < np; i++) {
		uint64_t t = get_le(p, KVT_CHUNK_HEADER_BYTES + 2 * (size_t)i, 2);
		if (t >= B || (i && t <= get_le(p, KVT_CHUNK_HEADER_BYTES + 2 * (size_t)i - 2, 2)))
			*late |= 1u << R_PIN_TABLE;
		else
			pinned[t] = 1;
	}
	for (size_t i = KVT_CHUNK_HEADER_BYTES + 2 * (size_t)np; i < lay.data_offset; i++)
		if (p[i])
			*late |= 1u << R_PIN_TABLE;
	/* every session token below S that the chunk holds is pinned */
	if (!none)
		for (uint64_t t = first; t < c.n_sinks && t < first + B; t++)
			if (!pinned[t - first])
				*late |= 1u << R_SINKS;
	return *late ? R_CRC : R_ACCEPT; /* R_CRC stands for "one of *late" */
}

/* ---- Seeds ------------------------------------------------------------------------------ */

struct seed {
	struct kvt_codec_config cfg;  /* as encoded */
	struct kvt_codec_config pcfg; /* as kvt_chunk_parse reports it */
	struct kvt_chunk_header hdr;
	struct kvt_chunk_layout lay;
	uint8_t *bytes;
	size_t len;
	float *dk, *dv; /* decoded by the scalar path to f32, [L][B][H][d] */
};

static struct seed pool[N_SEEDS];
static uint64_t pool_gen = UINT64_MAX, n_pools, n_seeds_pinned, n_seeds_scheme[4];
static bool avx2;

/* Buffers of exactly n bytes (ASan's redzone starts at the last byte), 64-byte aligned. */
static void *xalloc(size_t n)
{
	void *p = NULL;
	if (posix_memalign(&p, 64, n ? n : 1) || !p) {
		printf("# out of memory (%zu bytes)\n", n);
		abort();
	}
	return p;
}

/* Tensors need only their element's alignment (kvt_codec.h), so the kernels must not assume
 * more: talloc places n bytes 0..7 elements past a 64-byte boundary, still ending where the
 * allocation ends; tfree finds the allocation again. */
static struct {
	void *p, *base;
} tallocs[32];

static void *talloc(size_t n, size_t elem)
{
	size_t skew = coin(2) ? 0 : elem * rb(8);
	uint8_t *base = xalloc(n + skew);
	for (size_t i = 0; i < sizeof(tallocs) / sizeof(tallocs[0]); i++)
		if (!tallocs[i].base) {
			tallocs[i].base = base;
			tallocs[i].p = base + skew;
			return base + skew;
		}
	printf("# talloc: too many live tensors\n");
	abort();
}

static void tfree(void *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < sizeof(tallocs) / sizeof(tallocs[0]); i++)
		if (tallocs[i].p == p) {
			free(tallocs[i].base);
			tallocs[i].base = tallocs[i].p = NULL;
			return;
		}
	printf("# tfree: %p was not from talloc\n", p);
	abort();
}

/* A random config the codec's validation accepts: fields come from supersets of the valid
 * values, and kvt_codec_config_validate decides. */
static void pick_config(struct kvt_codec_config *c)
{
	static const uint32_t dims[] = {64, 128, 256}, groups[] = {32, 64, 128};
	static const uint32_t bits[] = {0, 2, 3, 4, 8, 16, 2, 3, 4, 8};
	for (;;) {
		memset(c, 0, sizeof(*c));
		c->scheme = rb(4);
		/* mostly plausible values, so that every scheme gets its share of seeds */
		const bool none = c->scheme == KVT_SCHEME_NONE;
		c->key_bits = none && !coin(8) ? 16 * rb(2) : bits[rb(10)];
		c->value_bits = none && !coin(8) ? 16 * rb(2) : bits[rb(10)];
		c->group = groups[rb(3)];
		c->chunk_tokens = !coin(8) ? c->group * (1 + rb(4)) : coin(2) ? 32 * (1 + rb(8))
										: KVT_MAX_CHUNK_TOKENS;
		c->n_layers = 1 + rb(3);
		/* more than 8 heads: decode's head blocks */
		c->n_kv_heads = !coin(8) ? 1 + rb(3) : coin(4) ? 17 + rb(48) : 1 + rb(16);
		c->head_dim = dims[rb(3)];
		c->dtype = 1 + rb(3);
		c->rotate_v = coin(4) || kvt_scheme_rotates_keys(c->scheme) ? rb(2) : 0;
		c->n_sinks = coin(3) ? 0 : coin(6) ? rb(70) : 1 + rb(8);
		if (coin(3)) {
			c->pin_detect_ratio = 0.5f;
			c->pin_detect_max = rb(6);
		}
		c->key_rounding = coin(4);
		if ((uint64_t)c->n_layers * c->chunk_tokens * c->n_kv_heads * c->head_dim >
		    SEED_MAX_ELEMS)
			continue;
		if (kvt_codec_config_validate(c, NULL, 0) == 0)
			return;
	}
}

static void seed_free(struct seed *s)
{
	free(s->bytes);
	free(s->dk);
	free(s->dv);
	memset(s, 0, sizeof(*s));
}

static void make_seed(struct seed *s, uint64_t gen, uint32_t slot)
{
	rng_stream(STREAM_SEED, gen * N_SEEDS + slot);
	struct kvt_codec_config *c = &s->cfg;
	pick_config(c);
	const uint32_t B = c->chunk_tokens;
	uint64_t first;
	switch (rb(8)) {
	case 0:
	case 1:
	case 2:
		first = 0;
		break;
	case 3:
		first = (uint64_t)B * (1 + rb(3));
		break;
	case 4:
		first = rb(c->n_sinks + 1); /* straddles the sinks */
		break;
	case 5:
		first = UINT64_MAX - B; /* the last chunk a session can have */
		break;
	case 6:
		first = kvt_rand_u64() % (UINT64_MAX - B);
		break;
	default:
		first = (uint64_t)rb(1u << 20) * B;
		break;
	}
	static const float amps[] = {1.0f, 1.0f, 1.0f, 0.01f, 20.0f};
	float amp = amps[rb(5)];
	uint32_t low[3] = {rb(B), rb(B), rb(B)}; /* low-norm tokens: pin detection finds them */
	void *k = random_kv(c, B, amp, low, rb(4));
	void *v = random_kv(c, B, amp, NULL, 0);
	if (coin(16)) /* all-zero keys: the mn == mx == 0 rule and norms of 0 */
		memset(k, 0, (size_t)c->n_layers * B * c->n_kv_heads * c->head_dim *
				     kvt_dtype_size(c->dtype));
	s->bytes = encode_new(c, first, k, v, &s->len);
	free(k);
	free(v);
	FCHECK(s->bytes != NULL, "encode seed %u (%s)", slot, cfg_str(c));
	if (!s->bytes)
		return;
	char err[256] = "";
	int rc = kvt_chunk_parse(s->bytes, s->len, &s->pcfg, &s->hdr, err, sizeof(err));
	FCHECK(rc == 0, "seed %u (%s) does not parse: %s", slot, cfg_str(c), err);
	FCHECK(kvt_chunk_layout(&s->pcfg, s->hdr.n_pinned, &s->lay) == 0 &&
		       s->lay.total_bytes == s->len,
	       "seed %u layout", slot);
	const size_t n = (size_t)c->n_layers * B * c->n_kv_heads * c->head_dim;
	s->dk = xalloc(n * 4);
	s->dv = xalloc(n * 4);
	kvt_codec_set_isa(KVT_ISA_SCALAR);
	rc = kvt_decode_chunk(s->bytes, 0, B, 0, c->n_layers, KVT_DTYPE_F32, s->dk, s->dv, err,
			      sizeof(err));
	FCHECK(rc == 0, "seed %u decode: %s", slot, err);
	size_t nonfinite = 0;
	for (size_t i = 0; i < n; i++)
		nonfinite += !isfinite(s->dk[i]) + !isfinite(s->dv[i]);
	FCHECK(nonfinite == 0, "seed %u (%s) decodes to %zu non-finite values", slot, cfg_str(c),
	       nonfinite);
	if (rc || s->lay.total_bytes != s->len) {
		seed_free(s);
		return;
	}
	n_seeds_pinned += s->hdr.n_pinned > 0;
	n_seeds_scheme[c->scheme]++;
}

static void pool_ensure(uint64_t gen)
{
	if (gen == pool_gen)
		return;
	ctx_set("building seed pool %llu; replay: KVT_SEED=%llu KVT_FUZZ_ITER=%llu\n",
		(unsigned long long)gen, (unsigned long long)kvt_test_seed,
		(unsigned long long)gen * POOL_PERIOD);
	for (uint32_t i = 0; i < N_SEEDS; i++) {
		seed_free(&pool[i]);
		make_seed(&pool[i], gen, i);
	}
	pool_gen = gen;
	n_pools++;
}

/* ---- Where a byte of a seed lies --------------------------------------------------------- */

enum akind { AK_PARAM, AK_CODES, AK_EXACT };
struct arr {
	const char *name;
	size_t off, bytes;
	enum akind kind;
	uint32_t kv;   /* 0 keys, 1 values */
	uint32_t elem; /* bytes per element */
};

/* The arrays of a layer section in the order they lie (CHUNK_FORMAT.md), present ones only. */
static uint32_t layer_arrays(const struct seed *s, struct arr *a)
{
	const struct kvt_chunk_layout *l = &s->lay;
	const uint32_t ws = (uint32_t)kvt_dtype_size(s->pcfg.dtype);
	const uint32_t cw = s->pcfg.scheme == KVT_SCHEME_NONE ? ws : 1;
	uint32_t n = 0;
#define ARR(nm, o, b, k, kv_, el)                                                          \
	do {                                                                               \
		if (b)                                                                     \
			a[n++] = (struct arr){nm, o, b, k, kv_, el};                       \
	} while (0)
	ARR("norms", l->norms_off, l->norms_bytes, AK_PARAM, 0, 4);
	ARR("k_scale", l->k_scale_off, l->k_scale_bytes, AK_PARAM, 0, 2);
	ARR("k_zero", l->k_zero_off, l->k_scale_bytes, AK_PARAM, 0, 2);
	ARR("v_scale", l->v_scale_off, l->v_scale_bytes, AK_PARAM, 1, 2);
	ARR("v_zero", l->v_zero_off, l->v_scale_bytes, AK_PARAM, 1, 2);
	ARR("k_codes", l->k_codes_off, l->k_codes_bytes, AK_CODES, 0, cw);
	ARR("v_codes", l->v_codes_off, l->v_codes_bytes, AK_CODES, 1, cw);
	ARR("k_exact", l->k_exact_off, l->exact_bytes, AK_EXACT, 0, ws);
	ARR("v_exact", l->v_exact_off, l->exact_bytes, AK_EXACT, 1, ws);
#undef ARR
	return n;
}

static const struct hfield {
	const char *name;
	size_t off, size;
} hfields[] = {
#define HF(f) {#f, OFF(f), FSIZE(f)}
	HF(magic),       HF(version),     HF(header_bytes), HF(scheme),      HF(key_bits),
	HF(value_bits),  HF(dtype),       HF(rotate_v),     HF(scale_dtype), HF(group),
	HF(chunk_tokens), HF(n_layers),   HF(n_kv_heads),   HF(head_dim),    HF(n_pinned),
	HF(n_sinks),     HF(reserved0),   HF(first_token),  HF(layer_bytes), HF(data_offset),
	HF(total_bytes), HF(crc32c),      HF(reserved),
#undef HF
};
#define N_HFIELDS (sizeof(hfields) / sizeof(hfields[0]))

static const char *where(const struct seed *s, size_t off)
{
	static char bufs[4][96];
	static unsigned k;
	char *b = bufs[k++ % 4];
	const struct kvt_chunk_layout *l = &s->lay;
	if (off < KVT_CHUNK_HEADER_BYTES) {
		for (size_t i = 0; i < N_HFIELDS; i++)
			if (off >= hfields[i].off && off < hfields[i].off + hfields[i].size)
				snprintf(b, 96, "header.%s", hfields[i].name);
	} else if (off < l->data_offset) {
		snprintf(b, 96, off < KVT_CHUNK_HEADER_BYTES + 2u * s->hdr.n_pinned ? "pin table"
										 : "pin padding");
	} else if (off >= l->total_bytes) {
		snprintf(b, 96, "past total_bytes");
	} else {
		struct arr a[9];
		uint32_t na = layer_arrays(s, a);
		size_t ly = (off - l->data_offset) / l->layer_bytes;
		size_t o = (off - l->data_offset) % l->layer_bytes;
		snprintf(b, 96, "layer %zu gap", ly);
		for (uint32_t i = 0; i < na; i++)
			if (o >= a[i].off && o < a[i].off + a[i].bytes)
				snprintf(b, 96, "layer %zu %s+%zu", ly, a[i].name, o - a[i].off);
	}
	return b;
}

/* ---- Mutants ----------------------------------------------------------------------------- */

struct mutant {
	uint8_t *p; /* MUTANT_MAX_BYTES */
	size_t len;
	bool fix;   /* recompute the crc32c at the end */
	bool burst; /* one burst of <= 32 bits and no crc fix-up: must be rejected */
	struct fuzz_desc desc;
};

#define describe(m, ...) fuzz_desc_add(&(m)->desc, __VA_ARGS__)

/* Sets the length; bytes past the old end are junk (zeros or random). */
static bool resize(struct mutant *m, size_t n)
{
	if (n > MUTANT_MAX_BYTES)
		return false;
	if (n > m->len) {
		if (coin(2)) {
			memset(m->p + m->len, 0, n - m->len);
		} else {
			for (size_t i = m->len; i < n; i += 8) {
				uint64_t r = kvt_rand_u64();
				memcpy(m->p + i, &r, n - i < 8 ? n - i : 8);
			}
		}
	}
	m->len = n;
	return true;
}

static void fix_crc(struct mutant *m)
{
	if (m->len < KVT_CHUNK_HEADER_BYTES)
		return;
	uint64_t total = HGET(m->p, total_bytes);
	if (total >= KVT_CHUNK_HEADER_BYTES && total <= m->len)
		HPUT(m->p, crc32c, spec_crc(m->p, total));
}

/* data_offset, layer_bytes and total_bytes made what the header's shape implies, and the
 * buffer that long: the mutant gets past the size checks. */
static bool relayout(struct mutant *m)
{
	struct kvt_codec_config c;
	struct kvt_chunk_layout lay;
	header_cfg(m->p, &c);
	if (kvt_codec_config_validate(&c, NULL, 0) ||
	    kvt_chunk_layout(&c, (uint32_t)HGET(m->p, n_pinned), &lay) ||
	    lay.total_bytes > MUTANT_MAX_BYTES)
		return false;
	HPUT(m->p, data_offset, lay.data_offset);
	HPUT(m->p, layer_bytes, lay.layer_bytes);
	HPUT(m->p, total_bytes, lay.total_bytes);
	resize(m, lay.total_bytes);
	describe(m, " +sizes (total %zu)", lay.total_bytes);
	return true;
}

static const uint8_t interesting8[] = {0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe, 0x40};

/* An offset to mutate: the header and pin table often, since most checks live there. */
static size_t pick_offset(const struct mutant *m, const struct seed *s)
{
	if (m->len == 0)
		return 0;
	if (coin(4))
		return rb(m->len < 64 ? (uint32_t)m->len : 64);
	if (coin(8) && s->lay.data_offset > 64 && m->len > s->lay.data_offset)
		return 64 + rb((uint32_t)s->lay.data_offset - 64);
	return (size_t)(kvt_rand_u64() % m->len);
}

static void flip_one(struct mutant *m, const struct seed *s)
{
	size_t o = pick_offset(m, s);
	uint32_t bit = rb(8);
	m->p[o] ^= (uint8_t)(1u << bit);
	describe(m, "flip bit %u of byte %zu (%s)", bit, o, where(s, o));
}

static void mut_flip(struct mutant *m, const struct seed *s) { flip_one(m, s); }

static void mut_flip_nocrc(struct mutant *m, const struct seed *s)
{
	flip_one(m, s);
	m->fix = false;
	m->burst = true;
}

static void mut_burst_nocrc(struct mutant *m, const struct seed *s)
{
	const uint32_t nb = 1 + rb(32);
	const size_t bits = m->len * 8;
	size_t start = coin(4) ? rb(64 * 8) : (size_t)(kvt_rand_u64() % (bits - nb + 1));
	if (start + nb > bits)
		start = bits - nb;
	/* the first and the last bit of a burst are flipped, the ones between at random; bits
	 * in the order the reflected CRC reads them (each byte from its least significant) */
	uint32_t pat = (uint32_t)kvt_rand_u64() | 1u | (1u << (nb - 1));
	for (uint32_t i = 0; i < nb; i++)
		if (pat >> i & 1)
			m->p[(start + i) / 8] ^= (uint8_t)(1u << ((start + i) % 8));
	describe(m, "burst of %u bits (0x%x) from bit %zu (%s)", nb,
		 nb == 32 ? pat : pat & ((1u << nb) - 1), start, where(s, start / 8));
	m->fix = false;
	m->burst = true;
}

static void mut_byte_nocrc(struct mutant *m, const struct seed *s)
{
	size_t o = pick_offset(m, s);
	uint8_t v = interesting8[rb(sizeof(interesting8))];
	if (v == m->p[o])
		v = (uint8_t)~v;
	describe(m, "byte %zu (%s) 0x%02x -> 0x%02x", o, where(s, o), m->p[o], v);
	m->p[o] = v;
	m->fix = false;
	m->burst = true;
}

static void mut_bytes(struct mutant *m, const struct seed *s)
{
	uint32_t n = 1 + rb(4);
	for (uint32_t i = 0; i < n; i++) {
		size_t o = pick_offset(m, s);
		uint8_t v = coin(4) ? (uint8_t)kvt_rand_u64() : interesting8[rb(sizeof(interesting8))];
		describe(m, "%sbyte %zu (%s) = 0x%02x", i ? ", " : "", o, where(s, o), v);
		m->p[o] = v;
	}
}

/* A value for header field f (now v): the field's own boundaries, or generic ones. */
static uint64_t field_value(const struct hfield *f, uint64_t v, const uint8_t *p)
{
	const uint64_t max = f->size == 8 ? UINT64_MAX : (1ull << (8 * f->size)) - 1;
	const uint64_t top = 1ull << (8 * f->size - 1);
	const uint64_t B = HGET(p, chunk_tokens), G = HGET(p, group);
	uint64_t sp[16];
	size_t n = 0;
#define SP(...)                                                                            \
	do {                                                                               \
		const uint64_t vals_[] = {__VA_ARGS__};                                    \
		for (size_t i_ = 0; i_ < sizeof(vals_) / sizeof(vals_[0]) && n < 16; i_++) \
			sp[n++] = vals_[i_];                                               \
	} while (0)
	switch (f->off) {
	case OFF(version): SP(0, 2); break;
	case OFF(header_bytes): SP(0, 32, 63, 65, 128); break;
	case OFF(scheme): SP(0, 1, 2, 3, 4, 255); break;
	case OFF(key_bits):
	case OFF(value_bits): SP(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 255); break;
	case OFF(dtype): SP(0, 1, 2, 3, 4); break;
	case OFF(rotate_v): SP(0, 1, 2); break;
	case OFF(scale_dtype): SP(0, 1, 2, 3); break;
	case OFF(group): SP(0, 16, 32, 48, 64, 128, 256); break;
	case OFF(chunk_tokens):
		SP(0, 31, 32, 33, 64, 96, 128, 1024, 1025, 2048, B * 2, B + G, B - G);
		break;
	case OFF(n_layers): SP(0, 1, 2, 256, 257); break;
	case OFF(n_kv_heads): SP(0, 1, 2, 64, 65); break;
	case OFF(head_dim): SP(0, 32, 64, 96, 128, 192, 256, 512); break;
	case OFF(n_pinned): SP(0, 1, B - 1, B, B + 1); break;
	case OFF(n_sinks): SP(0, 1, 63, 64, 65, B, B + 1); break;
	case OFF(first_token):
		SP(0, UINT64_MAX - B, UINT64_MAX - B + 1, UINT64_MAX, 1ull << 63, v + B);
		break;
	case OFF(layer_bytes): SP(v + 64, v - 64, 0, 64, 0xffffffc0u, 0x80000000u); break;
	case OFF(data_offset): SP(0, 64, 128, v + 64, v - 64); break;
	case OFF(total_bytes):
		SP(v + 64, v - 64, v + (1ull << 32), v - (1ull << 32), UINT64_MAX, UINT64_MAX - 63,
		   (uint32_t)v, 0, 64, v * 2, 0x100000000ull + 64);
		break;
	default: break;
	}
#undef SP
	const uint64_t gen[] = {0,   1,       v - 1,   v + 1, max, max - 1, top, top - 1,
				v ^ (1ull << rb(8 * (uint32_t)f->size)), kvt_rand_u64(), v * 2, v / 2};
	uint64_t x = n && coin(2) ? sp[rb((uint32_t)n)] : gen[rb(sizeof(gen) / sizeof(gen[0]))];
	return x & max;
}

static void set_field(struct mutant *m, const struct hfield *f)
{
	uint64_t v = get_le(m->p, f->off, f->size), nv = field_value(f, v, m->p);
	put_le(m->p, f->off, f->size, nv);
	describe(m, "header.%s %llu -> %llu", f->name, (unsigned long long)v,
		 (unsigned long long)nv);
	if (f->off == OFF(crc32c))
		m->fix = false;
	/* shape fields: sometimes make the sizes agree so the checks behind them run */
	else if (f->off >= OFF(scheme) && f->off < OFF(reserved0) && coin(2))
		relayout(m);
}

static void mut_field(struct mutant *m, const struct seed *s)
{
	(void)s;
	set_field(m, &hfields[rb(N_HFIELDS)]);
}

/* A sorted, valid pin table for a chunk of B tokens from `first` with S sinks: the sinks,
 * plus up to `extra` other tokens. */
static uint32_t valid_pins(uint16_t *tab, uint32_t B, uint64_t first, uint32_t S, uint32_t extra)
{
	uint8_t on[KVT_MAX_CHUNK_TOKENS] = {0};
	for (uint64_t t = first; t < S && t < first + B; t++)
		on[t - first] = 1;
	for (uint32_t i = 0; i < extra; i++)
		on[rb(B)] = 1;
	uint32_t n = 0;
	for (uint32_t t = 0; t < B; t++)
		if (on[t])
			tab[n++] = (uint16_t)t;
	return n;
}

/* Writes n pins and the table's zero padding, and sets n_pinned. */
static void write_pins(struct mutant *m, const uint16_t *tab, uint32_t n)
{
	size_t end = KVT_CHUNK_HEADER_BYTES + KVT_ALIGN_UP(2 * (size_t)n, KVT_CHUNK_ALIGN);
	if (m->len < end)
		resize(m, end);
	memset(m->p + KVT_CHUNK_HEADER_BYTES, 0, end - KVT_CHUNK_HEADER_BYTES);
	for (uint32_t i = 0; i < n; i++)
		put_le(m->p, KVT_CHUNK_HEADER_BYTES + 2 * (size_t)i, 2, tab[i]);
	HPUT(m->p, n_pinned, n);
}

/* The header rewritten to another valid shape (sizes and pins consistent): decode and attend
 * then run over bytes laid out for something else. */
static void mut_reshape(struct mutant *m, const struct seed *s)
{
	struct kvt_codec_config c;
	pick_config(&c);
	const bool none = c.scheme == KVT_SCHEME_NONE;
	HPUT(m->p, scheme, c.scheme);
	HPUT(m->p, key_bits, none ? 16 : c.key_bits);
	HPUT(m->p, value_bits, none ? 16 : c.value_bits);
	HPUT(m->p, dtype, c.dtype);
	HPUT(m->p, rotate_v, c.rotate_v);
	HPUT(m->p, scale_dtype, c.dtype == KVT_DTYPE_BF16 ? KVT_DTYPE_BF16 : KVT_DTYPE_F16);
	HPUT(m->p, group, c.group);
	HPUT(m->p, chunk_tokens, c.chunk_tokens);
	HPUT(m->p, n_layers, c.n_layers);
	HPUT(m->p, n_kv_heads, c.n_kv_heads);
	HPUT(m->p, head_dim, c.head_dim);
	HPUT(m->p, n_sinks, c.n_sinks);
	uint64_t first = coin(2) ? s->hdr.first_token : rb(2) * (uint64_t)rb(70);
	HPUT(m->p, first_token, first);
	uint16_t tab[KVT_MAX_CHUNK_TOKENS];
	uint32_t np = none ? 0 : valid_pins(tab, c.chunk_tokens, first, c.n_sinks, rb(4));
	write_pins(m, tab, np);
	describe(m, "reshape to %s first_token %llu, %u pins", cfg_str(&c),
		 (unsigned long long)first, np);
	if (coin(4)) /* the old data as random bytes */
		for (size_t i = s->lay.data_offset; i < m->len; i++)
			m->p[i] = (uint8_t)kvt_rand_u64();
	relayout(m);
}

static void mut_cut(struct mutant *m, const struct seed *s)
{
	size_t cuts[160], n = 0;
	const size_t fixed[] = {0, 1, 8, 32, 56, 60, 63, 64, 65,
				64 + 2u * s->hdr.n_pinned - 1, 64 + 2u * s->hdr.n_pinned,
				s->lay.data_offset - 1, s->lay.data_offset, s->len - 64, s->len - 1};
	for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
		cuts[n++] = fixed[i];
	struct arr a[9];
	uint32_t na = layer_arrays(s, a);
	for (uint32_t l = 0; l < s->pcfg.n_layers && n + 3 <= 160; l++)
		for (uint32_t i = 0; i < na && n + 3 <= 160; i++) {
			size_t at = s->lay.data_offset + l * s->lay.layer_bytes + a[i].off;
			cuts[n++] = at - 1;
			cuts[n++] = at;
			cuts[n++] = at + 1;
		}
	if (!m->len)
		return;
	size_t cut = coin(4) ? (size_t)(kvt_rand_u64() % m->len) : cuts[rb((uint32_t)n)];
	if (cut >= m->len)
		cut = m->len - 1;
	describe(m, "cut to %zu bytes (%s)", cut, where(s, cut));
	m->len = cut;
}

static void mut_cut_size(struct mutant *m, const struct seed *s)
{
	mut_cut(m, s);
	if (m->len >= KVT_CHUNK_HEADER_BYTES) {
		HPUT(m->p, total_bytes, m->len);
		describe(m, ", total_bytes = %zu", m->len);
	}
}

static void mut_extend(struct mutant *m, const struct seed *s)
{
	(void)s;
	size_t was = m->len, n = 1 + rb(coin(4) ? 4096 : 256);
	resize(m, was + n);
	describe(m, "%zu junk bytes appended", n);
	if (coin(4) && m->len >= KVT_CHUNK_HEADER_BYTES) {
		HPUT(m->p, total_bytes, m->len);
		describe(m, ", total_bytes = %zu", m->len);
	}
}

static void mut_pins(struct mutant *m, const struct seed *s)
{
	const uint32_t B = s->pcfg.chunk_tokens;
	uint32_t np = (uint32_t)HGET(m->p, n_pinned);
	if (np > B)
		np = B;
	uint16_t tab[KVT_MAX_CHUNK_TOKENS + 1];
	for (uint32_t i = 0; i < np; i++)
		tab[i] = (uint16_t)get_le(m->p, 64 + 2 * (size_t)i, 2);
	const uint32_t ops = np >= 2 ? 10 : np ? 7 : 4;
	const uint32_t op = rb(ops), i = np ? rb(np) : 0;
	switch (op) {
	case 0: { /* a new pin where it belongs */
		uint32_t t = rb(B), j = 0;
		while (j < np && tab[j] < t)
			j++;
		memmove(tab + j + 1, tab + j, (np - j) * 2);
		tab[j] = (uint16_t)t;
		write_pins(m, tab, np + 1);
		describe(m, "pin token %u at %u (n_pinned %u)", t, j, np + 1);
		relayout(m);
		break;
	}
	case 1: { /* a fresh valid table of another size */
		uint32_t n = valid_pins(tab, B, s->hdr.first_token, s->pcfg.n_sinks, rb(6));
		write_pins(m, tab, n);
		describe(m, "fresh pin table of %u", n);
		relayout(m);
		break;
	}
	case 2: { /* n_pinned one off, the table as it is */
		uint32_t n = coin(2) || !np ? np + 1 : np - 1;
		HPUT(m->p, n_pinned, n);
		describe(m, "n_pinned %u -> %u", np, n);
		if (coin(2))
			relayout(m);
		break;
	}
	case 3: { /* every token pinned, or all but one */
		uint32_t n = 0, skip = coin(2) ? rb(B) : B;
		for (uint32_t t = 0; t < B; t++)
			if (t != skip)
				tab[n++] = (uint16_t)t;
		write_pins(m, tab, n);
		describe(m, "%u of %u tokens pinned", n, B);
		relayout(m);
		break;
	}
	case 4: { /* one entry at a boundary */
		const uint32_t vals[] = {B - 1, B, B + 1, 0xffff, 0x8000, 0,
					 i ? tab[i - 1] : 0, i + 1 < np ? tab[i + 1] : B, rb(B)};
		uint32_t v = vals[rb(sizeof(vals) / sizeof(vals[0]))];
		put_le(m->p, 64 + 2 * (size_t)i, 2, v);
		describe(m, "pin[%u] %u -> %u", i, tab[i], v);
		break;
	}
	case 5: /* one pin dropped (a sink, if it was one) */
		memmove(tab + i, tab + i + 1, (np - i - 1) * 2);
		write_pins(m, tab, np - 1);
		describe(m, "pin[%u] (token %u) dropped", i, tab[i]);
		relayout(m);
		break;
	case 6: { /* padding */
		size_t pad = KVT_ALIGN_UP(2 * (size_t)np, KVT_CHUNK_ALIGN) - 2 * (size_t)np;
		if (!pad) {
			describe(m, "pin padding (none): ");
			flip_one(m, s);
			break;
		}
		size_t o = 64 + 2 * (size_t)np + rb((uint32_t)pad);
		m->p[o] = (uint8_t)(1 + rb(255));
		describe(m, "pin padding byte %zu = 0x%02x", o, m->p[o]);
		break;
	}
	case 7: { /* two neighbours swapped */
		uint32_t j = i + 1 < np ? i : i - 1;
		put_le(m->p, 64 + 2 * (size_t)j, 2, tab[j + 1]);
		put_le(m->p, 64 + 2 * (size_t)j + 2, 2, tab[j]);
		describe(m, "pins %u and %u swapped", j, j + 1);
		break;
	}
	case 8: { /* a duplicate */
		uint32_t j = i + 1 < np ? i : i - 1;
		put_le(m->p, 64 + 2 * (size_t)j + 2, 2, tab[j]);
		describe(m, "pin[%u] = pin[%u] = %u", j + 1, j, tab[j]);
		break;
	}
	default: /* reversed */
		for (uint32_t j = 0; j < np; j++)
			put_le(m->p, 64 + 2 * (size_t)j, 2, tab[np - 1 - j]);
		describe(m, "pin table reversed");
		break;
	}
}

static const struct special {
	const char *name;
	uint16_t f16, bf16;
	uint32_t f32;
} specials[] = {
	{"NaN", 0x7e00, 0x7fc0, 0x7fc00000u},       {"sNaN", 0x7c01, 0x7f81, 0x7f800001u},
	{"-NaN", 0xfe00, 0xffc0, 0xffc00000u},      {"+Inf", 0x7c00, 0x7f80, 0x7f800000u},
	{"-Inf", 0xfc00, 0xff80, 0xff800000u},      {"max", 0x7bff, 0x7f7f, 0x7f7fffffu},
	{"-max", 0xfbff, 0xff7f, 0xff7fffffu},      {"huge", 0x7800, 0x7e80, 0x7e800000u},
	{"denormal", 0x0001, 0x0001, 0x00000001u}, {"-denormal", 0x8001, 0x8001, 0x80000001u},
	{"-0", 0x8000, 0x8000, 0x80000000u},        {"0", 0, 0, 0},
	{"1", 0x3c00, 0x3f80, 0x3f800000u},         {"-1", 0xbc00, 0xbf80, 0xbf800000u},
};

/* Special floats into scales, zeros, norms or exact values (codes of scheme none, which are
 * values): a run of 1..16 elements of one array of one layer. */
static void mut_float(struct mutant *m, const struct seed *s)
{
	struct arr a[9], pick[9];
	uint32_t na = layer_arrays(s, a), np = 0;
	for (uint32_t i = 0; i < na; i++)
		if (a[i].kind != AK_CODES || s->pcfg.scheme == KVT_SCHEME_NONE)
			pick[np++] = a[i];
	const struct arr *ar = &pick[rb(np)];
	const struct special *sp = &specials[rb(sizeof(specials) / sizeof(specials[0]))];
	const uint32_t l = rb(s->pcfg.n_layers), ne = (uint32_t)(ar->bytes / ar->elem);
	const uint32_t e = rb(ne), run = coin(3) ? 1 + rb(16) : 1;
	/* scales and zeros are in the scale dtype, exact values (and codes of none) in the wire
	 * dtype, norms f32 */
	const uint32_t dt = ar->kind == AK_PARAM && ar->elem == 2 ? s->hdr.scale_dtype
				: ar->elem == 4			      ? KVT_DTYPE_F32
									      : s->pcfg.dtype;
	const uint64_t bits = dt == KVT_DTYPE_F32    ? sp->f32
			      : dt == KVT_DTYPE_BF16 ? sp->bf16
						     : sp->f16;
	const size_t base = s->lay.data_offset + l * s->lay.layer_bytes + ar->off;
	for (uint32_t i = e; i < e + run && i < ne; i++)
		put_le(m->p, base + (size_t)i * ar->elem, ar->elem, bits);
	describe(m, "layer %u %s[%u..%u] = %s (%s)", l, ar->name, e, e + run - 1, sp->name,
		 kvt_dtype_name(dt));
}

/* Random code bytes: a few, or a whole row. */
static void mut_codes(struct mutant *m, const struct seed *s)
{
	struct arr a[9];
	uint32_t na = layer_arrays(s, a), ci[2], nc = 0;
	for (uint32_t i = 0; i < na; i++)
		if (a[i].kind == AK_CODES)
			ci[nc++] = i;
	const struct arr *ar = &a[ci[rb(nc)]];
	const uint32_t l = rb(s->pcfg.n_layers);
	const size_t base = s->lay.data_offset + l * s->lay.layer_bytes + ar->off;
	const size_t rows = (size_t)s->pcfg.n_kv_heads * s->pcfg.chunk_tokens;
	const size_t row = ar->bytes / rows;
	if (coin(4)) {
		size_t r = kvt_rand_u64() % rows;
		for (size_t i = 0; i < row; i++)
			m->p[base + r * row + i] = coin(2) ? 0xff : (uint8_t)kvt_rand_u64();
		describe(m, "layer %u %s row %zu (head %zu token %zu) random", l, ar->name, r,
			 r / s->pcfg.chunk_tokens, r % s->pcfg.chunk_tokens);
		return;
	}
	uint32_t n = 1 + rb(8);
	describe(m, "layer %u %s bytes", l, ar->name);
	for (uint32_t i = 0; i < n; i++) {
		size_t o = kvt_rand_u64() % ar->bytes;
		m->p[base + o] = coin(2) ? interesting8[rb(sizeof(interesting8))]
					 : (uint8_t)kvt_rand_u64();
		describe(m, " +%zu", o);
	}
}

/* Non-zero bytes in the gaps between a layer's arrays (never read). */
static void mut_gap(struct mutant *m, const struct seed *s)
{
	struct arr a[9];
	uint32_t na = layer_arrays(s, a);
	size_t gs[12], ge[12], ng = 0, pos = 0;
	for (uint32_t i = 0; i <= na; i++) {
		size_t end = i < na ? a[i].off : s->lay.layer_bytes;
		if (end > pos) {
			gs[ng] = pos;
			ge[ng++] = end;
		}
		if (i < na)
			pos = a[i].off + a[i].bytes;
	}
	if (!ng) {
		mut_codes(m, s);
		return;
	}
	const uint32_t g = rb((uint32_t)ng), l = rb(s->pcfg.n_layers), n = 1 + rb(4);
	describe(m, "layer %u gap [%zu, %zu) bytes", l, gs[g], ge[g]);
	for (uint32_t i = 0; i < n; i++) {
		size_t o = gs[g] + kvt_rand_u64() % (ge[g] - gs[g]);
		m->p[s->lay.data_offset + l * s->lay.layer_bytes + o] = (uint8_t)(1 + rb(255));
		describe(m, " +%zu", o);
	}
}

static void mut_swap(struct mutant *m, const struct seed *s)
{
	uint32_t j = rb(N_SEEDS);
	while (&pool[j] == s || !pool[j].bytes)
		j = (j + 1) % N_SEEDS;
	const struct seed *o = &pool[j];
	memcpy(m->p, o->bytes, KVT_CHUNK_HEADER_BYTES);
	describe(m, "header of seed %u (%s)", j, cfg_str(&o->pcfg));
	if (coin(2)) {
		size_t n = o->lay.data_offset - KVT_CHUNK_HEADER_BYTES;
		if (m->len < o->lay.data_offset)
			resize(m, o->lay.data_offset);
		memcpy(m->p + KVT_CHUNK_HEADER_BYTES, o->bytes + KVT_CHUNK_HEADER_BYTES, n);
		describe(m, " and its pin table");
	}
	if (coin(2)) {
		resize(m, o->len);
		describe(m, ", %zu bytes long", o->len);
	}
}

static void mut_stack(struct mutant *m, const struct seed *s);

static const struct kind {
	const char *name;
	void (*fn)(struct mutant *, const struct seed *);
	uint32_t weight;
	bool stackable;
} kinds[] = {
	{"flip-nocrc", mut_flip_nocrc, 6, false},
	{"burst-nocrc", mut_burst_nocrc, 6, false},
	{"byte-nocrc", mut_byte_nocrc, 3, false},
	{"flip", mut_flip, 8, true},
	{"bytes", mut_bytes, 8, true},
	{"field", mut_field, 18, true},
	{"reshape", mut_reshape, 6, true},
	{"cut", mut_cut, 6, true},
	{"cut+size", mut_cut_size, 2, true},
	{"extend", mut_extend, 3, true},
	{"pins", mut_pins, 10, true},
	{"float", mut_float, 10, true},
	{"codes", mut_codes, 10, true},
	{"gap", mut_gap, 2, true},
	{"header-swap", mut_swap, 4, true},
	{"stack", mut_stack, 6, false},
};
#define N_KINDS (sizeof(kinds) / sizeof(kinds[0]))

static uint32_t pick_kind(bool stackable_only)
{
	uint32_t total = 0;
	for (uint32_t k = 0; k < N_KINDS; k++)
		total += !stackable_only || kinds[k].stackable ? kinds[k].weight : 0;
	uint32_t r = rb(total);
	for (uint32_t k = 0; k < N_KINDS; k++) {
		uint32_t w = !stackable_only || kinds[k].stackable ? kinds[k].weight : 0;
		if (r < w)
			return k;
		r -= w;
	}
	return 0;
}

static void mut_stack(struct mutant *m, const struct seed *s)
{
	uint32_t n = 2 + rb(3);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t k = pick_kind(true);
		describe(m, "%s%s: ", i ? "; " : "", kinds[k].name);
		kinds[k].fn(m, s);
	}
}

/* ---- Oracles on an accepted chunk -------------------------------------------------------- */

static bool same_val(float a, float b)
{
	return kvt_f32_bits(a) == kvt_f32_bits(b) || (isnan(a) && isnan(b));
}

/* First index where two tensors differ (NaN equals NaN), or n. */
static size_t first_diff(const void *a, uint32_t adt, const void *b, uint32_t bdt, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!same_val(f32_at(a, adt, i), f32_at(b, bdt, i)))
			return i;
	return n;
}

/* First index where out (f16 or bf16) is not the f32 tensor rounded, or n. */
static size_t first_unrounded(const void *out, uint32_t dt, const float *f, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		uint16_t r = dt == KVT_DTYPE_F16 ? kvt_f32_to_f16(f[i]) : kvt_f32_to_bf16(f[i]);
		float want = dt == KVT_DTYPE_F16 ? kvt_f16_to_f32(r) : kvt_bf16_to_f32(r);
		if (!same_val(f32_at(out, dt, i), want))
			return i;
	}
	return n;
}

enum mclass { MC_SAME, MC_CODES, MC_DATA, MC_STRUCT };
static const char *const mclass_names[] = {"same", "codes", "data", "struct"};

/*
 * How a mutant differs from its seed: MC_STRUCT when the header (but its crc field) or the pin
 * table differ or bytes are missing or appended (parse takes exactly total_bytes); else MC_DATA when scales, zeros, norms or exact values
 * differ; else MC_CODES when code bytes or gaps differ (rows[(l * 2 + kv) * H * B + h * B + t]
 * marks the rows whose code bytes differ); else MC_SAME.
 */
static enum mclass classify(const struct seed *s, const uint8_t *p, size_t len, uint8_t *rows)
{
	const struct kvt_chunk_layout *l = &s->lay;
	const uint32_t B = s->pcfg.chunk_tokens, H = s->pcfg.n_kv_heads, L = s->pcfg.n_layers;
	if (len != l->total_bytes || memcmp(p, s->bytes, OFF(crc32c)) ||
	    memcmp(p + OFF(crc32c) + 4, s->bytes + OFF(crc32c) + 4, l->data_offset - OFF(crc32c) - 4))
		return MC_STRUCT;
	memset(rows, 0, (size_t)L * 2 * H * B);
	enum mclass c = MC_SAME;
	struct arr a[9];
	const uint32_t na = layer_arrays(s, a);
	for (uint32_t ly = 0; ly < L; ly++) {
		const uint8_t *x = p + l->data_offset + (size_t)ly * l->layer_bytes;
		const uint8_t *y = s->bytes + l->data_offset + (size_t)ly * l->layer_bytes;
		size_t pos = 0;
		for (uint32_t i = 0; i <= na; i++) {
			size_t end = i < na ? a[i].off : l->layer_bytes;
			if (end > pos && memcmp(x + pos, y + pos, end - pos) && c < MC_CODES)
				c = MC_CODES; /* a gap */
			if (i == na)
				break;
			pos = a[i].off + a[i].bytes;
			if (!memcmp(x + a[i].off, y + a[i].off, a[i].bytes))
				continue;
			if (a[i].kind != AK_CODES) {
				c = MC_DATA;
				continue;
			}
			if (c < MC_CODES)
				c = MC_CODES;
			const size_t row = a[i].bytes / ((size_t)H * B);
			for (size_t o = 0; o < a[i].bytes; o++)
				if (x[a[i].off + o] != y[a[i].off + o])
					rows[((size_t)ly * 2 + a[i].kv) * H * B + o / row] = 1;
		}
	}
	return c;
}

static void check_decode(const struct seed *s, const uint8_t *chunk,
			 const struct kvt_codec_config *c, enum mclass mc, const uint8_t *rows,
			 enum kvt_isa ia, enum kvt_isa ib)
{
	const uint32_t B = c->chunk_tokens, L = c->n_layers, H = c->n_kv_heads, d = c->head_dim;
	const size_t n = (size_t)L * B * H * d, row = (size_t)H * d;
	void *k[4] = {0}, *v[4] = {0}, *k2 = NULL, *v2 = NULL, *ks = NULL, *vs = NULL;
	char err[256];
	int rc;
	kvt_codec_set_isa(ia);
	for (uint32_t dt = KVT_DTYPE_F16; dt <= KVT_DTYPE_F32; dt++) {
		k[dt] = talloc(n * kvt_dtype_size(dt), kvt_dtype_size(dt));
		v[dt] = talloc(n * kvt_dtype_size(dt), kvt_dtype_size(dt));
		err[0] = 0;
		rc = kvt_decode_chunk(chunk, 0, B, 0, L, dt, k[dt], v[dt], err, sizeof(err));
		FCHECK(rc == 0, "decode all to %s: rc %d '%s'", kvt_dtype_name(dt), rc, err);
		if (rc)
			goto out;
	}
	const float *kf = k[KVT_DTYPE_F32], *vf = v[KVT_DTYPE_F32];
	for (uint32_t dt = KVT_DTYPE_F16; dt <= KVT_DTYPE_BF16; dt++) {
		size_t ik = first_unrounded(k[dt], dt, kf, n), iv = first_unrounded(v[dt], dt, vf, n);
		FCHECK(ik == n && iv == n,
		       "%s output is not the f32 output rounded (k at %zu, v at %zu of %zu)",
		       kvt_dtype_name(dt), ik, iv, n);
	}
	if (avx2) {
		kvt_codec_set_isa(ib);
		k2 = talloc(n * 4, 4);
		v2 = talloc(n * 4, 4);
		rc = kvt_decode_chunk(chunk, 0, B, 0, L, KVT_DTYPE_F32, k2, v2, err, sizeof(err));
		FCHECK(rc == 0, "decode on the other path: rc %d '%s'", rc, err);
		if (!rc) {
			size_t ik = first_diff(kf, KVT_DTYPE_F32, k2, KVT_DTYPE_F32, n);
			size_t iv = first_diff(vf, KVT_DTYPE_F32, v2, KVT_DTYPE_F32, n);
			const float *k2f = k2;
			FCHECK(ik == n && iv == n,
			       "the two paths decode differently (k at %zu: %g then %g, v at %zu of %zu)",
			       ik, ik < n ? (double)kf[ik] : 0.0, ik < n ? (double)k2f[ik] : 0.0, iv, n);
		}
		kvt_codec_set_isa(ia);
	}
	/* a random sub-range, k, v or both, in a random dtype: the same slice of the whole */
	{
		const uint32_t t0 = rb(B + 1), t1 = t0 + rb(B - t0 + 1);
		const uint32_t l0 = rb(L + 1), l1 = l0 + rb(L - l0 + 1);
		const uint32_t dt = 1 + rb(3), which = rb(3);
		const size_t sn = (size_t)(l1 - l0) * (t1 - t0) * row, es = kvt_dtype_size(dt);
		ks = which != 1 ? talloc(sn * es, es) : NULL;
		vs = which != 0 ? talloc(sn * es, es) : NULL;
		rc = kvt_decode_chunk(chunk, t0, t1, l0, l1, dt, ks, vs, err, sizeof(err));
		FCHECK(rc == 0, "decode tokens [%u, %u) layers [%u, %u) to %s: rc %d '%s'", t0, t1, l0,
		       l1, kvt_dtype_name(dt), rc, err);
		size_t bad = 0;
		for (uint32_t l = l0; !rc && l < l1; l++) {
			size_t so = (size_t)(l - l0) * (t1 - t0) * row, fo = ((size_t)l * B + t0) * row;
			size_t m = (size_t)(t1 - t0) * row;
			if (ks)
				bad += first_diff((const uint8_t *)ks + so * es, dt,
						  (const uint8_t *)k[dt] + fo * es, dt, m) != m;
			if (vs)
				bad += first_diff((const uint8_t *)vs + so * es, dt,
						  (const uint8_t *)v[dt] + fo * es, dt, m) != m;
		}
		FCHECK(bad == 0, "tokens [%u, %u) layers [%u, %u) in %s differ from the whole decode",
		       t0, t1, l0, l1, kvt_dtype_name(dt));
	}
	/* ranges and dtypes outside the chunk: a clean -EINVAL */
	if (coin(8)) {
		const uint32_t bad = rb(3);
		err[0] = 0;
		rc = kvt_decode_chunk(chunk, 0, bad == 0 ? B + 1 + rb(3) : B, 0, bad == 1 ? L + 1 : L,
				      bad == 2 ? (coin(2) ? 0 : 4) : KVT_DTYPE_F32, k[3], v[3], err,
				      sizeof(err));
		FCHECK(rc == -EINVAL && err[0], "bad decode argument %u: rc %d '%s'", bad, rc, err);
	}
	if (mc <= MC_CODES) {
		/* only code bytes changed: every other row decodes as the seed did, and codes are
		 * bounded, so every value stays finite (scheme none's codes are values) */
		size_t bad = 0, first = SIZE_MAX;
		for (uint32_t l = 0; l < L; l++)
			for (uint32_t t = 0; t < B; t++)
				for (uint32_t h = 0; h < H; h++) {
					size_t o = (((size_t)l * B + t) * H + h) * d;
					size_t rk = ((size_t)l * 2 * H + h) * B + t;
					size_t rv = rk + (size_t)H * B;
					if ((!rows[rk] && memcmp(kf + o, s->dk + o, d * 4)) ||
					    (!rows[rv] && memcmp(vf + o, s->dv + o, d * 4))) {
						bad++;
						if (first == SIZE_MAX)
							first = o / d;
					}
				}
		FCHECK(bad == 0, "%zu unchanged rows decode differently from the seed (first: layer "
		       "%zu token %zu head %zu)", bad, first / H / B, first / H % B, first % H);
		if (c->scheme != KVT_SCHEME_NONE) {
			size_t nf = 0;
			for (size_t i = 0; i < n; i++)
				nf += !isfinite(kf[i]) + !isfinite(vf[i]);
			FCHECK(nf == 0, "%zu non-finite values after a code-only change", nf);
		}
	}
out:
	for (int dt = 0; dt < 4; dt++) {
		tfree(k[dt]);
		tfree(v[dt]);
	}
	tfree(k2);
	tfree(v2);
	tfree(ks);
	tfree(vs);
}

static void check_attend(const uint8_t *chunk, const struct kvt_codec_config *c, bool finite,
			 enum kvt_isa ia, enum kvt_isa ib)
{
	const uint32_t H = c->n_kv_heads, d = c->head_dim, rep = 1 + rb(3), nq = H * rep;
	const uint32_t nt = rb(4);
	const size_t ws = kvt_dtype_size(c->dtype), tn = (size_t)nt * H * d;
	const size_t no = (size_t)nq * d;
	float *q = talloc(no * 4, 4), *o[2] = {talloc(no * 4, 4), talloc(no * 4, 4)};
	float *tf = xalloc(tn * 4 + 4);
	void *tk = nt ? talloc(tn * ws, ws) : NULL, *tv = nt ? talloc(tn * ws, ws) : NULL;
	fill_f32(q, no, 1.0f);
	if (nt) {
		fill_f32(tf, tn, 1.0f);
		kvt_convert(tf, KVT_DTYPE_F32, tk, c->dtype, tn);
		fill_f32(tf, tn, 1.0f);
		kvt_convert(tf, KVT_DTYPE_F32, tv, c->dtype, tn);
	}
	const void *chunks[2] = {chunk, chunk};
	struct kvt_attend_request r = {
		.cfg = c,
		.layer = rb(c->n_layers),
		.n_q_heads = nq,
		.softmax_scale = 1.0f / sqrtf((float)d),
		.q = q,
		.chunks = chunks,
		.n_chunks = 1,
		.tail_k = tk,
		.tail_v = tv,
		.n_tail = nt,
	};
	char err[256];
	int rc[2] = {0, 0};
	for (int p = 0; p < (avx2 ? 2 : 1); p++) {
		kvt_codec_set_isa(p ? ib : ia);
		r.out = o[p];
		err[0] = 0;
		rc[p] = kvt_attend(&r, 1, err, sizeof(err));
		FCHECK(rc[p] == 0, "attend layer %u, %u query heads, tail %u: rc %d '%s'", r.layer, nq,
		       nt, rc[p], err);
	}
	if (avx2 && !rc[0] && !rc[1]) {
		size_t i = first_diff(o[0], KVT_DTYPE_F32, o[1], KVT_DTYPE_F32, no);
		FCHECK(i == no, "the two paths attend differently at %zu: %g then %g", i,
		       i < no ? (double)o[0][i] : 0.0, i < no ? (double)o[1][i] : 0.0);
	}
	if (finite && !rc[0]) {
		size_t nf = 0;
		for (size_t i = 0; i < no; i++)
			nf += !isfinite(o[0][i]);
		FCHECK(nf == 0, "attend gives %zu non-finite outputs after a code-only change", nf);
	}
	if (coin(8)) { /* the same chunk twice is not a session */
		r.n_chunks = 2;
		r.out = o[0];
		err[0] = 0;
		int rc2 = kvt_attend(&r, 1, err, sizeof(err));
		FCHECK(rc2 == -EINVAL && strstr(err, "consecutive"),
		       "attend on a chunk twice: rc %d '%s'", rc2, err);
	}
	kvt_codec_set_isa(ia);
	tfree(q);
	tfree(o[0]);
	tfree(o[1]);
	free(tf);
	tfree(tk);
	tfree(tv);
}

/* outcome counts for the summary line */
static struct {
	uint64_t iters, accepted, by_reason[R_COUNT], by_class[4], kind_n[N_KINDS],
		kind_acc[N_KINDS], bursts, in_seq;
} st;

/* What the daemon does with an uploaded chunk that parsed (StoreEncoded, then Fetch, Attend,
 * Fork, Truncate): kvt_seq_append_chunk into an empty sequence of the chunk's config (only a
 * chunk at token 0 fits one), then kvt_seq_fetch of a random range equals kvt_decode_chunk's,
 * kvt_seq_attend succeeds, and a fork and a truncate to a random length (a cut inside the
 * chunk decodes its prefix into the tail, in the wire dtype) fetch what the chunk decodes to
 * in the wire dtype; the chunk again at token 0 does not fit. */
static void check_seq(const uint8_t *chunk, size_t len, const struct kvt_codec_config *c,
		      const struct kvt_chunk_header *h)
{
	const uint32_t B = c->chunk_tokens, L = c->n_layers, H = c->n_kv_heads, d = c->head_dim;
	const uint32_t wdt = c->dtype;
	const size_t ws = kvt_dtype_size(wdt);
	struct kvt_seq *seq = NULL, *fork = NULL;
	void *a = NULL, *b = NULL, *av = NULL, *bv = NULL;
	float *q = NULL, *o = NULL;
	char err[256] = "";
	int rc = kvt_seq_create(c, NULL, &seq, err, sizeof(err));
	FCHECK(rc == 0, "kvt_seq_create with a parsed chunk's config: rc %d '%s'", rc, err);
	if (rc)
		return;
	err[0] = 0;
	rc = kvt_seq_append_chunk(seq, chunk, len, err, sizeof(err));
	if (h->first_token != 0) {
		FCHECK(rc != 0 && err[0] && kvt_seq_tokens(seq) == 0, "a chunk at token %llu into an "
		       "empty sequence: rc %d '%s', %llu tokens", (unsigned long long)h->first_token,
		       rc, err, (unsigned long long)kvt_seq_tokens(seq));
		goto out;
	}
	FCHECK(rc == 0 && kvt_seq_tokens(seq) == B && kvt_seq_n_chunks(seq) == 1,
	       "append_chunk of a chunk that parsed: rc %d '%s', %llu tokens", rc, err,
	       (unsigned long long)kvt_seq_tokens(seq));
	if (rc)
		goto out;
	st.in_seq++;

	/* Fetch: a random range, f32 */
	uint32_t t0 = rb(B), t1 = t0 + 1 + rb(B - t0), l0 = rb(L), l1 = l0 + 1 + rb(L - l0);
	size_t n = (size_t)(l1 - l0) * (t1 - t0) * H * d;
	a = talloc(n * 4, 4), av = talloc(n * 4, 4), b = talloc(n * 4, 4), bv = talloc(n * 4, 4);
	rc = kvt_seq_fetch(seq, t0, t1, l0, l1, KVT_DTYPE_F32, a, av, err, sizeof(err));
	FCHECK(rc == 0, "seq fetch [%u, %u) layers [%u, %u): rc %d '%s'", t0, t1, l0, l1, rc, err);
	int rd = kvt_decode_chunk(chunk, t0, t1, l0, l1, KVT_DTYPE_F32, b, bv, err, sizeof(err));
	if (!rc && !rd) {
		size_t i = first_diff(a, KVT_DTYPE_F32, b, KVT_DTYPE_F32, n);
		size_t j = first_diff(av, KVT_DTYPE_F32, bv, KVT_DTYPE_F32, n);
		FCHECK(i == n && j == n, "seq fetch differs from the chunk's decode at k %zu v %zu of "
		       "%zu", i, j, n);
	}
	tfree(a), tfree(av), tfree(b), tfree(bv);
	a = av = b = bv = NULL;

	/* Attend */
	const uint32_t nq = H * (1 + rb(3));
	q = talloc((size_t)nq * d * 4, 4), o = talloc((size_t)nq * d * 4, 4);
	fill_f32(q, (size_t)nq * d, 1.0f);
	const uint32_t layer = rb(L);
	rc = kvt_seq_attend(seq, layer, nq, 1.0f / sqrtf((float)d), q, o, err, sizeof(err));
	FCHECK(rc == 0, "seq attend layer %u, %u query heads: rc %d '%s'", layer, nq, rc, err);

	/* Fork and truncate to n_tok: tokens [0, n_tok) in the wire dtype, as the chunk decodes */
	const uint32_t n_tok = rb(B + 1);
	n = (size_t)L * n_tok * H * d;
	if (n_tok) {
		a = talloc(n * ws, ws), av = talloc(n * ws, ws), b = talloc(n * ws, ws);
		bv = talloc(n * ws, ws);
		rd = kvt_decode_chunk(chunk, 0, n_tok, 0, L, wdt, b, bv, err, sizeof(err));
		FCHECK(rd == 0, "decode [0, %u) in the wire dtype: rc %d '%s'", n_tok, rd, err);
	}
	rc = kvt_seq_fork(seq, n_tok, NULL, &fork, err, sizeof(err));
	FCHECK(rc == 0 && kvt_seq_tokens(fork) == n_tok, "fork at %u: rc %d '%s'", n_tok, rc, err);
	for (int pass = 0; pass < 2 && n_tok; pass++) {
		/* pass 0: the fork; pass 1: the sequence itself, truncated */
		struct kvt_seq *x = pass ? seq : fork;
		if (pass) {
			rc = kvt_seq_truncate(seq, n_tok, err, sizeof(err));
			FCHECK(rc == 0 && kvt_seq_tokens(seq) == n_tok, "truncate to %u: rc %d '%s'",
			       n_tok, rc, err);
		}
		if (rc || !x)
			continue;
		rc = kvt_seq_fetch(x, 0, n_tok, 0, L, wdt, a, av, err, sizeof(err));
		FCHECK(rc == 0, "fetch [0, %u) of the %s: rc %d '%s'", n_tok,
		       pass ? "truncated sequence" : "fork", rc, err);
		if (!rc && !rd) {
			size_t i = first_diff(a, wdt, b, wdt, n), j = first_diff(av, wdt, bv, wdt, n);
			FCHECK(i == n && j == n, "the %s's tokens [0, %u) differ from the chunk's decode "
			       "at k %zu v %zu of %zu", pass ? "truncated sequence" : "fork", n_tok,
			       i, j, n);
		}
	}
	if (kvt_seq_tokens(seq) == B) { /* (not truncated) the chunk again does not fit */
		rc = kvt_seq_append_chunk(seq, chunk, len, err, sizeof(err));
		FCHECK(rc != 0 && kvt_seq_tokens(seq) == B, "the same chunk appended twice: rc %d",
		       rc);
	}
out:
	kvt_seq_destroy(fork);
	kvt_seq_destroy(seq);
	tfree(a), tfree(av), tfree(b), tfree(bv);
	tfree(q), tfree(o);
}

/* ---- One iteration ----------------------------------------------------------------------- */

static uint8_t *mbuf;

static void run_iteration(uint64_t it)
{
	pool_ensure(it / POOL_PERIOD);
	rng_stream(STREAM_ITER, it);
	uint32_t si = rb(N_SEEDS);
	while (!pool[si].bytes)
		si = (si + 1) % N_SEEDS;
	const struct seed *s = &pool[si];
	struct mutant m = {.p = mbuf, .len = s->len, .fix = true};
	memcpy(m.p, s->bytes, s->len);
	const uint32_t kind = pick_kind(false);
	ctx_set("iteration %llu: seed %u (%s), while mutating (%s); replay: "
		"KVT_SEED=%llu KVT_FUZZ_ITER=%llu\n", (unsigned long long)it, si,
		cfg_str(&s->pcfg), kinds[kind].name, (unsigned long long)kvt_test_seed,
		(unsigned long long)it);
	kinds[kind].fn(&m, s);
	if (m.fix && coin(10)) {
		m.fix = false;
		describe(&m, " (crc not fixed)");
	}
	if (m.fix)
		fix_crc(&m);
	const bool changed = m.len != s->len || memcmp(m.p, s->bytes, s->len);
	const enum kvt_isa ia = avx2 && coin(2) ? KVT_ISA_AVX2 : KVT_ISA_SCALAR;
	const enum kvt_isa ib = ia == KVT_ISA_AVX2 ? KVT_ISA_SCALAR : KVT_ISA_AVX2;
	ctx_set("iteration %llu: seed %u (%s, first_token %llu, %u pinned, %zu bytes), %s: %s; "
		"%zu bytes, %s path first; replay: KVT_SEED=%llu KVT_FUZZ_ITER=%llu\n",
		(unsigned long long)it, si, cfg_str(&s->pcfg), (unsigned long long)s->hdr.first_token,
		s->hdr.n_pinned, s->len, kinds[kind].name, m.desc.s, m.len,
		ia == KVT_ISA_AVX2 ? "avx2" : "scalar", (unsigned long long)kvt_test_seed,
		(unsigned long long)it);
	if (verbose)
		printf("# %s", ctx);

	/* the chunk in a buffer of exactly its length, at an alignment the API allows (>= 4) */
	static const size_t aligns[] = {0, 0, 0, 4, 8, 16, 32};
	const size_t skew = aligns[rb(sizeof(aligns) / sizeof(aligns[0]))];
	uint8_t *base = xalloc(m.len + skew), *chunk = base + skew;
	memcpy(chunk, m.p, m.len);
	/* and an error buffer of exactly its size: sometimes tiny, sometimes absent */
	const size_t errlen = coin(8) ? 0 : coin(8) ? 1 + rb(16) : 256;
	char *err = errlen ? xalloc(errlen) : NULL;
	if (err)
		err[0] = 0;
	struct kvt_codec_config pc;
	struct kvt_chunk_header ph;
	int rc = kvt_chunk_parse(chunk, m.len, &pc, &ph, err, errlen);
	unsigned late;
	const enum reason want = model_verdict(chunk, m.len, &late);
	enum reason got = R_ACCEPT;
	FCHECK(rc == 0 || rc == -EBADMSG, "parse rc %d", rc);
	if (rc) {
		FCHECK(!err || ((errlen < 2 || err[0]) && memchr(err, 0, errlen)),
		       "parse rejects without a message");
		FCHECK(want != R_ACCEPT, "parse rejects what CHUNK_FORMAT.md accepts: '%s'",
		       err ? err : "");
		if (errlen == 256) {
			got = reason_of(err);
			if (want == R_CRC)
				FCHECK(late >> got & 1, "parse says '%s'; the model finds %s", err,
				       late_names(late));
			else
				FCHECK(got == want, "parse says '%s'; the model's first failing check "
				       "is %s", err, reasons[want].name);
		} else { /* no message to read: count what the model says */
			got = want != R_CRC		   ? want
			      : late >> R_PIN_TABLE & 1 ? R_PIN_TABLE
			      : late >> R_CRC & 1	   ? R_CRC
							   : R_SINKS;
		}
	} else {
		FCHECK(want == R_ACCEPT, "parse accepts what CHUNK_FORMAT.md rejects (%s)",
		       want == R_CRC ? late_names(late) : reasons[want].name);
	}
	if (m.burst && changed)
		FCHECK(rc != 0, "a burst of <= 32 bits without crc fix-up was accepted");
	uint8_t *rows = xalloc((size_t)s->pcfg.n_layers * 2 * s->pcfg.n_kv_heads *
			       s->pcfg.chunk_tokens);
	const enum mclass mc = classify(s, chunk, m.len, rows);
	if (mc != MC_STRUCT && HGET(chunk, crc32c) == spec_crc(chunk, s->len))
		FCHECK(rc == 0, "a change to layer data only (%s) was rejected: %s", mclass_names[mc],
		       err ? err : "");
	if (verbose)
		printf("# parse rc %d '%s', model: %s, mutant class %s\n", rc, err ? err : "",
		       want == R_CRC ? late_names(late) : reasons[want].name, mclass_names[mc]);
	st.iters++;
	st.kind_n[kind]++;
	st.bursts += m.burst;
	if (rc == 0) {
		st.accepted++;
		st.kind_acc[kind]++;
		st.by_class[mc]++;
		FCHECK(memcmp(&ph, chunk, sizeof(ph)) == 0, "parse's header is not the chunk's");
		struct kvt_codec_config hc;
		header_cfg(chunk, &hc);
		hc.key_bits = pc.key_bits; /* none: 0 or 16 in a config; the header says 16 */
		hc.value_bits = pc.value_bits;
		FCHECK(memcmp(&pc, &hc, sizeof(pc)) == 0, "parse's config is not the header's");
		check_decode(s, chunk, &pc, mc, rows, ia, ib);
		check_attend(chunk, &pc, mc <= MC_CODES && pc.scheme != KVT_SCHEME_NONE, ia, ib);
		/* parse accepts only a length of exactly total_bytes */
		FCHECK(ph.total_bytes == m.len, "parse accepts %zu bytes of a %llu-byte chunk", m.len,
		       (unsigned long long)ph.total_bytes);
		check_seq(chunk, m.len, &pc, &ph);
	} else {
		st.by_reason[got]++;
	}
	free(rows);
	free(err);
	free(base);
}

/* ---- Deterministic cases ----------------------------------------------------------------- */

static void test_model_agrees_on_seeds(void)
{
	/* the model accepts every seed, and a bit flip in each header field is caught */
	pool_ensure(0);
	for (uint32_t i = 0; i < N_SEEDS; i++) {
		const struct seed *s = &pool[i];
		if (!s->bytes)
			continue;
		unsigned late;
		KVT_CHECK(model_verdict(s->bytes, s->len, &late) == R_ACCEPT, "model rejects seed %u "
			  "(%s): %s", i, cfg_str(&s->pcfg), late_names(late));
		KVT_CHECK(HGET(s->bytes, crc32c) == spec_crc(s->bytes, s->len), "seed %u crc", i);
	}
}

static void test_fuzz(void)
{
	const double el = ctx_run(DEFAULT_ITERS, MAX_FAILING_ITERS, run_iteration);
	char line[1200];
	size_t n = (size_t)snprintf(line, sizeof(line),
		"# fuzz_chunk: %llu iterations in %.1f s (%.0f/s), %llu seed pools (%llu seeds, %llu "
		"pinned; none/kivi/hadamard/oscar %llu/%llu/%llu/%llu); accepted %llu (same %llu, codes "
		"%llu, data %llu, struct %llu); rejected %llu:",
		(unsigned long long)st.iters, el, el > 0 ? (double)st.iters / el : 0.0,
		(unsigned long long)n_pools, (unsigned long long)n_pools * N_SEEDS,
		(unsigned long long)n_seeds_pinned, (unsigned long long)n_seeds_scheme[0],
		(unsigned long long)n_seeds_scheme[1], (unsigned long long)n_seeds_scheme[2],
		(unsigned long long)n_seeds_scheme[3], (unsigned long long)st.accepted,
		(unsigned long long)st.by_class[MC_SAME], (unsigned long long)st.by_class[MC_CODES],
		(unsigned long long)st.by_class[MC_DATA], (unsigned long long)st.by_class[MC_STRUCT],
		(unsigned long long)(st.iters - st.accepted));
	for (int r = R_LENGTH; r < R_COUNT && n < sizeof(line); r++)
		if (st.by_reason[r])
			n += (size_t)snprintf(line + n, sizeof(line) - n, " %s %llu", reasons[r].name,
					      (unsigned long long)st.by_reason[r]);
	printf("%s; through a sequence (append, fetch, attend, fork, truncate) %llu; %d failing "
	       "iterations\n", line, (unsigned long long)st.in_seq, failing_iters);
	n = 0;
	for (uint32_t k = 0; k < N_KINDS && n < sizeof(line); k++)
		n += (size_t)snprintf(line + n, sizeof(line) - n, "%s %s %llu/%llu", k ? "," : "",
				      kinds[k].name, (unsigned long long)st.kind_acc[k],
				      (unsigned long long)st.kind_n[k]);
	printf("# accepted/tried by mutation:%s\n", line);
}

static void replay_one(uint64_t it)
{
	verbose = true;
	run_iteration(it);
	ctx_clear();
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	kvt_test_init();
	avx2 = have_avx2();
	printf("# avx2 %s\n", avx2 ? "available" : "absent");
	ctx_catch_crashes();
	mbuf = xalloc(MUTANT_MAX_BYTES);
	const char *one = getenv("KVT_FUZZ_ITER");
	if (one && *one) {
		replay_one(strtoull(one, NULL, 0));
	} else {
		KVT_RUN(test_model_agrees_on_seeds);
		KVT_RUN(test_fuzz);
	}
	for (uint32_t i = 0; i < N_SEEDS; i++)
		seed_free(&pool[i]);
	free(mbuf);
	kvt_codec_set_isa(KVT_ISA_AUTO);
	return kvt_test_done();
}

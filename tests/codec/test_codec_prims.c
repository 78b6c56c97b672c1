/*
 * test_codec_prims.c - the codec's building blocks: f16/bf16 conversion, crc32c, the
 * Hadamard transform (OSCAR.md 7.1), the quantizer's edge cases (7.3), pack/unpack (7.4),
 * and every AVX2 kernel against its scalar twin, bit for bit.
 */
#include "codec_test_util.h"

static const struct kvt_codec_ops *paths[2];
static int n_paths;

static void test_f16_all_values(void)
{
	/* every f16 -> f32 -> f16 is the identity (NaNs stay NaN, quiet ones unchanged) */
	for (uint32_t h = 0; h < 65536; h++) {
		float f = kvt_f16_to_f32((uint16_t)h);
		uint16_t back = kvt_f32_to_f16(f);
		bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
		if (nan)
			KVT_CHECK((back & 0x7e00) == 0x7e00, "h=0x%04x nan back 0x%04x", h, back);
		else
			KVT_CHECK(back == h, "h=0x%04x -> %g -> 0x%04x", h, (double)f, back);
	}
	KVT_CHECK(kvt_f16_to_f32(0x0001) == 0x1p-24f, "smallest subnormal");
	KVT_CHECK(kvt_f16_to_f32(0x3c00) == 1.0f, "one");
	KVT_CHECK(kvt_f32_to_f16(65504.0f) == 0x7bff, "max");
	KVT_CHECK(kvt_f32_to_f16(65519.99f) == 0x7bff, "below rounding to inf");
	KVT_CHECK(kvt_f32_to_f16(65520.0f) == 0x7c00, "65520 rounds to inf");
	KVT_CHECK(kvt_f32_to_f16(-1e10f) == 0xfc00, "-inf");
	KVT_CHECK(kvt_f32_to_f16(0x1p-25f) == 0x0000, "2^-25 ties to even 0");
	KVT_CHECK(kvt_f32_to_f16(0x1.000002p-25f) == 0x0001, "just above 2^-25");
	KVT_CHECK(kvt_f32_to_f16(0x3p-25f) == 0x0002, "1.5 ulp ties to even 2");
	KVT_CHECK(kvt_f32_to_f16(1.0f + 0x1p-11f) == 0x3c00, "tie to even down");
	KVT_CHECK(kvt_f32_to_f16(1.0f + 0x3p-11f) == 0x3c02, "tie to even up");
	KVT_CHECK(kvt_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80, "bf16 tie down");
	KVT_CHECK(kvt_f32_to_bf16(1.0f + 0x3p-8f) == 0x3f82, "bf16 tie up");
	KVT_CHECK(isnan(kvt_bf16_to_f32(kvt_f32_to_bf16(NAN))), "bf16 NaN");
	KVT_CHECK(kvt_f32_to_bf16(INFINITY) == 0x7f80, "bf16 inf");
}

/* f32 -> f16 against a double-precision reference on random bit patterns */
static uint16_t f16_ref(float f)
{
	if (isnan(f))
		return kvt_f32_to_f16(f);
	double a = fabs((double)f);
	uint16_t sign = signbit(f) ? 0x8000 : 0;
	if (a >= 65520.0)
		return sign | 0x7c00;
	/* candidates: all f16 magnitudes bracketing a */
	uint16_t lo = 0, hi = 0x7c00;
	while (hi - lo > 1) {
		uint16_t mid = (uint16_t)((lo + hi) / 2);
		if ((double)kvt_f16_to_f32(mid) <= a)
			lo = mid;
		else
			hi = mid;
	}
	double dl = a - (double)kvt_f16_to_f32(lo), dh = (double)kvt_f16_to_f32(hi) - a;
	uint16_t r = dl < dh ? lo : dh < dl ? hi : (lo & 1) ? hi : lo;
	return sign | r;
}

static void test_f32_to_f16_random(void)
{
	for (int i = 0; i < 200000; i++) {
		uint32_t bits = (uint32_t)kvt_rand_u64();
		if (i & 1) /* concentrate on f16's range */
			bits = (bits & 0x807fffffu) | ((100u + kvt_rand_below(50)) << 23);
		float f = kvt_bits_f32(bits);
		uint16_t got = kvt_f32_to_f16(f), want = f16_ref(f);
		KVT_CHECK(got == want, "f=%a got 0x%04x want 0x%04x", (double)f, got, want);
		if (got != want)
			break;
	}
}

static void test_convert_paths_equal(void)
{
	if (n_paths < 2)
		return;
	enum { N = 4099 };
	static float src[N], back[2][N];
	static uint16_t h[2][N];
	for (int dt = KVT_DTYPE_F16; dt <= KVT_DTYPE_BF16; dt++) {
		for (int i = 0; i < N; i++) {
			uint32_t bits = (uint32_t)kvt_rand_u64();
			if (i % 3)
				bits = (bits & 0x807fffffu) | ((90u + kvt_rand_below(60)) << 23);
			src[i] = kvt_bits_f32(bits);
		}
		src[0] = NAN;
		src[1] = -INFINITY;
		src[2] = 0x1p-25f;
		src[3] = 65520.0f;
		for (int p = 0; p < 2; p++) {
			paths[p]->store_f32(src, h[p], (uint32_t)dt, N);
			paths[p]->load_f32(h[p], (uint32_t)dt, back[p], N);
		}
		KVT_CHECK(memcmp(h[0], h[1], sizeof(h[0])) == 0, "store_f32 %s differs",
			  kvt_dtype_name((uint32_t)dt));
		KVT_CHECK(memcmp(back[0], back[1], sizeof(back[0])) == 0, "load_f32 %s differs",
			  kvt_dtype_name((uint32_t)dt));
		for (int i = 0; i < N; i++)
			KVT_CHECK(h[0][i] == kvt_round16_bits(src[i], (uint32_t)dt),
				  "elem %d %a -> 0x%04x", i, (double)src[i], h[0][i]);
	}
}

static void test_crc32c(void)
{
	KVT_CHECK(kvt_crc32c(0, "123456789", 9) == 0xE3069283u, "check value 0x%08x",
		  kvt_crc32c(0, "123456789", 9));
	KVT_CHECK(kvt_crc32c_sw(0, "123456789", 9) == 0xE3069283u, "sw check value");
	uint8_t buf[5000];
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)kvt_rand_u64();
	for (int it = 0; it < 200; it++) {
		size_t off = kvt_rand_below(64), len = kvt_rand_below((uint32_t)(sizeof(buf) - off));
		uint32_t sw = kvt_crc32c_sw(0, buf + off, len);
		KVT_CHECK(kvt_crc32c(0, buf + off, len) == sw, "crc off %zu len %zu", off, len);
		if (kvt_crc32c_hw_available())
			KVT_CHECK(kvt_crc32c_hw(0, buf + off, len) == sw, "hw off %zu len %zu", off, len);
		size_t cut = len ? kvt_rand_below((uint32_t)len) : 0;
		KVT_CHECK(kvt_crc32c(kvt_crc32c(0, buf + off, cut), buf + off + cut, len - cut) == sw,
			  "incremental crc");
	}
	printf("# crc32c hardware path %s\n", kvt_crc32c_hw_available() ? "sse4.2" : "absent");
}

static void test_hadamard_matrix(void)
{
	static const uint32_t dims[] = {2, 4, 8, 16, 32, 64, 128, 256};
	static float m[256 * 256];
	for (size_t di = 0; di < sizeof(dims) / sizeof(dims[0]); di++) {
		uint32_t d = dims[di];
		for (int p = 0; p < n_paths; p++) {
			/* the rows of H are H applied to the unit vectors */
			memset(m, 0, sizeof(float) * d * d);
			for (uint32_t i = 0; i < d; i++)
				m[i * d + i] = 1.0f;
			if (d >= 8)
				paths[p]->fwht(m, d, d, kvt_inv_sqrt_dim(d));
			else
				kvt_hadamard_f32(m, d, d);
			double worst = 0, worst_hh = 0;
			for (uint32_t i = 0; i < d; i++)
				for (uint32_t j = 0; j < d; j++) {
					double want = (__builtin_popcount(i & j) & 1 ? -1.0 : 1.0) /
						      sqrt((double)d);
					worst = fmax(worst, fabs(m[i * d + j] - want));
				}
			/* H H = I */
			if (d >= 8)
				paths[p]->fwht(m, d, d, kvt_inv_sqrt_dim(d));
			else
				kvt_hadamard_f32(m, d, d);
			for (uint32_t i = 0; i < d; i++)
				for (uint32_t j = 0; j < d; j++)
					worst_hh = fmax(worst_hh, fabs(m[i * d + j] - (i == j)));
			KVT_CHECK(worst < 1e-6, "d %u path %s: |H - Sylvester/sqrt(d)| %g", d,
				  paths[p]->name, worst);
			KVT_CHECK(worst_hh < 1e-6, "d %u path %s: |HH - I| %g", d, paths[p]->name,
				  worst_hh);
		}
	}
}

static void test_hadamard_inner_products(void)
{
	float q[256], k[256];
	for (int it = 0; it < 100; it++) {
		uint32_t d = 8u << kvt_rand_below(6);
		fill_f32(q, d, 1.0f);
		fill_f32(k, d, 1.0f);
		double before = 0, after = 0, nq = 0;
		for (uint32_t i = 0; i < d; i++) {
			before += (double)q[i] * k[i];
			nq += (double)q[i] * q[i] + (double)k[i] * k[i];
		}
		kvt_rotate_queries(q, 1, d);
		kvt_hadamard_f32(k, 1, d);
		for (uint32_t i = 0; i < d; i++)
			after += (double)q[i] * k[i];
		KVT_CHECK(fabs(before - after) <= 1e-6 * nq, "d %u: <q,k> %g vs <Hq,Hk> %g", d,
			  before, after);
	}
}

static void test_kernels_paths_equal(void)
{
	if (n_paths < 2)
		return;
	static float x[2][64 * 256], y[2][256];
	for (int it = 0; it < 300; it++) {
		uint32_t d = 8u << kvt_rand_below(6), n = 1 + kvt_rand_below(16);
		fill_f32(x[0], (size_t)n * d, 3.0f);
		memcpy(x[1], x[0], sizeof(float) * n * d);
		float mult = kvt_rand_uniform() * 4.0f;
		for (int p = 0; p < 2; p++)
			paths[p]->fwht(x[p], n, d, mult);
		KVT_REQUIRE(memcmp(x[0], x[1], sizeof(float) * n * d) == 0, "fwht d %u differs", d);
		float s0 = paths[0]->sumsq(x[0], (size_t)n * d), s1 = paths[1]->sumsq(x[1], (size_t)n * d);
		KVT_CHECK(kvt_f32_bits(s0) == kvt_f32_bits(s1), "sumsq %a vs %a", (double)s0, (double)s1);
		float d0 = paths[0]->dot(x[0], x[0] + d, d), d1 = paths[1]->dot(x[1], x[1] + d, d);
		KVT_CHECK(kvt_f32_bits(d0) == kvt_f32_bits(d1), "dot %a vs %a", (double)d0, (double)d1);
		for (int p = 0; p < 2; p++)
			paths[p]->div(x[p], (size_t)n * d, 1.0f + mult);
		KVT_CHECK(memcmp(x[0], x[1], sizeof(float) * n * d) == 0, "div differs");
		for (int p = 0; p < 2; p++) {
			memcpy(y[p], x[p] + d * (n - 1), d * 4);
			paths[p]->axpy(y[p], x[p], mult, d);
		}
		KVT_CHECK(memcmp(y[0], y[1], d * 4) == 0, "axpy differs");
	}
}

/* quantize one row through a path, dequantize it again; returns codes and decoded values */
static void quant_row(const struct kvt_codec_ops *ops, const float *x, uint32_t d, uint32_t gv,
		      uint32_t bits, uint32_t sdt, uint8_t *codes, float *dec, uint16_t *s,
		      uint16_t *z)
{
	uint8_t packed[256];
	ops->quant_rows(x, d, 1, NULL, d, gv, bits, sdt, s, z, codes);
	ops->pack(codes, d, bits, packed);
	ops->dequant_grp(packed, d, bits, gv, s, z, sdt, dec);
}

static void test_quantizer_edges(void)
{
	const uint32_t d = 64, gv = 32;
	float x[64], dec[64];
	uint8_t codes[64];
	uint16_t s[2], z[2];
	for (int p = 0; p < n_paths; p++) {
		const struct kvt_codec_ops *ops = paths[p];
		for (uint32_t sdt = KVT_DTYPE_F16; sdt <= KVT_DTYPE_BF16; sdt++) {
			/* on the grid: values in {0,1,2,3} (and a shifted, scaled grid) round-trip */
			for (uint32_t i = 0; i < d; i++)
				x[i] = (float)(i % 4 == 0 ? 0 : i % 4 == 1 ? 3 : kvt_rand_below(4));
			for (uint32_t i = gv; i < d; i++)
				x[i] = 0.5f * x[i] - 1.0f;
			quant_row(ops, x, d, gv, 2, sdt, codes, dec, s, z);
			KVT_CHECK(memcmp(x, dec, sizeof(x)) == 0, "%s: on-grid group not exact",
				  ops->name);
			for (uint32_t i = 0; i < gv; i++)
				KVT_CHECK(codes[i] == (uint8_t)x[i], "on-grid code %u", i);
			/* all zero -> exact zeros; constant -> exact */
			for (uint32_t i = 0; i < d; i++)
				x[i] = i < gv ? 0.0f : 3.25f;
			quant_row(ops, x, d, gv, 2, sdt, codes, dec, s, z);
			KVT_CHECK(memcmp(x, dec, sizeof(x)) == 0, "%s: zero/constant group not exact",
				  ops->name);
			KVT_CHECK(s[1] == 0, "constant group scale 0");
			/* all-zero groups quantize as [-1, 1]: zero sits on the grid (f16: code 2) */
			for (uint32_t i = 0; i < d; i++)
				KVT_CHECK(i < gv ? (sdt == KVT_DTYPE_BF16 || codes[i] == 2) : codes[i] == 0,
					  "zero/constant code %u = %u", i, codes[i]);
			/* ties go to even: grid 0..3 step 1, values at k + 0.5 */
			const float tie[8] = {0.0f, 3.0f, 0.5f, 1.5f, 2.5f, 1.0f, 2.0f, 0.0f};
			const uint8_t want[8] = {0, 3, 0, 2, 2, 1, 2, 0};
			for (uint32_t i = 0; i < d; i++)
				x[i] = tie[i % 8];
			quant_row(ops, x, d, gv, 2, sdt, codes, dec, s, z);
			for (uint32_t i = 0; i < d; i++)
				KVT_CHECK(codes[i] == want[i % 8], "%s tie: x %g code %u want %u",
					  ops->name, (double)x[i], codes[i], want[i % 8]);
			/* 3 bits (qmax 7): an on-grid group round-trips with its codes, ties to
			 * even on the grid 0..7 step 1, and an all-zero group decodes to exact 0
			 * (range [-1, 1], zq = rint(3.5) = 4: zero is code 4 in f16) */
			for (uint32_t i = 0; i < d; i++)
				x[i] = (float)(i % 8 == 0 ? 0 : i % 8 == 1 ? 7 : kvt_rand_below(8));
			quant_row(ops, x, d, gv, 3, sdt, codes, dec, s, z);
			KVT_CHECK(memcmp(x, dec, sizeof(x)) == 0, "%s: 3-bit on-grid group not exact",
				  ops->name);
			for (uint32_t i = 0; i < d; i++)
				KVT_CHECK(codes[i] == (uint8_t)x[i], "3-bit on-grid code %u", i);
			const float tie3[8] = {0.0f, 7.0f, 0.5f, 1.5f, 2.5f, 3.5f, 4.5f, 6.5f};
			const uint8_t want3[8] = {0, 7, 0, 2, 2, 4, 4, 6};
			for (uint32_t i = 0; i < d; i++)
				x[i] = tie3[i % 8];
			quant_row(ops, x, d, gv, 3, sdt, codes, dec, s, z);
			for (uint32_t i = 0; i < d; i++)
				KVT_CHECK(codes[i] == want3[i % 8], "%s 3-bit tie: x %g code %u want %u",
					  ops->name, (double)x[i], codes[i], want3[i % 8]);
			for (uint32_t i = 0; i < d; i++)
				x[i] = i < gv ? 0.0f : -2.5f;
			quant_row(ops, x, d, gv, 3, sdt, codes, dec, s, z);
			KVT_CHECK(memcmp(x, dec, sizeof(x)) == 0,
				  "%s: 3-bit zero/constant group not exact", ops->name);
			for (uint32_t i = 0; i < d; i++)
				KVT_CHECK(i < gv ? (sdt == KVT_DTYPE_BF16 || codes[i] == 4) : codes[i] == 0,
					  "3-bit zero/constant code %u = %u", i, codes[i]);
			/* one-signed groups: zero point outside [0, qmax], error within a step */
			for (int sign = -1; sign <= 1; sign += 2)
				for (uint32_t bi = 0; bi < KVT_TEST_N_BITS; bi++) {
					const uint32_t bits = kvt_test_bits[bi];
					for (uint32_t i = 0; i < d; i++)
						x[i] = (float)sign * (5.0f + kvt_rand_uniform());
					quant_row(ops, x, d, gv, bits, sdt, codes, dec, s, z);
					for (uint32_t i = 0; i < d; i++) {
						float step = kvt_widen16(s[i / gv], sdt);
						float bound = quant_bound(step, kvt_widen16(z[i / gv], sdt),
									  bits, sdt, x[i]);
						KVT_CHECK(codes[i] < (1u << bits), "code range");
						KVT_CHECK(fabsf(dec[i] - x[i]) <= bound,
							  "%s sign %d bits %u: |%g - %g| > step %g",
							  ops->name, sign, bits, (double)dec[i],
							  (double)x[i], (double)step);
					}
				}
		}
	}
	/* clamping: codes outside the grid saturate */
	KVT_CHECK(kvt_qcode(10.0f, 1.0f, 0.0f, 3.0f) == 3, "clamp high");
	KVT_CHECK(kvt_qcode(-5.0f, 1.0f, 0.0f, 3.0f) == 0, "clamp low");
	KVT_CHECK(kvt_qcode(10.0f, 1.0f, 0.0f, 7.0f) == 7, "clamp high at 3 bits");
	KVT_CHECK(kvt_qcode(6.6f, 1.0f, 0.0f, 7.0f) == 7 && kvt_qcode(6.4f, 1.0f, 0.0f, 7.0f) == 6,
		  "3-bit rounding near qmax");
	KVT_CHECK(kvt_qcode(7.0f, 0.0f, 7.0f, 3.0f) == 0, "constant group code");
}

static void test_quantizer_random_paths_equal(void)
{
	static float x[128 * 256];
	static uint8_t c[2][128 * 256];
	uint16_t s[2][256], z[2][256];
	for (int it = 0; it < 400; it++) {
		uint32_t d = 64u << kvt_rand_below(3), bits = random_bits();
		uint32_t sdt = 1 + kvt_rand_below(2), ntok = 32u << kvt_rand_below(3);
		uint32_t gv = 32u << kvt_rand_below(3);
		if (gv > d)
			gv = d;
		float amp = kvt_rand_below(4) == 0 ? 1e-6f : 1.0f;
		fill_f32(x, (size_t)ntok * d, amp);
		if (kvt_rand_below(4) == 0)
			for (size_t i = 0; i < (size_t)ntok * d; i++)
				x[i] = fabsf(x[i]) + 1.0f; /* all positive */
		if (kvt_rand_below(8) == 0)
			for (size_t i = 0; i < (size_t)ntok * d; i += 7)
				x[i] = 0.0f;
		uint8_t pin[128];
		for (uint32_t t = 0; t < ntok; t++)
			pin[t] = kvt_rand_below(10) == 0;
		if (kvt_rand_below(10) == 0)
			memset(pin, 1, ntok);
		float qmax = (float)((1u << bits) - 1);
		for (int p = 0; p < n_paths; p++)
			paths[p]->quant_cols(x, d, ntok, pin, d, bits, sdt, s[p], z[p], c[p]);
		if (n_paths == 2) {
			KVT_CHECK(memcmp(s[0], s[1], d * 2) == 0 && memcmp(z[0], z[1], d * 2) == 0,
				  "quant_cols params differ");
			KVT_CHECK(memcmp(c[0], c[1], (size_t)ntok * d) == 0, "quant_cols codes differ");
		}
		/* every unpinned element within one step; pinned code 0 */
		for (uint32_t t = 0; t < ntok; t++)
			for (uint32_t ch = 0; ch < d; ch++) {
				uint8_t code = c[0][t * d + ch];
				if (pin[t]) {
					KVT_CHECK(code == 0, "pinned code");
					continue;
				}
				float sf = kvt_widen16(s[0][ch], sdt), zf = kvt_widen16(z[0][ch], sdt);
				float dec = (float)code * sf + zf, v = x[t * d + ch];
				KVT_CHECK(code <= qmax, "code %u > qmax", code);
				if (sf == 0.0f)
					continue; /* underflowed scale: a constant group by rule */
				KVT_CHECK(fabsf(dec - v) <= quant_bound(sf, zf, bits, sdt, v),
					  "cols: |%g - %g| > step %g (bits %u)", (double)dec, (double)v,
					  (double)sf, bits);
			}
		static uint16_t rs[2][128 * 8], rz[2][128 * 8];
		for (int p = 0; p < n_paths; p++)
			paths[p]->quant_rows(x, d, ntok, pin, d, gv, bits, sdt, rs[p], rz[p], c[p]);
		size_t np = (size_t)ntok * (d / gv);
		if (n_paths == 2)
			KVT_CHECK(memcmp(rs[0], rs[1], np * 2) == 0 && memcmp(rz[0], rz[1], np * 2) == 0 &&
					  memcmp(c[0], c[1], (size_t)ntok * d) == 0,
				  "quant_rows differ");
		for (uint32_t t = 0; t < ntok; t++)
			for (uint32_t ch = 0; ch < d; ch++) {
				size_t pi = (size_t)t * (d / gv) + ch / gv;
				uint8_t code = c[0][t * d + ch];
				float sf = kvt_widen16(rs[0][pi], sdt), zf = kvt_widen16(rz[0][pi], sdt);
				if (pin[t]) {
					KVT_CHECK(code == 0 && rs[0][pi] == 0 && rz[0][pi] == 0, "pinned row");
					continue;
				}
				float dec = (float)code * sf + zf, v = x[t * d + ch];
				if (sf == 0.0f)
					continue;
				KVT_CHECK(fabsf(dec - v) <= quant_bound(sf, zf, bits, sdt, v),
					  "rows: |%g - %g| > bound (step %g, bits %u)", (double)dec,
					  (double)v, (double)sf, bits);
			}
		if (kvt_test_failures)
			return;
	}
}

static void test_pack_unpack(void)
{
	uint8_t codes[256], packed[2][256];
	float back[2][256], s[256], z[256];
	for (uint32_t i = 0; i < 256; i++) {
		s[i] = 1.0f;
		z[i] = 0.0f;
	}
	for (int it = 0; it < 300; it++) {
		uint32_t bits = random_bits(), d = 64u << kvt_rand_below(3);
		for (uint32_t i = 0; i < d; i++)
			codes[i] = (uint8_t)kvt_rand_below(1u << bits);
		for (int p = 0; p < n_paths; p++) {
			paths[p]->pack(codes, d, bits, packed[p]);
			paths[p]->unpack_f32(packed[p], d, bits, back[p]);
			for (uint32_t i = 0; i < d; i++) {
				uint32_t got = packed_code(packed[p], i, bits, d);
				KVT_CHECK(got == codes[i], "bit position of channel %u (bits %u)", i, bits);
				KVT_CHECK(back[p][i] == (float)codes[i], "%s unpack %u bits %u",
					  paths[p]->name, i, bits);
			}
			paths[p]->dequant_ch(packed[p], d, bits, s, z, back[p]);
			for (uint32_t i = 0; i < d; i++)
				KVT_CHECK(back[p][i] == (float)codes[i], "dequant_ch identity");
		}
		if (n_paths == 2)
			KVT_CHECK(memcmp(packed[0], packed[1], d * bits / 8) == 0, "pack differs");
		if (kvt_test_failures)
			return;
	}
}

static void test_attend_kernels(void)
{
	/* dot_rows == dot per row, accum_grp == dequant_grp + axpy per row, on every path */
	static float w[9 * 256], acc[2][9 * 256], acc0[9 * 256], p[9 * 3], x[256], want[9];
	uint8_t packed[256];
	uint16_t s16[8], z16[8];
	for (int it = 0; it < 500; it++) {
		uint32_t d = 64u << kvt_rand_below(3), nr = 1 + kvt_rand_below(9);
		uint32_t bits = random_bits(), gv = 32u << kvt_rand_below(3);
		uint32_t sdt = 1 + kvt_rand_below(2);
		if (gv > d)
			gv = d;
		fill_f32(w, (size_t)nr * d, 1.0f);
		fill_f32(x, d, 1.0f);
		fill_f32(acc0, (size_t)nr * d, 1.0f);
		fill_f32(p, (size_t)nr * 3, 1.0f);
		for (uint32_t i = 0; i < d * bits / 8; i++)
			packed[i] = (uint8_t)kvt_rand_u64();
		for (int g = 0; g < 8; g++) {
			s16[g] = kvt_round16_bits(kvt_rand_uniform() * 0.1f, sdt);
			z16[g] = kvt_round16_bits(kvt_rand_normal(), sdt);
		}
		for (uint32_t i = 0; i < nr; i++)
			want[i] = kvt_codec_ops_scalar.dot(w + i * d, x, d);
		float v[256];
		kvt_codec_ops_scalar.dequant_grp(packed, d, bits, gv, s16, z16, sdt, v);
		memcpy(acc[1], acc0, (size_t)nr * d * 4);
		for (uint32_t i = 0; i < nr; i++)
			kvt_codec_ops_scalar.axpy(acc[1] + i * d, v, p[i * 3], d);
		for (int q = 0; q < n_paths; q++) {
			float got[9];
			paths[q]->dot_rows(w, d, nr, x, d, got);
			KVT_CHECK(memcmp(got, want, nr * 4) == 0, "%s dot_rows d %u nr %u", paths[q]->name,
				  d, nr);
			memcpy(acc[0], acc0, (size_t)nr * d * 4);
			paths[q]->accum_grp(packed, d, bits, gv, s16, z16, sdt, p, 3, nr, acc[0], d);
			KVT_CHECK(memcmp(acc[0], acc[1], (size_t)nr * d * 4) == 0,
				  "%s accum_grp d %u nr %u", paths[q]->name, d, nr);
		}
		if (kvt_test_failures)
			return;
	}
}

static void test_decode_row_paths(void)
{
	/* the fused row decoder equals dequant + fwht + store on every path, bit for bit */
	uint8_t packed[256];
	float s_ch[256], z_ch[256], tmp[256];
	uint16_t s16[8], z16[8], s16c[256], z16c[256];
	uint8_t want[1024], got[2][1024];
	for (int it = 0; it < 2000; it++) {
		uint32_t d = 64u << kvt_rand_below(3), bits = random_bits();
		uint32_t gv = 32u << kvt_rand_below(3), sdt = 1 + kvt_rand_below(2);
		uint32_t odt = 1 + kvt_rand_below(3);
		if (gv > d)
			gv = d;
		bool rot = kvt_rand_below(2), per_ch = kvt_rand_below(2);
		float mult = kvt_rand_uniform() * 3.0f;
		for (uint32_t i = 0; i < d * bits / 8; i++)
			packed[i] = (uint8_t)kvt_rand_u64();
		for (uint32_t c = 0; c < d; c++) {
			s16c[c] = kvt_round16_bits(kvt_rand_uniform() * 0.1f, sdt);
			z16c[c] = kvt_round16_bits(kvt_rand_normal(), sdt);
			s_ch[c] = kvt_widen16(s16c[c], sdt);
			z_ch[c] = kvt_widen16(z16c[c], sdt);
		}
		for (uint32_t g = 0; g < 8; g++) {
			s16[g] = kvt_round16_bits(kvt_rand_uniform() * 0.1f, sdt);
			z16[g] = kvt_round16_bits(kvt_rand_normal(), sdt);
		}
		if (per_ch)
			kvt_codec_ops_scalar.dequant_ch(packed, d, bits, s_ch, z_ch, tmp);
		else
			kvt_codec_ops_scalar.dequant_grp(packed, d, bits, gv, s16, z16, sdt, tmp);
		if (rot)
			kvt_codec_ops_scalar.fwht(tmp, 1, d, mult);
		kvt_codec_ops_scalar.store_f32(tmp, want, odt, d);
		for (int p = 0; p < n_paths; p++) {
			paths[p]->decode_row(packed, d, bits, per_ch ? 1 : gv, per_ch ? s16c : s16,
					     per_ch ? z16c : z16, sdt, rot, mult, got[p], odt);
			KVT_CHECK(memcmp(got[p], want, d * kvt_dtype_size(odt)) == 0,
				  "%s decode_row d %u bits %u gv %u rot %d per_ch %d odt %u",
				  paths[p]->name, d, bits, gv, rot, per_ch, odt);
		}
		if (kvt_test_failures)
			return;
	}
}

static void test_isa_control(void)
{
	KVT_CHECK(kvt_codec_set_isa(KVT_ISA_SCALAR) == 0, "scalar always available");
	KVT_CHECK(kvt_codec_active_isa() == KVT_ISA_SCALAR, "forced scalar");
	KVT_CHECK(kvt_codec_ops_get() == &kvt_codec_ops_scalar, "scalar table");
	int rc = kvt_codec_set_isa(KVT_ISA_AVX2);
	KVT_CHECK(rc == 0 || rc == -ENOTSUP, "avx2 rc %d", rc);
	KVT_CHECK(kvt_codec_set_isa((enum kvt_isa)7) == -EINVAL, "bad isa");
	KVT_CHECK(kvt_codec_set_isa(KVT_ISA_AUTO) == 0, "auto");
	printf("# active isa: %s\n", kvt_codec_ops_get()->name);
}

int main(void)
{
	kvt_test_init();
	paths[n_paths++] = &kvt_codec_ops_scalar;
#ifdef KVT_HAVE_AVX2_BUILD
	if (have_avx2())
		paths[n_paths++] = &kvt_codec_ops_avx2;
	else
#endif
		printf("# no AVX2+F16C on this CPU: scalar path only\n");
	KVT_RUN(test_f16_all_values);
	KVT_RUN(test_f32_to_f16_random);
	KVT_RUN(test_convert_paths_equal);
	KVT_RUN(test_crc32c);
	KVT_RUN(test_hadamard_matrix);
	KVT_RUN(test_hadamard_inner_products);
	KVT_RUN(test_kernels_paths_equal);
	KVT_RUN(test_quantizer_edges);
	KVT_RUN(test_quantizer_random_paths_equal);
	KVT_RUN(test_pack_unpack);
	KVT_RUN(test_decode_row_paths);
	KVT_RUN(test_attend_kernels);
	KVT_RUN(test_isa_control);
	return kvt_test_done();
}

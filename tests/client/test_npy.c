/*
 * test_npy.c - client/kvt_npy.c on fixed cases: the headers the old readers took and must
 * not (each refusal's message names the field and the limit), the files numpy writes
 * (made at test time by the Python in KVTIER_PYTHON, when it has numpy: no binary
 * fixtures), and what kvt_npy_write writes, loaded back by numpy. fuzz_npy covers the rest.
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvt_codec.h"
#include "kvt_npy.h"
#include "kvt_test.h"

static char dir[256];

/* Writes preamble + dict + space padding + '\n' + data bytes of value 0 to name. */
static void write_npy(const char *name, int version, const char *dict, size_t data_bytes)
{
	char path[512];
	const size_t pre = version == 1 ? 10 : 12, n = strlen(dict);
	size_t h = n + 1;
	while ((pre + h) % 64)
		h++;
	uint8_t *b = calloc(1, pre + h + data_bytes);
	memcpy(b, "\x93NUMPY", 6);
	b[6] = (uint8_t)version;
	for (size_t i = 0; i < pre - 8; i++)
		b[8 + i] = (uint8_t)(h >> (8 * i));
	memcpy(b + pre, dict, n);
	memset(b + pre + n, ' ', h - n - 1);
	b[pre + h - 1] = '\n';
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	KVT_CHECK(f && fwrite(b, 1, pre + h + data_bytes, f) == pre + h + data_bytes &&
		  fclose(f) == 0, "cannot write %s", path);
	free(b);
}

struct rcase {
	const char *what, *dict;
	size_t data_bytes;
	const char *want; /* in the message; NULL: accepted */
};

/* Each case through both readers: accepted with the data size the dict says, or refused
 * with a message containing want and no data. */
static void test_headers(void)
{
	static const struct rcase cases[] = {
		{ "numpy's own 2-D", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
		  24, NULL },
		{ "rank 0", "{'descr': '<f2', 'fortran_order': False, 'shape': (), }", 2, NULL },
		{ "double quotes, no spaces, no trailing comma",
		  "{\"shape\":(3,),\"fortran_order\":False,\"descr\":\"<f8\"}", 24, NULL },
		{ "a zero dim beside a 2^40 one",
		  "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 1099511627776), }", 0, NULL },
		/* kvtctl_npy multiplied these in 64 bits: 2^64 wraps to 0, and 0 data bytes passed */
		{ "a dim of 2^63", "{'descr': '<f4', 'fortran_order': False, "
		  "'shape': (9223372036854775808, 2), }", 0,
		  "shape[0] 9223372036854775808 is over the limit of 2^40" },
		{ "a product of 2^64", "{'descr': '<f4', 'fortran_order': False, "
		  "'shape': (4294967296, 4294967296), }", 0,
		  "has more elements than the limit of 2^40" },
		{ "a product over 2^40", "{'descr': '<f2', 'fortran_order': False, "
		  "'shape': (1048576, 1048576, 2), }", 0, "more elements than the limit of 2^40" },
		{ "a dim of -1 beside a 0", "{'descr': '<f4', 'fortran_order': False, "
		  "'shape': (0, -1), }", 0, "shape[1]: expected a decimal integer, found '-1" },
		{ "a dim of +3", "{'descr': '<f4', 'fortran_order': False, 'shape': (+3,), }", 12,
		  "shape[0]: expected a decimal integer, found '+3" },
		{ "a zero-padded dim", "{'descr': '<f4', 'fortran_order': False, 'shape': (03,), }",
		  12, "shape[0] '03' has a leading zero" },
		{ "(3) is an int", "{'descr': '<f4', 'fortran_order': False, 'shape': (3), }", 12,
		  "shape (3) is not a tuple" },
		{ "9 dims", "{'descr': '<f4', 'fortran_order': False, "
		  "'shape': (1, 1, 1, 1, 1, 1, 1, 1, 1), }", 4, "more than 8 dimensions" },
		{ "Falsey", "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (3,), }", 12,
		  "fortran_order is not True or False: found 'Falsey" },
		{ "Fortran order", "{'descr': '<f4', 'fortran_order': True, 'shape': (3,), }", 12,
		  "fortran_order True: the data must be in C order" },
		/* kvtctl_npy's strstr found 'shape' inside x's value first and read (1,) */
		{ "a key inside a value", "{'x': \"'shape': (1,)\", 'descr': '<f4', "
		  "'fortran_order': False, 'shape': (), }", 4, "unknown key 'x'" },
		{ "a duplicate key", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), "
		  "\"shape\": (3,)}", 12, "key 'shape' appears twice" },
		{ "a missing key", "{'descr': '<f4', 'shape': (3,)}", 12,
		  "header has no 'fortran_order' key" },
		{ "big-endian", "{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }", 12,
		  "descr '>f4' is big-endian" },
		{ "an integer dtype", "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }", 12,
		  "descr '<i4' is not '<f2', '<f4' or '<f8'" },
		{ "junk after the dict", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)} x",
		  12, "'x' after the dict" },
		{ "a tab", "{'descr': '<f4',\t'fortran_order': False, 'shape': (3,)}", 12,
		  "expected a quoted string, found '\\x09" },
		{ "one element short", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}", 8,
		  "holds 8 data bytes after its 128-byte header; shape (3,) of '<f4' needs 12" },
		{ "one byte long", "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2)}", 9,
		  "holds 9 data bytes after its 128-byte header; shape (2, 2) of '<f2' needs 8" },
	};
	char path[512], err[256];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct rcase *c = &cases[i];
		write_npy("h.npy", 1, c->dict, c->data_bytes);
		snprintf(path, sizeof(path), "%s/h.npy", dir);
		for (int f32 = 0; f32 < 2; f32++) {
			struct kvt_npy a;
			err[0] = 0;
			int rc = f32 ? kvt_npy_read_f32(path, &a, err, sizeof(err))
				     : kvt_npy_read(path, &a, err, sizeof(err));
			bool f8 = !f32 && strstr(c->dict, "<f8");
			if (!c->want && !f8) {
				KVT_CHECK(rc == 0 && a.count * a.elem_bytes == c->data_bytes,
					  "%s (%s): rc %d '%s'", c->what, f32 ? "f32" : "raw", rc, err);
			} else {
				const char *want = c->want ? c->want : "is not '<f2' or '<f4'";
				KVT_CHECK(rc == -EINVAL && a.data == NULL && strstr(err, want) &&
					  strstr(err, path), "%s (%s): rc %d '%s', want '%s'", c->what,
					  f32 ? "f32" : "raw", rc, err, want);
			}
			kvt_npy_free(&a);
		}
	}
}

static void test_preamble(void)
{
	char path[512], err[256];
	struct kvt_npy a;
	const char *d = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";

	snprintf(path, sizeof(path), "%s/p.npy", dir);
	for (int v = 2; v <= 3; v++) {
		write_npy("p.npy", v, d, 8);
		int rc = kvt_npy_read(path, &a, err, sizeof(err));
		KVT_CHECK(rc == 0 && a.version == (uint32_t)v && a.data_offset == 128 && a.count == 2,
			  "version %d.0: rc %d '%s'", v, rc, err);
		kvt_npy_free(&a);
	}
	uint8_t b[80];
	memset(b, ' ', sizeof(b));
	memcpy(b, "\x93NUMPY\x01\x01\x46\x00", 10);
	int rc = kvt_npy_parse_header(b, sizeof(b), "v.npy", &a, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "v.npy: .npy format version 1.1 is not 1.0"),
		  "version 1.1: rc %d '%s'", rc, err);
	memcpy(b, "\x93NUMPY\x02\x00\x00\x00\x01\x00", 12);
	rc = kvt_npy_parse_header(b, sizeof(b), "l.npy", &a, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "header length 65536 is over the limit of 65535"),
		  "header length 65536: rc %d '%s'", rc, err);
	memcpy(b, "\x93NUMPY\x01\x00\x46\x00", 10);
	rc = kvt_npy_parse_header(b, 40, "t.npy", &a, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "40 bytes: shorter than its header, which ends at "
		  "byte 80"), "truncated header: rc %d '%s'", rc, err);
	rc = kvt_npy_parse_header("\x93NUMPX", 6, "m.npy", &a, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "not a .npy file"), "magic: rc %d '%s'", rc, err);
}

/* ---- numpy, when there is one ------------------------------------------------------------ */

/* numpy writes the arrays (value i of a flat array: i * 0.5 - 3), kvt_npy reads them; then
 * kvt_npy writes, and numpy loads them and compares with np.save's header for the same array
 * (padding aside). */
static const char *const py_script =
	"import sys, io, numpy as np\n"
	"d, mode = sys.argv[1], sys.argv[2]\n"
	"shapes = [(), (3,), (2, 3), (0, 5), (2, 3, 4, 5)]\n"
	"def val(s, dt): return (np.arange(int(np.prod(s))) * 0.5 - 3).reshape(s).astype(dt)\n"
	"if mode == 'write':\n"
	"    for i, s in enumerate(shapes):\n"
	"        for dt in ('f2', 'f4', 'f8'):\n"
	"            for v in (1, 2, 3):\n"
	"                with open(f'{d}/np_{i}_{dt}_{v}.npy', 'wb') as f:\n"
	"                    np.lib.format.write_array(f, val(s, '<' + dt), version=(v, 0))\n"
	"    np.save(f'{d}/np_big.npy', val((2, 3), '>f4'))\n"
	"    np.save(f'{d}/np_fortran.npy', np.asfortranarray(val((2, 3), 'f4')))\n"
	"else:\n"
	"    for i, s in enumerate(shapes):\n"
	"        for dt in ('f2', 'f4'):\n"
	"            p = f'{d}/kvt_{i}_{dt}.npy'\n"
	"            a = np.load(p)\n"
	"            assert a.dtype == np.dtype('<' + dt) and a.shape == s, (p, a.dtype, a.shape)\n"
	"            assert np.array_equal(a, val(s, dt)), p\n"
	"            b = io.BytesIO(); np.save(b, a); ref = b.getvalue()\n"
	"            ours = open(p, 'rb').read()\n"
	"            n = a.nbytes\n"
	"            assert n == 0 or ours[-n:] == ref[-n:], p\n"
	"            assert ours[10:].split(b'\\n')[0].rstrip() == ref[10:].split(b'\\n')[0].rstrip(), p\n"
	"    print('# numpy loaded every kvt_npy_write file')\n";

static const uint64_t np_shapes[][4] = { { 0 }, { 3 }, { 2, 3 }, { 0, 5 }, { 2, 3, 4, 5 } };
static const uint32_t np_ndims[] = { 0, 1, 2, 2, 4 };

static uint64_t count_of(uint32_t s)
{
	uint64_t c = 1;
	for (uint32_t i = 0; i < np_ndims[s]; i++)
		c *= np_shapes[s][i];
	return c;
}

static int run_py(const char *py, const char *mode)
{
	char cmd[1200];
	snprintf(cmd, sizeof(cmd), "'%s' '%s/t.py' '%s' %s", py, dir, dir, mode);
	return system(cmd);
}

static void test_numpy(void)
{
	const char *py = getenv("KVTIER_PYTHON");
	char path[512], err[256];

	if (!py || !*py || access(py, X_OK) != 0) {
		printf("# no KVTIER_PYTHON: numpy interop not checked\n");
		return;
	}
	snprintf(path, sizeof(path), "%s/t.py", dir);
	FILE *f = fopen(path, "w");
	KVT_REQUIRE(f && fputs(py_script, f) >= 0 && fclose(f) == 0, "cannot write %s", path);
	KVT_REQUIRE(run_py(py, "write") == 0, "%s could not write the numpy files", py);

	for (uint32_t s = 0; s < 5; s++) {
		const uint64_t n = count_of(s);
		for (uint32_t e = 2; e <= 8; e *= 2) {
			for (int v = 1; v <= 3; v++) {
				struct kvt_npy r, a;
				snprintf(path, sizeof(path), "%s/np_%u_f%u_%d.npy", dir, s, e, v);
				int rc = kvt_npy_read_f32(path, &a, err, sizeof(err));
				KVT_CHECK(rc == 0 && a.ndim == np_ndims[s] && a.count == n &&
					  a.version == (uint32_t)v && a.elem_bytes == e &&
					  !memcmp(a.shape, np_shapes[s], np_ndims[s] * 8),
					  "%s: rc %d '%s'", path, rc, err);
				for (uint64_t i = 0; rc == 0 && i < n; i++)
					KVT_CHECK(((float *)a.data)[i] == (float)i * 0.5f - 3.0f,
						  "%s: [%llu] = %g", path, (unsigned long long)i,
						  (double)((float *)a.data)[i]);
				kvt_npy_free(&a);
				rc = kvt_npy_read(path, &r, err, sizeof(err));
				if (e == 8) {
					KVT_CHECK(rc == -EINVAL && strstr(err, "'<f8' is not '<f2' or "
						  "'<f4'"), "%s: rc %d '%s'", path, rc, err);
				} else {
					KVT_CHECK(rc == 0 && r.dtype == (e == 2 ? KVT_DTYPE_F16
						  : KVT_DTYPE_F32) && r.n_bytes == n * e,
						  "%s: rc %d '%s'", path, rc, err);
				}
				kvt_npy_free(&r);
			}
		}
	}
	static const struct {
		const char *name, *want;
	} refused[] = { { "np_big.npy", "descr '>f4' is big-endian" },
			{ "np_fortran.npy", "fortran_order True" } };
	for (size_t i = 0; i < 2; i++) {
		struct kvt_npy a;
		snprintf(path, sizeof(path), "%s/%s", dir, refused[i].name);
		int rc = kvt_npy_read_f32(path, &a, err, sizeof(err));
		KVT_CHECK(rc == -EINVAL && strstr(err, refused[i].want), "%s: rc %d '%s'", path, rc,
			  err);
	}

	/* what kvt_npy_write writes, for numpy to load */
	for (uint32_t s = 0; s < 5; s++) {
		const uint64_t n = count_of(s);
		float *x = malloc(n * 4 + 4);
		uint16_t *h = malloc(n * 2 + 2);
		for (uint64_t i = 0; i < n; i++) {
			x[i] = (float)i * 0.5f - 3.0f;
			h[i] = kvt_f32_to_f16(x[i]);
		}
		snprintf(path, sizeof(path), "%s/kvt_%u_f2.npy", dir, s);
		int rc = kvt_npy_write(path, KVT_DTYPE_F16, np_ndims[s], np_shapes[s], h, err,
				       sizeof(err));
		KVT_CHECK(rc == 0, "%s: rc %d '%s'", path, rc, err);
		snprintf(path, sizeof(path), "%s/kvt_%u_f4.npy", dir, s);
		rc = kvt_npy_write(path, KVT_DTYPE_F32, np_ndims[s], np_shapes[s], x, err,
				   sizeof(err));
		KVT_CHECK(rc == 0, "%s: rc %d '%s'", path, rc, err);
		free(x);
		free(h);
	}
	KVT_CHECK(run_py(py, "load") == 0, "numpy refused or misread a kvt_npy_write file "
		  "(its assertion is above)");
}

static void test_write_limits(void)
{
	char path[512], err[256];
	uint64_t shape[9] = { 1, 1, 1, 1, 1, 1, 1, 1, 1 };
	float x = 0;

	snprintf(path, sizeof(path), "%s/w.npy", dir);
	int rc = kvt_npy_write(path, KVT_DTYPE_F32, 9, shape, &x, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "9 dimensions are over the limit of 8"),
		  "9 dims: rc %d '%s'", rc, err);
	shape[0] = 1ull << 41;
	shape[1] = 0;
	rc = kvt_npy_write(path, KVT_DTYPE_F32, 2, shape, &x, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "shape[0] 2199023255552 is over the limit"),
		  "a dim over 2^40: rc %d '%s'", rc, err);
	rc = kvt_npy_write(path, KVT_DTYPE_BF16, 1, shape + 2, &x, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "is not f16 or f32"), "bf16: rc %d '%s'", rc,
		  err);
}

/* kvt_npy_nbytes: what kvtierctl get allocates for a shape from the daemon and the user's
 * range. Its old product, (size_t)(l * t * h * d) * 2, wrapped: (2^32, 2^32, 1, 1) f16 gave 0
 * bytes, (1, 2^62, 1, 4) f16 gave 0, (1, 2^61 + 1, 2, 4) f32 gave 32. */
static void test_nbytes(void)
{
	char err[256];
	size_t n = 7;
	static const uint64_t ok[4] = { 32, 4096, 8, 128 }, zero[4] = { 32, 0, 8, 1ull << 40 },
			      limit[4] = { 1, 1ull << 30, 8, 128 },
			      over[4] = { 1, (1ull << 30) + 1, 8, 128 },
			      wrap64[4] = { 1ull << 32, 1ull << 32, 1, 1 },
			      wrap_bytes[4] = { 1, 1ull << 62, 1, 4 },
			      wrap_small[4] = { 1, (1ull << 61) + 1, 2, 4 };

	int rc = kvt_npy_nbytes(KVT_DTYPE_F16, 4, ok, &n, err, sizeof(err));
	KVT_CHECK(rc == 0 && n == 32ull * 4096 * 8 * 128 * 2, "a real shape: rc %d n %zu", rc, n);
	rc = kvt_npy_nbytes(KVT_DTYPE_F32, 4, zero, &n, err, sizeof(err));
	KVT_CHECK(rc == 0 && n == 0, "a zero dim: rc %d n %zu", rc, n);
	rc = kvt_npy_nbytes(KVT_DTYPE_F32, 4, limit, &n, err, sizeof(err));
	KVT_CHECK(rc == 0 && n == (size_t)(1ull << 40) * 4, "2^40 elements: rc %d n %zu '%s'", rc,
		  n, rc ? err : "");
	static const struct {
		const char *what;
		const uint64_t *shape;
		uint32_t dtype;
		const char *want;
	} bad[] = {
		{ "one over 2^40 elements", over, KVT_DTYPE_F16, "(1, 1073741825, 8, 128)" },
		{ "a product past 2^64", wrap64, KVT_DTYPE_F16, "(4294967296, 4294967296, 1, 1)" },
		{ "bytes past 2^64", wrap_bytes, KVT_DTYPE_F16, "(1, 4611686018427387904, 1, 4)" },
		{ "bytes wrapping to 32", wrap_small, KVT_DTYPE_F32,
		  "(1, 2305843009213693953, 2, 4)" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		n = 7;
		err[0] = 0;
		rc = kvt_npy_nbytes(bad[i].dtype, 4, bad[i].shape, &n, err, sizeof(err));
		KVT_CHECK(rc == -EINVAL && n == 7 && strstr(err, bad[i].want) &&
			  strstr(err, "limit of 2^40"),
			  "%s: rc %d n %zu '%s'", bad[i].what, rc, n, err);
	}
	rc = kvt_npy_nbytes(KVT_DTYPE_F16, 9, ok, &n, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "9 dimensions"), "9 dims: rc %d '%s'", rc, err);
	rc = kvt_npy_nbytes(99, 4, ok, &n, err, sizeof(err));
	KVT_CHECK(rc == -EINVAL && strstr(err, "dtype 99"), "unknown dtype: rc %d '%s'", rc, err);
}

/* A write that fails part-way (here: the file size limit, as a full disk would) leaves the
 * file that was at path whole and no temporary beside it. */
static void test_write_failure_keeps_old_file(void)
{
	char path[512], err[256];
	const uint64_t small[1] = { 4 }, big[1] = { 1 << 16 };
	float a[4] = { 1, 2, 3, 4 }, *b = calloc(big[0], sizeof(float));
	struct kvt_npy r;

	snprintf(path, sizeof(path), "%s/keep.npy", dir);
	KVT_REQUIRE(b && kvt_npy_write(path, KVT_DTYPE_F32, 1, small, a, err, sizeof(err)) == 0,
		    "write: %s", err);
	struct rlimit old, lim;
	KVT_REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0, "getrlimit");
	lim = old;
	lim.rlim_cur = 4096;
	void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
	KVT_REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0, "setrlimit");
	int rc = kvt_npy_write(path, KVT_DTYPE_F32, 1, big, b, err, sizeof(err));
	setrlimit(RLIMIT_FSIZE, &old);
	signal(SIGXFSZ, prev);
	KVT_CHECK(rc == -EFBIG && strstr(err, "write failed"), "over the size limit: rc %d '%s'",
		  rc, err);
	KVT_CHECK(kvt_npy_read(path, &r, err, sizeof(err)) == 0 && r.count == 4 &&
			  !memcmp(r.data, a, sizeof(a)),
		  "the old file after a failed write: '%s'", err);
	kvt_npy_free(&r);
	char tmp[600];
	snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
	KVT_CHECK(access(tmp, F_OK) != 0, "%s left behind", tmp);
	free(b);
}

int main(void)
{
	kvt_test_init();
	const char *tmp = getenv("TMPDIR");
	snprintf(dir, sizeof(dir), "%s/test_npy.XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(dir)) {
		printf("# mkdtemp %s: %s\n", dir, strerror(errno));
		return 1;
	}
	KVT_RUN(test_headers);
	KVT_RUN(test_preamble);
	KVT_RUN(test_write_limits);
	KVT_RUN(test_nbytes);
	KVT_RUN(test_write_failure_keeps_old_file);
	KVT_RUN(test_numpy);
	char cmd[300];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		printf("# could not remove %s\n", dir);
	return kvt_test_done();
}

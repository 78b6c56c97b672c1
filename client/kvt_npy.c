/*
 * kvt_npy.c - the .npy parser, readers and writer (see kvt_npy.h). The header is read as the
 * Python dict literal it is, token by token, because a substring search for a key also finds
 * it inside a value string and a strtoull of a dim takes "-1" and overflows silently.
 */
#include "kvt_npy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvt_codec.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvt_npy.c reads '<' data as native floats: little-endian hosts only"
#endif

#define MAGIC "\x93NUMPY"
#define MAGIC_LEN 6
#define ELEMS_LIMIT_TEXT "2^40 (1099511627776)"
/* f16/f64 -> f32 conversion goes through a staging buffer of this many elements, so reading
 * a file costs its f32 result and not also its raw bytes. */
#define STAGE_ELEMS 16384u

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen,
						      const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EINVAL;
}

/* Up to 24 bytes of p as printable text for a message ("\x00" for the rest, "..." when cut):
 * the bytes come from an untrusted file and must not garble the terminal. */
static const char *show(const uint8_t *p, size_t n, char *buf, size_t cap)
{
	size_t o = 0, i;

	for (i = 0; i < n && i < 24 && o + 8 < cap; i++) {
		if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\')
			buf[o++] = (char)p[i];
		else
			o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", p[i]);
	}
	if (i < n && o + 4 <= cap)
		o += (size_t)snprintf(buf + o, cap - o, "...");
	buf[o < cap ? o : cap - 1] = 0;
	return buf;
}

static void dims_str(const uint64_t *shape, uint32_t ndim, char *buf, size_t cap)
{
	size_t o = (size_t)snprintf(buf, cap, "(");

	for (uint32_t i = 0; i < ndim && o < cap; i++)
		o += (size_t)snprintf(buf + o, cap - o, "%s%llu%s", i ? " " : "",
				      (unsigned long long)shape[i],
				      i + 1 < ndim || ndim == 1 ? "," : "");
	if (o < cap)
		snprintf(buf + o, cap - o, ")");
}

static void shape_str(const struct kvt_npy *a, char *buf, size_t cap)
{
	dims_str(a->shape, a->ndim, buf, cap);
}

/* The product of shape, or -1 when it is over KVT_NPY_MAX_ELEMS. A zero dim makes the count
 * 0 whatever the others are (np.empty((2**30, 2**30, 0)) is a valid array). */
static int64_t count_of(const uint64_t *shape, uint32_t ndim)
{
	uint64_t c = 1;

	for (uint32_t i = 0; i < ndim; i++)
		if (shape[i] == 0)
			return 0;
	for (uint32_t i = 0; i < ndim; i++) {
		if (shape[i] > KVT_NPY_MAX_ELEMS / c)
			return -1;
		c *= shape[i];
	}
	return (int64_t)c;
}

/* ---- The preamble: magic, version, header length ---------------------------------------- */

/* Checks the preamble in buf[0, len) and sets *hdr_end to the end of the header it announces
 * (which may lie beyond len: the caller reads that much). */
static int parse_preamble(const uint8_t *b, size_t len, const char *name, uint32_t *version,
			  uint64_t *hdr_end, char *err, size_t errlen)
{
	size_t pre;
	uint32_t hlen;

	*version = 0;
	*hdr_end = 0;
	if (memcmp(b, MAGIC, len < MAGIC_LEN ? len : MAGIC_LEN) != 0)
		return fail(err, errlen, "%s: not a .npy file (it does not start with \\x93NUMPY)",
			    name);
	if (len < 10)
		return fail(err, errlen, "%s: %zu bytes: shorter than the 10-byte .npy preamble",
			    name, len);
	if (b[6] < 1 || b[6] > 3 || b[7] != 0)
		return fail(err, errlen, "%s: .npy format version %u.%u is not 1.0, 2.0 or 3.0", name,
			    b[6], b[7]);
	/* 1.0 has a 2-byte header length; 2.0 and 3.0 (utf-8 header) have 4 bytes */
	pre = b[6] == 1 ? 10 : 12;
	if (len < pre)
		return fail(err, errlen, "%s: %zu bytes: shorter than the %zu-byte .npy %u.0 "
			    "preamble", name, len, pre, b[6]);
	hlen = (uint32_t)b[8] | (uint32_t)b[9] << 8;
	if (pre == 12)
		hlen |= (uint32_t)b[10] << 16 | (uint32_t)b[11] << 24;
	if (hlen > KVT_NPY_MAX_HEADER_BYTES)
		return fail(err, errlen, "%s: header length %u is over the limit of %u bytes", name,
			    hlen, KVT_NPY_MAX_HEADER_BYTES);
	*version = b[6];
	*hdr_end = pre + hlen;
	return 0;
}

/* ---- The header: a Python dict literal --------------------------------------------------- */

struct lex {
	const uint8_t *p, *start, *end; /* the dict text: the header without its final '\n' */
	const char *name;
	char *err;
	size_t errlen;
};

__attribute__((format(printf, 2, 3))) static int lex_fail(struct lex *x, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return fail(x->err, x->errlen, "%s: header byte %zu: %s", x->name,
		    (size_t)(x->p - x->start), msg);
}

/* What stands at the cursor, for a message (the padding after it left out). */
static const char *here(const struct lex *x, char *buf, size_t cap)
{
	size_t n = (size_t)(x->end - x->p);

	if (n == 0)
		return "the end of the header";
	while (n > 1 && x->p[n - 1] == ' ')
		n--;
	buf[0] = '\'';
	show(x->p, n, buf + 1, cap - 2);
	strcat(buf, "'");
	return buf;
}

/* numpy pads with spaces; it never writes tabs or newlines inside the dict. */
static void skip_spaces(struct lex *x)
{
	while (x->p < x->end && *x->p == ' ')
		x->p++;
}

static bool ident_byte(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '_';
}

/* A '...' or "..." string of printable ASCII without escapes (no key or dtype needs one). */
static int lex_string(struct lex *x, const char *what, const uint8_t **s, size_t *n)
{
	char h[120];
	uint8_t q;

	if (x->p == x->end || (*x->p != '\'' && *x->p != '"'))
		return lex_fail(x, "%s: expected a quoted string, found %s", what,
				here(x, h, sizeof(h)));
	q = *x->p++;
	*s = x->p;
	while (x->p < x->end && *x->p != q) {
		if (*x->p < 0x20 || *x->p >= 0x7f || *x->p == '\\')
			return lex_fail(x, "%s: byte 0x%02x in a string (printable ASCII only, no "
					"escapes)", what, *x->p);
		x->p++;
	}
	if (x->p == x->end)
		return lex_fail(x, "%s: the string has no closing quote", what);
	*n = (size_t)(x->p - *s);
	x->p++;
	return 0;
}

static int parse_descr(struct lex *x, struct kvt_npy *a)
{
	const uint8_t *s;
	size_t n;
	char h[120];
	int rc = lex_string(x, "descr", &s, &n);

	if (rc)
		return rc;
	if (n == 3 && (s[0] == '<' || s[0] == '|' || s[0] == '=') && s[1] == 'f' &&
	    (s[2] == '2' || s[2] == '4' || s[2] == '8')) {
		memcpy(a->descr, s, 3);
		a->descr[3] = 0;
		a->elem_bytes = (uint32_t)(s[2] - '0');
		return 0;
	}
	if (n == 3 && s[0] == '>' && s[1] == 'f')
		return lex_fail(x, "descr '%s' is big-endian: only little-endian '<f2', '<f4', "
				"'<f8' are read (save a.astype('<f4'))", show(s, n, h, sizeof(h)));
	return lex_fail(x, "descr '%s' is not '<f2', '<f4' or '<f8' (a little-endian float; "
			"bf16 has no .npy dtype: convert to f32)", show(s, n, h, sizeof(h)));
}

static int parse_fortran_order(struct lex *x)
{
	const uint8_t *s = x->p;
	char h[120];

	while (x->p < x->end && ident_byte(*x->p))
		x->p++;
	if (x->p - s == 5 && !memcmp(s, "False", 5))
		return 0;
	if (x->p - s == 4 && !memcmp(s, "True", 4))
		return lex_fail(x, "fortran_order True: the data must be in C order (save "
				"np.ascontiguousarray(a))");
	x->p = s;
	return lex_fail(x, "fortran_order is not True or False: found %s", here(x, h, sizeof(h)));
}

/* One dim: a Python decimal integer literal (digits, no sign, no leading zero, no '_'). */
static int parse_dim(struct lex *x, uint32_t i, uint64_t *v)
{
	const uint8_t *s = x->p;
	char h[120];
	bool over = false;

	*v = 0;
	if (x->p == x->end || *x->p < '0' || *x->p > '9')
		return lex_fail(x, "shape[%u]: expected a decimal integer, found %s", i,
				here(x, h, sizeof(h)));
	while (x->p < x->end && *x->p >= '0' && *x->p <= '9') {
		if (!over && *v > (KVT_NPY_MAX_ELEMS - (uint64_t)(*x->p - '0')) / 10)
			over = true;
		if (!over)
			*v = *v * 10 + (uint64_t)(*x->p - '0');
		x->p++;
	}
	const size_t n = (size_t)(x->p - s);
	if (n > 1 && s[0] == '0') {
		x->p = s;
		return lex_fail(x, "shape[%u] '%s' has a leading zero (numpy writes plain decimal)", i,
				show(s, n, h, sizeof(h)));
	}
	if (over) {
		x->p = s;
		return lex_fail(x, "shape[%u] %s is over the limit of " ELEMS_LIMIT_TEXT, i,
				show(s, n, h, sizeof(h)));
	}
	return 0;
}

static int parse_shape(struct lex *x, struct kvt_npy *a)
{
	char h[120];
	int rc;

	if (x->p == x->end || *x->p != '(')
		return lex_fail(x, "shape: expected a tuple '(', found %s", here(x, h, sizeof(h)));
	x->p++;
	skip_spaces(x);
	a->ndim = 0;
	while (x->p == x->end || *x->p != ')') {
		if (a->ndim == KVT_NPY_MAX_DIMS)
			return lex_fail(x, "shape has more than %d dimensions", KVT_NPY_MAX_DIMS);
		if ((rc = parse_dim(x, a->ndim, &a->shape[a->ndim])))
			return rc;
		a->ndim++;
		skip_spaces(x);
		if (x->p < x->end && *x->p == ',') {
			x->p++;
			skip_spaces(x);
		} else if (x->p < x->end && *x->p == ')') {
			/* Python reads (3) as the int 3, and numpy refuses it */
			if (a->ndim == 1)
				return lex_fail(x, "shape (%llu) is not a tuple: one dimension is "
						"written (%llu,)", (unsigned long long)a->shape[0],
						(unsigned long long)a->shape[0]);
		} else {
			return lex_fail(x, "shape: expected ',' or ')' after shape[%u], found %s",
					a->ndim - 1, here(x, h, sizeof(h)));
		}
	}
	x->p++;
	int64_t c = count_of(a->shape, a->ndim);
	if (c < 0) {
		shape_str(a, h, sizeof(h));
		return lex_fail(x, "shape %s has more elements than the limit of " ELEMS_LIMIT_TEXT,
				h);
	}
	a->count = (uint64_t)c;
	return 0;
}

enum { K_DESCR, K_FORTRAN, K_SHAPE, N_KEYS };
static const char *const key_names[N_KEYS] = { "descr", "fortran_order", "shape" };

static int parse_dict(struct lex *x, struct kvt_npy *a)
{
	bool seen[N_KEYS] = { false };
	char h[120];
	int rc;

	if (x->p == x->end || *x->p != '{')
		return lex_fail(x, "expected the dict's '{', found %s", here(x, h, sizeof(h)));
	x->p++;
	skip_spaces(x);
	while (x->p == x->end || *x->p != '}') {
		const uint8_t *s;
		size_t n;
		int k;

		if ((rc = lex_string(x, "key", &s, &n)))
			return rc;
		for (k = 0; k < N_KEYS; k++)
			if (strlen(key_names[k]) == n && !memcmp(s, key_names[k], n))
				break;
		if (k == N_KEYS) {
			x->p = s - 1;
			return lex_fail(x, "unknown key '%s' (a .npy header has descr, fortran_order "
					"and shape)", show(s, n, h, sizeof(h)));
		}
		if (seen[k]) {
			x->p = s - 1;
			return lex_fail(x, "key '%s' appears twice", key_names[k]);
		}
		seen[k] = true;
		skip_spaces(x);
		if (x->p == x->end || *x->p != ':')
			return lex_fail(x, "expected ':' after '%s', found %s", key_names[k],
					here(x, h, sizeof(h)));
		x->p++;
		skip_spaces(x);
		rc = k == K_DESCR ? parse_descr(x, a) : k == K_FORTRAN ? parse_fortran_order(x)
								       : parse_shape(x, a);
		if (rc)
			return rc;
		skip_spaces(x);
		if (x->p < x->end && *x->p == ',') {
			x->p++;
			skip_spaces(x);
		} else if (x->p == x->end || *x->p != '}') {
			return lex_fail(x, "expected ',' or '}' after the value of '%s', found %s",
					key_names[k], here(x, h, sizeof(h)));
		}
	}
	x->p++;
	skip_spaces(x);
	if (x->p != x->end)
		return lex_fail(x, "%s after the dict (only space padding may follow it)",
				here(x, h, sizeof(h)));
	for (int k = 0; k < N_KEYS; k++)
		if (!seen[k])
			return fail(x->err, x->errlen, "%s: header has no '%s' key", x->name,
				    key_names[k]);
	return 0;
}

int kvt_npy_parse_header(const void *buf, size_t len, const char *name, struct kvt_npy *out,
			 char *err, size_t errlen)
{
	const uint8_t *b = buf;
	uint64_t hdr_end;
	uint32_t version;
	int rc;

	memset(out, 0, sizeof(*out));
	if (!name)
		name = "npy";
	if ((rc = parse_preamble(b, len, name, &version, &hdr_end, err, errlen)))
		return rc;
	if (len < hdr_end)
		return fail(err, errlen, "%s: %zu bytes: shorter than its header, which ends at "
			    "byte %llu", name, len, (unsigned long long)hdr_end);
	size_t pre = version == 1 ? 10 : 12;
	if (hdr_end == pre || b[hdr_end - 1] != '\n')
		return fail(err, errlen, "%s: the header does not end with '\\n'", name);
	struct lex x = { .p = b + pre, .start = b + pre, .end = b + hdr_end - 1, .name = name,
			 .err = err, .errlen = errlen };
	if ((rc = parse_dict(&x, out))) {
		memset(out, 0, sizeof(*out));
		return rc;
	}
	out->version = version;
	out->data_offset = hdr_end;
	return 0;
}

/* ---- Readers ------------------------------------------------------------------------------ */

/* Opens path, parses its header and checks that the data after it is exactly the size the
 * shape needs; leaves f at the first data byte. */
static int open_checked(const char *path, FILE **fp, struct kvt_npy *a, char *err,
			size_t errlen)
{
	uint8_t pre[12], *hdr = NULL;
	uint64_t hdr_end, need;
	uint32_t version;
	struct stat st;
	size_t got;
	char sh[200];
	int rc;
	FILE *f;

	memset(a, 0, sizeof(*a));
	*fp = NULL;
	if (!(f = fopen(path, "rb"))) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(-rc));
		return rc;
	}
	if (fstat(fileno(f), &st) != 0) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(-rc));
		goto out;
	}
	/* the size check below needs the file's length up front */
	if (!S_ISREG(st.st_mode)) {
		rc = fail(err, errlen, "%s: not a regular file", path);
		goto out;
	}
	got = fread(pre, 1, sizeof(pre), f);
	if ((rc = parse_preamble(pre, got, path, &version, &hdr_end, err, errlen)))
		goto out;
	if (!(hdr = malloc(hdr_end))) {
		rc = -ENOMEM;
		snprintf(err, errlen, "%s: out of memory for a %llu-byte header", path,
			 (unsigned long long)hdr_end);
		goto out;
	}
	memcpy(hdr, pre, got < hdr_end ? got : hdr_end);
	if (got < hdr_end)
		got += fread(hdr + got, 1, hdr_end - got, f);
	if ((rc = kvt_npy_parse_header(hdr, got < hdr_end ? got : hdr_end, path, a, err, errlen)))
		goto out;
	need = a->count * a->elem_bytes;
	if ((uint64_t)st.st_size != a->data_offset + need) {
		shape_str(a, sh, sizeof(sh));
		rc = fail(err, errlen, "%s: holds %lld data bytes after its %llu-byte header; shape "
			  "%s of '%s' needs %llu", path, (long long)st.st_size - (long long)a->data_offset,
			  (unsigned long long)a->data_offset, sh, a->descr, (unsigned long long)need);
		goto out;
	}
	if (fseeko(f, (off_t)a->data_offset, SEEK_SET) != 0) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(-rc));
		goto out;
	}
	*fp = f;
	f = NULL;
out:
	free(hdr);
	if (f)
		fclose(f);
	if (rc)
		memset(a, 0, sizeof(*a));
	return rc;
}

static int read_fail(const char *path, FILE *f, struct kvt_npy *a, int rc, char *err,
		     size_t errlen)
{
	if (rc == -ENOMEM)
		snprintf(err, errlen, "%s: out of memory for %zu bytes", path, a->n_bytes);
	else
		snprintf(err, errlen, "%s: short read of the data (%s)", path,
			 ferror(f) ? strerror(errno) : "the file shrank");
	fclose(f);
	free(a->data);
	a->data = NULL;
	a->n_bytes = 0;
	return rc;
}

int kvt_npy_read(const char *path, struct kvt_npy *a, char *err, size_t errlen)
{
	FILE *f;
	int rc = open_checked(path, &f, a, err, errlen);

	if (rc)
		return rc;
	if (a->elem_bytes == 8) {
		fclose(f);
		snprintf(err, errlen, "%s: descr '%s' is not '<f2' or '<f4' (convert with "
			 "a.astype(np.float32))", path, a->descr);
		memset(a, 0, sizeof(*a));
		return -EINVAL;
	}
	a->dtype = a->elem_bytes == 2 ? KVT_DTYPE_F16 : KVT_DTYPE_F32;
	a->n_bytes = (size_t)(a->count * a->elem_bytes);
	if (!(a->data = malloc(a->n_bytes ? a->n_bytes : 1)))
		return read_fail(path, f, a, -ENOMEM, err, errlen);
	if (fread(a->data, 1, a->n_bytes, f) != a->n_bytes)
		return read_fail(path, f, a, -EIO, err, errlen);
	fclose(f);
	return 0;
}

int kvt_npy_read_f32(const char *path, struct kvt_npy *a, char *err, size_t errlen)
{
	FILE *f;
	void *stage = NULL;
	int rc = open_checked(path, &f, a, err, errlen);

	if (rc)
		return rc;
	a->dtype = KVT_DTYPE_F32;
	a->n_bytes = (size_t)(a->count * sizeof(float));
	if (!(a->data = malloc(a->n_bytes ? a->n_bytes : 1)))
		return read_fail(path, f, a, -ENOMEM, err, errlen);
	if (a->elem_bytes == 4) {
		if (fread(a->data, 1, a->n_bytes, f) != a->n_bytes)
			return read_fail(path, f, a, -EIO, err, errlen);
		fclose(f);
		return 0;
	}
	if (!(stage = malloc((size_t)STAGE_ELEMS * a->elem_bytes)))
		return read_fail(path, f, a, -ENOMEM, err, errlen);
	float *dst = a->data;
	for (uint64_t i = 0; i < a->count;) {
		size_t n = a->count - i < STAGE_ELEMS ? (size_t)(a->count - i) : STAGE_ELEMS;
		if (fread(stage, a->elem_bytes, n, f) != n) {
			free(stage);
			return read_fail(path, f, a, -EIO, err, errlen);
		}
		if (a->elem_bytes == 2)
			kvt_convert(stage, KVT_DTYPE_F16, dst + i, KVT_DTYPE_F32, n);
		else
			for (size_t j = 0; j < n; j++)
				dst[i + j] = (float)((const double *)stage)[j];
		i += n;
	}
	free(stage);
	fclose(f);
	return 0;
}

void kvt_npy_free(struct kvt_npy *a)
{
	free(a->data);
	a->data = NULL;
	a->n_bytes = 0;
}

/* ---- Writer ------------------------------------------------------------------------------- */

int kvt_npy_nbytes(uint32_t dtype, uint32_t ndim, const uint64_t *shape, size_t *out,
		   char *err, size_t errlen)
{
	/* 8 dims of up to 20 digits and their separators */
	char sh[200];
	const size_t es = kvt_dtype_size(dtype);
	int64_t count;

	if (!es)
		return fail(err, errlen, "dtype %u has no element size", dtype);
	if (ndim > KVT_NPY_MAX_DIMS)
		return fail(err, errlen, "%u dimensions are over the limit of %d", ndim,
			    KVT_NPY_MAX_DIMS);
	/* count_of divides before it multiplies: a product past 2^64 is caught, not wrapped */
	dims_str(shape, ndim, sh, sizeof(sh));
	if ((count = count_of(shape, ndim)) < 0)
		return fail(err, errlen, "shape %s has more elements than the limit of "
			    ELEMS_LIMIT_TEXT, sh);
	if ((uint64_t)count > SIZE_MAX / es)
		return fail(err, errlen, "shape %s of %zu-byte elements is over SIZE_MAX bytes",
			    sh, es);
	*out = (size_t)count * es;
	return 0;
}

int kvt_npy_write(const char *path, uint32_t dtype, uint32_t ndim, const uint64_t *shape,
		  const void *data, char *err, size_t errlen)
{
	/* 55 bytes of keys, 8 dims of <= 13 digits and their separators, padding to 64 */
	char hdr[384];
	size_t n, total, es = kvt_dtype_size(dtype);
	int64_t count;
	FILE *f;
	int rc = 0;

	if (dtype != KVT_DTYPE_F16 && dtype != KVT_DTYPE_F32)
		return fail(err, errlen, "%s: .npy dtype %u is not f16 or f32", path, dtype);
	if (ndim > KVT_NPY_MAX_DIMS)
		return fail(err, errlen, "%s: %u dimensions are over the limit of %d", path, ndim,
			    KVT_NPY_MAX_DIMS);
	for (uint32_t i = 0; i < ndim; i++)
		if (shape[i] > KVT_NPY_MAX_ELEMS)
			return fail(err, errlen, "%s: shape[%u] %llu is over the limit of "
				    ELEMS_LIMIT_TEXT, path, i, (unsigned long long)shape[i]);
	if ((count = count_of(shape, ndim)) < 0)
		return fail(err, errlen, "%s: the shape has more elements than the limit of "
			    ELEMS_LIMIT_TEXT, path);
	/* np.save's layout: "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
	 * spaces up to a 64-byte boundary, '\n' */
	n = (size_t)snprintf(hdr, sizeof(hdr), "{'descr': '%s', 'fortran_order': False, "
			     "'shape': (", dtype == KVT_DTYPE_F16 ? "<f2" : "<f4");
	for (uint32_t i = 0; i < ndim; i++)
		n += (size_t)snprintf(hdr + n, sizeof(hdr) - n, "%s%llu", i ? ", " : "",
				      (unsigned long long)shape[i]);
	n += (size_t)snprintf(hdr + n, sizeof(hdr) - n, "%s), }", ndim == 1 ? "," : "");
	while ((10 + n + 1) % 64)
		hdr[n++] = ' ';
	hdr[n++] = '\n';
	total = (size_t)count * es;
	const unsigned char pre[10] = { 0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
					(unsigned char)(n & 0xff), (unsigned char)(n >> 8) };
	/* Written beside path and renamed over it: a failed write (disk full) leaves no torn
	 * file under path, and an existing file is replaced only by a complete one. */
	const size_t tcap = strlen(path) + 32;
	char *tmp = malloc(tcap);
	int fd;
	if (!tmp)
		return fail(err, errlen, "%s: out of memory", path);
	/* O_EXCL on a per-process name (the umask gives the mode, as for any file we write) */
	snprintf(tmp, tcap, "%s.tmp.%ld", path, (long)getpid());
	if ((fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666)) < 0 ||
	    !(f = fdopen(fd, "wb"))) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", tmp, strerror(-rc));
		if (fd >= 0) {
			close(fd);
			unlink(tmp);
		}
		free(tmp);
		return rc;
	}
	errno = 0;
	if (fwrite(pre, 1, sizeof(pre), f) != sizeof(pre) || fwrite(hdr, 1, n, f) != n ||
	    (total && fwrite(data, 1, total, f) != total))
		rc = errno ? -errno : -EIO;
	if (fclose(f) != 0 && !rc)
		rc = errno ? -errno : -EIO;
	if (!rc && rename(tmp, path) != 0)
		rc = -errno;
	if (rc) {
		unlink(tmp);
		snprintf(err, errlen, "%s: write failed: %s", path, strerror(-rc));
	}
	free(tmp);
	return rc;
}

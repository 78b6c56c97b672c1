/* bench_npy.c - see bench_npy.h. The header is a Python dict literal; we parse only the three
 * keys numpy writes and refuse anything we do not understand rather than guess. */
#include "bench_npy.h"
#include "kvt_codec.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAX_HEADER (1u << 20)

static const char *skip_ws(const char *p)
{
	while (*p && isspace((unsigned char)*p))
		p++;
	return p;
}

/* Points just after "'key':" (spaces skipped), or NULL. */
static const char *find_key(const char *hdr, const char *key)
{
	char pat[32];
	const char *p;

	snprintf(pat, sizeof(pat), "'%s'", key);
	p = strstr(hdr, pat);
	if (!p) {
		snprintf(pat, sizeof(pat), "\"%s\"", key);
		p = strstr(hdr, pat);
	}
	if (!p)
		return NULL;
	p = skip_ws(p + strlen(pat));
	if (*p != ':')
		return NULL;
	return skip_ws(p + 1);
}

static int parse_header(const char *path, const char *hdr, struct kvt_npy *a, char *err,
			size_t errlen)
{
	const char *p = find_key(hdr, "descr");
	size_t n = 0;

	if (!p || (*p != '\'' && *p != '"')) {
		snprintf(err, errlen, "%s: header has no 'descr'", path);
		return -EINVAL;
	}
	for (p++; *p && *p != '\'' && *p != '"' && n + 1 < sizeof(a->descr); p++)
		a->descr[n++] = *p;
	a->descr[n] = 0;
	if (a->descr[0] == '>') {
		snprintf(err, errlen, "%s: dtype '%s' is big-endian; only little-endian <f2, <f4, "
			 "<f8 are accepted", path, a->descr);
		return -EINVAL;
	}
	if (strlen(a->descr) != 3 || !strchr("<|=", a->descr[0]) || a->descr[1] != 'f' ||
	    !strchr("248", a->descr[2])) {
		snprintf(err, errlen, "%s: dtype '%s' is not a float type (<f2, <f4, <f8; "
			 "bf16 has no .npy dtype: convert to f32 first)", path, a->descr);
		return -EINVAL;
	}
	p = find_key(hdr, "fortran_order");
	if (!p || (strncmp(p, "False", 5) != 0 && strncmp(p, "True", 4) != 0)) {
		snprintf(err, errlen, "%s: header has no 'fortran_order' True/False", path);
		return -EINVAL;
	}
	if (*p == 'T') {
		snprintf(err, errlen, "%s: fortran_order True is not supported (save a "
			 "C-contiguous array: np.ascontiguousarray)", path);
		return -EINVAL;
	}
	p = find_key(hdr, "shape");
	if (!p || *p != '(') {
		snprintf(err, errlen, "%s: header has no 'shape' tuple", path);
		return -EINVAL;
	}
	p++;
	a->ndim = 0;
	a->count = 1;
	for (;;) {
		char *end;
		unsigned long long v;

		p = skip_ws(p);
		if (*p == ')')
			break;
		if (!isdigit((unsigned char)*p)) {
			snprintf(err, errlen, "%s: cannot parse 'shape' near '%.16s'", path, p);
			return -EINVAL;
		}
		if (a->ndim == KVT_NPY_MAX_DIMS) {
			snprintf(err, errlen, "%s: more than %d dimensions", path, KVT_NPY_MAX_DIMS);
			return -EINVAL;
		}
		errno = 0;
		v = strtoull(p, &end, 10);
		if (errno || v > (1ull << 40)) {
			snprintf(err, errlen, "%s: dimension %u is too large", path, a->ndim);
			return -EINVAL;
		}
		a->shape[a->ndim++] = v;
		if (v && a->count > (1ull << 40) / v) {
			snprintf(err, errlen, "%s: more than 2^40 elements", path);
			return -EINVAL;
		}
		a->count *= v;
		p = skip_ws(end);
		if (*p == ',')
			p++;
	}
	if (a->ndim == 0) {
		snprintf(err, errlen, "%s: a 0-dimensional array is not a tensor", path);
		return -EINVAL;
	}
	return 0;
}

int kvt_npy_read(const char *path, struct kvt_npy *a, char *err, size_t errlen)
{
	unsigned char pre[12];
	FILE *f = fopen(path, "rb");
	char *hdr = NULL;
	void *raw = NULL;
	size_t hlen, esize, got;
	long data_off, end_off;
	int rc = -EINVAL;

	memset(a, 0, sizeof(*a));
	if (!f) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -errno;
	}
	if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
		snprintf(err, errlen, "%s: not a .npy file (magic \\x93NUMPY missing)", path);
		goto out;
	}
	if (pre[6] == 1) {
		hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
		data_off = 10;
	} else if (pre[6] == 2 || pre[6] == 3) {
		if (fread(pre + 10, 1, 2, f) != 2) {
			snprintf(err, errlen, "%s: truncated header", path);
			goto out;
		}
		hlen = (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 |
		       (size_t)pre[11] << 24;
		data_off = 12;
	} else {
		snprintf(err, errlen, "%s: .npy format version %u.%u is not 1.0, 2.0 or 3.0", path,
			 pre[6], pre[7]);
		goto out;
	}
	if (hlen == 0 || hlen > NPY_MAX_HEADER) {
		snprintf(err, errlen, "%s: header length %zu is not in 1..%u", path, hlen,
			 NPY_MAX_HEADER);
		goto out;
	}
	hdr = calloc(1, hlen + 1);
	if (!hdr || fread(hdr, 1, hlen, f) != hlen) {
		snprintf(err, errlen, "%s: truncated header", path);
		goto out;
	}
	data_off += (long)hlen;
	rc = parse_header(path, hdr, a, err, errlen);
	if (rc < 0)
		goto out;
	rc = -EINVAL;
	esize = (size_t)(a->descr[2] - '0');
	if (fseek(f, 0, SEEK_END) != 0 || (end_off = ftell(f)) < data_off) {
		snprintf(err, errlen, "%s: cannot size the file", path);
		goto out;
	}
	if ((uint64_t)(end_off - data_off) != a->count * esize) {
		snprintf(err, errlen, "%s: holds %ld data bytes but shape x %s needs %llu", path,
			 end_off - data_off, a->descr, (unsigned long long)(a->count * esize));
		goto out;
	}
	fseek(f, data_off, SEEK_SET);
	raw = malloc(a->count * esize + 1);
	a->data = malloc(a->count * sizeof(float) + 1);
	if (!raw || !a->data) {
		snprintf(err, errlen, "%s: out of memory for %llu elements", path,
			 (unsigned long long)a->count);
		rc = -ENOMEM;
		goto out;
	}
	got = fread(raw, esize, a->count, f);
	if (got != a->count) {
		snprintf(err, errlen, "%s: short read", path);
		rc = -EIO;
		goto out;
	}
	if (esize == 2) {
		kvt_convert(raw, KVT_DTYPE_F16, a->data, KVT_DTYPE_F32, a->count);
	} else if (esize == 4) {
		memcpy(a->data, raw, a->count * 4);
	} else {
		for (uint64_t i = 0; i < a->count; i++)
			a->data[i] = (float)((const double *)raw)[i];
	}
	rc = 0;
out:
	if (rc < 0) {
		free(a->data);
		a->data = NULL;
	}
	free(raw);
	free(hdr);
	fclose(f);
	return rc;
}

void kvt_npy_free(struct kvt_npy *a)
{
	free(a->data);
	a->data = NULL;
}

int kvt_npy_write_f32(const char *path, const float *data, const uint64_t *shape,
		      uint32_t ndim, char *err, size_t errlen)
{
	char hdr[256];
	size_t n = 0, total;
	uint64_t count = 1;
	FILE *f;
	unsigned char pre[10] = { 0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0 };

	n += (size_t)snprintf(hdr + n, sizeof(hdr) - n,
			      "{'descr': '<f4', 'fortran_order': False, 'shape': (");
	for (uint32_t i = 0; i < ndim; i++) {
		n += (size_t)snprintf(hdr + n, sizeof(hdr) - n, "%llu,%s",
				      (unsigned long long)shape[i], i + 1 < ndim ? " " : "");
		count *= shape[i];
	}
	n += (size_t)snprintf(hdr + n, sizeof(hdr) - n, "), }");
	/* pad with spaces so the data starts on a 64-byte boundary; end with '\n' */
	total = (10 + n + 1 + 63) & ~(size_t)63;
	while (10 + n + 1 < total)
		hdr[n++] = ' ';
	hdr[n++] = '\n';
	pre[8] = (unsigned char)(n & 0xff);
	pre[9] = (unsigned char)(n >> 8);
	f = fopen(path, "wb");
	if (!f) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -errno;
	}
	if (fwrite(pre, 1, 10, f) != 10 || fwrite(hdr, 1, n, f) != n ||
	    fwrite(data, 4, count, f) != count) {
		snprintf(err, errlen, "%s: write failed", path);
		fclose(f);
		return -EIO;
	}
	if (fclose(f) != 0) {
		snprintf(err, errlen, "%s: close failed", path);
		return -EIO;
	}
	return 0;
}

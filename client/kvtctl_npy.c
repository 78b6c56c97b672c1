/*
 * kvtctl_npy.c - .npy reader and writer for kvtierctl (see kvtctl_npy.h).
 */
#include "kvtctl_npy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_codec.h"

/* Header dicts are small; a larger one is not a file we wrote or numpy would write for us. */
#define NPY_MAX_HEADER 65536

static const char *find_key(const char *hdr, const char *key)
{
	const char *p = strstr(hdr, key);
	if (!p)
		return NULL;
	p = strchr(p + strlen(key), ':');
	if (!p)
		return NULL;
	p++;
	while (*p == ' ')
		p++;
	return p;
}

int kvtctl_npy_read(const char *path, struct kvtctl_npy *out, char *err, size_t errlen)
{
	FILE *f = NULL;
	unsigned char pre[10];
	char *hdr = NULL;
	uint32_t hlen;
	uint64_t count = 1;
	const char *p;
	long data_off, end = -1;
	int rc = 0;

	memset(out, 0, sizeof(*out));
	f = fopen(path, "rb");
	if (!f) {
		rc = -errno;
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return rc;
	}
	if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
		snprintf(err, errlen, "%s: not a .npy file (bad magic)", path);
		rc = -EINVAL;
		goto out;
	}
	if (pre[6] == 1) {
		hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8;
		data_off = 10;
	} else if (pre[6] == 2 || pre[6] == 3) {
		unsigned char b[2];
		if (fread(b, 1, 2, f) != 2) {
			snprintf(err, errlen, "%s: truncated header", path);
			rc = -EINVAL;
			goto out;
		}
		hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8 | (uint32_t)b[0] << 16 |
		       (uint32_t)b[1] << 24;
		data_off = 12;
	} else {
		snprintf(err, errlen, "%s: .npy version %u is not 1, 2 or 3", path, pre[6]);
		rc = -EINVAL;
		goto out;
	}
	if (hlen == 0 || hlen > NPY_MAX_HEADER) {
		snprintf(err, errlen, "%s: header length %u is outside 1..%d", path, hlen,
			 NPY_MAX_HEADER);
		rc = -EINVAL;
		goto out;
	}
	hdr = calloc(1, hlen + 1);
	if (!hdr || fread(hdr, 1, hlen, f) != hlen) {
		snprintf(err, errlen, "%s: truncated header", path);
		rc = -EINVAL;
		goto out;
	}
	data_off += (long)hlen;
	p = find_key(hdr, "'descr'");
	if (p && (!strncmp(p, "'<f2'", 5) || !strncmp(p, "'float16'", 9)))
		out->dtype = KVT_DTYPE_F16;
	else if (p && (!strncmp(p, "'<f4'", 5) || !strncmp(p, "'float32'", 9)))
		out->dtype = KVT_DTYPE_F32;
	else {
		snprintf(err, errlen, "%s: descr %.8s is not '<f2' or '<f4' (convert with numpy first)",
			 path, p ? p : "(none)");
		rc = -EINVAL;
		goto out;
	}
	p = find_key(hdr, "'fortran_order'");
	if (!p || strncmp(p, "False", 5) != 0) {
		snprintf(err, errlen, "%s: fortran_order must be False", path);
		rc = -EINVAL;
		goto out;
	}
	p = find_key(hdr, "'shape'");
	if (!p || *p != '(') {
		snprintf(err, errlen, "%s: no shape in the header", path);
		rc = -EINVAL;
		goto out;
	}
	p++;
	while (*p && *p != ')') {
		char *e;
		unsigned long long v;
		while (*p == ' ' || *p == ',')
			p++;
		if (*p == ')')
			break;
		v = strtoull(p, &e, 10);
		if (e == p || out->ndim >= KVTCTL_NPY_MAX_DIMS) {
			snprintf(err, errlen, "%s: cannot parse the shape (at most %d dims)", path,
				 KVTCTL_NPY_MAX_DIMS);
			rc = -EINVAL;
			goto out;
		}
		out->shape[out->ndim++] = v;
		count *= v;
		p = e;
	}
	out->n_bytes = (size_t)count * kvt_dtype_size(out->dtype);
	if (fseek(f, 0, SEEK_END) != 0 || (end = ftell(f)) < 0 ||
	    (uint64_t)(end - data_off) != out->n_bytes) {
		snprintf(err, errlen, "%s: holds %ld data bytes, its shape needs %zu", path,
			 (long)(end - data_off), out->n_bytes);
		rc = -EINVAL;
		goto out;
	}
	out->data = malloc(out->n_bytes ? out->n_bytes : 1);
	if (!out->data || fseek(f, data_off, SEEK_SET) != 0 ||
	    fread(out->data, 1, out->n_bytes, f) != out->n_bytes) {
		snprintf(err, errlen, "%s: cannot read %zu data bytes", path, out->n_bytes);
		rc = -EIO;
		goto out;
	}
out:
	if (rc)
		kvtctl_npy_free(out);
	free(hdr);
	fclose(f);
	return rc;
}

int kvtctl_npy_write(const char *path, uint32_t dtype, int ndim, const uint64_t *shape,
		     const void *data, char *err, size_t errlen)
{
	char hdr[512];
	int n;
	size_t count = 1, total;
	FILE *f;

	if (dtype != KVT_DTYPE_F16 && dtype != KVT_DTYPE_F32) {
		snprintf(err, errlen, "npy output dtype must be f16 or f32");
		return -EINVAL;
	}
	n = snprintf(hdr, sizeof(hdr), "{'descr': '%s', 'fortran_order': False, 'shape': (",
		     dtype == KVT_DTYPE_F16 ? "<f2" : "<f4");
	for (int i = 0; i < ndim; i++) {
		n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "%llu%s",
			      (unsigned long long)shape[i], ndim == 1 ? "," : (i + 1 < ndim ? ", " : ""));
		count *= shape[i];
	}
	n += snprintf(hdr + n, sizeof(hdr) - (size_t)n, "), }");
	/* pad with spaces so that 10 + header ends on a 64-byte boundary, newline last */
	while ((10 + n + 1) % 64)
		hdr[n++] = ' ';
	hdr[n++] = '\n';
	total = count * kvt_dtype_size(dtype);
	f = fopen(path, "wb");
	if (!f) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -errno;
	}
	unsigned char pre[10] = { 0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(n & 0xff),
				  (unsigned char)(n >> 8) };
	int bad = fwrite(pre, 1, 10, f) != 10 || fwrite(hdr, 1, (size_t)n, f) != (size_t)n ||
		  (total && fwrite(data, 1, total, f) != total);
	if (fclose(f) != 0 || bad) {
		snprintf(err, errlen, "%s: write failed", path);
		return -EIO;
	}
	return 0;
}

void kvtctl_npy_free(struct kvtctl_npy *n)
{
	free(n->data);
	n->data = NULL;
}

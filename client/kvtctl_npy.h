/*
 * kvtctl_npy.h - the NumPy .npy files kvtierctl reads and writes: little-endian f16 / f32,
 * C order, any rank up to 8. Format: "\x93NUMPY", version, header length, a Python dict
 * literal with descr / fortran_order / shape, padded so data starts on a 64-byte boundary.
 */
#ifndef KVTCTL_NPY_H
#define KVTCTL_NPY_H

#include <stddef.h>
#include <stdint.h>

#define KVTCTL_NPY_MAX_DIMS 8

struct kvtctl_npy {
	uint32_t dtype;                       /* KVT_DTYPE_F16 or KVT_DTYPE_F32 */
	int ndim;
	uint64_t shape[KVTCTL_NPY_MAX_DIMS];
	size_t n_bytes;
	void *data;                           /* malloc'd */
};

/* Reads path; -errno with a message in err on failure. */
int kvtctl_npy_read(const char *path, struct kvtctl_npy *out, char *err, size_t errlen);
/* Writes data ([shape] in dtype f16 or f32) to path. */
int kvtctl_npy_write(const char *path, uint32_t dtype, int ndim, const uint64_t *shape,
		     const void *data, char *err, size_t errlen);
void kvtctl_npy_free(struct kvtctl_npy *n);

#endif

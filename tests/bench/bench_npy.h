/*
 * bench_npy.h - a small, strict .npy reader (and writer, for tests and data dumps).
 *
 * Accepted: format versions 1.0, 2.0 and 3.0; dtype '<f2', '<f4' or '<f8' (little-endian
 * float; '|'/'=' byte orders are taken as native little-endian); C order (fortran_order False);
 * 1 to 8 dimensions. Anything else is refused with a message that names the file and the
 * field. The data is converted to f32.
 */
#ifndef KVT_BENCH_NPY_H
#define KVT_BENCH_NPY_H

#include <stddef.h>
#include <stdint.h>

#define KVT_NPY_MAX_DIMS 8

struct kvt_npy {
	uint32_t ndim;
	uint64_t shape[KVT_NPY_MAX_DIMS];
	uint64_t count;      /* product of shape */
	char descr[8];       /* as in the file, e.g. "<f2" */
	float *data;         /* count floats, C order; free with kvt_npy_free */
};

int kvt_npy_read(const char *path, struct kvt_npy *out, char *err, size_t errlen);
void kvt_npy_free(struct kvt_npy *a);
/* Writes f32 data as a version 1.0 '<f4' C-order file. */
int kvt_npy_write_f32(const char *path, const float *data, const uint64_t *shape,
		      uint32_t ndim, char *err, size_t errlen);

#endif

/*
 * kvt_npy.h - the NumPy .npy files kvtierctl (put/get/demo) and kvtier-bench read and write:
 * one strict parser for both, since every byte of a .npy a user hands us is untrusted input.
 *
 * A .npy is "\x93NUMPY", the format version (1.0, 2.0 or 3.0: 2 or 4 byte little-endian
 * header length), then a Python dict literal padded with spaces and ended by '\n', then the
 * array's bytes. Accepted: what np.save writes for a little-endian float array in C order,
 * read as a real tokenizer (no substring search): exactly the keys descr, fortran_order and
 * shape, each once; descr '<f2', '<f4' or '<f8' ('|' and '=' taken as little-endian, '>'
 * refused); fortran_order False; shape a tuple of 0..8 plain decimal integers. Each dim and
 * the element count are at most KVT_NPY_MAX_ELEMS, so count * element size never overflows,
 * and the bytes after the header must be exactly count * element size. Anything else is
 * refused with a message that names the file, the field and the limit.
 *
 * Ownership: the readers malloc data and the caller frees it with kvt_npy_free (also safe
 * on a struct a reader refused: data is NULL then). Every other pointer is borrowed.
 */
#ifndef KVT_NPY_H
#define KVT_NPY_H

#include <stddef.h>
#include <stdint.h>

#define KVT_NPY_MAX_DIMS 8
/* 2^40 elements (8 TiB of f64): far above any K/V tensor we take, and low enough that
 * count * 8 and every offset computed from it fit in 64 bits (and in off_t). */
#define KVT_NPY_MAX_ELEMS (1ull << 40)
/* np.save writes < 128 header bytes for a float array and np.load reads at most 10000 by
 * default; 64 KiB (the 1.0 format's whole range) is generous and bounds the allocation. */
#define KVT_NPY_MAX_HEADER_BYTES 65535u

struct kvt_npy {
	/* what the header says (kvt_npy_parse_header) */
	uint32_t version;                     /* format major version: 1, 2 or 3 */
	char descr[4];                        /* as in the file: "<f2", "|f4", ... */
	uint32_t elem_bytes;                  /* the file's element size: 2, 4 or 8 */
	uint32_t ndim;                        /* 0..KVT_NPY_MAX_DIMS */
	uint64_t shape[KVT_NPY_MAX_DIMS];
	uint64_t count;                       /* product of shape, <= KVT_NPY_MAX_ELEMS */
	uint64_t data_offset;                 /* preamble + header: where the data starts */
	/* what a reader made of the data */
	uint32_t dtype;                       /* KVT_DTYPE_F16 or KVT_DTYPE_F32 */
	size_t n_bytes;                       /* count * kvt_dtype_size(dtype) */
	void *data;                           /* malloc'd, C order; NULL until read */
};

/*
 * Parses the preamble and header at the start of buf (len bytes; bytes after the header are
 * not looked at) into out's header fields; data stays NULL. name only labels messages.
 * 0, or -EINVAL with a message in err (buf shorter than the header it announces included).
 */
int kvt_npy_parse_header(const void *buf, size_t len, const char *name, struct kvt_npy *out,
			 char *err, size_t errlen);

/* Reads path keeping the file's dtype: '<f2' gives KVT_DTYPE_F16, '<f4' KVT_DTYPE_F32 ('<f8'
 * is refused: kvtierctl sends what it reads). 0 or -errno with a message in err. */
int kvt_npy_read(const char *path, struct kvt_npy *out, char *err, size_t errlen);
/* Reads path converting f16 / f32 / f64 to f32 (dtype KVT_DTYPE_F32, data is float *). */
int kvt_npy_read_f32(const char *path, struct kvt_npy *out, char *err, size_t errlen);

/* Writes data ([shape] C order, dtype KVT_DTYPE_F16 or KVT_DTYPE_F32) as a version 1.0 file
 * in np.save's layout (data 64-byte aligned). -EINVAL when kvt_npy_read could not read it
 * back (ndim or element count over the limits), -errno on I/O errors. */
int kvt_npy_write(const char *path, uint32_t dtype, uint32_t ndim, const uint64_t *shape,
		  const void *data, char *err, size_t errlen);

/* The bytes of a [shape] array of dtype, for a caller that allocates one to write with
 * kvt_npy_write (kvtierctl get sizes its buffers from the daemon's shape and the user's range).
 * 0, or -EINVAL with a message naming the shape when the element count is over
 * KVT_NPY_MAX_ELEMS (computed without overflow) or the bytes do not fit in size_t. */
int kvt_npy_nbytes(uint32_t dtype, uint32_t ndim, const uint64_t *shape, size_t *out,
		   char *err, size_t errlen);

void kvt_npy_free(struct kvt_npy *a);

#endif

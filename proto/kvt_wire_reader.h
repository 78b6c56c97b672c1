/*
 * kvt_wire_reader.h - a forward-only reader over a received grpc_byte_buffer's slices, for
 * the hand-written protobuf fast paths (kvtierd's Append, libkvtier's Fetch replies) that
 * copy tensor bytes straight from gRPC's receive slices to their destination instead of
 * flattening the message and letting protobuf-c copy it again.
 *
 * Header-only (static inline) so that the daemon and the client library share it without a
 * new link dependency. The caller initialises `r` with grpc_byte_buffer_reader_init, sets
 * the rest to zero, and destroys `r` when done. Every reader returns 0 or -1 (out of bytes /
 * malformed varint); `consumed` counts the bytes read so far.
 */
#ifndef KVT_WIRE_READER_H
#define KVT_WIRE_READER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>

struct kvt_wire_reader {
	grpc_byte_buffer_reader r;
	grpc_slice *cur; /* the slice being read (owned by r), NULL before the first / at the end */
	size_t off;      /* read position inside cur */
	uint64_t consumed;
};

/* Makes sure cur has at least one unread byte; -1 at the end of the buffer. */
static inline int kvt_wire_fill(struct kvt_wire_reader *w)
{
	while (!w->cur || w->off == GRPC_SLICE_LENGTH(*w->cur)) {
		if (!grpc_byte_buffer_reader_peek(&w->r, &w->cur)) {
			w->cur = NULL;
			return -1;
		}
		w->off = 0;
	}
	return 0;
}

static inline int kvt_wire_eof(struct kvt_wire_reader *w)
{
	return kvt_wire_fill(w) != 0;
}

/* A base-128 varint of at most 10 bytes. */
static inline int kvt_wire_varint(struct kvt_wire_reader *w, uint64_t *v)
{
	*v = 0;
	for (int shift = 0; shift < 64; shift += 7) {
		if (kvt_wire_fill(w))
			return -1;
		uint8_t b = GRPC_SLICE_START_PTR(*w->cur)[w->off++];
		w->consumed++;
		*v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

/* Copies n bytes to dst across slice boundaries, or skips them when dst is NULL. */
static inline int kvt_wire_copy(struct kvt_wire_reader *w, void *dst, size_t n)
{
	uint8_t *d = dst;
	while (n) {
		if (kvt_wire_fill(w))
			return -1;
		size_t avail = GRPC_SLICE_LENGTH(*w->cur) - w->off;
		size_t take = avail < n ? avail : n;
		if (d) {
			memcpy(d, GRPC_SLICE_START_PTR(*w->cur) + w->off, take);
			d += take;
		}
		w->off += take;
		w->consumed += take;
		n -= take;
	}
	return 0;
}

#endif

/*
 * kvtier_client.h - libkvtier: the C client of kvtierd (kvtier.v1.KvTier over gRPC C core).
 *
 * One struct kvt_client wraps one gRPC channel (a unix socket or a loopback/TLS TCP target).
 * It is thread-safe: any number of threads may issue calls on the same client at once; every
 * call has its own completion queue and its own deadline, so a slow call never blocks another.
 *
 * Tensors are raw little-endian, dense, [layer][token][kv_head][dim] in a dtype of enum
 * kvt_client_dtype (the same numbering as the wire's Dtype and kernels/kvt_codec.h). Large
 * tensors are split by the library into messages below the client's max_message_bytes (Append,
 * StoreEncoded) and reassembled from the server's stream (Fetch, FetchEncoded); callers pass
 * whole tensors.
 *
 * Errors: every function returns 0 on success or a negative errno-like code, and fills the
 * caller's struct kvt_client_status (may be NULL) with the gRPC status code and message. A
 * status produced by the library itself (bad argument, buffer too small, protocol violation by
 * the server) has local = 1 and a message that starts with "libkvtier:". The errno for each
 * gRPC code is kvt_client_errno_from_code().
 *
 * Ownership: every pointer argument is borrowed for the call. Results that the library
 * allocates (lists, encoded sessions, stats counters) are freed with the matching *_free().
 */
#ifndef KVTIER_CLIENT_H
#define KVTIER_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVT_CLIENT_SESSION_ID_MAX 128
#define KVT_CLIENT_DEFAULT_MESSAGE_BYTES (4u << 20)
/* "up to the end" for token and layer ranges, "no value" for optional u64 fields */
#define KVT_CLIENT_END UINT64_MAX
#define KVT_CLIENT_ALL_LAYERS UINT32_MAX
#define KVT_CLIENT_ALL_CHUNKS UINT32_MAX

/* gRPC canonical status codes (the numeric values of grpc_status_code). */
enum kvt_client_code {
	KVT_CODE_OK = 0,
	KVT_CODE_CANCELLED = 1,
	KVT_CODE_UNKNOWN = 2,
	KVT_CODE_INVALID_ARGUMENT = 3,
	KVT_CODE_DEADLINE_EXCEEDED = 4,
	KVT_CODE_NOT_FOUND = 5,
	KVT_CODE_ALREADY_EXISTS = 6,
	KVT_CODE_PERMISSION_DENIED = 7,
	KVT_CODE_RESOURCE_EXHAUSTED = 8,
	KVT_CODE_FAILED_PRECONDITION = 9,
	KVT_CODE_ABORTED = 10,
	KVT_CODE_OUT_OF_RANGE = 11,
	KVT_CODE_UNIMPLEMENTED = 12,
	KVT_CODE_INTERNAL = 13,
	KVT_CODE_UNAVAILABLE = 14,
	KVT_CODE_DATA_LOSS = 15,
	KVT_CODE_UNAUTHENTICATED = 16,
};

struct kvt_client_status {
	int code;           /* enum kvt_client_code */
	int local;          /* 1 when the library produced the status without a server answer */
	char message[256];
};

/* "INVALID_ARGUMENT", ... ; "UNKNOWN_CODE" for anything else. */
const char *kvt_client_code_name(int code);
/* OK 0, CANCELLED -ECANCELED, INVALID_ARGUMENT -EINVAL, DEADLINE_EXCEEDED -ETIMEDOUT,
 * NOT_FOUND -ENOENT, ALREADY_EXISTS -EEXIST, PERMISSION_DENIED -EACCES, RESOURCE_EXHAUSTED
 * -ENOSPC, FAILED_PRECONDITION -EBUSY, ABORTED -ECONNABORTED, OUT_OF_RANGE -ERANGE,
 * UNIMPLEMENTED -ENOSYS, INTERNAL -EPROTO, UNAVAILABLE -ENOTCONN, DATA_LOSS -EBADMSG,
 * UNAUTHENTICATED -EPERM, anything else -EIO. */
int kvt_client_errno_from_code(int code);

enum kvt_client_dtype {
	KVT_CLIENT_DTYPE_DEFAULT = 0, /* "the session's dtype" where the request allows it */
	KVT_CLIENT_DTYPE_F16 = 1,
	KVT_CLIENT_DTYPE_BF16 = 2,
	KVT_CLIENT_DTYPE_F32 = 3,
};
size_t kvt_client_dtype_size(uint32_t dtype); /* 2, 2, 4; 0 when unknown */

/* The wire's Scheme numbering (note: not kvt_codec.h's enum kvt_scheme). */
enum kvt_client_scheme {
	KVT_CLIENT_SCHEME_DEFAULT = 0,
	KVT_CLIENT_SCHEME_NONE = 1,
	KVT_CLIENT_SCHEME_KIVI = 2,
	KVT_CLIENT_SCHEME_HADAMARD = 3,
	KVT_CLIENT_SCHEME_OSCAR = 4,
};

/*
 * A session's codec. In requests, a field left at its "unset" value takes the daemon's
 * default: scheme 0, the u32 fields 0, and -1 for the fields where 0 is meaningful (rotate_v,
 * n_sinks, pin_detect_max, recent_exact_tokens) and for pin_detect_ratio; preset "" and
 * key_rounding "" are unset (the proto's CodecConfig.key_rounding says what unset means).
 * kvt_client_codec_init() sets all unset. A preset ("kvtier-int2", "oscar-int2": the
 * proto's CodecConfig.preset) supplies the fields left unset instead of the daemon's
 * defaults. In SessionInfo results every field holds the effective value, and preset the
 * name of the preset the codec equals ("" when none).
 */
struct kvt_client_codec {
	uint32_t scheme;
	uint32_t key_bits;
	uint32_t value_bits;
	uint32_t group;
	uint32_t chunk_tokens;
	int32_t rotate_v;
	int32_t n_sinks;
	int32_t pin_detect_max;
	float pin_detect_ratio;
	int32_t recent_exact_tokens; /* W: 0 or chunk_tokens..1024 (-1 unset) */
	char preset[32];
	char key_rounding[16];       /* "minmax" or "mse" ("" unset; added last) */
};
void kvt_client_codec_init(struct kvt_client_codec *codec);

struct kvt_client_session_params {
	const char *session_id;
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t dtype;
	struct kvt_client_codec codec;
	int64_t ttl_seconds;  /* -1: daemon default; 0: never expires */
	int pinned;           /* -1: leave out; 0 / 1 */
	const char *tier;     /* NULL: the daemon's gpu_default_tier; "host" or "gpu" */
};
/* Shape fields as given, codec unset, ttl -1, pinned -1, tier NULL. */
void kvt_client_session_params_init(struct kvt_client_session_params *p, const char *session_id,
				    uint32_t n_layers, uint32_t n_kv_heads, uint32_t head_dim,
				    uint32_t dtype);

struct kvt_client_session_info {
	char session_id[KVT_CLIENT_SESSION_ID_MAX + 1];
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t dtype;
	struct kvt_client_codec codec;
	uint64_t n_tokens;
	uint32_t n_chunks;
	uint32_t tail_tokens;
	uint64_t bytes_held;
	uint64_t logical_bytes;
	double bits_per_element;
	int pinned;
	uint32_t ttl_seconds;
	uint64_t idle_ms;
	int created;
	char tier[16];
};

/* ---- Connection --------------------------------------------------------------------------- */

struct kvt_client_options {
	const char *target;          /* "unix:/path/to.sock", "unix:rel/path", "127.0.0.1:7070" */
	uint32_t connect_timeout_ms; /* 0: 5000. kvt_client_connect waits this long for READY */
	uint32_t call_timeout_ms;    /* 0: 60000. The deadline of every call without its own */
	uint32_t max_message_bytes;  /* 0: 4 MiB. Messages we send stay below it */
	uint32_t max_receive_bytes;  /* 0: 16 MiB. Largest message accepted from the server */
	const char *bearer_token;    /* NULL: none. Sent as "authorization: Bearer <token>" */
	int lazy;                    /* 1: do not wait for READY in kvt_client_connect */
	/* 1: this client gets a connection of its own. 0 (default): gRPC shares one connection
	 * between every client of the process with the same target and options, so their calls
	 * are multiplexed on one HTTP/2 transport. */
	int own_connection;
	/* How kvt_client_fetch decodes a range whose decode_local is KVT_CLIENT_FETCH_DEFAULT:
	 * KVT_CLIENT_FETCH_LOCAL or KVT_CLIENT_FETCH_SERVER; KVT_CLIENT_FETCH_DEFAULT (0): the
	 * environment's KVTIER_CLIENT_FETCH ("local" or "server", read at connect; anything
	 * else is an INVALID_ARGUMENT error of kvt_client_connect), else local. (Added last.) */
	int fetch_mode;
};

/* kvt_client_fetch_range.decode_local and kvt_client_options.fetch_mode. */
enum kvt_client_fetch_mode {
	KVT_CLIENT_FETCH_SERVER = -1,
	KVT_CLIENT_FETCH_DEFAULT = 0,
	KVT_CLIENT_FETCH_LOCAL = 1,
};

struct kvt_client;

/* Creates the channel and (unless lazy) waits until it is READY or the connect timeout
 * passes: -ETIMEDOUT (status UNAVAILABLE) when the daemon does not answer in time. */
int kvt_client_connect(const struct kvt_client_options *opts, struct kvt_client **out,
		       struct kvt_client_status *st);
void kvt_client_close(struct kvt_client *c);
/* The effective max_message_bytes (what append splitting aims below). */
uint32_t kvt_client_max_message_bytes(const struct kvt_client *c);

/* grpc.health.v1.Health/Check. service "" is the whole server. *serving gets the
 * ServingStatus (1 = SERVING, 2 = NOT_SERVING). timeout_ms 0: the client's default. */
int kvt_client_health(struct kvt_client *c, const char *service, uint32_t timeout_ms,
		      int *serving, struct kvt_client_status *st);

/* ---- Session management (unary) ----------------------------------------------------------- */

int kvt_client_open(struct kvt_client *c, const struct kvt_client_session_params *p,
		    struct kvt_client_session_info *info, struct kvt_client_status *st);
/* n_tokens KVT_CLIENT_END: the whole source. ttl_seconds -1 and pinned -1: leave out. */
int kvt_client_fork(struct kvt_client *c, const char *source_id, const char *new_id,
		    uint64_t n_tokens, int64_t ttl_seconds, int pinned,
		    struct kvt_client_session_info *info, struct kvt_client_status *st);
int kvt_client_truncate(struct kvt_client *c, const char *session_id, uint64_t n_tokens,
			struct kvt_client_session_info *info, struct kvt_client_status *st);
int kvt_client_drop(struct kvt_client *c, const char *session_id, uint64_t *bytes_freed,
		    struct kvt_client_status *st);
int kvt_client_pin(struct kvt_client *c, const char *session_id,
		   struct kvt_client_session_info *info, struct kvt_client_status *st);
int kvt_client_unpin(struct kvt_client *c, const char *session_id,
		     struct kvt_client_session_info *info, struct kvt_client_status *st);
int kvt_client_set_ttl(struct kvt_client *c, const char *session_id, uint32_t ttl_seconds,
		       struct kvt_client_session_info *info, struct kvt_client_status *st);
int kvt_client_stat(struct kvt_client *c, const char *session_id,
		    struct kvt_client_session_info *info, struct kvt_client_status *st);
/* Every session whose id starts with prefix (NULL or "": all), following pages. *out is
 * malloc'd (free with free()), *n its length. */
int kvt_client_list(struct kvt_client *c, const char *prefix,
		    struct kvt_client_session_info **out, size_t *n,
		    struct kvt_client_status *st);
/* One page (page_size 0: server default). next_token (>= 256 bytes) gets "" on the last page. */
int kvt_client_list_page(struct kvt_client *c, const char *prefix, uint32_t page_size,
			 const char *page_token, struct kvt_client_session_info **out, size_t *n,
			 char *next_token, size_t next_token_len, struct kvt_client_status *st);
/* Prefetch hint; tier (may be NULL, >= 16 bytes) gets where the session now lives. */
int kvt_client_prefetch(struct kvt_client *c, const char *session_id, char *tier,
			size_t tier_len, struct kvt_client_status *st);

/* ---- Append (client streaming) ------------------------------------------------------------ */

/* The shape of a KV tensor: what append/fetch need to cut or place blocks. */
struct kvt_client_shape {
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t dtype;
};

struct kvt_client_append_result {
	uint64_t n_tokens;      /* session length after the append */
	uint64_t appended;
	uint32_t chunks_sealed;
	uint32_t messages_sent; /* how many stream messages the library used */
};

struct kvt_client_append_opts {
	uint64_t token_begin;       /* KVT_CLIENT_END: no guard; else the expected session length */
	uint32_t max_message_bytes; /* 0: the client's; a smaller value forces more splitting */
	uint32_t max_batch_tokens;  /* 0: as many tokens per batch as fit */
	uint32_t timeout_ms;        /* 0: the client's call timeout */
	/* Fault injection for tests (0 = off): after this many messages, cancel the call
	 * (cancel_after) or half-close it without sending the rest (close_after). */
	uint32_t cancel_after;
	uint32_t close_after;
};
void kvt_client_append_opts_init(struct kvt_client_append_opts *o);

/*
 * Appends n_tokens tokens of every layer: k and v are [shape.n_layers][n_tokens][H][d] in
 * shape.dtype. Splits into token batches, and a batch into layer ranges when one batch of all
 * layers exceeds the message limit (the AppendRequest rule). opts may be NULL. Atomic on the
 * server: the tokens join the session only when the whole stream succeeds.
 */
int kvt_client_append(struct kvt_client *c, const char *session_id,
		      const struct kvt_client_shape *shape, const void *k, const void *v,
		      uint32_t n_tokens, const struct kvt_client_append_opts *opts,
		      struct kvt_client_append_result *res, struct kvt_client_status *st);

/* One KvBlock exactly as sent: the raw form, for callers that cut blocks themselves (and for
 * tests that send malformed ones). has_* = 0 leaves the field out of the message. */
struct kvt_client_block {
	int has_token_begin;
	uint64_t token_begin;
	uint32_t n_tokens;
	uint32_t layer_begin;
	uint32_t n_layers;
	uint32_t dtype;             /* 0: left out */
	const void *k;
	size_t k_bytes;
	const void *v;
	size_t v_bytes;
	int has_k, has_v;           /* set by kvt_client_block_init to 1; 0 leaves the field out */
};
/* Zeroes b and marks k and v present. */
void kvt_client_block_init(struct kvt_client_block *b);
/* Sends the blocks as one Append stream, session_id on the first message only (NULL: never).
 * Only opts->timeout_ms / cancel_after / close_after apply. */
int kvt_client_append_blocks(struct kvt_client *c, const char *session_id,
			     const struct kvt_client_block *blocks, size_t n_blocks,
			     const struct kvt_client_append_opts *opts,
			     struct kvt_client_append_result *res, struct kvt_client_status *st);

/* ---- Fetch (server streaming) ------------------------------------------------------------- */

struct kvt_client_fetch_range {
	uint64_t token_begin;        /* 0 */
	uint64_t token_end;          /* KVT_CLIENT_END: the session's length */
	uint32_t layer_begin;        /* 0 */
	uint32_t layer_end;          /* KVT_CLIENT_ALL_LAYERS: all */
	uint32_t dtype;              /* 0: the session's */
	uint32_t max_message_bytes;  /* 0: server default */
	uint32_t timeout_ms;         /* 0: client default */
	int raw;                     /* 1: send the fields exactly as given (tests); no Stat */
	/* Where the range is decoded (enum kvt_client_fetch_mode). KVT_CLIENT_FETCH_LOCAL:
	 * here (FetchEncoded of the chunks overlapping the token range plus the range's exact
	 * tail tokens, the chunks decoded by this library's codec into k_out / v_out): the same
	 * bytes as the daemon's decode, a fifth of the transfer at 2 bits, the decode's CPU in
	 * the caller's thread instead of the shared daemon's. KVT_CLIENT_FETCH_SERVER: the
	 * daemon decodes (the Fetch RPC). KVT_CLIENT_FETCH_DEFAULT (0, what init sets): the
	 * client's mode (kvt_client_options.fetch_mode, else $KVTIER_CLIENT_FETCH, else
	 * local). A range with max_message_bytes set, or raw, always uses the Fetch RPC.
	 * Errors are the same either way: a request the daemon would reject is re-sent as a
	 * Fetch so the status is the daemon's own. */
	int decode_local;
};
void kvt_client_fetch_range_init(struct kvt_client_fetch_range *r);

struct kvt_client_fetch_result {
	uint64_t token_begin, token_end;
	uint32_t layer_begin, layer_end;
	uint32_t dtype;
	size_t k_bytes, v_bytes;   /* bytes written to each output */
	uint32_t messages;         /* replies received: Fetch's, or FetchEncoded's when local */
	uint32_t decoded_locally;  /* 1: FetchEncoded, decoded here; 0: the daemon's Fetch */
};

/*
 * Fetches K and V of a token range and layer range into k_out / v_out ([layers][tokens][H][d]
 * in the requested dtype; either may be NULL). Defaults (token_end END, layer_end ALL, dtype 0)
 * are resolved with one Stat first unless range->raw; a fully explicit range costs one call.
 * -ENOSPC when a buffer is smaller than the range (checked on the first reply, before anything
 * is written; the call is cancelled); -EPROTO when the server's blocks do not tile the range.
 * range may be NULL (everything).
 */
int kvt_client_fetch(struct kvt_client *c, const char *session_id,
		     const struct kvt_client_fetch_range *range, void *k_out, size_t k_cap,
		     void *v_out, size_t v_cap, struct kvt_client_fetch_result *res,
		     struct kvt_client_status *st);
/* Bytes one of K or V of the range takes: layers x tokens x H x d x dtype size. */
size_t kvt_client_kv_bytes(const struct kvt_client_shape *shape, uint64_t n_tokens);

/* ---- FetchEncoded / StoreEncoded ---------------------------------------------------------- */

struct kvt_client_encoded_chunk {
	uint32_t chunk_index;
	size_t n_bytes;
	uint8_t *bytes;             /* the chunk exactly as stored (kernels/kvt_codec.h layout) */
};

/* A session as stored: its info, its sealed chunks, then its exact tail. */
struct kvt_client_encoded {
	struct kvt_client_session_info info;
	size_t n_chunks;
	struct kvt_client_encoded_chunk *chunks;
	uint64_t tail_token_begin;
	uint32_t tail_tokens;
	void *tail_k, *tail_v;      /* [L][tail_tokens][H][d] in info.dtype (NULL when empty) */
};
void kvt_client_encoded_free(struct kvt_client_encoded *enc);

/* chunk_end KVT_CLIENT_ALL_CHUNKS: all sealed chunks. *out is allocated (free with
 * kvt_client_encoded_free). */
int kvt_client_fetch_encoded(struct kvt_client *c, const char *session_id,
			     uint32_t chunk_begin, uint32_t chunk_end, int include_tail,
			     struct kvt_client_encoded **out, struct kvt_client_status *st);
/* Opens `open` (a new or empty session of the same shape and codec) and stores enc into it:
 * chunk pieces under the message limit, then the tail in blocks. */
int kvt_client_store_encoded(struct kvt_client *c, const struct kvt_client_session_params *open,
			     const struct kvt_client_encoded *enc,
			     struct kvt_client_session_info *info, struct kvt_client_status *st);

/* ---- Attend ------------------------------------------------------------------------------- */

struct kvt_client_attend_item {
	const char *session_id;
	uint32_t layer;
	uint32_t n_q_heads;
	float softmax_scale;        /* 0: left out (server default 1/sqrt(head_dim)) */
	const float *q;             /* f32 [n_q_heads][head_dim] */
	size_t q_bytes;
	const void *new_k, *new_v;  /* optional new token of this layer ([H][d], session dtype) */
	size_t new_k_bytes, new_v_bytes;
	/* outputs */
	float *out;                 /* f32 [n_q_heads][head_dim] */
	size_t out_cap;             /* bytes */
	size_t out_bytes;
	uint64_t n_tokens_attended;
};

/* One AttendRequest with all items; their outputs are written into each item. */
int kvt_client_attend(struct kvt_client *c, struct kvt_client_attend_item *items,
		      size_t n_items, uint32_t timeout_ms, struct kvt_client_status *st);

/* ---- RestoreToDevice ---------------------------------------------------------------------- */

/* Decodes a session straight into a worker's GPU buffers (same node, CUDA IPC). The handles
 * are the worker's cudaIpcMemHandle_t bytes; fields mirror RestoreToDeviceRequest. */
struct kvt_client_restore {
	const char *session_id;
	const void *ipc_mem_handle;     /* 64 bytes */
	size_t ipc_mem_handle_bytes;
	const void *ipc_mem_handle_v;   /* NULL: V lives in the K allocation */
	size_t ipc_mem_handle_v_bytes;
	uint64_t k_offset_bytes, v_offset_bytes, buffer_bytes;
	uint32_t layout;                /* 1 contiguous, 2 paged */
	uint32_t block_size;            /* paged */
	const uint32_t *block_table;
	size_t n_block_table;
	uint64_t token_begin, token_end; /* token_end KVT_CLIENT_END: all */
	uint32_t layer_begin, layer_end; /* layer_end KVT_CLIENT_ALL_LAYERS: all */
	uint32_t dtype;                 /* f16 or bf16; 0: the session's */
	int32_t device_ordinal;         /* -1: left out (the daemon's device); else must match */
	uint64_t layer_stride_bytes;    /* 0: left out (contiguous default; paged: required
					 * with more than one layer) */
};
struct kvt_client_restore_result {
	uint64_t n_tokens, bytes_written, elapsed_us;
};
int kvt_client_restore_to_device(struct kvt_client *c, const struct kvt_client_restore *r,
				 struct kvt_client_restore_result *res,
				 struct kvt_client_status *st);
/*
 * The same, given device pointers of this process: k_dev is where row 0 of layer
 * r->layer_begin of K goes (v_dev the same for V; NULL: V follows K at r->v_offset_bytes of
 * K's allocation). The library exports each allocation's CUDA IPC handle itself
 * (kvt_cuda_ipc_export) and fills ipc_mem_handle(_v), k/v_offset_bytes and buffer_bytes (the
 * larger of the two allocations; the daemon checks each against its true size); the other
 * fields of r are used as given. The memory must come from cudaMalloc (PyTorch's caching
 * allocator does, unless expandable segments are on). -ENOTSUP (status FAILED_PRECONDITION)
 * when libkvtier was built without CUDA; -EINVAL when a pointer is not exportable device
 * memory.
 */
int kvt_client_restore_to_device_ptr(struct kvt_client *c, const struct kvt_client_restore *r,
				     const void *k_dev, const void *v_dev,
				     struct kvt_client_restore_result *res,
				     struct kvt_client_status *st);

/* ---- Stats -------------------------------------------------------------------------------- */

struct kvt_client_tier_stats {
	char name[16];
	uint64_t capacity_bytes;
	uint64_t used_bytes;
	uint64_t chunks;
};
struct kvt_client_counter {
	char name[96];
	uint64_t value;
};
struct kvt_client_stats {
	uint64_t sessions, tokens, bytes_held, logical_bytes;
	size_t n_tiers;
	struct kvt_client_tier_stats tiers[8];
	size_t n_counters;
	struct kvt_client_counter *counters; /* malloc'd */
	char version[64];
	uint64_t uptime_ms;
	char codec_isa[16];
	int gpu;
};
int kvt_client_stats(struct kvt_client *c, struct kvt_client_stats *out,
		     struct kvt_client_status *st);
void kvt_client_stats_free(struct kvt_client_stats *s);
/* The counter's value, or 0 when absent. */
uint64_t kvt_client_stats_counter(const struct kvt_client_stats *s, const char *name);

#ifdef __cplusplus
}
#endif
#endif

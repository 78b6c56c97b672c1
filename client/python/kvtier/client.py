"""The kvtier Python client: every kvtier.v1.KvTier RPC and grpc.health.v1 Check over grpcio.

Tensors are numpy arrays [layer][token][kv_head][dim] in the session's wire dtype (f16 as
float16, bf16 as uint16 bit patterns, f32 as float32; see kvtier.arrays). Large transfers are
split into messages below the message limit (4 MiB by default, the daemon's default), as the
contract asks. A Client is safe to share between threads: grpcio channels are thread-safe and
the client's only own state, a cache of session shapes, is behind a lock.

Every failed RPC raises KvtierError with the gRPC status code and the daemon's message.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Iterable, Iterator, Sequence

import grpc
import numpy as np

from . import _proto
from .arrays import DTYPE_NAMES, as_wire, dtype_code, dtype_size, from_wire, np_dtype

DEFAULT_TARGET = "unix:./run/kvtierd.sock"
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
# Room left in every message for the framing around the tensor bytes (ids, offsets, tags):
# a few hundred bytes in practice; 4 KiB keeps clear of the limit with any session id.
_MESSAGE_OVERHEAD_BYTES = 4096

SCHEMES = {"default": 0, "none": 1, "kivi": 2, "hadamard": 3, "oscar": 4}
SCHEME_NAMES = {v: k for k, v in SCHEMES.items()}
_CODEC_KEYS = ("scheme", "key_bits", "value_bits", "group", "chunk_tokens", "rotate_v",
               "n_sinks", "pin_detect_ratio", "pin_detect_max", "recent_exact_tokens", "preset",
               "key_rounding")
# How the encoder picks key scales (kernels/kvt_codec.h enum kvt_rounding); codec key
# "key_rounding".
KEY_ROUNDINGS = ("minmax", "mse")
# Named codec settings the daemon knows (kernels/kvt_codec.h); codec={"preset": name}.
PRESETS = ("kvtier-int2", "oscar-int2")


class KvtierError(Exception):
    """A failed RPC: ``code`` is the grpc.StatusCode, ``message`` the daemon's text (it names
    the field and the limit), ``method`` the RPC's name."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = ""):
        self.code = code
        self.message = message
        self.method = method
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        super().__init__(f"{method}: {name}: {message}" if method else f"{name}: {message}")


def _wrap(e: grpc.RpcError, method: str) -> KvtierError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return KvtierError(code, details or "", method)


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """kvtier.v1.SessionInfo; a field the daemon left absent is None."""
    session_id: str | None
    n_layers: int | None
    n_kv_heads: int | None
    head_dim: int | None
    dtype: str | None
    codec: dict | None
    n_tokens: int | None
    n_chunks: int | None
    tail_tokens: int | None
    bytes_held: int | None
    logical_bytes: int | None
    bits_per_element: float | None
    pinned: bool | None
    ttl_seconds: int | None
    idle_ms: int | None
    created: bool | None
    tier: str | None

    @classmethod
    def from_proto(cls, m) -> "SessionInfo":
        def opt(name):
            return getattr(m, name) if m.HasField(name) else None

        dt = opt("dtype")
        return cls(
            session_id=opt("session_id"), n_layers=opt("n_layers"), n_kv_heads=opt("n_kv_heads"),
            head_dim=opt("head_dim"), dtype=DTYPE_NAMES.get(dt, dt) if dt is not None else None,
            codec=codec_to_dict(m.codec) if m.HasField("codec") else None,
            n_tokens=opt("n_tokens"), n_chunks=opt("n_chunks"), tail_tokens=opt("tail_tokens"),
            bytes_held=opt("bytes_held"), logical_bytes=opt("logical_bytes"),
            bits_per_element=opt("bits_per_element"), pinned=opt("pinned"),
            ttl_seconds=opt("ttl_seconds"), idle_ms=opt("idle_ms"), created=opt("created"),
            tier=opt("tier"))


@dataclasses.dataclass
class Stats:
    """kvtier.v1.StatsResponse with counters as a dict name -> value."""
    sessions: int
    tokens: int
    bytes_held: int
    logical_bytes: int
    tiers: list[dict]
    counters: dict[str, int]
    version: str
    uptime_ms: int
    codec_isa: str
    gpu: bool


@dataclasses.dataclass
class EncodedSession:
    """FetchEncoded's output: the source's SessionInfo, its sealed chunks (bytes exactly as
    stored, kernels/CHUNK_FORMAT.md) by chunk index, and the exact tail as numpy arrays
    [layer][tail_token][kv_head][dim] (None when include_tail was false or the tail was
    not sent) starting at session position tail_token_begin."""
    info: SessionInfo | None
    chunks: list[bytes]
    chunk_begin: int
    tail_k: np.ndarray | None
    tail_v: np.ndarray | None
    tail_token_begin: int | None

    @property
    def encoded_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def codec_to_dict(c) -> dict:
    out: dict[str, Any] = {}
    for key in _CODEC_KEYS:
        if c.HasField(key):
            val = getattr(c, key)
            out[key] = SCHEME_NAMES.get(val, val) if key == "scheme" else val
    return out


def _codec_to_proto(pb, codec: dict | None):
    msg = pb.CodecConfig()
    if not codec:
        return msg
    codec = dict(codec)
    if "bits" in codec:  # shorthand for the same width on keys and values
        bits = codec.pop("bits")
        codec.setdefault("key_bits", bits)
        codec.setdefault("value_bits", bits)
    for key, val in codec.items():
        if key not in _CODEC_KEYS:
            raise ValueError(f"codec key {key!r} is not one of {', '.join(_CODEC_KEYS + ('bits',))}")
        if val is None:
            continue
        if key == "scheme":
            if isinstance(val, str):
                try:
                    val = SCHEMES[val.lower()]
                except KeyError:
                    raise ValueError(f"codec scheme {val!r} is not one of {', '.join(SCHEMES)}") from None
            msg.scheme = int(val)
        elif key == "rotate_v":
            msg.rotate_v = bool(val)
        elif key == "pin_detect_ratio":
            msg.pin_detect_ratio = float(val)
        elif key == "preset":
            msg.preset = str(val)
        elif key == "key_rounding":
            if val not in KEY_ROUNDINGS:
                raise ValueError(f"codec key_rounding {val!r} is not one of {', '.join(KEY_ROUNDINGS)}")
            msg.key_rounding = str(val)
        else:
            setattr(msg, key, int(val))
    return msg


def _range(r, what: str) -> tuple[int | None, int | None]:
    if r is None:
        return None, None
    if isinstance(r, slice):
        if r.step not in (None, 1):
            raise ValueError(f"{what} slice step must be 1")
        return r.start, r.stop
    a, b = r
    return a, b


def _set_ranges(req, tokens, layers) -> tuple[int | None, int | None, int | None, int | None]:
    """Sets a request's token_begin/_end and layer_begin/_end from `tokens` and `layers`
    (None, a (begin, end) pair or a slice; a None bound leaves the field unset: the daemon's
    default) and returns (t0, t1, l0, l1)."""
    t0, t1 = _range(tokens, "tokens")
    l0, l1 = _range(layers, "layers")
    for field, value in (("token_begin", t0), ("token_end", t1), ("layer_begin", l0),
                         ("layer_end", l1)):
        if value is not None:
            setattr(req, field, value)
    return t0, t1, l0, l1


class Client:
    """A connection to one kvtierd.

    target: a gRPC target, e.g. "unix:./run/kvtierd.sock", "unix:///run/kvtier/kvtierd.sock",
        "host:7070". timeout: default deadline of every call in seconds (None = no deadline).
    max_message_bytes: the largest message this client sends or accepts; must not exceed the
        daemon's max_message_bytes. token: bearer token (sent as "authorization: Bearer ...").
    credentials: grpc.ChannelCredentials for TLS (None = plaintext; the daemon allows that on
        its unix socket and on loopback listeners marked insecure).
    """

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = 30.0, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = ()):
        if max_message_bytes < 64 << 10:
            raise ValueError(f"max_message_bytes {max_message_bytes} is below 65536")
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = int(max_message_bytes)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        opts = [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]
        opts += list(options)
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._pb = _proto.kvtier_pb2()
        self._health_pb = _proto.health_pb2()
        self._methods = self._bind(self._pb, "KvTier")
        self._methods.update(self._bind(self._health_pb, "Health"))
        self._shapes: dict[str, tuple[int, int, int, int]] = {}
        self._shapes_lock = threading.Lock()
        try:  # sent with RestoreToDevice (the worker named there is this process)
            self._pid_ns: int | None = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            self._pid_ns = None

    # -- plumbing ----------------------------------------------------------------------------

    def _bind(self, module, service: str) -> dict:
        """Multicallables for every method of a service, from its descriptor."""
        svc = module.DESCRIPTOR.services_by_name[service]
        out = {}
        for m in svc.methods:
            path = f"/{svc.full_name}/{m.name}"
            req = getattr(module, m.input_type.name)
            resp = getattr(module, m.output_type.name)
            kind = {(False, False): self._channel.unary_unary,
                    (True, False): self._channel.stream_unary,
                    (False, True): self._channel.unary_stream,
                    (True, True): self._channel.stream_stream}[(m.client_streaming, m.server_streaming)]
            out[m.name] = kind(path, request_serializer=req.SerializeToString,
                               response_deserializer=resp.FromString)
        return out

    def _call(self, method: str, request, timeout=None):
        t = self.timeout if timeout is None else timeout
        try:
            return self._methods[method](request, timeout=t, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _wrap(e, method) from None

    def _stream_out(self, method: str, request, timeout=None) -> Iterator:
        t = self.timeout if timeout is None else timeout
        call = self._methods[method](request, timeout=t, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise _wrap(e, method) from None
        finally:
            call.cancel()  # no-op once complete; stops the stream if the caller gave up

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel connects (raises KvtierError UNAVAILABLE after timeout)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise KvtierError(grpc.StatusCode.UNAVAILABLE,
                              f"no connection to {self.target} within {timeout} s") from None

    def _remember(self, info: SessionInfo) -> SessionInfo:
        if info.session_id is not None and None not in (info.n_layers, info.n_kv_heads,
                                                         info.head_dim, info.dtype):
            with self._shapes_lock:
                self._shapes[info.session_id] = (info.n_layers, info.n_kv_heads, info.head_dim,
                                                 dtype_code(info.dtype))
        return info

    def _forget(self, session_id: str) -> None:
        with self._shapes_lock:
            self._shapes.pop(session_id, None)

    def _shape(self, session_id: str, refresh: bool = False) -> tuple[int, int, int, int]:
        with self._shapes_lock:
            s = None if refresh else self._shapes.get(session_id)
        if s is None:
            info = self.stat(session_id)
            s = (info.n_layers, info.n_kv_heads, info.head_dim, dtype_code(info.dtype))
        return s

    def _info(self, msg) -> SessionInfo:
        return self._remember(SessionInfo.from_proto(msg))

    @property
    def _budget(self) -> int:
        return self.max_message_bytes - _MESSAGE_OVERHEAD_BYTES

    # -- sessions ----------------------------------------------------------------------------

    def open_session(self, session_id: str, n_layers: int, n_kv_heads: int, head_dim: int,
                     dtype="f16", codec: dict | None = None, *, ttl_seconds: int | None = None,
                     pinned: bool | None = None, tier: str | None = None,
                     timeout=None) -> SessionInfo:
        """Creates the session or opens the existing one with the same shape and codec
        (info.created says which). tier: "host" or "gpu" (GPU-resident when the daemon has
        a GPU tier; info.tier says where the chunks live), None: the daemon's policy. codec: dict with keys scheme ('none', 'kivi',
        'hadamard', 'oscar', 'default'), key_bits, value_bits (2, 3, 4 or 8; or bits for both), group,
        chunk_tokens, rotate_v, n_sinks, pin_detect_ratio, pin_detect_max,
        recent_exact_tokens (the exact recent window W: 0 or chunk_tokens..1024), key_rounding
        ('minmax' or 'mse': how key scales are chosen) and preset
        (a named setting, one of PRESETS, that supplies the absent keys); absent keys take
        the daemon's defaults (its default codec is the preset 'kvtier-int2')."""
        pb = self._pb
        req = pb.OpenSessionRequest(session_id=session_id, n_layers=n_layers,
                                    n_kv_heads=n_kv_heads, head_dim=head_dim,
                                    dtype=dtype_code(dtype))
        if codec is not None:
            req.codec.CopyFrom(_codec_to_proto(pb, codec))
        if ttl_seconds is not None:
            req.ttl_seconds = ttl_seconds
        if pinned is not None:
            req.pinned = pinned
        if tier is not None:
            req.tier = tier
        return self._info(self._call("OpenSession", req, timeout))

    def fork(self, source_session_id: str, new_session_id: str, n_tokens: int | None = None, *,
             ttl_seconds: int | None = None, pinned: bool | None = None,
             timeout=None) -> SessionInfo:
        req = self._pb.ForkRequest(source_session_id=source_session_id,
                                   new_session_id=new_session_id)
        if n_tokens is not None:
            req.n_tokens = n_tokens
        if ttl_seconds is not None:
            req.ttl_seconds = ttl_seconds
        if pinned is not None:
            req.pinned = pinned
        return self._info(self._call("Fork", req, timeout))

    def truncate(self, session_id: str, n_tokens: int, timeout=None) -> SessionInfo:
        req = self._pb.TruncateRequest(session_id=session_id, n_tokens=n_tokens)
        return self._info(self._call("Truncate", req, timeout))

    def drop(self, session_id: str, timeout=None) -> int:
        """Drops the session; returns the bytes freed."""
        self._forget(session_id)
        resp = self._call("DropSession", self._pb.DropSessionRequest(session_id=session_id), timeout)
        return resp.bytes_freed

    def pin(self, session_id: str, timeout=None) -> SessionInfo:
        return self._info(self._call("Pin", self._pb.PinRequest(session_id=session_id), timeout))

    def unpin(self, session_id: str, timeout=None) -> SessionInfo:
        return self._info(self._call("Unpin", self._pb.PinRequest(session_id=session_id), timeout))

    def set_ttl(self, session_id: str, ttl_seconds: int, timeout=None) -> SessionInfo:
        req = self._pb.SetTtlRequest(session_id=session_id, ttl_seconds=ttl_seconds)
        return self._info(self._call("SetTtl", req, timeout))

    def stat(self, session_id: str, timeout=None) -> SessionInfo:
        req = self._pb.StatSessionRequest(session_id=session_id)
        return self._info(self._call("StatSession", req, timeout))

    def list_sessions(self, prefix: str | None = None, page_size: int | None = None,
                      timeout=None) -> list[SessionInfo]:
        """Every session (of this tenant) whose id starts with prefix, following pages."""
        out: list[SessionInfo] = []
        for page in self.list_pages(prefix, page_size, timeout=timeout):
            out.extend(page)
        return out

    def list_pages(self, prefix: str | None = None, page_size: int | None = None, *,
                   page_token: str | None = None, timeout=None) -> Iterator[list[SessionInfo]]:
        """ListSessions one page at a time."""
        token = page_token
        while True:
            req = self._pb.ListSessionsRequest()
            if prefix is not None:
                req.prefix = prefix
            if page_size is not None:
                req.page_size = page_size
            if token:
                req.page_token = token
            resp = self._call("ListSessions", req, timeout)
            yield [self._info(s) for s in resp.sessions]
            token = resp.next_page_token
            if not token:
                return

    # -- data --------------------------------------------------------------------------------

    def _blocks(self, k: np.ndarray, v: np.ndarray, code: int, token_begin: int | None):
        """KvBlocks of a [L][T][H][d] batch, each below the message budget: batches of
        tokens over all layers, or, when one token of every layer does not fit, batches of
        tokens split over consecutive messages by layers (the AppendRequest rule)."""
        pb = self._pb
        n_layers, n_tok, h, d = k.shape
        per = h * d * dtype_size(code) * 2  # K and V of one token of one layer
        budget = self._budget
        if n_layers * per <= budget:
            tpm = max(1, min(n_tok, budget // (n_layers * per)))
            lpm = n_layers
        else:
            tpm = max(1, min(n_tok, budget // per))
            lpm = max(1, budget // (tpm * per))
        if n_tok == 0:
            return
        for t0 in range(0, n_tok, tpm):
            t1 = min(n_tok, t0 + tpm)
            for l0 in range(0, n_layers, lpm):
                l1 = min(n_layers, l0 + lpm)
                blk = pb.KvBlock(n_tokens=t1 - t0, layer_begin=l0, n_layers=l1 - l0, dtype=code,
                                 k=k[l0:l1, t0:t1].tobytes(), v=v[l0:l1, t0:t1].tobytes())
                if token_begin is not None:
                    blk.token_begin = token_begin + t0
                yield blk

    def append(self, session_id: str, k, v, *, dtype=None, token_begin: int | None = None,
               timeout=None) -> dict:
        """Appends K and V of new tokens, arrays [layers][tokens][kv_heads][dim] (all layers
        of the session). dtype overrides the arrays' own (uint16 means bf16 bits). With
        token_begin, the daemon checks it equals the session's length (a lost-append
        guard). Atomic. Returns dict(n_tokens=, appended=, chunks_sealed=)."""
        k, code = as_wire(k, dtype)
        v, vcode = as_wire(v, code)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k {k.shape} and v {v.shape} must both be [layers][tokens][kv_heads][dim]")
        pb = self._pb

        def requests():
            first = True
            for blk in self._blocks(k, v, code, token_begin):
                yield pb.AppendRequest(session_id=session_id, block=blk)
                first = False
            if first:  # no tokens: one message naming the session, so the daemon can answer
                yield pb.AppendRequest(session_id=session_id)

        resp = self._call("Append", requests(), timeout)
        return {"n_tokens": resp.n_tokens, "appended": resp.appended,
                "chunks_sealed": resp.chunks_sealed}

    def fetch(self, session_id: str, tokens=None, layers=None, dtype=None, *,
              max_message_bytes: int | None = None, timeout=None) -> tuple[np.ndarray, np.ndarray]:
        """Decoded K and V of tokens [a, b) and layers [a, b) (None = all; a slice or a pair;
        either end None = default) in dtype (None = the session's), original basis, as
        numpy arrays [layers][tokens][kv_heads][dim]."""
        pb = self._pb
        req = pb.FetchRequest(session_id=session_id)
        t0, t1, l0, l1 = _set_ranges(req, tokens, layers)
        if dtype is not None:
            req.dtype = dtype_code(dtype)
        req.max_message_bytes = max_message_bytes or self.max_message_bytes
        blocks = list(self._stream_out("Fetch", req, timeout))
        return self._assemble(session_id, blocks, t0, t1, l0, l1, dtype)

    def _assemble(self, session_id, blocks, t0, t1, l0, l1, dtype):
        """Places KvBlocks into [L][T][H][d] arrays; checks they tile the range exactly."""
        n_layers_s, h, d, sdt = self._shape(session_id)
        code = dtype_code(dtype) if dtype is not None else None
        for b in blocks:
            if b.HasField("dtype"):
                if code is None:
                    code = b.dtype
                elif b.dtype != code:
                    raise KvtierError(grpc.StatusCode.INTERNAL,
                                      f"Fetch block dtype {b.dtype} differs from {code}", "Fetch")
        if code is None:
            code = sdt
        tb = t0 if t0 is not None else min((b.token_begin for b in blocks), default=0)
        te = t1 if t1 is not None else max((b.token_begin + b.n_tokens for b in blocks), default=tb)
        lb = l0 if l0 is not None else 0
        le = l1 if l1 is not None else n_layers_s
        shape = (le - lb, te - tb, h, d)
        k = np.empty(shape, dtype=np_dtype(code))
        v = np.empty_like(k)
        covered = np.zeros(shape[:2], dtype=np.int32)
        for b in blocks:
            bl, bt = b.layer_begin - lb, b.token_begin - tb
            n_l, n_t = b.n_layers, b.n_tokens
            if bl < 0 or bt < 0 or bl + n_l > shape[0] or bt + n_t > shape[1]:
                raise KvtierError(grpc.StatusCode.INTERNAL,
                                  f"Fetch block tokens [{b.token_begin}, +{n_t}) layers "
                                  f"[{b.layer_begin}, +{n_l}) is outside the request", "Fetch")
            k[bl:bl + n_l, bt:bt + n_t] = from_wire(b.k, code, (n_l, n_t, h, d))
            v[bl:bl + n_l, bt:bt + n_t] = from_wire(b.v, code, (n_l, n_t, h, d))
            covered[bl:bl + n_l, bt:bt + n_t] += 1
        if covered.size and not (covered == 1).all():
            raise KvtierError(grpc.StatusCode.INTERNAL,
                              "Fetch blocks do not cover the requested range exactly once", "Fetch")
        return k, v

    def fetch_encoded(self, session_id: str, chunk_begin: int | None = None,
                      chunk_end: int | None = None, include_tail: bool | None = None, *,
                      timeout=None) -> EncodedSession:
        """Sealed chunks exactly as stored, then the exact tail (unless include_tail=False)."""
        pb = self._pb
        req = pb.FetchEncodedRequest(session_id=session_id)
        if chunk_begin is not None:
            req.chunk_begin = chunk_begin
        if chunk_end is not None:
            req.chunk_end = chunk_end
        if include_tail is not None:
            req.include_tail = include_tail
        info = None
        parts: dict[int, bytearray] = {}
        totals: dict[int, int] = {}
        tails = []
        for piece in self._stream_out("FetchEncoded", req, timeout):
            if piece.HasField("session"):
                info = self._info(piece.session)
            which = piece.WhichOneof("piece")
            if which == "chunk":
                c = piece.chunk
                buf = parts.setdefault(c.chunk_index, bytearray())
                totals.setdefault(c.chunk_index, c.total_bytes)
                if c.offset != len(buf) or c.total_bytes != totals[c.chunk_index]:
                    raise KvtierError(grpc.StatusCode.INTERNAL,
                                      f"chunk {c.chunk_index} piece at offset {c.offset} "
                                      f"(have {len(buf)} of {totals[c.chunk_index]} bytes)",
                                      "FetchEncoded")
                buf += c.data
            elif which == "tail":
                tails.append(piece.tail)
        idx = sorted(parts)
        first = idx[0] if idx else (chunk_begin or 0)
        if idx != list(range(first, first + len(idx))):
            raise KvtierError(grpc.StatusCode.INTERNAL, f"chunk indices {idx} are not consecutive",
                              "FetchEncoded")
        for i in idx:
            if len(parts[i]) != totals[i]:
                raise KvtierError(grpc.StatusCode.INTERNAL,
                                  f"chunk {i} has {len(parts[i])} of {totals[i]} bytes", "FetchEncoded")
        tail_k = tail_v = tail_begin = None
        if tails:
            tail_begin = min(b.token_begin for b in tails)
            end = max(b.token_begin + b.n_tokens for b in tails)
            tail_k, tail_v = self._assemble(session_id, tails, tail_begin, end, None, None, None)
        return EncodedSession(info=info, chunks=[bytes(parts[i]) for i in idx], chunk_begin=first,
                              tail_k=tail_k, tail_v=tail_v, tail_token_begin=tail_begin)

    def store_encoded(self, session_id: str, encoded: EncodedSession, *,
                      codec: dict | None = None, ttl_seconds: int | None = None,
                      pinned: bool | None = None, timeout=None) -> SessionInfo:
        """Rebuilds a session named session_id from fetch_encoded's output (shape and codec
        from encoded.info unless codec is given)."""
        pb = self._pb
        src = encoded.info
        if src is None:
            raise ValueError("encoded.info is None: the source's shape and codec are unknown")
        open_req = pb.OpenSessionRequest(session_id=session_id, n_layers=src.n_layers,
                                         n_kv_heads=src.n_kv_heads, head_dim=src.head_dim,
                                         dtype=dtype_code(src.dtype))
        c = codec if codec is not None else src.codec
        if c is not None:
            open_req.codec.CopyFrom(_codec_to_proto(pb, c))
        if ttl_seconds is not None:
            open_req.ttl_seconds = ttl_seconds
        if pinned is not None:
            open_req.pinned = pinned
        budget = self._budget

        def requests():
            yield pb.StoreEncodedRequest(open=open_req)
            for n, chunk in enumerate(encoded.chunks):
                i = encoded.chunk_begin + n
                for off in range(0, len(chunk), budget):
                    piece = pb.EncodedPiece(chunk=pb.ChunkPiece(
                        chunk_index=i, offset=off, total_bytes=len(chunk),
                        data=chunk[off:off + budget]))
                    yield pb.StoreEncodedRequest(piece=piece)
            if encoded.tail_k is not None and encoded.tail_k.shape[1]:
                tk, code = as_wire(encoded.tail_k, src.dtype)
                tv, _ = as_wire(encoded.tail_v, code)
                for blk in self._blocks(tk, tv, code, encoded.tail_token_begin):
                    yield pb.StoreEncodedRequest(piece=pb.EncodedPiece(tail=blk))

        return self._info(self._call("StoreEncoded", requests(), timeout))

    def attend(self, items: Iterable[dict], *, with_counts: bool = False, timeout=None) -> list:
        """A batch of decode-attention steps. Each item is a dict: session_id, layer, q
        (array [n_q_heads][head_dim], float32 after conversion, post-RoPE), optional
        softmax_scale, optional new_k / new_v ([kv_heads][head_dim] in the session dtype: the
        new token for this layer, staged until every layer has received it). Returns the
        outputs, float32 arrays [n_q_heads][head_dim] in item order (with with_counts, pairs
        (out, n_tokens_attended)). Items go in as few requests as the message limit allows,
        in order."""
        pb = self._pb
        msgs, shapes = [], []
        for it in items:
            q = np.ascontiguousarray(np.asarray(it["q"], dtype=np.float32))
            if q.ndim != 2:
                raise ValueError(f"q must be [n_q_heads][head_dim], got shape {q.shape}")
            m = pb.AttendItem(session_id=it["session_id"], layer=int(it["layer"]),
                              n_q_heads=q.shape[0], q=q.tobytes())
            if it.get("softmax_scale") is not None:
                m.softmax_scale = float(it["softmax_scale"])
            if it.get("new_k") is not None or it.get("new_v") is not None:
                if it.get("new_k") is None or it.get("new_v") is None:
                    raise ValueError("new_k and new_v go together")
                nk, code = as_wire(it["new_k"], it.get("dtype"))
                nv, _ = as_wire(it["new_v"], code)
                m.new_k = nk.tobytes()
                m.new_v = nv.tobytes()
            msgs.append(m)
            shapes.append(q.shape)
        out = []
        batch, size = [], 0
        batches = []
        for m in msgs:
            s = m.ByteSize() + 16
            if batch and size + s > self._budget:
                batches.append(batch)
                batch, size = [], 0
            batch.append(m)
            size += s
        if batch:
            batches.append(batch)
        for b in batches:
            resp = self._call("Attend", pb.AttendRequest(items=b), timeout)
            if len(resp.results) != len(b):
                raise KvtierError(grpc.StatusCode.INTERNAL,
                                  f"Attend returned {len(resp.results)} results for {len(b)} items",
                                  "Attend")
            for r in resp.results:
                shape = shapes[len(out)]
                o = np.frombuffer(r.out, dtype="<f4")
                if o.size != shape[0] * shape[1]:
                    raise KvtierError(grpc.StatusCode.INTERNAL,
                                      f"Attend result of {len(r.out)} bytes for q {shape}", "Attend")
                o = o.reshape(shape).astype(np.float32)
                out.append((o, r.n_tokens_attended) if with_counts else o)
        return out

    # -- GPU ---------------------------------------------------------------------------------

    def restore_to_device_handle(self, session_id: str, ipc_mem_handle: bytes, *,
                                 buffer_bytes: int, k_offset_bytes: int = 0,
                                 v_offset_bytes: int = 0, ipc_mem_handle_v: bytes | None = None,
                                 layout: str = "contiguous", block_size: int | None = None,
                                 block_table: Sequence[int] | None = None, tokens=None,
                                 layers=None, dtype=None, layer_stride_bytes: int | None = None,
                                 device_ordinal: int | None = None, timeout=None) -> dict:
        """RestoreToDevice with the fields as the wire has them (an exported
        cudaIpcMemHandle_t, offsets into the allocation, buffer_bytes). layout "contiguous"
        ([layer][token][kv_head][dim] from each offset) or "paged" (every layer's pool is
        [n_blocks][block_size][kv_head][dim]; token t goes to block block_table[t //
        block_size]). Returns {n_tokens, bytes_written, elapsed_us}."""
        pb = self._pb
        lay = {"contiguous": pb.DEVICE_LAYOUT_CONTIGUOUS, "paged": pb.DEVICE_LAYOUT_PAGED}
        if layout not in lay:
            raise ValueError(f"layout must be 'contiguous' or 'paged', not {layout!r}")
        req = pb.RestoreToDeviceRequest(session_id=session_id, ipc_mem_handle=bytes(ipc_mem_handle),
                                        k_offset_bytes=k_offset_bytes, v_offset_bytes=v_offset_bytes,
                                        buffer_bytes=buffer_bytes, layout=lay[layout])
        if ipc_mem_handle_v is not None:
            req.ipc_mem_handle_v = bytes(ipc_mem_handle_v)
        if block_size is not None:
            req.block_size = block_size
        if block_table is not None:
            req.block_table.extend(int(b) for b in block_table)
        _set_ranges(req, tokens, layers)
        if dtype is not None:
            req.dtype = dtype_code(dtype)
        if layer_stride_bytes is not None:
            req.layer_stride_bytes = layer_stride_bytes
        if device_ordinal is not None:
            req.device_ordinal = device_ordinal
        # this process exported the handles: the daemon drops its mappings once it is gone
        req.worker_pid = os.getpid()
        if self._pid_ns is not None:
            req.worker_pid_ns = self._pid_ns
        r = self._call("RestoreToDevice", req, timeout)
        return {"n_tokens": r.n_tokens, "bytes_written": r.bytes_written,
                "elapsed_us": r.elapsed_us}

    def restore_to_device(self, session_id: str, k, v=None, *, layout: str = "contiguous",
                          block_size: int | None = None, block_table: Sequence[int] | None = None,
                          tokens=None, layers=None, dtype=None,
                          layer_stride_bytes: int | None = None, v_offset_bytes: int = 0,
                          timeout=None) -> dict:
        """Decodes a session straight into this process's GPU memory (kvtierd on the same
        node and GPU). k, v: torch CUDA tensors (f16 / bf16; dtype taken from them) or raw
        device pointers (ints; give dtype). k is where row 0 of the first restored layer of K
        goes, v the same for V; v None: V follows K at v_offset_bytes of K's allocation. The
        allocation's IPC handle is exported here (kvtier.cuda_ipc, ctypes on libcuda); the
        daemon caches its mapping. Shapes are not read from the tensors: the layout
        arguments describe the buffer (see restore_to_device_handle)."""
        from . import cuda_ipc

        kp, kdev, kdt = cuda_ipc.describe(k)
        hk, ko, kb = cuda_ipc.export(kp, kdev)
        args = dict(ipc_mem_handle=hk, k_offset_bytes=ko, buffer_bytes=kb)
        vdt = None
        if v is not None:
            vp, vdev, vdt = cuda_ipc.describe(v)
            hv, vo, vb = cuda_ipc.export(vp, vdev)
            if hv != hk:
                args["ipc_mem_handle_v"] = hv
            args["v_offset_bytes"] = vo
            args["buffer_bytes"] = max(kb, vb)
        else:
            args["v_offset_bytes"] = ko + v_offset_bytes
        if kdt and vdt and kdt != vdt:
            raise ValueError(f"k is {kdt} and v is {vdt}")
        dt = dtype if dtype is not None else (kdt or vdt)
        return self.restore_to_device_handle(session_id, layout=layout, block_size=block_size,
                                             block_table=block_table, tokens=tokens,
                                             layers=layers, dtype=dt,
                                             layer_stride_bytes=layer_stride_bytes,
                                             timeout=timeout, **args)

    # -- node --------------------------------------------------------------------------------

    def prefetch(self, session_id: str, timeout=None) -> str:
        return self._call("Prefetch", self._pb.PrefetchRequest(session_id=session_id), timeout).tier

    def stats(self, timeout=None) -> Stats:
        r = self._call("Stats", self._pb.StatsRequest(), timeout)
        return Stats(sessions=r.sessions, tokens=r.tokens, bytes_held=r.bytes_held,
                     logical_bytes=r.logical_bytes,
                     tiers=[{"name": t.name, "capacity_bytes": t.capacity_bytes,
                             "used_bytes": t.used_bytes, "chunks": t.chunks} for t in r.tiers],
                     counters={c.name: c.value for c in r.counters}, version=r.version,
                     uptime_ms=r.uptime_ms, codec_isa=r.codec_isa, gpu=r.gpu)

    def health(self, service: str = "", timeout=None) -> str:
        """grpc.health.v1 Check: 'SERVING', 'NOT_SERVING', ... ('' = the whole server,
        'kvtier.v1.KvTier' = the API)."""
        hp = self._health_pb
        r = self._call("Check", hp.HealthCheckRequest(service=service), timeout)
        return hp.HealthCheckResponse.ServingStatus.Name(r.status)

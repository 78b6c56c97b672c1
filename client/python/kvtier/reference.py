"""A numpy reference of the OScaR codec and kvtier's chunk format, written from the
specification (OSCAR.md section 2, kernels/kvt_codec.h, kernels/CHUNK_FORMAT.md), not from
the C code, so the two can check each other.

What is here:
- hadamard(x): the orthonormal Sylvester-Hadamard transform on the last axis (fp32 butterflies).
- joint_norms(k_rot): one fp32 norm per token over all heads and channels.
- quant_params / quantize / dequantize: asymmetric min/max quantization, round half to even,
  a float zero offset, scales and zeros stored as f16 (bf16 for bf16 inputs).
- encode_chunk(cfg, first_token, k, v) -> bytes in the chunk format (header, pin table, layer
  sections, crc32c); parse_chunk(bytes) -> ChunkView; decode_chunk(bytes) -> (k, v).
- attend(q, chunks, tail_k, tail_v, layer): one decode-attention step over encoded chunks
  computed in the rotated basis (OSCAR.md section 3), a reference for the daemon's Attend.
- roundtrip(cfg, k, v): what a session returns for a whole K/V (sealed chunks decoded, the
  tail < B exact), for evaluating codecs on real model data without a daemon.

Configs are dicts with the keys of struct kvt_codec_config (scheme as 'none' | 'kivi' |
'hadamard' | 'oscar' or its enum value, dtype as 'f16' | 'bf16' | 'f32' or its enum value);
make_config() fills kvtier's defaults. Tensors are [layer][token][kv_head][dim]; bf16 is
uint16 bit patterns (kvtier.arrays).

Everything is computed in fp32 where the C code computes in fp32 (transforms, norms, the
quantizer's divisions), so codes agree with the C encoder except where a value sits within
rounding of a code boundary; decoded values agree within rounding.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

from .arrays import (DTYPE_BF16, DTYPE_F16, DTYPE_F32, as_wire, dtype_code, f32_to_bf16,
                     from_f32, np_dtype, to_f32)

SCHEME_NONE, SCHEME_KIVI, SCHEME_HADAMARD, SCHEME_OSCAR = 0, 1, 2, 3  # enum kvt_scheme
_SCHEMES = {"none": SCHEME_NONE, "kivi": SCHEME_KIVI, "hadamard": SCHEME_HADAMARD,
            "oscar": SCHEME_OSCAR}
SCHEME_NAMES = {v: k for k, v in _SCHEMES.items()}
ROUNDING_MINMAX, ROUNDING_MSE = 0, 1  # enum kvt_rounding (config key key_rounding)
_ROUNDINGS = {"minmax": ROUNDING_MINMAX, "mse": ROUNDING_MSE}

CHUNK_MAGIC = 0x4354564B  # "KVTC"
CHUNK_VERSION = 1
HEADER_BYTES = 64
ALIGN = 64
# struct kvt_chunk_header, little-endian, with the compiler's padding before first_token.
_HEADER = struct.Struct("<IHHBBBBBBHHHHHHH4xQIIQI4s")
assert _HEADER.size == HEADER_BYTES
_CRC_OFFSET = 56


# ---- configuration ---------------------------------------------------------------------------

def make_config(n_layers, n_kv_heads, head_dim, dtype="f16", **kw) -> dict:
    """kvtier's defaults (oscar, 2/2 bits, G 32, B 128, rotate_v, S 4, detection off),
    overridden by kw (keys of struct kvt_codec_config; bits= sets both widths)."""
    cfg = dict(scheme=SCHEME_OSCAR, key_bits=2, value_bits=2, group=32, chunk_tokens=128,
               n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
               dtype=dtype_code(dtype), rotate_v=1, n_sinks=4, pin_detect_max=0,
               pin_detect_ratio=0.0, key_rounding=ROUNDING_MINMAX)
    if "bits" in kw:
        b = kw.pop("bits")
        kw.setdefault("key_bits", b)
        kw.setdefault("value_bits", b)
    for key, val in kw.items():
        if key not in cfg:
            raise ValueError(f"config key {key!r} is not one of {', '.join(cfg)}")
        cfg[key] = val
    return normalize_config(cfg)


def normalize_config(cfg: dict) -> dict:
    """Enum values for scheme and dtype, ints elsewhere, the fields scheme none ignores
    zeroed (key_bits/value_bits 16, rotate_v 0, no sinks in its chunks); checks the ranges
    of kvt_codec_config_validate()."""
    c = dict(cfg)
    s = c["scheme"]
    c["scheme"] = _SCHEMES[s.lower()] if isinstance(s, str) else int(s)
    c["dtype"] = dtype_code(c["dtype"])
    for k in ("key_bits", "value_bits", "group", "chunk_tokens", "n_layers", "n_kv_heads",
              "head_dim", "rotate_v", "n_sinks", "pin_detect_max"):
        c[k] = int(c.get(k, 0) or 0)
    c["pin_detect_ratio"] = float(c.get("pin_detect_ratio", 0.0) or 0.0)
    r = c.get("key_rounding", ROUNDING_MINMAX) or ROUNDING_MINMAX
    c["key_rounding"] = _ROUNDINGS[r] if isinstance(r, str) else int(r)
    if c["key_rounding"] not in _ROUNDINGS.values():
        raise ValueError(f"key_rounding {r!r} is not one of minmax (0), mse (1)")
    if c["scheme"] not in SCHEME_NAMES:
        raise ValueError(f"scheme {c['scheme']} is not one of none, kivi, hadamard, oscar")
    if c["head_dim"] not in (64, 128, 256):
        raise ValueError(f"head_dim {c['head_dim']} is not one of 64, 128, 256")
    if not 1 <= c["n_layers"] <= 256 or not 1 <= c["n_kv_heads"] <= 64:
        raise ValueError("n_layers must be 1..256 and n_kv_heads 1..64")
    if c["group"] not in (32, 64, 128):
        raise ValueError(f"group {c['group']} is not one of 32, 64, 128")
    b = c["chunk_tokens"]
    if not 32 <= b <= 1024 or b % c["group"]:
        raise ValueError(f"chunk_tokens {b} is not a multiple of group {c['group']} in 32..1024")
    if c["scheme"] == SCHEME_NONE:
        c["key_bits"] = c["value_bits"] = 16
        c["rotate_v"] = 0
        if c["key_rounding"] != ROUNDING_MINMAX:
            raise ValueError("key_rounding mse needs a quantizing scheme")
    else:
        for k in ("key_bits", "value_bits"):
            if c[k] not in (2, 3, 4, 8):
                raise ValueError(f"{k} {c[k]} is not one of 2, 3, 4, 8")
        if c["scheme"] == SCHEME_KIVI and c["rotate_v"]:
            raise ValueError("rotate_v must be 0 for kivi")
    if not 0 <= c["n_sinks"] <= min(64, b):
        raise ValueError(f"n_sinks {c['n_sinks']} is not in 0..{min(64, b)}")
    return c


def scale_dtype(cfg) -> int:
    return DTYPE_BF16 if cfg["dtype"] == DTYPE_BF16 else DTYPE_F16


def value_group(cfg) -> int:
    return min(cfg["group"], cfg["head_dim"])


# ---- the transforms ----------------------------------------------------------------------------

def inv_sqrt_dim(d: int) -> np.float32:
    """1/sqrt(d) computed in double and rounded once to fp32."""
    return np.float32(1.0 / np.sqrt(float(d)))


def hadamard(x, mult=None, dtype=np.float32) -> np.ndarray:
    """x <- H_d x on the last axis (d a power of two), H[i][j] = (-1)^popcount(i&j)/sqrt(d):
    fp32 butterflies (pairs j, j+h for h = 1, 2, 4, ...), then one fp32 multiply by mult
    (default 1/sqrt(d); a broadcastable array, e.g. norm/sqrt(d) per token, folds a
    scaling into the same multiply). Self-inverse with the default mult. dtype float64 gives
    a more exact transform for references that accumulate in double."""
    y = np.array(x, dtype=dtype, copy=True)
    d = y.shape[-1]
    assert d >= 1 and d & (d - 1) == 0, f"hadamard: d {d} is not a power of two"
    lead = y.shape[:-1]
    h = 1
    while h < d:
        y = y.reshape(lead + (d // (2 * h), 2, h))
        a = y[..., 0, :]
        b = y[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2)
        h *= 2
    y = y.reshape(lead + (d,))
    if dtype != np.float32:
        return y * (1.0 / np.sqrt(d) if mult is None else np.asarray(mult, dtype=dtype))
    m = inv_sqrt_dim(d) if mult is None else np.asarray(mult, dtype=np.float32)
    return (y * m).astype(np.float32)


def sylvester(d) -> np.ndarray:
    """The d x d orthonormal Sylvester-Hadamard matrix, from its definition (for tests)."""
    i = np.arange(d)
    pc = np.vectorize(lambda n: bin(n).count("1"))(i[:, None] & i[None, :])
    return np.where(pc % 2 == 0, 1.0, -1.0) / np.sqrt(d)


def sumsq8(x) -> np.ndarray:
    """Sum of squares over the last axis (a multiple of 8) in fp32 with 8 lanes, lane i
    taking elements i, i+8, ..., combined ((0+4)+(2+6))+((1+5)+(3+7)): the fixed order of
    the C kernels, so norms agree with theirs bit for bit."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    assert n % 8 == 0, n
    xs = x.reshape(x.shape[:-1] + (n // 8, 8))
    acc = np.zeros(x.shape[:-1] + (8,), dtype=np.float32)
    for i in range(n // 8):
        sq = xs[..., i, :] * xs[..., i, :]
        acc = acc + sq
    a = acc
    return (((a[..., 0] + a[..., 4]) + (a[..., 2] + a[..., 6]))
            + ((a[..., 1] + a[..., 5]) + (a[..., 3] + a[..., 7]))).astype(np.float32)


def joint_norms(k_rot) -> np.ndarray:
    """[..., T, H, d] -> [..., T] fp32: one norm per token over all heads and channels
    (OSCAR.md 2.2); 1 where the norm is 0 or not finite."""
    k = np.asarray(k_rot, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        n = np.sqrt(sumsq8(k.reshape(k.shape[:-2] + (-1,))))
    return np.where((n == 0) | ~np.isfinite(n), np.float32(1.0), n).astype(np.float32)


# ---- the quantizer -----------------------------------------------------------------------------

def _round16(x, sdt):
    """fp32 -> the 16-bit scale dtype (round to nearest even): (bits as uint16, the fp32
    value those bits hold)."""
    x = np.asarray(x, dtype=np.float32)
    if sdt == DTYPE_BF16:
        bits = f32_to_bf16(x)
        return bits, to_f32(bits, DTYPE_BF16)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def quant_params(mn, mx, bits, sdt=DTYPE_F16):
    """Per-group parameters from the group's min and max (OSCAR.md 2.4, with the order of
    rounding CHUNK_FORMAT.md fixes): scale = (mx - mn) / qmax is rounded to the 16-bit scale
    dtype first, zq = rint(-mn / scale) uses the stored scale, zero = -zq * scale is rounded
    and stored, so the codes are computed against exactly what decode reads. A group with
    mn == mx == 0 uses (-1, 1); a constant group (or a scale that rounds to 0) stores scale 0
    and zero = mn. Returns (scale_bits, zero_bits, scale, zero): uint16 patterns and their
    fp32 values."""
    qmax = np.float32(2 ** bits - 1)
    mn = np.asarray(mn, dtype=np.float32)
    mx = np.asarray(mx, dtype=np.float32)
    both0 = (mn == 0) & (mx == 0)
    mn = np.where(both0, np.float32(-1), mn).astype(np.float32)
    mx = np.where(both0, np.float32(1), mx).astype(np.float32)
    varying = mx > mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sb, s = _round16(np.where(varying, (mx - mn) / qmax, np.float32(0)), sdt)
        ok = varying & (s != 0)
        s_safe = np.where(ok, s, np.float32(1)).astype(np.float32)
        zq = np.rint((-mn) / s_safe).astype(np.float32)
        zb_ok, z_ok = _round16((-zq) * s_safe, sdt)
        zb_c, z_c = _round16(mn, sdt)
    scale_bits = np.where(ok, sb, np.uint16(0)).astype(np.uint16)
    scale = np.where(ok, s, np.float32(0)).astype(np.float32)
    zero_bits = np.where(ok, zb_ok, zb_c).astype(np.uint16)
    zero = np.where(ok, z_ok, z_c).astype(np.float32)
    return scale_bits, zero_bits, scale, zero


def quantize(x, scale, zero, bits) -> np.ndarray:
    """Codes against the stored (scale, zero), broadcast: clamp(rint((x - zero) / scale), 0,
    qmax); 0 where scale is 0 and for NaN."""
    qmax = np.float32(2 ** bits - 1)
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint((x - zero) / np.where(scale == 0, np.float32(1), scale))
    r = np.where(r > 0, r, np.float32(0))  # NaN -> 0, like the C comparisons
    r = np.where(r < qmax, r, qmax)
    return np.where(scale == 0, np.float32(0), r).astype(np.uint8)


def dequantize(codes, scale, zero) -> np.ndarray:
    """x^ = code * scale + zero in fp32 (scale and zero as stored)."""
    return (np.asarray(codes).astype(np.float32) * np.asarray(scale, dtype=np.float32)
            + np.asarray(zero, dtype=np.float32)).astype(np.float32)


def pack(codes, bits) -> np.ndarray:
    """[..., d] codes -> [..., d*bits/8] bytes; channel c at byte c // (8/bits), bits
    (c % (8/bits)) * bits. 3 bits: two planes, bytes [0, d/4) the low 2 bits of every code
    as a 2-bit row, bytes [d/4, 3d/8) the high bit (channel c at bit c % 8 of byte
    d/4 + c/8)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 3:
        d = codes.shape[-1]
        hi = (codes >> np.uint8(2)) & np.uint8(1)
        g = hi.reshape(codes.shape[:-1] + (d // 8, 8)).astype(np.uint16)
        hib = np.bitwise_or.reduce(g << np.arange(8, dtype=np.uint16), axis=-1).astype(np.uint8)
        return np.concatenate([pack(codes & np.uint8(3), 2), hib], axis=-1)
    per = 8 // bits
    d = codes.shape[-1]
    g = codes.reshape(codes.shape[:-1] + (d // per, per)).astype(np.uint16)
    shifts = (np.arange(per, dtype=np.uint16) * bits)
    return np.bitwise_or.reduce(g << shifts, axis=-1).astype(np.uint8)


def unpack(packed, bits, d) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8)
    if bits == 3:
        lo = unpack(p[..., : d // 4], 2, d)
        hb = p[..., d // 4: 3 * d // 8]
        hi = (hb[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
        return (lo | (hi.reshape(p.shape[:-1] + (d,)) << np.uint8(2))).astype(np.uint8)
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    c = (p[..., None] >> shifts) & np.uint8(2 ** bits - 1)
    return c.reshape(p.shape[:-1] + (d,)).astype(np.uint8)


# ---- chunk layout ------------------------------------------------------------------------------

def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def chunk_layout(cfg, n_pinned: int) -> dict:
    """Byte offsets inside one layer section and sizes (struct kvt_chunk_layout)."""
    cfg = normalize_config(cfg)
    B, H, d, G = cfg["chunk_tokens"], cfg["n_kv_heads"], cfg["head_dim"], cfg["group"]
    gv, ws = value_group(cfg), np.dtype(np_dtype(cfg["dtype"])).itemsize
    lay = dict(header_bytes=HEADER_BYTES, pin_table_bytes=_align(2 * n_pinned),
               norms_bytes=0, k_scale_bytes=0, v_scale_bytes=0, exact_bytes=0)
    lay["data_offset"] = HEADER_BYTES + lay["pin_table_bytes"]
    s = cfg["scheme"]
    if s == SCHEME_NONE:
        lay["k_codes_bytes"] = lay["v_codes_bytes"] = H * B * d * ws
    else:
        if s in (SCHEME_KIVI, SCHEME_OSCAR):
            lay["k_scale_bytes"] = H * (B // G) * d * 2
        else:
            lay["k_scale_bytes"] = H * B * (d // gv) * 2
        if s == SCHEME_OSCAR:
            lay["norms_bytes"] = 4 * B
        lay["v_scale_bytes"] = H * B * (d // gv) * 2
        lay["k_codes_bytes"] = H * B * d * cfg["key_bits"] // 8
        lay["v_codes_bytes"] = H * B * d * cfg["value_bits"] // 8
        lay["exact_bytes"] = n_pinned * H * d * ws
    off = 0
    for name, size in (("norms", "norms_bytes"), ("k_scale", "k_scale_bytes"),
                       ("k_zero", "k_scale_bytes"), ("v_scale", "v_scale_bytes"),
                       ("v_zero", "v_scale_bytes"), ("k_codes", "k_codes_bytes"),
                       ("v_codes", "v_codes_bytes"), ("k_exact", "exact_bytes"),
                       ("v_exact", "exact_bytes")):
        off = _align(off)
        lay[name + "_off"] = off
        off += lay[size]
    lay["layer_bytes"] = _align(off)
    lay["total_bytes"] = lay["data_offset"] + lay["layer_bytes"] * cfg["n_layers"]
    return lay


# ---- crc32c ------------------------------------------------------------------------------------

def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC_TABLE = _crc_table()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), the usual init/final inversion; crc chains calls."""
    c = crc ^ 0xFFFFFFFF
    t = _CRC_TABLE
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def chunk_crc(buf) -> int:
    b = bytes(buf)
    return crc32c(b[:_CRC_OFFSET] + b"\0\0\0\0" + b[_CRC_OFFSET + 4:])


# ---- encode ------------------------------------------------------------------------------------

def pinned_tokens(cfg, first_token: int, k) -> np.ndarray:
    """Chunk-relative offsets of the pinned tokens, ascending: the session's sinks (positions
    < n_sinks), plus, when detection is on, tokens whose key norm over all heads of a layer is
    below pin_detect_ratio x that layer's median over the chunk (mean of the two middle
    values) in any layer; a token's score is its lowest norm/median; at most pin_detect_max,
    lowest score first, ties to the lower token (CHUNK_FORMAT.md, Encoding 5)."""
    cfg = normalize_config(cfg)
    if cfg["scheme"] == SCHEME_NONE:
        return np.zeros(0, dtype=np.int64)
    B = cfg["chunk_tokens"]
    sinks = [t for t in range(B) if first_token + t < cfg["n_sinks"]]
    pins = set(sinks)
    ratio = np.float32(cfg["pin_detect_ratio"])
    if ratio > 0 and cfg["pin_detect_max"] > 0:
        L, H, d = cfg["n_layers"], cfg["n_kv_heads"], cfg["head_dim"]
        kf = to_f32(k, cfg["dtype"]).reshape(L, B, H * d)
        norms = np.sqrt(sumsq8(kf))  # [L][B], f32, the C kernels' summation order
        best = np.full(B, np.inf, dtype=np.float32)
        for layer in range(L):
            srt = np.sort(norms[layer])
            median = np.float32(0.5) * (srt[B // 2 - 1] + srt[B // 2])
            if not (median > 0) or not np.isfinite(median):
                continue  # a layer with no scale to compare against
            best = np.minimum(best, (norms[layer] / median).astype(np.float32))
        cand = sorted((float(best[t]), t) for t in range(B) if t not in pins and best[t] < ratio)
        pins.update(t for _, t in cand[: cfg["pin_detect_max"]])
    return np.array(sorted(pins), dtype=np.int64)


def encode_chunk(cfg, first_token: int, k, v, pins=None) -> bytes:
    """Encodes B tokens [n_layers][B][H][d] (wire dtype) starting at session position
    first_token into the chunk format. pins overrides the pinned-token choice (chunk
    offsets), e.g. to mirror the ones a C-encoded chunk recorded."""
    cfg = normalize_config(cfg)
    L, B, H, d = cfg["n_layers"], cfg["chunk_tokens"], cfg["n_kv_heads"], cfg["head_dim"]
    dt, s = cfg["dtype"], cfg["scheme"]
    k, _ = as_wire(k, dt)
    v, _ = as_wire(v, dt)
    if k.shape != (L, B, H, d) or v.shape != k.shape:
        raise ValueError(f"k {k.shape} / v {v.shape} are not [{L}][{B}][{H}][{d}]")
    pins = pinned_tokens(cfg, first_token, k) if pins is None else np.asarray(pins, dtype=np.int64)
    n_pinned = len(pins)
    lay = chunk_layout(cfg, n_pinned)
    sdt = scale_dtype(cfg)
    buf = bytearray(lay["total_bytes"])
    header = _HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, HEADER_BYTES, s, cfg["key_bits"],
                          cfg["value_bits"], dt, cfg["rotate_v"], sdt, cfg["group"], B, L, H, d,
                          n_pinned, cfg["n_sinks"], first_token, lay["layer_bytes"],
                          lay["data_offset"], lay["total_bytes"], 0, b"\0" * 4)
    buf[:HEADER_BYTES] = header
    buf[HEADER_BYTES:HEADER_BYTES + 2 * n_pinned] = pins.astype("<u2").tobytes()
    pinned = np.zeros(B, dtype=bool)
    pinned[pins] = True

    def put(layer, name, arr):
        start = lay["data_offset"] + layer * lay["layer_bytes"] + lay[name + "_off"]
        raw = np.ascontiguousarray(arr).tobytes()
        buf[start:start + len(raw)] = raw

    G, gv = cfg["group"], value_group(cfg)
    kb, vb = cfg["key_bits"], cfg["value_bits"]
    for layer in range(L):
        if s == SCHEME_NONE:
            put(layer, "k_codes", k[layer].transpose(1, 0, 2))  # [H][B][d]
            put(layer, "v_codes", v[layer].transpose(1, 0, 2))
            continue
        kf = to_f32(k[layer], dt).transpose(1, 0, 2)  # [H][B][d]
        vf = to_f32(v[layer], dt).transpose(1, 0, 2)
        if s in (SCHEME_HADAMARD, SCHEME_OSCAR):
            kf = hadamard(kf)
        if s == SCHEME_OSCAR:
            norms = joint_norms(kf.transpose(1, 0, 2))  # [B]
            kf = (kf / norms[None, :, None]).astype(np.float32)
            put(layer, "norms", norms.astype("<f4"))
        if cfg["rotate_v"]:
            vf = hadamard(vf)
        # keys
        if s in (SCHEME_KIVI, SCHEME_OSCAR):
            kc, ks, kz = _quant_channels(kf, pinned, G, kb, sdt)
            if cfg["key_rounding"] == ROUNDING_MSE:  # groups: G tokens of one channel
                def grp(a):
                    return a.reshape(H, B // G, G, d).transpose(0, 1, 3, 2).reshape(-1, G)
                skip = np.broadcast_to(pinned.reshape(1, B // G, 1, G), (H, B // G, d, G))
                c2, ks, kz = _mse_refine(grp(kf), skip.reshape(-1, G), grp(kc), ks, kz, kb, sdt)
                kc = c2.reshape(H, B // G, d, G).transpose(0, 1, 3, 2).reshape(H, B, d)
        else:
            kc, ks, kz = _quant_token_groups(kf, pinned, gv, kb, sdt)
            if cfg["key_rounding"] == ROUNDING_MSE:  # groups: gv channels of one token
                skip = np.broadcast_to(pinned.reshape(1, B, 1, 1), (H, B, d // gv, gv))
                c2, ks, kz = _mse_refine(kf.reshape(-1, gv), skip.reshape(-1, gv),
                                         kc.reshape(-1, gv), ks, kz, kb, sdt)
                kc = c2.reshape(H, B, d)
        vc, vs, vz = _quant_token_groups(vf, pinned, gv, vb, sdt)
        put(layer, "k_scale", ks)
        put(layer, "k_zero", kz)
        put(layer, "v_scale", vs)
        put(layer, "v_zero", vz)
        put(layer, "k_codes", pack(kc, kb))
        put(layer, "v_codes", pack(vc, vb))
        if n_pinned:
            put(layer, "k_exact", k[layer][pins])  # [n_pinned][H][d], original basis
            put(layer, "v_exact", v[layer][pins])
    struct.pack_into("<I", buf, _CRC_OFFSET, chunk_crc(buf))
    return bytes(buf)


def _seq_minmax(x, skip, axis):
    """min and max along axis the way the C loop takes them: m = v < m ? v : m in index order
    from +inf (max alike), skipping where skip is true (broadcast along axis). Equal to
    np.min/np.max except that the sign of a zero result is the first zero's."""
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, 0)
    skip = np.moveaxis(np.broadcast_to(skip, np.moveaxis(x, 0, axis).shape), axis, 0)
    mn = np.full(x.shape[1:], np.inf, dtype=np.float32)
    mx = np.full(x.shape[1:], -np.inf, dtype=np.float32)
    for i in range(x.shape[0]):
        v = x[i]
        mn = np.where(~skip[i] & (v < mn), v, mn)
        mx = np.where(~skip[i] & (v > mx), v, mx)
    return mn, mx


def _lane_minmax(x):
    """min and max over the last axis (a multiple of 8) the way the C kernels take them: 8
    lanes (lane j sees elements j, j+8, ... in order, m = v < m ? v : m), then lanes j and
    j+w combined for w = 4, 2, 1 as m_j < m_{j+w} ? m_j : m_{j+w}."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    xs = x.reshape(x.shape[:-1] + (n // 8, 8))
    mn = np.full(x.shape[:-1] + (8,), np.inf, dtype=np.float32)
    mx = np.full(x.shape[:-1] + (8,), -np.inf, dtype=np.float32)
    for i in range(n // 8):
        v = xs[..., i, :]
        mn = np.where(v < mn, v, mn)
        mx = np.where(v > mx, v, mx)
    w = 4
    while w >= 1:
        a, b = mn[..., :w], mn[..., w:2 * w]
        mn = np.concatenate([np.where(a < b, a, b), mn[..., w:]], axis=-1)
        a, b = mx[..., :w], mx[..., w:2 * w]
        mx = np.concatenate([np.where(a > b, a, b), mx[..., w:]], axis=-1)
        w //= 2
    return mn[..., 0], mx[..., 0]


def _quant_channels(x, pinned, G, bits, sdt):
    """Keys per channel over groups of G tokens. x [H][B][d]; pinned tokens are left out of
    min/max and get code 0 (a group with no unpinned token: scale 0, zero 0). Returns codes
    [H][B][d], scale/zero bits [H][B/G][d]."""
    H, B, d = x.shape
    xg = x.reshape(H, B // G, G, d)
    pg = pinned.reshape(1, B // G, G, 1)
    mn, mx = _seq_minmax(xg, pg, axis=2)
    empty = np.broadcast_to(pinned.reshape(B // G, G).all(axis=1)[None, :, None], mn.shape)
    mn = np.where(empty, np.float32(0), mn)
    mx = np.where(empty, np.float32(0), mx)
    sb, zb, s, z = quant_params(mn, mx, bits, sdt)
    sb = np.where(empty, np.uint16(0), sb)
    zb = np.where(empty, np.uint16(0), zb)
    codes = quantize(xg, s[:, :, None, :], z[:, :, None, :], bits)
    codes = np.where(pg, 0, codes).reshape(H, B, d).astype(np.uint8)
    return codes, sb.astype("<u2"), zb.astype("<u2")


def _quant_token_groups(x, pinned, gv, bits, sdt):
    """Per token over groups of gv channels of one head. x [H][B][d]. Returns codes
    [H][B][d], scale/zero bits [H][B][d/gv]; pinned tokens get codes, scales and zeros 0."""
    H, B, d = x.shape
    xg = x.reshape(H, B, d // gv, gv)
    mn, mx = _lane_minmax(xg) if gv % 8 == 0 else (xg.min(axis=3), xg.max(axis=3))
    sb, zb, s, z = quant_params(mn, mx, bits, sdt)
    codes = quantize(xg, s[..., None], z[..., None], bits).reshape(H, B, d)
    pb = pinned.reshape(1, B, 1)
    codes = np.where(pb, 0, codes).astype(np.uint8)
    sb = np.where(pb, np.uint16(0), sb)
    zb = np.where(pb, np.uint16(0), zb)
    return codes, sb.astype("<u2"), zb.astype("<u2")


def _mse_refine(x, skip, codes, sb, zb, bits, sdt):
    """key_rounding mse (CHUNK_FORMAT.md "Key rounding") on groups that min-max already
    quantized: x, skip, codes [N][n] (a group's elements in order along the last axis), sb,
    zb the min-max scale/zero bits (any shape of N elements). Tries the ranges [lo, hi] =
    [mn + r i/16, mx - r j/16], i, j = 0..4 in i-major order, zero at lo, skipping those that
    leave mn or mx more than half a stored step outside [lo, hi]; keeps the first one whose
    squared error (f32, summed in element order) is strictly below the best so far, min-max's
    first. Returns (codes, scale bits, zero bits) in the shapes given."""
    x = np.asarray(x, np.float32)
    N, n = x.shape
    shape = np.shape(sb)
    sb = np.asarray(sb, np.uint16).reshape(N).copy()
    zb = np.asarray(zb, np.uint16).reshape(N).copy()
    qmax = np.float32(2 ** bits - 1)
    mn = np.full(N, np.inf, np.float32)
    mx = np.full(N, -np.inf, np.float32)
    for i in range(n):  # v < m ? v : m in element order
        v = x[:, i]
        mn = np.where(~skip[:, i] & (v < mn), v, mn)
        mx = np.where(~skip[:, i] & (v > mx), v, mx)
    def widen(bits16):  # stored 16-bit scale/zero patterns -> their f32 values
        if sdt == DTYPE_BF16:
            return to_f32(bits16, DTYPE_BF16)
        return bits16.view(np.float16).astype(np.float32)

    s0 = widen(sb)
    z0 = widen(zb)
    active = ~skip.all(axis=1) & (s0 != 0)

    def sq_err(s, z):
        e = np.zeros(N, np.float32)
        s_safe = np.where(s > 0, s, np.float32(1)).astype(np.float32)
        for i in range(n):
            c = quantize(x[:, i], s_safe, z, bits).astype(np.float32)
            dl = (c * s_safe + z) - x[:, i]
            e = np.where(skip[:, i], e, e + dl * dl)
        return e

    with np.errstate(over="ignore", invalid="ignore"):
        best = sq_err(s0, z0)
        bs, bz, bsf, bzf = sb.copy(), zb.copy(), s0.copy(), z0.copy()
        r = mx - mn
        for i in range(5):
            for j in range(5):
                lo = mn + r * np.float32(i * 0.0625)
                hi = mx - r * np.float32(j * 0.0625)
                cs, sf = _round16((hi - lo) / qmax, sdt)
                cz, zf = _round16(lo, sdt)
                half = np.float32(0.5) * sf
                ok = (active & (hi > lo) & (sf > 0) & np.isfinite(sf) & np.isfinite(zf)
                      & (lo - mn <= half) & (mx - hi <= half))
                e = sq_err(sf, zf)
                better = ok & (e < best)
                best = np.where(better, e, best)
                bs = np.where(better, cs, bs)
                bz = np.where(better, cz, bz)
                bsf = np.where(better, sf, bsf)
                bzf = np.where(better, zf, bzf)
    changed = active & ((bs != sb) | (bz != zb))
    newc = quantize(x, np.where(changed, bsf, np.float32(1))[:, None], bzf[:, None], bits)
    codes = np.where(changed[:, None] & ~skip, newc, np.where(changed[:, None], 0, codes))
    return (codes.astype(np.uint8), bs.astype("<u2").reshape(shape),
            bz.astype("<u2").reshape(shape))


# ---- parse / decode ----------------------------------------------------------------------------

@dataclasses.dataclass
class ChunkView:
    """A parsed chunk: header fields, config, pins and each layer's arrays (unpacked)."""
    header: dict
    cfg: dict
    pins: np.ndarray
    layout: dict
    buf: bytes

    def _arr(self, layer, name, dtype, count):
        start = self.layout["data_offset"] + layer * self.layout["layer_bytes"] + self.layout[name + "_off"]
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start)

    def layer(self, layer: int) -> dict:
        """norms [B] (oscar), k_scale / k_zero / v_scale / v_zero as fp32 values,
        k_codes / v_codes unpacked [H][B][d] (or the exact tensors for scheme none),
        k_exact / v_exact [n_pinned][H][d] wire dtype."""
        c = self.cfg
        B, H, d, G = c["chunk_tokens"], c["n_kv_heads"], c["head_dim"], c["group"]
        gv, wd, sdt = value_group(c), np_dtype(c["dtype"]), scale_dtype(c)
        s = c["scheme"]
        out: dict = {}
        if s == SCHEME_NONE:
            out["k_codes"] = self._arr(layer, "k_codes", wd, H * B * d).reshape(H, B, d)
            out["v_codes"] = self._arr(layer, "v_codes", wd, H * B * d).reshape(H, B, d)
            return out
        if s == SCHEME_OSCAR:
            out["norms"] = self._arr(layer, "norms", "<f4", B)
        kshape = (H, B // G, d) if s in (SCHEME_KIVI, SCHEME_OSCAR) else (H, B, d // gv)
        for name, shape in (("k_scale", kshape), ("k_zero", kshape), ("v_scale", (H, B, d // gv)),
                            ("v_zero", (H, B, d // gv))):
            raw = self._arr(layer, name, "<u2", int(np.prod(shape))).reshape(shape)
            out[name] = to_f32(raw if sdt == DTYPE_BF16 else raw.view(np.float16), sdt)
        out["k_codes"] = unpack(self._arr(layer, "k_codes", np.uint8, H * B * d * c["key_bits"] // 8)
                                .reshape(H, B, d * c["key_bits"] // 8), c["key_bits"], d)
        out["v_codes"] = unpack(self._arr(layer, "v_codes", np.uint8, H * B * d * c["value_bits"] // 8)
                                .reshape(H, B, d * c["value_bits"] // 8), c["value_bits"], d)
        n_p = len(self.pins)
        out["k_exact"] = self._arr(layer, "k_exact", wd, n_p * H * d).reshape(n_p, H, d)
        out["v_exact"] = self._arr(layer, "v_exact", wd, n_p * H * d).reshape(n_p, H, d)
        return out


class ChunkError(ValueError):
    pass


def parse_chunk(buf, check_crc: bool = True) -> ChunkView:
    """Checks magic, version, sizes, reserved bytes, pins and (optionally) the crc32c."""
    b = bytes(buf)
    if len(b) < HEADER_BYTES:
        raise ChunkError(f"chunk length {len(b)} is shorter than its {HEADER_BYTES}-byte header")
    f = _HEADER.unpack_from(b)
    names = ("magic", "version", "header_bytes", "scheme", "key_bits", "value_bits", "dtype",
             "rotate_v", "scale_dtype", "group", "chunk_tokens", "n_layers", "n_kv_heads",
             "head_dim", "n_pinned", "n_sinks", "first_token", "layer_bytes", "data_offset",
             "total_bytes", "crc32c", "reserved")
    h = dict(zip(names, f))
    if h["magic"] != CHUNK_MAGIC or h["version"] != CHUNK_VERSION or h["header_bytes"] != HEADER_BYTES:
        raise ChunkError(f"chunk magic/version/header_bytes {h['magic']:#x}/{h['version']}/"
                         f"{h['header_bytes']} is not {CHUNK_MAGIC:#x}/{CHUNK_VERSION}/{HEADER_BYTES}")
    if h["reserved"] != b"\0" * 4:
        raise ChunkError("chunk reserved bytes are not 0")
    cfg = normalize_config({k: h[k] for k in ("scheme", "key_bits", "value_bits", "group",
                                              "chunk_tokens", "n_layers", "n_kv_heads",
                                              "head_dim", "dtype", "rotate_v", "n_sinks")})
    if h["scale_dtype"] != scale_dtype(cfg):
        raise ChunkError(f"chunk scale_dtype {h['scale_dtype']} is not {scale_dtype(cfg)}")
    lay = chunk_layout(cfg, h["n_pinned"])
    for key in ("layer_bytes", "data_offset", "total_bytes"):
        if h[key] != lay[key]:
            raise ChunkError(f"chunk {key} {h[key]} does not match its shape ({lay[key]})")
    if len(b) < h["total_bytes"]:
        raise ChunkError(f"chunk length {len(b)} is shorter than its total_bytes {h['total_bytes']}")
    b = b[: h["total_bytes"]]
    if check_crc and chunk_crc(b) != h["crc32c"]:
        raise ChunkError(f"chunk crc32c {h['crc32c']:#010x} does not match {chunk_crc(b):#010x}")
    pins = np.frombuffer(b, dtype="<u2", count=h["n_pinned"], offset=HEADER_BYTES).astype(np.int64)
    if len(pins) and (np.any(np.diff(pins) <= 0) or pins[-1] >= cfg["chunk_tokens"]):
        raise ChunkError(f"chunk pin table {pins.tolist()} is not ascending below {cfg['chunk_tokens']}")
    return ChunkView(header=h, cfg=cfg, pins=pins, layout=lay, buf=b)


def decode_chunk(buf, out_dtype="f32", tokens=None, layers=None, view: ChunkView | None = None):
    """Decodes a chunk to (k, v) [layers][tokens][H][d] in out_dtype, original basis.
    tokens / layers: chunk-relative (begin, end) pairs (default: all)."""
    cv = view if view is not None else parse_chunk(buf)
    c = cv.cfg
    L, B, H, d = c["n_layers"], c["chunk_tokens"], c["n_kv_heads"], c["head_dim"]
    t0, t1 = tokens if tokens is not None else (0, B)
    l0, l1 = layers if layers is not None else (0, L)
    s, dt = c["scheme"], c["dtype"]
    G, gv = c["group"], value_group(c)
    ks, vs = [], []
    for layer in range(l0, l1):
        a = cv.layer(layer)
        if s == SCHEME_NONE:
            kf = to_f32(a["k_codes"], dt)
            vf = to_f32(a["v_codes"], dt)
        else:
            if s in (SCHEME_KIVI, SCHEME_OSCAR):
                sc = np.repeat(a["k_scale"], G, axis=1)  # [H][B][d]
                ze = np.repeat(a["k_zero"], G, axis=1)
            else:
                sc = np.repeat(a["k_scale"], gv, axis=2)
                ze = np.repeat(a["k_zero"], gv, axis=2)
            kf = dequantize(a["k_codes"], sc, ze)
            if s == SCHEME_OSCAR:  # k^ = n_t H_d deq: the norm joins the final multiply
                kf = hadamard(kf, (a["norms"] * inv_sqrt_dim(d))[None, :, None])
            elif s == SCHEME_HADAMARD:
                kf = hadamard(kf)
            vf = dequantize(a["v_codes"], np.repeat(a["v_scale"], gv, axis=2),
                            np.repeat(a["v_zero"], gv, axis=2))
            if c["rotate_v"]:
                vf = hadamard(vf)
            if len(cv.pins):
                kf[:, cv.pins, :] = to_f32(a["k_exact"], dt).transpose(1, 0, 2)
                vf[:, cv.pins, :] = to_f32(a["v_exact"], dt).transpose(1, 0, 2)
        ks.append(kf.transpose(1, 0, 2)[t0:t1])
        vs.append(vf.transpose(1, 0, 2)[t0:t1])
    k = np.stack(ks) if ks else np.zeros((0, t1 - t0, H, d), np.float32)
    v = np.stack(vs) if vs else np.zeros((0, t1 - t0, H, d), np.float32)
    od = dtype_code(out_dtype)
    return from_f32(k, od), from_f32(v, od)


def decode_steps(buf, view: ChunkView | None = None):
    """Per-element step sizes of a chunk in the original basis' units, [L][B][H][d] for k and
    v: the group scale (times the norm for oscar keys). After a rotation the error spreads over
    channels, so tests bound the error of a rotated element by the group's step x sqrt(d)/2 in
    the worst case; for kivi (no rotation) it is half a step per element."""
    cv = view if view is not None else parse_chunk(buf)
    c = cv.cfg
    L, B, H, d, G, gv = (c["n_layers"], c["chunk_tokens"], c["n_kv_heads"], c["head_dim"],
                         c["group"], value_group(c))
    sk = np.zeros((L, B, H, d), np.float32)
    sv = np.zeros((L, B, H, d), np.float32)
    if c["scheme"] == SCHEME_NONE:
        return sk, sv
    for layer in range(L):
        a = cv.layer(layer)
        if c["scheme"] in (SCHEME_KIVI, SCHEME_OSCAR):
            s = np.repeat(a["k_scale"], G, axis=1)
        else:
            s = np.repeat(a["k_scale"], gv, axis=2)
        if c["scheme"] == SCHEME_OSCAR:
            s = s * a["norms"][None, :, None]
        sk[layer] = s.transpose(1, 0, 2)
        sv[layer] = np.repeat(a["v_scale"], gv, axis=2).transpose(1, 0, 2)
        if len(cv.pins):
            sk[layer, cv.pins] = 0
            sv[layer, cv.pins] = 0
    return sk, sv


def attend(q, chunks, tail_k=None, tail_v=None, layer=0, softmax_scale=None, dtype=None):
    """One decode step of one layer over a session's pieces, computed the way OSCAR.md
    section 3 describes (not by decoding): q [Hq][d] float; chunks: encoded chunk bytes in
    token order; tail_k / tail_v: the exact tail [L][n][H][d] (wire dtype; dtype names it
    when the arrays are uint16 bf16 bits). Quantized keys are scored in the rotated basis
    (q' = H q, logit = scale * n_t * <q', code * s + z>), pinned and tail tokens in the
    original basis; quantized values accumulate rotated and are rotated back once. Returns
    float32 [Hq][d]. float64 accumulation: a reference for the daemon's Attend."""
    q = np.asarray(q, dtype=np.float32)
    n_q, d = q.shape
    views = [parse_chunk(c) for c in chunks]
    H = views[0].cfg["n_kv_heads"] if views else np.asarray(tail_k).shape[2]
    if n_q % H:
        raise ValueError(f"n_q_heads {n_q} is not a multiple of n_kv_heads {H}")
    if softmax_scale is None:
        softmax_scale = 1.0 / np.sqrt(d)
    group = n_q // H
    qr = hadamard(q).astype(np.float64)
    q64 = q.astype(np.float64)
    pieces = []  # (logits [Hq][n], values [n][H][d] float64, rotated: bool)
    for cv in views:
        c = cv.cfg
        s = c["scheme"]
        a = cv.layer(layer)
        B, G, gv = c["chunk_tokens"], c["group"], value_group(c)
        pinned = np.zeros(B, dtype=bool)
        pinned[cv.pins] = True
        if s == SCHEME_NONE:
            k = to_f32(a["k_codes"], c["dtype"]).transpose(1, 0, 2).astype(np.float64)
            v = to_f32(a["v_codes"], c["dtype"]).transpose(1, 0, 2).astype(np.float64)
            lg = np.stack([k[:, i // group] @ q64[i] for i in range(n_q)]) * softmax_scale
            pieces.append((lg, v, False))
            continue
        if s in (SCHEME_KIVI, SCHEME_OSCAR):
            sc = np.repeat(a["k_scale"], G, axis=1)
            ze = np.repeat(a["k_zero"], G, axis=1)
        else:
            sc = np.repeat(a["k_scale"], gv, axis=2)
            ze = np.repeat(a["k_zero"], gv, axis=2)
        kq = (a["k_codes"].astype(np.float64) * sc + ze).transpose(1, 0, 2)  # [B][H][d]
        qk = qr if s in (SCHEME_HADAMARD, SCHEME_OSCAR) else q64
        lg = np.stack([kq[:, i // group] @ qk[i] for i in range(n_q)])  # [Hq][B]
        if s == SCHEME_OSCAR:
            lg = lg * a["norms"].astype(np.float64)[None, :]
        vq = (a["v_codes"].astype(np.float64) * np.repeat(a["v_scale"], gv, axis=2)
              + np.repeat(a["v_zero"], gv, axis=2)).transpose(1, 0, 2)
        if len(cv.pins):
            ke = to_f32(a["k_exact"], c["dtype"]).astype(np.float64)  # [P][H][d]
            ve = to_f32(a["v_exact"], c["dtype"]).astype(np.float64)
            lge = np.stack([ke[:, i // group] @ q64[i] for i in range(n_q)])
            lg[:, cv.pins] = lge
            pieces.append((np.where(pinned[None, :], -np.inf, lg * softmax_scale), vq,
                           bool(c["rotate_v"])))
            pieces.append((lge * softmax_scale, ve, False))
        else:
            pieces.append((lg * softmax_scale, vq, bool(c["rotate_v"])))
    if tail_k is not None and np.asarray(tail_k).shape[1]:
        tk = to_f32(np.asarray(tail_k)[layer], dtype if dtype is not None else np.asarray(tail_k).dtype)
        tv = to_f32(np.asarray(tail_v)[layer], dtype if dtype is not None else np.asarray(tail_v).dtype)
        tk = tk.astype(np.float64)
        lg = np.stack([tk[:, i // group] @ q64[i] for i in range(n_q)]) * softmax_scale
        pieces.append((lg, tv.astype(np.float64), False))
    if not pieces:
        return np.zeros((n_q, d), dtype=np.float32)
    m = np.max([p[0].max(axis=1) for p in pieces if p[0].size], axis=0)  # [Hq]
    total = np.zeros(n_q)
    acc_rot = np.zeros((n_q, d))
    acc = np.zeros((n_q, d))
    for lg, v, rot in pieces:
        if not lg.size:
            continue
        p = np.exp(lg - m[:, None])  # [Hq][n]
        total += p.sum(axis=1)
        for i in range(n_q):
            contrib = p[i] @ v[:, i // group]
            if rot:
                acc_rot[i] += contrib
            else:
                acc[i] += contrib
    out = (acc + hadamard(acc_rot, dtype=np.float64)) / total[:, None]
    return out.astype(np.float32)


def roundtrip(cfg, k, v, out_dtype="f32"):
    """What a session holding k, v ([L][T][H][d], wire dtype) returns from Fetch: tokens of
    full chunks of B encoded and decoded, the last T mod B exact."""
    cfg = normalize_config(cfg)
    B = cfg["chunk_tokens"]
    k, _ = as_wire(k, cfg["dtype"])
    v, _ = as_wire(v, cfg["dtype"])
    T = k.shape[1]
    ks, vs = [], []
    for t0 in range(0, T - T % B, B):
        ck, cv = decode_chunk(encode_chunk(cfg, t0, k[:, t0:t0 + B], v[:, t0:t0 + B]), out_dtype)
        ks.append(ck)
        vs.append(cv)
    tail = slice(T - T % B, T)
    od = dtype_code(out_dtype)
    ks.append(from_f32(to_f32(k[:, tail], cfg["dtype"]), od))
    vs.append(from_f32(to_f32(v[:, tail], cfg["dtype"]), od))
    return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)


__all__ = ["make_config", "normalize_config", "hadamard", "sylvester", "joint_norms",
           "quant_params", "quantize", "dequantize", "pack", "unpack", "chunk_layout", "crc32c",
           "chunk_crc", "pinned_tokens", "encode_chunk", "parse_chunk", "decode_chunk",
           "decode_steps", "roundtrip", "attend", "ChunkView", "ChunkError", "DTYPE_F16", "DTYPE_BF16",
           "DTYPE_F32"]

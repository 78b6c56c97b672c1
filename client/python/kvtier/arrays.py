"""numpy helpers: wire dtypes, bf16 conversion, and a plain softmax-attention reference.

bf16 travels as raw 16-bit patterns: a bf16 array in this package is a ``numpy.uint16`` array
(``ml_dtypes.bfloat16`` arrays are accepted on input and viewed as uint16). f16 is
``numpy.float16`` and f32 ``numpy.float32``. All wire tensors are little-endian.
"""

from __future__ import annotations

import numpy as np

# Values of kvtier.v1.Dtype (the proto enum) and of enum kvt_dtype (kernels/kvt_codec.h):
# they are the same numbers on purpose.
DTYPE_F16 = 1
DTYPE_BF16 = 2
DTYPE_F32 = 3

_NAMES = {"f16": DTYPE_F16, "float16": DTYPE_F16, "fp16": DTYPE_F16, "half": DTYPE_F16,
          "bf16": DTYPE_BF16, "bfloat16": DTYPE_BF16,
          "f32": DTYPE_F32, "float32": DTYPE_F32, "fp32": DTYPE_F32}
_WIRE_NP = {DTYPE_F16: np.dtype("<f2"), DTYPE_BF16: np.dtype("<u2"), DTYPE_F32: np.dtype("<f4")}
DTYPE_NAMES = {DTYPE_F16: "f16", DTYPE_BF16: "bf16", DTYPE_F32: "f32"}


def dtype_code(dtype) -> int:
    """'f16' / 'bf16' / 'f32', a numpy dtype (float16, float32, uint16 = bf16 bits,
    ml_dtypes.bfloat16), or the enum value -> the enum value."""
    if dtype is None:
        raise ValueError("dtype is required")
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        if int(dtype) not in _WIRE_NP:
            raise ValueError(f"dtype {int(dtype)} is not one of 1 (f16), 2 (bf16), 3 (f32)")
        return int(dtype)
    if isinstance(dtype, str):
        try:
            return _NAMES[dtype.lower()]
        except KeyError:
            raise ValueError(f"dtype {dtype!r} is not one of f16, bf16, f32") from None
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":
        return DTYPE_BF16
    if dt == np.float16:
        return DTYPE_F16
    if dt == np.float32:
        return DTYPE_F32
    if dt == np.uint16:
        return DTYPE_BF16
    raise ValueError(f"dtype {dt} is not float16, bfloat16 (uint16 bits) or float32")


def np_dtype(dtype) -> np.dtype:
    """The numpy dtype that holds a wire dtype (bf16 -> uint16 bit patterns)."""
    return _WIRE_NP[dtype_code(dtype)]


def dtype_size(dtype) -> int:
    return 4 if dtype_code(dtype) == DTYPE_F32 else 2


def as_wire(a, dtype=None) -> tuple[np.ndarray, int]:
    """A C-contiguous little-endian array of wire elements and its dtype code. With dtype
    None the array's own dtype decides (uint16 means bf16 bits); with a dtype, an array of
    another float type is converted (floats -> bf16 rounds to nearest even)."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        a = a.view(np.uint16)
    code = dtype_code(a.dtype) if dtype is None else dtype_code(dtype)
    want = _WIRE_NP[code]
    if code == DTYPE_BF16 and a.dtype != np.uint16:
        a = f32_to_bf16(a)
    elif a.dtype != want:
        if a.dtype == np.uint16:
            raise ValueError(f"a uint16 array holds bf16 bits; it cannot be sent as {DTYPE_NAMES[code]}")
        a = a.astype(want)
    return np.ascontiguousarray(a, dtype=want), code


def from_wire(buf, dtype, shape) -> np.ndarray:
    """Bytes of a wire tensor -> a writable numpy array of the given shape."""
    dt = np_dtype(dtype)
    a = np.frombuffer(buf, dtype=dt)
    n = int(np.prod(shape)) if len(shape) else 1
    if a.size != n:
        raise ValueError(f"{len(buf)} bytes do not hold {shape} elements of {DTYPE_NAMES[dtype_code(dtype)]}")
    return a.reshape(shape).astype(dt.newbyteorder("="), copy=True)


def bf16_to_f32(bits) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 (exact)."""
    b = np.asarray(bits)
    if b.dtype.name == "bfloat16":
        b = b.view(np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x) -> np.ndarray:
    """float -> bf16 bit patterns, round to nearest even; NaN stays NaN (quiet)."""
    f = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded.astype(np.uint16)


def to_f32(a, dtype=None) -> np.ndarray:
    """Wire elements (f16, bf16 bits, f32) -> float32."""
    a = np.asarray(a)
    code = dtype_code(a.dtype) if dtype is None else dtype_code(dtype)
    if code == DTYPE_BF16:
        return bf16_to_f32(a)
    return a.astype(np.float32)


def from_f32(x, dtype) -> np.ndarray:
    """float32 -> wire elements of dtype (f16/f32 via numpy, bf16 round to nearest even)."""
    code = dtype_code(dtype)
    if code == DTYPE_BF16:
        return f32_to_bf16(x)
    return np.asarray(x, dtype=np.float32).astype(_WIRE_NP[code])


def attention(q, k, v, softmax_scale=None) -> np.ndarray:
    """One decode step of softmax attention in float64: q [Hq][d], k and v [T][H][d]
    (any float or wire dtype; bf16 as uint16 needs dtype conversion first). GQA: query head i
    reads KV head i // (Hq // H). Returns float32 [Hq][d]; zeros when T == 0."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    n_q, d = q.shape
    t, h, dk = k.shape
    if dk != d or v.shape != k.shape or n_q % h:
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    if softmax_scale is None:
        softmax_scale = 1.0 / np.sqrt(d)
    out = np.zeros((n_q, d), dtype=np.float64)
    if t == 0:
        return out.astype(np.float32)
    group = n_q // h
    for i in range(n_q):
        kh = i // group
        logits = softmax_scale * (k[:, kh, :] @ q[i])
        logits -= logits.max()
        p = np.exp(logits)
        p /= p.sum()
        out[i] = p @ v[:, kh, :]
    return out.astype(np.float32)

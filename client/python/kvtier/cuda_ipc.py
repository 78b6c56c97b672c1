"""CUDA IPC export for RestoreToDevice, through ctypes on the CUDA driver (libcuda.so.1).

kvtierd opens the worker's allocation with the handle this module exports and decodes the
session straight into it (same node, same GPU). Nothing here imports torch: a torch CUDA
tensor is accepted duck-typed (``data_ptr()``, ``device``, ``dtype``), a raw device pointer
(an int) works too. The memory must come from cudaMalloc / cuMemAlloc (PyTorch's caching
allocator does, unless PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, whose VMM
memory has no IPC handle).
"""

from __future__ import annotations

import ctypes
import threading

IPC_HANDLE_BYTES = 64

_lock = threading.Lock()
_cuda = None


class CudaIpcError(RuntimeError):
    """The pointer could not be exported (no driver, not device memory, not exportable)."""


def _driver():
    global _cuda
    with _lock:
        if _cuda is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise CudaIpcError(f"no CUDA driver in this process (libcuda.so.1: {e})") from None
            lib.cuInit.argtypes = [ctypes.c_uint]
            lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
            lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
            lib.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
            lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
            lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                                    ctypes.POINTER(ctypes.c_size_t),
                                                    ctypes.c_uint64]
            lib.cuIpcGetMemHandle.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
            rc = lib.cuInit(0)
            if rc != 0:
                raise CudaIpcError(f"cuInit failed (CUresult {rc}): no usable GPU")
            _cuda = lib
        return _cuda


def export(ptr: int, device: int | None = None) -> tuple[bytes, int, int]:
    """(handle, offset, alloc_bytes) of the allocation holding device pointer ptr: the
    64-byte cudaIpcMemHandle_t of the allocation, ptr's offset in it and its size."""
    lib = _driver()
    pushed = False
    cur = ctypes.c_void_p()
    lib.cuCtxGetCurrent(ctypes.byref(cur))
    dev = ctypes.c_int(0)
    if not cur.value:
        # no current context on this thread: use the device's primary context (the one the
        # CUDA runtime and torch allocate from)
        rc = lib.cuDeviceGet(ctypes.byref(dev), int(device or 0))
        ctx = ctypes.c_void_p()
        if rc == 0:
            rc = lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value)
        if rc != 0:
            raise CudaIpcError(f"CUDA device {device or 0}: CUresult {rc}")
        lib.cuCtxPushCurrent_v2(ctx)
        pushed = True
    try:
        base = ctypes.c_uint64()
        size = ctypes.c_size_t()
        rc = lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
        if rc != 0:
            raise CudaIpcError(f"0x{ptr:x} is not device memory of this process (CUresult {rc})")
        h = ctypes.create_string_buffer(IPC_HANDLE_BYTES)
        rc = lib.cuIpcGetMemHandle(h, base)
        if rc != 0:
            raise CudaIpcError(f"cuIpcGetMemHandle(0x{base.value:x}) failed (CUresult {rc}): only "
                               "cudaMalloc memory is exportable (not VMM / expandable segments)")
        return h.raw, ptr - base.value, size.value
    finally:
        if pushed:
            out = ctypes.c_void_p()
            lib.cuCtxPopCurrent_v2(ctypes.byref(out))
            lib.cuDevicePrimaryCtxRelease_v2(dev.value)


def describe(obj) -> tuple[int, int | None, str | None]:
    """(pointer, device index or None, dtype name 'f16' / 'bf16' or None) of a torch-like
    CUDA tensor, or of an int pointer."""
    if isinstance(obj, int):
        return obj, None, None
    if not hasattr(obj, "data_ptr"):
        raise TypeError(f"expected a CUDA tensor or an int device pointer, got {type(obj).__name__}")
    dev = getattr(obj, "device", None)
    if dev is not None and getattr(dev, "type", "cuda") != "cuda":
        raise ValueError(f"the tensor is on {dev}, not a CUDA device")
    name = str(getattr(obj, "dtype", ""))
    dt = {"torch.float16": "f16", "torch.half": "f16", "torch.bfloat16": "bf16"}.get(name)
    if dt is None and name:
        raise ValueError(f"RestoreToDevice writes f16 or bf16; the tensor is {name}")
    return int(obj.data_ptr()), getattr(dev, "index", None), dt

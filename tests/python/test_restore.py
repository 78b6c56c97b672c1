"""RestoreToDevice and the tier request through kvtier.Client against the shared test
daemon (no GPU tier there: gpu_arena_bytes is 0). Without a GPU (CI) a well-formed restore is
FAILED_PRECONDITION naming the reason; with one, a junk handle is INVALID_ARGUMENT. The
device-pointer helper refuses memory that is not exportable before any RPC."""

import grpc
import numpy as np
import pytest

import kvtier
from kvtier import arrays as A
from kvtier import cuda_ipc


def test_restore_without_gpu_tier(client, sid):
    s = sid()
    info = client.open_session(s, n_layers=2, n_kv_heads=2, head_dim=64, dtype="f16", tier="gpu")
    assert info.tier == "host"  # no GPU tier in this daemon: the host serves, and says so
    rng = np.random.default_rng()
    k = A.from_f32(rng.standard_normal((2, 200, 2, 64)).astype(np.float32), "f16")
    v = A.from_f32(rng.standard_normal((2, 200, 2, 64)).astype(np.float32), "f16")
    client.append(s, k, v)
    gpu = client.stats().gpu
    with pytest.raises(kvtier.KvtierError) as e:
        client.restore_to_device_handle(s, bytes(range(64)), buffer_bytes=1 << 20,
                                        tokens=(10, 150), layers=(1, 2), dtype="bf16")
    if not gpu:
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "needs a GPU" in str(e.value)
    else:
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "ipc_mem_handle" in str(e.value)
    # field checks come first, GPU or not
    with pytest.raises(kvtier.KvtierError) as e:
        client.restore_to_device_handle(s, b"short", buffer_bytes=1 << 20)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "64 bytes" in str(e.value)
    with pytest.raises(kvtier.KvtierError) as e:
        client.restore_to_device_handle(s, bytes(64), buffer_bytes=1 << 20, layout="paged",
                                        block_size=16, block_table=[0, 1], layers=(0, 1))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "block_table has 2" in str(e.value)
    with pytest.raises(ValueError):
        client.restore_to_device_handle(s, bytes(64), buffer_bytes=1, layout="ragged")
    assert client.stat(s).n_tokens == 200


def test_restore_pointer_not_device_memory(client, sid):
    with pytest.raises((cuda_ipc.CudaIpcError, ValueError, TypeError)):
        client.restore_to_device(sid(), 0x1000, dtype="f16")
    with pytest.raises(TypeError):
        cuda_ipc.describe("not a tensor")

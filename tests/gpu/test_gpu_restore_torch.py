"""RestoreToDevice into torch CUDA tensors through the Python client (kvtier.Client.
restore_to_device: IPC export by ctypes on libcuda, no torch dependency in the package).

Runs with a python3 that has torch and a CUDA device, else exits 77 (skipped). Starts
$KVTIERD on a private socket, appends random bf16 K/V, restores the whole session into
contiguous [L][T][H][D] tensors and a sub-range of tokens and layers into a paged pool
[2][L][n_blocks][block_size][H][D] with a shuffled block table, and compares with Fetch (the
daemon's CPU decode) bit for bit; bytes outside the restored rows must keep their fill."""

import math
import os
import subprocess
import sys
import tempfile

import numpy as np

try:
    import torch
except ImportError:
    print("# no torch: skipped")
    sys.exit(77)
if not torch.cuda.is_available():
    print("# no CUDA device: skipped")
    sys.exit(77)

import kvtier  # noqa: E402
from kvtier import arrays as A  # noqa: E402


def bits(t):
    return t.view(torch.int16).cpu().numpy().view(np.uint16)


def main():
    seed = int(os.environ.get("KVT_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"# seed {seed}")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="kvtier-torch-") as d:
        sock = f"{d}/kvtierd.sock"
        log = open(f"{d}/kvtierd.log", "wb")
        p = subprocess.Popen([os.environ["KVTIERD"], f"--socket={sock}"], stdout=log,
                             stderr=subprocess.STDOUT)
        failures = 0
        try:
            c = kvtier.Client(f"unix:{sock}", timeout=60)
            c.wait_ready(30)
            L, H, D, T = 4, 8, 128, 1000
            c.open_session("t", L, H, D, dtype="bf16",
                           codec=dict(scheme="oscar", key_bits=2, value_bits=2, group=32))
            k32 = rng.standard_normal((L, T, H, D)).astype(np.float32)
            k32[..., :8] *= 6
            v32 = rng.standard_normal((L, T, H, D)).astype(np.float32)
            c.append("t", A.from_f32(k32, "bf16"), A.from_f32(v32, "bf16"))
            ref_k, ref_v = c.fetch("t", dtype="bf16")

            kt = torch.full((L, T, H, D), float("nan"), dtype=torch.bfloat16, device="cuda")
            vt = torch.full((L, T, H, D), float("nan"), dtype=torch.bfloat16, device="cuda")
            r = c.restore_to_device("t", kt, vt)
            torch.cuda.synchronize()
            ok = r["n_tokens"] == T and np.array_equal(bits(kt), ref_k) and \
                np.array_equal(bits(vt), ref_v)
            print(f"{'ok' if ok else 'not ok'} - contiguous whole session: {r}")
            failures += not ok

            bs = 16
            need = math.ceil(T / bs)
            nb = need + 5
            table = rng.permutation(nb)[:need].astype(np.uint32)
            pool = torch.full((2, L, nb, bs, H, D), 7.0, dtype=torch.bfloat16, device="cuda")
            t0, t1, l0, l1 = 37, 901, 1, 3
            r = c.restore_to_device("t", pool[0, l0], pool[1, l0], layout="paged",
                                    block_size=bs, block_table=table.tolist(), tokens=(t0, t1),
                                    layers=(l0, l1), layer_stride_bytes=nb * bs * H * D * 2)
            torch.cuda.synchronize()
            got = bits(pool)
            fill = bits(torch.tensor([7.0], dtype=torch.bfloat16))[0]
            bad = 0
            written = np.zeros(got.shape[:4], dtype=bool)
            for layer in range(l0, l1):
                for t in range(t0, t1):
                    b, o = table[t // bs], t % bs
                    written[:, layer, b, o] = True
                    bad += not np.array_equal(got[0, layer, b, o], ref_k[layer, t])
                    bad += not np.array_equal(got[1, layer, b, o], ref_v[layer, t])
            stray = int((got[~written] != fill).sum())
            ok = bad == 0 and stray == 0 and r["n_tokens"] == t1 - t0
            print(f"{'ok' if ok else 'not ok'} - paged pool, tokens [{t0}, {t1}) layers "
                  f"[{l0}, {l1}): {bad} rows differ, {stray} stray values: {r}")
            failures += not ok
            c.close()
        finally:
            p.terminate()
            p.wait(30)
            log.close()
            if failures:
                print(open(f"{d}/kvtierd.log", errors="replace").read()[-3000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

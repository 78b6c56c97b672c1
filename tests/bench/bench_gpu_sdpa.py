#!/usr/bin/env python3
"""The reference for `kvtier-bench gpu`: torch scaled_dot_product_attention, one decode step
(one query token) in bf16, Hq 32, Hkv 8 (GQA), d 128, at the benchmark's batch x tokens (and
d 64 and 256 at 1 x 131072, the benchmark's other head_dim cases, and Hq 64 there: GQA 8).
cuDNN and flash backends are each timed and the faster is reported as us_best. Timed as
kvtier-bench times its own kernels: steps enqueued back to back (CUDA events around 20 calls,
median of 7 such runs after warm-up), so the GPU never waits for the host between steps. Until
session 11 each call was timed alone (an event pair around one call, synchronized after it),
which also counted the host's time to launch it (torch dispatch, cuDNN) while the GPU sat idle:
that figure is still reported as us_<backend>_isolated, for comparison with older results.
One JSON object per case on stdout. Python: a python3 with torch (the GPU machine's)."""
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HKV = 8
CASES = [(1, 131072, 128, 32), (8, 32768, 128, 32), (48, 4096, 128, 32), (1, 131072, 64, 32),
         (1, 131072, 256, 32), (1, 131072, 128, 64)]  # batch, tokens, d, query heads


def time_us(fn, calls=20, runs=7):
    """us per call, calls enqueued back to back (what a decode loop sees)"""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / calls)
    return statistics.median(ts)


def time_us_isolated(fn, iters=50):
    """us per call with the GPU idle before each call (the figure used until session 11)"""
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0)
    return statistics.median(ts)


def main():
    torch.manual_seed(0)
    for batch, tokens, D, HQ in CASES:
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, HKV, tokens, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, HKV, tokens, D, device="cuda", dtype=torch.bfloat16)
        row = {"ref": "torch_sdpa_bf16", "torch": torch.__version__, "batch": batch,
               "tokens": tokens, "d": D, "hq": HQ, "kv_bytes": 2 * k.numel() * 2}
        best = None
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("flash", SDPBackend.FLASH_ATTENTION)):
            for gqa in ("enable_gqa", "expanded"):
                try:
                    if gqa == "enable_gqa":
                        kk, vv, kw = k, v, {"enable_gqa": True}
                    else:
                        kk = k.repeat_interleave(HQ // HKV, dim=1)
                        vv = v.repeat_interleave(HQ // HKV, dim=1)
                        kw = {}
                    with sdpa_kernel([be]):
                        fn = lambda: F.scaled_dot_product_attention(q, kk, vv, **kw)
                        us = time_us(fn)
                        row[f"us_{name}_isolated"] = round(time_us_isolated(fn), 2)
                    row[f"us_{name}"] = round(us, 2)
                    row[f"gqa_{name}"] = gqa
                    if best is None or us < best[1]:
                        best = (name, us)
                    break
                except Exception as e:  # a backend that refuses this shape
                    row[f"err_{name}_{gqa}"] = str(e).splitlines()[0][:160]
        if best:
            row["best"], row["us_best"] = best[0], round(best[1], 2)
            row["tb_per_s"] = round(row["kv_bytes"] / (best[1] * 1e-6) / 1e12, 3)
        print(json.dumps(row, separators=(",", ":")), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""ctest realmodel_kvtierd: SmolLM2's KV cache held by a real kvtierd (both paths), short window.

1. The Fetch path with scheme none and an f32 session gives the in-process exact cache's logits
   (to float rounding: the attention reads what the daemon returns); the Attend path (daemon
   attention, new_k/new_v staging, the token attends to itself) matches on a few tokens, for an
   f32 session and for an f16 session against the in-process cache that rounds K/V to f16.
2. Perplexity on the first --tokens tokens of GPL-3 through kvtierd (Fetch path), chunks of
   --chunk tokens so several chunks are sealed in the short window: oscar INT2/INT4 G32 and kivi
   INT2 G32 printed; asserted: INT4 oscar <= 1.005x exact. Issue 9's INT2 ordering (oscar's
   excess <= 0.5x kivi's) is printed, not asserted: measured on this window it does not hold
   (oscar2 1.070x, kivi2 1.043x; docs/realmodel/perplexity.md), and a test must not claim it.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import texts  # noqa: E402
from kvcache import ExactBackend  # noqa: E402
from kvtierd_backend import (KvtierDaemon, KvtierdAttendBackend,  # noqa: E402
                             KvtierdFetchBackend)
from perplexity import perplexity  # noqa: E402
from smollm import SmolLM, default_model_path  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--attend-tokens", type=int, default=6)
    a = ap.parse_args()
    t_start = time.time()
    m = SmolLM(default_model_path())
    L, H, D = m.n_layers, m.n_kv_heads, m.head_dim
    text, _ = texts.read_text(texts.GPL3)
    ids = np.asarray(m.tokenizer.encode(text)[:a.tokens], dtype=np.int64)
    d = KvtierDaemon()
    c = d.client()
    fails = []
    try:
        # 1a. exact through the Fetch path == in-process exact (f32)
        none = {"scheme": "none", "chunk_tokens": a.chunk, "recent_exact_tokens": 0}
        ref = m.forward(ids, ExactBackend(L, H, D, a.tokens), block=a.chunk)
        b = KvtierdFetchBackend(c, L, H, D, codec=none, dtype="f32")
        lg = m.forward(ids, b, block=a.chunk)
        b.close()
        diff = float(np.abs(lg - ref).max())
        print(json.dumps(dict(check="fetch_f32_exact", tokens=len(ids), max_abs_logit_diff=diff,
                              fetched_tokens=b.fetched_tokens)), flush=True)
        if diff > 1e-3:
            fails.append(f"Fetch path f32 exact differs from in-process by {diff}")
        # 1b. Attend path, f32 and f16 sessions, a few tokens
        n = a.attend_tokens
        for dt, npdt, tol in (("f32", np.float32, 1e-3), ("f16", np.float16, 2e-2)):
            ref_n = m.forward(ids[:n], ExactBackend(L, H, D, n, dtype=npdt), block=n)
            b = KvtierdAttendBackend(c, L, H, D, codec=none, dtype=dt)
            lg = m.forward(ids[:n], b, block=1)
            b.close()
            diff = float(np.abs(lg - ref_n).max())
            print(json.dumps(dict(check=f"attend_{dt}_exact", tokens=n, max_abs_logit_diff=diff)),
                  flush=True)
            if diff > tol:
                fails.append(f"Attend path {dt} exact differs from in-process by {diff} > {tol}")
        # 2. perplexity, Fetch path
        rows = {}
        nll, cnt = perplexity(m, ids, lambda: ExactBackend(L, H, D, a.tokens), a.tokens, a.chunk)
        rows["exact"] = float(np.exp(nll / cnt))
        for name, codec in (("oscar2", dict(scheme="oscar", bits=2, group=32)),
                            ("oscar4", dict(scheme="oscar", bits=4, group=32)),
                            ("kivi2", dict(scheme="kivi", bits=2, group=32))):
            # recent_exact_tokens 0: seal every chunk (the daemon's default adds a window)
            codec = dict(codec, chunk_tokens=a.chunk, recent_exact_tokens=0)
            nll, cnt = perplexity(m, ids, lambda: KvtierdFetchBackend(c, L, H, D, codec=codec),
                                  a.tokens, a.chunk)
            rows[name] = float(np.exp(nll / cnt))
        ratio = {k: v / rows["exact"] for k, v in rows.items()}
        print(json.dumps(dict(check="perplexity", tokens=len(ids), chunk_tokens=a.chunk,
                              ppl={k: round(v, 4) for k, v in rows.items()},
                              ratio={k: round(v, 5) for k, v in ratio.items()})), flush=True)
        if ratio["oscar4"] > 1.005:
            fails.append(f"INT4 oscar ratio {ratio['oscar4']:.5f} > 1.005")
        print(json.dumps(dict(check="int2_ordering_not_asserted",
                              oscar2_excess=round(ratio["oscar2"] - 1, 5),
                              kivi2_excess=round(ratio["kivi2"] - 1, 5),
                              issue9_target_met=ratio["oscar2"] - 1 <= 0.5 * (ratio["kivi2"] - 1))),
              flush=True)
    finally:
        c.close()
        rc = d.stop()
    if rc != 0:
        fails.append(f"kvtierd exited with status {rc}")
    print(json.dumps(dict(seconds=round(time.time() - t_start, 1), failures=fails)), flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

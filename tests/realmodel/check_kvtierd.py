#!/usr/bin/env python3
"""ctest realmodel_kvtierd: SmolLM2's KV cache held by a real kvtierd (both paths), and issue 9's
perplexity thresholds on one full context.

1. The Fetch path with scheme none and an f32 session gives the in-process exact cache's logits
   (to float rounding: the attention reads what the daemon returns); the Attend path (daemon
   attention, new_k/new_v staging, the token attends to itself) matches on a few tokens, for an
   f32 session and for an f16 session against the in-process cache that rounds K/V to f16.
2. A context's first block, which perplexity.py's table computes once and replays for every
   row (FirstBlockCache), is the same through a lossy session as in the exact in-process pass
   (NLL and K/V bit-identical): it sees no committed token.
3. Perplexity over the first --ctx tokens of GPL-3 through kvtierd's Fetch path, with the
   table's own row configs (perplexity.ROW_CODEC: chunks of 128, G32, S4, detection off):
   asserted, as issue 9 requires: oscar INT2 excess (ratio - 1) <= 0.5 x kivi INT2's and
   <= 0.25 x hadamard INT2's; oscar INT4 ratio <= 1.005; and every row of
   perplexity.ROW_TARGETS at most its bound (the kvtier-int2 default <= 1.025x, issue 9),
   except those in NOT_ASSERTED (run and printed, not asserted). One context of 1024 tokens has 7 of
   its 8 blocks reading sealed chunks; a 256-token window with chunks of 64 (the earlier version of this
   test) is too short for the INT2 ordering (oscar 1.070x vs kivi 1.043x there).
   This is one window of one text: a regression guard, not evidence for every text. The table
   (docs/realmodel/perplexity.md) has all four contexts of both texts; on GFDL-1.3 oscar INT2
   G32's excess is 0.077 against kivi's 0.130 (0.59x, issue 9's 0.5x is not met there).
Each number is also compared (printed, not asserted) with docs/realmodel/perplexity.json's
item for the same row, text and context, which must be identical when the table is current.
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
import perplexity as P  # noqa: E402
from smollm import SmolLM, default_model_path  # noqa: E402

ROWS = ["oscar INT2 G32 S4", "kivi INT2 G32 S4", "hadamard INT2 G32 S4", "oscar INT4 G32 S4"]
# Targets of perplexity.ROW_TARGETS that the measurements do not meet: run and printed here so
# the state is visible, not asserted (a test must not claim them). Remove a row from this dict
# when the codec meets its target on every text of the table.
# Session 3's kvtier-int2 (oscar INT2 G32 S8 B32 W128) was here (1.0263x on this window); since
# session 4 the preset has 3-bit keys with groups of 64 (row "kvtier-int2 (oscar K3 V2 G64 S8
# B64 W128)"), which meets 1.025x on all eight texts of docs/realmodel/int2.md, so it is asserted.
NOT_ASSERTED = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256, help="window of check 1")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of check 1")
    ap.add_argument("--attend-tokens", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=1024, help="window of check 3")
    a = ap.parse_args()
    t_start = time.time()
    m = SmolLM(default_model_path())
    print(json.dumps(dict(model_loaded_s=round(time.time() - t_start, 1))), flush=True)
    L, H, D = m.n_layers, m.n_kv_heads, m.head_dim
    text, _ = texts.read_text(texts.GPL3)
    all_ids = np.asarray(m.tokenizer.encode(text), dtype=np.int64)
    ids = all_ids[:a.tokens]
    d = KvtierDaemon()
    c = d.client()
    fails = []
    try:
        # 1a. exact through the Fetch path == in-process exact (f32)
        t0 = time.time()
        none = dict(scheme="none", chunk_tokens=a.chunk, **P.PINNED)  # no recent window
        ref = m.forward(ids, ExactBackend(L, H, D, a.tokens), block=a.chunk)
        b = KvtierdFetchBackend(c, L, H, D, codec=none, dtype="f32")
        lg = m.forward(ids, b, block=a.chunk)
        b.close()
        diff = float(np.abs(lg - ref).max())
        print(json.dumps(dict(check="fetch_f32_exact", tokens=len(ids), max_abs_logit_diff=diff,
                              fetched_tokens=b.fetched_tokens, seconds=round(time.time() - t0, 1))),
              flush=True)
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
        # 3. perplexity on one full context, the table's row configs
        t0 = time.time()
        window = all_ids[:a.ctx]
        first = P.FirstBlockCache()
        ex = ExactBackend(L, H, D, a.ctx)
        nll = {"none (in-process)": P.score_context(m, window, ex, 128, first,
                                                    ("GPL-3", 0, "f32"))}
        secs = {"none (in-process)": round(time.time() - t0, 1)}
        # 2. the first block is the same for every row: computed through a lossy session (no
        #    replay) it gives the NLL and K/V the exact in-process pass stored for replay.
        key = ("GPL-3", 0, "f32", 128)
        b = KvtierdFetchBackend(c, L, H, D, codec=P.ROW_CODEC["oscar INT2 G32 S4"], dtype="f32",
                                capacity=a.ctx)
        try:
            fresh = P.FirstBlockCache()
            got = fresh.run(m, window, b, key, 128)
        finally:
            b.close()
        same = (got == first.store[key][0]
                and all(np.array_equal(x, y) for x, y in zip(fresh.store[key][1:],
                                                              first.store[key][1:])))
        print(json.dumps(dict(check="first_block_shared", nll_lossy_session=got,
                              nll_in_process=first.store[key][0], kv_identical=same)), flush=True)
        if not same:
            fails.append("the first block through a lossy session differs from the stored one")
        rows = ROWS + [r for r in P.ROW_TARGETS if r not in ROWS]
        for name in rows:
            t1 = time.time()
            codec = P.ROW_CODEC[name]
            b = KvtierdFetchBackend(c, L, H, D, codec=codec, dtype="f32", capacity=a.ctx)
            try:
                bad = P.codec_agrees(codec, b.s.info.codec)
                if bad:
                    fails.append(f"{name}: daemon codec differs from the row's: {bad}")
                nll[name] = P.score_context(m, window, b, 128, first, ("GPL-3", 0, "f32"))
            finally:
                b.close()
            secs[name] = round(time.time() - t1, 1)
        scored = len(window) - 1
        ppl = {k: float(np.exp(v / scored)) for k, v in nll.items()}
        ratio = {k: float(np.exp((v - nll["none (in-process)"]) / scored)) for k, v in nll.items()}
        table = {}
        jp = os.path.join(here, "..", "..", "docs", "realmodel", "perplexity.json")
        if os.path.exists(jp):
            with open(jp) as f:
                res = json.load(f).get("results", {})
            for k in nll:
                r = res.get(P.item_key("none" if k.startswith("none") else k, "GPL-3", 0))
                if r is not None and r.get("eval", {}).get("ctx") == a.ctx:
                    table[k] = dict(nll=r["nll"], identical=r["nll"] == nll[k])
        print(json.dumps(dict(check="perplexity", text="GPL-3", tokens=len(window), scored=scored,
                              ppl={k: round(v, 4) for k, v in ppl.items()},
                              ratio={k: round(v, 5) for k, v in ratio.items()}, seconds=secs,
                              perplexity_json=table)), flush=True)
        e = {k: v - 1.0 for k, v in ratio.items()}
        o2, k2, h2, o4 = (e["oscar INT2 G32 S4"], e["kivi INT2 G32 S4"],
                          e["hadamard INT2 G32 S4"], ratio["oscar INT4 G32 S4"])
        checks = [(o2 <= 0.5 * k2, f"oscar INT2 G32 excess {o2:.5f} <= 0.5 x kivi's {k2:.5f}"),
                  (o2 <= 0.25 * h2,
                   f"oscar INT2 G32 excess {o2:.5f} <= 0.25 x hadamard's {h2:.5f}"),
                  (o4 <= 1.005, f"oscar INT4 G32 ratio {o4:.5f} <= 1.005")]
        for name, bound in P.ROW_TARGETS.items():
            if name == "oscar INT4 G32 S4":
                continue   # checked just above
            what = f"{name} ratio {ratio[name]:.5f} <= {bound}"
            if name in NOT_ASSERTED:
                print(("met    " if ratio[name] <= bound else "NOT MET ") + what
                      + f" (printed, not asserted: {NOT_ASSERTED[name]})", flush=True)
            else:
                checks.append((ratio[name] <= bound, what))
        for ok, what in checks:
            print(("ok     " if ok else "FAILED ") + what, flush=True)
            if not ok:
                fails.append(what)
    finally:
        c.close()
        rc = d.stop()
    if rc != 0:
        fails.append(f"kvtierd exited with status {rc}")
    print(json.dumps(dict(seconds=round(time.time() - t_start, 1), failures=fails)), flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Perplexity of SmolLM2 on real text with a chosen KV-cache backend.

Each text is cut into consecutive, non-overlapping contexts of --ctx tokens (a fresh cache per
context); every token after the first of a context is scored teacher-forced. One JSON line per
text: tokens scored, perplexity, time.

Usage:
  perplexity.py [--backend exact] [--ctx 1024] [--max-tokens 4096] [--block 128] [TEXT ...]
Texts default to GPL-3 and GFDL-1.3 from /usr/share/common-licenses (every Debian system).

Backends are registered in BACKENDS: name -> factory(model, args) returning a KVBackend.
'exact' is the in-process float32 cache (the reference row); the kvtierd backends (Fetch path,
Attend path) register here once the Python client exists.
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
from smollm import SmolLM, default_model_path, log_softmax  # noqa: E402

BACKENDS = {
    "exact": lambda m, a: ExactBackend(m.n_layers, m.n_kv_heads, m.head_dim, a.ctx),
    "exact-f16": lambda m, a: ExactBackend(m.n_layers, m.n_kv_heads, m.head_dim, a.ctx,
                                           dtype=np.float16),
}


def perplexity(m, ids, make_cache, ctx, block):
    """Returns (sum of negative log-likelihoods, tokens scored)."""
    nll, scored = 0.0, 0
    for c0 in range(0, len(ids), ctx):
        window = ids[c0:c0 + ctx]
        if len(window) < 2:
            break
        cache = make_cache()
        acc = {"nll": 0.0}

        def on_logits(i, lg):
            # logits at positions i..i+n-1 predict tokens i+1..i+n
            tgt = window[i + 1:i + 1 + len(lg)]
            lp = log_softmax(lg[:len(tgt)])
            acc["nll"] -= float(lp[np.arange(len(tgt)), tgt].sum())
        try:
            m.forward(window, cache, block=block, logits_cb=on_logits)
        finally:
            cache.close()
        nll += acc["nll"]
        scored += len(window) - 1
    return nll, scored


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("texts", nargs="*", default=[texts.GPL3, texts.GFDL13])
    ap.add_argument("--backend", default="exact", choices=sorted(BACKENDS))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    a = ap.parse_args()
    m = SmolLM(default_model_path())
    for path in a.texts:
        text, sha = texts.read_text(path)
        ids = np.asarray(m.tokenizer.encode(text)[:a.max_tokens], dtype=np.int64)
        t0 = time.time()
        nll, n = perplexity(m, ids, lambda: BACKENDS[a.backend](m, a), a.ctx, a.block)
        print(json.dumps(dict(text=os.path.basename(path), sha256=sha[:16], backend=a.backend,
                              ctx=a.ctx, tokens=int(len(ids)), scored=n,
                              ppl=round(float(np.exp(nll / n)), 4),
                              seconds=round(time.time() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()

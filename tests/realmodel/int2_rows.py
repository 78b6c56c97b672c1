#!/usr/bin/env python3
"""docs/realmodel/int2.md rows: per-context perplexity through kvtierd (Fetch path) or the in-process exact
cache, one JSON line per context appended to --out. Uses the repo's worker and backends.
usage: int2_rows.py ROW CODEC_JSON --text GPL-3 --contexts 0,1,2,3 [--dtype f16] [--exact | --attend]
--attend: the Attend path (the daemon's attention, one token per step, ~10x slower) instead of
Fetch; its rows carry path "attend" (rows without a path are Fetch rows)."""
import argparse, json, os, sys, time
import numpy as np
R = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, R + "/tests/realmodel")
import texts
from kvcache import ExactBackend
import kvtierd_backend as kb
from smollm import SmolLM, default_model_path, log_softmax
ap = argparse.ArgumentParser()
ap.add_argument("row"); ap.add_argument("codec")
ap.add_argument("--text", default="GPL-3"); ap.add_argument("--contexts", default="0,1,2,3")
ap.add_argument("--ctx", type=int, default=1024); ap.add_argument("--dtype", default="f16")
ap.add_argument("--exact", action="store_true"); ap.add_argument("--attend", action="store_true"); ap.add_argument("--out", default=os.path.join(R, "docs", "realmodel", "int2_results.jsonl"))
a = ap.parse_args()
m = SmolLM(default_model_path())
text, sha = texts.read_text("/usr/share/common-licenses/" + a.text)
ids = np.asarray(m.tokenizer.encode(text)[:4096], np.int64)
codec = json.loads(a.codec)
d = None if a.exact else kb.KvtierDaemon()
c = d.client() if d else None
try:
    for ci in [int(x) for x in a.contexts.split(",")]:
        w = ids[ci * a.ctx:(ci + 1) * a.ctx]
        if len(w) < 2:
            break  # the text ends before this context
        seen = {}
        if a.exact:
            cache = ExactBackend(m.n_layers, m.n_kv_heads, m.head_dim, a.ctx)
        elif a.attend:
            cache = kb.KvtierdAttendBackend(c, m.n_layers, m.n_kv_heads, m.head_dim, codec=codec,
                                            dtype=a.dtype)
        else:
            cache = kb.KvtierdFetchBackend(c, m.n_layers, m.n_kv_heads, m.head_dim, codec=codec,
                                           dtype=a.dtype, capacity=a.ctx)
        acc = [0.0]
        def cb(i, lg):
            tgt = w[i + 1:i + 1 + len(lg)]
            lp = log_softmax(lg[:len(tgt)])
            acc[0] -= float(lp[np.arange(len(tgt)), tgt].sum())
        t0 = time.time()
        m.forward(w, cache, block=128, logits_cb=cb)
        info = None
        if not a.exact:
            info = cache.s.stat()
            L, H, D = m.n_layers, m.n_kv_heads, m.head_dim
            B = info.codec["chunk_tokens"]
            steady = None  # chunk 1 (no pins), when a short last context sealed it
            if info.n_chunks >= 2:
                enc = c.fetch_encoded(cache.s.sid, chunk_begin=1, chunk_end=2, include_tail=False)
                steady = 8.0 * len(enc.chunks[0]) / (2 * L * B * H * D) if enc.chunks else None
        cache.close()
        r = dict(row=a.row, text=a.text, context=ci, tokens=len(w), scored=len(w) - 1,
                 nll=acc[0], ppl=float(np.exp(acc[0] / (len(w) - 1))), dtype=None if a.exact else a.dtype,
                 codec=info.codec if info else codec,
                 bits_session=info.bits_per_element if info else None,
                 bits_chunk1=steady if info else None,
                 bytes_held=info.bytes_held if info else None,
                 n_chunks=info.n_chunks if info else None, tail=info.tail_tokens if info else None,
                 seconds=round(time.time() - t0, 1))
        if a.attend:
            r["path"] = "attend"
        print(json.dumps(r), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")
finally:
    if d:
        c.close(); d.stop()

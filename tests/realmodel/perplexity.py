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
Attend path) are 'kvtierd-fetch' and 'kvtierd-attend' (a private kvtierd is started; --codec is a
JSON codec dict, --dtype the session's wire dtype).

--table runs the issue-9 rows (in priority order) through kvtierd's Fetch path and rewrites
docs/realmodel/perplexity.md (markdown + a JSON block) after every row, so an interrupted run
keeps what finished: perplexity, ratio to the exact cache, true bits per element of a sealed
chunk (the daemon's SessionInfo.bits_per_element, checked against FetchEncoded's chunk bytes)
and the bytes the daemon held at the end of a context.
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
import kvtierd_backend as kb  # noqa: E402
from smollm import SmolLM, default_model_path, log_softmax  # noqa: E402

BACKENDS = {
    "exact": lambda m, a: ExactBackend(m.n_layers, m.n_kv_heads, m.head_dim, a.ctx),
    "exact-f16": lambda m, a: ExactBackend(m.n_layers, m.n_kv_heads, m.head_dim, a.ctx,
                                           dtype=np.float16),
    "kvtierd-fetch": lambda m, a: kb.KvtierdFetchBackend(
        a.client, m.n_layers, m.n_kv_heads, m.head_dim, codec=a.codec_dict, dtype=a.dtype,
        capacity=a.ctx, on_close=a.on_close),
    "kvtierd-attend": lambda m, a: kb.KvtierdAttendBackend(
        a.client, m.n_layers, m.n_kv_heads, m.head_dim, codec=a.codec_dict, dtype=a.dtype,
        on_close=a.on_close),
}

# Issue 9's rows, most important first (a partial run keeps the head of this list).
TABLE_ROWS = [("none", dict(scheme="none"))]
for _s, _b, _g, _k in [("oscar", 2, 32, 4), ("kivi", 2, 32, 4), ("hadamard", 2, 32, 4),
                       ("oscar", 4, 32, 4)]:
    TABLE_ROWS.append((f"{_s} INT{_b} G{_g} S{_k}",
                       dict(scheme=_s, bits=_b, group=_g, n_sinks=_k)))
# The daemon's default has detection off (pin_detect_ratio 0); 'detect' turns on the rule
# key norm < 0.5 x median, at most 4 detected pins per chunk (sinks.md).
TABLE_ROWS.append(("oscar INT2 G32 S4 detect r0.5 max4",
                   dict(scheme="oscar", bits=2, group=32, n_sinks=4, pin_detect_ratio=0.5,
                        pin_detect_max=4)))
for _s in ("oscar", "kivi", "hadamard"):
    for _b in (2, 4):
        for _g in (32, 128):
            for _k in (4, 0):
                name = f"{_s} INT{_b} G{_g} S{_k}"
                if name not in [r[0] for r in TABLE_ROWS]:
                    TABLE_ROWS.append((name, dict(scheme=_s, bits=_b, group=_g, n_sinks=_k)))


# The issue-9 rows above measure the codecs as published: chunks of 128 sealed every 128 tokens
# (no recent window), whatever the daemon's defaults are (its default codec is now the preset
# kvtier-int2: B 32, W 128).
for _name, _codec in TABLE_ROWS:
    _codec.setdefault("chunk_tokens", 128)
    _codec.setdefault("recent_exact_tokens", 0)
# kvtier-int2's ablation (docs/realmodel/int2.md): faithful OScaR INT2 G32 S0 B128 (above),
# + 8 sinks, + chunks of 32 with the recent window W 128 = the preset kvtier-int2.
TABLE_ROWS.append(("oscar INT2 G32 S8", dict(scheme="oscar", bits=2, group=32, n_sinks=8,
                                             chunk_tokens=128, recent_exact_tokens=0)))
TABLE_ROWS.append(("kvtier-int2 (oscar INT2 G32 S8 B32 W128)", dict(preset="kvtier-int2")))


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


def chunk_bits(client, sid, info):
    """True bits per element of the first sealed chunk, from its bytes (FetchEncoded)."""
    enc = client.fetch_encoded(sid, chunk_begin=0, chunk_end=1, include_tail=False)
    if not enc.chunks:
        return None
    c = info.codec
    elems = info.n_layers * c["chunk_tokens"] * info.n_kv_heads * info.head_dim * 2
    return 8.0 * len(enc.chunks[0]) / elems


def write_table(path, meta, results):
    lines = ["# Perplexity of SmolLM2-135M with its KV cache in kvtierd", "",
             "Made by `tests/realmodel/perplexity.py --table` (do not edit by hand). "
             + meta["note"], "",
             "| row | text | tokens scored | perplexity | ratio to exact | bits/elem (sealed chunk) "
             "| bytes held (end of context) | seconds |", "|---|---|---|---|---|---|---|---|"]
    exact = {r["text"]: r["ppl"] for r in results if r["row"] == "none"}
    for r in results:
        ratio = r["ppl"] / exact[r["text"]] if r["text"] in exact else float("nan")
        r["ratio"] = round(ratio, 5)
        lines.append(f"| {r['row']} | {r['text']} | {r['scored']} | {r['ppl']:.4f} | "
                     f"{ratio:.4f} | {r['bits']} | {r['bytes_held']} | {r['seconds']} |")
    done = {(r["row"], r["text"]) for r in results}
    missing = [f"{n} ({t})" for n, _ in TABLE_ROWS for t in meta["texts"] if (n, t) not in done]
    lines += ["", "Missing rows (not run yet): " + (", ".join(missing) if missing else "none"), "",
              "```json", json.dumps(dict(meta=meta, results=results), indent=1), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def run_table(m, a):
    meta = dict(ctx=a.ctx, max_tokens=a.max_tokens, block=a.block, dtype=a.dtype,
                texts=[os.path.basename(p) for p in a.texts],
                note=(f"Fetch path (attention in the worker over what kvtierd's Fetch returns), "
                      f"{a.dtype} session, contexts of {a.ctx} tokens, the first "
                      f"{a.max_tokens} tokens of each text, daemon defaults for what a row does "
                      f"not name (chunk 128; detection off unless the row says 'detect'). "
                      f"Bits/elem counts the exact copies of pinned tokens in the wire dtype "
                      f"(f32: a pinned token costs 32 bits per element of it). Bits/elem: SessionInfo.bits_per_element of the session "
                      f"(FetchEncoded's first chunk gives the same within rounding)."))
    results = []
    for name, codec in TABLE_ROWS:
        for path in a.texts:
            text, sha = texts.read_text(path)
            ids = np.asarray(m.tokenizer.encode(text)[:a.max_tokens], dtype=np.int64)
            a.codec_dict = codec
            seen = {}

            def on_close(b):
                info = b.s.last_info
                seen["info"] = info
                seen["held"] = info.bytes_held
            orig = kb._Session.drop

            def drop_with_bits(self):
                if self.sid is not None and "bits" not in seen:
                    info = self.stat()
                    seen["bits"] = info.bits_per_element
                    seen["chunk_bits"] = chunk_bits(self.client, self.sid, info)
                orig(self)
            kb._Session.drop = drop_with_bits
            a.on_close = on_close
            t0 = time.time()
            try:
                nll, n = perplexity(m, ids, lambda: BACKENDS["kvtierd-fetch"](m, a), a.ctx,
                                    a.block)
            finally:
                kb._Session.drop = orig
            r = dict(row=name, text=os.path.basename(path), codec=seen["info"].codec,
                     scored=n, ppl=round(float(np.exp(nll / n)), 4),
                     bits=round(seen["bits"], 4) if seen.get("bits") else seen.get("bits"),
                     chunk_bits=round(seen["chunk_bits"], 4) if seen.get("chunk_bits") else None,
                     bytes_held=seen["held"], seconds=round(time.time() - t0, 1))
            print(json.dumps(r), flush=True)
            results.append(r)
            write_table(a.out, meta, results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("texts", nargs="*", default=[texts.GPL3, texts.GFDL13])
    ap.add_argument("--backend", default="exact", choices=sorted(BACKENDS))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--codec", default="{}", help="JSON codec dict for the kvtierd backends")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "docs", "realmodel",
                                                  "perplexity.md"))
    a = ap.parse_args()
    a.codec_dict = json.loads(a.codec)
    a.on_close = None
    m = SmolLM(default_model_path())
    daemon = None
    if a.table or a.backend.startswith("kvtierd"):
        daemon = kb.KvtierDaemon()
        a.client = daemon.client()
    try:
        if a.table:
            run_table(m, a)
        else:
            run_texts(m, a)
    finally:
        if daemon:
            a.client.close()
            daemon.stop()


def run_texts(m, a):
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

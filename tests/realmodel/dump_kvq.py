#!/usr/bin/env python3
"""Dumps SmolLM2's real post-RoPE K, V and Q for `kvtier-bench fidelity`, and measures which
tokens act as attention sinks.

Usage:
  dump_kvq.py OUT_DIR [--text FILE | --chat "QUESTION" [--generate N]] [--tokens N]
              [--dtype f32|f16] [--layers I,J,...] [--report]

Writes into OUT_DIR (keep it out of git, e.g. under build/):
  k.npy  [layers][tokens][kv_heads][head_dim]   post-RoPE keys (what attention consumes)
  v.npy  [layers][tokens][kv_heads][head_dim]
  q.npy  [layers][tokens][q_heads][head_dim]    post-RoPE queries (GQA: q head h reads kv head h // 3)
  ids.npy [tokens] (int32), meta.json (shapes, model, text, softmax scale, the layers kept)
--layers keeps only those layers (in that order) in k/v/q.npy: a small real-model set, e.g.
for tests/gpu/test_gpu_attend_real.c on a GPU machine.
--report prints, per layer, the tokens that take the most attention with their key and value
norms relative to the layer's median (the evidence docs/realmodel/sinks.md records), and one
JSON line per layer.
"""
import argparse
import json
import os
import sys

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import texts  # noqa: E402
from smollm import SmolLM, default_model_path  # noqa: E402


def dump(m, ids, block=128):
    L, T = m.n_layers, len(ids)
    K = np.empty((L, T, m.n_kv_heads, m.head_dim), np.float32)
    V = np.empty_like(K)
    Q = np.empty((L, T, m.n_heads, m.head_dim), np.float32)
    cache = m.new_cache(T)
    state = {"p0": 0}

    def hook(layer, q, k, v):
        p0 = state["p0"]
        n = q.shape[0]
        Q[layer, p0:p0 + n], K[layer, p0:p0 + n], V[layer, p0:p0 + n] = q, k, v

    i = 0
    while i < T:
        n = min(block, T - i)
        state["p0"] = i
        m.forward_block(ids[i:i + n], cache, want_logits=False, hook=hook)
        i += n
    return K, V, Q


def sink_stats(K, V, Q, scale, min_query=16):
    """Per layer: joint key norm and value norm per token (over all KV heads, as OScaR's n_t),
    and the attention mass each token receives: the mean over all query heads and over queries
    at positions >= min_query of the causal softmax probability."""
    L, T, hkv, d = K.shape
    hq = Q.shape[2]
    g = hq // hkv
    out = []
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)
    for li in range(L):
        kn = np.sqrt((K[li].astype(np.float64) ** 2).sum(axis=(1, 2)))
        vn = np.sqrt((V[li].astype(np.float64) ** 2).sum(axis=(1, 2)))
        mass = np.zeros(T)
        for h in range(hq):
            s = Q[li, :, h] @ K[li, :, h // g].T * scale           # [T][T]
            s[mask] = -np.inf
            s -= s.max(axis=1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=1, keepdims=True)
            mass += p[min_query:].mean(axis=0)
        mass /= hq
        out.append(dict(key_norm=kn, value_norm=vn, mass=mass))
    return out


def detection_summary(stats, sink_mass=0.05, ratios=(0.2, 0.3, 0.4, 0.5, 0.6), first=(1, 4, 8)):
    """How well "key norm < r x the layer's median" finds the attention sinks (tokens that
    receive >= sink_mass of the attention, per layer), against pinning the first S tokens.
    One row per rule: sinks found (recall), tokens flagged in all, the attention mass the flagged
    tokens hold, all summed over layers; flagged_union counts distinct positions over layers."""
    rows = []
    T = len(stats[0]["mass"])
    sinks = [set(np.nonzero(s["mass"] >= sink_mass)[0].tolist()) for s in stats]
    n_sinks = sum(len(x) for x in sinks)
    total_mass = sum(float(s["mass"].sum()) for s in stats)

    def row(rule, flagged):
        found = sum(len(f & s) for f, s in zip(flagged, sinks))
        mass = sum(float(st["mass"][sorted(f)].sum()) if f else 0.0 for f, st in zip(flagged, stats))
        return dict(rule=rule, sink_mass_threshold=sink_mass, sinks=n_sinks, sinks_found=found,
                    flagged=sum(len(f) for f in flagged), flagged_per_layer_max=max(len(f) for f in flagged),
                    flagged_not_sink=sum(len(f - s) for f, s in zip(flagged, sinks)),
                    # kvtier pins one token set per chunk for all layers: the union is the cost
                    flagged_union=len(set().union(*flagged)),
                    mass_held=round(mass / total_mass, 4), tokens=T, layers=len(stats))
    for S in first:
        rows.append(row(f"first {S}", [set(range(min(S, T)))] * len(stats)))
    for r in ratios:
        flagged = [set(np.nonzero(s["key_norm"] < r * np.median(s["key_norm"]))[0].tolist()) for s in stats]
        rows.append(row(f"key_norm < {r} x median", flagged))
    for r in (0.3, 0.4):
        flagged = [set(np.nonzero(s["value_norm"] < r * np.median(s["value_norm"]))[0].tolist()) for s in stats]
        rows.append(row(f"value_norm < {r} x median", flagged))
    for r in (0.3, 0.4):
        flagged = [set(np.nonzero((s["value_norm"] < r * np.median(s["value_norm"])) &
                                  (s["key_norm"] < 0.6 * np.median(s["key_norm"])))[0].tolist()) for s in stats]
        rows.append(row(f"value_norm < {r} x median and key_norm < 0.6 x median", flagged))
    for S in (4,):
        for r in (0.3, 0.5):
            flagged = [set(range(min(S, T))) | set(np.nonzero(s["key_norm"] < r * np.median(s["key_norm"]))[0].tolist())
                       for s in stats]
            rows.append(row(f"first {S} + key_norm < {r} x median", flagged))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--text", default=texts.GPL3)
    ap.add_argument("--chat", default=None, help="a user question in the chat template instead")
    ap.add_argument("--generate", type=int, default=0,
                    help="with --chat: append this many greedily generated answer tokens")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    ap.add_argument("--layers", default=None,
                    help="comma-separated layer indices to keep in k/v/q.npy (default: all)")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    m = SmolLM(default_model_path())
    tok = m.tokenizer
    if a.chat is not None:
        src = "chat"
        prompt = texts.CHAT.replace("What does the GPL say about warranties?", a.chat)
        ids = tok.encode(prompt, special=True)
        if a.generate:
            ids = ids + m.generate(ids, m.new_cache(), a.generate, stop_ids=(tok.eos_id, 2))
    else:
        src = a.text
        ids = tok.encode(texts.read_text(a.text)[0])
    ids = ids[:a.tokens]
    K, V, Q = dump(m, ids)
    layers = list(range(m.n_layers))
    if a.layers:
        layers = [int(x) for x in a.layers.split(",")]
        bad = [li for li in layers if not 0 <= li < m.n_layers]
        if bad:
            sys.exit(f"dump_kvq: --layers {bad} outside 0..{m.n_layers - 1}")
        K, V, Q = K[layers], V[layers], Q[layers]
    os.makedirs(a.out, exist_ok=True)
    dt = np.float32 if a.dtype == "f32" else np.float16
    np.save(os.path.join(a.out, "k.npy"), K.astype(dt))
    np.save(os.path.join(a.out, "v.npy"), V.astype(dt))
    np.save(os.path.join(a.out, "q.npy"), Q.astype(dt))
    np.save(os.path.join(a.out, "ids.npy"), np.asarray(ids, np.int32))
    meta = dict(model=os.path.basename(default_model_path()), source=src, tokens=len(ids),
                n_layers=len(layers), model_layers=layers, n_kv_heads=m.n_kv_heads, n_q_heads=m.n_heads,
                head_dim=m.head_dim, softmax_scale=float(m.scale), dtype=a.dtype,
                layout=dict(k="[layer][token][kv_head][dim]", v="[layer][token][kv_head][dim]",
                            q="[layer][token][q_head][dim]"), rope="post-RoPE, adjacent-pair (GGUF order)")
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {a.out}: {len(ids)} tokens, K {K.shape}, Q {Q.shape}", file=sys.stderr)
    if not a.report:
        return
    stats = sink_stats(K, V, Q, m.scale)  # per kept layer (row "layer" = index into --layers)
    pieces = [tok.decode([t]) for t in ids]
    for li, s in enumerate(stats):
        kmed, vmed = np.median(s["key_norm"]), np.median(s["value_norm"])
        top = np.argsort(-s["mass"])[:4]
        row = dict(layer=li, key_norm_median=round(float(kmed), 3),
                   value_norm_median=round(float(vmed), 3),
                   top=[dict(pos=int(t), tok=pieces[t], mass=round(float(s["mass"][t]), 4),
                             key_norm_rel=round(float(s["key_norm"][t] / kmed), 3),
                             value_norm_rel=round(float(s["value_norm"][t] / vmed), 3))
                        for t in top],
                   lowest_key_norm=[dict(pos=int(t), rel=round(float(s["key_norm"][t] / kmed), 3),
                                         mass=round(float(s["mass"][t]), 4))
                                    for t in np.argsort(s["key_norm"])[:3]])
        print(json.dumps(row, ensure_ascii=False))
    for row in detection_summary(stats):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

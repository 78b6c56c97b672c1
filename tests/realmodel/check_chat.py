#!/usr/bin/env python3
"""ctest realmodel_chat: the quick start's chat continues from the cache kvtierd holds.

A private kvtierd; the model loaded once; every turn is run by a fresh worker object whose only
KV cache is the kvtierd session (KvtierdChatCache attaches to the session by id, as a new
process does). The built-in demo conversation (tests/realmodel/chat.py), two turns:

1. Exact codec (scheme none, chunks of 32 so several are sealed, f32 session): turn 2's logits,
   continuing from kvtierd's cache (prefill of the new tokens through the Fetch path, decoding
   through Attend), equal those of recomputing the whole transcript in-process (exact cache,
   f32), to float rounding, and the greedy tokens are identical.
2. The daemon's default codec (whatever it is; not named here), f16 session: turn 2 produces
   non-empty text, and the tokens the worker ran through the model (counted on the model's
   forward_block, independently of the worker's own bookkeeping) are exactly turn 2's new
   prompt and generated tokens: the first turn is never run again.
Exit 77 (skipped) only when the model cannot be fetched.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from chat import (DEMO_TURNS, ChatTemplate, ChatWorker, KvtierdChatCache,  # noqa: E402
                  compression, recompute)
from kvtierd_backend import KvtierDaemon  # noqa: E402
from smollm import SmolLM, default_model_path  # noqa: E402


def fetch_model():
    path = default_model_path()
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        return path
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run([os.path.join(here, "fetch_model.sh")], env=env, capture_output=True,
                       text=True)
    if r.returncode != 0 or not os.path.isfile(path):
        print(f"SKIP: the model could not be fetched (fetch_model.sh exit {r.returncode}):\n"
              f"{r.stderr[-2000:]}", flush=True)
        sys.exit(77)
    return path


class Counted:
    """Counts the tokens run through the model's forward_block."""

    def __init__(self, m):
        self.n = 0
        orig = m.forward_block

        def fb(tokens, cache, *args, **kw):
            self.n += len(tokens)
            return orig(tokens, cache, *args, **kw)
        m.forward_block = fb


def two_turns(m, tpl, client, sid, codec, dtype, max_new, counter):
    """Turn 1 with worker A, turn 2 with a fresh worker B on the same session."""
    L, H, D = m.n_layers, m.n_kv_heads, m.head_dim
    a_cache = KvtierdChatCache(client, L, H, D, sid, codec=codec, dtype=dtype)
    assert a_cache.created, sid
    a = ChatWorker(m, tpl, a_cache)
    r1 = a.turn(DEMO_TURNS[0], max_new)
    prefix = list(a.transcript)
    del a, a_cache                      # nothing of turn 1's worker survives but the session
    b_cache = KvtierdChatCache(client, L, H, D, sid)
    assert not b_cache.created and b_cache.n_tokens == len(prefix), (b_cache.n_tokens, len(prefix))
    info_before = b_cache.stat()
    b = ChatWorker(m, tpl, b_cache, prefix)
    n0 = counter.n
    r2 = b.turn(DEMO_TURNS[1], max_new, keep_logits=True)
    r2.update(model_tokens=counter.n - n0, fetched_tokens=b_cache.fetched_tokens,
              appended=b_cache.tokens_appended, attended=b_cache.tokens_attended,
              info_before=info_before, info_after=b_cache.stat())
    return r1, prefix, r2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--exact-chunk", type=int, default=32)
    a = ap.parse_args()
    t_start = time.time()
    path = fetch_model()
    m = SmolLM(path)
    tpl = ChatTemplate.from_gguf(path)
    counter = Counted(m)
    tok = m.tokenizer
    fails = []

    def check(ok, msg):
        if not ok:
            fails.append(msg)
            print("FAIL: " + msg, flush=True)

    d = KvtierDaemon()
    c = d.client()
    try:
        # 1. exact codec: the continuation equals recomputing the transcript
        codec = {"scheme": "none", "group": 32, "chunk_tokens": a.exact_chunk}
        r1, prefix, r2 = two_turns(m, tpl, c, "chat-exact", codec, "f32", a.max_new, counter)
        full = prefix + r2["prompt_ids"]
        ref = recompute(m, full, a.max_new, {tok.encode("<|im_end|>", special=True)[0],
                                             tok.eos_id}, "f32", keep_logits=True)
        n = min(len(ref["logits"]), len(r2["logits"]))
        diffs = [float(np.abs(x - y).max()) for x, y in zip(r2["logits"][:n], ref["logits"][:n])]
        print(json.dumps(dict(
            check="exact_continuation", prefix_tokens=len(prefix),
            sealed_chunks_before_turn2=r2["info_before"].n_chunks,
            turn2_prompt_tokens=len(r2["prompt_ids"]), turn2_generated=len(r2["ids"]),
            model_tokens_turn2=r2["model_tokens"], fetched_tokens=r2["fetched_tokens"],
            prefill_logit_diff=diffs[0], max_decode_logit_diff=max(diffs[1:], default=0.0),
            tokens_equal=r2["ids"] == ref["ids"], turn1=r1["text"], turn2=r2["text"])),
            flush=True)
        check(r2["info_before"].n_chunks >= 2,
              f"the exact session sealed {r2['info_before'].n_chunks} chunks before turn 2")
        check(r2["ids"] == ref["ids"], f"greedy tokens differ: kvtierd {r2['ids']} vs "
              f"recomputed {ref['ids']}")
        check(len(r2["logits"]) == len(ref["logits"]),
              f"{len(r2['logits'])} decode steps vs {len(ref['logits'])} recomputed")
        # Prefill reads the daemon's f32 values in the worker: only the block schedule differs.
        check(diffs[0] <= 1e-3, f"prefill logits differ by {diffs[0]} > 1e-3")
        # Decode attention runs in the daemon (Attend): its own summation order.
        check(max(diffs) <= 1e-2, f"decode logits differ by {max(diffs)} > 1e-2")
        check(r2["model_tokens"] == len(r2["prompt_ids"]) + len(r2["ids"]),
              f"turn 2 ran {r2['model_tokens']} tokens through the model, expected "
              f"{len(r2['prompt_ids'])} + {len(r2['ids'])}")
        check(r2["fetched_tokens"] >= len(prefix),
              f"turn 2 fetched {r2['fetched_tokens']} tokens, the prefix has {len(prefix)}")
        check(r2["info_after"].n_tokens == len(full) + len(r2["ids"]),
              f"session holds {r2['info_after'].n_tokens} tokens, expected "
              f"{len(full) + len(r2['ids'])}")
        c.drop("chat-exact")

        # 2. the daemon's default codec
        r1, prefix, r2 = two_turns(m, tpl, c, "chat-default", None, "f16", a.max_new, counter)
        comp = compression(r2["info_after"])
        print(json.dumps(dict(
            check="default_codec_continuation", prefix_tokens=len(prefix),
            sealed_chunks_before_turn2=r2["info_before"].n_chunks,
            turn2_prompt_tokens=len(r2["prompt_ids"]), turn2_generated=len(r2["ids"]),
            model_tokens_turn2=r2["model_tokens"], appended=r2["appended"],
            attended=r2["attended"], compression=comp, turn1=r1["text"], turn2=r2["text"])),
            flush=True)
        check(r2["text"].strip() != "", "turn 2 produced no text")
        check(r2["model_tokens"] == len(r2["prompt_ids"]) + len(r2["ids"]),
              f"turn 2 ran {r2['model_tokens']} tokens through the model, expected "
              f"{len(r2['prompt_ids'])} + {len(r2['ids'])} (the first turn has "
              f"{len(prefix)})")
        check(r2["appended"] == len(r2["prompt_ids"]) and r2["attended"] == len(r2["ids"]),
              f"turn 2 appended {r2['appended']} / attended {r2['attended']} tokens")
        check(r2["info_after"].n_tokens == len(prefix) + r2["model_tokens"],
              f"session holds {r2['info_after'].n_tokens} tokens")
        # Turn 2 must have read compressed chunks: the first seal happens at B tokens, or after
        # W + 1 with a recent exact window W (whatever the default codec is).
        cd = r2["info_before"].codec or {}
        ct, w = int(cd.get("chunk_tokens") or 0), int(cd.get("recent_exact_tokens") or 0)
        first_seal = w + 1 if w else ct
        if ct and len(prefix) >= first_seal:
            check(r2["info_before"].n_chunks >= 1,
                  f"{len(prefix)} tokens, codec {cd}, but no sealed chunk")
        c.drop("chat-default")
    finally:
        c.close()
        rc = d.stop()
    if rc != 0:
        fails.append(f"kvtierd exited with status {rc}")
    print(json.dumps(dict(seconds=round(time.time() - t_start, 1), failures=fails)), flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

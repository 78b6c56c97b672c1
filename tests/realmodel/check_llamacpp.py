#!/usr/bin/env python3
"""ctest realmodel_llamacpp: our numpy SmolLM2 worker against llama.cpp's reference.

Compares with fixtures/llamacpp_ref.npz (made by make_reference.py with llama-cpp-python, so CI
does not build llama.cpp). Fetches the model with fetch_model.sh when it is missing. Asserts:
  1. our tokenizer's ids equal llama.cpp's on every stored text (three licence files, an
     edge-case string with and without special-token parsing, a chat prompt);
  2. on each perplexity window (the first 1024 tokens of GPL-3 and of GFDL-1.3), teacher-forced
     perplexity within 1% of llama.cpp's and top-1 agreement >= 95%, against llama.cpp with
     its default f16 KV cache and with an f32 KV cache;
  3. the block seam: with a cache that seals every B tokens through a lossy codec, block-wise
     teacher forcing gives the same logits as token-by-token decoding.
Prints one JSON object per window with the numbers for our float32 pass. With
KVTIER_EMULATE_LLAMACPP=1 it also prints (never asserts) a diagnostic pass that emulates
llama.cpp's 8-bit activations and f16 Q/K/V. Exit 0 pass, 1 fail.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import texts  # noqa: E402
from kvcache import ExactBackend  # noqa: E402
from smollm import SmolLM, default_model_path, log_softmax  # noqa: E402

PPL_TOL = 0.01
TOP1_MIN = 0.95

failures = []


def check(cond, what):
    print(("ok     " if cond else "FAILED ") + what, flush=True)
    if not cond:
        failures.append(what)


def ensure_model():
    path = default_model_path()
    if os.path.exists(path):
        return path
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run([os.path.join(here, "fetch_model.sh")], env=env, check=True,
                         stdout=subprocess.PIPE, text=True)
    return res.stdout.strip().splitlines()[-1]


class ToySealBackend(ExactBackend):
    """Seals every B tokens through a deliberately lossy toy codec, applied once at seal time
    like kvtierd's chunks: keys scaled by 0.8, values by 1.25. It is smooth on purpose: a
    rounding quantizer would turn the float-rounding differences between a 32-token and a
    1-token matmul into whole quantization steps at rounding ties, and hide the comparison.
    Only for checking the block seam: it is not the OScaR codec."""

    def __init__(self, *a, seal_tokens=32, **kw):
        super().__init__(*a, **kw)
        self.seal_tokens = seal_tokens
        self.sealed = 0

    def commit(self, k, v):
        super().commit(k, v)
        B = self.seal_tokens
        while self.n_tokens - self.sealed >= B:
            s = slice(self.sealed, self.sealed + B)
            self.k[:, s] *= np.float32(0.8)
            self.v[:, s] *= np.float32(1.25)
            self.sealed += B


def main():
    t_start = time.time()
    ref = np.load(os.path.join(here, "fixtures", "llamacpp_ref.npz"))
    meta = json.loads(str(ref["meta"]))
    model_path = ensure_model()
    t0 = time.time()
    m = SmolLM(model_path)
    print(f"# model loaded in {time.time() - t0:.1f}s; reference from llama-cpp-python "
          f"{meta['llama_cpp_python']}", flush=True)
    tok = m.tokenizer

    # 1. tokenizer
    for key in sorted(k for k in ref.files if k.startswith("tok_") and k.endswith("_ids")):
        name = key[4:-4]
        if f"tok_{name}_text" in ref.files:
            text = str(ref[f"tok_{name}_text"])
            special = bool(ref[f"tok_{name}_special"])
        else:
            path = {"gpl3": texts.GPL3, "gfdl13": texts.GFDL13, "apache2": texts.APACHE2}[name]
            text, sha = texts.read_text(path)
            if sha != str(ref[f"tok_{name}_sha"]):
                check(False, f"tokenizer {name}: {path} differs from the one the fixture was made from")
                continue
            special = False
        ours = tok.encode(text, special=special)
        theirs = ref[key].astype(np.int64).tolist()
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     None if len(ours) == len(theirs) else min(len(ours), len(theirs)))
        check(first is None, f"tokenizer {name}: {len(ours)} ids equal llama.cpp's {len(theirs)}"
              + ("" if first is None else f" (first difference at {first}: ours "
                 f"{ours[first:first + 5]} llama.cpp {theirs[first:first + 5]})"))
        if not special:
            check(tok.decode(ours) == text, f"tokenizer {name}: decode(encode(text)) == text")

    # 2. perplexity and top-1 agreement (KVTIER_EMULATE_LLAMACPP=1 adds a diagnostic pass with
    #    llama.cpp's 8-bit activations and f16 Q/K/V emulated: printed, never asserted)
    windows = sorted(k for k in ref.files if k.startswith("ppl_") and k.endswith("_ids"))
    modes = ["fp32"] + (["emulate_llamacpp"] if os.environ.get("KVTIER_EMULATE_LLAMACPP") else [])
    for mode, key in [(md, k) for md in modes for k in windows]:
        name = key[4:-4]
        ids = ref[key].astype(np.int64)
        n = len(ids)
        m.emulate = mode == "emulate_llamacpp"
        t0 = time.time()
        logits = m.forward(ids.tolist(), m.new_cache(n), block=128)
        dt = time.time() - t0
        m.emulate = False
        lp = log_softmax(logits)
        ours_lp = lp[np.arange(n - 1), ids[1:]]
        ppl_ours = float(np.exp(-ours_lp.mean()))
        for kv in ("kvf16", "kvf32"):
            p = f"ref_{name}_{kv}"
            ppl_ref = float(np.exp(-ref[f"{p}_true_lp"].astype(np.float64).mean()))
            top_idx = ref[f"{p}_topk_idx"].astype(np.int64)
            top1 = float(np.mean(np.argmax(logits, axis=1) == top_idx[:, 0]))
            # our logits at llama.cpp's top-K ids against theirs (raw, and as log-probabilities)
            ours_at = np.take_along_axis(logits, top_idx, axis=1)
            theirs_at = ref[f"{p}_topk_logit"].astype(np.float32)
            mad_logit = float(np.mean(np.abs(ours_at - theirs_at)))
            theirs_lp_at = theirs_at - ref[f"{p}_lse"][:, None]
            mad_lp = float(np.mean(np.abs(np.take_along_axis(lp, top_idx, axis=1) - theirs_lp_at)))
            # per-token log-likelihood difference: its standard error says how much of the
            # perplexity ratio is sampling noise of this window
            dnll = ref[f"{p}_true_lp"].astype(np.float64) - ours_lp
            res = dict(test="realmodel_llamacpp", mode=mode, text=name, tokens=n,
                       llamacpp_kv=kv[2:], ppl_ours=round(ppl_ours, 4),
                       ppl_llamacpp=round(ppl_ref, 4), ppl_ratio=round(ppl_ours / ppl_ref, 5),
                       log_ratio_stderr=round(float(dnll.std() / np.sqrt(len(dnll))), 5),
                       top1_agreement=round(top1, 4), mean_abs_logit_diff_topk=round(mad_logit, 4),
                       mean_abs_logprob_diff_topk=round(mad_lp, 4), forward_s=round(dt, 2),
                       tokens_per_s=round(n / dt, 1))
            print(json.dumps(res), flush=True)
            if mode != "fp32":
                continue
            check(abs(ppl_ours / ppl_ref - 1) <= PPL_TOL,
                  f"{name}: perplexity {ppl_ours:.4f} within {PPL_TOL:.0%} of llama.cpp's "
                  f"{ppl_ref:.4f} ({kv[2:]} KV cache)")
            check(top1 >= TOP1_MIN, f"{name}: top-1 agreement {top1:.4f} >= {TOP1_MIN} "
                  f"(llama.cpp, {kv[2:]} KV cache)")
        if mode == "fp32":
            a = float(np.exp(-ref[f"ref_{name}_kvf16_true_lp"].astype(np.float64).mean()))
            b = float(np.exp(-ref[f"ref_{name}_kvf32_true_lp"].astype(np.float64).mean()))
            print(f"# {name}: llama.cpp's own perplexity, f16 KV {a:.4f} vs f32 KV {b:.4f} "
                  f"(ratio {a / b:.5f})", flush=True)

    # 3. the block seam: block-wise teacher forcing == token-by-token decoding on a sealing cache
    ids = ref["ppl_gpl3_ids"].astype(np.int64).tolist()[:80]
    B = 32
    c1 = ToySealBackend(m.n_layers, m.n_kv_heads, m.head_dim, 128, seal_tokens=B)
    blocked = m.forward(ids, c1, block=128)                 # cut at 32, 64 by max_block
    c2 = ToySealBackend(m.n_layers, m.n_kv_heads, m.head_dim, 128, seal_tokens=B)
    stepped = np.concatenate([m.forward_block([t], c2) for t in ids], axis=0)
    exact = m.forward(ids, m.new_cache(128), block=128)
    d_seam = float(np.max(np.abs(blocked - stepped)))
    d_codec = float(np.max(np.abs(blocked - exact)))
    check(d_seam < 2e-3, f"block seam: blocked vs token-by-token max |logit diff| {d_seam:.2e} < 2e-3")
    check(d_codec > 100 * max(d_seam, 1e-6),
          f"block seam: the toy codec really changes logits ({d_codec:.3f}), so the check has teeth")
    check(float(np.max(np.abs(blocked[:B] - exact[:B]))) < 2e-3,
          "block seam: tokens before the first seal see only exact K/V")

    print(f"# total {time.time() - t_start:.1f}s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

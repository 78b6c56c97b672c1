#!/usr/bin/env python3
"""Makes tests/realmodel/fixtures/llamacpp_ref.npz: llama.cpp's token ids and logits for the
real-model check, so that CI does not have to build llama.cpp.

Needs llama-cpp-python (it builds llama.cpp from source, ~15 minutes on 2 cores), in its own
venv, e.g.:
    python3 -m venv build/llama-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 nice build/llama-venv/bin/pip install llama-cpp-python numpy
    build/llama-venv/bin/python tests/realmodel/make_reference.py [MODEL.gguf]

What is stored (compressed npz, well under 1 MB):
  tok_<name>_ids         llama.cpp's ids for each tokenizer text (uint16), and tok_<name>_sha
                         (sha256 of the file) or tok_<name>_text (the literal string)
  ppl_<name>_ids         the ids of each perplexity window (the first N tokens of the text)
  and for llama.cpp with its default f16 KV cache (<kv> = kvf16) and with an f32 one (kvf32):
  ref_<name>_<kv>_topk_idx    llama.cpp's top-K next-token ids at every position (uint16 [N][K])
  ref_<name>_<kv>_topk_logit  their logits (float16 [N][K])
  ref_<name>_<kv>_lse         log-sum-exp of the full logit row (float32 [N])
  ref_<name>_<kv>_true_lp     log-softmax of the true next token (float32 [N-1])
  meta                   JSON: llama.cpp version, model file sha256, settings
"""
import hashlib
import json
import os
import sys

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import texts  # noqa: E402

TOPK = 16
PPL_WINDOWS = [("gpl3", texts.GPL3, 1024), ("gfdl13", texts.GFDL13, 1024)]
TOK_FILES = [("gpl3", texts.GPL3), ("gfdl13", texts.GFDL13), ("apache2", texts.APACHE2)]
TOK_STRINGS = [("edge", texts.EDGE, False), ("edge_special", texts.EDGE, True),
               ("chat_special", texts.CHAT, True)]


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def main():
    import argparse
    import llama_cpp
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.path.expanduser(
        "~/.cache/kvtier/models/smollm2-135m-instruct-q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(here, "fixtures", "llamacpp_ref.npz"))
    a = ap.parse_args()
    model = a.model
    n_ctx = max(n for _, _, n in PPL_WINDOWS)

    def load(kv_type):
        return llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512,
                               n_threads=2, logits_all=True, verbose=False, flash_attn=False,
                               type_k=kv_type, type_v=kv_type)
    llm = load(1)   # GGML_TYPE_F16: llama.cpp's default KV cache
    out = {}
    for name, path in TOK_FILES:
        text, sha = texts.read_text(path)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        out[f"tok_{name}_ids"] = np.asarray(ids, dtype=np.uint16)
        out[f"tok_{name}_sha"] = np.asarray(sha)
        print(f"tokenizer text {name}: {len(ids)} tokens", file=sys.stderr)
    for name, text, special in TOK_STRINGS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        out[f"tok_{name}_ids"] = np.asarray(ids, dtype=np.uint16)
        out[f"tok_{name}_text"] = np.asarray(text)
        out[f"tok_{name}_special"] = np.asarray(special)
    # Two llama.cpp configurations: its default f16 KV cache, and an f32 one. The difference
    # between the two is llama.cpp's own rounding noise, the scale any other exact
    # implementation's difference should be judged on.
    for kv, kv_type in (("kvf16", 1), ("kvf32", 0)):
        if kv_type != 1:
            llm = load(kv_type)
        for name, path, n in PPL_WINDOWS:
            text, sha = texts.read_text(path)
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:n]
            assert len(ids) == n, (name, len(ids))
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[:n], dtype=np.float32)         # [n][vocab]
            top = np.argsort(-logits, axis=1, kind="stable")[:, :TOPK]
            m = logits.max(axis=1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float32)
            true_lp = logits[np.arange(n - 1), ids[1:]] - lse[:-1]
            out[f"ppl_{name}_ids"] = np.asarray(ids, dtype=np.uint16)
            out[f"ppl_{name}_sha"] = np.asarray(sha)
            p = f"ref_{name}_{kv}"
            out[f"{p}_topk_idx"] = top.astype(np.uint16)
            out[f"{p}_topk_logit"] = np.take_along_axis(logits, top, axis=1).astype(np.float16)
            out[f"{p}_lse"] = lse
            out[f"{p}_true_lp"] = true_lp.astype(np.float32)
            print(f"ppl window {name} ({kv}): {n} tokens, llama.cpp perplexity "
                  f"{float(np.exp(-true_lp.mean())):.4f}", file=sys.stderr)
    meta = dict(llama_cpp_python=llama_cpp.__version__, model=os.path.basename(model),
                model_sha256=file_sha256(model), n_threads=2, topk=TOPK, kv_cache=["f16 (kvf16, llama.cpp's default)", "f32 (kvf32)"],
                flash_attn=False, note="llama.cpp CPU backend, logits for every position")
    out["meta"] = np.asarray(json.dumps(meta))
    dest = a.out
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    np.savez_compressed(dest, **out)
    print(dest, os.path.getsize(dest), "bytes", file=sys.stderr)


if __name__ == "__main__":
    main()

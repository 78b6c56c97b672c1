"""SmolLM2-135M-Instruct inference in numpy, from the Q4_1 GGUF file (our own forward pass).

Llama architecture: 30 layers, d_model 576, 9 query heads / 3 KV heads of head_dim 64 (GQA),
RMSNorm (eps from the file), RoPE (base 100000), SwiGLU MLP (1536), output tied to the token
embedding. Weights are dequantized once to float32 by the `gguf` package; activations stay fp32.

RoPE: the GGUF converter permutes the rows of attn_q / attn_k so that llama.cpp's "normal" RoPE,
which rotates adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/d), reproduces the HF model's
rotate-half RoPE. We read the permuted weights and rotate adjacent pairs, so our post-RoPE Q and
K are in the same channel order as llama.cpp's KV cache.

The KV cache is pluggable (kvcache.py): forward() runs blocks no longer than the backend's
max_block() and commits each block's K/V after the last layer.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bpe_tokenizer import BPETokenizer  # noqa: E402
from kvcache import ExactBackend  # noqa: E402


def q8_blocks(x):
    """llama.cpp's CPU activation quantization (q8_0 / q8_1): blocks of 32 along the last axis,
    scale d = max|x| / 127 stored as fp16, codes round(x / d). Returns the dequantized values.
    Only for the emulate_llamacpp diagnostic; the worker's own pass stays float32."""
    sh = x.shape
    b = x.reshape(sh[:-1] + (sh[-1] // 32, 32))
    d = (np.abs(b).max(axis=-1, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
    safe = np.where(d == 0, 1.0, d)
    q = np.clip(np.round(b / safe), -127, 127)
    return (q * d).reshape(sh).astype(np.float32)


CACHE_VERSION = 1


def _read_gguf(path):
    """(hyperparameters, tokenizer arguments, float32 weights by tensor name) from the GGUF file:
    weights dequantized by the `gguf` package."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(path)
    f = r.fields
    arch = f["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")

    def meta(name):
        return f[f"{arch}.{name}"].contents()
    hp = dict(n_layers=int(meta("block_count")), d_model=int(meta("embedding_length")),
              n_heads=int(meta("attention.head_count")),
              n_kv_heads=int(meta("attention.head_count_kv")),
              n_ff=int(meta("feed_forward_length")),
              eps=float(meta("attention.layer_norm_rms_epsilon")),
              rope_base=float(meta("rope.freq_base")), rope_dims=int(meta("rope.dimension_count")),
              n_ctx_train=int(meta("context_length")))
    BPETokenizer.from_gguf(r)  # validates the tokenizer kind (gpt2 BPE, smollm pre-tokenizer)

    def get(name, default=None):
        return f[name].contents() if name in f else default
    tok = dict(tokens=list(get("tokenizer.ggml.tokens")),
               token_types=[int(t) for t in get("tokenizer.ggml.token_type")],
               merges=list(get("tokenizer.ggml.merges")),
               bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
               add_bos=bool(get("tokenizer.ggml.add_bos_token", False)))
    for k in ("bos_id", "eos_id"):
        tok[k] = None if tok[k] is None else int(tok[k])
    w = {t.name: np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
         for t in r.tensors}
    return hp, tok, w


def load_weights(path):
    """_read_gguf(path), through a cache of the dequantized result next to the model file
    (<path>.f32cache.npz, ~540 MB): parsing the GGUF metadata and dequantizing take 15-60 s on
    a busy 2-core machine, loading the cache about a second. The cache records the model file's
    size and mtime and is rebuilt when they differ; the values are the same float32 arrays
    (np.savez is lossless). KVTIER_MODEL_CACHE=0 disables it."""
    st = os.stat(path)
    src = dict(version=CACHE_VERSION, size=st.st_size, mtime_ns=st.st_mtime_ns)
    cache = path + ".f32cache.npz"
    use = os.environ.get("KVTIER_MODEL_CACHE", "1") != "0"
    if use and os.path.exists(cache):
        try:
            with np.load(cache) as z:
                meta = json.loads(str(z["__meta__"]))
                if meta["source"] == src:
                    w = {k: z[k] for k in z.files if k != "__meta__"}
                    return meta["hp"], meta["tok"], w
        except (OSError, ValueError, KeyError) as e:
            print(f"smollm: ignoring unreadable weight cache {cache}: {e}", file=sys.stderr)
    hp, tok, w = _read_gguf(path)
    if use:
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, __meta__=np.array(json.dumps(dict(source=src, hp=hp, tok=tok))), **w)
            os.replace(tmp, cache)   # atomic: a reader never sees a half-written cache
        except OSError as e:
            print(f"smollm: could not write the weight cache {cache}: {e}", file=sys.stderr)
            if os.path.exists(tmp):
                os.unlink(tmp)
    return hp, tok, w


class SmolLM:
    def __init__(self, path, emulate_llamacpp=False):
        """emulate_llamacpp: quantize matmul inputs to 8 bits in blocks of 32 and round Q/K/V to
        fp16, as llama.cpp's CPU backend does (a diagnostic that shows where the remaining
        difference to llama.cpp comes from; off for every measurement)."""
        self.emulate = emulate_llamacpp
        hp, tok, w = load_weights(path)
        self.n_layers = hp["n_layers"]
        self.d_model = hp["d_model"]
        self.n_heads = hp["n_heads"]
        self.n_kv_heads = hp["n_kv_heads"]
        self.head_dim = self.d_model // self.n_heads
        self.n_ff = hp["n_ff"]
        self.eps = hp["eps"]
        self.rope_base = hp["rope_base"]
        self.rope_dims = hp["rope_dims"]
        self.n_ctx_train = hp["n_ctx_train"]
        assert self.rope_dims == self.head_dim, "partial RoPE is not implemented"
        self.tokenizer = BPETokenizer(**tok)
        self.tok_embd = w["token_embd.weight"]                     # [vocab][d_model]
        self.vocab = self.tok_embd.shape[0]
        self.out_norm = w["output_norm.weight"]
        # Tied output unless the file carries its own output matrix.
        self.out_w = w.get("output.weight", self.tok_embd)
        self.layers = []
        for i in range(self.n_layers):
            p = f"blk.{i}."
            wq, wk, wv = w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]
            nq, nk = wq.shape[0], wk.shape[0]
            self.layers.append(dict(
                attn_norm=w[p + "attn_norm.weight"], ffn_norm=w[p + "ffn_norm.weight"],
                # one fused projection [d_model][q|k|v] (matmul from the left)
                wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0).T), nq=nq, nk=nk,
                wo=np.ascontiguousarray(w[p + "attn_output.weight"].T),
                wgu=np.ascontiguousarray(np.concatenate(
                    [w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"]], axis=0).T),
                wd=np.ascontiguousarray(w[p + "ffn_down.weight"].T)))
        half = self.head_dim // 2
        self.inv_freq = (self.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim))
        self.scale = 1.0 / np.sqrt(self.head_dim)

    # -- pieces ------------------------------------------------------------------------------
    def _aq(self, a):
        return q8_blocks(a) if self.emulate else a

    def rms_norm(self, x, wt):
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        return x / np.sqrt(ms + np.float32(self.eps)) * wt

    def rope(self, x, pos):
        """x [n][heads][d], rotate adjacent pairs (normal RoPE) at positions pos [n]."""
        ang = np.asarray(pos, dtype=np.float64)[:, None] * self.inv_freq[None, :]   # [n][d/2]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def new_cache(self, capacity=4096):
        return ExactBackend(self.n_layers, self.n_kv_heads, self.head_dim, capacity)

    # -- forward -----------------------------------------------------------------------------
    def forward_block(self, tokens, cache, want_logits=True, hook=None):
        """Runs len(tokens) new tokens at positions cache.n_tokens.. through the model and
        commits their K/V to cache. Returns logits [n][vocab] (float32) or the final hidden
        states when want_logits is False. hook(layer, q, k, v) sees post-RoPE Q/K and V."""
        n = len(tokens)
        p0 = cache.n_tokens
        assert n <= cache.max_block(p0), (n, p0, cache.max_block(p0))
        pos = np.arange(p0, p0 + n)
        x = self.tok_embd[np.asarray(tokens)]                    # [n][d_model]
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        ks = np.empty((self.n_layers, n, hkv, d), dtype=np.float32)
        vs = np.empty_like(ks)
        for li, L in enumerate(self.layers):
            h = self.rms_norm(x, L["attn_norm"])
            qkv = self._aq(h) @ L["wqkv"]
            nq, nk = L["nq"], L["nk"]
            q = self.rope(qkv[:, :nq].reshape(n, hq, d), pos)
            k = self.rope(qkv[:, nq:nq + nk].reshape(n, hkv, d), pos)
            v = np.ascontiguousarray(qkv[:, nq + nk:].reshape(n, hkv, d))
            if self.emulate:  # llama.cpp's f16 KV cache, and Q converted to f16 for K.Q
                q, k, v = (a.astype(np.float16).astype(np.float32) for a in (q, k, v))
            ks[li], vs[li] = k, v
            if hook is not None:
                hook(li, q, k, v)
            o = cache.attend(li, q, k, v, self.scale)            # [n][hq][d]
            x = x + self._aq(o.reshape(n, hq * d)) @ L["wo"]
            h = self.rms_norm(x, L["ffn_norm"])
            gu = self._aq(h) @ L["wgu"]
            g, u = gu[:, :self.n_ff], gu[:, self.n_ff:]
            x = x + self._aq(g / (1.0 + np.exp(-g)) * u) @ L["wd"]
        cache.commit(ks, vs)
        h = self.rms_norm(x, self.out_norm)
        if not want_logits:
            return h
        return self._aq(h) @ self.out_w.T

    def forward(self, tokens, cache, block=128, want_logits=True, hook=None, logits_cb=None):
        """Teacher-forced pass over tokens in blocks of at most `block` tokens, each cut so it
        never straddles a seal boundary of the cache. Returns logits [len(tokens)][vocab]
        unless logits_cb is given (then logits_cb(start, logits_block) is called per block and
        nothing is kept, to bound memory)."""
        outs = []
        i = 0
        while i < len(tokens):
            n = min(block, len(tokens) - i, cache.max_block(cache.n_tokens))
            lg = self.forward_block(tokens[i:i + n], cache, want_logits, hook)
            if logits_cb is not None:
                logits_cb(i, lg)
            else:
                outs.append(lg)
            i += n
        if logits_cb is not None:
            return None
        return np.concatenate(outs, axis=0)

    def generate(self, prompt_ids, cache, max_new=32, stop_ids=()):
        """Greedy decoding: prefill the prompt, then one token at a time."""
        if not len(prompt_ids):
            raise ValueError("generate needs at least one prompt token")
        lg = self.forward(prompt_ids, cache)[-1]
        out = []
        for _ in range(max_new):
            t = int(np.argmax(lg))
            if t in stop_ids:
                break
            out.append(t)
            lg = self.forward_block([t], cache)[-1]
        return out


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    y = x - m
    return y - np.log(np.exp(y).sum(axis=-1, keepdims=True))


def default_model_path():
    """The model file: $KVTIER_MODEL if set, else where fetch_model.sh puts it."""
    p = os.environ.get("KVTIER_MODEL")
    if p:
        return p
    cache = os.environ.get("KVTIER_MODEL_DIR", os.path.expanduser("~/.cache/kvtier/models"))
    return os.path.join(cache, "smollm2-135m-instruct-q4_1.gguf")

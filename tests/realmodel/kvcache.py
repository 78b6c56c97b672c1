"""The seam between the inference worker and wherever its KV cache lives.

The worker runs the model over *blocks* of new tokens (one token when decoding, up to a few
hundred in teacher-forced evaluation or prefill). For every layer it hands the backend the block's
post-RoPE queries and the block's own exact K/V; the backend returns the attention output of every
query over (a) the tokens already committed, as the backend holds them (decoded, if it keeps them
lossy) and (b) the block's own tokens up to and including the query (causal, exact). After the
last layer the worker commits the block's K/V for all layers at once.

Why blocks are equivalent to token-by-token decoding: a cache that seals every B tokens (kvtierd:
sinks exact, sealed chunks decoded, tail exact) shows a query at position t the tokens
[0, floor(t/B)*B) through the codec and [floor(t/B)*B, t] exact. If a block never straddles a
multiple of B, every query in it has the same floor(t/B) as the block's first position p0, the
committed tokens [0, p0) are exactly [0, floor(p0/B)*B) sealed plus an exact tail, and the block's
own tokens are exact: the same view token-by-token decoding gives. The worker therefore asks
max_block(p0) before each block; a backend that stages tokens one at a time (the Attend RPC)
answers 1. Exact values must be exact in the same dtype in both cases, so a backend whose wire
dtype is f16 rounds the block's own K/V to f16 before it attends over them (round_kv).

Shapes (float32 numpy arrays):
    q      [n][n_q_heads][head_dim]            post-RoPE queries of the block
    k, v   [n][n_kv_heads][head_dim]           the block's own keys/values for one layer
    commit: K, V [n_layers][n][n_kv_heads][head_dim]
GQA: query head h reads KV head h // (n_q_heads // n_kv_heads).
"""
import numpy as np


def causal_attention(q, k_ctx, v_ctx, k_new, v_new, scale):
    """Attention of n queries over T committed tokens (all visible) plus the n new tokens
    (causal). q [n][Hq][d], k_ctx/v_ctx [T][Hkv][d], k_new/v_new [n][Hkv][d] -> [n][Hq][d]."""
    out, _ = _attention(q, k_ctx, v_ctx, k_new, v_new, scale, want_probs=False)
    return out


def _attention(q, k_ctx, v_ctx, k_new, v_new, scale, want_probs):
    n, hq, d = q.shape
    hkv = k_new.shape[1]
    g = hq // hkv
    t = k_ctx.shape[0]
    k_all = np.concatenate([k_ctx, k_new], axis=0) if t else k_new      # [T+n][Hkv][d]
    v_all = np.concatenate([v_ctx, v_new], axis=0) if t else v_new
    # [Hkv][g*n][d] x [Hkv][d][T+n]
    qh = q.reshape(n, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * n, d)
    kh = k_all.transpose(1, 2, 0)
    s = np.matmul(qh, kh) * np.float32(scale)                           # [Hkv][g*n][T+n]
    s = s.reshape(hkv, g, n, t + n)
    # causal mask inside the block: query i sees new tokens 0..i
    mask = np.triu(np.ones((n, n), dtype=bool), k=1)
    s[:, :, :, t:][:, :, mask] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    vh = v_all.transpose(1, 0, 2)                                       # [Hkv][T+n][d]
    o = np.matmul(s.reshape(hkv, g * n, t + n), vh)                     # [Hkv][g*n][d]
    o = o.reshape(hkv, g, n, d).transpose(2, 0, 1, 3).reshape(n, hq, d)
    return o, (s if want_probs else None)


class KVBackend:
    """Base class. Subclasses hold committed tokens; see the module docstring for the contract."""

    def __init__(self, n_layers, n_kv_heads, head_dim):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.n_tokens = 0

    def max_block(self, pos):
        """Largest block of new tokens the backend accepts starting at position pos."""
        raise NotImplementedError

    def attend(self, layer, q, k_new, v_new, scale):
        raise NotImplementedError

    def commit(self, k, v):
        raise NotImplementedError

    def reset(self):
        raise NotImplementedError

    def close(self):
        pass


class FetchBackend(KVBackend):
    """A backend that can return the committed tokens of one layer as the attention should see
    them (decoded); attention itself runs here, in the worker. Subclasses implement fetch()."""

    seal_tokens = None  # B; None when nothing is ever sealed (exact cache)

    def max_block(self, pos):
        if not self.seal_tokens:
            return 1 << 30
        return self.seal_tokens - pos % self.seal_tokens

    def round_kv(self, x):
        """The block's own K/V as the backend would give them back exactly (wire dtype)."""
        return x

    def fetch(self, layer):
        """(K, V) of the committed tokens [0, n_tokens) for one layer: [T][Hkv][d] float32."""
        raise NotImplementedError

    def attend(self, layer, q, k_new, v_new, scale):
        k_ctx, v_ctx = self.fetch(layer)
        return causal_attention(q, k_ctx, v_ctx, self.round_kv(k_new), self.round_kv(v_new), scale)


class ExactBackend(FetchBackend):
    """The in-process exact cache (float32, or float16 to mirror an exact f16 daemon session)."""

    def __init__(self, n_layers, n_kv_heads, head_dim, capacity=4096, dtype=np.float32):
        super().__init__(n_layers, n_kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.k = np.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=np.float32)
        self.v = np.zeros_like(self.k)

    def round_kv(self, x):
        return x if self.dtype == np.float32 else x.astype(self.dtype).astype(np.float32)

    def _grow(self, need):
        cap = self.k.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            a = np.zeros((old.shape[0], new) + old.shape[2:], dtype=np.float32)
            a[:, :cap] = old
            setattr(self, name, a)

    def fetch(self, layer):
        t = self.n_tokens
        return self.k[layer, :t], self.v[layer, :t]

    def commit(self, k, v):
        n = k.shape[1]
        assert k.shape == (self.n_layers, n, self.n_kv_heads, self.head_dim), k.shape
        assert v.shape == k.shape, v.shape
        self._grow(self.n_tokens + n)
        self.k[:, self.n_tokens:self.n_tokens + n] = self.round_kv(k)
        self.v[:, self.n_tokens:self.n_tokens + n] = self.round_kv(v)
        self.n_tokens += n

    def truncate(self, n):
        assert 0 <= n <= self.n_tokens
        self.n_tokens = n

    def reset(self):
        self.n_tokens = 0

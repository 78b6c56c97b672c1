#!/usr/bin/env python3
"""The experiments of docs/realmodel/int2.md: session 3's kvtier-int2 sealing by default (oscar 2/2
bits, G 32, chunks of 32, recent window W 128, 8 sinks, f16 session; --bk/--bv/--B/--gv change the
widths, the chunk and the value group) simulated in process, with the
per-group rounding of keys (MODE_K) and values (MODE_V) pluggable. f32 math in numpy, not
byte-exact with the C codec (its 'int' mode reproduces the daemon's kvtier-int2 NLL to ~1 nat per
context); used to choose the rounding, which was then measured through kvtierd (int2_rows.py).
Modes: int (OScaR min-max, zero on the scale's grid), free (min-max, zero = min), clip16x4 (least
squared error over [mn + r i/16, mx - r j/16], i, j <= 4, unbounded clipping), safe16x4 (the same
candidates limited to those keeping every element within half a step: key_rounding mse),
lloyd4 (4 least-squares refits of scale/zero to the codes).
usage: int2_sim.py MODE_K MODE_V [--text GFDL-1.3] [--contexts 0,3] [--rotv 1] [--bk 2] [--bv 2]
       [--B 32] [--gv 32] [--out FILE]
Session 4 chose 3-bit keys at G = B = 64: `int2_sim.py int int --bk 3 --bv 2 --B 64 --gv 64`."""
import argparse, json, os, sys, time
import numpy as np
R = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, R + "/tests/realmodel")
import texts
from kvcache import FetchBackend
from smollm import SmolLM, default_model_path, log_softmax

def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)

def fwht(x, mult):
    x = np.array(x, np.float32, copy=True)
    d = x.shape[-1]
    h = 1
    while h < d:
        y = x.reshape(x.shape[:-1] + (d // (2 * h), 2, h))
        a = y[..., 0, :].copy(); b = y[..., 1, :].copy()
        y[..., 0, :] = a + b; y[..., 1, :] = a - b
        x = y.reshape(x.shape)
        h *= 2
    return (x * mult).astype(np.float32)

QMAX = 3.0
NORMFIT = False

def q_minmax_int(x, m, bits):
    """current: x [..., n] groups along last axis, m mask of used elements"""
    qmax = float(2 ** bits - 1)
    big = np.float32(np.inf)
    mn = np.where(m, x, big).min(-1, keepdims=True); mx = np.where(m, x, -big).max(-1, keepdims=True)
    s = f16((mx - mn) / qmax); s = np.where(s == 0, 1e-30, s)
    zq = np.rint(-mn / s); z = f16(-zq * s)
    c = np.clip(np.rint((x - z) / s), 0, qmax)
    return c * s + z

def _deq(x, lo, hi, qmax):
    s = f16((hi - lo) / qmax); s = np.where(s == 0, 1e-30, s)
    z = f16(lo)
    c = np.clip(np.rint((x - z) / s), 0, qmax)
    return c * s + z, c, s, z

def q_minmax_free(x, m, bits):
    qmax = float(2 ** bits - 1)
    big = np.float32(np.inf)
    mn = np.where(m, x, big).min(-1, keepdims=True); mx = np.where(m, x, -big).max(-1, keepdims=True)
    return _deq(x, mn, mx, qmax)[0]

def make_clip(K, N, sym=False):
    def q(x, m, bits):
        qmax = float(2 ** bits - 1)
        big = np.float32(np.inf)
        mn = np.where(m, x, big).min(-1, keepdims=True); mx = np.where(m, x, -big).max(-1, keepdims=True)
        r = mx - mn
        best = None; berr = None
        for i in range(N + 1):
            for j in range(N + 1):
                if sym and i != j: continue
                lo = mn + r * (i / K); hi = mx - r * (j / K)
                y = _deq(x, lo, hi, qmax)[0]
                e = (np.where(m, y - x, 0) ** 2).sum(-1, keepdims=True)
                if best is None:
                    best, berr = y, e
                else:
                    better = e < berr
                    best = np.where(better, y, best); berr = np.where(better, e, berr)
        return best
    return q

def make_lloyd(iters):
    def q(x, m, bits):
        qmax = float(2 ** bits - 1)
        big = np.float32(np.inf)
        mn = np.where(m, x, big).min(-1, keepdims=True); mx = np.where(m, x, -big).max(-1, keepdims=True)
        y, c, s, z = _deq(x, mn, mx, qmax)
        e = (np.where(m, y - x, 0) ** 2).sum(-1, keepdims=True)
        mf = m.astype(np.float64)
        for _ in range(iters):
            cc = c.astype(np.float64); xx = x.astype(np.float64)
            n = mf.sum(-1, keepdims=True); sc = (cc * mf).sum(-1, keepdims=True); sx = (xx * mf).sum(-1, keepdims=True)
            scc = (cc * cc * mf).sum(-1, keepdims=True); scx = (cc * xx * mf).sum(-1, keepdims=True)
            den = n * scc - sc * sc
            ok = den > 0
            s2 = np.where(ok, (n * scx - sc * sx) / np.where(ok, den, 1), 0)
            z2 = np.where(ok, (sx - s2 * sc) / np.maximum(n, 1), 0)
            ok &= s2 > 0
            s2f = f16(np.where(ok, s2, 1)); z2f = f16(z2)
            c2 = np.clip(np.rint((x - z2f) / s2f), 0, qmax)
            y2 = c2 * s2f + z2f
            e2 = (np.where(m, y2 - x, 0) ** 2).sum(-1, keepdims=True)
            better = ok & (e2 < e)
            y = np.where(better, y2, y); c = np.where(better, c2, c); e = np.where(better, e2, e)
        return y
    return q

def make_safe(K, N):
    """MSE over clipped ranges, but every element within half a step of the grid's range"""
    def q(x, m, bits):
        qmax = float(2 ** bits - 1)
        big = np.float32(np.inf)
        mn = np.where(m, x, big).min(-1, keepdims=True); mx = np.where(m, x, -big).max(-1, keepdims=True)
        r = mx - mn
        best = q_minmax_int(x, m, bits)
        berr = (np.where(m, best - x, 0) ** 2).sum(-1, keepdims=True)
        for i in range(N + 1):
            for j in range(N + 1):
                lo = mn + r * np.float32(i / K); hi = mx - r * np.float32(j / K)
                y, c, s, z = _deq(x, lo, hi, qmax)
                ok = (lo - mn <= 0.5 * s) & (mx - hi <= 0.5 * s) & (hi > lo)
                e = (np.where(m, y - x, 0) ** 2).sum(-1, keepdims=True)
                better = ok & (e < berr)
                best = np.where(better, y, best); berr = np.where(better, e, berr)
        return best
    return q

MODES = {"int": q_minmax_int, "free": q_minmax_free, "clip16x4": make_clip(16, 4),
         "safe16x4": make_safe(16, 4), "lloyd4": make_lloyd(4)}

def roundtrip_chunk(k, v, pin, modek, modev, rotv, bk=2, bv=2, gv=32):
    """k, v [L][B][H][d] f32 (f16-rounded); pin bool [B]"""
    L, B, H, d = k.shape
    kr = fwht(k, 0.125)
    nrm = np.sqrt((kr.reshape(L, B, H * d) ** 2).sum(-1)).astype(np.float32)  # [L][B]
    nrm = np.where(nrm == 0, 1, nrm)
    kn = kr / nrm[:, :, None, None]
    # per channel over tokens: groups [L][H][d][B]
    xg = kn.transpose(0, 2, 3, 1)
    m = np.broadcast_to(~pin, xg.shape)
    yg = MODES[modek](xg, m, bk)
    yk = yg.transpose(0, 3, 1, 2)
    if NORMFIT:
        num = (yk * kn).reshape(L, B, -1).sum(-1); den = (yk * yk).reshape(L, B, -1).sum(-1)
        alpha = np.where(den > 0, num / np.where(den > 0, den, 1), 1).astype(np.float32)
        nrm = nrm * alpha
    kd = yk * nrm[:, :, None, None]
    kd = fwht(kd, 0.125)
    vr = fwht(v, 0.125) if rotv else v
    xg = vr.reshape(L, B, H, d // gv, gv)
    yg = MODES[modev](xg, np.ones_like(xg, bool), bv)
    vd = yg.reshape(L, B, H, d)
    if rotv:
        vd = fwht(vd, 0.125)
    kd[:, pin] = k[:, pin]; vd[:, pin] = v[:, pin]
    return kd.astype(np.float32), vd.astype(np.float32)

class SimBackend(FetchBackend):
    def __init__(self, L, H, d, modek, modev, rotv, B=32, W=128, S=8, cap=1024, bk=2, bv=2, gv=32):
        self.gv = gv
        super().__init__(L, H, d)
        self.k = np.zeros((L, cap, H, d), np.float32); self.v = np.zeros_like(self.k)
        self.B, self.W, self.S = B, W, S
        self.modek, self.modev, self.rotv, self.bk, self.bv = modek, modev, rotv, bk, bv
        self.sealed = 0
    def round_kv(self, x):
        return f16(x)
    def max_block(self, pos):
        first = self.W + 1
        return first - pos if pos < first else self.B - (pos - first) % self.B
    def fetch(self, layer):
        t = self.n_tokens
        return self.k[layer, :t], self.v[layer, :t]
    def commit(self, k, v):
        n = k.shape[1]
        self.k[:, self.n_tokens:self.n_tokens + n] = f16(k)
        self.v[:, self.n_tokens:self.n_tokens + n] = f16(v)
        self.n_tokens += n
        while self.n_tokens - self.sealed > self.W:
            t0 = self.sealed; B = self.B
            pin = np.array([t0 + t < self.S for t in range(B)])
            kd, vd = roundtrip_chunk(self.k[:, t0:t0 + B], self.v[:, t0:t0 + B], pin,
                                     self.modek, self.modev, self.rotv, self.bk, self.bv, self.gv)
            self.k[:, t0:t0 + B] = kd; self.v[:, t0:t0 + B] = vd
            self.sealed += B

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("modek"); ap.add_argument("modev")
    ap.add_argument("--text", default="GFDL-1.3"); ap.add_argument("--contexts", default="0,3")
    ap.add_argument("--rotv", type=int, default=1); ap.add_argument("--bk", type=int, default=2)
    ap.add_argument("--bv", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(R, "docs", "realmodel", "int2_sim.jsonl"))
    ap.add_argument("--normfit", type=int, default=0)
    # chunk size B (= the key group: one group of B tokens per channel) and the value group gv
    ap.add_argument("--B", type=int, default=32); ap.add_argument("--gv", type=int, default=32)
    a = ap.parse_args()
    NORMFIT = bool(a.normfit)
    m = SmolLM(default_model_path())
    text, sha = texts.read_text("/usr/share/common-licenses/" + a.text)
    ids = np.asarray(m.tokenizer.encode(text)[:4096], np.int64)
    for ci in [int(x) for x in a.contexts.split(",")]:
        w = ids[ci * 1024:(ci + 1) * 1024]
        cache = SimBackend(m.n_layers, m.n_kv_heads, m.head_dim, a.modek, a.modev, a.rotv, bk=a.bk, bv=a.bv, B=a.B, gv=a.gv)
        acc = [0.0]
        def cb(i, lg):
            tgt = w[i + 1:i + 1 + len(lg)]
            lp = log_softmax(lg[:len(tgt)])
            acc[0] -= float(lp[np.arange(len(tgt)), tgt].sum())
        t0 = time.time()
        m.forward(w, cache, block=128, logits_cb=cb)
        r = dict(B=a.B, gv=a.gv, normfit=a.normfit, modek=a.modek, modev=a.modev, rotv=a.rotv, bk=a.bk, bv=a.bv, text=a.text, context=ci, nll=acc[0], seconds=round(time.time() - t0, 1))
        print(json.dumps(r), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")

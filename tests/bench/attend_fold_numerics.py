#!/usr/bin/env python3
"""attend_fold_numerics.py - CPU prototype of two key-side changes to the keys-as-B attention
kernel (kvt_cuda_attend_i2.cu) that trade exactness for instructions (docs/gpu.md "Session 7:
attention"). Error metric = tests/gpu/test_gpu_attend.c's: ||o - ref|| / ||ref|| against an
fp64 reference over the same decoded K/V (bound 1e-3).

  (c1) key zero folded into B with one rounding: B = fl16(code*s + z) (needs one more HADD2
       per code pair after today's HFMA2: no instruction saved);
  (c2) the zero inside today's one HFMA2 per pair: B = fl16(x*s' + fl16(s' - z/4)),
       x = -(1 + code 2^(SP-10)), s' = s 2^(8-SP) (what would remove 8 MMAs per unit);
  (d)  the per-channel key scale on the A side, q split into 4 pieces of 3 significant bits
       (piece * bf16 scale exact in f16): q keeps 12 significant bits;
  today: q' as f16 hi + lo, B = code*s/4 exact, the zero by its own MMA.

    build/venv/bin/python tests/bench/attend_fold_numerics.py [SEED] [KVQ_DIR]

KVQ_DIR: the real-model dump of `ctest -R realmodel_kvq_dump` (build/realmodel/kvq-gpu).
The INT2 quantizer here is a simple per-token-norm + per-channel (keys, G 32) / per-token
(values, G 32) asymmetric one with bf16 scales and zeros, the layout's arithmetic, not the
codec's code.
"""
import numpy as np, json, sys
rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

def bf16(x):
    x = np.asarray(x, np.float32).view(np.uint32)
    r = ((x >> 16) & 1) + 0x7FFF
    return ((x + r) & 0xFFFF0000).view(np.float32).astype(np.float64)

def f16(x):
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)

def hadamard(d):
    H = np.array([[1.0]])
    while H.shape[0] < d:
        H = np.block([[H, H], [H, -H]])
    return H / np.sqrt(d)

def trunc_bits(x, bits):
    """x rounded to `bits` significant bits (round to nearest)"""
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * 2**bits) / 2**bits, e)

def quant_keys(Kr, G=32, bits=2):
    """per-token norm, then per-channel asymmetric codes over groups of G tokens"""
    T, d = Kr.shape
    n = np.linalg.norm(Kr, axis=1)
    U = Kr / n[:, None]
    codes = np.zeros_like(U); S = np.zeros_like(U); Z = np.zeros_like(U)
    L = 2**bits - 1
    for g in range(0, T, G):
        u = U[g:g + G]
        lo, hi = u.min(0), u.max(0)
        s = bf16((hi - lo) / L); z = bf16(lo)
        s = np.where(s == 0, 1e-8, s)
        c = np.clip(np.round((u - z) / s), 0, L)
        codes[g:g + G] = c; S[g:g + G] = s; Z[g:g + G] = z
    return codes, S, Z, n

def quant_values(Vr, GV=32, bits=2):
    T, d = Vr.shape
    n = np.linalg.norm(Vr, axis=1)
    U = Vr / n[:, None]
    out = np.zeros_like(U)
    L = 2**bits - 1
    for g in range(0, d, GV):
        u = U[:, g:g + GV]
        lo, hi = u.min(1, keepdims=True), u.max(1, keepdims=True)
        s = bf16((hi - lo) / L); z = bf16(lo)
        s = np.where(s == 0, 1e-8, s)
        out[:, g:g + GV] = np.clip(np.round((u - z) / s), 0, L) * s + z
    return out * n[:, None]

def attend(q, K, V):
    lg = K @ q
    p = np.exp(lg - lg.max())
    return p @ V / p.sum()

def run(Q, K, V, scale, label):
    """Q [nq][d] (one KV head's queries), K, V [T][d] original basis"""
    T, d = K.shape
    H = hadamard(d)
    Kr, Vr = K @ H.T, V @ H.T
    codes, S, Z, n = quant_keys(Kr)
    Kdec = (codes * S + Z) * n[:, None]           # decoded keys (rotated basis)
    Vdec = quant_values(Vr)
    errs = {"c1_zero_fold_1rnd": [], "c2_zero_fold_hfma2": [], "d_q12bits": [], "today_qhilo": []}
    for q in Q:
        qr = (H @ q) * scale
        ref = attend(qr, Kdec, Vdec)
        # today: q as f16 hi + lo, B = code*s exact, zero exact
        qh = f16(qr); ql = f16(qr - qh)
        o = attend(qh + ql, Kdec, Vdec)
        errs["today_qhilo"].append(np.linalg.norm(o - ref) / np.linalg.norm(ref))
        # (c1) B = fl16(code*s + z): one rounding (needs an HADD2 per pair after today's HFMA2)
        o = attend(qh + ql, f16(codes * S + Z) * n[:, None], Vdec)
        errs["c1_zero_fold_1rnd"].append(np.linalg.norm(o - ref) / np.linalg.norm(ref))
        # (c2) the zero inside today's one HFMA2 per pair
        # the kernel's arithmetic: x = -(1 + code 2^(SP-10)), s' = s 2^(8-SP) (exact),
        # addend a = fl16(s' - z/4), B = fl16(x s' + a) = -(code s + z)/4 rounded twice
        e = (np.arange(d) % 16) % 8
        SP = np.array([6, 8, 4, 6, 8, 4, 6, 8])[e]
        sp_ = f16(S * 2.0 ** (8 - SP))
        x = -(1 + codes * 2.0 ** (SP - 10))
        a = f16(sp_ - Z / 4)
        B = f16(x * sp_ + a)
        Kc = -4 * B * n[:, None]
        o = attend(qh + ql, Kc, Vdec)
        errs["c2_zero_fold_hfma2"].append(np.linalg.norm(o - ref) / np.linalg.norm(ref))
        # (d) q to 4 pieces of 3 significant bits each (greedy)
        r = qr.copy(); qq = np.zeros_like(qr)
        for _ in range(4):
            pc = trunc_bits(r, 3); qq += pc; r -= pc
        o = attend(qq, Kdec, Vdec)
        errs["d_q12bits"].append(np.linalg.norm(o - ref) / np.linalg.norm(ref))
    return {k: float(np.max(v)) for k, v in errs.items()}

res = {}
# random (the GPU test's kind of data): Gaussian keys with a few outlier channels, 4096 tokens
d, T = 128, 4096
K = rng.standard_normal((T, d)); K[:, :4] *= 8
V = rng.standard_normal((T, d))
Q = rng.standard_normal((4, d)) * 2
res["random d128 T4096 (q*2)"] = run(Q, K, V, 1 / np.sqrt(d), "random")
Q = rng.standard_normal((4, d)) * 6
res["random d128 T4096 (q*6, peaky)"] = run(Q, K, V, 1 / np.sqrt(d), "random")
# the real-model dump (SmolLM2-135M, d 64, 1024 tokens, 6 layers)
dirp = sys.argv[2] if len(sys.argv) > 2 else "build/realmodel/kvq-gpu"
meta = json.load(open(dirp + "/meta.json"))
k = np.load(dirp + "/k.npy").astype(np.float64); v = np.load(dirp + "/v.npy").astype(np.float64)
qa = np.load(dirp + "/q.npy").astype(np.float64)
print("shapes", k.shape, v.shape, qa.shape, file=sys.stderr)
worst = {}
for li in range(k.shape[0]):
    for h in range(meta["n_kv_heads"]):
        K = k[li, :, h, :]; V = v[li, :, h, :]
        g = meta["n_q_heads"] // meta["n_kv_heads"]
        Qh = qa[li][:, h * g:(h + 1) * g, :].reshape(-1, meta["head_dim"])[-64:]
        r = run(Qh, K, V, meta["softmax_scale"], "real")
        for kk, vv in r.items():
            worst[kk] = max(worst.get(kk, 0), vv)
res["real SmolLM2 (6 layers x 3 kv heads, 64 queries each)"] = worst
for k_, v_ in res.items():
    print(k_, {a: "%.2e" % b for a, b in v_.items()})

"""The numpy OScaR reference (kvtier.reference) against OSCAR.md section 7, tests 1-5.
No daemon needed (ctest label unit)."""

import numpy as np
import pytest

from kvtier import arrays as A
from kvtier import reference as R


def test_hadamard_is_sylvester_and_self_inverse(rng):
    for d in (2, 4, 8, 64, 128, 256):
        H = R.sylvester(d)
        np.testing.assert_allclose(H @ H, np.eye(d), atol=1e-12)
        x = rng.standard_normal((7, d)).astype(np.float32)
        np.testing.assert_allclose(R.hadamard(x), x @ H.T, atol=2e-6)
        np.testing.assert_allclose(R.hadamard(R.hadamard(x)), x, atol=2e-6)
        y = rng.standard_normal((7, d)).astype(np.float32)
        np.testing.assert_allclose(np.sum(R.hadamard(x) * R.hadamard(y), -1), np.sum(x * y, -1),
                                   rtol=1e-5, atol=1e-4)


def test_joint_norm_over_all_heads(rng):
    k = rng.standard_normal((16, 4, 64)).astype(np.float32) * 5
    n = R.joint_norms(k)
    assert n.shape == (16,) and n.dtype == np.float32
    np.testing.assert_allclose(n, np.sqrt((k.astype(np.float64) ** 2).sum(axis=(1, 2))), rtol=1e-6)
    scaled = k / n[:, None, None]
    np.testing.assert_allclose(np.sqrt((scaled.astype(np.float64) ** 2).sum(axis=(1, 2))), 1, rtol=1e-6)
    k[3] = 0
    n = R.joint_norms(k)
    assert n[3] == 1 and np.all(np.isfinite(k / n[:, None, None]))


@pytest.mark.parametrize("sdt", [A.DTYPE_F16, A.DTYPE_BF16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizer_edge_cases(bits, sdt):
    qmax = 2 ** bits - 1

    def roundtrip(x):
        x = np.asarray(x, dtype=np.float32)
        _, _, s, z = R.quant_params(x.min(), x.max(), bits, sdt)
        c = R.quantize(x, s, z, bits)
        assert c.min() >= 0 and c.max() <= qmax
        return R.dequantize(c, s, z), c, s, z

    on_grid = np.arange(qmax + 1, dtype=np.float32)
    np.testing.assert_array_equal(roundtrip(on_grid)[0], on_grid)
    zeros = roundtrip(np.zeros(32))[0]
    if sdt == A.DTYPE_F16:
        np.testing.assert_array_equal(zeros, np.zeros(32))
    else:
        # bf16 rounds the zero offset -zq*scale to 8 significant bits: an all-zero group
        # decodes within 2^-9 of 0, not exactly (f16's 11 bits make it exact)
        assert np.abs(zeros).max() <= 2.0 ** -9
    out, c, s, z = roundtrip(np.full(32, -2.75))
    assert s == 0 and np.all(c == 0)
    np.testing.assert_array_equal(out, np.full(32, -2.75))
    eps = 2.0 ** -8 if sdt == A.DTYPE_BF16 else 2.0 ** -11  # half an ulp, relative
    for x in (np.linspace(0.5, 3.0, 32), np.linspace(-3.0, -0.5, 32), np.linspace(-1, 2, 32)):
        out, c, s, z = roundtrip(x)
        assert s > 0 and c.min() >= 0 and c.max() <= qmax
        # half a step, plus the rounding of the stored scale at the top code, plus the
        # rounding of the stored zero
        step = (x.max() - x.min()) / qmax
        assert np.abs(out - x).max() <= step / 2 + qmax * step * eps + 2 * eps * np.abs(x).max() + 1e-6


def test_quantizer_rounds_half_to_even():
    # (x - zero) / scale lands exactly on .5: rint goes to the even code
    x = np.array([0.0, 0.5, 1.5, 2.5, 3.0], dtype=np.float32)
    _, _, s, z = R.quant_params(np.float32(0), np.float32(3), 2)
    assert s == 1 and z == 0
    np.testing.assert_array_equal(R.quantize(x, s, z, 2), [0, 0, 2, 2, 3])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_identity(rng, bits):
    for d in (64, 128, 256):
        codes = rng.integers(0, 2 ** bits, size=(3, 5, d), dtype=np.uint8)
        p = R.pack(codes, bits)
        assert p.shape == (3, 5, d * bits // 8)
        np.testing.assert_array_equal(R.unpack(p, bits, d), codes)
    # channel c sits at bits (c % (8/b)) * b of byte c // (8/b)
    if bits == 2:
        assert R.pack(np.array([[1, 2, 3, 0]], np.uint8), 2)[0, 0] == 1 | (2 << 2) | (3 << 4)
    if bits == 3:
        # two planes: bytes [0, d/4) the low 2 bits as a 2-bit row, bytes [d/4, 3d/8) the
        # high bit of channel c at bit c % 8 of byte d/4 + c/8
        d = 64
        codes = np.zeros(d, np.uint8)
        codes[:4] = [1, 6, 7, 4]
        codes[13] = 5
        p = R.pack(codes, 3)
        assert p.shape == (24,)
        assert p[0] == 1 | (2 << 2) | (3 << 4) | (0 << 6)
        assert p[3] == 1 << 2  # channel 13: low bits 01 at (13 % 4) * 2
        assert p[16] == (1 << 1) | (1 << 2) | (1 << 3)  # channels 1, 2, 3 have the high bit
        assert p[17] == 1 << 5  # channel 13
        assert not p[[1, 2] + list(range(4, 16)) + list(range(18, 24))].any()


def test_layout_matches_oscar_storage_table():
    # OSCAR.md section 5, d = 128: INT2 G32 is 96 bytes per token per KV head plus the norm
    cfg = R.make_config(1, 1, 128, "f16", scheme="oscar", bits=2, group=32, n_sinks=0)
    lay = R.chunk_layout(cfg, 0)
    B = cfg["chunk_tokens"]
    per_token = (lay["k_scale_bytes"] * 2 + lay["v_scale_bytes"] * 2 + lay["k_codes_bytes"]
                 + lay["v_codes_bytes"]) / B
    assert per_token == 96
    assert lay["norms_bytes"] == 4 * B
    assert all(lay[n + "_off"] % 64 == 0 for n in ("norms", "k_scale", "k_zero", "v_scale",
                                                   "v_zero", "k_codes", "v_codes"))


def test_layout_of_3bit_keys():
    # 3-bit keys, 2-bit values, G 64, B 64 on SmolLM2-135M's shape (30 layers, 3 KV heads,
    # d 64): the same numbers as kvt_chunk_layout (tests/codec/test_codec_chunk.c)
    cfg = R.make_config(30, 3, 64, "f16", scheme="oscar", key_bits=3, value_bits=2, group=64,
                        chunk_tokens=64, n_sinks=0)
    lay = R.chunk_layout(cfg, 0)
    assert lay["k_codes_bytes"] == 3 * 64 * 24 and lay["v_codes_bytes"] == 3 * 64 * 16
    assert lay["layer_bytes"] == 9472 and lay["total_bytes"] == 64 + 30 * 9472
    assert lay["total_bytes"] * 8 / (2 * 64 * 30 * 3 * 64) == pytest.approx(3.0840, abs=1e-4)


def test_crc32c_known_value():
    assert R.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


@pytest.mark.parametrize("scheme", ["none", "kivi", "hadamard", "oscar"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("bits", [3, 4])
def test_chunk_roundtrip(rng, scheme, dtype, bits):
    L, B, H, d = 2, 64, 2, 64
    cfg = R.make_config(L, H, d, dtype, scheme=scheme, bits=bits, group=32, chunk_tokens=B,
                        rotate_v=int(scheme in ("hadamard", "oscar")), n_sinks=4)
    k = A.from_f32(rng.standard_normal((L, B, H, d)).astype(np.float32) * 4, dtype)
    v = A.from_f32(rng.standard_normal((L, B, H, d)).astype(np.float32), dtype)
    buf = R.encode_chunk(cfg, 0, k, v)
    view = R.parse_chunk(buf)
    assert view.header["total_bytes"] == len(buf)
    kd, vd = R.decode_chunk(buf, "f32")
    kf, vf = A.to_f32(k, dtype), A.to_f32(v, dtype)
    if scheme == "none":
        np.testing.assert_array_equal(kd, kf)
        np.testing.assert_array_equal(vd, vf)
        assert len(view.pins) == 0
        return
    np.testing.assert_array_equal(view.pins, [0, 1, 2, 3])
    np.testing.assert_array_equal(kd[:, :4], kf[:, :4])  # sinks are exact
    np.testing.assert_array_equal(vd[:, :4], vf[:, :4])
    # Codes are computed against the stored scale and zero, so each quantized coordinate is
    # within half a step, or, where rounding the stored pair pushed it past code 0 or qmax,
    # within a step plus the stored values' rounding (qmax x eps x step + eps x |zero|, |zero|
    # <= the group's magnitude). Rotations are orthonormal, so the bound holds for the L2 error
    # of each token's row, and oscar's norm scales both sides alike.
    sk, sv = R.decode_steps(buf)
    eps = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11
    qmax = 2 ** bits - 1

    def check(dec, ref, steps, per_token_mag):
        err = np.linalg.norm((dec - ref).astype(np.float64), axis=-1)  # [L][B][H]
        bound = (np.linalg.norm(steps.astype(np.float64), axis=-1) * (1 + qmax * eps)
                 + 2 * eps * np.sqrt(d) * per_token_mag + 1e-3)
        assert np.all(err <= bound), float((err / bound).max())

    # the magnitude a zero offset can reach: a token's norm for oscar (its coordinates are
    # normalized), the layer's largest row norm for the others (groups span tokens)
    row = np.linalg.norm(kf.astype(np.float64), axis=-1)  # [L][B][H]
    kmag = (np.broadcast_to(np.linalg.norm(row, axis=-1, keepdims=True), row.shape)
            if scheme == "oscar" else np.broadcast_to(row.max(axis=(1, 2), keepdims=True), row.shape))
    check(kd, kf, sk, kmag)
    vmag = np.linalg.norm(vf.astype(np.float64), axis=-1)
    check(vd, vf, sv, vmag)
    # a flipped byte is caught by the crc
    bad = bytearray(buf)
    bad[-1] ^= 0x40
    with pytest.raises(R.ChunkError, match="crc32c"):
        R.parse_chunk(bytes(bad))


def test_passthrough_attention_is_exact(rng):
    # OSCAR.md 7.5: rotation + norm scaling + rotate_v with no quantization reproduce exact
    # attention: <Hq, Hk / n> * n = <q, k>, and H (sum p H v) = sum p v.
    T, H, d, Hq = 40, 2, 128, 4
    k = rng.standard_normal((T, H, d)).astype(np.float32) * 3
    v = rng.standard_normal((T, H, d)).astype(np.float32)
    q = rng.standard_normal((Hq, d)).astype(np.float32)
    kr = R.hadamard(k)
    n = R.joint_norms(kr)
    kn = kr / n[:, None, None]
    qr = R.hadamard(q)
    scale = 1 / np.sqrt(d)
    out = np.zeros((Hq, d), np.float64)
    for i in range(Hq):
        logits = scale * n * (kn[:, i // (Hq // H)] @ qr[i])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[i] = p @ R.hadamard(v)[:, i // (Hq // H)]
    out = R.hadamard(out.astype(np.float32))
    np.testing.assert_allclose(out, A.attention(q, k, v), atol=2e-5)


def test_tni_oscar_beats_kivi_on_a_low_norm_sink(rng):
    # OSCAR.md 7.7 in miniature: a low-norm token inside a chunk (not pinned: S = 0) collapses
    # under kivi's per-channel groups and keeps its relative error under oscar's norm scaling.
    L, B, H, d = 1, 64, 2, 128
    k = rng.standard_normal((L, B, H, d)).astype(np.float32) * 17 / np.sqrt(H * d)
    k[0, 5] *= 2.5 / 17
    v = rng.standard_normal((L, B, H, d)).astype(np.float32)
    errs = {}
    for scheme in ("kivi", "oscar"):
        cfg = R.make_config(L, H, d, "f32", scheme=scheme, bits=2, group=32, chunk_tokens=B,
                            n_sinks=0, rotate_v=int(scheme == "oscar"))
        kd, _ = R.decode_chunk(R.encode_chunk(cfg, 0, k, v))
        errs[scheme] = np.linalg.norm(kd[0, 5] - k[0, 5]) / np.linalg.norm(k[0, 5])
    assert errs["oscar"] < 0.5 * errs["kivi"], errs


def test_protobuf_modules_generate_lazily(tmp_path):
    """Without KVTIER_PYGEN_DIR the package generates the modules from proto/ into a cache
    directory on first import, and a second process reuses them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "KVTIER_PYGEN_DIR"}
    env["KVTIER_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(Path(R.__file__).resolve().parents[1])
    code = ("import kvtier, kvtier._proto as p; pb = p.kvtier_pb2(); "
            "print(p.generated_dir()); "
            "assert pb.DESCRIPTOR.services_by_name['KvTier'].methods_by_name['Append'].client_streaming")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        gen = Path(out.stdout.strip())
        assert gen.parent == tmp_path / "cache" and gen.name.startswith("pygen-")
        assert (gen / "kvtier/v1/kvtier_pb2.py").is_file()
        assert (gen / "grpc/health/v1/health_pb2.py").is_file()
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("scheme", ["none", "kivi", "hadamard", "oscar"])
def test_attend_over_chunks_equals_attention_over_decoded(rng, scheme):
    # OSCAR.md section 3: scoring in the rotated basis with the norm in the logit and rotating
    # the value sum back once equals attention over the decoded cache
    L, B, H, d, Hq = 2, 64, 2, 128, 6
    cfg = R.make_config(L, H, d, "f16", scheme=scheme, bits=2, group=32, chunk_tokens=B,
                        n_sinks=3, rotate_v=int(scheme in ("hadamard", "oscar")))
    k, v = (A.from_f32(rng.standard_normal((L, 2 * B + 7, H, d)).astype(np.float32) * 2, "f16")
            for _ in range(2))
    chunks = [R.encode_chunk(cfg, c * B, k[:, c * B:(c + 1) * B], v[:, c * B:(c + 1) * B])
              for c in range(2)]
    dk, dv = R.roundtrip(cfg, k, v)
    q = rng.standard_normal((Hq, d)).astype(np.float32)
    for layer in range(L):
        got = R.attend(q, chunks, k[:, 2 * B:], v[:, 2 * B:], layer=layer)
        np.testing.assert_allclose(got, A.attention(q, dk[layer], dv[layer]), rtol=1e-4, atol=1e-5)

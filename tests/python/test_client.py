"""Every RPC of kvtier.v1.KvTier and grpc.health.v1 through kvtier.Client against a real
kvtierd on a unix socket (the `daemon` fixture), with the values checked."""

import threading

import grpc
import numpy as np
import pytest

import kvtier
from kvtier import arrays as A
from kvtier import reference as R

SHAPE = dict(n_layers=2, n_kv_heads=2, head_dim=128)


def kv(rng, L, T, H, d, dtype="f16", scale=1.0):
    """Random K (post-RoPE-like: a few large channels) and V in the wire dtype."""
    k = rng.standard_normal((L, T, H, d)).astype(np.float32) * scale
    k[..., : d // 16] *= 4  # channel outliers, what rotation is for
    v = rng.standard_normal((L, T, H, d)).astype(np.float32) * scale
    return A.from_f32(k, dtype), A.from_f32(v, dtype)


def code_of(e):
    return e.value.code


# ---- health, stats, sessions ---------------------------------------------------------------------

def test_health(client):
    assert client.health() == "SERVING"
    assert client.health("kvtier.v1.KvTier") == "SERVING"
    with pytest.raises(kvtier.KvtierError) as e:
        client.health("no.such.Service")
    assert code_of(e) == grpc.StatusCode.NOT_FOUND


def test_open_session_creates_then_opens(client, sid):
    s = sid()
    codec = dict(scheme="oscar", key_bits=2, value_bits=4, group=32, chunk_tokens=64, n_sinks=4)
    info = client.open_session(s, **SHAPE, dtype="f16", codec=codec)
    assert info.created is True
    assert (info.session_id, info.n_layers, info.n_kv_heads, info.head_dim, info.dtype) == \
        (s, 2, 2, 128, "f16")
    assert info.n_tokens == 0 and info.n_chunks == 0 and info.tail_tokens == 0
    # the effective codec has every field present
    for key in ("scheme", "key_bits", "value_bits", "group", "chunk_tokens", "rotate_v",
                "n_sinks", "pin_detect_ratio", "pin_detect_max"):
        assert key in info.codec, key
    assert {k: info.codec[k] for k in codec} == codec
    again = client.open_session(s, **SHAPE, dtype="f16", codec=codec)
    assert again.created is False and again.codec == info.codec
    with pytest.raises(kvtier.KvtierError) as e:
        client.open_session(s, n_layers=3, n_kv_heads=2, head_dim=128, dtype="f16", codec=codec)
    assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(kvtier.KvtierError) as e:
        client.open_session(s, **SHAPE, dtype="f16", codec=dict(codec, key_bits=4))
    assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
    st = client.stat(s)
    assert st.n_tokens == 0 and st.codec == info.codec


def test_default_codec_is_the_daemons(client, sid):
    info = client.open_session(sid(), **SHAPE, dtype="f16")
    c = info.codec
    assert c["scheme"] in ("none", "kivi", "hadamard", "oscar")
    assert c["group"] in (32, 64, 128) and c["chunk_tokens"] % c["group"] == 0


def test_presets_and_the_recent_window(client, sid, rng):
    # The daemon's default codec is the preset kvtier-int2, and SessionInfo names it.
    c = client.open_session(sid(), **SHAPE, dtype="f16").codec
    assert c["preset"] == "kvtier-int2"
    assert (c["scheme"], c["key_bits"], c["value_bits"], c["group"], c["chunk_tokens"],
            c["n_sinks"], c["recent_exact_tokens"], c["key_rounding"]) == (
                "oscar", 3, 2, 64, 64, 8, 128, "minmax")
    o = client.open_session(sid(), **SHAPE, dtype="f16", codec=dict(preset="oscar-int2")).codec
    assert o["preset"] == "oscar-int2" and (o["chunk_tokens"], o["n_sinks"],
                                            o["recent_exact_tokens"], o["key_rounding"]) == (
                                                128, 0, 0, "minmax")
    # A client that picks its quantizer without naming a rounding gets min-max (OScaR's);
    # naming one overrides the preset's; none stays min-max.
    m = client.open_session(sid(), **SHAPE, dtype="f16", codec=dict(scheme="oscar", bits=2)).codec
    assert m["key_rounding"] == "minmax"
    m = client.open_session(sid(), **SHAPE, dtype="f16",
                            codec=dict(preset="kvtier-int2", key_rounding="mse")).codec
    assert m["key_rounding"] == "mse" and "preset" not in m
    m = client.open_session(sid(), **SHAPE, dtype="f16",
                            codec=dict(preset="kvtier-int2", key_rounding="minmax")).codec
    assert m["key_rounding"] == "minmax" and m["preset"] == "kvtier-int2"
    m = client.open_session(sid(), **SHAPE, dtype="f16",
                            codec=dict(scheme="kivi", bits=2, rotate_v=False, key_rounding="mse")).codec
    assert m["key_rounding"] == "mse"
    assert client.open_session(sid(), **SHAPE, dtype="f16",
                               codec=dict(scheme="none")).codec["key_rounding"] == "minmax"
    for bad, what in ((dict(key_rounding="nearest"), "key_rounding 'nearest'"),
                      (dict(scheme="none", key_rounding="mse"), "key_rounding mse needs")):
        pb = client._pb
        req = pb.OpenSessionRequest(session_id=sid(), n_layers=2, n_kv_heads=2, head_dim=128,
                                    dtype=1, codec=kvtier.client._codec_to_proto(pb, dict(
                                        scheme=bad.get("scheme", "oscar"))))
        req.codec.key_rounding = bad["key_rounding"]
        with pytest.raises(grpc.RpcError) as e:
            client._methods["OpenSession"](req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in e.value.details()
    # Fields present override the preset; naming chunk_tokens without a window seals every chunk.
    x = client.open_session(sid(), **SHAPE, dtype="f16",
                            codec=dict(preset="kvtier-int2", chunk_tokens=128)).codec
    assert (x["chunk_tokens"], x["recent_exact_tokens"], x["n_sinks"]) == (128, 0, 8)
    assert "preset" not in x  # no longer equal to a preset
    for bad in (dict(preset="kvtier-int3"), dict(chunk_tokens=64, recent_exact_tokens=32),
                dict(recent_exact_tokens=2048)):
        with pytest.raises(kvtier.KvtierError) as e:
            client.open_session(sid(), **SHAPE, dtype="f16", codec=bad)
        assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT
        assert ("preset" if "preset" in bad else "recent_exact_tokens") in str(e.value)
    # A window of 64 over chunks of 32: 100 tokens seal 2 chunks and keep 36 exact; the
    # window comes back bit-exact and grows to 64 before the next seal.
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16",
                        codec=dict(scheme="oscar", bits=2, group=32, chunk_tokens=32,
                                   recent_exact_tokens=64))
    k, v = kv(rng, 2, 160, 2, 128)
    r = client.append(s, k[:, :100], v[:, :100])
    assert r == {"n_tokens": 100, "appended": 100, "chunks_sealed": 2}
    info = client.stat(s)
    assert (info.n_chunks, info.tail_tokens, info.codec["recent_exact_tokens"]) == (2, 36, 64)
    fk, fv = client.fetch(s, tokens=(64, 100))
    assert fk.tobytes() == k[:, 64:100].tobytes() and fv.tobytes() == v[:, 64:100].tobytes()
    r = client.append(s, k[:, 100:128], v[:, 100:128])
    assert r["chunks_sealed"] == 0 and client.stat(s).tail_tokens == 64
    r = client.append(s, k[:, 128:129], v[:, 128:129])
    assert r["chunks_sealed"] == 1 and client.stat(s).tail_tokens == 33


def test_pin_unpin_ttl(client, sid):
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"), ttl_seconds=120)
    assert client.stat(s).ttl_seconds == 120
    assert client.pin(s).pinned is True
    assert client.stat(s).pinned is True
    assert client.unpin(s).pinned is False
    assert client.set_ttl(s, 0).ttl_seconds == 0
    assert client.set_ttl(s, 3600).ttl_seconds == 3600
    with pytest.raises(kvtier.KvtierError) as e:
        client.set_ttl(s, 2 ** 32 - 1)
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "ttl" in e.value.message
    assert client.stat(s).ttl_seconds == 3600  # a rejected request changes nothing
    p = sid("pinned")
    assert client.open_session(p, **SHAPE, dtype="f16", pinned=True).pinned is True


def test_list_sessions_pages_in_order(client, sid):
    prefix = sid("list")
    ids = [f"{prefix}/{i:02d}" for i in (3, 0, 4, 1, 2)]
    for s in ids:
        client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"))
    got = client.list_sessions(prefix=prefix + "/")
    assert [i.session_id for i in got] == sorted(ids)
    pages = list(client.list_pages(prefix=prefix + "/", page_size=2))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i.session_id for p in pages for i in p] == sorted(ids)
    assert client.list_sessions(prefix=prefix + "/none-such") == []


def test_stats(client, sid):
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"))
    k, v = kv(np.random.default_rng(1), 2, 10, 2, 128)
    client.append(s, k, v)
    st = client.stats()
    assert st.sessions >= 1 and st.tokens >= 10
    assert st.logical_bytes >= 2 * 2 * 10 * 2 * 128 * 2
    assert st.version and st.uptime_ms >= 0
    assert st.codec_isa in ("avx2", "scalar")
    assert any(t["name"] == "host" for t in st.tiers)
    assert st.counters, "Stats has no counters"


# ---- append / fetch --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_scheme_none_fetch_is_exact(client, sid, rng, dtype):
    s = sid()
    B = 64
    client.open_session(s, **SHAPE, dtype=dtype, codec=dict(scheme="none", chunk_tokens=B))
    k, v = kv(rng, 2, 2 * B + 17, 2, 128, dtype)
    r = client.append(s, k[:, :100], v[:, :100])
    assert r == {"n_tokens": 100, "appended": 100, "chunks_sealed": 1}
    r = client.append(s, k[:, 100:], v[:, 100:])
    assert r["n_tokens"] == 2 * B + 17 and r["appended"] == 2 * B + 17 - 100
    assert r["chunks_sealed"] == 1
    info = client.stat(s)
    assert (info.n_tokens, info.n_chunks, info.tail_tokens) == (2 * B + 17, 2, 17)
    fk, fv = client.fetch(s)
    assert fk.dtype == A.np_dtype(dtype)
    assert fk.tobytes() == k.tobytes() and fv.tobytes() == v.tobytes()
    # sub-ranges crossing chunk and tail boundaries, and one layer
    fk, fv = client.fetch(s, tokens=(B - 5, 2 * B + 3), layers=(1, 2))
    assert fk.tobytes() == k[1:2, B - 5:2 * B + 3].tobytes()
    assert fv.tobytes() == v[1:2, B - 5:2 * B + 3].tobytes()
    # another dtype: exact widening to f32
    fk, fv = client.fetch(s, dtype="f32")
    assert fk.dtype == np.float32
    np.testing.assert_array_equal(fk, A.to_f32(k, dtype))
    np.testing.assert_array_equal(fv, A.to_f32(v, dtype))
    # an empty range
    fk, fv = client.fetch(s, tokens=(5, 5))
    assert fk.shape == (2, 0, 2, 128)


def test_large_transfers_split_below_the_message_limit(client, sid, rng):
    # 4 layers x 8 heads x 128 x f16: 1500 tokens = 24 MiB of K+V, six times the 4 MiB limit
    s = sid()
    client.open_session(s, n_layers=4, n_kv_heads=8, head_dim=128, dtype="f16",
                        codec=dict(scheme="none"))
    k, v = kv(rng, 4, 1500, 8, 128)
    assert client.append(s, k, v)["n_tokens"] == 1500
    fk, fv = client.fetch(s)
    assert fk.tobytes() == k.tobytes() and fv.tobytes() == v.tobytes()
    # small reply messages: the daemon honours max_message_bytes
    fk, fv = client.fetch(s, tokens=(100, 900), max_message_bytes=64 << 10)
    assert fk.tobytes() == k[:, 100:900].tobytes() and fv.tobytes() == v[:, 100:900].tobytes()


def test_one_token_of_all_layers_above_the_limit(client, sid, rng):
    # 64 layers x 16 heads x 256 x f32: one token of every layer is 8 MiB of K+V, so each
    # token batch spans several messages split by layers (the AppendRequest rule)
    s = sid()
    client.open_session(s, n_layers=64, n_kv_heads=16, head_dim=256, dtype="f32",
                        codec=dict(scheme="none"))
    k, v = kv(rng, 64, 3, 16, 256, "f32")
    assert client.append(s, k, v)["n_tokens"] == 3
    fk, fv = client.fetch(s)
    assert fk.tobytes() == k.tobytes() and fv.tobytes() == v.tobytes()


def test_append_token_begin_guard(client, sid, rng):
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"))
    k, v = kv(rng, 2, 10, 2, 128)
    client.append(s, k, v, token_begin=0)
    with pytest.raises(kvtier.KvtierError) as e:
        client.append(s, k, v, token_begin=0)  # a replayed append
    assert code_of(e) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert "token_begin" in e.value.message
    assert client.stat(s).n_tokens == 10
    client.append(s, k, v, token_begin=10)
    assert client.stat(s).n_tokens == 20


def test_append_stream_is_atomic(client, sid, rng):
    # a stream whose second message is invalid adds nothing, not even its valid first block
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"))
    k, v = kv(rng, 2, 4, 2, 128)
    pb = client._pb

    def stream():
        yield pb.AppendRequest(session_id=s, block=pb.KvBlock(
            n_tokens=4, layer_begin=0, n_layers=2, dtype=1, k=k.tobytes(), v=v.tobytes()))
        yield pb.AppendRequest(session_id=s, block=pb.KvBlock(
            n_tokens=4, layer_begin=0, n_layers=2, dtype=1, k=k.tobytes()[:100], v=v.tobytes()))

    with pytest.raises(grpc.RpcError) as e:
        client._methods["Append"](stream(), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.stat(s).n_tokens == 0


def _fill(rng, L, T, H, d, dtype):
    """K/V with an attention sink: token 0 has a small key norm and near-zero value."""
    k, v = kv(rng, L, T, H, d, "f32")
    k = A.to_f32(k, "f32")
    v = A.to_f32(v, "f32")
    k[:, 0] *= 0.15
    v[:, 0] *= 0.02
    return A.from_f32(k, dtype), A.from_f32(v, dtype)


# bits: both widths, or (key_bits, value_bits)
QUANT = [("oscar", 2, "f16"), ("oscar", 4, "bf16"), ("kivi", 2, "f16"), ("hadamard", 4, "f32"),
         ("oscar", 8, "f32"), ("oscar", (3, 2), "f16"), ("oscar", 3, "bf16"), ("kivi", 3, "f32"),
         ("hadamard", (3, 2), "f16")]


@pytest.mark.parametrize("scheme,bits,dtype", QUANT)
def test_quantized_fetch_within_a_step(client, sid, rng, scheme, bits, dtype):
    """Fetch returns sinks and tail exact and sealed tokens within one quantization step; the
    daemon's chunks decode with the numpy reference to the same values as its Fetch; the
    reference encoder writes the same chunk bytes; a second session with the same data
    returns the same bytes."""
    L, H, d, B, S = 2, 2, 128, 64, 4
    kb, vb = bits if isinstance(bits, tuple) else (bits, bits)
    codec = dict(scheme=scheme, key_bits=kb, value_bits=vb, group=32, chunk_tokens=B, n_sinks=S,
                 rotate_v=scheme != "kivi")
    s1, s2 = sid("a"), sid("b")
    for s in (s1, s2):
        client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype=dtype, codec=codec)
    T = 3 * B + 9
    k, v = _fill(rng, L, T, H, d, dtype)
    client.append(s1, k, v)
    for t0 in range(0, T, 50):  # the same tokens in other batch sizes
        client.append(s2, k[:, t0:t0 + 50], v[:, t0:t0 + 50])
    fk, fv = client.fetch(s1, dtype="f32")
    kf, vf = A.to_f32(k, dtype), A.to_f32(v, dtype)
    np.testing.assert_array_equal(fk[:, :S], kf[:, :S])  # sinks exact
    np.testing.assert_array_equal(fv[:, :S], vf[:, :S])
    np.testing.assert_array_equal(fk[:, 3 * B:], kf[:, 3 * B:])  # the tail exact
    np.testing.assert_array_equal(fv[:, 3 * B:], vf[:, 3 * B:])
    # the second session returns identical bytes, in the session dtype and in f32
    f2k, f2v = client.fetch(s2, dtype="f32")
    assert f2k.tobytes() == fk.tobytes() and f2v.tobytes() == fv.tobytes()
    assert client.fetch(s1)[0].tobytes() == client.fetch(s2)[0].tobytes()

    enc = client.fetch_encoded(s1)
    assert len(enc.chunks) == 3 and enc.chunk_begin == 0
    assert enc.tail_k is not None and enc.tail_k.shape == (L, 9, H, d)
    assert enc.tail_k.tobytes() == k[:, 3 * B:].tobytes()
    info = client.stat(s1)
    for c, chunk in enumerate(enc.chunks):
        view = R.parse_chunk(chunk)  # magic, sizes, pins and crc32c
        assert view.header["first_token"] == c * B
        assert view.cfg["scheme"] == R._SCHEMES[scheme]
        sl = slice(c * B, (c + 1) * B)
        # the reference decodes the daemon's chunk to the daemon's own Fetch output
        rk, rv = R.decode_chunk(chunk, "f32", view=view)
        np.testing.assert_allclose(rk, fk[:, sl], rtol=1e-5, atol=1e-5 * np.abs(fk).max())
        np.testing.assert_allclose(rv, fv[:, sl], rtol=1e-5, atol=1e-5 * np.abs(fv).max())
        # within one step of the input (the bound of test_reference.test_chunk_roundtrip)
        sk, sv = R.decode_steps(chunk, view=view)
        eps = 2.0 ** -8 if dtype == "bf16" else 2.0 ** -11
        for dec, ref, steps, qmax in ((fk[:, sl], kf[:, sl], sk, 2 ** kb - 1),
                                      (fv[:, sl], vf[:, sl], sv, 2 ** vb - 1)):
            err = np.linalg.norm((dec - ref).astype(np.float64), axis=-1)
            row = np.linalg.norm(ref.astype(np.float64), axis=-1)
            mag = np.broadcast_to(np.maximum(row.max(axis=(1, 2), keepdims=True),
                                             np.linalg.norm(row, axis=-1, keepdims=True)), row.shape)
            bound = (np.linalg.norm(steps.astype(np.float64), axis=-1) * (1 + qmax * eps)
                     + 2 * eps * np.sqrt(d) * mag + 1e-3)
            assert np.all(err <= bound), float((err / bound).max())
        # the numpy reference encoder, written from the specification, writes the same bytes
        # (and chooses the same pins: the sinks)
        np.testing.assert_array_equal(R.pinned_tokens(view.cfg, c * B, k[:, sl]), view.pins)
        mine = R.encode_chunk(view.cfg, c * B, k[:, sl], v[:, sl])
        differ = np.frombuffer(mine, np.uint8) != np.frombuffer(chunk, np.uint8)
        assert not differ.any(), (f"chunk {c}: {differ.sum()} of {len(chunk)} bytes differ from "
                                  f"the reference, first at {np.argmax(differ)}")
    assert info.n_chunks == 3 and info.tail_tokens == 9
    assert info.bits_per_element == pytest.approx(
        sum(len(c) for c in enc.chunks) * 8 / (2 * 3 * B * L * H * d), rel=1e-6)


@pytest.mark.parametrize("scheme", ["oscar", "kivi", "hadamard"])
@pytest.mark.parametrize("bits", [2, 3])
def test_reference_bytes_on_data_with_zeros(client, sid, rng, scheme, bits):
    """Exact zeros of both signs, zero tokens and constant channels: the edge cases of the
    quantizer (all-zero and constant groups, the sign of a zero minimum) give the same chunk
    bytes in the daemon and in the reference."""
    L, H, d, B = 2, 2, 64, 64
    kf = rng.standard_normal((L, B, H, d)).astype(np.float32)
    vf = rng.standard_normal((L, B, H, d)).astype(np.float32)
    kf[:, :, :, 3] = 0.0
    kf[:, ::2, :, 5] = -0.0
    kf[:, :, :, 7] = 1.5  # a constant channel
    kf[:, 9] = 0.0  # a zero token
    vf[:, 9] = -0.0
    vf[:, :, 1, :8] = np.abs(vf[:, :, 1, :8])
    vf[:, 20:30, 0, 8:16] = -0.0
    vf[:, :, 0, 3] = 0.0
    codec = dict(scheme=scheme, bits=bits, group=32, chunk_tokens=B, n_sinks=1,
                 rotate_v=scheme != "kivi")
    s = sid()
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    k, v = A.from_f32(kf, "f16"), A.from_f32(vf, "f16")
    client.append(s, k, v)
    chunk, = client.fetch_encoded(s).chunks
    view = R.parse_chunk(chunk)
    mine = R.encode_chunk(view.cfg, 0, k, v)
    differ = np.frombuffer(mine, np.uint8) != np.frombuffer(chunk, np.uint8)
    assert not differ.any(), f"{differ.sum()} bytes differ, first at {np.argmax(differ)}"
    fk, fv = client.fetch(s, dtype="f32")
    rk, rv = R.decode_chunk(chunk, "f32", view=view)
    np.testing.assert_array_equal(rk, fk)
    np.testing.assert_array_equal(rv, fv)


@pytest.mark.parametrize("scheme,bits,dtype", [("oscar", 2, "f16"), ("kivi", 4, "bf16"),
                                                ("hadamard", 2, "f32"), ("oscar", 8, "f16"),
                                                ("oscar", 3, "f16")])
def test_key_rounding_mse_bytes_match_the_reference(client, sid, rng, scheme, bits, dtype):
    """key_rounding mse: the daemon's chunks equal the numpy reference's bytes (the encoder
    choice is not in the chunk: the reference is told it), differ from min-max's only in the
    key scales, zeros and codes, and fit the keys better."""
    L, H, d, B = 2, 2, 64, 64
    k, v = _fill(rng, L, 2 * B, H, d, dtype)
    chunks = {}
    for rounding in ("minmax", "mse"):
        s = sid(rounding)
        codec = dict(scheme=scheme, bits=bits, group=32, chunk_tokens=B, n_sinks=3,
                     rotate_v=scheme != "kivi", key_rounding=rounding)
        info = client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype=dtype,
                                   codec=codec)
        assert info.codec["key_rounding"] == rounding
        client.append(s, k, v)
        chunks[rounding] = client.fetch_encoded(s).chunks
        for c, chunk in enumerate(chunks[rounding]):
            view = R.parse_chunk(chunk)
            mine = R.encode_chunk(dict(view.cfg, key_rounding=rounding), c * B,
                                  k[:, c * B:(c + 1) * B], v[:, c * B:(c + 1) * B])
            differ = np.frombuffer(mine, np.uint8) != np.frombuffer(chunk, np.uint8)
            assert not differ.any(), (f"{rounding} chunk {c}: {differ.sum()} of {len(chunk)} "
                                      f"bytes differ from the reference, first at {np.argmax(differ)}")
    kf = A.to_f32(k, dtype)
    errs = {}
    for rounding, cs in chunks.items():
        dk = np.concatenate([R.decode_chunk(c, "f32")[0] for c in cs], axis=1)
        errs[rounding] = float(((dk - kf)[:, 3:] ** 2).sum())
        view = R.parse_chunk(cs[0])
        for layer in range(L):  # values untouched
            a, b = view.layer(layer), R.parse_chunk(chunks["minmax"][0]).layer(layer)
            for name in ("v_scale", "v_zero", "v_codes"):
                np.testing.assert_array_equal(a[name], b[name])
    assert errs["mse"] < errs["minmax"], errs


def test_pin_detection_matches_the_reference(client, sid, rng):
    """Low-norm tokens inside a chunk are pinned exact when detection is on, the same ones
    the reference picks."""
    L, H, d, B = 2, 2, 64, 64
    codec = dict(scheme="oscar", bits=2, group=32, chunk_tokens=B, n_sinks=2,
                 pin_detect_ratio=0.5, pin_detect_max=3)
    s = sid()
    info = client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    assert info.codec["pin_detect_ratio"] == pytest.approx(0.5)
    k, v = _fill(rng, L, 2 * B, H, d, "f16")
    kf = A.to_f32(k, "f16")
    low = [10, 40, 41, 50, B + 5]  # chunk 0 has four candidates (max 3), chunk 1 one
    # token 50, the fourth, is ~3x above the three picked: the outlier channels make a row's
    # norm vary by ~13%, which turned 0.2 vs 0.3 around for some seeds (KVT_SEED=3826069682)
    for t, f in zip(low, (0.1, 0.12, 0.05, 0.35, 0.1)):
        kf[t % 2, t] *= f  # low in one layer is enough
    k = A.from_f32(kf, "f16")
    client.append(s, k, v)
    enc = client.fetch_encoded(s)
    for c, chunk in enumerate(enc.chunks):
        view = R.parse_chunk(chunk)
        ref_cfg = dict(view.cfg, pin_detect_ratio=0.5, pin_detect_max=3)
        want = R.pinned_tokens(ref_cfg, c * B, k[:, c * B:(c + 1) * B])
        np.testing.assert_array_equal(view.pins, want)
        assert R.encode_chunk(ref_cfg, c * B, k[:, c * B:(c + 1) * B], v[:, c * B:(c + 1) * B]) == chunk
    np.testing.assert_array_equal(R.parse_chunk(enc.chunks[0]).pins, [0, 1, 10, 40, 41])
    np.testing.assert_array_equal(R.parse_chunk(enc.chunks[1]).pins, [5])
    fk, _ = client.fetch(s, dtype="f32")
    for t in (0, 1, 10, 40, 41, B + 5):  # pinned tokens come back exact
        np.testing.assert_array_equal(fk[:, t], A.to_f32(k[:, t], "f16"))


def test_fetch_encoded_store_encoded_roundtrip(client, sid, rng):
    L, H, d, B = 2, 2, 128, 64
    codec = dict(scheme="oscar", bits=2, group=32, chunk_tokens=B, n_sinks=4)
    src, dst = sid("src"), sid("dst")
    client.open_session(src, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    k, v = _fill(rng, L, 2 * B + 30, H, d, "f16")
    client.append(src, k, v)
    enc = client.fetch_encoded(src)
    assert enc.info.session_id == src and enc.info.n_tokens == 2 * B + 30
    info = client.store_encoded(dst, enc)
    assert info.session_id == dst and info.n_tokens == 2 * B + 30 and info.n_chunks == 2
    a = client.fetch(src)
    b = client.fetch(dst)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    again = client.fetch_encoded(dst)
    assert again.chunks == enc.chunks
    assert again.tail_k.tobytes() == enc.tail_k.tobytes()
    # chunks only, then a sub-range of chunks
    only = client.fetch_encoded(src, include_tail=False)
    assert only.tail_k is None and only.chunks == enc.chunks
    one = client.fetch_encoded(src, chunk_begin=1, chunk_end=2, include_tail=False)
    assert one.chunk_begin == 1 and one.chunks == enc.chunks[1:2]
    # a corrupted chunk is refused and leaves nothing behind
    bad = kvtier.EncodedSession(info=enc.info, chunks=[enc.chunks[0][:-1] + bytes([enc.chunks[0][-1] ^ 1])],
                                chunk_begin=0, tail_k=None, tail_v=None, tail_token_begin=None)
    bad_id = sid("bad")
    with pytest.raises(kvtier.KvtierError) as e:
        client.store_encoded(bad_id, bad)
    assert code_of(e) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS)
    with pytest.raises(kvtier.KvtierError) as e:
        client.stat(bad_id)
    assert code_of(e) == grpc.StatusCode.NOT_FOUND
    # a chunk's upload is exactly the bytes its header describes: one trailing byte (the
    # daemon stored it and counted it in bytes_held) or one missing is refused naming both
    # sizes. Chunk 1 pins no sinks, so one byte more stays under the codec's largest chunk.
    c0, c1 = enc.chunks[0], enc.chunks[1]
    n = len(c1)
    for chunk, want in ((c1 + b"\0", f"chunk length {n + 1} is longer than its "
                         f"total_bytes {n}"),
                        (c1[:-1], f"chunk length {n - 1} is shorter than its "
                         f"total_bytes {n}")):
        bad = kvtier.EncodedSession(info=enc.info, chunks=[c0, chunk], chunk_begin=0,
                                    tail_k=None, tail_v=None, tail_token_begin=None)
        with pytest.raises(kvtier.KvtierError) as e:
            client.store_encoded(bad_id, bad)
        assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and want in str(e.value), e.value
        with pytest.raises(kvtier.KvtierError) as e:
            client.stat(bad_id)
        assert code_of(e) == grpc.StatusCode.NOT_FOUND


# ---- attend ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,bits", [("oscar", 2), ("kivi", 4), ("none", 16)])
def test_attend_equals_numpy_attention(client, sid, rng, scheme, bits):
    L, H, d, B = 3, 2, 128, 64
    codec = dict(scheme=scheme, group=32, chunk_tokens=B, n_sinks=4)
    if scheme != "none":
        codec.update(bits=bits, rotate_v=scheme != "kivi")
    s1, s2 = sid("a"), sid("b")
    client.open_session(s1, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    client.open_session(s2, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    k1, v1 = _fill(rng, L, 2 * B + 21, H, d, "f16")
    k2, v2 = _fill(rng, L, 37, H, d, "f16")  # tail only
    client.append(s1, k1, v1)
    client.append(s2, k2, v2)
    items, expect, by_chunks = [], [], []
    for s in (s1, s2):
        fk, fv = client.fetch(s, dtype="f32")
        enc = client.fetch_encoded(s)
        for layer in range(L):
            n_q = H * (1 + layer)  # GQA groups of 1, 2, 3
            q = rng.standard_normal((n_q, d)).astype(np.float32) * 2
            scale = None if layer != 1 else 0.05
            items.append(dict(session_id=s, layer=layer, q=q, softmax_scale=scale))
            expect.append(A.attention(q, fk[layer], fv[layer], scale))
            # the same step computed on the encoded pieces, the way OSCAR.md section 3 says
            by_chunks.append(R.attend(q, enc.chunks, enc.tail_k, enc.tail_v, layer=layer,
                                      softmax_scale=scale))
    outs = client.attend(items, with_counts=True)
    assert len(outs) == len(items)
    for (out, n), want, want2, it in zip(outs, expect, by_chunks, items):
        assert out.shape == want.shape
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out, want2, rtol=1e-4, atol=1e-4)
        assert n == (2 * B + 21 if it["session_id"] == s1 else 37)


def test_attend_stages_a_new_token(client, sid, rng):
    L, H, d, B = 3, 2, 128, 64
    s = sid()
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16",
                        codec=dict(scheme="oscar", bits=4, group=32, chunk_tokens=B, n_sinks=4))
    T = B + 10  # the staged token joins the exact tail
    k, v = _fill(rng, L, T, H, d, "f16")
    client.append(s, k, v)
    before_k, before_v = client.fetch(s, dtype="f32")
    nk, nv = kv(rng, L, 1, H, d)
    for layer in range(L):
        q = rng.standard_normal((2 * H, d)).astype(np.float32)
        (out, n), = client.attend([dict(session_id=s, layer=layer, q=q, new_k=nk[layer, 0],
                                        new_v=nv[layer, 0])], with_counts=True)
        assert n == T + 1
        kk = np.concatenate([before_k[layer], A.to_f32(nk[layer], "f16")])
        vv = np.concatenate([before_v[layer], A.to_f32(nv[layer], "f16")])
        np.testing.assert_allclose(out, A.attention(q, kk, vv), rtol=1e-4, atol=1e-4)
        # the token joins the session once every layer has it
        assert client.stat(s).n_tokens == (T if layer < L - 1 else T + 1)
    info = client.stat(s)
    assert info.n_chunks == 1 and info.tail_tokens == 11
    fk, fv = client.fetch(s, dtype="f32")
    np.testing.assert_array_equal(fk[:, :T], before_k)
    np.testing.assert_array_equal(fk[:, T], A.to_f32(nk[:, 0], "f16"))  # the tail is exact
    np.testing.assert_array_equal(fv[:, T], A.to_f32(nv[:, 0], "f16"))


# ---- fork, truncate, drop --------------------------------------------------------------------------

def test_fork_shares_a_prefix_and_copies_on_write(client, sid, rng):
    L, H, d, B = 2, 2, 128, 64
    codec = dict(scheme="oscar", bits=2, group=32, chunk_tokens=B, n_sinks=4)
    src = sid("src")
    client.open_session(src, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    k, v = _fill(rng, L, 2 * B + 10, H, d, "f16")
    client.append(src, k, v)
    full_k, full_v = client.fetch(src)
    for n in (2 * B + 10, 2 * B, B + 7, 3, 0):
        f = sid(f"fork{n}")
        info = client.fork(src, f, n_tokens=n)
        assert info.session_id == f and info.n_tokens == n and info.codec == client.stat(src).codec
        fk, fv = client.fetch(f)
        assert fk.tobytes() == full_k[:, :n].tobytes() and fv.tobytes() == full_v[:, :n].tobytes()
    whole = client.fork(src, sid("whole"))
    assert whole.n_tokens == 2 * B + 10
    # copy on write: appending to a fork leaves the source alone, and the other way round
    f = sid("cow")
    client.fork(src, f, n_tokens=B + 7)
    k2, v2 = _fill(rng, L, 70, H, d, "f16")
    client.append(f, k2, v2)
    assert client.stat(src).n_tokens == 2 * B + 10
    sk, sv = client.fetch(src)
    assert sk.tobytes() == full_k.tobytes() and sv.tobytes() == full_v.tobytes()
    # the fork's sealed chunk is still the source's (its tail tokens B..B+6 were sealed with the
    # new ones into a chunk of its own)
    fk, _ = client.fetch(f, tokens=(0, B))
    assert fk.tobytes() == full_k[:, :B].tobytes()
    assert client.stat(f).n_chunks == 2
    # the fork outlives its source
    client.drop(src)
    fk, _ = client.fetch(f, tokens=(0, B))
    assert fk.tobytes() == full_k[:, :B].tobytes()
    with pytest.raises(kvtier.KvtierError) as e:
        client.fork(f, f)  # the target exists
    assert code_of(e) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(kvtier.KvtierError) as e:
        client.fork(f, sid("long"), n_tokens=10 ** 6)
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "n_tokens" in e.value.message


def test_truncate(client, sid, rng):
    L, H, d, B = 2, 2, 128, 64
    s = sid()
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16",
                        codec=dict(scheme="oscar", bits=4, group=32, chunk_tokens=B, n_sinks=4))
    k, v = _fill(rng, L, 3 * B + 5, H, d, "f16")
    client.append(s, k, v)
    before_k, before_v = client.fetch(s)
    for n in (3 * B + 2, 3 * B, 2 * B + 9):
        info = client.truncate(s, n)
        assert info.n_tokens == n
        fk, fv = client.fetch(s)
        assert fk.tobytes() == before_k[:, :n].tobytes() and fv.tobytes() == before_v[:, :n].tobytes()
    with pytest.raises(kvtier.KvtierError) as e:
        client.truncate(s, 2 * B + 10)  # longer than the session
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "n_tokens" in e.value.message
    assert client.stat(s).n_tokens == 2 * B + 9
    # appending after a truncation continues from the new end
    k2, v2 = _fill(rng, L, B, H, d, "f16")
    assert client.append(s, k2, v2)["n_tokens"] == 3 * B + 9
    fk, _ = client.fetch(s, tokens=(0, 2 * B))
    assert fk.tobytes() == before_k[:, :2 * B].tobytes()
    assert client.truncate(s, 0).n_tokens == 0


def test_drop(client, sid, rng):
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="oscar", chunk_tokens=64))
    k, v = kv(rng, 2, 100, 2, 128)
    client.append(s, k, v)
    held = client.stat(s).bytes_held
    assert held > 0
    assert client.drop(s) > 0
    for call in (lambda: client.stat(s), lambda: client.fetch(s), lambda: client.drop(s),
                 lambda: client.append(s, k, v)):
        with pytest.raises(kvtier.KvtierError) as e:
            call()
        assert code_of(e) == grpc.StatusCode.NOT_FOUND
    assert s not in [i.session_id for i in client.list_sessions(prefix=s)]


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(head_dim=96), "head_dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(n_layers=257), "n_layers"),
    (dict(n_kv_heads=65), "n_kv_heads"),
    (dict(dtype=0), "dtype"),
    (dict(codec=dict(scheme="oscar", key_bits=5)), "key_bits"),
    (dict(codec=dict(scheme="oscar", group=48)), "group"),
    (dict(codec=dict(scheme="oscar", group=64, chunk_tokens=96)), "chunk_tokens"),
    (dict(codec=dict(scheme="oscar", n_sinks=65)), "n_sinks"),
    (dict(codec=dict(scheme="kivi", rotate_v=True)), "rotate_v"),
])
def test_open_session_rejects(client, sid, kwargs, field):
    s = sid()
    args = dict(SHAPE, dtype="f16")
    args.update(kwargs)
    pb = client._pb
    req = pb.OpenSessionRequest(session_id=s, n_layers=args["n_layers"],
                                n_kv_heads=args["n_kv_heads"], head_dim=args["head_dim"])
    if args["dtype"]:
        req.dtype = A.dtype_code(args["dtype"])
    if "codec" in args:
        from kvtier.client import _codec_to_proto
        req.codec.CopyFrom(_codec_to_proto(pb, args["codec"]))
    with pytest.raises(grpc.RpcError) as e:
        client._methods["OpenSession"](req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details(), e.value.details()
    with pytest.raises(kvtier.KvtierError) as e:
        client.stat(s)  # nothing was created
    assert code_of(e) == grpc.StatusCode.NOT_FOUND


def test_session_id_limits(client):
    with pytest.raises(kvtier.KvtierError) as e:
        client.open_session("x" * 129, **SHAPE, dtype="f16")
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in e.value.message
    with pytest.raises(kvtier.KvtierError) as e:
        client.open_session("", **SHAPE, dtype="f16")
    assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in e.value.message


def test_data_request_errors(client, sid, rng):
    s = sid()
    client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"))
    k, v = kv(rng, 2, 10, 2, 128)
    client.append(s, k, v)

    def rejects(fn, code, field):
        with pytest.raises(kvtier.KvtierError) as e:
            fn()
        assert code_of(e) == code, e.value
        assert field in e.value.message, e.value.message

    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    rejects(lambda: client.append(s, k[..., :64], v[..., :64]), INVALID, "")  # wrong head_dim
    rejects(lambda: client.append(s, A.to_f32(k), A.to_f32(v)), INVALID, "dtype")
    rejects(lambda: client.append(s, k[:1], v[:1]), INVALID, "layer")
    assert client.stat(s).n_tokens == 10
    rejects(lambda: client.fetch(s, tokens=(0, 11)), INVALID, "token")
    rejects(lambda: client.fetch(s, tokens=(7, 3)), INVALID, "token")
    rejects(lambda: client.fetch(s, layers=(0, 3)), INVALID, "layer")
    rejects(lambda: client.fetch_encoded(s, chunk_begin=5, chunk_end=6), INVALID, "chunk")
    # FetchEncoded by token range (libkvtier's local-decode Fetch): the range is checked and
    # cannot be mixed with a chunk range
    def enc_tokens(**kw):
        req = client._pb.FetchEncodedRequest(session_id=s, **kw)
        return list(client._stream_out("FetchEncoded", req))
    rejects(lambda: enc_tokens(token_begin=0, chunk_end=1), INVALID, "token_begin")
    rejects(lambda: enc_tokens(token_end=4, include_tail=True), INVALID, "token_begin")
    rejects(lambda: enc_tokens(token_end=11), INVALID, "token range")
    rejects(lambda: enc_tokens(token_begin=7, token_end=3), INVALID, "token range")
    pieces = enc_tokens(token_begin=3, token_end=9)  # scheme none: all 10 tokens in the tail
    assert pieces[0].HasField("session") and pieces[0].session.n_tokens == 10
    tail = [p.tail for p in pieces if p.WhichOneof("piece") == "tail"]
    assert [(b.token_begin, b.n_tokens) for b in tail] == [(3, 6)]
    assert not any(p.WhichOneof("piece") == "chunk" for p in pieces)
    q = np.zeros((4, 128), np.float32)
    rejects(lambda: client.attend([dict(session_id=s, layer=2, q=q)]), INVALID, "layer")
    rejects(lambda: client.attend([dict(session_id=s, layer=0, q=np.zeros((3, 128)))]),
            INVALID, "n_q_heads")
    rejects(lambda: client.attend([dict(session_id=s, layer=0, q=np.zeros((4, 64)))]), INVALID, "q")
    rejects(lambda: client.attend([dict(session_id=s + "-none", layer=0, q=q)]),
            grpc.StatusCode.NOT_FOUND, "")
    # a rejected batch changes nothing: the valid staged token of item 0 is not kept
    nk = np.zeros((2, 128), np.float16)
    rejects(lambda: client.attend([dict(session_id=s, layer=0, q=q, new_k=nk, new_v=nk),
                                   dict(session_id=s, layer=9, q=q)]), INVALID, "layer")
    assert client.stat(s).n_tokens == 10


# ---- concurrency -----------------------------------------------------------------------------------

def test_threads_on_own_sessions(client, sid):
    n_threads, rounds = 8, 6
    ids = [sid(f"t{i}") for i in range(n_threads)]
    errors = []

    def worker(i):
        try:
            r = np.random.default_rng(i + 1000)
            s = ids[i]
            client.open_session(s, **SHAPE, dtype="f16",
                                codec=dict(scheme="none" if i % 2 else "oscar", chunk_tokens=64))
            sent_k = []
            for _ in range(rounds):
                k, v = kv(r, 2, int(r.integers(1, 90)), 2, 128)
                client.append(s, k, v)
                sent_k.append(k)
                fk, _ = client.fetch(s, tokens=(0, sum(x.shape[1] for x in sent_k)))
                if i % 2:  # exact scheme: every byte
                    assert fk.tobytes() == np.concatenate(sent_k, axis=1).tobytes()
                else:  # the length is right and the sinks are exact
                    assert fk.shape[1] == sum(x.shape[1] for x in sent_k)
                    assert fk[:, :4].tobytes() == np.concatenate(sent_k, axis=1)[:, :4].tobytes()
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a worker thread is stuck"
    assert not errors, errors


def test_concurrent_appends_to_one_session_are_atomic(client, sid):
    """Threads append tagged batches to one session at once: every batch lands whole and
    contiguous, none is lost, none interleaves with another."""
    s = sid()
    L, H, d = 2, 2, 64
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f32",
                        codec=dict(scheme="none", group=32, chunk_tokens=32))
    n_threads, per = 6, 8
    errors = []

    def worker(i):
        try:
            for j in range(per):
                n = 1 + (i + j) % 5
                tag = np.float32(i * 100 + j)
                k = np.full((L, n, H, d), tag, np.float32)
                k[:, :, :, 0] = np.arange(n, dtype=np.float32)[None, :, None]  # position in batch
                client.append(s, k, -k)
        except BaseException as e:  # noqa: BLE001
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert not errors, errors
    total = sum(1 + (i + j) % 5 for i in range(n_threads) for j in range(per))
    assert client.stat(s).n_tokens == total
    fk, fv = client.fetch(s)
    np.testing.assert_array_equal(fv, -fk)
    tags = fk[0, :, 0, 1]
    pos = fk[0, :, 0, 0]
    assert np.all(fk[:, :, :, 1:] == tags[None, :, None, None])  # no torn tokens
    seen = set()
    t = 0
    while t < total:
        tag = int(tags[t])
        i, j = divmod(tag, 100)
        n = 1 + (i + j) % 5
        assert tag not in seen, f"batch {tag} appears twice"
        seen.add(tag)
        np.testing.assert_array_equal(tags[t:t + n], tag)  # contiguous
        np.testing.assert_array_equal(pos[t:t + n], np.arange(n))  # in order
        t += n
    assert len(seen) == n_threads * per


# ---- the C client (kvtierctl, on libkvtier) and the Python client agree ------------------------------

def test_python_and_c_clients_agree(client, daemon, sid, rng, tmp_path):
    """The same K/V stored through the C client (kvtierctl put) and through this client give
    the same chunks and the same Fetch bytes, and kvtierctl get of a session this client
    filled returns what this client's fetch returns."""
    import os
    import subprocess

    ctl = os.environ.get("KVTIERCTL")
    if not ctl or not os.path.isfile(ctl):
        pytest.fail(f"KVTIERCTL={ctl!r} does not name kvtierctl (ctest sets it)")
    L, H, d, B = 2, 2, 128, 64
    codec = dict(scheme="oscar", key_bits=2, value_bits=2, group=32, chunk_tokens=B, n_sinks=4)
    k, v = _fill(rng, L, 2 * B + 13, H, d, "f16")
    np.save(tmp_path / "k.npy", k)
    np.save(tmp_path / "v.npy", v)
    py, c = sid("py"), sid("c")
    client.open_session(py, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16", codec=codec)
    client.append(py, k, v)

    def run(*args):
        out = subprocess.run([ctl, "--socket", str(daemon.socket), *args], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, f"kvtierctl {' '.join(args)}: {out.stderr}{out.stdout}"
        return out

    run("put", c, "--k", str(tmp_path / "k.npy"), "--v", str(tmp_path / "v.npy"),
        "--scheme", "oscar", "--key-bits", "2", "--value-bits", "2", "--group", "32",
        "--chunk-tokens", str(B), "--sinks", "4")
    assert client.stat(c).codec == client.stat(py).codec
    assert client.fetch_encoded(c).chunks == client.fetch_encoded(py).chunks
    a, b = client.fetch(py), client.fetch(c)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    run("get", py, "--out-k", str(tmp_path / "ok.npy"), "--out-v", str(tmp_path / "ov.npy"),
        "--tokens", f"5:{2 * B + 10}", "--dtype", "f32")
    fk, fv = client.fetch(py, tokens=(5, 2 * B + 10), dtype="f32")
    np.testing.assert_array_equal(np.load(tmp_path / "ok.npy"), fk)
    np.testing.assert_array_equal(np.load(tmp_path / "ov.npy"), fv)
    # key_rounding through both clients: the same mse chunks, and kvtierctl stat names it
    py2, c2 = sid("py-mse"), sid("c-mse")
    client.open_session(py2, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16",
                        codec=dict(codec, key_rounding="mse"))
    client.append(py2, k, v)
    run("put", c2, "--k", str(tmp_path / "k.npy"), "--v", str(tmp_path / "v.npy"),
        "--scheme", "oscar", "--key-bits", "2", "--value-bits", "2", "--group", "32",
        "--chunk-tokens", str(B), "--sinks", "4", "--key-rounding", "mse")
    assert client.stat(c2).codec == client.stat(py2).codec
    assert client.stat(c2).codec["key_rounding"] == "mse"
    assert client.fetch_encoded(c2).chunks == client.fetch_encoded(py2).chunks
    assert client.fetch_encoded(c2).chunks != client.fetch_encoded(c).chunks
    assert "key_rounding mse" in run("stat", c2).stdout


def _kvtierctl(daemon, *args, fetch=None):
    """Runs kvtierctl against the daemon; fetch: KVTIER_CLIENT_FETCH (local/server)."""
    import os
    import subprocess

    ctl = os.environ.get("KVTIERCTL")
    if not ctl or not os.path.isfile(ctl):
        pytest.fail(f"KVTIERCTL={ctl!r} does not name kvtierctl (ctest sets it)")
    env = dict(os.environ)
    env.pop("KVTIER_CLIENT_FETCH", None)
    if fetch:
        env["KVTIER_CLIENT_FETCH"] = fetch
    return subprocess.run([ctl, "--socket", str(daemon.socket), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_kvtierctl_get_summary(client, daemon, sid, rng, tmp_path):
    """kvtierctl get's summary line names the RPC that answered, who decoded and how many
    messages came: the default (local decode) path said "in 0 messages", counting only the
    Fetch RPC's replies. FetchEncoded sends the session info, one piece per chunk under the
    message limit and the range's exact tail tokens in one block here; Fetch one block (none
    for an empty range)."""
    L, H, d, B = 2, 2, 128, 64
    T = 2 * B + 13
    s = sid()
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16",
                        codec=dict(scheme="oscar", key_bits=2, value_bits=2, group=32,
                                   chunk_tokens=B, n_sinks=4, recent_exact_tokens=0))
    k, v = _fill(rng, L, T, H, d, "f16")
    client.append(s, k, v)
    info = client.stat(s)
    assert (info.n_tokens, info.n_chunks) == (T, 2), info
    out_k, out_v = str(tmp_path / "k.npy"), str(tmp_path / "v.npy")
    # (range, chunks it overlaps, whether it reaches the tail)
    for (t0, t1), chunks, tail in (((5, T - 3), 2, True), ((0, B), 1, False),
                                   ((B + 1, B + 2), 1, False), ((2 * B, T), 0, True),
                                   ((7, 7), 0, False)):
        for fetch in ("local", "server"):
            out = _kvtierctl(daemon, "get", s, "--out-k", out_k, "--out-v", out_v,
                             "--tokens", f"{t0}:{t1}", fetch=fetch)
            assert out.returncode == 0, f"{fetch} {t0}:{t1}: {out.stderr}{out.stdout}"
            if fetch == "local":
                n = 1 + chunks + int(tail)
                what = f"in {n} FetchEncoded message{'s' if n != 1 else ''} (decoded here)"
            else:  # an empty range is answered by the status alone
                what = f"in {1 if t1 > t0 else 0} Fetch message{'' if t1 > t0 else 's'} " \
                       "(decoded by kvtierd)"
            want = f"{s}: tokens [{t0}, {t1}) layers [0, {L}) as f16 {what}\n"
            assert out.stdout == want, (fetch, out.stdout, want)
            fk, fv = client.fetch(s, tokens=(t0, t1))
            np.testing.assert_array_equal(np.load(out_k), fk)
            np.testing.assert_array_equal(np.load(out_v), fv)


def test_kvtierctl_get_range_errors(client, daemon, sid, rng, tmp_path):
    """kvtierctl get with --tokens or --layers outside the session names the range asked for
    and the session's length, on both fetch paths, and writes nothing: `--tokens 150:` past
    the end said "empty or reversed range", and a large B "shape ... has more elements than
    the limit" or "out of memory" (the buffers are sized from the range before the fetch)."""
    L, H, d = 2, 2, 64
    T = 141
    s = sid()
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16")
    k, v = _fill(rng, L, T, H, d, "f16")
    client.append(s, k, v)
    out_k = tmp_path / "k.npy"
    tok = f"is not inside the session's {T} tokens (--tokens A:B with A <= B <= {T})"
    lay = f"is not inside the session's {L} layers (--layers A:B with A <= B <= {L})"
    cases = [(("--tokens", f"{T + 9}:"), f"token range [{T + 9}, end) {tok}"),
             (("--tokens", "0:99999999999"), f"token range [0, 99999999999) {tok}"),
             (("--tokens", f"0:{T + 1}"), f"token range [0, {T + 1}) {tok}"),
             (("--tokens", f"{T + 9}:{T + 20}"), f"token range [{T + 9}, {T + 20}) {tok}"),
             (("--tokens", "10:5"), f"token range [10, 5) {tok}"),
             (("--layers", f"0:{L + 3}"), f"layer range [0, {L + 3}) {lay}"),
             (("--layers", f"{L + 1}:"), f"layer range [{L + 1}, end) {lay}")]
    for args, msg in cases:
        for fetch in ("local", "server"):
            out = _kvtierctl(daemon, "get", s, "--out-k", str(out_k), *args, fetch=fetch)
            assert (out.returncode, out.stdout, out.stderr) == (
                2, "", f"kvtierctl: get {s}: {msg}\n"), (fetch, args)
            assert not out_k.exists()
    # the edges are inside: an empty range at the end, the whole session
    for args in (("--tokens", f"{T}:"), ("--tokens", f"0:{T}"), ("--layers", f"{L}:")):
        out = _kvtierctl(daemon, "get", s, "--out-k", str(out_k), *args)
        assert out.returncode == 0, (args, out.stderr)


def test_kvtierctl_get_range_syntax(client, daemon, sid, rng, tmp_path):
    """kvtierctl get takes --tokens / --layers ranges as decimal A:B only: a sign, blanks,
    hex, an overflow or a layer index past 2^32 - 2 is refused by name (exit 2, nothing
    written). Before: "-1:" read as 2^64 - 1, " 5:" as 5, and --layers 0:4294967298 as 0:2."""
    L, H, d, T = 2, 2, 64, 40
    s = sid()
    client.open_session(s, n_layers=L, n_kv_heads=H, head_dim=d, dtype="f16")
    k, v = _fill(rng, L, T, H, d, "f16")
    client.append(s, k, v)
    out_k = tmp_path / "k.npy"
    tmax, lmax = 2**64 - 2, 2**32 - 2
    for flag, arg, mx in (("--tokens", "-1:", tmax), ("--tokens", " 5:", tmax),
                          ("--tokens", "0x10:", tmax), ("--tokens", "5", tmax),
                          ("--tokens", "1:+3", tmax), ("--tokens", "18446744073709551615:", tmax),
                          ("--tokens", "0:99999999999999999999", tmax),
                          ("--layers", "0:4294967298", lmax), ("--layers", "4294967295:", lmax)):
        out = _kvtierctl(daemon, "get", s, "--out-k", str(out_k), flag, arg)
        assert (out.returncode, out.stdout, out.stderr) == (
            2, "", f'kvtierctl: get {flag} "{arg}": expected A:B, A: or :B with A and B decimal '
            f"numbers <= {mx}\n"), (flag, arg)
        assert not out_k.exists()
    # the forms that stay: A:B, A:, :B, :
    for arg in ("3:7", "3:", ":7", ":"):
        out = _kvtierctl(daemon, "get", s, "--out-k", str(out_k), "--tokens", arg)
        assert out.returncode == 0, (arg, out.stderr)


def test_kvtierctl_number_syntax(client, daemon, sid, rng, tmp_path):
    """kvtierctl's numeric options are decimal digits only: "032" is 32, and a sign, blanks, hex,
    an empty value, trailing text or a value past the limit exit 2 naming the command, the option
    and the limit. Before, strtoul's base 0 read "032" as 26 and "0x10" as 16, and took " 5"."""
    L, H, d, T = 2, 2, 64, 70
    k, v = _fill(rng, L, T, H, d, "f16")
    np.save(tmp_path / "k.npy", k)
    np.save(tmp_path / "v.npy", v)
    kv_args = ("--k", str(tmp_path / "k.npy"), "--v", str(tmp_path / "v.npy"))
    u32, u64 = 2**32 - 1, 2**64 - 1
    s = sid()
    cases = [((), "--timeout-ms", "0x10", ("stats",), u32),
             (("put", s, *kv_args), "--ttl", "+5", (), u32),
             (("put", s, *kv_args), "--ttl", "-1", (), u32),
             (("put", s, *kv_args), "--ttl", " 5", (), u32),
             (("put", s, *kv_args), "--ttl", "5 ", (), u32),
             (("put", s, *kv_args), "--ttl", "", (), u32),
             (("put", s, *kv_args), "--ttl", "12abc", (), u32),
             (("put", s, *kv_args), "--ttl", str(u32 + 1), (), u32),
             (("put", s, *kv_args), "--ttl", "99999999999999999999", (), u32),
             (("put", s, *kv_args), "--group", "0x20", (), u32),
             (("put", s, *kv_args, "--chunk-tokens", "0128"), "--ttl", "x", (), u32),
             (("health",), "--wait-ms", "1e3", (), u32),
             (("demo",), "--tokens", "0x800", (), u32),
             (("bench", "--key-bits", "04"), "--tokens", "-1", (), u32),
             (("demo",), "--seed", "-1", (), u64),
             (("demo",), "--seed", str(u64 + 1), (), u64)]
    for before, flag, arg, after, mx in cases:
        out = _kvtierctl(daemon, *before, flag, arg, *after)
        where = f"{before[0]} {flag}" if before else flag
        assert (out.returncode, out.stdout, out.stderr) == (
            2, "", f'kvtierctl: {where} "{arg}": expected a decimal number <= {mx}\n'), \
            (before, flag, arg, out.stderr)
    assert client.list_sessions(s) == []
    # leading zeros are decimal, the limit itself is in
    out = _kvtierctl(daemon, "put", s, *kv_args, "--scheme", "oscar", "--key-bits", "02",
                     "--value-bits", "02", "--group", "032", "--chunk-tokens", "064",
                     "--sinks", "04", "--ttl", "0600")
    assert out.returncode == 0, out.stderr
    info = client.stat(s)
    c = info.codec
    assert (c["group"], c["chunk_tokens"], c["n_sinks"], info.ttl_seconds) == (32, 64, 4, 600), \
        info
    out = _kvtierctl(daemon, "--timeout-ms", str(u32), "health")
    assert out.returncode == 0, out.stderr


def test_prefetch(client, sid):
    s = sid()
    info = client.open_session(s, **SHAPE, dtype="f16", codec=dict(scheme="none"))
    tier = client.prefetch(s)
    assert tier and tier == client.stat(s).tier, (tier, info.tier)
    with pytest.raises(kvtier.KvtierError) as e:
        client.prefetch(s + "-none")
    assert code_of(e) == grpc.StatusCode.NOT_FOUND

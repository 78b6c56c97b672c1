"""KV-cache backends that keep the worker's cache in a real kvtierd, through the Python client.

- KvtierdFetchBackend (the Fetch path): commit() appends the block's post-RoPE K/V for all layers
  to the session (one Append); attend() runs attention here, in the worker, over the committed
  tokens as Fetch returns them (sealed chunks decoded by the daemon's codec, the tail exact) plus
  the block's own exact tokens. Sealed chunks never change, so what was fetched of them is kept
  and only the tokens after the last sealed one seen are fetched again (once per block, all
  layers in one Fetch, at layer 0).
- KvtierdAttendBackend (the Attend path): one token per step (max_block 1). attend() sends the
  layer's query with the token's K/V as new_k/new_v; the daemon attends over the session plus
  that staged token (the token sees itself, like causal self-attention) and the token joins the
  session once all layers have received it. commit() only checks that it did.

Both open the session with a codec dict (scheme, key_bits, value_bits, group, chunk_tokens,
n_sinks, pin_detect_ratio, pin_detect_max, rotate_v; absent keys take the daemon's defaults)
and a wire dtype (f32 or f16). KvtierDaemon starts a private kvtierd on a unix socket in a
temporary directory (KVTIERD names the binary, default <repo>/build/daemon/kvtierd).
"""
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

here = Path(__file__).resolve().parent
repo = here.parent.parent
sys.path.insert(0, str(repo / "client" / "python"))
if not os.environ.get("KVTIER_PYGEN_DIR") and (repo / "build" / "python").is_dir():
    os.environ["KVTIER_PYGEN_DIR"] = str(repo / "build" / "python")
import kvtier  # noqa: E402

from kvcache import FetchBackend, KVBackend  # noqa: E402

NP_DTYPE = {"f32": np.float32, "f16": np.float16}


def kvtierd_binary():
    b = os.environ.get("KVTIERD") or str(repo / "build" / "daemon" / "kvtierd")
    if not Path(b).is_file():
        raise FileNotFoundError(f"kvtierd binary {b!r} not found (build the tree or set KVTIERD)")
    return b


class KvtierDaemon:
    """A kvtierd child process on a unix socket in a private temporary directory."""

    def __init__(self, binary=None, extra_args=()):
        self.tmp = tempfile.TemporaryDirectory(prefix="kvtier-rm-")
        wd = Path(self.tmp.name)
        self.socket = wd / "kvtierd.sock"
        self.log_path = wd / "kvtierd.log"
        self.args = [binary or kvtierd_binary(), f"--socket={self.socket}", *extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=wd)
        self.target = f"unix:{self.socket}"
        c = kvtier.Client(self.target, timeout=5)
        try:
            c.wait_ready(30.0)
        except kvtier.KvtierError:
            raise RuntimeError(f"kvtierd not ready (exit status {self.proc.poll()}); log:\n"
                               f"{self.log_path.read_text(errors='replace')[-4000:]}") from None
        finally:
            c.close()

    def client(self):
        return kvtier.Client(self.target, timeout=120)

    def stop(self):
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        self._log.close()
        self.tmp.cleanup()
        return rc


class _Session:
    """One kvtierd session per cache (per context); dropped on close()."""

    def __init__(self, client, n_layers, n_kv_heads, head_dim, dtype, codec, tag):
        self.client = client
        self.sid = f"rm-{tag}-{uuid.uuid4().hex[:10]}"
        self.dtype = dtype
        self.info = client.open_session(self.sid, n_layers, n_kv_heads, head_dim, dtype=dtype,
                                        codec=codec)
        assert self.info.created, self.info
        self.last_info = None

    def stat(self):
        self.last_info = self.client.stat(self.sid)
        return self.last_info

    def drop(self):
        if self.sid is not None:
            self.stat()
            self.client.drop(self.sid)
            self.sid = None


class KvtierdFetchBackend(FetchBackend):
    def __init__(self, client, n_layers, n_kv_heads, head_dim, codec=None, dtype="f32",
                 capacity=1024, on_close=None):
        super().__init__(n_layers, n_kv_heads, head_dim)
        self.s = _Session(client, n_layers, n_kv_heads, head_dim, dtype, codec, "fetch")
        self.np_dtype = np.dtype(NP_DTYPE[dtype])
        c = self.s.info.codec or {}
        self.chunk_tokens = int(c.get("chunk_tokens") or 0)
        # Blocks never straddle a seal (kvcache.py docstring), for every scheme, so the exact
        # row runs exactly the same block schedule as the lossy ones.
        self.seal_tokens = self.chunk_tokens or None
        # A recent window W (codec recent_exact_tokens, kvt_seq.h): the daemon seals the oldest
        # B tokens only when more than W are unsealed, so the view of a query at position t
        # changes at t = W + 1 + k * B instead of at multiples of B.
        self.recent_exact = int(c.get("recent_exact_tokens") or 0)
        self.sealed = 0           # tokens in sealed chunks (decoded values final)
        self.k = np.zeros((n_layers, capacity, n_kv_heads, head_dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.valid = 0            # tokens of self.k/v that are final (sealed when fetched)
        self.fetched_upto = -1    # n_tokens at the last fetch (per block)
        self.fetched_tokens = 0   # tokens moved by Fetch, for the record
        self.on_close = on_close

    def round_kv(self, x):
        return x if self.np_dtype == np.float32 else x.astype(self.np_dtype).astype(np.float32)

    def max_block(self, pos):
        w, b = self.recent_exact, self.seal_tokens
        if not w or not b:
            return super().max_block(pos)
        first = w + 1  # the first length at which a chunk is sealed
        return first - pos if pos < first else b - (pos - first) % b

    def _grow(self, need):
        cap = self.k.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            a = np.zeros((old.shape[0], new) + old.shape[2:], np.float32)
            a[:, :cap] = old
            setattr(self, name, a)

    def fetch(self, layer):
        t = self.n_tokens
        if self.fetched_upto != t:
            if self.valid < t:
                k, v = self.s.client.fetch(self.s.sid, tokens=(self.valid, t))
                self._grow(t)
                self.k[:, self.valid:t] = k
                self.v[:, self.valid:t] = v
                self.fetched_tokens += t - self.valid
            # Only tokens sealed at this point are final; the tail is fetched again next time.
            self.valid = max(self.valid, min(self.sealed, t))
            self.fetched_upto = t
        return self.k[layer, :t], self.v[layer, :t]

    def commit(self, k, v):
        n = k.shape[1]
        assert k.shape == (self.n_layers, n, self.n_kv_heads, self.head_dim), k.shape
        r = self.s.client.append(self.s.sid, np.ascontiguousarray(k.astype(self.np_dtype)),
                                 np.ascontiguousarray(v.astype(self.np_dtype)),
                                 token_begin=self.n_tokens)
        self.n_tokens += n
        assert r["n_tokens"] == self.n_tokens, (r, self.n_tokens)
        self.sealed += r["chunks_sealed"] * self.chunk_tokens

    def reset(self):
        raise NotImplementedError("one backend per context")

    def close(self):
        self.s.drop()
        if self.on_close:
            self.on_close(self)


class KvtierdAttendBackend(KVBackend):
    def __init__(self, client, n_layers, n_kv_heads, head_dim, codec=None, dtype="f32",
                 on_close=None):
        super().__init__(n_layers, n_kv_heads, head_dim)
        self.s = _Session(client, n_layers, n_kv_heads, head_dim, dtype, codec, "attend")
        self.np_dtype = np.dtype(NP_DTYPE[dtype])
        self.on_close = on_close

    def max_block(self, pos):
        return 1

    def attend(self, layer, q, k_new, v_new, scale):
        assert q.shape[0] == 1 and k_new.shape[0] == 1, (q.shape, k_new.shape)
        (o, n_att), = self.s.client.attend([dict(
            session_id=self.s.sid, layer=layer, q=q[0], softmax_scale=scale,
            new_k=np.ascontiguousarray(k_new[0].astype(self.np_dtype)),
            new_v=np.ascontiguousarray(v_new[0].astype(self.np_dtype)))], with_counts=True)
        # The staged token attends to itself: committed tokens + 1.
        assert n_att == self.n_tokens + 1, (n_att, self.n_tokens, layer)
        return o[None]

    def commit(self, k, v):
        assert k.shape[1] == 1
        self.n_tokens += 1

    def reset(self):
        raise NotImplementedError("one backend per context")

    def close(self):
        info = self.s.stat()
        assert info.n_tokens == self.n_tokens, (info.n_tokens, self.n_tokens)
        self.s.drop()
        if self.on_close:
            self.on_close(self)

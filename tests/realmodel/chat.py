#!/usr/bin/env python3
"""A multi-turn chat with SmolLM2-135M-Instruct whose KV cache lives in kvtierd (issue 9's
quick-start demo).

Each turn is run by a worker that holds no KV cache of its own: the conversation's post-RoPE K/V
for all 30 layers is a kvtierd session. A turn prefills only its own new tokens (in blocks, the
Fetch path: attention in the worker over the session as Fetch returns it, sealed chunks decoded
by the daemon's codec, then one Append per block), then decodes greedily, one token at a time,
through the Attend path (the daemon attends over the session plus the staged token, which then
joins the session) or, with --decode fetch, through the Fetch path as well. A later turn can run
in a NEW process: it attaches to the session with StatSession (shape, dtype, codec, tokens,
sealed chunks) and continues from the cache the daemon holds; the first turn's tokens are never
run through the model again.

The prompt follows the chat template stored in the GGUF (tokenizer.chat_template; SmolLM2 uses
ChatML: <|im_start|>role\\n...<|im_end|>\\n, a default system prompt when the conversation has
none, and <|im_start|>assistant\\n as the generation prompt). Generation stops at <|im_end|> or
EOS or after --max-new tokens. The stop token is not run through the model, so a session always
ends inside an open assistant message, and the next turn's text starts by closing it
("<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n").

Usage (a kvtierd must serve the target; the codec is the daemon's default unless --codec-json):
  chat.py --target unix:run/kvtierd.sock turn --session S --state S.json --user "..."
  chat.py --target unix:run/kvtierd.sock turn --session S --state S.json --user "..." \\
          --recompute --drop
The state file keeps the conversation's token ids (to print the text and to time recomputing
them); the KV cache itself is only in kvtierd. --recompute also times a prefill of the whole
transcript in-process with no cache (what a worker without kvtierd would have to do) and prints
the time saved. Each turn prints one JSON line (prefix "CHAT_JSON ") after the text.
"""
import argparse
import json
import os
import re
import sys
import time
import uuid

import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from kvcache import ExactBackend, FetchBackend  # noqa: E402
from kvtierd_backend import NP_DTYPE, KvtierdFetchBackend, kvtier  # noqa: E402
from smollm import SmolLM, default_model_path  # noqa: E402


# The quick start's conversation: a passage long enough that the first turn seals chunks of the
# daemon's default codec (B = 128 tokens), and a follow-up question about it.
DEMO_PASSAGE = (
    "Honey bees live in colonies of tens of thousands of workers, one queen and a few hundred "
    "drones. A worker that finds a good patch of flowers comes back to the hive and tells her "
    "sisters where it is with a dance on the vertical comb. For flowers close to the hive she "
    "runs in small circles, the round dance, which says only that food is near. For flowers "
    "farther away she performs the waggle dance: she runs straight ahead while shaking her "
    "abdomen, then circles back to the start, alternating left and right. The angle of the "
    "straight run against the vertical gives the direction of the flowers relative to the sun, "
    "and the duration of the waggle encodes the distance, roughly one second of waggling for "
    "each kilometre. Other bees follow the dancer, smell the scent of the flowers on her body, "
    "taste the nectar she offers, and then fly out on their own. A rich source makes the dancer "
    "repeat her dance many times, so more foragers are recruited to the best patches. Scouts use "
    "a similar dance when the colony swarms and needs a new home, and the swarm leaves only when "
    "enough scouts agree on the same site.")
DEMO_TURNS = (
    "Read this passage about honey bees.\n\n" + DEMO_PASSAGE +
    "\n\nIn two sentences: how do bees tell each other where the flowers are?",
    "How does the waggle dance tell the other bees how far away the flowers are?",
)


# -- the chat template: read from the GGUF header ----------------------------------------------

# GGUF metadata value types (the GGUF spec): fixed sizes of the scalar ones.
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata_string(path, key):
    """One string value of a GGUF file's metadata, or None. Reads the header only, skipping the
    other values (the token and merge arrays) by their lengths: the gguf package's reader parses
    the whole file, which takes seconds to tens of seconds on a busy machine."""
    import mmap
    import struct
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} (64-bit lengths need >= 2)")
        pos = 24

        def u32(p):
            return struct.unpack_from("<I", mm, p)[0]

        def u64(p):
            return struct.unpack_from("<Q", mm, p)[0]

        def skip(p, vtype):
            if vtype in _GGUF_SCALAR:
                return p + _GGUF_SCALAR[vtype]
            if vtype == _GGUF_STRING:
                return p + 8 + u64(p)
            if vtype == _GGUF_ARRAY:
                itype, count = u32(p), u64(p + 4)
                p += 12
                if itype in _GGUF_SCALAR:
                    return p + count * _GGUF_SCALAR[itype]
                for _ in range(count):
                    p = skip(p, itype)
                return p
            raise ValueError(f"{path}: unknown GGUF value type {vtype} at offset {p}")

        for _ in range(n_kv):
            klen = u64(pos)
            name = mm[pos + 8:pos + 8 + klen].decode("utf-8")
            pos += 8 + klen
            vtype = u32(pos)
            pos += 4
            if name == key:
                if vtype != _GGUF_STRING:
                    raise ValueError(f"{path}: {key} has GGUF type {vtype}, not a string")
                n = u64(pos)
                return mm[pos + 8:pos + 8 + n].decode("utf-8")
            pos = skip(pos, vtype)
    return None


# -- ChatML, rendered here --------------------------------------------------------------------

class ChatTemplate:
    """The GGUF's chat template, for the ChatML family only (SmolLM2, Qwen, ...). The file holds
    a Jinja template and the venv has no Jinja, so we recognise ChatML and render it here; any
    other template is refused rather than guessed."""

    def __init__(self, template):
        need = ("<|im_start|>", "<|im_end|>", "message['role']", "message['content']")
        if not template or not all(s in template for s in need):
            raise ValueError("tokenizer.chat_template is not a ChatML template "
                             f"(needs {', '.join(need)}); this worker renders ChatML only")
        self.template = template
        # The system prompt the template inserts when the first message is not a system one.
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        self.default_system = m.group(1) if m else None

    @classmethod
    def from_gguf(cls, path):
        t = gguf_metadata_string(path, "tokenizer.chat_template")
        if t is None:
            raise ValueError(f"{path}: no tokenizer.chat_template in the GGUF metadata")
        return cls(t)

    def render(self, messages, add_generation_prompt=True, first=True):
        """The template's text for messages (dicts role, content). first=False renders messages
        that continue a conversation already rendered (no default system prompt)."""
        out = []
        if first and self.default_system is not None and (
                not messages or messages[0]["role"] != "system"):
            out.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for msg in messages:
            out.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def continuation(self, user):
        """The text of a later turn: close the open assistant message, then the user message
        and the generation prompt (the same tokens the whole conversation rendered at once has
        there, because control tokens split the text before BPE)."""
        return "<|im_end|>\n" + self.render([dict(role="user", content=user)], first=False)


# -- the KV cache: a named kvtierd session --------------------------------------------------

class _Attached:
    """What KvtierdFetchBackend's fetch/commit use of its session: client and id."""

    def __init__(self, client, sid, info):
        self.client, self.sid, self.info = client, sid, info


class KvtierdChatCache(KvtierdFetchBackend):
    """A named kvtierd session as the worker's KV cache, created or attached to.

    Prefill blocks take the Fetch path (KvtierdFetchBackend: attention here over the session as
    Fetch returns it, one Append per block). With attend_decode, a one-token block (decoding)
    takes the Attend path instead: each layer's query goes to the daemon with the token's K/V as
    new_k/new_v, and the daemon adds the token to the session once all layers got it, so commit()
    appends nothing for it. Counters: tokens_appended, tokens_attended, fetched_tokens,
    attend_calls."""

    def __init__(self, client, n_layers, n_kv_heads, head_dim, session_id, codec=None,
                 dtype="f16", attend_decode=True, capacity=1024):
        FetchBackend.__init__(self, n_layers, n_kv_heads, head_dim)
        try:
            info = client.stat(session_id)
            self.created = False
        except kvtier.KvtierError as e:
            if e.code.name != "NOT_FOUND":
                raise
            info = client.open_session(session_id, n_layers, n_kv_heads, head_dim, dtype=dtype,
                                       codec=codec)
            self.created = True
        shape = (info.n_layers, info.n_kv_heads, info.head_dim)
        if shape != (n_layers, n_kv_heads, head_dim):
            raise ValueError(f"session {session_id!r} has shape {shape}, the model needs "
                             f"{(n_layers, n_kv_heads, head_dim)}")
        self.s = _Attached(client, session_id, info)
        self.np_dtype = np.dtype(NP_DTYPE[info.dtype])
        self.chunk_tokens = int((info.codec or {}).get("chunk_tokens") or 0)
        self.seal_tokens = self.chunk_tokens or None
        # A recent window W (codec recent_exact_tokens, where the daemon has it) moves the
        # seal points; KvtierdFetchBackend's max_block reads this.
        self.recent_exact = int((info.codec or {}).get("recent_exact_tokens") or 0)
        self.n_tokens = int(info.n_tokens or 0)
        # Sealed chunks never change: what is fetched of them is kept (KvtierdFetchBackend).
        self.sealed = int(info.n_chunks or 0) * self.chunk_tokens
        self.k = np.zeros((n_layers, max(capacity, self.n_tokens + 256), n_kv_heads, head_dim),
                          np.float32)
        self.v = np.zeros_like(self.k)
        self.valid = 0
        self.fetched_upto = -1
        self.fetched_tokens = 0
        self.on_close = None
        self.attend_decode = attend_decode
        self._staged = False
        self.tokens_appended = 0
        self.tokens_attended = 0
        self.attend_calls = 0

    @property
    def session_id(self):
        return self.s.sid

    def attend(self, layer, q, k_new, v_new, scale):
        if not (self.attend_decode and q.shape[0] == 1):
            return super().attend(layer, q, k_new, v_new, scale)
        (o, n_att), = self.s.client.attend([dict(
            session_id=self.s.sid, layer=layer, q=q[0], softmax_scale=scale,
            new_k=np.ascontiguousarray(k_new[0].astype(self.np_dtype)),
            new_v=np.ascontiguousarray(v_new[0].astype(self.np_dtype)))], with_counts=True)
        self.attend_calls += 1
        # The staged token attends to the session and to itself.
        if n_att != self.n_tokens + 1:
            raise RuntimeError(f"Attend saw {n_att} tokens at layer {layer}, expected "
                               f"{self.n_tokens + 1}")
        self._staged = True
        return o[None]

    def commit(self, k, v):
        if self._staged:
            # Every layer staged the token through Attend: the daemon holds it now. The
            # sealed count is left as it was (a lower bound), so a later fetch re-reads at most
            # a chunk that sealed meanwhile.
            assert k.shape[1] == 1, k.shape
            self._staged = False
            self.n_tokens += 1
            self.tokens_attended += 1
            return
        super().commit(k, v)
        self.tokens_appended += k.shape[1]

    def stat(self):
        return self.s.client.stat(self.s.sid)

    def drop(self):
        return self.s.client.drop(self.s.sid)

    def close(self):
        pass


# -- greedy decoding with a record ------------------------------------------------------------

def greedy(model, prompt_ids, cache, max_new, stop_ids, keep_logits=False):
    """Prefill prompt_ids (blocks cut at the cache's seal boundaries), then decode greedily until
    a stop id or max_new tokens. Every generated token except a stop token is run through the
    model, so the cache ends holding prompt + generated. Returns dict: ids (generated, without
    the stop token), stopped, tokens_run (tokens this call ran through the model), prefill_s
    (until the first token's logits), first_id (the first greedy choice), decode_s, logits (with
    keep_logits: the logits each choice was made from, in order)."""
    if not len(prompt_ids):
        raise ValueError("greedy needs at least one prompt token")
    t0 = time.perf_counter()
    lg = model.forward(prompt_ids, cache)[-1]
    t1 = time.perf_counter()
    run = len(prompt_ids)
    first_id = int(np.argmax(lg))
    out, logits, stopped = [], [], False
    for _ in range(max_new):
        if keep_logits:
            logits.append(lg.copy())
        t = int(np.argmax(lg))
        if t in stop_ids:
            stopped = True
            break
        out.append(t)
        lg = model.forward_block([t], cache)[-1]
        run += 1
    t2 = time.perf_counter()
    return dict(ids=out, stopped=stopped, tokens_run=run, prefill_s=t1 - t0, decode_s=t2 - t1,
                logits=logits, first_id=first_id)


class ChatWorker:
    """One worker: a model, the template and a KV cache (a kvtierd session). transcript is the
    list of token ids the session holds (a fresh worker on an existing session gets it from the
    state file; it must match the session's token count)."""

    def __init__(self, model, template, cache, transcript=()):
        self.m, self.tpl, self.cache = model, template, cache
        self.transcript = list(transcript)
        if len(self.transcript) != cache.n_tokens:
            raise ValueError(f"the transcript has {len(self.transcript)} tokens, session "
                             f"{cache.session_id!r} holds {cache.n_tokens}")
        tok = model.tokenizer
        self.im_end = tok.encode("<|im_end|>", special=True)
        assert len(self.im_end) == 1, self.im_end
        self.stop_ids = {self.im_end[0], tok.eos_id}

    def prompt_ids(self, user, system=None):
        if self.cache.n_tokens == 0:
            msgs = ([dict(role="system", content=system)] if system else []) + \
                   [dict(role="user", content=user)]
            text = self.tpl.render(msgs)
        else:
            text = self.tpl.continuation(user)
        return self.m.tokenizer.encode(text, special=True)

    def turn(self, user, max_new=40, system=None, keep_logits=False):
        ids = self.prompt_ids(user, system)
        before = self.cache.n_tokens
        r = greedy(self.m, ids, self.cache, max_new, self.stop_ids, keep_logits)
        if self.cache.n_tokens != before + r["tokens_run"]:
            raise RuntimeError(f"session grew by {self.cache.n_tokens - before} tokens, the "
                               f"worker ran {r['tokens_run']}")
        r.update(prompt_ids=ids, prefix_tokens=before,
                 text=self.m.tokenizer.decode(r["ids"], special=False))
        self.transcript += ids + r["ids"]
        return r


def recompute(model, ids, max_new, stop_ids, dtype, keep_logits=False, prefill_only=False):
    """What a worker without kvtierd does for the same turn: prefill the whole transcript in an
    in-process exact cache (K/V rounded to the session's dtype, as kvtierd gives them back),
    then decode. Returns greedy()'s dict (prefill_only: max_new 0)."""
    m = model
    cache = ExactBackend(m.n_layers, m.n_kv_heads, m.head_dim, len(ids) + max_new + 8,
                         dtype=NP_DTYPE[dtype])
    return greedy(m, ids, cache, 0 if prefill_only else max_new, stop_ids, keep_logits)


def shorten(text, width=240):
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    return f"{flat[:110]} ... {flat[-(width - 130):]} [{len(text)} chars]"


def compression(info):
    d = dict(n_tokens=info.n_tokens, n_layers=info.n_layers, sealed_chunks=info.n_chunks,
             tail_tokens=info.tail_tokens, bytes_held=info.bytes_held, f16_bytes=info.logical_bytes,
             bits_per_element=info.bits_per_element, dtype=info.dtype, codec=info.codec)
    if info.bytes_held:
        d["ratio"] = info.logical_bytes / info.bytes_held
    return d


def compression_line(c):
    kib = 1024.0
    s = (f"kvtierd holds {c['n_tokens']} tokens x {c['n_layers']} layers in "
         f"{c['bytes_held'] / kib:.1f} KiB vs {c['f16_bytes'] / kib:.1f} KiB as f16 K+V")
    if c.get("ratio"):
        s += f" ({c['ratio']:.2f}x smaller)"
    bpe = c["bits_per_element"] or 0
    s += (f"; {c['sealed_chunks']} sealed chunk(s) at {bpe:.3f} bits/elem"
          + (f" ({16 / bpe:.1f}x below f16)" if bpe else "")
          + f", {c['tail_tokens']} tail tokens exact ({c['dtype']}); codec {codec_str(c['codec'])}")
    return s


def codec_str(codec):
    """The codec dict SessionInfo reports, compactly (every key it has, none assumed)."""
    return " ".join(f"{k}={v}" for k, v in (codec or {}).items()) or "(not reported)"


# -- command line -----------------------------------------------------------------------------

def cmd_turn(a):
    t_start = time.perf_counter()
    state = {}
    if a.state and os.path.exists(a.state):
        with open(a.state) as f:
            state = json.load(f)
        if state.get("session") != a.session:
            sys.exit(f"chat: {a.state} belongs to session {state.get('session')!r}, "
                     f"not {a.session!r}")
    m = SmolLM(a.model or default_model_path())
    tpl = ChatTemplate.from_gguf(a.model or default_model_path())
    t_load = time.perf_counter() - t_start
    codec = json.loads(a.codec_json) if a.codec_json else None
    with kvtier.Client(a.target, timeout=120) as c:
        cache = KvtierdChatCache(c, m.n_layers, m.n_kv_heads, m.head_dim, a.session, codec=codec,
                                 dtype=a.dtype, attend_decode=(a.decode == "attend"))
        if cache.created and state.get("transcript"):
            sys.exit(f"chat: session {a.session!r} is new but {a.state} holds a conversation")
        w = ChatWorker(m, tpl, cache, state.get("transcript", ()))
        prefix = list(w.transcript)
        r = w.turn(a.user, a.max_new, system=a.system)
        info = cache.stat()
        comp = compression(info)
        n_turn = len(state.get("turns", [])) + 1
        print(f"\n[turn {n_turn}, pid {os.getpid()}, session {a.session}: "
              f"{'created' if cache.created else 'attached to'} it, "
              f"{r['prefix_tokens']} tokens already in kvtierd]")
        print(f"user> {shorten(a.user)}")
        print(f"assistant> {r['text'].strip()}" + ("" if r["stopped"] else "  [max-new reached]"))
        print(f"  ran {r['tokens_run']} tokens through the model ({len(r['prompt_ids'])} prompt + "
              f"{len(r['ids'])} generated); prefill {r['prefill_s']:.2f} s, decode "
              f"{r['decode_s']:.2f} s ({len(r['ids'])} tokens; "
              f"{'Attend: daemon-side attention' if a.decode == 'attend' else 'Fetch path'})")
        print("  " + compression_line(comp))
        out = dict(turn=n_turn, pid=os.getpid(), session=a.session, created=cache.created,
                   prefix_tokens=r["prefix_tokens"], prompt_tokens=len(r["prompt_ids"]),
                   generated_tokens=len(r["ids"]), stopped=r["stopped"],
                   tokens_run=r["tokens_run"], prefill_s=round(r["prefill_s"], 3),
                   decode_s=round(r["decode_s"], 3), model_load_s=round(t_load, 2),
                   fetched_tokens=cache.fetched_tokens, appended_tokens=cache.tokens_appended,
                   attend_tokens=cache.tokens_attended, attend_calls=cache.attend_calls,
                   text=r["text"], compression=comp)
        if a.recompute and r["prefix_tokens"]:
            full = prefix + r["prompt_ids"]
            rr = recompute(m, full, 0, w.stop_ids, info.dtype, prefill_only=True)
            saved = rr["prefill_s"] - r["prefill_s"]
            print(f"  time to first token: {r['prefill_s']:.2f} s continuing from kvtierd "
                  f"({len(r['prompt_ids'])} new tokens; the {r['prefix_tokens']}-token prefix "
                  f"fetched, not recomputed) vs {rr['prefill_s']:.2f} s recomputing the prefix "
                  f"in-process ({len(full)} tokens): {saved:.2f} s saved "
                  f"({rr['prefill_s'] / max(r['prefill_s'], 1e-9):.1f}x); first token "
                  f"{'the same' if rr['first_id'] == r['first_id'] else 'different'} "
                  f"({m.tokenizer.decode([r['first_id']])!r} vs "
                  f"{m.tokenizer.decode([rr['first_id']])!r})")
            out.update(recompute_prefill_tokens=len(full),
                       recompute_prefill_s=round(rr["prefill_s"], 3), saved_s=round(saved, 3),
                       recompute_first_token_same=rr["first_id"] == r["first_id"])
        if a.drop:
            c.drop(a.session)
            out["dropped"] = True
        print("CHAT_JSON " + json.dumps(out), flush=True)
    state.update(session=a.session, transcript=w.transcript,
                 turns=state.get("turns", []) + [dict(user=a.user, assistant=r["text"])])
    if a.state and not a.drop:
        tmp = a.state + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, a.state)
    elif a.state and a.drop and os.path.exists(a.state):
        os.remove(a.state)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=os.environ.get("KVTIER_TARGET", "unix:run/kvtierd.sock"),
                    help="kvtierd address (unix:PATH or host:port)")
    ap.add_argument("--model", default=None, help="the .gguf (default: fetch_model.sh's path)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("turn", help="one chat turn (creates the session or continues it)")
    t.add_argument("--session", default=None, help="session id (default: a new one)")
    t.add_argument("--state", default=None, help="JSON file with the conversation's token ids")
    u = t.add_mutually_exclusive_group(required=True)
    u.add_argument("--user", help="the user's message")
    u.add_argument("--demo", type=int, choices=range(1, len(DEMO_TURNS) + 1),
                   help="the user's message of the built-in demo conversation, turn N")
    t.add_argument("--system", default=None, help="system prompt of a first turn")
    t.add_argument("--max-new", type=int, default=40)
    t.add_argument("--decode", choices=("attend", "fetch"), default="attend",
                   help="decode attention in the daemon (Attend) or in the worker (Fetch)")
    t.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="new session's dtype")
    t.add_argument("--codec-json", default=None,
                   help="codec dict for a new session (default: the daemon's default codec)")
    t.add_argument("--recompute", action="store_true",
                   help="also time a prefill of the whole transcript with no cache")
    t.add_argument("--drop", action="store_true", help="drop the session after the turn")
    a = ap.parse_args()
    if a.demo:
        a.user = DEMO_TURNS[a.demo - 1]
    if a.session is None:
        a.session = f"chat-{uuid.uuid4().hex[:10]}"
    cmd_turn(a)


if __name__ == "__main__":
    main()

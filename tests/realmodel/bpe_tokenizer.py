"""GPT-2 style byte-level BPE tokenizer built from a GGUF file's metadata.

SmolLM2's GGUF declares tokenizer.ggml.model = "gpt2" and tokenizer.ggml.pre = "smollm": the text
is first split so that every numeric character (Unicode category N*) stands alone, then each
piece is split by the GPT-2 pattern
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
(implemented by hand below, because Python's re has no \\p{..} classes), each piece's UTF-8 bytes
are mapped to printable characters with GPT-2's byte-to-unicode table, and the merges from
tokenizer.ggml.merges are applied lowest rank first. Control tokens (token_type 3, e.g.
<|im_start|>) are recognised in the text only when special=True, as llama.cpp does.
"""
import unicodedata

# Whitespace as llama.cpp's unicode tables define \s (not str.isspace, which also counts the
# ASCII separators 0x1C..0x1F).
_WS = set([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F,
           0x205F, 0x3000] + list(range(0x2000, 0x200B)))

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _cls(ch):
    """'W' whitespace, 'L' letter, 'N' number, 'O' anything else."""
    if ord(ch) in _WS:
        return "W"
    cat = unicodedata.category(ch)
    if cat[0] == "L":
        return "L"
    if cat[0] == "N":
        return "N"
    return "O"


def split_digits(text):
    """The \\p{N} pre-split: every numeric character becomes its own piece."""
    out, start = [], 0
    for i, ch in enumerate(text):
        if _cls(ch) == "N":
            if i > start:
                out.append(text[start:i])
            out.append(ch)
            start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


def split_gpt2(text):
    """The GPT-2 pre-tokenizer pattern, matched left to right like the regex engine would."""
    out = []
    n = len(text)
    cls = [_cls(c) for c in text]
    pos = 0
    while pos < n:
        c = text[pos]
        # 's 't 'm 'd 're 've 'll (case-sensitive, as in the pattern)
        if c == "'" and pos + 1 < n:
            c1 = text[pos + 1]
            if c1 in "stmd":
                out.append(text[pos:pos + 2])
                pos += 2
                continue
            if pos + 2 < n and text[pos + 1:pos + 3] in ("re", "ve", "ll"):
                out.append(text[pos:pos + 3])
                pos += 3
                continue
        # the class that decides among " ?X+" alternatives: that of the char after an optional space
        if c == " " and pos + 1 < n:
            k2 = cls[pos + 1]
            lead = 1
        else:
            k2 = cls[pos]
            lead = 0
        if c == " " and pos + 1 >= n:
            k2, lead = "W", 0
        if k2 in ("L", "N") or (k2 == "O" and not (lead == 0 and cls[pos] == "W")):
            end = pos + lead
            while end < n and cls[end] == k2:
                end += 1
            out.append(text[pos:end])
            pos = end
            continue
        # whitespace: \s+(?!\S) then \s+
        end = pos
        while end < n and cls[end] == "W":
            end += 1
        if end - pos > 1 and end < n:
            end -= 1  # leave the last space to prefix the next word
        out.append(text[pos:end])
        pos = end
    return out


def _bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class BPETokenizer:
    def __init__(self, tokens, token_types, merges, bos_id=None, eos_id=None, add_bos=False):
        self.tokens = list(tokens)
        self.token_types = list(token_types)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ", 1)
            self.ranks[(a, b)] = r
        self.byte_enc = _bytes_to_unicode()
        self.byte_dec = {v: k for k, v in self.byte_enc.items()}
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        # Longest first so that a special token that is a prefix of another never wins.
        self.specials = sorted(
            [(t, i) for i, t in enumerate(self.tokens)
             if self.token_types[i] in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)],
            key=lambda x: -len(x[0]))
        self._cache = {}

    @classmethod
    def from_gguf(cls, reader):
        f = reader.fields

        def get(name, default=None):
            return f[name].contents() if name in f else default
        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in ("smollm",):
            # Other pre-tokenizers use other split patterns; refuse rather than tokenize wrongly.
            raise ValueError(f"tokenizer.ggml.pre is {pre!r}; only 'smollm' is implemented")
        return cls(get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"),
                   get("tokenizer.ggml.merges"), get("tokenizer.ggml.bos_token_id"),
                   get("tokenizer.ggml.eos_token_id"), bool(get("tokenizer.ggml.add_bos_token", False)))

    def _bpe(self, word):
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        syms = list(word)
        ranks = self.ranks
        while len(syms) > 1:
            best, best_r = None, None
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_r is None or r < best_r):
                    best, best_r = (syms[i], syms[i + 1]), r
            if best is None:
                break
            merged, i = [], 0
            while i < len(syms):
                if i < len(syms) - 1 and syms[i] == best[0] and syms[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        ids = []
        for s in syms:
            tid = self.vocab.get(s)
            if tid is not None:
                ids.append(tid)
            else:  # cannot happen with a complete byte alphabet; fall back to single bytes
                ids.extend(self.vocab[ch] for ch in s)
        self._cache[word] = ids
        return ids

    def _encode_plain(self, text, ids):
        for piece in split_digits(text):
            for word in split_gpt2(piece):
                mapped = "".join(self.byte_enc[b] for b in word.encode("utf-8"))
                ids.extend(self._bpe(mapped))

    def encode(self, text, special=False, add_bos=None):
        ids = []
        if add_bos if add_bos is not None else self.add_bos:
            ids.append(self.bos_id)
        if not special:
            self._encode_plain(text, ids)
            return ids
        pos, start = 0, 0
        while pos < len(text):
            for s, tid in self.specials:
                if text.startswith(s, pos):
                    if pos > start:
                        self._encode_plain(text[start:pos], ids)
                    ids.append(tid)
                    pos += len(s)
                    start = pos
                    break
            else:
                pos += 1
        if start < len(text):
            self._encode_plain(text[start:], ids)
        return ids

    def decode_bytes(self, ids, special=True):
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            if self.token_types[i] == TOKEN_TYPE_NORMAL:
                out.extend(self.byte_dec[ch] for ch in t)
            elif special:
                out.extend(t.encode("utf-8"))
        return bytes(out)

    def decode(self, ids, special=True):
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

"""GPT-2-style byte-level BPE (vocab.json + merges.txt), as used by the original English GLM models."""

from __future__ import annotations

import os

from glm_jax.tokenizers.base import GLMTokenizer, as_id_list, read_json_object, special_pattern, split_special

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet vocab.json is written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class GPT2BPETokenizer(GLMTokenizer):
    """Byte-level BPE with GPT-2's pair-rank merging; added tokens (added_tokens.json, <|endoftext|>) are cut
    out of the text. No chat format. With a [CLS] token, encode(..., add_special_tokens=True) gives
    [CLS] text <|endoftext|> like the original GLM tokenizer.
    """

    chat_format = "gpt2"

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        added_tokens: dict[str, int] | None = None,
        source: str = "vocab.json",
    ):
        import regex  # a dependency of tiktoken; needed for \p{L} in the pre-tokeniser

        self._init_args = dict(vocab=vocab, merges=merges, added_tokens=added_tokens, source=source)
        self.vocab = dict(vocab)
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        missing = [a + b for a, b in merges if a + b not in self.vocab]
        if missing:
            raise ValueError(f"{source}: merged token {missing[0]!r} from merges.txt has no id")
        self.byte_chars = bytes_to_unicode()
        self.char_bytes = {c: b for b, c in self.byte_chars.items()}
        absent = [c for c in self.byte_chars.values() if c not in self.vocab]
        if absent:
            raise ValueError(f"{source}: {len(absent)} single-byte tokens missing (e.g. {absent[0]!r})")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.special_tokens = dict(added_tokens or {})
        if "<|endoftext|>" in self.vocab:
            self.special_tokens.setdefault("<|endoftext|>", self.vocab["<|endoftext|>"])
        self.index_special = {i: t for t, i in self.special_tokens.items()}
        eos = self.special_tokens.get("<|endoftext|>")
        self.eos_token_ids = [] if eos is None else [eos]
        self.pad_token_id = eos if eos is not None else 0
        if "[CLS]" in self.special_tokens and eos is not None:
            self.prefix_ids, self.suffix_ids = [self.special_tokens["[CLS]"]], [eos]
        self.vocab_size = max(list(self.id_to_token) + list(self.index_special)) + 1
        self._pretok = regex.compile(GPT2_PAT)
        self._split = special_pattern(self.special_tokens)
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair until none is in merges.txt (GPT-2's algorithm)."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.merge_rank.get(p, len(self.merge_rank)))
            if pair not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    @classmethod
    def from_folder(cls, folder: str) -> GPT2BPETokenizer:
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: not found (a GPT-2 BPE needs vocab.json and merges.txt)")
        vocab = read_json_object(vocab_path)
        merges = []
        with open(merges_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("#version") or not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{merges_path}, line {lineno}: expected two tokens, got {line.strip()!r}")
                merges.append((parts[0], parts[1]))
        added_path = os.path.join(folder, "added_tokens.json")
        added = read_json_object(added_path) if os.path.isfile(added_path) else {}
        return cls(vocab, merges, {str(k): int(v) for k, v in added.items()}, source=vocab_path)

    def _pieces(self, text: str) -> list[tuple[str, bool]]:
        out = []
        for chunk, special in split_special(text, self._split):
            if special:
                out.append((chunk, True))
                continue
            for word in self._pretok.findall(chunk):
                out.extend((t, False) for t in self._bpe("".join(self.byte_chars[b] for b in word.encode("utf-8"))))
        return out

    def tokenize(self, text: str) -> list[str]:
        """vocab.json tokens (GPT-2 byte alphabet); added tokens by name."""
        return [t for t, _ in self._pieces(text)]

    def _encode_text(self, text: str) -> list[int]:
        return [self.special_tokens[t] if special else self.vocab[t] for t, special in self._pieces(text)]

    def _piece_to_id(self, piece: str) -> int | None:
        return self.vocab.get(piece)  # a vocab.json entry, written in GPT-2's byte alphabet

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Tokens joined (added tokens by name unless skipped) and mapped back to UTF-8 bytes."""
        out = bytearray()
        for i in as_id_list(ids):
            if i in self.index_special:
                if not skip_special_tokens:
                    out += self.index_special[i].encode("utf-8")
            else:
                for c in self.id_to_token.get(i, ""):  # unknown ids decode to nothing
                    out += bytes([self.char_bytes[c]]) if c in self.char_bytes else c.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        raise ValueError("the GPT-2 BPE of the original GLM has no chat format; use encode()")

    def parse_response(self, text: str, history=None) -> dict:
        return {"content": text.strip()}

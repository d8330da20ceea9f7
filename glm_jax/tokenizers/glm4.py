"""GLM-4 tokenizer: a tiktoken rank file (`tokenizer.model`) plus added special tokens."""

from __future__ import annotations

import base64
import binascii
import os
import re

from glm_jax.tokenizers import templates, tool_parse
from glm_jax.tokenizers.base import GLMTokenizer, as_id_list, special_pattern, split_special

# the added tokens in their released order (released ids: number of ranks + position)
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
# pre-tokenisation regex of the reference ChatGLM4Tokenizer
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


def is_tiktoken_file(path: str) -> bool:
    """True when the file's first line looks like 'base64-token rank'."""
    with open(path, "rb") as f:
        first = f.readline(4096)
    return bool(_RANK_LINE.match(first.rstrip(b"\n")))


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken rank file; ValueError naming the line for garbage."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: tiktoken rank file not found")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{path}, line {lineno}: not a 'base64-token rank' line ({e})") from e
            if token in ranks:
                raise ValueError(f"{path}, line {lineno}: token listed twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken rank file")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: ranks are not unique")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} single bytes have no rank (e.g. {missing[0]}); not a byte-level BPE rank file"
        )
    return ranks


class GLM4Tokenizer(GLMTokenizer):
    """glm-4-9b-chat: tiktoken BPE, added tokens cut out of the text, '[gMASK]<sop>' template prefix."""

    chat_format = "glm4"

    def __init__(self, vocab_file: str, special_tokens: dict[str, int] | None = None, template_variant: str = "jinja"):
        """special_tokens: name -> id (tokenizer_config.json added_tokens_decoder); default: released order
        after the last rank. template_variant: see templates.GLM4_TEMPLATE_VARIANTS."""
        import tiktoken

        if template_variant not in templates.GLM4_TEMPLATE_VARIANTS:
            raise ValueError(
                f"unknown GLM-4 template variant {template_variant!r}; "
                f"expected one of {templates.GLM4_TEMPLATE_VARIANTS}"
            )
        self._init_args = dict(vocab_file=vocab_file, special_tokens=special_tokens, template_variant=template_variant)
        self.vocab_file = vocab_file
        self.template_variant = template_variant
        self.ranks = ranks = load_tiktoken_ranks(vocab_file)
        self.enc = tiktoken.Encoding(name="glm4", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
        self.decoder = {rank: token for token, rank in ranks.items()}
        n = len(ranks)
        if special_tokens is None:
            special_tokens = {t: n + i for i, t in enumerate(GLM4_SPECIAL_TOKENS)}
        missing = [t for t in GLM4_SPECIAL_TOKENS[:10] if t not in special_tokens]
        if missing:
            raise ValueError(f"{vocab_file}: GLM-4 special tokens missing from the config: {missing}")
        clash = [t for t, i in special_tokens.items() if i in self.decoder]
        if clash:
            raise ValueError(f"{vocab_file}: special tokens {clash} reuse ids of ordinary ranks")
        self.special_tokens = dict(special_tokens)
        self.index_special = {i: t for t, i in self.special_tokens.items()}
        st = self.special_tokens
        self.pad_token_id = st["<|endoftext|>"]
        self.eos_token_ids = [st["<|endoftext|>"], st["<|user|>"], st["<|observation|>"]]
        self.prefix_ids = [st["[gMASK]"], st["<sop>"]]
        self.vocab_size = max(max(self.decoder) + 1, max(self.index_special) + 1)
        self._split = special_pattern(self.special_tokens)

    def tokenize(self, text: str) -> list:
        """Tokens as the reference gives them: bytes for ranks, names for special tokens."""
        out = []
        for chunk, special in split_special(text, self._split):
            out.extend([chunk] if special else [self.decoder[i] for i in self.enc.encode_ordinary(chunk)])
        return out

    def _encode_text(self, text: str) -> list[int]:
        out = []
        for chunk, special in split_special(text, self._split):
            out.extend([self.special_tokens[chunk]] if special else self.enc.encode_ordinary(chunk))
        return out

    def _piece_to_id(self, piece) -> int | None:
        token = piece.encode("utf-8") if isinstance(piece, str) else piece
        return self.ranks.get(token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """transformers decode: special tokens by name, joined to the text around them by one space each."""
        parts, buf, pending = [], b"", False
        for i in as_id_list(ids):
            if i in self.index_special:
                if skip_special_tokens:
                    continue
                if pending and buf:
                    parts.append(buf.decode("utf-8", errors="replace"))
                buf, pending = b"", False
                parts.append(self.index_special[i])
            else:
                buf, pending = buf + self.decoder.get(i, b""), True  # unknown ids decode to nothing
        if pending:
            parts.append(buf.decode("utf-8", errors="replace"))
        return " ".join(parts)

    # ---- chat
    def render_chat(
        self,
        messages,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = True,
        template_variant: str | None = None,
    ) -> str:
        """The prompt text (apply_chat_template with tokenize=False)."""
        return templates.glm4_render(
            messages, add_generation_prompt, template_variant or self.template_variant, add_special_tokens
        )

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = True,
        add_special_tokens: bool = True,
        template_variant: str | None = None,
        **kwargs,
    ) -> list[int]:
        """Prompt ids. Jinja variants: the rendered text encoded at once (special tokens cut out, so a newline
        after a role merges with newlines starting the content; add_special_tokens cannot drop the literal
        '[gMASK]<sop>'). Python variant: message by message, each metadata+newline and content apart."""
        variant = template_variant or self.template_variant
        if variant != "python":
            return self.encode(self.render_chat(messages, add_generation_prompt, add_special_tokens, variant))
        st, encode = self.special_tokens, self.enc.encode_ordinary
        ids = list(self.prefix_ids) if add_special_tokens else []
        for role, meta, content in templates.glm4_blocks(messages, variant):
            ids += templates.single_message_ids(st[f"<|{role}|>"], meta, content, encode)
        return ids + [st["<|assistant|>"]] if add_generation_prompt else ids

    def process_response(self, output: str, history: list):
        """The model's process_response -> (response, new_history)."""
        return tool_parse.glm4_process_response(output, history)

    def parse_response(self, text: str, history=None) -> dict:
        """{"name", "parameters"} for a tool call, {"name", "content"} for other metadata, else {"content"}.
        Without a history, tools are taken as available."""
        return tool_parse.parse_with(tool_parse.glm4_process_response, text, history)

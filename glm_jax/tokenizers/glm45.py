"""GLM-4.5 / 4.6 / 4.7 tokenizer (the glm4-moe family): the checkpoint's tokenizer.json, read with the
`tokenizers` library (what transformers' fast tokenizer runs), and the chat format of glm45_chat."""

from __future__ import annotations

import json
import os

from glm_jax.tokenizers import glm45_chat
from glm_jax.tokenizers.base import GLMTokenizer, as_id_list, clean_up_tokenization

# added tokens the chat format needs (GLM-4.5 has more: image/audio/video markers, code infilling, boxes)
REQUIRED_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)


def is_glm45_tokenizer_json(path: str) -> bool:
    """True when a tokenizer.json lists GLM-4.5's tool-call tokens (<arg_key>) among its added tokens."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    added = data.get("added_tokens") if isinstance(data, dict) else None
    return any(isinstance(t, dict) and t.get("content") == "<arg_key>" for t in added or ())


def template_variant_of(folder: str, cfg: dict) -> str:
    """ "glm4.7" when the folder's chat template (chat_template.jinja, else tokenizer_config.json's) is GLM-4.7's
    (it reads clear_thinking), else "glm4.5"."""
    path = os.path.join(folder, "chat_template.jinja")
    text = cfg.get("chat_template")
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    return "glm4.7" if isinstance(text, str) and "clear_thinking" in text else "glm4.5"


class GLM45Tokenizer(GLMTokenizer):
    """GLM-4.5/4.6/4.7: byte-level BPE from tokenizer.json; added tokens are cut out of the text (as transformers
    does); apply_chat_template renders the released template (glm45_chat) and encodes the text at once."""

    chat_format = "glm4_5"

    def __init__(
        self, tokenizer_file: str, clean_up_tokenization_spaces: bool = False, template_variant: str = "glm4.5"
    ):
        """clean_up_tokenization_spaces: tokenizer_config.json's flag for decode (False in GLM-4.5's).
        template_variant: "glm4.5" (GLM-4.5 and 4.6) or "glm4.7" (glm45_chat.VARIANTS)."""
        from tokenizers import Tokenizer

        self._init_args = dict(
            tokenizer_file=tokenizer_file,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            template_variant=template_variant,
        )
        self.template_variant = glm45_chat.check_variant(template_variant)
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file}: tokenizer.json not found")
        try:
            self.tok = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust library raises a bare Exception for a file it cannot read
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from e
        self.tokenizer_file = tokenizer_file
        self.clean_up = bool(clean_up_tokenization_spaces)
        added = self.tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: int(i) for i, t in sorted(added.items())}
        missing = [t for t in REQUIRED_TOKENS if t not in self.special_tokens]
        if missing:
            raise ValueError(f"{tokenizer_file}: GLM-4.5 added tokens missing: {missing}")
        st = self.special_tokens
        self.pad_token_id = st["<|endoftext|>"]
        self.eos_token_ids = [st["<|endoftext|>"], st["<|user|>"], st["<|observation|>"]]  # generation_config
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        cut = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        self.prefix_ids, self.suffix_ids = full[:cut], full[cut + len(plain) :]  # the post-processor's, if any

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; add_special_tokens applies tokenizer.json's post-processor (transformers' default)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def _encode_text(self, text: str) -> list[int]:
        return self.encode(text)

    def tokenize(self, text: str) -> list[str]:
        """tokenizer.json pieces (byte-level alphabet); added tokens by name."""
        return list(self.tok.encode(text, add_special_tokens=False).tokens)

    def _piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """transformers' decode: skip_special_tokens drops the tokens marked special (not <think>, <tool_call>...)."""
        text = self.tok.decode(as_id_list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text

    # ---- chat
    def render_chat(
        self, messages, add_generation_prompt: bool = True, tools=None, enable_thinking=None, clear_thinking=None
    ) -> str:
        """The prompt text (apply_chat_template with tokenize=False)."""
        return glm45_chat.render(
            messages, tools, add_generation_prompt, enable_thinking, self.template_variant, clear_thinking
        )

    def apply_chat_template(
        self,
        messages,
        add_generation_prompt: bool = True,
        tools=None,
        enable_thinking=None,
        clear_thinking=None,
        **kwargs,
    ) -> list[int]:
        """Prompt ids: the rendered text encoded at once, as transformers does. tools: the tool schemas
        (also read from a system message's "tools"); enable_thinking=False: no thinking (/nothink on GLM-4.5);
        clear_thinking=False (GLM-4.7): keep the reasoning of turns before the last user message."""
        if kwargs:
            raise TypeError(f"unexpected arguments for the glm4_5 chat format: {sorted(kwargs)}")
        return self.encode(self.render_chat(messages, add_generation_prompt, tools, enable_thinking, clear_thinking))

    def chat_segments(
        self, messages, add_generation_prompt: bool = True, tools=None, enable_thinking=None, clear_thinking=None
    ) -> list[tuple[str, list[int]]]:
        """(part, ids) per rendered piece (glm45_chat.render_segments); the ids join to apply_chat_template's."""
        parts = glm45_chat.render_segments(
            messages, tools, add_generation_prompt, enable_thinking, self.template_variant, clear_thinking
        )
        return [(name, self.encode(text)) for name, text in parts]

    def parse_response(self, text: str, history=None, tools=None) -> dict:
        """A reply -> {"content", "reasoning_content"?, "tool_calls"?} (glm45_chat.parse_response). The string
        parameters of `tools` (or of the tools on a system message of `history`) are kept as written. A reply
        with tool calls also carries the first call as "name" and "parameters", the shape every other chat
        format's parse_response gives a tool call (all calls stay in "tool_calls")."""
        if tools is None and history:
            _, tools = glm45_chat.split_tools(glm45_chat.check_glm45_messages(history), None)
        parsed = glm45_chat.parse_response(text, tools)
        if parsed.get("tool_calls"):
            first = parsed["tool_calls"][0]["function"]
            parsed["name"], parsed["parameters"] = first["name"], first["arguments"]
        return parsed

    def process_response(self, output: str, history: list):
        """(parsed reply, history + the reply as an assistant message)."""
        parsed = self.parse_response(output, history)
        message = {k: v for k, v in parsed.items() if k not in ("name", "parameters")}
        return parsed, list(history) + [{"role": "assistant", **message}]

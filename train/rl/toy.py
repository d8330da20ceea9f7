"""The bundled GRPO toy task (`data.source: toy:add`): prompts "a+b=" with a, b in 0..4 and the sum as the
`answer` field, on a character-level tokenizer small enough that a tiny random model samples every digit
often, so that the exact-answer reward is learnable within CPU minutes (train/configs/grpo_tiny.yaml)."""

from __future__ import annotations

import itertools

import numpy as np

from glm_jax.tokenizers.base import GLMTokenizer

CHARS = "0123456789+=-*/.,:;?!<>()[]{}@#$%&_abcdefghijklmnopqrstuvwxyz\n"  # 62 + <pad>, <eos>: 64 ids


class ToyTokenizer(GLMTokenizer):
    """One id per character of CHARS after <pad> (0) and <eos> (1); the "chat format" is the user's text."""

    chat_format = "toy"

    def __init__(self):
        self.special_tokens = {"<pad>": 0, "<eos>": 1}
        self.eos_token_ids = [1]
        self.pad_token_id = 0
        self.vocab_size = 2 + len(CHARS)
        self._init_args = {}
        self._ids = {c: i + 2 for i, c in enumerate(CHARS)}

    def _encode_text(self, text: str) -> list[int]:
        return [self._ids[c] for c in text.lower() if c in self._ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i >= 2:
                out.append(CHARS[i - 2])
            elif not skip_special_tokens:
                out.append(("<pad>", "<eos>")[i])
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return self.encode("".join(m["content"] for m in messages if m.get("role") == "user"))

    def parse_response(self, text: str, history=None) -> dict:
        return {"role": "assistant", "content": text}


def records(task: str) -> list[dict]:
    if task != "add":
        raise ValueError(f"unknown toy task {task!r}; known: add")
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in itertools.product(range(5), range(5))]

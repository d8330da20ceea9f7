"""Preference records (DESIGN.md §3.12, objective dpo) -> prompt, chosen and rejected token ids.

    from glm_jax.data import preference
    pair = preference.encode(tok, {"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    pair.prompt_ids, pair.chosen_ids, pair.chosen_mask, pair.rejected_ids, pair.rejected_mask

A record's "prompt", "chosen" and "rejected" are message lists (§3.4) or strings: a prompt string is one user
turn, a completion string one assistant turn. Each is rendered by the tokenizer's own chat format
(tok.apply_chat_template), the way TRL 1.16's DPOTrainer renders a conversational record
(trl/trainer/dpo_trainer.py:1075-1126, `_prepare_dataset`'s tokenize_fn): the prompt with the generation prompt,
prompt + completion without it, and the completion starts where those ids first differ (for the GLM formats,
after the <|assistant|> of the generation prompt). So a completion is the assistant's text as the template writes
it; the templates of the role-token formats close no turn, so it carries no end-of-turn token, as in TRL.

The masks flag the tokens the assistant produces: all of a one-message completion (TRL's completion_mask), and
in a longer one (a tool call, its observation, then the reply) the assistant messages' tokens and the token that
ends each (see _mask).
"""

from __future__ import annotations

import dataclasses

__all__ = ["PreferencePair", "PreferenceRecordError", "encode", "messages_of"]

# ChatGLM-6B and ChatGLM2 build a "[Round n] 问/答" prompt from user/assistant pairs and cannot render a
# conversation that ends with the assistant, which is what a completion is here.
ROLE_TOKEN_FORMATS = ("chatglm3", "glm4", "glm4_5")


class PreferenceRecordError(ValueError):
    """A preference record that cannot be rendered; the message names the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_mask: list[int]  # 1 on the tokens of chosen_ids that the assistant produces
    rejected_mask: list[int]


def messages_of(value, field: str) -> list[dict]:
    """A record field as a message list: a str is one user turn (the prompt) or one assistant turn (a completion)."""
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
        raise PreferenceRecordError(f'"{field}": expected a string or a non-empty list of messages with a "role"')
    return value


def _common_prefix(a: list[int], b: list[int]) -> int:
    """TRL's common_prefix_length (trl/data_utils.py:406)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _render(tok, messages, add_generation_prompt):
    return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))


def _completion(tok, prompt, completion, field):
    """(ids of prompt + completion, [(end, is_assistant)] per message): message i's tokens end where the rendering
    of the conversation up to it ends, so it owns what its rendering adds to the one before it."""
    full = _render(tok, prompt + completion, False)
    ends = []
    for i, message in enumerate(completion):
        upto = full if i == len(completion) - 1 else _render(tok, prompt + completion[: i + 1], False)
        if full[: len(upto)] != upto:
            raise PreferenceRecordError(
                f'"{field}": the chat template renders message {i} differently once later messages follow it, so '
                "its tokens cannot be told apart; give the completion as one assistant message"
            )
        ends.append((len(upto), message.get("role") == "assistant"))
    return full, ends


def _mask(ends, n):
    """Loss flags of the completion tokens (the ids past the shared prompt, its first n). A token is the model's
    to predict when the token before it belongs to an assistant message, as in the SFT formats (glm_jax.data.sft):
    the end token of an assistant message (<|observation|> after a tool call) is trained, the role token that
    opens an assistant message after an observation is not. The first completion token follows the prompt's
    generation prompt, so it is trained when the completion opens with an assistant message."""
    owner, start = [], n
    for end, assistant in ends:
        owner += [int(assistant)] * max(end - start, 0)
        start = max(start, end)
    return owner[:1] + owner[:-1]


def encode(tok, record: dict) -> PreferencePair:
    """One preference record -> PreferencePair (see the module docstring)."""
    if tok.chat_format not in ROLE_TOKEN_FORMATS:
        raise PreferenceRecordError(
            f"chat format {tok.chat_format!r}: preference data needs one of {', '.join(ROLE_TOKEN_FORMATS)}, whose "
            "template can render a conversation ending with the assistant"
        )
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise PreferenceRecordError(f"record without {', '.join(repr(k) for k in missing)}")
    prompt = messages_of(record["prompt"], "prompt")
    prompt_ids = _render(tok, prompt, True)
    chosen_full, chosen_ends = _completion(tok, prompt, messages_of(record["chosen"], "chosen"), "chosen")
    rejected_full, rejected_ends = _completion(tok, prompt, messages_of(record["rejected"], "rejected"), "rejected")
    # dpo_trainer.py:1104-1109: the completion starts where the prompt and prompt + completion first differ
    n = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    return PreferencePair(
        prompt_ids=prompt_ids[:n],
        chosen_ids=chosen_full[n:],
        rejected_ids=rejected_full[n:],
        chosen_mask=_mask(chosen_ends, n),
        rejected_mask=_mask(rejected_ends, n),
    )

"""The six THUDM finetuning scripts' rules, one function each: a record -> (input_ids, labels) or None.

glm_jax.data.sft documents the formats and holds `encode`, which picks one of these.
"""

from __future__ import annotations

import json

from glm_jax.tokenizers import templates

FORMATS = ("chatglm3", "chatglm3_finetune_hf", "glm4", "glm4_combine", "ptuning_chatglm", "ptuning_chatglm2")
IGNORE = -100
ROLES = ("system", "user", "assistant", "observation")
_TOKENIZER_FAMILY = {
    "chatglm3": ("chatglm3",),
    "chatglm3_finetune_hf": ("chatglm3",),
    "glm4": ("glm4",),
    "glm4_combine": ("glm4",),
    "ptuning_chatglm": ("chatglm",),
    "ptuning_chatglm2": ("chatglm2", "chatglm3"),
}
TOOL_DEFINITION_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"


class SFTRecordError(ValueError):
    """A record the reference preprocessing cannot take: missing key, wrong type, unknown role, ..."""


def _special(tok, name: str) -> int:
    try:
        return int(tok.special_tokens[name])
    except (AttributeError, KeyError) as e:
        raise ValueError(f"tokenizer {tok!r} has no special token {name!r}") from e


def _shift(ids: list[int], flags: list[bool]) -> list[int]:
    """labels[i] = ids[i] when the token before i is flagged (the prediction made there is scored)."""
    return [IGNORE] + [t if f else IGNORE for t, f in zip(ids[1:], flags[:-1])]


def _get(obj: dict, key: str, types, where: str):
    if key not in obj:
        raise SFTRecordError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise SFTRecordError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


def _obj(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise SFTRecordError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _message_list(example, key: str) -> list[dict]:
    messages = _get(_obj(example, "record"), key, list, "record")
    for i, m in enumerate(messages):
        role = _get(_obj(m, f"{key}[{i}]"), "role", str, f"{key}[{i}]")
        if role not in ROLES and not (key == "conversations" and role == "tool"):
            allowed = ROLES + (("tool",) if key == "conversations" else ())
            raise SFTRecordError(f"{key}[{i}]: unknown role {role!r}; expected one of {allowed}")
    return messages


# ---------------------------------------------------------------- ChatGLM3


def _literal(value) -> str:
    """A JSON value as astunparse writes an ast.Constant holding it (repr; a top-level infinite float as 1e309)."""
    if isinstance(value, float):
        return repr(value).replace("inf", "1e309")
    return repr(value)


def tool_call_code(parameters: dict) -> str:
    """The ```python block ChatGLM3's multi-turn demo writes for a tool call: tool_call(k=literal, ...)."""
    args = ", ".join(f"{k}={_literal(v)}" for k, v in parameters.items())
    return f"```python\ntool_call({args})\n```"


def _loss_flag(m: dict, where: str) -> bool:
    if m["role"] in ("system", "user"):
        return False
    value = m.get("loss", True)
    try:
        return bool(int(value))  # the reference takes int(loss)
    except (TypeError, ValueError):
        raise SFTRecordError(f"{where}: 'loss' must be true or false, got {value!r}") from None


def _chatglm3(tok, example, trust_loss: bool):
    key = "conversations"
    messages = _message_list(example, key)
    ids, flags = [_special(tok, "[gMASK]"), _special(tok, "sop")], [False, False]

    def add(role: str, metadata: str, content: str, flag: bool):
        part = tok.build_single_message(role, metadata, content)
        ids.extend(part)
        flags.extend([flag] * len(part))

    if trust_loss and "tools" in example:
        add("system", "", TOOL_DEFINITION_PREFIX + json.dumps(example["tools"], indent=4, ensure_ascii=False), False)
    elif not trust_loss and example.get("tools") is not None:
        raise SFTRecordError("record: 'tools' is not supported by finetune_hf's process_batch (must be null)")
    for i, m in enumerate(messages):
        where = f"{key}[{i}]"
        if m["role"] == "tool":
            if not trust_loss:
                raise SFTRecordError(f"{where}: role 'tool' is not supported by finetune_hf's process_batch")
            flag = _loss_flag(m, where)
            name = _get(m, "name", str, where)
            add("assistant", name, tool_call_code(_get(m, "parameters", dict, where)), flag)
            obs = m.get("observation")
            add("observation", "", obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False), False)
        else:
            flag = _loss_flag(m, where) if trust_loss else m["role"] not in ("system", "user")
            add(m["role"], "", _get(m, "content", str, where), flag)
    ids.append(_special(tok, "<eos>"))
    flags.append(False)
    return ids, _shift(ids, flags)


# ---------------------------------------------------------------- GLM-4


def _glm4_tools_block(tools, where: str) -> str:
    if not isinstance(tools, list):
        raise SFTRecordError(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
    for j, tool in enumerate(tools):
        if _obj(tool, f"{where}.tools[{j}]").get("type") == "function":
            _get(_get(tool, "function", dict, f"{where}.tools[{j}]"), "name", str, f"{where}.tools[{j}].function")
    return "<|system|>\n" + templates.glm4_tools_prompt(tools, "jinja")


def _glm4_render(m: dict, where: str) -> str:
    """One message as the glm-4-9b-chat jinja template writes it: tool block, then <|role|>metadata\\ncontent."""
    text = _glm4_tools_block(m["tools"], where) if "tools" in m else ""
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise SFTRecordError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    if content:
        meta = m.get("metadata", "")
        if meta is None:
            meta = "None"  # the template prints a null metadata as the text None
        elif not isinstance(meta, str):
            raise SFTRecordError(f"{where}: 'metadata' must be a string, got {type(meta).__name__}")
        text += f"<|{m['role']}|>{meta}\n{content}"
    return text


def _glm4_process_message(m: dict, where: str) -> dict:
    """finetune.py process_message: drop null tool properties on a system message, delete tools elsewhere."""
    m = dict(m)
    if "tools" in m and m["role"] == "system":
        tools = m["tools"]
        if not isinstance(tools, list):
            raise SFTRecordError(f"{where}: 'tools' must be a list, got {type(tools).__name__}")
        new_tools = []
        for j, tool in enumerate(tools):
            at = f"{where}.tools[{j}]"
            fn = _get(_obj(tool, at), "function", dict, at)
            params = _get(fn, "parameters", dict, f"{at}.function")
            props = _get(params, "properties", dict, f"{at}.function.parameters")
            kept = {k: v for k, v in props.items() if v is not None}
            new_tools.append({**tool, "function": {**fn, "parameters": {**params, "properties": kept}}})
        m["tools"] = new_tools
    else:
        m.pop("tools", None)
    return m


def _glm4(tok, example, combine: bool):
    messages = _message_list(example, "messages")
    if not messages:
        raise SFTRecordError("record: 'messages' is empty")
    assistant = _special(tok, "<|assistant|>")
    if combine:
        text = "[gMASK]<sop>" + "".join(_glm4_render(m, f"messages[{i}]") for i, m in enumerate(messages))
        ids = list(tok.encode(text))
        if assistant not in ids:
            raise SFTRecordError(
                "record: no assistant message with non-empty content (combine mode trains "
                "what follows the last <|assistant|>)"
            )
        last = len(ids) - 1 - ids[::-1].index(assistant)
        flags = [j > last for j in range(len(ids))]
    else:
        ids, flags = [_special(tok, "[gMASK]"), _special(tok, "<sop>")], [False, False]
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            part = tok.encode(_glm4_render(_glm4_process_message(m, where), where))
            ids += part
            flags += [m["role"] not in ("system", "user", "observation")] * len(part)
    ids.append(_special(tok, "<|user|>"))  # the reference's "EOS for chat"
    flags.append(False)
    return ids, _shift(ids, flags)


# ---------------------------------------------------------------- P-Tuning v2


def _prompt_response_history(example, history_default):
    """(prompt, response, history or None without a history key); None for a record the reference drops."""
    prompt = _get(_obj(example, "record"), "prompt", (str, type(None)), "record")
    response = _get(example, "response", (str, type(None)), "record")
    if not prompt or not response:
        return None
    if "history" not in example:
        return prompt, response, None
    history = example["history"]
    if history is None and history_default is not None:
        history = history_default
    if not isinstance(history, list):
        raise SFTRecordError(
            f"record: 'history' must be a list of [query, response] pairs, got {type(history).__name__}"
        )
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise SFTRecordError(f"record: history[{i}] must be a [query, response] pair of strings, got {turn!r}")
    return prompt, response, history


def _ptuning_chatglm(tok, example):
    record = _prompt_response_history(example, None)
    if record is None:
        return None
    prompt, response, history = record
    if history is not None:
        prompt = (
            "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
            + f"[Round {len(history)}]\n问：{prompt}\n答："
        )
    bos, pad = _special(tok, "<sop>"), tok.pad_token_id
    ids = tok.encode(prompt) + [_special(tok, "[gMASK]"), bos] + tok.encode(response) + [_special(tok, "<eop>")]
    start = ids.index(bos)
    labels = [IGNORE] * start + [IGNORE if t == pad else t for t in ids[start:]]
    return ids, labels


def _ptuning_chatglm2(tok, example):
    record = _prompt_response_history(example, [])
    if record is None:
        return None
    prompt, response, history = record
    a = [_special(tok, "[gMASK]"), _special(tok, "sop")] + tok.encode(templates.chatglm2_prompt(prompt, history or ()))
    b = tok.encode(response) + [_special(tok, "<eos>")]
    pad = tok.pad_token_id
    return a + b, [IGNORE] * len(a) + [IGNORE if t == pad else t for t in b]


# ---------------------------------------------------------------- public API


def encode(tok, example, format: str):
    """(input_ids, labels) of one record as the reference script of `format` builds it (see the module
    docstring), or None for a record the reference drops. SFTRecordError for a malformed record."""
    if format not in FORMATS:
        raise ValueError(f"unknown SFT format {format!r}; expected one of {FORMATS}")
    family = getattr(tok, "chat_format", None)
    if family is not None and family not in _TOKENIZER_FAMILY[format]:
        raise ValueError(
            f"format {format!r} needs a {' or '.join(_TOKENIZER_FAMILY[format])} tokenizer, got a {family} one"
        )
    if format in ("chatglm3", "chatglm3_finetune_hf"):
        return _chatglm3(tok, example, trust_loss=format == "chatglm3")
    if format in ("glm4", "glm4_combine"):
        return _glm4(tok, example, combine=format == "glm4_combine")
    if format == "ptuning_chatglm":
        return _ptuning_chatglm(tok, example)
    return _ptuning_chatglm2(tok, example)


def user_token(tok) -> int:
    """The id of <|user|>, which opens every user turn of the chat formats (and ends a GLM-4 conversation)."""
    return _special(tok, "<|user|>")

"""GRPO reward functions (DESIGN §3.12), with TRL's signature: `fn(prompts=[...], completions=[...], **fields)`
returns one float (or None: no reward) per completion. A completion is a str, or a one-message list
[{"role": "assistant", "content": str}] when the prompt is a message list (as TRL hands them over).

Built in: `exact_answer` (math), `think_format` (GLM's <think>...</think> then an answer), `tool_call_valid` (a
GLM-4.5 XML or GLM-4 tool call that parses). `load_rewards` resolves the `grpo.rewards` names.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

from glm_jax.tokenizers import tool_parse


def completion_text(c) -> str:
    """The text of a completion (a str, or TRL's conversational [{"role": "assistant", "content": ...}])."""
    if isinstance(c, str):
        return c
    return "".join(m.get("content") or "" for m in c if isinstance(m, dict))


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def final_answer(text: str) -> str | None:
    """The answer a math completion gives: its last \\boxed{} if any, else its last number (the text after
    </think> when it thinks first)."""
    text = text.split("</think>")[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def _normal(ans) -> str:
    s = str(ans).strip().replace(",", "").replace(" ", "").rstrip(".")
    try:
        f = float(s)
        return str(int(f)) if f == int(f) else repr(f)
    except ValueError:
        return s


def exact_answer(prompts, completions, answer=None, **_):
    """1.0 when the completion's final answer (last \\boxed{} or final number) equals the record's `answer`
    field (numbers compared as numbers: "7.0" == "7", "1,000" == "1000"), else 0.0; None without a reference."""
    refs = answer if isinstance(answer, list) else [answer] * len(completions)
    out = []
    for c, ref in zip(completions, refs):
        if ref is None:
            out.append(None)
            continue
        got = final_answer(completion_text(c))
        out.append(float(got is not None and _normal(got) == _normal(ref)))
    return out


_THINK = re.compile(r"^\s*<think>(.+?)</think>\s*(\S.*)$", re.DOTALL)


def think_format(prompts, completions, **_):
    """1.0 for GLM's reasoning structure — one non-empty <think>...</think> block first, then a non-empty
    answer — else 0.0."""
    out = []
    for c in completions:
        m = _THINK.match(completion_text(c))
        ok = m is not None and m.group(1).strip() and "<think>" not in m.group(2) and "</think>" not in m.group(2)
        out.append(float(bool(ok)))
    return out


def _glm45_calls(text: str) -> list | None:
    """GLM-4.5 XML tool calls (<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>),
    parsed by glm_jax.tokenizers.glm45_chat.parse_response; [] without one, None when one is malformed."""
    from glm_jax.tokenizers.glm45_chat import parse_response

    if "<tool_call>" not in text:
        return []
    try:
        msg = parse_response(text)
    except ValueError:
        return None
    return [c["function"] for c in msg.get("tool_calls", [])] or None


def _glm4_call(text: str) -> dict | None:
    """A GLM-4 tool call ("name\\n{json arguments}"), read by GLM-4's process_response
    (glm_jax.tokenizers.tool_parse.glm4_process_response) with tools offered; None when it is not one."""
    try:
        parsed, _ = tool_parse.glm4_process_response(text.strip(), tool_parse.TOOLS_HISTORY)
    except ValueError:  # arguments that are not JSON
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("parameters"), dict):
        return None
    return {"name": parsed["name"], "arguments": parsed["parameters"]}


def tool_call_valid(prompts, completions, tools=None, **_):
    """1.0 when the completion holds a tool call that parses — GLM-4.5 XML <tool_call> blocks, or GLM-4's
    "name\\n{json}" — and, when the record lists `tools` (OpenAI-style dicts or names), names one of them;
    else 0.0."""
    rows = tools if isinstance(tools, list) and tools and isinstance(tools[0], list) else [tools] * len(completions)
    out = []
    for c, tl in zip(completions, rows):
        text = completion_text(c)
        calls = _glm45_calls(text)
        if calls == []:
            one = _glm4_call(text)
            calls = [one] if one else None
        known = {_tool_name(t) for t in tl} if tl else None
        ok = bool(calls) and (known is None or all(c.get("name") in known for c in calls))
        out.append(float(ok))
    return out


def _tool_name(t) -> str:
    if isinstance(t, str):
        return t
    return (t.get("function") or t).get("name", "")


BUILTIN = {"exact_answer": exact_answer, "think_format": think_format, "tool_call_valid": tool_call_valid}


def load_reward(spec: str):
    """`module.path:function`, `path/file.py:function`, or a built-in name (exact_answer, think_format,
    tool_call_valid). ValueError naming the problem when it does not resolve to a callable."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"grpo.rewards: {spec!r} is not module.path:function, path/file.py:function or a built-in")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        p = pathlib.Path(where)
        if not p.is_file():
            raise ValueError(f"grpo.rewards: {where} not found")
        s = importlib.util.spec_from_file_location(f"glm_reward_{p.stem}", p)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"grpo.rewards: cannot import {where}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"grpo.rewards: {where} has no function {name!r}")
    return fn

"""GLM-4.5 / 4.6 / 4.7 chat (the glm4-moe family), written in Python (no jinja): the prompt their released
chat_template.jinja renders, and the parse of a reply (<think> reasoning, XML tool calls).

What the GLM-4.5/4.6 template does, and so what `render` does (transformers renders it with trim_blocks,
lstrip_blocks and tojson = json.dumps(ensure_ascii=False), default separators):
- "[gMASK]<sop>", then, when `tools` is non-empty, one "<|system|>" block listing each tool as one JSON line;
- system: "<|system|>\\n" + text; user: "<|user|>\\n" + text, plus "/nothink" when thinking is off and the text
  does not already end with it;
- assistant: "<|assistant|>", then "\\n<think>" + reasoning + "</think>" for a turn after the last user message
  that has reasoning (a `reasoning_content` string, else a <think>...</think> block in the content), else
  "\\n<think></think>"; then "\\n" + the stripped content when not blank; then each tool call as
  "\\n<tool_call>name\\n" + "<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n" per argument + "</tool_call>",
  a string value as it is, any other value as JSON;
- tool: a string content is "\\n<tool_response>\\n" + text + "\\n</tool_response>", led by "<|observation|>" only
  for the first of consecutive tool messages; a list content is "<|observation|>" + one response per item
  (an item's "output" when it has one);
- the generation prompt is "<|assistant|>", plus "\\n<think></think>" when thinking is off.
GLM-4.7's template (variant "glm4.7") drops every newline above (after the role tokens, around the think block,
inside calls and responses), has no /nothink, closes an empty or dropped think block with "</think>" alone,
keeps all reasoning when clear_thinking=False, and ends the generation prompt with "<think>" ("</think>" when
thinking is off).
A content is a string, or a list of parts whose {"type": "text", "text": ...} items and plain strings are joined.
Messages are first normalised as transformers 5 does before rendering (check_glm45_messages).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

ROLES = ("system", "user", "assistant", "tool")
PREFIX = "[gMASK]<sop>"
NOTHINK = "/nothink"
TOOLS_HEAD = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_TOOLS_FORMAT = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
VARIANTS = ("glm4.5", "glm4.7")  # GLM-4.5 and 4.6 share a template; GLM-4.7 has its own
TOOLS_TAIL = {  # GLM-4.7 writes the call format without the newlines (the first line's own "\n" stays)
    "glm4.5": _TOOLS_FORMAT,
    "glm4.7": _TOOLS_FORMAT[: _TOOLS_FORMAT.index("<tool_call>")]
    + _TOOLS_FORMAT[_TOOLS_FORMAT.index("<tool_call>") :].replace("\n", ""),
}
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, first one wins
_ABSENT = object()


def tojson(value, where: str) -> str:
    """The template's tojson (transformers: json.dumps with ensure_ascii=False and default separators)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not JSON-serialisable ({e})") from e


def visible_text(content) -> str:
    """The template's visible_text macro: a string, the text parts of a list, "" when absent, else str()."""
    if content is _ABSENT:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        out = []
        for item in content:
            if isinstance(item, dict) and item.get("type") == "text":
                out.append(_jinja_str(item.get("text", _ABSENT)))
            elif isinstance(item, str):
                out.append(item)
        return "".join(out)
    if isinstance(content, dict):  # a mapping is not a list of parts: the template prints it
        return str(content)
    return _jinja_str(content)


def _jinja_str(value) -> str:
    return "" if value is _ABSENT else str(value)


def check_glm45_messages(messages) -> list[dict]:
    """Messages as transformers hands them to the template: dicts with a role of ROLES (GLM-4.5 names tool
    results "tool", not "observation"), without the keys whose value is None (so a None content is an absent
    one), and with `reasoning_content` taken from `thinking` or `reasoning` when it is not given."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("an empty conversation has no chat prompt (transformers refuses it too)")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' key, got {m!r}")
        if m["role"] not in ROLES:
            hint = " (GLM-4.5 calls tool results 'tool')" if m["role"] == "observation" else ""
            raise ValueError(f"messages[{i}]: unknown role {m['role']!r}; expected one of {ROLES}{hint}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def split_tools(messages: list[dict], tools) -> tuple[list[dict], list]:
    """DESIGN §3.4 puts tools on a system message: those join `tools`, and a system message that holds only
    tools (no content) is dropped. Returns (messages, tools)."""
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of tool schemas, got {type(tools).__name__}")
    tools = list(tools or [])
    out = []
    for m in messages:
        if m["role"] == "system" and "tools" in m:
            if not isinstance(m["tools"], (list, tuple)):
                raise ValueError(f"a system message's 'tools' must be a list, got {type(m['tools']).__name__}")
            tools += list(m["tools"])
            if m.get("content") is None:
                continue
            m = {k: v for k, v in m.items() if k != "tools"}
        out.append(m)
    bad = next((i for i, t in enumerate(tools) if not isinstance(t, dict)), None)
    if bad is not None:  # transformers takes JSON schemas (or Python functions, which glm-jax does not)
        raise ValueError(f"tools[{bad}] must be a JSON schema dict, got {type(tools[bad]).__name__}")
    return out, tools


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown GLM-4.5 template variant {variant!r}; expected one of {VARIANTS}")
    return variant


def tools_block(tools: Sequence, variant: str = "glm4.5") -> str:
    """The "<|system|>" block of available tools (each tool dict as one JSON line)."""
    return TOOLS_HEAD + "".join(tojson(t, f"tools[{i}]") + "\n" for i, t in enumerate(tools)) + TOOLS_TAIL[variant]


def _off(flag) -> bool:
    return flag is not None and not flag  # None: not passed to the template (undefined there)


def user_block(m: dict, enable_thinking=None, variant: str = "glm4.5") -> str:
    text = visible_text(m.get("content", _ABSENT))
    if variant == "glm4.7":
        return f"<|user|>{text}"
    nothink = NOTHINK if _off(enable_thinking) and not text.endswith(NOTHINK) else ""
    return f"<|user|>\n{text}{nothink}"


def reasoning_and_content(m: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: `reasoning_content` when it is a string, else the text
    before the first </think> (after the last <think> there) and the content after the last </think>."""
    content = visible_text(m.get("content", _ABSENT))
    reasoning = m.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        parts = content.split("</think>")
        return parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n"), parts[-1].lstrip("\n")
    return "", content


def tool_call_block(tc, where: str, variant: str = "glm4.5") -> str:
    """One call: {"function": {"name", "arguments"}} (OpenAI form) or {"name", "arguments"}; arguments a dict
    (GLM-4.5/4.6: absent, None or empty for none; GLM-4.7's template needs the key)."""
    if not isinstance(tc, dict):
        raise ValueError(f"{where}: a tool call must be a dict, got {type(tc).__name__}")
    if tc.get("function"):
        tc = tc["function"]
        if not isinstance(tc, dict):
            raise ValueError(f"{where}: 'function' must be a dict with 'name' and 'arguments'")
    name = tc.get("name")
    if not isinstance(name, str):
        raise ValueError(f"{where}: the tool call needs a 'name' string, got {name!r}")
    if variant == "glm4.7" and tc.get("arguments") is None:
        raise ValueError(f"{where}: GLM-4.7's template needs 'arguments' (a dict, {{}} for none)")
    args = tc.get("arguments") or {}
    if not isinstance(args, dict):
        raise ValueError(
            f"{where}: 'arguments' must be a dict (the template iterates its items); got {type(args).__name__}"
            + (" - json.loads the OpenAI string form first" if isinstance(args, str) else "")
        )
    nl = "" if variant == "glm4.7" else "\n"
    values = {k: v if isinstance(v, str) else tojson(v, f"{where}: {k!r}") for k, v in args.items()}
    body = "".join(f"<arg_key>{k}</arg_key>{nl}<arg_value>{v}</arg_value>{nl}" for k, v in values.items())
    return f"{nl}<tool_call>{name}{nl}{body}</tool_call>"


def assistant_block(m: dict, keep_reasoning: bool, where: str, variant: str = "glm4.5") -> str:
    reasoning, content = reasoning_and_content(m)
    nl = "" if variant == "glm4.7" else "\n"
    if keep_reasoning and reasoning:
        text = f"<|assistant|>{nl}<think>{reasoning.strip()}</think>"
    else:
        text = "<|assistant|></think>" if variant == "glm4.7" else "<|assistant|>\n<think></think>"
    if content.strip():
        text += nl + content.strip()
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, (list, tuple)):
            raise ValueError(f"{where}: 'tool_calls' must be a list, got {type(calls).__name__}")
        text += "".join(tool_call_block(tc, f"{where}.tool_calls[{j}]", variant) for j, tc in enumerate(calls))
    return text


def tool_block(m: dict, first_of_run: bool, where: str, variant: str = "glm4.5") -> str:
    nl = "" if variant == "glm4.7" else "\n"
    content = m.get("content", _ABSENT)
    if isinstance(content, str):
        return ("<|observation|>" if first_of_run else "") + f"{nl}<tool_response>{nl}{content}{nl}</tool_response>"
    if content is _ABSENT:
        content = []
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where}: a tool message's content must be a string or a list, got {type(content).__name__}")
    items = (str(tr["output"]) if isinstance(tr, dict) and "output" in tr else str(tr) for tr in content)
    return "<|observation|>" + "".join(f"{nl}<tool_response>{nl}{t}{nl}</tool_response>" for t in items)


def generation_prompt(enable_thinking=None, variant: str = "glm4.5") -> str:
    if variant == "glm4.7":
        return "<|assistant|>" + ("</think>" if _off(enable_thinking) else "<think>")
    return "<|assistant|>" + ("\n<think></think>" if _off(enable_thinking) else "")


def render_segments(
    messages,
    tools=None,
    add_generation_prompt: bool = True,
    enable_thinking=None,
    variant: str = "glm4.5",
    clear_thinking=None,
) -> list[tuple[str, str]]:
    """The prompt as (part, text) pieces whose concatenation is the rendered template: ("prefix", "[gMASK]<sop>"),
    ("tools", block) when there are tools, one (role, text) per message (in order), ("generation", ...) last.
    Each piece but the prefix begins with a special token (or follows one), so they tokenise apart."""
    check_variant(variant)
    messages, tools = split_tools(check_glm45_messages(messages), tools)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    keep_all = variant == "glm4.7" and _off(clear_thinking)  # GLM-4.7: clear_thinking=False keeps every turn's
    out = [("prefix", PREFIX)]
    if tools:
        out.append(("tools", tools_block(tools, variant)))
    for i, m in enumerate(messages):
        role, where = m["role"], f"messages[{i}]"
        if role == "user":
            text = user_block(m, enable_thinking, variant)
        elif role == "assistant":
            text = assistant_block(m, keep_all or i > last_user, where, variant)
        elif role == "tool":
            text = tool_block(m, i == 0 or messages[i - 1]["role"] != "tool", where, variant)
        else:
            text = ("<|system|>" if variant == "glm4.7" else "<|system|>\n") + visible_text(m.get("content", _ABSENT))
        out.append((role, text))
    if add_generation_prompt:
        out.append(("generation", generation_prompt(enable_thinking, variant)))
    return out


def render(
    messages,
    tools=None,
    add_generation_prompt: bool = True,
    enable_thinking=None,
    variant: str = "glm4.5",
    clear_thinking=None,
) -> str:
    """The prompt text, as transformers renders the released template (apply_chat_template, tokenize=False).
    enable_thinking / clear_thinking (GLM-4.7 only): None leaves them undefined in the template (thinking on,
    reasoning cleared before the last user turn); False turns them off."""
    parts = render_segments(messages, tools, add_generation_prompt, enable_thinking, variant, clear_thinking)
    return "".join(text for _, text in parts)


# ---------------------------------------------------------------- replies

_STOP_TAIL = re.compile(r"(?:<\|endoftext\|>|<\|user\|>|<\|observation\|>)+\s*$")
_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) of a reply. A reply with </think> has the reasoning before it (after the last <think>
    there), stripped; one cut off inside <think> is all reasoning; one without <think> has none (None)."""
    if "</think>" in text:
        before, _, after = text.partition("</think>")
        return before.split("<think>")[-1].strip(), after
    if "<think>" in text:
        before, _, after = text.partition("<think>")
        if before.strip():
            raise ValueError(f"text before <think>: {before.strip()[:40]!r}")
        return after.strip(), ""
    return None, text


def _string_params(tools, name: str) -> set:
    """Names of the parameters the schema of tool `name` declares as strings."""
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
    return set()


def decode_value(raw: str, is_string: bool):
    """A string parameter stays as written; any other value is JSON when it parses (the template writes
    non-strings with tojson), else the text."""
    if is_string:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_tool_call(body: str, tools=None) -> dict:
    """'name\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>...' (between <tool_call> tags) ->
    {"name", "arguments": dict}; ValueError that quotes the call when it is malformed."""
    cut = body.find("<")
    name, rest = (body, "") if cut < 0 else (body[:cut], body[cut:])
    name = name.strip()
    if not name or "\n" in name:
        raise ValueError(f"tool call without a valid function name: <tool_call>{body[:60]}")
    strings, args, pos = _string_params(tools, name), {}, 0
    while pos < len(rest):
        m = _ARG.match(rest, pos)
        if m is None:
            if rest[pos:].strip():
                raise ValueError(
                    f"tool call {name!r}: expected <arg_key>k</arg_key><arg_value>v</arg_value>, "
                    f"found {rest[pos:].strip()[:60]!r}"
                )
            break
        key, raw = m.group(1), m.group(2)
        if key in args:
            raise ValueError(f"tool call {name!r}: argument {key!r} given twice")
        args[key] = decode_value(raw, key in strings)
        pos = m.end()
    return {"name": name, "arguments": args}


def parse_response(text: str, tools=None) -> dict:
    """A reply (what follows "<|assistant|>") -> {"content", "reasoning_content" (when a <think> block is
    there), "tool_calls": [{"type": "function", "function": {"name", "arguments"}}] (when there are calls)},
    the assistant message render() takes back. `tools`: schemas whose string parameters are kept verbatim.
    ValueError for a malformed call (unclosed tag, text between calls, an argument without a value)."""
    if not isinstance(text, str):
        raise TypeError(f"parse_response expects a str, got {type(text).__name__}")
    reasoning, rest = split_reasoning(_STOP_TAIL.sub("", text))
    content, sep, calls_text = rest.partition("<tool_call>")
    out = {"content": content.strip()}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    calls, pos, calls_text = [], 0, sep + calls_text
    while pos < len(calls_text):
        start = calls_text.find("<tool_call>", pos)
        if start < 0:
            if calls_text[pos:].strip():
                raise ValueError(f"text after the tool calls: {calls_text[pos:].strip()[:60]!r}")
            break
        if calls_text[pos:start].strip():
            raise ValueError(f"text between tool calls: {calls_text[pos:start].strip()[:60]!r}")
        end = calls_text.find("</tool_call>", start)
        if end < 0:
            raise ValueError(f"unclosed <tool_call>: {calls_text[start : start + 60]!r}")
        body = calls_text[start + len("<tool_call>") : end]
        if "<tool_call>" in body:
            raise ValueError(f"<tool_call> inside a tool call: {body[:60]!r}")
        calls.append({"type": "function", "function": parse_tool_call(body, tools)})
        pos = end + len("</tool_call>")
    if calls:
        out["tool_calls"] = calls
    return out

"""A chat turn's text in and out, by chat format, for glm-generate (glm_jax/cli_generate.py): the --tools file in
the family's tool form, the system messages, the prompt ids, what to print for a finished reply and the history
the next turn renders."""

from __future__ import annotations

import json
import pathlib

CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
SYSTEM_FORMATS = ("chatglm3", "glm4", "glm4_5")  # the chat formats with a system role and tools


class UsageError(Exception):
    """Bad input: printed as one `error:` line, exit status 2."""


def read_tools(file: str, chat_format: str) -> list:
    """The --tools list in the family's form: GLM-4 and GLM-4.5 {"type": "function", "function": schema}, ChatGLM3
    bare schemas."""
    from glm_jax.tokenizers.templates import GLM4_BUILTIN_TOOLS

    try:
        tools = json.loads(pathlib.Path(file).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{file}: cannot read tools file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(tools, list) or not tools:
        raise UsageError(f"{file}: expected a non-empty JSON list of function schemas")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if chat_format == "glm4" and isinstance(t, dict) and t.get("type") in GLM4_BUILTIN_TOOLS:
            out.append(t)
            continue
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UsageError(f'{file}: tool {i} is not a function schema with a "name" string')
        out.append({"type": "function", "function": fn} if chat_format in ("glm4", "glm4_5") else fn)
    return out


def system_messages(tok, system: str | None, tools: list | None) -> list[dict]:
    if system is None and not tools:
        return []
    if tok.chat_format not in SYSTEM_FORMATS:
        raise UsageError(
            f"--system and --tools need a chat format with a system role {SYSTEM_FORMATS}; "
            f"this tokenizer's format is {tok.chat_format}"
        )
    if not tools:
        return [{"role": "system", "content": system}]
    if tok.chat_format == "chatglm3":
        return [{"role": "system", "content": CHATGLM3_TOOL_SYSTEM if system is None else system, "tools": tools}]
    return [{"role": "system", "content": system, "tools": tools}]


def prompt_ids(tok, messages: list[dict] | None, raw_text: str | None = None) -> list[int]:
    if raw_text is not None:
        return tok.encode(raw_text, add_special_tokens=True)
    from glm_jax.tokenizers import CHAT_FORMATS

    if tok.chat_format not in CHAT_FORMATS:  # no chat template: its generation prompt, else the text as it is
        if messages and len(messages) == 1 and messages[0]["role"] == "user":
            try:
                return tok.apply_chat_template(messages, add_generation_prompt=True)
            except ValueError:
                return tok.encode(messages[0]["content"], add_special_tokens=True)
        raise UsageError(f"a {tok.chat_format} tokenizer has no chat template; use --raw")
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
        raise UsageError(f"cannot build a {tok.chat_format} prompt: {e}") from None


def format_response(tok, text: str, history: list | None = None) -> str:
    """What to print for a finished reply: one JSON line for a tool call, else the reply's content."""
    if tok.chat_format == "glm4_5":
        return _format_glm45(tok, text, history)
    if tok.chat_format in ("chatglm3", "glm4"):
        parsed = tok.parse_response(text, history)
    else:
        parsed = tok.parse_response(text)
    if "parameters" in parsed:
        return json.dumps({"name": parsed["name"], "parameters": parsed["parameters"]}, ensure_ascii=False)
    if "name" in parsed:  # metadata without a parsable call: show it as text
        return f"{parsed['name']}\n{parsed.get('content', '')}".strip()
    return str(parsed.get("content", ""))


def _format_glm45(tok, text: str, history: list | None) -> str:
    """GLM-4.5: the reply's content, then each tool call as one JSON line {"name", "parameters"}; a reply whose
    calls do not parse is printed as it is."""
    try:
        parsed = tok.parse_response(text, history)
    except ValueError:
        return text.strip()
    calls = [c["function"] for c in parsed.get("tool_calls", ())]
    lines = [json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False) for c in calls]
    return "\n".join(([parsed["content"]] if parsed["content"] else []) + lines)


def next_history(tok, messages: list[dict], text: str) -> list[dict]:
    """The conversation with the reply appended, the way the family's chat() keeps it (GLM-4.5: as the assistant
    message its template takes, reasoning and tool calls included)."""
    if tok.chat_format == "glm4_5":
        try:
            return tok.process_response(text, messages)[1]
        except ValueError:  # a malformed tool call: keep the text as it is
            return messages + [{"role": "assistant", "content": text.strip()}]
    if tok.chat_format in ("chatglm3", "glm4"):
        try:
            return tok.process_response(text, messages)[1]
        except ValueError:  # a tool call whose arguments do not parse: keep the text as it is
            return messages + [{"role": "assistant", "metadata": "", "content": text.strip()}]
    return messages + [{"role": "assistant", "content": tok.parse_response(text)["content"]}]

"""Response post-processing of the GLM families: the model classes' process_response and the demo servers'.

Each function reproduces its reference value for value; `eval` of ChatGLM3 tool calls is replaced by a
safe parse of `tool_call(key=literal, ...)`.
"""

from __future__ import annotations

import ast
import copy
import json
import re

_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def chatglm_process_response(response: str) -> str:
    """ChatGLM-6B: strip, fill in the training date, half-width punctuation next to CJK to full-width."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCT:
        response = re.sub(r"([\u4e00-\u9fff])" + half, "\\1" + full, response)
        response = re.sub(half + r"([\u4e00-\u9fff])", full + "\\1", response)
    return response


def chatglm2_process_response(response: str) -> str:
    """ChatGLM2: strip and fill in the training date."""
    return response.strip().replace("[[训练时间]]", "2023年")


def parse_tool_call_code(code: str) -> dict:
    """Keyword arguments of a `tool_call(k=v, ...)` expression whose values are Python literals."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not a tool_call(...) expression: {code!r}") from e
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"):
        raise ValueError(f"not a tool_call(...) expression: {code!r}")
    if node.args or any(kw.arg is None for kw in node.keywords):
        raise ValueError(f"tool_call takes keyword arguments only: {code!r}")
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError as e:
        raise ValueError(f"tool_call arguments must be literals: {code!r}") from e


def _segments(output: str):
    """(metadata, content) per '<|assistant|>' segment; a segment without newline is plain text."""
    for seg in output.split("<|assistant|>"):
        yield seg.split("\n", maxsplit=1) if "\n" in seg else ("", seg)


def _code_block_body(content: str) -> str:
    return "\n".join(content.split("\n")[1:-1])  # drop the ```python fence lines


def _has_tools(history) -> bool:
    return bool(history) and history[0].get("role") == "system" and "tools" in history[0]


def _model_process_response(output: str, history: list, parse_call):
    """The model classes' process_response: (response, new_history); with tools, a call gives {name, parameters}."""
    content, history = "", copy.deepcopy(history)
    for metadata, content in _segments(output):
        history.append(
            {"role": "assistant", "metadata": metadata, "content": content.strip() if not metadata.strip() else content}
        )
        if not metadata.strip():
            content = content.strip().replace("[[训练时间]]", "2023年")
        elif _has_tools(history):
            content = {"name": metadata.strip(), "parameters": parse_call(content)}
        else:
            content = {"name": metadata.strip(), "content": content}
    return content, history


def chatglm3_process_response(output: str, history: list):
    """ChatGLM3 model.process_response; a tool call is Python code `tool_call(k=v, ...)` in a code block."""
    return _model_process_response(output, history, lambda c: parse_tool_call_code(_code_block_body(c)))


def chatglm3_openai_process_response(output: str, use_tool: bool = False):
    """ChatGLM3 openai_api_demo process_response: str, or {name, arguments (JSON string)} / {name, content}."""
    content = ""
    for metadata, content in _segments(output):
        if not metadata.strip():
            content = content.strip().replace("[[训练时间]]", "2023年")
        elif use_tool:
            params = parse_tool_call_code(_code_block_body(content))
            content = {"name": metadata.strip(), "arguments": json.dumps(params, ensure_ascii=False)}
        else:
            content = {"name": metadata.strip(), "content": content}
    return content


def glm4_process_response(output: str, history: list):
    """GLM-4 model.process_response; a tool call's arguments are JSON."""
    return _model_process_response(output, history, json.loads)


_BROWSER_SEARCH = re.compile(r'search\("(.+?)"\s*,\s*recency_days\s*=\s*(\d+)\)')


def glm4_openai_process_response(output: str, tools=None, use_tool: bool = False):
    """GLM-4 basic_demo/openai_api_server.py process_response: stripped text or {name, arguments}."""
    lines = output.strip().split("\n")
    special_tools = ["cogview", "simple_browser"]
    names = {tool["function"]["name"] for tool in tools or () if "function" in tool}
    if len(lines) >= 2 and lines[1].startswith("{"):
        function_name = lines[0].strip()
        arguments = "\n".join(lines[1:]).strip()
        if function_name in names or function_name in special_tools:
            arguments_json = None
            try:
                arguments_json = json.loads(arguments)
                is_tool_call = True
            except json.JSONDecodeError:
                is_tool_call = function_name in special_tools
            if is_tool_call and use_tool:
                content = {
                    "name": function_name,
                    "arguments": json.dumps(
                        arguments_json if isinstance(arguments_json, dict) else arguments, ensure_ascii=False
                    ),
                }
                if function_name == "simple_browser":
                    match = _BROWSER_SEARCH.match(arguments)
                    if match:
                        content["arguments"] = json.dumps(
                            {"query": match.group(1), "recency_days": int(match.group(2))}, ensure_ascii=False
                        )
                elif function_name == "cogview":
                    content["arguments"] = json.dumps({"prompt": arguments}, ensure_ascii=False)
                return content
    return output.strip()


# a history whose first message offers tools: parse_response's default, so calls are recognised
TOOLS_HISTORY = [{"role": "system", "content": "", "tools": []}]


def as_parsed(response) -> dict:
    """Normalise a process_response result: text -> {"content": text}; dicts pass through."""
    return dict(response) if isinstance(response, dict) else {"content": response}


def parse_with(process, text: str, history=None) -> dict:
    """Run a model process_response; a call that does not parse falls back to {name, content}."""
    history = TOOLS_HISTORY if history is None else history
    try:
        response, _ = process(text, history)
    except ValueError:  # json.JSONDecodeError is a ValueError
        metadata, content = next(_segments(text.split("<|assistant|>")[-1]))
        return {"name": metadata.strip(), "content": content}
    return as_parsed(response)

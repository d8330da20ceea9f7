"""Chat prompt formats of the GLM families, written in Python (no jinja)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from glm_jax.tokenizers.base import check_messages

# ---------------------------------------------------------------- ChatGLM-6B / ChatGLM2 "[Round n]"


def messages_to_query_history(messages: Sequence[dict]) -> tuple[str, list[tuple[str, str]]]:
    """Split alternating user/assistant messages ending with a user message into (query, history)."""
    msgs = check_messages(messages)
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("ChatGLM-6B/ChatGLM2 prompts need messages that end with a user message")
    body = msgs[:-1]
    pairs = list(zip(body[::2], body[1::2]))
    if len(body) % 2 or any(u["role"] != "user" or a["role"] != "assistant" for u, a in pairs):
        raise ValueError(
            "ChatGLM-6B/ChatGLM2 prompts take only alternating user/assistant messages "
            "(no system, observation or tools)"
        )
    return msgs[-1].get("content") or "", [(u.get("content") or "", a.get("content") or "") for u, a in pairs]


def chatglm_prompt(query: str, history: Sequence[Sequence[str]] = ()) -> str:
    """ChatGLM-6B chat(): bare query on the first turn, else '[Round i]' rounds counted from 0."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def chatglm2_prompt(query: str, history: Sequence[Sequence[str]] = ()) -> str:
    """ChatGLM2 build_prompt: '[Round i]' rounds counted from 1, double newlines."""
    prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def chatglm2_stream_prompt(query: str, history: Sequence[Sequence[str]]) -> str:
    """ChatGLM2 build_stream_inputs with a cache: only the new round, led by the separator."""
    return f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："


# ---------------------------------------------------------------- ChatGLM3 / GLM-4 messages


def single_message_ids(role_id: int, metadata: str, content: str, encode: Callable[[str], list]) -> list[int]:
    """build_single_message: role token, encode(metadata + newline), encode(content) (two encode calls)."""
    return [role_id] + encode(f"{metadata}\n") + encode(content)


def message_metadata(m: dict) -> str:
    # None is taken as "" (the reference templates would print "None").
    return m.get("metadata") or ""


def chatglm3_content(m: dict) -> str:
    """Content of a ChatGLM3 message; a system message's tools are appended as indented JSON."""
    content = m.get("content") or ""
    if m["role"] == "system" and "tools" in m:
        content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
    return content


GLM4_PREAMBLE = (
    "你是一个名为 {name} 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
GLM4_FUNCTION_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
GLM4_PYTHON_TOOL = (
    "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
)
GLM4_SIMPLE_BROWSER_TOOL = (
    "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n"
    "\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n"
    "\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
)
GLM4_COGVIEW_TOOL = (
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发送图像描述，规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
)
GLM4_BUILTIN_TOOLS = {
    "python": GLM4_PYTHON_TOOL,
    "simple_browser": GLM4_SIMPLE_BROWSER_TOOL,
    "cogview": GLM4_COGVIEW_TOOL,
}

# GLM-4 template variants:
#   "jinja"        the tokenizer_config.json chat template as transformers >= 4.42 renders it (main reference):
#                  trim_blocks eats one newline after each tool tag, tojson = json.dumps(ensure_ascii=False, indent=4)
#   "jinja_tf440"  the same template under transformers 4.40: jinja's own tojson (sorted keys, ASCII, HTML-safe)
#   "python"       the earlier remote code's Python apply_chat_template: "\n\n## name", "GhatGLM" typo,
#                  tools only when the list is non-empty, each message encoded in two separate calls
GLM4_TEMPLATE_VARIANTS = ("jinja", "jinja_tf440", "python")


def _glm4_tojson(obj, variant: str) -> str:
    if variant == "jinja_tf440":  # jinja2.utils.htmlsafe_json_dumps with sort_keys=True
        text = json.dumps(obj, sort_keys=True, indent=4)
        for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
            text = text.replace(a, b)
        return text
    return json.dumps(obj, ensure_ascii=False, indent=4)


def glm4_tools_prompt(tools: Sequence[dict], variant: str = "jinja") -> str:
    """Content of the system block GLM-4 emits for a message with `tools`."""
    python = variant == "python"
    head = "\n\n## " if python else "\n## "
    text = GLM4_PREAMBLE.format(name="GhatGLM" if python else "ChatGLM") + "\n\n# 可用工具"
    for tool in tools:
        kind = tool.get("type")
        if kind == "function":
            fn = tool["function"]
            text += f"{head}{fn['name']}\n\n{_glm4_tojson(fn, variant)}{GLM4_FUNCTION_SUFFIX}"
        elif kind in GLM4_BUILTIN_TOOLS:
            text += f"{head}{kind}\n\n{GLM4_BUILTIN_TOOLS[kind]}"
        elif python:
            raise ValueError(f"unknown GLM-4 tool type {kind!r}")
        # the jinja template silently skips unknown tool types
    return text


def glm4_blocks(messages: Sequence[dict], variant: str = "jinja") -> list[tuple[str, str, str]]:
    """(role, metadata, content) blocks of a GLM-4 conversation; empty or null contents are left out."""
    if variant not in GLM4_TEMPLATE_VARIANTS:
        raise ValueError(f"unknown GLM-4 template variant {variant!r}; expected one of {GLM4_TEMPLATE_VARIANTS}")
    blocks = []
    for m in check_messages(messages):
        if bool(m.get("tools")) if variant == "python" else "tools" in m:
            blocks.append(("system", "", glm4_tools_prompt(m.get("tools") or [], variant)))
        if m.get("content"):
            blocks.append((m["role"], message_metadata(m), m["content"]))
    return blocks


def glm4_render(
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    variant: str = "jinja",
    add_special_tokens: bool = True,
) -> str:
    """The prompt text; "[gMASK]<sop>" is literal template text (only the python variant drops it on request)."""
    blocks = glm4_blocks(messages, variant)
    prefix = "[gMASK]<sop>" if add_special_tokens or variant != "python" else ""
    body = "".join(f"<|{role}|>{meta}\n{content}" for role, meta, content in blocks)
    return prefix + body + ("<|assistant|>" if add_generation_prompt else "")

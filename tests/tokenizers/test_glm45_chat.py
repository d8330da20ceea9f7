"""GLM-4.5/4.6/4.7 chat (chat_format "glm4_5", template variants glm4.5 and glm4.7) against transformers rendering
the released chat_template.jinja files on the stand-in tokenizer of fixtures/glm4-moe-chat (see its MANIFEST.md):
text for text, id for id; and the reply parser (<think> reasoning, XML tool calls)."""

import copy
import functools
import pickle

import helpers
import pytest

from glm_jax.families import glm4_moe
from glm_jax.tokenizers import load_tokenizer
from glm_jax.tokenizers.glm45 import GLM45Tokenizer
from glm_jax.tokenizers.glm45_chat import parse_response, render

FIX = helpers.FIX / "glm4-moe-chat"
TEMPLATES = {"glm4.5": "GLM-4.6.chat_template.jinja", "glm4.7": "GLM-4.7-Flash.chat_template.jinja"}
VARIANTS = sorted(TEMPLATES)


@functools.cache
def ours(variant="glm4.5"):
    if variant == "glm4.5":
        return load_tokenizer(FIX)  # the folder has no chat_template.jinja: the GLM-4.5/4.6 layout
    return GLM45Tokenizer(str(FIX / "tokenizer.json"), template_variant=variant)


@functools.cache
def reference(variant="glm4.5"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FIX), local_files_only=True)
    tok.chat_template = (FIX / TEMPLATES[variant]).read_text(encoding="utf-8")
    return tok


def ref_render(
    messages,
    tools=None,
    add_generation_prompt=True,
    enable_thinking=None,
    tokenize=False,
    variant="glm4.5",
    clear_thinking=None,
):
    """transformers' apply_chat_template with the released template; a flag left None is not passed at all."""
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if clear_thinking is not None:
        kw["clear_thinking"] = clear_thinking
    if tools is not None:
        kw["tools"] = tools
    out = reference(variant).apply_chat_template(
        copy.deepcopy(messages), tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kw
    )
    return list(out["input_ids"]) if tokenize else out


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather of a city — 天气 <b>&'\"",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "code": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}
VALUES = {  # every JSON type, unicode, newlines and markup in values
    "s": "北京 <b>",
    "empty": "",
    "multi": "line1\nline2\n",
    "i": 7,
    "f": 2.5,
    "t": True,
    "n": None,
    "list": [1, "é", {"k": None}],
    "obj": {"a": "ü", "b": [False]},
}

CASES = {
    "user": [{"role": "user", "content": "What is the weather in Paris?"}],
    "system_user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 北京"}],
    "multi_turn": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "  a2 \n"},
    ],
    "history_reasoning_dropped": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "\n r2 \n"},
    ],
    "think_in_content": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "\n\n<think>\nstep 1\n\n</think>\n\n answer \n"},
    ],
    "think_in_content_history": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>old</think>old answer"},
        {"role": "user", "content": "again"},
    ],
    "two_think_blocks": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>a<think>b\n</think>mid</think>\nend"},
    ],
    "reasoning_wins_over_content_think": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>in content</think>text", "reasoning_content": "field"},
    ],
    "blank_reasoning": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x", "reasoning_content": "   "},
    ],
    "reasoning_aliases": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x", "thinking": "t1"},
        {"role": "assistant", "content": "y", "reasoning": "t2"},
    ],
    "assistants_after_last_user": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>t1</think>r1"},
        {"role": "assistant", "content": "r2", "reasoning_content": "t2"},
    ],
    "tool_call_round": [
        {"role": "system", "content": "You can look things up."},
        {"role": "user", "content": "Weather in Paris for 3 days?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "need tool", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 24, "sky": "晴"}'},
        {"role": "assistant", "content": "Sunny, 24 degrees."},
    ],
    "all_value_types": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": VALUES}}]},
    ],
    "parallel_calls_grouped_results": [
        {"role": "user", "content": "two cities"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
                {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},  # bare form
                {"function": {"name": "add", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "r1", "tool_call_id": "c1"},
        {"role": "tool", "content": "r2"},
        {"role": "tool", "content": "r3"},
        {"role": "user", "content": "thanks"},
        {"role": "tool", "content": "late"},
    ],
    "call_without_arguments": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": None}}, {"name": "add"}]},
    ],
    "tool_list_content": [
        {"role": "user", "content": "q"},
        {"role": "tool", "content": [{"output": "o1"}, "plain", {"other": 1}, {"output": 5}]},
        {"role": "tool", "content": [{"output": "o2"}]},
        {"role": "tool", "content": "after a list"},
        {"role": "tool", "content": []},
    ],
    "tool_first": [{"role": "tool", "content": "orphan"}, {"role": "user", "content": "q"}],
    "content_parts": [
        {"role": "system", "content": [{"type": "text", "text": "sys "}, "part"]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "look "}, {"type": "image_url"}, "here", {"type": "text"}, 3],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "<think>r</think>ok"}]},
    ],
    "none_and_absent": [
        {"role": "system", "content": None},
        {"role": "user"},
        {"role": "assistant", "content": None, "tool_calls": None, "reasoning_content": None},
        {"role": "tool", "content": None},
        {"role": "user", "content": ""},
    ],
    "nothink_already": [{"role": "user", "content": "quick /nothink"}, {"role": "user", "content": "x/nothink"}],
    "mapping_content": [{"role": "user", "content": {"k": "v"}}],
}
TOOLSETS = {"no_tools": None, "tools": [WEATHER, ADD], "empty_tools": []}


TEMPLATE_FAILS = {("glm4.7", "call_without_arguments")}  # GLM-4.7 iterates a call's arguments, None too


@pytest.mark.parametrize("thinking", [None, False, True], ids=["thinking_unset", "thinking_off", "thinking_on"])
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "no_gen"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_released_template(variant, case, gen, thinking):
    messages, tok = CASES[case], ours(variant)
    tool_sets = ("no_tools", "tools") if case in ("user", "tool_call_round", "none_and_absent") else ("no_tools",)
    clear_flags = (None, False) if variant == "glm4.7" else (None,)  # GLM-4.7: clear_thinking=False keeps all
    for tools_id in tool_sets:
        for clear in clear_flags:
            tools, where = TOOLSETS[tools_id], f"{tools_id}, clear_thinking={clear}"
            if (variant, case) in TEMPLATE_FAILS:  # the template itself fails: so must we, with a ValueError
                with pytest.raises(Exception, match="'None' has no attribute 'items'"):
                    ref_render(messages, tools, gen, thinking, False, variant, clear)
                with pytest.raises(ValueError, match="GLM-4.7's template needs 'arguments'"):
                    tok.render_chat(messages, gen, tools, thinking, clear)
                continue
            want = ref_render(messages, tools, gen, thinking, False, variant, clear)
            assert tok.render_chat(messages, gen, tools, thinking, clear) == want, where
            ids = tok.apply_chat_template(messages, gen, tools, thinking, clear)
            assert ids == ref_render(messages, tools, gen, thinking, True, variant, clear), where
            assert [i for _, part in tok.chat_segments(messages, gen, tools, thinking, clear) for i in part] == ids


def golden_cases():
    import json

    data = json.loads((FIX / "golden.json").read_text(encoding="utf-8"))
    return [pytest.param(c, id=c["id"]) for c in data["cases"]]


@pytest.mark.parametrize("case", golden_cases())
def test_matches_stored_golden(case):
    """The prompts transformers 5.24 rendered (make_golden.py), stored: pinned even if transformers changes."""
    tok = ours(case["variant"])
    args = (case["tools"], case["enable_thinking"], case["clear_thinking"])
    assert tok.render_chat(case["messages"], case["add_generation_prompt"], *args) == case["text"]
    assert tok.apply_chat_template(case["messages"], case["add_generation_prompt"], *args) == case["input_ids"]


@pytest.mark.parametrize("tools_id", sorted(TOOLSETS))
def test_tools_on_system_message_equal_tools_argument(tools_id):
    """DESIGN §3.4 puts tools on the system message; the template takes them apart, before the messages."""
    tools, tok = TOOLSETS[tools_id], ours()
    chat = [{"role": "user", "content": "q"}]
    with_system = [{"role": "system", "content": "sys", "tools": tools}] + chat
    plain_system = [{"role": "system", "content": "sys"}] + chat
    assert tok.render_chat(with_system) == ref_render(plain_system, tools)
    if tools is not None:  # a system message holding only tools adds no block of its own
        only_tools = [{"role": "system", "tools": tools}] + chat
        assert tok.apply_chat_template(only_tools) == ref_render(chat, tools, tokenize=True)


def test_tool_json_is_transformers_tojson():
    text = render([{"role": "user", "content": "q"}], tools=[WEATHER])
    assert '"description": "Get the weather of a city — 天气 <b>&\'\\""' in text  # ensure_ascii=False, no escaping
    assert text == ref_render([{"role": "user", "content": "q"}], [WEATHER])


TEXTS = ["", "hello world", "北京今天天气晴朗 🚀", "a\n\n  b\t\r\n", "<think>x</think><|user|>/nothink<arg_key>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(text):
    tok, ref = ours(), reference()
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.tokenize(text) == ref.tokenize(text)


def test_loader_and_family():
    tok = ours()
    assert isinstance(tok, GLM45Tokenizer) and tok.chat_format == "glm4_5"
    assert glm4_moe.FAMILY.chat_formats == ("glm4_5",)
    st = tok.special_tokens
    assert st["<|endoftext|>"] == 558 and st["<arg_key>"] == 558 + 27 and len(tok) == 594
    assert tok.stop_tokens == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert tok.token_to_id("<tool_call>") == st["<tool_call>"]
    assert load_tokenizer(FIX / "tokenizer.json").chat_format == "glm4_5"
    assert load_tokenizer(FIX, chat_format="glm4_5").encode("hi") == tok.encode("hi")
    with pytest.raises(ValueError, match="does not fit"):
        load_tokenizer(FIX / "tokenizer.json", chat_format="glm4")
    with pytest.raises(FileNotFoundError, match="needs tokenizer.model"):
        load_tokenizer(FIX, chat_format="glm4")
    copied = pickle.loads(pickle.dumps(tok))
    assert copied.apply_chat_template(CASES["tool_call_round"]) == tok.apply_chat_template(CASES["tool_call_round"])
    with pytest.raises(ValueError, match="unknown GLM-4.5 template variant"):
        GLM45Tokenizer(str(FIX / "tokenizer.json"), template_variant="glm4.6")


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_template_variant_inferred_from_the_folder(tmp_path, variant, where):
    """A checkpoint folder carries its template (chat_template.jinja, or tokenizer_config.json's chat_template):
    GLM-4.7's reads clear_thinking."""
    import json
    import shutil

    shutil.copy(FIX / "tokenizer.json", tmp_path / "tokenizer.json")
    template = (FIX / TEMPLATES[variant]).read_text(encoding="utf-8")
    cfg = json.loads((FIX / "tokenizer_config.json").read_text(encoding="utf-8"))
    if where == "chat_template.jinja":
        (tmp_path / where).write_text(template, encoding="utf-8")
    else:
        cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == "glm4_5" and tok.template_variant == variant
    messages = CASES["tool_call_round"]
    assert tok.apply_chat_template(messages) == ref_render(messages, tokenize=True, variant=variant)


def test_other_tokenizer_json_is_not_glm45(tmp_path):
    """A tokenizer.json without GLM-4.5's tool tokens (GLM-4-0414's...) has no glm-jax chat format."""
    import json

    data = json.loads((FIX / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<arg_key>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="GLM-4.5 tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no <arg_key>"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="added tokens missing"):
        load_tokenizer(tmp_path, chat_format="glm4_5")
    (tmp_path / "tokenizer.json").write_text('{"added_tokens": [{"content": "<arg_key>"}]}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        GLM45Tokenizer(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "messages, match",
    [
        ({"role": "user", "content": "x"}, "must be a list"),
        ([], "empty conversation"),
        (["hi"], "must be a dict with a 'role'"),
        ([{"role": "observation", "content": "x"}], "calls tool results 'tool'"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}], "json.loads"),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], "'name' string"),
        ([{"role": "assistant", "tool_calls": {"name": "f"}}], "must be a list"),
        ([{"role": "assistant", "tool_calls": ["f"]}], "must be a dict"),
        ([{"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"x": object()}}]}], "JSON-serialisable"),
        ([{"role": "tool", "content": 5}], "string or a list"),
    ],
)
def test_bad_messages_raise(messages, match):
    with pytest.raises(ValueError, match=match):
        ours().apply_chat_template(messages)


@pytest.mark.parametrize(
    "tools, match",
    [
        ({"type": "function"}, "must be a list of tool schemas"),
        (["get_weather"], r"tools\[0\] must be a JSON schema dict"),
        ([WEATHER, 3], r"tools\[1\] must be a JSON schema dict"),
    ],
)
def test_bad_tools_raise(tools, match):
    messages = [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match=match):
        ours().apply_chat_template(messages, tools=tools)
    with pytest.raises(ValueError, match="must be a list|must be a JSON schema"):
        ours().apply_chat_template([{"role": "system", "content": "s", "tools": tools}] + messages)


def test_unexpected_keyword_raises():
    with pytest.raises(TypeError, match="template_variant"):
        ours().apply_chat_template([{"role": "user", "content": "x"}], template_variant="jinja")


# ---------------------------------------------------------------- replies


def reply_text(conversation, message, tools=None, variant="glm4.5"):
    """What follows "<|assistant|>" for `message` in the released template's rendering: the model's reply (GLM-4.7's
    generation prompt also holds the "<think>" that opens it)."""
    prompt = ref_render(conversation, tools, False, variant=variant) + "<|assistant|>"
    full = ref_render(conversation + [message], tools, False, variant=variant)
    assert full.startswith(prompt)
    return full[len(prompt) :]


ROUND_TRIPS = {
    "content": ({"content": "Plain answer."}, None),
    "reasoning": ({"content": "Answer.", "reasoning_content": "I think so."}, None),
    "empty_reasoning_call_only": (
        {"content": "", "reasoning_content": "", "tool_calls": [CALL]},
        [WEATHER],
    ),
    "typed_strings_kept": (  # with the schema, string parameters that look like JSON stay strings
        {
            "content": "Checking.",
            "reasoning_content": "call twice",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "42", "code": "null"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}},
            ],
        },
        [WEATHER],
    ),
    "all_values_without_schema": (
        {
            "content": "",
            "reasoning_content": "r",
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {k: v for k, v in VALUES.items()}}}
            ],
        },
        None,
    ),
    "no_arguments": (
        {"content": "x", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {}}}]},
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_parse_round_trip(variant, case):
    """parse(render(message)) gives the message back, and rendering the parse gives the same text again."""
    message, tools = ROUND_TRIPS[case]
    conversation = [{"role": "user", "content": "q"}]
    text = reply_text(conversation, {"role": "assistant", **message}, tools, variant)
    parsed = ours(variant).parse_response(text, tools=tools)
    expected = dict(message)
    expected.setdefault("reasoning_content", "")
    if message.get("tool_calls"):  # the first call also in the shape of the other formats' parse_response
        first = message["tool_calls"][0]["function"]
        expected.update(name=first["name"], parameters=first["arguments"])
    assert parsed == expected
    parsed = {k: v for k, v in parsed.items() if k not in ("name", "parameters")}
    again = ref_render(conversation + [{"role": "assistant", **parsed}], tools, False, variant=variant)
    assert again == ref_render(conversation + [{"role": "assistant", **message}], tools, False, variant=variant)


def test_parse_values_rule():
    """Without a schema a value is JSON when it parses (the template writes non-strings with tojson), else text."""
    text = (
        "<tool_call>f\n<arg_key>n</arg_key>\n<arg_value>42</arg_value>\n<arg_key>s</arg_key>\n<arg_value>Paris"
        '</arg_value>\n<arg_key>j</arg_key>\n<arg_value>{"a": [1, 2]}</arg_value>\n<arg_key>bad</arg_key>\n'
        '<arg_value>{not json</arg_value>\n<arg_key>q</arg_key>\n<arg_value>"quoted"</arg_value>\n</tool_call>'
    )
    args = parse_response(text)["tool_calls"][0]["function"]["arguments"]
    assert args == {"n": 42, "s": "Paris", "j": {"a": [1, 2]}, "bad": "{not json", "q": "quoted"}
    typed = parse_response(text, tools=[{"name": "f", "parameters": {"properties": {"n": {"type": "string"}}}}])
    assert typed["tool_calls"][0]["function"]["arguments"]["n"] == "42"  # bare schemas work too


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\nHello there.", {"content": "Hello there."}),
        ("\n<think>Let me see.\n</think>\nSure.<|user|>", {"content": "Sure.", "reasoning_content": "Let me see."}),
        ("<think>cut off mid-thought", {"content": "", "reasoning_content": "cut off mid-thought"}),
        (
            "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call><|observation|>",
            {
                "content": "",
                "reasoning_content": "",
                "tool_calls": [CALL],
                "name": "get_weather",
                "parameters": {"city": "Paris", "days": 3},
            },
        ),
        ("Thought it through.</think>Done.", {"content": "Done.", "reasoning_content": "Thought it through."}),
        (  # GLM-4.7's layout (no newlines inside the call)
            "Ok<tool_call>add<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>b</arg_key><arg_value>x y"
            "</arg_value></tool_call>\n<tool_call>add</tool_call>",
            {
                "content": "Ok",
                "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": "x y"}}},
                    {"type": "function", "function": {"name": "add", "arguments": {}}},
                ],
                "name": "add",
                "parameters": {"a": 1, "b": "x y"},
            },
        ),
    ],
)
def test_parse_model_outputs(text, expected):
    assert ours().parse_response(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>", "unclosed <tool_call>"),
        ("<tool_call>f\n<arg_key>a</arg_key>\n</tool_call>", "expected <arg_key>k</arg_key><arg_value>v"),
        ("<tool_call>f\n<arg_value>1</arg_value>\n</tool_call>", "expected <arg_key>"),
        ("<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>", "without a valid function name"),
        ("<tool_call>two words\nmore</tool_call>", "without a valid function name"),
        ("<tool_call>f</tool_call> and then text", "text after the tool calls"),
        ("<tool_call>f</tool_call>junk<tool_call>g</tool_call>", "text between tool calls"),
        ("<tool_call>f<tool_call>g</tool_call>", "inside a tool call"),
        (
            "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key><arg_value>2</arg_value></tool_call>",
            "given twice",
        ),
        ("preface <think>late</think>", None),
        ("preface <think>never closed", "text before <think>"),
    ],
)
def test_parse_malformed_raises(text, match):
    if match is None:  # text before a closed think block is dropped like the template drops it
        assert parse_response(text) == {"content": "", "reasoning_content": "late"}
        return
    with pytest.raises(ValueError, match=match):
        parse_response(text)


def test_parse_uses_history_tools_and_process_response():
    tok = ours()
    history = [{"role": "system", "content": "s", "tools": [WEATHER]}, {"role": "user", "content": "q"}]
    text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>2024</arg_value>\n</tool_call>"
    parsed, new_history = tok.process_response(text, history)
    assert parsed["tool_calls"][0]["function"]["arguments"] == {"city": "2024"}
    assert (parsed["name"], parsed["parameters"]) == ("get_weather", {"city": "2024"})  # the other formats' shape
    message = {k: v for k, v in parsed.items() if k not in ("name", "parameters")}
    assert new_history[-1] == {"role": "assistant", **message} and len(new_history) == 3


# ---------------------------------------------------------------- glm-generate


def test_cli_glm45_tools_reply_and_history(monkeypatch, tmp_path):
    """glm-generate's pieces on the glm4_5 format: --tools in OpenAI form, the prompt, the printed reply (content,
    then one JSON line per call), the history the next turn renders."""
    import io
    import json
    import types

    from glm_jax import cli_generate, stream
    from glm_jax.config import GLMConfig

    tok = ours()
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([WEATHER["function"]]), encoding="utf-8")
    tools = cli_generate.read_tools(str(f), "glm4_5")
    assert tools == [WEATHER]
    system = cli_generate.system_messages(tok, None, tools)
    messages = system + [{"role": "user", "content": "Weather in Paris?"}]
    assert cli_generate.prompt_ids(tok, messages) == ref_render(messages[1:], [WEATHER], tokenize=True)
    reply = (
        "\n<think>need the tool</think>\nChecking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>2024</arg_value>\n</tool_call>"
    )
    call_line = json.dumps({"name": "get_weather", "parameters": {"city": "2024"}})  # a string per the schema
    assert cli_generate.format_response(tok, reply, system).splitlines() == ["Checking.", call_line]
    assert cli_generate.format_response(tok, "\nplain <tool_call>broken") == "plain <tool_call>broken"
    history = cli_generate.next_history(tok, messages, reply)
    assert history[-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "2024"}}
    follow = history + [{"role": "tool", "content": "sunny"}]
    assert tok.apply_chat_template(follow) == ref_render(follow[1:], [WEATHER], tokenize=True)
    # the Session's reply path, on the ids of that reply
    monkeypatch.setattr(stream, "stream_generate", lambda *a, **k: iter(tok.encode(reply)))
    lm = types.SimpleNamespace(config=GLMConfig(vocab_size=1024))  # no params: stream_generate is replaced
    args = cli_generate.build_parser().parse_args(["x", "--prompt", "q"])
    out = io.StringIO()
    session = cli_generate.Session(lm, tok, args, out, io.StringIO())
    session.tools, session.system = tools, system
    session.answer(messages)
    assert out.getvalue().splitlines() == ["Checking.", call_line]


def test_post_processor_prefix(tmp_path):
    """A tokenizer.json whose post-processor adds [gMASK] <sop> (as GLM-4's -hf tokenizers do): encode with special
    tokens is transformers' tokenizer(text), and prefix_ids says what it puts in front; chat ids never get it."""
    import json
    import shutil

    from transformers import AutoTokenizer

    data = json.loads((FIX / "tokenizer.json").read_text(encoding="utf-8"))
    st = ours().special_tokens
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
            {"SpecialToken": {"id": "<sop>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {name: {"id": name, "ids": [st[name]], "tokens": [name]} for name in ("[gMASK]", "<sop>")},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    shutil.copy(FIX / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    tok, ref = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok.prefix_ids == [st["[gMASK]"], st["<sop>"]] and tok.suffix_ids == []
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"]
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    ref.chat_template = (FIX / TEMPLATES["glm4.5"]).read_text(encoding="utf-8")
    messages = CASES["tool_call_round"]
    want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert tok.apply_chat_template(messages) == list(want)

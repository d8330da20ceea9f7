"""Chat prompts and response parsing against the golden chat-templates fixtures (chat*.json, postprocess.json)."""

import functools
import json

import helpers
import numpy as np
import pytest

from glm_jax.tokenizers import load_tokenizer, tool_parse
from glm_jax.tokenizers.templates import chatglm3_content, message_metadata

FIXTURES = helpers.FIX / "chat-templates"
V1, V2, V3, V4 = "chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"


@functools.cache
def tokenizer(family: str, **kwargs):
    return load_tokenizer(FIXTURES / family, **kwargs)


def cases(family: str, name: str, key: str):
    """pytest params, one per case of fixture file `name` under `key` (dotted for nesting)."""
    with open(FIXTURES / family / name, encoding="utf-8") as f:
        data = json.load(f)
    for part in key.split("."):
        data = data[part]
    return [pytest.param(c, id=f"{family}/{name}/{key}/{c.get('id', i)}") for i, c in enumerate(data)]


def pairs_to_messages(query, history):
    msgs = []
    for q, r in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return msgs + [{"role": "user", "content": query}]


# ---------------------------------------------------------------- ChatGLM-6B


@pytest.mark.parametrize("case", cases(V1, "chat.json", "prompt_cases"))
def test_chatglm_prompt(case):
    tok = tokenizer(V1)
    assert tok.build_prompt(case["query"], case["history"]) == case["prompt"]
    ids = tok.apply_chat_template(pairs_to_messages(case["query"], case["history"]))
    assert ids == case["input_ids"]
    assert tok.decode(ids) == case["decoded"]


@pytest.mark.parametrize("case", cases(V1, "chat.json", "batch_padding.cases"))
def test_chatglm_batch_padding(case):
    out = tokenizer(V1).batch_encode(case["texts"])
    np.testing.assert_array_equal(out["input_ids"], case["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], case["attention_mask"])
    np.testing.assert_array_equal(out["position_ids"], case["position_ids"])


@pytest.mark.parametrize("case", cases(V1, "postprocess.json", "process_response"))
def test_chatglm_process_response(case):
    assert tool_parse.chatglm_process_response(case["input"]) == case["output"]
    assert tokenizer(V1).parse_response(case["input"]) == {"content": case["output"]}


@pytest.mark.parametrize("case", cases(V1, "postprocess.json", "decode_then_process_response"))
def test_chatglm_decode_then_process(case):
    tok = tokenizer(V1)
    assert tok.decode(case["generated_ids"]) == case["decoded"]
    assert tok.process_response(case["decoded"]) == case["response"]


# ---------------------------------------------------------------- ChatGLM2


@pytest.mark.parametrize("case", cases(V2, "chat.json", "prompt_cases"))
def test_chatglm2_prompt(case):
    tok = tokenizer(V2)
    assert tok.build_prompt(case["query"], case["history"]) == case["prompt"]
    ids = tok.apply_chat_template(pairs_to_messages(case["query"], case["history"]))
    assert ids == case["input_ids"]
    assert tok.decode(ids) == case["decoded"]
    out = tok.pad([ids])
    assert out["attention_mask"].tolist() == [case["attention_mask"]]
    assert out["position_ids"].tolist() == [case["position_ids"]]
    if "stream_with_past_key_values" in case:
        stream = case["stream_with_past_key_values"]
        ids = tok.build_stream_inputs(case["query"], case["history"])
        assert ids == stream["input_ids"]
        assert tok.pad([ids])["position_ids"].tolist() == [stream["position_ids_before_offset"]]
    else:
        assert tok.build_stream_inputs(case["query"], case["history"]) == case["input_ids"]


@pytest.mark.parametrize("case", cases(V2, "chat.json", "batch_padding.cases"))
def test_chatglm2_batch_padding(case):
    out = tokenizer(V2).batch_encode(case["texts"])
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key].tolist() == case[key], key


@pytest.mark.parametrize("case", cases(V2, "postprocess.json", "process_response"))
def test_chatglm2_process_response(case):
    assert tool_parse.chatglm2_process_response(case["input"]) == case["output"]
    assert tokenizer(V2).parse_response(case["input"]) == {"content": case["output"]}


@pytest.mark.parametrize("case", cases(V2, "postprocess.json", "decode_then_process_response"))
def test_chatglm2_decode_then_process(case):
    tok = tokenizer(V2)
    assert tok.decode(case["generated_ids"]) == case["decoded"]
    assert tok.process_response(case["decoded"]) == case["response"]


# ---------------------------------------------------------------- ChatGLM3


@pytest.mark.parametrize("case", cases(V3, "chat.json", "build_chat_input_cases"))
def test_chatglm3_build_chat_input(case):
    tok = tokenizer(V3)
    history = case["history"] or []
    messages = history + [{"role": case["role"], "content": case["query"]}]
    ids = tok.apply_chat_template(messages)
    assert ids == case["input_ids"]
    out = tok.pad([ids])
    assert out["attention_mask"].tolist() == [case["attention_mask"]]
    assert out["position_ids"].tolist() == [case["position_ids"]]
    for m, item in zip(messages, case["messages_ids"], strict=True):
        assert (item["role"], item["metadata"]) == (m["role"], message_metadata(m))
        assert chatglm3_content(m) == item["content_rendered"]
        assert tok.build_single_message(m["role"], m.get("metadata", ""), item["content_rendered"]) == item["ids"]
    assert tok.decode(ids) == case["decoded"]
    assert tok.decode_sp(ids) == case["sp_tokenizer_decode"]


@pytest.mark.parametrize("case", cases(V3, "postprocess.json", "process_response"))
def test_chatglm3_process_response(case):
    response, new_history = tokenizer(V3).process_response(case["output"], case["history"])
    assert response == case["response"]
    assert new_history == case["new_history"]
    expected = case["response"] if isinstance(case["response"], dict) else {"content": case["response"]}
    assert tokenizer(V3).parse_response(case["output"], case["history"]) == expected


@pytest.mark.parametrize("case", cases(V3, "postprocess.json", "generated_ids_to_response"))
def test_chatglm3_generated_ids_to_response(case):
    tok = tokenizer(V3)
    assert tok.build_single_message("assistant", case["metadata"], case["content"])[1:] == case["generated_ids"][:-1]
    assert case["generated_ids"][-1] in tok.eos_token_ids
    decoded = tok.decode(case["generated_ids"][:-1])
    assert decoded == case["decoded_without_last_token"]
    assert tok.process_response(decoded, case["history"]) == (case["response"], case["new_history"])


@pytest.mark.parametrize("case", cases(V3, "postprocess.json", "openai_api_demo_process_response"))
def test_chatglm3_openai_demo_process_response(case):
    assert tool_parse.chatglm3_openai_process_response(case["output"], case["use_tool"]) == case["result"]


def test_chatglm3_parse_response_defaults_to_tools():
    tok = tokenizer(V3)
    assert tok.parse_response("get_weather\n ```python\ntool_call(city='北京', days=3)\n```") == {
        "name": "get_weather",
        "parameters": {"city": "北京", "days": 3},
    }
    assert tok.parse_response("interpreter\n ```python\nprint(1+1)\n```") == {
        "name": "interpreter",
        "content": " ```python\nprint(1+1)\n```",
    }
    assert tok.parse_response("\n 你好[[训练时间]] ") == {"content": "你好2023年"}
    with pytest.raises(ValueError):  # never evaluated
        tool_parse.parse_tool_call_code("__import__('os').system('true')")


# ---------------------------------------------------------------- GLM-4

# chat.json is transformers 4.44 rendering the jinja template (the default, "jinja"); the two variant files are
# matched too: transformers 4.40 ("jinja_tf440": jinja's own tojson) and the Python override ("python").
GLM4_FILES = {
    "chat.json": "jinja",
    "chat_variant_transformers_4.40.0.json": "jinja_tf440",
    "chat_variant_python_apply_chat_template.json": "python",
}
GLM4_CASES = [
    pytest.param(variant, p.values[0], id=p.id)
    for name, variant in GLM4_FILES.items()
    for p in cases(V4, name, "apply_chat_template_cases")
]


@pytest.mark.parametrize("variant, case", GLM4_CASES)
def test_glm4_apply_chat_template(variant, case):
    tok = tokenizer(V4)
    kwargs = {
        "add_generation_prompt": case["add_generation_prompt"],
        "add_special_tokens": case.get("add_special_tokens", True),
        "template_variant": variant,
    }
    assert tok.render_chat(case["messages"], **kwargs) == case["text"]
    ids = tok.apply_chat_template(case["messages"], **kwargs)
    assert ids == case["input_ids"]
    assert tok.decode(ids) == case["decoded"]
    if "attention_mask" in case:
        out = tok.pad([ids])
        assert out["attention_mask"].tolist() == [case["attention_mask"]]
        assert out["position_ids"].tolist() == [case["position_ids"]]
        assert (tok.encode(case["text"]) == ids) == case["encode_of_text_equals_input_ids"]
    default = tokenizer(V4, template_variant=variant)
    assert (
        default.apply_chat_template(
            case["messages"], case["add_generation_prompt"], add_special_tokens=kwargs["add_special_tokens"]
        )
        == case["input_ids"]
    )


@pytest.mark.parametrize("case", cases(V4, "postprocess.json", "process_response"))
def test_glm4_process_response(case):
    response, new_history = tokenizer(V4).process_response(case["output"], case["history"])
    assert response == case["response"]
    assert new_history == case["new_history"]
    expected = case["response"] if isinstance(case["response"], dict) else {"content": case["response"]}
    assert tokenizer(V4).parse_response(case["output"], case["history"]) == expected


@pytest.mark.parametrize("case", cases(V4, "postprocess.json", "generated_ids_to_response"))
def test_glm4_generated_ids_to_response(case):
    tok = tokenizer(V4)
    assert tok.encode(case["metadata"] + "\n" + case["content"]) == case["generated_ids"][:-1]
    assert case["generated_ids"][-1] in tok.eos_token_ids
    decoded = tok.decode(case["generated_ids"][:-1])
    assert decoded == case["decoded_without_last_token"]
    assert tok.process_response(decoded, case["history"]) == (case["response"], case["new_history"])
    assert tok.parse_response(decoded) == case["response"]


@pytest.mark.parametrize("case", cases(V4, "postprocess.json", "openai_api_server_process_response"))
def test_glm4_openai_server_process_response(case):
    assert tool_parse.glm4_openai_process_response(case["output"], case["tools"], case["use_tool"]) == case["result"]


def test_glm4_parse_response_defaults():
    tok = tokenizer(V4)
    assert tok.parse_response('get_weather\n{"city": "北京"}') == {
        "name": "get_weather",
        "parameters": {"city": "北京"},
    }
    assert tok.parse_response("get_weather\nnot json") == {"name": "get_weather", "content": "not json"}
    assert tok.parse_response("  你好！ ") == {"content": "你好！"}


# ---------------------------------------------------------------- message validation


@pytest.mark.parametrize("family", [V1, V2, V3, V4])
def test_bad_messages_raise(family):
    tok = tokenizer(family)
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError):
        tok.apply_chat_template({"role": "user", "content": "x"})


@pytest.mark.parametrize("family", [V1, V2])
def test_round_prompts_reject_system_and_trailing_assistant(family):
    tok = tokenizer(family)
    with pytest.raises(ValueError, match="alternating"):
        tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match="end with a user"):
        tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_empty_tools_lists():
    # ChatGLM3 (MANIFEST item 3): an empty tools list still appends "\n[]" to the system content.
    tok3 = tokenizer(V3)
    system = tok3.build_single_message("system", "", "x\n[]")
    ids = tok3.apply_chat_template([{"role": "system", "content": "x", "tools": []}, {"role": "user", "content": "q"}])
    assert ids[2 : 2 + len(system)] == system
    # GLM-4: the jinja template tests `tools is defined`, the Python override `item.get("tools")` (truthy).
    msgs = [{"role": "system", "content": "", "tools": []}, {"role": "user", "content": "q"}]
    tok4 = tokenizer(V4)
    assert tok4.render_chat(msgs).startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM")
    assert tok4.render_chat(msgs, template_variant="python") == "[gMASK]<sop><|user|>\nq<|assistant|>"

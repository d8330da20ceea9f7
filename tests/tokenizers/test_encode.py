"""Tokenizers against the golden chat-templates fixtures: loading, special ids, encode.json of each family."""

import functools
import json
import shutil

import helpers
import pytest

from glm_jax.tokenizers import load_tokenizer

FIXTURES = helpers.FIX / "chat-templates"
FAMILIES = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3", "glm-4-9b-chat": "glm4"}


@functools.cache
def fixture(family: str, name: str) -> dict:
    with open(FIXTURES / family / name, encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def tokenizer(family: str, **kwargs):
    return load_tokenizer(FIXTURES / family, **kwargs)


def cases(family: str, name: str, key: str):
    """pytest params, one per case of fixture file `name` under `key` (dotted for nesting)."""
    data = fixture(family, name)
    for part in key.split("."):
        data = data[part]
    return [pytest.param(c, id=f"{family}/{name}/{key}/{c.get('id', i)}") for i, c in enumerate(data)]


def token_name(key: str) -> str:
    """'<sop> (bos_token)' -> '<sop>'; '<pad> = <unk> (...)' -> '<pad>'."""
    return key.split(" (")[0].split(" = ")[0]


# ---------------------------------------------------------------- loading and attributes


@pytest.mark.parametrize("family", FAMILIES)
def test_infers_chat_format(family):
    assert tokenizer(family).chat_format == FAMILIES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids_match_meta(family):
    tok = tokenizer(family)
    for key, tid in fixture(family, "encode.json")["meta"]["special_token_ids"].items():
        assert tok.token_to_id(token_name(key)) == tid, key


def test_vocab_sizes_match_meta():
    assert tokenizer("chatglm-6b").vocab_size == fixture("chatglm-6b", "encode.json")["meta"]["vocab_size"] == 840
    assert tokenizer("chatglm2-6b").vocab_size == fixture("chatglm2-6b", "encode.json")["meta"]["vocab_size"]
    assert tokenizer("chatglm3-6b").vocab_size == fixture("chatglm3-6b", "encode.json")["meta"]["vocab_size"]
    meta = fixture("glm-4-9b-chat", "encode.json")["meta"]
    assert len(tokenizer("glm-4-9b-chat")) == meta["len(tokenizer) incl. added special tokens"]


def test_stop_and_pad_ids():
    assert tokenizer("chatglm-6b").eos_token_ids == [501]  # <eop>
    assert tokenizer("chatglm-6b").pad_token_id == 3
    assert tokenizer("chatglm2-6b").eos_token_ids == [2] and tokenizer("chatglm2-6b").pad_token_id == 0
    meta3 = fixture("chatglm3-6b", "encode.json")["meta"]
    assert tokenizer("chatglm3-6b").stop_token_ids == meta3["eos_token_ids_used_by_chat"]
    assert tokenizer("chatglm3-6b").stop_tokens == ["<eos>", "<|user|>", "<|observation|>"]
    meta4 = fixture("glm-4-9b-chat", "encode.json")["meta"]
    tok4 = tokenizer("glm-4-9b-chat")
    assert tok4.eos_token_ids == meta4["eos_token_ids_used_by_chat"]
    assert tok4.pad_token_id == meta4["pad_token_id"]
    assert tok4.stop_tokens == ["<|endoftext|>", "<|user|>", "<|observation|>"]


def test_explicit_chat_format_and_file_path(tmp_path):
    assert load_tokenizer(FIXTURES / "chatglm3-6b", chat_format="chatglm2").chat_format == "chatglm2"
    assert load_tokenizer(FIXTURES / "glm-4-9b-chat" / "tokenizer.model").chat_format == "glm4"
    with pytest.raises(ValueError, match="chat_format"):
        load_tokenizer(FIXTURES / "chatglm2-6b", chat_format="llama")
    with pytest.raises(ValueError, match="tiktoken"):
        load_tokenizer(FIXTURES / "glm-4-9b-chat", chat_format="chatglm3")
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        load_tokenizer(FIXTURES / "glm-4-9b-chat", chat_format="chatglm")


def test_ambiguous_sentencepiece_folder_asks_for_chat_format(tmp_path):
    shutil.copy(FIXTURES / "chatglm3-6b" / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="chat_format='chatglm2' or 'chatglm3'"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, chat_format="chatglm3").vocab_size == 1509


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "ice_text.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ValueError, match="ice_text.model.*sentencepiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "ice_text.model").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nnot-base64!! x\n")
    with pytest.raises(ValueError, match="line 2"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError, match="single bytes have no rank"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_glm_jax_exports_load_tokenizer():
    import glm_jax

    assert glm_jax.load_tokenizer is load_tokenizer


# ---------------------------------------------------------------- encode.json

ENCODE_CASES = [p for fam in FAMILIES for p in cases(fam, "encode.json", "cases")]


def _tokens_as_fixture(family, tokens):
    if family != "glm-4-9b-chat":
        return tokens
    return [t if isinstance(t, str) else t.hex() for t in tokens]  # bytes written as hex in the fixture


@pytest.mark.parametrize("case", ENCODE_CASES)
def test_encode_decode(case, request):
    family = request.node.callspec.id.split("/")[0]
    tok, text = tokenizer(family), case["text"]
    assert _tokens_as_fixture(family, tok.tokenize(text)) == case["tokens"]
    assert tok.encode(text) == case["ids_no_special"]
    assert tok.encode(text, add_special_tokens=True) == case["ids"]
    assert tok.decode(case["ids_no_special"]) == case["decoded"]
    assert (tok.decode(case["ids_no_special"]) == text) == case["roundtrip_exact"]
    assert tok.decode(case["ids"]) == case["decoded_with_special"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"]
    if family == "chatglm-6b":
        assert tok.sp_encode(text, add_dummy_prefix=False) == case["sp_tokenizer_encode_add_dummy_prefix_false"]
    if family == "chatglm3-6b":
        assert tok.decode_sp(case["ids"]) == case["sp_tokenizer_decode_with_special"]
        all_names = tokenizer(family, encode_special_tokens=True)
        assert all_names.encode(text, add_special_tokens=True) == case["ids_encode_special_tokens_true"]
        roles = tokenizer(family, encode_special_tokens=True, role_tokens_only=True)
        assert (
            roles.encode(text, add_special_tokens=True) == case["ids_encode_special_tokens_true_chatglm3_6b_32k_file"]
        )


@pytest.mark.parametrize("case", cases("chatglm-6b", "encode.json", "num_image_tokens_20000.cases"))
def test_chatglm_num_image_tokens(case):
    tok = tokenizer("chatglm-6b", num_image_tokens=20000)
    assert tok.encode(case["text"], add_special_tokens=True) == case["ids"]
    assert tok.vocab_size == case["vocab_size"]
    assert tok.decode(case["ids"]) == tokenizer("chatglm-6b").decode([i - 20000 for i in case["ids"]])


def test_decode_accepts_arrays_and_ignores_unknown_ids():
    import numpy as np

    tok = tokenizer("glm-4-9b-chat")
    ids = tok.encode("你好")
    assert tok.decode(np.asarray(ids)) == "你好"
    assert tok.decode(ids + [99999]) == "你好"
    assert tokenizer("chatglm2-6b").decode([734, 1142, 99999]) == "你好"
    assert tokenizer("chatglm-6b").decode([5, 77, 72, 99999]) == "你好"


# ---------------------------------------------------------------- behaviours the manifests describe beyond the cases


def test_chatglm_strips_whitespace_around_split_tokens():
    # MANIFEST chatglm-6b item 5: text is cut at <sop>/<eop>/[MASK]/<pad>/<unk> and the whitespace on both
    # sides is stripped (a newline would otherwise become a <n> piece).
    tok = tokenizer("chatglm-6b")
    assert tok.encode("a\n\t<sop>\n b") == tok.encode("a") + [500] + tok.encode("b")
    assert tok.encode("x [gMASK] y") != tok.encode("x") + [497] + tok.encode("y")  # [gMASK] is plain text


def test_chatglm_decode_cleans_up_tokenization_spaces():
    # transformers 4.30 decode (the reference's super()._decode) cleans " ." " ," " 's" ... by default.
    tok = tokenizer("chatglm-6b")
    assert tok.decode(tok.encode("Hi . It 's ok , yes")) == "Hi. It's ok, yes"


def test_chatglm_num_image_tokens_default_without_config(tmp_path):
    shutil.copy(FIXTURES / "chatglm-6b" / "ice_text.model", tmp_path / "ice_text.model")
    tok = load_tokenizer(tmp_path)  # class default num_image_tokens=20000
    assert tok.vocab_size == 20840 and tok.token_to_id("[gMASK]") == 20497


def test_glm4_special_ids_come_from_config(tmp_path):
    shutil.copy(FIXTURES / "glm-4-9b-chat" / "tokenizer.model", tmp_path / "tokenizer.model")
    cfg = fixture("glm-4-9b-chat", "tokenizer_config.json")
    cfg = {**cfg, "added_tokens_decoder": {str(int(k) + 500): v for k, v in cfg["added_tokens_decoder"].items()}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.token_to_id("<|user|>") == 1507 and tok.eos_token_ids == [1500, 1507, 1509]
    assert tok.encode("<|user|>hi") == [1507] + tokenizer("glm-4-9b-chat").encode("hi")


def test_load_from_model_file_and_copy():
    import copy

    tok = load_tokenizer(FIXTURES / "chatglm-6b" / "ice_text.model")
    assert tok.chat_format == "chatglm" and tok.vocab_size == 840  # the folder's tokenizer_config.json is read
    for family in FAMILIES:
        tok = tokenizer(family)
        clone = copy.deepcopy(tok)  # rebuilt from the constructor arguments (what worker processes need)
        assert type(clone) is type(tok) and clone is not tok
        assert clone.encode("你好 world\n") == tok.encode("你好 world\n")

"""GPT-2-style BPE (original GLM): a tiny vocab.json/merges.txt, expected ids from transformers' GPT2Tokenizer.

The expected values below were produced once with transformers 5.24 `GPT2Tokenizer.from_pretrained(folder)`
on exactly these files (encode(text, add_special_tokens=False), decode). The merges are deliberately not
consistent ("Ġ w" / "Ġwor ld" vs "w or" / "wor ld"), so merging by pair rank and merging by the rank of the
merged bytes (tiktoken) give different ids for " world".
"""

import json

import pytest

from glm_jax.tokenizers import load_tokenizer
from glm_jax.tokenizers.gpt2 import bytes_to_unicode

MERGES = [
    "Ġ t",
    "Ġt h",
    "Ġth e",
    "h e",
    "l l",
    "he ll",
    "hell o",
    "o r",
    "w or",
    "l d",
    "wor ld",
    "Ġ w",
    "Ġw or",
    "Ġwor ld",
    "Ġ Ġ",
    "ĠĠ ĠĠ",
    "' s",
    "Ġ 1",
    "1 2",
]

CASES = [
    ("hello world", [262, 220, 266]),
    ("Hello the world's 123 hellohello", [39, 68, 260, 78, 258, 220, 266, 272, 273, 17, 18, 220, 262, 262]),
    (
        "  the   world\n\nhello\t 你好 😀",
        [220, 258, 270, 220, 266, 198, 198, 262, 197, 220, 160, 121, 254, 161, 98, 121, 220, 172, 253, 246, 222],
    ),
    ("", []),
    ("it's the world<|endoftext|>", [72, 83, 272, 258, 220, 266, 275]),
    ("[CLS]hello [MASK] x", [276, 262, 220, 277, 220, 87]),
    ("the the  thethe", [83, 259, 258, 220, 258, 83, 259]),
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for m in MERGES:
        a, b = m.split()
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    n = len(vocab)
    (folder / "added_tokens.json").write_text(json.dumps({"[CLS]": n, "[MASK]": n + 1, "[gMASK]": n + 2}))
    return folder


@pytest.mark.parametrize("text, ids", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_gpt2_bpe_matches_transformers(gpt2_dir, text, ids):
    tok = load_tokenizer(gpt2_dir)
    assert tok.chat_format == "gpt2"
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_gpt2_special_tokens(gpt2_dir):
    tok = load_tokenizer(gpt2_dir)
    assert tok.token_to_id("<|endoftext|>") == 275 and tok.eos_token_ids == [275]
    assert tok.encode("hello", add_special_tokens=True) == [276, 262, 275]  # [CLS] text <|endoftext|>
    assert tok.decode([276, 262, 277, 275], skip_special_tokens=True) == "hello"
    assert tok.vocab_size == 279
    with pytest.raises(ValueError, match="no chat format"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gpt2_garbage_files(tmp_path):
    (tmp_path / "vocab.json").write_text("[1, 2]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match="single-byte tokens missing"):
        load_tokenizer(tmp_path)

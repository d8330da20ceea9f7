"""Needle in a haystack on a tiny random model: the grid JSON and the PNG heat map; prompt construction; and
glm-eval's --needle / --perplexity modes and exit codes."""

import json
import pathlib
import struct

import pytest
import torch  # noqa: F401  (a requirement of this test)
import transformers  # noqa: F401  (a requirement of this test)
from helpers import eval_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("needle") / "model"
    eval_models.build_glm4(path)
    return path


def _png_size(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_haystack_places_the_needle_at_depth(folder):
    from glm_jax.eval.needle import NEEDLE, QUESTION, Haystack
    from glm_jax.eval.tokenizer import EvalTokenizer

    tok = EvalTokenizer(folder)
    hay = Haystack(tok)
    for length, tol in ((128, 0.25), (512, 0.1)):  # filler sentences are ~30 tokens of this tiny BPE
        for depth in (0.0, 0.3, 0.5, 1.0):
            text = hay.text(length, depth)
            body = text.split("\n\n")[0]
            assert text.endswith(QUESTION + " Answer:") and body.count(NEEDLE) == 1
            frac = body.index(NEEDLE) / max(1, len(body) - len(NEEDLE))
            assert abs(frac - depth) < tol, (length, depth, frac)
            n = len(tok.encode(text))
            assert length - 40 <= n <= length + 2, (length, n)


def test_grid_writes_json_and_png(folder, tmp_path):
    import glm_jax
    from glm_jax.eval import needle
    from glm_jax.eval.tokenizer import EvalTokenizer

    lm = glm_jax.from_pretrained(folder)
    tok = EvalTokenizer(folder)
    res = needle.run_grid(lm, tok, [96, 160], [0.0, 0.5, 1.0], max_new_tokens=6, batch_size=8)
    js, png = needle.write_report(res, tmp_path / "out")
    data = json.loads(js.read_text())
    assert data["lengths"] == [96, 160] and data["depths"] == [0.0, 0.5, 1.0]
    assert len(data["recall"]) == 3 and all(len(r) == 2 for r in data["recall"])
    assert all(v in (0.0, 1.0) for r in data["recall"] for v in r)
    assert all(isinstance(o, str) for r in data["outputs"] for o in r)
    assert data["prompt_tokens"][0][0] < data["prompt_tokens"][0][1]
    assert _png_size(png) == (300, 275)  # (1.5 + 0.75 * 2) x (1.25 + 0.5 * 3) inches at 100 dpi

    # recall is the exact substring test on the decoded answer
    fake = dict(data, recall=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], mean_recall=4 / 6)
    assert _png_size(needle.heatmap(fake, tmp_path / "fake.png")) == (300, 275)


def test_cli_modes_and_exit_codes(folder, tmp_path, capsys):
    from glm_jax.eval import cli

    text = tmp_path / "text.txt"
    text.write_text(" ".join(eval_models.SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert (
        cli.main([str(folder), "--perplexity", str(text), "--max-len", "16", "--stride", "8", "--output", str(out)])
        == 0
    )
    res = json.loads(out.read_text())
    assert res["ppl"] > 1 and res["tokens"] == len(_eval_models_tokens(folder, text)) and res["windows"] > 1

    lam = tmp_path / "lambada.txt"
    lam.write_text("\n".join(eval_models.SENTENCES[:3]) + "\n", encoding="utf-8")
    assert cli.main([str(folder), "--perplexity", str(lam), "--lambada", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["passages"] == 3

    nd = tmp_path / "nd"
    assert cli.main([str(folder), "--needle", "--lengths", "32", "--depths", "0,1", "--max-new-tokens", "4",
                     "--out", str(nd)]) == 0  # fmt: skip
    assert (nd / "needle.json").is_file() and _png_size(nd / "needle.png")[0] > 0
    capsys.readouterr()

    bad = [
        ([str(tmp_path / "missing"), "--needle"], "model folder not found"),
        ([str(folder), "--perplexity", str(tmp_path / "none.txt")], "text file not found"),
        ([str(folder), "--needle", "--depths", "0,2"], "--depths"),
        ([str(folder), "--perplexity", str(text), "--stride", "0"], "--stride"),
        ([str(folder)], "one of the arguments"),
        ([str(tmp_path), "--perplexity", str(text)], str(tmp_path)),  # a folder without a checkpoint
    ]
    for argv, msg in bad:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], (argv, err)


def _eval_models_tokens(folder, text):
    from glm_jax.eval.tokenizer import EvalTokenizer

    return EvalTokenizer(folder).encode(text.read_text(encoding="utf-8"), add_special_tokens=False)

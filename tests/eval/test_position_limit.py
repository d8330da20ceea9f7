"""Every glm-eval mode on a model with fewer learned positions than the mode's default length (a glm-train run of
train/configs/tiny.yaml: 64 positions, against --max-len 1024, --lengths 256,512,1024 and lm-eval's 256 new
tokens). Left to their defaults, the lengths follow the model and the numbers are finite; a length given past the
table is bad input (exit 2, one error line); nothing prints NaN (past the table the logits are NaN)."""

import json
import math
import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers.train_runs import CACHE

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "glm_jax" / "data" / "corpus" / "shakespeare_hamlet.txt"
POSITIONS = 64  # tiny.yaml's max_position_embeddings


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from train.main import main

    root = tmp_path_factory.mktemp("short_table")
    out = root / "run"
    argv = ["--config", "tiny", "steps=1", f"output_dir={out}", "progress=none", f"compilation_cache_dir={CACHE}"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["max_sequence_length"] == POSITIONS
    text = CORPUS.read_text(encoding="utf-8")[4000:7000]  # several hundred tokens: many windows of 64
    (root / "text.txt").write_text(text, encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) > 3]
    (root / "lambada.txt").write_text("\n".join([" ".join(lines)] + lines[:4]) + "\n", encoding="utf-8")
    return out, root


def _eval(capsys, *argv):
    from glm_jax.eval import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def _refused(rc, err, what):
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and what in err[0], (rc, err)
    assert f"{POSITIONS} learned positions" in err[0], err


def test_perplexity_defaults_to_the_model_length(run, capsys, tmp_path):
    model, root = run
    res = tmp_path / "ppl.json"
    rc, out, err = _eval(capsys, model, "--perplexity", root / "text.txt", "--output", res)
    assert rc == 0, err
    r = json.loads(res.read_text())
    assert r["max_len"] == POSITIONS and r["windows"] > 1
    assert all(math.isfinite(r[k]) and r[k] > 1 for k in ("ppl", "word_perplexity"))
    assert "NaN" not in out
    _refused(*_eval(capsys, model, "--perplexity", root / "text.txt", "--max-len", 1024)[::2], "max_len=1024")


def test_lambada_defaults_to_the_model_length(run, capsys, tmp_path):
    model, root = run
    res = tmp_path / "lam.json"
    rc, out, err = _eval(capsys, model, "--perplexity", root / "lambada.txt", "--lambada", "--output", res)
    assert rc == 0, err
    r = json.loads(res.read_text())
    assert r["max_len"] == POSITIONS and r["passages"] == 5 and math.isfinite(r["ppl"])
    _refused(*_eval(capsys, model, "--perplexity", root / "lambada.txt", "--lambada", "--max-len", 1024)[::2], "1024")


def test_needle_default_lengths_fit_the_model(run, capsys, tmp_path):
    model, _ = run
    rc, _, err = _eval(capsys, model, "--needle", "--depths", "0,1", "--max-new-tokens", 4, "--out", tmp_path)
    assert rc == 0, err
    r = json.loads((tmp_path / "needle.json").read_text())
    assert r["lengths"] and all(n + 4 <= POSITIONS for row in r["prompt_tokens"] for n in row)
    assert max(r["lengths"]) > POSITIONS // 2  # the longest that fits, not a token
    _refused(*_eval(capsys, model, "--needle", "--lengths", 256, "--out", tmp_path)[::2], "prompt of")


def test_lm_eval_tasks_default_to_the_model_length(run, capsys, tmp_path):
    import lm_eval  # noqa: F401  (a requirement of this test)
    import yaml

    model, root = run
    text = (root / "text.txt").read_text(encoding="utf-8")
    tasks = {  # a rolling perplexity over a text longer than the table; a generation with lm-eval's default budget
        "short_ppl": ({"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                       "metric_list": [{"metric": "word_perplexity"}]}, [{"text": text}]),
        "short_gen": ({"output_type": "generate_until", "doc_to_text": "{{text}}", "doc_to_target": " x",
                       "generation_kwargs": {"until": ["\n\n"]}, "metric_list": [{"metric": "exact_match"}]},
                      [{"text": text[:200]}]),
    }  # fmt: skip
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, (spec, docs) in tasks.items():
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        data = {"data_files": {"test": str(src)}, "cache_dir": str(tmp_path / "hf_cache")}
        cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": data, "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, "metadata": {"version": 1.0}}), encoding="utf-8")
    res = tmp_path / "res.json"
    argv = (model, "--tasks", "short_ppl,short_gen", "--include-path", folder, "--batch-size", 2)
    rc, _, err = _eval(capsys, *argv, "--output", res)
    assert rc == 0, err[-3:]
    r = json.loads(res.read_text())
    assert math.isfinite(r["results"]["short_ppl"]["word_perplexity,none"])
    assert r["results"]["short_gen"]["exact_match,none"] in (0.0, 1.0)
    _refused(*_eval(capsys, *argv, "--max-length", 1024)[::2], "max_length=1024")

"""The train → chat → export loop, as a new user runs it: glm-train writes a run folder, glm-generate talks to it,
glm-convert to-torch exports it, glm-generate talks to the export. Each step is the installed console script in
a subprocess; each must exit 0 and print text."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from helpers.adapter_models import build_glm4_chat
from helpers.cli import subprocess_env
from helpers.train_runs import CACHE

BIN = pathlib.Path(sys.executable).parent  # the console scripts of the environment running the tests


def _cmd(name, *args, timeout=240):
    r = subprocess.run(
        [str(BIN / name), *map(str, args)],
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"{name} {args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _reply(r) -> str:
    return r.stdout.strip()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("loop") / "R"
    _cmd(
        "glm-train",
        "--config",
        "train/configs/tiny.yaml",
        f"output_dir={run}",
        "steps=3",
        "progress=none",
        f"compilation_cache_dir={CACHE}",
    )
    return run


def test_tiny_loop_end_to_end(tiny_run, tmp_path):
    run = tiny_run
    # the run folder is a checkpoint folder: config.json, tokenizer files, weights
    for name in ("config.json", "glm_sentencepiece.model", "tokenizer_config.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "3" / "glm_manifest.json").is_file()
    # the README's commands as they stand: the decoding settings are the run's generation_config.json (sampling, as
    # a model trained for seconds from scratch greedily repeats its commonest token, a newline: a blank reply)
    assert json.loads((run / "generation_config.json").read_text())["do_sample"] is True
    gen = ("--prompt", "hi", "--show-prompt-ids")
    r1 = _cmd("glm-generate", run, *gen)
    assert _reply(r1), r1.stderr
    exp = tmp_path / "E"
    r = _cmd("glm-convert", "to-torch", run, exp)
    assert "wrote" in r.stdout
    for name in ("config.json", "model.safetensors", "glm_sentencepiece.model", "tokenizer_config.json"):
        assert (exp / name).is_file(), name
    assert (exp / "generation_config.json").read_bytes() == (run / "generation_config.json").read_bytes()
    r2 = _cmd("glm-generate", exp, *gen)
    assert _reply(r2)
    # the export is the same model with the same tokenizer: same prompt ids, same sampled reply
    assert r1.stdout == r2.stdout
    ids = [ln for ln in r1.stderr.splitlines() if ln.startswith("prompt_ids:")]
    assert ids == [ln for ln in r2.stderr.splitlines() if ln.startswith("prompt_ids:")]
    # greedy decoding works too (a 3-step model may end at once: the exit code is what counts here)
    _cmd("glm-generate", exp, "--prompt", "To be", "--max-new-tokens", "4", "--greedy")


def test_run_tokenizer_is_the_one_training_used(tiny_run):
    from glm_jax.data.tokenize import bundled_tokenizer
    from glm_jax.tokenizers import load_tokenizer

    tok = load_tokenizer(tiny_run)
    ref = bundled_tokenizer()  # what the data pipeline encoded the corpus with
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler 1623 ümlaut"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    for name in ("[CLS]", "[gMASK]", "<sop>", "<eop>", "</s>"):
        assert tok.special_tokens[name] == ref.special_tokens[name]
    # GLM's generation prompt: [CLS] text [gMASK] </s> <sop>
    s = ref.special_tokens
    assert tok.apply_chat_template([{"role": "user", "content": "To be"}]) == (
        [s["[CLS]"]] + ref.encode("To be") + [s["[gMASK]"], s["</s>"], s["<sop>"]]
    )


def test_run_config_json_describes_the_model(tiny_run):
    import glm_jax
    from glm_jax.config import GLMConfig

    lm = glm_jax.from_pretrained(tiny_run)
    back = GLMConfig.from_hf(json.loads((tiny_run / "config.json").read_text()))
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "ffn_size", "bos_token_id"):
        assert getattr(back, f) == getattr(lm.config, f), f
    # the command tokens come from the bundled tokenizer, so generation starts after <sop> and stops at <eop>
    from glm_jax.tokenizers import load_tokenizer

    tok = load_tokenizer(tiny_run)
    assert back.bos_token_id == tok.special_tokens["<sop>"]
    assert back.eos_token_id == (tok.special_tokens["<eop>"],)
    assert back.gmask_token_id == tok.special_tokens["[gMASK]"]


def test_chat_model_loop_uses_its_template(tmp_path):
    """A pretrained GLM-4-style base with a chat tokenizer: the run folder carries the base's tokenizer, and
    glm-generate feeds the run (and its export) the GLM-4 chat prompt."""
    base = tmp_path / "base"
    build_glm4_chat(base)
    run = tmp_path / "R"
    _cmd(
        "glm-train",
        f"model={base}",
        "objective=causal",
        f"data.tokenizer={base}",
        "seq_len=32",
        "batch_size=2",
        "steps=2",
        "checkpoint_every=2",
        "log_every=1",
        f"output_dir={run}",
        "progress=none",
        f"compilation_cache_dir={CACHE}",
    )
    from glm_jax.tokenizers import load_tokenizer

    tok = load_tokenizer(run)
    assert tok.chat_format == "glm4"
    want = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    exp = tmp_path / "E"
    _cmd("glm-convert", "to-torch", run, exp)
    for folder in (run, exp):
        r = _cmd(
            "glm-generate", folder, "--prompt", "hello", "--max-new-tokens", "6", "--do-sample", "--show-prompt-ids"
        )
        got = [json.loads(ln.split(":", 1)[1]) for ln in r.stderr.splitlines() if ln.startswith("prompt_ids:")]
        assert got == [want]
    # the export loads in transformers with the base's architecture and the trained weights
    import torch
    import transformers

    import glm_jax

    model = transformers.AutoModelForCausalLM.from_pretrained(exp, torch_dtype=torch.float32).eval()
    ids = np.array([want])
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(glm_jax.from_pretrained(run)(ids))
    assert np.abs(ref - got).max() < 1e-4

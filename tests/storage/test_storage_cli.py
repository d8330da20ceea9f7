"""glm-generate and glm-eval on a gs:// model folder (GCS emulator): the same results as on the local copy (the
contract of DESIGN §3.11: the same behaviour for both kinds of path), and one `error:` line, exit 2, for a missing
bucket or folder. The prompt ids are checked against the fixture tokenizer's chat template."""

import io
import json
import os
import shutil
import tempfile
import uuid

import pytest
from helpers.fixture_models import FIX
from helpers.gcs import no_gs_folder

from glm_jax import storage

TOK = FIX / "chat-templates"


@pytest.fixture(autouse=True)
def _no_gs_folder(gcs):
    yield
    assert not no_gs_folder(os.getcwd(), tempfile.gettempdir()), "a gs:// URL was taken for a local path"


@pytest.fixture(scope="module")
def model_dirs(gcs, tmp_path_factory):
    """(local folder, gs:// URL) of the ChatGLM-6B tiny model with its stand-in tokenizer files."""
    d = tmp_path_factory.mktemp("chatglm6b")
    for f in (FIX / "chatglm-6b" / "model_sharded_safetensors").iterdir():
        shutil.copy(f, d)
    for f in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOK / "chatglm-6b" / f, d)
    url = f"gs://glm-test/cli-{uuid.uuid4().hex[:8]}"
    fs = storage.filesystem()
    for f in d.iterdir():
        fs.put_file(str(f), f"{url[5:]}/{f.name}")
    return d, url


def _generate(path, *args):
    from glm_jax import cli_generate

    out, err = io.StringIO(), io.StringIO()
    rc = cli_generate.main([str(path), *args], io.StringIO(""), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_generate_from_gcs(model_dirs):
    from glm_jax.tokenizers import load_tokenizer

    local, url = model_dirs
    args = ("--prompt", "hello", "--max-new-tokens", "6", "--show-prompt-ids")
    rc, out, err = _generate(url, *args)
    assert rc == 0, err
    ids = [json.loads(line.split(":", 1)[1]) for line in err.splitlines() if line.startswith("prompt_ids:")]
    assert ids == [load_tokenizer(local).apply_chat_template([{"role": "user", "content": "hello"}])]
    assert (rc, out) == _generate(local, *args)[:2]


def test_generate_follows_a_gcs_generation_config(model_dirs, tmp_path):
    """A gs:// folder's generation_config.json sets the sampling of glm-generate as the local copy's does: the
    settings read from both (and, for contrast, the fixture's own file, which sets none: greedy)."""
    from glm_jax import cli_generate

    local, url = model_dirs
    here, there = tmp_path / "sampled", f"{url}-sampled"
    shutil.copytree(local, here)
    gen = {**json.loads((local / "generation_config.json").read_text()), "do_sample": True, "temperature": 0.7}
    (here / "generation_config.json").write_text(json.dumps(gen))
    storage.upload_folder(here, there)

    def settings(path):
        a = cli_generate.build_parser().parse_args([str(path), "--prompt", "hi"])
        cli_generate.sampling_defaults(a)
        return a.do_sample, a.temperature

    assert settings(url) == settings(local) == (False, 1.0)
    assert settings(there) == settings(here) == (True, 0.7)


@pytest.mark.parametrize("url", ["gs://no-such-bucket-zz/m", "gs://glm-test/no-such-model"])
def test_generate_missing_exit_2(gcs, url):
    rc, out, err = _generate(url, "--prompt", "hi")
    assert rc == 2 and err.startswith("error:") and url in err and len(err.strip().splitlines()) == 1, err


def test_eval_perplexity_from_gcs(model_dirs, tmp_path, capsys):
    from glm_jax.eval import cli

    local, url = model_dirs
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    res = []
    for path in (url, local):
        out = tmp_path / "ppl.json"
        argv = [str(path), "--perplexity", str(text), "--max-len", "16", "--stride", "8", "--output", str(out)]
        assert cli.main(argv) == 0
        res.append(json.loads(out.read_text()))
    assert res[0]["ppl"] == res[1]["ppl"] and res[0]["tokens"] == res[1]["tokens"] > 16
    capsys.readouterr()
    assert cli.main(["gs://glm-test/no-such-model", "--perplexity", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "gs://glm-test/no-such-model" in err[0]

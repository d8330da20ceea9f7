"""glm-convert on bad input, through the command line in a subprocess: exit 2, exactly one `error:` line on stderr
naming the file and the problem, and no DST (nor a temporary sibling) left behind.

The subprocesses run a few at a time (each pays the jax/torch import), all started from one module fixture.
"""

import concurrent.futures
import json
import os
import shutil

import pytest
from helpers.cli import run_module
from helpers.fixture_models import FIX

BASE = FIX / "chatglm2-6b"


class Evil:
    """Unpickling this would create a file: the converter must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _save_edited(folder, edit):
    """The base weights with one edit, as a single model.safetensors (its reader needs no torch import)."""
    import safetensors.torch
    import torch

    sd = torch.load(BASE / "model" / "pytorch_model.bin", weights_only=True)
    edit(sd)
    folder.mkdir()
    shutil.copy(BASE / "model" / "config.json", folder / "config.json")
    safetensors.torch.save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _build_cases(tmp):
    """{case: (argv, [fragments the error line must contain])}."""
    import torch

    cases = {}
    st = _copy(BASE / "model_sharded_safetensors", tmp / "truncated_st")
    shard = st / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    cases["truncated_safetensors"] = (["to-jax", st], [shard.name, "truncated"])

    st = _copy(BASE / "model_sharded_safetensors", tmp / "corrupt_st")
    shard = st / "model-00003-of-00004.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:24] = b"\xff\xfe garbage \x00\x01"
    shard.write_bytes(bytes(raw))
    cases["corrupt_safetensors"] = (["to-jax", st], [shard.name, "corrupt"])

    b = _copy(BASE / "model", tmp / "truncated_bin")
    f = b / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases["truncated_bin"] = (["to-jax", b], ["pytorch_model.bin", "cannot read"])

    b = _copy(BASE / "model", tmp / "corrupt_bin")
    (b / "pytorch_model.bin").write_bytes(os.urandom(4096))
    cases["corrupt_bin"] = (["to-jax", b], ["pytorch_model.bin", "cannot read"])

    b = _copy(BASE / "model", tmp / "garbage_config")
    (b / "config.json").write_text('{"model_type": "chatglm", "hidden_size": 64,,, oops')
    cases["garbage_config"] = (["to-jax", b], ["config.json", "not valid JSON"])

    b = _copy(BASE / "model", tmp / "unknown_arch")
    (b / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    cases["unknown_architecture"] = (["to-jax", b], ["config.json", "llama"])

    st = _copy(BASE / "model_sharded_safetensors", tmp / "missing_shard")
    (st / "model-00003-of-00004.safetensors").unlink()
    cases["missing_shard"] = (
        ["to-jax", st],
        ["model.safetensors.index.json", "model-00003-of-00004.safetensors", "missing"],
    )

    gone = "transformer.encoder.final_layernorm.weight"
    b = _save_edited(tmp / "missing_key", lambda sd: sd.pop(gone))
    cases["missing_key"] = (["to-jax", b], ["model.safetensors", "missing", gone])

    b = _save_edited(tmp / "extra_key", lambda sd: sd.__setitem__("transformer.encoder.extra.weight", torch.ones(3)))
    cases["extra_key"] = (["to-jax", b], ["model.safetensors", "unexpected", "transformer.encoder.extra.weight"])

    bad = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    b = _save_edited(tmp / "bad_shape", lambda sd: sd.__setitem__(bad, torch.zeros(64, 96)))
    cases["wrong_shape"] = (["to-jax", b], ["model.safetensors", bad, "shape"])

    marker = tmp / "PWNED"
    b = _copy(BASE / "model", tmp / "evil_pickle")
    torch.save({"transformer.embedding.word_embeddings.weight": Evil(marker)}, b / "pytorch_model.bin")
    cases["code_running_pickle"] = (["to-jax", b], ["pytorch_model.bin", "refused"])

    return cases, marker


def _run(argv, dst):
    r = run_module("convert.cli", *argv[:2], dst, *argv[2:])
    return r.code, r.err


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    cases, marker = _build_cases(tmp)
    dsts = {c: tmp / "out" / c for c in cases}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        futs = {c: ex.submit(_run, argv, dsts[c]) for c, (argv, _) in cases.items()}
        out = {c: f.result() for c, f in futs.items()}
    return {"cases": cases, "out": out, "dsts": dsts, "marker": marker}


CASES = [
    "truncated_safetensors",
    "corrupt_safetensors",
    "truncated_bin",
    "corrupt_bin",
    "garbage_config",
    "unknown_architecture",
    "missing_shard",
    "missing_key",
    "extra_key",
    "wrong_shape",
    "code_running_pickle",
]


def _check(rc, err, dst, fragments):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}*"))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_error_line(case, results):
    rc, err = results["out"][case]
    _check(rc, err, results["dsts"][case], results["cases"][case][1])


def test_code_in_pickle_never_runs(results):
    assert results["out"]["code_running_pickle"][0] == 2
    assert not results["marker"].exists()


# ------------------------------------------------------------------ the same contract, in process (cheaper)
@pytest.fixture(scope="module")
def chatglm6b_jax(tmp_path_factory):
    from convert.cli import main

    d = tmp_path_factory.mktemp("j") / "chatglm6b_jax"
    assert main(["to-jax", str(FIX / "chatglm-6b" / "model"), str(d)]) == 0
    return d


def _in_process(capfd, argv, dst, fragments):
    from convert.cli import main

    capfd.readouterr()
    rc = main([*map(str, argv[:2]), str(dst), *map(str, argv[2:])])
    _check(rc, capfd.readouterr().err, dst, fragments)


def test_layout_with_other_math_is_refused(chatglm6b_jax, tmp_path, capfd):
    _in_process(
        capfd, ["to-torch", chatglm6b_jax, "--layout", "glm-hf"], tmp_path / "o", ["--layout glm-hf", "chatglm"]
    )


def test_bad_shard_size(chatglm6b_jax, tmp_path, capfd):
    _in_process(
        capfd, ["to-torch", chatglm6b_jax, "--max-shard-size", "lots"], tmp_path / "o", ["--max-shard-size", "lots"]
    )


def test_to_torch_of_a_torch_folder(tmp_path, capfd):
    _in_process(capfd, ["to-torch", BASE / "model"], tmp_path / "o", [str(BASE / "model"), "glm_jax.json"])


def test_megatron_without_config(tmp_path, capfd):
    import torch

    mg = tmp_path / "megatron"
    mg.mkdir()
    torch.save({"module": {"word_embeddings.weight": torch.zeros(4, 4)}}, mg / "mp_rank_00_model_states.pt")
    _in_process(capfd, ["to-jax", mg], tmp_path / "o", [str(mg), "--config"])


def test_existing_destination_is_left_alone(tmp_path, capfd):
    from convert.cli import main

    dst = tmp_path / "existing"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    capfd.readouterr()
    assert main(["to-jax", str(BASE / "model"), str(dst)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(dst) in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_existing_destination(tmp_path):
    from convert.cli import main

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert main(["to-jax", str(BASE / "model"), str(dst), "--overwrite"]) == 0
    assert not (dst / "old.txt").exists() and (dst / "glm_jax.json").is_file()
    assert not list(tmp_path.glob(".dst*"))

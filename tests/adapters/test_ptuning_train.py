"""glm-train P-Tuning v2 (DESIGN §3.6) on a tiny ChatGLM2-family base (ChatGLM3 stand-in tokenizer, AdvertiseGen-style
data): only prefix_encoder changes, with and without prefix_projection; `glm-convert to-torch RUN E --adapter`
writes THUDM's prefix checkpoint (transformer.prefix_encoder.* in the shapes the reference's PrefixEncoder has,
config.json with pre_seq_len / prefix_projection), and `glm-convert to-jax BASE DST --ptuning E` reproduces the
run's logits."""

import json

import numpy as np
import pytest
from helpers import FIX
from helpers import SFT_EXAMPLES as EXAMPLES
from helpers.adapter_models import build_chatglm2_base
from helpers.train_runs import CACHE, metrics

import glm_jax
from convert.cli import main as convert_main
from glm_jax.checkpoint.hf import open_weights
from glm_jax.checkpoint.orbax import open_jax

TOK = FIX / "chat-templates" / "chatglm3-6b"  # 1509 ids
PREFIX = "transformer.prefix_encoder."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ptuning") / "base"
    return folder, build_chatglm2_base(folder)


def _train(base, run, steps, projection):
    from train.config import build
    from train.trainer import train

    tc = build(
        None,
        [
            f"model={base}",
            "objective=sft",
            "data.format=chatglm3_finetune_hf",
            f"data.source={EXAMPLES / 'chatglm3_advertise_gen.jsonl'}",
            "seq_len=64",
            "batch_size=2",
            f"steps={steps}",
            "log_every=1",
            "checkpoint_every=10",
            "learning_rate=2e-2",
            "warmup_steps=1",
            "ptuning.pre_seq_len=4",
            f"ptuning.prefix_projection={str(projection).lower()}",
            "mesh.data=2",
            f"output_dir={run}",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
        ],
    )
    return train(tc)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_only_the_prefix_trains_and_its_export_reproduces_the_run(base, tmp_path, projection):
    folder, cfg = base
    run = tmp_path / "run"
    _train(folder, run, 3, projection)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    ck = open_jax(run)
    assert ck.adapter["kind"] == "ptuning" and ck.cfg.pre_seq_len == 4
    lm0 = glm_jax.from_pretrained(folder)
    from flax import traverse_util

    ref = traverse_util.flatten_dict(lm0.params, sep="/")
    saved = {p: np.asarray(ck.store.read(p)) for p in ck.store.paths()}
    prefix = {p for p in saved if p.startswith("prefix_encoder/")}
    assert set(saved) - prefix == set(ref)
    for p, a in ref.items():  # every base param bit for bit
        np.testing.assert_array_equal(saved[p], np.asarray(a), err_msg=p)
    want = {"prefix_encoder/embedding"} | (
        {f"prefix_encoder/trans_{i}/{w}" for i in (0, 2) for w in ("kernel", "bias")} if projection else set()
    )
    assert prefix == want
    # the prefix trained: it moved from the run's own init (seed 0)
    import jax

    from train.adapters import Plan
    from train.config import build

    tc = build(
        None, [f"model={folder}", "ptuning.pre_seq_len=4", f"ptuning.prefix_projection={str(projection).lower()}"]
    )
    init = traverse_util.flatten_dict(Plan(tc, ck.cfg).add_params({}, jax.random.PRNGKey(0)), sep="/")
    assert set(init) == want
    for p in want:
        assert np.abs(np.asarray(init[p]) - saved[p]).max() > 1e-4, p

    # THUDM's prefix checkpoint: only transformer.prefix_encoder.*, in the reference PrefixEncoder's shapes
    exp = tmp_path / "prefix"
    assert convert_main(["to-torch", str(run), str(exp), "--adapter"]) == 0
    _, readers = open_weights(exp)
    shapes = {k: tuple(r.shape(k)) for k, r in readers.items()}
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim  # ChatGLM2's kv_size
    expected = {PREFIX + "embedding.weight": (4, kv)}
    if projection:  # Embedding(P, kv) -> Linear(kv, hidden) -> Tanh -> Linear(hidden, kv)
        h = cfg.hidden_size
        expected.update(
            {
                PREFIX + "trans.0.weight": (h, kv),
                PREFIX + "trans.0.bias": (h,),
                PREFIX + "trans.2.weight": (kv, h),
                PREFIX + "trans.2.bias": (kv,),
            }
        )
    assert shapes == expected
    conf = json.loads((exp / "config.json").read_text())
    assert conf["pre_seq_len"] == 4 and conf["prefix_projection"] is projection
    # loaded on the base by glm-convert to-jax --ptuning: the run's logits
    dst = tmp_path / "jax"
    assert convert_main(["to-jax", str(folder), str(dst), "--ptuning", str(exp)]) == 0
    ids = np.array([[64790, 64792, 30910, 13, 316, 372, 30941, 4, 90]]) % 1500
    ours = np.asarray(glm_jax.from_pretrained(run)(ids))
    got = np.asarray(glm_jax.from_pretrained(dst)(ids))
    assert np.abs(got - ours).max() < 1e-4
    assert np.abs(ours - np.asarray(lm0(ids))).max() > 1e-3  # the prefix matters

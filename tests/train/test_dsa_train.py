"""glm-train's DSA indexer training (train/dsa.py, DeepSeek-V3.2's recipe) on the tiny GLM-5 fixture
(tests/fixtures/transformers-glm-moe-dsa): the indexer loss's gradient reaches the indexers alone and the language-
model loss's never does; `dsa.warmup` leaves every non-indexer weight byte-identical, trains the indexers and logs
`dsa/indexer_loss`; the keys are checked against the model and each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIX
from helpers.train_runs import flat, folder_config, load_params, metrics, train

DSA = FIX / "transformers-glm-moe-dsa" / "model"


def _config(out, *keys):
    """glm-train on the GLM-5 fixture: 8 x 32 tokens a step (T = 32 > index_topk = 6) at a learning rate that moves
    every trained param."""
    return folder_config(DSA, out, "seq_len=32", "learning_rate=1e-2", "weight_decay=0.1", *keys)


def _is_indexer(path: str) -> bool:
    return "/indexer/" in path


def test_indexer_loss_gradient_reaches_only_the_indexers():
    """Gradients of the step's objective with dsa.indexer_loss_weight 1 minus those with 0: the indexer loss's own
    gradient. It is nonzero on every main-layer indexer param and exactly zero elsewhere; and the 0-weight
    gradient (the language-model loss) is exactly zero on every indexer (its choice is discrete, its inputs
    detached)."""
    import glm_jax
    from glm_jax.model.transformer import GLMModel
    from train.loss import loss_sums
    from train.moe_rules import Rules

    lm = glm_jax.from_pretrained(DSA)
    cfg, params = lm.config, lm.params
    B, T = 2, 24  # T > index_topk = 6: the choice drops keys
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, T)).astype(np.int32)
    batch = {
        "tokens": jnp.asarray(ids),
        "position_ids": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
        "targets": jnp.asarray(np.roll(ids, -1, axis=1)),
        "loss_mask": jnp.ones((B, T), jnp.float32).at[:, -1].set(0.0),
    }
    module = GLMModel(cfg)
    sc = {"aux": jnp.sum(batch["loss_mask"])}

    def grads(w):
        rules = Rules(indexer_weight=w)
        return jax.grad(lambda p: loss_sums(module, p, batch, rules=rules, sc=sc)[0])(params)

    g0, g1 = flat(jax.tree.map(np.asarray, grads(0.0))), flat(jax.tree.map(np.asarray, grads(1.0)))
    idx = [k for k in g0 if _is_indexer(k) and not k.startswith("mtp_")]
    assert len(idx) == 2 * 5  # layers 0 and 2 ("full"): wq_b, wk, k_norm scale and bias, weights_proj
    for k in g0:
        if _is_indexer(k):
            assert not np.any(g0[k]), k  # the language-model loss never reaches an indexer
        kl = g1[k] - g0[k]
        if k in idx:
            assert np.any(kl), k
        else:
            assert not np.any(kl), k  # the indexer loss reaches nothing else


def test_warmup_trains_only_the_indexers(tmp_path):
    import glm_jax

    out = tmp_path / "run"
    keys = ("dsa.warmup=true", "dsa.indexer_loss_weight=1.0", "steps=3", "checkpoint_every=3")
    train(_config(out, *keys, "async_checkpointing=false"))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    kl = [r["dsa/indexer_loss"] for r in rows]
    assert all(np.isfinite(kl)) and kl[-1] < kl[0], kl  # the indexers learn the (fixed) attention
    ref = flat(jax.tree.map(np.asarray, glm_jax.from_pretrained(DSA).params))
    got = flat(load_params(out, 3))
    assert sorted(got) == sorted(ref)
    trained = []
    for k, v in ref.items():
        if _is_indexer(k) and not k.startswith("mtp_"):
            trained.append(k)
            assert not np.array_equal(got[k], v), k
        else:
            assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k
    assert len(trained) == 10


def test_dsa_keys_are_checked(tmp_path):
    from train.config import TrainConfigError, build
    from train.moe_rules import check_model
    from train.trainer import model_config

    with pytest.raises(TrainConfigError, match="dsa.indexer_loss_weight must be"):
        build(None, ["dsa.indexer_loss_weight=-1"])
    with pytest.raises(TrainConfigError, match="set dsa.indexer_loss_weight>0"):
        build(None, ["dsa.warmup=true"])
    with pytest.raises(TrainConfigError, match="mtp_loss_weight with dsa.warmup"):
        build(None, ["dsa.warmup=true", "dsa.indexer_loss_weight=1", "mtp_loss_weight=0.3"])
    with pytest.raises(TrainConfigError, match="adapter"):
        build(None, ["dsa.indexer_loss_weight=1", "lora.rank=4", "lora.targets=[q_proj]"])
    tc = build(None, ["model=glm4_9b", "dsa.indexer_loss_weight=1"])
    with pytest.raises(TrainConfigError, match="no sparse-attention indexer"):
        check_model(tc, model_config(tc)[0])
    tc = _config(tmp_path, "dsa.warmup=true", "dsa.indexer_loss_weight=1")
    cfg = model_config(tc)[0]
    assert cfg.index_dense and "index_dense" not in cfg.to_dict()  # a run setting, never saved with the model

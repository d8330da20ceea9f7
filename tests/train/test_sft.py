"""glm-train objective=sft: packed conversations against the same conversations run one by one, targets against
THUDM's golden labels, bad records reported with file:line, and a short run on a GLM-4 chat base."""

import json

import jax
import numpy as np
import pytest
from helpers import FIX
from helpers import SFT_EXAMPLES as EXAMPLES
from helpers.adapter_models import build_glm4_chat
from helpers.train_runs import CACHE, metrics

import glm_jax
from glm_jax.data import sft
from glm_jax.data.sft_batches import SFTBatches


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4_chat_base")
    build_glm4_chat(folder)
    return folder


def _golden_jsonl(tmp_path, fmt):
    cases = json.loads((FIX / "sft" / f"{fmt}.json").read_text(encoding="utf-8"))["cases"]
    kept = [c for c in cases if c.get("input_ids") is not None]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(c["example"], ensure_ascii=False) + "\n" for c in kept), encoding="utf-8")
    return path, kept


def _segments(batch):
    """Per packed conversation: (tokens, targets, loss_mask, positions, row, slice)."""
    out = []
    for r in range(len(batch["tokens"])):
        seg = batch["segment_ids"][r]
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            sl = slice(idx[0], idx[-1] + 1)
            out.append(tuple(batch[k][r, sl] for k in ("tokens", "targets", "loss_mask", "position_ids")) + (r, sl))
    return out


def _ce(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    return np.asarray(lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])


@pytest.mark.parametrize("fmt", ["glm4", "glm4_combine"])
def test_packed_rows_carry_the_golden_labels(tmp_path, fmt):
    tok = glm_jax.load_tokenizer(FIX / "chat-templates" / "glm-4-9b-chat", chat_format="glm4")
    path, cases = _golden_jsonl(tmp_path, fmt)
    longest = max(len(json.loads(c["input_ids"]) if isinstance(c["input_ids"], str) else c["input_ids"]) for c in cases)
    data = SFTBatches(path, tok, fmt, seq_len=longest + 8, rows=64, seed=1)
    batch = data.epoch_rows(0)
    assert len(batch["tokens"]) < len(cases)  # several conversations share a row
    golden = {}
    for c in cases:
        ids = json.loads(c["input_ids"]) if isinstance(c["input_ids"], str) else c["input_ids"]
        labels = json.loads(c["labels"]) if isinstance(c["labels"], str) else c["labels"]
        golden[tuple(ids)] = labels
    segs = _segments(batch)
    trained = [g for g in golden.items() if any(x != sft.IGNORE for x in g[1][1:])]
    assert len(segs) == len(trained)
    for tokens, targets, mask, pos, _, _ in segs:
        labels = golden[tuple(tokens.tolist())]
        want = np.array(labels[1:] + [sft.IGNORE])  # the output at t predicts labels[t + 1]
        np.testing.assert_array_equal(mask, (want != sft.IGNORE).astype(np.float32))
        np.testing.assert_array_equal(targets[want != sft.IGNORE], want[want != sft.IGNORE])
        np.testing.assert_array_equal(pos, np.arange(len(tokens)))  # positions restart per conversation


def test_packed_loss_equals_conversations_one_by_one(base):
    lm = glm_jax.from_pretrained(base)
    tok = glm_jax.load_tokenizer(base)
    data = SFTBatches(EXAMPLES / "glm4_chat.jsonl", tok, "glm4", seq_len=256, rows=8, seed=0)
    batch = data.epoch_rows(0)
    assert len(batch["tokens"]) < len(data.examples)
    logits = lm.module.apply(
        {"params": lm.params},
        batch["tokens"],
        None,
        batch["position_ids"],
        None,
        segment_ids=batch["segment_ids"],
    )
    packed_ce = _ce(logits, batch["targets"])
    by_tokens = {tuple(ids): labels for ids, labels in data.examples}
    n = 0
    for tokens, _, _, _, r, sl in _segments(batch):
        labels = np.array(by_tokens[tuple(tokens.tolist())])
        alone = np.asarray(lm(tokens[None]))[0]  # the conversation by itself, default positions and mask
        want_t = labels[1:]
        keep = np.flatnonzero(want_t != sft.IGNORE)
        ref = _ce(alone[:-1][keep], want_t[keep])
        got = packed_ce[r, sl][keep]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        assert batch["loss_mask"][r, sl][keep].all()
        n += len(keep)
    assert n == int(batch["loss_mask"].sum()) and n > 20


def test_sft_run_reports_bad_records(base, tmp_path, capsys):
    from train.config import build
    from train.trainer import train

    src = tmp_path / "data"
    src.mkdir()
    good = (EXAMPLES / "glm4_chat.jsonl").read_text(encoding="utf-8").splitlines()
    bad = [
        good[0],
        "{not json",
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
        *good[1:],
    ]
    (src / "a.jsonl").write_text("\n".join(bad) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    tc = build(
        None,
        [
            f"model={base}",
            "objective=sft",
            "data.format=glm4",
            f"data.source={src}",
            "seq_len=128",
            "batch_size=2",
            "steps=3",
            "log_every=1",
            "checkpoint_every=3",
            "learning_rate=1e-3",
            f"output_dir={run}",
            "progress=none",
            f"compilation_cache_dir={CACHE}",
        ],
    )
    train(tc)
    out = capsys.readouterr().out
    for line in (2, 3, 4):
        assert f"{src / 'a.jsonl'}:{line}:" in out, out
    assert f"{len(good)} records, 3 skipped" in out
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in m)
    assert (run / "tokenizer.model").is_file() and (run / "config.json").is_file()
    # the run is a checkpoint folder of the base's family
    assert glm_jax.from_pretrained(run).config.family == glm_jax.from_pretrained(base).config.family

"""glm-train objective=cloze: the step-1 loss and accuracy against a reference written out by hand here (each
record's text split at [MASK] and tokenized, Part A = [CLS] left [MASK] right, Part B = <sop> candidate, one
unpadded row per candidate through module.apply, the target log-probs of candidate + <eop> gathered and summed,
softmax over the candidates, -log p(label)); the loss falls on the bundled example; bad records are skipped with
file:line, bad settings exit 2 with one `error:` line."""

import contextlib
import io
import json

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.train_runs import CACHE, metrics

import glm_jax

EXAMPLE = helpers.ROOT / "train" / "data" / "cloze" / "example.jsonl"
TINY = "model_overrides={hidden_size: 32, num_heads: 2, num_kv_heads: 2, head_dim: 16, ffn_size: 128, num_layers: 2}"
VERB = {"yes": "yes", "no": "no"}


def _run(out, *overrides):
    from train.config import build
    from train.trainer import train

    tc = build(
        "glm_cloze",
        [TINY, f"output_dir={out}", "progress=none", f"compilation_cache_dir={CACHE}", "log_every=1", *overrides],
    )
    train(tc)
    return metrics(out)


def _reference(lm, records, verbalizer, length_penalty=0.0):
    """(mean cross entropy, accuracy) of the records, by hand from the model's logits; a candidate's score is
    divided by its target count ** length_penalty when that is > 0 (GLMForMultiTokenCloze)."""
    from glm_jax.data.tokenize import bundled_tokenizer, special_ids

    tok = bundled_tokenizer()
    ids = special_ids(tok)
    labels = list(verbalizer)
    apply = jax.jit(lm.module.apply)  # one compile per row length; eager flax is slower
    ces, hits = [], []
    for rec in records:
        left_text, right_text = rec["text"].split("[MASK]")
        left, right = [ids.cls] + tok.encode(left_text), tok.encode(right_text)
        scores = []
        for label in labels:
            cand = tok.encode(verbalizer[label])
            part_a = left + [ids.mask] + right
            tokens = part_a + [ids.sop] + cand
            pos = list(range(len(part_a))) + [len(left)] * (len(cand) + 1)
            block = [0] * len(part_a) + list(range(1, len(cand) + 2))
            logits = apply(
                {"params": lm.params},
                jnp.asarray([tokens]),
                None,
                jnp.asarray([[pos, block]]),
                jnp.asarray([len(part_a)]),
            )[0]
            logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
            targets = cand + [ids.eop]  # the <sop> position predicts the first candidate token
            total = sum(logp[len(part_a) + j, t] for j, t in enumerate(targets))
            scores.append(total / len(targets) ** length_penalty if length_penalty > 0 else total)
        s = np.asarray(scores)
        logz = np.log(np.sum(np.exp(s - s.max()))) + s.max()
        k = labels.index(rec["label"])
        ces.append(logz - s[k])
        hits.append(int(np.argmax(s)) == k)
    return float(np.mean(ces)), float(np.mean(hits))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """10 steps on the 12 example records, all of them in every batch: (run folder, metrics, stdout)."""
    run = tmp_path_factory.mktemp("cloze") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        m = _run(run, "steps=10", "batch_size=12", "learning_rate=3e-3", "warmup_steps=1")
    return run, m, buf.getvalue()


def test_loss_falls_and_accuracy_is_reported(trained):
    _, m, out = trained
    assert "12 records, 0 skipped" in out and "2 candidates a record" in out
    losses = [r["loss"] for r in m]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in m) and m[-1]["accuracy"] > 0.5


def test_step1_loss_equals_hand_reference(trained, tmp_path):
    """Finetuning the trained run (its predictions are far from uniform, so every target term counts): one step
    over all 12 records with learning rate 0, so the saved params are the ones step 1 saw."""
    records = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    run = tmp_path / "run"
    m = _run(run, f"model={trained[0]}", "steps=1", f"batch_size={len(records)}", "learning_rate=0")
    lm = glm_jax.from_pretrained(run)
    ce, acc = _reference(lm, records, VERB)
    assert ce < 0.5  # the trained run's loss, not chance (ln 2)
    np.testing.assert_allclose(m[0]["loss"], ce, rtol=1e-5)
    assert round(m[0]["accuracy"] * len(records)) == round(acc * len(records))  # the same records right
    assert m[0]["loss_tokens"] == len(records)  # the count is records, not tokens


def test_length_penalty_loss_equals_hand_reference(trained):
    """train/loss.py's cloze sums of a data.length_penalty=0.5 batch (glm_jax/data/cloze.py) against the hand
    reference with the same penalty."""
    from glm_jax.data.cloze import ClozeBatches
    from glm_jax.data.tokenize import bundled_tokenizer, special_ids
    from train.loss import cloze_sums

    records = [json.loads(x) for x in EXAMPLE.read_text().splitlines() if x.strip()]
    tok = bundled_tokenizer()
    data = ClozeBatches(EXAMPLE, tok, 64, len(records), ids=special_ids(tok), verbalizer=VERB, length_penalty=0.5)
    lm = glm_jax.from_pretrained(trained[0])
    _, sums = cloze_sums(lm.module, lm.params, next(data))
    ce, acc = _reference(lm, records, VERB, length_penalty=0.5)
    np.testing.assert_allclose(float(sums["ce"]) / len(records), ce, rtol=1e-5)
    assert float(sums["correct"]) == round(acc * len(records)) and float(sums["count"]) == len(records)


def test_bad_records_are_skipped_with_file_and_line(tmp_path, capsys):
    good = EXAMPLE.read_text().splitlines()
    lines = [
        good[0],
        "{not json",  # 2
        json.dumps({"text": "Is it? Answer: [MASK].", "label": "maybe"}),  # 3: not in the verbaliser
        json.dumps({"text": "no blank here", "label": "yes"}),  # 4
        json.dumps({"text": "Pick: [MASK].", "candidates": ["yes", "no", "maybe"], "label": 5}),  # 5
        json.dumps({"text": "Pick: [MASK].", "candidates": ["red", "green", "blue"], "label": 2}),  # kept, C = 3
        *good[1:],
    ]
    src = tmp_path / "data"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    m = _run(tmp_path / "run", f"data.source={src}", "steps=2", "batch_size=4")
    out = capsys.readouterr().out
    assert f"{len(good) + 1} records, 4 skipped" in out and "3 candidates a record" in out, out
    for line, why in ((2, "invalid JSON"), (3, "'maybe' is not in the verbalizer"), (4, "exactly once"), (5, "index")):
        assert f"{src / 'a.jsonl'}:{line}: " in out and why in out, (line, out)
    assert [r["step"] for r in m] == [1, 2] and all(np.isfinite(r["loss"]) for r in m)


def test_bad_settings_exit_2_with_one_error_line(tmp_path, run_main):
    """glm-train's main in this process (train/test_train_cli runs the command itself in a subprocess)."""
    from train.main import main

    nolabel = tmp_path / "x.jsonl"
    nolabel.write_text(json.dumps({"text": "A [MASK].", "label": "yes"}) + "\n")
    for args, expect in [
        (("data.verbalizer=null", f"data.source={nolabel}"), "needs a verbalizer"),
        (("data.verbalizer={yes: yes, no: no}",), "quote"),
        (("data.verbalizer={a: x}",), "at least two labels"),
        (("data.mixture_per=sample",), "objective=cloze takes data."),
        (("data.source=bundled",), "needs data.source"),
    ]:
        r = run_main(main, "--config", "glm_cloze", TINY, f"output_dir={tmp_path / 'run'}", *args)
        assert expect in r.error_line(), (args, r.err)

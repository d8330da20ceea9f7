"""The grain pipeline end to end on the bundled corpus: shapes, rules on real rows, determinism, resume."""

import json
import pathlib
import tempfile

import numpy as np
import pytest

from glm_jax import data
from glm_jax.data.batching import attention_mask

CACHE = pathlib.Path(tempfile.gettempdir()) / "glm_jax_test_cache"  # shared by the data test modules
BASE = dict(seq_len=256, batch_size=4, seed=1, cache_dir=str(CACHE), shard_index=0, shard_count=1)


def take(pipe, k):
    return [next(pipe) for _ in range(k)]


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tok():
    return data.bundled_tokenizer(CACHE)


def test_blank_infilling_batch_shapes_and_row_rules(tok):
    with data.make_pipeline(BASE, block_mask_prob=0.0, segment_ids=True) as pipe:
        batches = take(pipe, 6)
    ids = data.special_ids(tok)
    B, T = 4, 256
    modes = set()
    for batch in batches:
        assert batch["tokens"].shape == (B, T) and batch["tokens"].dtype == np.int32
        assert batch["position_ids"].shape == (B, 2, T) and batch["prefix_len"].shape == (B,)
        assert batch["loss_mask"].dtype == np.float32 and batch["segment_ids"].shape == (B, T)
        for b in range(B):
            t, y, lm = batch["tokens"][b], batch["targets"][b], batch["loss_mask"][b]
            pos, blk, seg = batch["position_ids"][b, 0], batch["position_ids"][b, 1], batch["segment_ids"][b]
            sep, L = int(batch["prefix_len"][b]), int(np.count_nonzero(seg))
            modes.add(int(batch["mode"][b]))
            assert (t[L:] == 0).all() and (lm[L:] == 0).all() and (pos[:,][L:] == 0).all()
            assert (lm[:sep] == 0).all() and lm[sep:L].all()
            assert (pos[:sep] == np.arange(sep)).all() and not blk[:sep].any()
            assert t[0] == ids.cls
            for q in range(sep, L - 1):  # Part B: the next input is this target, unless a block ends
                if y[q] != ids.eop:
                    assert t[q + 1] == y[q]
                else:
                    assert t[q + 1] == ids.sop
            # Part B tokens belong to the document of the mask they fill
            assert (seg[sep:L] == seg[pos[sep:L]]).all()
            assert ids.eos not in t[sep:L].tolist() or int(batch["mode"][b]) == 2
    assert modes <= {0, 1, 2}


SHORT_DOCS = [f"Document number {i}. It has a few short sentences; then it ends here!" * (1 + i % 3) for i in range(40)]


@pytest.mark.parametrize("objective", ["causal", "blank_infilling"])
def test_segment_ids_keep_packed_documents_apart(objective):
    with data.make_pipeline(BASE, objective=objective, segment_ids=True, batch_size=2, source=SHORT_DOCS) as pipe:
        batch = next(pipe)
    allowed = attention_mask(batch["prefix_len"], 256, batch["segment_ids"])
    seg = batch["segment_ids"]
    assert seg.max() > 3, "short documents are packed several to a row"
    for b in range(2):
        q, k = np.nonzero(allowed[b])
        assert (seg[b, q] == seg[b, k]).all()
        L = int(np.count_nonzero(seg[b]))
        assert (np.diff(seg[b, : int(batch["prefix_len"][b]) or L]) >= 0).all()  # documents stay in order


def test_causal_and_chatglm_prefix_batches(tok):
    ids = data.special_ids(tok)
    with data.make_pipeline(BASE, objective="causal") as pipe:
        batch = next(pipe)
    assert batch["position_ids"].shape == (4, 256) and not batch["prefix_len"].any()
    assert (batch["tokens"][:, 1:] == batch["targets"][:, :-1]).all()  # full rows, shifted by one
    assert batch["loss_mask"].all()
    assert ids.cls not in batch["tokens"]
    with data.make_pipeline(BASE, objective="chatglm_prefix") as pipe:
        batch = next(pipe)
    for b in range(4):
        sep = int(batch["prefix_len"][b])
        t, y, pos = batch["tokens"][b], batch["targets"][b], batch["position_ids"][b]
        assert t[sep - 1] == ids.gmask and t[sep] == ids.sop
        assert (pos[0, sep:][t[sep:] != 0] == sep - 1).all() and pos[1, sep] == 1
        L = int(np.count_nonzero(t))
        assert (t[sep + 1 : L] == y[sep : L - 1]).all() and batch["loss_mask"][b, sep:L].all()


def test_token_level_mask_ratio_on_real_data():
    ratios = []
    with data.make_pipeline(BASE, mixture="glm_large", seq_len=512, batch_size=8) as pipe:
        sop = pipe.ids.sop
        for batch in take(pipe, 8):
            for b in range(8):
                sep, L = int(batch["prefix_len"][b]), int(np.count_nonzero(batch["tokens"][b]))
                S = int(np.sum(batch["tokens"][b, sep:L] == sop))
                ratios.append((L - sep - S) / (L - 2 * S))
    assert 0.14 <= np.mean(ratios) <= 0.16, np.mean(ratios)


def test_same_seed_same_batches_other_seed_differs():
    with data.make_pipeline(BASE) as a, data.make_pipeline(BASE) as b, data.make_pipeline(BASE, seed=2) as c:
        xa, xb, xc = take(a, 4), take(b, 4), take(c, 4)
    assert all(same(p, q) for p, q in zip(xa, xb))
    assert not same(xa[0], xc[0])


@pytest.mark.parametrize("shard_count", [1, 2])
def test_resume_from_saved_state_gives_identical_batches(shard_count):
    expected_by_shard = []
    for shard in range(shard_count):
        cfg = dict(BASE, shard_index=shard, shard_count=shard_count)
        with data.make_pipeline(cfg) as pipe:
            take(pipe, 3)
            state = json.loads(json.dumps(pipe.get_state()))
            stats_at_k = pipe.stats
            expected = take(pipe, 3)
        with data.make_pipeline(cfg) as resumed:
            resumed.set_state(state)
            assert resumed.stats == stats_at_k
            got = take(resumed, 3)
        assert all(same(p, q) for p, q in zip(expected, got))
        expected_by_shard.append(expected)
    if shard_count == 2:
        assert not same(expected_by_shard[0][0], expected_by_shard[1][0])


def test_state_from_another_config_is_refused():
    with data.make_pipeline(BASE) as pipe:
        next(pipe)
        state = pipe.get_state()
    with data.make_pipeline(BASE, seq_len=128) as other, pytest.raises(ValueError):
        other.set_state(state)


def test_worker_processes_give_the_same_batches_and_resume():
    with data.make_pipeline(BASE) as seq:
        expected = take(seq, 4)
    with data.make_pipeline(BASE, num_workers=2) as par:
        got = take(par, 3)
        state = json.loads(json.dumps(par.get_state()))
        got += take(par, 1)
        par.set_state(state)  # rewind the worker pool to batch 3
        again = next(par)
    assert all(same(p, q) for p, q in zip(expected, got))
    assert same(again, expected[3])


def test_bundled_sentencepiece_training_is_deterministic(tmp_path, tok):
    from glm_jax.data.tokenize import train_bundled_sentencepiece

    fresh = train_bundled_sentencepiece(tmp_path)
    assert fresh.read_bytes() == train_bundled_sentencepiece(CACHE).read_bytes()
    text = "To be, or not to be: that is the question."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 2


@pytest.mark.parametrize("objective", ["blank_infilling", "causal", "chatglm_prefix"])
@pytest.mark.parametrize("seq_len", [16, 33])
def test_tiny_sequences_work_for_every_rule(objective, seq_len):
    cfg = dict(BASE, objective=objective, seq_len=seq_len, short_seq_prob=1.0, single_span_prob=0.3)
    with data.make_pipeline(cfg) as pipe:
        for batch in take(pipe, 4):
            assert batch["tokens"].shape == (4, seq_len)

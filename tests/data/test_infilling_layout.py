"""infilling.layout / prefix_layout against the reference's golden cases and the spec's worked examples."""

import json

import numpy as np
import pytest

from glm_jax import infilling

FIELDS = ("tokens", "targets", "loss_mask", "position_ids", "block_position_ids", "sep")


def _cases(fixtures_dir):
    d = json.loads((fixtures_dir / "blank-infilling" / "layout.json").read_text())
    return d["meta"]["special_token_ids"], d["cases"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_layout_matches_reference_golden_case(fixtures_dir, index):
    ids, cases = _cases(fixtures_dir)
    case = cases[index]
    assert not case["config"]["shuffle_blocks"] and case["config"]["block_position_encoding"]
    mask = {"bert": ids["MASK"], "gap_sentence": ids["sMASK"], "generation": ids["gMASK"]}[case["task"]]
    out = infilling.layout(
        case["input"]["tokens"],
        case["input"]["partB_span_order"],
        mask_id=mask,
        sop_id=ids["sop"],
        eop_id=ids["eop"],
        block_position=True,
        eos_id=ids["eos"],
    )
    assert sorted(out) == sorted(FIELDS)
    for key in FIELDS:
        got = out[key] if key == "sep" else np.asarray(out[key]).tolist()
        assert got == case["output"][key], (case["name"], key)


def test_golden_cases_cover_every_fixture_case(fixtures_dir):
    assert len(_cases(fixtures_dir)[1]) == 3


# A worked case: x1..x6 = 11..16, [M]=1, [S]=2, [E]=3; spans {x3}=[2,3) and {x5 x6}=[4,6), Part B order (x5 x6), (x3).
def test_worked_example_a_shuffled_part_b_order():
    out = infilling.layout([11, 12, 13, 14, 15, 16], [(4, 6), (2, 3)], mask_id=1, sop_id=2, eop_id=3)
    assert out["tokens"].tolist() == [11, 12, 1, 14, 1, 2, 15, 16, 2, 13]
    assert out["targets"].tolist() == [11, 12, 1, 14, 1, 15, 16, 3, 13, 3]
    assert out["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert out["position_ids"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert out["block_position_ids"].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert out["sep"] == 5


def test_no_block_position_gives_block_id_one_on_part_b():
    out = infilling.layout(
        [11, 12, 13, 14, 15, 16], [(4, 6), (2, 3)], mask_id=1, sop_id=2, eop_id=3, block_position=False
    )
    assert out["block_position_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert out["position_ids"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]


def test_adjacent_spans_and_span_at_start_and_end():
    # [0,2) and [2,3) touch; [4,5) ends the text. Positions count each span once.
    out = infilling.layout([10, 11, 12, 13, 14], [(2, 3), (4, 5), (0, 2)], mask_id=1, sop_id=2, eop_id=3)
    assert out["tokens"].tolist() == [1, 1, 13, 1, 2, 12, 2, 14, 2, 10, 11]
    assert out["targets"].tolist() == [1, 1, 13, 1, 12, 3, 14, 3, 10, 11, 3]
    assert out["position_ids"].tolist() == [0, 1, 2, 3, 1, 1, 3, 3, 0, 0, 0]
    assert out["sep"] == 4


def test_no_spans_is_part_a_only():
    out = infilling.layout([5, 6, 7], [], mask_id=1, sop_id=2, eop_id=3)
    assert out["tokens"].tolist() == [5, 6, 7] and out["sep"] == 3 and out["loss_mask"].sum() == 0


# Prefix layout, worked: [CLS] a b c d <eos> with g = 3 (k = 3); [CLS]=9 a..d=11..14 <eos>=8 [gMASK]=4 [S]=2.
def test_worked_example_e_prefix_layout():
    out = infilling.prefix_layout([9, 11, 12, 13, 14, 8], 3, gmask_id=4, sop_id=2, loss_mask=[0, 1, 1, 1, 1, 1])
    assert out["tokens"].tolist() == [9, 11, 12, 4, 2, 13, 14]
    assert out["targets"].tolist() == [9, 11, 12, 4, 13, 14, 8]
    assert out["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert out["position_ids"].tolist() == [0, 1, 2, 3, 3, 3, 3]
    assert out["block_position_ids"].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert out["sep"] == 4


@pytest.mark.parametrize(
    "spans",
    [
        [(1, 3), (2, 4)],  # overlap
        [(0, 2), (1, 2)],  # nested overlap
        [(3, 3)],  # empty
        [(4, 2)],  # reversed
        [(-1, 2)],  # out of range
        [(2, 7)],  # past the end
        [(0.5, 2)],  # not integers
    ],
)
def test_invalid_spans_raise_value_error(spans):
    with pytest.raises(ValueError):
        infilling.layout([1, 2, 3, 4, 5, 6], spans, mask_id=1, sop_id=2, eop_id=3)


def test_span_containing_eos_is_rejected_when_eos_given():
    with pytest.raises(ValueError):
        infilling.layout([1, 2, 8, 4], [(1, 3)], mask_id=9, sop_id=10, eop_id=11, eos_id=8)


def test_two_dimensional_tokens_rejected():
    with pytest.raises(ValueError):
        infilling.layout([[1, 2], [3, 4]], [], mask_id=1, sop_id=2, eop_id=3)


def test_prefix_layout_rejects_bad_k():
    with pytest.raises(ValueError):
        infilling.prefix_layout([1, 2, 3], 3, gmask_id=4, sop_id=5)

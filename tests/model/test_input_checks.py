"""Inputs checked at the API (glm_jax.inputs): lm(...), lm.generate(...) and stream_generate refuse ids outside the
vocabulary, wrong shapes and lengths past a learned position table with a ValueError naming the problem, on the
host before anything is compiled; valid inputs of every documented form still give the golden logits."""

import codecs

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fixture_models import FIX, io, load, max_diff, reference_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_jax import stream
from glm_jax.inputs import InputError, decode_memory_bytes, decode_text, position_limit

# one family per kind of positions: learned 2-D (the original GLM), 2-D RoPE (ChatGLM-6B), 1-D RoPE (Glm4)
FAMILIES = [("glm-original", "model"), ("chatglm-6b", "model_sharded_safetensors"), ("transformers-glm4", "model")]


def _lm(name):
    return load(name, dict(FAMILIES)[name])


def _raises(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    assert isinstance(e.value, InputError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return str(e.value)


@pytest.mark.parametrize("name", [f for f, _ in FAMILIES])
def test_valid_inputs_of_every_form_still_match_the_reference(name):
    """The checks let through what the reference code was fed (dense masks, [B, 2, T] positions, prefix_len)."""
    d = io(name)
    kw, real = reference_inputs(name, d)
    assert max_diff(_lm(name)(d["input_ids"], **kw), d["logits"], real) <= (5e-4 if name == "chatglm-6b" else 1e-4)


@pytest.mark.parametrize("name", [f for f, _ in FAMILIES])
def test_ids_outside_the_vocabulary(name):
    lm = _lm(name)
    V = lm.config.vocab_size
    ids = np.full((2, 6), 7)
    ids[1, 4] = V
    # unchecked, the model returns NaN logits for an id past the table, and -1 is silently the last row
    raw = np.asarray(lm.module.apply({"params": lm.params}, jnp.asarray(ids)))
    assert not np.isfinite(raw[1]).all()
    wrap = np.asarray(lm.module.apply({"params": lm.params}, jnp.asarray([[7, -1]])))
    last = np.asarray(lm.module.apply({"params": lm.params}, jnp.asarray([[7, V - 1]])))
    np.testing.assert_array_equal(wrap, last)
    msg = _raises(lambda: lm(ids), "input_ids[1, 4]", str(V), "vocab")
    assert f"= {V} " in msg
    _raises(lambda: lm([[7, -1]]), "input_ids[0, 1]", "-1", "vocab")
    _raises(lambda: lm.generate(np.array([[7, V + 5]]), max_new_tokens=2), str(V + 5), "vocab")
    _raises(lambda: list(stream.stream_generate(lm, [7, -3], max_new_tokens=2)), "-3", "vocab")


@pytest.mark.parametrize("name", [f for f, _ in FAMILIES])
def test_shapes_and_dtypes(name):
    lm = _lm(name)
    c = lm.config
    B, T = 2, 6
    ids = np.full((B, T), 7)
    _raises(lambda: lm(ids[0]), "input_ids", "2-D", "(6,)")
    _raises(lambda: lm(ids[None]), "input_ids", "2-D")
    _raises(lambda: lm(ids.astype(np.float32)), "input_ids", "integers", "float32")
    _raises(lambda: lm(np.zeros((2, 0), np.int32)), "input_ids", "empty")
    _raises(lambda: lm([[1, 2], [3]]), "input_ids")
    ones = np.ones((B, T), np.int32)
    _raises(lambda: lm(ids, attention_mask=ones[:, :-1]), "attention_mask", "(2, 6)", "(2, 5)")
    _raises(lambda: lm(ids, attention_mask=ones * 2), "attention_mask", "1/0")
    _raises(lambda: lm(ids, attention_mask=np.ones((B, T, T + 1), bool)), "attention_mask", "(2, 6, 7)")
    _raises(lambda: lm(ids, attention_mask=np.ones((B, 2, T, T), bool)), "attention_mask", "(2, 1, 6, 6)")
    _raises(lambda: lm(ids, prefix_len=[1, 2, 3]), "prefix_len", "(2,)")
    _raises(lambda: lm(ids, prefix_len=[1, T + 1]), "prefix_len", str(T + 1), "row 1")
    _raises(lambda: lm(ids, prefix_len=[0.5, 1.0]), "prefix_len", "integers")
    pos_1d = np.tile(np.arange(T), (B, 1))
    pos_2d = np.stack([pos_1d, np.zeros_like(pos_1d)], axis=1)
    if c.positions_2d:
        _raises(lambda: lm(ids, position_ids=pos_1d), "position_ids", "(2, 2, 6)", "(2, 6)")
        ok = pos_2d
    else:
        _raises(lambda: lm(ids, position_ids=pos_2d), "position_ids", "(2, 6)", "(2, 2, 6)")
        ok = pos_1d
    _raises(lambda: lm(ids, position_ids=ok.astype(np.float32)), "position_ids", "integers")
    # every accepted form runs; an all-ones padding mask changes nothing (GLM: it is a pure key-padding mask, so
    # the whole row is bidirectional, as in HF GLM)
    base = np.asarray(lm(ids))
    assert np.isfinite(base).all()
    if c.mask_rule != "sep_at_sop":
        np.testing.assert_allclose(np.asarray(lm(ids, attention_mask=ones)), base, atol=1e-5)
    assert np.asarray(lm(ids, position_ids=ok)).shape == (B, T, c.vocab_size)
    assert np.asarray(lm(ids, prefix_len=np.array([2, 3]))).shape == (B, T, c.vocab_size)
    assert np.asarray(lm(ids, prefix_len=2)).shape == (B, T, c.vocab_size)  # one number for every row
    for dense in (np.tril(np.ones((B, 1, T, T), bool)), np.tril(np.ones((B, T, T), np.int32))):
        assert np.isfinite(np.asarray(lm(ids, attention_mask=dense))).all()
    # generate: a [B, T] padding mask only, whole numbers, sampling settings that mean something
    _raises(lambda: lm.generate(ids, attention_mask=np.ones((B, 1, T, T)), max_new_tokens=2), "attention_mask")
    _raises(lambda: lm.generate(ids, max_new_tokens=-1), "max_new_tokens")
    _raises(lambda: lm.generate(ids, max_new_tokens=2.5), "max_new_tokens")
    _raises(lambda: lm.generate(ids, max_new_tokens=2, top_k=-1), "top_k")
    _raises(lambda: lm.generate(ids, max_new_tokens=2, do_sample=True, temperature=float("nan")), "temperature")
    _raises(lambda: lm.generate(ids, max_new_tokens=2, do_sample=True, top_p=-0.5), "top_p")
    out = lm.generate(ids[0], attention_mask=ones[0], max_new_tokens=2, eos_token_id=[-1])  # 1-D works as before
    np.testing.assert_array_equal(out, lm.generate(ids[:1], max_new_tokens=2, eos_token_id=[-1]))


def test_learned_position_limit():
    """The original GLM has max_sequence_length (32 here) learned positions; RoPE families have no such limit."""
    lm = _lm("glm-original")
    M = lm.config.max_position_embeddings
    assert position_limit(lm.config) == M == 32
    assert position_limit(_lm("chatglm-6b").config) is None and position_limit(_lm("transformers-glm4").config) is None
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 300, size=(2, M + 2))
    # unchecked, past the table every logit of the sequence is NaN
    raw = np.asarray(lm.module.apply({"params": lm.params}, jnp.asarray(ids)))
    assert np.isnan(raw).all()
    assert np.isfinite(np.asarray(lm(ids[:, :M]))).all()
    _raises(lambda: lm(ids[:, : M + 1]), "33 tokens", "32 learned positions", "max_sequence_length")
    # positions count the real tokens: M real tokens after left padding fit
    mask = np.ones((2, M + 2), np.int32)
    mask[:, :2] = 0
    assert np.isfinite(np.asarray(lm(ids, attention_mask=mask))[:, 2:]).all()
    mask[1, 1] = 1
    _raises(lambda: lm(ids, attention_mask=mask), "33 tokens")
    # explicit positions: each value against its table ([0, M] rows with block positions)
    pos = np.zeros((2, 2, 8), np.int64)
    pos[:, 0] = np.arange(8)
    assert np.isfinite(np.asarray(lm(ids[:, :8], position_ids=pos))).all()
    for part, value, word in ((0, M + 1, "position"), (1, M + 1, "block position"), (0, -1, "position")):
        bad = pos.copy()
        bad[1, part, 3] = value
        _raises(lambda b=bad: lm(ids[:, :8], position_ids=b), word, str(value), "row 1, token 3", f"[0, {M + 1})")
    # generate: the prompt plus max_new_tokens
    _raises(lambda: lm.generate(ids[:, :30], max_new_tokens=3), "30 tokens + max_new_tokens 3 = 33", "32 learned")
    assert lm.generate(ids[:, :29], max_new_tokens=3, eos_token_id=[-1]).shape == (2, 32)
    _raises(lambda: list(stream.stream_generate(lm, ids[0, :31], max_new_tokens=2)), "31 tokens", "32 learned")
    assert len(list(stream.stream_generate(lm, ids[0, :30], max_new_tokens=2, stop_token_ids=[]))) == 2


def test_checks_run_on_the_host_before_anything_compiles():
    lm = _lm("transformers-glm4")
    ids = np.full((1, 5), 7)
    lm(ids)
    size = lm._apply._cache_size()
    for bad in (np.full((1, 5), 10**6), np.full((1, 7), 7.0), np.full((3, 5), -2)):
        with pytest.raises(InputError):
            lm(bad)
    assert lm._apply._cache_size() == size  # nothing was traced for the refused calls
    # inside a caller's jit the arrays are tracers: shapes and dtypes are still checked, values cannot be
    f = jax.jit(lambda x: lm(x))
    assert np.asarray(f(jnp.asarray(ids))).shape == (1, 5, lm.config.vocab_size)
    with pytest.raises(InputError, match="2-D"):
        f(jnp.asarray(ids[0]))


def test_decode_memory_estimate_against_xla():
    """The estimate glm-generate compares with the machine's memory: what XLA's own memory analysis of the compiled
    prefill reports (temporaries + outputs), within a few percent, and never much below it."""
    for name in ("chatglm-6b", "transformers-glm4"):
        lm = _lm(name)
        for n in (700, 1500):
            Tp, S = stream.cache_plan(n, 100)
            one = jnp.float32(1)
            compiled = stream._prefill.lower(
                lm.module,
                lm.params,
                jnp.zeros((1, Tp), jnp.int32),
                jnp.ones((1, Tp), jnp.int32),
                jnp.int32(n),
                jax.random.PRNGKey(0),
                one,
                one,
                cache_len=S,
                do_sample=False,
                top_k=0,
            ).compile()
            ma = compiled.memory_analysis()
            xla = ma.temp_size_in_bytes + ma.output_size_in_bytes
            est = decode_memory_bytes(lm.config, 1, Tp, S)
            assert 0.97 <= sum(est.values()) / xla <= 1.15, (name, n, est, xla)
            c = lm.config
            assert est["kv_cache"] == 2 * c.num_layers * c.num_kv_heads * S * c.head_dim * 4


# ------------------------------------------------------------------ text with invalid UTF-8


class _Count:
    def __init__(self):
        self.n = 0

    def __call__(self, e):
        self.n += 1
        return "\ufffd", e.end


_counter = _Count()
codecs.register_error("test_input_checks_count", _counter)


def _reference(data: bytes):
    """Python's decoder with a counting error handler: the text and how many replacements it made."""
    _counter.n = 0
    return data.decode("utf-8", "test_input_checks_count"), _counter.n


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=6), st.text(max_size=4).map(lambda s: s.encode())), max_size=12))
def test_decode_text_replaces_and_counts(chunks):
    data = b"".join(chunks)
    want = _reference(data)
    assert decode_text(data) == want
    # the same bytes as Python hands them over from argv or a surrogateescape stream
    assert decode_text(data.decode("utf-8", "surrogateescape")) == want


def test_decode_text_cases():
    assert decode_text("plain ü") == ("plain ü", 0)
    assert decode_text(b"caf\xc3 ok \xff") == ("caf\ufffd ok \ufffd", 2)
    assert decode_text("already \ufffd replaced".encode()) == ("already \ufffd replaced", 0)
    assert decode_text(b"\xe2\x82") == ("\ufffd", 1)  # a truncated character is one sequence
    assert decode_text("lone \ud800 surrogate")[0] == "lone \ufffd\ufffd\ufffd surrogate"  # e.g. from a JSON escape


def test_fixture_models_exist():
    for name, sub in FAMILIES:
        assert (FIX / name / sub / "config.json").is_file()

"""Pallas flash attention (interpret mode on CPU) against the XLA reference: values and gradients, GLM masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.model.flash import NEG, flash_attention, visible_blocks
from train.flops import flash_flops

TOL = 1e-5  # float32: atol and rtol


def _reference(q_BTNH, k_BSKH, v_BSKH, allowed_BTS):
    """Attention written out here, independent of glm_jax's own XLA path: grouped kv heads repeated, einsum scores
    scaled by 1/sqrt(H), blocked keys filled with the kernel's NEG before the softmax; gradients by autodiff."""
    N, H = q_BTNH.shape[2:]
    G = N // k_BSKH.shape[2]
    k_BSNH, v_BSNH = (jnp.repeat(x, G, axis=2) for x in (k_BSKH, v_BSKH))
    s_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / jnp.sqrt(jnp.float32(H))
    p_BNTS = jax.nn.softmax(jnp.where(allowed_BTS[:, None], s_BNTS, NEG), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p_BNTS, v_BSNH)


def _allowed(T, S, causal=True, prefix_len=None, q_seg=None, kv_seg=None, kv_valid=None, B=2, q_offset=0):
    """Dense [B, T, S] mask from the rule, in numpy; query t is key position q_offset + t."""
    t, s = q_offset + np.arange(T)[:, None], np.arange(S)[None, :]
    prefix = np.zeros(B, int) if prefix_len is None else np.asarray(prefix_len)
    allowed = np.ones((B, T, S), bool)
    if causal:
        allowed &= (s <= t)[None] | (s[None] < prefix[:, None, None])
    if q_seg is not None:
        allowed &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    if kv_valid is not None:
        allowed &= np.asarray(kv_valid, bool)[:, None, :]
    return allowed


def _inputs(B, T, S, N, K, H, seed=0):
    r = np.random.default_rng(seed)
    return [
        jnp.asarray(r.normal(size=shape), jnp.float32)
        for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))
    ]


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(fn, q, k, v, w):
    """fn(q, k, v) and the gradients of sum(w * fn(q, k, v)) w.r.t. q, k, v."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(w))


def _compare(
    B,
    T,
    S,
    N,
    K,
    H,
    block_q=16,
    block_k=16,
    causal=True,
    prefix_len=None,
    q_seg=None,
    kv_seg=None,
    kv_valid=None,
    seed=0,
    q_offset=0,
):
    """Assert forward and all three gradients match the reference; return the max abs errors."""
    q, k, v, w = _inputs(B, T, S, N, K, H, seed)
    allowed = jnp.asarray(_allowed(T, S, causal, prefix_len, q_seg, kv_seg, kv_valid, B, q_offset))
    kw = {
        "causal": causal,
        "block_q": block_q,
        "block_k": block_k,
        "interpret": True,
        "prefix_len": None if prefix_len is None else jnp.asarray(prefix_len, jnp.int32),
        "q_segment_ids": None if q_seg is None else jnp.asarray(q_seg),
        "kv_segment_ids": None if kv_seg is None else jnp.asarray(kv_seg),
        "kv_valid": None if kv_valid is None else jnp.asarray(kv_valid),
        "q_offset": q_offset,
    }

    def flash(q, k, v):
        return flash_attention(q, k, v, **kw)

    def ref(q, k, v):
        return _reference(q, k, v, allowed)

    got, want = _out_and_grads(flash, q, k, v, w), _out_and_grads(ref, q, k, v, w)
    errors = {}
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=TOL, err_msg=name)
        errors[name] = float(jnp.max(jnp.abs(g - r)))
    return errors


def _padding(B, S, left=(), right=()):
    valid = np.ones((B, S), bool)
    for b, n in left:
        valid[b, :n] = False
    for b, n in right:
        valid[b, S - n :] = False
    return valid


def test_causal_with_left_and_right_padding():
    # example 0: 7 left-padded keys, so queries 0..6 see no key at all (reference: uniform over all S keys)
    _compare(2, 48, 48, 2, 2, 16, kv_valid=_padding(2, 48, left=[(0, 7)], right=[(1, 9)]))


@pytest.mark.parametrize("prefix_len,N,K", [((37, 0), 4, 2), ((64, 16), 4, 1), ((5, 63), 2, 2)])
def test_prefix_per_example(prefix_len, N, K):
    _compare(2, 64, 64, N, K, 16, prefix_len=prefix_len)


def test_prefix_with_padding_and_dead_rows():
    valid = _padding(2, 48, left=[(0, 20)], right=[(1, 5)])
    valid[1] = False  # a fully padded example: every row dead
    _compare(2, 48, 48, 4, 2, 16, prefix_len=(10, 30), kv_valid=valid)


def test_segments_mid_block_with_prefix():
    seg = np.zeros((2, 64), np.int32)
    for b, cuts in enumerate([(11, 29, 50), (3, 40)]):
        for c in cuts:
            seg[b, c:] += 1
    seg[1, 60:] = 9  # a query segment that owns keys only at the very end
    _compare(2, 64, 64, 4, 2, 16, prefix_len=(20, 0), q_seg=seg, kv_seg=seg, kv_valid=_padding(2, 64, right=[(0, 3)]))


def test_segment_without_keys_is_a_dead_row():
    q_seg = np.zeros((1, 32), np.int32)
    q_seg[0, 20:] = 5  # no key has segment 5
    _compare(1, 32, 32, 2, 1, 16, q_seg=q_seg, kv_seg=np.zeros((1, 32), np.int32))


@pytest.mark.parametrize("N,K", [(2, 2), (4, 2), (4, 1)])
def test_gqa_ratios_and_ragged_length(N, K):
    # T = 50: not a multiple of 16, the last block is padded; block_k != block_q
    _compare(
        2,
        50,
        50,
        N,
        K,
        32,
        block_q=16,
        block_k=32,
        prefix_len=(37, 0),
        kv_valid=_padding(2, 50, left=[(1, 4)], right=[(0, 6)]),
    )


def test_bidirectional_with_segments_and_padding():
    q_seg = np.repeat(np.array([[0, 1], [0, 0]], np.int32), [17, 23], axis=1)  # T = 40
    kv_seg = np.repeat(np.array([[0, 1], [0, 1]], np.int32), [30, 26], axis=1)  # S = 56
    _compare(
        2,
        40,
        56,
        4,
        2,
        16,
        causal=False,
        q_seg=q_seg,
        kv_seg=kv_seg,
        kv_valid=_padding(2, 56, right=[(0, 10), (1, 26)]),
    )


def test_jit_with_traced_masks():
    B, T, N, K, H = 2, 50, 4, 2, 16
    q, k, v, _ = _inputs(B, T, T, N, K, H, seed=3)
    valid = jnp.asarray(_padding(B, T, left=[(1, 6)]))
    prefix = jnp.asarray([37, 0], jnp.int32)
    fn = jax.jit(functools.partial(flash_attention, block_q=16, block_k=16, interpret=True))
    got = fn(q, k, v, prefix_len=prefix, kv_valid=valid)
    want = _reference(q, k, v, jnp.asarray(_allowed(T, T, True, np.asarray(prefix), kv_valid=np.asarray(valid))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=TOL)


def test_bfloat16_against_float32_reference():
    B, T, N, K, H = 2, 48, 4, 2, 32
    q, k, v, w = _inputs(B, T, T, N, K, H, seed=4)
    prefix, valid = (30, 0), _padding(B, T, left=[(1, 5)])
    allowed = jnp.asarray(_allowed(T, T, True, prefix, kv_valid=valid))

    def flash(q, k, v):
        return flash_attention(
            q, k, v, prefix_len=jnp.asarray(prefix), kv_valid=jnp.asarray(valid), block_q=16, block_k=16, interpret=True
        )

    def ref(q, k, v):
        return _reference(q, k, v, allowed)

    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, w)]
    got = _out_and_grads(flash, *bf16)
    want = _out_and_grads(ref, *(x.astype(jnp.float32) for x in bf16))
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=2e-2, rtol=2e-2, err_msg=name)


def _dense_block_any(allowed_BTS, block_q, block_k):
    B, T, S = allowed_BTS.shape
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = np.zeros((B, nq * block_q, nk * block_k), bool)
    padded[:, :T, :S] = allowed_BTS
    return padded.reshape(B, nq, block_q, nk, block_k).any(axis=(2, 4))


@pytest.mark.parametrize("T,block_q,block_k", [(64, 16, 16), (50, 16, 32), (80, 32, 16)])
def test_visible_blocks_match_dense_mask(T, block_q, block_k):
    prefix = np.array([0, 37, T, 16, 1])
    got = np.asarray(visible_blocks(T, T, prefix_len=prefix, causal=True, block_q=block_q, block_k=block_k))
    allowed = _allowed(T, T, True, prefix, B=len(prefix))
    np.testing.assert_array_equal(got, _dense_block_any(allowed, block_q, block_k))
    causal_only = np.asarray(visible_blocks(T, T, causal=True, block_q=block_q, block_k=block_k))[0]
    if block_q == block_k:
        np.testing.assert_array_equal(causal_only, np.tril(np.ones_like(causal_only)))
    assert np.asarray(visible_blocks(T, T, causal=False, block_q=block_q, block_k=block_k)).all()


def test_kernels_compute_only_visible_blocks(monkeypatch):
    """Count the block pairs whose scores are computed (forward, dq and dk/dv kernels each recompute them) via a
    debug callback in flash._scores, which only runs under the kernels' pl.when."""
    from glm_jax.model import flash as flash_module

    calls = []
    scores = flash_module._scores

    def record():
        calls.append(1)

    def counting_scores(*args, **kwargs):
        jax.debug.callback(record)
        return scores(*args, **kwargs)

    monkeypatch.setattr(flash_module, "_scores", counting_scores)
    B, T, N, K, H = 2, 64, 4, 2, 16
    q, k, v, w = _inputs(B, T, T, N, K, H, seed=6)
    prefix = jnp.asarray([0, 37], jnp.int32)

    def flash(q, k, v):
        return flash_attention(q, k, v, prefix_len=prefix, block_q=16, block_k=16, interpret=True)

    jax.block_until_ready(_out_and_grads(flash, q, k, v, w))
    visible = int(visible_blocks(T, T, prefix_len=prefix, block_q=16, block_k=16).sum())
    assert visible == 10 + 13 < 2 * 16  # per head: 4·5/2 lower-triangular pairs; prefix 37 adds kv block 2 everywhere
    assert len(calls) == 3 * N * visible


@pytest.mark.parametrize("prefix", [0, 20])
def test_hidden_blocks_never_touch_the_output(prefix):
    """NaN keys/values in kv block 2 (keys 32..47) reach exactly the q blocks allowed to see that block: with prefix 0
    q blocks 2, 3; with prefix 20 (< 32) still only those. Earlier q blocks stay finite, in values and dq (the block
    is neither computed for them nor fetched: the index_map repeats a visible block)."""
    B, T, N, K, H = 1, 64, 2, 1, 16
    q, k, v, w = _inputs(B, T, T, N, K, H, seed=5)
    k, v = k.at[:, 32:48].set(jnp.nan), v.at[:, 32:48].set(jnp.nan)

    def flash(q, k, v):
        return flash_attention(q, k, v, prefix_len=jnp.asarray([prefix]), block_q=16, block_k=16, interpret=True)

    out, dq, _, _ = _out_and_grads(flash, q, k, v, w)
    assert np.isfinite(np.asarray(out[:, :32])).all() and np.isfinite(np.asarray(dq[:, :32])).all()
    assert np.isnan(np.asarray(out[:, 32:])).all()
    # a prefix reaching into block 2 makes it visible to every q block
    out = flash_attention(q, k, v, prefix_len=jnp.asarray([33]), block_q=16, block_k=16, interpret=True)
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("dtype,causal,N,K,T", [(jnp.bfloat16, True, 4, 2, 256), (jnp.float32, False, 4, 1, 200)])
def test_lowers_to_mosaic_for_tpu(dtype, causal, N, K, T):
    """Forward and backward pass Pallas' TPU (Mosaic) lowering, on CPU via jax.export: block shapes, index maps and
    kernel ops are accepted. libtpu's own Mosaic compile is not run here."""
    B, H = 2, 128
    q = jax.ShapeDtypeStruct((B, T, N, H), dtype)
    kv = jax.ShapeDtypeStruct((B, T, K, H), dtype)
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(q, k, v, prefix, valid, seg):
        out = flash_attention(
            q,
            k,
            v,
            prefix_len=prefix,
            kv_valid=valid,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            causal=causal,
            interpret=False,
        )
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, (0, 1, 2)))
    exported = jax.export.export(grads, platforms=["tpu"])(q, kv, kv, jax.ShapeDtypeStruct((B,), jnp.int32), ints, ints)
    assert exported.mlir_module().count("tpu_custom_call") == 3  # forward, dq, dk/dv


def test_flops_formula():
    B, T, N, H = 2, 64, 4, 16
    dense = flash_flops(B, T, T, N, H, causal=False)
    assert dense["fwd"] == 4 * B * N * T * T * H and dense["bwd"] == 2.5 * dense["fwd"]
    for prefix in (0, 37, T):
        got = flash_flops(B, T, T, N, H, causal=True, prefix_len_mean=prefix)
        frac = _allowed(T, T, True, [prefix], B=1).mean()
        np.testing.assert_allclose(got["visible_fraction"], frac)
        np.testing.assert_allclose(got["fwd"], 4 * B * N * T * T * H * frac)


def test_rejects_bad_shapes():
    q, k, v, _ = _inputs(1, 16, 16, 3, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, v, interpret=True)
    q, k, v, _ = _inputs(1, 24, 16, 2, 2, 16)
    with pytest.raises(ValueError, match="past the S=16 keys"):
        flash_attention(q, k, v, interpret=True)
    q, k, v, _ = _inputs(1, 16, 24, 2, 2, 16)
    with pytest.raises(ValueError, match="past the S=24 keys"):
        flash_attention(q, k, v, q_offset=10, interpret=True)


@pytest.mark.parametrize(
    "q_offset,T,prefix_len,N,K",
    [(0, 24, (0, 0), 2, 2), (40, 24, (0, 50), 4, 2), (21, 19, (30, 3), 4, 1), (45, 19, (64, 64), 2, 1)],
)
def test_query_offset_chunks(q_offset, T, prefix_len, N, K):
    """A chunk of queries (a context-parallel shard's) against all S keys: rows q_offset.. of the full attention,
    with offsets mid-block, prefixes that end inside, before and after the chunk, and dead padded rows."""
    S = 64
    valid = _padding(2, S, left=[(0, 30)], right=[(1, 6)])
    seg = np.repeat(np.arange(4), 16)[None].repeat(2, 0)
    _compare(2, T, S, N, K, 16, prefix_len=prefix_len, kv_valid=valid, q_offset=q_offset)
    _compare(
        2,
        T,
        S,
        N,
        K,
        16,
        prefix_len=prefix_len,
        q_seg=seg[:, q_offset : q_offset + T],
        kv_seg=seg,
        q_offset=q_offset,
        seed=1,
    )


def test_query_offset_traced():
    """The offset may be data (axis_index under shard_map): one compiled kernel serves every offset."""
    q, k, v, _ = _inputs(1, 16, 48, 2, 2, 16)
    fn = jax.jit(lambda q, k, v, off: flash_attention(q, k, v, q_offset=off, block_q=8, block_k=8, interpret=True))
    for off in (0, 13, 32):
        want = _reference(q, k, v, jnp.asarray(_allowed(16, 48, B=1, q_offset=off)))
        np.testing.assert_allclose(np.asarray(fn(q, k, v, jnp.int32(off))), np.asarray(want), atol=TOL, rtol=TOL)

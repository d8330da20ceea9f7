"""GLM-5's DSA indexer (glm_jax/model/indexer.py): the blockwise top-k against the dense one at T = 4096, and the
indexer loss (DeepSeek-V3.2's KL rule) against a numpy computation of the rule, in its sparse and dense forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.model.indexer import choose, dense_kl, index_scores, sparse_kl


def _inputs(rng, B, T, G, I, positive=False):
    q = rng.standard_normal((B, T, G, I)).astype(np.float32)
    k = rng.standard_normal((B, T, I)).astype(np.float32)
    if positive:  # every q·k > 0: ReLU never clips, so no two scores tie at 0
        q, k = np.abs(q), np.abs(k)
    w = rng.standard_normal((B, T, G)).astype(np.float32)
    return q, k, w


def test_blockwise_topk_equals_dense_at_4096():
    """Integer q, k, w in [-64, 64], G = I = 4 (scales 1/2): every score is exact in float32 (|score| < 2^24), so
    the blockwise and the dense scores are the same numbers, and lax.top_k's rule (ties to the lower index) gives
    identical choices."""
    T, K, block = 4096, 256, 512
    rng = np.random.default_rng(0)
    q = rng.integers(-64, 65, (1, T, 4, 4)).astype(np.float32)
    k = rng.integers(-64, 65, (1, T, 4)).astype(np.float32)
    w = rng.integers(-64, 65, (1, T, 4)).astype(np.float32)
    allowed = jnp.asarray(np.tril(np.ones((T, T), bool))[None])
    dense_v, dense_i = jax.jit(lambda q, k, w, a: jax.lax.top_k(index_scores(q, k, w, a), K))(q, k, w, allowed)
    blk = jax.jit(lambda q, k, w, a: choose(q, k, w, a, K, block))
    got_v, got_i = blk(q, k, w, allowed)
    dense_v, dense_i, got_v, got_i = map(np.asarray, (dense_v, dense_i, got_v, got_i))
    assert np.array_equal(got_v, dense_v)
    assert np.array_equal(got_i, dense_i)
    fin = np.isfinite(dense_v)  # queries t < K see t + 1 keys: the rest score -inf
    assert fin.sum() == sum(min(t + 1, K) for t in range(T))
    assert len(np.unique(dense_v[0, -1])) > K // 2  # the choice is not decided by ties alone
    # memory: the dense form's temporaries are the [T, G, S] product twice (before and after ReLU, 512 MiB here);
    # the blockwise form's are those of one block of 512 queries, 1/8 of them (10% slack for the small buffers)
    dense_fn = jax.jit(lambda q, k, w, a: jax.lax.top_k(index_scores(q, k, w, a), K))
    dense_mem = dense_fn.lower(q, k, w, allowed).compile().memory_analysis()
    mem = blk.lower(q, k, w, allowed).compile().memory_analysis()
    if mem is not None and dense_mem is not None:
        assert dense_mem.temp_size_in_bytes >= T * 4 * T * 4
        assert mem.temp_size_in_bytes < dense_mem.temp_size_in_bytes / (T // block) * 1.1, mem.temp_size_in_bytes


# ---------------------------------------------------------------- the indexer loss, in numpy
def _np_scores(q, k, w):
    """score[b, t, s] = Σ_g w[b, t, g] / sqrt(G) · relu(q[b, t, g] · k[b, s] / sqrt(I)), float64."""
    G, I = q.shape[-2], q.shape[-1]
    s = np.einsum("btgi,bsi->btgs", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(I)
    return np.einsum("btg,btgs->bts", w.astype(np.float64) / np.sqrt(G), np.maximum(s, 0.0))


def _np_kl(scores_row, probs_row, keys):
    """KL(p || softmax(scores)) over `keys`, p = probs L1-normalised over them."""
    p = probs_row[keys] / probs_row[keys].sum()
    z = scores_row[keys]
    logq = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - logq[nz])))


def _case(seed, B=2, T=40, G=4, I=8, N=3):
    rng = np.random.default_rng(seed)
    q, k, w = _inputs(rng, B, T, G, I)
    pad = np.ones((B, T), bool)
    pad[1, :5] = False  # row 1 is left-padded: its first 5 queries see nothing, and nobody sees those keys
    allowed = np.tril(np.ones((T, T), bool))[None] & pad[:, None, :]
    logits = rng.standard_normal((B, N, T, T))
    e = np.where(allowed[:, None], np.exp(logits), 0.0)
    probs = (e / np.maximum(e.sum(-1, keepdims=True), 1e-300)).sum(1)  # attention summed over N heads
    return q, k, w, allowed, probs


def test_sparse_indexer_loss_equals_numpy_kl():
    q, k, w, allowed, probs = _case(1)
    K, B, T = 6, q.shape[0], q.shape[1]
    scores = _np_scores(q, k, w)
    want, rows = 0.0, 0
    for b in range(B):
        for t in range(T):
            vis = np.flatnonzero(allowed[b, t])
            if not len(vis):
                continue
            top = vis[np.argsort(-scores[b, t, vis], kind="stable")[:K]]  # the indexer's choice over the visible keys
            # the sparse stage attends to the chosen keys only: its probabilities, renormalised there
            want += _np_kl(scores[b, t], probs[b, t], top)
            rows += 1
    want /= rows
    vals, idx = choose(q, k, w, jnp.asarray(allowed), K, block=16)
    got = float(sparse_kl(vals, idx, jnp.asarray(probs, jnp.float32)))
    assert rows == B * T - 5
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    assert want > 0.1  # random scores against random attention: far from a perfect match


def test_dense_indexer_loss_equals_numpy_kl():
    q, k, w, allowed, probs = _case(2)
    B, T = q.shape[:2]
    scores = _np_scores(q, k, w)
    kls = [
        _np_kl(scores[b, t], probs[b, t], np.flatnonzero(allowed[b, t]))
        for b in range(B)
        for t in range(T)
        if allowed[b, t].any()
    ]
    want = float(np.mean(kls))
    for block in (16, 64):  # three blocks with padding, and one
        got = float(dense_kl(q, k, w, jnp.asarray(allowed), jnp.asarray(probs, jnp.float32), block=block))
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (block, got, want)


def test_indexer_loss_gradient_reaches_scores_only_where_chosen():
    """d KL / d score = softmax(score) - p over the chosen keys (the KL's gradient), zero elsewhere: the
    blockwise form's gradient (recomputed blocks) against that closed form, computed in numpy."""
    q, k, w, allowed, probs = _case(3, T=24)
    K = 5
    a = jnp.asarray(allowed)
    p32 = jnp.asarray(probs, jnp.float32)
    g = jax.grad(lambda w: sparse_kl(*choose(q, k, w, a, K, block=8), p32))(jnp.asarray(w))
    scores = _np_scores(q, k, w)
    B, T, G = w.shape
    want = np.zeros_like(w, dtype=np.float64)
    rows = sum(1 for b in range(B) for t in range(T) if allowed[b, t].any())
    s = np.maximum(np.einsum("btgi,bsi->btgs", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(q.shape[-1]), 0)
    for b in range(B):
        for t in range(T):
            vis = np.flatnonzero(allowed[b, t])
            if not len(vis):
                continue
            top = vis[np.argsort(-scores[b, t, vis], kind="stable")[:K]]
            z = scores[b, t, top]
            qz = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            p = probs[b, t, top] / probs[b, t, top].sum()
            dz = (qz - p) / rows  # d mean-KL / d score at the chosen keys
            want[b, t] = np.einsum("k,gk->g", dz, s[b, t][:, top]) / np.sqrt(G)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the indexer loss of the GLM-5 fixture
def test_fixture_layer_indexer_loss_equals_numpy_kl():
    """Layer 0 of tests/fixtures/transformers-glm-moe-dsa on its reference input: the KL MLA sows equals numpy's,
    built from a float64 transcription of transformers' GlmMoeDsaAttention (the attention probabilities over
    the keys the transcribed indexer chose, summed over heads) and of its indexer (test_mla_families)."""
    import json

    from safetensors.numpy import load_file
    from test_mla_families import DSA, FIX, _arange, _io, _numpy_topk, _rms, _rope_interleave

    import glm_jax

    d = _io(DSA)
    st = {k: v.astype(np.float64) for k, v in load_file(FIX / DSA / "model" / "model.safetensors").items()}
    hf = json.loads((FIX / DSA / "model" / "config.json").read_text())
    ids, mask = d["input_ids"], d["attention_mask"]
    pos = _arange(ids)
    B, T = ids.shape
    N, C, P, R = hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["kv_lora_rank"]
    theta = hf["rope_parameters"]["rope_theta"]
    p = "model.layers.0."
    h = d["hidden_states"][0].astype(np.float64)
    x = _rms(h, st[p + "input_layernorm.weight"], hf["rms_norm_eps"])
    q_lat = _rms(x @ st[p + "self_attn.q_a_proj.weight"].T, st[p + "self_attn.q_a_layernorm.weight"], 1e-6)
    q = (q_lat @ st[p + "self_attn.q_b_proj.weight"].T).reshape(B, T, N, C + P)
    kv = x @ st[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    c_kv = _rms(kv[..., :R], st[p + "self_attn.kv_a_layernorm.weight"], 1e-6)
    k_rot = _rope_interleave(kv[..., R:][:, :, None], pos, theta, P)[:, :, 0]
    q_rot = _rope_interleave(q[..., C:], pos, theta, P)
    k_nope = (c_kv @ st[p + "self_attn.kv_b_proj.weight"].T).reshape(B, T, N, -1)[..., :C]
    logits = np.einsum("btnc,bsnc->bnts", q[..., :C], k_nope) + np.einsum("btnp,bsp->bnts", q_rot, k_rot)
    logits = logits / np.sqrt(C + P)
    scores = _numpy_topk(st, hf, 0, h, mask, pos)
    K = hf["index_topk"]
    kls = []
    for b in range(B):
        for t in range(T):
            vis = np.flatnonzero(np.isfinite(scores[b, t]))
            if not len(vis):
                continue
            top = vis[np.argsort(-scores[b, t, vis], kind="stable")[:K]]
            z = logits[b, :, t][:, top]  # [N, K]: attention over the chosen keys, per head
            a = np.exp(z - z.max(-1, keepdims=True))
            summed = np.zeros(T)
            summed[top] = (a / a.sum(-1, keepdims=True)).sum(0)  # summed over heads
            kls.append(_np_kl(scores[b, t], summed, top))
    want = float(np.mean(kls))
    assert len(kls) > K  # queries that see more keys than the choice keeps are among them

    lm = glm_jax.from_pretrained(FIX / DSA / "model")
    _, inter = lm.module.apply(
        {"params": lm.params},
        ids,
        attention_mask=mask,
        position_ids=pos,
        method="with_hidden",
        mutable=["intermediates"],
    )
    (got,) = inter["intermediates"]["layers_0"]["block"]["attn"]["indexer_loss"]
    assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want)), (float(got), want)
    assert want > 1e-3

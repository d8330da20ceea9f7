"""KV-cache decoding: one prefill pass, then one jitted `lax.while_loop` of single-token steps.

The cache is preallocated for prompt + max_new_tokens; every step writes one column and attends to the valid
ones. Positions advance by the family's rule: 1-D positions +1; 2-D (GLM, ChatGLM-6B) keep the mask position
and count the block position up while inside a generated span.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.inputs import check_generate
from glm_jax.model.masks import context_length, default_allowed, default_positions
from glm_jax.model.transformer import init_cache


def sample_logits(logits_BV, rng, do_sample, temperature, top_k, top_p):
    """Greedy argmax, or sampling with temperature → top-k → top-p (the transformers order)."""
    if not do_sample:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = logits_BV / jnp.maximum(temperature, 1e-6)
    V = x.shape[-1]
    if top_k and top_k < V:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    # top-p (traced, so always applied; top_p >= 1 keeps everything): drop tokens once the mass before them
    # already exceeds top_p, so the token that crosses it stays
    order = jnp.argsort(-x, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1)
    remove_sorted = ((jnp.cumsum(probs, axis=-1) - probs) > top_p) & (top_p < 1.0)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
    x = jnp.where(remove, -jnp.inf, x)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


def _next_position(pos_last):
    """Position of the next token from the last one: [B] (+1) or [B, 2] (block>0: (same, +1); else (+1, 0))."""
    if pos_last.ndim == 1:
        return pos_last + 1
    in_block = pos_last[:, 1] > 0
    return jnp.stack(
        [jnp.where(in_block, pos_last[:, 0], pos_last[:, 0] + 1), jnp.where(in_block, pos_last[:, 1] + 1, 0)], axis=1
    )


def prefill(module, params, ids_BT, mask_BT, pos, allowed_BTT, cache_len: int):
    """Run the prompt into a fresh KV cache of `cache_len` columns: (logits [B, T, V], cache, key_valid [B, S])."""
    B, T = ids_BT.shape
    cache = init_cache(module.cfg, B, cache_len)
    allowed = jnp.zeros((B, T, cache_len), bool).at[:, :, :T].set(allowed_BTT)
    logits, cache = module.apply({"params": params}, ids_BT, allowed, pos, cache, 0, method="decode")
    key_valid = jnp.zeros((B, cache_len), bool).at[:, :T].set(mask_BT.astype(bool))
    return logits, cache, key_valid


def feed_token(module, params, cache, key_valid, tok_B, pos_last, idx):
    """The decode step: write token `tok_B` [B] at cache column `idx` and attend over the valid columns up to it.
    Returns (logits [B, V] for the next token, cache, key_valid, the token's position)."""
    S = key_valid.shape[1]
    key_valid = key_valid.at[:, idx].set(True)
    p = _next_position(pos_last)
    allowed = (key_valid & (jnp.arange(S)[None] <= idx))[:, None, :]
    logits, cache = module.apply({"params": params}, tok_B[:, None], allowed, p[..., None], cache, idx, method="decode")
    return logits[:, -1], cache, key_valid, p


@functools.partial(jax.jit, static_argnames=("module", "max_new", "do_sample", "top_k", "keep_logits"))
def _decode(
    module,
    params,
    ids_BT,
    mask_BT,
    pos,
    allowed_BTT,
    eos_ids,
    pad_id,
    rng,
    temperature,
    top_p,
    *,
    max_new,
    do_sample,
    top_k,
    keep_logits=False,
):
    B, T = ids_BT.shape
    logits, cache, key_valid = prefill(module, params, ids_BT, mask_BT, pos, allowed_BTT, T + max_new)
    out = jnp.full((B, max_new), pad_id, jnp.int32)
    pos_last = pos[..., -1]

    V = logits.shape[-1]
    scores = jnp.zeros((B, max_new if keep_logits else 0, V), jnp.float32)

    def step(state):
        i, out, cache, key_valid, pos_last, last_logits, done, rng, scores = state
        if keep_logits:
            scores = scores.at[:, i].set(last_logits)
        rng, sub = jax.random.split(rng)
        tok = sample_logits(last_logits, sub, do_sample, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=1)
        logits, cache, key_valid, p = feed_token(module, params, cache, key_valid, tok, pos_last, T + i)
        return i + 1, out, cache, key_valid, p, logits, done, rng, scores

    def cond(state):
        return (state[0] < max_new) & ~jnp.all(state[6])

    init = (jnp.int32(0), out, cache, key_valid, pos_last, logits[:, -1], jnp.zeros((B,), bool), rng, scores)
    final = jax.lax.while_loop(cond, step, init)
    return final[1], final[8]


def generate(
    lm,
    input_ids,
    attention_mask=None,
    max_new_tokens=32,
    do_sample=False,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    eos_token_id=None,
    pad_token_id=None,
    return_logits=False,
):
    """See GLM.generate. With return_logits, also the raw logits [B, max_new_tokens, V] each step decoded from."""
    c = lm.config
    check_generate(c, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
    if ids.ndim == 1:
        ids = ids[None]
        if attention_mask is not None and np.ndim(attention_mask) == 1:
            attention_mask = np.asarray(attention_mask)[None]
    eos = tuple(c.eos_token_id) if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (c.pad_token_id if c.pad_token_id is not None else (eos[0] if eos else 0))
    )
    if attention_mask is None:
        if c.pad_token_id is not None and c.pad_token_id not in eos and bool(jnp.any(ids == c.pad_token_id)):
            attention_mask = (ids != c.pad_token_id).astype(jnp.int32)  # as transformers infers it
        else:
            attention_mask = jnp.ones_like(ids)
    mask = jnp.asarray(np.asarray(attention_mask), jnp.int32)
    # GLM generates after <sop> with the context bidirectional (the tokenizer's build_inputs_for_generation)
    sep = context_length(c, ids, None) if c.mask_rule == "sep_at_sop" else None
    pos = default_positions(c, ids, mask, sep)
    allowed = default_allowed(c, ids, mask, sep)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    new, scores = _decode(
        lm.module,
        lm.params,
        ids,
        mask,
        pos,
        allowed,
        eos_arr,
        jnp.int32(pad),
        jax.random.PRNGKey(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        max_new=int(max_new_tokens),
        do_sample=bool(do_sample),
        top_k=int(top_k),
        keep_logits=bool(return_logits),
    )
    out = np.concatenate([np.asarray(ids), np.asarray(new)], axis=1)
    return (out, np.asarray(scores)) if return_logits else out

"""Streaming decode: one jitted prefill and one jitted single-token step over a preallocated KV cache.

`stream_generate` yields new token ids one at a time, as they are produced, for printing while decoding. The
math is glm_jax.generate's (its `prefill` and `feed_token` decode step, `sample_logits` and the same rng
split sequence), so the tokens equal `lm.generate`'s (greedy: token for token).

Shapes are fixed per call so nothing recompiles per token: the prompt is right-padded to a multiple of
`PROMPT_MULTIPLE` (the padding is masked out and its cache columns are overwritten by the new tokens), and the
cache length is rounded up to a multiple of `CACHE_MULTIPLE`. The cache is donated to each step, so it is
updated in place where the backend supports donation. The next step is dispatched before the current token
is handed to the host, so device work overlaps with the caller's printing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.generate import feed_token, prefill, sample_logits
from glm_jax.inputs import InputError, check_generate
from glm_jax.model.masks import default_allowed, default_positions

CACHE_MULTIPLE = 256
PROMPT_MULTIPLE = 64


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def cache_plan(n_prompt: int, max_new_tokens: int, cache_multiple=CACHE_MULTIPLE, prompt_multiple=PROMPT_MULTIPLE):
    """(prefill length Tp, cache length S) that stream_generate allocates for a prompt of n_prompt tokens."""
    Tp = _round_up(n_prompt, prompt_multiple)
    return Tp, _round_up(max(Tp, n_prompt + max_new_tokens), cache_multiple)


@functools.partial(jax.jit, static_argnames=("module", "cache_len", "do_sample", "top_k"))
def _prefill(module, params, ids_BT, mask_BT, n_real, rng, temperature, top_p, *, cache_len, do_sample, top_k):
    """Run the (right-padded) prompt, fill cache columns [0, T); sample the first new token from the
    logits at n_real - 1. Returns (token [B], cache, key_valid [B, S], position of the last real token, rng)."""
    c = module.cfg
    pos = default_positions(c, ids_BT, mask_BT)
    allowed = default_allowed(c, ids_BT, mask_BT)
    logits, cache, key_valid = prefill(module, params, ids_BT, mask_BT, pos, allowed, cache_len)
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits[:, n_real - 1], sub, do_sample, temperature, top_k, top_p)
    return tok, cache, key_valid, pos[..., n_real - 1], rng


@functools.partial(jax.jit, static_argnames=("module", "do_sample", "top_k"), donate_argnames=("cache", "key_valid"))
def _step(module, params, cache, key_valid, tok, pos_last, idx, rng, temperature, top_p, *, do_sample, top_k):
    """Feed `tok` [B] at cache column `idx` (a traced scalar) and sample the token after it."""
    logits, cache, key_valid, p = feed_token(module, params, cache, key_valid, tok, pos_last, idx)
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(logits, sub, do_sample, temperature, top_k, top_p)
    return nxt, cache, key_valid, p, rng


def stream_generate(
    lm,
    prompt_ids,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Iterable[int] | None = None,
    cache_multiple: int = CACHE_MULTIPLE,
    prompt_multiple: int = PROMPT_MULTIPLE,
) -> Iterator[int]:
    """Yield the new token ids of one sequence as they are decoded (a stop token is yielded, then it ends).

    prompt_ids: 1-D ids (or [1, T]). stop_token_ids: default the model config's eos ids. The sampling
    arguments and seed mean what they mean for lm.generate, and give the same tokens.
    """
    c = lm.config
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"prompt_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
    max_new = int(max_new_tokens)
    check_generate(c, ids, None, max(max_new, 0), temperature, top_k, top_p)
    if max_new <= 0:
        return
    stops = set(c.eos_token_id if stop_token_ids is None else (int(t) for t in stop_token_ids))
    T = int(ids.size)
    Tp, S = cache_plan(T, max_new, cache_multiple, prompt_multiple)
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    ids_p = np.full((1, Tp), pad, np.int32)
    ids_p[0, :T] = ids
    mask = np.zeros((1, Tp), np.int32)
    mask[0, :T] = 1
    opts = dict(do_sample=bool(do_sample), top_k=int(top_k))
    temp, tp = jnp.float32(temperature), jnp.float32(top_p)
    tok, cache, key_valid, pos, rng = _prefill(
        lm.module,
        lm.params,
        jnp.asarray(ids_p),
        jnp.asarray(mask),
        jnp.int32(T),
        jax.random.PRNGKey(seed),
        temp,
        tp,
        cache_len=S,
        **opts,
    )
    for i in range(max_new):
        cur = tok
        if i + 1 < max_new:  # dispatch the next step before waiting for this token
            tok, cache, key_valid, pos, rng = _step(
                lm.module, lm.params, cache, key_valid, cur, pos, jnp.int32(T + i), rng, temp, tp, **opts
            )
        t = int(np.asarray(cur)[0])
        yield t
        if t in stops:
            return


class TextStream:
    """Incremental detokenizer: feed ids, get the newly printable text. A piece is held back while the
    decoded text ends in U+FFFD (an incomplete multi-byte character); `skip_leading_space` drops the
    whitespace a reply starts with (the newline after a GLM-4 / ChatGLM3 role token)."""

    def __init__(self, tokenizer, skip_leading_space: bool = True):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = ""
        self.skip_leading_space = skip_leading_space

    def text(self) -> str:
        text = self.tok.decode(self.ids)
        return text.lstrip() if self.skip_leading_space else text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.text()
        if text.endswith("\ufffd") or len(text) <= len(self.printed):
            return ""
        # decoders may rewrite earlier text (e.g. clean-up of " ."); what is printed stays, only the tail is new
        piece = text[len(self.printed) :]
        self.printed = text
        return piece

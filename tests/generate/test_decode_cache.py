"""The compiled decode loop updates the KV cache in place: no copy of a cache array per decoded token.

XLA inserts a copy of a loop-carried buffer when it cannot update it in place; with the cache laid out
[B, K, S, H], at batch 1, it copied every layer's k and v four times per token (a cost that grows with the cache
length). The while body of `generate`'s compiled decode is read here for copies of cache-sized arrays.
Correctness of the cached decoding itself is tested against the fixtures (test_model_fixtures: incremental
decoding and greedy generation). Not covered: P-Tuning v2 models, whose prefix is concatenated to the cache
every step (one copy per layer's k and v).
"""

import re

import numpy as np
import pytest
from helpers.fixture_models import MODEL_FIXTURES, load


def _while_body(hlo: str) -> str:
    m = re.search(r"while\(.*?\), condition=%(\S+?), body=%(\S+?)[,\s]", hlo)
    assert m, "no while loop in the compiled decode"
    body = re.search(r"^%?" + re.escape(m.group(2)) + r" .*?\{\n(.*?)^\}", hlo, re.M | re.S)
    return body.group(1)


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("name", ["transformers-glm", "glm-4-9b-chat-remote", "glm-original"])
def test_decode_step_copies_no_cache(name, B):
    import jax
    import jax.numpy as jnp

    from glm_jax import generate as G
    from glm_jax.model.transformer import init_cache

    assert name in MODEL_FIXTURES
    lm = load(name)
    c = lm.config
    T, new = 5, 7
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (B, T)), jnp.int32)
    mask = jnp.ones_like(ids)
    sep = G.context_length(c, ids, None) if c.mask_rule == "sep_at_sop" else None
    pos, allowed = G.default_positions(c, ids, mask, sep), G.default_allowed(c, ids, mask, sep)
    hlo = (
        G._decode.lower(
            lm.module,
            lm.params,
            ids,
            mask,
            pos,
            allowed,
            jnp.asarray([-1], jnp.int32),
            jnp.int32(0),
            jax.random.PRNGKey(0),
            jnp.float32(1),
            jnp.float32(1),
            max_new=new,
            do_sample=False,
            top_k=0,
        )
        .compile()
        .as_text()
    )
    body = _while_body(hlo)
    cache = init_cache(c, B, T + new)["k"]
    shape = np.shape(cache[0])  # one layer's k
    dims = ",".join(str(d) for d in shape)
    assert f"[{dims}]" in body, "the cache is not carried by the decode loop"
    copies = re.findall(r"= \w+\[(\d+(?:,\d+)*)\]\{[\d,]*\} copy\(", body)
    cache_copies = [s for s in copies if np.prod([int(x) for x in s.split(",")]) >= np.prod(shape)]
    assert cache_copies == [], f"{len(cache_copies)} cache-sized copies per decode step: {cache_copies[:4]}"

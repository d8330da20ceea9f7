"""P-Tuning v2 prefix with prefix_projection: the encoder (Embedding → Linear → tanh → Linear) computed by an
independent torch module must give the same logits as feeding its output as a plain (projection-free) prefix,
which the golden fixture already pins."""

import numpy as np
import torch
from helpers.fixture_models import io, load, max_diff, reference_inputs


def test_prefix_projection_matches_torch_encoder():
    import glm_jax
    from glm_jax.api import GLM

    base = load("chatglm2-6b-ptuning-v2")
    d = io("chatglm2-6b-ptuning-v2")
    kw, real = reference_inputs("chatglm2-6b-ptuning-v2", d)
    c = base.config
    width = c.prefix_width
    torch.manual_seed(0)
    enc = torch.nn.Sequential(
        torch.nn.Linear(width, c.hidden_size), torch.nn.Tanh(), torch.nn.Linear(c.hidden_size, width)
    )
    emb = torch.randn(c.pre_seq_len, width)
    with torch.no_grad():
        kv = enc(emb).numpy()
    proj_cfg = c.replace(prefix_projection=True, prefix_hidden_size=c.hidden_size)
    params = dict(base.params)
    params["prefix_encoder"] = {
        "embedding": emb.numpy(),
        "trans_0": {"kernel": enc[0].weight.detach().numpy().T, "bias": enc[0].bias.detach().numpy()},
        "trans_2": {"kernel": enc[2].weight.detach().numpy().T, "bias": enc[2].bias.detach().numpy()},
    }
    with_proj = GLM(proj_cfg, params)(d["input_ids"], **kw)
    plain = GLM(c, dict(base.params, prefix_encoder={"embedding": kv}))(d["input_ids"], **kw)
    assert max_diff(with_proj, plain, real) <= 1e-5
    # and the prefix matters: the fixture's own prefix gives different logits
    assert max_diff(plain, d["logits"], real) > 1e-2
    assert glm_jax.param_shapes(proj_cfg)["prefix_encoder"]["trans_2"]["kernel"].shape == (c.hidden_size, width)


def test_fixture_prefix_layout_matches_reference_past_key_values():
    """The prefix encoder output, viewed [L, 2, P, K, H], equals the reference's prefix_past_key_values."""
    from glm_jax.model.transformer import PrefixEncoder

    lm = load("chatglm2-6b-ptuning-v2")
    d = io("chatglm2-6b-ptuning-v2")
    kv = np.asarray(PrefixEncoder(lm.config).apply({"params": lm.params["prefix_encoder"]}))  # [L, 2, P, K, H]
    np.testing.assert_array_equal(kv, d["prefix_past_key_values"])  # [layer, k/v, P, K, H]

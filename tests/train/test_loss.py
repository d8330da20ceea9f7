"""The train loss (output projection only at loss positions, packed per batch shard) against transformers.

Reference: transformers' GlmForCausalLM with labels = -100 where loss_mask is 0, i.e. its cross entropy over the
loss positions, and the gradients of that loss (torch autograd). Each case puts a set number of loss positions
in every batch shard so that it lands in a known packing bucket (train.step.pack_caps: n/8, ..., 3n/4, all n
positions of a shard), at a bucket's edge or just past one, on one device and on a (2,2,2) mesh where the batch
is cut into 4 shards that each pack their own positions.
"""

import numpy as np
import pytest
import torch
import transformers


@pytest.fixture(scope="module")
def glm_pair(tmp_path_factory):
    import glm_jax

    torch.manual_seed(0)
    cfg = transformers.GlmConfig(
        vocab_size=320,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=[1],
        tie_word_embeddings=False,
    )
    model = transformers.GlmForCausalLM(cfg).float()
    path = tmp_path_factory.mktemp("glm") / "m"
    model.save_pretrained(path)
    return model, glm_jax.from_pretrained(path)


def _torch_reference(model, tokens, targets, mask, z_loss=0.0):
    """(mean CE over the loss positions [+ z_loss · mean lse²], {param name: grad}) from transformers' logits."""
    model.zero_grad(set_to_none=True)
    labels = torch.tensor(np.where(mask > 0, targets, -100))
    logits = model(input_ids=torch.tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    if z_loss:
        m = torch.tensor(mask)
        loss = loss + z_loss * (torch.logsumexp(logits, -1).square() * m).sum() / m.sum()
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


# every shard's loss positions are packed into the smallest bucket that holds the fullest shard's; the cases sit
# at a bucket's edge or one past it. n = 256 positions per shard on one device, 64 on the mesh (4 shards)
CAPS = {256: [32, 48, 64, 80, 96, 112, 128, 192, 256], 64: [8, 16, 24, 32, 48, 64]}
CASES = {
    "smallest-full": (0, 0),
    "past-smallest": (0, 1),
    "half-full": (-3, 0),
    "past-half": (-3, 1),
    "largest-but-one-full": (-2, 0),
    "past-all-but-one": (-2, 1),
}  # (bucket index, positions past its edge)


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)], ids=["1-device", "mesh-2x2x2"])
@pytest.mark.parametrize(
    "case,z_loss", [(c, 0.0) for c in CASES] + [("past-smallest", 0.1)], ids=list(CASES) + ["past-smallest-z-loss"]
)
def test_selected_loss_and_grads_match_transformers(glm_pair, mesh_shape, case, z_loss):
    import jax
    import jax.numpy as jnp

    from glm_jax.sharding import axis_rules, make_mesh
    from train.loss import batch_shards, loss_sums, pack_caps

    model, lm = glm_pair
    rng = np.random.default_rng(len(case))
    B, T = 8, 32
    G = 1 if mesh_shape is None else 4
    n = B * T // G
    assert pack_caps(n) == CAPS[n]
    i, past = CASES[case]
    worst = CAPS[n][i] + past  # the fullest shard; the others get 1 to that many
    counts = [worst] + list(rng.integers(1, worst + 1, G - 1))
    mask = np.zeros((G, n), np.float32)
    for g, c in enumerate(counts):
        mask[g, rng.permutation(n)[:c]] = 1.0
    mask = mask.reshape(B, T)
    tokens = rng.integers(2, 320, (B, T))
    targets = rng.integers(2, 320, (B, T))
    ref_loss, ref_grads = _torch_reference(model, tokens, targets, mask, z_loss)
    batch = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "loss_mask": jnp.asarray(mask),
        "position_ids": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    }

    def loss(params):
        total, sums = loss_sums(lm.module, params, batch, z_loss, select=True)
        return total / sums["count"], batch_shards(B)

    if mesh_shape is None:
        (value, shards), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lm.params)
    else:
        mesh = make_mesh(*mesh_shape)
        with jax.set_mesh(mesh), axis_rules():
            (value, shards), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lm.params)
    assert int(shards) == G
    assert abs(float(value) - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    # spot-check gradients through every kind of parameter: head, MLP, attention, embedding, norm
    ours = {
        "lm_head.weight": np.asarray(grads["lm_head"]["kernel"]).T,
        "model.layers.1.mlp.down_proj.weight": np.asarray(grads["layers_1"]["block"]["mlp"]["down"]["kernel"]).T,
        "model.layers.0.self_attn.o_proj.weight": np.asarray(grads["layers_0"]["block"]["attn"]["o"]["kernel"])
        .reshape(-1, 48)
        .T,
        "model.embed_tokens.weight": np.asarray(grads["embed"]["embedding"]),
        "model.norm.weight": np.asarray(grads["final_norm"]["scale"]),
    }
    for name, g in ours.items():
        ref = ref_grads[name]
        assert np.abs(g - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max(), name

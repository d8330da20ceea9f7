"""The train loss (output projection only at loss positions, packed per batch shard) against transformers.

Reference: transformers' GlmForCausalLM with labels = -100 where loss_mask is 0, i.e. its cross entropy over the
loss positions, and the gradients of that loss (torch autograd). The loss masks are drawn at densities that
land in each packing bucket (n/4, n/2, all n positions of a batch shard), on one device and on a (2,2,2) mesh
where the batch is cut into 4 shards that each pack their own positions.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def glm_pair(tmp_path_factory):
    import glm_jax
    torch.manual_seed(0)
    cfg = transformers.GlmConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                 max_position_embeddings=128, pad_token_id=0, eos_token_id=[1],
                                 tie_word_embeddings=False)
    model = transformers.GlmForCausalLM(cfg).float()
    path = tmp_path_factory.mktemp("glm") / "m"
    model.save_pretrained(path)
    return model, glm_jax.from_pretrained(path)


def _torch_reference(model, tokens, targets, mask, z_loss=0.0):
    """(mean CE over the loss positions [+ z_loss · mean lse²], {param name: grad}) from transformers' logits."""
    model.zero_grad(set_to_none=True)
    labels = torch.tensor(np.where(mask > 0, targets, -100))
    logits = model(input_ids=torch.tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    if z_loss:
        m = torch.tensor(mask)
        loss = loss + z_loss * (torch.logsumexp(logits, -1).square() * m).sum() / m.sum()
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)], ids=["1-device", "mesh-2x2x2"])
@pytest.mark.parametrize("density,z_loss", [(0.1, 0.0), (0.4, 0.0), (0.9, 0.0), (0.4, 0.1)],
                         ids=["quarter-bucket", "half-bucket", "full", "half-bucket-z-loss"])
def test_selected_loss_and_grads_match_transformers(glm_pair, mesh_shape, density, z_loss):
    import jax
    import jax.numpy as jnp
    from glm_jax.sharding import axis_rules, make_mesh
    from train.step import batch_shards, loss_sums
    model, lm = glm_pair
    rng = np.random.default_rng(int(density * 10))
    B, T = 8, 32
    tokens = rng.integers(2, 320, (B, T))
    targets = rng.integers(2, 320, (B, T))
    mask = (rng.random((B, T)) < density).astype(np.float32)
    mask[0, :2] = 1.0                                  # never an empty batch
    ref_loss, ref_grads = _torch_reference(model, tokens, targets, mask, z_loss)
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
             "loss_mask": jnp.asarray(mask), "position_ids": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}

    def loss(params):
        total, sums = loss_sums(lm.module, params, batch, z_loss, select=True)
        return total / sums["count"], batch_shards(B)

    if mesh_shape is None:
        (value, shards), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lm.params)
    else:
        mesh = make_mesh(*mesh_shape)
        with jax.set_mesh(mesh), axis_rules():
            (value, shards), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lm.params)
    assert int(shards) == (1 if mesh_shape is None else 4)
    n = B * T // int(shards)                          # the case really lands in the bucket it is named after
    worst = (mask.reshape(int(shards), n) != 0).sum(1).max()
    assert {0.1: worst <= n // 4, 0.4: n // 4 < worst <= n // 2, 0.9: worst > n // 2}[density]
    assert abs(float(value) - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    # spot-check gradients through every kind of parameter: head, MLP, attention, embedding, norm
    ours = {"lm_head.weight": np.asarray(grads["lm_head"]["kernel"]).T,
            "model.layers.1.mlp.down_proj.weight": np.asarray(grads["layers_1"]["block"]["mlp"]["down"]["kernel"]).T,
            "model.layers.0.self_attn.o_proj.weight":
                np.asarray(grads["layers_0"]["block"]["attn"]["o"]["kernel"]).reshape(-1, 48).T,
            "model.embed_tokens.weight": np.asarray(grads["embed"]["embedding"]),
            "model.norm.weight": np.asarray(grads["final_norm"]["scale"])}
    for name, g in ours.items():
        ref = ref_grads[name]
        assert np.abs(g - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max(), name

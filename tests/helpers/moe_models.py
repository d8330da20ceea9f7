"""Random tiny transformers Glm4MoeForCausalLM configs for the live MoE parity tests (model/test_glm4_moe_live.py,
train/test_moe_rules.py), and torch gradients under the checkpoint's keys."""


def config(seed, E, k, G, TG, S, dense, qk, norm_topk, layers, factor, n, kv, scale):
    import transformers

    return transformers.Glm4MoeConfig(
        vocab_size=200 + seed,
        hidden_size=48,
        intermediate_size=72 + 8 * seed,
        moe_intermediate_size=24 + 8 * seed,
        num_hidden_layers=layers,
        num_attention_heads=n,
        num_key_value_heads=kv,
        head_dim=16,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=G,
        topk_group=TG,
        n_shared_experts=S,
        first_k_dense_replace=dense,
        use_qk_norm=qk,
        norm_topk_prob=norm_topk,
        routed_scaling_factor=scale,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * (seed + 1), "partial_rotary_factor": factor},
        attention_bias=seed % 2 == 0,
        rms_norm_eps=1e-5 * (seed + 1),
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=[1],
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def randomise(module):
    """Non-trivial norms and biases, a router with clear preferences (well-separated scores, no near-ties), experts
    whose outputs matter."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "experts" in name:
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))


def torch_grads_by_key(model):
    """Gradients under the checkpoint's keys (the fused in-memory experts split per expert)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.numpy()
        if name.endswith("experts.gate_up_proj"):
            stem = name[: -len("gate_up_proj")]
            inner = g.shape[1] // 2
            for e in range(g.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = g[e, :inner]
                out[f"{stem}{e}.up_proj.weight"] = g[e, inner:]
        elif name.endswith("experts.down_proj"):
            stem = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = g[e]
        else:
            out[name] = g
    return out

"""Tiny chat bases for the loop, SFT and adapter tests: a random transformers Glm4ForCausalLM saved with the GLM-4
stand-in tokenizer of fixtures/chat-templates/glm-4-9b-chat (tiktoken ranks + tokenizer_config.json), so that
glm-train, glm-generate, peft and transformers all read the same folder."""

import json
import pathlib
import shutil

import numpy as np

from helpers import FIX

GLM4_TOK = FIX / "chat-templates" / "glm-4-9b-chat"
VOCAB = 1024  # the stand-in tokenizer has 1014 ids


def build_glm4_chat(folder, seed=0, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=64, bias=True):
    """Random Glm4ForCausalLM (float32, untied, attention bias like GLM-4) + the GLM-4 stand-in tokenizer."""
    import torch
    import transformers

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = transformers.Glm4Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        partial_rotary_factor=0.5,
        max_position_embeddings=256,
        attention_bias=bias,
        pad_token_id=1000,
        eos_token_id=[1000, 1007, 1008],
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = transformers.Glm4ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial distributions: non-unit norms, larger weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(GLM4_TOK / name, folder / name)
    return model


CHATGLM3_TOK = FIX / "chat-templates" / "chatglm3-6b"  # 1509 ids


def build_chatglm2_base(folder, seed=0):
    """The chatglm2-6b fixture's config.json with a vocab for the ChatGLM3 stand-in tokenizer, random float32
    weights in the family's own key layout (safetensors), and the tokenizer files."""
    import safetensors.numpy

    from glm_jax import GLMConfig
    from glm_jax.checkpoint.orbax import flatten
    from glm_jax.families import keymap
    from glm_jax.model.transformer import param_shapes

    hf = json.loads((FIX / "chatglm2-6b" / "model" / "config.json").read_text())
    hf.update(padded_vocab_size=1536, vocab_size=1536)
    cfg = GLMConfig.from_hf(hf)
    flat = {}
    flatten(param_shapes(cfg), "", flat)
    rng = np.random.default_rng(seed)
    arrays = {}
    for r in keymap(cfg):
        outs = r.save(cfg, [np.empty(flat[p].shape, np.dtype([])) for p in r.jax])
        for k, o in zip(r.hf, outs):
            a = rng.normal(0, 0.3, o.shape)
            arrays[k] = (1 + 0.1 * a if "layernorm" in k else a).astype(np.float32)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    safetensors.numpy.save_file(arrays, folder / "model.safetensors", metadata={"format": "pt"})
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(CHATGLM3_TOK / f, folder / f)
    return cfg


def build_glm4_moe_lite_chat(folder, seed=0, mtp=False):
    """Random Glm4MoeLiteForCausalLM (GLM-4.7-Flash) at the shapes of fixtures/transformers-glm4-moe-lite (MLA with a
    q latent, 1 dense + 2 MoE layers), its vocabulary widened to the GLM-4 stand-in tokenizer's, which is saved
    beside it (data.format=glm4 reads it; the model's own GLM-4.5 tokenizer has no SFT format of the reference's).
    mtp: also the fixture's MTP layer as `model.layers.3.*`, its embedding and head copies of the main ones (as in
    the released checkpoint; transformers ignores the layer)."""
    import json

    import torch
    import transformers

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = json.loads((FIX / "transformers-glm4-moe-lite" / "model" / "config.json").read_text())
    d.update(vocab_size=VOCAB, pad_token_id=1000, eos_token_id=[1000, 1007, 1008], dtype="float32")
    for k in ("architectures", "model_type", "transformers_version"):
        d.pop(k)
    torch.manual_seed(seed)
    model = transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(**d)).eval()
    with torch.no_grad():  # non-trivial distributions, as build_glm4_chat
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    if mtp:
        from safetensors.numpy import load_file, save_file

        sd = load_file(str(folder / "model.safetensors"))
        fix = load_file(str(FIX / "transformers-glm4-moe-lite" / "model" / "model.safetensors"))
        L = d["num_hidden_layers"]
        sd.update({k: v for k, v in fix.items() if k.startswith(f"model.layers.{L}.")})
        sd[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].copy()
        sd[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].copy()
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(GLM4_TOK / name, folder / name)
    return model

"""glm-train adapters (DESIGN §3.6): LoRA (`lora.rank`, `lora.alpha`, `lora.targets`) and P-Tuning v2
(`ptuning.pre_seq_len`, `ptuning.prefix_projection`). Only the adapter trains; the base params stay bit-identical.

Both live inside the run's params tree, so that the trainer's machinery (shardings, frozen mask, checkpoints,
resume) carries them unchanged:
  - LoRA adds a `lora` subtree ({"000": {"A": [r, in], "B": [out, r]}, ...} in glm_jax.adapters.lora_sites
    order, float32, replicated); every other param is frozen. The loss sees the base with the adapter applied
    (glm_jax.adapters.apply_lora, inside the jitted step, so only A and B are differentiated). The optimizer is
    optax.multi_transform with set_to_zero on the frozen params: Adam's moments exist only for A and B.
  - P-Tuning v2 is the model's own prefix encoder (GLMConfig.pre_seq_len, chatglm / chatglm2 families); every
    param but `prefix_encoder` is frozen. Its embedding starts N(0, 1) as torch.nn.Embedding does in THUDM's code.
The checkpoint meta gets an "adapter" entry; readers of the run (from_pretrained, glm-generate, glm-convert
to-torch) see LoRA merged (glm_jax.adapters.MergedStore). Each save also writes the PEFT adapter folder files
(adapter_config.json, adapter_model.safetensors) into output_dir, which peft loads onto the base.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import adapters, families
from train.config import TrainConfigError

LORA = adapters.RUN_KEY
PREFIX = "prefix_encoder"


def ptuning_config(tc, cfg):
    """cfg with the P-Tuning v2 prefix of `ptuning.*` (the fields THUDM's config.json sets), or cfg itself."""
    pt = tc.ptuning
    if not pt.pre_seq_len:
        return cfg
    if not families.get(cfg.family).supports_ptuning:
        raise TrainConfigError(
            f"ptuning.pre_seq_len: P-Tuning v2 prefixes belong to ChatGLM-6B and ChatGLM2/3 / GLM-4-9B models "
            f"(chatglm, chatglm2 families); model={tc.model} is {cfg.family}"
        )
    from glm_jax.config import GLMConfig

    hf = {**(cfg.hf_config or cfg.to_hf()), "pre_seq_len": pt.pre_seq_len, "prefix_projection": pt.prefix_projection}
    t = GLMConfig.from_hf(hf)
    return cfg.replace(
        pre_seq_len=t.pre_seq_len,
        prefix_projection=t.prefix_projection,
        prefix_hidden_size=t.prefix_hidden_size,
        prefix_embed_size=t.prefix_embed_size,
        hf_config=t.hf_config,
    )


class Plan:
    """What an adapter run changes in the trainer: extra params, the frozen patterns, the loss's params."""

    def __init__(self, tc, cfg):
        self.kind = "lora" if tc.lora.rank else "ptuning"
        self.cfg = cfg
        if self.kind == "lora":
            lo = tc.lora
            self.rank, self.alpha, self.scale = lo.rank, float(lo.alpha), float(lo.alpha) / lo.rank
            self.targets = lo.targets[0] if lo.targets == [adapters.ALL_LINEAR] else list(lo.targets)
            try:
                self.sites = adapters.lora_sites(cfg, self.targets)
            except ValueError as e:
                raise TrainConfigError(f"model={tc.model}: {e}") from None
            self.meta = adapters.run_meta(cfg, lo.rank, lo.alpha, lo.dropout, self.targets, tc.model)
            self.trained = LORA
        else:
            self.meta = {
                "kind": "ptuning",
                "pre_seq_len": cfg.pre_seq_len,
                "prefix_projection": cfg.prefix_projection,
                "base": str(tc.model),
            }
            self.trained = PREFIX

    # ---------------------------------------------------------- layout
    def shapes(self, pshapes) -> dict:
        if self.kind != "lora":  # the prefix encoder in float32 whatever param_dtype (THUDM: prefix_encoder.float())
            f32 = lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32)  # noqa: E731
            return {**pshapes, PREFIX: jax.tree.map(f32, pshapes[PREFIX])}
        f32 = jnp.float32
        tree = {
            f"{i:03d}": {
                "A": jax.ShapeDtypeStruct((self.rank, s.in_features), f32),
                "B": jax.ShapeDtypeStruct((s.out_features, self.rank), f32),
            }
            for i, s in enumerate(self.sites)
        }
        return {**pshapes, LORA: tree}

    def frozen(self, pshapes) -> list:
        return [k for k in pshapes if k != self.trained]

    def shardings(self, model_shardings, mesh) -> dict:
        """The run's param shardings: the model's, and the LoRA adapter replicated (it is small)."""
        if self.kind != "lora":
            return model_shardings
        from train import parallel

        rep = parallel.replicated(mesh)
        return {**model_shardings, LORA: jax.tree.map(lambda _: rep, self.shapes({})[LORA])}

    def loss_params(self, params):
        """The model params the loss sees (traced inside the step)."""
        if self.kind != "lora":
            return params
        base = {k: v for k, v in params.items() if k != LORA}
        lora = adapters.from_run_tree(params[LORA], self.sites)
        return adapters.apply_lora(base, lora, self.sites, self.scale, quantized_dtype=self.cfg.dtype)

    def model_part(self, tree):
        return {k: v for k, v in tree.items() if k != LORA} if self.kind == "lora" else tree

    # ---------------------------------------------------------- state
    def add_params(self, params, key) -> dict:
        """The loaded base params with a fresh adapter (LoRA: PEFT's init; P-Tuning: torch's Embedding init)."""
        if self.kind == "lora":
            lora = adapters.init_lora(self.sites, self.rank, key)
            return {**params, LORA: adapters.to_run_tree(lora, self.sites)}
        from flax import linen as nn

        from glm_jax.model.transformer import PrefixEncoder

        k1, k2 = jax.random.split(key)
        enc = nn.meta.unbox(PrefixEncoder(self.cfg).init(k1)["params"])
        emb = enc["embedding"]
        enc["embedding"] = jax.random.normal(k2, emb.shape, jnp.float32)
        return {**params, PREFIX: jax.tree.map(lambda a: a.astype(jnp.float32), enc)}

    def write_peft(self, out, params) -> None:
        """The PEFT adapter folder files of `params[lora]` into `out` (process 0; the adapter is replicated)."""
        if self.kind != "lora":
            return
        host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params[LORA])
        lora = adapters.from_run_tree(host, self.sites)
        adapters.write_peft_adapter(
            pathlib.Path(out),
            lora,
            self.sites,
            self.rank,
            self.alpha,
            0.0,
            base_name=self.meta["base"],
            targets=self.targets if self.targets == adapters.ALL_LINEAR else None,
        )


def plan(tc, cfg) -> Plan | None:
    return Plan(tc, cfg) if (tc.lora.rank or tc.ptuning.pre_seq_len) else None


def check_base(adapter, pretrained, tc):
    if adapter is not None and not pretrained:
        raise TrainConfigError(f"lora / ptuning adapt a base: model= must be a checkpoint folder, got {tc.model!r}")
    return adapter


def meta_diff(adapter, meta) -> list:
    """[a description] when a checkpoint's adapter differs from this run's (resume refuses it), else []."""
    now = adapter.meta if adapter else None
    return [] if meta.get("adapter") == now else [f"adapter saved {meta.get('adapter')!r} now {now!r}"]


def add_params(adapter, params, tc):
    """The loaded base params, with a fresh adapter when there is one."""
    return params if adapter is None else adapter.add_params(params, jax.random.PRNGKey(tc.seed))


def save(run, step, meta) -> None:
    """run.checkpointer.save of the step; with an adapter, its "adapter" meta entry and (LoRA) the PEFT files of
    the saved adapter in output_dir."""
    if run.adapter is not None:
        meta = {**meta, "adapter": run.adapter.meta}
    if run.checkpointer.save(step, run.state, meta) and run.adapter is not None and jax.process_index() == 0:
        run.adapter.write_peft(run.tc.output_dir, run.state["params"])

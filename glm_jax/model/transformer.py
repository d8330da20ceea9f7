"""The GLM language model: embeddings, layers (a Python loop or nn.scan), final norm, output projection."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import linen as nn

from glm_jax.checkpoint import layout
from glm_jax.model.attention import use_flash
from glm_jax.model.block import ACT, Block
from glm_jax.model.context import context_shards, from_balanced, to_balanced
from glm_jax.model.layers import Dense, Norm, constrain, dtype_of, logical_axes, matmul, param
from glm_jax.model.masks import default_allowed, default_positions, mask_spec
from glm_jax.model.mtp import MTPLayer, mtp_logits

if TYPE_CHECKING:  # annotations only: glm_jax.config imports this module for num_params
    from glm_jax.config import GLMConfig

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerBody(nn.Module):
    """One layer in the (carry, scanned inputs) form shared by the loop and nn.scan."""

    cfg: GLMConfig
    moe: bool = False
    indexer: bool = False

    @nn.compact
    def __call__(self, carry, xs, position_ids, mask, cache_index):
        """carry: the hidden states, or (hidden states, the last DSA choice) on glm-moe-dsa."""
        x_BTD, topk = carry if isinstance(carry, tuple) else (carry, None)
        block = Block
        if self.cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        y, new_cache, topk = block(self.cfg, moe=self.moe, indexer=self.indexer, name="block")(
            x_BTD, position_ids, mask, xs.get("prefix"), xs.get("cache"), cache_index, topk
        )
        ys = {"hidden": x_BTD}
        if new_cache is not None:
            ys["cache"] = new_cache
        return ((y, topk) if isinstance(carry, tuple) else y), ys


class PrefixEncoder(nn.Module):
    """P-Tuning v2: prefix ids 0..P-1 → per-layer keys and values [L, 2, P, K, H]."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self):
        c = self.cfg
        width = c.prefix_width
        emb_w = (c.prefix_embed_size or width) if c.prefix_projection else width
        e = param(
            self,
            "embedding",
            (c.pre_seq_len, emb_w),
            ("prefix", "prefix_embed"),
            nn.initializers.normal(0.02),
            c.param_dtype,
        ).astype(jnp.float32)
        if c.prefix_projection:
            kw = dict(dtype="float32", param_dtype=c.param_dtype)
            h = Dense((emb_w,), (c.prefix_hidden_size,), ("prefix_embed", "embed"), True, name="trans_0", **kw)(e)
            e = Dense((c.prefix_hidden_size,), (width,), ("embed", "prefix_embed"), True, name="trans_2", **kw)(
                jnp.tanh(h)
            )
        e = e.reshape(c.pre_seq_len, c.num_layers, 2, c.num_kv_heads, c.head_dim)
        return e.transpose(1, 2, 0, 3, 4)


class GLMModel(nn.Module):
    cfg: GLMConfig

    def setup(self):
        c = self.cfg
        self.embed = Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), c.param_dtype)
        if c.position == "learned_2d":
            rows = c.max_position_embeddings + (1 if c.block_position_encoding else 0)
            self.pos_embed = Embed(rows, c.hidden_size, ("positions", "embed"), c.param_dtype)
            if c.block_position_encoding:
                self.block_pos_embed = Embed(
                    c.max_position_embeddings + 1, c.hidden_size, ("positions", "embed"), c.param_dtype
                )
        if c.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(c)
        if c.scan_layers:  # one nn.scan stack per run of layers with the same params (checkpoint/layout.py)
            self.stacks = [
                nn.scan(
                    LayerBody,
                    variable_axes={"params": 0, "intermediates": 0},  # sown values stack per layer
                    split_rngs={"params": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                    length=s.length,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )(c, c.is_moe_layer(s.start), c.has_indexer(s.start), name=s.name)
                for s in layout.stacks(c)
            ]
        else:
            self.layers = [
                LayerBody(c, c.is_moe_layer(i), c.has_indexer(i), name=layout.layer_path(i))
                for i in range(c.num_layers)
            ]
        self.mtp_layers = [MTPLayer(c, name=f"mtp_{i}") for i in range(c.num_mtp_layers)]
        if c.final_norm:
            self.final_norm = Norm(c.norm, c.norm_eps, c.dtype, c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(
                (c.hidden_size,), (c.vocab_size,), ("embed", "vocab"), False, dtype=c.dtype, param_dtype=c.param_dtype
            )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        prefix_len=None,
        *,
        segment_ids=None,
        cache=None,
        cache_index=None,
        return_hidden=False,
    ):
        """Logits [B, T, V] in float32. With `cache` (from `init_cache`: {"k","v"} stacked [L, B·K, S, H], or
        without scan_layers per-layer tuples of L [B·K, S, H] arrays, which XLA updates in place instead of
        slicing and re-stacking) the caller passes a dense attention_mask [B, T, S] and position_ids, and gets
        (logits, new_cache) in the same form."""
        c = self.cfg
        dt = dtype_of(c.dtype)
        input_ids = jnp.asarray(input_ids)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = default_positions(c, input_ids, attention_mask, prefix_len)
        position_ids = jnp.asarray(position_ids)
        dense_given = attention_mask is not None and attention_mask.ndim >= 3
        ids, positions, C = input_ids, position_ids, 1
        if use_flash(c) and cache is None and not c.pre_seq_len and not dense_given:
            mask = mask_spec(c, input_ids, attention_mask, prefix_len, segment_ids)  # the Pallas kernel's form
            C = context_shards(input_ids.shape[1])
            if C > 1:  # context parallelism: tokens in load-balanced order until the last layer (model/context.py)
                bal = functools.partial(to_balanced, C=C, axis=-1)
                ids, positions = bal(input_ids), bal(position_ids)
                mask = mask._replace(
                    **{f: bal(a) for f, a in mask._asdict().items() if f != "prefix_len" and a is not None}
                )
        else:
            mask = default_allowed(c, input_ids, attention_mask, prefix_len, segment_ids)

        x = self.embed(ids)
        if c.position == "learned_2d":
            pos = positions if positions.ndim == 3 else positions[:, None]
            x = x + self.pos_embed(pos[:, 0])
            if c.block_position_encoding:
                x = x + self.block_pos_embed(pos[:, 1])
        x = constrain(x.astype(dt), ACT)

        xs = {}
        if c.pre_seq_len:
            kv = self.prefix_encoder()  # [L, 2, P, K, H]
            B = input_ids.shape[0]
            kv = jnp.broadcast_to(kv[:, :, None], kv.shape[:2] + (B,) + kv.shape[2:])
            xs["prefix"] = (kv[:, 0], kv[:, 1])
        names = tuple(cache_layout(c, 0, 0)) if cache is not None else ()  # in cache_layout's order
        per_layer = cache is not None and isinstance(cache[names[0]], (tuple, list))
        if cache is not None:
            if per_layer and c.scan_layers:
                raise ValueError("scan_layers models take a stacked [L, ...] cache (init_cache gives one)")
            xs["cache"] = tuple(cache[n] for n in names)

        carry = x
        if c.index_topk:  # DSA: the last full layer's choice of keys travels with the hidden states
            S = ids.shape[1] if cache is None else xs["cache"][0][0].shape[1] if per_layer else xs["cache"][0].shape[2]
            carry = (x, jnp.zeros((ids.shape[0], ids.shape[1], min(c.index_topk, S)), jnp.int32))
        if c.scan_layers:
            carry, ys = self._scan(carry, xs, positions, mask, cache_index)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                xi = {k: tuple(a[i] for a in v) if k == "cache" and per_layer else _index(v, i) for k, v in xs.items()}
                carry, y = layer(carry, xi, positions, mask, cache_index)
                outs.append(y)
            cache_out = [y.pop("cache") for y in outs] if per_layer else None
            ys = jax.tree.map(lambda *a: jnp.stack(a), *outs)
            if per_layer:
                ys["cache"] = tuple(zip(*cache_out))
        x = carry[0] if isinstance(carry, tuple) else carry
        x = from_balanced(x, C)  # natural order again (a no-op without context parallelism)
        last = x
        if c.final_norm:
            x = self.final_norm(x)
        if c.tie_word_embeddings:
            logits = matmul(x, self.embed.embedding.astype(dt), transpose_w=True)
        else:
            logits = self.lm_head(x)
        logits = constrain(logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))
        if self.mtp_layers and self.is_initializing():  # create the MTP layers' params
            mtp_logits(self.mtp_layers, x, input_ids, position_ids, mask)
        if cache is not None:
            return logits, dict(zip(names, ys["cache"]))
        if return_hidden:
            return logits, {"layer_inputs": from_balanced(ys["hidden"], C, axis=2), "last": last, "final": x}
        return logits

    def _scan(self, x, xs, position_ids, mask, cache_index):
        ys = []
        for stack, s in zip(self.stacks, layout.stacks(self.cfg)):
            x, y = stack(x, jax.tree.map(lambda a, s=s: a[s.start : s.stop], xs), position_ids, mask, cache_index)
            ys.append(y)
        return x, jax.tree.map(lambda *a: jnp.concatenate(a), *ys)

    def mtp(
        self,
        final_BTD,
        input_ids,
        attention_mask=None,
        position_ids=None,
        prefix_len=None,
        *,
        segment_ids=None,
        shared=False,
        return_hidden=False,
    ):
        """[M, B, T, V] float32: MTP layer j's logits at position t predict token t+j+2 (glm_jax/model/mtp.py).
        final_BTD: the main model's final-normed hidden states (`return_hidden=True` gives them as "final").
        Call with `module.apply(variables, final, ids, ..., method="mtp")`. shared: the layers take the main
        model's embedding instead of their own copies (training, DeepSeek-V3 style); return_hidden: the
        head-normed hidden states [M, B, T, D] instead of the logits."""
        c = self.cfg
        input_ids = jnp.asarray(input_ids)
        if position_ids is None:
            position_ids = default_positions(c, input_ids, attention_mask, prefix_len)
        dense_given = attention_mask is not None and jnp.ndim(attention_mask) >= 3
        if use_flash(c) and not dense_given and context_shards(input_ids.shape[1]) == 1:
            mask = mask_spec(c, input_ids, attention_mask, prefix_len, segment_ids)
        else:
            mask = default_allowed(c, input_ids, attention_mask, prefix_len, segment_ids)
        embed = self.embed if shared else None
        return mtp_logits(self.mtp_layers, final_BTD, input_ids, jnp.asarray(position_ids), mask, embed, return_hidden)


class Embed(nn.Module):
    num: int
    dim: int
    axes: tuple
    param_dtype: str = "float32"

    def setup(self):
        self.embedding = param(
            self, "embedding", (self.num, self.dim), self.axes, nn.initializers.normal(0.02), self.param_dtype
        )

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0)


def _init_args(cfg):
    ids = jnp.zeros((1, 4), jnp.int32)
    return ids


def _init_model(cfg):
    """The model that builds the params: they do not depend on the attention path, and the kernel's (context
    parallel) path refuses the 4-token init sequence on a context mesh."""
    return GLMModel(cfg.replace(attention="xla"))


def cache_layout(cfg: GLMConfig, batch: int, length: int) -> dict:
    """{name: per-layer shapes} of the decode cache. GQA: "k" and "v" [B·K, S, H] (batch and kv head flattened,
    batch-major). MLA: only the normed kv latent [B, S, kv_lora_rank] and the rotary key [B, S, rope_dim], shared
    by every head, plus on glm-moe-dsa the indexer key [B, S, index_head_dim] of layers that run their own
    indexer (a layer that reuses another's choice holds an empty [B, 0, index_head_dim])."""
    L = range(cfg.num_layers)
    if not cfg.mla:
        shape = (batch * cfg.num_kv_heads, length, cfg.head_dim)
        return {"k": [shape for _ in L], "v": [shape for _ in L]}
    out = {
        "latent": [(batch, length, cfg.kv_lora_rank) for _ in L],
        "k_rope": [(batch, length, cfg.rope_dim) for _ in L],
    }
    if cfg.index_topk:
        out["index_k"] = [(batch, length if cfg.has_indexer(i) else 0, cfg.index_head_dim) for i in L]
    return out


def init_cache(cfg: GLMConfig, batch: int, length: int, per_layer=None) -> dict:
    """An empty decode cache for GLMModel (cache_layout's arrays): per name a tuple of L per-layer arrays, or
    stacked [L, ...] (every layer at the largest per-layer shape). By default in the form the model consumes as
    is: stacked for scan_layers, per layer otherwise."""
    dt = dtype_of(cfg.dtype)
    if per_layer is None:
        per_layer = not cfg.scan_layers
    spec = cache_layout(cfg, batch, length)
    if per_layer:
        return {n: tuple(jnp.zeros(s, dt) for s in shapes) for n, shapes in spec.items()}
    return {n: jnp.zeros((cfg.num_layers,) + max(shapes), dt) for n, shapes in spec.items()}


def cache_shapes(cfg: GLMConfig, batch: int, max_len: int, dtype: str = "bfloat16"):
    """The cache lm.generate allocates for `batch` rows of `max_len` tokens, as jax.ShapeDtypeStruct leaves."""
    return jax.eval_shape(lambda: init_cache(cfg.replace(dtype=dtype), batch, max_len))


@functools.lru_cache(maxsize=32)
def _boxed_shapes(cfg):
    model = _init_model(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _init_args(cfg)))["params"]


def param_shapes(cfg: GLMConfig):
    """The params pytree as jax.ShapeDtypeStruct leaves; allocates nothing."""
    return nn.meta.unbox(_boxed_shapes(cfg))


def param_count(cfg: GLMConfig) -> int:
    """Number of parameters (every leaf of the params tree)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg)))


def param_axes(cfg: GLMConfig):
    """The params pytree with a tuple of logical axis names at each leaf."""
    return logical_axes(_boxed_shapes(cfg))


def init_params(cfg: GLMConfig, rng):
    return nn.meta.unbox(_init_model(cfg).init(rng, _init_args(cfg))["params"])


def _index(tree, i: int):
    """Entry i of every leaf's leading (layer) axis."""
    return jax.tree.map(lambda a: a[i], tree)

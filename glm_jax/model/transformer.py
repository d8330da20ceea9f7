"""The GLM language model: embeddings, layers (a Python loop or nn.scan), final norm, output projection."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

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

if TYPE_CHECKING:
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
        if c.position_encoding == "learned":
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

    def __call__(self, input_ids, attention_mask=None, position_ids=None, prefix_len=None, *, segment_ids=None):
        """Logits [B, T, V] in float32 (DESIGN §3.1: masks and positions left as None follow the family's rule)."""
        return self.with_hidden(input_ids, attention_mask, position_ids, prefix_len, segment_ids=segment_ids)[0]

    def with_hidden(self, input_ids, attention_mask=None, position_ids=None, prefix_len=None, *, segment_ids=None):
        """(logits [B, T, V] float32, Hidden): the forward with its hidden states, for losses that run their own
        output projection (train/loss.py), the MTP layers and the hidden-state parity tests."""
        inp = self._inputs(input_ids, attention_mask, position_ids, prefix_len, segment_ids, cache=None)
        x, ys = self._layers(inp, None)
        x = from_balanced(x, inp.shards)  # natural order again (a no-op without context parallelism)
        logits, final = self._head(x)
        if self.mtp_layers and self.is_initializing():  # create the MTP layers' params
            mtp_logits(self.mtp_layers, final, jnp.asarray(input_ids), inp.natural_positions, inp.mask)
        return logits, Hidden(from_balanced(ys["hidden"], inp.shards, axis=2), x, final)

    def decode(self, input_ids, allowed_BTS, position_ids, cache, cache_index):
        """(logits [B, T, V] float32, new cache): T tokens written into `cache` (from `init_cache`: cache_layout's
        arrays, stacked [L, ...], or without scan_layers per-layer tuples, which XLA updates in place instead of
        slicing and re-stacking) at columns cache_index.., attending where `allowed_BTS` [B, T, S] says. The
        cache comes back in the form it was given."""
        names = tuple(cache_layout(self.cfg, 0, 0))  # in cache_layout's order (jit hands dicts back key-sorted)
        per_layer = isinstance(cache[names[0]], (tuple, list))
        if per_layer and self.cfg.scan_layers:
            raise ValueError("scan_layers models take a stacked [L, ...] cache (init_cache gives one)")
        inp = self._inputs(input_ids, allowed_BTS, position_ids, None, None, cache=tuple(cache[n] for n in names))
        x, ys = self._layers(inp, cache_index, per_layer_cache=per_layer)
        logits, _ = self._head(x)
        return logits, dict(zip(names, ys["cache"]))

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
        final_BTD: the main model's final-normed hidden states (`with_hidden` gives them as Hidden.final).
        Call with `module.apply(variables, final, ids, ..., method="mtp")`. shared: the layers take the main
        model's embedding instead of their own copies (training, DeepSeek-V3 style); return_hidden: the
        head-normed hidden states [M, B, T, D] instead of the logits."""
        input_ids = jnp.asarray(input_ids)
        if position_ids is None:
            position_ids = default_positions(self.cfg, input_ids, attention_mask, prefix_len)
        # the MTP layers see tokens in natural order: no context-parallel split of their sequence
        mask, _ = _attention_mask(self.cfg, input_ids, attention_mask, prefix_len, segment_ids, split_ok=False)
        embed = self.embed if shared else None
        return mtp_logits(self.mtp_layers, final_BTD, input_ids, jnp.asarray(position_ids), mask, embed, return_hidden)

    # ------------------------------------------------------------ the three stages
    def _inputs(self, input_ids, attention_mask, position_ids, prefix_len, segment_ids, cache):
        """Embeddings, positions, the attention mask in the form the attention path takes, and the per-layer
        inputs (P-Tuning's prefix keys and values, the KV cache)."""
        c = self.cfg
        input_ids = jnp.asarray(input_ids)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = default_positions(c, input_ids, attention_mask, prefix_len)
        natural = jnp.asarray(position_ids)
        mask, C = _attention_mask(c, input_ids, attention_mask, prefix_len, segment_ids, split_ok=cache is None)
        ids, positions = input_ids, natural
        if C > 1:  # context parallelism: tokens in load-balanced order until the last layer (model/context.py)
            bal = functools.partial(to_balanced, C=C, axis=-1)
            ids, positions = bal(input_ids), bal(natural)
            mask = mask._replace(
                **{f: bal(a) for f, a in mask._asdict().items() if f != "prefix_len" and a is not None}
            )
        x = self.embed(ids)
        if c.position_encoding == "learned":
            pos = positions if positions.ndim == 3 else positions[:, None]
            x = x + self.pos_embed(pos[:, 0])
            if c.block_position_encoding:
                x = x + self.block_pos_embed(pos[:, 1])
        x = constrain(x.astype(dtype_of(c.dtype)), ACT)
        xs = {}
        if c.pre_seq_len:
            kv = self.prefix_encoder()  # [L, 2, P, K, H]
            B = input_ids.shape[0]
            kv = jnp.broadcast_to(kv[:, :, None], kv.shape[:2] + (B,) + kv.shape[2:])
            xs["prefix"] = (kv[:, 0], kv[:, 1])
        if cache is not None:
            xs["cache"] = cache
        return Inputs(x, input_ids, positions, natural, mask, C, xs)

    def _layers(self, inp, cache_index, per_layer_cache=False):
        """The decoder layers: (x, ys) with ys["hidden"] each layer's input [L, B, T, D] (and ys["cache"])."""
        c, xs = self.cfg, inp.xs
        carry = inp.x
        if c.index_topk:  # DSA: the last full layer's choice of keys travels with the hidden states
            B, T = inp.ids.shape
            S = T if "cache" not in xs else xs["cache"][0][0].shape[1] if per_layer_cache else xs["cache"][0].shape[2]
            carry = (carry, jnp.zeros((B, T, min(c.index_topk, S)), jnp.int32))
        if c.scan_layers:
            ys = []
            for stack, s in zip(self.stacks, layout.stacks(c)):
                part = jax.tree.map(lambda a, s=s: a[s.start : s.stop], xs)
                carry, y = stack(carry, part, inp.positions, inp.mask, cache_index)
                ys.append(y)
            ys = jax.tree.map(lambda *a: jnp.concatenate(a), *ys)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                xi = {
                    k: tuple(a[i] for a in v) if k == "cache" and per_layer_cache else _index(v, i)
                    for k, v in xs.items()
                }
                carry, y = layer(carry, xi, inp.positions, inp.mask, cache_index)
                outs.append(y)
            cache_out = [y.pop("cache") for y in outs] if per_layer_cache else None
            ys = jax.tree.map(lambda *a: jnp.stack(a), *outs)
            if per_layer_cache:
                ys["cache"] = tuple(zip(*cache_out))
        return (carry[0] if isinstance(carry, tuple) else carry), ys

    def _head(self, x):
        """(logits [B, T, V] float32, the final-normed hidden states)."""
        c = self.cfg
        if c.final_norm:
            x = self.final_norm(x)
        if c.tie_word_embeddings:
            logits = matmul(x, self.embed.embedding.astype(dtype_of(c.dtype)), transpose_w=True)
        else:
            logits = self.lm_head(x)
        logits = constrain(logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))
        return logits, x


class Hidden(NamedTuple):
    """Hidden states of a forward pass."""

    layer_inputs: jax.Array  # [L, B, T, D]: the input of each layer (the embeddings first)
    last: jax.Array  # [B, T, D]: the last layer's output
    final: jax.Array  # [B, T, D]: after the final norm (what the output projection takes)


class Inputs(NamedTuple):
    """What the layers take: embeddings x, the ids and positions in the layers' token order, the natural-order
    positions, the mask in the attention path's form, the context shards C, and the per-layer inputs xs."""

    x: jax.Array
    ids: jax.Array
    positions: jax.Array
    natural_positions: jax.Array
    mask: object
    shards: int
    xs: dict


def _attention_mask(c, input_ids, attention_mask, prefix_len, segment_ids, *, split_ok: bool):
    """(mask, context shards C): the Pallas kernel's mask spec where the kernel runs (no cache, no P-Tuning
    prefix, no dense mask given), with C > 1 when the sequence is split over the context axis and `split_ok`;
    else the dense [B, T, S] boolean mask and C = 1."""
    dense_given = attention_mask is not None and jnp.ndim(attention_mask) >= 3
    if use_flash(c) and not c.pre_seq_len and not dense_given:
        C = context_shards(input_ids.shape[1])  # asks the mesh; refuses a length it cannot split
        if split_ok or C == 1:
            return mask_spec(c, input_ids, attention_mask, prefix_len, segment_ids), C
    return default_allowed(c, input_ids, attention_mask, prefix_len, segment_ids), 1


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

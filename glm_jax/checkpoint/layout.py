"""Where each layer's params live: the one home of the stacked-layer layout.

A model's params name its layers in one of two layouts:
- per layer: `layers_{i}/...`, one subtree a layer (the key maps, to-jax folders, a model without scan_layers);
- stacked: under scan_layers each run of layers with the same params is one nn.scan stack whose leaves carry a
  leading layer axis. A model whose layers all look alike has one stack, `layers/`. GLM-4.5's leading dense-MLP
  layers differ from its MoE layers, so they get a stack of their own, `dense_layers/`, ahead of `layers/`.

Every reader, writer, adapter merger, quantizer and trainer rule asks this module which stacks exist (`stacks`,
from a config; `stored_stacks`, from a params tree or a checkpoint's leaves) and where layer i lives (`locate`),
and converts between the layouts (`stack`, `unstack`, `stack_shapes`). Nothing else names the stack folders.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

DENSE = "dense_layers"  # GLM-4.5's leading dense layers (MoE configs only)
MAIN = "layers"  # every other layer
STACK_NAMES = (DENSE, MAIN)  # in layer order
_PER_LAYER = re.compile(r"layers_(\d+)(?:/(.*))?$")


@dataclasses.dataclass(frozen=True)
class Stack:
    """One nn.scan stack: its params folder and the layers [start, stop) it holds."""

    name: str
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def layer_path(i: int, rest: str = "") -> str:
    """The per-layer path of layer i (`layers_{i}` or `layers_{i}/rest`)."""
    return f"layers_{i}/{rest}" if rest else f"layers_{i}"


def parse_layer_path(path: str) -> tuple[int, str] | None:
    """(i, rest) of a per-layer path `layers_{i}/rest`; None for any other path."""
    m = _PER_LAYER.match(path)
    return (int(m.group(1)), m.group(2) or "") if m else None


def num_dense(cfg) -> int:
    """Leading layers whose params differ from the rest (GLM-4.5's dense-MLP layers ahead of its MoE layers)."""
    k = min(cfg.first_k_dense_replace, cfg.num_layers)
    return k if cfg.num_experts and 0 < k < cfg.num_layers else 0


def stacks(cfg) -> tuple[Stack, ...]:
    """The stacks of a scan_layers model of this config, in layer order."""
    k = num_dense(cfg)
    main = Stack(MAIN, k, cfg.num_layers)
    return (Stack(DENSE, 0, k), main) if k else (main,)


def stored_stacks(tree) -> tuple[Stack, ...]:
    """The stacks a params tree holds (nested dicts, or a flat {path: leaf} dict of arrays or shape-carrying
    metadata); () for a per-layer tree."""
    out, start = [], 0
    for name in STACK_NAMES:
        leaf = _first_leaf(tree, name)
        if leaf is not None:
            n = int(tuple(leaf.shape)[0])
            out.append(Stack(name, start, start + n))
            start += n
    return tuple(out)


def _first_leaf(tree, name):
    if name in tree:  # nested
        node = tree[name]
        while isinstance(node, dict):
            node = next(iter(node.values()))
        return node
    return next((v for p, v in tree.items() if p.startswith(name + "/")), None)  # flat


def is_stacked(path: str) -> bool:
    """A path inside a stack (its leaves lead with the layer axis)."""
    return path.split("/", 1)[0] in STACK_NAMES


def locate(path: str, held: tuple[Stack, ...]) -> tuple[str, int | None]:
    """(stored path, index on the layer axis or None): a per-layer path `layers_{i}/rest` on a tree that holds
    `held` stacks is index i - start of `stack/rest`; every other path is itself."""
    parsed = parse_layer_path(path) if held else None
    if parsed is None:
        return path, None
    i, rest = parsed
    for s in held:
        if s.start <= i < s.stop:
            return f"{s.name}/{rest}", i - s.start
    return path, None


def num_layers(paths, held: tuple[Stack, ...]) -> tuple[int, str]:
    """(number of layers, a description) of what a checkpoint's leaf paths hold: the stacks' total, or the
    distinct `layers_{i}` indices (the description names the range, for error messages)."""
    if held:
        n = held[-1].stop
        return n, f"{n} stacked layers"
    idx = {p[0] for p in map(parse_layer_path, paths) if p}
    if not idx:
        return 0, "no layers"
    n = len(idx) if max(idx) == len(idx) - 1 else -1
    return n, f"layers {min(idx)}..{max(idx)} ({len(idx)} distinct)"


def stack(params: dict, cfg) -> dict:
    """Per-layer params -> the stacked layout of `cfg` (other subtrees untouched). numpy leaves stay numpy."""
    import jax

    out = {k: v for k, v in params.items() if parse_layer_path(k) is None}
    for s in stacks(cfg):
        out[s.name] = jax.tree.map(_stack, *[params[layer_path(i)] for i in range(s.start, s.stop)])
    return out


def unstack(params: dict) -> dict:
    """Stacked params -> per layer (a per-layer tree comes back as it is)."""
    import jax

    held = stored_stacks(params)
    if not held:
        return params
    out = {k: v for k, v in params.items() if k not in STACK_NAMES}
    for s in held:
        for j in range(s.length):
            out[layer_path(s.start + j)] = jax.tree.map(lambda a, j=j: a[j], params[s.name])
    return out


def stack_shapes(per_layer: dict, cfg) -> dict:
    """Per-layer jax.ShapeDtypeStruct leaves -> the stacked layout's shapes (no data)."""
    import jax

    out = {k: v for k, v in per_layer.items() if parse_layer_path(k) is None}
    for s in stacks(cfg):
        out[s.name] = jax.tree.map(
            lambda a, n=s.length: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), per_layer[layer_path(s.start)]
        )
    return out


def _stack(*leaves):
    """Stack per-layer leaves: numpy arrays stay on the host, jax arrays stay jax arrays."""
    import jax
    import jax.numpy as jnp

    if isinstance(leaves[0], jax.Array) or not hasattr(leaves[0], "__array__"):
        return jnp.stack(leaves)
    return np.stack(leaves)

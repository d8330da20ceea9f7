"""Where each layer's params live: the one home of the stacked-layer layout.

A model's params name its layers in one of two layouts:
- per layer: `layers_{i}/...`, one subtree a layer (the key maps, to-jax folders, a model without scan_layers);
- stacked: under scan_layers each run of layers with the same params is one nn.scan stack whose leaves carry a
  leading layer axis. A model whose layers all look alike has one stack, `layers/`. GLM-4.5's leading dense-MLP
  layers differ from its MoE layers, so they get a stack of their own, `dense_layers/`, ahead of `layers/`.
  Any other pattern of layer kinds (`GLMConfig.layer_kind`: dense or MoE MLP, own DSA indexer or a shared one)
  gets one stack per run of equal layers, `layers_from_{start}/`.

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
_RUN = re.compile(r"layers_from_(\d+)$")  # a stack of a model with more than these two kinds of layer
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


def runs(cfg) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive layers of one kind (GLMConfig.layer_kind)."""
    out = []
    for i in range(cfg.num_layers):
        if out and cfg.layer_kind(i) == cfg.layer_kind(out[-1][0]):
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def stacks(cfg) -> tuple[Stack, ...]:
    """The stacks of a scan_layers model of this config, in layer order."""
    r = runs(cfg)
    if len(r) == 1:
        return (Stack(MAIN, 0, cfg.num_layers),)
    if len(r) == 2 and not cfg.is_moe_layer(0) and cfg.has_indexer(0) == cfg.has_indexer(r[1][0]):
        return (Stack(DENSE, *r[0]), Stack(MAIN, *r[1]))  # GLM-4.5's dense layers ahead of its MoE layers
    return tuple(Stack(f"layers_from_{a}", a, b) for a, b in r)


def _stack_names(tree) -> list:
    """The stack folders a tree holds, in layer order."""
    keys = {p.split("/", 1)[0] for p in tree}
    runs_ = sorted((int(m.group(1)), k) for k in keys if (m := _RUN.match(k)))
    return [n for n in STACK_NAMES if n in keys] + [k for _, k in runs_]


def stored_stacks(tree) -> tuple[Stack, ...]:
    """The stacks a params tree holds (nested dicts, or a flat {path: leaf} dict of arrays or shape-carrying
    metadata); () for a per-layer tree."""
    out, start = [], 0
    for name in _stack_names(tree):
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
    head = path.split("/", 1)[0]
    return head in STACK_NAMES or _RUN.match(head) is not None


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
    names = set(_stack_names(params))
    out = {k: v for k, v in params.items() if k not in names}
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

"""LoRA on any linear of a checkpoint's own layout (DESIGN §3.6), kept as a separate float32 tree and applied
functionally: the effective weights are W + (alpha / r) · B @ A in the base checkpoint's layout, carried into the
model's params by the family's key map.

Targets are named as PEFT's `target_modules` names them for the base checkpoint (`q_proj`, `v_proj` for
glm-hf / glm4; `query_key_value`, `dense_h_to_4h` for chatglm2; `all-linear`), so a LoRA on a fused HF linear
(`query_key_value`, `gate_up_proj`) is one B @ A of the fused [out, in] shape, exactly what PEFT trains and
saves. The family's row for that weight splits / reshapes / transposes it into several kernels; the row is a
rearrangement, so we run it once on an index array (`np.arange(out * in)`) and get, for every kernel it fills,
the positions of the fused matrix it takes: inside jit the kernel's delta is then a gather of the flat B @ A.

Why not qwix's LoRA (google/qwix, used by MaxText and Tunix; not installed here, 0.1.8 on PyPI): it intercepts
the model's dot_general / einsum calls and gives each JAX kernel its own A, B in the kernel's shape. It cannot
express one adapter on a fused HF weight that our model holds as three kernels (q, k, v), so its adapters could
not be exported as PEFT's query_key_value / gate_up_proj, and it would change the model modules (other code
owns them). flax's nnx LoRA has the same per-kernel shape. This module needs neither: the base params stay one
untouched tree (bit-identical after training), the adapter another, and only the adapter is differentiated.

    sites = lora_sites(cfg, ["q_proj", "v_proj"])
    lora = init_lora(sites, rank=8, key=jax.random.PRNGKey(0))        # {module: {"A": [r, in], "B": [out, r]}}
    eff = apply_lora(params, lora, sites, scale=alpha / rank)          # jit/grad-friendly
    merged = merge_lora(params, lora, sites, scale)                    # numpy, in the base's dtypes
    write_peft_adapter(dst, lora, sites, rank, alpha, dropout, base_name)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from glm_jax import families
from glm_jax.checkpoint import layout
from glm_jax.checkpoint.store import ParamStore, StoreView
from glm_jax.families.rows import expand
from glm_jax.quant.formats import dequantize, scale_path

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_OUTPUT_PATHS = ("lm_head/kernel",)  # PEFT's all-linear leaves the output layer out


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted linear: its HF module name, its [out, in] shape, and the kernels it fills with their gathers."""

    module: str
    out_features: int
    in_features: int
    paths: tuple  # param paths ("layers_0/attn/q/kernel", ...)
    gathers: tuple  # per path: int array of the kernel's shape, indices into the flat [out * in] matrix


def _flat_shapes(cfg) -> dict:
    """Per-layer (`layers_{i}/...`) param shapes, also for a scan_layers config."""
    from flax import traverse_util

    from glm_jax.model.transformer import param_shapes

    flat = traverse_util.flatten_dict(param_shapes(cfg.replace(scan_layers=False)), sep="/")
    return {k: v.shape for k, v in flat.items()}


def linear_rows(cfg) -> list:
    """(module name, expanded row) of every plain or fused HF linear weight of this family's layout."""
    out = []
    for r in expand(families.get(cfg.family).rows, cfg):
        if len(r.hf) == 1 and r.hf[0].endswith(".weight") and all(p.endswith("/kernel") for p in r.jax):
            out.append((r.hf[0][: -len(".weight")], r))
    return out


def matches(module: str, targets) -> bool:
    """PEFT's rule: a target names the module exactly or its last dotted parts."""
    return any(module == t or module.endswith("." + t) for t in targets)


def lora_sites(cfg, targets) -> list[Site]:
    """The linears `targets` names (a list of PEFT target_modules names, or "all-linear"), in key-map order.
    ValueError naming the available module names when a target matches nothing."""
    rows = linear_rows(cfg)
    shapes = _flat_shapes(cfg)
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        chosen = [(m, r) for m, r in rows if not any(p in _OUTPUT_PATHS for p in r.jax)]
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        chosen = [(m, r) for m, r in rows if matches(m, targets)]
        missing = [t for t in targets if not any(matches(m, [t]) for m, _ in rows)]
        if missing:
            names = sorted({m.rsplit(".", 1)[-1] for m, _ in rows})
            raise ValueError(
                f"lora.targets {missing} name no linear of this {cfg.family} checkpoint; its linears are "
                f"{', '.join(names)} (or all-linear)"
            )
    cache: dict = {}
    sites = []
    for module, row in chosen:
        kernels = [np.zeros(shapes[p], np.int8) for p in row.jax]
        (hf,) = row.save(cfg, kernels)
        out_f, in_f = hf.shape
        key = (row.to_jax, out_f, in_f)
        if key not in cache:  # the same rearrangement for every layer: computed once
            idx = np.arange(out_f * in_f, dtype=np.int64 if out_f * in_f >= 2**31 else np.int32).reshape(out_f, in_f)
            cache[key] = tuple(np.asarray(g) for g in row.load(cfg, [idx]))
        sites.append(Site(module, out_f, in_f, tuple(row.jax), cache[key]))
    return sites


def init_lora(sites, rank: int, key) -> dict:
    """PEFT's default init: A Kaiming-uniform (a = sqrt(5), bound 1/sqrt(in)), B zero; float32."""
    import jax
    import jax.numpy as jnp

    out = {}
    for i, s in enumerate(sites):
        bound = 1.0 / np.sqrt(s.in_features)
        a = jax.random.uniform(jax.random.fold_in(key, i), (rank, s.in_features), jnp.float32, -bound, bound)
        out[s.module] = {"A": a, "B": jnp.zeros((s.out_features, rank), jnp.float32)}
    return out


def _set(tree: dict, path: str, value) -> dict:
    head, _, rest = path.partition("/")
    return {**tree, head: _set(tree[head], rest, value) if rest else value}


def _get(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _deltas(params, lora, sites, scale, xp):
    """{path in params: [(layer index or None, delta of that kernel's shape)]}."""
    out: dict = {}
    held = layout.stored_stacks(params)
    for s in sites:
        ab = lora[s.module]
        delta = (xp.asarray(ab["B"], xp.float32) @ xp.asarray(ab["A"], xp.float32)).reshape(-1) * scale
        for path, g in zip(s.paths, s.gathers):
            name, idx = layout.locate(path, held)
            out.setdefault(name, []).append((idx, delta[g]))
    return out


def apply_lora(params, lora, sites, scale: float, quantized_dtype="float32"):
    """params with every adapted kernel replaced by kernel + scale · (B @ A) in float32 (traceable: jit, grad).
    Per-layer and stacked scan_layers trees alike (glm_jax/checkpoint/layout.py); the base tree is not modified.
    A weight-only quantized kernel (int8 / packed int4 beside its `kernel_scale`, glm_jax/quant/) becomes its
    dequantized q · scale + delta, computed in `quantized_dtype` (the compute dtype, in which the quantized matmul
    feeds the product anyway: no float32 copy of the stacked kernels, nor of their gradients), and loses its
    scale."""
    import jax.numpy as jnp

    for name, items in _deltas(params, lora, sites, scale, jnp).items():
        w, dt, scale_name = _get(params, name), jnp.float32, scale_path(name)
        if name.endswith("/kernel") and _has(params, scale_name):  # no float32 copy of the stacked kernels
            dt = jnp.dtype(quantized_dtype)
            lead = w.ndim - items[0][1].ndim  # a stack's layer axis
            w = dequantize(w, _get(params, scale_name), _bits(w, items[0][1].shape, lead), lead=lead, dtype=dt)
            params = _drop(params, scale_name)
            items = [(i, x.astype(dt)) for i, x in items]
        w = w.astype(dt)
        if items[0][0] is None:
            w = w + items[0][1]
        else:
            idx = [i for i, _ in items]
            d = jnp.stack([x for _, x in items])
            w = w + d[np.argsort(idx)] if sorted(idx) == list(range(w.shape[0])) else w.at[np.array(idx)].add(d)
        params = _set(params, name, w)
    return params


def _has(tree: dict, path: str) -> bool:
    for part in path.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _drop(tree: dict, path: str) -> dict:
    head, _, rest = path.partition("/")
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _drop(tree[head], rest)}


def _bits(q, kernel_shape, lead: int) -> int:
    """4 when a quantized kernel is narrower than its float shape (two int4 values a byte), else 8."""
    return 8 if tuple(q.shape[lead:]) == tuple(kernel_shape) else 4


def merge_lora(params, lora, sites, scale: float, sign: float = 1.0):
    """numpy params with the adapter added (sign=-1: taken out again, i.e. unmerge), each kernel in its own dtype
    (per-layer or stacked trees)."""
    for name, items in _deltas(params, lora, sites, scale * sign, np).items():
        w = np.asarray(_get(params, name))
        new = w.astype(np.float32)  # a copy
        for idx, d in items:
            if idx is None:
                new = new + d
            else:
                new[idx] += d
        params = _set(params, name, new.astype(w.dtype))
    return params


# ---------------------------------------------------------------- PEFT folders
def peft_key(module: str, which: str) -> str:
    return f"base_model.model.{module}.lora_{which}.weight"


def write_peft_adapter(dst, lora, sites, rank, alpha, dropout=0.0, base_name="", targets=None) -> list[str]:
    """adapter_config.json + adapter_model.safetensors as peft's save_pretrained writes them for a causal LM."""
    from safetensors.numpy import save_file

    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for s in sites:
        tensors[peft_key(s.module, "A")] = np.ascontiguousarray(np.asarray(lora[s.module]["A"], np.float32))
        tensors[peft_key(s.module, "B")] = np.ascontiguousarray(np.asarray(lora[s.module]["B"], np.float32))
    save_file(tensors, str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    names = sorted({s.module.rsplit(".", 1)[-1] for s in sites}) if targets is None else targets
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_name),
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (dst / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def read_peft_adapter(folder, sites) -> tuple[dict, dict]:
    """(adapter_config, lora tree) of a PEFT adapter folder, for these sites (ValueError naming a missing key)."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    lora = {}
    for s in sites:
        try:
            lora[s.module] = {w: tensors[peft_key(s.module, w)] for w in ("A", "B")}
        except KeyError as e:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: no tensor {e.args[0]}") from None
    return config, lora


# ---------------------------------------------------------------- glm-train runs
RUN_KEY = "lora"  # the adapter's subtree in a glm-train LoRA run's params: {"000": {"A", "B"}, ...} in site order


def to_run_tree(lora, sites) -> dict:
    return {f"{i:03d}": {"A": lora[s.module]["A"], "B": lora[s.module]["B"]} for i, s in enumerate(sites)}


def from_run_tree(tree, sites) -> dict:
    return {s.module: {"A": tree[f"{i:03d}"]["A"], "B": tree[f"{i:03d}"]["B"]} for i, s in enumerate(sites)}


def run_meta(cfg, rank, alpha, dropout, targets, base="") -> dict:
    """The checkpoint meta's "adapter" entry of a LoRA run (what readers need to rebuild the sites)."""
    sites = lora_sites(cfg, targets)
    return {
        "kind": "lora",
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(dropout),
        "targets": targets,
        "modules": [s.module for s in sites],
        "base": str(base),
    }


def sites_of_meta(cfg, meta: dict, where="") -> list[Site]:
    sites = lora_sites(cfg, meta["targets"])
    if [s.module for s in sites] != list(meta["modules"]):
        raise ValueError(f"{where}: the adapter's modules do not match its targets {meta['targets']} on this model")
    return sites


class MergedStore(StoreView):
    """A glm-train LoRA run's ParamStore read as merged weights: every adapted kernel comes back as
    W + (alpha / r) · B @ A in its stored dtype (per-layer `layers_{i}/...` or whole stacked leaves alike), and
    the adapter's own leaves are hidden. `lora` (module → {"A", "B"}) and `sites` give the adapter itself."""

    def __init__(self, store: ParamStore, cfg, meta: dict, where=""):
        super().__init__(store)
        self.meta = meta
        self.sites = sites_of_meta(cfg, meta, where)
        self.scale = meta["alpha"] / meta["rank"]
        self.lora = {
            s.module: {w: np.asarray(store.read(f"{RUN_KEY}/{i:03d}/{w}")) for w in ("A", "B")}
            for i, s in enumerate(self.sites)
        }
        self.leaves = {p: v for p, v in store.leaves.items() if not p.startswith(RUN_KEY + "/")}
        self._by_name, self._by_path, self._delta = {}, {}, {}
        for s in self.sites:
            for p, g in zip(s.paths, s.gathers):
                name, idx = store.locate(p)
                if scale_path(name) in store.leaves:
                    raise ValueError(
                        f"{where}: LoRA on a quantized base (int{cfg.quantization_bit} {name}) does not merge into "
                        "its int8 kernels; load the float base with the run's PEFT adapter files "
                        "(adapter_config.json, adapter_model.safetensors) in peft"
                    )
                self._by_name.setdefault(name, []).append((idx, s, g))
                self._by_path[p] = (s, g)

    def _d(self, s):
        if s.module not in self._delta:
            ab = self.lora[s.module]
            self._delta[s.module] = (ab["B"].astype(np.float32) @ ab["A"].astype(np.float32)).reshape(-1) * self.scale
        return self._delta[s.module]

    def changes(self, path) -> bool:
        return path in self._by_name or path in self._by_path

    def transform(self, path, a):
        if path in self._by_name:  # a stored leaf: every layer's delta that lands in it
            w = a.astype(np.float32)
            for idx, s, g in self._by_name[path]:
                if idx is None:
                    w = w + self._d(s)[g]
                else:
                    w[idx] += self._d(s)[g]
            return w.astype(a.dtype)
        s, g = self._by_path[path]  # one layer of a stacked leaf
        return (a.astype(np.float32) + self._d(s)[g]).astype(a.dtype)

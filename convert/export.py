"""`glm-convert to-torch`: a glm-jax folder (or a glm-train run) → a PyTorch checkpoint folder that the family's
reference code loads, written one tensor at a time.

With the source manifest that `to-jax` stored, the output repeats the original: same keys in the same order,
same dtypes, same files (single or the same shards, same safetensors __metadata__), the same index json and
config.json, and the saved buffers (rotary inv_freq, ChatGLM-6B's tied lm_head) restored byte for byte.
Without one (glm-train output, a Megatron source, another layout or format), the family's standard layout is
written: key-map order, buffers recomputed the way the reference code computes them, HF sharding at
--max-shard-size. `--layout` exports to another family when the math is the same (chatglm2 ↔ glm-hf):
the config is carried over through that family's config.json and every field that matters must survive.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import pathlib
import re
import time

import numpy as np

from convert import guard, torch_io
from convert.importer import DTYPES, SHAPE_ONLY
from convert.torch_io import Entry
from glm_jax import families
from glm_jax.checkpoint import layout
from glm_jax.checkpoint.orbax import open_jax
from glm_jax.config import GLMConfig
from glm_jax.errors import ConfigError
from glm_jax.families.rows import PREFIX
from glm_jax.hostbuf import copy_2d
from glm_jax.tokenizers.files import copy_tokenizer_files

_NOT_MATH = {"family", "hf_config", "dtype", "param_dtype", "scan_layers", "remat"}
_PREFIX_FIELDS = {"prefix_projection", "prefix_hidden_size", "prefix_embed_size"}
_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
DEFAULT_SHARD = "5GB"
BLOCK_BYTES = 32 << 20  # a large identity/linear row is read in blocks of about this size
PREFETCH_MAX = 256 << 20  # the next row is read ahead only when smaller than this (bounds memory)


def target_config(cfg: GLMConfig, layout) -> GLMConfig:
    """cfg in `layout`'s family, refused (ConfigError) unless that family's config.json keeps the same model."""
    if layout in (None, cfg.family):
        return cfg
    if layout not in families.IDS:
        raise ConfigError(f"--layout {layout!r}: unknown layout; expected one of {', '.join(families.IDS)}")
    try:
        t = GLMConfig.from_hf(cfg.replace(family=layout, hf_config=None).to_hf())
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--layout {layout}: cannot express this {cfg.family} model ({e})") from None
    skip = _NOT_MATH | (_PREFIX_FIELDS if cfg.pre_seq_len == 0 else set())
    diff = [
        f"{f.name}={getattr(cfg, f.name)!r} becomes {getattr(t, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if f.name not in skip and getattr(cfg, f.name) != getattr(t, f.name)
    ]
    if diff:
        raise ConfigError(
            f"--layout {layout}: the math of this {cfg.family} model differs from what a {layout} "
            f"checkpoint can say: {'; '.join(diff[:4])}"
        )
    return t.replace(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


# ------------------------------------------------------------------ the plan: what goes where
@dataclasses.dataclass
class Plan:
    entries: dict  # key → Entry
    order: list  # keys in state-dict order
    rows: dict  # key → (row, index of the key among the row's HF keys)
    buffers: dict  # key → array or ("alias", key)
    files: list  # [(file name, [Entry] in file order, safetensors metadata)]
    index: tuple | None  # (file name, text)
    fmt: str = "safetensors"


def make_plan(ck, tcfg: GLMConfig, layout, fmt, max_shard, dtype, ptuning_only=False) -> Plan:
    m = ck.manifest
    same = bool(m) and m.get("format") in torch_io.FILE_NAMES and (layout or ck.cfg.family) == ck.cfg.family
    mt = m["tensors"] if same else {}
    rows = families.keymap(tcfg, layout)
    if ptuning_only:
        rows = [r for r in rows if all(k.startswith(PREFIX) for k in r.hf)]
        if not rows:
            raise ConfigError(f"{ck.description}: --ptuning-only, but this model has no P-Tuning prefix encoder")
    key_rows = {k: (r, j) for r in rows for j, k in enumerate(r.hf)}
    want = DTYPES.get(dtype)

    def out_dtype(stored):
        return want if want and stored in _FLOATS else stored

    shapes = _row_shapes(tcfg, [r for r in rows if any(k not in mt for k in r.hf)], ck.store)
    entries = {}
    for k, (r, _) in key_rows.items():
        stored = mt[k]["dtype"] if k in mt else torch_io.st_name(ck.store.dtype(r.jax[0]))
        entries[k] = Entry(k, out_dtype(stored), tuple(mt[k]["shape"]) if k in mt else shapes[k])
    buffers, anchors = {}, {}
    if same and not ptuning_only:
        for k, b in m["buffers"].items():
            buffers[k] = (
                ("alias", b["alias"])
                if "alias" in b
                else np.frombuffer(base64.b64decode(b["data"]), torch_io.np_dtype(mt[k]["dtype"])).reshape(
                    mt[k]["shape"]
                )
            )
    elif not ptuning_only:
        emb = next(iter(key_rows))
        for k, after, v in families.get(tcfg.family).buffers(tcfg, entries[emb].dtype):
            buffers[k], anchors[k] = v, after
    for k, v in buffers.items():
        src = entries[v[1]] if isinstance(v, tuple) else Entry(k, torch_io.st_name(v.dtype), v.shape)
        entries[k] = Entry(k, out_dtype(mt[k]["dtype"] if k in mt else src.dtype), tuple(src.shape))
    order = _order(list(key_rows), buffers, anchors, list(mt) if same else None)
    files, index = _files(m if same and not ptuning_only else None, [entries[k] for k in order], fmt, max_shard)
    return Plan(entries, order, key_rows, buffers, files, index, fmt)


def _row_shapes(cfg, rows, store) -> dict:
    """HF shapes for rows the manifest does not describe: the row's to_hf run on zero-byte stand-ins."""
    out = {}
    for r in rows:
        ins = [np.empty(store.shape(p), SHAPE_ONLY) for p in r.jax]
        outs = r.save(cfg, ins) if r.to_hf is not None else ins
        out.update({k: tuple(o.shape) for k, o in zip(r.hf, outs)})
    return out


def _order(row_keys, buffers, anchors, manifest_order):
    if manifest_order is not None:
        have = set(row_keys) | set(buffers)
        order = [k for k in manifest_order if k in have]
        return order + [k for k in row_keys if k not in set(order)]
    order = _layer_major(row_keys)
    for k, after in anchors.items():
        order.insert(order.index(after) + 1 if after in order else len(order), k)
    return order


def _layer_major(keys):
    """Key-map order (one row over all layers) → module order (all rows of layer 0, then layer 1, ...)."""
    out, layers = [], {}
    for k in keys:
        m = re.search(r"\.layers\.(\d+)\.", k)
        if m is None:
            out.append(k)
        else:
            if not layers:
                out.append(None)
            layers.setdefault(int(m.group(1)), []).append(k)
    if layers:
        i = out.index(None)
        out[i : i + 1] = [k for l in sorted(layers) for k in layers[l]]
    return out


def _files(m, entries, fmt, max_shard):
    """[(name, [Entry] in file order, metadata)] and the index (name, text) or None."""
    if m is not None and m["format"] == fmt and max_shard is None:
        by_key = {e.key: e for e in entries}
        files = [(f["name"], [by_key[k] for k in f["keys"] if k in by_key], f.get("metadata")) for f in m["files"]]
        placed = {e.key for _, es, _ in files for e in es}
        files[-1][1].extend(e for e in entries if e.key not in placed)
        files = [f for f in files if f[1]]
        same_tensors = {e.key for e in entries} == set(m["tensors"])
        index = (
            torch_io.index_json(fmt, [(n, es) for n, es, _ in files], m["index"]["metadata"], not same_tensors)
            if m["index"]
            else None
        )
        return files, index
    shards = torch_io.split_shards(entries, torch_io.parse_size(max_shard or DEFAULT_SHARD))
    names = torch_io.shard_file_names(fmt, len(shards))
    md = {"format": "pt"} if fmt == "safetensors" else None
    files = [(n, torch_io.st_order(es) if fmt == "safetensors" else es, md) for n, es in zip(names, shards)]
    index = torch_io.index_json(fmt, [(n, es) for n, es, _ in files]) if len(files) > 1 else None
    return files, index


# ------------------------------------------------------------------ producing tensors
class Producer:
    """produce(key) → the HF tensor, computed from the params by the key's row (other outputs of the row are
    kept until asked for), cast to the planned dtype."""

    def __init__(self, plan: Plan, cfg, store, progress=None):
        self.plan, self.cfg, self.store, self.progress, self.kept = plan, cfg, store, progress, {}
        self.sequence = [e.key for _, es, _ in plan.files for e in torch_io.production_order(plan.fmt, es)]
        self.next = dict(zip(self.sequence, self.sequence[1:]))
        self.reads = {}  # param path → tensorstore read future (the next row's, in flight)

    def _read(self, paths):
        for p in paths:
            if p not in self.reads:
                self.reads[p] = self.store.read_async(p)

    def _compute(self, key):
        if key in self.plan.buffers:
            v = self.plan.buffers[key]
            return self._compute(v[1]) if isinstance(v, tuple) else v
        r, j = self.plan.rows[key]
        if (
            len(r.jax) == 1
            and len(r.hf) == 1
            and r.jax[0] not in self.reads
            and self.plan.entries[key].nbytes >= torch_io.BIG
            and (r.to_hf is None or hasattr(r.to_hf, "linear_in"))
        ):
            return self._blocks(r)
        self._read(r.jax)
        nxt = self.next.get(key)
        if (
            nxt in self.plan.rows
            and nxt not in self.kept
            and self.plan.entries[nxt].nbytes < PREFETCH_MAX
            and self.plan.entries[key].nbytes < PREFETCH_MAX
        ):
            self._read(self.plan.rows[nxt][0].jax)  # overlap the next row's read with this one's work
        outs = r.save(self.cfg, [np.asarray(self.reads.pop(p).result()) for p in r.jax])
        for k, o in zip(r.hf, outs):
            if k != key:
                self.kept[k] = o
        return outs[j]

    def _blocks(self, r):
        """A large identity or linear row read in blocks of first-axis rows straight into its output (which
        is then the only full-size array: reading a whole tensor first costs ~1.5x its size, a transpose 1x)."""
        p = r.jax[0]
        shape, dtype = self.store.shape(p), self.store.dtype(p)
        step = max(1, BLOCK_BYTES // max(1, int(np.prod(shape[1:])) * dtype.itemsize))
        if r.to_hf is None:
            out = np.empty(shape, dtype)
            for a0 in range(0, shape[0], step):
                guard.check_stop()
                out[a0 : a0 + step] = self.store.read_rows(p, a0, a0 + step)
            return out
        i = int(np.prod(r.to_hf.linear_in(self.cfg)))
        o = int(np.prod(shape)) // i
        per = i // shape[0]  # in-features per index of the first axis
        out = np.empty((o, i), dtype)
        for a0 in range(0, shape[0], step):
            guard.check_stop()
            blk = self.store.read_rows(p, a0, a0 + step).reshape(-1, o)
            copy_2d(out[:, a0 * per : a0 * per + blk.shape[0]], blk.T)
        return out

    def __call__(self, key):
        guard.check_stop()
        a = self.kept.pop(key) if key in self.kept else self._compute(key)
        want = torch_io.np_dtype(self.plan.entries[key].dtype)
        a = a.astype(want) if a.dtype != want else a
        if self.progress is not None:
            self.progress(a.nbytes)
        return a


def to_torch(
    src,
    dst,
    *,
    fmt=None,
    max_shard=None,
    layout=None,
    dtype=None,
    ptuning_only=False,
    adapter=False,
    progress=None,
    on_total=None,
) -> dict:
    t0 = time.time()
    ck = open_jax(src)
    check_store(ck)
    if adapter and getattr(ck, "adapter", None) and ck.adapter.get("kind") == "lora":
        return _peft_folder(ck, src, dst, t0)
    if adapter and not ck.cfg.pre_seq_len:
        raise ConfigError(f"{ck.description}: --adapter, but this checkpoint holds no LoRA or P-Tuning adapter")
    ptuning_only = ptuning_only or adapter
    fmt = fmt or ("bin" if ptuning_only else "safetensors")
    tcfg = target_config(ck.cfg, layout)
    plan = make_plan(ck, tcfg, layout, fmt, max_shard, dtype, ptuning_only)
    total = sum(e.nbytes for _, es, _ in plan.files for e in es)
    if on_total:
        on_total(total)
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    produce = Producer(plan, tcfg, ck.store, progress)
    for name, es, md in plan.files:
        torch_io.write_file(fmt, dst / name, es, md, produce)
    if plan.index:
        (dst / plan.index[0]).write_text(plan.index[1])
    (dst / "config.json").write_text(json.dumps(_config_json(ck, tcfg, plan, dtype), indent=2, sort_keys=True) + "\n")
    if ck.aux_dir is not None and not ptuning_only:
        torch_io.copy_aux_files(pathlib.Path(ck.aux_dir), dst, skip_code=tcfg.family != ck.cfg.family)
    elif not ptuning_only:  # a glm-train run (or one of its steps): the tokenizer files its folder holds
        src = pathlib.Path(src)
        copy_tokenizer_files(src if (src / "checkpoints").is_dir() else src.parent.parent, dst)
    return {
        "tensors": len(plan.order),
        "bytes": total,
        "files": [n for n, _, _ in plan.files],
        "seconds": time.time() - t0,
    }


def _peft_folder(ck, src, dst, t0) -> dict:
    """A LoRA run's adapter as the PEFT folder peft's save_pretrained writes, plus the run's tokenizer files."""
    from glm_jax.adapters import ADAPTER_WEIGHTS, ALL_LINEAR, write_peft_adapter

    a, store = ck.adapter, ck.store
    dst = pathlib.Path(dst)
    files = write_peft_adapter(
        dst,
        store.lora,
        store.sites,
        a["rank"],
        a["alpha"],
        a["dropout"],
        base_name=a.get("base", ""),
        targets=ALL_LINEAR if a["targets"] == ALL_LINEAR else None,
    )
    src = pathlib.Path(src)
    copy_tokenizer_files(src if (src / "checkpoints").is_dir() else src.parent.parent, dst)
    return {
        "tensors": 2 * len(store.sites),
        "bytes": (dst / ADAPTER_WEIGHTS).stat().st_size,
        "files": files,
        "seconds": time.time() - t0,
    }


def check_store(ck):
    """The stored config against the stored params, before anything is planned per layer: the layer count (the
    `layers_{i}` leaves, or the leading axis of stacked `layers/` ones) and the embedding's (vocab, hidden)."""
    cfg, paths = ck.cfg, ck.store.paths()
    n, held = layout.num_layers(paths, ck.store.stacks)
    if n != cfg.num_layers:
        raise ConfigError(f"{ck.description}: its config says num_layers={cfg.num_layers}, its params hold {held}")
    if "embed/embedding" in paths:
        got, want = tuple(ck.store.shape("embed/embedding")), (cfg.vocab_size, cfg.hidden_size)
        if got != want:
            raise ConfigError(
                f"{ck.description}: its config says vocab_size={want[0]} and hidden_size={want[1]}, "
                f"its params hold embed/embedding of shape {got}"
            )


def _config_json(ck, tcfg, plan, dtype) -> dict:
    out = tcfg.to_hf()
    same = bool(ck.manifest) and tcfg.family == ck.cfg.family and ck.manifest.get("format") in torch_io.FILE_NAMES
    if same and not dtype:
        return out
    name = _TORCH_NAMES.get(plan.entries[plan.order[0]].dtype)
    key = "dtype" if "dtype" in out else families.get(tcfg.family).dtype_key
    if name:
        out[key] = name
    return out

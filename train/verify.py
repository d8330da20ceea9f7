"""Checkpoints that prove themselves: the manifest of a glm-train step, and the checks that read it back.

`checkpoints/<step>/glm_manifest.json` is written last, atomically, by process 0, once Orbax has committed the
step (a local file goes to a temporary name, then os.replace; a GCS object appears whole or not at all, so it is
written in place). Every path may be local or gs:// (glm_jax/storage.py): a step on GCS is listed in one request
and its files are hashed through ranged reads. It lists every other file under the step folder with its size
and blake2b-128 hash, and carries the model config and the data-pipeline state(s). A step without a manifest
is not complete, unless its meta lacks the `manifest` marker: such a step was written before glm-train
recorded manifests, and only whether it loads can be checked.

`check_files` compares a step with its manifest (sizes, then hashes); `check_loads` reads the meta, the model
config and every array of `params` and `opt_state` back (params must be finite and of the config's shapes).
`glm-train verify RUN` runs both on every step of a run; resuming runs `check_files` and then restores.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib

import numpy as np

from glm_jax import storage

MANIFEST = "glm_manifest.json"  # glm_jax/checkpoint/orbax.py (_step_dir) looks for the same name
FORMAT = "glm-train-manifest"
META_FILE = ("meta", "metadata")  # where Orbax's JsonSave puts the meta item
_HASH_THREADS = 8  # hashlib releases the GIL on large updates: files hash in parallel
_CHUNK = 1 << 22


def hash_file(path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with storage.open_file(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sizes(step_dir) -> dict[str, int]:
    """{relative posix path: size} of every file under a step folder, the manifest and its temporary name
    excepted."""
    return {r: n for r, n in storage.list_files(step_dir).items() if not r.startswith(MANIFEST)}


def step_files(step_dir) -> list[str]:
    """Every file under a step folder (relative posix paths), the manifest and its temporary name excepted."""
    return sorted(file_sizes(step_dir))


def has_manifest(step_dir) -> bool:
    return MANIFEST in storage.list_files(step_dir) if storage.is_remote(step_dir) else (step_dir / MANIFEST).is_file()


def _hashes(step_dir: pathlib.Path, rels) -> dict:
    if not rels:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(_HASH_THREADS, len(rels))) as pool:
        return dict(zip(rels, pool.map(hash_file, [step_dir / r for r in rels])))


def write_manifest(step_dir, meta: dict):
    """Hashes every file of a committed step and writes its manifest (last, atomically)."""
    step_dir = storage.as_path(step_dir)
    sizes = file_sizes(step_dir)
    rels = sorted(sizes)
    hashes = _hashes(step_dir, rels)
    man = {
        "format": FORMAT,
        "version": 1,
        "step": meta["step"],
        "files": {r: {"size": sizes[r], "blake2b": hashes[r]} for r in rels},
        "config": meta["config"],
        "data_state": meta.get("data_state"),
        "data_states": meta.get("data_states"),
    }
    if storage.is_remote(step_dir):
        storage.write_text(step_dir / MANIFEST, json.dumps(man, indent=1, sort_keys=True))
        return step_dir / MANIFEST
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    return step_dir / MANIFEST


def read_meta(step_dir) -> tuple[dict | None, str | None]:
    """(the step's meta item, None) or (None, what is wrong with it)."""
    p = storage.as_path(step_dir).joinpath(*META_FILE)
    try:
        meta = json.loads(storage.read_bytes(p))
    except FileNotFoundError:
        return None, "meta/metadata is missing"
    except (OSError, ValueError) as e:
        return None, f"meta/metadata is not JSON ({type(e).__name__})"
    if not isinstance(meta, dict) or "step" not in meta or "config" not in meta:
        return None, "meta/metadata lacks step and config"
    return meta, None


def check_files(step_dir) -> str | None:
    """None when every file of the step matches its manifest; otherwise what failed, in one line."""
    step_dir = storage.as_path(step_dir)
    present_sizes = file_sizes(step_dir)
    if not present_sizes and not storage.isdir(step_dir):
        return "the step folder is missing"
    if not has_manifest(step_dir):
        return "no manifest (the save did not complete)"
    try:
        man = json.loads(storage.read_bytes(step_dir / MANIFEST))
        want = {r: (int(v["size"]), str(v["blake2b"])) for r, v in man["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"the manifest is unreadable ({type(e).__name__})"
    present = set(present_sizes)
    missing = sorted(set(want) - present)
    problems = _missing_items(missing, want)
    for r in sorted(set(want) & present):
        size = present_sizes[r]
        if size != want[r][0]:
            problems.append(f"{r} has {size} bytes, the manifest says {want[r][0]}")
    problems += [f"{r} is not in the manifest" for r in sorted(present - set(want))]
    if not problems:
        got = _hashes(step_dir, sorted(want))
        problems = [
            f"{r} differs from its manifest hash ({len(want[r][1]) * 4}-bit blake2b)"
            for r in got
            if got[r] != want[r][1]
        ]
    return one_line(problems)


def _missing_items(missing: list, want: dict) -> list:
    """`params/ is missing` when a whole item folder went, else one entry per missing file."""
    out, done = [], set()
    for r in missing:
        top = r.split("/")[0]
        if "/" in r and all(x in missing for x in want if x.startswith(top + "/")):
            if top not in done:
                out.append(f"{top}/ is missing")
                done.add(top)
        else:
            out.append(f"{r} is missing")
    return out


def one_line(problems: list) -> str | None:
    if not problems:
        return None
    more = len(problems) - 2
    return "; ".join(problems[:2]) + (f" (and {more} more)" if more > 0 else "")


def check_loads(step_dir) -> str | None:
    """None when the meta, the model config and every array of params and opt_state read back (params finite,
    of the config's shapes); otherwise what failed, in one line."""
    from glm_jax.checkpoint.orbax import OrbaxStore, quiet_absl
    from glm_jax.config import GLMConfig

    step_dir = storage.as_path(step_dir)
    meta, why = read_meta(step_dir)
    if why:
        return why
    try:
        cfg = GLMConfig.from_dict(meta["config"])
    except Exception as e:  # any failure here: the meta holds no valid config
        return f"meta has no valid model config ({' '.join(str(e).split())[:200]})"
    expect = _expected_shapes(cfg)
    for item in ("params", "opt_state"):
        path = None
        try:
            with quiet_absl():
                store = OrbaxStore(step_dir / item)
                for path in store.paths():
                    a = store.read(path)
                    if item == "params":
                        if path not in expect:
                            return f"params/{path} is not a parameter of the saved config"
                        if tuple(a.shape) != expect[path]:
                            return f"params/{path} has shape {tuple(a.shape)}, the config needs {expect[path]}"
                        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
                            return f"params/{path} has non-finite values"
        except Exception as e:  # whatever tensorstore raises: the item does not read
            where = f"{item}/{path}" if path else f"{item}/"
            return f"{where} does not read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        if item == "params" and set(expect) - set(store.paths()):
            return f"params lacks {sorted(set(expect) - set(store.paths()))[0]} (and maybe more)"
    return None


def _expected_shapes(cfg) -> dict:
    from flax import traverse_util

    from glm_jax.model.transformer import param_shapes

    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(param_shapes(cfg), sep="/").items()}


def checkpoints_dir(run):
    """`run/checkpoints` of a run directory (or `run` itself when it is a checkpoints folder)."""
    p = storage.as_path(run)
    return p / "checkpoints" if "checkpoints" in storage.subfolders(p) else p


def step_dirs(ck_dir) -> list[tuple[int, pathlib.Path]]:
    """(step, folder) of every step folder, oldest first (Orbax's temporary folders are not). On GCS Orbax writes
    a step in place, so a folder here may be half-written: only its manifest says it is complete."""
    ck_dir = storage.as_path(ck_dir)
    return sorted((int(n), ck_dir / n) for n in storage.subfolders(ck_dir) if n.isdigit())


def move_aside(step_dir) -> pathlib.Path:
    """checkpoints/<step> → checkpoints/corrupt-<step> (corrupt-<step>.2, ... when that name is taken).

    GCS has no rename: the step is copied (server-side) and then deleted, its manifest first, so that a move cut
    short never leaves a step that looks complete: the copy is named corrupt-*, which resume never reads, and what
    is left of the step has no manifest (resume sets it aside again, verify reports it)."""
    step_dir = storage.as_path(step_dir)
    taken = set(storage.subfolders(step_dir.parent))
    name, n = f"corrupt-{step_dir.name}", 1
    while name in taken:
        n += 1
        name = f"corrupt-{step_dir.name}.{n}"
    dest = step_dir.parent / name
    if storage.is_remote(step_dir):
        storage.copy_folder(step_dir, dest)
        storage.delete(step_dir / MANIFEST)
        storage.rmtree(step_dir)
    else:
        os.replace(step_dir, dest)
    return dest


def verify_step(step_dir) -> tuple[str | None, str]:
    """(what failed or None, a note for an ok step) for `glm-train verify`."""
    problem = check_files(step_dir) or check_loads(step_dir)
    files = file_sizes(step_dir)
    size = sum(files.values())
    return problem, f"{len(files)} files, {size / 1e6:.1f} MB, hashes match, loads"


def verify_run(run, say=print) -> int:
    """Checks every step of a run, one line each; 0 when all are good, 2 otherwise (or when there is none)."""
    from train.config import TrainConfigError

    ck = checkpoints_dir(run)
    steps = step_dirs(ck)
    if not steps:
        raise TrainConfigError(f"{run}: no checkpoints (expected {ck}/<step>/)")
    bad = 0
    for step, d in steps:
        problem, note = verify_step(d)
        say(f"step {step}: {'FAILED: ' + problem if problem else 'ok (' + note + ')'}")
        bad += problem is not None
    aside = [n for n in storage.subfolders(ck) if n.startswith("corrupt-")]
    if aside:
        say(f"set aside earlier (not checked): {', '.join(aside)}")
    return 2 if bad else 0

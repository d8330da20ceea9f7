"""glm-convert throughput and memory on a ChatGLM3-6B-shaped checkpoint, against a plain copy of the same bytes.

    .venv/bin/python bench/convert_bench.py [--layers 14] [--repeat 2] [--workdir /tmp/glm_convert_bench] [--keep]

Builds a synthetic checkpoint with the real ChatGLM3-6B tensor shapes (GLMConfig.preset("chatglm3_6b"), bf16 as
released, random bytes), `--layers` of its 28 layers, written as HF sharded safetensors (2 GB shards, with the
safetensors library). Then, each in a child process of its own:
    copy         shutil.copyfile of the source files (through the page cache, as cp)
    direct copy  GNU dd oflag=direct bs=8M of the same files (past the page cache, as glm-convert writes)
    to-jax       glm-convert to-jax SRC JAX
and the same three for the to-jax folder's files and `glm-convert to-torch JAX OUT`. It prints wall times and
peak RSS (os.wait4's ru_maxrss of that child) next to the largest tensor's size.
Copies and conversion alternate --repeat times (the VM's disk and memory speed drift a lot); the best time of
each is taken, and the conversion compared with the faster of the two copies; the largest RSS is reported.
Everything is timed until its bytes are on disk (os.sync before and after each). Targets: conversion <= 2x the
copy's time; peak RSS < 2 x largest tensor + 1 GB. The output is checked against the source (bytes of every
tensor) at the end. Disk needed: about 4x the checkpoint.

Why two copies: on this VM a buffered write spends most of its time on page-cache pages the guest has not
touched yet, and swings 4-5x from run to run; writes past the page cache run at the disk's ~1 GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build(src: pathlib.Path, layers: int, shard_bytes: int = 2 * 10**9) -> tuple[int, int]:
    """Write the synthetic checkpoint; returns (total bytes, largest tensor bytes)."""
    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    from glm_jax import GLMConfig
    from glm_jax.families import presets

    hf = {**presets()["chatglm3_6b"], "num_layers": layers, "torch_dtype": "bfloat16"}
    cfg = GLMConfig.from_hf(hf)
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}) + "\n")
    shapes = _hf_shapes(cfg)
    shapes["transformer.rotary_pos_emb.inv_freq"] = (32,)
    rng = np.random.default_rng(0)
    shards, cur, size = [], {}, 0
    for k, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = shape, size + n
    shards.append(cur)
    wm, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {k: rng.integers(0, 1 << 16, s, dtype=np.uint16).view(ml_dtypes.bfloat16) for k, s in shard.items()}
        safetensors.numpy.save_file(arrays, src / name, metadata={"format": "pt"})
        wm.update({k: name for k in shard})
        total += sum(a.nbytes for a in arrays.values())
        del arrays
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}, indent=2) + "\n"
    )
    largest = max(int(np.prod(s)) * 2 for s in shapes.values())
    return total, largest


def _hf_shapes(cfg) -> dict:
    """HF key → shape for this config, from the key map's own to_hf run on zero-byte stand-ins."""
    import numpy as np

    from glm_jax.checkpoint.orbax import flatten as _flatten
    from glm_jax.families import keymap
    from glm_jax.model.transformer import param_shapes

    flat = {}
    _flatten(param_shapes(cfg.replace(scan_layers=False)), "", flat)
    out = {}
    for r in keymap(cfg):
        outs = r.save(cfg, [np.empty(flat[p].shape, np.dtype([])) for p in r.jax])
        out.update({k: tuple(o.shape) for k, o in zip(r.hf, outs)})
    return out


def child(argv: list) -> tuple[float, float, int]:
    """(wall seconds until the output is on disk, peak RSS in GB, return code) of one child process. Dirty pages
    are flushed before it starts and once more when it ends (counted), so neither run inherits the other's
    writeback and both are timed to durable bytes."""
    os.sync()
    t = time.time()
    p = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    os.sync()
    return time.time() - t, usage.ru_maxrss * 1024 / 1e9, p.returncode


def copy_cmd(src, dst, direct=False):
    """A child that copies the folder: shutil.copyfile (through the page cache, as cp does), or with direct, GNU
    dd with oflag=direct in 8 MB blocks (past the page cache, as glm-convert writes)."""
    one = (
        ("subprocess.run(['dd', 'if=' + str(f), 'of=' + str(t), 'bs=8M', 'oflag=direct', 'status=none'], check=True)")
        if direct
        else "shutil.copyfile(f, t)"
    )
    return [
        sys.executable,
        "-c",
        "import pathlib, shutil, subprocess, sys\n"
        "s, d = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "for f in s.rglob('*'):\n"
        "    t = d / f.relative_to(s)\n"
        "    t.mkdir(parents=True, exist_ok=True) if f.is_dir() else (t.parent.mkdir(parents=True, exist_ok=True),"
        f" {one})\n",
        str(src),
        str(dst),
    ]


def du(path) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def verify(src, out) -> bool:
    """Every tensor of the output equals the source's, byte for byte (read with the safetensors library)."""
    import hashlib

    import torch
    from safetensors import safe_open

    def digest(folder):
        d = {}
        for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                for k in h.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    t = h.get_tensor(k)
                    d[k] = (str(t.dtype), tuple(t.shape), hashlib.sha1(t.view(torch.uint8).numpy()).hexdigest())
        return d

    return digest(src) == digest(out)


def main():
    if sys.argv[1:2] == ["--build-only"]:
        print(json.dumps(build(pathlib.Path(sys.argv[3]), int(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=14, help="ChatGLM3-6B layers to build (the model has 28)")
    ap.add_argument("--workdir", default="/tmp/glm_convert_bench")
    ap.add_argument("--repeat", type=int, default=2, help="copy/convert pairs per direction (best of each reported)")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = ap.parse_args()
    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src, jax_dir, out = work / "src", work / "jax", work / "torch"
    t = time.time()
    built = subprocess.run(
        [sys.executable, __file__, "--build-only", str(args.layers), str(src)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )  # keeps this process small
    total, largest = json.loads(built.stdout.strip().splitlines()[-1])
    print(
        f"built {args.layers}-layer ChatGLM3-6B-shaped bf16 checkpoint: {total / 1e9:.2f} GB in "
        f"{len(list(src.glob('*.safetensors')))} shards ({time.time() - t:.0f} s); largest tensor "
        f"{largest / 1e9:.3f} GB",
        flush=True,
    )
    rss_target = (2 * largest + 1e9) / 1e9
    cli = [sys.executable, "-m", "convert.cli"]
    rows = []
    try:
        for name, copy_from, dst in (("to-jax", src, jax_dir), ("to-torch", jax_dir, out)):
            argv = cli + [name, str(copy_from), str(dst)]
            runs = []
            for rep in range(args.repeat):  # alternate copies and conversion: the disk's speed drifts
                copies = []
                for direct in (False, True):
                    c_wall, c_rss, rc = child(copy_cmd(copy_from, work / "copy", direct))
                    assert rc == 0
                    nbytes = du(work / "copy")
                    shutil.rmtree(work / "copy")
                    copies.append(c_wall)
                if rep:
                    shutil.rmtree(dst)
                wall, rss, rc = child(argv)
                assert rc == 0, f"{name} failed"
                runs.append((wall, rss, *copies))
                print(
                    f"  {name} run {rep + 1}: {wall:6.1f} s, peak RSS {rss:.2f} GB | copy {copies[0]:6.1f} s, "
                    f"direct copy {copies[1]:6.1f} s | ratio {wall / min(copies):.2f}",
                    flush=True,
                )
            wall, c_wall, d_wall = (min(r[i] for r in runs) for i in (0, 2, 3))  # best of N on every side
            rss = max(r[1] for r in runs)
            rows.append((name, wall, rss, c_wall, d_wall, nbytes))
            print(
                f"{name:9s} {wall:7.1f} s  peak RSS {rss:5.2f} GB | copy of the same {nbytes / 1e9:.2f} GB: "
                f"{c_wall:6.1f} s, direct copy {d_wall:6.1f} s | ratio to the faster copy "
                f"{wall / min(c_wall, d_wall):.2f}x (target <= 2) | RSS target < {rss_target:.2f} GB "
                f"(best of {len(runs)} each, RSS max)",
                flush=True,
            )
        same = verify(src, out)
        print(f"round trip: every tensor byte-identical to the source: {same}")
        print(
            json.dumps(
                {
                    "layers": args.layers,
                    "checkpoint_gb": total / 1e9,
                    "largest_tensor_gb": largest / 1e9,
                    "rss_target_gb": rss_target,
                    "same": same,
                    "runs": [
                        dict(zip(("step", "seconds", "peak_rss_gb", "copy_seconds", "direct_copy_seconds", "bytes"), r))
                        for r in rows
                    ],
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

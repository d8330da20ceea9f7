"""The training loop: model and state on the mesh, resume, steps, logging, eval, checkpoints, SIGTERM."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import time

import jax
import numpy as np

from glm_jax import hostmem
from glm_jax.model.transformer import param_count
from glm_jax.quant import load as quant_load
from glm_jax.sharding import axis_rules
from train import adapters as train_adapters
from train import data as data_lib
from train import flops as flops_lib
from train import moe_rules, optimizer, parallel, quant_base
from train import step as step_lib
from train.checkpointing import Checkpointer, TrainingStopped, gather_json
from train.config import TrainConfig, TrainConfigError
from train.metrics import Reporter, device_peak_flops
from train.model_setup import load_pretrained, model_config


# ---------------------------------------------------------------- the run
def state_layout(tc: TrainConfig, cfg, mesh) -> dict:
    """Optimizer, frozen mask, the train step function, and the state's shardings and abstract shapes."""
    from glm_jax.model.transformer import GLMModel

    moe_rules.check_model(tc, cfg)  # mtp_loss_weight / moe.* need MTP layers / experts
    adapter = train_adapters.plan(tc, cfg)  # LoRA / P-Tuning: only the adapter trains
    model_shapes = quant_load.model_shapes(cfg)  # a quantized base (quantize=): int8 / int4 kernels + scales
    pshapes = adapter.shapes(model_shapes) if adapter else model_shapes
    frozen = optimizer.frozen_mask(pshapes, tc.freeze)
    if tc.freeze and not any(jax.tree.leaves(frozen)):
        raise TrainConfigError(
            f"freeze={tc.freeze} matches no parameter; paths look like {', '.join(list(_paths(pshapes))[:3])}"
        )
    kept = optimizer.frozen_mask(pshapes, optimizer.not_trained(cfg, tc) + (adapter.frozen(pshapes) if adapter else []))
    frozen = jax.tree.map(lambda a, b: a or b, frozen, kept)
    tx = optimizer.make_optimizer(tc, pshapes, frozen)
    p_sh = parallel.param_shardings(cfg, model_shapes, mesh)
    p_sh = adapter.shardings(p_sh, mesh) if adapter else p_sh
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), pshapes)
    state_sh = {
        "step": parallel.replicated(mesh),
        "params": p_sh,
        "opt_state": parallel.like_params_shardings(abstract["opt_state"], pshapes, p_sh, mesh),
    }
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh)
    schedule = optimizer.make_schedule(tc, tc.warmup)
    fn = adapter.loss_params if adapter else None  # the model params the loss sees
    train_step = step_lib.make_train_step(GLMModel(cfg), tx, tc, schedule, frozen, grad_shardings=p_sh, params_fn=fn)
    lay = {"tx": tx, "frozen": frozen, "state_sh": state_sh, "abstract": abstract, "train_step": train_step}
    return {**lay, "adapter": adapter, "fn": fn}


class Run:
    """Everything one training run holds: mesh, jitted functions, state, data, outputs."""

    def __init__(self, tc: dict):
        self.tc = tc
        self.cfg, self.pretrained = model_config(tc)
        from train.run_folder import with_tokenizer_ids

        self.cfg = with_tokenizer_ids(self.cfg, tc)
        if self.cfg.position_encoding == "learned" and tc.seq_len > self.cfg.max_position_embeddings:
            raise TrainConfigError(
                f"seq_len {tc.seq_len} exceeds the model's {self.cfg.max_position_embeddings} learned positions"
            )
        self.mesh = parallel.build_mesh(tc.mesh)
        parallel.check_batch_divisible(tc.batch_size, tc.grad_accum, self.mesh)
        parallel.check_context_divisible(tc.seq_len, self.mesh)
        from glm_jax.model.transformer import GLMModel

        self.module = GLMModel(self.cfg)
        self.setup_state()
        self.setup_data()
        if jax.process_index() == 0:  # config.json + tokenizer files: the run folder is a checkpoint folder
            from train.run_folder import write_run_folder

            write_run_folder(tc.output_dir, self.cfg, self.data.tokenizer, tc.data.get("tokenizer"), self.pretrained)

    @contextlib.contextmanager
    def ctx(self):
        with jax.set_mesh(self.mesh), axis_rules():
            yield

    def setup_state(self):
        tc, cfg, mesh = self.tc, self.cfg, self.mesh
        from glm_jax.model.transformer import init_params

        lay = state_layout(tc, cfg, mesh)
        self.tx, self.frozen, self.state_sh, self.abstract = lay["tx"], lay["frozen"], lay["state_sh"], lay["abstract"]
        self.adapter = train_adapters.check_base(lay["adapter"], self.pretrained, tc)
        out = pathlib.Path(tc.output_dir)
        if out.exists() and not out.is_dir():
            raise TrainConfigError(f"output_dir {out} exists and is not a folder")
        self.checkpointer = Checkpointer(out, tc.keep_checkpoints, tc.async_checkpointing)
        self.start_step = 0
        # the newest checkpoint that verifies (its model config is compared before the restore)
        self.state, self.meta = self.checkpointer.resume(self.abstract, self._check_meta, self.ctx)
        loaded = None
        if self.meta is None and self.pretrained:  # (outside the rules context: loading builds param boxes)
            loaded = train_adapters.add_params(
                self.adapter, load_pretrained(self.pretrained, cfg, tc.model_overrides, quant_base.load_kwargs(tc)), tc
            )
        with self.ctx():
            if self.meta is not None:
                self.start_step = int(self.meta["step"])
            elif self.pretrained:
                params = jax.device_put(loaded, self.state_sh["params"])
                del loaded
                self.state = jax.jit(lambda p: step_lib.init_state(p, self.tx), out_shardings=self.state_sh)(params)
            else:
                init = lambda k: step_lib.init_state(init_params(cfg, k), self.tx)  # noqa: E731
                self.state = jax.jit(init, out_shardings=self.state_sh)(jax.random.PRNGKey(tc.seed))
        self.train_step = lay["train_step"]
        self.metric_sh = parallel.replicated(mesh)
        self.step_fn = None  # jitted lazily, once the batch shardings are known
        self.eval_fn = jax.jit(
            step_lib.make_eval_step(self.module, tc.loss_chunk, tc.loss_select, lay["fn"]), out_shardings=self.metric_sh
        )

    def _check_meta(self, meta):
        saved = {k: v for k, v in meta.get("config", {}).items() if k != "hf_config"}
        now = {k: v for k, v in self.cfg.to_dict().items() if k != "hf_config"}
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        diff += train_adapters.meta_diff(self.adapter, meta)
        if diff:
            what = ", ".join(k if " " in k else f"{k} saved {saved.get(k)!r} now {now.get(k)!r}" for k in diff)
            raise TrainConfigError(
                f"{self.tc.output_dir} holds a run of another model ({what}); use a new output_dir "
                "or the saved settings"
            )

    def setup_data(self):
        tc, mesh = self.tc, self.mesh
        B = tc.batch_size
        self.batch_sh_one = parallel.batch_sharding(mesh, 1, (B,))
        lo, hi = data_lib.process_rows(self.batch_sh_one, B)
        rows = hi - lo
        make = data_lib.batch_maker(tc.objective)
        self.data = make(tc, rows, lo // rows, B // rows)
        self.eval_data = None
        if tc.eval_every:
            self.eval_data = make(tc, rows, lo // rows, B // rows, eval_split=True)
            self.eval_state0 = self.eval_data.get_state()
        v = data_lib.vocab_size(self.data)
        if v > self.cfg.vocab_size:
            raise TrainConfigError(f"the tokenizer has {v} ids but the model's vocab_size is {self.cfg.vocab_size}")
        if self.meta is not None:
            states = self.meta.get("data_states") or [self.meta["data_state"]]
            if len(states) != jax.process_count():
                raise TrainConfigError(
                    f"the checkpoint was written by {len(states)} processes, this run has "
                    f"{jax.process_count()}; resume with the same process count"
                )
            self.data.set_state(states[jax.process_index()])

    def device_batch(self, local: dict):
        if self.step_fn is None:
            shapes = {k: jax.ShapeDtypeStruct((self.tc.batch_size,) + v.shape[1:], v.dtype) for k, v in local.items()}
            self.batch_sh = parallel.batch_shardings(self.mesh, shapes)
            self.step_fn = jax.jit(
                self.train_step,
                in_shardings=(self.state_sh, self.batch_sh),
                out_shardings=(self.state_sh, self.metric_sh),
                donate_argnums=(0,),
            )
        return parallel.global_batch(local, self.batch_sh, self.tc.batch_size)

    def save(self, step: int) -> None:
        states = gather_json(self.data.get_state())
        meta = {
            "step": step,
            "updates": int(self.state["step"]),
            "config": self.cfg.to_dict(),
            "data_state": states[0],
            "data_states": states,
            "train_config": self.tc.to_dict(),
            "process_count": jax.process_count(),
        }
        train_adapters.save(self, step, meta)  # self.checkpointer.save, + an adapter's own files

    def evaluate(self) -> dict:
        self.eval_data.set_state(self.eval_state0)
        tot = {"ce": 0.0, "correct": 0.0, "count": 0.0}
        with self.ctx():
            for _ in range(self.tc.eval_batches):
                local = data_lib.to_device_dict(next(self.eval_data))
                sums = jax.device_get(self.eval_fn(self.state["params"], self.device_batch(local)))
                for k in tot:
                    tot[k] += float(sums[k])
        n = max(tot["count"], 1.0)
        return {"eval_loss": tot["ce"] / n, "eval_accuracy": tot["correct"] / n}


def _paths(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


class _Stop:
    """SIGTERM → finish the current step, save a checkpoint, exit 0 (all processes agree on the step)."""

    def __init__(self):
        self.flag = False
        self.old = {}
        for sig in (signal.SIGTERM,):
            self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.array([int(self.flag)], np.int32))))

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def use_compilation_cache(path: str) -> None:
    """Persistent XLA compilation cache in `path` (a restart, resume or rerun skips recompiling)."""
    if not path:
        return
    path = str(pathlib.Path(path).expanduser())
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        try:  # jax decides once per process whether to use the cache: make it look again
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):
            pass


def train(tc: TrainConfig) -> dict:
    """Runs (or resumes) training; returns a summary dict."""
    use_compilation_cache(tc.compilation_cache_dir)
    stop = _Stop()
    # before Run starts the data pipeline, whose read threads would share the cores with a measured peak
    peak, peak_src = device_peak_flops(tc.peak_flops)
    run = Run(tc)
    steps, log_every = tc.steps, tc.log_every
    rep = Reporter(tc.output_dir, steps, run.start_step, tc.progress, tc.plot_every_seconds)
    n_dev = run.mesh.devices.size
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_per_step = flops_lib.flops_per_token(run.cfg, tc.seq_len, mtp=tc.mtp_loss_weight > 0) * tokens_per_step
    if run.start_step >= min(steps, tc.stop_at or steps):
        rep.say(
            f"{tc.output_dir} is already at step {run.start_step}: nothing to do (raise steps= to go on)", always=True
        )
    elif run.start_step:
        rep.say(f"resumed from {run.checkpointer.directory / str(run.start_step)} (step {run.start_step})")
    rep.say(
        f"model {tc.model}: {param_count(run.cfg) / 1e6:.1f}M params, mesh {dict(run.mesh.shape)} "
        f"on {n_dev} {jax.devices()[0].platform} devices, {jax.process_count()} process(es); "
        f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_src})"
        + ("; freed host memory kept for reuse (host_heap)" if hostmem.kept() else "")
    )
    step, pending, last_loss = run.start_step, [], None
    t_start = t_mark = time.perf_counter()
    steps_since, first = 0, True
    nan_steps = set(tc.debug_nan_steps)
    skips = _Skips(tc.max_skipped_steps)
    stop_at = tc.stop_at or steps
    try:
        while step < min(steps, stop_at):
            local = data_lib.to_device_dict(next(run.data), nan_at=(step + 1) in nan_steps)
            with run.ctx():
                batch = run.device_batch(local)
                run.state, m = run.step_fn(run.state, batch)
            step += 1
            steps_since += 1
            pending.append(m)
            rep.advance()
            do_eval = run.eval_data is not None and step % tc.eval_every == 0
            do_ckpt = step % tc.checkpoint_every == 0
            extra = {}
            if do_eval:  # eval (and checkpoint) time is not counted in tokens_per_second
                jax.block_until_ready(run.state)
                t_pause = time.perf_counter()
                extra = run.evaluate()
                t_mark += time.perf_counter() - t_pause
            if step % log_every == 0 or step == steps or do_eval:
                vals = jax.device_get(pending)
                dt = max(time.perf_counter() - t_mark, 1e-9)
                nsteps = steps_since or len(vals)
                rec = _summarise(
                    step, vals, tokens_per_step * nsteps / dt, flops_per_step * nsteps / dt / (peak * n_dev)
                )
                for i, v in enumerate(vals):
                    skips.add(step - len(vals) + i + 1, bool(v["skipped"]))
                    if v["skipped"]:
                        rep.say(
                            f"warning: step {step - len(vals) + i + 1}: non-finite loss or gradient "
                            f"(loss {float(v['loss'])}); the update was skipped",
                            always=True,
                        )
                rep.log({**rec, **extra})
                last_loss = rec["loss"]
                pending, t_mark, steps_since = [], time.perf_counter(), 0
                if skips.over():  # stop without saving: the last checkpoint stays the last good one
                    break
            if first:  # the first step includes compilation: time steady-state steps from here
                jax.block_until_ready(m)
                rep.say(f"compiled and ran step {step} in {time.perf_counter() - t_start:.1f}s")
                first, t_mark, steps_since = False, time.perf_counter(), 0
            if do_ckpt:
                jax.block_until_ready(run.state)
                t_pause = time.perf_counter()
                run.save(step)
                t_mark += time.perf_counter() - t_pause
            run.checkpointer.poll()  # manifests of committed saves, then rotation
            if stop.requested():
                rep.say(f"SIGTERM: saving a checkpoint at step {step} and stopping", always=True)
                break
        if not skips.over():
            run.save(step)
    finally:
        run.checkpointer.close()
        rep.close()
        stop.restore()
        close = getattr(run.data, "close", None)
        if close:
            close()
    if skips.over():
        raise TrainingStopped(
            f"{skips.n} consecutive steps had a non-finite loss or gradient (steps {skips.first}-{skips.last}); "
            f"stopped. {run.checkpointer.last_good_text()}"
        )
    return {"step": step, "loss": last_loss, "output_dir": tc.output_dir}


class _Skips:
    """Consecutive skipped (non-finite) steps; `limit` of them in a row stop the run (0: never)."""

    def __init__(self, limit: int):
        self.limit, self.n, self.first, self.last = limit, 0, 0, 0

    def add(self, step: int, skipped: bool) -> None:
        if skipped:
            self.first, self.last, self.n = self.first or step, step, self.n + 1
        else:
            self.first, self.last, self.n = 0, 0, 0

    def over(self) -> bool:
        return bool(self.limit) and self.n >= self.limit


def _summarise(step, vals, tps, mfu) -> dict:
    ok = [v for v in vals if not v["skipped"]]
    mean = lambda k: float(np.mean([float(v[k]) for v in ok])) if ok else float("nan")  # noqa: E731
    rec = {
        "step": step,
        "loss": mean("loss"),
        "accuracy": mean("accuracy"),
        "grad_norm": mean("grad_norm"),
        "learning_rate": float(vals[-1]["learning_rate"]),
        "tokens_per_second": tps,
        "mfu": mfu,
        "loss_tokens": float(np.mean([float(v["loss_tokens"]) for v in vals])),
        "skipped_steps": int(sum(int(v["skipped"]) for v in vals)),
    }
    if any(float(v["z_loss"]) for v in ok):
        rec["z_loss"] = mean("z_loss")
    for k in vals[0]:  # train/moe_rules.py's metrics: mtp_loss, moe/...
        if k.startswith(("moe/", "mtp_")):
            rec[k] = mean(k)
    return rec

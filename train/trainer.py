"""A training run: model and state on the mesh, resume, data, eval, checkpoints; `train` runs its loop
(train/loop.py: the clock and the eval / log / checkpoint / stop hooks)."""

from __future__ import annotations

import contextlib
import pathlib

import jax

from glm_jax import hostmem, storage
from glm_jax.model.transformer import param_count
from glm_jax.quant import load as quant_load
from glm_jax.sharding import axis_rules
from train import adapters as train_adapters
from train import data as data_lib
from train import dsa, moe_rules, optimizer, parallel, quant_base
from train import flops as flops_lib
from train import step as step_lib
from train.checkpointing import Checkpointer, TrainingStopped, gather_json
from train.config import TrainConfig, TrainConfigError
from train.loop import Clock, Loop, Stop
from train.metrics import Reporter, device_peak_flops
from train.model_setup import load_pretrained, model_config
from train.rl import dpo


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
    if tc.dsa.warmup:  # only the indexers train (train/dsa.py)
        frozen = jax.tree.map(lambda a, b: a or b, frozen, dsa.frozen(pshapes))
    tx = optimizer.make_optimizer(tc, pshapes, frozen)
    p_sh = parallel.param_shardings(cfg, model_shapes, mesh)
    p_sh = adapter.shardings(p_sh, mesh) if adapter else p_sh
    keep_ref = dpo.keeps_ref(tc, adapter)  # objective=dpo, full finetune: a frozen reference copy in the state
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx, keep_ref), pshapes)
    state_sh = {
        "step": parallel.replicated(mesh),
        "params": p_sh,
        "opt_state": parallel.like_params_shardings(abstract["opt_state"], pshapes, p_sh, mesh),
    }
    if keep_ref:
        state_sh[dpo.REF] = p_sh
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh)
    schedule = optimizer.make_schedule(tc, tc.warmup)
    fn = adapter.loss_params if adapter else None  # the model params the loss sees
    if tc.objective == "dpo":
        train_step = dpo.make_train_step(GLMModel(cfg), tx, tc, schedule, frozen, p_sh, fn, adapter)
    else:
        train_step = step_lib.make_train_step(
            GLMModel(cfg), tx, tc, schedule, frozen, grad_shardings=p_sh, params_fn=fn
        )
    lay = {"tx": tx, "frozen": frozen, "state_sh": state_sh, "abstract": abstract, "train_step": train_step}
    lay["keep_ref"] = keep_ref
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
        out = storage.as_path(tc.output_dir)  # a local folder or a gs:// URL (DESIGN §3.11)
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
                init = lambda p: step_lib.init_state(p, self.tx, lay["keep_ref"])  # noqa: E731
                self.state = jax.jit(init, out_shardings=self.state_sh)(params)
            else:
                init = lambda k: step_lib.init_state(init_params(cfg, k), self.tx, lay["keep_ref"])  # noqa: E731
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

    def next_batch(self, nan: bool = False) -> dict:
        """The next local batch (host numpy; `nan`: poisoned, for the debug_nan_steps test hook)."""
        return data_lib.to_device_dict(next(self.data), nan_at=nan)

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
    stop = Stop()
    # before Run starts the data pipeline, whose read threads would share the cores with a measured peak
    peak, peak_src = device_peak_flops(tc.peak_flops)
    clock = Clock()
    with clock.phase("startup"):
        run = Run(tc)
    if run.start_step:  # the startup was a restore
        clock.total["restore"], clock.total["startup"] = clock.total["startup"], 0.0
    rep = Reporter(tc.output_dir, tc.steps, run.start_step, tc.progress, tc.plot_every_seconds)
    flops = flops_lib.flops_per_token(run.cfg, tc.seq_len, mtp=tc.mtp_loss_weight > 0) * tc.batch_size * tc.seq_len
    loop = Loop(run, rep, clock, flops, peak)
    _announce(run, rep, loop, peak, peak_src)
    try:
        while loop.step < loop.last:
            loop.train_step()
            loop.log_if_due(loop.evaluate_if_due())
            if loop.skips.over():  # stop without saving: the last checkpoint stays the last good one
                break
            loop.checkpoint_if_due()
            if loop.stop_requested(stop):
                break
        if not loop.skips.over():
            loop.save()
    finally:  # each closes even when one before it raises (a bucket that refuses the last save)
        with contextlib.ExitStack() as closing:
            closing.callback(getattr(run.data, "close", lambda: None))
            closing.callback(stop.restore)
            closing.callback(rep.close)
            closing.callback(run.checkpointer.close)  # ExitStack runs callbacks last-in first: this one first
    if loop.skips.over():
        s = loop.skips
        raise TrainingStopped(
            f"{s.n} consecutive steps had a non-finite loss or gradient (steps {s.first}-{s.last}); "
            f"stopped. {run.checkpointer.last_good_text()}"
        )
    return {"step": loop.step, "loss": loop.last_loss, "output_dir": tc.output_dir}


def _announce(run, rep, loop, peak, peak_src) -> None:
    tc = run.tc
    if run.start_step >= loop.last:
        rep.say(
            f"{tc.output_dir} is already at step {run.start_step}: nothing to do (raise steps= to go on)", always=True
        )
    elif run.start_step:
        rep.say(f"resumed from {run.checkpointer.directory / str(run.start_step)} (step {run.start_step})")
    rep.say(
        f"model {tc.model}: {param_count(run.cfg) / 1e6:.1f}M params, mesh {dict(run.mesh.shape)} "
        f"on {run.mesh.devices.size} {jax.devices()[0].platform} devices, {jax.process_count()} process(es); "
        f"peak {peak / 1e9:.1f} GFLOP/s per device ({peak_src})"
        + ("; freed host memory kept for reuse (host_heap)" if hostmem.kept() else "")
    )

"""glm-train `objective=grpo` (DESIGN §3.12): each step samples `grpo.num_generations` completions per prompt
with glm-jax's own jitted KV-cache decoder (glm_jax/generate.py) on the very params being trained, scores them
with the `grpo.rewards` functions, normalises the rewards per group as TRL does, and applies
`grpo.num_iterations` updates of train.rl.grpo_loss with the sampling-time log-probs kept.

Written here rather than driving TRL's GRPOTrainer because rollout and update are jitted JAX functions on the
training mesh; every formula cites trl 1.16.0 (trl/trainer/grpo_trainer.py).

Determinism: the prompts of step s and the rollout's sampling key derive from (seed, s) only, so a run resumed
from its step-s checkpoint samples, scores and updates exactly as the uninterrupted run does.

Legend: B completions a step (batch_size), P prompts (B / G), G generations per prompt, Tp prompt width (left
padded), Tc completion width (max_new_tokens), V vocab.
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.config import TrainConfigError
from train.rl.losses import grpo_loss
from train.trainer import Run

SCALE_REWARDS = ("group", "batch", "none")
DATA_KEYS = {"source", "tokenizer"}
ROLLOUT_SALT = 0x6772706F  # "grpo": keeps the rollout keys apart from the init key PRNGKey(seed)


# ---------------------------------------------------------------- prompts
def read_records(source: str) -> list[dict]:
    """Records {"prompt": str or [messages], ...extra fields} from a .jsonl file or a folder of them, or the
    bundled toy task (`toy:add`, train/rl/toy.py)."""
    if source.startswith("toy:"):
        from train.rl import toy

        return toy.records(source[4:])
    p = pathlib.Path(source)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise TrainConfigError(f"data.source: {source}: no .jsonl file there")
    out = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainConfigError(f"data.source: {f}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), (str, list)):
                raise TrainConfigError(f"data.source: {f}:{n}: expected an object with a 'prompt' (str or messages)")
            out.append(rec)
    if not out:
        raise TrainConfigError(f"data.source: {source}: no records")
    return out


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


class Prompts:
    """The prompts of each step: global sample i = step·P + j is record perm_e[i mod N] of epoch e = i // N,
    perm_e drawn from (seed, e). Stateless beyond the step, so resuming needs nothing but the step."""

    def __init__(self, tc, per_step: int):
        d = dict(tc.data)
        other = sorted(k for k in d if k not in DATA_KEYS and d[k] is not None)
        if other:
            raise TrainConfigError(f"objective=grpo takes data.source and data.tokenizer; got data.{other[0]}")
        source = d.get("source")
        if not isinstance(source, str) or source in ("", "bundled"):
            raise TrainConfigError("objective=grpo needs data.source=<a .jsonl file or folder, or toy:add>")
        self.records = read_records(source)
        if source.startswith("toy:"):
            from train.rl.toy import ToyTokenizer

            self.tokenizer = ToyTokenizer()
        else:
            from train.sft_data import sft_tokenizer

            self.tokenizer = sft_tokenizer(tc)
        self.ids = [self.tokenizer.apply_chat_template(_messages(r["prompt"])) for r in self.records]
        self.width = max(len(x) for x in self.ids)  # one prompt width for the run: one compile
        room = tc.seq_len - tc.grpo.max_new_tokens
        if self.width > room:
            i = max(range(len(self.ids)), key=lambda k: len(self.ids[k]))
            raise TrainConfigError(
                f"data.source: record {i + 1} renders to {self.width} prompt tokens; seq_len {tc.seq_len} leaves "
                f"{room} after grpo.max_new_tokens {tc.grpo.max_new_tokens}"
            )
        self.seed, self.per_step, self.step = tc.seed, per_step, 0

    def draw(self, step: int) -> list[int]:
        N, out = len(self.records), []
        for i in range(step * self.per_step, (step + 1) * self.per_step):
            perm = np.random.default_rng([self.seed, i // N]).permutation(N)
            out.append(int(perm[i % N]))
        return out

    def get_state(self) -> dict:
        return {"grpo_prompts": len(self.records)}

    def set_state(self, state) -> None:
        if state.get("grpo_prompts") != len(self.records):
            raise TrainConfigError(
                f"the checkpoint's run drew from {state.get('grpo_prompts')} prompts, data.source now holds "
                f"{len(self.records)}; resume with the same data"
            )


# ---------------------------------------------------------------- advantages (host numpy, as TRL in torch)
def _nanstd(x, axis=None):
    """trl/trainer/utils.py nanstd: Bessel-corrected, NaNs ignored."""
    n = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    mean = np.nanmean(x, axis=axis, keepdims=True)
    var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True) * np.where(n > 1, n / np.maximum(n - 1, 1), np.nan)
    return np.sqrt(np.squeeze(var, axis=axis) if axis is not None else var.reshape(()))


def advantages(rewards_per_func, weights, G: int, scale_rewards: str):
    """(advantages [B], rewards [B]): grpo_trainer.py:2759-2790 (sum_then_normalize) and the zero advantage of
    unscorable completions (every reward None)."""
    unscorable = np.all(np.isnan(rewards_per_func), axis=1)
    rewards = np.nansum(rewards_per_func * np.asarray(weights)[None], axis=1)
    rewards[unscorable] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-None group: its mean is NaN, made 0 below
        mean = np.repeat(np.nanmean(rewards.reshape(-1, G), axis=1), G)
        if scale_rewards in ("group", "none"):
            std = np.repeat(_nanstd(rewards.reshape(-1, G), axis=1), G) if G > 1 else np.zeros_like(rewards)
        else:
            std = np.broadcast_to(_nanstd(rewards), rewards.shape)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    adv = np.where(unscorable | np.isnan(adv), 0.0, adv)
    return adv.astype(np.float32), rewards


def call_rewards(fns, prompts, completions, fields: dict) -> np.ndarray:
    """[B, F] float64 with NaN for None, one column per reward function (grpo_trainer.py _calculate_rewards)."""
    cols = []
    for fn in fns:
        out = fn(prompts=prompts, completions=completions, **fields)
        if len(out) != len(completions):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)} returned {len(out)} values for {len(completions)}")
        cols.append([np.nan if v is None else float(v) for v in out])
    return np.asarray(cols, np.float64).T


# ---------------------------------------------------------------- the jitted pieces
def token_logps(module, params, seq_BT, real_BT, Tp: int, temperature: float):
    """log p(token t | tokens < t) for the completion tokens seq[:, Tp:], logits divided by the sampling
    temperature as TRL does: [B, Tc] float32."""
    from glm_jax.model.masks import default_positions

    pos = default_positions(module.cfg, seq_BT, real_BT)
    logits = module.apply({"params": params}, seq_BT, real_BT, pos)[:, Tp - 1 : -1] / temperature
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, seq_BT[:, Tp:, None], axis=-1)[..., 0]


def completion_mask(new_BT, eos_ids):
    """1 up to and including the first end token (grpo_trainer.py: `sequence_indices <= eos_idx`)."""
    is_eos = jnp.any(new_BT[..., None] == eos_ids, axis=-1)
    first = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), new_BT.shape[1])
    return (jnp.arange(new_BT.shape[1])[None] <= first[:, None]).astype(jnp.float32)


class GRPO:
    """The rollout and update functions of a Run, jitted on its mesh."""

    def __init__(self, run: Run):
        from glm_jax.generate import _decode
        from glm_jax.model.masks import default_allowed, default_positions
        from train import optimizer
        from train.rl.rewards import load_reward

        tc, g = run.tc, run.tc.grpo
        self.run, self.tc, self.g = run, tc, g
        try:
            self.fns = [load_reward(s) for s in g.rewards]
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
        self.weights = list(g.reward_weights) or [1.0] * len(self.fns)
        tok = run.data.tokenizer
        self.eos = jnp.asarray(tok.stop_token_ids, jnp.int32)
        self.pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.stop_token_ids[0])
        module, cfg = run.module, run.cfg
        adapter = run.adapter
        to_model = adapter.loss_params if adapter else (lambda p: p)
        Tp, temp = run.data.width, float(g.temperature)
        eos, pad = self.eos, self.pad

        def rollout(params, ids_BT, mask_BT, rng):
            pos = default_positions(cfg, ids_BT, mask_BT)
            allowed = default_allowed(cfg, ids_BT, mask_BT)
            new, _ = _decode(
                module, to_model(params), ids_BT, mask_BT, pos, allowed, eos, jnp.int32(pad), rng,
                jnp.float32(temp), jnp.float32(g.top_p), max_new=g.max_new_tokens, do_sample=True, top_k=0,
            )  # fmt: skip
            return new

        self.rollout_fn = jax.jit(rollout)
        self.logp_fn = jax.jit(lambda p, s, r: token_logps(module, to_model(p), s, r, Tp, temp))
        # the reference (beta > 0): the base without the adapter (LoRA), else the frozen starting params
        self.ref_fn, self.ref_params = None, None
        if g.beta != 0.0:
            if adapter is not None and adapter.kind != "lora":
                raise TrainConfigError("grpo.beta > 0 with P-Tuning: no reference model; use LoRA, full, or beta=0")
            if adapter is not None:
                self.ref_fn = jax.jit(lambda p, s, r: token_logps(module, adapter.model_part(p), s, r, Tp, temp))
            else:
                self.ref_params = start_params(run)
                self.ref_fn = self.logp_fn
        frozen, tx, clip = run.frozen, run.tx, tc.grad_clip
        schedule = optimizer.make_schedule(tc, tc.warmup)
        beta, eps = float(g.beta), float(g.epsilon)
        eps_high = float(g.epsilon_high) or eps

        def loss_fn(q, b):
            """(the step's GRPO loss, the policy's log-probs [B, Tc]) for params q and a batch b."""
            q = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, q, frozen)
            logp = token_logps(module, to_model(q), b["seq"], b["real"], Tp, temp)
            loss = grpo_loss(
                logp, b.get("old_logp"), b.get("ref_logp"), b["adv"], b["mask"], beta=beta, epsilon=eps,
                epsilon_high=eps_high, loss_type=g.loss_type, max_completion_length=g.max_new_tokens,
            )  # fmt: skip
            return loss, logp

        self.loss_fn = loss_fn

        def update(state, b):
            from train.step import _float_grad

            params, opt_state = state["params"], state["opt_state"]
            (loss, logp), grads = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)(params, b)
            grads = jax.tree.map(_float_grad, grads, params)
            grad_norm = optax.tree.norm(grads)
            if clip > 0:
                grads = jax.tree.map(lambda x: x * jnp.minimum(1.0, clip / (grad_norm + 1e-6)), grads)
            lr = schedule(state["step"] // g.num_iterations)  # the schedule counts steps, not updates
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

            def apply(params, opt_state):
                updates, new_opt = tx.update(grads, opt_state, params)
                new = jax.tree.map(lambda p, u, f: p if f else (p - lr * u).astype(p.dtype), params, updates, frozen)
                return new, new_opt

            new_params, new_opt = jax.lax.cond(ok, apply, lambda p, o: (p, o), params, opt_state)
            m = b["mask"]
            n = jnp.maximum(jnp.sum(m), 1.0)
            old = b.get("old_logp", jax.lax.stop_gradient(logp))
            ratio = jnp.exp(logp - old)
            adv = b["adv"][:, None]
            # grpo_trainer.py:3180-3200: the share of tokens whose ratio the clip holds (low side: adv < 0)
            clipped = ((ratio < 1 - eps) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
            metrics = {
                "loss": loss,
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "clip_ratio": jnp.sum(clipped * m) / n,
                "skipped": 1 - ok.astype(jnp.int32),
            }
            if "ref_logp" in b:  # grpo_trainer.py:3098-3102 and its masked mean for the log
                d = b["ref_logp"] - logp
                metrics["kl"] = jnp.sum((jnp.exp(d) - d - 1) * m) / n
            new_state = {"step": state["step"] + ok.astype(jnp.int32), "params": new_params, "opt_state": new_opt}
            return new_state, metrics

        self.update_fn = jax.jit(update, donate_argnums=(0,))

    # ------------------------------------------------------------ one step
    def sample(self, step: int) -> dict:
        """Rollouts and rewards of step `step` (0-based): the batch the updates read, and what to log."""
        run, g, tok = self.run, self.g, self.run.data.tokenizer
        G = g.num_generations
        picks = run.data.draw(step)
        recs = [run.data.records[i] for i in picks for _ in range(G)]
        W = run.data.width
        ids = np.full((len(recs), W), self.pad, np.int32)
        real = np.zeros((len(recs), W), np.int32)
        for r, i in enumerate(i for i in picks for _ in range(G)):
            x = run.data.ids[i]
            ids[r, W - len(x) :], real[r, W - len(x) :] = x, 1
        rng = jax.random.fold_in(jax.random.PRNGKey(self.tc.seed ^ ROLLOUT_SALT), step)
        with run.ctx():
            new = np.asarray(self.rollout_fn(run.state["params"], jnp.asarray(ids), jnp.asarray(real), rng))
        mask = np.asarray(completion_mask(jnp.asarray(new), self.eos))
        texts = [tok.decode(new[r][mask[r] > 0], skip_special_tokens=True) for r in range(len(recs))]
        conv = not isinstance(recs[0]["prompt"], str)
        completions = [[{"role": "assistant", "content": t}] if conv else t for t in texts]
        prompts = [r["prompt"] for r in recs]
        fields = {k: [r.get(k) for r in recs] for k in sorted({k for r in recs for k in r} - {"prompt"})}
        try:
            per_func = call_rewards(self.fns, prompts, completions, fields)
        except Exception as e:
            raise TrainConfigError(f"grpo.rewards: a reward function failed at step {step + 1}: {e!r}") from None
        adv, rewards = advantages(per_func, self.weights, G, g.scale_rewards)
        seq = np.concatenate([ids, new], axis=1)
        batch = {"seq": seq, "real": np.concatenate([real, np.ones_like(new)], 1), "mask": mask, "adv": adv}
        return {"batch": batch, "texts": texts, "rewards": rewards, "per_func": per_func}

    def updates(self, batch: dict) -> list[dict]:
        run, g = self.run, self.g
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        with run.ctx():
            if self.ref_fn is not None:
                b["ref_logp"] = self.ref_fn(
                    self.ref_params if self.ref_params is not None else run.state["params"], b["seq"], b["real"]
                )
            if g.num_iterations > 1:  # grpo_trainer.py:2700-2712: the sampling policy's log-probs, kept
                b["old_logp"] = self.logp_fn(run.state["params"], b["seq"], b["real"])
            out = []
            for _ in range(g.num_iterations):
                run.state, m = self.update_fn(run.state, b)
                out.append(m)
        return jax.device_get(out)


def start_params(run: Run):
    """The run's starting params (the reference model of a full-parameter run): the pretrained checkpoint, or
    the seed's init: the same at step 0 and on a resume."""
    from glm_jax.model.transformer import init_params
    from train import quant_base
    from train.model_setup import load_pretrained

    tc, sh = run.tc, run.state_sh["params"]
    if run.pretrained:
        loaded = load_pretrained(run.pretrained, run.cfg, tc.model_overrides, quant_base.load_kwargs(tc))
        with run.ctx():
            return jax.device_put(loaded, sh)
    with run.ctx():
        return jax.jit(lambda k: init_params(run.cfg, k), out_shardings=sh)(jax.random.PRNGKey(tc.seed))


class GRPORun(Run):
    """A train.trainer.Run whose data are prompts (the model, state, checkpoints and resume are SFT's)."""

    def setup_data(self):
        tc = self.tc
        if jax.process_count() > 1:
            raise TrainConfigError("objective=grpo runs on one process for now (the rewards run on the host)")
        if tc.grad_accum != 1:
            raise TrainConfigError("objective=grpo: grad_accum must be 1 (each update takes the whole step)")
        self.data = Prompts(tc, tc.batch_size // tc.grpo.num_generations)
        self.eval_data = None
        if self.data.tokenizer.vocab_size > self.cfg.vocab_size:
            raise TrainConfigError(
                f"the tokenizer has {self.data.tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{self.cfg.vocab_size}"
            )
        if self.meta is not None:
            self.data.set_state(self.meta["data_state"])


# ---------------------------------------------------------------- the loop
def train(tc) -> dict:
    """glm-train objective=grpo: rollouts, rewards and updates each step; checkpoints, SIGTERM and resume as
    train.trainer.train. output_dir/rollouts.jsonl records each step's completions and rewards."""
    from train.checkpointing import TrainingStopped
    from train.loop import Clock, Stop
    from train.metrics import Reporter
    from train.trainer import use_compilation_cache

    use_compilation_cache(tc.compilation_cache_dir)
    stop, clock = Stop(), Clock()
    with clock.phase("startup"):
        run = GRPORun(tc)
        grpo = GRPO(run)
    start = run.start_step
    rep = Reporter(tc.output_dir, tc.steps, start, tc.progress, tc.plot_every_seconds)
    log = _Rollouts(pathlib.Path(tc.output_dir) / "rollouts.jsonl", start)
    last = min(tc.steps, tc.stop_at or tc.steps)
    if start:
        rep.say(f"resumed from {run.checkpointer.directory / str(start)} (step {start})")
    step, skipped, rec = start, 0, {}
    try:
        while step < last:
            t0 = time.perf_counter()
            s = grpo.sample(step)
            t1 = time.perf_counter()
            ms = grpo.updates(s["batch"])
            t2 = time.perf_counter()
            step += 1
            skipped = skipped + 1 if any(int(m["skipped"]) for m in ms) else 0
            r, mask = s["rewards"], s["batch"]["mask"]
            rec = {
                "step": step,
                "loss": float(np.mean([float(m["loss"]) for m in ms])),
                "reward": float(np.nanmean(r)) if np.any(~np.isnan(r)) else None,
                "reward_std": float(np.nanstd(r, ddof=1)) if np.sum(~np.isnan(r)) > 1 else None,
                "clip_ratio": float(np.mean([float(m["clip_ratio"]) for m in ms])),
                "completion_length": float(np.mean(mask.sum(1))),
                "grad_norm": float(ms[-1]["grad_norm"]),
                "learning_rate": float(ms[-1]["learning_rate"]),
                "rollout_seconds": t1 - t0,
                "update_seconds": t2 - t1,
                "skipped_steps": sum(int(m["skipped"]) for m in ms),
            }
            if "kl" in ms[0]:
                rec["kl"] = float(np.mean([float(m["kl"]) for m in ms]))
            for j, fn in enumerate(grpo.fns):  # TRL's rewards/<name>/mean
                col = s["per_func"][:, j]
                rec[f"rewards/{getattr(fn, '__name__', j)}"] = (
                    float(np.nanmean(col)) if np.any(~np.isnan(col)) else None
                )
            log.write(step, s, ms)
            if step % tc.log_every == 0 or step == last:
                rep.log({**rec, **clock.metrics()})
            rep.advance()
            if tc.max_skipped_steps and skipped >= tc.max_skipped_steps:
                break
            if step % tc.checkpoint_every == 0:
                run.save(step)
            run.checkpointer.poll()
            if stop.requested(step):
                rep.say(f"SIGTERM: saving a checkpoint at step {step} and stopping", always=True)
                break
        if not (tc.max_skipped_steps and skipped >= tc.max_skipped_steps) and step > start:
            run.save(step)
    finally:
        run.checkpointer.close()
        rep.close()
        log.close()
        stop.restore()
    if tc.max_skipped_steps and skipped >= tc.max_skipped_steps:
        raise TrainingStopped(f"{skipped} consecutive GRPO steps had a non-finite loss or gradient; stopped")
    return {"step": step, "loss": rec.get("loss"), "reward": rec.get("reward"), "output_dir": tc.output_dir}


class _Rollouts:
    """output_dir/rollouts.jsonl: one line a step (completions, rewards, the update losses); a resumed run keeps
    the lines of the steps its checkpoint covers."""

    def __init__(self, path: pathlib.Path, start: int):
        self.main = jax.process_index() == 0
        if not self.main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start]
        path.write_text("".join(x + "\n" for x in kept))
        self.fh = open(path, "a")  # noqa: SIM115 - kept open for the run

    def write(self, step, s, ms):
        if not self.main:
            return
        rewards = [None if np.isnan(v) else float(v) for v in s["rewards"]]
        losses = [float(m["loss"]) for m in ms]
        self.fh.write(json.dumps({"step": step, "completions": s["texts"], "rewards": rewards, "losses": losses}))
        self.fh.write("\n")
        self.fh.flush()

    def close(self):
        if self.main:
            self.fh.close()

"""glm-eval: evaluate a checkpoint folder (any family; glm-convert to-jax output; a glm-train run dir).

    glm-eval PATH --tasks hellaswag,lambada_openai [--num-fewshot N] [--limit N] [--include-path DIR]
    glm-eval PATH --perplexity FILE [--max-len 1024] [--stride 512] [--lambada]
    glm-eval PATH --needle [--lengths 256,512,1024] [--depths 0,0.25,0.5,0.75,1] [--out DIR]

Lengths left to their defaults (--max-length, --max-len, --lengths) follow the model: a model with fewer learned
positions (the original GLM's max_sequence_length) gets windows and prompts that fit its position table. A
length given past that table is bad input: its logits would be NaN.

--tasks runs lm_eval.simple_evaluate with model "glm-jax" (glm_jax.eval.harness). Exit status: 0 success;
2 bad input (a missing or unreadable checkpoint, file or task, a bad argument), with one `error:` line on
stderr; 1 an internal error.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import pathlib
import sys
import traceback

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad input: printed as one `error:` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glm-eval", description="Evaluate a GLM checkpoint: lm-eval tasks, perplexity, needle.")
    p.add_argument("path", help="checkpoint folder")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tasks", help="comma-separated lm-eval task names (or globs)")
    mode.add_argument("--perplexity", metavar="FILE", help="perplexity of a UTF-8 text file")
    mode.add_argument("--needle", action="store_true", help="needle-in-a-haystack recall grid")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder, when PATH has none (a pretraining run)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", metavar="FILE", help="also write the results as JSON here")
    g = p.add_argument_group("lm-eval tasks")
    g.add_argument("--num-fewshot", type=int)
    g.add_argument("--limit", type=float, help="examples per task (a fraction when < 1)")
    g.add_argument("--include-path", help="folder of extra task YAML files")
    g.add_argument("--apply-chat-template", action="store_true")
    g.add_argument("--max-length", type=int, help="context length (default: the model's)")
    g.add_argument("--log-samples", action="store_true", help="keep per-request samples in --output")
    g = p.add_argument_group("perplexity")
    g.add_argument(
        "--max-len", type=int, help="window length in tokens (default 1024, or the model's learned positions)"
    )
    g.add_argument("--stride", type=int, help="window start every STRIDE tokens (default max-len/2)")
    g.add_argument("--lambada", action="store_true", help="FILE has one passage a line: last-word accuracy")
    g = p.add_argument_group("needle")
    g.add_argument(
        "--lengths", help="comma-separated prompt lengths in tokens (default 256,512,1024, those that fit the model)"
    )
    g.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--out", default="needle", help="folder for needle.json and needle.png")
    return p


def _numbers(text: str, kind, name: str) -> list:
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not vals:
        raise UsageError(f"--{name} is empty")
    return vals


def check_args(a) -> None:
    for name in ("batch_size", "max_len", "max_new_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.stride is not None and a.max_len is not None and not 1 <= a.stride < a.max_len:
        raise UsageError(f"--stride must satisfy 1 <= stride < --max-len ({a.max_len}), got {a.stride}")
    if a.stride is not None and a.stride < 1:
        raise UsageError(f"--stride must be at least 1, got {a.stride}")
    if a.max_length is not None and a.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {a.max_length}")
    if a.lambada and not a.perplexity:
        raise UsageError("--lambada needs --perplexity FILE")
    if a.needle:
        if a.lengths is not None and min(_numbers(a.lengths, int, "lengths")) < 8:
            raise UsageError("--lengths must all be at least 8 tokens")
        if not all(0 <= d <= 1 for d in _numbers(a.depths, float, "depths")):
            raise UsageError("--depths must all lie in [0, 1]")
    if a.perplexity and not pathlib.Path(a.perplexity).is_file():
        raise UsageError(f"{a.perplexity}: text file not found")
    if a.include_path and not pathlib.Path(a.include_path).is_dir():
        raise UsageError(f"{a.include_path}: task folder not found")
    from glm_jax import storage

    if a.tokenizer and not storage.as_path(a.tokenizer).exists():
        raise UsageError(f"{a.tokenizer}: tokenizer folder not found")
    if not storage.as_path(a.path).is_dir():
        raise UsageError(f"{a.path}: model folder not found")


def _load(a):
    import glm_jax
    from glm_jax.eval.tokenizer import EvalTokenizer

    lm = glm_jax.from_pretrained(a.path, dtype=a.dtype)
    eos = list(lm.config.eos_token_id)
    return lm, EvalTokenizer(a.tokenizer or a.path, fallback_eos=eos[0] if eos else None)


def run_tasks(a) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from glm_jax.eval.harness import GLMLM

    tm = TaskManager(include_path=a.include_path)
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    found = tm.match_tasks(names)
    missing = [n for n in names if not fnmatch.filter(found, n)]
    if not names or missing:
        raise UsageError(f"unknown lm-eval task(s): {', '.join(missing) or '(none given)'}")
    model = GLMLM(
        pretrained=a.path, dtype=a.dtype, batch_size=a.batch_size, max_length=a.max_length, tokenizer=a.tokenizer
    )
    res = lm_eval.simple_evaluate(
        model=model,
        tasks=found,
        num_fewshot=a.num_fewshot,
        limit=int(a.limit) if a.limit and a.limit >= 1 else a.limit,
        task_manager=tm,
        apply_chat_template=a.apply_chat_template,
        log_samples=a.log_samples,
    )
    from lm_eval.utils import make_table

    print(make_table(res))
    if not a.log_samples:
        res.pop("samples", None)
    return res


def run_perplexity(a) -> dict:
    from glm_jax.eval import perplexity

    lm, tok = _load(a)
    if a.lambada:
        out = perplexity.lambada(lm, tok, a.perplexity, max_len=a.max_len, batch_size=a.batch_size)
    else:
        out = perplexity.file_perplexity(
            lm, tok, a.perplexity, max_len=a.max_len, stride=a.stride, batch_size=a.batch_size
        )
    print(json.dumps(out, indent=1))
    return out


def run_needle(a) -> dict:
    from glm_jax.eval import needle

    lm, tok = _load(a)
    res = needle.run_grid(
        lm,
        tok,
        None if a.lengths is None else _numbers(a.lengths, int, "lengths"),
        _numbers(a.depths, float, "depths"),
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        chat=a.chat,
    )
    js, png = needle.write_report(res, a.out)
    print(f"mean recall {res['mean_recall']:.3f} over {len(res['depths'])} depths x {len(res['lengths'])} lengths")
    print(f"wrote {js} and {png}")
    return res


def main(argv=None) -> int:
    from glm_jax.platform import use_cpu_when_no_accelerator

    use_cpu_when_no_accelerator()
    try:
        a = build_parser().parse_args(argv)
        check_args(a)
        try:
            res = run_tasks(a) if a.tasks else run_perplexity(a) if a.perplexity else run_needle(a)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # ConfigError, CheckpointFormatError too
            msg = str(e).strip("'\"")
            raise UsageError(msg if a.path in msg else f"{a.path}: {msg}") from e
        if a.output:
            pathlib.Path(a.output).write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
        return 0
    except UsageError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc(file=sys.stderr)
        print("error: internal error (see the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

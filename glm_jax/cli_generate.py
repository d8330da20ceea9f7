"""glm-generate: answer one prompt, or chat interactively, with a GLM checkpoint.

    glm-generate PATH --prompt TEXT [--max-new-tokens N] [--do-sample --temperature T --top-k K --top-p P]
    glm-generate PATH --chat [--system TEXT] [--tools FILE]      # lines from stdin; /reset, /exit or EOF

Tokens are printed as they decode (glm_jax.stream). With --tools the reply is printed once it is complete:
a tool call as one JSON line {"name": ..., "parameters": ...} (GLM-4.5: the text, then one line per call),
anything else as text.
Exit codes: 0 ok; 2 bad input (one stderr line starting "error:"); 1 internal error.
Before anything is allocated, a prompt is checked against a learned position table (the original GLM) and the KV
cache + prefill attention against the machine's available memory (exit 2; in --chat the turn is refused and the
chat goes on). Invalid UTF-8 in --prompt, --system or on stdin is replaced with U+FFFD, with a warning line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import traceback

from glm_jax.chat_turns import (
    SYSTEM_FORMATS,
    UsageError,
    format_response,
    next_history,
    prompt_ids,
    read_tools,
    system_messages,
)
from glm_jax.errors import InputError
from glm_jax.platform import use_cpu_when_no_accelerator

DTYPES = ("float32", "bfloat16", "float16")
# what decodes when neither the command line nor generation_config.json says: greedy
SAMPLING = {"do_sample": (bool, False), "temperature": (float, 1.0), "top_k": (int, 0), "top_p": (float, 1.0)}


class TurnError(UsageError):
    """A prompt that does not fit (the learned positions, the machine's memory): --prompt exits 2, --chat says so
    and goes on with its history."""


def clean_text(text, where: str, err) -> str:
    """`text` (str, possibly surrogate-escaped bytes from argv or stdin, or bytes) with invalid UTF-8 replaced by
    U+FFFD, and a one-line warning on `err` when anything was replaced."""
    from glm_jax.inputs import decode_text

    out, bad = decode_text(text)
    if bad:
        print(f"warning: {where}: {bad} invalid UTF-8 byte sequence(s) replaced with U+FFFD", file=err, flush=True)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line instead of argparse's usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from glm_jax.tokenizers import CHAT_FORMATS

    p = _Parser(prog="glm-generate", description="Generate text with a GLM checkpoint (any family).")
    p.add_argument("path", help="checkpoint folder (Hugging Face PyTorch/safetensors, or glm-convert to-jax output)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="answer this one prompt and exit")
    mode.add_argument("--chat", action="store_true", help="interactive chat on stdin (/reset, /exit)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    # sampling left unset follows PATH's generation_config.json, as transformers' generate does (SAMPLING)
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    p.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding, whatever PATH says")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: PATH)")
    p.add_argument("--chat-format", choices=CHAT_FORMATS, help="prompt format (default: inferred from the tokenizer)")
    p.add_argument("--system", metavar="TEXT", help="system message (chatglm3, glm4, glm4_5)")
    p.add_argument(
        "--tools", metavar="FILE", help="JSON list of function schemas offered to the model (chatglm3, glm4, glm4_5)"
    )
    p.add_argument(
        "--raw", action="store_true", help="no chat template: the prompt as-is, with the family's prefix tokens"
    )
    p.add_argument("--show-prompt-ids", action="store_true", help="debug: print each prompt's token ids to stderr")
    return p


def check_args(a) -> None:
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    check_sampling(a)
    if a.raw and (a.chat or a.system is not None or a.tools):
        raise UsageError("--raw works with --prompt only, without --system or --tools")


def check_sampling(a, where: str = "") -> None:
    """UsageError for a sampling setting out of range (unset ones pass): `where` names the file it came from, else
    the message names the flag."""

    def name(key: str) -> str:
        return f"{where}{key}" if where else "--" + key.replace("_", "-")

    if a.temperature is not None and not a.temperature > 0:
        raise UsageError(f"{name('temperature')} must be positive, got {a.temperature}")
    if a.top_k is not None and a.top_k < 0:
        raise UsageError(f"{name('top_k')} must be 0 (off) or positive, got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UsageError(f"{name('top_p')} must be in (0, 1], got {a.top_p}")


def sampling_defaults(a) -> None:
    """Fill the sampling settings the command line left unset from PATH's generation_config.json (a model's own
    decoding defaults, which transformers' generate applies too; glm-train writes one for a model it trains from
    scratch), then from SAMPLING."""
    from glm_jax import storage

    f = storage.as_path(a.path) / "generation_config.json"  # a local folder or a gs:// run alike
    gen = {}
    if storage.exists(f) and not storage.isdir(f):
        try:
            gen = json.loads(storage.read_bytes(f).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(gen, dict):
            raise UsageError(f"{f}: expected a JSON object")
    for key, (kind, default) in SAMPLING.items():
        if getattr(a, key) is None:
            value = gen.get(key, default)
            if value is None:
                value = default
            ok = (int, float) if kind is float else kind
            if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool)):
                raise UsageError(f"{f}: {key} must be {'a boolean' if kind is bool else 'a number'}, got {value!r}")
            setattr(a, key, kind(value))
    check_sampling(a, f"{f}: ")


def check_model_folder(path: pathlib.Path) -> None:
    """Cheap checks (config.json, weight files) before the tokenizer and the weights are read."""
    from glm_jax.checkpoint.files import find_weight_files
    from glm_jax.checkpoint.hf import config_from_folder
    from glm_jax.checkpoint.orbax import is_jax_checkpoint

    if not path.is_dir():
        raise UsageError(f"{path}: model folder not found")
    if (path / "glm_jax.json").is_file():
        return
    config_from_folder(path)

    if not is_jax_checkpoint(path):  # a glm-train run keeps its weights under checkpoints/
        find_weight_files(path)


class Session:
    """The loaded model and tokenizer with the generation options; `reply` runs one turn."""

    def __init__(self, lm, tok, args, out=None, err=None):
        self.lm, self.tok, self.args = lm, tok, args
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.stops = sorted(set(tok.stop_token_ids) | set(lm.config.eos_token_id))
        self.tools = None
        self.system: list[dict] = []

    def _check_ids(self, ids: list[int]) -> None:
        vocab = self.lm.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(
                f"{self.args.tokenizer or self.args.path}: the tokenizer gives id {bad[0]}, outside the "
                f"model's vocabulary of {vocab} ids; does the tokenizer belong to {self.args.path}?"
            )

    def _budget(self, ids: list[int]) -> int:
        """max_new_tokens for this prompt: cut to the learned positions left (with a warning); TurnError when the
        prompt alone fills them, or the KV cache and the prefill's attention need more memory than is available."""
        from glm_jax.inputs import InputError, check_memory, position_limit
        from glm_jax.stream import cache_plan

        n, new, limit = len(ids), self.args.max_new_tokens, position_limit(self.lm.config)
        if limit is not None and n >= limit:
            raise TurnError(
                f"the prompt has {n} tokens but the model has {limit} learned positions (max_sequence_length), "
                f"so at most {limit - 1} prompt tokens fit"
            )
        if limit is not None and n + new > limit:
            print(
                f"warning: --max-new-tokens {new} cut to {limit - n}: the prompt has {n} tokens and the model "
                f"{limit} learned positions",
                file=self.err,
                flush=True,
            )
            new = limit - n
        try:
            check_memory(self.lm.config, 1, *cache_plan(n, new), what=f"a prompt of {n} tokens + {new} new tokens")
        except InputError as e:
            raise TurnError(str(e)) from None
        return new

    def reply(self, ids: list[int], stream: bool) -> str:
        """Decode after `ids`, printing pieces as they come when `stream`; returns the reply text."""
        from glm_jax.stream import TextStream, stream_generate

        self._check_ids(ids)
        max_new = self._budget(ids)
        if self.args.show_prompt_ids:
            print("prompt_ids: " + json.dumps(ids), file=self.err, flush=True)
        a = self.args
        ts = TextStream(self.tok)
        stop = None
        for t in stream_generate(
            self.lm,
            ids,
            max_new,
            a.do_sample,
            a.temperature,
            a.top_k,
            a.top_p,
            a.seed,
            stop_token_ids=self.stops,
        ):
            if t in self.stops:
                stop = t
                break
            piece = ts.push(t)
            if stream and piece:
                self.out.write(piece)
                self.out.flush()
        text = self.tok.decode(ts.ids)
        if not text.strip():  # say why nothing shows (an undertrained model often ends or emits blanks at once)
            why = f"ended with stop token {stop}" if stop is not None else f"reached --max-new-tokens {max_new}"
            print(f"note: the reply is empty: {len(ts.ids)} token(s) of blank text, then it {why}", file=self.err)
        return text

    def answer(self, messages: list[dict] | None, raw_text: str | None = None) -> str:
        """One turn: print the reply (streamed, or formatted at the end with --tools); return its text."""
        streaming = not self.tools
        text = self.reply(prompt_ids(self.tok, messages, raw_text), stream=streaming)
        if not streaming:
            self.out.write(format_response(self.tok, text, self.system))
        self.out.write("\n")
        self.out.flush()
        return text

    def chat(self, stdin) -> None:
        history: list[dict] = []
        lineno = 0
        tty = stdin.isatty()
        if tty:
            print("glm-generate chat: /reset clears the history, /exit or Ctrl-D quits", file=self.err)
        while True:
            if tty:
                self.out.write(">>> ")
                self.out.flush()
            buf = getattr(stdin, "buffer", None)  # bytes, so that invalid UTF-8 is replaced rather than fatal
            line = buf.readline() if buf is not None else stdin.readline()
            if not line:
                break
            lineno += 1
            text = clean_text(line, f"stdin line {lineno}", self.err).strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                history = []
                print("(history cleared)", file=self.err, flush=True)
                continue
            messages = self.system + history + [{"role": "user", "content": text}]
            try:
                reply = self.answer(messages)
            except TurnError as e:
                print(f"warning: {e}; this turn was not sent (/reset clears the history)", file=self.err, flush=True)
                continue
            history = next_history(self.tok, messages, reply)[len(self.system) :]


def load(args):
    """(model, tokenizer, tools) with every bad-input failure turned into UsageError."""
    from glm_jax import storage
    from glm_jax.config import ConfigError
    from glm_jax.tokenizers import load_tokenizer

    path = storage.as_path(args.path)
    try:
        check_model_folder(path)
    except (ConfigError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    tok_dir = args.tokenizer or args.path
    try:
        tok = load_tokenizer(tok_dir, chat_format=args.chat_format)
    except (ValueError, OSError) as e:
        raise UsageError(f"tokenizer: {e}") from None
    tools = read_tools(args.tools, tok.chat_format) if args.tools else None
    if tools and tok.chat_format not in SYSTEM_FORMATS:
        raise UsageError(
            f"--tools needs the chatglm3, glm4 or glm4_5 chat format; this tokenizer's format is {tok.chat_format}"
        )
    import glm_jax

    try:
        lm = glm_jax.from_pretrained(path, dtype=args.dtype)
    except (ConfigError, ValueError, OSError, KeyError) as e:
        msg = str(e)
        raise UsageError(msg if str(path) in msg else f"{path}: cannot load the model: {msg}") from None
    return lm, tok, tools


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    use_cpu_when_no_accelerator()  # before JAX starts: no libtpu probing on a machine without a TPU
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        for name in ("prompt", "system"):
            if getattr(args, name) is not None:
                setattr(args, name, clean_text(getattr(args, name), f"--{name}", stderr))
        sampling_defaults(args)
        lm, tok, tools = load(args)
        session = Session(lm, tok, args, stdout, stderr)
        session.tools = tools
        session.system = system_messages(tok, args.system, tools)
        if args.chat:
            session.chat(stdin)
        elif args.raw:
            session.answer(None, raw_text=args.prompt)
        else:
            session.answer(session.system + [{"role": "user", "content": args.prompt}])
        return 0
    except (UsageError, InputError) as e:
        print(f"error: {e}".splitlines()[0], file=stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("", file=stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        return 0
    except Exception:
        traceback.print_exc(file=stderr)
        print("error: internal error (see the traceback above)", file=stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

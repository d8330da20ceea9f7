"""Perplexity over a text file at any sequence length, and LAMBADA-style last-word accuracy.

Stride rule (the sliding window of Hugging Face's perplexity guide): the text's tokens t_0..t_{n-1} (after an
optional unscored prefix such as BOS) are cut into windows [b, e) with b = 0, s, 2s, ... and
e = min(b + max_len, n), stopping after the window that reaches n. Window i scores the tokens in
[e_{i-1}, e) (the first window: all but its first token, or all of them after a prefix), conditioned on every
earlier token of the window. So each token is scored exactly once, and every token after the first window
sees at least max_len - stride tokens of context; stride = max_len - 1 is the fastest, stride 1 the most
context. Stride must satisfy 1 <= stride < max_len. The 2-D position families (glm, chatglm) score each window
in GLM's LM layout (context [gMASK] | <sop> scored tokens), whose two extra tokens take one place of max_len.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

from glm_jax.eval import scoring

DEFAULT_MAX_LEN = 1024
RULE = "sliding windows of max_len tokens, start every stride tokens; each token scored once with all earlier window tokens as context"  # noqa: E501


def stride_windows(n: int, max_len: int, stride: int, first_scored: int = 1) -> list[tuple[int, int, int]]:
    """(begin, score_from, end) per window, as described in the module docstring. Tokens before `first_scored`
    are context only (1: the first token has nothing to condition on; the prefix length when there is one)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if not 1 <= stride < max_len:
        raise ValueError(f"stride must satisfy 1 <= stride < max_len={max_len}, got {stride}")
    out, prev_end, begin = [], 0, 0
    while prev_end < n:
        end = min(begin + max_len, n)
        start = max(prev_end, first_scored, begin + 1)
        if start < end:
            out.append((begin, start, end))
        prev_end = end
        begin += stride
    return out


def perplexity(
    lm,
    tokens: Sequence[int],
    *,
    max_len: int | None = None,
    stride: int | None = None,
    prefix: Sequence[int] = (),
    batch_size: int = 8,
    pad_id: int | None = None,
) -> dict:
    """Perplexity of `tokens` under `lm`: {"tokens", "nll", "ppl", "bits_per_token", "windows", "max_len",
    "stride", "rule"}. `prefix` ids (e.g. BOS or GLM's [gMASK] <sop>) come first and are not scored; without
    one, the first token is not scored. max_len defaults to DEFAULT_MAX_LEN, or to the model's learned positions
    when it has fewer (a longer window would read past its position table); stride to max_len // 2."""
    max_len = scoring.model_length(lm.config, DEFAULT_MAX_LEN) if max_len is None else max_len
    scoring.check_length(lm.config, max_len, "max_len")
    stride = max(1, max_len // 2) if stride is None else stride
    if not 1 <= stride < max_len:
        raise ValueError(f"stride must satisfy 1 <= stride < max_len={max_len}, got {stride}")
    seq = list(prefix) + list(tokens)
    window = max_len - 1 if scoring.scoring_mode(lm.config) == "prefix" else max_len
    spans = stride_windows(len(seq), window, min(stride, window - 1), max(1, len(prefix)))
    rows = [scoring.make_row(lm.config, seq[b:s], seq[s:e], max_len) for b, s, e in spans]
    scores = scoring.Scorer(lm, batch_size, pad_id=pad_id).score(rows)
    n = sum(e - s for _, s, e in spans)
    nll = -sum(sc[0].logprob for sc in scores)
    return {
        "tokens": n,
        "nll": nll,
        "ppl": math.exp(nll / n) if n else float("nan"),
        "bits_per_token": nll / n / math.log(2) if n else float("nan"),
        "windows": len(spans),
        "max_len": max_len,
        "stride": stride,
        "rule": RULE,
    }


def read_text(path) -> str:
    """A UTF-8 text file, with errors that name it."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: text file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{p}: the file is empty")
    return text


def file_perplexity(
    lm, tok, path, *, max_len: int | None = None, stride: int | None = None, batch_size: int = 8
) -> dict:
    """perplexity() of a whole text file, encoded without special tokens and conditioned on the tokenizer's
    prefix (tok: glm_jax.eval.tokenizer.EvalTokenizer); adds "file", "bytes", "words", "bits_per_byte" and
    "word_perplexity" (lm-eval's wikitext normalisation)."""
    text = read_text(path)
    out = perplexity(
        lm,
        tok.encode(text, add_special_tokens=False),
        max_len=max_len,
        stride=stride,
        prefix=tok.prefix_ids,
        batch_size=batch_size,
        pad_id=tok.pad_token_id,
    )
    if not out["tokens"]:
        raise ValueError(f"{path}: one token, and nothing before it: there is nothing to score")
    nbytes, nwords = len(text.encode("utf-8")), len(text.split())
    out.update(
        file=str(path),
        bytes=nbytes,
        words=nwords,
        bits_per_byte=out["nll"] / nbytes / math.log(2),
        word_perplexity=math.exp(out["nll"] / max(nwords, 1)),
    )
    return out


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal _encode_pair: trailing context spaces move to the continuation; the two are encoded
    together and split at the context's length."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


def lambada(lm, tok, path, *, max_len: int | None = None, batch_size: int = 8) -> dict:
    """LAMBADA-style last-word prediction over a text file with one passage a line: context = the passage
    without its last word, target = " " + last word. acc: the target is the greedy continuation, token for
    token; ppl: exp of the mean negative log-likelihood of the targets (lm-eval's lambada metrics). Contexts are
    left-truncated to max_len, whose default follows perplexity()'s."""
    max_len = scoring.model_length(lm.config, DEFAULT_MAX_LEN) if max_len is None else max_len
    scoring.check_length(lm.config, max_len, "max_len")
    lines = [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
    pairs = []
    for i, line in enumerate(lines, 1):
        if " " not in line:
            raise ValueError(f"{path}, line {i}: a passage needs at least two words")
        ctx, word = line.rsplit(" ", 1)
        pairs.append(encode_pair(tok, ctx, " " + word))
    rows = [scoring.make_row(lm.config, c, t, max_len) for c, t in pairs]
    scores = [sc[0] for sc in scoring.Scorer(lm, batch_size, pad_id=tok.pad_token_id).score(rows)]
    lls = [s.logprob for s in scores]
    return {
        "file": str(path),
        "passages": len(lines),
        "acc": sum(s.greedy for s in scores) / len(scores),
        "ppl": math.exp(-sum(lls) / len(lls)),
        "max_len": max_len,
    }

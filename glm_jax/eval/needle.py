"""Needle in a haystack: a fact hidden at chosen depths in filler text of chosen lengths, asked back.

For each (depth, length): filler sentences fill the prompt up to `length` tokens, the needle sentence goes in
at the sentence boundary nearest `depth` (0 = start, 1 = end), the question follows, and the model answers
by greedy decoding. Recall is 1 when the answer string occurs in the decoded output (exact substring), else 0.
`run_grid` returns a depth x length grid; `write_report` saves it as JSON and as a PNG heat map (matplotlib,
Agg). The filler is built in (no downloads): varied plain sentences that never state the needle.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from glm_jax.eval import scoring
from glm_jax.inputs import position_limit

NEEDLE = "The secret number of the blue lighthouse is 7421."
QUESTION = "What is the secret number of the blue lighthouse?"
ANSWER = "7421"
DEFAULT_LENGTHS = (256, 512, 1024)
_SUBJECTS = ("The river", "A farmer", "The old library", "Every morning the baker", "The city council", "A child",
             "The mountain road", "Our neighbour", "The museum guide", "A small boat")  # fmt: skip
_VERBS = ("carried", "described", "remembered", "painted", "counted", "followed", "repaired", "visited")
_OBJECTS = ("the autumn leaves", "a long story about the harbour", "three wooden chairs", "the quiet valley",
            "the market square", "an unfinished letter", "the northern forest", "a basket of apples")  # fmt: skip


def filler_sentences(n: int) -> list[str]:
    """n deterministic filler sentences (subject x verb x object, cycled)."""
    out = []
    for i in range(n):
        s, v, o = _SUBJECTS[i % 10], _VERBS[(i // 10) % 8], _OBJECTS[(i * 7 + i // 80) % 8]
        out.append(f"{s} {v} {o}.")
    return out


class Haystack:
    """Builds prompts for one tokenizer (glm_jax.eval.tokenizer.EvalTokenizer)."""

    def __init__(self, tok, needle: str = NEEDLE, question: str = QUESTION, chat: bool = False):
        self.tok, self.needle, self.question, self.chat = tok, needle, question, chat
        self._cost: dict[str, int] = {}

    def _tokens(self, text: str) -> int:
        if text not in self._cost:
            self._cost[text] = len(self.tok.encode(" " + text, add_special_tokens=False))
        return self._cost[text]

    def text(self, length: int, depth: float) -> str:
        """Filler + needle at `depth` + question, about `length` tokens in all (never fewer filler than 1)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        budget = length - self._tokens(self.needle) - self._tokens(self.question) - 4
        sents, used = [], 0
        for s in filler_sentences(max(1, length)):
            cost = self._tokens(s)
            if sents and used + cost > budget:
                break
            sents.append(s)
            used += cost
        at = round(depth * len(sents))
        body = " ".join(sents[:at] + [self.needle] + sents[at:])
        return f"{body}\n\n{self.question} Answer:"

    def prompt_ids(self, cfg, length: int, depth: float) -> list[int]:
        text = self.text(length, depth)
        if self.chat:
            ids = self.tok.encode(self.tok.apply_chat_template([{"role": "user", "content": text}]))
        else:
            ids = self.tok.encode(text)
        if scoring.scoring_mode(cfg) == "prefix" and ids[-2:] != [cfg.gmask_token_id, cfg.bos_token_id]:
            ids = ids + [cfg.gmask_token_id, cfg.bos_token_id]  # GLM generates after [gMASK] <sop>
        return ids


def default_lengths(hay: Haystack, cfg, depths: Sequence[float], max_new_tokens: int) -> list[int]:
    """DEFAULT_LENGTHS; on a model with learned positions, those whose prompts (at every depth) and answer fit its
    table, or else the longest length that does. ValueError when not even an 8-token prompt fits."""
    limit = position_limit(cfg)
    if limit is None:
        return list(DEFAULT_LENGTHS)

    def fits(n: int) -> bool:
        return all(len(hay.prompt_ids(cfg, n, float(d))) + max_new_tokens <= limit for d in depths)

    out = [n for n in DEFAULT_LENGTHS if fits(n)]
    n = limit - max_new_tokens  # the filler shrinks with n, the needle and question do not: search down from here
    while not out and n >= 8:
        out, n = ([n] if fits(n) else []), n - 1
    if not out:
        raise ValueError(
            f"the model's {limit} learned positions leave no room for a needle prompt and {max_new_tokens} new tokens"
        )
    return out


def run_grid(
    lm,
    tok,
    lengths: Sequence[int] | None,
    depths: Sequence[float],
    *,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    chat: bool = False,
) -> dict:
    """Recall grid: {"depths", "lengths", "recall" [depth][length], "prompt_tokens" [depth][length],
    "outputs" [depth][length], "needle", "question", "answer", "mean_recall"}. lengths None: default_lengths."""
    if answer not in needle:
        raise ValueError(f"the answer {answer!r} does not occur in the needle {needle!r}")
    hay = Haystack(tok, needle, question, chat)
    if lengths is None and depths:
        lengths = default_lengths(hay, lm.config, depths, max_new_tokens)
    if not lengths or not depths:
        raise ValueError("needle grid needs at least one length and one depth")
    cells = [(d, n) for d in range(len(depths)) for n in range(len(lengths))]
    prompts = [hay.prompt_ids(lm.config, int(lengths[n]), float(depths[d])) for d, n in cells]
    eos = sorted({*lm.config.eos_token_id, tok.eot_token_id})
    news = scoring.generate_rows(
        lm, prompts, max_new_tokens, eos_ids=eos, pad_id=tok.pad_token_id, batch_size=batch_size
    )
    recall = [[0.0] * len(lengths) for _ in depths]
    outputs = [[""] * len(lengths) for _ in depths]
    sizes = [[0] * len(lengths) for _ in depths]
    for (d, n), ids, new in zip(cells, prompts, news):
        text = tok.decode(new)
        outputs[d][n], sizes[d][n] = text, len(ids)
        recall[d][n] = 1.0 if answer in text else 0.0
    flat = [r for row in recall for r in row]
    return {
        "depths": [float(x) for x in depths],
        "lengths": [int(x) for x in lengths],
        "recall": recall,
        "prompt_tokens": sizes,
        "outputs": outputs,
        "needle": needle,
        "question": question,
        "answer": answer,
        "mean_recall": sum(flat) / len(flat),
    }


def heatmap(result: dict, png_path, title: str = "Needle in a haystack: recall") -> pathlib.Path:
    """Depth x length heat map (green = recalled) as a PNG, drawn with matplotlib's Agg canvas."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.asarray(result["recall"], float)
    fig = Figure(figsize=(1.5 + 0.75 * grid.shape[1], 1.25 + 0.5 * grid.shape[0]), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(grid.shape[0]), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title} (mean {result['mean_recall']:.2f})", fontsize=9)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    return png_path


def write_report(result: dict, out_dir, name: str = "needle") -> tuple[pathlib.Path, pathlib.Path]:
    """out_dir/NAME.json (the grid) and out_dir/NAME.png (the heat map)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    js.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return js, heatmap(result, out / f"{name}.png")

"""lm-evaluation-harness backend "glm-jax": any glm_jax checkpoint under lm_eval.simple_evaluate.

    import glm_jax.eval.harness  # registers "glm-jax"
    lm_eval.simple_evaluate(model="glm-jax", model_args="pretrained=PATH,batch_size=8", tasks=[...])

Requests are tokenized as lm-eval's `hf` backend tokenizes them (context and continuation encoded together and
split at the context's length, trailing context whitespace moved to the continuation, an empty context
replaced by the prefix token), so each request's log-likelihood is HFLM's up to float rounding on a
transformers-family checkpoint. Scoring and generation run through `glm_jax.eval.scoring` in fixed-shape,
length-bucketed batches. The 2-D position families (glm, chatglm) are scored in GLM's own layout
(context [gMASK] <sop> continuation, see scoring.py) and generate after [gMASK] <sop>.
"""

from __future__ import annotations

import json
import pathlib

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy registry first, so "hf" and the others stay found)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from glm_jax import storage
from glm_jax.eval import scoring
from glm_jax.eval.tokenizer import EvalTokenizer
from glm_jax.model.transformer import param_count

_IGNORED = ("device", "max_batch_size", "trust_remote_code", "parallelize")


def rolling_windows(tokens: list[int], prefix: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token once with the most context that fits: lm-eval's
    get_rolling_token_windows + make_disjoint_window (context_len=1), with a prefix of one or more tokens
    conditioning the first window (identical to lm-eval's for a one-token prefix)."""
    n = len(tokens)
    if n == 0:
        return []
    if max_len < len(prefix) + 1:
        raise ValueError(f"max_len={max_len} leaves no room after the {len(prefix)}-token prefix")
    first = min(max_len - len(prefix) + 1, n)
    out = [(list(prefix), tokens[:first])]
    done = first
    while done < n:
        take = min(n - done, max_len)
        end = done + take
        out.append((tokens[max(0, end - max_len - 1) : end - take], tokens[end - take : end]))
        done = end
    return out


def _int_or_auto(v, name: str, default: int) -> int:
    if v is None or (isinstance(v, str) and v.startswith("auto")):
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


@register_model("glm-jax")
class GLMLM(TemplateLM):
    """lm-eval LM over `glm_jax.from_pretrained(pretrained)` and the checkpoint's own tokenizer.

    model_args: pretrained (folder: HF checkpoint of any family, glm-convert to-jax output, glm-train run dir),
    dtype (float32), batch_size (8; "auto" means 8), max_batch_tokens (16384), max_length (default: the model's
    max_position_embeddings, which a model with learned positions cannot exceed), max_gen_toks (256, or half of
    max_length when that is less), tokenizer (another folder), tokenizer_backend (auto | glm |
    hf), chat_format, attention (xla | flash | auto), seed (sampling seed), pack (true: requests that share a
    context are scored in one packed row, the context computed once)."""

    def __init__(
        self,
        pretrained,
        dtype: str = "float32",
        batch_size=8,
        max_batch_tokens=16384,
        max_length=None,
        max_gen_toks=None,
        tokenizer=None,
        tokenizer_backend: str = "auto",
        chat_format=None,
        attention: str = "xla",
        seed=0,
        pack=True,
        **kwargs,
    ):
        super().__init__()
        unknown = sorted(set(kwargs) - set(_IGNORED))
        if unknown:
            raise ValueError(f"glm-jax: unknown model_args {unknown}")
        import glm_jax

        path = storage.as_path(str(pretrained))
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model folder not found")
        self.pretrained = str(path)
        self.lm = glm_jax.from_pretrained(path, dtype=dtype, attention=attention)
        cfg = self.lm.config
        self.mode = scoring.scoring_mode(cfg)
        eos = list(cfg.eos_token_id)
        self.tok = EvalTokenizer(
            tokenizer or path, tokenizer_backend, chat_format, fallback_eos=eos[0] if eos else None
        )
        self.tokenizer = self.tok  # lm-eval reads .tokenizer in a few places
        self._max_length = _int_or_auto(max_length, "max_length", cfg.max_position_embeddings)
        scoring.check_length(cfg, self._max_length, "max_length")
        # a model shorter than lm-eval's 256 new tokens keeps half its length for the prompt
        self._max_gen_toks = _int_or_auto(max_gen_toks, "max_gen_toks", min(256, self._max_length // 2))
        self._batch_size = _int_or_auto(batch_size, "batch_size", 8)
        self.seed = int(seed)
        self.pack = str(pack).lower() not in ("false", "0", "no")
        self.scorer = scoring.Scorer(
            self.lm, self._batch_size, _int_or_auto(max_batch_tokens, "max_batch_tokens", 16384), self.tok.pad_token_id
        )
        self.stop_ids = _generation_eos(path, eos)
        if self.mode == "prefix":
            self.cue = [cfg.gmask_token_id, cfg.bos_token_id]
            if None in self.cue:
                raise ValueError(f"{path}: config.json names no [gMASK] / <sop> id, which GLM's LM layout needs")

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.prefix_ids[-1]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def chat_template(self, chat_template=False):
        return self.tok.chat_template() if chat_template not in (False, None) else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ tokenization
    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tok.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_pair(self, context: str, continuation: str):
        chat = self.tok.chat_ids(context)
        if chat is not None:  # a chat prompt keeps its exact ids; the answer follows it
            return chat, self.tok.encode(continuation, add_special_tokens=False)
        return super()._encode_pair(context, continuation)

    def _strip_cue(self, ids: list[int]) -> list[int]:
        """Context ids without a trailing [gMASK] <sop> (ChatGLM-6B prompts end with it; the layout adds it)."""
        if self.mode == "prefix" and len(ids) > 2 and ids[-2:] == self.cue:
            return ids[:-2]
        return ids

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for context, continuation in [r.args for r in requests]:
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                prefix = self.tok.prefix_ids
                if len(prefix) == 1 and cont and cont[0] == prefix[0]:  # HFLM: a continuation that starts with it
                    ctx, cont = cont[:1], cont[1:]
                else:
                    ctx = list(prefix)
            else:
                ctx, cont = self._encode_pair(context, continuation)
            pairs.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Requests sharing a context go into one packed row when they fit (see scoring.packed_row)."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, ctx, _) in enumerate(requests):
            groups.setdefault(tuple(self._strip_cue(list(ctx))), []).append(i)
        rows, owners = [], []
        for ctx, idx in groups.items():
            packed = None
            if self.pack and len(idx) > 1:
                packed = scoring.packed_row(self.lm.config, ctx, [requests[i][2] for i in idx], self.max_length)
            if packed is not None:
                rows.append(packed)
                owners.append(idx)
            else:
                rows += [self._row(list(ctx), requests[i][2]) for i in idx]
                owners += [[i] for i in idx]
        answers: list = [None] * len(requests)
        for idx, scores in zip(owners, self._score(rows, disable_tqdm, "Running loglikelihood requests")):
            for i, s in zip(idx, scores):
                answers[i] = (s.logprob, s.greedy)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def _row(self, ctx: list[int], cont: list[int]) -> scoring.Row:
        return scoring.make_row(self.lm.config, ctx, list(cont), self.max_length)

    def _score(self, rows, disable_tqdm: bool, desc: str):
        with tqdm(total=len(rows), disable=disable_tqdm, desc=desc) as bar:
            out = self.scorer.score(rows)
            bar.update(len(rows))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        room = self.max_length - (2 if self.mode == "prefix" else 0)  # [gMASK] <sop> take two places
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in rolling_windows(tokens, self.tok.prefix_ids, room):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def _prompt_ids(self, context: str, max_ctx_len: int) -> list[int]:
        ids = self.tok_encode(context)
        if self.mode == "prefix":
            ids = self._strip_cue(ids)[-(max_ctx_len - 2) :] + self.cue
        return ids[-max_ctx_len:]

    def generate_until(self, requests, disable_tqdm: bool = False):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx_len = self.max_length - max_gen
            if max_ctx_len <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length={self.max_length}")
            prompts = [self._prompt_ids(requests[i].args[0], max_ctx_len) for i in idx]
            news = scoring.generate_rows(
                self.lm,
                prompts,
                max_gen,
                eos_ids=self.stop_ids,
                pad_id=self.tok.pad_token_id,
                batch_size=self.batch_size,
                done_fn=_StopStrings(self.tok, until),
                do_sample=bool(kwargs.get("do_sample", False)),
                temperature=float(kwargs.get("temperature") or 1.0),
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
                seed=self.seed,
            )
            for i, new in zip(idx, news):
                text = postprocess_generated_text(self.tok_decode(new), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(idx))
        bar.close()
        return out

    def get_model_info(self) -> dict:
        c = self.lm.config
        return {"model_family": c.family, "model_num_parameters": param_count(c), "model_dtype": c.dtype}


class _StopStrings:
    """done_fn for generate_rows: the decoded new tokens contain one of the stop strings."""

    def __init__(self, tok: EvalTokenizer, until: list[str]):
        self.tok, self.until = tok, [u for u in until if u]

    def __call__(self, new: list[int]) -> bool:
        text = self.tok.decode(new, skip_special_tokens=False)
        return any(u in text for u in self.until)


def _generation_eos(path: pathlib.Path, config_eos: list[int]) -> list[int]:
    """The ids generation stops on: generation_config.json's eos_token_id (what transformers' generate uses),
    else config.json's."""
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError) as e:
            raise ValueError(f"{gen}: not a valid JSON file ({e})") from e
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return [int(e) for e in config_eos]

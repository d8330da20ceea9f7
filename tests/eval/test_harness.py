"""lm-eval parity: model="glm-jax" vs lm-eval's own "hf" backend on one random tiny Glm4ForCausalLM folder, over
local YAML tasks (multiple choice, LAMBADA-style loglikelihood, generate_until, loglikelihood_rolling) whose
data are JSONL files written here (no downloads)."""

import json
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import accelerate  # noqa: F401  (a requirement of this test)
import lm_eval
import transformers
from helpers import eval_models

MAX_LEN = 40  # small, so the rolling task needs several windows and long contexts are left-truncated

MC = [
    {"q": "What colour is the sky?", "choices": [" blue", " green and yellow", " red"], "label": 0},
    {"q": "What is the capital of France?", "choices": [" Rome", " Paris", " the lazy dog"], "label": 1},
    {"q": "Which animal barks at the moon?", "choices": [" cats", " dogs", " foxes", " seven"], "label": 1},
    {"q": "What comes after four?", "choices": [" five", " ten", " the capital of Italy"], "label": 0},
    {
        "q": "The quick brown fox jumps over the lazy dog, and then what happens to the cat?",
        "choices": [" it sleeps during the day", " it hunts", " blue"],
        "label": 0,
    },
]
LL = [{"text": s} for s in eval_models.SENTENCES[:5]]
GEN = [
    {"q": "The quick brown", "a": " fox"},
    {"q": "Paris is the capital of", "a": " France"},
    {"q": "One, two, three,", "a": " four"},
    {"q": "Question: what colour is the sky? Answer:", "a": " blue"},
]
PPL = [{"text": " ".join(eval_models.SENTENCES)}, {"text": eval_models.SENTENCES[2]}, {"text": "Cats."}]

TASKS = {
    "tiny_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{q}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    },
    "tiny_ll": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
    },
    "tiny_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{q}}",
        "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
    "tiny_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    },
}


def write_tasks(root: pathlib.Path) -> pathlib.Path:
    """One YAML task per entry of TASKS over a JSONL file (dataset_path: json, data_files: the local file)."""
    import yaml

    data = {"tiny_mc": MC, "tiny_ll": LL, "tiny_gen": GEN, "tiny_ppl": PPL}
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    for name, spec in TASKS.items():
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in data[name]), encoding="utf-8")
        cfg = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(src)}, "cache_dir": str(root / "hf_cache")},
            "test_split": "test",
            **spec,
            "metadata": {"version": 1.0},
        }
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return tasks


def evaluate(model, model_args, tasks_dir, **kw):
    from lm_eval.tasks import TaskManager

    import glm_jax.eval.harness  # noqa: F401  (registers "glm-jax")

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kw,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_parity")
    folder = root / "model"
    eval_models.build_glm4(folder)
    tasks = write_tasks(root)
    ours = evaluate("glm-jax", {"pretrained": str(folder), "max_length": MAX_LEN, "batch_size": 4}, tasks)
    hf = evaluate(
        "hf",
        {"pretrained": str(folder), "max_length": MAX_LEN, "dtype": "float32"},
        tasks,
        device="cpu",
        batch_size=3,
    )
    return ours, hf, folder, tasks


def _responses(res, task):
    """Per-request raw responses, in doc / request order."""
    out = []
    for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
        out.extend(r[0] for r in s["resps"])
    return out


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_ll", "tiny_ppl"])
def test_per_request_loglikelihoods_match_hf(runs, task):
    ours, hf, _, _ = runs
    a, b = _responses(ours, task), _responses(hf, task)
    assert len(a) == len(b) > 0
    if task == "tiny_ppl":
        la, lb = np.array(a, float), np.array(b, float)
    else:
        la, lb = np.array([float(x[0]) for x in a]), np.array([float(x[0]) for x in b])
        assert [bool(x[1]) for x in a] == [bool(x[1]) for x in b]  # is_greedy
    gap = np.abs(la - lb).max()
    print(f"{task}: {len(a)} requests, max |d loglikelihood| = {gap:.2e}")
    assert gap <= 1e-4


def test_task_metrics_match_hf(runs):
    ours, hf, _, _ = runs
    for task in TASKS:
        ra, rb = ours["results"][task], hf["results"][task]
        keys = [k for k in rb if not k.endswith("_stderr,none") and k != "alias"]
        assert keys
        for k in keys:
            if task in ("tiny_mc", "tiny_gen") or k.startswith("acc"):  # counts: exactly equal
                assert ra[k] == rb[k], (task, k, ra[k], rb[k])
            else:  # perplexities: exp of the summed loglikelihoods
                assert ra[k] == pytest.approx(rb[k], rel=1e-5), (task, k)


def test_generate_until_strings_match_hf(runs):
    ours, hf, _, _ = runs
    a, b = _responses(ours, "tiny_gen"), _responses(hf, "tiny_gen")
    assert len(a) == len(GEN)
    assert a == b
    assert any(x for x in a)  # something was generated


def test_chat_template_and_rolling_windows(runs):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    import glm_jax.eval.harness as harness

    _, _, folder, _ = runs
    lm = harness.GLMLM(pretrained=str(folder), max_length=MAX_LEN)

    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    chat = [{"role": "user", "content": "What colour is the sky?"}]
    assert lm.apply_chat_template(chat) == hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert lm.chat_template(True) == hf_tok.chat_template
    # the windows generalise lm-eval's; with a one-token prefix they are lm-eval's exactly
    for n in (0, 1, 5, 9, 10, 11, 23, 40):
        toks = list(range(100, 100 + n))
        ref = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 7, 10, 1)]
        assert harness.rolling_windows(toks, [7], 10) == [tuple(map(list, w)) for w in ref]
    # two-token prefix: every token scored once, inputs never longer than max_len
    toks = list(range(100, 123))
    wins = harness.rolling_windows(toks, [7, 8], 10)
    assert sum((c for _, c in wins), []) == toks
    assert all(len(c) + len(x) - 1 <= 10 for c, x in wins)


def test_bad_model_args(tmp_path):
    import glm_jax.eval.harness as harness

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        harness.GLMLM(pretrained=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown model_args"):
        harness.GLMLM(pretrained=str(tmp_path), bogus=1)


def test_cli_tasks_mode(runs, tmp_path, capsys):
    from glm_jax.eval import cli

    ours, _, folder, tasks = runs
    out = tmp_path / "res.json"
    argv = [str(folder), "--tasks", "tiny_mc,tiny_g*", "--include-path", str(tasks), "--max-length", str(MAX_LEN)]
    assert cli.main([*argv, "--batch-size", "2", "--output", str(out)]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    res = json.loads(out.read_text())["results"]
    assert sorted(res) == ["tiny_gen", "tiny_mc"]
    for task in res:
        assert (
            res[task]["acc,none" if task == "tiny_mc" else "exact_match,none"]
            == ours["results"][task]["acc,none" if task == "tiny_mc" else "exact_match,none"]
        )
    assert cli.main([str(folder), "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown lm-eval task(s): no_such_task"]


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chat"])
def test_glm_tokenizers_chat_prompt_keeps_exact_ids(name):
    """The GLM families' chat ids (special tokens included) survive lm-eval's string round trip."""
    from helpers.fixture_models import FIX

    from glm_jax.eval.tokenizer import EvalTokenizer

    tok = EvalTokenizer(FIX / "chat-templates" / name, fallback_eos=2)
    assert tok.kind == "glm"
    chat = [{"role": "user", "content": "Hello there"}]
    text = tok.apply_chat_template(chat)
    assert tok.encode(text) == tok.tok.apply_chat_template(chat)
    assert tok.chat_ids(text) == tok.encode(text)
    assert tok.encode("plain text") == list(tok.tok.prefix_ids) + tok.tok.encode("plain text")
    assert tok.chat_template() == f"glm-jax:{tok.tok.chat_format}"


def test_glm_original_scores_in_its_prefix_layout(tmp_path):
    """The 2-D position family: context [gMASK] | <sop> continuation, checked against the layout written out by
    hand; generation starts after [gMASK] <sop>. A byte-level vocab.json stands in for GLM's GPT-2 BPE."""
    import jax
    from helpers.fixture_models import FIX
    from lm_eval.api.instance import Instance

    import glm_jax
    from glm_jax.eval.harness import GLMLM

    src = FIX / "glm-original" / "model"
    folder = tmp_path / "glm"
    folder.mkdir()
    (folder / "pytorch_model.bin").symlink_to(src / "pytorch_model.bin")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(gmask_token_id=380, sop_token_id=381, eop_token_id=382, pad_token_id=0, eos_token_id=256)
    (folder / "config.json").write_text(json.dumps(cfg))
    from glm_jax.tokenizers.gpt2 import bytes_to_unicode

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = 256
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")

    h = GLMLM(pretrained=str(folder), max_length=30, batch_size=2)
    assert h.mode == "prefix"
    reqs = [("The sky is", " blue"), ("Paris, France", " and Rome"), ("", "abc"), ("The sky is", " green!")]
    got = h.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in reqs], disable_tqdm=True)
    assert h.scorer.packed_rows == 1 and h.scorer.rows == 3  # the two "The sky is" requests share a row
    lm = glm_jax.from_pretrained(folder)
    for (ctx, cont), (ll, _) in zip(reqs, got):
        c = list(ctx.encode()) if ctx else [256]  # an empty context is the prefix (eos) token
        g = list((ctx + cont).encode())[len(c) :] if ctx else list(cont.encode())
        ids = c + [380, 381] + g[:-1]
        pos = list(range(len(c) + 1)) + [len(c)] * len(g)
        block = [0] * (len(c) + 1) + list(range(1, len(g) + 1))
        logits = lm(np.asarray([ids]), position_ids=np.asarray([[pos, block]]), prefix_len=np.asarray([len(c) + 1]))
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        ref = sum(float(logp[len(c) + 1 + j, t]) for j, t in enumerate(g))
        assert ll == pytest.approx(ref, abs=1e-4)

    [text] = h.generate_until([Instance("generate_until", {}, ("The sky is", {"max_gen_toks": 3}), 0)])
    assert isinstance(text, str)
    c = list(b"The sky is")
    prompt = h._prompt_ids("The sky is", 27)
    assert prompt == c + [380, 381]  # generation starts after [gMASK] <sop>
    pos = np.asarray([[[*range(11), 10], [0] * 11 + [1]]])
    logits = np.asarray(lm(np.asarray([prompt]), position_ids=pos, prefix_len=np.asarray([11])))
    new = lm.generate(np.asarray([prompt]), max_new_tokens=1, eos_token_id=[-1])
    assert int(new[0, -1]) == int(np.argmax(logits[0, -1]))


def test_packed_rows_equal_one_row_per_request(runs):
    """Choices sharing a context in one packed row (dense segment mask) score as they do one row each."""
    from lm_eval.api.instance import Instance

    from glm_jax.eval.harness import GLMLM

    _, _, folder, _ = runs
    reqs = [
        Instance("loglikelihood", {}, ("Question: " + d["q"] + "\nAnswer:", c), 0) for d in MC for c in d["choices"]
    ]
    packed = GLMLM(pretrained=str(folder), max_length=MAX_LEN, batch_size=4)
    single = GLMLM(pretrained=str(folder), max_length=MAX_LEN, batch_size=4, pack=False)
    a, b = packed.loglikelihood(reqs, disable_tqdm=True), single.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in a] == [g for _, g in b]
    assert np.abs(np.array([x for x, _ in a]) - np.array([x for x, _ in b])).max() <= 2e-5
    # the last question is too long to pack within MAX_LEN: its three choices fall back to a row each
    assert packed.scorer.packed_rows == len(MC) - 1 and packed.scorer.rows == len(MC) - 1 + 3
    assert single.scorer.packed_rows == 0 and single.scorer.rows == len(reqs)

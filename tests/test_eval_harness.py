"""lm-eval parity: model="glm-jax" vs lm-eval's own "hf" backend on one random tiny Glm4ForCausalLM folder, over
local YAML tasks (multiple choice, LAMBADA-style loglikelihood, generate_until, loglikelihood_rolling) whose
data are JSONL files written here (no downloads)."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
lm_eval = pytest.importorskip("lm_eval")

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _eval_models  # noqa: E402

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
LL = [{"text": s} for s in _eval_models.SENTENCES[:5]]
GEN = [
    {"q": "The quick brown", "a": " fox"},
    {"q": "Paris is the capital of", "a": " France"},
    {"q": "One, two, three,", "a": " four"},
    {"q": "Question: what colour is the sky? Answer:", "a": " blue"},
]
PPL = [{"text": " ".join(_eval_models.SENTENCES)}, {"text": _eval_models.SENTENCES[2]}, {"text": "Cats."}]

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
    _eval_models.build_glm4(folder)
    tasks = write_tasks(root)
    ours = evaluate("glm-jax", {"pretrained": str(folder), "max_length": MAX_LEN, "batch_size": 4}, tasks)
    hf = evaluate(
        "hf",
        {"pretrained": str(folder), "max_length": MAX_LEN, "dtype": "float32"},
        tasks,
        device="cpu",
        batch_size=3,
    )
    return ours, hf, folder


def _responses(res, task):
    """Per-request raw responses, in doc / request order."""
    out = []
    for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
        out.extend(r[0] for r in s["resps"])
    return out


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_ll", "tiny_ppl"])
def test_per_request_loglikelihoods_match_hf(runs, task):
    ours, hf, _ = runs
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
    ours, hf, _ = runs
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
    ours, hf, _ = runs
    a, b = _responses(ours, "tiny_gen"), _responses(hf, "tiny_gen")
    assert len(a) == len(GEN)
    assert a == b
    assert any(x for x in a)  # something was generated


def test_chat_template_and_rolling_windows(runs):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    import glm_jax.eval.harness as harness

    _, _, folder = runs
    lm = harness.GLMLM(pretrained=str(folder), max_length=MAX_LEN)
    import transformers

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

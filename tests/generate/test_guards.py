"""glm-generate on inputs that used to crash it or the machine: invalid UTF-8 in --prompt and on --chat stdin
(replaced, one warning line, the chat goes on with its history), prompts past a learned position table, and
prompts whose KV cache and attention need more memory than the machine has (refused before allocating, exit 2)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers.cli import module_argv, run_generate, subprocess_env
from helpers.fixture_models import FIX

from glm_jax import hostmem
from glm_jax.inputs import decode_memory_bytes
from glm_jax.stream import cache_plan
from glm_jax.tokenizers import load_tokenizer

ROOT = FIX.parent.parent
TOK = FIX / "chat-templates" / "chatglm-6b"


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory):
    """ChatGLM-6B tiny model (2-D RoPE, vocab 1024) with its stand-in tokenizer files."""
    d = tmp_path_factory.mktemp("chatglm6b")
    for f in (FIX / "chatglm-6b" / "model_sharded_safetensors").iterdir():
        shutil.copy(f, d)
    for f in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOK / f, d)
    return d


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    """The original GLM's tiny model (learned positions, max_sequence_length 32), its vocabulary grown to 1024
    rows so that the ChatGLM-6B stand-in tokenizer's ids fit; safetensors written here."""
    import torch
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("glm")
    sd = torch.load(FIX / "glm-original" / "model" / "pytorch_model.bin", weights_only=True)
    t = {k: v.numpy() for k, v in sd.items()}
    w = t["glm.word_embeddings.weight"]
    grow = np.random.default_rng(0).normal(0, w.std(), (1024 - len(w), w.shape[1])).astype(w.dtype)
    t["glm.word_embeddings.weight"] = np.concatenate([w, grow])
    save_file(t, str(d / "model.safetensors"))
    cfg = json.loads((FIX / "glm-original" / "model" / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (d / "config.json").write_text(json.dumps(cfg))
    for f in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOK / f, d)
    return d


def _run(args, stdin=b"", wrapper=False):
    """glm-generate in a subprocess; args may hold bytes (argv as the OS passes it). With wrapper, the command runs
    under a small Python parent that appends the child's peak RSS (KiB) as the last stdout line."""
    env = subprocess_env(None, PYTHONIOENCODING="utf-8", LC_ALL="C.UTF-8")
    cmd = module_argv("glm_jax.cli_generate", *args)
    if wrapper:
        code = (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
        )
        cmd = [sys.executable, "-c", code, *cmd]
    r = subprocess.run(cmd, input=stdin, capture_output=True, cwd=ROOT, env=env, timeout=300)
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


def _prompt_ids(err):
    return [json.loads(line.split(":", 1)[1]) for line in err.splitlines() if line.startswith("prompt_ids:")]


def _warnings(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


# ------------------------------------------------------------------ invalid UTF-8


def test_prompt_with_invalid_utf8_argv(chatglm_dir):
    """Bytes that are not UTF-8 in argv reach Python surrogate-escaped; sentencepiece refused them (TypeError,
    exit 1). Now they are replaced as Python's decoder replaces them, with one warning line."""
    raw = b"caf\xc3 ok \xff\xfe end"
    rc, out, err = _run([chatglm_dir, b"--prompt", raw, "--max-new-tokens", "3", "--show-prompt-ids"])
    assert rc == 0, err
    assert _warnings(err) == ["warning: --prompt: 3 invalid UTF-8 byte sequence(s) replaced with U+FFFD"]
    tok = load_tokenizer(chatglm_dir)
    text = raw.decode("utf-8", "replace")
    assert _prompt_ids(err) == [tok.apply_chat_template([{"role": "user", "content": text}])]
    assert "Traceback" not in err and out.endswith("\n")


def test_chat_with_invalid_utf8_on_stdin_keeps_its_history(chatglm_dir):
    stdin = b"hello\nbad \xff\xfe line \xc3\nthird\n"
    rc, out, err = _run([chatglm_dir, "--chat", "--max-new-tokens", "4", "--show-prompt-ids"], stdin)
    assert rc == 0, err
    assert _warnings(err) == ["warning: stdin line 2: 3 invalid UTF-8 byte sequence(s) replaced with U+FFFD"]
    tok = load_tokenizer(chatglm_dir)
    replies = out.splitlines()
    assert len(replies) == 3
    # each turn's prompt is the reference chat prompt of the whole conversation so far: the bad line is in it
    # (replaced), and the turn after it still carries every earlier turn
    msgs = []
    for got, user, reply in zip(_prompt_ids(err), ["hello", "bad \ufffd\ufffd line \ufffd", "third"], replies):
        msgs.append({"role": "user", "content": user})
        assert got == tok.apply_chat_template(msgs)
        msgs.append({"role": "assistant", "content": tok.parse_response(reply)["content"]})
    assert len(_prompt_ids(err)) == 3 and "[Round 2]" in tok.decode(_prompt_ids(err)[2])


# ------------------------------------------------------------------ learned positions


def test_prompt_past_the_learned_positions(glm_dir):
    tok = load_tokenizer(glm_dir)
    long_text = " ".join(["word"] * 40)
    n = len(tok.encode(long_text, add_special_tokens=True))
    assert n > 32
    rc, out, err = _run([glm_dir, "--raw", "--prompt", long_text, "--max-new-tokens", "2"])
    assert rc == 2 and out == ""
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert f"{n} tokens" in err and "32 learned positions" in err
    # a prompt that fits, with more new tokens than positions left: cut, with a warning, and it runs
    short = " ".join(["word"] * 5)
    m = len(tok.encode(short, add_special_tokens=True))
    rc, out, err = _run([glm_dir, "--raw", "--prompt", short, "--max-new-tokens", "100", "--show-prompt-ids"])
    assert rc == 0, err
    assert _warnings(err) == [
        f"warning: --max-new-tokens 100 cut to {32 - m}: the prompt has {m} tokens and the model 32 learned positions"
    ]
    assert _prompt_ids(err) == [tok.encode(short, add_special_tokens=True)]


# ------------------------------------------------------------------ memory


def test_huge_prompt_is_refused_before_allocating(chatglm_dir):
    """~130k tokens (near the 128 KiB limit of one argv string): the prefill's attention alone is ~0.5 TiB.
    It used to be allocated until the kernel killed the process; now the estimate is refused up front."""
    rc, out, err = _run([chatglm_dir, "--raw", "--prompt", "x" * 130_000, "--max-new-tokens", "4"], wrapper=True)
    peak_kib = int(out.splitlines()[-1])
    assert rc == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "needs about" in err and "available" in err and "attention" in err
    assert peak_kib < 2 * 2**20, peak_kib  # under 2 GiB: nothing of the estimate was allocated


def _main(args, stdin=""):
    return run_generate(*args, stdin=stdin)


def test_memory_check_against_the_available_memory(chatglm_dir, monkeypatch):
    """With the machine's available memory pinned: --prompt exits 2 naming both sizes; --chat refuses the one
    turn that does not fit with a warning and goes on with its history."""
    from glm_jax.checkpoint.hf import config_from_folder
    from glm_jax.config import GLMConfig

    cfg: GLMConfig = config_from_folder(chatglm_dir)
    tok = load_tokenizer(chatglm_dir)
    small = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    fits = sum(decode_memory_bytes(cfg, 1, *cache_plan(len(small) + 300, 8)).values())
    monkeypatch.setattr(hostmem, "available_ram", lambda: fits)
    big = "x" * 2000
    rc, out, err = _main([chatglm_dir, "--prompt", big, "--max-new-tokens", "8"])
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "needs about" in err and f"{fits / 2**20:.1f} MiB available" in err
    rc, out, err = _main(
        [chatglm_dir, "--chat", "--max-new-tokens", "8", "--show-prompt-ids"], f"hello\n{big}\nagain\n"
    )
    assert rc == 0, err
    w = _warnings(err)
    assert len(w) == 1 and "needs about" in w[0] and "this turn was not sent" in w[0]
    one, two = _prompt_ids(err)
    assert one == small
    text = tok.decode(two)
    assert "[Round 1]" in text and "hello" in text and "again" in text and "xxxx" not in text
    # the boundary: exactly the estimate fits, one byte less does not
    need = sum(decode_memory_bytes(cfg, 1, *cache_plan(len(small), 8)).values())
    for have, sent in ((need, True), (need - 1, False)):
        monkeypatch.setattr(hostmem, "available_ram", lambda h=have: h)
        rc, _, err = _main([chatglm_dir, "--chat", "--max-new-tokens", "8", "--show-prompt-ids"], "hello\n")
        assert rc == 0, err
        assert (_prompt_ids(err) == [small]) == sent and (len(_warnings(err)) == 0) == sent, err

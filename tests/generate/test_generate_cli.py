"""glm_jax.stream (streaming decode) and the glm-generate command."""

import io
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.cli import run_generate, run_module
from helpers.fixture_models import FIX, load

from glm_jax import GLMConfig, cli_generate, stream
from glm_jax.tokenizers import load_tokenizer

ROOT = FIX.parent.parent
TOK = FIX / "chat-templates"


def _prompt(name, row=0):
    d = np.load(FIX / name / "io.npz")
    ids, mask = d["input_ids"][row], d["attention_mask"][row]
    return ids[mask.astype(bool)] if mask.ndim == 1 else ids[ids != 3]  # chatglm-6b: dense mask, pad id 3


# ------------------------------------------------------------------ streaming decode


@pytest.mark.parametrize("name", ["chatglm2-6b", "glm-4-9b-chat-remote", "chatglm-6b"])
def test_stream_equals_generate_greedy(name):
    lm = load(name)
    ids = _prompt(name)
    ref = lm.generate(ids[None], max_new_tokens=16)[0, len(ids) :].tolist()
    got = list(stream.stream_generate(lm, ids, max_new_tokens=16))
    assert got == ref[: len(got)]
    assert len(got) == 16 or got[-1] in lm.config.eos_token_id


def test_stream_stops_sampling_and_compiles_once():
    lm = load("chatglm2-6b")
    ids = _prompt("chatglm2-6b")
    greedy = list(stream.stream_generate(lm, ids, max_new_tokens=16))
    sizes = stream._prefill._cache_size(), stream._step._cache_size()
    # a stop token ends the stream right after it is yielded
    stop = greedy[5]
    got = list(stream.stream_generate(lm, ids, max_new_tokens=16, stop_token_ids=[stop]))
    assert got == greedy[: greedy.index(stop) + 1]
    # another prompt length and budget in the same buckets: nothing recompiles, however many tokens
    other = _prompt("chatglm2-6b", 1)
    assert len(other) != len(ids) and len(list(stream.stream_generate(lm, other, max_new_tokens=40))) >= 1
    assert (stream._prefill._cache_size(), stream._step._cache_size()) == sizes
    # the step updates the cache in place: its input buffers are donated
    ids_p = np.zeros((1, 64), np.int32)
    ids_p[0, : len(ids)] = ids
    opts, one, n = dict(do_sample=False, top_k=0), jnp.float32(1), jnp.int32(len(ids))
    tok, cache, valid, pos, rng = stream._prefill(
        lm.module,
        lm.params,
        jnp.asarray(ids_p),
        jnp.asarray((ids_p != 0).astype(np.int32)),
        n,
        jax.random.PRNGKey(0),
        one,
        one,
        cache_len=256,
        **opts,
    )
    nxt = stream._step(lm.module, lm.params, cache, valid, tok, pos, n, rng, one, one, **opts)[0]
    assert all(a.is_deleted() for a in jax.tree.leaves(cache))  # every layer's k and v
    assert [int(tok[0]), int(nxt[0])] == greedy[:2]
    assert (stream._prefill._cache_size(), stream._step._cache_size()) == sizes
    # sampling follows lm.generate's rng sequence
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    sampled = list(stream.stream_generate(lm, ids, max_new_tokens=16, **kw))
    assert sampled == lm.generate(ids[None], max_new_tokens=16, **kw)[0, len(ids) :].tolist()[: len(sampled)]


def test_text_stream_holds_back_partial_characters():
    tok = load_tokenizer(TOK / "glm-4-9b-chat")
    ids = tok.encode("\n晴😀龘 ok")
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the case is exercised
    ts = stream.TextStream(tok)
    pieces = [ts.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == "晴😀龘 ok"


# ------------------------------------------------------------------ tool-call output


def test_tool_call_printed_as_one_json_line(monkeypatch):
    """The CLI's reply path on GLM-4 ids that the reference decoded into a tool call."""
    cases = json.loads((TOK / "glm-4-9b-chat" / "postprocess.json").read_text(encoding="utf-8"))
    case = next(c for c in cases["generated_ids_to_response"] if "parameters" in c["response"])
    tok = load_tokenizer(TOK / "glm-4-9b-chat")
    tools_msgs = case["history"][:1]
    assert tools_msgs[0]["role"] == "system" and tools_msgs[0]["tools"]
    monkeypatch.setattr(stream, "stream_generate", lambda *a, **k: iter(case["generated_ids"]))
    lm = types.SimpleNamespace(config=GLMConfig(vocab_size=2048))  # no params: stream_generate is replaced
    args = cli_generate.build_parser().parse_args(["x", "--prompt", "q"])
    out, err = io.StringIO(), io.StringIO()
    s = cli_generate.Session(lm, tok, args, out, err)
    s.tools, s.system = tools_msgs[0]["tools"], tools_msgs
    s.answer(case["history"])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == case["response"]
    # plain text stays text; the postprocess.json tool call from raw output as well
    assert cli_generate.format_response(tok, "\n北京今天晴。 ") == "北京今天晴。"
    pp = cases["process_response"][0]
    assert json.loads(cli_generate.format_response(tok, pp["output"], pp["history"])) == pp["response"]


def test_read_tools_family_forms(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(
        json.dumps([{"name": "get_weather", "parameters": {}}, {"type": "function", "function": {"name": "f2"}}])
    )
    glm4 = cli_generate.read_tools(str(f), "glm4")
    assert [t["type"] for t in glm4] == ["function", "function"] and glm4[1]["function"]["name"] == "f2"
    assert [t["name"] for t in cli_generate.read_tools(str(f), "chatglm3")] == ["get_weather", "f2"]


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory):
    """ChatGLM-6B tiny model (safetensors) with the stand-in tokenizer files in the same folder."""
    d = tmp_path_factory.mktemp("chatglm6b")
    for f in (FIX / "chatglm-6b" / "model_sharded_safetensors").iterdir():
        shutil.copy(f, d)
    for f in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOK / "chatglm-6b" / f, d)
    return d


def _run(args, stdin=""):
    """glm-generate in a subprocess on one CPU device."""
    return run_module("glm_jax.cli_generate", *args, stdin=stdin, devices=None, PYTHONIOENCODING="utf-8")


def _prompt_ids(stderr):
    return [json.loads(line.split(":", 1)[1]) for line in stderr.splitlines() if line.startswith("prompt_ids:")]


def test_prompt_subprocess(chatglm_dir):
    r = _run([chatglm_dir, "--prompt", "你好 hello", "--max-new-tokens", "8", "--show-prompt-ids"])
    assert r.code == 0, r.err
    assert r.out.strip()
    tok = load_tokenizer(chatglm_dir)
    assert _prompt_ids(r.err) == [tok.apply_chat_template([{"role": "user", "content": "你好 hello"}])]


def test_chat_through_a_pipe(chatglm_dir):
    r = _run(
        [chatglm_dir, "--chat", "--max-new-tokens", "6", "--show-prompt-ids"],
        stdin="hello\nhow are you\n/reset\nagain\n",
    )
    assert r.code == 0, r.err
    assert ">>>" not in r.out and "(history cleared)" in r.err
    tok = load_tokenizer(chatglm_dir)
    one, two, three = _prompt_ids(r.err)
    assert one == tok.apply_chat_template([{"role": "user", "content": "hello"}])
    text = tok.decode(two)
    assert text.startswith("[Round 0]") and "hello" in text and "[Round 1]" in text and "how are you" in text
    assert two[-2:] == one[-2:] and len(two) > len(one) + len(tok.encode("how are you"))  # [gMASK] <sop>
    assert three == tok.apply_chat_template([{"role": "user", "content": "again"}])  # /reset cleared it
    assert len(r.out.splitlines()) >= 3  # one reply per turn


def test_missing_model_subprocess(tmp_path):
    r = _run([tmp_path / "nope", "--prompt", "hi"])
    assert r.code == 2 and r.err.startswith("error:") and "nope" in r.err
    assert len(r.err.strip().splitlines()) == 1


def _main(args, stdin=""):
    return run_generate(*args, stdin=stdin)


def _bad(args):
    return _main(args).error_line()


def test_bad_inputs(chatglm_dir, tmp_path):
    model = FIX / "chatglm2-6b" / "model_sharded_safetensors"
    assert "tokenizer" in _bad([model, "--prompt", "hi"])  # no tokenizer files in PATH
    assert "ice_text.model" in _bad([model, "--prompt", "hi", "--tokenizer", tmp_path, "--chat-format", "chatglm"])
    tools = tmp_path / "tools.json"
    tools.write_text("[{oops")
    glm4 = ["--tokenizer", TOK / "glm-4-9b-chat"]
    assert "tools.json" in _bad([model, "--prompt", "hi", *glm4, "--tools", tools])
    tools.write_text('{"name": "f"}')
    assert "tools.json" in _bad([model, "--prompt", "hi", *glm4, "--tools", tools])
    assert "system" in _bad([chatglm_dir, "--prompt", "hi", "--system", "be brief"])  # ChatGLM-6B has no system role
    assert "vocabulary" in _bad([model, "--prompt", "hi", *glm4])  # tokenizer ids beyond the model's
    assert "--top-p" in _bad([chatglm_dir, "--prompt", "hi", "--top-p", "2"])
    assert "--frobnicate" in _bad([chatglm_dir, "--prompt", "hi", "--frobnicate"])
    assert "config.json" in _bad([tmp_path, "--prompt", "hi"])
    broken = tmp_path / "broken"
    shutil.copytree(chatglm_dir, broken)
    shard = broken / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert "model-00002-of-00003.safetensors" in _bad([broken, "--prompt", "hi"])


def test_glm4_tools_run(tmp_path):
    """GLM-4 end to end: the fixture model with its vocabulary grown to fit the stand-in tokenizer's ids."""
    from safetensors.numpy import load_file, save_file

    src = FIX / "glm-4-9b-chat-remote" / "model_sharded_safetensors"
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    rng = np.random.default_rng(0)
    for k in ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"):
        w = tensors[k]
        tensors[k] = np.concatenate([w, rng.normal(0, w.std(), (1024 - len(w), w.shape[1])).astype(w.dtype)])
    model = tmp_path / "glm4"
    model.mkdir()
    save_file(tensors, str(model / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(padded_vocab_size=1024, eos_token_id=[1000, 1007, 1009], pad_token_id=1000)
    (model / "config.json").write_text(json.dumps(cfg))
    tools = tmp_path / "tools.json"
    schema = {"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}
    tools.write_text(json.dumps([schema]))
    rc, out, err = _main(
        [
            model,
            "--prompt",
            "天气？",
            "--tokenizer",
            TOK / "glm-4-9b-chat",
            "--tools",
            tools,
            "--max-new-tokens",
            "6",
            "--show-prompt-ids",
        ]
    )
    assert rc == 0, err
    tok = load_tokenizer(TOK / "glm-4-9b-chat")
    want = tok.apply_chat_template(
        [
            {"role": "system", "content": None, "tools": [{"type": "function", "function": schema}]},
            {"role": "user", "content": "天气？"},
        ]
    )
    assert _prompt_ids(err) == [want]
    assert out.endswith("\n") and len(out.splitlines()) >= 1


def test_empty_reply_says_why(chatglm_dir, monkeypatch):
    """A reply with no text (the model stops at once, as a barely trained one does) is reported on stderr, not left
    as a bare empty line."""
    import glm_jax.stream

    rc, out, err = _main([chatglm_dir, "--prompt", "hi", "--max-new-tokens", "4"])
    assert rc == 0 and out.strip() and "reply is empty" not in err  # the fixture model does reply
    eos = load_tokenizer(chatglm_dir).stop_token_ids[0]
    monkeypatch.setattr(glm_jax.stream, "stream_generate", lambda *a, **k: iter([eos]))
    rc, out, err = _main([chatglm_dir, "--prompt", "hi", "--max-new-tokens", "4"])
    assert rc == 0 and out == "\n", err
    assert f"the reply is empty: 0 token(s) of blank text, then it ended with stop token {eos}" in err


def test_sampling_follows_the_folders_generation_config(chatglm_dir, tmp_path, monkeypatch):
    """Sampling settings the command line leaves unset come from PATH's generation_config.json, as transformers'
    generate takes them; flags win, --greedy turns sampling off; a bad file is one error line, exit 2."""
    import glm_jax.stream

    seen = []

    def record(lm, ids, max_new, do_sample, temperature, top_k, top_p, seed, stop_token_ids):
        seen.append((do_sample, temperature, top_k, top_p))
        return iter([])

    model = tmp_path / "m"
    shutil.copytree(chatglm_dir, model)
    gen = model / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "do_sample": True, "temperature": 0.7, "top_k": 20}))
    monkeypatch.setattr(glm_jax.stream, "stream_generate", record)
    assert _main([chatglm_dir, "--prompt", "hi"]).code == 0  # the fixture's file sets no sampling: greedy
    assert _main([model, "--prompt", "hi"]).code == 0
    assert _main([model, "--prompt", "hi", "--temperature", "0.5", "--top-p", "0.9"]).code == 0
    assert _main([model, "--prompt", "hi", "--greedy"]).code == 0
    assert seen == [(False, 1.0, 0, 1.0), (True, 0.7, 20, 1.0), (True, 0.5, 20, 0.9), (False, 0.7, 20, 1.0)]
    gen.write_text(json.dumps({"do_sample": True, "temperature": 0}))
    assert "generation_config.json: temperature must be positive" in _bad([model, "--prompt", "hi"])
    gen.write_text(json.dumps({"do_sample": "yes"}))
    assert "generation_config.json: do_sample must be a boolean" in _bad([model, "--prompt", "hi"])

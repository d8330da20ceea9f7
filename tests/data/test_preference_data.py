"""glm_jax.data.preference against the chat-template fixtures and against TRL 1.16's own DPO rendering.

TRL is called as it runs: DPOTrainer._prepare_dataset (as a plain function on a stand-in `self`) on a
transformers tokenizer carrying the released GLM-4.6 chat template, then its DataCollatorForPreference. The
ChatGLM3 and GLM-4 cases compare with the ids the families' reference code produced (tests/fixtures/chat-templates).
"""

import copy
import json
import types

import pytest
from helpers import FIX

from glm_jax import load_tokenizer
from glm_jax.data import preference
from glm_jax.data.preference import PreferenceRecordError

FIXTURES = FIX
CHAT = FIXTURES / "chat-templates"
GLM45 = FIXTURES / "glm4-moe-chat"


def _cases(family, key):
    return {c["id"]: c for c in json.loads((CHAT / family / "chat.json").read_text(encoding="utf-8"))[key]}


# ---------------------------------------------------------------- TRL on GLM-4.5/4.6


@pytest.fixture(scope="module")
def trl_prepare():
    import datasets
    import transformers
    import trl.trainer.dpo_trainer as dpo_trainer

    hf = transformers.AutoTokenizer.from_pretrained(str(GLM45), local_files_only=True)
    hf.chat_template = (GLM45 / "GLM-4.6.chat_template.jinja").read_text(encoding="utf-8")
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")

    def prepare(records):
        ds = datasets.Dataset.from_list([copy.deepcopy(r) for r in records])
        out = dpo_trainer.DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf), ds, hf, args, "train")
        return [{k: out[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(out))]

    return prepare, dpo_trainer.DataCollatorForPreference(pad_token_id=hf.pad_token_id)


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


RECORDS = [
    {"prompt": _user("What is 2+2?"), "chosen": _assistant("4"), "rejected": _assistant("5, I think.")},
    {
        "prompt": [{"role": "system", "content": "Answer briefly."}, *_user("Name a prime.")],
        "chosen": _assistant("7"),
        "rejected": _assistant("Nine is prime."),
    },
    {
        "prompt": [*_user("hi"), *_assistant("Hello! How can I help?"), *_user("写一首诗")],
        "chosen": _assistant("床前明月光，\n疑是地上霜。"),
        "rejected": _assistant("No."),
    },
    {
        "prompt": _user("Think first: 3*3?"),
        "chosen": [{"role": "assistant", "reasoning_content": "3 times 3 is 9.", "content": "9"}],
        "rejected": [{"role": "assistant", "reasoning_content": "maybe 6", "content": "6"}],
    },
]


def test_glm45_pairs_equal_trl(trl_prepare):
    prepare, collate = trl_prepare
    tok = load_tokenizer(GLM45)
    theirs = prepare(RECORDS)
    ours = [preference.encode(tok, r) for r in RECORDS]
    for o, t in zip(ours, theirs, strict=True):
        assert (o.prompt_ids, o.chosen_ids, o.rejected_ids) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
        assert o.chosen_mask == [1] * len(o.chosen_ids) and o.rejected_mask == [1] * len(o.rejected_ids)
    assert any(len(o.chosen_ids) > 5 for o in ours)  # not only trivial completions
    # TRL's collator on TRL's rendering; its completion_mask is our masks after the prompt
    batch = collate(theirs)
    for i, o in enumerate(ours + ours):
        chosen = i < len(ours)
        ids = o.prompt_ids + (o.chosen_ids if chosen else o.rejected_ids)
        mask = [0] * len(o.prompt_ids) + (o.chosen_mask if chosen else o.rejected_mask)
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["completion_mask"][i].tolist() == mask + [0] * (batch["input_ids"].shape[1] - len(ids))


def test_string_fields_are_one_turn(trl_prepare):
    """A prompt string is one user turn and a completion string one assistant turn (§3.12): the same ids as TRL
    gives for that conversational record."""
    prepare, _ = trl_prepare
    tok = load_tokenizer(GLM45)
    (theirs,) = prepare(
        [{"prompt": _user("Capital of France?"), "chosen": _assistant("Paris"), "rejected": _assistant("Lyon")}]
    )
    ours = preference.encode(tok, {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"})
    assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == tuple(theirs.values())


# ---------------------------------------------------------------- reference ids of GLM-4 and ChatGLM3


def test_glm4_against_reference_renderings():
    tok = load_tokenizer(CHAT / "glm-4-9b-chat")
    assistant_id = tok.token_to_id("<|assistant|>")
    case = _cases("glm-4-9b-chat", "apply_chat_template_cases")
    pairs = [c for c in case.values() if not c["add_generation_prompt"]]
    assert pairs and [m["role"] for m in pairs[0]["messages"]] == ["user", "assistant"]
    want = pairs[0]["input_ids"]  # the reference rendering of the user turn and the reply, no generation prompt
    msgs = pairs[0]["messages"]
    pair = preference.encode(tok, {"prompt": msgs[:1], "chosen": msgs[1:], "rejected": "x"})
    cut = want.index(assistant_id) + 1
    assert pair.prompt_ids == want[:cut] and pair.chosen_ids == want[cut:]
    assert pair.chosen_mask == [1] * len(pair.chosen_ids)

    # a multi-turn conversation: the reply is the reference's ids between the prompt and the next <|user|>
    multi = next(
        c for c in case.values() if [m["role"] for m in c["messages"]][2:5] == ["assistant", "user", "assistant"]
    )
    msgs, want = multi["messages"], multi["input_ids"]
    pair = preference.encode(tok, {"prompt": msgs[:4], "chosen": msgs[4:5], "rejected": "no"})
    user_id = tok.token_to_id("<|user|>")
    last_user = len(want) - 1 - want[::-1].index(user_id)
    assert pair.prompt_ids + pair.chosen_ids == want[:last_user]
    assert pair.prompt_ids[-1] == assistant_id


def test_chatglm3_tool_call_observation_reply():
    """A completion of three messages (a tool call, its observation, the reply): the ids are the reference's
    per-message ids, and the loss flags cover the assistant's tokens plus the <|observation|> that ends its call,
    not the observation's text nor the <|assistant|> the caller inserts after it."""
    tok = load_tokenizer(CHAT / "chatglm3-6b")
    case = _cases("chatglm3-6b", "build_chat_input_cases")["next_user_turn_after_tool_answer"]
    hist = case["history"]
    assert [m["role"] for m in hist] == ["system", "user", "assistant", "observation", "assistant"]
    per_msg = [m["ids"] for m in case["messages_ids"]]
    pair = preference.encode(tok, {"prompt": hist[:2], "chosen": hist[2:], "rejected": hist[4:]})
    gmask_sop = case["input_ids"][:2]
    assert pair.prompt_ids == gmask_sop + per_msg[0] + per_msg[1] + [per_msg[2][0]]  # ... <|assistant|>
    call, obs, reply = per_msg[2][1:], per_msg[3], per_msg[4]
    assert pair.chosen_ids == call + obs + reply
    assert pair.chosen_mask == [1] * len(call) + [1] + [0] * (len(obs) - 1) + [0] + [1] * (len(reply) - 1)
    assert pair.rejected_ids == reply[1:] and pair.rejected_mask == [1] * (len(reply) - 1)


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm2-6b"])
def test_round_prompt_formats_are_refused(family):
    tok = load_tokenizer(CHAT / family)
    with pytest.raises(PreferenceRecordError, match="chatglm3, glm4, glm4_5"):
        preference.encode(tok, {"prompt": "q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": "q", "chosen": "a"}, "'rejected'"),
        ({"prompt": "q", "chosen": [], "rejected": "b"}, '"chosen"'),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, '"prompt"'),
        ({"prompt": "q", "chosen": [{"content": "a"}], "rejected": "b"}, '"chosen"'),
    ],
)
def test_bad_records(record, match):
    tok = load_tokenizer(CHAT / "glm-4-9b-chat")
    with pytest.raises(PreferenceRecordError, match=match):
        preference.encode(tok, record)

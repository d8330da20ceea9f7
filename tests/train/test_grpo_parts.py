"""GRPO's host-side pieces (train/rl/grpo.py, train/rl/rewards.py): advantages against TRL 1.16's own code
(trl.trainer.utils.nanstd and grpo_trainer.py:2759-2790, the torch lines run as TRL writes them), the built-in
rewards on hand-checked completions, and the grpo.* config checks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils")


def _trl_advantages(rewards_per_func, weights, G, scale_rewards):
    """grpo_trainer.py:2756-2790 (sum_then_normalize), verbatim but for the variable plumbing."""
    rewards_per_func = torch.tensor(rewards_per_func, dtype=torch.float32)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * torch.tensor(weights, dtype=torch.float32).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_utils.nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std_rewards = trl_utils.nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    advantages[unscorable_mask] = 0.0  # grpo_trainer.py: unscorable completions get no advantage
    return advantages.numpy(), rewards.numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    from train.rl.grpo import advantages

    rng = np.random.default_rng(0)
    G, F = 4, 3
    r = rng.normal(size=(5 * G, F))
    r[rng.random(r.shape) < 0.2] = np.nan  # None rewards
    r[3] = np.nan  # an unscorable completion
    r[8:12, 0], r[8:12, 1:] = 2.0, np.nan  # a group whose rewards all agree: std 0
    w = [1.0, 0.5, -2.0]
    adv, rew = advantages(r, w, G, scale)
    ref_adv, ref_rew = _trl_advantages(r, w, G, scale)
    # TRL sums in float32, we in float64: three terms of magnitude <= ~4 round to within 3 x 2^-22 ~ 1e-6
    np.testing.assert_allclose(rew, ref_rew, rtol=0, atol=1e-6, equal_nan=True)
    # divided by a std >= ~0.6 here (or 1e-4 where the std is 0 and the numerator exactly 0): ~3e-6
    np.testing.assert_allclose(adv, ref_adv, rtol=0, atol=1e-5)


def test_exact_answer():
    from train.rl.rewards import exact_answer

    comps = ["so \\boxed{1,000}", "<think>2+2=5</think>The answer is 4.", "no number", "3/4 then \\boxed{\\frac{3}{4}}"]
    assert exact_answer([""] * 4, comps, answer=["1000", "4", "3", "\\frac{3}{4}"]) == [1.0, 1.0, 0.0, 1.0]
    assert exact_answer([""], ["7.0"], answer=["7"]) == [1.0]
    assert exact_answer([""], ["x = 12"], answer=[None]) == [None]
    conv = [[{"role": "assistant", "content": "it is 9"}]]
    assert exact_answer([[{"role": "user", "content": "4+5"}]], conv, answer=["9"]) == [1.0]


def test_think_format():
    from train.rl.rewards import think_format

    comps = ["<think>add them</think>\n9", "9", "<think></think>9", "<think>a</think>", "<think>a</think>9</think>"]
    assert think_format([""] * 5, comps) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_tool_call_valid():
    from train.rl.rewards import tool_call_valid

    comps = [
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",  # GLM-4.5
        'get_weather\n{"city": "Paris"}',  # GLM-4
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",  # an argument without a value
        "<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>x</arg_value>",  # unclosed
        'get_weather\n{"city": Paris}',  # not JSON
        "It is sunny.",
    ]
    assert tool_call_valid([""] * 6, comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    assert tool_call_valid([""] * 2, comps[:2], tools=[tools, tools]) == [0.0, 0.0]
    assert tool_call_valid([""], comps[:1], tools=[["get_weather"]]) == [1.0]


def test_load_reward(tmp_path):
    from train.rl.rewards import exact_answer, load_reward

    assert load_reward("exact_answer") is exact_answer
    assert load_reward("train.rl.rewards:exact_answer") is exact_answer
    f = tmp_path / "mine.py"
    f.write_text("def has_seven(prompts, completions, **kw):\n    return [float('7' in c) for c in completions]\n")
    assert load_reward(f"{f}:has_seven")(prompts=[""], completions=["a7"]) == [1.0]
    for bad in ("nope", "train.rl.rewards:missing", f"{tmp_path}/absent.py:f", "no_such_module_xyz:f"):
        with pytest.raises(ValueError):
            load_reward(bad)


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        (["grpo.num_generations=3"], "divide batch_size"),
        (["grpo.loss_type=ppo"], "grpo.loss_type"),
        (["grpo.scale_rewards=max"], "grpo.scale_rewards"),
        (["grpo.rewards=[]"], "grpo.rewards"),
        (["grpo.reward_weights=[1, 2]"], "grpo.reward_weights"),
        (["grpo.top_p=0"], "top_p"),
        (["grpo.max_new_tokens=8"], "seq_len"),
    ],
)
def test_bad_grpo_keys(over, msg):
    from train.config import TrainConfigError, build

    with pytest.raises(TrainConfigError, match=msg):
        build("grpo_tiny", over)

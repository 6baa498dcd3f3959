"""Format rewards, weighted combination (against TRL's nansum formula) and the fault-isolating wrapper."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from posttrain.rewards.combine import combine_rewards
from posttrain.rewards.format import (
    answer_line_format_reward,
    make_answer_line_format_reward,
    think_answer_format_reward,
)
from posttrain.rewards.guard import GuardedReward, call_reward
from posttrain.rewards.math import math_reward


def test_answer_line_format():
    completions = ["x\nAnswer: 42", "Answer: -3.5\n\n", "answer: 1,000", "Answer: 42\nmore", "Answer: forty",
                   [{"role": "assistant", "content": "Answer: 7"}], "", "Answer 42"]
    assert answer_line_format_reward(prompts=None, completions=completions) == [1, 1, 1, 0, 0, 1, 0, 0]
    text_reward = make_answer_line_format_reward("Final", numeric=False)
    assert text_reward(prompts=None, completions=["Final: (B)", "Final:  ", "Answer: 3"]) == [1, 0, 0]


def test_think_answer_format():
    completions = [
        "<think>add 2 and 2</think>\n<answer>4</answer>",
        "  <think>\nhmm\n</think><answer>4</answer>\n",
        "<think>a</think><answer>4</answer> trailing",
        "<answer>4</answer>",
        "<think></think><answer>4</answer>",  # empty reasoning
        "<think>a</think><think>b</think><answer>4</answer>",  # tags twice
        "<think>a<answer>3</answer></think><answer>4</answer>",
    ]
    assert think_answer_format_reward(prompts=None, completions=completions) == [1, 1, 0, 0, 0, 0, 0]


def _const(values, name):
    def f(prompts, completions, **kwargs):
        return list(values)

    f.__name__ = name
    return f


def test_combination_matches_trl_weighted_nansum():
    a = _const([1.0, None, 0.5, None], "a")
    b = _const([0.0, 2.0, None, None], "b")
    c = _const([1.0, 1.0, 1.0, None], "c")
    weights = [0.5, 2.0, -1.0]
    combined = combine_rewards([a, b, c], weights)
    got = combined(prompts=[""] * 4, completions=[""] * 4)
    # by hand: row 0 = 0.5*1 + 2*0 - 1*1; row 1 = 2*2 - 1; row 2 = 0.5*0.5 - 1; row 3: nothing applies -> 0.0
    assert got == [-0.5, 3.0, -0.75, 0.0]
    # TRL GRPOTrainer: None -> NaN, then (rewards_per_func * weights).nansum(dim=1)
    per_func = torch.tensor([[float("nan") if v is None else v for v in f(None, None)] for f in (a, b, c)]).T
    assert torch.allclose(torch.tensor(got), (per_func * torch.tensor(weights)).nansum(dim=1))
    assert combined.last_components == {"a": [1.0, None, 0.5, None], "b": [0.0, 2.0, None, None],
                                        "c": [1.0, 1.0, 1.0, None]}
    keep_none = combine_rewards([a, b, c], weights, all_none=None)
    assert keep_none(prompts=[""] * 4, completions=[""] * 4)[3] is None


def test_combination_with_real_rewards_and_errors():
    combined = combine_rewards([math_reward, answer_line_format_reward], [1.0, 0.1])
    got = combined(prompts=["q"] * 3, completions=["Answer: 4", "Answer: 5", r"\boxed{4}"], answer=["4"] * 3)
    assert got == pytest.approx([1.1, 0.1, 1.0])
    assert combined.__name__ == "combined_reward"
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        combine_rewards([math_reward, answer_line_format_reward], [1.0])
    short = combine_rewards([_const([1.0], "short")])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        short(prompts=["", ""], completions=["", ""])


def _fragile(prompts, completions, answer, **kwargs):
    if any("boom" in c for c in completions):
        raise RuntimeError("cannot score")
    return [float(c == a) for c, a in zip(completions, answer)]


def test_guard_retries_items_and_counts_errors():
    guarded = GuardedReward(_fragile, fallback=0.0)
    got = guarded(prompts=["p"] * 3, completions=["1", "boom", "3"], answer=["1", "2", "4"])
    assert got == [1.0, 0.0, 0.0]  # items 0 and 2 scored on their own, item 1 substituted
    assert guarded.counters == {"reward_errors": 1, "reward_timeouts": 0}
    assert guarded(prompts=["p"], completions=["boom"], answer=["x"]) == [0.0]
    assert guarded.pop_counters() == {"reward_errors": 2, "reward_timeouts": 0}
    assert guarded.counters == {"reward_errors": 0, "reward_timeouts": 0}
    no_retry = call_reward(_fragile, per_item_retry=False, fallback=None, prompts=["p"] * 2,
                           completions=["1", "boom"], answer=["1", "2"])
    assert no_retry.rewards == [None, None] and no_retry.errors == 2


def test_guard_slices_trl_keywords_per_item():
    seen = []

    def spy(prompts, completions, completion_ids, trainer_state, log_extra, **kwargs):
        seen.append((list(completion_ids), trainer_state))
        if len(completions) > 1:
            raise ValueError("batch path broken")
        return [float(len(completion_ids[0]))]

    state = object()
    got = GuardedReward(spy)(prompts=["a", "b"], completions=["x", "y"], completion_ids=[[1, 2], [3]],
                             trainer_state=state, log_extra=lambda *a: None)
    assert got == [2.0, 1.0]
    assert seen[1:] == [([[1, 2]], state), ([[3]], state)]  # per-column lists sliced, other keywords passed as is


def test_guard_times_out_and_substitutes():
    release = threading.Event()

    def slow(prompts, completions, **kwargs):
        release.wait(5)
        return [1.0] * len(completions)

    guarded = GuardedReward(slow, timeout_s=0.2, fallback=None)
    start = time.monotonic()
    assert guarded(prompts=["p"] * 4, completions=["c"] * 4) == [None] * 4
    assert time.monotonic() - start < 1.0
    assert guarded.counters == {"reward_errors": 0, "reward_timeouts": 4}
    release.set()


@pytest.mark.parametrize("bad", [[1.0], "1.0", [1.0, "high"], None], ids=["short", "string", "bad_item", "none"])
def test_guard_rejects_invalid_returns(bad):
    def returns_bad(prompts, completions, **kwargs):
        return bad

    result = call_reward(returns_bad, per_item_retry=False, prompts=["p"] * 2, completions=["a", "b"])
    assert result.rewards == [0.0, 0.0] and result.errors == 2


def test_guard_maps_nan_to_none_and_runs_math_in_a_worker_thread():
    assert call_reward(_const([float("nan"), 1], "nan"), prompts=["p"] * 2, completions=["", ""]).rewards == [None, 1.0]
    guarded = GuardedReward(math_reward, timeout_s=30)  # runs in a thread: math-verify must not use signal.alarm
    completions = [r"\boxed{\frac{1}{2}}", r"\boxed{2}"]
    assert guarded(prompts=["q"] * 2, completions=completions, answer=["0.5"] * 2) == [1.0, 0.0]
    assert guarded.counters == {"reward_errors": 0, "reward_timeouts": 0}


def test_rewards_are_built_by_name():
    from posttrain.errors import ConfigError
    from posttrain.rewards import REWARDS, build_reward

    assert set(REWARDS) == {"math", "gym", "code", "answer_format", "think_format"}
    lenient = build_reward("gym", extract="last_number")
    assert lenient.__name__ == "gym_reward"
    assert build_reward("answer_format", numeric=False)(prompts=None, completions=["Answer: B"]) == [1.0]
    assert build_reward("think_format") is think_answer_format_reward
    with pytest.raises(ConfigError, match="unknown reward 'maths'"):
        build_reward("maths")


def test_completion_text_accepts_both_trl_formats():
    from posttrain.rewards.text import completion_text

    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "chat"}]) == "chat"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]) == "ab"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]) == "x"
    with pytest.raises(TypeError, match="a completion must be a string or a list of chat messages"):
        completion_text(3)

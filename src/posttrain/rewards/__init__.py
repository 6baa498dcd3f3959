"""Verifiable rewards with TRL's calling convention: `f(prompts=..., completions=..., **dataset_columns)` returns one
float (or None, "not applicable") per completion; completions may be strings or chat lists.

- math.py: math-verify on \\boxed{} / `Answer:` answers; gym.py: reasoning-gym rows and their own scorers;
- code.py: HumanEval-style unit tests run in sandbox.py; format.py: format rewards;
- combine.py: weighted sums with TRL's None rule; guard.py: exceptions and timeouts caught, counted, substituted.

Recipes pick rewards by name through `build_reward(name, **options)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from posttrain.errors import ConfigError
from posttrain.rewards.code import CodeReward, code_reward, humaneval_rows
from posttrain.rewards.combine import CombinedReward, combine_rewards, score_completions
from posttrain.rewards.format import (
    answer_line_format_reward,
    make_answer_line_format_reward,
    think_answer_format_reward,
)
from posttrain.rewards.guard import GuardedReward, call_reward
from posttrain.rewards.gym import gym_reward, gym_rows, gym_score, make_gym_reward
from posttrain.rewards.math import make_math_reward, math_reward
from posttrain.rewards.sandbox import SandboxConfig, SandboxResult, run_many, run_sandboxed
from posttrain.rewards.text import completion_text

REWARDS: dict[str, Callable[..., Any]] = {
    "math": make_math_reward,  # options: sources
    "gym": make_gym_reward,  # options: extract, partial_credit
    "code": CodeReward,  # options: config (SandboxConfig), max_workers
    "answer_format": make_answer_line_format_reward,  # options: label, numeric
    "think_format": lambda: think_answer_format_reward,
}


def build_reward(name: str, **options: Any) -> Callable[..., list]:
    """The reward function registered as `name`, built with `options`."""
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; expected one of {', '.join(sorted(REWARDS))}")
    factory = REWARDS[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        valid = [p for p in inspect.signature(factory).parameters if p not in ("name",)]
        unknown = [k for k in options if k not in valid]
        raise ConfigError(f"key 'reward_options': reward {name!r} has no option(s) {unknown}; its options: "
                          f"{', '.join(valid) or 'none'}.") from None
    return factory(**options)


def build_rewards(specs: list, options: dict[str, dict[str, Any]], timeout_s: float,
                  max_error_rate: float | None = None) -> list:
    """Reward functions from names, `file.py:func` / `module:func` specs or callables (rewards/user.py), each
    guarded: errors and timeouts are counted; more than `max_error_rate` errors in a batch stop the run."""
    from posttrain.rewards.user import build_reward_functions

    return build_reward_functions(specs, options, timeout_s=timeout_s, max_error_rate=max_error_rate)


__all__ = [
    "REWARDS",
    "CodeReward",
    "CombinedReward",
    "GuardedReward",
    "SandboxConfig",
    "SandboxResult",
    "answer_line_format_reward",
    "build_reward",
    "build_rewards",
    "call_reward",
    "code_reward",
    "combine_rewards",
    "completion_text",
    "gym_reward",
    "gym_rows",
    "gym_score",
    "humaneval_rows",
    "make_answer_line_format_reward",
    "make_gym_reward",
    "make_math_reward",
    "math_reward",
    "run_many",
    "run_sandboxed",
    "score_completions",
    "think_answer_format_reward",
]

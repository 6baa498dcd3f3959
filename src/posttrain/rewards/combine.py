"""Weighted combination of reward functions, with TRL's None semantics (GRPOTrainer: weighted nansum over functions).

A reward function may return None for a completion it does not apply to. As in TRL, the combined reward of a
completion is the weighted sum over the functions that did return a number; when none did, it is `all_none`
(TRL's nansum gives 0.0, the default here; pass None to keep such rows visible as "not applicable").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFunc = Callable[..., list]


def reward_name(func: Any) -> str:
    """A reward function's name for logs: its __name__, else its class name."""
    return getattr(func, "__name__", None) or type(func).__name__


class CombinedReward:
    """`CombinedReward(funcs, weights)(prompts=..., completions=..., **columns)` -> list[float | None].

    After each call `last_components` maps each function's name to its own list of rewards, for logging.
    """

    def __init__(self, funcs: Sequence[RewardFunc], weights: Sequence[float] | None = None, *,
                 all_none: float | None = 0.0, name: str = "combined_reward"):
        if not funcs:
            raise ValueError("combine_rewards needs at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"combine_rewards: {len(funcs)} reward functions but {len(weights)} weights")
        names = [reward_name(f) for f in funcs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.funcs, self.weights, self.all_none, self.__name__ = list(funcs), weights, all_none, name
        self.last_components: dict[str, list[float | None]] = {}

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        columns = []
        for name, func in zip(self.names, self.funcs):
            column = list(func(prompts=prompts, completions=completions, **kwargs))
            if len(column) != len(completions):
                raise ValueError(f"reward function {name!r} returned {len(column)} rewards for "
                                 f"{len(completions)} completions")
            columns.append(column)
        self.last_components = dict(zip(self.names, columns))
        combined: list[float | None] = []
        for i in range(len(completions)):
            # NaN counts as "not applicable" like None (TRL maps None to NaN and takes a nansum)
            terms = [w * float(col[i]) for w, col in zip(self.weights, columns)
                     if col[i] is not None and not math.isnan(float(col[i]))]
            combined.append(sum(terms) if terms else self.all_none)
        return combined


def combine_rewards(funcs: Sequence[RewardFunc], weights: Sequence[float] | None = None, *,
                    all_none: float | None = 0.0, name: str = "combined_reward") -> CombinedReward:
    """One TRL-style reward function computing sum_k w_k r_k over the functions k that scored the completion."""
    return CombinedReward(funcs, weights, all_none=all_none, name=name)


def score_completions(
    reward_fns: Sequence[RewardFunc], weights: Sequence[float], rows: list[dict[str, Any]], completions: list[str],
    *, completion_ids: list[list[int]] | None = None, trainer_state: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards of an RL rollout: the weighted sum of `CombinedReward` (None entries skipped, all-None gives 0).

    rows: the dataset row of each completion; completions: the generated texts. The functions get TRL's keywords
    (rewards.user.reward_keywords: message-list completions for conversational prompts, completion_ids,
    trainer_state, every column but prompt/completion). Returns ([N] float32 rewards, each function's [N] float64
    values with NaN for None, in the order of `reward_fns`).
    """
    from posttrain.rewards.user import reward_keywords

    combined = CombinedReward(reward_fns, weights)
    total = combined(**reward_keywords(rows, completions, completion_ids=completion_ids, trainer_state=trainer_state))
    parts = {name: torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)
             for name, values in combined.last_components.items()}
    return torch.tensor(total, dtype=torch.float64).float(), parts

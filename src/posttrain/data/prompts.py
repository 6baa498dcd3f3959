"""Prompts of the online RL recipes (GRPO family, PPO): where they come from (files or a reasoning-gym task) and the
seeded, checkpointable pool that hands them out step by step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.config import field as key
from posttrain.errors import ConfigError


@dataclass
class PromptPool:
    """The training prompts, visited in a seeded order epoch after epoch, with ScaleRL's no-positive-resampling.

    A prompt whose latest group pass rate reaches `pass_rate_cap` is retired for good (ScaleRL §4: "prompts with
    pass rate >= 0.9 are permanently removed from later epochs"); cap 1.0+ disables retirement. The state
    (cursor, epoch, retired) is checkpointed, so a resumed run draws the same prompts.
    """

    size: int
    seed: int
    pass_rate_cap: float = 1.01
    cursor: int = 0
    epoch: int = 0
    retired: set[int] = field(default_factory=set)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        """The next k active prompt indices (wrapping into new epochs); raises when every prompt is retired."""
        if len(self.retired) >= self.size:
            raise RuntimeError("every training prompt has been retired by no-positive-resampling")
        out: list[int] = []
        order = self._order(self.epoch)
        while len(out) < k:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order(self.epoch)
            i = order[self.cursor]
            self.cursor += 1
            if i not in self.retired:
                out.append(i)
        return out

    def report(self, index: int, pass_rate: float) -> None:
        """Record a prompt's latest group pass rate (retires it at `pass_rate_cap`)."""
        if pass_rate >= self.pass_rate_cap:
            self.retired.add(index)

    def state(self) -> dict[str, Any]:
        """The checkpointed position: cursor, epoch and retired prompts."""
        return {"cursor": self.cursor, "epoch": self.epoch, "retired": sorted(self.retired)}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`."""
        self.cursor, self.epoch, self.retired = state["cursor"], state["epoch"], set(state["retired"])


@dataclass(kw_only=True)
class PromptSource:
    """Config keys of the online RL recipes (GRPO, PPO): where prompts come from and how reward calls run."""

    train_file: str | None = key(None, help="prompt-only rows (+ columns the rewards use, e.g. answer)")
    task: str | None = key(None, help="or a reasoning-gym task name to generate prompts offline")
    task_size: int = key(512, help="training prompts generated from `task`")
    task_seed: int = key(0, help="generator seed for `task` (held-out prompts use task_seed + 1000)")
    task_kwargs: dict = key(default_factory=dict, help="generator settings for `task`, e.g. {min_terms: 2}")
    task_instruction: str = key("\nGive the result alone on the last line as `Answer: <number>`.",
                                help="appended to each generated question")
    reward_options: dict = key(default_factory=dict, help="per-reward options, e.g. {gym: {extract: last_number}}")
    reward_timeout_s: float = key(60.0, help="a reward call slower than this is abandoned and counted")
    reward_max_error_rate: float = key(0.5, help="a reward raising on more than this share of a batch stops the run "
                                                 "with its traceback and the row (1 = never stop; errors score 0)")

    def validate_prompt_source(self) -> None:
        """Exactly one of train_file / task."""
        if (self.train_file is None) == (self.task is None):
            raise ConfigError("set exactly one of 'train_file' (prompt rows) or 'task' (a reasoning-gym task).")

    def prompt_rows(self, eval_file: str | None = None, eval_size: int = 0):
        """(train rows, held-out rows), validated before any model is loaded (load_prompt_rows)."""
        return load_prompt_rows(self.train_file, eval_file, task=self.task, task_size=self.task_size,
                                task_seed=self.task_seed, task_kwargs=self.task_kwargs,
                                instruction=self.task_instruction, eval_size=eval_size)


def load_prompt_rows(
    train_file: str | None, eval_file: str | None, *, task: str | None, task_size: int, task_seed: int,
    task_kwargs: dict[str, Any], instruction: str, eval_size: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) from prompt files (validated) or a reasoning-gym task (held-out seed + 1000)."""
    if train_file is not None:
        from posttrain.data.formats import load_dataset_file

        train, _ = load_dataset_file(train_file, "rl")
        held_out = load_dataset_file(eval_file, "rl")[0] if eval_file else []
        return train, held_out
    from posttrain.rewards.gym import gym_rows

    assert task is not None  # validate_prompt_source: exactly one of train_file / task
    train = gym_rows(task, task_size, task_seed, instruction=instruction, **task_kwargs)
    held_out = gym_rows(task, eval_size, task_seed + 1000, instruction=instruction, **task_kwargs) if eval_size > 0 else []
    return train, held_out

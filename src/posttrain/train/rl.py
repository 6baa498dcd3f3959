"""Shared pieces of the online RL recipes (GRPO family, PPO): the prompt pool, rollouts as training tensors, rewards.

Layout: a rollout of B prompts × G samples gives N = B·G rows, prompt-major (row i is sample i % G of prompt i // G).
Each row becomes one right-padded sequence `prompt + completion` of length L. Per-token tensors are [N, L] with the
log-prob of token t+1 stored at position t (the `shift_labels` convention), so `mask` marks the positions whose
label is a completion token. The sampler's per-token log-probs [N, T_c] are scattered into that layout.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.config import field as key
from posttrain.data.collate import SharedPrefixBatch, pack_shared_prefix
from posttrain.errors import ConfigError
from posttrain.generation.sampler import Rollouts
from posttrain.ops.logps import IGNORE_INDEX


@dataclass
class SequenceBatch:
    """Training tensors for N rollout rows.  All [N, L] except `completion_lengths` [N]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX outside completion tokens
    mask: torch.Tensor  # bool, labels != IGNORE_INDEX
    gen_logps: torch.Tensor  # sampler's log-probs in the same layout, 0 outside the mask
    completion_lengths: torch.Tensor
    prompt_lengths: torch.Tensor  # [N]

    def select(self, rows: torch.Tensor | list[int]) -> SequenceBatch:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return SequenceBatch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def shared_prefix(self, rows: slice, pad_id: int) -> SharedPrefixBatch:
        """Rows `rows` packed with each prompt once (data.collate.pack_shared_prefix), for TokenLogps.shared_prefix."""
        return pack_shared_prefix(self.input_ids[rows], self.prompt_lengths[rows], self.completion_lengths[rows], pad_id)


def rollout_batch(rollouts: Rollouts, pad_id: int) -> SequenceBatch:
    """Concatenate each row's prompt and completion, right-pad, and align the sampler's log-probs with the labels."""
    G = rollouts.n
    lengths = rollouts.lengths  # [N]
    N = len(lengths)
    prompts = [rollouts.prompt_ids[i // G] for i in range(N)]
    L = max(len(p) + c for p, c in zip(prompts, lengths))
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    gen_logps = torch.zeros((N, L), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, lengths)):
        P = len(p)
        completion = rollouts.completion_ids[i, :c]
        input_ids[i, :P] = torch.tensor(p)
        input_ids[i, P:P + c] = completion
        labels[i, P - 1:P - 1 + c] = completion  # position t predicts token t+1
        gen_logps[i, P - 1:P - 1 + c] = rollouts.logps[i, :c].float()
    position_ids = torch.arange(L).expand(N, L).clone()
    return SequenceBatch(input_ids, position_ids, labels, labels != IGNORE_INDEX, gen_logps,
                         torch.tensor(lengths, dtype=torch.long), torch.tensor([len(p) for p in prompts]))


def completion_view(x: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """[N, L] label-layout tensor -> [N, T_c] completion-aligned (right-padded with 0), e.g. for GAE."""
    T = int(batch.completion_lengths.max())
    start = batch.mask.float().argmax(dim=1)  # [N] first completion position
    steps = torch.arange(T, device=x.device)
    idx = (start[:, None] + steps[None, :]).clamp(max=x.shape[1] - 1)  # [N, T_c]
    valid = steps[None, :] < batch.completion_lengths[:, None]
    return torch.where(valid, x.gather(1, idx), torch.zeros((), dtype=x.dtype))


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
        if pass_rate >= self.pass_rate_cap:
            self.retired.add(index)

    def state(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "epoch": self.epoch, "retired": sorted(self.retired)}

    def load(self, state: dict[str, Any]) -> None:
        self.cursor, self.epoch, self.retired = state["cursor"], state["epoch"], set(state["retired"])


def compute_rewards(
    reward_fns: list[Callable[..., list]], weights: list[float], rows: list[dict[str, Any]], completions: list[str],
    *, completion_ids: list[list[int]] | None = None, trainer_state: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the reward functions (TRL's rule: None entries are skipped, all-None gives 0).

    rows: the dataset row of each completion; completions: the generated texts. The functions get TRL's keywords
    (posttrain.rewards.user.reward_keywords: message-list completions for conversational prompts, completion_ids,
    trainer_state, every column). Returns ([N] rewards, each function's [N] values with NaN for None).
    """
    from posttrain.rewards.user import reward_keywords

    kwargs = reward_keywords(rows, completions, completion_ids=completion_ids, trainer_state=trainer_state)
    total = torch.zeros(len(completions), dtype=torch.float64)
    seen = torch.zeros(len(completions), dtype=torch.bool)
    parts: dict[str, torch.Tensor] = {}
    for fn, w in zip(reward_fns, weights):
        values = fn(**kwargs)
        as_tensor = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)
        parts[getattr(fn, "__name__", "reward")] = as_tensor
        present = ~torch.isnan(as_tensor)
        total = total + torch.where(present, as_tensor * w, 0.0)
        seen |= present
    return torch.where(seen, total, 0.0).float(), parts


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

    train = gym_rows(task, task_size, task_seed, instruction=instruction, **task_kwargs)
    held_out = gym_rows(task, eval_size, task_seed + 1000, instruction=instruction, **task_kwargs) if eval_size > 0 else []
    return train, held_out


def build_rewards(specs: list, options: dict[str, dict[str, Any]], timeout_s: float,
                  max_error_rate: float | None = None) -> list:
    """Reward functions from names, `file.py:func` / `module:func` specs or callables (rewards.user), each guarded:
    errors and timeouts are counted; more than `max_error_rate` errors in a batch stop the run."""
    from posttrain.rewards.user import build_reward_functions

    return build_reward_functions(specs, options, timeout_s=timeout_s, max_error_rate=max_error_rate)


def prepare_rewards(specs: list, rows: list[dict[str, Any]], source: PromptSource, command: str) -> list:
    """The guarded reward functions of an RL run, checked against the prompt rows' columns before a model loads.

    No specs: the reward the data supports (rewards.user.default_rewards), announced on stderr."""
    import sys

    from posttrain.rewards.user import check_reward_columns, default_rewards

    columns = list(rows[0]) if rows else []
    if not specs:
        specs, reason = default_rewards(columns, source.task)
        print(f"posttrain {command}: no 'rewards' given; using rewards={','.join(specs)} ({reason}).", file=sys.stderr)
    funcs = build_rewards(specs, source.reward_options, source.reward_timeout_s, source.reward_max_error_rate)
    check_reward_columns(funcs, columns, source.train_file or f"task '{source.task}'")
    return funcs


class StageTimer:
    """Wall time per stage (generate, reward, logps, update), like veRL's timing metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.seconds = {f"time/{k}": v for k, v in self.seconds.items()}, {}
        out["time/step"] = sum(out.values())
        return out

"""Episodes as RL training tensors: the `RolloutSequences` layout of single-turn rollouts (generation/rollout.py), with
the observation tokens in the sequence (the model reads them) but out of the labels, so they get no gradient and do
not count in the token normaliser (`GlobalCounts.from_mask(sequences.mask)` counts model tokens only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.generation.episodes import (
    FINISH_DONE,
    Episode,
    EpisodeBudget,
    Episodes,
    EpisodeSampler,
)
from posttrain.generation.rollout import RolloutSequences
from posttrain.generation.sampler import SamplingParams
from posttrain.ops.logps import IGNORE_INDEX


def episode_sequences(episodes: Episodes, pad_id: int) -> RolloutSequences:
    """Row i = prompt + everything after it (model and observation tokens), right-padded to L.

    labels[i, P-1+t] = token t of the episode where the model sampled it, IGNORE_INDEX elsewhere (prompt,
    observations, padding); gen_logps likewise holds the sampler's log-probs; completion_lengths counts every token
    after the prompt (the shared-prefix packing needs the whole continuation), the mask only the model's.
    """
    eps = episodes.episodes
    N = len(eps)
    L = max(len(e.prompt_ids) + len(e.token_ids) for e in eps)
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    gen_logps = torch.zeros((N, L), dtype=torch.float32)
    for i, e in enumerate(eps):
        P, C = len(e.prompt_ids), len(e.token_ids)
        tokens = torch.tensor(e.token_ids, dtype=torch.long)
        model = torch.tensor(e.model_mask, dtype=torch.bool)
        input_ids[i, :P] = torch.tensor(e.prompt_ids)
        input_ids[i, P:P + C] = tokens
        labels[i, P - 1:P - 1 + C] = torch.where(model, tokens, IGNORE_INDEX)  # position t predicts token t+1
        gen_logps[i, P - 1:P - 1 + C] = torch.where(model, torch.tensor(e.logps, dtype=torch.float32), 0.0)
    position_ids = torch.arange(L).expand(N, L).clone()
    return RolloutSequences(input_ids, position_ids, labels, labels != IGNORE_INDEX, gen_logps,
                         torch.tensor([len(e.token_ids) for e in eps], dtype=torch.long),
                         torch.tensor([len(e.prompt_ids) for e in eps], dtype=torch.long))


def episode_rewards(episodes: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] episode rewards, [N] verifier scores with 0 where the environment reported none)."""
    rewards = torch.tensor([e.reward for e in episodes.episodes], dtype=torch.float32)
    verifier = torch.tensor([e.verifier if e.verifier is not None else 0.0 for e in episodes.episodes],
                            dtype=torch.float32)
    return rewards, verifier


@dataclass
class EpisodeGroups:
    """One round of G episodes for each of B rows, ready for the GRPO update: sequences (model tokens in the mask),
    rewards / verifier [B·G], lengths [B·G] (model tokens), truncated (episodes a budget ended), episodes."""

    sequences: RolloutSequences
    rewards: torch.Tensor
    verifier: torch.Tensor
    lengths: torch.Tensor
    truncated: int
    episodes: Episodes


class EpisodeRollouts:
    """What GRPO calls instead of a single-turn generator when `env` is set: G episodes per row, as training tensors.

    Keeps counters of the episodes it played (turns, tool calls by status, finish reasons), which `pop_metrics`
    returns and resets."""

    def __init__(self, sampler: EpisodeSampler, make_env: Callable[[], Any], budget: EpisodeBudget):
        self.sampler, self.make_env, self.budget = sampler, make_env, budget
        self._episodes: list[Episode] = []

    def sample(self, rows: list[dict[str, Any]], indices: list[int], params: SamplingParams, G: int) -> EpisodeGroups:
        """G episodes for each of `rows` (their dataset numbers: `indices`)."""
        episodes = self.sampler.run(self.make_env, rows, params, n=G, budget=self.budget, row_indices=indices)
        self._episodes += episodes.episodes
        rewards, verifier = episode_rewards(episodes)
        lengths = torch.tensor([e.model_tokens for e in episodes.episodes], dtype=torch.float32)
        truncated = sum(e.finish != FINISH_DONE for e in episodes.episodes)
        return EpisodeGroups(episode_sequences(episodes, self.sampler.pad_token_id), rewards, verifier, lengths,
                             truncated, episodes)

    def pop_metrics(self, gather: Callable[[list[Episode]], list[Episode]] | None = None) -> dict[str, float]:
        """env/turns, env/obs_tokens, env/finish_<reason> fractions and env/tool_<status> per episode; then reset.
        gather: the episodes of every rank from this rank's (multi-process runs; call on every rank)."""
        eps, self._episodes = self._episodes, []
        return episode_metrics(gather(eps) if gather is not None else eps, prefix="env/")


def episode_metrics(episodes: list[Episode], prefix: str = "") -> dict[str, float]:
    """Mean turns and observation tokens per episode, fractions of finish reasons, tool calls per episode by status,
    turns with neither a call nor an answer per episode, and tool-call validity (valid calls / attempted calls:
    valid + failed + malformed + unknown tool; NaN when there were none)."""
    if not episodes:
        return {}
    n = len(episodes)
    out = {f"{prefix}turns": sum(e.turns for e in episodes) / n,
           f"{prefix}obs_tokens": sum(len(e.token_ids) - e.model_tokens for e in episodes) / n}
    for reason in sorted({e.finish for e in episodes}):
        out[f"{prefix}finish_{reason}"] = sum(e.finish == reason for e in episodes) / n
    calls: dict[str, int] = {}
    for e in episodes:
        for k, v in e.tool_calls().items():
            calls[k] = calls.get(k, 0) + v
    out[f"{prefix}no_action_turns"] = sum(sum("no_action" in i for i in e.infos) for e in episodes) / n
    for k, v in sorted(calls.items()):
        out[f"{prefix}tool_{k}"] = v / n
    total = sum(calls.values())
    out[f"{prefix}tool_call_validity"] = calls.get("valid", 0) / total if total else float("nan")
    return out


@torch.no_grad()
def episode_accuracy(sampler: EpisodeSampler, make_env: Callable[[], Any], rows: list[dict[str, Any]],
                     budget: EpisodeBudget, batch: int = 32, rank: int = 0, world_size: int = 1,
                     all_reduce_sum: Callable[[float], float] | None = None) -> float:
    """Mean verifier score of greedy episodes on `rows` (held-out accuracy with the environment's tools). Split
    across ranks: rank r plays rows r, r + W, ... and `all_reduce_sum` adds the ranks' sums (call on every rank)."""
    if not rows:
        return float("nan")
    mine = list(range(rank, len(rows), world_size))
    total = 0.0
    for k in range(0, len(mine), batch):
        chunk = mine[k:k + batch]
        episodes = sampler.run(make_env, [rows[i] for i in chunk],
                               SamplingParams(max_new_tokens=budget.max_turn_tokens, temperature=0.0),
                               budget=budget, row_indices=chunk)
        total += sum(e.verifier or 0.0 for e in episodes.episodes)
    if all_reduce_sum is not None:
        total = all_reduce_sum(total)
    return total / len(rows)

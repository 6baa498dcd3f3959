"""Rollouts as training tensors: the per-row sequences of a sampled batch and the typed batch handed to an RL update.

Layout: a rollout of B prompts × G samples gives N = B·G rows, prompt-major (row i is sample i % G of prompt i // G).
Each row becomes one right-padded sequence `prompt + completion` of length L. Per-token tensors are [N, L] with the
log-prob of token t+1 stored at position t (the `shift_labels` convention), so `mask` marks the positions whose
label is a completion token. The sampler's per-token log-probs [N, T_c] are scattered into that layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from posttrain.data.collate import SharedPrefixBatch, pack_shared_prefix
from posttrain.generation.sampler import Rollouts
from posttrain.ops.logps import IGNORE_INDEX


@dataclass
class RolloutSequences:
    """Training tensors for N rollout rows.  All [N, L] except `completion_lengths` and `prompt_lengths` [N]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX outside completion tokens
    mask: torch.Tensor  # bool, labels != IGNORE_INDEX
    gen_logps: torch.Tensor  # sampler's log-probs in the same layout, 0 outside the mask
    completion_lengths: torch.Tensor
    prompt_lengths: torch.Tensor

    def select(self, rows: torch.Tensor | list[int]) -> RolloutSequences:
        """The rows `rows` (indices into N), in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return RolloutSequences(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> RolloutSequences:
        """All tensors moved to `device`."""
        return RolloutSequences(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def shared_prefix(self, rows: slice, pad_id: int) -> SharedPrefixBatch:
        """Rows `rows` packed with each prompt once (data.collate.pack_shared_prefix), for TokenLogps.shared_prefix."""
        return pack_shared_prefix(self.input_ids[rows], self.prompt_lengths[rows], self.completion_lengths[rows], pad_id)

    @staticmethod
    def concat(parts: list[RolloutSequences]) -> RolloutSequences:
        """Rows of several batches stacked (right-padded to the longest L; positions 0..L−1 on every row)."""
        L = max(p.input_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=value)

        return RolloutSequences(
            input_ids=torch.cat([pad(p.input_ids, 0) for p in parts]),
            position_ids=torch.cat([torch.arange(L).expand(len(p), L) for p in parts]),
            labels=torch.cat([pad(p.labels, IGNORE_INDEX) for p in parts]),
            mask=torch.cat([pad(p.mask, False) for p in parts]),
            gen_logps=torch.cat([pad(p.gen_logps, 0.0) for p in parts]),
            completion_lengths=torch.cat([p.completion_lengths for p in parts]),
            prompt_lengths=torch.cat([p.prompt_lengths for p in parts]),
        )


@dataclass
class RolloutBatch:
    """What an RL update consumes: B' groups of G scored samples each (prompt-major rows).

    sequences: the N = B'·G rows as training tensors; rewards: [B', G] combined scalar rewards; prompt_index: [B']
    positions of the groups' prompts in the prompt pool.
    """

    sequences: RolloutSequences
    rewards: torch.Tensor
    prompt_index: list[int]

    def __post_init__(self) -> None:
        if self.rewards.dim() != 2 or self.rewards.numel() != len(self.sequences) \
                or len(self.prompt_index) != self.rewards.shape[0]:
            raise ValueError(f"RolloutBatch: rewards {tuple(self.rewards.shape)} must be [B', G] with B'·G = "
                             f"{len(self.sequences)} rows and B' = {len(self.prompt_index)} prompts")

    @property
    def group_size(self) -> int:
        """G: samples per prompt."""
        return self.rewards.shape[1]

    @property
    def num_groups(self) -> int:
        """B': prompts in the batch."""
        return self.rewards.shape[0]

    def __len__(self) -> int:
        return len(self.sequences)

    @staticmethod
    def concat(parts: list[RolloutBatch]) -> RolloutBatch:
        """Groups of several batches (e.g. DAPO's sampling rounds) as one batch."""
        return RolloutBatch(RolloutSequences.concat([p.sequences for p in parts]),
                            torch.cat([p.rewards for p in parts]), [i for p in parts for i in p.prompt_index])


def rollout_sequences(rollouts: Rollouts, pad_id: int) -> RolloutSequences:
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
    return RolloutSequences(input_ids, position_ids, labels, labels != IGNORE_INDEX, gen_logps,
                            torch.tensor(lengths, dtype=torch.long), torch.tensor([len(p) for p in prompts]))


def completion_view(x: torch.Tensor, batch: RolloutSequences) -> torch.Tensor:
    """[N, L] label-layout tensor -> [N, T_c] completion-aligned (right-padded with 0), e.g. for GAE."""
    T = int(batch.completion_lengths.max())
    start = batch.mask.float().argmax(dim=1)  # [N] first completion position
    steps = torch.arange(T, device=x.device)
    idx = (start[:, None] + steps[None, :]).clamp(max=x.shape[1] - 1)  # [N, T_c]
    valid = steps[None, :] < batch.completion_lengths[:, None]
    return torch.where(valid, x.gather(1, idx), torch.zeros((), dtype=x.dtype))

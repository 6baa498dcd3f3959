"""Data order for every offline recipe (SFT, DPO, reward): a pure function of (seed, step), split across ranks.

Because the units an optimizer step reads depend only on the seed and the step index, a checkpoint needs only the
step to resume exactly, and W ranks × M micro-batches read exactly the units one process would read in one step.
"""

from __future__ import annotations

import torch


def unit_order(num_units: int, seed: int, epoch: int) -> list[int]:
    """The order of packed rows in one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_units, generator=g).tolist()


def step_units(step: int, global_batch: int, num_units: int, seed: int) -> list[int]:
    """The `global_batch` unit indices of optimizer step `step` (epochs chained, a pure function of its inputs)."""
    out: list[int] = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_units)
        order = unit_order(num_units, seed, epoch)
        out.extend(order[offset: offset + global_batch - len(out)])
    return out


def micro_batches(units: list[int], micro_batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of one step: chunk the step's units, rank r takes chunks r, r+W, r+2W, ..."""
    chunks = [units[i:i + micro_batch_size] for i in range(0, len(units), micro_batch_size)]
    return chunks[rank::world_size]

"""Batches: right-padded, or packed several examples to a row with attention kept inside each example.

Both produce `input_ids`, `loss_mask` and `position_ids` [B, T]. Packing restarts position_ids at 0 for every example;
with no attention mask, transformers builds a block-diagonal causal mask from those restarts
(masking_utils.find_packed_sequence_indices), so no token attends across an example boundary, and
`ops.logps.shift_labels` drops the one label that would cross it. Right padding needs no attention mask either:
under a causal mask, real tokens never see the pads that follow them, and pads carry no loss.
"""

from __future__ import annotations

import torch

Example = dict[str, list[int]]


def pad_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example.  -> input_ids, loss_mask, position_ids, attention_mask [B, T]."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        loss_mask[i, :n] = torch.tensor(e["loss_mask"])
        attention_mask[i, :n] = 1
    position_ids = torch.arange(T).expand(B, T).clone()
    return {"input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids,
            "attention_mask": attention_mask}


def pack_examples(examples: list[Example], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (first-fit decreasing, deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return [sorted(r) for r in rows]


def packed_batch(examples: list[Example], rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate the examples of each row; position_ids restart per example.  -> [len(rows), T] tensors."""
    flat = [[examples[i] for i in row] for row in rows]
    T = max(sum(len(e["input_ids"]) for e in row) for row in flat)
    B = len(flat)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(flat):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            input_ids[b, at:at + n] = torch.tensor(e["input_ids"])
            loss_mask[b, at:at + n] = torch.tensor(e["loss_mask"])
            position_ids[b, at:at + n] = torch.arange(n)
            at += n
        position_ids[b, at:] = torch.arange(T - at)  # trailing pads form their own "example"
    return {"input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids}

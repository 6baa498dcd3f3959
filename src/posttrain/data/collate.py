"""Batches: right-padded, or packed several examples to a row with attention kept inside each example.

Both produce `input_ids`, `loss_mask` and `position_ids` [B, T]. Packing restarts position_ids at 0 for every example;
with no attention mask, transformers builds a block-diagonal causal mask from those restarts
(masking_utils.find_packed_sequence_indices), so no token attends across an example boundary, and
`ops.logps.shift_labels` drops the one label that would cross it. Right padding needs no attention mask either:
under a causal mask, real tokens never see the pads that follow them, and pads carry no loss.
RL rollouts have a third layout, `pack_shared_prefix`: each prompt once, followed by all its completions, with an
explicit attention mask (see SharedPrefixBatch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


def lay_out(examples: list[Example], pad_id: int, pack_length: int | None) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """(rows, batch): the examples packed into rows of <= pack_length tokens (`pack_examples`, `packed_batch`) or,
    with pack_length None, one right-padded row each (`pad_batch`); rows[r] lists the examples of row r in order."""
    if pack_length is None:
        return [[i] for i in range(len(examples))], pad_batch(examples, pad_id)
    rows = pack_examples(examples, pack_length)
    return rows, packed_batch(examples, rows, pad_id)


def last_positions(examples: list[Example], rows: list[list[int]]) -> torch.Tensor:
    """[N, 2] (row, column) of each example's last token in the layout `rows` (for heads that read one token)."""
    last = torch.zeros((len(examples), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            at += len(examples[i]["input_ids"])
            last[i] = torch.tensor([r, at - 1])
    return last


@dataclass(frozen=True)
class SharedPrefixBatch:
    """Rollout rows packed so that each prompt is encoded once for all the samples that continue it.

    A packed row is `prompt + completion_1 + ... + completion_k` of the k consecutive rollout rows that share that
    prompt. Every completion attends to the prompt and causally to itself only, and its position ids continue the
    prompt's (P, P+1, ...), so each completion token's hidden state is exactly the one it has in its own
    `prompt + completion` sequence. The G copies of the prompt that the per-sample layout runs through the model become
    one.

    input_ids, position_ids [R, S]; attention [R, 1, S, S] bool (True = may attend); pads attend to themselves only.
    src [M]: for each scored completion token, the flat index (into R·S) of the hidden state that predicts it (the
    prompt's last position for a completion's first token); labels [M]: that token; dst [M]: its flat index in the
    per-sample label layout [n, L] (`generation.rollout.RolloutSequences`: the log-prob of token t+1 sits at position t).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    src: torch.Tensor
    labels: torch.Tensor
    dst: torch.Tensor
    shape: tuple[int, int]  # (n, L) of the per-sample layout

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention as a [R, 1, S, S] additive mask (0 / most negative) that eager and SDPA attention accept."""
        mask = torch.zeros(self.attention.shape, dtype=dtype, device=self.attention.device)
        return mask.masked_fill_(~self.attention, torch.finfo(dtype).min)

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        tensors = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.name != "shape"}
        return SharedPrefixBatch(**tensors, shape=self.shape)


def pack_shared_prefix(
    input_ids: torch.Tensor, prompt_lengths: torch.Tensor, completion_lengths: torch.Tensor, pad_id: int
) -> SharedPrefixBatch:
    """Pack per-sample rows `prompt + completion` (input_ids [n, L], right-padded) by shared prompt.

    Consecutive rows with the same prompt tokens share one packed row (the rollout layout is prompt-major, so a
    group's G samples are consecutive).  prompt_lengths, completion_lengths [n].
    """
    n, L = input_ids.shape
    groups: list[list[int]] = []
    for i in range(n):
        P = int(prompt_lengths[i])
        if groups:
            j = groups[-1][0]
            if int(prompt_lengths[j]) == P and torch.equal(input_ids[j, :P], input_ids[i, :P]):
                groups[-1].append(i)
                continue
        groups.append([i])
    sizes = [int(prompt_lengths[g[0]]) + sum(int(completion_lengths[i]) for i in g) for g in groups]
    R, S = len(groups), max(sizes)
    ids = torch.full((R, S), pad_id, dtype=torch.long)
    pos = torch.zeros((R, S), dtype=torch.long)
    segment = torch.full((R, S), -1, dtype=torch.long)  # 0 = prompt, k = k-th completion, -1 = pad
    src, labels, dst = [], [], []
    for r, g in enumerate(groups):
        P = int(prompt_lengths[g[0]])
        ids[r, :P] = input_ids[g[0], :P]
        pos[r, :P] = torch.arange(P)
        segment[r, :P] = 0
        at = P
        for k, i in enumerate(g, start=1):
            c = int(completion_lengths[i])
            if c == 0:
                continue
            ids[r, at:at + c] = input_ids[i, P:P + c]
            pos[r, at:at + c] = torch.arange(P, P + c)
            segment[r, at:at + c] = k
            # token t of the completion is predicted by the prompt's last position (t = 0) or by completion token t-1
            src.append(r * S + torch.cat([torch.tensor([P - 1]), torch.arange(at, at + c - 1)]))
            labels.append(input_ids[i, P:P + c])
            dst.append(i * L + torch.arange(P - 1, P - 1 + c))
            at += c
    q, k = segment[:, :, None], segment[:, None, :]  # [R, S, 1], [R, 1, S]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    attention = causal & ((k == 0) | (k == q)) & (q != -1)
    attention |= torch.eye(S, dtype=torch.bool)  # pads see themselves, so no softmax row is empty
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return SharedPrefixBatch(ids, pos, attention[:, None], cat(src), cat(labels), cat(dst), (n, L))

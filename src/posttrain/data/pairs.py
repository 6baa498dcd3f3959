"""Preference pairs as sequences: prompt + chosen and prompt + rejected, each with a loss mask on the answer, laid
out for one forward (packed rows or padded rows) and summed back into one log-prob per sequence. DPO, IPO, SimPO,
ORPO (recipes.dpo) and KTO (recipes.kto) share this layout."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from posttrain.data.collate import last_positions, lay_out
from posttrain.data.tokenize import encode_preference
from posttrain.errors import DataError
from posttrain.ops.logps import IGNORE_INDEX, shift_labels

Example = dict[str, list[int]]


def encode_pairs(rows, tokenizer, max_length: int, path: str) -> tuple[list[dict[str, Example]], int]:
    """Each row -> {"chosen": prompt+chosen, "rejected": prompt+rejected} examples (loss_mask on the answer), cut to
    max_length tokens. Returns (pairs, number dropped because an answer lost all its tokens to truncation)."""
    pairs, dropped = [], 0
    for row in rows:
        ids = encode_preference(tokenizer, row)
        prompt = ids["prompt_ids"]
        pair = {}
        for side in ("chosen", "rejected"):
            answer = ids[f"{side}_ids"]
            seq = {"input_ids": (prompt + answer)[:max_length], "loss_mask": ([0] * len(prompt) + [1] * len(answer))[:max_length]}
            pair[side] = seq
        if min(sum(pair[s]["loss_mask"][1:]) for s in pair) == 0:
            dropped += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: every pair lost its chosen or rejected answer to truncation at "
                        f"max_length={max_length}; raise max_length.")
    return pairs, dropped


@dataclass
class SequenceBatch:
    """N sequences laid out in R rows.  input_ids, position_ids, labels, seq_index: [R, T]; seq_index names the
    sequence (0..N-1) whose label sits at each position (-1: none). last: [N, 2] (row, column) of each sequence's
    last token, for scalar heads that read it."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor
    last: torch.Tensor
    num_seqs: int
    num_tokens: int

    def to(self, device) -> SequenceBatch:
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in
                                            ("input_ids", "position_ids", "labels", "seq_index", "last")})


def sequence_batch(sequences: list[Example], pad_id: int, *, pack_length: int | None) -> SequenceBatch:
    """Lay out sequences for one forward: packed into rows of <= pack_length tokens (first-fit decreasing, position
    ids restarting per sequence) or, with pack_length None, one right-padded row per sequence."""
    rows, batch = lay_out(sequences, pad_id, pack_length)
    R, T = batch["input_ids"].shape
    seq_index = torch.full((R, T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(sequences[i]["input_ids"])
            seq_index[r, at:at + n] = i
            at += n
    last = last_positions(sequences, rows)
    labels = shift_labels(batch["input_ids"], batch["loss_mask"], batch["position_ids"])
    return SequenceBatch(batch["input_ids"], batch["position_ids"], labels, seq_index, last, len(sequences),
                         sum(len(s["input_ids"]) for s in sequences))


def sequence_logps(logps_fn: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each sequence's answer tokens, from one forward.  -> [N]"""
    token_logps = logps_fn(batch.input_ids, batch.labels, batch.position_ids).logps  # [R, T]
    valid = batch.labels != IGNORE_INDEX
    out = torch.zeros(batch.num_seqs, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, batch.seq_index[valid], token_logps[valid])  # [N]


def pair_sequences(pairs: list[dict[str, Example]], index: list[int]) -> list[Example]:
    """The 2b sequences of b pairs in one list: chosen ones first, then rejected ones."""
    return [pairs[i]["chosen"] for i in index] + [pairs[i]["rejected"] for i in index]


def target_count(example: Example) -> int:
    """Answer tokens that carry a log-prob (the first token has no prediction)."""
    return sum(example["loss_mask"][1:])

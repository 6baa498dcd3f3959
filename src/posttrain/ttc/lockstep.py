"""A batch of sequences decoded in lockstep over one KV cache, for samplers that branch and resample rows.

Particle filtering (ttc/particles.py) duplicates and drops rows at every resampling; scalable power sampling
(ttc/scalable_power.py) branches each row into K·M look-ahead rollouts and throws them away. Both need what
HFGenerator does not offer: rows that wait while others decode, and rows selected with repetition.

Layout: the cache holds one column per fed position; `mask` [rows, columns] is 1 where a row's real tokens are,
so a row that waits feeds a pad token in a column it cannot see (mask 0), and its position id does not advance.
`select(indices)` reorders / repeats rows (cache rows, mask, positions, token lists); `clone()` copies everything
so a branch can be decoded and dropped. Cost: `forward_tokens` counts the real tokens fed (prompts once, then one
per active row per step); `computed_tokens` adds the padding and waiting positions the forwards also computed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from posttrain.generation.sampler import eos_ids_of


def stop_and_pad(model: nn.Module, tokenizer=None, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> tuple[tuple[int, ...], int]:
    """(stop ids, pad id) of a sampler: the given EOS ids, else the tokenizer's / model config's; the given pad,
    else the tokenizer's, else the first EOS, else 0."""
    eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return eos, int(pad_token_id if pad_token_id is not None else (eos or (0,))[0])


class LockstepBatch:
    """Rows of (prompt + generated tokens) sharing a DynamicCache. `tokens[i]`: row i's generated tokens."""

    def __init__(self, model: nn.Module, pad_token_id: int):
        self.model, self.pad = model, int(pad_token_id)
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.tokens: list[list[int]] = []
        self.forward_tokens = 0
        self.computed_tokens = 0

    @property
    def rows(self) -> int:
        return len(self.tokens)

    def prefill(self, prompt_ids: list[list[int]]) -> torch.Tensor:
        """Encode the prompts (left-padded); returns the logits for each row's first generated token, [rows, V]."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prefill needs non-empty prompts")
        P = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), P), self.pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(prompt_ids), P), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompt_ids):
            ids[i, P - len(p):] = torch.tensor(p, device=self.device)
            mask[i, P - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.mask, self.positions = mask, mask.sum(-1)
        self.tokens = [[] for _ in prompt_ids]
        self.forward_tokens += int(mask.sum())
        self.computed_tokens += mask.numel()
        return out.logits[:, -1, :].float()  # [rows, V]

    def feed(self, tokens: list[int], active: list[bool]) -> torch.Tensor:
        """Feed tokens[i] to every active row i (appended to its token list); inactive rows wait. -> logits [rows, V]
        (an inactive row's logits are meaningless)."""
        act = torch.tensor(active, dtype=torch.long, device=self.device)  # [rows]
        ids = torch.tensor([t if a else self.pad for t, a in zip(tokens, active)], device=self.device)[:, None]
        self.mask = torch.cat([self.mask, act[:, None]], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions[:, None],
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.positions = self.positions + act
        for i, (t, a) in enumerate(zip(tokens, active)):
            if a:
                self.tokens[i].append(int(t))
        self.forward_tokens += int(act.sum())
        self.computed_tokens += len(tokens)
        return out.logits[:, -1, :].float()

    def select(self, indices: list[int]) -> None:
        """Keep rows `indices` (in that order, repeats allowed)."""
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.tokens = [list(self.tokens[i]) for i in indices]

    def clone(self) -> LockstepBatch:
        """An independent copy (cache tensors included) that counts its cost into its own counters, from zero."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        other.tokens = [list(t) for t in self.tokens]
        other.forward_tokens = other.computed_tokens = 0
        return other

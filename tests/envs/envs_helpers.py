"""Test helpers for tests/envs: a scripted policy that runs through the real rollout engine."""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


class ForcedLM(nn.Module):
    """A 'model' that puts all its mass on the next token of one fixed sequence, read off the position id: a scripted
    policy run through the real engine (prefill, cache bookkeeping, observation chunks and all)."""

    def __init__(self, sequence: list[int], vocab: int, eos: int):
        super().__init__()
        self.sequence, self.vocab = sequence, vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"eos_token_id": eos})()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=1):
        rows = input_ids.shape[0]
        logits = torch.full((rows, 1, self.vocab), -1e4)
        for r in range(rows):
            nxt = int(position_ids[r, -1]) + 1
            logits[r, 0, self.sequence[nxt] if nxt < len(self.sequence) else 0] = 0.0
        return CausalLMOutputWithPast(logits=logits)

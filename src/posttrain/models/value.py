"""A value model (critic) for PPO: a causal LM's decoder with a scalar head, V_φ(s_t) at every position."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.models.forward import base_model


class ValueModel(nn.Module):
    """forward(input_ids [N, L], position_ids [N, L]) -> values [N, L]: V(s_t) of the prefix ending at token t.

    In the label layout of `ops.logps.shift_labels`, position t holds the log-prob of token t+1, so values[:, t] is
    the value of the state from which that token is emitted: values and log-probs line up position by position.
    The head starts at zero, so initial values are 0 and the first advantages are the (whitened) returns.
    """

    fp32_modules = ("head",)  # kept in float32 when FSDP2 computes the rest in bf16 (train.parallel)

    def __init__(self, decoder: nn.Module, hidden_size: int):
        super().__init__()
        self.decoder = decoder
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> ValueModel:
        """A critic whose decoder is a trainable copy of `model`'s (LoRA adapters, if any, merged in)."""
        import copy

        inner = base_model(model)
        if hasattr(model, "merge_and_unload"):
            inner = copy.deepcopy(model).merge_and_unload()
        decoder = copy.deepcopy(inner.get_decoder())
        decoder.requires_grad_(True)
        return cls(decoder, inner.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden.float()).squeeze(-1)  # [N, L]; the scalar head stays in float32

    def save(self, path: str | Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | Path) -> None:
        self.load_state_dict(load_file(str(path)))

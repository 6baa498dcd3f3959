"""Exponential moving average of weights, as used for sampling by Ho et al. 2020 (Appendix B, decay 0.9999).

θ_ema ← d θ_ema + (1 − d) θ after every optimizer step. The EMA copy is a plain dict of tensors, not a module, so it
is saved beside the model and swapped in only for sampling.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """ema = EMA(model, decay); ema.update(model) after each step; ema.copy_to(other_model) for sampling.

    warmup: with `warmup=True` the decay used at update n is min(decay, (1 + n)/(10 + n)) (the TensorFlow
    ExponentialMovingAverage `num_updates` rule), so a short run's EMA is not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:  # integer buffers (none in our nets) are copied, not averaged
                self.shadow[k].copy_(v)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

"""Sampler/trainer mismatch: how far the generation engine's log-probs are from the trainer's on the same tokens.

With Δ_t = log π_train(y_t) − log π_gen(y_t) over the completion tokens of a batch (mask):

    mean |Δ| = Σ_t m_t |Δ_t| / Σ_t m_t,       max |Δ| = max_{t: m_t} |Δ_t|
    sequence ratio ρ_i = Π_t π_train(y_{i,t}) / π_gen(y_{i,t}) = exp Σ_t m_{i,t} Δ_{i,t}

ρ is the sequence-level importance weight the IS correction would apply (losses.policy.importance_sampling_weights,
level="sequence"); the veRL / Yao et al. 2025 ("Your efficient RL framework secretly brings you off-policy RL
training") diagnostics report the same figures. Both engines must be compared under the same distribution: the
sampler's log-probs after temperature / top-k / top-p, the trainer's at the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mismatch:
    """Running sums over micro-batches; `metrics()` gives the step's figures (named `mismatch/*`)."""

    abs_sum: float = 0.0
    tokens: int = 0
    abs_max: float = 0.0
    seq_log_ratios: list[float] | None = None

    def add(self, train_logps: torch.Tensor, gen_logps: torch.Tensor, mask: torch.Tensor) -> None:
        """Accumulate one micro-batch. train_logps, gen_logps, mask: [B, T] (any matching layout)."""
        m = mask.bool()
        delta = torch.where(m, train_logps.detach().double() - gen_logps.detach().double(), 0.0)  # [B, T]
        self.abs_sum += float(delta.abs().sum())
        self.tokens += int(m.sum())
        if m.any():
            self.abs_max = max(self.abs_max, float(delta.abs().max()))
        rows = m.any(dim=1)  # [B] rows with at least one token
        if self.seq_log_ratios is None:
            self.seq_log_ratios = []
        self.seq_log_ratios += delta.sum(dim=1)[rows].tolist()

    def metrics(self) -> dict[str, float]:
        """mean/max |Δ log p| per token and the mean/min/max sequence ratio ρ (exp of the summed Δ)."""
        if not self.tokens:
            return {}
        ratios = torch.tensor(self.seq_log_ratios or [0.0], dtype=torch.float64).exp()
        return {"mismatch/logp_abs_mean": self.abs_sum / self.tokens, "mismatch/logp_abs_max": self.abs_max,
                "mismatch/seq_ratio_mean": float(ratios.mean()), "mismatch/seq_ratio_min": float(ratios.min()),
                "mismatch/seq_ratio_max": float(ratios.max())}


def logprob_mismatch(train_logps: torch.Tensor, gen_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The mismatch figures of one batch (see the module docstring). train_logps, gen_logps, mask: [B, T]."""
    acc = Mismatch()
    acc.add(train_logps, gen_logps, mask)
    return acc.metrics()

"""Supervised fine-tuning loss: token cross-entropy on completion / assistant tokens only.

L = −(1/N) Σ_{b,t} m_{b,t} · log π_θ(y_{b,t} | y_{b,<t}, x_b), with m the loss mask (1 on completion tokens) and N the
number of target tokens in the whole optimizer step (all micro-batches and ranks), so accumulation and data-parallel
splits give exactly the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.ops.masked import masked_sum


@dataclass(frozen=True)
class SFTOutput:
    loss: torch.Tensor  # scalar, normalized by num_target_tokens
    nll_sum: torch.Tensor  # detached Σ −log p over this micro-batch's targets
    num_tokens: torch.Tensor  # detached number of targets in this micro-batch


def sft_loss(policy_logps: torch.Tensor, mask: torch.Tensor, *, num_target_tokens: float | None = None) -> SFTOutput:
    """policy_logps [B, T] (log-probs of the labels), mask [B, T] (1 = target).  num_target_tokens: global N."""
    nll_sum = -masked_sum(policy_logps, mask)
    count = mask.sum()
    denom = num_target_tokens if num_target_tokens is not None else count.clamp(min=1)
    return SFTOutput(loss=nll_sum / denom, nll_sum=nll_sum.detach(), num_tokens=count.detach())

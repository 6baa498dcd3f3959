"""The denoising regression loss: L_simple of Ho et al. 2020 (eq. 14), ‖target − f_θ(x_t, t)‖², for any target.

The target is ε, x_0 or v for the variance-preserving process (schedules.training_target), and x_{t−Δt} or x_0 for
the variance-exploding one (ve.ve_training_example, Nakkiran et al. Pseudocode 1 and Claim 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DenoisingLossOutput:
    loss: torch.Tensor  # scalar: mean over batch and dimensions
    per_example_loss: torch.Tensor  # [B], detached: mean squared error of each example, for per-timestep logging


def denoising_loss(
    model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> DenoisingLossOutput:
    """model_output, target: [B, ...] of the same shape. Unweighted over timesteps, as L_simple is, unless per-example
    `weights` [B] are given (e.g. Karras et al. 2022's λ(σ)); per_example_loss is reported unweighted either way."""
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape")
    per_example = (model_output - target).pow(2).flatten(1).mean(1)  # [B]
    loss = per_example.mean() if weights is None else (weights * per_example).mean()
    return DenoisingLossOutput(loss=loss, per_example_loss=per_example.detach())

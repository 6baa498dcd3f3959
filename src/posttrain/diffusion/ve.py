"""Variance-exploding diffusion in the elementary form of Nakkiran et al., "Step-by-Step Diffusion", arXiv 2406.08929.

Forward: x_{t+Δt} = x_t + N(0, σ²Δt), so x_t ~ N(x_0, σ_t²) with σ_t = σ√t, t ∈ [0, 1], Δt = 1/T.
Time is indexed by an integer k = 0..T−1 with t = (k+1)/T, and k = −1 is t = 0 (the data): the same 0-indexed
timesteps as the variance-preserving schedulers, so one sampling loop and one network serve both. The steps below
take the noise levels σ_t and σ_{t−Δt} as plain numbers, so the same formulas serve any σ(t); `VEScheduler` supplies
Nakkiran's σ√t.

Notation (code -> paper): sigma -> σ; sigma_t, sigma_prev -> σ_t, σ_{t−Δt}; posterior_mean -> μ_{t−Δt}(x_t) =
E[x_{t−Δt} | x_t]; lam -> λ of Algorithm 2 / Pseudocode 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.diffusion.schedules import SchedulerOutput, expand_per_sample


def ve_sigma(k: int | torch.Tensor, num_steps: int, sigma: float):
    """σ_t = σ √t with t = (k+1)/T (§2, "x_t ~ N(x_0, σ_t²)"); k = −1 gives σ_0 = 0."""
    if isinstance(k, torch.Tensor):
        return sigma * ((k.double() + 1) / num_steps).sqrt()
    return sigma * math.sqrt((k + 1) / num_steps)


def ve_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """x_t = x_0 + σ_t ε. x0, noise: [B, ...]; sigma_t: [B]."""
    return x0 + expand_per_sample(sigma_t, x0) * noise


def ve_training_example(
    x0: torch.Tensor, k: torch.Tensor, num_steps: int, sigma: float, noise: torch.Tensor, step_noise: torch.Tensor,
    target: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One regression pair (input x_t, target) at integer times k ∈ [0, T−1] (t = (k+1)/T), per sample.

    target "prev_sample" (Pseudocode 1): x_{t−Δt} = x_0 + N(0, σ²(t−Δt)), x_t = x_{t−Δt} + N(0, σ²Δt); target x_{t−Δt}.
    target "sample" (Claim 2): x_t = x_0 + N(0, σ²t); target x_0, so f ≈ E[x_0 | x_t].
    x0, noise, step_noise: [B, ...]; k: [B]. Returns (x_t, target), both [B, ...]."""
    if target == "prev_sample":
        x_prev = ve_add_noise(x0, noise, ve_sigma(k - 1, num_steps, sigma))
        x_t = x_prev + sigma * math.sqrt(1 / num_steps) * step_noise
        return x_t, x_prev
    if target == "sample":
        return ve_add_noise(x0, noise, ve_sigma(k, num_steps, sigma)), x0
    raise ValueError(f"unknown VE target '{target}'; choose 'prev_sample' or 'sample'")


def ve_posterior_mean(pred_original_sample: torch.Tensor, x_t: torch.Tensor, sigma_t: float, sigma_prev: float):
    """E[x_{t−Δt} | x_t] = (σ_{t−Δt}²/σ_t²) x_t + (1 − σ_{t−Δt}²/σ_t²) E[x_0 | x_t].

    With σ_t² = σ²t this is Claim 2's (Δt/t) E[x_0|x_t] + (1 − Δt/t) x_t; it is also the exact Gaussian posterior mean."""
    ratio = sigma_prev**2 / sigma_t**2
    return ratio * x_t + (1 - ratio) * pred_original_sample


def ve_x0_from_posterior_mean(mean: torch.Tensor, x_t: torch.Tensor, sigma_t: float, sigma_prev: float):
    """Inverse of ve_posterior_mean: the x̂_0 implied by a predicted x_{t−Δt} (for reporting and for DDIM)."""
    ratio = sigma_prev**2 / sigma_t**2
    return (mean - ratio * x_t) / (1 - ratio)


def ve_ddpm_step(
    mean: torch.Tensor, sigma_t: float, sigma_prev: float, noise: torch.Tensor, variance: str = "large"
) -> torch.Tensor:
    """Pseudocode 2: x_{t−Δt} = μ_{t−Δt}(x_t) + N(0, σ²Δt).

    variance "large" is the paper's σ²Δt = σ_t² − σ_{t−Δt}²; "small" is the exact posterior variance
    σ²Δt (t−Δt)/t = (σ_t² − σ_{t−Δt}²) σ_{t−Δt}²/σ_t² (papers.md §5, identity). noise: shape of mean."""
    var = sigma_t**2 - sigma_prev**2
    if variance == "small":
        var = var * sigma_prev**2 / sigma_t**2
    elif variance != "large":
        raise ValueError(f"unknown VE variance '{variance}'; choose 'large' or 'small'")
    return mean + math.sqrt(var) * noise


def ve_ddim_step(mean: torch.Tensor, x_t: torch.Tensor, sigma_t: float, sigma_prev: float) -> torch.Tensor:
    """Algorithm 2 / Pseudocode 3: x_{t−Δt} = x_t + λ(μ_{t−Δt}(x_t) − x_t), λ = σ_t/(σ_{t−Δt} + σ_t).

    With μ from Claim 2 this equals x̂_0 + (σ_{t−Δt}/σ_t)(x_t − x̂_0), the exact η = 0 DDIM step (for any Δt)."""
    lam = sigma_t / (sigma_prev + sigma_t)
    return x_t + lam * (mean - x_t)


@dataclass(frozen=True)
class VEScheduler:
    """Nakkiran et al.'s sampler on σ_t = σ√((k+1)/T), k = T−1..0, driven by the network's output at (x_t, k).

    target: "sample" (network ≈ E[x_0|x_t], any sub-sequence of k allowed) or "prev_sample" (network ≈ x_{t−Δt} for the
    training Δt = 1/T, so only unit steps are allowed). sampler: "ddpm" (stochastic) or "ddim" (deterministic).
    variance: "large" (the paper's σ²Δt) or "small" (exact posterior), used by the ddpm sampler only."""

    sigma: float
    num_train_timesteps: int
    target: str = "sample"
    sampler: str = "ddpm"
    variance: str = "large"

    def __post_init__(self) -> None:
        if self.target not in ("sample", "prev_sample"):
            raise ValueError(f"unknown VE target '{self.target}'; choose 'sample' or 'prev_sample'")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown VE sampler '{self.sampler}'; choose 'ddpm' or 'ddim'")

    @property
    def init_noise_sigma(self) -> float:
        """x_1 ~ N(0, σ²) (Pseudocode 2, first line): the start of sampling."""
        return self.sigma

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        *,
        prev_t: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """t, prev_t: integer times k (t = (k+1)/T); prev_t defaults to t − 1, −1 is the data. x_t: [B, ...]."""
        prev_t = t - 1 if prev_t is None else prev_t
        if not -1 <= prev_t < t < self.num_train_timesteps:
            raise ValueError(f"VE step needs -1 <= prev_t < t < {self.num_train_timesteps}, got t={t}, prev_t={prev_t}")
        if self.target == "prev_sample" and prev_t != t - 1:
            raise ValueError("a network trained to predict x_{t-Δt} can only take unit steps; "
                             "use target 'sample' (E[x0|x_t]) to sample on a sub-sequence of timesteps")
        sigma_t = ve_sigma(t, self.num_train_timesteps, self.sigma)
        sigma_prev = ve_sigma(prev_t, self.num_train_timesteps, self.sigma)
        if self.target == "sample":
            pred_original_sample = model_output
            mean = ve_posterior_mean(model_output, x_t, sigma_t, sigma_prev)
        else:
            mean = model_output
            pred_original_sample = ve_x0_from_posterior_mean(mean, x_t, sigma_t, sigma_prev)
        if self.sampler == "ddim":
            prev_sample = ve_ddim_step(mean, x_t, sigma_t, sigma_prev)
        else:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
            prev_sample = ve_ddpm_step(mean, sigma_t, sigma_prev, noise, self.variance)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

"""DDPM ancestral sampling step: Ho et al., "Denoising Diffusion Probabilistic Models", arXiv 2006.11239.

The scheduler holds the noise schedule and the choices (prediction type, variance); it never holds the network.
`step(model_output, t, x_t, prev_t=...)` takes what the network said at (x_t, t) and returns x_{prev_t} and x̂_0.
With prev_t < t − 1 (a subset of timesteps), α_t and β_t are replaced by the effective one-jump values
α'_t = ᾱ_t/ᾱ_prev and β'_t = 1 − α'_t, exactly as diffusers' DDPMScheduler does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule, SchedulerOutput


def posterior_variance(alpha_bar_t: float, alpha_bar_prev: float) -> float:
    """β̃_t = (1 − ᾱ_prev)/(1 − ᾱ_t) · β'_t (Ho et al. eq. 7), the variance of q(x_prev | x_t, x_0): "fixed_small"."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)


def fixed_small_variance(alpha_bar_t: float, alpha_bar_prev: float) -> float:
    """σ_t² = β̃_t (Ho et al. §3.2: optimal when x_0 is a point mass). Clamped at 1e-20 as in diffusers."""
    return max(posterior_variance(alpha_bar_t, alpha_bar_prev), 1e-20)


def fixed_large_variance(alpha_bar_t: float, alpha_bar_prev: float) -> float:
    """σ_t² = β'_t = 1 − ᾱ_t/ᾱ_prev (Ho et al. §3.2: optimal when x_0 ~ N(0, I))."""
    return 1 - alpha_bar_t / alpha_bar_prev


VARIANCE_TYPES = {"fixed_small": fixed_small_variance, "fixed_large": fixed_large_variance}


@dataclass(frozen=True)
class DDPMScheduler:
    """Ancestral sampler p(x_prev | x_t) = N(μ̃_t(x_t, x̂_0), σ_t² I).

    schedule: β/ᾱ tables; prediction_type: "epsilon" | "sample" | "v_prediction"; variance_type: "fixed_small" |
    "fixed_large"; clip_sample: clamp x̂_0 to [−c, c] (None: off; diffusers' default is on with c = 1)."""

    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type '{self.prediction_type}'; choose {sorted(PREDICTION_TYPES)}")
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type '{self.variance_type}'; choose {sorted(VARIANCE_TYPES)}")

    @property
    def init_noise_sigma(self) -> float:
        """x_T ~ N(0, I): the start of sampling."""
        return 1.0

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
        """x_t, model_output: [B, ...] (same shape). prev_t defaults to t − 1; prev_t < 0 means "to x_0" (ᾱ = 1).

        No noise is added at t = 0 (Ho et al. Algorithm 2, line 3: z = 0 if t = 1). `noise` (shape of x_t) wins
        over `generator`, so two samplers can be driven by the same draws."""
        prev_t = t - 1 if prev_t is None else prev_t
        # 1. ᾱ_t, ᾱ_prev and the one-jump α'_t, β'_t
        abar_t, abar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(prev_t)
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        # 2. x̂_0 from the network's output (eq. 15 for ε-prediction)
        pred_original_sample, _ = PREDICTION_TYPES[self.prediction_type](model_output, x_t, abar_t)
        if self.clip_sample is not None:
            pred_original_sample = pred_original_sample.clamp(-self.clip_sample, self.clip_sample)
        # 3. posterior mean μ̃_t = √ᾱ_prev β'_t/(1−ᾱ_t) x̂_0 + √α'_t (1−ᾱ_prev)/(1−ᾱ_t) x_t   (eq. 7)
        coef_x0 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
        coef_xt = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
        prev_sample = coef_x0 * pred_original_sample + coef_xt * x_t
        # 4. add σ_t z, except on the final step t = 0
        if t > 0:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
            std = math.sqrt(VARIANCE_TYPES[self.variance_type](abar_t, abar_prev))
            prev_sample = prev_sample + std * noise
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

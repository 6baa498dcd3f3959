"""DDIM step: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv 2010.02502, eq. 12 and 16.

Notation (code -> paper; the paper writes α for what Ho et al. call ᾱ):
  alpha_bar_t, alpha_bar_prev -> α_t, α_{t−1}     pred_original_sample -> "predicted x_0", f_θ(x_t)
  pred_epsilon -> ε_θ(x_t)                         std_dev_t -> σ_t(η)
  direction -> "direction pointing to x_t"         prev_sample -> x_{t−1}
η = 0 is the deterministic DDIM; η = 1 gives σ_t² = β̃_t, the DDPM fixed-small sampler (on any sub-sequence τ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule, SchedulerOutput


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """DDIM eq. 16: σ_t(η) = η √((1 − α_{t−1})/(1 − α_t)) √(1 − α_t/α_{t−1})."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


@dataclass(frozen=True)
class DDIMScheduler:
    """Generalized (non-Markovian) reverse step of DDIM, for any pair of kept timesteps t > prev_t.

    prediction_type: "epsilon" | "sample" | "v_prediction"; eta: η ≥ 0; clip_sample: clamp x̂_0 to [−c, c] or None.
    As in diffusers, ε̂ is the *unclipped* network estimate even when x̂_0 is clipped."""

    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    eta: float = 0.0
    clip_sample: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type '{self.prediction_type}'; choose {sorted(PREDICTION_TYPES)}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

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
        """x_t, model_output: [B, ...]. prev_t defaults to t − 1; prev_t < 0 means the final jump to x_0 (α = 1).
        With η = 0 neither `noise` nor `generator` is used."""
        prev_t = t - 1 if prev_t is None else prev_t
        # 1. α_t and α_{t−1} of the paper (ᾱ in Ho et al.)
        abar_t, abar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(prev_t)
        # 2. predicted x_0 and ε (eq. 12, first term; eq. 9 for the ε -> x_0 map)
        pred_original_sample, pred_epsilon = PREDICTION_TYPES[self.prediction_type](model_output, x_t, abar_t)
        if self.clip_sample is not None:
            pred_original_sample = pred_original_sample.clamp(-self.clip_sample, self.clip_sample)
        # 3. σ_t(η) (eq. 16)
        std_dev_t = ddim_sigma(abar_t, abar_prev, self.eta)
        # 4. direction pointing to x_t: √(1 − α_{t−1} − σ_t²) ε̂ (eq. 12, second term); max() guards rounding at 0
        direction = math.sqrt(max(1 - abar_prev - std_dev_t**2, 0.0)) * pred_epsilon
        # 5. x_{t−1} = √α_{t−1} x̂_0 + direction + σ_t z (eq. 12)
        prev_sample = math.sqrt(abar_prev) * pred_original_sample + direction
        if std_dev_t > 0:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
            prev_sample = prev_sample + std_dev_t * noise
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

"""Noise schedules for variance-preserving diffusion: Ho et al. 2020 (linear β) and Nichol & Dhariwal 2021 (cosine).

Notation (code -> paper): `betas[t]` -> β_t, `alphas[t]` -> α_t = 1 − β_t, `alphas_cumprod[t]` -> ᾱ_t = Π_{s≤t} α_s.
Timesteps are 0-indexed as in diffusers: t = 0 is the first noising step (Ho et al.'s t = 1). Everything is kept in
float64 and cast to the sample's dtype inside the steps, so a 1000-step chain does not accumulate float32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SchedulerOutput:
    """One reverse step: `prev_sample` is x_{t−1} (or x at the previous kept timestep), `pred_original_sample` is x̂_0.

    Both have the shape of x_t, e.g. [B, 2] for 2-D points or [B, 64] for flattened 8×8 digits."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, §4: β_t linear from 1e-4 to 0.02 over T = 1000 steps. Returns [T] float64."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor | float, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s) · π/2), t ∈ [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, §3.2: β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), 0.999). Returns [T] float64.

    The clip at 0.999 only bites in the last step or two, where ᾱ → 0 would make β_T = 1 (a singular step)."""
    grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = cosine_alpha_bar(grid)
    return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)


BETA_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


@dataclass(frozen=True)
class NoiseSchedule:
    """β_t and ᾱ_t for t = 0..T−1 (float64), plus ᾱ used after the last step (1.0: the clean data)."""

    betas: torch.Tensor  # [T]
    alphas_cumprod: torch.Tensor  # [T]
    final_alpha_cumprod: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t; for t < 0 (the step after the last kept timestep) ᾱ = final_alpha_cumprod."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def make_schedule(name: str = "linear", num_train_timesteps: int = 1000, **kwargs: float) -> NoiseSchedule:
    """`name` in BETA_SCHEDULES; ᾱ_t = Π_{s≤t}(1 − β_s) (Ho et al. 2020, eq. 4)."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule '{name}'; choose one of {sorted(BETA_SCHEDULES)}")
    betas = BETA_SCHEDULES[name](num_train_timesteps, **kwargs)
    return NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, dim=0))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward marginal q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020, eq. 4), reparameterized.

    x0, noise: [B, ...]; t: [B] integer timesteps; alphas_cumprod: [T]. Returns x_t of the shape of x0."""
    abar = expand_per_sample(alphas_cumprod[t.long()], x0)  # [B, 1, ...]
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def expand_per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] in like's dtype, so it broadcasts against like."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# --- what the network predicts, and how it maps to (x̂_0, ε̂) ---------------------------------------------------------
# x_t = √ᾱ x_0 + √(1−ᾱ) ε.  v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022, §4, "v-parameterization").


def x0_eps_from_epsilon(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar):
    """ε-prediction (Ho et al. 2020, eq. 11 / DDIM eq. 9): x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ.

    alpha_bar: a float, or a tensor broadcastable to x_t (e.g. [B, 1]). Returns (x̂_0, ε̂), each the shape of x_t."""
    eps = model_output
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5, eps


def x0_eps_from_sample(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar):
    """x_0-prediction: ε̂ = (x_t − √ᾱ x̂_0)/√(1−ᾱ)."""
    x0 = model_output
    return x0, (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5


def x0_eps_from_v(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar):
    """v-prediction (Salimans & Ho 2022, eq. 7 rearranged): x̂_0 = √ᾱ x_t − √(1−ᾱ) v̂, ε̂ = √ᾱ v̂ + √(1−ᾱ) x_t."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    return a * x_t - s * model_output, a * model_output + s * x_t


PREDICTION_TYPES = {"epsilon": x0_eps_from_epsilon, "sample": x0_eps_from_sample, "v_prediction": x0_eps_from_v}


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The regression target for `prediction_type` at x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε: ε, x_0 or v. Shapes as add_noise."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = expand_per_sample(alphas_cumprod[t.long()], x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raise ValueError(f"unknown prediction_type '{prediction_type}'; choose one of {sorted(PREDICTION_TYPES)}")


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading") -> list[int]:
    """The S kept timesteps, descending (DDIM §4.2's sub-sequence τ). Same three spacings as diffusers:

    leading: 0, k, 2k, … with k = T // S (the DDIM code's `range(0, T, k)`); trailing: T−1, T−1−T/S, …;
    linspace: round(linspace(0, T−1, S))."""
    T, S = num_train_timesteps, num_inference_steps
    if not 1 <= S <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {S}")
    if spacing == "leading":
        steps = [i * (T // S) for i in range(S)]
    elif spacing == "trailing":
        steps = [round(T - i * T / S) - 1 for i in range(S)][::-1]
    elif spacing == "linspace":
        steps = [round(v) for v in torch.linspace(0, T - 1, S, dtype=torch.float64).tolist()]
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}'; choose leading, trailing or linspace")
    return sorted(set(steps), reverse=True)

"""Per-token KL estimators k1, k2, k3 of Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx, 2020).

We want KL(π_θ ‖ π_ref) = E_{y~π_θ}[log π_θ(y) − log π_ref(y)] but only have the log-probs of the tokens that were
sampled from π_θ. With the ratio r = π_ref(y) / π_θ(y) evaluated at a sampled token y:

    k1 = −log r                    unbiased, high variance, can be negative
    k2 = ½ (log r)²                biased (second-order accurate as π_ref → π_θ), always ≥ 0, low variance
    k3 = (r − 1) − log r           unbiased (E_{π_θ}[r] = 1), always ≥ 0, low variance

k3 is the estimator of DeepSeekMath (GRPO, Shao et al. 2024, Eq. 4): D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1.

Symbol map: `logps` → log π_θ(y_t), `ref_logps` → log π_ref(y_t), `log_ratio` → log r = ref_logps − logps.

Used as a *loss term*, these are differentiated through log π_θ; the gradients differ from the estimators' values:
E[∇k2] equals ∇KL(π_θ‖π_ref) exactly, while E[∇k3] is the gradient of KL(π_ref‖π_θ) (the forward KL). Both are
what peers ship (veRL `low_var_kl` is a clamped k3, TRL uses k3); the choice is the recipe's. Used *inside the
reward* (PPO/RLHF), the estimator is evaluated on detached log-probs and only its value matters, where k1 and k3
are unbiased.

All functions are element-wise: any shape in, same shape out (typically [B, T]). Masking is the caller's business:
padded positions must hold finite log-probs (k3 exponentiates).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = −log r = log π_θ(y) − log π_ref(y).  logps, ref_logps: [B, T] → [B, T]."""
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log r)² with log r = log π_ref(y) − log π_θ(y).  logps, ref_logps: [B, T] → [B, T]."""
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = r − log r − 1 with r = π_ref(y)/π_θ(y) (GRPO, DeepSeekMath Eq. 4).  [B, T] → [B, T], ≥ 0.

    Written as expm1(log r) − log r so that it is exactly 0 when the two log-probs agree and keeps precision for small
    differences (r − 1 would cancel catastrophically).
    """
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalized_token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards for PPO with the KL "in the reward" (Ziegler et al. 2019, Eq. 2; InstructGPT Eq. 2).

        r_t = −β · k(π_θ(y_t), π_ref(y_t))            for every completion token t
        r_T += R(x, y)                                  at the last valid token T of each sequence

    scores: [B] sequence rewards R (e.g. a reward model's output); logps, ref_logps, mask: [B, T] with right padding.
    The estimator is evaluated on detached log-probs (the reward is a constant of the policy update).
    Returns [B, T], zero at padded positions.
    """
    m = mask.bool()
    kl = KL_ESTIMATORS[estimator](
        torch.where(m, logps.detach(), 0.0), torch.where(m, ref_logps.detach(), 0.0)
    )  # [B, T]
    rewards = torch.where(m, -kl_coef * kl, 0.0)  # [B, T]
    last = (m.long().sum(dim=1) - 1).clamp(min=0)  # [B] index of the last valid token
    has_tokens = m.any(dim=1).to(rewards.dtype)  # [B]
    return rewards.scatter_add(1, last.unsqueeze(1), (scores.to(rewards.dtype) * has_tokens).unsqueeze(1))

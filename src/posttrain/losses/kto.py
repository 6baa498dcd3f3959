"""KTO, Kahneman–Tversky optimization (Ethayarajh et al. 2024, arXiv 2402.01306): a preference loss on *unpaired*
answers, each labelled desirable or undesirable.

Symbol map (paper → code), one entry per example (B examples, not pairs):

    log π_θ(y|x), log π_ref(y|x)          policy_logps, ref_logps                          [B]
    r_θ(x, y) = log π_θ(y|x)/π_ref(y|x)   the implicit reward (before β)                   [B]
    z_0 = KL(π_θ(y'|x) ‖ π_ref(y'|x))     reference_point, a detached scalar (`kto_reference_point`)
    desirable                              y is desirable (True) or undesirable (False)     [B]
    λ_D, λ_U                               desirable_weight, undesirable_weight
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KTOOutput:
    """loss (scalar, differentiable) and per-example detached metrics, each [B]."""

    loss: torch.Tensor
    rewards: torch.Tensor  # β r_θ(x, y)
    desirable: torch.Tensor  # bool [B]
    reference_point: torch.Tensor  # z_0, scalar
    policy_logps: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Batch means, named as TRL logs them (NaN for a side with no example)."""
        d = self.desirable
        chosen = self.rewards[d]
        rejected = self.rewards[~d]
        nan = float("nan")
        return {
            "rewards/chosen": chosen.mean().item() if chosen.numel() else nan,
            "rewards/rejected": rejected.mean().item() if rejected.numel() else nan,
            "kl": self.reference_point.item(),
        }


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The reference point z_0 (KTO §4.1, "Implementation"): a biased but low-variance estimate of
    KL(π_θ ‖ π_ref) from M mismatched pairs (x_i, y'_j), j ≠ i, of the same batch:

        z_0 = max(0, 1/M Σ_m log π_θ(y'_m|x_m) − log π_ref(y'_m|x_m))

    detached: the paper does not back-propagate through z_0. policy_kl_logps, ref_kl_logps: [M] summed log-probs.
    To make the loss independent of how a step is split into micro-batches, compute z_0 once over the whole step
    (TRL computes it per micro-batch and all-gathers across ranks)."""
    if policy_kl_logps.numel() == 0:
        return policy_kl_logps.new_zeros(())
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    global_count: float | torch.Tensor | None = None,
) -> KTOOutput:
    """KTO (Ethayarajh et al. 2024, Eq. 8):

        r_θ = log π_θ(y|x) − log π_ref(y|x)
        v(x, y) = λ_D σ(β (r_θ − z_0))    if y is desirable
                  λ_U σ(β (z_0 − r_θ))    if y is undesirable
        L = E[λ_y − v(x, y)]

    policy_logps, ref_logps: [B] summed answer log-probs; desirable: [B] bool; reference_point: z_0 (detached; see
    `kto_reference_point`). Defaults β = 0.1, λ_D = λ_U = 1 (paper and TRL); with imbalanced data the paper
    recommends λ_D n_D / (λ_U n_U) ∈ [1, 4/3]. The per-example losses are summed and divided by global_count (the
    examples of the whole optimizer step) when given, else by B. At π_θ = π_ref and z_0 = 0 every example's loss is
    λ_y / 2 and ∂L/∂log π_θ(y) = ∓ λ_y β / (4B) (− for desirable, + for undesirable).
    """
    desirable = desirable.bool()
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    logratios = policy_logps - ref_logps.detach()  # [B]
    value = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(beta * (logratios - z0)),
        undesirable_weight * torch.sigmoid(beta * (z0 - logratios)),
    )  # [B]
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(value.dtype)
    per_example = weight - value  # [B]
    loss = per_example.mean() if global_count is None else per_example.sum() / global_count
    return KTOOutput(
        loss=loss,
        rewards=(beta * logratios).detach(),
        desirable=desirable,
        reference_point=z0,
        policy_logps=policy_logps.detach(),
    )

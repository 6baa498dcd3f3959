"""Bradley–Terry reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, Eq. 1).

    p(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l))        L = −log σ(r_w − r_l − m)

Symbol map: chosen_rewards → r_φ(x, y_w), rejected_rewards → r_φ(x, y_l), margin → m (Llama 2, Touvron et al. 2023,
Eq. 2: a per-pair margin from the rating gap), center_coef → the auxiliary (r_w + r_l)² penalty of Eisenstein et al.
2023 that keeps rewards centred on 0 (TRL's `center_rewards_coefficient`). All tensors are [B], one entry per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RewardLossOutput:
    """loss (scalar, differentiable) and per-pair detached metrics, each [B]."""

    loss: torch.Tensor
    accuracy: torch.Tensor  # 1.0 where r_w > r_l (ties count as wrong)
    margins: torch.Tensor  # r_w − r_l
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy.mean().item(),
            "margin": self.margins.mean().item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
        }


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    global_pair_count: float | torch.Tensor | None = None,
) -> RewardLossOutput:
    """L = −log σ(r_w − r_l − m) + c · (r_w + r_l)², summed over pairs and divided by global_pair_count (the pairs of
    the whole optimizer step, for exact gradient accumulation) or by B.

    chosen_rewards, rejected_rewards: [B]; margin: [B] or a float (None = 0). Returns RewardLossOutput.
    """
    diff = chosen_rewards - rejected_rewards  # [B]
    shifted = diff if margin is None else diff - margin
    per_pair = -F.logsigmoid(shifted)  # [B]
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_rewards + rejected_rewards) ** 2
    loss = per_pair.mean() if global_pair_count is None else per_pair.sum() / global_pair_count
    diff = diff.detach()
    return RewardLossOutput(
        loss=loss,
        accuracy=(diff > 0).to(diff.dtype),
        margins=diff,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
    )

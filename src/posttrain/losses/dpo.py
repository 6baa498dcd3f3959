"""Preference losses on sequence log-probs: DPO (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

Every loss here is a pure function of four [B] tensors of *summed* sequence log-probs (one entry per preference
pair; B = pairs) and shares one signature, so a config chooses it by name through `DPO_LOSSES`:

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
       label_smoothing=0.0, chosen_token_counts=None, global_pair_count=None, global_chosen_token_count=None)

Symbol map (paper → code):
    log π_θ(y_w|x), log π_θ(y_l|x)         policy_chosen_logps, policy_rejected_logps        [B]
    log π_ref(y_w|x), log π_ref(y_l|x)     ref_chosen_logps, ref_rejected_logps              [B]
    h = log π_θ(y_w)/π_ref(y_w) − log π_θ(y_l)/π_ref(y_l)                                    `logits` [B]
    r̂(x, y) = β log π_θ(y|x)/π_ref(y|x)   implicit reward: chosen_rewards, rejected_rewards [B]

Normalization: per-pair losses are summed and divided by `global_pair_count` when given (the number of pairs in the
whole optimizer step, across micro-batches and ranks), else by B. Summing the micro-batch losses then gives exactly
the full-batch loss and gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DPOOutput:
    """loss (scalar, differentiable) and per-pair detached metrics, each [B]."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # β (log π_θ(y_w) − log π_ref(y_w))
    rejected_rewards: torch.Tensor  # β (log π_θ(y_l) − log π_ref(y_l))
    margins: torch.Tensor  # chosen_rewards − rejected_rewards
    accuracy: torch.Tensor  # 1.0 where chosen_rewards > rejected_rewards
    policy_chosen_logps: torch.Tensor  # log π_θ(y_w), to watch the "meltdown" of Idea 0
    policy_rejected_logps: torch.Tensor  # log π_θ(y_l)

    def metrics(self) -> dict[str, float]:
        """Batch means of the metrics, named as TRL logs them."""
        return {
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margins": self.margins.mean().item(),
            "rewards/accuracies": self.accuracy.mean().item(),
            "logps/chosen": self.policy_chosen_logps.mean().item(),
            "logps/rejected": self.policy_rejected_logps.mean().item(),
        }


def _reduce(per_pair_loss: torch.Tensor, global_pair_count: float | torch.Tensor | None) -> torch.Tensor:
    """Σ per-pair loss / (global pair count, or B).  [B] → scalar."""
    if global_pair_count is None:
        return per_pair_loss.mean()
    return per_pair_loss.sum() / global_pair_count


def _output(
    loss: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> DPOOutput:
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # [B]
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # [B]
    return DPOOutput(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        policy_chosen_logps=policy_chosen_logps.detach(),
        policy_rejected_logps=policy_rejected_logps.detach(),
    )


def _logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l)).  [B]"""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    return pi_logratios - ref_logratios.detach()


def _no_label_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} applies only to the 'sigmoid' (conservative DPO) loss, not '{name}'"
        )


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """DPO (Rafailov et al. 2023, Eq. 7), with conservative-DPO label smoothing (Mitchell 2023, "A note on DPO with
    noisy preferences"):

        L = −(1 − ε) log σ(β h) − ε log σ(−β h)

    ε = label_smoothing is the assumed probability that a label is flipped; ε = 0 is plain DPO. When π_θ = π_ref,
    h = 0 and L = log 2. Gradient per pair (ε = 0, DPO Eq. 8):

        ∂L/∂ log π_θ(y_w) = −β σ(r̂_l − r̂_w),   ∂L/∂ log π_θ(y_l) = +β σ(r̂_l − r̂_w)

    so a pair weighs more when the implicit reward ranks it wrongly. chosen_token_counts and
    global_chosen_token_count are accepted for the common signature and unused.
    """
    logits = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    per_pair = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return _output(
        _reduce(per_pair, global_pair_count),
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    )


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """IPO (Azar et al. 2023, "A general theoretical paradigm...", Eq. 17): L = (h − 1/(2τ))², τ = beta.

    IPO regresses the log-ratio gap onto a finite target instead of pushing it to infinity. The paper's h is on
    summed log-probs, as here; TRL passes per-token averaged log-probs for "ipo" — average them before calling if
    that is wanted. Token-count arguments are unused.
    """
    _no_label_smoothing("ipo", label_smoothing)
    logits = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    per_pair = (logits - 1 / (2 * beta)) ** 2
    return _output(
        _reduce(per_pair, global_pair_count),
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    )


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """Hinge loss of SLiC-HF (Zhao et al. 2023, Eq. 2, with the reference log-ratio as in TRL's "hinge"):
    L = max(0, 1 − β h). Pairs whose margin β h exceeds 1 contribute nothing. Token-count arguments are unused."""
    _no_label_smoothing("hinge", label_smoothing)
    logits = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)  # [B]
    per_pair = torch.relu(1 - beta * logits)
    return _output(
        _reduce(per_pair, global_pair_count),
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    )


def idea0_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """The lecture's "Idea 0": maximize log π_θ(y_w) − log π_θ(y_l), i.e. L = −(log π_θ(y_w) − log π_θ(y_l)).

    No reference and no sigmoid: every pair pushes with the same constant weight (∂L/∂ log π_θ(y_w) = −1/B) forever,
    however well it is already ranked, so the cheapest descent is to drive log π_θ(y_l) → −∞ and the model
    degenerates — the unweighted naive objective DPO's §4 warns about (its Table 3 shows Unlikelihood samples).
    The reference log-probs enter only the implicit-reward metrics. Token-count arguments are unused.
    """
    _no_label_smoothing("idea0", label_smoothing)
    per_pair = -(policy_chosen_logps - policy_rejected_logps)  # [B]
    return _output(
        _reduce(per_pair, global_pair_count),
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    )


def idea1_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """The lecture's "Idea 1": SFT on the winners only ("Preferred-FT" in DPO §6), the NLL of y_w.

    With chosen_token_counts ([B], the number of completion tokens |y_w| of each chosen answer) the loss is SFT's
    token mean, L = Σ_b −log π_θ(y_w,b) / Σ_b |y_w,b|, with the denominator replaced by global_chosen_token_count
    (all chosen tokens of the optimizer step) when given. Without counts, L = mean_b −log π_θ(y_w,b) (sequence NLL,
    normalized by global_pair_count when given). Rejected answers and the reference enter only the metrics.
    """
    _no_label_smoothing("idea1", label_smoothing)
    nll = -policy_chosen_logps  # [B]
    if chosen_token_counts is None:
        loss = _reduce(nll, global_pair_count)
    else:
        denominator = global_chosen_token_count
        if denominator is None:
            denominator = chosen_token_counts.sum().clamp(min=1)
        loss = nll.sum() / denominator
    return _output(loss, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


DPO_LOSSES: dict[str, Callable[..., DPOOutput]] = {
    "sigmoid": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "idea0": idea0_loss,
    "idea1": idea1_loss,
}

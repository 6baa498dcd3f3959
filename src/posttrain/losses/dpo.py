"""Preference losses on sequence log-probs: DPO (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

Every loss here is a pure function of four [B] tensors of *summed* sequence log-probs (one entry per preference
pair; B = pairs) and shares one signature, so a config chooses it by name through `DPO_LOSSES`:

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
       label_smoothing=0.0, chosen_token_counts=None, rejected_token_counts=None, global_pair_count=None,
       global_chosen_token_count=None)

The token counts ([B], |y_w| and |y_l|: answer tokens that carry a log-prob) are needed by the length-normalized
losses (SimPO, ORPO, IPO averaged as TRL does) and by the SFT term; the other losses ignore them. The
reference-free losses (`REFERENCE_FREE`: SimPO, ORPO) ignore the reference log-probs except in the metrics.

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
    rejected_token_counts: torch.Tensor | None = None,
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
    rejected_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """IPO (Azar et al. 2023, "A general theoretical paradigm...", Eq. 17): L = (h − 1/(2τ))², τ = beta.

    IPO regresses the log-ratio gap onto a finite target instead of pushing it to infinity. The paper's h is on
    summed log-probs, as here; TRL averages the log-probs over the answer tokens for "ipo" (so its τ means a
    different thing): that is `ipo_length_averaged_loss`. Token-count arguments are unused.
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
    rejected_token_counts: torch.Tensor | None = None,
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


def unweighted_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """DPO without its weighting (Rafailov et al. 2023, §4: the "naïve version ... without the weighting
    coefficient"; the course notes' "Idea 0"): maximize log π_θ(y_w) − log π_θ(y_l), L = −(log π_θ(y_w) − log π_θ(y_l)).

    No reference and no sigmoid: every pair pushes with the same constant weight (∂L/∂ log π_θ(y_w) = −1/B) forever,
    however well it is already ranked, so the cheapest descent is to drive log π_θ(y_l) → −∞ and the model
    degenerates — the unweighted naive objective DPO's §4 warns about (its Table 3 shows Unlikelihood samples).
    The reference log-probs enter only the implicit-reward metrics. Token-count arguments are unused.
    """
    _no_label_smoothing("unweighted", label_smoothing)
    per_pair = -(policy_chosen_logps - policy_rejected_logps)  # [B]
    return _output(
        _reduce(per_pair, global_pair_count),
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    )


def preferred_ft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """Preferred-FT (Rafailov et al. 2023, §6; the course notes' "Idea 1"): SFT on the winners only, the NLL of y_w.

    With chosen_token_counts ([B], the number of completion tokens |y_w| of each chosen answer) the loss is SFT's
    token mean, L = Σ_b −log π_θ(y_w,b) / Σ_b |y_w,b|, with the denominator replaced by global_chosen_token_count
    (all chosen tokens of the optimizer step) when given. Without counts, L = mean_b −log π_θ(y_w,b) (sequence NLL,
    normalized by global_pair_count when given). Rejected answers and the reference enter only the metrics.
    """
    _no_label_smoothing("preferred_ft", label_smoothing)
    nll = -policy_chosen_logps  # [B]
    if chosen_token_counts is None:
        loss = _reduce(nll, global_pair_count)
    else:
        denominator = global_chosen_token_count
        if denominator is None:
            denominator = chosen_token_counts.sum().clamp(min=1)
        loss = nll.sum() / denominator
    return _output(loss, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def _need_counts(name: str, chosen_token_counts, rejected_token_counts) -> tuple[torch.Tensor, torch.Tensor]:
    if chosen_token_counts is None or rejected_token_counts is None:
        raise ValueError(f"{name} needs chosen_token_counts and rejected_token_counts (answer tokens per sequence)")
    return chosen_token_counts.clamp(min=1), rejected_token_counts.clamp(min=1)


def ipo_length_averaged_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """IPO on length-averaged log-probs, as TRL's `loss_type="ipo"` computes it (Azar et al. 2023, Eq. 17):

        h̄ = (log π_θ(y_w) − log π_ref(y_w)) / |y_w| − (log π_θ(y_l) − log π_ref(y_l)) / |y_l|
        L = (h̄ − 1/(2τ))²,    τ = beta

    Each sequence's summed log-probs are divided by its answer length before the gap is taken, so τ sets a target
    on a per-token log-ratio (TRL's convention) instead of a whole-answer one (`ipo_loss`). Needs both token counts.
    """
    _no_label_smoothing("ipo_avg", label_smoothing)
    n_w, n_l = _need_counts("ipo_avg", chosen_token_counts, rejected_token_counts)
    logits = _logits(policy_chosen_logps / n_w, policy_rejected_logps / n_l,
                     ref_chosen_logps / n_w, ref_rejected_logps / n_l)  # [B]
    per_pair = (logits - 1 / (2 * beta)) ** 2
    return _output(
        _reduce(per_pair, global_pair_count),
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
    )


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
    gamma_beta_ratio: float = 0.5,
) -> DPOOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): a reference-free, length-normalized reward with a margin.

        r_SimPO(x, y) = β/|y| · log π_θ(y|x)
        L = −log σ(β/|y_w| log π_θ(y_w|x) − β/|y_l| log π_θ(y_l|x) − γ),      γ = gamma_beta_ratio · β

    Defaults from the authors' code and configs: β = 2.0 (the recipe's default for simpo), γ/β = 0.5. With
    γ = 0 it is DPO's sigmoid loss on average log-probs with π_ref uniform (no reference). label_smoothing ε mixes
    in the flipped label as in conservative DPO (the SimPO code supports it too). The reference log-probs are not
    used by the loss; the reported rewards are SimPO's β/|y| log π_θ(y). Needs both token counts.
    """
    n_w, n_l = _need_counts("simpo", chosen_token_counts, rejected_token_counts)
    chosen_rewards = beta * policy_chosen_logps / n_w  # [B]
    rejected_rewards = beta * policy_rejected_logps / n_l  # [B]
    logits = chosen_rewards - rejected_rewards - gamma_beta_ratio * beta  # [B]
    per_pair = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return _reference_free_output(_reduce(per_pair, global_pair_count), chosen_rewards, rejected_rewards,
                                  policy_chosen_logps, policy_rejected_logps)


def _reference_free_output(loss, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return DPOOutput(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        policy_chosen_logps=policy_chosen_logps.detach(),
        policy_rejected_logps=policy_rejected_logps.detach(),
    )


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y) = log P − log(1 − P) for P = exp(mean_logps) (ORPO Eq. 4), exact near P → 1 via expm1.  [B]"""
    return mean_logps - torch.log(-torch.expm1(mean_logps))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    global_pair_count: float | torch.Tensor | None = None,
    global_chosen_token_count: float | torch.Tensor | None = None,
) -> DPOOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4–7): SFT plus an odds-ratio penalty, no reference model.

        P_θ(y|x) = exp(1/|y| log π_θ(y|x))                       (length-averaged, as the paper's code and TRL)
        odds_θ(y|x) = P_θ(y|x) / (1 − P_θ(y|x))
        L_OR  = −log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x))
        L     = L_SFT + λ · L_OR,      λ = beta (paper and TRL: 0.1)

    L_SFT is the NLL of the chosen answers, a token mean over the step (Σ_b −log π_θ(y_w,b) / Σ_b |y_w,b|, with
    global_chosen_token_count when given), as TRL computes it; L_OR is a mean over pairs (global_pair_count).
    The reported rewards are TRL's λ · log P_θ(y|x); the reference log-probs are not used.
    """
    _no_label_smoothing("orpo", label_smoothing)
    n_w, n_l = _need_counts("orpo", chosen_token_counts, rejected_token_counts)
    mean_w, mean_l = policy_chosen_logps / n_w, policy_rejected_logps / n_l  # [B]
    ratio_term = -F.logsigmoid(log_odds(mean_w) - log_odds(mean_l))  # [B]
    denominator = global_chosen_token_count if global_chosen_token_count is not None else n_w.sum()
    nll = -policy_chosen_logps.sum() / denominator
    loss = nll + beta * _reduce(ratio_term, global_pair_count)
    return _reference_free_output(loss, beta * mean_w, beta * mean_l, policy_chosen_logps, policy_rejected_logps)


DPO_LOSSES: dict[str, Callable[..., DPOOutput]] = {
    "sigmoid": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "unweighted": unweighted_dpo_loss,
    "preferred_ft": preferred_ft_loss,
    "idea0": unweighted_dpo_loss,  # the course notes' names for the two baselines above
    "idea1": preferred_ft_loss,
    "ipo_avg": ipo_length_averaged_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}

REFERENCE_FREE = frozenset({"simpo", "orpo"})
"""Losses of DPO_LOSSES that never read π_ref: the recipe skips the reference model and its cache for them."""

DEFAULT_BETA = {"simpo": 2.0}
"""β of the papers where it differs from DPO's 0.1 (SimPO's configs use 2.0; ORPO's λ = 0.1; IPO's τ = 0.1)."""

idea0_loss = unweighted_dpo_loss  # the course notes' names (DPO_LOSSES keeps them as keys too)
idea1_loss = preferred_ft_loss

"""Per-token policy-gradient losses: PPO/GRPO clipped surrogate (Schulman et al. 2017; Shao et al. 2024), DAPO
clip-higher (Yu et al. 2025), CISPO/ScaleRL truncated IS (MiniMax 2025; Khatri et al. 2025), GSPO's sequence ratio
(Zheng et al. 2025), RLOO (Ahmadian et al. 2024), SAPO's soft gate (Gao et al. 2025), DPPO's binary TV/KL trust
region (Qi et al. 2026), PPO's value loss.

Every loss is a pure function of per-token tensors of the sampled completions (rows = sequences, i.e. B·G rows for
B prompts with G samples each, prompt-major; T = completion tokens, right padded):

    logps       [B, T]   log π_θ(y_t), differentiable
    old_logps   [B, T]   log π_θold(y_t) from the training policy before this update (detached)
    advantages  [B] or [B, T]   Â (sequence-level, broadcast over tokens, or per token from GAE)
    mask        [B, T]   true on completion tokens

and returns a frozen dataclass with `loss` and detached metrics. Three optional parts are shared by all of them:
the KL term β·k(π_θ, π_ref) against `ref_logps` (estimators in `posttrain.ops.kl`), an importance-sampling weight
`is_weights` from `importance_sampling_weights` when the sampler's log-probs differ from π_θold, and the loss
aggregation (`AGGREGATIONS`), which takes the global counts of the optimizer step so that micro-batches sum exactly
to the full batch.

Padded positions may hold any finite or infinite garbage: log-ratios are zeroed there before exponentiating, so
padding changes neither the loss nor the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from posttrain.ops.kl import KL_ESTIMATORS
from posttrain.ops.masked import masked_mean, masked_sum, masked_var

# --------------------------------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalCounts:
    """Counts over the whole optimizer step (all micro-batches; summed over data-parallel ranks by the caller, who
    then multiplies the loss by the world size because DDP averages gradients).

    tokens: valid completion tokens; samples: sequences (B·G); prompts: prompt groups (B), needed by "prompt".
    """

    tokens: float | torch.Tensor
    samples: float | torch.Tensor
    prompts: float | torch.Tensor | None = None

    @classmethod
    def from_mask(cls, mask: torch.Tensor, group_size: int | None = None) -> GlobalCounts:
        """Counts of a full-step mask [B·G, T] (before it is split into micro-batches)."""
        rows = mask.shape[0]
        prompts = None
        if group_size is not None:
            if rows % group_size:
                raise ValueError(f"{rows} sequences cannot be split into groups of {group_size}")
            prompts = rows // group_size
        return cls(tokens=mask.to(torch.float64).sum(), samples=rows, prompts=prompts)


def aggregate_token(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    counts: GlobalCounts | None = None,
    group_size: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Token average (DAPO §3.3 as implemented; ScaleRL §3.2 "token average"): Σ_{i,t} ℓ_{i,t} / N_tokens over every
    token of the step. Long answers weigh more. group_size and max_length are unused.  [B, T] → scalar."""
    return masked_mean(per_token_loss, mask, global_count=None if counts is None else counts.tokens)


def aggregate_sample(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    counts: GlobalCounts | None = None,
    group_size: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Sample average (GRPO, DeepSeekMath Eq. 3): 1/N Σ_i 1/|y_i| Σ_t ℓ_{i,t}, N = sequences of the step.
    Every answer weighs the same, so each token of a long answer weighs less. group_size, max_length unused."""
    per_sample = masked_mean(per_token_loss, mask, dim=1)  # [B]
    if counts is None:
        return per_sample.mean()
    return per_sample.sum() / counts.samples


def aggregate_prompt(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    counts: GlobalCounts | None = None,
    group_size: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Prompt average (ScaleRL §3.2/§4; DAPO Eq. 8 read per prompt): 1/P Σ_p 1/Σ_{g}|y_g| Σ_{g,t} ℓ_{g,t}, i.e. a token
    mean inside each prompt's group of G answers, then a mean over the P prompts of the step.

    Needs group_size=G; a micro-batch must hold whole groups (rows are prompt-major). max_length is unused.
    """
    if group_size is None:
        raise ValueError("aggregation 'prompt' needs group_size (samples per prompt)")
    rows, T = per_token_loss.shape
    if rows % group_size:
        raise ValueError(f"aggregation 'prompt': {rows} rows are not whole groups of {group_size}")
    per_prompt = masked_mean(
        per_token_loss.reshape(-1, group_size * T), mask.reshape(-1, group_size * T), dim=1
    )  # [P]
    if counts is None:
        return per_prompt.mean()
    if counts.prompts is None:
        raise ValueError("aggregation 'prompt' needs GlobalCounts.prompts (build it with from_mask(mask, group_size))")
    return per_prompt.sum() / counts.prompts


def aggregate_constant(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    *,
    counts: GlobalCounts | None = None,
    group_size: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Constant normalizer (Dr. GRPO, Liu et al. 2025 §3.2; `masked_sum(..., constant_normalizer=max_len)` in
    understand-r1-zero): Σ_{i,t} ℓ_{i,t} / (L_max · N), L_max the generation length limit, N sequences of the step.
    No length bias in either direction. group_size is unused."""
    if max_length is None:
        raise ValueError("aggregation 'constant' needs max_length (the generation length limit)")
    samples = per_token_loss.shape[0] if counts is None else counts.samples
    return masked_sum(per_token_loss, mask) / (max_length * samples)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token": aggregate_token,
    "sample": aggregate_sample,
    "prompt": aggregate_prompt,
    "constant": aggregate_constant,
}


def _aggregation(name: str) -> Callable[..., torch.Tensor]:
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation {name!r}; expected one of {sorted(AGGREGATIONS)}") from None


# --------------------------------------------------------------------------------------------------------------------
# Importance-sampling correction between the sampler and the trainer
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportanceWeights:
    """weights: [B, T] (token level) or [B, 1] (sequence level), detached, to multiply the per-token loss.
    Statistics are over valid tokens (token level) or sequences (sequence level), of the raw ratio."""

    weights: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    frac_corrected: torch.Tensor  # share of ratios truncated (truncate) or zeroed (mask)

    def metrics(self) -> dict[str, float]:
        return {
            "is/ratio_mean": self.ratio_mean.item(),
            "is/ratio_min": self.ratio_min.item(),
            "is/ratio_max": self.ratio_max.item(),
            "is/frac_corrected": self.frac_corrected.item(),
        }


def importance_sampling_weights(
    old_logps: torch.Tensor,
    gen_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    cap_low: float | None = None,
) -> ImportanceWeights:
    """Correction for sampling with π_gen (e.g. a vLLM engine, or stale weights) while training π_θold.

        token level:     w_t = π_θold(y_t) / π_gen(y_t)                      [B, T]
        sequence level:  w   = Π_t π_θold(y_t) / π_gen(y_t) = exp Σ_t (log π_θold − log π_gen)   [B, 1]
        truncate (TIS, Yao et al. 2025):   w ← min(w, C)      (and max(w, C_low) when cap_low is set)
        mask (MIS, IcePop, Ling Team 2025): w ← 0 where w > C  (or w < C_low)

    The sequence ratio is the product of token ratios (the unbiased sequence IS weight; TRL's convention, see
    trl#5814), not GSPO's geometric mean. old_logps, gen_logps, mask: [B, T]. cap = C (TRL's default is 3.0).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"importance sampling level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"importance sampling mode must be 'truncate' or 'mask', got {mode!r}")
    m = mask.bool()
    log_ratio = torch.where(m, old_logps.detach() - gen_logps.detach(), 0.0)  # [B, T]
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True)  # [B, 1]
        valid = m.any(dim=1, keepdim=True)  # [B, 1]
    else:
        valid = m
    ratio = torch.exp(log_ratio)
    low = -torch.inf if cap_low is None else cap_low
    outside = (ratio > cap) | (ratio < low)
    weights = ratio.clamp(min=cap_low, max=cap) if mode == "truncate" else ratio.masked_fill(outside, 0.0)
    return ImportanceWeights(
        weights=weights,
        ratio_mean=masked_mean(ratio, valid),
        ratio_min=_masked_min(ratio, valid),
        ratio_max=_masked_max(ratio, valid),
        frac_corrected=masked_mean(outside.to(ratio.dtype), valid),
    )


def _masked_max(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """max over valid positions; 1.0 (a neutral ratio) when nothing is valid."""
    return torch.where(m.any(), torch.where(m, x, -torch.inf).amax(), 1.0).to(x.dtype)


def _masked_min(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m.any(), torch.where(m, x, torch.inf).amin(), 1.0).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossOutput:
    """loss (scalar, differentiable) and detached scalar metrics over this call's valid tokens."""

    loss: torch.Tensor
    ratio_mean: torch.Tensor  # ρ = π_θ/π_θold
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    clip_frac_low: torch.Tensor  # tokens whose gradient the lower clip removed (clipped) or bounded (CISPO)
    clip_frac_high: torch.Tensor
    clip_frac: torch.Tensor  # clip_frac_low + clip_frac_high
    kl: torch.Tensor | None  # mean per-token KL estimate to π_ref; None without ref_logps
    token_count: torch.Tensor  # valid tokens in this call, to weight metrics across micro-batches

    def metrics(self) -> dict[str, float]:
        out = {
            "loss": self.loss.item(),
            "ratio/mean": self.ratio_mean.item(),
            "ratio/min": self.ratio_min.item(),
            "ratio/max": self.ratio_max.item(),
            "clip_frac/low": self.clip_frac_low.item(),
            "clip_frac/high": self.clip_frac_high.item(),
            "clip_frac": self.clip_frac.item(),
        }
        if self.kl is not None:
            out["kl"] = self.kl.item()
        return out


def _ratio(logps: torch.Tensor, old_logps: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ρ_t = exp(log π_θ − log π_θold), exactly 1 at padded positions.  [B, T]"""
    return torch.exp(torch.where(m, logps - old_logps.detach(), 0.0))


def _per_token_advantages(advantages: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1] (broadcast over tokens); [B, T] unchanged. Advantages are constants of the update."""
    advantages = advantages.detach()
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def _finish(
    per_token_loss: torch.Tensor,
    logps: torch.Tensor,
    m: torch.Tensor,
    ratio: torch.Tensor,
    clipped_low: torch.Tensor,
    clipped_high: torch.Tensor,
    *,
    aggregation: str,
    group_size: int | None,
    max_length: int | None,
    counts: GlobalCounts | None,
    ref_logps: torch.Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    is_weights: torch.Tensor | None,
) -> PolicyLossOutput:
    """The parts every policy loss shares: IS weight, KL term, aggregation, metrics."""
    aggregate = _aggregation(aggregation)
    if is_weights is not None:
        # Following TRL, the IS weight multiplies the policy-gradient term only, not the KL regularizer.
        per_token_loss = per_token_loss * torch.where(m, is_weights.detach(), 0.0)
    kl = None
    if ref_logps is not None:
        per_token_kl = KL_ESTIMATORS[kl_estimator](torch.where(m, logps, 0.0), torch.where(m, ref_logps, 0.0))
        if kl_coef:
            per_token_loss = per_token_loss + kl_coef * per_token_kl
        kl = masked_mean(per_token_kl.detach(), m)
    elif kl_coef:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logps")
    per_token_loss = torch.where(m, per_token_loss, 0.0)  # [B, T]
    loss = aggregate(per_token_loss, m, counts=counts, group_size=group_size, max_length=max_length)
    ratio = ratio.detach()
    low = masked_mean(clipped_low.to(ratio.dtype), m)
    high = masked_mean(clipped_high.to(ratio.dtype), m)
    return PolicyLossOutput(
        loss=loss,
        ratio_mean=masked_mean(ratio, m),
        ratio_min=_masked_min(ratio, m),
        ratio_max=_masked_max(ratio, m),
        clip_frac_low=low,
        clip_frac_high=high,
        clip_frac=low + high,
        kl=kl,
        token_count=m.sum(),
    )


def clipped_surrogate_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "sample",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7) as GRPO uses it (DeepSeekMath Eq. 3), with DAPO's
    decoupled clip range (Yu et al. 2025, Eq. 10, "clip-higher"):

        ρ_t = π_θ(y_t) / π_θold(y_t)
        ℓ_t = −min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t) + β k(π_θ, π_ref)_t
        L   = aggregate(ℓ)                 ("sample" for GRPO, "token" for DAPO/PPO, "constant" for Dr. GRPO)

    Symbol map: epsilon_low/epsilon_high → ε_low/ε_high (GRPO/PPO 0.2/0.2, DAPO 0.2/0.28), kl_coef → β
    (DeepSeekMath 0.04; 0 in DAPO and Dr. GRPO), kl_estimator → k (GRPO: k3).

    On the first update after sampling π_θ = π_θold, so ρ = 1, the clip is inactive and ∇L = −Σ w_t Â_t ∇log π_θ(y_t)
    with w_t the aggregation weight; the loss value −Σ w_t Â_t is often 0 (centred advantages, sample average) while
    its gradient is not (trl#2703).
    clip_frac_low counts tokens with ρ < 1 − ε_low and Â < 0, clip_frac_high those with ρ > 1 + ε_high and Â > 0:
    exactly the tokens whose gradient the clip removes.
    """
    m = mask.bool()
    ratio = _ratio(logps, old_logps, m)  # [B, T]
    adv = _per_token_advantages(advantages)  # [B, 1] or [B, T]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv
    per_token_loss = -torch.minimum(unclipped, clipped)  # [B, T]
    return _finish(
        per_token_loss, logps, m, ratio,
        (ratio < 1 - epsilon_low) & (adv < 0),
        (ratio > 1 + epsilon_high) & (adv > 0),
        aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_max: float = 5.0,
    ratio_min: float = 0.0,
    aggregation: str = "token",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585, Eq. 4) as ScaleRL writes it (Khatri et al. 2025, §4):

        ℓ_t = −sg(min(ρ_t, ε_max)) · Â_t · log π_θ(y_t) + β k(π_θ, π_ref)_t,     ρ_t = π_θ(y_t)/π_θold(y_t)
        ∇ℓ_t = −min(ρ_t, ε_max) · Â_t · ∇log π_θ(y_t)

    A REINFORCE term whose importance weight is truncated and detached: unlike the clipped surrogate, no token ever
    loses its gradient, a token with ρ > ε_max just keeps the weight ε_max. ScaleRL = this loss with "prompt"
    aggregation and batch-normalized advantages; CISPO = "token" aggregation (1/Σ|y_i|).

    Clip semantics, which differ between implementations:
      - ScaleRL and TRL (`loss_type="cispo"`): upper truncation only, at an *absolute* ratio ε_max (ScaleRL tried
        4, 5, 8 with no difference; TRL recommends epsilon_high=5.0); lower bound 0. This is the default here.
      - veRL (`loss_mode=cispo`) and NeMo RL (docs/guides/cispo.md): clamp(ρ, 1 − ε_low, 1 + ε_high), detached —
        two-sided and relative to 1. Reproduce with epsilon_max = 1 + ε_high and ratio_min = 1 − ε_low.
    ScaleRL's ρ is π_train^θ / π_gen^θold: pass the sampler's log-probs as old_logps to follow it literally, or the
    trainer's recomputed log-probs as old_logps plus `is_weights` for the sampler/trainer mismatch.
    The loss *value* is −Σ w Â log π, not an objective value; compare losses across methods by their gradients.
    clip_frac_high counts tokens with ρ > ε_max, clip_frac_low those with ρ < ratio_min.
    """
    m = mask.bool()
    ratio = _ratio(logps, old_logps, m)  # [B, T]
    adv = _per_token_advantages(advantages)  # [B, 1] or [B, T]
    weight = ratio.clamp(min=ratio_min, max=epsilon_max).detach()  # [B, T]
    per_token_loss = -weight * adv * logps  # [B, T]; padded garbage is zeroed in _finish
    return _finish(
        per_token_loss, logps, m, ratio,
        ratio < ratio_min,
        ratio > epsilon_max,
        aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Sequence-ratio and trust-region losses: GSPO, RLOO, SAPO, DPPO
# --------------------------------------------------------------------------------------------------------------------

# GSPO (Zheng et al. 2025), RLOO (Ahmadian et al. 2024, as TRL's RLOOTrainer clips it), SAPO (Gao et al. 2025) and
# DPPO's binary TV / KL trust regions (Qi et al. 2026, arXiv 2602.04879), on the same tensors as the losses above;
# each is built the same way: a per-token surrogate ℓ_t, then the shared
# `_finish` (optional IS weight, optional β·KL term, one aggregation with the step's global counts).
#
# Sequence-level ratios (GSPO, RLOO) are written per token with the "token form" of GSPO §4.2:
#
#     s_{i,t} = sg(s_i) · exp(c_i (log π_θ(y_t) − sg(log π_θ(y_t))))
#
# whose value is s_i on every token and whose gradient is c_i s_i ∇log π_θ(y_t). With the "sample" aggregation
# (mean over a sequence's tokens, then over sequences) the gradient of the per-sequence mean is
# c_i s_i (1/|y_i|) Σ_t ∇log π_θ(y_t): c_i = 1 gives ∇s_i for GSPO's geometric mean, c_i = |y_i| gives ∇s_i for the
# product ratio of RLOO. The value of the aggregate equals the paper's sequence-level objective exactly.


def _sequence_advantages(advantages: torch.Tensor, name: str) -> torch.Tensor:
    """[B] → [B, 1] (one advantage per sequence); per-token [B, T] advantages are refused."""
    advantages = _per_token_advantages(advantages)
    if advantages.shape[1] != 1:
        raise ValueError(f"{name} takes one advantage per sequence ([B]); got shape {tuple(advantages.shape)}")
    return advantages


def _sequence_ratio_tokens(
    logps: torch.Tensor, old_logps: torch.Tensor, m: torch.Tensor, *, length_normalized: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token form of a sequence importance ratio (see the module docstring).

    length_normalized: s_i = exp(1/|y_i| Σ_t log ρ_t) (GSPO Eq. 7); else s_i = exp(Σ_t log ρ_t) (the product).
    Returns (s_tokens [B, T] differentiable, value s_i on every token; s [B, 1] detached).
    """
    log_ratio = torch.where(m, logps - old_logps.detach(), 0.0)  # [B, T]
    lengths = m.sum(dim=1, keepdim=True).clamp(min=1).to(log_ratio.dtype)  # [B, 1]
    log_seq = log_ratio.sum(dim=1, keepdim=True)  # [B, 1]
    if length_normalized:
        log_seq = log_seq / lengths
        scale = torch.ones_like(lengths)
    else:
        scale = lengths
    moving = torch.where(m, logps - logps.detach(), 0.0)  # [B, T]: value 0, gradient ∇log π_θ(y_t)
    s_tokens = torch.exp(log_seq.detach() + scale * moving)  # [B, T]
    return s_tokens, torch.exp(log_seq.detach())


def _sequence_clipped(
    logps, old_logps, advantages, mask, *, length_normalized, epsilon_low, epsilon_high, aggregation, group_size,
    max_length, counts, ref_logps, kl_coef, kl_estimator, is_weights, name,
) -> PolicyLossOutput:
    m = mask.bool()
    adv = _sequence_advantages(advantages, name)  # [B, 1]
    s_tokens, s = _sequence_ratio_tokens(logps, old_logps, m, length_normalized=length_normalized)
    per_token_loss = -torch.minimum(s_tokens * adv, s_tokens.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)  # [B, T]
    low = ((s < 1 - epsilon_low) & (adv < 0)).expand_as(m)  # [B, T]: the whole sequence is clipped
    high = ((s > 1 + epsilon_high) & (adv > 0)).expand_as(m)
    return _finish(
        per_token_loss, logps, m, s.expand_as(m), low, high,
        aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    aggregation: str = "sample",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, Eqs. 5 and 7; token form §4.2):

        s_i = (π_θ(y_i|x) / π_θold(y_i|x))^{1/|y_i|} = exp(1/|y_i| Σ_t log ρ_{i,t})
        J   = 1/G Σ_i min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i)
        ∇J  = 1/G Σ_i s_i Â_i · 1/|y_i| Σ_t ∇log π_θ(y_{i,t})          (unclipped sequences)

    A sequence is clipped as a whole: its gradient is 0 when s_i leaves the band in the direction of Â_i. The
    paper's clip range is ε_low = 3e-4, ε_high = 4e-4 (§5.1): two orders of magnitude below the token clip, since s_i
    is a geometric mean. With one token per sequence this is the token-level clipped surrogate. The "sample"
    aggregation reproduces 1/G Σ_i exactly (other aggregations weight sequences by length, as TRL warns).
    advantages: [B], one per sequence. The clip fractions count the tokens of clipped sequences.
    """
    return _sequence_clipped(
        logps, old_logps, advantages, mask, length_normalized=True, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, aggregation=aggregation, group_size=group_size, max_length=max_length,
        counts=counts, ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
        name="gspo_loss",
    )  # fmt: skip


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "sample",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", Eq. 6) with TRL's sequence-level clip:

        Â_i = r_i − 1/(G−1) Σ_{j≠i} r_j                         (`posttrain.ops.advantages.rloo_advantages`)
        ρ_i = π_θ(y_i|x) / π_θold(y_i|x) = exp(Σ_t log ρ_{i,t})  (the whole completion is one action)
        L   = 1/N Σ_i −min(ρ_i Â_i, clip(ρ_i, 1 − ε_low, 1 + ε_high) Â_i)

    On the first update after sampling ρ_i = 1 and ∇L = −1/N Σ_i Â_i ∇log π_θ(y_i|x), the paper's REINFORCE
    estimator with the leave-one-out baseline (log π of the sequence = the sum of its token log-probs). TRL's
    RLOOTrainer uses this clip (ε = 0.2) for μ > 1 updates per batch. Use the "sample" aggregation (1/N Σ_i):
    the per-token form spreads ρ_i's gradient so that each sequence's token mean has gradient ∇ρ_i.
    advantages: [B], one per sequence.
    """
    return _sequence_clipped(
        logps, old_logps, advantages, mask, length_normalized=False, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, aggregation=aggregation, group_size=group_size, max_length=max_length,
        counts=counts, ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
        name="rloo_loss",
    )  # fmt: skip


def sapo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    aggregation: str = "sample",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """SAPO, soft adaptive policy optimization (Gao et al. 2025, arXiv 2511.20347, Eqs. 5–6):

        f_τ(ρ) = σ(τ (ρ − 1)) · 4/τ,        τ = τ_pos if Â_t > 0 else τ_neg
        ℓ_t    = −f_τ(ρ_t) Â_t,             ρ_t = π_θ(y_t) / π_θold(y_t)
        ∇ℓ_t   = −w_t Â_t ∇log π_θ(y_t),    w_t = 4 σ(τ(ρ_t − 1)) (1 − σ(τ(ρ_t − 1))) ρ_t

    A smooth gate instead of a hard clip: w = 1 on-policy (ρ = 1, so the first update is plain policy gradient) and
    decays smoothly as ρ leaves 1; no token's gradient is cut to exactly 0. τ_neg > τ_pos makes negative-advantage
    tokens decay faster (the paper's defaults τ_pos = 1.0, τ_neg = 1.05; TRL and AReaL use the same). Aggregated
    like GRPO (1/G Σ_i 1/|y_i| Σ_t). The clip fractions are 0: nothing is clipped.
    """
    m = mask.bool()
    ratio = _ratio(logps, old_logps, m)  # [B, T]
    adv = _per_token_advantages(advantages)  # [B, 1] or [B, T]
    tau = torch.where(adv > 0, ratio.new_tensor(tau_pos), ratio.new_tensor(tau_neg))  # [B, 1] or [B, T]; exact in f64
    gate = torch.sigmoid(tau * (ratio - 1)) * (4 / tau)  # [B, T]
    per_token_loss = -gate * adv
    never = torch.zeros_like(m)
    return _finish(
        per_token_loss, logps, m, ratio, never, never,
        aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


def binary_tv(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """Binary total variation between π and μ on the sampled token (DPPO §4.2): the TV of the two-outcome
    distributions {y_t, not y_t}, D = |π(y_t) − μ(y_t)|. Returned signed, π(y_t) − μ(y_t).  [B, T] → [B, T]."""
    return logps.exp() - old_logps.exp()


def binary_kl(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """Binary KL(μ ‖ π) on the sampled token (DPPO §4.2), with p = π(y_t), q = μ(y_t):

        D = q log(q/p) + (1 − q) log((1 − q)/(1 − p))          [B, T] → [B, T], ≥ 0

    log(1 − e^x) is computed as log(−expm1(x)), exact near x = 0 (+∞ when π(y_t) = 1 and μ(y_t) < 1)."""
    q = old_logps.exp()
    log1m_p = torch.log(-torch.expm1(logps))
    log1m_q = torch.log(-torch.expm1(old_logps))
    rest = torch.where(q < 1, (1 - q) * (log1m_q - log1m_p), 0.0)
    return q * (old_logps - logps) + rest


def _dppo(logps, old_logps, advantages, mask, *, divergence, delta_low, delta_high, ratio_cap, aggregation,
          group_size, max_length, counts, ref_logps, kl_coef, kl_estimator, is_weights) -> PolicyLossOutput:
    m = mask.bool()
    lp = torch.where(m, logps.detach(), 0.0)
    old = torch.where(m, old_logps.detach(), 0.0)
    ratio = _ratio(logps, old_logps, m)  # [B, T]
    adv = _per_token_advantages(advantages)  # [B, 1] or [B, T]
    up, down = lp > old, lp < old  # [B, T]: did π(y_t) move up or down from μ(y_t)?
    if divergence == "tv":
        d = binary_tv(lp, old)
        out_high, out_low = d > delta_high, d < -delta_low
    else:
        d = binary_kl(lp, old)
        out_high, out_low = (d > delta_high) & up, (d > delta_low) & down
    masked_high = out_high & (adv > 0)  # would push π(y_t) further up, out of the region
    masked_low = out_low & ~(adv > 0)  # would push it further down
    keep = ~(masked_high | masked_low)
    weight = ratio.clamp(max=ratio_cap).detach()  # [B, T]
    per_token_loss = -torch.where(keep, weight * adv * logps, 0.0)
    return _finish(
        per_token_loss, logps, m, ratio, masked_low, masked_high,
        aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


def dppo_tv_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta_low: float = 0.15,
    delta_high: float = 0.15,
    ratio_cap: float = 10.0,
    aggregation: str = "token",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """DPPO-Binary-TV (Qi et al. 2026, "Rethinking the Trust Region in LLM RL", arXiv 2602.04879, §4):

        ρ_t = π_θ(y_t) / μ(y_t),   D_t = π_θ(y_t) − μ(y_t)                (binary TV, signed)
        M_t = 0 if (Â_t > 0 and D_t > δ_high) or (Â_t ≤ 0 and D_t < −δ_low), else 1
        ℓ_t = −M_t · sg(min(ρ_t, C)) · Â_t · log π_θ(y_t)
        ∇ℓ_t = −M_t min(ρ_t, C) Â_t ∇log π_θ(y_t)

    PPO masks a token when its *ratio* leaves [1 − ε, 1 + ε], which over-constrains rare tokens (1e-5 → 1e-3 is a
    ratio of 100 but a negligible divergence) and under-constrains likely ones. DPPO masks it when the divergence
    between the two policies on that state — estimated on the sampled token's binary distribution — leaves the trust
    region δ, and only in the direction the advantage pushes. Defaults: δ = 0.15 and C = 10 (the authors' Stable-RL
    code and verl's example), token-mean aggregation. μ is the behaviour policy: old_logps (the recipe passes the
    trainer's π_θold, or the sampler's log-probs with ratio_against=sampler). clip_frac_high/low count masked tokens
    with Â > 0 / Â ≤ 0.
    """
    return _dppo(
        logps, old_logps, advantages, mask, divergence="tv", delta_low=delta_low, delta_high=delta_high,
        ratio_cap=ratio_cap, aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


def dppo_kl_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta_low: float = 0.05,
    delta_high: float = 0.05,
    ratio_cap: float = 10.0,
    aggregation: str = "token",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """DPPO-Binary-KL (Qi et al. 2026, arXiv 2602.04879, §4): DPPO-Binary-TV with the binary KL as the divergence:

        D_t = μ log(μ/π) + (1 − μ) log((1 − μ)/(1 − π))     at the sampled token (`binary_kl`)
        M_t = 0 if (Â_t > 0, π > μ, D_t > δ_high) or (Â_t ≤ 0, π < μ, D_t > δ_low), else 1
        ℓ_t = −M_t · sg(min(ρ_t, C)) · Â_t · log π_θ(y_t)

    Defaults δ = 0.05, C = 10 (Stable-RL / verl example), token-mean aggregation.
    """
    return _dppo(
        logps, old_logps, advantages, mask, divergence="kl", delta_low=delta_low, delta_high=delta_high,
        ratio_cap=ratio_cap, aggregation=aggregation, group_size=group_size, max_length=max_length, counts=counts,
        ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator, is_weights=is_weights,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# PPO value loss
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueLossOutput:
    loss: torch.Tensor
    clip_frac: torch.Tensor  # tokens where the clipped error was the larger one
    explained_variance: torch.Tensor  # 1 − Var[R − V] / Var[R] over valid tokens (1 = perfect, ≤ 0 = useless)

    def metrics(self) -> dict[str, float]:
        return {
            "value/loss": self.loss.item(),
            "value/clip_frac": self.clip_frac.item(),
            "value/explained_variance": self.explained_variance.item(),
        }


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    aggregation: str = "token",
    group_size: int | None = None,
    max_length: int | None = None,
    counts: GlobalCounts | None = None,
) -> ValueLossOutput:
    """PPO's clipped value loss (Schulman et al. 2017 as implemented in openai/baselines ppo2; TRL/OpenRLHF):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        ℓ_t    = ½ max((V − R)², (V_clip − R)²)            (½ (V − R)² when clip_range is None)

    values: [B, T] V_φ(s_t) (differentiable); old_values: [B, T] from the rollout; returns: [B, T] GAE targets R_t
    (`posttrain.ops.advantages.gae(...).returns`); mask: [B, T]. Aggregated like the policy loss.
    """
    m = mask.bool()
    old_values = old_values.detach()
    returns = returns.detach()
    error = torch.where(m, values - returns, 0.0)  # [B, T]
    squared = error**2
    if clip_range is None:
        per_token_loss = 0.5 * squared
        clipped_larger = torch.zeros_like(m)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        squared_clipped = torch.where(m, v_clipped - returns, 0.0) ** 2
        per_token_loss = 0.5 * torch.maximum(squared, squared_clipped)
        clipped_larger = squared_clipped > squared
    loss = _aggregation(aggregation)(
        torch.where(m, per_token_loss, 0.0), m, counts=counts, group_size=group_size, max_length=max_length
    )
    residual_var = masked_var(error.detach(), m)
    returns_var = masked_var(torch.where(m, returns, 0.0), m)
    return ValueLossOutput(
        loss=loss,
        clip_frac=masked_mean(clipped_larger.to(values.dtype), m),
        explained_variance=1 - residual_var / returns_var.clamp(min=torch.finfo(returns_var.dtype).tiny),
    )


# --------------------------------------------------------------------------------------------------------------------
# Named algorithms
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossPreset:
    """A named algorithm: the loss function, its paper's settings, and the advantage estimator it pairs with
    (a key of `posttrain.ops.advantages.ADVANTAGE_ESTIMATORS`, or "gae"). Calling it calls `loss_fn` with the
    defaults, overridden by any keyword given (e.g. counts=..., ref_logps=..., kl_coef=...)."""

    loss_fn: Callable[..., PolicyLossOutput]
    advantage_estimator: str
    defaults: Mapping[str, Any]

    def __call__(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **overrides: Any,
    ) -> PolicyLossOutput:
        return self.loss_fn(logps, old_logps, advantages, mask, **{**self.defaults, **overrides})


def _preset(loss_fn: Callable[..., PolicyLossOutput], advantage_estimator: str, **defaults: Any) -> PolicyLossPreset:
    return PolicyLossPreset(loss_fn, advantage_estimator, MappingProxyType(defaults))


POLICY_LOSSES: dict[str, PolicyLossPreset] = {
    # DeepSeekMath: ε = 0.2, sample average, group-normalized advantages (β = 0.04 is the recipe's kl_coef).
    "grpo": _preset(clipped_surrogate_loss, "grpo", epsilon_low=0.2, epsilon_high=0.2, aggregation="sample"),
    # DAPO: clip-higher 0.2/0.28, token-level loss as in its released code (verl token-mean), no KL.
    "dapo": _preset(clipped_surrogate_loss, "grpo", epsilon_low=0.2, epsilon_high=0.28, aggregation="token"),
    # Dr. GRPO: mean-only advantages, Σ/(L_max·N); the recipe passes max_length.
    "dr_grpo": _preset(clipped_surrogate_loss, "dr_grpo", epsilon_low=0.2, epsilon_high=0.2, aggregation="constant"),
    # CISPO (MiniMax-M1): truncated detached IS weight, 1/Σ|y_i| (token average).
    "cispo": _preset(cispo_loss, "grpo", epsilon_max=5.0, aggregation="token"),
    # ScaleRL: CISPO with prompt average and batch-normalized advantages; the recipe passes group_size.
    "scalerl": _preset(cispo_loss, "batch", epsilon_max=5.0, aggregation="prompt"),
    # PPO for RLHF: per-token GAE advantages, token average (plus clipped_value_loss for the critic).
    "ppo": _preset(clipped_surrogate_loss, "gae", epsilon_low=0.2, epsilon_high=0.2, aggregation="token"),
    # GSPO §5.1: sequence-level clip 3e-4 / 4e-4, 1/G Σ_i over sequences, group-normalized advantages.
    "gspo": _preset(gspo_loss, "grpo", epsilon_low=3e-4, epsilon_high=4e-4, aggregation="sample"),
    # SAPO: τ_pos = 1.0, τ_neg = 1.05, GRPO's sample average and advantages.
    "sapo": _preset(sapo_loss, "grpo", tau_pos=1.0, tau_neg=1.05, aggregation="sample"),
    # DPPO (Stable-RL / verl example): binary TV δ = 0.15 or binary KL δ = 0.05, ratio cap 10, token mean.
    "dppo_tv": _preset(dppo_tv_loss, "grpo", delta_low=0.15, delta_high=0.15, ratio_cap=10.0, aggregation="token"),
    "dppo_kl": _preset(dppo_kl_loss, "grpo", delta_low=0.05, delta_high=0.05, ratio_cap=10.0, aggregation="token"),
    # RLOO (TRL RLOOTrainer): leave-one-out advantages, sequence ratio clipped at 0.2, mean over sequences.
    "rloo": _preset(rloo_loss, "rloo", epsilon_low=0.2, epsilon_high=0.2, aggregation="sample"),
}

"""Per-token policy-gradient losses: PPO/GRPO clipped surrogate (Schulman et al. 2017; Shao et al. 2024), DAPO
clip-higher (Yu et al. 2025), CISPO/ScaleRL truncated IS (MiniMax 2025; Khatri et al. 2025), PPO's value loss.

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
}

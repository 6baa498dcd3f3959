"""Metropolis–Hastings acceptance for power sampling, π ∝ p^α (Karan & Du 2025, arXiv 2510.14901, Eq. 9).

Notation (paper -> code):
    p(x)            -> base model, per-token log-probs `*_target_logps` (raw log_softmax(logits), NOT scaled by α)
    π(x) ∝ p(x)^α   -> target; only ratios are needed, so π(x')/π(x) = exp(α·(Σ log p(x') − Σ log p(x)))
    p_prop          -> proposal: the base model at temperature 1/α, per-token log-probs `*_proposal_logps`
                       (log_softmax(α·logits) with no top-k/top-p truncation)
    x, x'           -> current sequence and proposal; both share the prefix x[:m] and differ in the suffix from m
    A(x, x')        -> exp(log_acceptance(...))

A proposal keeps x[:m] and samples x'[m:] from p_prop until EOS or the block end. Tokens before m appear in
both π(x) and π(x') and in neither proposal density, so they cancel and only the two suffixes enter:

    log A = min(0, α·(Σ_{t≥m} log p(x'_t) − Σ_{t≥m} log p(x_t)) + Σ_{t≥m} log p_prop(x_t) − Σ_{t≥m} log p_prop(x'_t))

In the block-wise Algorithm 1 the sums run from m to the end of the sequence so far (the intermediate target
π_k covers the first (k+1)·B tokens, or fewer if EOS came first). The official code's
`log_r = Σ target_prop + Σ q_cur − Σ target_cur − Σ q_prop` is this quantity with its target log-probs already
multiplied by α (it stores (1/temp)·log_softmax(logits)); here α is applied inside, to raw log-probs.

`cur_*` must hold the FULL current suffix x[m:], however long the proposal turned out. The official code
(`power_samp_utils.py`, `mcmc_power_samp`) slices the current suffix to the proposal's length when the proposal
hits EOS early, which drops the current tail from both sums and biases the chain; `test_ttc_mh.py` shows the
resulting stationary distribution is not p^α/Z (TV 0.025 there, against < 1e-10 with the full suffix).

Choice of the position m: the formula above is exact when m is drawn from a distribution that does not depend
on the current state (e.g. uniform over the block's positions, Algorithm 1's m ~ U{1..(k+1)B}); when m lands past
the end of a sequence that already ended with EOS, the step is a no-op. If m is instead drawn uniformly from the
current sequence's own length (the official code's `randint(c, t-1)`), the reverse move picks m with probability
1/n(x') instead of 1/n(x), where n(·) counts the positions m is drawn from in that sequence (its generated
length), and the ratio needs `log_position_ratio = log(n(x) / n(x'))`; without it the chain again targets the
wrong distribution once sequences of different lengths compete (TV 0.24 on the toy model of test_ttc_mh.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import torch

ArrayLike: TypeAlias = torch.Tensor | Sequence[float]


def _summed(logps: ArrayLike, mask: ArrayLike | None) -> torch.Tensor:
    """Σ over the last dim in float64: [T] -> [], [B, T] -> [B]."""
    values = torch.as_tensor(logps, dtype=torch.float64)
    if mask is not None:
        values = values * torch.as_tensor(mask, dtype=torch.float64)
    return values.sum(dim=-1)  # [] or [B]


def log_acceptance(
    alpha: float,
    cur_target_logps: ArrayLike,
    prop_target_logps: ArrayLike,
    cur_proposal_logps: ArrayLike,
    prop_proposal_logps: ArrayLike,
    *,
    cur_mask: ArrayLike | None = None,
    prop_mask: ArrayLike | None = None,
    log_position_ratio: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """log A(x -> x') of Eq. 9 for target p^α, over the resampled suffixes only.

    alpha: the power α > 0 (proposal temperature 1/α; α = 4 in the paper).
    cur_target_logps: [T] or [B, T], log p(x_t) of the base model on the FULL current suffix x[m:].
    prop_target_logps: [T'] or [B, T'], log p(x'_t) on the proposed suffix x'[m:].
    cur_proposal_logps: same shape as cur_target_logps, log p_prop(x_t) (temperature 1/α) on x[m:].
    prop_proposal_logps: same shape as prop_target_logps, log p_prop(x'_t) on x'[m:].
    cur_mask, prop_mask: optional 0/1 masks of the same shapes for padded batches (padding may also be 0.0).
    log_position_ratio: log P(m | x') − log P(m | x), zero when m is drawn independently of the state.

    Returns log A ≤ 0 as a float64 tensor of shape [] or [B]. Sums run in float64.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    log_target_ratio = alpha * (_summed(prop_target_logps, prop_mask) - _summed(cur_target_logps, cur_mask))
    log_proposal_ratio = _summed(cur_proposal_logps, cur_mask) - _summed(prop_proposal_logps, prop_mask)
    log_ratio = log_target_ratio + log_proposal_ratio + torch.as_tensor(log_position_ratio, dtype=torch.float64)
    return torch.clamp(log_ratio, max=0.0)  # [] or [B]


def accept(log_a: float | torch.Tensor, u: float | torch.Tensor) -> torch.Tensor:
    """Accept iff u < A, computed as log u < log A; deterministic given the uniform draw u ∈ [0, 1).

    With log A = 0 every u < 1 accepts; u = 0 accepts unless A = 0. Returns a bool tensor of the broadcast shape
    (0-d for scalars, so `if accept(log_a, u):` works).
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    if bool(((u < 0) | (u >= 1)).any()):
        raise ValueError(f"u must lie in [0, 1), got {u.tolist()}")
    return torch.log(u) < torch.as_tensor(log_a, dtype=torch.float64)

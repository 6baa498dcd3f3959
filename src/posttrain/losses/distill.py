"""Distillation divergences between a teacher p and a student q_θ, per token (GKD, Agarwal et al. 2024, arXiv 2306.13649).

Symbols: at a position t with prefix y_<t, p = π_teacher(·|y_<t) and q = π_student(·|y_<t), distributions over the V
tokens; `teacher_logps` → log p, `student_logps` → log q. Every full-distribution function is row-wise: log-prob
rows [N, V] in (N positions, any N; any leading shape [..., V] works the same), one value per row [N] out; rows are
normalised log-probs (log_softmax output).

    forward KL   KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)                       mode-covering; off-policy token-level
    reverse KL   KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)                       mode-seeking; on-policy (Qwen3, GKD)
    JSD(β)       β KL(p ‖ m) + (1 − β) KL(q ‖ m),  m = β p + (1 − β) q          GKD Eq. (1)

Which distribution the student's tokens come from is the recipe's business (off-policy: fixed sequences; on-policy:
the student's own samples). The sampled-token reverse KL (`reverse_kl_sampled_loss`) needs only log q(y_t) and
log p(y_t) of the sampled tokens; everything else needs whole rows, which the recipe computes chunk by chunk
(posttrain.ops.distill), so these functions never see more than one chunk of rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from posttrain.ops.masked import masked_sum

RowDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v (log a_v − log b_v) per row, with 0 · log 0 = 0 (a_v = 0 adds nothing even where b_v = 0)."""
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (a * diff).sum(-1)


def forward_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """Forward KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row.  student_logps, teacher_logps [N, V] -> [N], ≥ 0.

    The supervised/“word-level KD” objective (Hinton et al. 2015; Kim & Rush 2016): its gradient w.r.t. the student's
    logits z is q − p, i.e. cross-entropy against the teacher's soft labels.
    """
    return _xlogy_diff(teacher_logps, student_logps)


def reverse_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """Reverse KL(q ‖ p) = Σ_v q_v (log q_v − log p_v) per row, the full-distribution form.  [N, V], [N, V] -> [N].

    Exact at each visited prefix; differentiable through q (gradient w.r.t. the logits z: q ⊙ (log q − log p − KL)).
    """
    return _xlogy_diff(student_logps, teacher_logps)


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1), per row.  [N, V], [N, V] -> [N].

        JSD(β)(p ‖ q) = β KL(p ‖ m) + (1 − β) KL(q ‖ m),    m = β p + (1 − β) q,   0 < β < 1.

    log m is computed as logsumexp(log β + log p, log(1 − β) + log q) (no underflow for tiny probabilities).
    The limits: JSD(β) → 0 at both ends, but JSD(β)/β → KL(p ‖ q) as β → 0 and JSD(β)/(1 − β) → KL(q ‖ p) as β → 1
    (first-order expansion of KL(q ‖ q + β(p − q)) is O(β²)); so the gradients behave like the forward KL near β = 0
    and like the reverse KL near β = 1 (GKD §3). As in GKD's experiments (and TRL), β = 0 and β = 1 *mean* those
    limits: β = 0 returns `forward_kl`, β = 1 returns `reverse_kl`. β outside [0, 1] is an error.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logps, teacher_logps)
    if beta == 1.0:
        return reverse_kl(student_logps, teacher_logps)
    log_m = torch.logaddexp(teacher_logps + math.log(beta), student_logps + math.log1p(-beta))  # [N, V]
    return beta * _xlogy_diff(teacher_logps, log_m) + (1.0 - beta) * _xlogy_diff(student_logps, log_m)


def forward_kl_topk(student_logps: torch.Tensor, teacher_topk_logps: torch.Tensor,
                    teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """Forward KL over the teacher's top-k tokens with the rest lumped into one bucket, per row.

        KL_k(p ‖ q) = Σ_{v∈S} p_v (log p_v − log q_v) + p_R (log p_R − log q_R),
        S = the teacher's k most probable tokens, p_R = 1 − Σ_{v∈S} p_v,  q_R = 1 − Σ_{v∈S} q_v.

    student_logps [N, V] (full rows); teacher_topk_logps, teacher_topk_ids [N, K] (what a teacher cache stores).
    This is the exact KL between p and q coarsened to k + 1 outcomes, so 0 ≤ KL_k ≤ KL (data-processing inequality),
    with equality when the tokens outside S have the same relative probabilities under p and q (in particular for
    k ≥ V − 1). The error KL − KL_k is what is lost by keeping k teacher log-probs instead of V; the lumped bucket
    keeps the student from inflating the mass outside S for free (without it the loss is not a divergence).
    p_R comes from the stored top-k (1 − Σ, clamped at the float's tiny value); q_R is the logsumexp of the student's
    row outside S (exact).
    """
    student_topk = student_logps.gather(-1, teacher_topk_ids)  # [N, K]
    head = _xlogy_diff(teacher_topk_logps, student_topk)  # [N]
    if teacher_topk_ids.shape[-1] >= student_logps.shape[-1]:
        return head  # nothing lumped
    tiny = torch.finfo(teacher_topk_logps.dtype).tiny
    covered = torch.logsumexp(teacher_topk_logps, dim=-1).exp().clamp(max=1.0)  # [N] Σ_S p_v
    log_p_rest = torch.log((1.0 - covered).clamp(min=tiny))  # [N]
    # the student's full row is at hand: its rest mass is a logsumexp over the complement, exact near q_R → 0
    log_q_rest = student_logps.scatter(-1, teacher_topk_ids, float("-inf")).logsumexp(-1)  # [N]
    p_rest = log_p_rest.exp()
    tail = torch.where(p_rest > tiny, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return head + tail


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def row_divergence(name: str, beta: float = 0.5) -> RowDivergence:
    """The row-wise divergence named by a config key: forward_kl, reverse_kl (full-distribution) or jsd (with β)."""
    if name == "forward_kl":
        return forward_kl
    if name == "reverse_kl":
        return reverse_kl
    if name == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        return partial(generalized_jsd, beta=beta)
    raise ValueError(f"unknown divergence {name!r}; expected one of {list(DIVERGENCES)}")


@dataclass(frozen=True)
class DistillOutput:
    """loss: the scalar to backpropagate (sum over this micro-batch / the step's global token count).
    divergence: detached Σ of the per-token divergence values over the micro-batch's tokens (divide by the global
    count for the step's mean); tokens: the micro-batch's token count."""

    loss: torch.Tensor
    divergence: torch.Tensor
    tokens: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss), "divergence_sum": float(self.divergence), "tokens": float(self.tokens)}


def token_divergence_loss(per_token_divergence: torch.Tensor, mask: torch.Tensor, *,
                          num_tokens: float | torch.Tensor) -> DistillOutput:
    """Mean of a per-token divergence over the step's tokens:  L = Σ_{b,t} m_{b,t} D_{b,t} / n_global.

    per_token_divergence [B, T] (or [N]) with gradient; mask the same shape; num_tokens: the token count of the whole
    optimizer step (all micro-batches and ranks, divided by the world size under DDP's gradient averaging), so that
    accumulation and data-parallel splits give the gradient of one big batch.
    """
    total = masked_sum(per_token_divergence, mask)
    return DistillOutput(total / num_tokens, total.detach(), mask.sum().detach())


def reverse_kl_sampled_loss(student_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor, *,
                            num_tokens: float | torch.Tensor, discount: float = 0.0,
                            behaviour_logps: torch.Tensor | None = None) -> DistillOutput:
    """Reverse KL from the student's own samples with the sampled-token estimator, as a policy-gradient loss.

    The student sampled y ~ q. Per token, the estimator k1_t = log q(y_t) − log p(y_t) is unbiased for
    KL(q(·|y_<t) ‖ p(·|y_<t)) (ops.kl.kl_k1). Its negation is a per-token reward (On-Policy Distillation, Thinking
    Machines 2025; Qwen3 report §4.5), and the loss is REINFORCE with that reward, normalised by global tokens:

        A_t = −Σ_{s≥t} γ^{s−t} k1_s   (detached),      L = −Σ_{b,t} m_{b,t} · w_{b,t} · A_{b,t} / n_global,
        w_t = exp(log q_θ(y_t) − log μ(y_t))           (importance weight; = 1 in value, ∇w = ∇ log q when μ = q)

    student_logps [B, T]: log q_θ of the sampled tokens, with gradient; teacher_logps [B, T]: log p (no gradient);
    mask [B, T]: completion tokens (right-padded; A sums over them only). behaviour_logps [B, T]: log μ of the
    sampler (e.g. vLLM's); default log q_θ detached (exactly on-policy).
    discount γ: 0 (Thinking Machines' choice) gives E[∇L] = ∇_θ Σ_t E_{y<t~q}[KL_t] with the prefix distribution
    held fixed, the same expected gradient as differentiating the full-distribution `reverse_kl` at the visited
    prefixes; γ = 1 gives E[∇L] = ∇_θ KL(q(y) ‖ p(y)) of whole sequences (the prefixes' dependence on θ included).
    tests/distill checks both against brute-force enumeration.
    `divergence` reports Σ k1 (an unbiased estimate of the summed per-token KLs).
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    m = mask.to(student_logps.dtype)
    k1 = (student_logps.detach() - teacher_logps.detach()) * m  # [B, T]
    if discount == 0.0:
        returns = k1
    else:
        returns = torch.zeros_like(k1)
        running = torch.zeros_like(k1[:, 0])
        for t in range(k1.shape[1] - 1, -1, -1):
            running = k1[:, t] + discount * running
            returns[:, t] = running
    advantages = -returns  # [B, T]
    behaviour = student_logps.detach() if behaviour_logps is None else behaviour_logps.detach()
    weights = torch.exp(student_logps - behaviour)  # [B, T]
    per_token_loss = -weights * advantages  # [B, T]
    return DistillOutput(masked_sum(per_token_loss, mask) / num_tokens, k1.sum(), mask.sum().detach())

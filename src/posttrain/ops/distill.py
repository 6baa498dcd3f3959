"""Per-token divergences between two LM heads, chunked: never a [N, V] tensor for either model, let alone both.

A distillation loss needs, at each scored position, the student's and the teacher's whole next-token distributions
(for forward KL, full-distribution reverse KL, JSD). With z_s = h_s W_sᵀ / τ and z_t = h_t W_tᵀ / τ:

    D_n = divergence(log_softmax(z_s[n]), log_softmax(z_t[n]))        for each row n of N scored positions

`divergence_at_rows` computes D chunk by chunk from the final hidden states (h_s [N, D_s], h_t [N, D_t]) and the two
heads. Each chunk runs under activation checkpointing: the forward keeps only D for the chunk, and the backward
recomputes the chunk's two [c, V] rows (one extra head matmul per model per chunk) to differentiate through the
student. Peak extra memory is a few [c, V] float32 buffers instead of B·T·V floats per model (the teacher side of
TRL's GKD trainer holds both full logit tensors at once). The teacher's rows may live on another device: its logits
are computed there and only the chunk's log-probs are moved.

`teacher_topk_at_rows` keeps the k largest teacher log-probs per row (ids and values), chunked, for a top-k cache.
The math runs in at least float32 (ops.logps._acc).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.ops.logps import DEFAULT_CHUNK, _acc

RowDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ([c, V], [c, V]) -> [c], losses.distill


def _row_logps(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(_acc(hidden @ weight.t()) / temperature, dim=-1)  # [c, V]


def divergence_at_rows(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    divergence: RowDivergence,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
) -> torch.Tensor:
    """D(q_n, p_n) per row.  student_hidden [N, D_s], student_weight [V, D_s], teacher_hidden [N, D_t],
    teacher_weight [V, D_t] (teacher tensors on any device, no gradient) -> [N] on the student's device.

    divergence: a row-wise function (student_logps [c, V], teacher_logps [c, V]) -> [c] from losses.distill.
    Differentiable w.r.t. the student's hidden states and head; equal to the unchunked computation.
    """
    N = student_hidden.shape[0]
    if teacher_hidden.shape[0] != N:
        raise ValueError(f"student and teacher rows differ: {N} vs {teacher_hidden.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}")
    device = student_hidden.device

    def chunk_divergence(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logps = _row_logps(h_t, teacher_weight, temperature).to(device)  # [c, V]
        return divergence(_row_logps(h_s, w_s, temperature), teacher_logps)  # [c]

    out = []
    for start in range(0, N, chunk_size):
        h_s, h_t = student_hidden[start:start + chunk_size], teacher_hidden[start:start + chunk_size]
        if torch.is_grad_enabled() and (h_s.requires_grad or student_weight.requires_grad):
            out.append(checkpoint(chunk_divergence, h_s, student_weight, h_t, use_reentrant=False))
        else:
            out.append(chunk_divergence(h_s, student_weight, h_t))
    if not out:
        return student_hidden.new_zeros(0, dtype=torch.promote_types(student_hidden.dtype, torch.float32))
    return torch.cat(out)


@torch.no_grad()
def teacher_topk_at_rows(
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k most probable tokens per row: (log-probs [N, k], ids [N, k]), from hidden [N, D_t], head
    [V, D_t], chunked. The log-probs are normalised over the full vocabulary."""
    values, ids = [], []
    for start in range(0, teacher_hidden.shape[0], chunk_size):
        top = _row_logps(teacher_hidden[start:start + chunk_size], teacher_weight, temperature).topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    if not values:
        return teacher_hidden.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(values), torch.cat(ids)

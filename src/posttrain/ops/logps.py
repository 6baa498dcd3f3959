"""Per-token log-probs and entropy of the labels, computed in chunks so no [B, T, V] log-softmax is materialized.

log p(y_t) = z_{t, y_t} − logsumexp_v z_{t, v}, with z = h·Wᵀ / τ the logits at temperature τ.

Two entry points:
- `logps_from_logits`: the model already produced logits [B, T, V]; we gather per chunk of rows and never build a
  second [B, T, V] tensor (log_softmax would). Autograd of logsumexp keeps only the [rows] result.
- `logps_from_hidden`: the fused path. The LM head runs only at positions that carry a label (not on prompts or
  padding, which for RL and SFT batches is often most of them). From the final hidden states [B, T, D] and the LM
  head weight [V, D], each chunk's logits are computed, reduced to [rows] and dropped; the backward pass recomputes
  them per chunk. Peak extra memory is one chunk of logits instead of B·T·V floats (trl#3678 is this blow-up).
The math is done in float32 whatever the model's dtype (ScaleRL's "FP32 logits", Khatri et al. 2025 §4).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK = 256  # rows of the flattened [B*T] axis per chunk: 256 x V=49152 fp32 logits = 50 MB


def _acc(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logps_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK, temperature: float = 1.0
) -> torch.Tensor:
    """log p(labels) from logits.  logits [B, T, V], labels [B, T] (IGNORE_INDEX allowed) -> [B, T], 0 where ignored."""
    B, T, V = logits.shape
    flat_logits = logits.reshape(B * T, V)  # [B*T, V], a view
    flat_labels = labels.reshape(B * T)
    valid = flat_labels != IGNORE_INDEX
    safe = flat_labels.clamp(min=0)
    out = []
    for start in range(0, B * T, chunk_size):
        z = _acc(flat_logits[start:start + chunk_size])  # [c, V]
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, safe[start:start + chunk_size, None]).squeeze(-1)  # [c]
        out.append(picked - torch.logsumexp(z, dim=-1))
    logps = torch.cat(out) * valid  # [B*T]
    return logps.view(B, T)


def entropy_from_logits(logits: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits/τ) per position: H = logsumexp(z) − Σ softmax(z)·z.  [B, T, V] -> [B, T]."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    out = []
    for start in range(0, B * T, chunk_size):
        z = _acc(flat[start:start + chunk_size]) / temperature  # [c, V]
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        out.append(lse.squeeze(-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(out).view(B, T)


class _FusedLinearLogps(torch.autograd.Function):
    """log softmax(h Wᵀ / τ)[y] per row, chunked in forward and recomputed chunk-wise in backward.

    d log p(y) / d z = onehot(y) − softmax(z), so for an upstream gradient g per row:
    dz = g·(onehot − p)/τ,  dh = dz W,  dW = dzᵀ h.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, temperature):  # hidden [N, D], weight [V, D], labels [N]
        N = hidden.shape[0]
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logps = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        lse = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            z = _acc(hidden[start:end] @ weight.t()) / temperature  # [c, V]
            lse[start:end] = torch.logsumexp(z, dim=-1)
            logps[start:end] = z.gather(-1, labels[start:end, None]).squeeze(-1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # grad_logps [N]
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        rows = torch.arange(min(chunk_size, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            z = _acc(h @ weight.t()) / temperature  # [c, V]
            g = grad_logps[start:end].to(z.dtype)
            dz = z.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])  # −g·softmax(z), in place: one [c, V] buffer
            dz[rows[: end - start], labels[start:end]] += g
            dz = dz.div_(temperature).to(weight.dtype)
            if need_h:
                grad_hidden[start:end] = dz @ weight
            if need_w:
                grad_weight += (dz.t() @ h).to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(labels) from final hidden states and the LM head, without materializing the logits.

    hidden [B, T, D], weight [V, D], labels [B, T] (IGNORE_INDEX allowed) -> [B, T] float32, 0 where ignored.
    """
    B, T, D = hidden.shape
    flat_labels = labels.reshape(B * T)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [N]: the head runs only where a label is scored
    picked = logps_at_rows(hidden.reshape(B * T, D).index_select(0, rows), weight, flat_labels.index_select(0, rows),
                           chunk_size=chunk_size, temperature=temperature)  # [N]
    return picked.new_zeros(B * T).index_copy(0, rows, picked).view(B, T)


def logps_at_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(h Wᵀ / τ)[label] for rows of hidden states.  hidden [N, D], weight [V, D], labels [N] -> [N]."""
    return _FusedLinearLogps.apply(hidden, weight, labels, chunk_size, float(temperature))


@torch.no_grad()
def entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy per position from hidden states [B, T, D] and LM head [V, D] -> [B, T], chunked, no grad.

    mask [B, T] (optional): compute only where it is nonzero; other positions are 0.
    """
    B, T, D = hidden.shape
    flat = hidden.reshape(B * T, D)
    rows = mask.reshape(B * T).nonzero().squeeze(1) if mask is not None else None
    values = entropy_at_rows(flat if rows is None else flat.index_select(0, rows), weight, chunk_size=chunk_size,
                             temperature=temperature)
    if rows is None:
        return values.view(B, T)
    return values.new_zeros(B * T).index_copy(0, rows, values).view(B, T)


@torch.no_grad()
def entropy_at_rows(
    hidden: torch.Tensor, weight: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK, temperature: float = 1.0
) -> torch.Tensor:
    """Entropy of softmax(h Wᵀ / τ) for rows of hidden states, chunked, no grad.  hidden [N, D] -> [N]."""
    out = [torch.zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)]
    for start in range(0, hidden.shape[0], chunk_size):
        z = _acc(hidden[start:start + chunk_size] @ weight.t()) / temperature  # [c, V]
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(out)


def shift_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels aligned with the inputs: labels[:, t] = input_ids[:, t+1] where it carries loss.

    input_ids, loss_mask [B, T] (loss_mask[t] = 1 if token t is a target); position_ids [B, T] marks packed
    examples (a 0 starts a new example), so no label crosses an example boundary. Returns [B, T] with IGNORE_INDEX.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    target = loss_mask[:, 1:].bool()
    if position_ids is not None:
        target = target & (position_ids[:, 1:] != 0)
    labels[:, :-1] = torch.where(target, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return labels

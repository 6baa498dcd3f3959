"""Per-token log-probs and entropy of the labels, computed in chunks so no [B, T, V] log-softmax is materialized.

log p(y_t) = z_{t, y_t} − logsumexp_v z_{t, v}, with z = h·Wᵀ / τ the logits at temperature τ.

Two entry points:
- `logps_from_logits`: the model already produced logits [B, T, V]; we gather per chunk of rows and never build a
  second [B, T, V] tensor (log_softmax would). Autograd of logsumexp keeps only the [rows] result.
- `logps_from_hidden`: the fused path. The LM head runs only at positions that carry a label (not on prompts or
  padding, which for RL and SFT batches is often most of them). From the final hidden states [B, T, D] and the LM
  head weight [V, D], each chunk's logits are computed, reduced to [rows] and dropped; the backward pass recomputes
  them per chunk. Peak extra memory is one chunk of logits instead of B·T·V floats (trl#3678 is this blow-up).
The math is done in float32 whatever the model's dtype (ScaleRL's "FP32 logits", Khatri et al. 2025 §4): the head's
matmul itself returns float32 logits (a bf16 head is upcast once per call), not bf16 logits upcast afterwards.
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


def _head_weight(weight: torch.Tensor) -> torch.Tensor:
    """The LM head in the accumulation dtype: a bf16/fp16 head is upcast once per call (V·D floats), so that every
    chunk's matmul returns float32 logits instead of rounding them to bf16 first (up to 0.007 nats on SmolLM2)."""
    return weight.to(torch.promote_types(weight.dtype, torch.float32))


def _chunk_logits(h: torch.Tensor, weight_acc: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = h Wᵀ / τ in the accumulation dtype.  h [c, D], weight_acc [V, D] -> [c, V]."""
    z = h.to(weight_acc.dtype) @ weight_acc.t()
    return z.div_(temperature) if temperature != 1.0 else z


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, in place: one row-wise pass of ATen's softmax kernel writing into its input (the
    kernel reads each row's max and sum before writing the row), so a chunk costs one [c, V] buffer and no second
    pass of separate max / subtract / exp / sum / divide kernels over it."""
    return torch.ops.aten._softmax.out(z, -1, False, out=z)


class _FusedLinearLogps(torch.autograd.Function):
    """log softmax(h Wᵀ / τ)[y] per row, in chunks of rows, never holding more than one chunk of logits.

    d log p(y) / d z = onehot(y) − softmax(z), so for an upstream gradient g per row and S = softmax(z) − onehot(y):

        dh = −(g/τ) · S W            dW = −Sᵀ (g/τ ⊙ h)     (g/τ scales the rows of h, not the [c, V] block)

    dh depends on g only through a per-row factor, so the forward pass, which holds S for the chunk anyway,
    computes U = S W [N, D] (one GEMM) and the backward pass only scales it: no logits are recomputed for the
    hidden-state gradient. dW needs g inside the sum, so when the head itself is trained (full fine-tuning) the
    backward recomputes each chunk's logits (one GEMM) and accumulates dW in place (one GEMM); it walks the chunks
    last to first and starts with the forward's last chunk, whose S is still in the buffer (one recompute fewer).

    Per chunk, in one reused [c, V] buffer: the logits' GEMM writes into it, one pass takes each row's max and
    argmax, the softmax is formed in place (one fused row-wise kernel), and the log-normaliser is read off the
    softmax at the argmax, lse = max − log softmax[argmax] (= max + log Σ exp(z − max); softmax[argmax] ≥ 1/V never
    underflows), so log p(y) = z_y − lse as in log_softmax, with no cancellation between large numbers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, temperature):  # hidden [N, D], weight [V, D], labels [N]
        N = hidden.shape[0]
        weight_acc = _head_weight(weight)
        acc_dtype = weight_acc.dtype
        need_h, need_w = ctx.needs_input_grad[:2]  # (grad mode is off inside forward; set from the inputs)
        logps = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        lse = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        u = torch.empty((N, hidden.shape[1]), dtype=acc_dtype, device=hidden.device) if need_h else None
        buf = torch.empty((min(chunk_size, N), weight.shape[0]), dtype=acc_dtype, device=hidden.device)
        for start in range(0, N, chunk_size):
            end = min(start + chunk_size, N)
            h = hidden[start:end].to(acc_dtype)
            h = h / temperature if temperature != 1.0 else h  # [c, D]: τ scales the rows of h, not the [c, V] logits
            z = torch.mm(h, weight_acc.t(), out=buf[:end - start])  # [c, V]
            y = labels[start:end, None]
            picked = z.gather(-1, y).squeeze(-1)  # [c]
            zmax, top = z.max(dim=-1, keepdim=True)  # [c, 1]
            s = _softmax_(z)  # [c, V], in place
            lse[start:end] = (zmax - s.gather(-1, top).log()).squeeze(-1)  # S[top] = 1 / Σ exp(z − zmax)
            logps[start:end] = picked - lse[start:end]
            if need_h or need_w:
                s.scatter_add_(-1, y, torch.full_like(picked[:, None], -1.0))  # S = softmax − onehot
            if need_h:
                torch.mm(s, weight_acc, out=u[start:end])  # U = S W
        ctx.save_for_backward(hidden, weight, labels, lse, u)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        # the last chunk's S is still in the buffer: the backward starts with it instead of recomputing it
        ctx.kept = buf if need_w and N else None
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # grad_logps [N]
        hidden, weight, labels, lse, u = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_logps.to(lse.dtype).mul(-1.0 / temperature)  # [N]: −g/τ
        grad_hidden = (u * scale[:, None]).to(hidden.dtype) if need_h else None
        grad_weight = None
        if need_w:
            N = hidden.shape[0]
            weight_acc = _head_weight(weight)
            grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
            starts = list(range(0, N, chunk_size))[::-1]  # last chunk first: its S may still be in the forward's buffer
            kept, ctx.kept = ctx.kept, None  # (a second backward, with retain_graph, recomputes every chunk)
            buf = kept if kept is not None else torch.empty((min(chunk_size, N), weight.shape[0]), dtype=lse.dtype,
                                                            device=weight.device)  # [min(c, N), V]
            for start in starts:
                end = min(start + chunk_size, N)
                h = hidden[start:end].to(lse.dtype)
                if kept is not None:
                    s, kept = buf[:end - start], None  # S = softmax − onehot from the forward
                else:
                    z = torch.mm(h / temperature if temperature != 1.0 else h, weight_acc.t(), out=buf[:end - start])
                    s = z.sub_(lse[start:end, None]).exp_()  # softmax, in place
                    s.scatter_add_(-1, labels[start:end, None], torch.full((end - start, 1), -1.0, dtype=s.dtype,
                                                                          device=s.device))  # S = softmax − onehot
                grad_weight.addmm_(s.t(), h * scale[start:end, None])  # dW += Sᵀ (−g/τ ⊙ h), in place
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
    weight_acc = _head_weight(weight)
    out = [torch.zeros(0, dtype=weight_acc.dtype, device=hidden.device)]
    for start in range(0, hidden.shape[0], chunk_size):
        z = _chunk_logits(hidden[start:start + chunk_size], weight_acc, temperature)  # [c, V]
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

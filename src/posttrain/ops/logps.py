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

import math

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK = 256  # rows of the flattened [B*T] axis per chunk: 256 x V=49152 fp32 logits = 50 MB
# What the fused path may hold for a trained head, in units of one [N, V] logits tensor: the head's gradient (V·D
# floats) and the softmax rows it keeps from the forward to the backward instead of recomputing them. The plain
# path holds ≥ 2.6 such tensors (logits, log-softmax, their gradient) plus the same V·D, so 0.6 stays under a
# quarter of it; at T = 2048, V = 49152, D = 576 it keeps 32% of the rows at B = 1 and 53% at B = 4
# (bench/results/logps.md).
DEFAULT_KEEP_BUDGET = 0.6


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
    """log softmax(h Wᵀ / τ)[y] per row, in chunks of rows, holding a bounded share of the rows' logits.

    d log p(y) / d z = onehot(y) − softmax(z), so for an upstream gradient g per row and S = softmax(z) − onehot(y):

        dh = −(g/τ) · S W            dW = −Sᵀ (g/τ ⊙ h)     (g/τ scales the rows of h, not the [c, V] block)

    dh depends on g only through a per-row factor, so the forward pass, which holds S for the chunk anyway,
    computes U = S W [N, D] (one GEMM) and the backward pass only scales it: no logits are recomputed for the
    hidden-state gradient. dW needs g inside the sum, so when the head itself is trained (full fine-tuning) the
    backward needs each chunk's S again. For the last `keep_rows` rows (at least the last chunk, which is in the
    buffer anyway) the forward leaves S in memory and the backward uses it; for the other rows it recomputes the
    logits (one GEMM per chunk). The trade: a kept row costs V floats until the backward and saves its share of an
    N·V·D GEMM; keeping none costs 4 such GEMMs against the plain path's 3 (logits, dh, dW), keeping all costs 3.

    Per chunk, in one [c, V] buffer: the logits' GEMM writes into it, one pass takes each row's max and
    argmax, the softmax is formed in place (one fused row-wise kernel), and the log-normaliser is read off the
    softmax at the argmax, lse = max − log softmax[argmax] (= max + log Σ exp(z − max); softmax[argmax] ≥ 1/V never
    underflows), so log p(y) = z_y − lse as in log_softmax, with no cancellation between large numbers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, temperature, keep_rows):  # hidden [N, D], weight [V, D]
        N = hidden.shape[0]
        weight_acc = _head_weight(weight)
        acc_dtype = weight_acc.dtype
        need_h, need_w = ctx.needs_input_grad[:2]  # (grad mode is off inside forward; set from the inputs)
        logps = torch.empty(N, dtype=acc_dtype, device=hidden.device)
        u = torch.empty((N, hidden.shape[1]), dtype=acc_dtype, device=hidden.device) if need_h else None
        # rows [kept_from, N) keep S for the backward (only a trained head needs it; at least the last chunk, which
        # is in the buffer anyway); chunks are cut separately before and after kept_from
        kept_from = max(N - max(keep_rows, chunk_size), 0) if need_w else N
        store = torch.empty((max(N - kept_from, min(chunk_size, N)), weight.shape[0]), dtype=acc_dtype,
                            device=hidden.device)  # [kept rows, V], its first chunk the buffer of the other chunks
        for start, end in _chunks(N, chunk_size, kept_from):
            h = hidden[start:end].to(acc_dtype)
            h = h / temperature if temperature != 1.0 else h  # [c, D]: τ scales the rows of h, not the [c, V] logits
            at = start - kept_from if start >= kept_from else 0  # where this chunk's logits go in the store
            z = torch.mm(h, weight_acc.t(), out=store[at:at + end - start])  # [c, V]
            y = labels[start:end, None]
            picked = z.gather(-1, y).squeeze(-1)  # [c]
            zmax, top = z.max(dim=-1, keepdim=True)  # [c, 1]
            s = _softmax_(z)  # [c, V], in place
            logps[start:end] = picked - (zmax - s.gather(-1, top).log()).squeeze(-1)  # S[top] = 1 / Σ exp(z − zmax)
            if need_h or need_w:
                s.scatter_add_(-1, y, torch.full_like(picked[:, None], -1.0))  # S = softmax − onehot
            if need_h:
                torch.mm(s, weight_acc, out=u[start:end])  # U = S W
        ctx.save_for_backward(hidden, weight, labels, u)
        ctx.chunk_size, ctx.temperature, ctx.acc_dtype = chunk_size, temperature, acc_dtype
        ctx.store, ctx.kept_from = (store, kept_from) if need_w and N else (None, N)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # grad_logps [N]
        hidden, weight, labels, u = ctx.saved_tensors
        chunk_size, temperature, acc_dtype = ctx.chunk_size, ctx.temperature, ctx.acc_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_logps.to(acc_dtype).mul(-1.0 / temperature)  # [N]: −g/τ
        grad_hidden = (u * scale[:, None]).to(hidden.dtype) if need_h else None
        grad_weight = None
        if need_w:
            N = hidden.shape[0]
            store, kept_from = ctx.store, ctx.kept_from
            ctx.store, ctx.kept_from = None, N  # (a second backward, with retain_graph, recomputes every chunk)
            if store is None:
                store = torch.empty((min(chunk_size, N), weight.shape[0]), dtype=acc_dtype, device=weight.device)
            weight_acc = _head_weight(weight)
            hs = hidden.to(acc_dtype) * scale[:, None]  # [N, D]: −g/τ ⊙ h
            # dW = Sᵀ hs: the kept rows' S in one GEMM (it initialises dW), then the other chunks', recomputed in the
            # store's first rows (free by then), accumulated in place
            grad_weight = torch.mm(store[:N - kept_from].t(), hs[kept_from:]) if kept_from < N else \
                torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
            for start, end in _chunks(kept_from, chunk_size, kept_from):
                h = hidden[start:end].to(acc_dtype)
                z = torch.mm(h / temperature if temperature != 1.0 else h, weight_acc.t(), out=store[:end - start])
                s = _softmax_(z)
                s.scatter_add_(-1, labels[start:end, None], torch.full((end - start, 1), -1.0, dtype=s.dtype,
                                                                      device=s.device))  # S = softmax − onehot
                grad_weight.addmm_(s.t(), hs[start:end])  # dW += Sᵀ (−g/τ ⊙ h), in place
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunks(n: int, chunk_size: int, split: int) -> list[tuple[int, int]]:
    """[start, end) chunks of ≤ chunk_size rows covering [0, n), cut separately before and after row `split`."""
    return [(start, min(start + chunk_size, stop)) for lo, stop in ((0, min(split, n)), (split, n))
            for start in range(lo, stop, chunk_size)]


def logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    keep_budget: float = DEFAULT_KEEP_BUDGET,
) -> torch.Tensor:
    """log p(labels) from final hidden states and the LM head, without materializing the logits.

    hidden [B, T, D], weight [V, D], labels [B, T] (IGNORE_INDEX allowed) -> [B, T] float32, 0 where ignored.
    keep_budget: for a trained head, the memory the path may hold, as a multiple of the N·V floats of the scored
    rows' logits: the head's gradient (V·D) plus the softmax rows kept from the forward, max(budget·N − D, one
    chunk) of them; every other row's logits are recomputed in the backward. Unused for a frozen head.
    """
    B, T, D = hidden.shape
    flat_labels = labels.reshape(B * T)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # [N]: the head runs only where a label is scored
    picked = logps_at_rows(hidden.reshape(B * T, D).index_select(0, rows), weight, flat_labels.index_select(0, rows),
                           chunk_size=chunk_size, temperature=temperature, keep_budget=keep_budget)  # [N]
    return picked.new_zeros(B * T).index_copy(0, rows, picked).view(B, T)


def logps_at_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    temperature: float = 1.0,
    keep_budget: float = DEFAULT_KEEP_BUDGET,
) -> torch.Tensor:
    """log softmax(h Wᵀ / τ)[label] for rows of hidden states.  hidden [N, D], weight [V, D], labels [N] -> [N].

    keep_budget: as in `logps_from_hidden`.
    """
    if not keep_budget >= 0.0 or math.isinf(keep_budget):
        raise ValueError(f"keep_budget must be a finite number >= 0 (a multiple of the rows' N·V logits), "
                         f"got {keep_budget}")
    keep_rows = math.floor(keep_budget * hidden.shape[0]) - hidden.shape[1]  # budget·N·V floats − dW's V·D
    return _FusedLinearLogps.apply(hidden, weight, labels, chunk_size, float(temperature), keep_rows)


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

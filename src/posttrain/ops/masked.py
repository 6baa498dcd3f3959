"""Masked reductions that normalize by a *global* count.

With gradient accumulation over M micro-batches and W data-parallel ranks, a loss normalized by each micro-batch's
own token count gives a different gradient than one big batch (trl PR #3231). Passing the token count of the whole
optimizer step (summed over micro-batches and ranks) makes every split give the same gradient, provided the caller
multiplies by W where DDP averages gradients across ranks.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is true.  values, mask: same shape, e.g. [B, T]."""
    values = values * mask.to(values.dtype)
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    global_count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true.

    global_count: the denominator to use instead of `mask.sum()`; pass the number of valid elements across all
    micro-batches and ranks of one optimizer step to make accumulation and data-parallel splits exact.
    With `dim`, the count is per row (`mask.sum(dim)`), floored at 1 so that empty rows give 0, not NaN.
    """
    total = masked_sum(values, mask, dim)
    if global_count is not None:
        return total / global_count
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return total / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements (all dimensions); unbiased with Bessel's correction by default."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    sq = (((values - mean) ** 2) * mask).sum()
    return sq / (n - 1).clamp(min=1) if unbiased else sq / n.clamp(min=1)

"""Next-token distributions for sampling: temperature, top-k (Fan et al. 2018) and nucleus / top-p (Holtzman et al.
2020, arXiv 1904.09751, Eq. 2), and inverse-CDF draws from explicit uniforms.

The filters run in transformers' order (temperature, then top-k, then top-p) and the result is the renormalized
filtered distribution: q(v) = softmax(z/τ)(v)·1[v ∈ S] / Σ_{w∈S} softmax(z/τ)(w), S the kept set. Its log-probs are
what a policy-gradient method must use as the behaviour policy's log-probs.

Draws take one uniform u ∈ [0, 1) per row and return the first token whose cumulative probability exceeds u·total.
With explicit uniforms, two implementations that see the same distributions make the same draws (prefix sharing vs.
separate encoding, KV-cached vs. re-encoded MCMC), which the tests rely on.
"""

from __future__ import annotations

import torch


def filtered_logps(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log q of the renormalized distribution after temperature, top-k and top-p; -inf outside the kept set.

    logits: [N, V] raw model logits. temperature > 0; top_k = 0 keeps all tokens; top_p = 1 keeps all tokens.
    Top-p keeps the smallest set of most probable tokens whose mass reaches top_p: token v is kept when the mass of
    the tokens ranked strictly before it is < top_p (so the most probable token is always kept).
    Returns [N, V] float32 (float64 stays float64).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (use greedy decoding for 0)")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [N, V]
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]  # [N, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)  # [N, V]
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # [N, V] mass of the tokens ranked before
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def sample_from_logps(logps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row the first token v with CDF(v) > u·CDF(V−1).

    logps: [N, V] log-probs (-inf for excluded tokens; they are never drawn); u: [N] uniforms in [0, 1), on any
    device (samplers draw them from seeded CPU generators, so a draw does not depend on the device).
    Returns [N] long token ids. The CDF is accumulated in float64.
    """
    cdf = torch.cumsum(logps.to(torch.float64).exp(), dim=-1)  # [N, V]
    target = (u.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1]).unsqueeze(-1)  # [N, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [N]
    return idx.clamp_(max=logps.shape[-1] - 1)

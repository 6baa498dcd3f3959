"""Advantage estimators: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), ScaleRL (Khatri et al. 2025), RLOO, GAE.

Group estimators take the scalar rewards of G completions per prompt, either as [B, G] or flattened prompt-major as
[B*G] (rows 0..G−1 are prompt 0's samples, the layout a rollout with G samples per prompt produces) together with
`group_size=G`. They return the same shape they were given. Symbols: r_i is the reward of sample i of a group,
mean(r) and std(r) are over that prompt's G samples.

GAE (Schulman et al. 2016) works on per-token rewards and values [B, T] of right-padded sequences for PPO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.ops.masked import masked_mean, masked_var


def _as_groups(rewards: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[B, G] → [B, G]; [B*G] with group_size=G → [B, G]."""
    if rewards.dim() == 2:
        if group_size is not None and rewards.shape[1] != group_size:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)} but group_size={group_size}")
        return rewards
    if rewards.dim() != 1 or group_size is None:
        raise ValueError(
            f"rewards must be [B, G], or [B*G] with group_size=G; got shape {tuple(rewards.shape)}, "
            f"group_size={group_size}"
        )
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    return rewards.view(-1, group_size)  # [B, G]


def _need_two(groups: torch.Tensor, name: str) -> None:
    if groups.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 samples per prompt (a group std or leave-one-out mean)")


def _centered(groups: torch.Tensor) -> torch.Tensor:
    """r_i − mean(r) per group, exactly 0 for a group whose rewards are all equal.

    The mean of G equal floats is not always that float (eight float32 0.7 average to 0.7 + 6e-8), and dividing the
    rounding residue by a std of the same size would turn "no signal" into advantages near ±1. groups: [B, G].
    """
    flat = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    centered = groups - groups.mean(dim=1, keepdim=True)  # [B, G]
    return torch.where(flat, torch.zeros((), dtype=centered.dtype, device=centered.device), centered)


def grpo_advantages(rewards: torch.Tensor, group_size: int | None = None, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage (DeepSeekMath §4.1.2): Â_i = (r_i − mean(r)) / (std(r) + ε).

    std is the unbiased (Bessel-corrected) sample std over the group, as in TRL and veRL. A group whose rewards are
    all equal gets Â = 0 exactly in any float dtype (numerator set to 0). rewards: [B, G] or [B*G] → same shape.
    """
    groups = _as_groups(rewards, group_size)  # [B, G]
    _need_two(groups, "grpo_advantages")
    centered = _centered(groups)  # [B, G]
    adv = centered / (groups.std(dim=1, keepdim=True) + eps)  # [B, G]
    return adv.view_as(rewards)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, §3.2): Â_i = r_i − mean(r); the std division is removed (it up-weights
    too-easy and too-hard prompts). rewards: [B, G] or [B*G] → same shape."""
    groups = _as_groups(rewards, group_size)  # [B, G]
    return _centered(groups).view_as(rewards)


def batch_normalized_advantages(
    rewards: torch.Tensor, group_size: int | None = None, *, eps: float = 1e-6
) -> torch.Tensor:
    """ScaleRL batch-level normalization (Khatri et al. 2025, §4): Â_i = r_i − mean(r_group), Â^norm = Â / Â_std,
    where Â_std is the std of all Â in the batch (all B·G values; unbiased), plus ε for an all-flat batch.

    Apply the zero-variance filter first (ScaleRL drops flat groups from the effective batch); otherwise their
    zeros shrink Â_std. rewards: [B, G] or [B*G] → same shape.
    """
    groups = _as_groups(rewards, group_size)  # [B, G]
    centered = _centered(groups)  # [B, G]
    std = centered.std() if centered.numel() > 1 else centered.new_zeros(())
    return (centered / (std + eps)).view_as(rewards)


def rloo_advantages(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): Â_i = r_i − 1/(G−1) Σ_{j≠i} r_j.

    Equivalently G/(G−1) · (r_i − mean(r)). rewards: [B, G] or [B*G] → same shape.
    """
    groups = _as_groups(rewards, group_size)  # [B, G]
    _need_two(groups, "rloo_advantages")
    G = groups.shape[1]
    return (_centered(groups) * (G / (G - 1))).view_as(rewards)  # the G/(G−1)·(r_i − mean) form: exact 0 when flat


def zero_variance_groups(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Boolean [B]: True for the prompts whose G rewards are all equal (exactly).

    Such a group carries no learning signal under any group-relative advantage; ScaleRL and DAPO drop it from the
    batch (DAPO's dynamic sampling then resamples, ScaleRL does not). rewards: [B, G] or [B*G].
    """
    groups = _as_groups(rewards, group_size)  # [B, G]
    return (groups == groups[:, :1]).all(dim=1)  # [B]


# Config names → group advantage estimators; each is called as fn(rewards, group_size).
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "batch": batch_normalized_advantages,
    "rloo": rloo_advantages,
}


@dataclass(frozen=True)
class GAEOutput:
    advantages: torch.Tensor  # [B, T], 0 at padded positions
    returns: torch.Tensor  # [B, T], advantages + values: the value-function targets


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> GAEOutput:
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16), batched over right-padded sequences.

        δ_t = r_t + γ V(s_{t+1}) − V(s_t)                 with V(s_{T}) = 0 after the last valid token (terminal)
        Â_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ Â_{t+1}
        R_t = Â_t + V(s_t)                                 (the value target, "returns")

    rewards: [B, T] per-token rewards r_t (for RLHF: −β·KL per token plus the score on the last token, see
    `posttrain.ops.kl.kl_penalized_token_rewards`); values: [B, T] V(s_t) from the value head, treated as constants;
    mask: [B, T], true on each sequence's valid prefix (right padding). The episode ends at the last valid token (EOS
    or the length limit); no bootstrap past it, as in TRL/OpenRLHF for LLMs.

    The recursion runs over T in one loop of [B]-wide operations (an O(T²) closed form would not fit long sequences).
    """
    m = mask.bool()
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("gae expects right-padded masks: a valid token follows a padded one")
    values = values.detach()
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r = torch.where(m, rewards.to(dtype), 0.0)  # [B, T]
    v = torch.where(m, values.to(dtype), 0.0)  # [B, T]
    B, T = r.shape
    next_values = torch.cat([v[:, 1:], v.new_zeros(B, 1)], dim=1)  # [B, T], 0 past the end (padded v is 0)
    deltas = r + gamma * next_values - v  # [B, T]
    advantages = torch.zeros_like(deltas)  # [B, T]
    running = deltas.new_zeros(B)  # [B]
    for t in range(T - 1, -1, -1):
        running = deltas[:, t] + gamma * lam * running
        running = torch.where(m[:, t], running, 0.0)  # resets at padding, so each row starts at its last token
        advantages[:, t] = running
    advantages = torch.where(m, advantages, 0.0)
    return GAEOutput(advantages=advantages, returns=torch.where(m, advantages + v, 0.0))


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − mean) / sqrt(var + ε) over the valid positions of the whole batch; PPO's advantage whitening
    (as in TRL/OpenRLHF). shift_mean=False keeps the mean (used for rewards). values, mask: [B, T] → [B, T],
    0 at padded positions."""
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)

"""The KL-regularised optimum π* ∝ π_ref·exp(r/β) (Rafailov et al. 2023, Eq. 4; Peters & Schaal 2007) on a bandit.

A prompt with K possible responses (a "bandit": every response is one action) can be enumerated, so the optimum of

    J(π) = E_{y~π}[r(y)] − β · KL(π ‖ π_ref)                                              (DPO Eq. 3)

is known in closed form, π*(y) = π_ref(y)·exp(r(y)/β) / Z (DPO Eq. 4), and a policy trained by the project's own
losses can be compared with it exactly. Three routes to π* are checked here:

- policy gradient with the KL in the reward (Ziegler et al. 2019): r'(y) = r(y) − β·(log π(y) − log π_ref(y)),
  advantages r' − E[r'], `clipped_surrogate_loss` at ρ = 1;
- policy gradient with a KL term in the loss, estimator k2 (`ops.kl.kl_k2`): E[∇k2] = ∇KL(π ‖ π_ref), so the
  stationary point is π*. With k3 (GRPO's choice, DeepSeekMath Eq. 4) E[∇k3] = ∇KL(π_ref ‖ π) instead, and the
  stationary point is the optimum of E_π[r] − β·KL(π_ref ‖ π), `forward_kl_optimum` below, not π*;
- DPO on preferences drawn from the Bradley–Terry model of r, P(y_i ≻ y_j) = σ(r_i − r_j): its population optimum
  has β·log(π/π_ref) = r + const, i.e. π = π* (DPO §4). With the labels' expectation taken exactly, the expected
  DPO loss of the pair (i, j) is `dpo_loss` with label_smoothing = P(y_j ≻ y_i) (conservative DPO, Mitchell 2023).

Shapes: K responses; `ref_probs`, `rewards`: [K].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq

from posttrain.losses.dpo import dpo_loss
from posttrain.losses.policy import clipped_surrogate_loss
from posttrain.ops.advantages import dr_grpo_advantages
from posttrain.ops.kl import kl_penalized_token_rewards


def kl_regularized_optimum(ref_probs: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """π*(y) = π_ref(y)·exp(r(y)/β) / Σ_y' π_ref(y')·exp(r(y')/β)  (DPO Eq. 4).  [K], [K] → [K]."""
    logits = np.log(np.asarray(ref_probs, dtype=np.float64)) + np.asarray(rewards, dtype=np.float64) / beta
    logits -= logits.max()
    p = np.exp(logits)
    return p / p.sum()


def forward_kl_optimum(ref_probs: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """argmax_π E_π[r] − β·KL(π_ref ‖ π): the stationary point of a policy gradient with the k3 estimator in the loss.

    Stationarity of Σ π r + β Σ π_ref log π under Σ π = 1 gives r(y) + β·π_ref(y)/π(y) = λ, so
    π(y) = β·π_ref(y) / (λ − r(y)) with λ > max r chosen so that Σ π = 1 (one root, found by bracketing).
    [K], [K] → [K].
    """
    q = np.asarray(ref_probs, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)

    def total(lam: float) -> float:
        return float((beta * q / (lam - r)).sum() - 1.0)

    lo = r.max() + 1e-12 * max(1.0, abs(r.max()))  # Σ π → ∞ as λ ↓ max r
    hi = r.max() + beta + 1.0  # Σ π ≤ β / (β + 1) < 1 here
    lam = brentq(total, lo, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
    p = beta * q / (lam - r)
    return p / p.sum()


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """½ Σ |p − q|."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


@dataclass(frozen=True)
class BanditProblem:
    """One prompt with K single-token responses: a reference policy, a reward per response and the KL weight β."""

    ref_probs: np.ndarray  # [K]
    rewards: np.ndarray  # [K]
    beta: float

    @property
    def ref_logps(self) -> torch.Tensor:
        return torch.tensor(np.log(self.ref_probs), dtype=torch.float64)  # [K]

    def optimum(self) -> np.ndarray:
        return kl_regularized_optimum(self.ref_probs, self.rewards, self.beta)


def _train(problem: BanditProblem, step_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *,
           steps: int, lr: float, seed: int, average_last: int) -> np.ndarray:
    """Adam on the logits θ ∈ R^K (initialised at log π_ref); returns π averaged over the last `average_last` steps."""
    gen = torch.Generator().manual_seed(seed)
    theta = problem.ref_logps.clone().requires_grad_(True)  # [K]
    opt = torch.optim.Adam([theta], lr=lr)
    tail = []
    for step in range(steps):
        opt.zero_grad()
        step_loss(theta, gen).backward()
        opt.step()
        if step >= steps - average_last:
            tail.append(torch.softmax(theta.detach(), -1).numpy())
    return np.mean(tail, axis=0)


def train_policy_gradient(problem: BanditProblem, *, kl: str, samples: int | None = 256, steps: int = 2000,
                          lr: float = 0.05, seed: int = 0, average_last: int = 500) -> np.ndarray:
    """Train a softmax policy with `clipped_surrogate_loss` (ρ = 1, Dr. GRPO advantages r − mean r) and a KL to π_ref.

    kl: "reward" — k1 subtracted from the reward (detached, `kl_penalized_token_rewards`);
        "k2" / "k3" — the estimator as a loss term with coefficient β (`clipped_surrogate_loss(kl_estimator=...)`).
    samples: G responses drawn from π per step (one group); None takes the expectation exactly: every response
    once, its advantage weighted by K·π(y) (only for kl="reward", where the whole objective sits in the
    advantage). Returns π after training, [K].
    """
    if kl not in ("reward", "k2", "k3"):
        raise ValueError(f"kl must be 'reward', 'k2' or 'k3', got {kl!r}")
    if samples is None and kl != "reward":
        raise ValueError("the exact expectation (samples=None) needs kl='reward'")
    rewards = torch.tensor(problem.rewards, dtype=torch.float64)  # [K]
    K = rewards.numel()

    def step_loss(theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        policy_logps_all = torch.log_softmax(theta, -1)  # [K]
        if samples is None:
            actions = torch.arange(K)  # [K], every response once
        else:
            actions = torch.multinomial(policy_logps_all.detach().exp(), samples, replacement=True, generator=gen)
        logps = policy_logps_all[actions].unsqueeze(1)  # [G, 1]: one token per response
        ref_logps = problem.ref_logps[actions].unsqueeze(1)  # [G, 1]
        mask = torch.ones_like(logps, dtype=torch.bool)
        if kl == "reward":
            shaped = kl_penalized_token_rewards(rewards[actions], logps, ref_logps, mask, kl_coef=problem.beta)[:, 0]
            if samples is None:
                weights = policy_logps_all.detach().exp()  # [K]
                adv = K * weights * (shaped - (weights * shaped).sum())  # E_π-weighted, centred at E_π[r']
            else:
                adv = dr_grpo_advantages(shaped.unsqueeze(0)).squeeze(0)  # [G]
            return clipped_surrogate_loss(logps, logps.detach(), adv, mask, aggregation="token").loss
        adv = dr_grpo_advantages(rewards[actions].unsqueeze(0)).squeeze(0)  # [G]
        return clipped_surrogate_loss(logps, logps.detach(), adv, mask, aggregation="token", ref_logps=ref_logps,
                                      kl_coef=problem.beta, kl_estimator=kl).loss

    return _train(problem, step_loss, steps=steps, lr=lr, seed=seed, average_last=average_last)


def train_dpo(problem: BanditProblem, *, pairs: int | None = None, steps: int = 2000, lr: float = 0.05,
              seed: int = 0, average_last: int = 500) -> np.ndarray:
    """Train a softmax policy with `dpo_loss` on preferences from the Bradley–Terry model of the rewards.

    pairs=None: every unordered pair {i, j} once, in the orientation (i ≻ j) with label_smoothing = P(j ≻ i) =
    σ(r_j − r_i), which is exactly the expected loss over BT labels (deterministic). pairs=N: a fixed data set of N
    pairs drawn uniformly, each labelled by a BT coin flip (the finite-data case). Returns π, [K].
    """
    rewards = torch.tensor(problem.rewards, dtype=torch.float64)  # [K]
    K = rewards.numel()
    i_idx, j_idx = torch.triu_indices(K, K, offset=1)  # [P], [P] all unordered pairs
    if pairs is None:
        flip = torch.sigmoid(rewards[j_idx] - rewards[i_idx])  # [P] P(j ≻ i)
        chosen, rejected = i_idx, j_idx
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        pick = torch.randint(0, i_idx.numel(), (pairs,), generator=gen)
        a, b = i_idx[pick], j_idx[pick]  # [N]
        a_wins = torch.rand(pairs, generator=gen, dtype=torch.float64) < torch.sigmoid(rewards[a] - rewards[b])
        chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
        flip = None
    ref = problem.ref_logps

    def step_loss(theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        policy_logps = torch.log_softmax(theta, -1)  # [K]
        if flip is None:  # a finite data set: hard labels, one batch
            return dpo_loss(policy_logps[chosen], policy_logps[rejected], ref[chosen], ref[rejected],
                            beta=problem.beta).loss
        losses = [dpo_loss(policy_logps[c:c + 1], policy_logps[r:r + 1], ref[c:c + 1], ref[r:r + 1],
                           beta=problem.beta, label_smoothing=float(eps)).loss
                  for c, r, eps in zip(chosen.tolist(), rejected.tolist(), flip.tolist())]
        return torch.stack(losses).mean()

    return _train(problem, step_loss, steps=steps, lr=lr, seed=seed, average_last=average_last)

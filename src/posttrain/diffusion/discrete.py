"""Discrete-state diffusion (D3PM): Austin et al., "Structured Denoising Diffusion Models in Discrete State-Spaces",
arXiv 2107.03006.

A sequence of L categorical variables with K states is noised independently per position by row-stochastic
transition matrices, Q_t[i, j] = q(x_t = j | x_{t−1} = i), so q(x_t | x_0) = x_0 Q̄_t with Q̄_t = Q_0 Q_1 … Q_t
(row vectors; eq. 3). Timesteps are 0-indexed like the Gaussian schedulers: t = 0 is the first noising step and
prev_t = −1 is the data, where Q̄_{−1} = I.

Notation (code -> paper): transitions[t] -> Q_t, cumulative[t] -> Q̄_t, x0_probs -> x_0 (one-hot) or p̃_θ(x̃_0 | x_t),
posterior -> q(x_{t−1} | x_t, x_0) (eq. 3), reverse_probs -> p_θ(x_{t−1} | x_t) (eq. 4, see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def uniform_transition(beta: float, num_classes: int) -> torch.Tensor:
    """Q = (1 − β) I + β/K 11ᵀ (§3.1, "uniform"): keep the state, or with probability β redraw it uniformly. [K, K]."""
    K = num_classes
    return (1 - beta) * torch.eye(K, dtype=torch.float64) + beta / K * torch.ones(K, K, dtype=torch.float64)


def absorbing_transition(beta: float, num_classes: int, mask_index: int | None = None) -> torch.Tensor:
    """Q = (1 − β) I + β 1 e_mᵀ (§3.1, "absorbing"): with probability β jump to the [MASK] state m, which stays. [K, K]."""
    K = num_classes
    m = K - 1 if mask_index is None else mask_index
    Q = (1 - beta) * torch.eye(K, dtype=torch.float64)
    Q[:, m] += beta
    return Q


TRANSITIONS = {"uniform": uniform_transition, "absorbing": absorbing_transition}


def absorbing_betas(num_steps: int) -> torch.Tensor:
    """β_t = 1/(T − t + 1) for t = 1..T (§3.1, absorbing): q(x_t = x_0 | x_0) = 1 − t/T, so x_T is all [MASK]. [T]."""
    return 1.0 / (num_steps - torch.arange(1, num_steps + 1, dtype=torch.float64) + 1)


@dataclass(frozen=True)
class DiscreteSchedule:
    """Q_t and Q̄_t for t = 0..T−1 (float64), plus the stationary distribution x_T is drawn from."""

    transitions: torch.Tensor  # [T, K, K]
    cumulative: torch.Tensor  # [T, K, K]
    stationary: torch.Tensor  # [K]

    @property
    def num_steps(self) -> int:
        return int(self.transitions.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.transitions.shape[-1])

    def cumulative_at(self, t: int) -> torch.Tensor:
        """Q̄_t, with Q̄_{−1} = I. [K, K]."""
        if t < 0:
            return torch.eye(self.num_classes, dtype=torch.float64)
        return self.cumulative[t]


def make_discrete_schedule(kind: str, num_classes: int, betas: torch.Tensor) -> DiscreteSchedule:
    """Stack Q_t = TRANSITIONS[kind](β_t) and Q̄_t = Q̄_{t−1} Q_t. betas: [T]."""
    if kind not in TRANSITIONS:
        raise ValueError(f"unknown transition '{kind}'; choose one of {sorted(TRANSITIONS)}")
    Qs = torch.stack([TRANSITIONS[kind](float(b), num_classes) for b in betas])  # [T, K, K]
    cumulative, acc = [], torch.eye(num_classes, dtype=torch.float64)
    for Q in Qs:
        acc = acc @ Q
        cumulative.append(acc)
    if kind == "uniform":
        stationary = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    else:
        stationary = F.one_hot(torch.tensor(num_classes - 1), num_classes).double()
    return DiscreteSchedule(transitions=Qs, cumulative=torch.stack(cumulative), stationary=stationary)


def q_marginal(x0_probs: torch.Tensor, schedule: DiscreteSchedule, t: int) -> torch.Tensor:
    """q(x_t | x_0) = x_0 Q̄_t (eq. 3). x0_probs: [..., K] (one-hot or a distribution). Returns [..., K]."""
    return x0_probs.double() @ schedule.cumulative_at(t)


def q_sample(x0: torch.Tensor, schedule: DiscreteSchedule, t: torch.Tensor, generator: torch.Generator | None = None):
    """Draw x_t ~ q(x_t | x_0) per position. x0: [B, L] long; t: [B]. Returns [B, L] long."""
    B, L = x0.shape
    K = schedule.num_classes
    probs = schedule.cumulative[t.long()].gather(1, x0.unsqueeze(-1).expand(B, L, K))  # [B, L, K] rows Q̄_t[x_0]
    return torch.multinomial(probs.reshape(B * L, K), 1, generator=generator).reshape(B, L)  # [B, L]


def reverse_probs(
    x0_probs: torch.Tensor, x_t: torch.Tensor, schedule: DiscreteSchedule, t: int | torch.Tensor
) -> torch.Tensor:
    """p(x_{t−1} | x_t) = Σ_{x̃_0} q(x_{t−1} | x_t, x̃_0) p(x̃_0), with q(x_{t−1} | x_t, x_0) ∝ (x_t Q_tᵀ) ⊙ (x_0 Q̄_{t−1}).

    Eq. 3 gives the posterior; eq. 4 of the paper writes the sum with the joint q(x_{t−1}, x_t | x̃_0). We sum the
    conditional instead, so that with the true p(x̃_0 | x_t) the step is the exact reverse q(x_{t−1} | x_t) (a test
    checks this); the two agree for a one-hot p(x̃_0). An x̃_0 that cannot produce x_t (absorbing: x_t unmasked and
    ≠ x̃_0) contributes nothing, and the rest is renormalized. With x0_probs one-hot this is q(x_{t−1} | x_t, x_0).
    t an int: x0_probs [..., K], x_t [...] long. t a tensor [B] (one t per row): x0_probs [B, L, K], x_t [B, L].
    Returns the shape of x0_probs, rows summing to 1."""
    K = schedule.num_classes
    t = torch.as_tensor(t, dtype=torch.long)
    Q_t = schedule.transitions[t]  # [K, K] or [B, K, K]
    Qbar_prev = torch.cat([torch.eye(K, dtype=torch.float64)[None], schedule.cumulative])[t]  # Q̄_{t−1}; Q̄_{−1} = I
    if t.dim() == 0:
        likelihood = Q_t[:, x_t].movedim(0, -1)  # [..., K]: q(x_t | x_{t−1} = k) for each k
    else:
        likelihood = Q_t.transpose(1, 2).gather(1, x_t.unsqueeze(-1).expand(*x_t.shape, K))  # [B, L, K]
        Qbar_prev = Qbar_prev[:, None]  # [B, 1, K, K], to broadcast over positions
    joint = likelihood.unsqueeze(-2) * Qbar_prev  # [..., K (x_0), K (x_{t−1})]: q(x_t | k) q(k | x_0)
    posterior = joint / joint.sum(-1, keepdim=True).clamp_min(1e-300)  # rows of impossible x_0 stay 0
    probs = (x0_probs.double().unsqueeze(-1) * posterior).sum(-2)  # [..., K]
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-300)


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, schedule: DiscreteSchedule, t: int | torch.Tensor):
    """q(x_{t−1} | x_t, x_0) for integer states x0, x_t ([...] long for an int t, [B, L] for t [B]). Returns [..., K]."""
    return reverse_probs(F.one_hot(x0, schedule.num_classes).double(), x_t, schedule, t)


@dataclass(frozen=True)
class DiscreteLossOutput:
    loss: torch.Tensor  # scalar, the one to differentiate
    vb: torch.Tensor  # detached: mean KL(q(x_{t−1}|x_t,x_0) || p_θ(x_{t−1}|x_t)) per position (nats)
    ce: torch.Tensor  # detached: mean −log p̃_θ(x_0 | x_t) per position (nats)


def d3pm_loss(
    x0_logits: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: DiscreteSchedule,
    *, ce_weight: float = 0.01,
) -> DiscreteLossOutput:
    """D3PM hybrid loss L_λ (§3.4): L_vb + λ E[−log p̃_θ(x_0 | x_t)], λ = ce_weight.

    L_vb at step t is KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)); at t = 0 it is −log p_θ(x_0 | x_1), which the
    same KL gives because q(x_{−1} | x_t, x_0) is the point mass on x_0. x0_logits: [B, L, K]; x0, x_t: [B, L]; t: [B]."""
    q = reverse_probs(F.one_hot(x0, schedule.num_classes).double(), x_t, schedule, t)  # [B, L, K]
    p = reverse_probs(x0_logits.softmax(-1), x_t, schedule, t).clamp_min(1e-30)  # [B, L, K]
    vb = (torch.xlogy(q, q) - q * p.log()).sum(-1).mean()  # KL per position, averaged over [B, L]
    ce = F.cross_entropy(x0_logits.reshape(-1, x0_logits.shape[-1]), x0.reshape(-1))
    loss = vb.float() + ce_weight * ce
    return DiscreteLossOutput(loss=loss, vb=vb.detach(), ce=ce.detach())


@dataclass(frozen=True)
class DiscreteStepOutput:
    prev_sample: torch.Tensor  # [B, L] long: x_{t−1}
    pred_original_probs: torch.Tensor  # [B, L, K]: p̃_θ(x̃_0 | x_t)
    probs: torch.Tensor  # [B, L, K]: p_θ(x_{t−1} | x_t), what prev_sample was drawn from


@dataclass(frozen=True)
class DiscreteScheduler:
    """Ancestral sampler of D3PM: x_{t−1} ~ p_θ(x_{t−1} | x_t) built from the network's x̃_0 logits. Unit steps only."""

    schedule: DiscreteSchedule

    def initial_state(self, shape: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T from the stationary distribution (uniform, or all [MASK]). shape (B, L). Returns long [B, L]."""
        B, L = shape
        draws = torch.multinomial(self.schedule.stationary.float().expand(B * L, -1), 1, replacement=True,
                                  generator=generator)
        return draws.reshape(B, L)

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        *,
        prev_t: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiscreteStepOutput:
        """model_output: x̃_0 logits [B, L, K]; x_t: [B, L] long. `noise`: Gumbel noise [B, L, K] (Gumbel-max draw),
        so two runs can share randomness; otherwise drawn from `generator`."""
        if prev_t is not None and prev_t != t - 1:
            raise ValueError(f"the discrete sampler takes unit steps only, got t={t}, prev_t={prev_t}")
        x0_probs = model_output.softmax(-1)
        probs = reverse_probs(x0_probs, x_t, self.schedule, t)  # [B, L, K]
        if noise is None:
            u = torch.rand(probs.shape, generator=generator, dtype=torch.float64).clamp_(1e-20, 1 - 1e-12)
            noise = -torch.log(-torch.log(u))
        prev_sample = (probs.clamp_min(1e-30).log() + noise).argmax(-1)  # [B, L]
        return DiscreteStepOutput(prev_sample=prev_sample, pred_original_probs=x0_probs, probs=probs)

"""Scalable power sampling: p^α token by token with look-ahead rollouts, no MCMC (Ji et al. 2026, arXiv 2601.21590).

Notation (paper -> code):
    p, α                 -> the base model (temperature-1 log-probs) and `alpha`; target π(x) ∝ p(x)^α
    ζ_t(x_t)             -> Σ_{x_{t+1:T}} p(x_{t+1:T} | x_{≤t})^α, the future mass of a candidate token
    K_t, M_t, H          -> `top_k` candidates, `rollouts` per candidate, `horizon` look-ahead tokens
    jackknife            -> `jackknife=True`, the leave-one-rollout-out bias correction

Theorem 3.1: the exact next-token conditional of p^α is the low-temperature conditional rescaled by ζ,
    π(x_t | x_{<t}) = p(x_t | x_{<t})^α ζ_t(x_t) / Σ_v p(v | x_{<t})^α ζ_t(v),
so sampling token by token from it draws exactly from p^α. ζ is estimated by Monte Carlo: for each of the K most
likely tokens c, M rollouts y^(j) of up to H tokens (or to the stop token / length limit) continue x_{<t}·c, drawn
from the proposal q (`rollout="low_temperature"`: softmax(α·z), or `"base"`: p), and
    ζ̂(c) = (1/M) Σ_j w_j,   w_j = Π_s p(y_s)^α / q(y_s)    (importance weight; = Π_s p(y_s)^{α−1} when q = p),
an unbiased estimate of ζ truncated to H tokens. The sampling law π̂(c) ∝ p(c)^α ζ̂(c) over the K candidates is a
ratio of estimates, biased by O(1/M); the jackknife
    π̂_JK = M·π̂ − (M−1)/M · Σ_j π̂^(−j)      (π̂^(−j): rollout j of every candidate left out)
cancels the O(1/M) term (clipped at 0 and renormalized). A stop-token candidate has no future: ζ = 1.
With K = |V|, H ≥ the remaining length and M → ∞ the sampler draws from p^α exactly (tests/ttc check it on an
enumerable model); with H = 0 (no look-ahead) it is low-temperature sampling restricted to the top K.

Cost: per generated token, K·M rollouts of ≤ H tokens: about K·M·H tokens forwarded, against the MCMC sampler's
N_MCMC·T²/(4B) per sequence (ttc/power.py). `forward_tokens` counts every real token fed through the model, the
rollouts included; rollouts share the prefix's KV cache (a copy of it), so the prefix is never re-encoded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from posttrain.generation.sampler import FINISH_EOS, FINISH_LENGTH, draw_seed
from posttrain.ttc.lockstep import LockstepBatch, stop_and_pad


@dataclass(frozen=True)
class ScalablePowerParams:
    """alpha: α; max_new_tokens: T; top_k: K candidates per step (0 = the whole vocabulary); rollouts: M per
    candidate; horizon: H look-ahead tokens per rollout (0: no look-ahead, i.e. low temperature on the top K);
    rollout: proposal of the rollouts; jackknife: bias correction; stop_token_ids: None = the model's EOS."""

    alpha: float = 4.0
    max_new_tokens: int = 48
    top_k: int = 4
    rollouts: int = 4
    horizon: int = 8
    rollout: Literal["low_temperature", "base"] = "low_temperature"
    jackknife: bool = True
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.max_new_tokens < 1 or self.top_k < 0 or self.rollouts < 1 or self.horizon < 0:
            raise ValueError("need max_new_tokens >= 1, top_k >= 0, rollouts >= 1 and horizon >= 0")
        if self.rollout not in ("low_temperature", "base"):
            raise ValueError(f"rollout must be 'low_temperature' or 'base', got {self.rollout!r}")
        if self.jackknife and self.rollouts < 2:
            raise ValueError("the jackknife needs rollouts >= 2")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class ScalablePowerOutput:
    """token_ids / target_logps: [B][G] lists (log p of each sampled token under the base model); texts [B][G]
    (None without a tokenizer); finish_reasons [B][G]; forward_tokens: real tokens fed through the model, rollouts
    included; computed_tokens: adds padding and waiting positions; rollout_tokens: the part spent in rollouts."""

    token_ids: list[list[list[int]]]
    target_logps: list[list[list[float]]]
    texts: list[list[str | None]]
    finish_reasons: list[list[str]]
    forward_tokens: int
    computed_tokens: int
    rollout_tokens: int
    wall_s: float


def candidate_weights(log_p_cand: torch.Tensor, log_w: torch.Tensor, alpha: float, jackknife: bool) -> torch.Tensor:
    """The sampling law over K candidates from the rollout log-weights.

    log_p_cand: [R, K] log p(c) of the candidates; log_w: [R, K, M] log w_j of each rollout (0 for a stop-token
    candidate's "rollouts"; -inf for candidates that do not exist). Returns probabilities [R, K]:
    π̂ ∝ p(c)^α · mean_j w_j, jackknifed when asked (module docstring).
    """
    M = log_w.shape[-1]

    def law(lw: torch.Tensor) -> torch.Tensor:  # lw [R, K, m] -> [R, K]
        log_zeta = torch.logsumexp(lw, dim=-1) - torch.log(torch.tensor(float(lw.shape[-1]), dtype=lw.dtype))
        return torch.softmax(alpha * log_p_cand + log_zeta, dim=-1)

    full = law(log_w)  # [R, K]
    if not jackknife:
        return full
    keep = ~torch.eye(M, dtype=torch.bool)  # [M, M]: row j leaves rollout j out
    loo = torch.stack([law(log_w[..., keep[j]]) for j in range(M)], dim=0)  # [M, R, K]
    jk = (M * full - (M - 1) / M * loo.sum(0)).clamp(min=0.0)
    total = jk.sum(-1, keepdim=True)
    return torch.where(total > 0, jk / total.clamp(min=1e-300), full)


class ScalablePowerSampler:
    """Token-by-token sampling from the rollout-estimated p^α conditional (module docstring), batched over
    prompts × samples with one KV cache; the rollouts of every row run together on a copy of it."""

    def __init__(self, model: nn.Module, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids, self.pad_token_id = stop_and_pad(model, tokenizer, eos_token_ids, pad_token_id)

    def _rollout_weights(self, batch: LockstepBatch, rows: list[int], cands: torch.Tensor, params, stop: set[int],
                         gen: torch.Generator, lengths: list[int]) -> tuple[torch.Tensor, int, int]:
        """log w [len(rows), K, M] of M rollouts after each candidate of each row; also the tokens they fed and
        the positions they computed."""
        R, K = cands.shape
        M, alpha = params.rollouts, params.alpha
        log_w = torch.zeros((R, K, M), dtype=torch.float64)
        if params.horizon == 0:
            return log_w, 0, 0
        branch = batch.clone()
        branch.select([r for r in rows for _ in range(K * M)])
        first = cands.repeat_interleave(M, dim=1).reshape(-1).tolist()  # [R·K·M] candidate of each rollout row
        alive = [t not in stop and lengths[r] + 1 < params.max_new_tokens
                 for r, t in zip([r for r in rows for _ in range(K * M)], first)]
        budget = [min(params.horizon, params.max_new_tokens - lengths[r] - 1)
                  for r in rows for _ in range(K * M)]
        acc = torch.zeros(R * K * M, dtype=torch.float64)
        if not any(alive):  # every candidate ends the sequence: no future to look at
            return log_w, 0, 0
        logits = branch.feed(first, alive)  # a stop candidate (or one at the length limit) is not fed
        for step in range(params.horizon):
            active = [a and step < b for a, b in zip(alive, budget)]
            if not any(active):
                break
            z = logits.double().cpu()  # [N, V]: the weights' bookkeeping runs on the CPU, as the seeded uniforms do
            logp = torch.log_softmax(z, dim=-1)  # [N, V]
            logq = torch.log_softmax(alpha * z, dim=-1) if params.rollout == "low_temperature" else logp
            u = torch.rand(len(first), generator=gen, dtype=torch.float64)
            cdf = logq.exp().cumsum(-1)
            tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
            tok = tok.clamp(max=logq.shape[-1] - 1)
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            lq = logq.gather(-1, tok[:, None]).squeeze(-1)
            act = torch.tensor(active)
            acc = acc + torch.where(act, alpha * lp - lq, torch.zeros_like(acc))
            toks = tok.tolist()
            alive = [a and t not in stop for a, t in zip(active, toks)]
            if step + 1 < params.horizon and any(alive):
                logits = branch.feed(toks, alive)
        log_w = acc.view(R, K, M)
        stop_cand = torch.tensor([[int(c) in stop for c in row] for row in cands.tolist()])
        log_w = torch.where(stop_cand[..., None], torch.zeros_like(log_w), log_w)
        return log_w, branch.forward_tokens, branch.computed_tokens

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: ScalablePowerParams, n: int = 1) -> ScalablePowerOutput:
        """n samples per prompt -> [B][G] completions, each token drawn from the jackknifed rollout estimate of the
        p^α conditional."""
        if n < 1 or not prompt_ids:
            raise ValueError("scalable power sampling needs n >= 1 and at least one prompt")
        start = time.perf_counter()
        stop = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else draw_seed())
        was_training = self.model.training
        self.model.eval()
        try:
            batch = LockstepBatch(self.model, self.pad_token_id)
            logits = batch.prefill([list(p) for p in prompt_ids for _ in range(n)])
            N = batch.rows
            logps: list[list[float]] = [[] for _ in range(N)]
            done = [False] * N
            rollout_tokens = rollout_computed = 0
            while not all(done):
                rows = [i for i in range(N) if not done[i]]
                z = logits[rows].double().cpu()  # [R, V]; CPU like the seeded uniforms (same draws on any device)
                log_p = torch.log_softmax(z, dim=-1)
                K = z.shape[-1] if params.top_k == 0 else min(params.top_k, z.shape[-1])
                log_p_cand, cands = log_p.topk(K, dim=-1)  # [R, K]
                lengths = [len(batch.tokens[i]) for i in range(N)]
                log_w, fed, computed = self._rollout_weights(batch, rows, cands, params, stop, gen, lengths)
                rollout_tokens += fed
                rollout_computed += computed
                probs = candidate_weights(log_p_cand, log_w, params.alpha, params.jackknife)  # [R, K]
                u = torch.rand(len(rows), generator=gen, dtype=torch.float64)
                cdf = probs.cumsum(-1)
                pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=K - 1)
                chosen = cands.gather(-1, pick[:, None]).squeeze(-1).tolist()
                chosen_lp = log_p_cand.gather(-1, pick[:, None]).squeeze(-1).tolist()
                tokens, active = [self.pad_token_id] * N, [False] * N
                for r, t, lp in zip(rows, chosen, chosen_lp):
                    tokens[r], active[r] = t, True
                    logps[r].append(lp)
                logits = batch.feed(tokens, active)
                for r in rows:
                    if batch.tokens[r][-1] in stop or len(batch.tokens[r]) >= params.max_new_tokens:
                        done[r] = True
        finally:
            self.model.train(was_training)
        ids = batch.tokens
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) if self.tokenizer is not None else None
                 for t in ids]
        finish = [FINISH_EOS if t and t[-1] in stop else FINISH_LENGTH for t in ids]
        group = lambda xs: [xs[b * n:(b + 1) * n] for b in range(len(prompt_ids))]
        return ScalablePowerOutput(token_ids=group(ids), target_logps=group(logps), texts=group(texts),
                                   finish_reasons=group(finish), forward_tokens=batch.forward_tokens + rollout_tokens,
                                   computed_tokens=batch.computed_tokens + rollout_computed,
                                   rollout_tokens=rollout_tokens, wall_s=time.perf_counter() - start)

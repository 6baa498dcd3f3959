"""Particle filtering for reasoning: particles extended step by step and resampled by a reward (Puri et al. 2025,
arXiv 2502.01618, "Rollout Roulette", Alg. 1).

Notation (paper -> code):
    x_{1:t}           -> a particle: the prompt's completion after t reasoning steps (a step ends at a step
                         delimiter token, e.g. a newline, after `step_tokens` tokens, or at the stop token)
    p_M(x_t | x_<t)   -> the language model at `temperature` (the transition / proposal)
    r̂(x_{1:t})        -> `score(prompts, partial completions)`: a reward model (posttrain's `reward_function`),
                         a verifier, or any callable; it enters as the log-potential log g_t = r̂ / `reward_temperature`
    N                 -> `num_particles`

State-space view: the particles target π(x) ∝ p_M(x) · Π_t g_t(x_{1:t}), with the potential g_t either
    potential="product": g_t = exp(r̂(x_{1:t})/τ) at every step (the paper's PRM-as-likelihood model; for a PRM
                         that returns probabilities, pass score = log r̂ and τ = 1), or
    potential="last":    g_t = exp((r̂(x_{1:t}) − r̂(x_{1:t−1}))/τ), which telescopes to exp(r̂(x)/τ) of the final
                         completion: π ∝ p_M(x)·exp(r̂(x)/τ), with the partial scores as look-ahead (a reward that
                         only judges final answers, such as a verifier, makes every earlier step neutral).
A particle that has ended (stop token or length limit) takes no further potentials. Each step: extend every live
particle by one step, weight it by g_t, and resample the N particles of a prompt multinomially in proportion to
their weights (`resample="every_step"`, as the paper) or only when the effective sample size drops below N/2
(`resample="ess"`). After the last step the prompt's answer is the particle with the largest weight
(`select="max_weight"`), the one whose own last score r̂ is highest (`"max_reward"`: with "product" potentials a
particle that ended in an earlier step carries fewer factors, so its weight is not comparable with the others'),
a draw from the weights (`"sample"`), or a weighted vote over extracted answers, done by the caller from `weights`.

Exactness: this is a standard sequential Monte Carlo sampler, so Ẑ = Π_t mean_i(weight_i,t) is an unbiased
estimate of Z = Σ_x p_M(x) Π_t g_t(x), and the weighted particles converge to π as N grows. tests/ttc check both on
an enumerable model with an exact reward.

Cost: `forward_tokens` counts the real tokens fed through the model; resampling duplicates KV-cache rows, so a
resampled particle's prefix is never re-encoded. The reward model's own forward passes are counted separately in
`scored_texts` (one call per step per live particle).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from posttrain.generation.sampler import draw_seed
from posttrain.ttc.lockstep import LockstepBatch, stop_and_pad

ScoreFn = Callable[[list, list], Sequence[float]]


@dataclass(frozen=True)
class ParticleParams:
    """num_particles: N per prompt; max_new_tokens: length limit; temperature: of the proposal p_M;
    step_tokens: most tokens per step; step_stop_ids: tokens that end a step (kept in it, e.g. newline ids);
    reward_temperature: τ in g = exp(r̂/τ); potential / resample / select: see the module docstring."""

    num_particles: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    step_tokens: int = 16
    step_stop_ids: tuple[int, ...] = ()
    reward_temperature: float = 1.0
    potential: Literal["product", "last"] = "product"
    resample: Literal["every_step", "ess"] = "every_step"
    select: Literal["max_weight", "max_reward", "sample"] = "max_weight"
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.num_particles < 1 or self.max_new_tokens < 1 or self.step_tokens < 1:
            raise ValueError("need num_particles, max_new_tokens and step_tokens >= 1")
        if not self.temperature > 0 or not self.reward_temperature > 0:
            raise ValueError("temperature and reward_temperature must be > 0")
        for key, allowed in (("potential", ("product", "last")), ("resample", ("every_step", "ess")),
                             ("select", ("max_weight", "max_reward", "sample"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        object.__setattr__(self, "step_stop_ids", tuple(int(t) for t in self.step_stop_ids))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class ParticleResult:
    """One prompt's final particles. token_ids / texts: [N]; weights: [N] normalized final weights; rewards: [N]
    each particle's last score r̂; chosen: the
    selected particle's index; log_z: log Ẑ, the log of the unbiased estimate of Z; steps: reasoning steps taken;
    resamples: how many steps resampled."""

    token_ids: list[list[int]]
    texts: list[str | None]
    weights: list[float]
    rewards: list[float]
    chosen: int
    log_z: float
    steps: int
    resamples: int

    @property
    def text(self) -> str | None:
        return self.texts[self.chosen]


@dataclass(frozen=True)
class ParticleOutput:
    """results: [B]; forward_tokens: real tokens fed through the language model; computed_tokens: adds padding
    and waiting positions; scored_texts: partial completions sent to `score`; wall_s: the whole call."""

    results: list[ParticleResult]
    forward_tokens: int
    computed_tokens: int
    scored_texts: int
    wall_s: float


def _multinomial(weights: torch.Tensor, n: int, gen: torch.Generator) -> list[int]:
    """n indices drawn with probabilities `weights` [N] (float64, sums to 1), from one uniform each."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    cdf = weights.cumsum(0)
    return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(weights) - 1).tolist()


class ParticleFilter:
    """Particle filtering over a causal LM; `score(prompts, completions) -> [n] floats` scores partial
    completions (texts when a tokenizer is given, else token-id lists; prompts likewise)."""

    def __init__(self, model: nn.Module, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids, self.pad_token_id = stop_and_pad(model, tokenizer, eos_token_ids, pad_token_id)

    def _view(self, ids: list[int]):
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else list(ids)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], score: ScoreFn, params: ParticleParams,
                 prompts: Sequence | None = None) -> ParticleOutput:
        """Run the filter for each prompt. prompts: what `score` receives as the prompt (default: the decoded
        prompt ids, or the ids themselves without a tokenizer)."""
        if not prompt_ids:
            raise ValueError("particle filtering needs at least one prompt")
        start = time.perf_counter()
        B, N = len(prompt_ids), params.num_particles
        prompts = list(prompts) if prompts is not None else [self._view(p) for p in prompt_ids]
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for {B} prompt_ids")
        stop = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        step_stop = set(params.step_stop_ids)
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else draw_seed())
        was_training = self.model.training
        self.model.eval()
        log_w = torch.zeros(B * N, dtype=torch.float64)  # current log weights (reset by resampling)
        last_r = torch.zeros(B * N, dtype=torch.float64)  # r̂ at the previous step ("last" potentials)
        log_z = [0.0] * B
        steps = resamples = scored = 0
        try:
            batch = LockstepBatch(self.model, self.pad_token_id)
            logits = batch.prefill([list(p) for p in prompt_ids for _ in range(N)])
            ended = [False] * (B * N)
            while not all(ended):
                steps += 1
                # 1. extend every live particle by one step
                in_step = [not e for e in ended]
                live_at_start = list(in_step)
                taken = [0] * (B * N)
                while any(in_step):
                    u = torch.rand(B * N, generator=gen, dtype=torch.float64)  # one per row, every token
                    probs = torch.softmax(logits.double().cpu() / params.temperature, dim=-1)  # CPU, as u is
                    cdf = probs.cumsum(-1)
                    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
                    logits = batch.feed(drawn.clamp(max=probs.shape[-1] - 1).tolist(), in_step)
                    for i in range(B * N):
                        if not in_step[i]:
                            continue
                        taken[i] += 1
                        t = batch.tokens[i][-1]
                        if t in stop or len(batch.tokens[i]) >= params.max_new_tokens:
                            ended[i], in_step[i] = True, False
                        elif t in step_stop or taken[i] >= params.step_tokens:
                            in_step[i] = False
                # 2. weight the particles that moved by their potentials
                rows = [i for i in range(B * N) if live_at_start[i]]
                r = torch.tensor([float(v) for v in score([prompts[i // N] for i in rows],
                                                          [self._view(batch.tokens[i]) for i in rows])],
                                 dtype=torch.float64)
                if len(r) != len(rows) or torch.isnan(r).any():
                    raise ValueError(f"score returned {len(r)} values (or NaN) for {len(rows)} particles")
                scored += len(rows)
                index = torch.tensor(rows)
                increment = (r if params.potential == "product" else r - last_r[index]) / params.reward_temperature
                last_r[index] = r
                log_w[index] += increment
                # 3. resample each prompt's particles
                order = list(range(B * N))
                for b in range(B):
                    lw = log_w[b * N:(b + 1) * N]
                    w = torch.softmax(lw, dim=0)
                    ess = 1.0 / float((w ** 2).sum())
                    if params.resample == "ess" and ess >= N / 2 and not all(ended[b * N:(b + 1) * N]):
                        continue
                    if all(ended[b * N:(b + 1) * N]):
                        continue  # keep the final weights for selection
                    log_z[b] += float(torch.logsumexp(lw, 0)) - math.log(N)
                    picks = _multinomial(w, N, gen)
                    order[b * N:(b + 1) * N] = [b * N + j for j in picks]
                    log_w[b * N:(b + 1) * N] = 0.0
                    resamples += 1
                if order != list(range(B * N)):
                    batch.select(order)
                    logits = logits[torch.tensor(order)]
                    index = torch.tensor(order)
                    last_r = last_r[index]
                    ended = [ended[i] for i in order]
        finally:
            self.model.train(was_training)
        results = []
        for b in range(B):
            lw = log_w[b * N:(b + 1) * N]
            log_z[b] += float(torch.logsumexp(lw, 0)) - math.log(N)
            w = torch.softmax(lw, dim=0)
            if params.select == "max_weight":
                chosen = int(torch.argmax(w))
            elif params.select == "max_reward":
                chosen = int(torch.argmax(last_r[b * N:(b + 1) * N]))
            else:
                chosen = _multinomial(w, 1, gen)[0]
            ids = [batch.tokens[b * N + j] for j in range(N)]
            results.append(ParticleResult(token_ids=ids, texts=[self._view(t) if self.tokenizer else None for t in ids],
                                          weights=w.tolist(), rewards=last_r[b * N:(b + 1) * N].tolist(),
                                          chosen=chosen, log_z=log_z[b], steps=steps,
                                          resamples=resamples))
        return ParticleOutput(results=results, forward_tokens=batch.forward_tokens,
                              computed_tokens=batch.computed_tokens, scored_texts=scored,
                              wall_s=time.perf_counter() - start)


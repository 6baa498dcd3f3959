"""Decoding strategies on the shared engines, one named function each, and their adapter to the `generate(prompts, n)`
callable that the test-time selection strategies (ttc/best_of_n.py) take.

    greedy            argmax at every step (HFGenerator, temperature 0)
    temperature       ancestral sampling from softmax(z/τ)
    top_k             ... restricted to the k most probable tokens (Fan et al. 2018)
    top_p             ... restricted to the nucleus of mass p (Holtzman et al. 2020)
    low_temperature   τ = 1/α, the baseline power sampling is compared with (it is NOT p^α; ttc/power.py)
    beam              beam search, the n best hypotheses (generation/beam.py)
    power             power sampling p^α by block-wise MH, n independent chains (ttc/power.py)
    scalable_power    p^α token by token with look-ahead rollouts, no MCMC (ttc/scalable_power.py)

Every decoder has the signature (model, tokenizer, prompt_ids [B], n, options) -> Decoded with [B][G] completions
and their cost in tokens fed through the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from posttrain.errors import ConfigError
from posttrain.generation.beam import BeamParams, BeamSearch
from posttrain.generation.sampler import HFGenerator, SamplingParams


@dataclass(frozen=True)
class DecodeOptions:
    """Knobs shared by the decoders; each uses the ones that apply to it. batch_size: prompts per sampler call
    (power: chains per batch). seed: the first call's seed; later batches use seed + batch index."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    alpha: float = 4.0
    block_size: int = 16
    mcmc_steps: int = 4
    beam_width: int = 4
    length_penalty: float = 0.0
    batch_size: int = 16
    seed: int = 0
    stop: tuple[str, ...] = ()
    lookahead_top_k: int = 4
    lookahead_rollouts: int = 4
    lookahead_horizon: int = 8


@dataclass(frozen=True)
class Decoded:
    """texts / token_ids / token_logps: [B][G]. token_logps are under the distribution each token was drawn from
    (greedy and beam: the temperature-1 model; power: the target p). forward_tokens: tokens fed through the model;
    stats: strategy-specific figures (e.g. MH acceptance)."""

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    token_logps: list[list[list[float]]]
    forward_tokens: int
    wall_s: float
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for row in self.token_ids for t in row)

    def candidates(self) -> list[list[dict]]:
        """[B][G] candidates in the format ttc.best_of_n takes; forward_tokens: each candidate's equal share of
        the batch's forward_tokens (so the shares add up to it exactly)."""
        share = self.forward_tokens / max(1, sum(len(row) for row in self.texts))
        return [[{"text": t, "token_logps": lp, "num_tokens": len(ids), "forward_tokens": share}
                 for t, ids, lp in zip(ts, idss, lps)]
                for ts, idss, lps in zip(self.texts, self.token_ids, self.token_logps)]


def _chunks(items: Sequence, size: int):
    for i in range(0, len(items), max(1, size)):
        yield i // max(1, size), items[i:i + size]


def _engine(model, tokenizer, strategy: str):
    """HFGenerator on a torch model; an engine already built (vLLM, generation/backends.py) is used as it is.
    Decoders that need the model's forward (beam, power) accept only a torch model."""
    if isinstance(model, nn.Module):
        return HFGenerator(model, tokenizer)
    if strategy:
        raise ConfigError(f"decoder '{strategy}' needs the torch model (generation_backend=hf): it scores and "
                          f"re-encodes tokens itself, which a vLLM engine does not expose")
    return model


def _sample(model, tokenizer, prompt_ids, n, options: DecodeOptions, params: SamplingParams) -> Decoded:
    generator = _engine(model, tokenizer, "")
    texts, ids, logps, forward, start = [], [], [], 0, time.perf_counter()
    for index, chunk in _chunks(prompt_ids, options.batch_size):
        params_i = replace(params, seed=options.seed + index)
        out = generator.generate(list(chunk), params_i, n=n)
        texts += out.grouped(out.texts)
        ids += out.grouped(out.token_lists())
        logps += out.grouped(out.logps_lists())
        forward += out.forward_tokens
    return Decoded(texts, ids, logps, forward, time.perf_counter() - start)


def _params(options: DecodeOptions, **overrides) -> SamplingParams:
    base = dict(max_new_tokens=options.max_new_tokens, temperature=options.temperature, stop=options.stop)
    return SamplingParams(**{**base, **overrides})


def decode_greedy(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """One greedy completion per prompt, repeated n times (greedy decoding is deterministic)."""
    one = _sample(model, tokenizer, prompt_ids, 1, options, _params(options, temperature=0.0))
    rep = lambda rows: [row * n for row in rows]
    return Decoded(rep(one.texts), rep(one.token_ids), rep(one.token_logps), one.forward_tokens, one.wall_s)


def decode_temperature(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """n samples per prompt at `options.temperature`."""
    return _sample(model, tokenizer, prompt_ids, n, options, _params(options))


def decode_top_k(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """n samples per prompt from the top-k filtered distribution."""
    return _sample(model, tokenizer, prompt_ids, n, options, _params(options, top_k=options.top_k))


def decode_top_p(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """n samples per prompt from the nucleus (top-p) filtered distribution."""
    return _sample(model, tokenizer, prompt_ids, n, options, _params(options, top_p=options.top_p))


def decode_low_temperature(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """n samples per prompt at temperature 1/α (the baseline power sampling is compared with)."""
    return _sample(model, tokenizer, prompt_ids, n, options, _params(options, temperature=1.0 / options.alpha))


def decode_beam(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """The n best hypotheses of a beam of width max(beam_width, n)."""
    _engine(model, tokenizer, "beam")
    params = BeamParams(width=max(options.beam_width, n), max_new_tokens=options.max_new_tokens,
                        length_penalty=options.length_penalty, num_return=n)
    out = BeamSearch(model, tokenizer).generate(list(prompt_ids), params)
    hyps = out.hypotheses
    # a beam can close fewer than n hypotheses (tiny vocabularies); repeat the best to keep [B][G]
    hyps = [row + [row[0]] * (n - len(row)) for row in hyps]
    return Decoded([[h.text or "" for h in row] for row in hyps], [[h.token_ids for h in row] for row in hyps],
                   [[h.token_logps for h in row] for row in hyps],
                   out.forward_tokens, out.wall_s)


def decode_power(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """n power-sampling chains per prompt (α, block size, N_MCMC from options), batched with KV-cache reuse."""
    from posttrain.ttc.power import PowerParams, PowerSampler

    _engine(model, tokenizer, "power")
    params = PowerParams(alpha=options.alpha, max_new_tokens=options.max_new_tokens, block_size=options.block_size,
                         mcmc_steps=options.mcmc_steps, seed=options.seed)
    out = PowerSampler(model, tokenizer, batch_size=options.batch_size).generate(list(prompt_ids), params, n=n)
    flat = [s for row in out.samples for s in row]
    proposed = sum(s.proposed for s in flat)
    stats = {"acceptance_rate": sum(s.accepted for s in flat) / proposed if proposed else float("nan"),
             "sampled_tokens": float(sum(s.sampled_tokens for s in flat)),
             "computed_tokens": float(out.computed_tokens)}
    return Decoded([[s.text or "" for s in row] for row in out.samples],
                   [[s.token_ids for s in row] for row in out.samples],
                   [[s.target_logps for s in row] for row in out.samples], out.forward_tokens, out.wall_s, stats)


def decode_scalable_power(model, tokenizer, prompt_ids, n, options: DecodeOptions) -> Decoded:
    """n scalable-power-sampling draws per prompt (α, top-K candidates, M rollouts of H tokens from options)."""
    from posttrain.ttc.scalable_power import ScalablePowerParams, ScalablePowerSampler

    params = ScalablePowerParams(alpha=options.alpha, max_new_tokens=options.max_new_tokens,
                                 top_k=options.lookahead_top_k, rollouts=options.lookahead_rollouts,
                                 horizon=options.lookahead_horizon, seed=options.seed)
    sampler = ScalablePowerSampler(model, tokenizer)
    texts, ids, logps, forward, rollout, start = [], [], [], 0, 0, time.perf_counter()
    for index, chunk in _chunks(prompt_ids, options.batch_size):
        out = sampler.generate(list(chunk), replace(params, seed=options.seed + index), n=n)
        texts += [[t or "" for t in row] for row in out.texts]
        ids += out.token_ids
        logps += out.target_logps
        forward, rollout = forward + out.forward_tokens, rollout + out.rollout_tokens
    return Decoded(texts, ids, logps, forward, time.perf_counter() - start, {"rollout_tokens": float(rollout)})


Decoder = Callable[[nn.Module, object, list[list[int]], int, DecodeOptions], Decoded]
DECODERS: dict[str, Decoder] = {
    "greedy": decode_greedy,
    "temperature": decode_temperature,
    "top_k": decode_top_k,
    "top_p": decode_top_p,
    "low_temperature": decode_low_temperature,
    "beam": decode_beam,
    "power": decode_power,
    "scalable_power": decode_scalable_power,
}


class GenerateFn:
    """`generate(prompt_texts, n) -> [B][G] candidates` over a decoder, for ttc.best_of_n; prompt texts are already
    rendered (chat template applied). Keeps the last Decoded and the cost summed over calls."""

    def __init__(self, model: nn.Module, tokenizer, decoder: str, options: DecodeOptions):
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {sorted(DECODERS)}")
        self.model, self.tokenizer, self.decode, self.options = model, tokenizer, DECODERS[decoder], options
        self.last: Decoded | None = None
        self.forward_tokens = 0
        self.wall_s = 0.0

    def __call__(self, prompts: list[str], n: int) -> list[list[dict]]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        self.last = self.decode(self.model, self.tokenizer, ids, n, self.options)
        self.forward_tokens += self.last.forward_tokens
        self.wall_s += self.last.wall_s
        return self.last.candidates()

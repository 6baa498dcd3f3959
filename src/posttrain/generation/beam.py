"""Beam search with an optional length penalty (score = Σ log p / |y|^λ, as in Wu et al. 2016, arXiv 1609.08144, Eq. 14
without its +5 offset; transformers uses the same form).

Per prompt: the prompt is encoded once and its KV cache expanded to the live beams. Each step scores every
continuation of every live beam by its summed log-prob and looks at the best 2W in order: a stop token among the
first W ranks closes a hypothesis (scored with the length penalty); other tokens fill the W live beams. At
max_new_tokens the live beams close as they are. The search stops once W hypotheses are closed and no live beam
can still beat the W-th best: with log-probs ≤ 0 a live beam with sum s at length L can reach at most s / L^λ
for λ ≤ 0, and at most s / T^λ for λ > 0 (T = max_new_tokens), so this test never discards a better hypothesis.
Width 1 is greedy decoding; a width at least the number of live prefixes is exhaustive (tests/generation).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from posttrain.generation.sampler import eos_ids_of


@dataclass(frozen=True)
class BeamParams:
    """width: W live beams; length_penalty: λ (0 = summed log-prob); num_return: hypotheses returned per prompt."""

    width: int = 4
    max_new_tokens: int = 256
    length_penalty: float = 0.0
    num_return: int = 1
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.width < 1 or self.max_new_tokens < 1:
            raise ValueError("beam search needs width >= 1 and max_new_tokens >= 1")
        if not 1 <= self.num_return <= self.width:
            raise ValueError(f"num_return must be in [1, width={self.width}], got {self.num_return}")


@dataclass(frozen=True)
class Hypothesis:
    token_ids: list[int]
    token_logps: list[float]  # log p of each generated token (temperature 1)
    logp: float  # their sum
    score: float  # logp / len^λ
    finish_reason: str  # "eos" or "length"
    text: str | None = None


@dataclass(frozen=True)
class BeamResult:
    """hypotheses [B][num_return], best first; forward_tokens: tokens fed through the model (prompt once per
    prompt plus one per live beam per step)."""

    hypotheses: list[list[Hypothesis]]
    forward_tokens: int
    wall_s: float


class BeamSearch:
    def __init__(self, model: nn.Module, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)

    def _forward(self, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1, :].double(), dim=-1)  # [W, V]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: BeamParams) -> BeamResult:
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            results, forward = [], 0
            for prompt in prompt_ids:
                hyps, cost = self._search(list(prompt), params)
                results.append(hyps)
                forward += cost
        finally:
            self.model.train(was_training)
        return BeamResult(hypotheses=results, forward_tokens=forward, wall_s=time.perf_counter() - start)

    def _search(self, prompt: list[int], params: BeamParams) -> tuple[list[Hypothesis], int]:
        if not prompt:
            raise ValueError("beam search needs a non-empty prompt")
        W, lam, T = params.width, params.length_penalty, params.max_new_tokens
        stop = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        device = next(self.model.parameters()).device
        cache = DynamicCache()
        logps = self._forward(torch.tensor([prompt], device=device), cache)  # [1, V]
        forward = len(prompt)
        beams: list[tuple[list[int], list[float], float]] = [([], [], 0.0)]  # live (tokens, log p's, Σ log p)
        finished: list[Hypothesis] = []

        def score(logp: float, length: int) -> float:
            return logp / (length ** lam) if lam else logp

        for step in range(T):
            totals = torch.tensor([b[2] for b in beams], dtype=torch.float64, device=device)[:, None] + logps  # [W, V]
            V = totals.shape[1]
            k = min(2 * W, totals.numel())
            top_values, top_index = torch.topk(totals.reshape(-1), k)  # [k]
            new_beams: list[tuple] = []
            parents: list[int] = []
            tokens: list[int] = []
            for rank, (value, flat) in enumerate(zip(top_values.tolist(), top_index.tolist())):
                parent, token = divmod(flat, V)
                seq = beams[parent][0] + [token]
                seq_logps = beams[parent][1] + [float(logps[parent, token])]
                if token in stop:
                    if rank < W:
                        finished.append(Hypothesis(seq, seq_logps, value, score(value, len(seq)), "eos"))
                    continue
                if step == T - 1:
                    finished.append(Hypothesis(seq, seq_logps, value, score(value, len(seq)), "length"))
                elif len(new_beams) < W:
                    new_beams.append((seq, seq_logps, value))
                    parents.append(parent)
                    tokens.append(token)
                if len(new_beams) == W and step < T - 1:
                    break
            if step == T - 1 or not new_beams:
                break
            finished.sort(key=lambda h: -h.score)
            if len(finished) >= W:
                best_live = max(b[2] for b in new_beams)
                reach = best_live / ((T if lam > 0 else len(new_beams[0][0])) ** lam) if lam else best_live
                if reach <= finished[W - 1].score:
                    break
            cache.batch_select_indices(torch.tensor(parents, device=device))
            logps = self._forward(torch.tensor(tokens, device=device)[:, None], cache)
            forward += len(tokens)
            beams = new_beams
        finished.sort(key=lambda h: -h.score)
        top = finished[:params.num_return]
        if self.tokenizer is not None:
            top = [Hypothesis(h.token_ids, h.token_logps, h.logp, h.score, h.finish_reason,
                              self.tokenizer.decode(h.token_ids, skip_special_tokens=True)) for h in top]
        return top, forward

"""Best-of-N answer selection: by a score (reward model or verifier) or by self-consistency (Wang et al. 2022).

The strategies take callables, never a model:
    generate(prompts, n) -> [B][G] candidates, G = n samples for each of the B prompts. A candidate is a
        `Candidate`, a dict with "text" and optionally "token_logps" / "num_tokens", or a plain string.
    score(prompts, completions) -> [B*G] floats, called once on the flattened batch (prompt repeated G times),
        like a reward function; higher is better.
    extract(text) -> answer or None, the answer the votes compare; default: the stripped text.
    equivalent(a, b) -> bool, the task verifier's equivalence of two answers; votes count equivalence classes
        (ttc/vote.py `group_answers`); default: ==.

Every strategy returns one `TTCResult` per prompt with the chosen answer and everything it was chosen from, and
its cost in the unit all test-time strategies share (ttc/power.py, ttc/scalable_power.py, ttc/particles.py,
generation/strategies.py): tokens forwarded through the policy model (from the candidates' `forward_tokens`, which
generation.strategies.Decoded.candidates() fills with each candidate's share of its batch) and wall time (the whole
call, generation and scoring, split evenly over the prompts).
Ties go to the earliest candidate (best_of_n) or to the answer that appears first (votes, see ttc/vote.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from posttrain.ttc.vote import Equivalence, VoteResult, group_answers, majority_vote, weighted_vote


@dataclass(frozen=True)
class Candidate:
    """One sampled completion. token_logps: [T] log-probs of its generated tokens under the sampling model;
    num_tokens: generated tokens (defaults to len(token_logps) when those are given); forward_tokens: tokens fed
    through the model to produce it (its share of the prompt encoding included), when the generator knows."""

    text: str
    token_logps: tuple[float, ...] | None = None
    num_tokens: int | None = None
    forward_tokens: float | None = None

    def __post_init__(self):
        if self.token_logps is not None and not isinstance(self.token_logps, tuple):
            logps = self.token_logps.tolist() if hasattr(self.token_logps, "tolist") else self.token_logps
            object.__setattr__(self, "token_logps", tuple(float(v) for v in logps))

    @property
    def generated_tokens(self) -> int | None:
        if self.num_tokens is not None:
            return self.num_tokens
        return len(self.token_logps) if self.token_logps is not None else None


@dataclass(frozen=True)
class TTCResult:
    """answer: the chosen answer (None when no candidate had one). text/index: the chosen candidate (for votes, the
    first candidate whose answer won). candidates/answers: [G] all candidates and their extracted answers.
    scores: [G] from `score` (best_of_n only). votes: answer -> vote total (votes only). generated_tokens: summed
    over all G candidates; None when a candidate did not report its token count. forward_tokens: tokens forwarded
    through the policy for all G candidates (None when a candidate did not report it); wall_s: this prompt's share
    of the call's wall time."""

    answer: Hashable | None
    text: str | None
    index: int | None
    candidates: tuple[Candidate, ...]
    answers: tuple
    scores: tuple[float, ...] | None
    votes: dict | None
    generated_tokens: int | None
    forward_tokens: float | None = None
    wall_s: float = 0.0


GenerateFn = Callable[[list[str], int], Sequence[Sequence[Any]]]
ScoreFn = Callable[[list[str], list[str]], Sequence[float]]
ExtractFn = Callable[[str], Hashable | None]


def _default_extract(text: str) -> Hashable | None:
    return text.strip()


def _as_candidate(item: Any, where: str) -> Candidate:
    if isinstance(item, Candidate):
        return item
    if isinstance(item, str):
        return Candidate(text=item)
    if isinstance(item, dict) and "text" in item:
        num, fwd = item.get("num_tokens"), item.get("forward_tokens")
        return Candidate(text=item["text"], token_logps=item.get("token_logps"),
                         num_tokens=None if num is None else int(num),
                         forward_tokens=None if fwd is None else float(fwd))
    raise TypeError(f"{where}: expected a Candidate, a dict with 'text', or a str; got {type(item).__name__}")


def _generate(prompts: Sequence[str], generate: GenerateFn, n: int) -> list[list[Candidate]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompts = list(prompts)
    out = generate(prompts, n)
    if len(out) != len(prompts):
        raise ValueError(f"generate returned {len(out)} candidate lists for {len(prompts)} prompts")
    batch = []
    for b, row in enumerate(out):
        if len(row) != n:
            raise ValueError(f"generate returned {len(row)} candidates for prompt {b}, expected n={n}")
        batch.append([_as_candidate(item, f"prompt {b}, candidate {g}") for g, item in enumerate(row)])
    return batch  # [B][G]


def _cost(candidates: Sequence[Candidate]) -> int | None:
    counts = [c.generated_tokens for c in candidates]
    return sum(c for c in counts if c is not None) if all(c is not None for c in counts) else None


def _forward(candidates: Sequence[Candidate]) -> float | None:
    counts = [c.forward_tokens for c in candidates]
    return float(sum(c for c in counts if c is not None)) if all(c is not None for c in counts) else None


def _timed(results: list[TTCResult], start: float) -> list[TTCResult]:
    share = (time.perf_counter() - start) / max(1, len(results))
    return [replace(r, forward_tokens=_forward(r.candidates), wall_s=share) for r in results]


def best_of_n(prompts: Sequence[str], generate: GenerateFn, score: ScoreFn, *, n: int,
              extract: ExtractFn | None = None) -> list[TTCResult]:
    """For each prompt, the candidate with the highest score (first one on ties); its answer is extract(text)."""
    extract = extract or _default_extract
    prompts = list(prompts)
    start = time.perf_counter()
    batch = _generate(prompts, generate, n)  # [B][G]
    flat_prompts = [p for p, row in zip(prompts, batch) for _ in row]  # [B*G]
    flat_texts = [c.text for row in batch for c in row]  # [B*G]
    flat_scores = [float(s) for s in score(flat_prompts, flat_texts)]
    if len(flat_scores) != len(flat_texts):
        raise ValueError(f"score returned {len(flat_scores)} scores for {len(flat_texts)} completions")
    results = []
    for b, row in enumerate(batch):
        scores = tuple(flat_scores[b * n:(b + 1) * n])  # [G]
        for g, s in enumerate(scores):
            if math.isnan(s):
                raise ValueError(f"score returned NaN for prompt {b}, candidate {g}")
        best = max(range(n), key=lambda g: (scores[g], -g))  # highest score, then lowest index
        answers = tuple(extract(c.text) for c in row)
        results.append(TTCResult(answer=answers[best], text=row[best].text, index=best, candidates=tuple(row),
                                 answers=answers, scores=scores, votes=None, generated_tokens=_cost(row)))
    return _timed(results, start)


def _vote_results(batch: list[list[Candidate]], extract: ExtractFn,
                  rule: Callable[[tuple, list[Candidate]], VoteResult],
                  equivalent: Equivalence | None = None) -> list[TTCResult]:
    results = []
    for row in batch:
        answers = tuple(extract(c.text) for c in row)
        classes = group_answers(answers, equivalent)
        vote = rule(tuple(classes), row)
        index = classes.index(vote.answer) if vote.answer is not None else None
        results.append(TTCResult(answer=vote.answer, text=row[index].text if index is not None else None,
                                 index=index, candidates=tuple(row), answers=answers, scores=None,
                                 votes=vote.votes, generated_tokens=_cost(row)))
    return results


def majority_of_n(prompts: Sequence[str], generate: GenerateFn, score: ScoreFn | None = None, *, n: int,
                  extract: ExtractFn | None = None, equivalent: Equivalence | None = None) -> list[TTCResult]:
    """Self-consistency: the most frequent extracted answer (class under `equivalent`) among n samples. `score` is
    not used."""
    start = time.perf_counter()
    batch = _generate(prompts, generate, n)
    return _timed(_vote_results(batch, extract or _default_extract, lambda answers, row: majority_vote(answers),
                                equivalent), start)


def weighted_majority_of_n(prompts: Sequence[str], generate: GenerateFn, score: ScoreFn | None = None, *, n: int,
                           extract: ExtractFn | None = None,
                           equivalent: Equivalence | None = None) -> list[TTCResult]:
    """Self-consistency with votes weighted by exp(mean token log-prob); candidates must carry token_logps."""
    start = time.perf_counter()
    batch = _generate(prompts, generate, n)
    for b, row in enumerate(batch):
        for g, c in enumerate(row):
            if c.token_logps is None:
                raise ValueError(f"weighted vote needs token_logps; prompt {b}, candidate {g} has none")
    return _timed(_vote_results(batch, extract or _default_extract,
                                lambda answers, row: weighted_vote(answers, [c.token_logps for c in row]), equivalent),
                  start)


STRATEGIES: dict[str, Callable[..., list[TTCResult]]] = {
    "best_of_n": best_of_n,
    "majority": majority_of_n,
    "weighted_majority": weighted_majority_of_n,
}

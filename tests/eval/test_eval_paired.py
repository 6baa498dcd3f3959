"""McNemar's exact test and the paired accuracy change (posttrain.eval.paired)."""

import math

import pytest

from posttrain.eval.metrics import mcnemar_p
from posttrain.eval.paired import paired_test


def test_hand_worked_counts_and_p_value():
    # problems: 0..9; before right on 0-3; after right on 2-9 -> fixed = 4..9 (6), broken = 0, 1 (2)
    before = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    after = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    t = paired_test(before, after)
    assert (t.n, t.fixed, t.broken) == (10, 6, 2)
    assert t.difference == pytest.approx(0.4)
    # p = 2 * (C(8,0) + C(8,1) + C(8,2)) / 2^8 = 2 * 37 / 256
    assert t.p_value == pytest.approx(74 / 256)
    # se = sqrt(b + c - (b - c)^2 / n) / n = sqrt(8 - 1.6) / 10
    assert t.difference_se == pytest.approx(math.sqrt(6.4) / 10)


def test_agrees_with_scipy_binomtest():
    from scipy.stats import binomtest

    for b, c in [(0, 5), (3, 3), (12, 4), (1, 30), (25, 17), (7, 0)]:
        assert mcnemar_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12), (b, c)


def test_symmetric_and_edge_cases():
    assert mcnemar_p(9, 2) == mcnemar_p(2, 9)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(4, 4) == 1.0  # capped at 1
    assert mcnemar_p(0, 1) == 1.0  # 2 * 1/2
    t = paired_test([True] * 5, [True] * 5)  # nothing changed: no signal, zero change
    assert (t.fixed, t.broken, t.difference, t.difference_se, t.p_value) == (0, 0, 0.0, 0.0, 1.0)
    # rewards read as right at >= 0.5
    assert paired_test([0.0, 1.0], [0.6, 0.4]).fixed == 1


def test_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="same problems"):
        paired_test([1, 0], [1])
    with pytest.raises(ValueError, match="no problems"):
        paired_test([], [])
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_p(-1, 2)

"""Paired before/after comparison of per-problem correctness: McNemar's exact test (McNemar 1947).

The same n problems are scored before and after training. Only the discordant problems carry information about the
change: b = wrong before and right after (fixed), c = right before and wrong after (broken). Under "no change",
b ~ Binomial(b + c, 1/2), and the exact two-sided p-value is

    p = min(1, 2 · Σ_{k=0}^{min(b, c)} C(b + c, k) / 2^{b + c}).

The accuracy change is Δ = (b − c) / n with the paired standard error √(b + c − (b − c)²/n) / n, which is smaller
than that of two independent proportions because the concordant problems cancel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.eval.metrics import mcnemar_p


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test on paired binary outcomes, and the accuracy change with its paired standard error."""

    n: int
    fixed: int  # b: wrong before, right after
    broken: int  # c: right before, wrong after
    difference: float  # (b − c) / n
    difference_se: float
    p_value: float  # exact two-sided

    def __str__(self) -> str:
        return (f"{self.difference:+.1%} ± {self.difference_se:.1%} ({self.fixed} fixed, {self.broken} broken of "
                f"{self.n}; McNemar exact p = {self.p_value:.3g})")


def paired_test(before: Sequence[float | bool], after: Sequence[float | bool]) -> PairedTest:
    """Compare per-problem correctness (1/True = right) on the same problems before and after.

    before, after: [n] outcomes in the same problem order; values other than 0/1 are read as right when ≥ 0.5."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need the same problems: {len(before)} before, {len(after)} after")
    n = len(before)
    if n == 0:
        raise ValueError("no problems to compare")
    right_before = [float(x) >= 0.5 for x in before]
    right_after = [float(x) >= 0.5 for x in after]
    fixed = sum(not x and y for x, y in zip(right_before, right_after, strict=True))
    broken = sum(x and not y for x, y in zip(right_before, right_after, strict=True))
    variance = max(fixed + broken - (fixed - broken) ** 2 / n, 0.0)
    return PairedTest(n=n, fixed=fixed, broken=broken, difference=(fixed - broken) / n,
                      difference_se=math.sqrt(variance) / n, p_value=mcnemar_p(fixed, broken))

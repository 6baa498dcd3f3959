"""π* ∝ π_ref·exp(r/β) on an enumerable bandit, reached by the project's own losses (posttrain.eval.kl_optimum)."""

from __future__ import annotations

import numpy as np
import pytest

from posttrain.eval.kl_optimum import (
    BanditProblem,
    forward_kl_optimum,
    kl_regularized_optimum,
    total_variation,
    train_dpo,
    train_policy_gradient,
)

PROBLEM = BanditProblem(ref_probs=np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]),
                        rewards=np.array([0.0, 1.0, 0.3, 2.0, -1.0, 1.5]), beta=0.5)


def test_closed_forms_by_hand():
    # two responses, π_ref = (½, ½), r = (0, ln 3)·β: π* ∝ (1, 3) = (¼, ¾)
    ref, beta = np.array([0.5, 0.5]), 0.7
    np.testing.assert_allclose(kl_regularized_optimum(ref, np.array([0.0, np.log(3.0) * beta]), beta), [0.25, 0.75])
    # forward-KL optimum: π = β·π_ref/(λ − r). With r = (0, 1), β = 1, π_ref = (½, ½): ½/λ + ½/(λ − 1) = 1
    # → λ² − 2λ + ½ = 0, λ = 1 + 1/√2, π_0 = ½/λ = 0.29289...
    p = forward_kl_optimum(ref, np.array([0.0, 1.0]), 1.0)
    np.testing.assert_allclose(p, [0.5 / (1 + 2**-0.5), 1 - 0.5 / (1 + 2**-0.5)], rtol=1e-12)
    # both are stationary points of their objectives: J(π*) ≥ J(π) for nearby π
    def reverse_objective(pi):
        return (pi * PROBLEM.rewards).sum() - PROBLEM.beta * (pi * np.log(pi / PROBLEM.ref_probs)).sum()
    star = PROBLEM.optimum()
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = np.clip(star + rng.normal(0, 0.01, star.size), 1e-6, None)
        assert reverse_objective(star) >= reverse_objective(other / other.sum())


def test_policy_gradient_with_kl_in_the_reward_reaches_pi_star_exactly():
    pi = train_policy_gradient(PROBLEM, kl="reward", samples=None, steps=3000, average_last=1)
    np.testing.assert_allclose(pi, PROBLEM.optimum(), atol=1e-6)


def test_dpo_on_bradley_terry_preferences_reaches_pi_star_exactly():
    pi = train_dpo(PROBLEM, steps=1500, average_last=1)
    np.testing.assert_allclose(pi, PROBLEM.optimum(), atol=1e-6)


def test_sampled_policy_gradient_k2_reaches_pi_star_and_k3_reaches_the_forward_kl_optimum():
    star = PROBLEM.optimum()
    forward = forward_kl_optimum(PROBLEM.ref_probs, PROBLEM.rewards, PROBLEM.beta)
    assert total_variation(star, forward) > 0.14  # the two optima are far apart on this problem
    k2 = train_policy_gradient(PROBLEM, kl="k2", samples=256, steps=1200, average_last=400, seed=1)
    k3 = train_policy_gradient(PROBLEM, kl="k3", samples=256, steps=1200, average_last=400, seed=1)
    assert total_variation(k2, star) < 0.015
    assert total_variation(k3, forward) < 0.015
    assert total_variation(k3, star) > 0.12


def test_bad_kl_choice():
    with pytest.raises(ValueError, match="kl must be"):
        train_policy_gradient(PROBLEM, kl="k4")
    with pytest.raises(ValueError, match="exact expectation"):
        train_policy_gradient(PROBLEM, kl="k3", samples=None)

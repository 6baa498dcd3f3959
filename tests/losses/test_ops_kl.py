"""KL estimators: non-negativity, exact expectations on an enumerable categorical, Monte-Carlo agreement, gradients."""

import math

import pytest
import torch

from posttrain.ops.kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalized_token_rewards


def categorical(seed, V=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    log_q = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)  # π_θ
    log_p = torch.log_softmax(log_q + scale * torch.randn(V, generator=g, dtype=torch.float64), 0)  # π_ref
    return log_q, log_p


def exact_kl(log_q, log_p):
    return (log_q.exp() * (log_q - log_p)).sum().item()


def test_k3_nonnegative_and_zero_on_agreement():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(10_000, generator=g) * 30
    ref = -torch.rand(10_000, generator=g) * 30
    assert (kl_k3(logps, ref) >= 0).all()
    assert (kl_k2(logps, ref) >= 0).all()
    assert (kl_k1(logps, ref) < 0).any()  # k1 is not
    assert torch.equal(kl_k3(logps, logps), torch.zeros(10_000))
    # hand: log r = -0.5 → e^-0.5 + 0.5 - 1 = 0.1065306597; log r = 1 → e - 2 = 0.7182818285
    torch.testing.assert_close(
        kl_k3(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])), torch.tensor([0.1065306597, 0.7182818285])
    )
    assert kl_k2(torch.tensor(-1.0), torch.tensor(-1.5)).item() == pytest.approx(0.125)


def test_k1_k3_expectations_are_exactly_kl_by_enumeration():
    for seed in range(3):
        log_q, log_p = categorical(seed)
        q = log_q.exp()
        kl = exact_kl(log_q, log_p)
        for name in ("k1", "k3"):
            assert (q * KL_ESTIMATORS[name](log_q, log_p)).sum().item() == pytest.approx(kl, abs=1e-12)


def test_monte_carlo_mean_close_to_exact_kl():
    """N = 1M samples from π_θ with a fixed seed; tolerance: 4 standard errors of the sample mean (plus, for the
    biased k2, its exact bias computed by enumeration, which is < 10% of KL for these nearby distributions)."""
    log_q, log_p = categorical(seed=5, scale=0.3)
    kl = exact_kl(log_q, log_p)
    g = torch.Generator().manual_seed(123)
    samples = torch.multinomial(log_q.exp(), 1_000_000, replacement=True, generator=g)
    for name, fn in KL_ESTIMATORS.items():
        est = fn(log_q[samples], log_p[samples])
        se = est.std().item() / math.sqrt(est.numel())
        exact_mean = (log_q.exp() * fn(log_q, log_p)).sum().item()
        assert 4 * se < 0.05 * kl  # the test is sharp enough to see a 5% bias
        assert est.mean().item() == pytest.approx(exact_mean, abs=4 * se), name
        bias = abs(exact_mean - kl)
        if name in ("k1", "k3"):
            assert bias < 1e-12
        else:
            assert bias < 0.1 * kl
    # k2's bias is real: far apart distributions show it
    log_q, log_p = categorical(seed=5, scale=3.0)
    k2_mean = (log_q.exp() * kl_k2(log_q, log_p)).sum().item()
    assert abs(k2_mean - exact_kl(log_q, log_p)) > 0.1 * exact_kl(log_q, log_p)
    # and k3 has lower variance than k1 for nearby distributions
    log_q, log_p = categorical(seed=5, scale=0.3)
    assert kl_k3(log_q[samples], log_p[samples]).var() < kl_k1(log_q[samples], log_p[samples]).var()


def test_gradients_as_documented():
    """Differentiated through log π_θ with samples held fixed: E[∇k2] = ∇KL(π_θ‖π_ref), E[∇k3] = ∇KL(π_ref‖π_θ)."""
    _, log_p = categorical(seed=7)
    theta = torch.randn(6, generator=torch.Generator().manual_seed(8), dtype=torch.float64, requires_grad=True)

    def expected_estimator_grad(fn):
        log_q = torch.log_softmax(theta, 0)
        return torch.autograd.grad((log_q.exp().detach() * fn(log_q, log_p)).sum(), theta)[0]

    log_q = torch.log_softmax(theta, 0)
    reverse = torch.autograd.grad((log_q.exp() * (log_q - log_p)).sum(), theta)[0]
    log_q = torch.log_softmax(theta, 0)
    forward = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), theta)[0]
    torch.testing.assert_close(expected_estimator_grad(kl_k2), reverse)
    torch.testing.assert_close(expected_estimator_grad(kl_k3), forward)


def test_kl_penalized_token_rewards():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 5.0, float("inf")]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    r = kl_penalized_token_rewards(scores, logps, ref, mask, kl_coef=0.1)  # k1 = logps - ref
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.1, 2.0], [0.05 - 1.0, 0.0, 0.0]]))
    r3 = kl_penalized_token_rewards(scores, logps, ref, mask, kl_coef=0.1, estimator="k3")
    assert r3[0, 0].item() == pytest.approx(-0.01065306597, abs=1e-8)

"""GSPO, RLOO, SAPO and DPPO (TV/KL): values and gradients worked from each paper's formula on small ragged batches,
stop-gradients, limits, micro-batch exactness and padding garbage."""

import math

import pytest
import torch

from posttrain.losses.policy import (
    POLICY_LOSSES,
    GlobalCounts,
    binary_kl,
    clipped_surrogate_loss,
    dppo_kl_loss,
    dppo_tv_loss,
    gspo_loss,
    rloo_loss,
    sapo_loss,
)
from posttrain.ops.advantages import rloo_advantages

F64 = torch.float64


def from_log_ratios(log_ratios, old=-1.0):
    """logps with log π − log π_old = `log_ratios` (NaN = padding), old_logps, mask."""
    lr = torch.tensor(log_ratios, dtype=F64)
    mask = ~lr.isnan()
    old_logps = torch.full_like(lr, old)
    logps = torch.where(mask, old + lr.nan_to_num(0.0), 0.0).requires_grad_()
    return logps, old_logps, mask


def test_gspo_hand_values_on_a_ragged_batch():
    # seq 0: log ratios 0.1, −0.3 → s = e^{−0.1} = 0.904837, Â = +1 (inside the band ε = 0.2)
    # seq 1: log ratios 0.2, 0.2, 0.5 → s = e^{0.3} = 1.349859, Â = −1 (above 1 + ε, but Â < 0: not clipped)
    logps, old, mask = from_log_ratios([[0.1, -0.3, math.nan], [0.2, 0.2, 0.5]])
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    out = gspo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    s0, s1 = math.exp(-0.1), math.exp(0.3)
    assert out.loss.item() == pytest.approx((-s0 + s1) / 2, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logps)
    # ∇ (1/G) Σ −s_i Â_i = −(1/G) Â_i s_i (1/|y_i|) per token
    expected = torch.tensor([[-0.5 * s0 / 2, -0.5 * s0 / 2, 0.0], [0.5 * s1 / 3] * 3], dtype=F64)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert out.clip_frac.item() == 0.0
    # Â = +1 on seq 1: s > 1 + ε, so the whole sequence is clipped: value −(1 + ε), no gradient
    out = gspo_loss(logps, old, torch.tensor([1.0, 1.0], dtype=F64), mask, epsilon_low=0.2, epsilon_high=0.2)
    assert out.loss.item() == pytest.approx((-s0 - 1.2) / 2, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logps)
    assert (grad[1] == 0).all() and (grad[0, :2] != 0).all()
    assert out.clip_frac_high.item() == pytest.approx(3 / 5) and out.clip_frac_low.item() == 0.0


def test_gspo_with_one_token_is_the_token_level_clip():
    g = torch.Generator().manual_seed(0)
    lr = 0.4 * torch.randn(6, 3, generator=g, dtype=F64)
    mask = torch.zeros(6, 3, dtype=torch.bool)
    mask[:, 0] = True
    base = (lr - 1.0)
    adv = torch.randn(6, generator=g, dtype=F64)
    old = torch.full_like(lr, -1.0)
    for eps in (0.2, 3e-4):
        a = base.clone().requires_grad_()
        b = base.clone().requires_grad_()
        ga = gspo_loss(a, old, adv, mask, epsilon_low=eps, epsilon_high=eps)
        tok = clipped_surrogate_loss(b, old, adv, mask, epsilon_low=eps, epsilon_high=eps, aggregation="sample")
        assert ga.loss.item() == pytest.approx(tok.loss.item(), abs=1e-12)
        torch.testing.assert_close(torch.autograd.grad(ga.loss, a)[0], torch.autograd.grad(tok.loss, b)[0])
        assert ga.clip_frac.item() == pytest.approx(tok.clip_frac.item())


def _sequence_reference(logps, old, adv, mask, eps, geometric):
    """The papers' sequence-level objectives written directly on per-sequence ratios."""
    log_ratio = ((logps - old) * mask).sum(1)
    if geometric:
        log_ratio = log_ratio / mask.sum(1)
    s = torch.exp(log_ratio)
    return (-torch.minimum(s * adv, s.clamp(1 - eps, 1 + eps) * adv)).mean()


@pytest.mark.parametrize("fn, geometric", [(gspo_loss, True), (rloo_loss, False)])
def test_sequence_losses_match_the_direct_sequence_formula(fn, geometric):
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([4, 1, 3, 2, 4])
    mask = torch.arange(4)[None] < lengths[:, None]
    old = -torch.rand(5, 4, generator=g, dtype=F64) * 2
    base = old + 0.15 * torch.randn(5, 4, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -2.0, 0.5, -0.5, 1.5], dtype=F64)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = fn(a, old, adv, mask, epsilon_low=0.1, epsilon_high=0.1)
    ref = _sequence_reference(b, old, adv, mask.to(F64), 0.1, geometric)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.loss, a)[0], torch.autograd.grad(ref, b)[0],
                               atol=1e-12, rtol=0)


def test_rloo_first_update_is_reinforce_with_the_leave_one_out_baseline():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=F64)
    adv = rloo_advantages(rewards).view(-1)
    # Â_i = r_i − mean of the other three: 1 − 1/3, 0 − 2/3, 0 − 2/3, 1 − 1/3
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=F64))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]).bool()
    logps = torch.randn(4, 3, dtype=F64).requires_grad_()
    out = POLICY_LOSSES["rloo"](logps, logps.detach(), adv, mask)
    (grad,) = torch.autograd.grad(out.loss, logps)
    # ∇L = −1/N Σ_i Â_i ∇ log π(y_i), log π(y_i) = Σ_t log π(y_t): every token of sequence i gets −Â_i / N
    torch.testing.assert_close(grad, -(adv / 4)[:, None] * mask.to(F64))
    assert POLICY_LOSSES["rloo"].advantage_estimator == "rloo"


def test_sapo_hand_values_gate_and_temperatures():
    # one token per sequence; ρ = 1.5 with Â = +2 (τ_pos = 1), ρ = 0.5 with Â = −1 (τ_neg = 1.05)
    logps, old, mask = from_log_ratios([[math.log(1.5)], [math.log(0.5)]])
    adv = torch.tensor([2.0, -1.0], dtype=F64)
    out = sapo_loss(logps, old, adv, mask)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    f0 = sig(1.0 * 0.5) * 4 / 1.0
    f1 = sig(1.05 * -0.5) * 4 / 1.05
    assert out.loss.item() == pytest.approx((-f0 * 2 + f1 * 1) / 2, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, logps)
    # d f/d log π = 4 σ (1 − σ) ρ
    w0 = 4 * sig(0.5) * (1 - sig(0.5)) * 1.5
    w1 = 4 * sig(-0.525) * (1 - sig(-0.525)) * 0.5
    torch.testing.assert_close(grad, torch.tensor([[-w0 * 2 / 2], [w1 * 1 / 2]], dtype=F64), atol=1e-12, rtol=0)


def test_sapo_on_policy_gradient_equals_grpo():
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]).bool()
    base = torch.randn(3, 3, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -0.5, 0.0], dtype=F64)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    sapo = sapo_loss(a, base, adv, mask)
    grpo = POLICY_LOSSES["grpo"](b, base, adv, mask)
    torch.testing.assert_close(torch.autograd.grad(sapo.loss, a)[0], torch.autograd.grad(grpo.loss, b)[0])
    assert sapo.clip_frac.item() == 0.0


def test_dppo_tv_masks_only_tokens_leaving_the_region_in_the_advantage_direction():
    # μ → π per token: 0.5 → 0.7 (TV +0.2), 0.5 → 0.3 (−0.2), 1e-5 → 1e-3 (ratio 100, TV ≈ 0.001), 0.4 → 0.45
    mu = torch.tensor([[0.5, 0.5, 1e-5, 0.4]], dtype=F64)
    pi = torch.tensor([[0.7, 0.3, 1e-3, 0.45]], dtype=F64)
    old = mu.log()
    for sign in (1.0, -1.0):
        logps = pi.log().requires_grad_()
        adv = torch.tensor([sign], dtype=F64)
        mask = torch.ones(1, 4, dtype=torch.bool)
        out = dppo_tv_loss(logps, old, adv, mask)
        keep = torch.tensor([[sign < 0, sign > 0, True, True]], dtype=F64)  # Â > 0 masks the up-move, Â < 0 the down
        weight = torch.tensor([[0.7 / 0.5, 0.3 / 0.5, 10.0, 0.45 / 0.4]], dtype=F64)  # min(ρ, C = 10)
        expected = -(keep * weight * sign * pi.log()).sum() / 4
        assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
        (grad,) = torch.autograd.grad(out.loss, logps)
        torch.testing.assert_close(grad, -(keep * weight * sign) / 4, atol=1e-12, rtol=0)
        assert out.clip_frac.item() == pytest.approx(0.25)
        assert (out.clip_frac_high if sign > 0 else out.clip_frac_low).item() == pytest.approx(0.25)
    # PPO's ratio clip would have cut the rare token (ρ = 100); DPPO keeps it
    logps = pi.log().requires_grad_()
    ppo = clipped_surrogate_loss(logps, old, torch.tensor([1.0], dtype=F64), torch.ones(1, 4, dtype=torch.bool),
                                 aggregation="token")
    assert torch.autograd.grad(ppo.loss, logps)[0][0, 2] == 0


def test_binary_kl_hand_values_and_dppo_kl_mask():
    mu = torch.tensor([0.5, 0.5, 0.5], dtype=F64)
    pi = torch.tensor([0.7, 0.55, 0.3], dtype=F64)
    kl = binary_kl(pi.log(), mu.log())
    expected = [0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p)) for p in (0.7, 0.55, 0.3)]
    torch.testing.assert_close(kl, torch.tensor(expected, dtype=F64), atol=1e-14, rtol=0)
    assert kl[0].item() == pytest.approx(0.087177, abs=1e-6) and kl[1].item() == pytest.approx(0.0050252, abs=1e-6)
    # δ = 0.05: Â > 0 masks token 0 (moved up, KL 0.087) only; Â < 0 masks token 2 (moved down, KL 0.087) only
    for sign, masked in ((1.0, 0), (-1.0, 2)):
        logps = pi.log()[None].clone().requires_grad_()
        out = dppo_kl_loss(logps, mu.log()[None], torch.tensor([sign], dtype=F64), torch.ones(1, 3, dtype=torch.bool))
        (grad,) = torch.autograd.grad(out.loss, logps)
        assert grad[0, masked] == 0 and (grad[0, [i for i in range(3) if i != masked]] != 0).all()


def test_stop_gradients():
    """Gradients flow only through log π_θ: not through old log-probs, advantages or (GSPO) the sequence ratio's
    value."""
    g = torch.Generator().manual_seed(7)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    for name in ("gspo", "rloo", "sapo", "dppo_tv", "dppo_kl"):
        logps = (torch.randn(2, 3, generator=g, dtype=F64) - 1).requires_grad_()
        old = (logps.detach() + 0.05 * torch.randn(2, 3, generator=g, dtype=F64)).requires_grad_()
        adv = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)
        wide = {"epsilon_low": 0.5, "epsilon_high": 0.5} if name in ("gspo", "rloo") else {}
        out = POLICY_LOSSES[name](logps, old, adv, mask, **wide)
        grads = torch.autograd.grad(out.loss, [logps, old, adv], allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0, name
        assert grads[1] is None or (grads[1] == 0).all(), name
        assert grads[2] is None or (grads[2] == 0).all(), name


def random_batch(P=4, G=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 3, 2, 5, 2, 4, 6])
    mask = torch.arange(T)[None] < lengths[:, None]
    base = torch.randn(P * G, T, generator=g, dtype=F64) - 1.5
    old = base + 0.2 * torch.randn(P * G, T, generator=g, dtype=F64)
    ref = base + 0.2 * torch.randn(P * G, T, generator=g, dtype=F64)
    adv = torch.randn(P * G, generator=g, dtype=F64)
    return base, old, ref, adv, mask


@pytest.mark.parametrize("name", ["gspo", "rloo", "sapo", "dppo_tv", "dppo_kl"])
def test_micro_batches_with_global_counts_equal_full_batch(name):
    base, old, ref, adv, mask = random_batch()
    kw = {"group_size": 2, "max_length": 6, "kl_coef": 0.05, "ref_logps": None}

    def run(rows, counts):
        theta = base.clone().requires_grad_()
        total = 0.0
        for idx in rows:
            out = POLICY_LOSSES[name](theta[idx], old[idx], adv[idx], mask[idx], counts=counts,
                                      **{**kw, "ref_logps": ref[idx]})
            total = total + out.loss
        return total.item(), torch.autograd.grad(total, theta)[0]

    full_loss, full_grad = run([torch.arange(8)], None)
    micro_loss, micro_grad = run(torch.arange(8).chunk(4), GlobalCounts.from_mask(mask, group_size=2))
    assert micro_loss == pytest.approx(full_loss, abs=1e-10)
    torch.testing.assert_close(micro_grad, full_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["gspo", "rloo", "sapo", "dppo_tv", "dppo_kl"])
def test_padding_garbage_changes_nothing(name):
    base, old, ref, adv, mask = random_batch()
    results = []
    for fill in (0.0, float("inf"), float("nan"), -1e4):
        theta = base.clone().requires_grad_()
        logps = theta + torch.where(mask, 0.0, fill)
        out = POLICY_LOSSES[name](logps, torch.where(mask, old, fill), adv, mask, ref_logps=torch.where(mask, ref, fill),
                                  kl_coef=0.1)
        (grad,) = torch.autograd.grad(out.loss, theta)
        assert math.isfinite(out.loss.item()) and torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()
        results.append((out.loss.item(), grad))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-12)
        torch.testing.assert_close(grad, results[0][1])


def test_sequence_losses_refuse_per_token_advantages():
    base, old, _, _, mask = random_batch()
    with pytest.raises(ValueError, match="one advantage per sequence"):
        gspo_loss(base, old, torch.zeros_like(base), mask)

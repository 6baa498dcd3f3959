"""SimPO, ORPO, length-averaged IPO and KTO: hand-worked values and gradients from each paper's formula, limits,
stop-gradients and micro-batch exactness."""

import math

import pytest
import torch

from posttrain.losses.dpo import (
    DEFAULT_BETA,
    DPO_LOSSES,
    REFERENCE_FREE,
    dpo_loss,
    ipo_length_averaged_loss,
    ipo_loss,
    log_odds,
    orpo_loss,
    simpo_loss,
)
from posttrain.losses.kto import kto_loss, kto_reference_point

F64 = torch.float64


def sig(x):
    return 1 / (1 + math.exp(-x))


def t(values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def test_simpo_hand_value_and_gradient():
    # log π(y_w) = −4 over 2 tokens, log π(y_l) = −9 over 3 tokens, β = 2, γ = 0.5 β = 1:
    # rewards 2·(−2) = −4 and 2·(−3) = −6; logit −4 + 6 − 1 = 1; L = −log σ(1)
    pc, pr = t([-4.0], True), t([-9.0], True)
    out = simpo_loss(pc, pr, t([-100.0]), t([5.0]), beta=2.0, chosen_token_counts=torch.tensor([2]),
                     rejected_token_counts=torch.tensor([3]))
    assert out.loss.item() == pytest.approx(-math.log(sig(1.0)), abs=1e-12)
    gc, gr = torch.autograd.grad(out.loss, (pc, pr))
    # ∂L/∂log π(y_w) = −σ(−1) β/|y_w|,  ∂L/∂log π(y_l) = +σ(−1) β/|y_l|
    assert gc.item() == pytest.approx(-sig(-1.0) * 2 / 2, abs=1e-12)
    assert gr.item() == pytest.approx(sig(-1.0) * 2 / 3, abs=1e-12)
    assert out.chosen_rewards.item() == -4.0 and out.margins.item() == 2.0 and out.accuracy.item() == 1.0


def test_simpo_without_margin_is_dpo_on_average_logps_with_no_reference():
    g = torch.Generator().manual_seed(0)
    pc, pr = -torch.rand(5, generator=g, dtype=F64) * 30, -torch.rand(5, generator=g, dtype=F64) * 30
    nc, nr = torch.randint(1, 20, (5,), generator=g), torch.randint(1, 20, (5,), generator=g)
    rc, rr = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    simpo = simpo_loss(pc, pr, rc, rr, beta=2.0, gamma_beta_ratio=0.0, chosen_token_counts=nc,
                       rejected_token_counts=nr)
    zero = torch.zeros(5, dtype=F64)
    dpo = dpo_loss(pc / nc, pr / nr, zero, zero, beta=2.0)
    assert simpo.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
    # and the reference log-probs do not enter the loss
    other = simpo_loss(pc, pr, rc + 7, rr - 3, beta=2.0, gamma_beta_ratio=0.0, chosen_token_counts=nc,
                       rejected_token_counts=nr)
    assert other.loss.item() == simpo.loss.item()
    assert {"simpo", "orpo"} == set(REFERENCE_FREE) and DEFAULT_BETA["simpo"] == 2.0


def test_orpo_hand_value_and_gradient():
    # chosen: log π = −1.0 over 2 tokens (mean −0.5); rejected: −4.5 over 3 tokens (mean −1.5); λ = 0.1
    pc, pr = t([-1.0], True), t([-4.5], True)
    out = orpo_loss(pc, pr, t([0.0]), t([0.0]), beta=0.1, chosen_token_counts=torch.tensor([2]),
                    rejected_token_counts=torch.tensor([3]))
    Pw, Pl = math.exp(-0.5), math.exp(-1.5)
    log_or = math.log(Pw / (1 - Pw)) - math.log(Pl / (1 - Pl))
    nll = 1.0 / 2  # −log π(y_w) / |y_w|
    assert out.loss.item() == pytest.approx(nll - 0.1 * math.log(sig(log_or)), abs=1e-12)
    gc, gr = torch.autograd.grad(out.loss, (pc, pr))
    # d log odds / d mean = 1 / (1 − P); d mean / d log π = 1/|y|
    dlor_w = 1 / (1 - Pw) / 2
    dlor_l = -1 / (1 - Pl) / 3
    assert gc.item() == pytest.approx(-1 / 2 - 0.1 * sig(-log_or) * dlor_w, abs=1e-12)
    assert gr.item() == pytest.approx(-0.1 * sig(-log_or) * dlor_l, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * -0.5)


def test_log_odds_is_exact_near_probability_one():
    tiny = t([-1e-12])
    assert log_odds(tiny).item() == pytest.approx(-1e-12 - math.log(1e-12), rel=1e-9)


def test_orpo_against_trl_formula():
    """TRL's ORPOTrainer.odds_ratio_loss (trl.experimental), on the same average log-probs."""
    orpo_mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(2)
    nc, nr = torch.randint(1, 9, (4,), generator=g), torch.randint(1, 9, (4,), generator=g)
    pc, pr = -torch.rand(4, generator=g, dtype=F64) * nc, -torch.rand(4, generator=g, dtype=F64) * nr * 2
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses = orpo_mod.ORPOTrainer.odds_ratio_loss(fake, pc / nc, pr / nr)[0]
    ours = orpo_loss(pc, pr, pc * 0, pr * 0, beta=0.1, chosen_token_counts=nc, rejected_token_counts=nr)
    nll = -pc.sum() / nc.sum()
    # TRL returns λ log σ(·) per pair (its loss is NLL − mean); it computes in float32
    assert (ours.loss - nll).item() == pytest.approx(-trl_losses.mean().item(), abs=1e-6)


def test_ipo_length_averaged_hand_value_and_limits():
    # h̄ = (−2 − −1)/2 − (−6 − −3)/3 = −0.5 + 1 = 0.5; τ = 0.25 → (0.5 − 2)² = 2.25
    pc, pr, rc, rr = t([-2.0], True), t([-6.0]), t([-1.0]), t([-3.0])
    out = ipo_length_averaged_loss(pc, pr, rc, rr, beta=0.25, chosen_token_counts=torch.tensor([2]),
                                   rejected_token_counts=torch.tensor([3]))
    assert out.loss.item() == pytest.approx(2.25, abs=1e-12)
    (gc,) = torch.autograd.grad(out.loss, pc)
    assert gc.item() == pytest.approx(2 * (0.5 - 2) / 2, abs=1e-12)
    ones = torch.ones(1, dtype=torch.long)
    assert ipo_length_averaged_loss(pc, pr, rc, rr, beta=0.25, chosen_token_counts=ones,
                                    rejected_token_counts=ones).loss.item() == pytest.approx(
        ipo_loss(pc, pr, rc, rr, beta=0.25).loss.item())
    assert DPO_LOSSES["ipo_avg"] is ipo_length_averaged_loss
    with pytest.raises(ValueError, match="token_counts"):
        ipo_length_averaged_loss(pc, pr, rc, rr, beta=0.25)


def test_kto_hand_values_and_gradients():
    # two desirable (r = 1, −1), one undesirable (r = 2); z_0 = 0.5, β = 0.5, λ_D = 1, λ_U = 2
    policy = t([-1.0, -3.0, -2.0], True)
    ref = t([-2.0, -2.0, -4.0])
    desirable = torch.tensor([True, True, False])
    out = kto_loss(policy, ref, desirable, 0.5, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    v = [sig(0.5 * (1 - 0.5)), sig(0.5 * (-1 - 0.5)), 2 * sig(0.5 * (0.5 - 2))]
    expected = ((1 - v[0]) + (1 - v[1]) + (2 - v[2])) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, policy)
    # d/dr [λ − λσ(β(r − z))] = −λβσ(1−σ) (desirable); d/dr [λ − λσ(β(z − r))] = +λβσ(1−σ) (undesirable)
    s = [sig(0.25), sig(-0.75), sig(-0.75)]
    want = [-0.5 * s[0] * (1 - s[0]) / 3, -0.5 * s[1] * (1 - s[1]) / 3, 2 * 0.5 * s[2] * (1 - s[2]) / 3]
    torch.testing.assert_close(grad, t(want), atol=1e-12, rtol=0)
    assert out.rewards.tolist() == pytest.approx([0.5, -0.5, 1.0])
    m = out.metrics()
    assert m["rewards/chosen"] == pytest.approx(0.0) and m["rewards/rejected"] == pytest.approx(1.0)


def test_kto_balanced_data_at_the_reference():
    """π_θ = π_ref, z_0 = 0, balanced labels, λ_D = λ_U: every example's loss is λ/2 and its gradient ∓λβ/(4B);
    flipping every label and every log-ratio leaves the loss unchanged (the value function is symmetric)."""
    B = 6
    policy = torch.linspace(-8, -2, B, dtype=F64).requires_grad_()
    desirable = torch.tensor([True, False] * 3)
    out = kto_loss(policy, policy.detach(), desirable, 0.0, beta=0.1)
    assert out.loss.item() == pytest.approx(0.5, abs=1e-12)
    (grad,) = torch.autograd.grad(out.loss, policy)
    torch.testing.assert_close(grad, torch.where(desirable, -0.1 / 4 / B, 0.1 / 4 / B).to(F64))
    g = torch.Generator().manual_seed(4)
    r = torch.randn(B, generator=g, dtype=F64)
    a = kto_loss(r, torch.zeros(B, dtype=F64), desirable, 0.0, beta=0.3).loss
    b = kto_loss(-r, torch.zeros(B, dtype=F64), ~desirable, 0.0, beta=0.3).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_kto_reference_point_is_clamped_mean_and_detached():
    p = t([-1.0, -2.0, -3.0], True)
    r = t([-2.0, -2.0, -2.0])
    z0 = kto_reference_point(p, r)
    assert z0.item() == pytest.approx(0.0) and not z0.requires_grad  # mean 0 → max(0, 0)
    assert kto_reference_point(p, r - 1).item() == pytest.approx(1.0)
    assert kto_reference_point(p, r + 5).item() == 0.0  # negative KL estimate clamps to 0
    # a reference point that requires grad does not pass it on
    z = torch.tensor(0.3, dtype=F64, requires_grad=True)
    out = kto_loss(p, r, torch.tensor([True, False, True]), z)
    assert torch.autograd.grad(out.loss, z, allow_unused=True)[0] is None


def test_kto_micro_batches_with_global_count_equal_full_batch():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(8, generator=g, dtype=F64) - 5
    ref = base + 0.3 * torch.randn(8, generator=g, dtype=F64)
    desirable = torch.rand(8, generator=g) > 0.4
    theta = base.clone().requires_grad_()
    full = kto_loss(theta, ref, desirable, 0.2, beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    (full_grad,) = torch.autograd.grad(full.loss, theta)
    theta2 = base.clone().requires_grad_()
    total = sum(kto_loss(theta2[i], ref[i], desirable[i], 0.2, beta=0.1, desirable_weight=1.0,
                         undesirable_weight=1.33, global_count=8).loss for i in torch.arange(8).chunk(3))
    assert total.item() == pytest.approx(full.loss.item(), abs=1e-12)
    torch.testing.assert_close(torch.autograd.grad(total, theta2)[0], full_grad)

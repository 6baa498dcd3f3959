"""DPO and its variants against hand-worked numbers, autograd against the derived gradient, and the log 2 invariant."""

import math

import pytest
import torch

from posttrain.losses.dpo import DPO_LOSSES, dpo_loss, hinge_loss, idea0_loss, idea1_loss, ipo_loss


def pairs(requires_grad=True):
    """Two pairs: pair 0 ranked right by the policy (h = 2), pair 1 ranked wrong (h = −1)."""
    pc = torch.tensor([-10.0, -5.0], dtype=torch.float64, requires_grad=requires_grad)
    pr = torch.tensor([-12.0, -4.0], dtype=torch.float64, requires_grad=requires_grad)
    rc = torch.tensor([-11.0, -5.0], dtype=torch.float64)
    rr = torch.tensor([-11.0, -5.0], dtype=torch.float64)
    return pc, pr, rc, rr


def test_dpo_is_log2_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    logps_c = -torch.rand(8, generator=g) * 50
    logps_r = -torch.rand(8, generator=g) * 50
    for smoothing in (0.0, 0.1, 0.3):
        out = dpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=0.1, label_smoothing=smoothing)
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert torch.equal(out.margins, torch.zeros(8))
        assert torch.equal(out.accuracy, torch.zeros(8))  # ties are not counted as correct


def test_dpo_hand_values_and_metrics():
    pc, pr, rc, rr = pairs()
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: βh = 0.2 → log(1 + e^-0.2) = 0.5981388693; pair 1: βh = -0.1 → log(1 + e^0.1) = 0.7443966600
    assert out.loss.item() == pytest.approx((0.5981388693 + 0.7443966600) / 2, abs=1e-9)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1, 0.1], dtype=torch.float64))
    torch.testing.assert_close(out.margins, torch.tensor([0.2, -0.1], dtype=torch.float64))
    torch.testing.assert_close(out.accuracy, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert out.metrics()["rewards/accuracies"] == 0.5
    assert out.metrics()["logps/chosen"] == -7.5
    assert out.chosen_rewards.shape == (2,) and not out.chosen_rewards.requires_grad


def test_dpo_gradient_weight_is_sigmoid_of_reward_gap():
    pc, pr, rc, rr = pairs()
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    grad_c, grad_r = torch.autograd.grad(out.loss, (pc, pr))
    # hand: σ(-0.2) = 0.4501660027, σ(0.1) = 0.5249791875; ∂L/∂log π(y_w) = -β σ(r̂_l - r̂_w) / B
    torch.testing.assert_close(grad_c, torch.tensor([-0.02250830014, -0.02624895938], dtype=torch.float64))
    # the notes' form, from the returned implicit rewards
    weight = torch.sigmoid(out.rejected_rewards - out.chosen_rewards)
    torch.testing.assert_close(grad_c, -0.1 * weight / 2)
    torch.testing.assert_close(grad_r, 0.1 * weight / 2)
    # the wrongly ranked pair gets the larger weight
    assert weight[1] > weight[0]


def test_conservative_dpo_hand_value_and_gradient():
    pc, pr, rc, rr = pairs()
    eps = 0.1
    out = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1, label_smoothing=eps)
    # 0.9 * log(1+e^-0.2) + 0.1 * log(1+e^0.2) = 0.9 * 0.5981388693 + 0.1 * 0.7981388693
    assert out.loss.item() == pytest.approx(0.6181388693, abs=1e-9)
    (grad_c,) = torch.autograd.grad(out.loss, pc)
    # ∂L/∂h = -β[(1-ε)σ(-βh) - εσ(βh)] = -0.1 * (0.9 * 0.4501660027 - 0.1 * 0.5498339973)
    assert grad_c[0].item() == pytest.approx(-0.1 * (0.9 * 0.4501660027 - 0.1 * 0.5498339973), abs=1e-9)


def test_ipo_hand_values_and_gradient():
    pc, pr, rc, rr = pairs()
    out = ipo_loss(pc, pr, rc, rr, beta=0.1)
    # target 1/(2β) = 5: (2 - 5)^2 = 9, (-1 - 5)^2 = 36
    assert out.loss.item() == pytest.approx(22.5, abs=1e-9)
    (grad_c,) = torch.autograd.grad(out.loss, pc)
    torch.testing.assert_close(grad_c, torch.tensor([-3.0, -6.0], dtype=torch.float64))  # 2(h - 5)/B


def test_hinge_hand_values_and_gradient():
    pc, pr, rc, rr = pairs()
    assert hinge_loss(pc, pr, rc, rr, beta=0.1).loss.item() == pytest.approx((0.8 + 1.1) / 2, abs=1e-12)
    out = hinge_loss(pc, pr, rc, rr, beta=1.0)  # pair 0: relu(1 - 2) = 0, pair 1: relu(1 + 1) = 2
    assert out.loss.item() == pytest.approx(1.0, abs=1e-12)
    (grad_c,) = torch.autograd.grad(out.loss, pc)
    torch.testing.assert_close(grad_c, torch.tensor([0.0, -0.5], dtype=torch.float64))


def test_idea0_hand_value_and_constant_gradient():
    pc, pr, rc, rr = pairs()
    out = idea0_loss(pc, pr, rc, rr, beta=0.1)
    assert out.loss.item() == pytest.approx(-0.5, abs=1e-12)  # -((−10+12) + (−5+4)) / 2
    grads = torch.autograd.grad(out.loss, (pc, pr))
    # a very different point (pair 0 already ranked right by 1000 nats) gets the very same gradient: no weighting
    pc2 = torch.tensor([-1.0, -300.0], dtype=torch.float64, requires_grad=True)
    pr2 = torch.tensor([-1001.0, -2.0], dtype=torch.float64, requires_grad=True)
    grads2 = torch.autograd.grad(idea0_loss(pc2, pr2, rc, rr, beta=0.1).loss, (pc2, pr2))
    for g, g2, sign in zip(grads, grads2, (-1, 1)):
        torch.testing.assert_close(g, torch.full((2,), sign / 2, dtype=torch.float64))
        torch.testing.assert_close(g2, g)


def test_idea1_is_nll_of_chosen_sequence_or_token_mean():
    pc, pr, rc, rr = pairs()
    assert idea1_loss(pc, pr, rc, rr, beta=0.1).loss.item() == pytest.approx(7.5)  # mean(10, 5)
    counts = torch.tensor([5, 3])
    out = idea1_loss(pc, pr, rc, rr, beta=0.1, chosen_token_counts=counts)
    assert out.loss.item() == pytest.approx(15 / 8)
    (grad_r,) = torch.autograd.grad(out.loss, pr, allow_unused=True, materialize_grads=True)
    assert torch.equal(grad_r, torch.zeros(2, dtype=torch.float64))  # losers are ignored
    out = idea1_loss(pc, pr, rc, rr, beta=0.1, chosen_token_counts=counts, global_chosen_token_count=16)
    assert out.loss.item() == pytest.approx(15 / 16)


def test_label_smoothing_only_for_sigmoid():
    pc, pr, rc, rr = pairs(requires_grad=False)
    for name in ("ipo", "hinge", "idea0", "idea1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            DPO_LOSSES[name](pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
def test_global_pair_count_makes_micro_batches_exact(name):
    g = torch.Generator().manual_seed(1)
    B = 8
    pc = (-torch.rand(B, generator=g, dtype=torch.float64) * 20).requires_grad_()
    pr = (-torch.rand(B, generator=g, dtype=torch.float64) * 20).requires_grad_()
    rc = -torch.rand(B, generator=g, dtype=torch.float64) * 20
    rr = -torch.rand(B, generator=g, dtype=torch.float64) * 20
    counts = torch.randint(1, 30, (B,), generator=g)
    rejected_counts = torch.randint(1, 30, (B,), generator=g)
    fn = DPO_LOSSES[name]
    kw = dict(beta=0.5, chosen_token_counts=counts, rejected_token_counts=rejected_counts)
    full = fn(pc, pr, rc, rr, **kw).loss
    full_grads = torch.autograd.grad(full, (pc, pr), allow_unused=True, materialize_grads=True)
    for n_micro in (2, 4):
        total = 0.0
        for idx in torch.arange(B).chunk(n_micro):
            total = total + fn(
                pc[idx], pr[idx], rc[idx], rr[idx], beta=0.5, chosen_token_counts=counts[idx],
                rejected_token_counts=rejected_counts[idx], global_pair_count=B,
                global_chosen_token_count=counts.sum(),
            ).loss
        grads = torch.autograd.grad(total, (pc, pr), allow_unused=True, materialize_grads=True)
        assert total.item() == pytest.approx(full.item(), abs=1e-6)
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_dict_names():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "unweighted", "preferred_ft", "idea0", "idea1", "ipo_avg",
                               "simpo", "orpo"}
    assert DPO_LOSSES["idea0"] is DPO_LOSSES["unweighted"] and DPO_LOSSES["idea1"] is DPO_LOSSES["preferred_ft"]
    assert DPO_LOSSES["sigmoid"] is dpo_loss

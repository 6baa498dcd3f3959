"""Bradley–Terry reward loss on hand-made scores."""

import pytest
import torch

from posttrain.losses.reward import bradley_terry_loss


def scores():
    chosen = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([1.0, 1.5, -1.0], dtype=torch.float64, requires_grad=True)
    return chosen, rejected


def test_bradley_terry_hand_values():
    chosen, rejected = scores()
    out = bradley_terry_loss(chosen, rejected)
    # Δ = [1, -1, 0]: log(1+e^-1) = 0.3132616875, log(1+e^1) = 1.3132616875, log 2 = 0.6931471806
    assert out.loss.item() == pytest.approx((0.3132616875 + 1.3132616875 + 0.6931471806) / 3, abs=1e-9)
    torch.testing.assert_close(out.accuracy, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert out.metrics()["accuracy"] == pytest.approx(1 / 3)
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    grad_c, grad_r = torch.autograd.grad(out.loss, (chosen, rejected))
    # ∂L/∂r_w = -σ(-Δ)/B: σ(-1) = 0.2689414214, σ(1) = 0.7310585786, σ(0) = 0.5
    torch.testing.assert_close(grad_c, -torch.tensor([0.2689414214, 0.7310585786, 0.5], dtype=torch.float64) / 3)
    torch.testing.assert_close(grad_r, -grad_c)


def test_bradley_terry_margin_and_centering():
    chosen, rejected = scores()
    out = bradley_terry_loss(chosen, rejected, margin=0.5)
    # Δ - m = [0.5, -1.5, -0.5]: 0.4740769842, 1.7014132779, 0.9740769842
    assert out.loss.item() == pytest.approx((0.4740769842 + 1.7014132779 + 0.9740769842) / 3, abs=1e-9)
    per_pair_margin = torch.tensor([0.0, -2.0, 0.0], dtype=torch.float64)  # Δ - m = [1, 1, 0]
    out = bradley_terry_loss(chosen, rejected, margin=per_pair_margin)
    assert out.loss.item() == pytest.approx((2 * 0.3132616875 + 0.6931471806) / 3, abs=1e-9)
    out = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    # (r_w + r_l)^2 = [9, 4, 4]
    expected = (0.3132616875 + 1.3132616875 + 0.6931471806 + 0.01 * 17) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)


def test_bradley_terry_global_pair_count():
    chosen, rejected = scores()
    full = bradley_terry_loss(chosen, rejected).loss
    parts = bradley_terry_loss(chosen[:2], rejected[:2], global_pair_count=3).loss + bradley_terry_loss(
        chosen[2:], rejected[2:], global_pair_count=3
    ).loss
    assert parts.item() == pytest.approx(full.item(), abs=1e-12)

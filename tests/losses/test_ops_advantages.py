"""Advantage estimators against hand-computed values and plain Python loops; GAE against a per-sequence loop."""

import pytest
import torch

from posttrain.ops.advantages import (
    ADVANTAGE_ESTIMATORS,
    batch_normalized_advantages,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    rloo_advantages,
    zero_variance_groups,
)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)


def test_grpo_hand_values_flat_and_grouped():
    adv = grpo_advantages(REWARDS, eps=0.0 + 1e-12)
    # group 0: mean 0.5, unbiased std sqrt(1/3) → ±0.5·sqrt(3) = ±0.8660254038
    torch.testing.assert_close(adv[0], torch.tensor([1, -1, -1, 1], dtype=torch.float64) * 0.8660254038)
    assert torch.equal(adv[1:], torch.zeros(2, 4, dtype=torch.float64))  # equal rewards → exactly 0
    flat = grpo_advantages(REWARDS.flatten(), group_size=4, eps=1e-12)
    assert flat.shape == (12,)
    torch.testing.assert_close(flat.view(3, 4), adv)


def test_zero_variance_groups_flagged():
    assert zero_variance_groups(REWARDS).tolist() == [False, True, True]
    assert zero_variance_groups(REWARDS.flatten(), group_size=4).tolist() == [False, True, True]
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        adv = fn(REWARDS, 4)
        assert torch.equal(adv[zero_variance_groups(REWARDS)], torch.zeros(2, 4, dtype=torch.float64)), name


def test_dr_grpo_is_mean_only():
    torch.testing.assert_close(
        dr_grpo_advantages(REWARDS)[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64)
    )


def test_batch_normalized_hand_values_and_loop():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    adv = batch_normalized_advantages(rewards, eps=0.0)
    # centred: [.75, -.25, -.25, -.25], [.25, .25, -.75, .25]; batch std = sqrt(1.5/7) = 0.4629100499
    assert adv[0, 0].item() == pytest.approx(0.75 / 0.4629100499, abs=1e-9)
    assert adv[1, 2].item() == pytest.approx(-0.75 / 0.4629100499, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 6, generator=g, dtype=torch.float64)
    centred = [[r[b, i] - sum(r[b].tolist()) / 6 for i in range(6)] for b in range(5)]
    values = [c for row in centred for c in row]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    expected = torch.tensor([[c / (std + 1e-6) for c in row] for row in centred], dtype=torch.float64)
    torch.testing.assert_close(batch_normalized_advantages(r), expected)


def test_rloo_hand_values_and_loop():
    torch.testing.assert_close(rloo_advantages(REWARDS)[0], torch.tensor([2, -2, -2, 2], dtype=torch.float64) / 3)
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 5, generator=g, dtype=torch.float64)
    expected = torch.tensor(
        [[r[b, i].item() - sum(r[b, j].item() for j in range(5) if j != i) / 4 for i in range(5)] for b in range(4)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(rloo_advantages(r), expected)
    torch.testing.assert_close(rloo_advantages(r.flatten(), group_size=5), expected.flatten())


def test_grpo_matches_loop():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(3, 7, generator=g, dtype=torch.float64)
    rows = []
    for b in range(3):
        vals = r[b].tolist()
        mean = sum(vals) / 7
        std = (sum((v - mean) ** 2 for v in vals) / 6) ** 0.5
        rows.append([(v - mean) / (std + 1e-6) for v in vals])
    torch.testing.assert_close(grpo_advantages(r), torch.tensor(rows, dtype=torch.float64))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(6))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(3, 1))


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.9]])  # the last position is padding: its value must not leak
    mask = torch.tensor([[1, 1, 1, 0]])
    out = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # Â_t = Σ r - V_t (Monte-Carlo return minus baseline)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.5, 0.4, 0.3, 0.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    out = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # δ = [0.9·0.6 - 0.5, 0.9·0.7 - 0.6, 1 - 0.7] = [0.04, 0.03, 0.3]; Â_2 = 0.3, Â_1 = 0.03 + 0.45·0.3, ...
    torch.testing.assert_close(out.advantages, torch.tensor([[0.11425, 0.165, 0.3, 0.0]]))


def test_gae_matches_python_loop_on_right_padded_batch():
    g = torch.Generator().manual_seed(3)
    B, T, gamma, lam = 5, 9, 0.97, 0.9
    lengths = [9, 1, 4, 0, 7]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    out = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_adv = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            expected_adv[b, t] = last
    torch.testing.assert_close(out.advantages, expected_adv)
    torch.testing.assert_close(out.returns, torch.where(mask, expected_adv + values, 0.0))
    assert out.advantages.shape == (B, T)


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]))


def test_masked_whiten():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    w = masked_whiten(x, mask)
    assert w[mask].mean().abs().item() < 1e-12
    assert w[mask].var().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_equal_rewards_give_exactly_zero_in_any_dtype(name, dtype):
    # eight float32 0.7 average to 0.7 + 6e-8: without the exact-zero rule GRPO gave each sample +0.06
    flat = torch.full((1, 8), 0.7, dtype=dtype)
    assert flat.float().mean(dim=1).item() != flat[0, 0].float().item() or dtype != torch.float32
    adv = ADVANTAGE_ESTIMATORS[name](flat, 8)
    assert adv.dtype == dtype and adv.shape == (1, 8)
    assert (adv == 0).all(), adv
    # next to a group with signal, the flat group still gets exact zeros and the other group its usual values
    mixed = torch.tensor([[0.7] * 8, [1.0, 0.0] * 4], dtype=dtype)
    out = ADVANTAGE_ESTIMATORS[name](mixed.reshape(-1), 8).view(2, 8)
    assert (out[0] == 0).all()
    assert (out[1][0::2] > 0).all() and (out[1][1::2] < 0).all()

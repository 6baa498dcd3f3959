"""Policy losses: hand-worked values, autograd against the explicit policy-gradient formulas, micro-batch exactness."""

import math

import pytest
import torch

from posttrain.losses.policy import (
    AGGREGATIONS,
    POLICY_LOSSES,
    GlobalCounts,
    cispo_loss,
    clipped_surrogate_loss,
    clipped_value_loss,
    importance_sampling_weights,
)
from posttrain.ops.kl import kl_k3

F64 = torch.float64


def from_ratios(ratios, old=-1.0):
    """logps with the given ratios to old_logps = `old` (requires grad), old_logps, and a mask of non-NaN entries."""
    ratios = torch.tensor(ratios, dtype=F64)
    mask = ~ratios.isnan()
    old_logps = torch.full_like(ratios, old)
    logps = torch.where(mask, old + torch.log(ratios.nan_to_num(1.0)), 0.0).requires_grad_()
    return logps, old_logps, mask


def test_clipped_surrogate_token_level_hand_values():
    # ratios 0.5 / 1.0 / 1.5 with advantages 1 / -1 / 2, ε = 0.2:
    # min(0.5, 0.8) = 0.5; min(-1, -1) = -1; min(3, 2.4) = 2.4 → loss = -(0.5 - 1 + 2.4) / 3
    logps, old, mask = from_ratios([[0.5, 1.0, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=F64)
    out = clipped_surrogate_loss(logps, old, adv, mask, aggregation="token")
    assert out.loss.item() == pytest.approx(-0.6333333333, abs=1e-9)
    (grad,) = torch.autograd.grad(out.loss, logps)
    # ∂/∂log π = -ρ Â / N where unclipped, 0 where clipped (the third token)
    torch.testing.assert_close(grad, torch.tensor([[-0.5 / 3, 1.0 / 3, 0.0]], dtype=F64))
    assert out.clip_frac_high.item() == pytest.approx(1 / 3) and out.clip_frac_low.item() == 0.0


def two_sequences():
    # seq 0: ratios 0.5, 1.5 with Â = +1; seq 1: ratios 0.5, 1.0, 1.5 with Â = -1
    logps, old, mask = from_ratios([[0.5, 1.5, math.nan], [0.5, 1.0, 1.5]])
    return logps, old, torch.tensor([1.0, -1.0], dtype=F64), mask


def test_clipped_surrogate_sample_vs_token_aggregation_hand_values():
    logps, old, adv, mask = two_sequences()
    # seq 0 terms: min(0.5, 0.8) = 0.5, min(1.5, 1.2) = 1.2 → mean loss -0.85
    # seq 1 terms: min(-0.5, -0.8) = -0.8, -1, min(-1.5, -1.2) = -1.5 → mean loss 1.1
    sample = clipped_surrogate_loss(logps, old, adv, mask, aggregation="sample")
    assert sample.loss.item() == pytest.approx((-0.85 + 1.1) / 2, abs=1e-12)
    token = clipped_surrogate_loss(logps, old, adv, mask, aggregation="token")
    assert token.loss.item() == pytest.approx((-1.7 + 3.3) / 5, abs=1e-12)
    (grad,) = torch.autograd.grad(token.loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.1, 0.0, 0.0], [0.0, 0.2, 0.3]], dtype=F64))
    # clipped: seq 0 token 1 (ρ > 1.2, Â > 0) and seq 1 token 0 (ρ < 0.8, Â < 0)
    assert token.clip_frac_low.item() == pytest.approx(0.2) and token.clip_frac_high.item() == pytest.approx(0.2)
    assert token.clip_frac.item() == pytest.approx(0.4)
    assert token.ratio_max.item() == pytest.approx(1.5) and token.ratio_min.item() == pytest.approx(0.5)
    assert token.ratio_mean.item() == pytest.approx(5.0 / 5)
    # DAPO clip-higher 0.28: seq 0 token 1 becomes min(1.5, 1.28)
    dapo = POLICY_LOSSES["dapo"](logps, old, adv, mask)
    assert dapo.loss.item() == pytest.approx((-(0.5 + 1.28) + 3.3) / 5, abs=1e-12)


def test_cispo_hand_value():
    logps, old, mask = from_ratios([[0.5, 1.0, 3.0]])
    adv = torch.tensor([2.0], dtype=F64)
    out = cispo_loss(logps, old, adv, mask, epsilon_max=2.0, aggregation="token")
    lp = logps.detach()[0]
    expected = -(0.5 * 2 * lp[0] + 1.0 * 2 * lp[1] + 2.0 * 2 * lp[2]) / 3
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert out.clip_frac_high.item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-1.0 / 3, -2.0 / 3, -4.0 / 3]], dtype=F64))


class TinyPolicy:
    """Per-position logits θ [B, T, V]; log π_θ(y_t) = log_softmax(θ)[y_t]. ∇_θ log π(y_t) = onehot(y_t) − softmax."""

    def __init__(self, B=4, T=5, V=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
        self.tokens = torch.randint(0, V, (B, T), generator=g)
        self.V = V

    def logps(self):
        return torch.log_softmax(self.theta, -1).gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]

    def grad_log_pi(self):
        with torch.no_grad():
            return torch.nn.functional.one_hot(self.tokens, self.V).to(F64) - torch.softmax(self.theta, -1)


def agg_weights(mask, aggregation, group_size, max_length):
    """The weight w_{i,t} of each token in an aggregation, written out directly."""
    m = mask.to(F64)
    lengths = m.sum(1, keepdim=True)
    if aggregation == "token":
        return m / m.sum()
    if aggregation == "sample":
        return m / lengths.clamp(min=1) / m.shape[0]
    if aggregation == "constant":
        return m / (max_length * m.shape[0])
    group_tokens = lengths.view(-1, group_size).sum(1).repeat_interleave(group_size).unsqueeze(1)
    return m / group_tokens / (m.shape[0] // group_size)


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("loss_fn", [clipped_surrogate_loss, cispo_loss])
def test_on_policy_first_step_gradient_is_advantage_times_grad_log_pi(loss_fn, aggregation):
    policy = TinyPolicy()
    logps = policy.logps()
    old = logps.detach().clone()
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25], dtype=F64)
    out = loss_fn(logps, old, adv, MASK, aggregation=aggregation, group_size=2, max_length=5)
    assert out.ratio_mean.item() == pytest.approx(1.0) and out.ratio_max.item() == pytest.approx(1.0)
    assert out.clip_frac.item() == 0.0
    (grad,) = torch.autograd.grad(out.loss, policy.theta)
    w = agg_weights(MASK, aggregation, 2, 5)  # [B, T]
    expected = -(w * adv.unsqueeze(1)).unsqueeze(-1) * policy.grad_log_pi()  # [B, T, V]
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_cispo_gradient_is_truncated_weight_times_advantage_times_grad_log_pi(aggregation):
    policy = TinyPolicy(seed=1)
    logps = policy.logps()
    g = torch.Generator().manual_seed(2)
    old = logps.detach() + 0.5 * torch.randn(logps.shape, generator=g, dtype=F64)
    old[0, 1] = logps[0, 1].detach() - math.log(3.0)  # ρ = 3 > ε_max
    old[2, 0] = logps[2, 0].detach() - math.log(8.0)  # ρ = 8 > ε_max
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25], dtype=F64)
    eps_max = 2.0
    out = cispo_loss(logps, old, adv, MASK, epsilon_max=eps_max, aggregation=aggregation, group_size=2, max_length=5)
    (grad,) = torch.autograd.grad(out.loss, policy.theta)
    rho = torch.exp(logps.detach() - old)
    assert rho[0, 1] > eps_max and rho[2, 0] > eps_max
    w = agg_weights(MASK, aggregation, 2, 5)
    expected = -(w * torch.clamp(rho, max=eps_max) * adv.unsqueeze(1)).unsqueeze(-1) * policy.grad_log_pi()
    torch.testing.assert_close(grad, expected)
    # the clipped surrogate instead zeroes the gradient of the ρ = 3 token (Â > 0, ρ > 1.2)
    surrogate = clipped_surrogate_loss(
        policy.logps(), old, adv, MASK, aggregation=aggregation, group_size=2, max_length=5
    )
    (grad_s,) = torch.autograd.grad(surrogate.loss, policy.theta)
    assert torch.equal(grad_s[0, 1], torch.zeros(policy.V, dtype=F64))
    assert grad[0, 1].abs().sum() > 0


def test_cispo_two_sided_verl_semantics():
    logps, old, mask = from_ratios([[0.5, 1.0, 1.5]])
    adv = torch.tensor([1.0], dtype=F64)
    out = cispo_loss(logps, old, adv, mask, epsilon_max=1.28, ratio_min=0.8, aggregation="token")
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, -torch.tensor([[0.8, 1.0, 1.28]], dtype=F64) / 3)
    assert out.clip_frac_low.item() == pytest.approx(1 / 3) and out.clip_frac_high.item() == pytest.approx(1 / 3)


def test_kl_term_matches_k3_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 50.0]], dtype=F64)  # last position is padding: a huge ref must not leak
    mask = torch.tensor([[1, 1, 0]]).bool()
    adv = torch.zeros(1, dtype=F64)
    out = clipped_surrogate_loss(logps, logps.detach(), adv, mask, aggregation="token", ref_logps=ref, kl_coef=0.1)
    k3 = (0.1065306597 + 0.7182818285) / 2  # e^-0.5 + 0.5 - 1 and e - 2
    assert out.loss.item() == pytest.approx(0.1 * k3, abs=1e-9)
    assert out.kl.item() == pytest.approx(k3, abs=1e-9)
    (grad,) = torch.autograd.grad(out.loss, logps)
    # ∂k3/∂log π = 1 − π_ref/π
    torch.testing.assert_close(grad, 0.1 * torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0]], dtype=F64) / 2)
    # kl logged without a penalty when kl_coef = 0
    out0 = clipped_surrogate_loss(logps, logps.detach(), adv, mask, aggregation="token", ref_logps=ref)
    assert out0.loss.item() == 0.0 and out0.kl.item() == pytest.approx(k3)
    torch.testing.assert_close(out0.kl, kl_k3(logps.detach()[mask], ref[mask]).mean())
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_surrogate_loss(logps, logps.detach(), adv, mask, kl_coef=0.1)


def test_importance_sampling_weights_hand_values():
    old = torch.log(torch.tensor([[0.5, 4.0, 1.0, 7.0]], dtype=F64))  # gen = 0, so ratio = exp(old)
    gen = torch.zeros(1, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]]).bool()  # the 7.0 is padding
    tt = importance_sampling_weights(old, gen, mask, level="token", mode="truncate", cap=2.0)
    torch.testing.assert_close(tt.weights[:, :3], torch.tensor([[0.5, 2.0, 1.0]], dtype=F64))
    assert tt.ratio_max.item() == pytest.approx(4.0) and tt.ratio_min.item() == pytest.approx(0.5)
    assert tt.frac_corrected.item() == pytest.approx(1 / 3)
    assert tt.ratio_mean.item() == pytest.approx(5.5 / 3)
    tm = importance_sampling_weights(old, gen, mask, level="token", mode="mask", cap=2.0)
    torch.testing.assert_close(tm.weights[:, :3], torch.tensor([[0.5, 0.0, 1.0]], dtype=F64))
    tl = importance_sampling_weights(old, gen, mask, level="token", mode="mask", cap=2.0, cap_low=0.6)
    torch.testing.assert_close(tl.weights[:, :3], torch.tensor([[0.0, 0.0, 1.0]], dtype=F64))
    # sequence ratio = 0.5 · 4 · 1 = 2 (the padded 7 is excluded)
    st = importance_sampling_weights(old, gen, mask, level="sequence", mode="truncate", cap=3.0)
    torch.testing.assert_close(st.weights, torch.tensor([[2.0]], dtype=F64))
    st = importance_sampling_weights(old, gen, mask, level="sequence", mode="truncate", cap=1.5)
    torch.testing.assert_close(st.weights, torch.tensor([[1.5]], dtype=F64))
    sm = importance_sampling_weights(old, gen, mask, level="sequence", mode="mask", cap=1.5)
    torch.testing.assert_close(sm.weights, torch.tensor([[0.0]], dtype=F64))
    assert sm.frac_corrected.item() == 1.0
    # the weights multiply the policy-gradient term per token
    logps, old_logps, mask3 = from_ratios([[1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0], dtype=F64)
    out = clipped_surrogate_loss(logps, old_logps, adv, mask3, aggregation="token", is_weights=tt.weights[:, :3])
    assert out.loss.item() == pytest.approx(-(0.5 + 2.0 + 1.0) / 3)


def random_batch(P=4, G=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = P * G
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4, 6])[:rows]
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # [B·G, T]
    base = torch.randn(rows, T, generator=g, dtype=F64)
    old = base.detach() - 1.0 + 0.3 * torch.randn(rows, T, generator=g, dtype=F64)
    old[0, 0] = base[0, 0] - 1.0 - math.log(6.0)  # a ratio far above every clip
    ref = base.detach() - 1.0 + 0.2 * torch.randn(rows, T, generator=g, dtype=F64)
    gen = old + 0.4 * torch.randn(rows, T, generator=g, dtype=F64)
    adv = torch.randn(rows, generator=g, dtype=F64)
    return base, old, ref, gen, adv, mask


@pytest.mark.parametrize("n_micro", [2, 4])
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("loss_fn", [clipped_surrogate_loss, cispo_loss])
def test_micro_batches_with_global_counts_equal_full_batch(loss_fn, aggregation, n_micro):
    G = 2
    base, old, ref, gen, adv, mask = random_batch(G=G)
    is_w = importance_sampling_weights(old, gen, mask, level="token", mode="truncate", cap=2.0).weights
    kw = dict(aggregation=aggregation, group_size=G, max_length=6, kl_coef=0.05)

    def run(rows, counts):
        theta = base.clone().requires_grad_()
        total = 0.0
        for idx in rows:
            logps = theta[idx] - 1.0
            out = loss_fn(logps, old[idx], adv[idx], mask[idx], ref_logps=ref[idx], is_weights=is_w[idx],
                          counts=counts, **kw)
            total = total + out.loss
        (grad,) = torch.autograd.grad(total, theta)
        return total.item(), grad

    counts = GlobalCounts.from_mask(mask, group_size=G)
    full_loss, full_grad = run([torch.arange(8)], None)
    split = torch.arange(8).chunk(n_micro)  # prompt-major rows: each chunk holds whole groups
    micro_loss, micro_grad = run(split, counts)
    assert micro_loss == pytest.approx(full_loss, abs=1e-6)
    torch.testing.assert_close(micro_grad, full_grad, atol=1e-6, rtol=0)
    if aggregation != "constant":  # local normalization is not exact: the test can tell
        local_loss, _ = run(split, None)
        assert abs(local_loss - full_loss) > 1e-3


def test_global_counts_from_mask():
    _, _, _, _, _, mask = random_batch()
    counts = GlobalCounts.from_mask(mask, group_size=2)
    assert int(counts.tokens) == 27 and counts.samples == 8 and counts.prompts == 4
    with pytest.raises(ValueError, match="groups of 3"):
        GlobalCounts.from_mask(mask, group_size=3)


def test_padding_garbage_changes_nothing():
    base, old, ref, _gen, adv, mask = random_batch()
    outs = []
    for fill in (0.0, float("inf"), -float("inf"), 1e4):
        old_f = torch.where(mask, old, -fill if math.isfinite(fill) else float("nan"))
        ref_f = torch.where(mask, ref, fill)
        for fn in (clipped_surrogate_loss, cispo_loss):
            theta = base.clone().requires_grad_()
            logps = theta - 1.0 + torch.where(mask, 0.0, fill)  # garbage at pads, still wired to θ
            out = fn(logps, old_f, adv, mask, aggregation="token", ref_logps=ref_f, kl_coef=0.1)
            (grad,) = torch.autograd.grad(out.loss, theta)
            outs.append((fn.__name__, out.loss.item(), grad, out.ratio_max.item()))
    for name, loss, grad, rmax in outs:
        ref_out = next(o for o in outs if o[0] == name)
        assert math.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum()), dtype=F64))
        assert loss == pytest.approx(ref_out[1], abs=1e-12)
        torch.testing.assert_close(grad, ref_out[2])
        assert rmax == pytest.approx(ref_out[3])


def test_prompt_aggregation_needs_group_info():
    base, old, _, _, adv, mask = random_batch()
    with pytest.raises(ValueError, match="group_size"):
        clipped_surrogate_loss(base, old, adv, mask, aggregation="prompt")
    with pytest.raises(ValueError, match="max_length"):
        clipped_surrogate_loss(base, old, adv, mask, aggregation="constant")
    with pytest.raises(ValueError, match="unknown aggregation"):
        clipped_surrogate_loss(base, old, adv, mask, aggregation="tokens")


def test_presets():
    assert set(POLICY_LOSSES) == {"grpo", "dapo", "dr_grpo", "cispo", "scalerl", "ppo"}
    base, _old, _ref, _, adv, mask = random_batch()
    for preset in POLICY_LOSSES.values():
        theta = base.clone().requires_grad_()
        out = preset(theta, theta.detach(), adv, mask, group_size=2, max_length=6)
        direct = preset.loss_fn(theta, theta.detach(), adv, mask, group_size=2, max_length=6, **preset.defaults)
        assert out.loss.item() == direct.loss.item()
    assert POLICY_LOSSES["scalerl"].defaults["aggregation"] == "prompt"
    assert POLICY_LOSSES["scalerl"].advantage_estimator == "batch"
    assert POLICY_LOSSES["dr_grpo"].advantage_estimator == "dr_grpo"
    # overrides win over the preset's defaults
    logps, old2, adv2, mask2 = two_sequences()
    out = POLICY_LOSSES["dapo"](logps, old2, adv2, mask2, epsilon_high=0.2)
    assert out.loss.item() == pytest.approx((-1.7 + 3.3) / 5, abs=1e-12)


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0, 99.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.0]], dtype=F64)
    returns = torch.tensor([[1.5, 1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]]).bool()
    out = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: (1 - 1.5)^2 = 0.25 vs clipped V = 0.7 → (0.7 - 1.5)^2 = 0.64; token 1: (2 - 1)^2 = 1 both
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(out.loss, values)
    # token 0: the clipped branch wins and is flat in V → 0; token 1: (V - R)/N = 0.5
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5, 0.0]], dtype=F64))
    plain = clipped_value_loss(values, old, returns, mask, clip_range=None)
    assert plain.loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2, abs=1e-12)
    perfect = clipped_value_loss(returns.clone(), old, returns, torch.ones(1, 3, dtype=torch.bool))
    assert perfect.explained_variance.item() == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_value_loss_micro_batches_equal_full_batch(aggregation):
    base, old, ref, _, _, mask = random_batch(seed=3)
    returns = ref + 0.5
    kw = dict(aggregation=aggregation, group_size=2, max_length=6, clip_range=0.2)
    values = base.clone().requires_grad_()
    full = clipped_value_loss(values, old, returns, mask, **kw).loss
    (full_grad,) = torch.autograd.grad(full, values)
    counts = GlobalCounts.from_mask(mask, group_size=2)
    values = base.clone().requires_grad_()
    total = sum(
        clipped_value_loss(values[i], old[i], returns[i], mask[i], counts=counts, **kw).loss
        for i in torch.arange(8).chunk(4)
    )
    (grad,) = torch.autograd.grad(total, values)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)

"""Distillation divergences (losses/distill.py) against hand-worked values, their limits, a peer (TRL's GKD loss), the
top-k approximation's error, the student = teacher fixed point, and the on-policy gradient against brute-force
enumeration of every sequence of a tabular toy."""

import itertools
import math

import pytest
import torch

from posttrain.losses.distill import (
    forward_kl, forward_kl_topk, generalized_jsd, reverse_kl, reverse_kl_sampled_loss, row_divergence,
    token_divergence_loss,
)

ln = math.log


def rows(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


# ------------------------------------------------------------------------------------------------- hand-worked values

P2, Q2 = (0.8, 0.2), (0.5, 0.5)  # teacher p, student q


def test_forward_and_reverse_kl_by_hand():
    p, q = rows(P2), rows(Q2)
    assert forward_kl(q, p).item() == pytest.approx(0.8 * ln(0.8 / 0.5) + 0.2 * ln(0.2 / 0.5), abs=1e-12)
    assert reverse_kl(q, p).item() == pytest.approx(0.5 * ln(0.5 / 0.8) + 0.5 * ln(0.5 / 0.2), abs=1e-12)


def test_jsd_by_hand():
    p, q = rows(P2), rows(Q2)
    for beta in (0.5, 0.1, 0.9):
        m = [beta * a + (1 - beta) * b for a, b in zip(P2, Q2)]
        expected = (beta * sum(a * ln(a / c) for a, c in zip(P2, m))
                    + (1 - beta) * sum(b * ln(b / c) for b, c in zip(Q2, m)))
        assert generalized_jsd(q, p, beta=beta).item() == pytest.approx(expected, abs=1e-12)


def test_zero_probabilities_and_disjoint_supports():
    p, q = rows((1.0, 0.0)), rows((0.5, 0.5))
    assert forward_kl(q, p).item() == pytest.approx(ln(2), abs=1e-12)  # 0·log 0 = 0
    assert reverse_kl(q, p).item() == math.inf  # q puts mass where p has none
    disjoint_p, disjoint_q = rows((1.0, 0.0)), rows((0.0, 1.0))
    assert generalized_jsd(disjoint_q, disjoint_p, beta=0.5).item() == pytest.approx(ln(2), abs=1e-12)  # JS ≤ ln 2
    assert generalized_jsd(disjoint_q, disjoint_p, beta=0.25).item() == pytest.approx(
        0.25 * ln(1 / 0.25) + 0.75 * ln(1 / 0.75), abs=1e-12)


def test_rows_are_independent_and_shapes():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64).log_softmax(-1), torch.randn(5, 7, dtype=torch.float64).log_softmax(-1)
    for fn in (forward_kl, reverse_kl, lambda a, b: generalized_jsd(a, b, beta=0.3)):
        out = fn(s, t)
        assert out.shape == (5,)
        assert torch.allclose(out, torch.stack([fn(s[i:i + 1], t[i:i + 1])[0] for i in range(5)]))
        assert (out > 0).all()


# ------------------------------------------------------------------------------------------------------------ limits


def test_jsd_limits():
    torch.manual_seed(1)
    s, t = torch.randn(4, 9, dtype=torch.float64).log_softmax(-1), torch.randn(4, 9, dtype=torch.float64).log_softmax(-1)
    eps = 1e-6
    assert torch.allclose(generalized_jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=1e-4)
    assert torch.allclose(generalized_jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=1e-4)
    # the paper's convention at the end points: beta = 0 is the forward KL, beta = 1 the reverse KL
    assert torch.equal(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    assert torch.equal(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # the gradients near the ends point like those of the limits
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    g_jsd = torch.autograd.grad(generalized_jsd(z.log_softmax(-1), t, beta=eps).sum() / eps, z)[0]
    g_fkl = torch.autograd.grad(forward_kl(z.log_softmax(-1), t).sum(), z)[0]
    assert torch.allclose(g_jsd, g_fkl, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_unit_interval_raises(beta):
    s = rows(Q2)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, s, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        row_divergence("jsd", beta)


def test_unknown_divergence_name():
    with pytest.raises(ValueError, match="unknown divergence"):
        row_divergence("kl_forward")


def test_matches_trl_generalized_jsd():
    """An independent implementation on the same logits: TRL's GKD loss (per token, reduction by hand)."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    for beta in (0.0, 0.2, 0.5, 0.9, 1.0):
        for tau in (1.0, 2.0):
            ref = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=tau, reduction="sum")
            ours = row_divergence("jsd", beta)((student / tau).log_softmax(-1).reshape(6, 11),
                                               (teacher / tau).log_softmax(-1).reshape(6, 11)).sum()
            assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------- top-k


def test_topk_error_by_hand():
    p, q = (0.5, 0.3, 0.1, 0.1), (0.4, 0.2, 0.3, 0.1)
    t, s = rows(p), rows(q)
    top = t.topk(2, dim=-1)
    approx = forward_kl_topk(s, top.values, top.indices).item()
    lumped = 0.5 * ln(0.5 / 0.4) + 0.3 * ln(0.3 / 0.2) + 0.2 * ln(0.2 / 0.4)
    assert approx == pytest.approx(lumped, abs=1e-12)
    full = forward_kl(s, t).item()
    assert full - approx == pytest.approx(0.2 * ln(2) - 0.1 * ln(3), abs=1e-12)  # the error, worked by hand


def test_topk_bounds_and_exact_cases():
    torch.manual_seed(3)
    V = 12
    s, t = torch.randn(6, V, dtype=torch.float64).log_softmax(-1), torch.randn(6, V, dtype=torch.float64).log_softmax(-1)
    full = forward_kl(s, t)
    previous = torch.zeros(6, dtype=torch.float64)
    for k in range(1, V + 1):
        top = t.topk(k, dim=-1)
        approx = forward_kl_topk(s, top.values, top.indices)
        assert (approx <= full + 1e-12).all() and (approx >= -1e-12).all()  # data-processing inequality
        assert (approx >= previous - 1e-12).all()  # a finer partition never loses divergence
        previous = approx
        if k >= V - 1:
            assert torch.allclose(approx, full, atol=1e-12)
    # exact when the lumped tokens keep their relative probabilities: q = p rescaled outside S
    q = torch.tensor([0.5, 0.2, 0.15, 0.15], dtype=torch.float64)
    p = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)
    top = p.log()[None].topk(2, dim=-1)
    assert forward_kl_topk(q.log()[None], top.values, top.indices).item() == pytest.approx(
        forward_kl(q.log()[None], p.log()[None]).item(), abs=1e-12)


# ------------------------------------------------------------------------------------------------ student = teacher


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
def test_student_equals_teacher_gives_zero_loss_and_gradient(name, beta):
    torch.manual_seed(4)
    z = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    teacher = z.detach().log_softmax(-1)
    out = token_divergence_loss(row_divergence(name, beta)(z.log_softmax(-1), teacher), torch.ones(5, dtype=torch.bool),
                                num_tokens=5)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-14)
    assert z.grad.abs().max().item() < 1e-14


def test_topk_and_sampled_zero_at_fixed_point():
    torch.manual_seed(5)
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    top = z.detach().log_softmax(-1).topk(2, dim=-1)
    loss = forward_kl_topk(z.log_softmax(-1), top.values, top.indices).sum()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-14) and z.grad.abs().max().item() < 1e-14
    logps = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = reverse_kl_sampled_loss(logps, logps.detach(), torch.ones(2, 4, dtype=torch.bool), num_tokens=8, discount=1.0)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.divergence.item() == 0.0 and logps.grad.abs().max().item() == 0.0


def test_sampled_loss_values_by_hand():
    """k1 = log q − log p per token; returns-to-go with γ; masked tokens contribute nothing."""
    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.2, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = reverse_kl_sampled_loss(student, teacher, mask, num_tokens=5.0, discount=0.5)
    # k1 = [[0.5, -1, 0], [-0.2, -0.5, (masked)]]; returns γ=0.5: [[0.5-0.5+0, -1, 0], [-0.2-0.25, -0.5]]
    assert out.divergence.item() == pytest.approx(0.5 - 1.0 + 0.0 - 0.2 - 0.5)
    assert out.loss.item() == pytest.approx((0.0 - 1.0 + 0.0 - 0.45 - 0.5) / 5.0)  # −Σ w·A / n with w = 1
    out.loss.backward()
    expected = torch.tensor([[0.0, -1.0, 0.0], [-0.45, -0.5, 0.0]], dtype=torch.float64) / 5.0  # ∂L/∂log q = −A/n·(−1)
    assert torch.allclose(student.grad, expected)


# ------------------------------------------------------------------------- on-policy gradient vs brute-force expectation


V = 3


def _tabular(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 + V, V, generator=g, dtype=torch.float64)  # row 0: first token; row 1 + y1: second token


def _enumerate(student_logits, teacher_logits):
    """All V² sequences: (q(y) detached, per-token student/teacher log-probs [2], per-token rows [2, V])."""
    qs, ps = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    out = []
    for y1, y2 in itertools.product(range(V), repeat=2):
        s_rows, t_rows = torch.stack([qs[0], qs[1 + y1]]), torch.stack([ps[0], ps[1 + y1]])
        s_tok = torch.stack([qs[0, y1], qs[1 + y1, y2]])
        t_tok = torch.stack([ps[0, y1], ps[1 + y1, y2]])
        out.append((s_tok.sum().exp().detach(), s_tok, t_tok, s_rows, t_rows))
    return out


def _expected_grad(theta, teacher_logits, per_sequence_loss):
    total = 0.0
    for q_y, s_tok, t_tok, s_rows, t_rows in _enumerate(theta, teacher_logits):
        total = total + q_y * per_sequence_loss(s_tok, t_tok, s_rows, t_rows)
    return torch.autograd.grad(total, theta)[0]


def test_sampled_reverse_kl_gradient_matches_enumeration():
    theta, teacher = _tabular(0).requires_grad_(True), _tabular(1)
    ones = torch.ones(1, 2, dtype=torch.bool)

    def sampled(discount):
        return lambda s, t, *_: reverse_kl_sampled_loss(s[None], t[None], ones, num_tokens=1.0, discount=discount).loss

    # γ = 1: the gradient of the sequence-level KL(q(y) ‖ p(y)), the prefixes' dependence on θ included
    def sequence_kl(th):
        return sum(s.sum().exp() * (s.sum() - t.sum()) for _, s, t, _, _ in _enumerate(th, teacher))

    exact_seq = torch.autograd.grad(sequence_kl(theta), theta)[0]
    assert torch.allclose(_expected_grad(theta, teacher, sampled(1.0)), exact_seq, atol=1e-12)

    # γ = 0: the gradient of Σ_t E_{y<t ~ sg(q)} KL(q(·|y<t) ‖ p(·|y<t)), prefixes held fixed
    qs, ps = theta.log_softmax(-1), teacher.log_softmax(-1)
    q1 = qs[0].detach().exp()
    token_objective = reverse_kl(qs[:1], ps[:1]).sum() + sum(q1[y] * reverse_kl(qs[1 + y][None], ps[1 + y][None])[0]
                                                            for y in range(V))
    exact_token = torch.autograd.grad(token_objective, theta)[0]
    assert torch.allclose(_expected_grad(theta, teacher, sampled(0.0)), exact_token, atol=1e-12)
    # the full-distribution form at the visited prefixes has the same expected gradient
    full = _expected_grad(theta, teacher, lambda s, t, sr, tr: reverse_kl(sr, tr).sum())
    assert torch.allclose(full, exact_token, atol=1e-12)
    # and the two targets differ (the test can tell γ = 0 from γ = 1)
    assert (exact_seq - exact_token).abs().max() > 1e-3


def test_importance_weight_corrects_a_different_sampler():
    """Samples from a behaviour distribution μ with weights q/μ give the on-policy expected gradient (γ = 0)."""
    theta, teacher, behaviour = _tabular(0).requires_grad_(True), _tabular(1), _tabular(2)
    ones = torch.ones(1, 2, dtype=torch.bool)
    on_policy = _expected_grad(theta, teacher, lambda s, t, *_: reverse_kl_sampled_loss(
        s[None], t[None], ones, num_tokens=1.0).loss)
    mu = behaviour.log_softmax(-1)
    total = 0.0
    for (y1, y2), (_, s, t, _, _) in zip(itertools.product(range(V), repeat=2), _enumerate(theta, teacher)):
        mu_tok = torch.stack([mu[0, y1], mu[1 + y1, y2]])
        # the prefix is reweighted too: sequence weight q(y<t)/μ(y<t) enters through the per-token weights' product;
        # with γ = 0 and two tokens, weight the whole sequence by q(y1)/μ(y1) and let the loss weight token 2 by q/μ
        prefix_w = (s[0] - mu_tok[0]).exp().detach()
        loss_t1 = reverse_kl_sampled_loss(s[None, :1], t[None, :1], ones[:, :1], num_tokens=1.0,
                                          behaviour_logps=mu_tok[None, :1]).loss
        loss_t2 = reverse_kl_sampled_loss(s[None, 1:], t[None, 1:], ones[:, 1:], num_tokens=1.0,
                                          behaviour_logps=mu_tok[None, 1:]).loss
        total = total + mu_tok.sum().exp() * (loss_t1 + prefix_w * loss_t2)
    off_policy = torch.autograd.grad(total, theta)[0]
    assert torch.allclose(off_policy, on_policy, atol=1e-12)

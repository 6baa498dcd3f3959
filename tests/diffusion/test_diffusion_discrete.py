"""Discrete-state diffusion (D3PM): the notes' three-state example by hand, posteriors by brute force, exact and
learned reverse processes."""

import itertools

import pytest
import torch

from posttrain.diffusion.discrete import (
    DiscreteScheduler,
    absorbing_betas,
    absorbing_transition,
    d3pm_loss,
    make_discrete_schedule,
    q_marginal,
    q_posterior,
    q_sample,
    reverse_probs,
    uniform_transition,
)
from posttrain.diffusion.nets import DiscreteDenoiser
from posttrain.diffusion.sampling import sample_loop

START = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # the notes' [1, 0, 0]


def test_three_state_uniform_example_by_hand():
    """Each step keeps the state with probability 1/2, else redraws it uniformly: Q = ½I + ⅙·11ᵀ.
    [1,0,0] -> [2/3, 1/6, 1/6] -> [1/2, 1/4, 1/4] -> [5/12, 7/24, 7/24] -> … -> [1/3, 1/3, 1/3]."""
    Q = uniform_transition(0.5, 3)
    torch.testing.assert_close(Q[0], torch.tensor([2 / 3, 1 / 6, 1 / 6], dtype=torch.float64))
    sched = make_discrete_schedule("uniform", 3, torch.full((40,), 0.5))
    expected = [[2 / 3, 1 / 6, 1 / 6], [1 / 2, 1 / 4, 1 / 4], [5 / 12, 7 / 24, 7 / 24]]
    for t, row in enumerate(expected):
        torch.testing.assert_close(q_marginal(START, sched, t), torch.tensor(row, dtype=torch.float64))
    # closed form 1/3 + (2/3)(1/2)^(t+1) for the start state, and the limit [1/3, 1/3, 1/3]
    for t in range(40):
        assert q_marginal(START, sched, t)[0].item() == pytest.approx(1 / 3 + 2 / 3 * 0.5 ** (t + 1), abs=1e-14)
    torch.testing.assert_close(q_marginal(START, sched, 39), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_three_state_posteriors_by_hand():
    """q(x_1 | x_2 = B, x_0 = A) ∝ Q[x_1, B] q(x_1 | A) = [1/6·2/3, 2/3·1/6, 1/6·1/6] -> [4/9, 4/9, 1/9];
    q(x_2 | x_3 = A, x_0 = A) ∝ [2/3·1/2, 1/6·1/4, 1/6·1/4] -> [4/5, 1/10, 1/10]. (Index t = 1 is x_2.)"""
    sched = make_discrete_schedule("uniform", 3, torch.full((10,), 0.5))
    A, B = torch.tensor(0), torch.tensor(1)
    torch.testing.assert_close(q_posterior(A, B, sched, 1), torch.tensor([4 / 9, 4 / 9, 1 / 9], dtype=torch.float64))
    torch.testing.assert_close(q_posterior(A, A, sched, 2), torch.tensor([0.8, 0.1, 0.1], dtype=torch.float64))
    # at the first step the posterior is the point mass on x_0 whatever x_1 is
    torch.testing.assert_close(q_posterior(A, B, sched, 0), START)


def test_three_state_absorbing_example_by_hand():
    """State 2 is [MASK]; β_t = 1/(T − t + 1) with T = 3: [1,0,0] -> [2/3,0,1/3] -> [1/3,0,2/3] -> [0,0,1].
    q(x_1 | x_2 = M, x_0 = A) ∝ [β_2·2/3, 0, 1·1/3] = [1/3, 0, 1/3] -> [1/2, 0, 1/2]."""
    betas = absorbing_betas(3)
    torch.testing.assert_close(betas, torch.tensor([1 / 3, 1 / 2, 1.0], dtype=torch.float64))
    torch.testing.assert_close(absorbing_transition(0.25, 3)[1], torch.tensor([0.0, 0.75, 0.25], dtype=torch.float64))
    sched = make_discrete_schedule("absorbing", 3, betas)
    for t, row in enumerate([[2 / 3, 0, 1 / 3], [1 / 3, 0, 2 / 3], [0, 0, 1]]):
        torch.testing.assert_close(q_marginal(START, sched, t), torch.tensor(row, dtype=torch.float64))
    A, M = torch.tensor(0), torch.tensor(2)
    torch.testing.assert_close(q_posterior(A, M, sched, 1), torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(q_posterior(A, A, sched, 1), START)  # an unmasked token was never masked


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_posterior_equals_brute_force_bayes(kind):
    """q(x_{t−1} | x_t, x_0) from enumerating every path x_0 -> … -> x_t with its probability (a loop)."""
    K, T = 3, 4
    sched = make_discrete_schedule(kind, K, torch.tensor([0.1, 0.3, 0.2, 0.6]))
    Qs = sched.transitions
    for x0, xt, t in itertools.product(range(K), range(K), range(1, T)):
        mass = torch.zeros(K, dtype=torch.float64)
        for path in itertools.product(range(K), repeat=t + 1):  # states after steps 0..t
            p, prev = 1.0, x0
            for s, state in enumerate(path):
                p, prev = p * Qs[s, prev, state].item(), state
            if path[-1] == xt:
                mass[path[-2]] += p
        if mass.sum() == 0:
            continue  # x_t unreachable from x_0
        torch.testing.assert_close(q_posterior(torch.tensor(x0), torch.tensor(xt), sched, t), mass / mass.sum())


def test_batched_reverse_probs_equal_per_row():
    g = torch.Generator().manual_seed(0)
    sched = make_discrete_schedule("uniform", 4, torch.linspace(0.05, 0.5, 6))
    x0_probs = torch.rand(5, 3, 4, generator=g, dtype=torch.float64).softmax(-1)
    x_t = torch.randint(0, 4, (5, 3), generator=g)
    t = torch.tensor([0, 1, 3, 5, 2])
    batched = reverse_probs(x0_probs, x_t, sched, t)
    assert batched.shape == (5, 3, 4)
    for b in range(5):
        torch.testing.assert_close(batched[b], reverse_probs(x0_probs[b], x_t[b], sched, int(t[b])))


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_exact_x0_posterior_makes_the_reverse_process_exact(kind):
    """With p(x̃_0 | x_t) = the true q(x_0 | x_t) for data p_0 = [0.6, 0.3, 0.1], pushing the stationary start
    through the reverse steps gives back p_0 exactly (no sampling involved)."""
    p0 = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    betas = absorbing_betas(8) if kind == "absorbing" else torch.tensor([0.2, 0.3, 0.5, 0.5, 0.7, 1.0])
    sched = make_discrete_schedule(kind, 3, betas)
    marginal = sched.stationary.clone()  # q(x_T) equals it exactly: the last β is 1
    torch.testing.assert_close(q_marginal(p0, sched, sched.num_steps - 1), marginal)
    for t in range(sched.num_steps - 1, -1, -1):
        x0_given_xt = p0[:, None] * sched.cumulative[t]  # [K (x_0), K (x_t)] joint
        x0_given_xt = (x0_given_xt / x0_given_xt.sum(0, keepdim=True).clamp_min(1e-300)).T  # [K (x_t), K (x_0)]
        step = reverse_probs(x0_given_xt, torch.arange(3), sched, t)  # [K (x_t), K (x_{t−1})]
        marginal = marginal @ step
        torch.testing.assert_close(marginal, q_marginal(p0, sched, t - 1) if t > 0 else p0)


def test_d3pm_loss_values():
    """A perfect x̃_0 prediction has L_vb = 0 and CE ≈ 0; a uniform one has CE = log K and positive L_vb."""
    sched = make_discrete_schedule("uniform", 3, torch.full((5,), 0.3))
    x0 = torch.tensor([[0, 1], [2, 2]])
    x_t = torch.tensor([[1, 1], [0, 2]])
    t = torch.tensor([2, 0])
    perfect = torch.nn.functional.one_hot(x0, 3).float() * 60.0
    out = d3pm_loss(perfect, x0, x_t, t, sched)
    assert out.vb.item() == pytest.approx(0.0, abs=1e-12)
    assert out.ce.item() == pytest.approx(0.0, abs=1e-12)
    uniform = torch.zeros(2, 2, 3, requires_grad=True)
    out = d3pm_loss(uniform, x0, x_t, t, sched, ce_weight=0.5)
    assert out.ce.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)
    assert out.vb.item() > 0.05
    assert out.loss.item() == pytest.approx(out.vb.item() + 0.5 * out.ce.item(), rel=1e-6)
    out.loss.backward()
    assert uniform.grad.abs().sum() > 0
    # row 2 at t = 0: the KL is −log p(x_0 | x_1) = log 3 for a uniform prediction, by hand
    row = d3pm_loss(torch.zeros(1, 2, 3), x0[1:], x_t[1:], t[1:], sched, ce_weight=0.0)
    assert row.vb.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)


def test_sampler_shares_gumbel_noise_and_validates_steps():
    sched = make_discrete_schedule("uniform", 3, torch.full((4,), 0.4))
    sampler = DiscreteScheduler(sched)
    logits = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1))
    x_t = torch.randint(0, 3, (6, 2), generator=torch.Generator().manual_seed(2))
    noise = -torch.log(-torch.log(torch.rand(6, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)))
    a = sampler.step(logits, 2, x_t, noise=noise)
    b = sampler.step(logits, 2, x_t, noise=noise)
    assert torch.equal(a.prev_sample, b.prev_sample) and a.prev_sample.shape == (6, 2)
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit steps"):
        sampler.step(logits, 3, x_t, prev_t=1)


def test_learned_reverse_model_reproduces_correlated_pairs():
    """Data: pairs (a, a) with a ~ [0.6, 0.3, 0.1]. Each reverse step factorizes over positions, yet over T = 30 steps
    a trained model makes both tokens agree (> 0.95; independent draws agree 0.46 of the time) and keeps the
    marginal (within 0.05; its standard error at 4000 tokens is 0.008, the rest is the factorized steps' bias)."""
    torch.manual_seed(0)
    K, L, T = 3, 2, 30
    sched = make_discrete_schedule("uniform", K, torch.cat([torch.linspace(0.01, 0.25, T - 1), torch.ones(1)]))
    model = DiscreteDenoiser(L, K, hidden_dim=64, num_layers=2, num_train_timesteps=T)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 400)  # to 0: the last model is not a noisy one
    g = torch.Generator().manual_seed(0)
    p0 = torch.tensor([0.6, 0.3, 0.1])
    first_vb = None
    for step in range(400):
        a = torch.multinomial(p0, 256, replacement=True, generator=g)
        x0 = torch.stack([a, a], dim=1)  # [B, L]
        t = torch.randint(0, T, (256,), generator=g)
        x_t = q_sample(x0, sched, t, generator=g)
        out = d3pm_loss(model(x_t, t), x0, x_t, t, sched)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        decay.step()
        first_vb = out.vb.item() if first_vb is None else first_vb
    assert out.vb.item() < 0.5 * first_vb
    sampler = DiscreteScheduler(sched)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = sample_loop(model, sampler, list(range(T - 1, -1, -1)), sampler.initial_state((2000, L), gen), generator=gen)
    assert (x[:, 0] == x[:, 1]).float().mean().item() > 0.95
    freq = torch.bincount(x.flatten(), minlength=K).float() / x.numel()
    torch.testing.assert_close(freq, p0, atol=0.05, rtol=0)

"""Noise schedules and forward marginals against their closed forms (and diffusers' tables)."""

import math

import pytest
import torch

from posttrain.diffusion.schedules import (
    PREDICTION_TYPES,
    add_noise,
    cosine_alpha_bar,
    inference_timesteps,
    make_schedule,
    training_target,
)
from posttrain.diffusion.ve import ve_add_noise, ve_sigma, ve_training_example


def test_linear_betas_are_ho_et_al_values():
    s = make_schedule("linear", 1000)
    assert s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert (s.betas[1] - s.betas[0]).item() == pytest.approx((0.02 - 1e-4) / 999, rel=1e-9)
    # ᾱ_1 = (1 − β_0)(1 − β_1) worked by hand
    assert s.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)), rel=1e-12)


def test_cosine_alpha_bar_is_the_closed_form_where_unclipped():
    T, s_off = 1000, 0.008
    sched = make_schedule("cosine", T)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    closed = torch.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2 / math.cos(s_off / (1 + s_off) * math.pi / 2) ** 2
    unclipped = sched.betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last β hits the 0.999 clip
    torch.testing.assert_close(sched.alphas_cumprod[:-1], closed[:-1], rtol=1e-10, atol=1e-14)
    assert cosine_alpha_bar(0.0).item() == pytest.approx(1.0)


@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(ours, theirs):
    from diffusers import DDPMScheduler as HFDDPM

    ref = HFDDPM(beta_schedule=theirs, clip_sample=False)
    sched = make_schedule(ours)
    torch.testing.assert_close(sched.betas.float(), ref.betas, rtol=1e-6, atol=1e-8)
    # diffusers multiplies 1000 float32 factors; our float64 product agrees to float32 accumulation error
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod.double(), rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_chain_moments_equal_closed_form(name):
    """x_t = √(1−β_t) x_{t−1} + √β_t ε_t step by step has mean √ᾱ_t x_0 and variance 1 − ᾱ_t (Ho et al. eq. 4)."""
    s = make_schedule(name, 200)
    mean, var = 1.0, 0.0  # the recursion for x_0 = 1 (a point), looped
    for t in range(200):
        mean = math.sqrt(1 - s.betas[t].item()) * mean
        var = (1 - s.betas[t].item()) * var + s.betas[t].item()
        assert mean == pytest.approx(math.sqrt(s.alphas_cumprod[t].item()), rel=1e-10)
        assert var == pytest.approx(1 - s.alphas_cumprod[t].item(), rel=1e-10, abs=1e-14)


def test_simulated_chain_matches_add_noise_marginal():
    g = torch.Generator().manual_seed(0)
    s = make_schedule("linear", 100, beta_start=1e-3, beta_end=0.05)
    x0 = torch.tensor([[2.0, -1.0]], dtype=torch.float64).expand(20000, 2)
    x = x0.clone()
    for t in range(60):  # the Markov chain, step by step, to t = 59
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    direct = add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.full((20000,), 59),
                       s.alphas_cumprod)
    abar = s.alphas_cumprod[59].item()
    for sample in (x, direct):
        se = math.sqrt((1 - abar) / 20000)
        torch.testing.assert_close(sample.mean(0), math.sqrt(abar) * x0[0], atol=5 * se, rtol=0)
        torch.testing.assert_close(sample.var(0), torch.full((2,), 1 - abar, dtype=torch.float64),
                                   rtol=0.05, atol=0)


def test_ve_forward_marginal_is_sigma_squared_t():
    """Summing T increments N(0, σ²Δt) gives x_t ~ N(x_0, σ² t) (Nakkiran et al. §2); index k means t = (k+1)/T."""
    T, sigma = 50, 3.0
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((40000, 1), 0.5, dtype=torch.float64)
    x = x0.clone()
    for k in range(20):
        x = x + sigma * math.sqrt(1 / T) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = 20 / T
    assert ve_sigma(19, T, sigma) == pytest.approx(sigma * math.sqrt(t))
    assert ve_sigma(-1, T, sigma) == 0.0
    assert x.mean().item() == pytest.approx(0.5, abs=5 * sigma * math.sqrt(t / 40000))
    assert x.var().item() == pytest.approx(sigma**2 * t, rel=0.03)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    direct = ve_add_noise(x0, eps, torch.full((40000,), sigma * math.sqrt(t)))
    assert direct.var().item() == pytest.approx(sigma**2 * t, rel=0.03)


def test_ve_training_pairs():
    """Pseudocode 1: x_t − x_{t−Δt} ~ N(0, σ²Δt) and x_{t−Δt} − x_0 ~ N(0, σ²(t−Δt)); Claim 2's target is x_0."""
    T, sigma = 10, 2.0
    x0 = torch.zeros(4, 3)
    n1, n2 = torch.ones(4, 3), 2 * torch.ones(4, 3)
    k = torch.tensor([0, 3, 5, 9])
    x_t, target = ve_training_example(x0, k, T, sigma, n1, n2, "prev_sample")
    expected_prev = sigma * (k.double() / T).sqrt()[:, None] * torch.ones(4, 3, dtype=torch.float64)  # t−Δt = k/T
    torch.testing.assert_close(target.double(), expected_prev)
    step = torch.full((4, 3), 2 * sigma * math.sqrt(1 / T), dtype=torch.float64)  # σ√Δt · step_noise (= 2)
    torch.testing.assert_close((x_t - target).double(), step)
    x_t2, target2 = ve_training_example(x0, k, T, sigma, n1, n2, "sample")
    torch.testing.assert_close(target2, x0)
    torch.testing.assert_close(x_t2.double(), sigma * ((k.double() + 1) / T).sqrt()[:, None].expand(4, 3))


@pytest.mark.parametrize("prediction_type", sorted(PREDICTION_TYPES))
def test_prediction_types_invert_their_training_targets(prediction_type):
    """Feeding the exact target back through the scheduler's map recovers (x_0, ε) exactly, at every t."""
    g = torch.Generator().manual_seed(2)
    s = make_schedule("cosine", 1000)
    x0 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 900, 998])
    x_t = add_noise(x0, eps, t, s.alphas_cumprod)
    target = training_target(x0, eps, t, s.alphas_cumprod, prediction_type)
    for i in range(5):
        x0_hat, eps_hat = PREDICTION_TYPES[prediction_type](target[i], x_t[i], s.alphas_cumprod[t[i]].item())
        torch.testing.assert_close(x0_hat, x0[i], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(eps_hat, eps[i], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_inference_timesteps_match_diffusers(spacing):
    from diffusers import DDIMScheduler as HFDDIM

    ref = HFDDIM(timestep_spacing=spacing)
    for S in (1, 3, 7, 10, 20, 50, 100, 333, 1000):
        ref.set_timesteps(S)
        assert inference_timesteps(1000, S, spacing) == ref.timesteps.tolist()
    assert inference_timesteps(1000, 10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]  # by hand
    with pytest.raises(ValueError, match="num_inference_steps"):
        inference_timesteps(1000, 1001)

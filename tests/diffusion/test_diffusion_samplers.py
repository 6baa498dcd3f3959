"""DDPM, DDIM and VE steps: agreement with diffusers, invariants, and sampling with exact denoisers.

Exact denoisers: for Gaussian data x_0 ~ N(μ, s² I) and x_t = a x_0 + b ε, E[x_0 | x_t] = μ + a s²/(a² s² + b²)
(x_t − a μ); for a finite data set {p_k} with weights w_k it is the softmax-weighted mean of the p_k with logits
log w_k − ‖x_t − a p_k‖²/(2b²). With them the only error left is the samplers' own.
"""

import math

import pytest
import torch

from posttrain.diffusion.ddim import DDIMScheduler
from posttrain.diffusion.ddpm import DDPMScheduler
from posttrain.diffusion.sampling import initial_noise, sample_loop
from posttrain.diffusion.schedules import inference_timesteps, make_schedule
from posttrain.diffusion.ve import VEScheduler, ve_ddim_step, ve_posterior_mean, ve_sigma

SCHEDULE = make_schedule("linear", 1000)
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
STD = 0.5
POINTS = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
N = 2000


def gaussian_x0(x_t, a, b):
    return MU + a * STD**2 / (a**2 * STD**2 + b**2) * (x_t - a * MU)


def finite_x0(x_t, a, b):
    logits = WEIGHTS.log() - ((x_t[:, None, :] - a[:, None, :] * POINTS[None]) ** 2).sum(-1) / (2 * b**2)  # [B, 3]
    return logits.softmax(-1) @ POINTS  # [B, 2]


def vp_coeffs(t):
    abar = SCHEDULE.alphas_cumprod[t].reshape(-1, 1)  # [B, 1]
    return abar.sqrt(), (1 - abar).sqrt()


def vp_denoiser(x0_fn, prediction_type):
    def fn(x_t, t):
        a, b = vp_coeffs(t)
        x0 = x0_fn(x_t, a, b)
        return x0 if prediction_type == "sample" else (x_t - a * x0) / b  # ε̂ = (x_t − √ᾱ x̂_0)/√(1−ᾱ)

    return fn


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- agreement with diffusers (clip_sample off, same inputs, same schedule) ------------------------------------------


def _hf(cls, **kwargs):
    sched = cls(clip_sample=False, **kwargs)
    # the schedule is one of the inputs: give diffusers our float64 ᾱ, so the comparison isolates step()
    sched.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(prediction_type, variance_type):
    from diffusers import DDPMScheduler as HFDDPM

    ours = DDPMScheduler(SCHEDULE, prediction_type, variance_type)
    for num_steps in (None, 50):  # every timestep, and diffusers' "leading" subset of 50
        ref = _hf(HFDDPM, prediction_type=prediction_type, variance_type=variance_type)
        timesteps = list(range(999, -1, -1))
        if num_steps:
            ref.set_timesteps(num_steps)
            timesteps = ref.timesteps.tolist()
        for i in (0, 1, len(timesteps) // 2, len(timesteps) - 2, len(timesteps) - 1):
            t = timesteps[i]
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x_t, out = _rand(4, 64, seed=i), _rand(4, 64, seed=100 + i)
            theirs = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(7))
            mine = ours.step(out, t, x_t, prev_t=prev_t, noise=_rand(4, 64, seed=7))
            torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-5, rtol=0)
            torch.testing.assert_close(mine.pred_original_sample, theirs.pred_original_sample, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    from diffusers import DDIMScheduler as HFDDIM

    ours = DDIMScheduler(SCHEDULE, prediction_type, eta)
    for num_steps in (10, 50, 1000):
        ref = _hf(HFDDIM, prediction_type=prediction_type)
        ref.set_timesteps(num_steps)
        timesteps = ref.timesteps.tolist()
        for i in (0, len(timesteps) // 2, len(timesteps) - 1):
            t = timesteps[i]
            x_t, out, z = _rand(4, 64, seed=i), _rand(4, 64, seed=100 + i), _rand(4, 64, seed=200 + i)
            theirs = ref.step(out, t, x_t, eta=eta, variance_noise=z)
            mine = ours.step(out, t, x_t, prev_t=t - 1000 // num_steps, noise=z)
            torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-5, rtol=0)
            torch.testing.assert_close(mine.pred_original_sample, theirs.pred_original_sample, atol=1e-5, rtol=1e-6)


def test_clipping_matches_diffusers():
    from diffusers import DDIMScheduler as HFDDIM
    from diffusers import DDPMScheduler as HFDDPM

    x_t, out = _rand(4, 64, seed=1), _rand(4, 64, seed=2)
    ref = _hf(HFDDPM)
    ref.config.clip_sample = True  # the same schedule, clipping on (diffusers' default)
    theirs = ref.step(out, 900, x_t, generator=torch.Generator().manual_seed(7))
    mine = DDPMScheduler(SCHEDULE, clip_sample=1.0).step(out, 900, x_t, noise=_rand(4, 64, seed=7))
    assert mine.pred_original_sample.abs().max().item() == 1.0
    torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-5, rtol=0)
    ref = _hf(HFDDIM)
    ref.config.clip_sample = True
    ref.set_timesteps(20)
    theirs = ref.step(out, 900, x_t)
    mine = DDIMScheduler(SCHEDULE, clip_sample=1.0).step(out, 900, x_t, prev_t=850)
    torch.testing.assert_close(mine.prev_sample, theirs.prev_sample, atol=1e-5, rtol=0)


def test_final_ddpm_step_adds_no_noise_and_hand_computed_mean():
    """At t = 0 with ε-prediction: x_{−1} = x̂_0 = (x_0' − √(1−ᾱ_0) ε̂)/√ᾱ_0 with ᾱ_0 = 1 − 1e-4, and no noise."""
    x_t, eps = torch.tensor([[0.3, -0.2]]), torch.tensor([[1.0, 2.0]])
    out = DDPMScheduler(SCHEDULE).step(eps, 0, x_t, noise=torch.full((1, 2), 100.0))
    expected = (x_t - math.sqrt(1e-4) * eps) / math.sqrt(1 - 1e-4)
    torch.testing.assert_close(out.prev_sample, expected)
    torch.testing.assert_close(out.pred_original_sample, expected)


# --- invariants -------------------------------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic():
    sched = DDIMScheduler(SCHEDULE, "epsilon", eta=0.0)
    fn = vp_denoiser(finite_x0, "epsilon")
    x_T = _rand(64, 2, seed=3).double()
    steps = inference_timesteps(1000, 20)
    a = sample_loop(fn, sched, steps, x_T, generator=torch.Generator().manual_seed(1))
    b = sample_loop(fn, sched, steps, x_T, generator=torch.Generator().manual_seed(2))
    c = sample_loop(fn, sched, steps, x_T, noises=[torch.full_like(x_T, 9.0)] * len(steps))
    assert torch.equal(a, b) and torch.equal(a, c)
    # and η > 0 is not: different noise, different samples
    noisy = DDIMScheduler(SCHEDULE, "epsilon", eta=1.0)
    d = sample_loop(fn, noisy, steps, x_T, generator=torch.Generator().manual_seed(1))
    e = sample_loop(fn, noisy, steps, x_T, generator=torch.Generator().manual_seed(2))
    assert (d - e).abs().max() > 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_ddim_eta1_over_all_steps_equals_ddpm_fixed_small(prediction_type):
    """DDIM eq. 16 with η = 1 makes σ_t² = β̃_t, and √(1 − ᾱ_{t−1} − β̃_t) ε̂ + √ᾱ_{t−1} x̂_0 is the DDPM posterior
    mean: given the same noise, the two 1000-step chains coincide."""
    fn = vp_denoiser(gaussian_x0, prediction_type)
    x_T = _rand(256, 2, seed=4).double()
    steps = list(range(999, -1, -1))
    noises = [_rand(256, 2, seed=1000 + i).double() for i in range(1000)]
    ddpm = sample_loop(fn, DDPMScheduler(SCHEDULE, prediction_type, "fixed_small"), steps, x_T, noises=noises)
    ddim = sample_loop(fn, DDIMScheduler(SCHEDULE, prediction_type, eta=1.0), steps, x_T, noises=noises)
    torch.testing.assert_close(ddim, ddpm, atol=1e-8, rtol=0)
    # fixed_large is a different chain
    large = sample_loop(fn, DDPMScheduler(SCHEDULE, prediction_type, "fixed_large"), steps, x_T, noises=noises)
    assert (large - ddpm).abs().max() > 1e-2


def test_ve_ddim_step_equals_vp_ddim_after_change_of_variables():
    """y = x/√ᾱ and σ_t² = (1 − ᾱ_t)/ᾱ_t turn VP into VE; with the same x̂_0 the DDIM (η = 0) steps agree:
    y_prev = x̂_0 + (σ_prev/σ_t)(y_t − x̂_0) = x_prev/√ᾱ_prev."""
    g = torch.Generator().manual_seed(5)
    ddim = DDIMScheduler(SCHEDULE, "sample", eta=0.0)
    for t, prev_t in [(999, 979), (500, 499), (300, 100), (20, -1)]:
        x_t = torch.randn(8, 3, generator=g, dtype=torch.float64)
        x0_hat = torch.randn(8, 3, generator=g, dtype=torch.float64)
        vp_prev = ddim.step(x0_hat, t, x_t, prev_t=prev_t).prev_sample
        abar_t, abar_prev = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(prev_t)
        sigma_t, sigma_prev = math.sqrt((1 - abar_t) / abar_t), math.sqrt((1 - abar_prev) / abar_prev)
        y_t = x_t / math.sqrt(abar_t)
        # Nakkiran's form: y_t + λ(μ − y_t) with μ the posterior mean (Claim 2) and λ = σ_t/(σ_prev + σ_t)
        ve_prev = ve_ddim_step(ve_posterior_mean(x0_hat, y_t, sigma_t, sigma_prev), y_t, sigma_t, sigma_prev)
        torch.testing.assert_close(ve_prev, vp_prev / math.sqrt(abar_prev), atol=1e-10, rtol=1e-10)


def test_ve_claim2_mean_and_step_values_by_hand():
    """σ = 2, T = 4: at t = 3/4 -> 2/4, μ = (Δt/t) x̂_0 + (1 − Δt/t) x_t = (1/3)·1 + (2/3)·4 = 3;
    λ = σ_t/(σ_prev + σ_t) = √3/(√2 + √3); the DDPM step adds N(0, σ²Δt) = N(0, 1) (large) or
    σ²Δt (t−Δt)/t = 2/3 (small)."""
    x_t, x0_hat, z = torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([0.5])
    sched = VEScheduler(sigma=2.0, num_train_timesteps=4, target="sample", sampler="ddpm", variance="large")
    out = sched.step(x0_hat, 2, x_t, noise=z)  # index 2 is t = 3/4, index 1 is t = 2/4
    assert out.prev_sample.item() == pytest.approx(3.0 + 1.0 * 0.5)
    small = VEScheduler(2.0, 4, "sample", "ddpm", "small").step(x0_hat, 2, x_t, noise=z)
    assert small.prev_sample.item() == pytest.approx(3.0 + math.sqrt(2 / 3) * 0.5)
    ddim = VEScheduler(2.0, 4, "sample", "ddim").step(x0_hat, 2, x_t)
    lam = math.sqrt(3) / (math.sqrt(2) + math.sqrt(3))
    assert ddim.prev_sample.item() == pytest.approx(4.0 + lam * (3.0 - 4.0))
    assert ddim.prev_sample.item() == pytest.approx(1.0 + math.sqrt(2 / 3) * (4.0 - 1.0))  # x̂_0 + σ_prev/σ_t (x_t − x̂_0)
    # a network that predicts x_{t−Δt} directly: its output is the mean, and x̂_0 is recovered from it
    prev = VEScheduler(2.0, 4, "prev_sample", "ddpm").step(torch.tensor([3.0]), 2, x_t, noise=z)
    assert prev.prev_sample.item() == pytest.approx(3.5)
    assert prev.pred_original_sample.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unit steps"):
        VEScheduler(2.0, 4, "prev_sample", "ddpm").step(torch.tensor([3.0]), 3, x_t, prev_t=1, noise=z)


# --- exact denoisers reproduce the data ---------------------------------------------------------------------------------


def _check_gaussian(x, std=STD, mean_tol=0.05, std_rel_tol=0.06):
    """Tolerance: the mean's standard error is s/√N = 0.011 and the std's is ≈ s/√(2N) (1.6%); the rest is budget
    for the sampler's discretization (DDIM at few steps shrinks the spread by a few percent)."""
    torch.testing.assert_close(x.mean(0), MU, atol=mean_tol, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), std, dtype=torch.float64), rtol=std_rel_tol, atol=0)


def _check_finite(x, point_tol=1e-3, weight_tol=0.04):
    """Every sample lands on a data point, and the points' frequencies match the weights (binomial se ≤ 0.011)."""
    dist = torch.cdist(x, POINTS)  # [N, 3]
    assert dist.min(1).values.max().item() < point_tol
    freq = torch.bincount(dist.argmin(1), minlength=3).double() / x.shape[0]
    torch.testing.assert_close(freq, WEIGHTS, atol=weight_tol, rtol=0)


@pytest.mark.parametrize("sampler,num_steps,prediction_type", [
    ("ddpm", 1000, "epsilon"), ("ddim", 1000, "epsilon"), ("ddim", 100, "sample"),
])
def test_vp_samplers_with_exact_denoiser_reproduce_data(sampler, num_steps, prediction_type):
    sched = (DDPMScheduler(SCHEDULE, prediction_type) if sampler == "ddpm"
             else DDIMScheduler(SCHEDULE, prediction_type, eta=0.0))
    steps = inference_timesteps(1000, num_steps)
    g = torch.Generator().manual_seed(11)
    x = sample_loop(vp_denoiser(gaussian_x0, prediction_type), sched, steps,
                    initial_noise((N, 2), sched, g, torch.float64), generator=g)
    _check_gaussian(x)
    x = sample_loop(vp_denoiser(finite_x0, prediction_type), sched, steps,
                    initial_noise((N, 2), sched, g, torch.float64), generator=g)
    _check_finite(x)


@pytest.mark.parametrize("sampler,variance", [("ddpm", "large"), ("ddpm", "small"), ("ddim", "large")])
def test_ve_samplers_with_exact_denoiser_reproduce_data(sampler, variance):
    """Nakkiran et al.'s samplers, started from the true x_1 = x_0 + N(0, σ²). The paper's DDPM step ("large") also
    adds N(0, σ²Δt) on the last step, so its samples are the data plus that noise: std √(s² + σ²/T)."""
    T, sigma = 1000, 2.0
    sched = VEScheduler(sigma, T, "sample", sampler, variance)

    def fn(x0_fn):
        return lambda x_t, t: x0_fn(x_t, torch.ones(x_t.shape[0], 1, dtype=x_t.dtype),
                                    ve_sigma(t, T, sigma).reshape(-1, 1))

    g = torch.Generator().manual_seed(12)
    x1 = MU + math.sqrt(STD**2 + sigma**2) * torch.randn(N, 2, generator=g, dtype=torch.float64)
    x = sample_loop(fn(gaussian_x0), sched, list(range(T - 1, -1, -1)), x1, generator=g)
    _check_gaussian(x, std=math.sqrt(STD**2 + sigma**2 / T) if variance == "large" and sampler == "ddpm" else STD)
    x1 = POINTS[torch.multinomial(WEIGHTS, N, replacement=True, generator=g)]
    x1 = x1 + sigma * torch.randn(N, 2, generator=g, dtype=torch.float64)
    x = sample_loop(fn(finite_x0), sched, list(range(T - 1, -1, -1)), x1, generator=g)
    if variance == "large" and sampler == "ddpm":  # the last step's N(0, σ²Δt): within 5 std of a point
        _check_finite(x, point_tol=5 * sigma / math.sqrt(T))
    else:
        _check_finite(x)

"""Networks, EMA, data and metrics: values by hand, closed forms and loop references."""

import math

import numpy as np
import pytest
import torch

from posttrain.diffusion.data import digits, load_data, swiss_roll_2d, two_moons
from posttrain.diffusion.ema import EMA
from posttrain.diffusion.losses import denoising_loss
from posttrain.diffusion.metrics import (
    classifier_accuracy,
    digit_scores,
    frechet_distance,
    mmd_rbf,
    sliced_wasserstein,
    train_digit_classifier,
)
from posttrain.diffusion.nets import DiscreteDenoiser, MLPDenoiser, timestep_embedding
from posttrain.errors import ConfigError


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))  # cos 0 = 1, sin 0 = 0
    freqs = [10000 ** (-i / 4) for i in range(4)]  # ω_i = 10000^(−i/(dim/2))
    expected = [math.cos(500 * w) for w in freqs] + [math.sin(500 * w) for w in freqs]
    torch.testing.assert_close(emb[2], torch.tensor(expected), atol=1e-4, rtol=0)


def test_denoisers_shapes_and_zero_init_output():
    net = MLPDenoiser(64, hidden_dim=32, num_layers=2, num_train_timesteps=1000)
    x, t = torch.randn(5, 64), torch.tensor([0, 10, 100, 500, 999])
    assert torch.equal(net(x, t), torch.zeros(5, 64))  # zero-initialized output layer: ε̂ = 0 at the start
    torch.nn.init.normal_(net.out.weight)
    out = net(x, t)
    assert out.shape == (5, 64)
    assert not torch.allclose(out, net(x, t.flip(0)))  # the output depends on t
    disc = DiscreteDenoiser(seq_len=4, num_classes=3, hidden_dim=16, num_train_timesteps=10)
    assert disc(torch.randint(0, 3, (2, 4)), torch.tensor([0, 9])).shape == (2, 4, 3)


def test_denoising_loss_by_hand():
    out = denoising_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]]))
    torch.testing.assert_close(out.per_example_loss, torch.tensor([2.5, 5.0]))  # (1+4)/2, (9+1)/2
    assert out.loss.item() == pytest.approx(3.75)
    with pytest.raises(ValueError, match="differ in shape"):
        denoising_loss(torch.zeros(2, 2), torch.zeros(2, 3))


def test_ema_closed_form():
    """Constant weights w after init w_0: θ_ema after n updates (fixed decay d) = dⁿ w_0 + (1 − dⁿ) w."""
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(0.0)
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.fill_(3.0)
    for _ in range(5):
        ema.update(net)
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(0.9**5 * 1 + (1 - 0.9**5) * 3)
    # with warmup the first decay is min(0.9, 1/10) = 0.1: mostly the new weights
    warm = EMA(torch.nn.Linear(2, 1), decay=0.9)
    assert warm.current_decay() == pytest.approx(0.1)
    target = torch.nn.Linear(2, 1)
    warm.copy_to(target)
    assert torch.equal(target.weight, warm.shadow["weight"])
    restored = EMA(torch.nn.Linear(2, 1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 5 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_data_sets():
    d = digits()
    assert d.train.shape == (1438, 64) and d.test.shape == (359, 64) and d.data_dim == 64 and d.is_image
    assert d.train.min().item() == -1.0 and d.train.max().item() == 1.0  # 0 -> −1, 16 -> 1
    assert set(d.train_labels.tolist()) == set(range(10))
    m = two_moons(1000, seed=3)
    assert m.train.shape == (800, 2) and m.test.shape == (200, 2)
    torch.testing.assert_close(m.train.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.train.std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    assert torch.equal(two_moons(1000, seed=3).train, m.train)  # same seed, same split
    assert swiss_roll_2d(500).train.shape == (400, 2)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_data("cifar")


def test_sliced_wasserstein_of_a_shift_is_the_projected_shift():
    """y = x + m: every projection shifts by θ·m, so SW₂² = mean_θ (θ·m)² exactly, whatever x is."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64)
    m = torch.tensor([0.3, -0.4], dtype=torch.float64)
    dirs = torch.randn(64, 2, generator=g, dtype=torch.float64)
    theta = dirs / dirs.norm(dim=1, keepdim=True)
    expected = math.sqrt(((theta @ m) ** 2).mean().item())
    assert sliced_wasserstein(x, x + m, directions=dirs) == pytest.approx(expected, rel=1e-10)
    assert sliced_wasserstein(x, x[torch.randperm(500, generator=g)], directions=dirs) == pytest.approx(0.0, abs=1e-12)
    # many directions: mean (θ·m)² -> |m|²/2 in 2-D
    assert sliced_wasserstein(x, x + m, num_projections=4000, generator=g) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)


def test_mmd_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 2, generator=g), torch.randn(9, 2, generator=g) + 0.5
    h = (0.5, 1.0)

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s)) for s in h)

    xx = sum(k(x[i], x[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(12) for j in range(9)) / (12 * 9)
    assert mmd_rbf(x, y, bandwidths=h) == pytest.approx(xx + yy - 2 * xy, rel=1e-6)


def test_frechet_distance_closed_forms():
    """Equal covariances: d² = |μ₁ − μ₂|². Diagonal ones: d² = |μ₁ − μ₂|² + Σ (√a_i − √b_i)²."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    cov = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(5.0, abs=1e-8)
    a, b = np.array([4.0, 1.0, 9.0]), np.array([1.0, 1.0, 4.0])
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5.0 + 1 + 0 + 1, abs=1e-8)
    # a general pair against scipy's matrix square root of the product
    from scipy import linalg

    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(50, 3)), rng.normal(size=(40, 3)) @ np.diag([1.0, 2.0, 0.5])
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(c1 + c2 - 2 * np.real(linalg.sqrtm(c1 @ c2)))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)


def test_digit_classifier_scores_real_digits_well_and_noise_badly():
    d = digits()
    clf = train_digit_classifier(d.train, d.train_labels, steps=400)
    assert classifier_accuracy(clf, d.test, d.test_labels) > 0.9
    real = digit_scores(clf, d.test[:180], d.test[180:])
    noise = digit_scores(clf, torch.rand(180, 64) * 2 - 1, d.test[180:])
    assert real.confidence > 0.85 and real.class_entropy > 2.2  # confident, and all ten classes present
    assert noise.frechet > 5 * real.frechet


def test_ve_preconditioning_and_loss_weight_by_hand():
    """σ = 2, T = 4, index k = 0 (t = 1/4): σ_t² = 1, so c_in = c_out = 1/√2, c_skip = 1/2 and λ = (1+1)/1 = 2.
    With F(x) = 1: x̂_0 = x_t/2 + 1/√2; the x_{t−Δt} head at k = 1 (t = 2/4, σ_t² = 2, Δt/t = 1/2) gives
    x_t + ½(x̂_0 − x_t) with x̂_0 = x_t/3 + √(2/3)."""
    from posttrain.diffusion.recipe import make_denoise_fn, ve_loss_weight

    class One(torch.nn.Module):
        def forward(self, x, t):
            self.seen = x
            return torch.ones_like(x)

    net = One()
    x_t = torch.tensor([[3.0, -1.0]])
    fn = make_denoise_fn(net, "ve", 4, 2.0, "sample")
    torch.testing.assert_close(fn(x_t, torch.tensor([0])), x_t / 2 + 2**-0.5)
    torch.testing.assert_close(net.seen, x_t * 2**-0.5)  # c_in x_t
    prev = make_denoise_fn(net, "ve", 4, 2.0, "prev_sample")(x_t, torch.tensor([1]))
    torch.testing.assert_close(prev, x_t + 0.5 * (x_t / 3 + (2 / 3) ** 0.5 - x_t))
    torch.testing.assert_close(ve_loss_weight(torch.tensor([0, 3]), 4, 2.0), torch.tensor([2.0, 5 / 4]))
    assert make_denoise_fn(net, "vp", 4, 2.0) is net  # vp: the network itself

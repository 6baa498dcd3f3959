"""Sample-quality metrics: sliced Wasserstein and MMD for 2-D points; a digits classifier's confidence and a Fréchet
distance on its features (the FID of Heusel et al., arXiv 1706.08500, with a small classifier in place of Inception).

Sliced Wasserstein: Bonneel et al. 2015, SW_p(μ, ν)^p = E_θ[W_p(θ·μ, θ·ν)^p] over unit directions θ; in 1-D,
W_p between two equal-size empirical sets pairs the sorted values. MMD: Gretton et al. 2012, eq. 3 (unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, p: int = 2,
                       generator: torch.Generator | None = None, directions: torch.Tensor | None = None) -> float:
    """SW_p between point sets x [N, d] and y [N, d] (equal sizes), over `num_projections` random unit directions
    (or the given `directions` [P, d]). Returns (mean_θ W_p^p)^(1/p)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    if directions is None:
        directions = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64)
    theta = directions.double() / directions.double().norm(dim=1, keepdim=True)  # [P, d]
    px = (x.double() @ theta.T).sort(dim=0).values  # [N, P]
    py = (y.double() @ theta.T).sort(dim=0).values  # [N, P]
    return float(((px - py).abs() ** p).mean() ** (1.0 / p))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD² with the kernel k(a, b) = Σ_h exp(−‖a − b‖²/(2h²)). x: [N, d], y: [M, d].

    MMD²_u = 1/(N(N−1)) Σ_{i≠j} k(x_i, x_j) + 1/(M(M−1)) Σ_{i≠j} k(y_i, y_j) − 2/(NM) Σ_{i,j} k(x_i, y_j)."""
    x, y = x.double(), y.double()
    N, M = x.shape[0], y.shape[0]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b) ** 2  # [Na, Nb]
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_xx = (kxx.sum() - kxx.diagonal().sum()) / (N * (N - 1))
    term_yy = (kyy.sum() - kyy.diagonal().sum()) / (M * (M - 1))
    return float(term_xx + term_yy - 2 * kxy.mean())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) (Heusel et al., eq. 6; Dowson & Landau 1982).

    Tr (Σ₁Σ₂)^{1/2} is computed as Σ √λ_i of the symmetric PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2}, which has the same
    eigenvalues as Σ₁Σ₂; unlike scipy's sqrtm of the non-symmetric product, this stays real and stable when the
    covariances are singular (ReLU features with dead units)."""
    w, v = np.linalg.eigh(cov1)
    sqrt1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ₁^{1/2}
    inner = np.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and covariance [d, d] (unbiased) of features [N, d]."""
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


class DigitClassifier(nn.Module):
    """64 pixels -> 10 classes; `features` is the penultimate layer the Fréchet distance is measured on."""

    def __init__(self, hidden_dim: int = 128, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [B, feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # [B, 10]


def train_digit_classifier(x: torch.Tensor, labels: torch.Tensor, *, steps: int = 1500, batch_size: int = 128,
                           lr: float = 2e-3, noise_std: float = 0.1, seed: int = 0) -> DigitClassifier:
    """Train on real digits x [N, 64] in [−1, 1] with labels [N]. A little Gaussian input noise makes its
    features less brittle on imperfect samples."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        xb = x[idx] + noise_std * torch.randn(batch_size, x.shape[1], generator=g)
        loss = F.cross_entropy(model(xb), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@dataclass(frozen=True)
class DigitScores:
    confidence: float  # mean max-softmax probability on the samples (1 = every sample looks like a clear digit)
    class_entropy: float  # entropy (nats) of the mean predicted class distribution; log 10 = 2.303 is all classes even
    frechet: float  # Fréchet distance between classifier features of samples and of held-out real digits


@torch.no_grad()
def digit_scores(classifier: DigitClassifier, samples: torch.Tensor, reference: torch.Tensor) -> DigitScores:
    """samples [N, 64], reference [M, 64] (held-out real digits), both in [−1, 1]."""
    probs = classifier(samples.float()).softmax(-1)  # [N, 10]
    marginal = probs.mean(0)  # [10]
    entropy = float(-(marginal * marginal.clamp_min(1e-12).log()).sum())
    mu_s, cov_s = feature_stats(classifier.features(samples.float()))
    mu_r, cov_r = feature_stats(classifier.features(reference.float()))
    return DigitScores(confidence=float(probs.max(-1).values.mean()), class_entropy=entropy,
                       frechet=frechet_distance(mu_s, cov_s, mu_r, cov_r))


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `x` [N, 64] that `classifier` labels as `labels` [N]."""
    return float((classifier(x.float()).argmax(-1) == labels).float().mean())


def two_d_scores(samples: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Sliced W2 (on min(N, M) points of each) and MMD² between samples [N, 2] and held-out points [M, 2]."""
    n = min(samples.shape[0], reference.shape[0])
    g = torch.Generator().manual_seed(seed)
    return {"sliced_w2": sliced_wasserstein(samples[:n], reference[:n], generator=g),
            "mmd2": mmd_rbf(samples[:n], reference[:n])}

"""Small real data for diffusion: scikit-learn's two moons and swiss roll (2-D) and its 8×8 handwritten digits.

All sets are split once, with a fixed seed, into a training part and a held-out part used only by the metrics.
2-D sets are standardized (zero mean, unit variance per axis, statistics of the training part); digits are scaled
from 0..16 to [−1, 1] as Ho et al. scale images (§4, "data scaled to [−1, 1]") and flattened to 64 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from posttrain.errors import ConfigError

DATASETS = ("moons", "swiss_roll", "digits")


@dataclass(frozen=True)
class DiffusionData:
    train: torch.Tensor  # [N_train, data_dim] float32; data_dim = 2 for 2-D sets, 64 for digits
    test: torch.Tensor  # [N_test, data_dim]
    train_labels: torch.Tensor | None  # [N_train] digit classes, None for 2-D sets
    test_labels: torch.Tensor | None  # [N_test]
    name: str

    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def is_image(self) -> bool:
        return self.name == "digits"


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return perm[n_test:], perm[:n_test]


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0, keepdims=True), train.std(0, keepdims=True)
    return (train - mean) / std, (test - mean) / std


def two_moons(n: int = 10000, noise: float = 0.05, seed: int = 0, test_fraction: float = 0.2) -> DiffusionData:
    """The two-moons 2-D dataset: `n` points with Gaussian `noise`, split into train and held-out parts."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    tr, te = _split(n, test_fraction, seed)
    train, test = _standardize(x[tr], x[te])
    return DiffusionData(torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32),
                         None, None, "moons")


def swiss_roll_2d(n: int = 10000, noise: float = 0.5, seed: int = 0, test_fraction: float = 0.2) -> DiffusionData:
    """The (x, z) coordinates of make_swiss_roll: the 2-D spiral seen from above."""
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    tr, te = _split(n, test_fraction, seed)
    train, test = _standardize(x[tr][:, [0, 2]], x[te][:, [0, 2]])
    return DiffusionData(torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32),
                         None, None, "swiss_roll")


def digits(seed: int = 0, test_fraction: float = 0.2) -> DiffusionData:
    """1797 images of 8×8 pixels with values 0..16, scaled to x/8 − 1 ∈ [−1, 1]; flattened to [N, 64]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 8.0 - 1.0  # [N, 64]
    tr, te = _split(len(x), test_fraction, seed)
    return DiffusionData(torch.tensor(x[tr]), torch.tensor(x[te]), torch.tensor(bunch.target[tr]),
                         torch.tensor(bunch.target[te]), "digits")


def load_data(name: str, *, num_samples: int = 10000, seed: int = 0) -> DiffusionData:
    """`name` in DATASETS; num_samples applies to the 2-D sets (digits always has 1797)."""
    if name == "moons":
        return two_moons(num_samples, seed=seed)
    if name == "swiss_roll":
        return swiss_roll_2d(num_samples, seed=seed)
    if name == "digits":
        return digits(seed=seed)
    raise ConfigError(f"key 'dataset': unknown dataset '{name}'; choose one of {list(DATASETS)}")

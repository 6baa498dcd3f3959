"""PNG figures for diffusion runs: the loss curve and sample grids (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def _save(fig, path: str | Path) -> None:
    """Write through a temporary name, so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_loss(rows: Sequence[dict], path: str | Path, key: str = "train/loss") -> None:
    """Loss against step from metrics rows ({"step": s, key: v, ...}), log-scale y, with a running mean."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        steps, values = zip(*pts)
        ax.plot(steps, values, lw=0.8, alpha=0.5, label=key)
        window = max(1, len(values) // 20)
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist() if len(values) >= window else []
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"running mean ({window} points)")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title("training loss")
    _save(fig, path)


def digit_grid(samples: torch.Tensor, nrow: int = 10) -> torch.Tensor:
    """samples [N, 64] in [−1, 1] -> one image [nrow·9−1, ncol·9−1] with 1-pixel blank gaps, values in [0, 1]."""
    n = samples.shape[0]
    ncol = (n + nrow - 1) // nrow
    imgs = ((samples.clamp(-1, 1) + 1) / 2).reshape(n, 8, 8)  # [N, 8, 8]
    grid = torch.zeros(nrow * 9 - 1, ncol * 9 - 1)  # 0 is background (white under gray_r)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = imgs[i]
    return grid


def plot_samples(samples: torch.Tensor, path: str | Path, *, reference: torch.Tensor | None = None,
                 is_image: bool = False, title: str = "samples") -> None:
    """Digits: a 10-row grid of up to 100 samples. 2-D: a scatter of samples over held-out reference points."""
    plot_panels([(title, samples)], path, reference=reference, is_image=is_image)


def plot_panels(panels: Sequence[tuple[str, torch.Tensor]], path: str | Path, *, reference: torch.Tensor | None = None,
                is_image: bool = False, ncols: int | None = None, images_per_panel: int = 100) -> None:
    """Several (title, samples) panels side by side, in rows of `ncols` (default: all in one row).
    Digits panels show the first `images_per_panel` samples in a square-ish grid."""
    ncols = ncols or len(panels)
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, samples) in zip(axes.flat, panels):
        samples = samples.detach().float().cpu()
        if is_image:
            nrow = max(1, round(images_per_panel**0.5))
            ax.imshow(digit_grid(samples[:images_per_panel], nrow=nrow).numpy(), cmap="gray_r", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.axis("off")
        else:
            if reference is not None:
                ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="held-out data")
            ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", label="samples")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    _save(fig, path)


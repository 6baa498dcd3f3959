"""Experiment trackers behind `report_to`: TensorBoard (the default), trackio and Weights & Biases, each optional.

Each tracker receives the run's config once, every logged step's numeric metrics, and the final summary. trackio
and wandb are imported only when asked for; without the package the config is refused before anything loads
(`check_trackers`). wandb honours its own environment (WANDB_MODE=offline writes the run under
`<output_dir>/wandb/` without a network; WANDB_PROJECT names the project, default "posttrain"); trackio is
local-first (TRACKIO_DIR, default ~/.cache/huggingface/trackio; TRACKIO_PROJECT, default "posttrain").
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

TRACKERS = ("tensorboard", "trackio", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
_INSTALL = {"tensorboard": "pip install tensorboard", "trackio": "pip install trackio==0.43.0",
            "wandb": "pip install wandb==0.31.0"}


def check_trackers(report_to: Sequence[str]) -> list[str]:
    """The trackers to use ('none' alone means none); a ConfigError names an unknown one or a missing package."""
    names = [n for n in report_to if n != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"key 'report_to': unknown tracker {name!r}; expected some of {list(TRACKERS)} or none.")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"key 'report_to': {name} is not installed; run `{_INSTALL[name]}` or drop it.")
    return names


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    """Scalars per step; the config and the summary as text."""

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any] | None, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step or None)
        if config is not None and start_step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=repr) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in _numbers(metrics).items():
            self.writer.add_scalar(k, v, step)

    def summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=repr) + "\n```")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """One wandb run per training run, its files under `<output_dir>/wandb/`."""

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any] | None, start_step: int):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), name=run_name,
                              dir=str(output_dir), config=json.loads(json.dumps(config or {}, default=repr)))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_numbers(metrics), step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(json.loads(json.dumps(summary, default=repr)))

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """One trackio run per training run; the summary is logged once more under `summary/`."""

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any] | None, start_step: int):
        import trackio

        self.trackio = trackio
        self.last_step = start_step
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "posttrain"), name=run_name,
                     config=json.loads(json.dumps(config or {}, default=repr)), embed=False)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.last_step = step
        self.trackio.log(_numbers(metrics), step=step)

    def summary(self, summary: dict[str, Any]) -> None:
        numbers = {f"summary/{k}": v for k, v in _numbers(summary).items()}
        if numbers:
            self.trackio.log(numbers, step=self.last_step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "trackio": TrackioTracker, "wandb": WandbTracker}


def open_trackers(report_to: Sequence[str], output_dir: str | Path, *, run_name: str | None = None,
                  config: dict[str, Any] | None = None, start_step: int = 0) -> list[Any]:
    """The trackers named in `report_to`, opened (TensorBoard writes under output_dir/tensorboard)."""
    output_dir = Path(output_dir)
    name = run_name or output_dir.resolve().name
    return [_CLASSES[n](output_dir, name, config, start_step) for n in check_trackers(report_to)]

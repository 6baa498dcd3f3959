"""Metrics to a JSONL file (one object per logged step) and to the trackers in `report_to` (TensorBoard, trackio,
wandb: train/trackers.py), written only on the main process."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import DiskFullError


class MetricsLogger:
    """`log(step, {"loss": ..., ...})` appends `{"step": step, ...}` to `<output_dir>/metrics.jsonl` and sends the
    numbers to the trackers; `close(summary)` hands them the run's final summary.

    On resume the file is truncated to the steps before `start_step`, so a resumed run's log reads as one run;
    lines a kill left truncated or garbled are dropped with a warning instead of stopping the resume.
    `tensorboard=False` drops TensorBoard from `report_to` (the older switch).
    """

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, start_step: int = 0, enabled: bool = True,
                 report_to: Sequence[str] = ("tensorboard",), config: dict[str, Any] | None = None,
                 run_name: str | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._trackers: list[Any] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and self.path.exists():
            kept = [json.dumps(row) for row in read_metrics(self.path) if row.get("step", 0) <= start_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif start_step == 0 and self.path.exists():
            self.path.unlink()
        from posttrain.train.trackers import open_trackers

        names = [n for n in report_to if tensorboard or n != "tensorboard"]
        self._trackers = open_trackers(names, output_dir, run_name=run_name, config=config, start_step=start_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"no space left on device while writing '{self.path}'. The checkpoints "
                                    "written so far are kept; free some space and resume with --resume.") from e
            raise
        for tracker in self._trackers:
            tracker.log(step, clean)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Send the final summary (if given) to the trackers and close them."""
        for tracker in self._trackers:
            if summary is not None:
                tracker.summary({k: _plain(v) for k, v in summary.items()})
            tracker.close()
        self._trackers = []


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; a line that is not a JSON object (truncated by a kill, garbled) is skipped
    with a warning."""
    rows = []
    text = Path(path).read_bytes().decode("utf-8", "replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            logging.getLogger(__name__).warning("%s line %d is damaged (%r...); skipped", path, number, line[:60])
            continue
        rows.append(row)
    return rows


_SUMMARY_KEYS = ("train/loss", "eval/loss", "eval/accuracy", "eval/accuracy_start", "reward/mean", "pass_rate",
                 "reward/score_mean", "train/accuracy", "eval/pairwise_accuracy")


def run_summary_paragraph(command: str, summary: dict[str, Any]) -> str:
    """One paragraph that ends a run: the headline numbers and where the model and the metrics are."""
    final = summary.get("final_dir")
    numbers = [f"{k} {_plain(summary[k]):.4g}" for k in _SUMMARY_KEYS
               if isinstance(_plain(summary.get(k)), (int, float)) and not isinstance(summary.get(k), bool)]
    parts = [f"posttrain {command}: done."]
    if numbers:
        parts.append("Last logged: " + ", ".join(numbers) + ".")
    if final:
        out = Path(final).parent
        parts.append(f"The trained model is in {final} (a Hugging Face folder that transformers loads on its own); "
                     f"metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}, settings in "
                     f"{out / 'run_config.json'}.")
    return " ".join(parts)


def print_run_summary(command: str, summary: dict[str, Any], *, enabled: bool = True) -> None:
    """Print run_summary_paragraph to stderr (on the main process)."""
    if enabled:
        import sys

        print(run_summary_paragraph(command, summary), file=sys.stderr, flush=True)

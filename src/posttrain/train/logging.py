"""Metrics to a JSONL file (one object per logged step) and to TensorBoard, written only on the main process."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from posttrain.train.checkpoint import DiskFullError


class MetricsLogger:
    """`log(step, {"loss": ..., ...})` appends `{"step": step, ...}` to `<output_dir>/metrics.jsonl` and TensorBoard.

    On resume the file is truncated to the steps before `start_step`, so a resumed run's log reads as one run;
    lines a kill left truncated or garbled are dropped with a warning instead of stopping the resume.
    """

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
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
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=start_step or None)
            except ImportError:  # tensorboard is a dependency, but logging must never stop a run
                self._tb = None

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
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


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

"""Wall time per stage of a training step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Wall time per stage (generate, reward, logps, update), like veRL's timing metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block as stage `name` (times of one stage add up until `pop`)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        """{"time/<stage>": seconds, "time/step": their sum} since the last pop."""
        out, self.seconds = {f"time/{k}": v for k, v in self.seconds.items()}, {}
        out["time/step"] = sum(out.values())
        return out

"""Shared by the benchmarks: a model name every side can load from a folder (TRL needs a path)."""

from __future__ import annotations

from pathlib import Path


def model_folder(name: str, tmp: Path) -> str:
    """The embedded default resolves to its cached folder; a tiny spec is saved once to `tmp` so peers can load it."""
    if not name.startswith("tiny"):
        return name
    from posttrain.models import load_model

    model, tokenizer = load_model(name)
    model.save_pretrained(tmp / "tiny")
    tokenizer.save_pretrained(tmp / "tiny")
    return str(tmp / "tiny")


def step_clock():
    """A transformers TrainerCallback recording each optimizer step's wall time in `.times` (seconds)."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    return StepClock()

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
    """A transformers TrainerCallback recording each optimizer step's wall time in `.times` and the process's CPU
    time in `.cpu_times` (seconds; on a shared machine CPU time does not count waiting for a core)."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu_times.append(time.process_time() - self.c0)

    return StepClock()


def run_sides(script: str, child_args: list[str], sides: list[str], rounds: int, env: dict) -> list[dict]:
    """Run `script --child SIDE *child_args` for each side, `rounds` times alternating, each in a fresh subprocess;
    a side prints `RESULT {json}` with `step_seconds`. Returns the results with side, round and the median step time
    over steps 2..N (the first step pays one-time costs)."""
    import json
    import statistics
    import subprocess
    import sys

    runs = []
    for r in range(rounds):
        for side in sides:
            proc = subprocess.run([sys.executable, script, "--child", side, *child_args],
                                  capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            res = json.loads(line[-1][7:])
            res.update(side=side, round=r, median_step_s=statistics.median(res["step_seconds"][1:]))
            runs.append(res)
            print(json.dumps(res), flush=True)
    return runs

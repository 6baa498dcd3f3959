"""Fault injection: an SFT run is SIGKILLed at least 10 times at seeded random points (half of them inside a
checkpoint write, held open by the POSTTRAIN_FAULT_PAUSE hook) and resumed each time. Every checkpoint a resumed
run leaves must equal the uninterrupted run's checkpoint of the same step, the final weights must be bit-identical,
the log must read as one run, and no temporary or half-deleted folder may be left behind.

Runs are forked from the test process (which has already imported torch and transformers), so a start costs
milliseconds instead of seconds."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.logging import read_metrics

STEPS = 10
KILLS = 12


def _start(args: list[str], log: Path, pause_in_checkpoint: bool) -> int:
    """Fork a child that runs `posttrain sft args` and exits with its status."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the run
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if pause_in_checkpoint:
                os.environ["POSTTRAIN_FAULT_PAUSE"] = "checkpoint:30"
            else:
                os.environ.pop("POSTTRAIN_FAULT_PAUSE", None)
            from posttrain.cli import main

            code = main(args)
        except BaseException:  # noqa: BLE001
            code = 99
        os._exit(code)
    return pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _writing(out: Path) -> bool:
    """A checkpoint's temporary folder exists (the run is inside a checkpoint write)."""
    return (out / "checkpoints").is_dir() and any((out / "checkpoints").glob(".step-*.tmp-*"))


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and
            any(m in p.name for m in (".tmp-", ".old-", ".deleting"))]


def test_random_sigkills_then_resume_are_bit_identical_and_leave_no_temporaries(rb, tmp_path):
    data = rb.sft_data(tmp_path)
    common = ["sft", f"train_file={data}", *rb.sft_common, f"max_steps={STEPS}", "save_steps=1",
              "grad_accum_steps=2", "logging_steps=1"]
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert _wait(_start([*common, f"output_dir={ref}", "keep_last=0"], tmp_path / "ref.log", False)) == 0
    duration = time.monotonic() - t0
    reference = {p.name: p for p in list_checkpoints(ref)}
    assert len(reference) == STEPS

    rng = random.Random(1234)
    kills = in_write = campaigns = 0
    while kills < KILLS:  # a campaign: one output folder, killed at random points until its run completes
        campaigns += 1
        assert campaigns <= 6, "runs kept finishing before the kills landed"
        out = tmp_path / f"victim{campaigns}"
        while not (out / "final").exists():
            resume = ["--resume"] if list_checkpoints(out) else []
            inside = kills < KILLS and rng.random() < 0.5
            pid = _start([*common, f"output_dir={out}", "keep_last=2", *resume], tmp_path / "victim.log", inside)
            if inside:  # the hook holds the next checkpoint write open: its temporary folder is half-written
                deadline = time.monotonic() + 60
                while not _writing(out):
                    assert time.monotonic() < deadline, (tmp_path / "victim.log").read_text()[-3000:]
                    time.sleep(0.002)
                os.kill(pid, signal.SIGKILL)
            elif kills < KILLS:
                time.sleep(rng.uniform(0.0, duration / 2))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            code = _wait(pid)
            if code == -signal.SIGKILL:
                kills += 1
                in_write += inside
            else:
                assert code == 0, (tmp_path / "victim.log").read_text()[-3000:]
            # whatever the kill left, every checkpoint under a valid name equals the reference's of that step
            for path in list_checkpoints(out):
                assert rb.same_weights(path, reference[path.name]), path
        assert rb.same_weights(ref / "final", out / "final")
        assert _temporaries(out) == []
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
        assert steps == list(range(1, STEPS + 1))  # the resumed log reads as one run
    assert kills >= 10 and in_write >= 3, (kills, in_write)

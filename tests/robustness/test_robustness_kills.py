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

from posttrain.train.checkpoint import checkpoint_problem, list_checkpoints
from posttrain.train.logging import read_metrics

STEPS = 10
KILLS = 12


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _writing(out: Path) -> bool:
    """A checkpoint's temporary folder exists (the run is inside a checkpoint write)."""
    return (out / "checkpoints").is_dir() and any((out / "checkpoints").glob(".step-*.tmp-*"))


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and
            any(m in p.name for m in (".tmp-", ".old-", ".deleting"))]


def _campaigns(rb, tmp_path: Path, world_size: int, kills_wanted: int, seed: int,
               parallelism: str = "ddp") -> tuple[int, int]:
    """Kill-and-resume campaigns until `kills_wanted` kills landed; every campaign must end bit-identical to an
    uninterrupted run with no temporary folder left. Returns (kills, kills inside a checkpoint write)."""
    data = rb.sft_data(tmp_path)
    common = ["sft", f"train_file={data}", *rb.sft_common, f"max_steps={STEPS}", "save_steps=1",
              "grad_accum_steps=2" if world_size == 1 else "grad_accum_steps=1", "logging_steps=1",
              f"parallelism={parallelism}"]
    sharded = parallelism == "fsdp2"  # dcp checkpoints: compared through the final model and their integrity
    log = tmp_path / "runs.log"
    # one run in this process first: every module a run needs is then imported before the forks, which start in ms
    assert rb.sft(data, tmp_path / "warm", "max_steps=1") == 0
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert rb.wait_runs(rb.start_runs([*common, f"output_dir={ref}", "keep_last=0"], log, False, world_size)) == 0, \
        log.read_text()[-3000:]
    duration = time.monotonic() - t0
    reference = {p.name: p for p in list_checkpoints(ref)}
    assert len(reference) == STEPS

    rng = random.Random(seed)
    kills = in_write = campaigns = 0
    while kills < kills_wanted:  # a campaign: one output folder, killed at random points until its run completes
        campaigns += 1
        assert campaigns <= 6, "runs kept finishing before the kills landed"
        out = tmp_path / f"victim{campaigns}"
        while not (out / "final").exists():
            resume = ["--resume"] if list_checkpoints(out) else []
            inside = kills < kills_wanted and rng.random() < 0.5
            pids = rb.start_runs([*common, f"output_dir={out}", "keep_last=2", *resume], log, inside, world_size)
            if inside:  # the hook holds the next checkpoint write open: its temporary folder is half-written
                deadline = time.monotonic() + 120
                while not _writing(out):
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.002)
                _kill(pids)
            elif kills < kills_wanted:
                time.sleep(rng.uniform(0.0, duration / 2))
                _kill(pids)
            code = rb.wait_runs(pids)
            if code == -signal.SIGKILL:
                kills += 1
                in_write += inside
            else:
                assert code == 0, log.read_text()[-3000:]
            # whatever the kill left, every checkpoint under a valid name equals the reference's of that step
            for path in list_checkpoints(out):
                if sharded:
                    assert checkpoint_problem(path) is None, path
                else:
                    assert rb.same_weights(path, reference[path.name]), path
        assert rb.same_weights(ref / "final", out / "final")
        assert _temporaries(out) == []
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
        assert steps == list(range(1, STEPS + 1))  # the resumed log reads as one run
    print(f"world_size={world_size}: {kills} kills ({in_write} inside a checkpoint write) over {campaigns} "
          f"campaign(s)")
    return kills, in_write


def test_random_sigkills_then_resume_are_bit_identical_and_leave_no_temporaries(rb, tmp_path):
    kills, in_write = _campaigns(rb, tmp_path, world_size=1, kills_wanted=KILLS, seed=1234)
    assert kills >= 10 and in_write >= 3, (kills, in_write)


def test_random_sigkills_of_a_two_process_run(rb, tmp_path):
    """The same for a 2-process data-parallel (DDP, gloo) run: both processes die together, as a job does."""
    kills, in_write = _campaigns(rb, tmp_path, world_size=2, kills_wanted=KILLS, seed=99)
    assert kills >= 10 and in_write >= 3, (kills, in_write)


def test_random_sigkills_of_a_two_process_fsdp2_run(rb, tmp_path):
    """The same for 2 processes under FSDP2, whose checkpoints are sharded DCP folders."""
    kills, in_write = _campaigns(rb, tmp_path, world_size=2, kills_wanted=10, seed=7, parallelism="fsdp2")
    assert kills >= 10 and in_write >= 3, (kills, in_write)

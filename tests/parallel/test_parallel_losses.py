"""The new losses on 2 CPU processes (gloo) against 1 process, through their recipes: two optimizer steps of
GRPO with GSPO / SAPO / DPPO-TV / DPPO-KL / RLOO (μ = 2, so the ratios leave 1 and the clips, gates and masks act),
and of DPO with SimPO / ORPO / IPO on length-averaged log-probs give the same weights and the same logged losses.
One torchrun launch runs every 2-process job (tests/parallel/fsdp2_worker.py, mode `losses`); the references run in pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loss_jobs import LOSS_JOBS, RL_LOSSES, loss_job  # on sys.path: conftest.py
from parallel_jobs import free_port, register_rewards, run_job, write_data
from safetensors.torch import load_file

from posttrain.models.tiny import tiny_model
from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from posttrain.rewards import REWARDS

    root = tmp_path_factory.mktemp("losses")
    data = write_data(root / "data")
    registered = dict(REWARDS)
    register_rewards()
    try:
        for name in LOSS_JOBS:
            run_job(*loss_job(name, data, root / "one", world_size=1))
    finally:  # other tests in this process see the registry as it was
        REWARDS.clear()
        REWARDS.update(registered)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    launch = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}",
                             str(HERE / "fsdp2_worker.py"), str(root / "data"), str(root / "two"), "losses"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    return root


def _rel_diff(a: dict, b: dict) -> float:
    """max over tensors of ||a − b|| / ||a||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


@pytest.mark.parametrize("name", LOSS_JOBS)
def test_two_ranks_equal_one_process(runs, name):
    """2 ranks × half the batch == 1 process with the whole batch: losses per step (1e-5) and weights. Weights get
    1e-5 per element: AdamW divides by √v, so an element whose gradient is ~0 turns float-level differences of the
    all-reduce's summation order into ~1e-6 steps (IPO's large loss shows it on one tiny tensor at step 2)."""
    one = load_file(str(runs / "one" / name / "final" / "model.safetensors"))
    two = load_file(str(runs / "two" / name / "final" / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)
    start = tiny_model().state_dict()
    init = {k: start[k] for k in one if k in start}
    assert len(init) > 5 and _rel_diff(init, {k: one[k] for k in init}) > 1e-3  # the steps moved the weights
    rows = [[r for r in read_metrics(runs / side / name / "metrics.jsonl") if "train/loss" in r]
            for side in ("one", "two")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2]
    for a, b in zip(*rows):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-6)
    if name in RL_LOSSES:  # the second pass was off-policy on both sides
        for side in rows:
            assert any(r["ratio/max"] != 1.0 or r["ratio/min"] != 1.0 for r in side)
        assert all(b["ratio/max"] == pytest.approx(a["ratio/max"], rel=1e-5) for a, b in zip(*rows))


def test_gspo_band_acts_in_this_setting(runs):
    """GSPO's sequence band is narrow enough here that the comparison covers clipped sequences too."""
    rows = [r for r in read_metrics(runs / "one" / "gspo" / "metrics.jsonl") if "train/loss" in r]
    assert max(r["clip_frac"] for r in rows) > 0, rows
    assert torch.isfinite(torch.tensor([r["train/loss"] for r in rows])).all()

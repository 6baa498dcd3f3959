"""posttrain distill on 2 processes (torchrun, gloo) equals 1 process: the final weights, the per-step loss and
divergence, and the held-out metrics, for off-policy token-level forward KL and sequence-level distillation (DDP) and
on-policy reverse KL (DDP and FSDP2); a 2-process FSDP2 run resumed from its step-1 DCP checkpoint ends where the uninterrupted one did; and in one
process the run does not depend on how a step is cut into micro-batches (gradient accumulation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_jobs import config_keys, run_job, write_data
from ports import free_port  # tests/ports.py (tests/conftest.py puts tests/ on sys.path)

from posttrain.models import tiny_model
from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)) for k in a)


def _curve(run_dir: Path, keys=("loss", "divergence", "tokens", "grad_norm", "eval/reverse_kl_seq", "eval/reverse_kl_token")):
    return [{k: r[k] for k in keys if k in r} | {"step": r["step"]} for r in read_metrics(run_dir / "metrics.jsonl")
            if any(k in r for k in keys)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_parallel")
    mp = pytest.MonkeyPatch()  # tiny models only: a cache of this module's own, restored afterwards
    mp.setenv("POSTTRAIN_CACHE", str(root / "cache"))
    try:
        yield _make_runs(root)
    finally:
        mp.undo()


def _make_runs(root: Path) -> Path:
    data = write_data(root / "data")
    for name in ("token", "sequence", "on_policy"):
        run_job(config_keys(name, data, root / "one", world_size=1))
    run_job(config_keys("on_policy", data, root / "one", world_size=1, micro_batch_size=8,
                        output_dir=str(root / "one" / "on_policy_mb8")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    launch = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}",
                             str(HERE / "distill_worker.py"), str(root / "data"), str(root / "two"),
                             str(root / "resumed")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    return root


@pytest.mark.parametrize("one,two", [("token", "token"), ("sequence", "sequence"), ("on_policy", "on_policy"),
                                     ("on_policy", "on_policy_fsdp2")])
def test_two_processes_equal_one_process(runs, one, two):
    a, b = _weights(runs / "one" / one), _weights(runs / "two" / two)
    # 3 AdamW steps at lr 1e-2 amplify float rounding of different batch shapes (measured: 2e-5 token, 5e-5
    # on-policy; 1e-5 between two micro-batch splits in one process); the steps moved the weights > 1e-2
    assert _rel_diff(a, b) <= 2e-4
    start = tiny_model().state_dict()
    assert _rel_diff({k: start[k] for k in a}, a) > 1e-2
    ca, cb = _curve(runs / "one" / one), _curve(runs / "two" / two)
    assert [r["step"] for r in ca] == [r["step"] for r in cb] == [0, 1, 2, 3, 3]
    for ra, rb in zip(ca, cb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra["step"])
    assert ca[-1]["eval/reverse_kl_seq"] > 0 and ca[1]["divergence"] > 0
    if one == "sequence":  # every rank trained on the answers rank 0 decoded, written once
        assert (runs / "two" / two / "teacher_answers.json").read_text() == \
            (runs / "one" / one / "teacher_answers.json").read_text()


def test_micro_batch_split_does_not_change_the_run(runs):
    """1 process: 4 micro-batches of 2 sequences per step or 1 of 8: the same samples, losses and weights."""
    assert _rel_diff(_weights(runs / "one" / "on_policy"), _weights(runs / "one" / "on_policy_mb8")) <= 1e-4
    for ra, rb in zip(_curve(runs / "one" / "on_policy"), _curve(runs / "one" / "on_policy_mb8")):
        assert rb == pytest.approx(ra, rel=1e-4, abs=1e-6)


def test_fsdp2_shards_the_teacher_and_ddp_keeps_it_whole(runs):
    # each rank holds its FSDP2 shard of the frozen teacher (dim-0 shards: half of every tensor, rounded up) and
    # gathers it while scoring; under DDP every rank holds all of it, as one process does
    held = {name: [r["teacher/params_on_rank"] for r in read_metrics(runs / where / name / "metrics.jsonl")
                   if "teacher/params_on_rank" in r] for where, name in
            [("one", "on_policy"), ("two", "on_policy"), ("two", "on_policy_fsdp2")]}
    teacher = tiny_model(seed=1, num_layers=2, init_std=0.3)  # distill_jobs.write_data's teacher
    whole = sum(p.numel() for p in teacher.parameters())
    halves = sum(-(-p.shape[0] // 2) * p[0].numel() for p in teacher.parameters())  # rank 0's shard, which it logs
    assert held["on_policy"] == [whole] * 3 and held["on_policy_fsdp2"] == [halves] * 3
    assert whole / 2 <= halves < 0.51 * whole


def test_two_process_fsdp2_resume_from_dcp_checkpoint_is_exact(runs):
    layout = runs / "two" / "on_policy_fsdp2" / "checkpoints" / "step-00000001" / "layout.json"
    assert layout.exists()  # a sharded (DCP) checkpoint
    assert _rel_diff(_weights(runs / "two" / "on_policy_fsdp2"), _weights(runs / "resumed")) == 0.0  # bit-identical
    steps = [r["step"] for r in read_metrics(runs / "resumed" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]  # the resumed log continues the first one

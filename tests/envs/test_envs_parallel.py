"""Multi-turn GRPO on 2 processes (torchrun, gloo, torch DDP) equals 1 process: the same episodes (per-row seeds, so
what a row samples does not depend on the rank that plays it), the same rewards and environment metrics, the same
held-out accuracy (its rows split across the ranks) and the same weights after 2 steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from envs_helpers import write_env_job
from ports import free_port  # tests/ports.py (tests/conftest.py puts tests/ on sys.path)

from posttrain.config import build_config
from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _curve(run_dir: Path) -> list[dict]:
    skip = ("time/", "tokens_per_s", "loop_seconds")
    return [{k: v for k, v in r.items() if not any(s in k for s in skip)} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_env_grpo_on_two_processes_equals_one_process(tmp_path):
    from posttrain.recipes.grpo import GRPOConfig, run

    run(build_config(GRPOConfig, write_env_job(tmp_path, world_size=1, out_name="one")))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}",
                           str(HERE / "env_parallel_worker.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 2]  # eval at 0; steps; eval at end
    train = [r for r in one if "reward/mean" in r]
    assert all(r["env/turns"] == 2.0 and r["env/obs_tokens"] > 0 for r in train)
    assert any(r["reward/std"] > 0 for r in train)  # the groups differ: there is something to learn
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6, nan_ok=True), (a["step"], k)
    w1, w2 = load_file(str(tmp_path / "one" / "final" / "model.safetensors")), load_file(
        str(tmp_path / "two" / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k] - w2[k]).norm() / w1[k].norm().clamp_min(1e-12)) for k in w1)
    assert diff <= 1e-5

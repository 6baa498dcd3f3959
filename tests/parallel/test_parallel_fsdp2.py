"""FSDP2 on 2 CPU processes (gloo) against 1 process: one step of every recipe gives the same weights, 5-step metric
curves agree, KL is exactly 0 at step 0, SIGKILL + resume is bit-identical, checkpoints move between world sizes
(2 → 1, 1 → 2), FSDP2 holds about half of DDP's per-rank state, and bad launches stop with exit 2 before writing.

One torchrun launch runs every 2-process job (tests/parallel/fsdp2_worker.py); two more run the SIGKILL victim and
its resumption. The 1-process references run in the pytest process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parallel_jobs import free_port, job, register_rewards, run_job, write_data  # on sys.path: conftest.py
from safetensors.torch import load_file

from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

ONE_STEP = ["sft", "dpo", "reward", "grpo", "dapo", "cispo", "ppo"]
FIVE_STEPS = ["sft5", "grpo5", "sft_lora", "scalerl"]  # (the last two: LoRA + activation checkpointing, 2 steps;
# ScaleRL's batch-normalised advantages with the zero-variance filter, dynamic sampling and the pass-rate pool, 3 steps)


def _torchrun(*args: str, timeout: int = 400) -> subprocess.Popen:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen([str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}",
                             str(HERE / "fsdp2_worker.py"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """final/'s weights (and a reward model's scalar head)."""
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    head = run_dir / "final" / "reward_head.safetensors"
    if head.exists():
        # the Bradley-Terry loss depends on r_w − r_l only: the head's bias gets a ~1e-9 rounding-noise gradient that
        # Adam turns into ±lr steps of either sign, so it is left out of the comparison
        weights["head.weight"] = load_file(str(head))["weight"]
    return weights


def _rel_diff(a: dict, b: dict) -> float:
    """max over tensors of ||a − b|| / ||a||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-process references, a 1-process fsdp2 run (torchrun's env for world size 1), and the 2-process launch."""
    from posttrain.rewards import REWARDS

    root = tmp_path_factory.mktemp("fsdp2")
    registered = dict(REWARDS)
    register_rewards()
    try:
        data = write_data(root / "data")
        for name in ONE_STEP + FIVE_STEPS:
            recipe, keys = job(name, data, root / "one", world_size=1)
            run_job(recipe, keys)
    finally:  # other tests in this process see the registry as it was
        REWARDS.clear()
        REWARDS.update(registered)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        recipe, keys = job("sft5", data, root / "fsdp1", world_size=1, parallelism="fsdp2")
        run_job(recipe, keys)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    # the 1 -> 2 run starts from a copy of the 1-process fsdp2 run holding its checkpoints up to step 3
    one2two = root / "one2two"
    shutil.copytree(root / "fsdp1" / "sft5", one2two)
    for late in ("step-00000004", "step-00000005"):
        shutil.rmtree(one2two / "checkpoints" / late)
    shutil.rmtree(one2two / "final")
    hf = max((root / "one" / "sft" / "checkpoints").iterdir())
    launch = _torchrun(str(root / "data"), str(root / "two"), "jobs", str(hf), str(one2two))
    out = launch.communicate(timeout=600)[0]
    assert launch.returncode == 0, out[-4000:]
    return root


@pytest.mark.parametrize("name", ONE_STEP)
def test_one_fsdp2_step_on_two_ranks_equals_one_process(runs, name):
    """2 ranks × half the batch under FSDP2 == 1 process with the whole batch (fp32, relative difference ≤ 1e-5)."""
    from posttrain.models.tiny import tiny_model

    one, two = _weights(runs / "one" / name), _weights(runs / "two" / name)
    assert _rel_diff(one, two) <= 1e-5
    start = tiny_model().state_dict()  # the weights before the step (a reward model's body drops the "model.")
    init = {k: start[k] if k in start else start[f"model.{k}"] for k in one if k in start or f"model.{k}" in start}
    assert len(init) > 5 and _rel_diff(init, {k: one[k] for k in init}) > 1e-3  # the step moved them far more
    # held-out metrics (5 rows: the ranks get unequal numbers of eval micro-batches) agree too
    evals = [[r for r in read_metrics(runs / side / name / "metrics.jsonl") if "eval/loss" in r] for side in ("one", "two")]
    assert len(evals[0]) == len(evals[1])
    for a, b in zip(*evals):
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_one_ddp_step_on_two_ranks_equals_one_process(runs, name):
    """The RL recipes under torchrun with the default parallelism (torch DDP) give the one-process step too."""
    assert _rel_diff(_weights(runs / "one" / name), _weights(runs / "two" / f"{name}_ddp")) <= 1e-5


def _curve(run_dir: Path) -> list[dict]:
    skip = ("time/", "tokens_per_s", "pairs_per_s", "loop_seconds")
    return [{k: v for k, v in r.items() if not any(s in k for s in skip)}
            for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("name", FIVE_STEPS)
def test_metric_curves_match(runs, name):
    one, two = _curve(runs / "one" / name), _curve(runs / "two" / name)
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 2
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert _rel_diff(_weights(runs / "one" / name), _weights(runs / "two" / name)) <= 1e-5


def test_grpo_kl_is_exactly_zero_at_step_zero_on_two_ranks(runs):
    for name in ("grpo", "grpo5"):  # temperature 0.7, kl_coef > 0
        first = next(r for r in read_metrics(runs / "two" / name / "metrics.jsonl") if "kl" in r)
        assert first["step"] == 1 and first["kl"] == 0.0
        assert next(r for r in read_metrics(runs / "one" / name / "metrics.jsonl") if "kl" in r)["kl"] == 0.0


def test_fsdp2_per_rank_state_is_about_half_of_ddp(runs):
    for rank in (0, 1):
        sizes = json.loads((runs / "two" / f"memory-rank{rank}.json").read_text())
        assert sizes["fsdp2"] <= 0.6 * sizes["ddp"], sizes


def test_checkpoints_are_sharded_and_final_is_one_hf_folder(runs):
    ckpt = max((runs / "two" / "sft5" / "checkpoints").iterdir())
    layout = json.loads((ckpt / "layout.json").read_text())
    assert layout == {"format": "dcp", "parallelism": "fsdp2", "world_size": 2, "modules": ["model"]}
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one shard file per rank
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "two" / "sft5" / "final")
    w = _weights(runs / "two" / "sft5")
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], w["model.embed_tokens.weight"])
    ppo = max((runs / "two" / "ppo" / "checkpoints").iterdir())
    assert json.loads((ppo / "layout.json").read_text())["modules"] == ["critic", "model"]


def test_resume_one_to_two_ranks_continues(runs):
    """A 1-process fsdp2 run resumed from step 3 on 2 ranks ends where the 1-process run ended."""
    assert _rel_diff(_weights(runs / "fsdp1" / "sft5"), _weights(runs / "one2two")) <= 1e-5
    steps = [r["step"] for r in read_metrics(runs / "one2two" / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_sigkill_then_resume_is_bit_identical_and_two_to_one_resume(runs, tmp_path):
    victim_root = tmp_path / "victim"
    victim = _torchrun(str(runs / "data"), str(victim_root), "victim")
    out = victim.communicate(timeout=400)[0]
    assert victim.returncode != 0, out[-3000:]
    run_dir = victim_root / "sft5"
    assert not (run_dir / "final").exists()
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000001", "step-00000002", "step-00000003"]  # step 4 never became visible
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(run_dir, two_to_one)
    resumed = _torchrun(str(runs / "data"), str(victim_root), "resume")
    out = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, out[-3000:]
    a, b = _weights(runs / "two" / "sft5"), _weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 2 -> 1: the same checkpoint continued by one process with the whole batch (parallelism ddp, no torchrun)
    data = {p.stem: str(p) for p in (runs / "data").glob("*.jsonl")}
    data["rl"] = str(runs / "data" / "prompts.jsonl")
    recipe, keys = job("sft5", data, tmp_path, world_size=1, output_dir=str(two_to_one))
    run_job(recipe, keys, resume="latest")
    assert _rel_diff(a, _weights(two_to_one)) <= 1e-5
    steps = [r["step"] for r in read_metrics(two_to_one / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_bad_launches_exit_2_and_write_nothing(runs, tmp_path, monkeypatch):
    from posttrain.cli import main

    bad = json.loads((runs / "two" / "bad.json").read_text())
    assert bad == {"split": 2, "split_written": False, "layout": 2, "layout_written": False}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    data = str(runs / "data" / "sft.jsonl")
    assert main(["sft", f"train_file={data}", "model=tiny", "parallelism=zero", f"output_dir={tmp_path / 'a'}"]) == 2
    assert main(["sft", f"train_file={data}", "model=tiny", "parallelism=fsdp2", f"output_dir={tmp_path / 'b'}"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sft", f"train_file={data}", "model=tiny", "parallelism=none", f"output_dir={tmp_path / 'c'}"]) == 2
    assert not any((tmp_path / n).exists() for n in "abc")


def test_accelerate_settings_are_honoured_or_refused(monkeypatch):
    from posttrain.errors import ConfigError
    from posttrain.train.parallel import accelerate_settings

    assert accelerate_settings({}) is None
    assert accelerate_settings({"ACCELERATE_MIXED_PRECISION": "no"})["parallelism"] == "ddp"
    fsdp = accelerate_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true",
                                "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert (fsdp["parallelism"], fsdp["cpu_offload"], fsdp["mixed_precision"]) == ("fsdp2", True, True)
    with pytest.raises(ConfigError, match="torchrun"):
        accelerate_settings({"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ConfigError, match="torchrun"):
        accelerate_settings({"ACCELERATE_MIXED_PRECISION": "fp8"})
    with pytest.raises(ConfigError, match="torchrun"):
        accelerate_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"})

"""1 vs 2 processes on this machine's CPU for SFT and GRPO: throughput ratio and per-rank peak memory, FSDP2 vs DDP.

    python bench/bench_parallel.py [--model tiny:hidden=512,layers=8,heads=8,kv_heads=4,intermediate_size=1536]
                                   [--steps 6] [--out bench/results/parallel.json]

Each side is one `torchrun --nproc_per_node=K` launch of this file in `--worker` mode running the recipe with the same
global batch (SFT: 8 examples per step; GRPO: 4 prompts × G = 4 per step, 16 new tokens): 1 process (parallelism
ddp, which is a no-op there), 2 processes with DDP, 2 processes with FSDP2. Reported per side: the median step time
over steps 2..N (the first pays one-time costs), throughput relative to 1 process, and per rank: the bytes of
parameters + gradients + AdamW state it holds after a step (local shards under FSDP2), its peak RSS up to the end of
the training loop, and its peak RSS over the whole run (which adds the final export: every rank gathers the full
state dict and rank 0 rebuilds a whole model). RSS includes ~0.7 GB of Python + torch + transformers per process,
and every rank builds the whole model before sharding it (no meta-device init), so RSS shows FSDP2's saving only
partly; the state bytes show it exactly. The model is a random SmolLM-shaped network (~25M parameters).

A CPU is not where data parallelism pays: 2 processes share the same cores (here 2 cores shared with other work),
so the ratio measures overhead (gloo collectives, duplicated Python work), not speed-up. The memory column is the
point on a CPU: FSDP2 keeps 1/W of the parameters, gradients and optimizer state per rank.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "parallel"))

SIDES = [("1 process", 1, "ddp"), ("2 processes DDP", 2, "ddp"), ("2 processes FSDP2", 2, "fsdp2")]


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from parallel_jobs import register_rewards, run_job

    from posttrain.train.logging import read_metrics

    register_rewards()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = {k: str(Path(args.data) / f) for k, f in {"sft": "sft.jsonl", "rl": "prompts.jsonl"}.items()}
    out = Path(args.out_dir)
    common = {"model": args.model, "progress": False, "tensorboard": False, "seed": 0, "output_dir": str(out),
              "parallelism": args.parallelism, "max_steps": args.steps}
    if args.recipe == "sft":
        keys = {**common, "train_file": data["sft"], "max_length": 128, "lr": 1e-4, "micro_batch_size": 8 // world,
                "packing": False}
    else:
        keys = {**common, "train_file": data["rl"], "rewards": ["letters"], "num_generations": 4, "prompts_per_step": 4,
                "max_new_tokens": 16, "micro_batch_size": 16, "lr": 1e-5, "eval_size": 0}
    t0 = time.perf_counter()
    step_ends: list[float] = []
    from posttrain.train import logging as tlog

    log = tlog.MetricsLogger.log

    def timed(self, step, metrics):  # wall clock at each logged step (every step is logged)
        step_ends.append(time.perf_counter())
        return log(self, step, metrics)

    tlog.MetricsLogger.log = timed
    state = {"bytes": 0}

    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    def after_step(optimizer, *_):  # this rank's parameters + gradients + optimizer state, after each step
        params = [p for g in optimizer.param_groups for p in g["params"]]
        total = sum(local_bytes(p) for p in params) + sum(local_bytes(p.grad) for p in params if p.grad is not None)
        total += sum(local_bytes(v) for st in optimizer.state.values() for v in st.values()
                     if torch.is_tensor(v) and v.dim() > 0)
        state["bytes"] = max(state["bytes"], total)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(after_step)
    from posttrain.recipes import grpo, sft

    rss_at_end: dict[str, float] = {}

    def memory_then(save):  # the first checkpoint is the final one (save_steps=0): the training loop is over
        def wrapped(*a, **kw):
            if not rss_at_end:
                status = Path("/proc/self/status").read_text().splitlines()
                for line in status:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        rss_at_end[line.split(":")[0]] = int(line.split()[1]) / 1024
            return save(*a, **kw)
        return wrapped

    for module in (sft, grpo):
        module.save_step = memory_then(module.save_step)
    run_job(args.recipe, keys)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    result = {"rank": rank, "wall_s": wall, "peak_rss_mib": peak, "state_mib": state["bytes"] / 2**20,
              "training_peak_rss_mib": rss_at_end.get("VmHWM"), "rss_after_training_mib": rss_at_end.get("VmRSS")}
    if rank == 0:
        rows = [r for r in read_metrics(out / "metrics.jsonl")]
        steps = [r["step"] for r in rows if r["step"] >= 1 and ("train/loss" in r or "reward/mean" in r)]
        result["steps_logged"] = len(steps)
        gaps = [b - a for a, b in itertools.pairwise(step_ends)]
        result["step_times_s"] = gaps
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--recipe", default="sft")
    p.add_argument("--model", default="tiny:hidden=512,layers=8,heads=8,kv_heads=4,intermediate_size=1536")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--parallelism", default="ddp")
    p.add_argument("--data")
    p.add_argument("--out_dir")
    p.add_argument("--result")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel.json"))
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from parallel_jobs import write_data

    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    write_data(tmp / "data")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict = {"model": args.model, "steps": args.steps, "cpus": os.cpu_count(), "sides": {}}
    for recipe in ("sft", "grpo"):
        for label, nproc, parallelism in SIDES:
            name = f"{recipe} / {label}"
            res = tmp / f"{recipe}-{nproc}-{parallelism}"
            cmd = [str(torchrun), f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", __file__, "--worker",
                   "--recipe", recipe, "--model", args.model, "--steps", str(args.steps), "--parallelism", parallelism,
                   "--data", str(tmp / "data"), "--out_dir", str(res), "--result", str(res) + ".json"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-3000:])
                raise SystemExit(f"{name} failed")
            ranks = [json.loads(Path(f"{res}.rank{r}.json").read_text()) for r in range(nproc)]
            step = statistics.median(ranks[0]["step_times_s"][1:])
            results["sides"][name] = {
                "median_step_s": step, "wall_s": ranks[0]["wall_s"],
                "state_mib": [r["state_mib"] for r in ranks],
                "training_peak_rss_mib": [r["training_peak_rss_mib"] for r in ranks],
                "peak_rss_mib": [r["peak_rss_mib"] for r in ranks]}
            print(f"{name:26s} step {step:6.2f} s  params+grads+optim/rank "
                  f"{[round(r['state_mib']) for r in ranks]} MiB  peak RSS in training "
                  f"{[round(r['training_peak_rss_mib']) for r in ranks]} MiB  whole run "
                  f"{[round(r['peak_rss_mib']) for r in ranks]} MiB", flush=True)
        one = results["sides"][f"{recipe} / 1 process"]["median_step_s"]
        for label, _, _ in SIDES[1:]:
            side = results["sides"][f"{recipe} / {label}"]
            side["throughput_vs_1_process"] = one / side["median_step_s"]
        ddp = results["sides"][f"{recipe} / 2 processes DDP"]
        fsdp = results["sides"][f"{recipe} / 2 processes FSDP2"]
        results[f"{recipe}_fsdp2_vs_ddp_state_bytes"] = max(fsdp["state_mib"]) / max(ddp["state_mib"])
        results[f"{recipe}_fsdp2_vs_ddp_training_peak_rss"] = (max(fsdp["training_peak_rss_mib"])
                                                               / max(ddp["training_peak_rss_mib"]))
        results[f"{recipe}_fsdp2_vs_ddp_peak_rss"] = max(fsdp["peak_rss_mib"]) / max(ddp["peak_rss_mib"])
        results[f"{recipe}_fsdp2_vs_ddp_throughput"] = ddp["median_step_s"] / fsdp["median_step_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "sides"}, indent=2))


if __name__ == "__main__":
    main()

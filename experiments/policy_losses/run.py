"""Experiment: GRPO vs GSPO vs DPPO-Binary-TV vs CISPO at the same budget on reasoning-gym chain_sum (the task of
experiments/grpo_arithmetic), embedded SmolLM2-135M-Instruct with LoRA, several seeds.

    python experiments/policy_losses/run.py [--config experiments/policy_losses/config.yaml] [--steps N] [--seeds 0 1]

Per run: held-out greedy accuracy at start and end (eval_size prompts), train reward, clip fraction, step time.
Error bars: the standard error over seeds of the end accuracy, and the binomial standard error of one run's
accuracy on the eval_size held-out prompts. Writes results.json and results.md beside this script; results.json is
rewritten after every run, so a stopped experiment keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from posttrain.config import build_config
from posttrain.recipes.grpo import GRPOConfig, run
from posttrain.train.logging import read_metrics


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--out", default=str(HERE))
    a = p.parse_args()
    spec = yaml.safe_load(Path(a.config).read_text())
    seeds = a.seeds if a.seeds is not None else spec["seeds"]
    out = Path(a.out)
    results: dict = {"common": spec["common"], "seeds": seeds, "runs": {}}
    for seed in seeds:  # seed-major, so that an interrupted run still has every loss at the first seed
        for name, variant in spec["variants"].items():
            values = {**spec["common"], **variant, "seed": seed, "progress": False,
                      "output_dir": str(Path(spec["run_root"]) / f"{name}_s{seed}")}
            if a.steps:
                values["max_steps"] = a.steps
            config = build_config(GRPOConfig, values, source=f"{a.config}:{name}")
            t0 = time.time()
            run(config)
            rows = read_metrics(Path(config.output_dir) / "metrics.jsonl")
            train = [r for r in rows if "reward/mean" in r]
            evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
            results["runs"][f"{name}_s{seed}"] = {
                "loss": config.loss, "seed": seed, "accuracy_start": evals[0][1], "accuracy_end": evals[-1][1],
                "reward_mean": sum(r["reward/mean"] for r in train) / len(train),
                "clip_frac": sum(r.get("clip_frac", 0.0) for r in train) / len(train),
                "seconds_per_update": sum(r.get("time/update", 0.0) for r in train) / len(train),
                "wall_minutes": (time.time() - t0) / 60, "reward_curve": [r["reward/mean"] for r in train],
            }
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            print(name, seed, json.dumps({k: v for k, v in results["runs"][f"{name}_s{seed}"].items()
                                          if k != "reward_curve"}), flush=True)
    write_report(results, out)


def write_report(results: dict, out: Path) -> None:
    """results.md: one row per loss, means ± standard errors over the seeds that finished."""
    n_eval = results["common"]["eval_size"]
    lines = ["# GRPO vs GSPO vs DPPO-TV vs CISPO on chain_sum (SmolLM2-135M-Instruct, LoRA, same budget)\n",
             ("Rerun: `python experiments/policy_losses/run.py` (config: `config.yaml`). Numbers below are from "
             "the committed `results.json`.\n"),
             ("| loss | seeds | held-out acc. start | end (mean ± s.e. over seeds) | Δ acc. | train reward | "
             "clip/mask frac. | s/update |"), "|---|---|---|---|---|---|---|---|"]
    by_loss: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        by_loss.setdefault(r["loss"], []).append(r)
    for loss, runs in by_loss.items():
        start, _ = mean_se([r["accuracy_start"] for r in runs])
        end, end_se = mean_se([r["accuracy_end"] for r in runs])
        delta, delta_se = mean_se([r["accuracy_end"] - r["accuracy_start"] for r in runs])
        reward, reward_se = mean_se([r["reward_mean"] for r in runs])
        clip, _ = mean_se([r["clip_frac"] for r in runs])
        sec, _ = mean_se([r["seconds_per_update"] for r in runs])
        lines.append(f"| {loss} | {len(runs)} | {start:.3f} | {end:.3f} ± {end_se:.3f} | {delta:+.3f} ± {delta_se:.3f}"
                     f" | {reward:.3f} ± {reward_se:.3f} | {clip:.3f} | {sec:.1f} |")
    binom = math.sqrt(0.5 * 0.5 / n_eval)
    lines.append(f"\nOne run's accuracy is measured on {n_eval} held-out prompts: its binomial standard error is at "
                 f"most {binom:.3f}.\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Experiment: GRPO vs GSPO vs DPPO-Binary-TV vs CISPO at the same budget on reasoning-gym chain_sum (the task of
experiments/grpo_arithmetic), embedded SmolLM2-135M-Instruct with LoRA.

    python experiments/policy_losses/run.py                  # base model, every variant, then the report
    python experiments/policy_losses/run.py --only grpo,gspo # some variants (parallel shells may split the list)
    python experiments/policy_losses/run.py --base           # only the base model's accuracy
    python experiments/policy_losses/run.py --render         # results.json + results.md from what finished

Per run: greedy accuracy of the final model on `eval_prompts` held-out prompts (the base model is evaluated once,
not once per run), mean train reward, clip/mask fraction and seconds per update. Error bars: the binomial standard
error of an accuracy on the held-out prompts, and the standard error over seeds when there are several.
Each run writes summary.json into its run folder; --render collects them.
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
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.config import build_config
from posttrain.recipes.grpo import GRPOConfig, run
from posttrain.rewards import build_rewards
from posttrain.train.logging import read_metrics


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def held_out_accuracy(model_name: str, spec: dict) -> tuple[float, int, list[float]]:
    """Greedy accuracy of a model folder (or name) on the held-out prompts of the task, and the per-prompt rewards
    (the same prompts in the same order for every model, so runs can be compared with the base model pairwise)."""
    from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
    from posttrain.models.loading import load_model
    from posttrain.rewards import score_completions

    config = build_config(GRPOConfig, {**spec["common"], "eval_size": spec["eval_prompts"]}, source="eval")
    _, held_out = config.prompt_rows(None, spec["eval_prompts"])
    verifier = build_rewards(config.rewards, config.reward_options, config.reward_timeout_s)[0]
    model, tokenizer = load_model(model_name)
    generator = HFGenerator(model, tokenizer)
    per_prompt: list[float] = []
    for i in range(0, len(held_out), 64):
        chunk = held_out[i:i + 64]
        out = generator.generate(encode_prompts(tokenizer, [r["prompt"] for r in chunk]),
                                 SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0))
        values, _ = score_completions([verifier], [1.0], chunk, out.texts)
        per_prompt += [float(v) for v in values]
    return sum(per_prompt) / len(per_prompt), len(per_prompt), per_prompt


def paired_delta(run: list[float], base: list[float]) -> tuple[float, float]:
    """Mean per-prompt difference run − base and its standard error (paired over the same held-out prompts)."""
    return mean_se([a - b for a, b in zip(run, base)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--only", default=None, help="comma list of variants")
    p.add_argument("--base", action="store_true", help="only evaluate the base model")
    p.add_argument("--render", action="store_true", help="only collect the finished runs into results.*")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=None, help="override the config's seeds")
    a = p.parse_args()
    spec = {**yaml.safe_load(Path(a.config).read_text()), "config_file": Path(a.config).name}
    root = ROOT / spec["run_root"]
    root.mkdir(parents=True, exist_ok=True)
    everything = not (a.only or a.base or a.render)
    if a.base or everything:
        t0 = time.time()
        acc, n, per_prompt = held_out_accuracy(spec["common"]["model"], spec)
        (root / "base.json").write_text(json.dumps({"accuracy": acc, "n": n, "per_prompt": per_prompt,
                                                    "seconds": time.time() - t0}) + "\n")
        print("base", acc, n, flush=True)
    if a.only or everything:
        names = a.only.split(",") if a.only else list(spec["variants"])
        for seed in a.seeds if a.seeds is not None else spec["seeds"]:
            for name in names:
                out_dir = root / f"{name}_s{seed}"
                values = {**spec["common"], **spec["variants"][name], "seed": seed, "progress": False,
                          "eval_size": 0, "output_dir": str(out_dir)}
                if a.steps:
                    values["max_steps"] = a.steps
                config = build_config(GRPOConfig, values, source=f"{a.config}:{name}")
                t0 = time.time()
                summary = run(config)
                train_minutes = (time.time() - t0) / 60
                acc, n, per_prompt = held_out_accuracy(summary["final_dir"], spec)
                rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "reward/mean" in r]
                record = {
                    "loss": config.loss, "seed": seed, "steps": config.max_steps, "accuracy": acc, "n": n,
                    "reward_mean": sum(r["reward/mean"] for r in rows) / len(rows),
                    "clip_frac": sum(r.get("clip_frac", 0.0) for r in rows) / len(rows),
                    "seconds_per_update": sum(r.get("time/update", 0.0) for r in rows) / len(rows),
                    "train_minutes": train_minutes, "reward_curve": [r["reward/mean"] for r in rows],
                    "per_prompt": per_prompt,
                }
                (out_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
                print(name, seed, json.dumps({k: v for k, v in record.items() if k != "reward_curve"}), flush=True)
    if a.render or everything:
        render(spec, root)


def render(spec: dict, root: Path) -> None:
    """results.json and results.md beside this script from base.json and the runs' summary.json files."""
    base = json.loads((root / "base.json").read_text()) if (root / "base.json").exists() else None
    runs = {d.name: json.loads((d / "summary.json").read_text()) for d in sorted(root.iterdir())
            if (d / "summary.json").exists()}
    name = spec.get("results", "results")  # results.json / results.md (and reading.md) or a second setting's names
    (HERE / f"{name}.json").write_text(json.dumps({"config": spec, "base": base, "runs": runs}, indent=2) + "\n")
    c = spec["common"]
    lines = ["# GRPO vs GSPO vs DPPO-TV vs CISPO on chain_sum (SmolLM2-135M-Instruct, LoRA, same budget)\n",
             (f"Rerun: `python experiments/policy_losses/run.py --config experiments/policy_losses/{spec['config_file']}`. "
             "Every loss: "
             f"{c['max_steps']} steps of {c['prompts_per_step']} prompts × {c['num_generations']} samples, "
             f"{c['updates_per_batch']} optimizer passes per batch (so the second pass is off-policy and the clips, "
             f"masks and truncations act), LoRA r={c['lora_r']}, lr {c['lr']}, each loss at its preset's defaults. "
             "Accuracy = greedy accuracy on held-out prompts (± binomial standard error; over seeds when several). "
             "Paired Δ = mean over the same held-out prompts of (run − base model, or run − GRPO's run of the same "
             "seed) per prompt, ± its standard error (for several seeds: of the seed-averaged per-prompt rewards).\n"),
             ("| loss | seeds | held-out accuracy | Δ vs base | paired Δ vs base ± s.e. | paired Δ vs grpo ± s.e. | "
              "train reward (mean over steps) | clip/mask frac. | s/update |"), "|---|---|---|---|---|---|---|---|---|"]
    if base:
        lines.append(f"| base model | | {base['accuracy']:.3f} ± {binomial_se(base['accuracy'], base['n']):.3f} "
                     f"(n={base['n']}) | | | | | | |")
    by_loss: dict[str, list[dict]] = {}
    for r in runs.values():
        by_loss.setdefault(r["loss"], []).append(r)

    def seed_mean(rs: list[dict]) -> list[float] | None:
        """Per-prompt reward averaged over the seeds both sides share (None without per-prompt results)."""
        return [sum(v) / len(v) for v in zip(*(r["per_prompt"] for r in rs))] if all(
            r.get("per_prompt") for r in rs) else None

    grpo_seeds = {r["seed"]: r for r in by_loss.get("grpo", [])}
    for loss, rs in by_loss.items():
        acc, acc_se = mean_se([r["accuracy"] for r in rs])
        if len(rs) == 1:
            acc_se = binomial_se(acc, rs[0]["n"])
        delta = f"{acc - base['accuracy']:+.3f}" if base else ""
        paired = vs_grpo = ""
        mine = seed_mean(rs)
        if base and base.get("per_prompt") and mine:
            d, d_se = paired_delta(mine, base["per_prompt"])
            paired = f"{d:+.3f} ± {d_se:.3f}"
        shared = [r for r in rs if r["seed"] in grpo_seeds]
        if loss != "grpo" and shared and seed_mean(shared):
            theirs = seed_mean([grpo_seeds[r["seed"]] for r in shared])
            if theirs:
                d, d_se = paired_delta(seed_mean(shared), theirs)
                vs_grpo = f"{d:+.3f} ± {d_se:.3f}"
        reward, _ = mean_se([r["reward_mean"] for r in rs])
        clip, _ = mean_se([r["clip_frac"] for r in rs])
        sec, _ = mean_se([r["seconds_per_update"] for r in rs])
        lines.append(f"| {loss} | {len(rs)} | {acc:.3f} ± {acc_se:.3f} (n={rs[0]['n']}) | {delta} | {paired} | "
                     f"{vs_grpo} | {reward:.3f} | {clip:.3f} | {sec:.1f} |")
    reading = HERE / f"{name.replace('results', 'reading')}.md"  # written by hand from the numbers above after a run
    if reading.exists():
        lines += ["", reading.read_text().strip()]
    (HERE / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

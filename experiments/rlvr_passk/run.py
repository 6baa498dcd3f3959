"""What GRPO changes on chain_sum, and RLVR's pass@k effect (Yue et al. 2025, "Does Reinforcement Learning Really
Incentivize Reasoning Capacity in LLMs Beyond the Base Model?", arXiv 2504.13837).

    python experiments/rlvr_passk/run.py [--config experiments/rlvr_passk/config.yaml] [--device cuda]
                                         [--out DIR] [--quick]

1. GRPO (the project's recipe, LoRA) on reasoning-gym chain_sum with the embedded SmolLM2, a checkpoint every
   `eval_every` steps.
2. Every checkpoint (step 0 = the base model) is evaluated on the same held-out problems: greedy accuracy, the
   answer-format rate (last line `Answer: <number>`), and the sampled (temperature 1) accuracy, i.e. pass@1, from
   `samples_per_eval` samples per problem; the sampled train reward comes from the run's metrics.jsonl. So a reader
   sees whether the gain is format or arithmetic.
3. Base and final model: pass@k for k = 1…`samples` from `samples` samples per problem (unbiased estimator, Chen et
   al. 2021), with 95% bootstrap bands over problems. The claim under test (Yue et al.): RL raises pass@1 more than
   pass@k at large k (the curves cross or meet).
4. ScaleRL's sigmoid law (Khatri et al. 2025, Eq. 1) fitted to the held-out pass@1 against cumulative generated
   tokens, on the first half of the evaluations, predicting the second half.

Writes results.json and results.md (and passk.png, curves.png) to --out (default: beside this script).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from posttrain.config import build_config
from posttrain.eval.metrics import pass_at_k
from posttrain.eval.scaling import extrapolation_check
from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
from posttrain.models import load_model
from posttrain.recipes.grpo import GRPOConfig
from posttrain.recipes.grpo import run as run_grpo
from posttrain.rewards import build_reward
from posttrain.rewards.format import answer_line_format_reward
from posttrain.rewards.gym import gym_rows
from posttrain.train.logging import read_metrics


def bootstrap_band(per_problem: np.ndarray, *, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over problems ([B] values), resampling problems."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_problem.size, size=(draws, per_problem.size))
    means = per_problem[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


@torch.no_grad()
def sample_scores(model, tokenizer, rows: list[dict], *, n: int, temperature: float, max_new_tokens: int,
                  verifier, batch_sequences: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Verifier scores [B, n] and format scores [B, n] of n samples per row, and the tokens generated."""
    generator = HFGenerator(model, tokenizer)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    per_chunk = max(1, batch_sequences // n)
    correct, formatted, tokens = [], [], 0
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start:start + per_chunk]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start)
        out = generator.generate(prompts[start:start + per_chunk], params, n=n)
        tokens += out.generated_tokens
        expanded = [row for row in chunk for _ in range(n)]
        columns = {k: [row[k] for row in expanded] for k in expanded[0] if k != "prompt"}
        prompts_col = [row["prompt"] for row in expanded]
        correct.append(np.array(verifier(prompts=prompts_col, completions=out.texts, **columns), dtype=float))
        formatted.append(np.array(answer_line_format_reward(prompts=prompts_col, completions=out.texts), dtype=float))
    return (np.concatenate(correct).reshape(len(rows), n), np.concatenate(formatted).reshape(len(rows), n), tokens)


def load_checkpoint(base: str, saved: Path | None, dtype: str, device: str):
    """The base model (saved=None), a checkpoint's LoRA adapter merged into it, or a checkpoint's full model."""
    if saved is not None and not (saved / "adapter_config.json").exists():
        model, tokenizer = load_model(saved, dtype=dtype, device=device)
        return model.eval(), tokenizer
    model, tokenizer = load_model(base, dtype=dtype, device=device)
    if saved is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(saved)).merge_and_unload()
    return model.eval(), tokenizer


def evaluate(model, tokenizer, rows, cfg: dict, verifier, *, samples: int, seed: int) -> dict[str, Any]:
    greedy, greedy_fmt, _ = sample_scores(model, tokenizer, rows, n=1, temperature=0.0, verifier=verifier,
                                          max_new_tokens=cfg["max_new_tokens"],
                                          batch_sequences=cfg["batch_sequences"], seed=seed)
    sampled, sampled_fmt, tokens = sample_scores(model, tokenizer, rows, n=samples, temperature=1.0,
                                                 verifier=verifier, max_new_tokens=cfg["max_new_tokens"],
                                                 batch_sequences=cfg["batch_sequences"], seed=seed + 7)
    n_problems = len(rows)
    out = {
        "greedy_accuracy": float(greedy.mean()), "greedy_accuracy_se": float(greedy.std() / math.sqrt(n_problems)),
        "greedy_format_rate": float(greedy_fmt.mean()),
        "sampled_accuracy": float(sampled.mean()),
        "sampled_accuracy_se": float(sampled.mean(1).std() / math.sqrt(n_problems)),
        "sampled_format_rate": float(sampled_fmt.mean()),
        "sampled_accuracy_given_format": float(sampled[sampled_fmt == 1].mean()) if sampled_fmt.any() else None,
        "n_problems": n_problems, "samples_per_problem": samples, "sampled_tokens": tokens,
    }
    out["_sampled"] = sampled
    return out


def passk_curve(correct: np.ndarray, ks: list[int]) -> dict[str, list[float]]:
    """pass@k mean and 95% bootstrap band over problems for each k; correct: [B, n] of 0/1."""
    n = correct.shape[1]
    c = correct.sum(1).astype(int)
    mean, lo, hi = [], [], []
    for k in ks:
        per_problem = pass_at_k(n, c, k)  # [B]
        a, b = bootstrap_band(per_problem, seed=k)
        mean.append(float(per_problem.mean()))
        lo.append(a)
        hi.append(b)
    return {"k": ks, "mean": mean, "low": lo, "high": hi}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script end to end")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds after which no further checkpoint is evaluated (base and final always are)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and curves.png from the stored results.json (no model run)")
    a = p.parse_args()
    if a.report_only:
        write_report(json.loads((Path(a.out) / "results.json").read_text()), Path(a.out))
        return
    spec = yaml.safe_load(Path(a.config).read_text())
    cfg = {**spec, **(spec.get("quick", {}) if a.quick else {})}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    grpo = {**cfg["grpo"], "model": cfg["model"], "device": device, "dtype": cfg["dtype"],
            "output_dir": str(Path(cfg["run_root"]) / ("quick" if a.quick else "grpo")), "progress": False,
            "tensorboard": False, "max_steps": cfg["steps"], "save_steps": cfg["eval_every"], "keep_last": 10_000}
    config = build_config(GRPOConfig, grpo, source=f"{a.config}:grpo")
    held_out = gym_rows(config.task, cfg["held_out"], cfg["held_out_seed"], instruction=config.task_instruction,
                        **config.task_kwargs)
    verifier = build_reward("gym", **config.reward_options.get("gym", {}))

    t0 = time.time()
    run_grpo(config)
    train_seconds = time.time() - t0
    metrics = read_metrics(Path(config.output_dir) / "metrics.jsonl")
    train = [r for r in metrics if "reward/mean" in r]

    checkpoints: list[tuple[int, Path | None]] = [(0, None)]
    for folder in sorted((Path(config.output_dir) / "checkpoints").glob("step-*"),
                         key=lambda f: int(f.name.split("-")[1])):
        checkpoints.append((int(folder.name.split("-")[1]), folder / "model"))

    # base and final first (pass@k, item 4), then the checkpoints in between (item 3) while the time budget lasts;
    # results are written after every evaluation, so a cut-short run still leaves what it measured
    order = [checkpoints[0], checkpoints[-1]] + checkpoints[1:-1]
    evaluations, passk = [], {}
    for step, saved in order:
        if evaluations and time.time() - t_start > a.time_budget:
            print(f"time budget of {a.time_budget:.0f} s spent: step {step} and later not evaluated", flush=True)
            break
        model, tokenizer = load_checkpoint(cfg["model"], saved, cfg["dtype"], device)
        ev = evaluate(model, tokenizer, held_out, cfg, verifier, samples=cfg["samples_per_eval"], seed=1234)
        ev.pop("_sampled")
        ev["step"] = step
        window = [r["reward/mean"] for r in train if step - cfg["eval_every"] < r["step"] <= step]
        ev["train_reward_window"] = float(np.mean(window)) if window else None
        evaluations.append(ev)
        print(json.dumps(ev), flush=True)
        if step in (0, checkpoints[-1][0]):
            correct, _, _ = sample_scores(model, tokenizer, held_out, n=cfg["samples"], temperature=1.0,
                                          verifier=verifier, max_new_tokens=cfg["max_new_tokens"],
                                          batch_sequences=cfg["batch_sequences"], seed=99)
            ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= cfg["samples"]]
            passk["base" if step == 0 else "grpo"] = passk_curve(correct, ks)
            print(step, json.dumps(passk["base" if step == 0 else "grpo"]), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        evaluations.sort(key=lambda e: e["step"])
        write_all(out, cfg, device, train_seconds, t_start, train, evaluations, passk)

    # 4. the sigmoid law (item 5) against training steps (every step samples the same number of completions, so
    # steps are proportional to sampling compute), on two curves: the per-step sampled pass rate on the step's
    # training prompts (fresh prompts: 1024 in the pool, 16 a step) and the held-out sampled pass@1
    fit_result: dict[str, Any] = {"compute_unit": "training steps"}
    curves = {"train_pass_rate": (np.array([r["step"] for r in train], dtype=float),
                                  np.array([r["reward/mean"] for r in train])),
              "heldout_pass1": (np.array([e["step"] for e in evaluations], dtype=float),
                                np.array([e["sampled_accuracy"] for e in evaluations]))}
    for name, (compute, rate) in curves.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check = extrapolation_check(compute, rate)
        except ValueError as e:
            fit_result[name] = {"error": str(e)}
            continue
        fit_result[name] = {"early_half_fit": check.fit.to_dict(), "heldout_compute": check.heldout_compute.tolist(),
                            "heldout_rate": check.heldout_rate.tolist(), "predicted": check.predicted.tolist(),
                            "mean_abs_error": check.mean_abs_error, "max_abs_error": check.max_abs_error,
                            "warnings": [str(w.message) for w in caught]}

    write_all(out, cfg, device, train_seconds, t_start, train, evaluations, passk, fit_result)


def write_all(out: Path, cfg: dict, device: str, train_seconds: float, t_start: float, train: list[dict],
              evaluations: list[dict], passk: dict, fit_result: dict | None = None) -> None:
    results = {"config": cfg, "device": device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
               "train_seconds": train_seconds, "total_seconds": time.time() - t_start,
               "train_reward": [[r["step"], r["reward/mean"]] for r in train],
               "evaluations": evaluations, "passk": passk, "sigmoid_fit": fit_result or {}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, evs = results["config"], results["evaluations"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in results["passk"].items():
        ax[0].plot(curve["k"], curve["mean"], marker="o", label=name)
        ax[0].fill_between(curve["k"], curve["low"], curve["high"], alpha=0.2)
    ax[0].set(xscale="log", xlabel="k", ylabel="pass@k", title=f"held-out pass@k ({evs[0]['n_problems']} problems)")
    ax[0].legend()
    steps = [e["step"] for e in evs]
    for key, label in (("greedy_accuracy", "greedy acc."), ("sampled_accuracy", "sampled acc. (T=1)"),
                       ("sampled_format_rate", "format rate (T=1)"), ("train_reward_window", "train reward")):
        ax[1].plot(steps, [e[key] for e in evs], marker="o", label=label)
    ax[1].set(xlabel="GRPO step", title="held-out evaluations")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)

    lines = [
        "# GRPO on chain_sum: format vs arithmetic, and RLVR's pass@k effect\n",
        (f"Generated by `experiments/rlvr_passk/run.py` (config `config.yaml`) on {results['device']}"
        f"{' (' + results['gpu'] + ')' if results['gpu'] else ''}, torch {results['torch']}; "
        f"training {results['train_seconds'] / 60:.1f} min, total {results['total_seconds'] / 60:.1f} min.\n"),
        (f"Model {cfg['model']} ({cfg['dtype']}), LoRA r={cfg['grpo']['lora_r']}, loss {cfg['grpo']['loss']}, "
        f"{cfg['steps']} steps × {cfg['grpo']['prompts_per_step']} prompts × {cfg['grpo']['num_generations']} "
        f"samples, lr {cfg['grpo']['lr']}. Held-out: {evs[0]['n_problems']} chain_sum problems (seed "
        f"{cfg['held_out_seed']}, disjoint generator seed from training).\n"),
        "## Each evaluation\n",
        (f"n = {evs[0]['n_problems']} held-out problems; greedy accuracy ± its standard error over problems; sampled "
         f"columns from {evs[0]['samples_per_problem']} temperature-1 samples per problem "
         f"({evs[0]['n_problems'] * evs[0]['samples_per_problem']} samples), accuracy ± the standard error over "
         "problems; format rates with Wilson 95% intervals over answers; 'given format' counts the formatted "
         f"samples (k/n). Train reward: mean over the steps since the previous evaluation (fresh prompts, "
         f"{cfg['grpo']['prompts_per_step'] * cfg['grpo']['num_generations']} samples a step) ± the standard error "
         "over those steps.\n"),
        ("| step | train reward (window) | greedy acc. | greedy format | sampled acc. T=1 (pass@1) | sampled format "
        "| sampled acc. given format |"),
        "|---|---|---|---|---|---|---|",
    ]
    rewards = {int(step): value for step, value in results["train_reward"]}
    for e in evs:
        window = [v for st, v in rewards.items() if e["step"] - cfg["eval_every"] < st <= e["step"]]
        tr = "—" if not window else (f"{np.mean(window):.3f} ± {np.std(window, ddof=1) / math.sqrt(len(window)):.3f}"
                                     if len(window) > 1 else f"{window[0]:.3f}")
        n, m = e["n_problems"], e["n_problems"] * e["samples_per_problem"]
        formatted = round(e["sampled_format_rate"] * m)
        given = ("—" if e["sampled_accuracy_given_format"] is None else
                 f"{e['sampled_accuracy_given_format']:.3f} "
                 f"({round(e['sampled_accuracy_given_format'] * formatted)}/{formatted})")
        lines.append(f"| {e['step']} | {tr} | {e['greedy_accuracy']:.3f} ± {e['greedy_accuracy_se']:.3f} | "
                     f"{_rate(e['greedy_format_rate'], n)} | {e['sampled_accuracy']:.3f} ± "
                     f"{e['sampled_accuracy_se']:.3f} | {_rate(e['sampled_format_rate'], m)} | {given} |")
    lines += ["", f"Sampled columns use {evs[0]['samples_per_problem']} samples per problem.", "",
              "## pass@k, base vs GRPO (mean and 95% bootstrap band over problems)", "",
              "| k | " + " | ".join(results["passk"]) + " | difference |", "|---|" + "---|" * (len(results["passk"]) + 1)]
    curves = results["passk"]
    if curves:
        for i, k in enumerate(next(iter(curves.values()))["k"]):
            cells = [f"{c['mean'][i]:.3f} [{c['low'][i]:.3f}, {c['high'][i]:.3f}]" for c in curves.values()]
            diff = (f"{curves['grpo']['mean'][i] - curves['base']['mean'][i]:+.3f}"
                    if {"base", "grpo"} <= set(curves) else "—")
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {diff} |")
    fits = results["sigmoid_fit"]
    for name, fit in fits.items():
        if not isinstance(fit, dict) or "early_half_fit" not in fit:
            continue
        f = fit["early_half_fit"]
        lines += ["", f"## ScaleRL's sigmoid law on {name.replace('_', ' ')}", "",
                  (f"Fitted on the first half of the points (compute = {fits['compute_unit']}): A = {f['A']:.3f} ± "
                  f"{f['A_err']:.3f}, B = {f['B']:.2f} ± {f['B_err']:.2f}, C_mid = {f['C_mid']:.3g} ± "
                  f"{f['C_mid_err']:.2g}, R0 = {f['R0']:.3f}; parameters on a search bound: "
                  f"{', '.join(f['at_bounds']) or 'none'}. Predicting the second half: mean |error| "
                  f"{fit['mean_abs_error']:.3f}, max {fit['max_abs_error']:.3f}.")]
    lines += ["", "![curves](curves.png)", ""]
    previous = out / "results.md"  # the hand-written reading below the generated tables is kept
    reading = previous.read_text().split("## Reading", 1) if previous.exists() else []
    if len(reading) == 2:
        lines += ["## Reading" + reading[1].rstrip(), ""]
    previous.write_text("\n".join(lines))


def _rate(value: float, n: int) -> str:
    """A rate over n with its Wilson 95% interval."""
    from posttrain.eval.preservation import wilson

    w = wilson(round(value * n), n)
    return f"{value:.3f} [{w.low:.3f}, {w.high:.3f}]"


if __name__ == "__main__":
    main()

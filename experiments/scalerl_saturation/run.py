"""ScaleRL's sigmoid compute law on GRPO runs that saturate: does a fit on the first half predict the second?

    python experiments/scalerl_saturation/run.py [--config experiments/scalerl_saturation/config.yaml]
                                                 [--report-only]

For each seed: GRPO (the project's recipe) trains a tiny random model on a toy verifiable reward (reward.py: the
share of lowercase letters in the reply, on the three quarters of the prompts that are solvable) until its reward
saturates. Every `eval_every` steps a checkpoint is saved; each is scored afterwards on a fixed held-out prompt set
with `samples` temperature-1 replies per prompt (the mean reward: ScaleRL's held-out pass rate); compute =
completions sampled so far. R_0 is the starting model's held-out reward. `posttrain.eval.scaling.extrapolation_check` fits Eq. 1 of Khatri et al. 2025,
    R_C = R_0 + (A − R_0) / (1 + (C_mid / C)^B),
on the first half of those points and predicts the second half; a flat forecast (the last fitted point carried
forward) is the yardstick. Writes results.json (after every seed), results.md and fits.png beside this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.config import build_config
from posttrain.eval.scaling import extrapolation_check, fit_sigmoid
from posttrain.recipes.grpo import GRPOConfig, run
from posttrain.train.logging import read_metrics


def sampled_reward(model_dir: Path, rows: list[dict], *, samples: int, max_new_tokens: int, seed: int,
                   ) -> tuple[float, float]:
    """Mean reward of `samples` temperature-1 replies per held-out row, and its standard error over rows."""
    from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
    from posttrain.models.loading import load_model

    sys.path.insert(0, str(HERE))
    from reward import lowercase_share

    model, tokenizer = load_model(model_dir)
    out = HFGenerator(model.eval(), tokenizer).generate(
        encode_prompts(tokenizer, [r["prompt"] for r in rows]),
        SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed), n=samples)
    expanded = [r for r in rows for _ in range(samples)]
    scores = np.asarray(lowercase_share([r["prompt"] for r in expanded], out.texts,
                                        solvable=[r["solvable"] for r in expanded])).reshape(len(rows), samples)
    per_row = scores.mean(1)  # [B]
    return float(per_row.mean()), float(per_row.std(ddof=1) / np.sqrt(len(rows)))


def one_seed(cfg: dict, seed: int, source: str) -> dict:
    root = Path(cfg["run_root"])
    prompts = root / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Say something #{i}", "solvable": i % 4 != 3} for i in range(256)]  # 1/4 never rewarded
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = [{"prompt": f"Write anything #{i}", "solvable": i % 4 != 3} for i in range(cfg["held_out"])]
    values = {**cfg["grpo"], "train_file": str(prompts), "eval_size": 0, "save_steps": cfg["eval_every"],
              "keep_last": 100_000, "seed": seed, "output_dir": str(root / f"seed{seed}"), "overwrite": True}
    values["rewards"] = [str(ROOT / r) if ".py:" in r else r for r in values["rewards"]]
    config = build_config(GRPOConfig, values, source=f"{source}:grpo")
    t0 = time.process_time()
    run(config)
    train_cpu = time.process_time() - t0
    train = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward/mean" in r]
    per_step = config.prompts_per_step * config.num_generations
    points = []  # (step, held-out sampled reward, its standard error)
    folders = sorted((Path(config.output_dir) / "checkpoints").glob("step-*"), key=lambda f: int(f.name.split("-")[1]))
    t0 = time.process_time()
    base = sampled_reward_base(config.model, held_out, cfg, seed)
    for folder in folders:
        step = int(folder.name.split("-")[1])
        points.append((step, *sampled_reward(folder / "model", held_out, samples=cfg["samples"],
                                             max_new_tokens=config.max_new_tokens, seed=seed)))
    eval_cpu = time.process_time() - t0
    s = np.asarray([p[0] for p in points], dtype=np.float64)
    r = np.asarray([p[1] for p in points], dtype=np.float64)
    compute = s * per_step  # completions sampled by each checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check = extrapolation_check(compute, r, r0=base[0])
        full = fit_sigmoid(compute, r, r0=base[0])
    flat = np.abs(check.heldout_rate - r[len(r) - len(check.heldout_rate) - 1])  # last fitted point carried on
    return {"seed": seed, "cpu_seconds": train_cpu + eval_cpu, "train_cpu_seconds": train_cpu,
            "steps": [int(x["step"]) for x in train], "rewards": [float(x["reward/mean"]) for x in train],
            "start_rate": base[0], "start_rate_se": base[1],
            "compute": compute.tolist(), "rate": r.tolist(), "rate_se": [p[2] for p in points],
            "completions_per_step": per_step, "early_half_fit": check.fit.to_dict(), "full_fit": full.to_dict(),
            "split_compute": check.split_compute, "predicted": check.predicted.tolist(),
            "mean_abs_error": check.mean_abs_error, "max_abs_error": check.max_abs_error,
            "final_abs_error": check.final_abs_error, "flat_mean_abs_error": float(flat.mean()),
            "flat_final_abs_error": float(flat[-1]), "warnings": [str(w.message) for w in caught]}


def sampled_reward_base(model: str, rows: list[dict], cfg: dict, seed: int) -> tuple[float, float]:
    """The held-out sampled reward of the starting model (R_0 of the law)."""
    from posttrain.models.loading import load_model

    tmp = Path(cfg["run_root"]) / "start_model"
    m, tokenizer = load_model(model)
    m.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return sampled_reward(tmp, rows, samples=cfg["samples"], max_new_tokens=cfg["grpo"]["max_new_tokens"], seed=seed)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--report-only", action="store_true", help="rewrite results.md / fits.png from results.json")
    a = p.parse_args()
    out = HERE / "results.json"
    if a.report_only:
        write_report(json.loads(out.read_text()))
        return
    cfg = yaml.safe_load(Path(a.config).read_text())
    torch.set_num_threads(cfg.get("threads", 1))
    results = {"config": cfg, "torch": torch.__version__, "seeds": []}
    for seed in cfg["seeds"]:
        results["seeds"].append(one_seed(cfg, seed, a.config))
        out.write_text(json.dumps(results, indent=2) + "\n")
        write_report(results)
        last = results["seeds"][-1]
        print(f"seed {seed}: early-half fit predicts the second half with mean |error| {last['mean_abs_error']:.3f} "
              f"(flat forecast {last['flat_mean_abs_error']:.3f})", flush=True)


def _mean_sd(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v.mean():.3f}"


def write_report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.eval.scaling import sigmoid_law

    cfg, seeds = results["config"], results["seeds"]
    g = cfg["grpo"]
    fig, axes = plt.subplots(1, len(seeds), figsize=(4 * len(seeds), 3.2), squeeze=False)
    for ax, r in zip(axes[0], seeds, strict=True):
        c = np.asarray(r["compute"])
        f = r["early_half_fit"]
        grid = np.linspace(c.min(), c.max(), 200)
        ax.errorbar(c, r["rate"], yerr=r["rate_se"], fmt="o", ms=3,
                    label=f"held-out reward ({cfg['held_out']} prompts × {cfg['samples']} samples)")
        ax.plot(grid, sigmoid_law(grid, f["A"], f["B"], f["C_mid"], f["R0"]), "-", label="fit on first half")
        ax.axvline(r["split_compute"], color="gray", ls=":")
        ax.set(xscale="log", xlabel="completions sampled (compute)", ylim=(0, 1.05), title=f"seed {r['seed']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "fits.png", dpi=110)
    plt.close(fig)

    lines = [
        "# ScaleRL's sigmoid law on GRPO runs that saturate\n",
        "Generated by `experiments/scalerl_saturation/run.py` from `config.yaml` (`--report-only` rewrites this file "
        f"from `results.json`); torch {results['torch']}, CPU, {cfg.get('threads', 1)} thread.\n",
        f"Setup: GRPO ({g['loss']}) on posttrain's `tiny` random model (2 layers, width 32, byte vocabulary), "
        f"{g['max_steps']} steps × {g['prompts_per_step']} prompts × {g['num_generations']} samples "
        f"(T = 1, ≤ {g['max_new_tokens']} new tokens), lr {g['lr']}, full fine-tuning; reward = the share of "
        "lowercase letters in the reply on the three quarters of the prompts marked solvable, 0 on the rest "
        "(`reward.py`): a random byte-level model gets ≈ 26/259 · 3/4 and GRPO can take it to 0.75 at most, below "
        "the fit's bound A ≤ 1. The measured rate (one point every "
        f"{cfg['eval_every']} steps) is the mean reward of {cfg['samples']} temperature-1 replies to each of {cfg['held_out']} fixed "
        "held-out prompts (a quarter unsolvable: ceiling 0.75; ± standard error over prompts ≤ "
        f"{max(max(r['rate_se']) for r in seeds):.3f}); compute = completions sampled so far "
        f"({g['prompts_per_step'] * g['num_generations']} a step). `extrapolation_check` fits Eq. 1 (R_0 = the "
        "starting model's held-out reward, grid + least-squares refinement, covariance standard errors) on the first half of the points "
        f"and predicts the second half. {len(seeds)} seeds (sampling and prompt order; the tiny model's initialisation is fixed); across seeds: "
        "mean ± standard deviation.\n",
        "| seed | R at start → end | early-half fit: A | B | C_mid (completions) | on a bound | mean abs. error, 2nd half "
        "| error at the last point | flat forecast: mean abs. error | full-run fit: A | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in seeds:
        f, full = r["early_half_fit"], r["full_fit"]
        lines.append(
            f"| {r['seed']} | {r['start_rate']:.3f} → {r['rate'][-1]:.3f} ± {r['rate_se'][-1]:.3f} | {f['A']:.3f} ± {f['A_err']:.3f} | "
            f"{f['B']:.2f} ± {f['B_err']:.2f} | {f['C_mid']:.0f} ± {f['C_mid_err']:.0f} | "
            f"{', '.join(f['at_bounds']) or 'none'} | {r['mean_abs_error']:.3f} | {r['final_abs_error']:.3f} | "
            f"{r['flat_mean_abs_error']:.3f} | {full['A']:.3f} ± {full['A_err']:.3f} | {r['cpu_seconds']:.0f} |")
    if len(seeds) > 1:
        lines += ["", f"Across the {len(seeds)} seeds: the early-half fit's mean absolute error on the second half "
                  f"{_mean_sd([r['mean_abs_error'] for r in seeds])} (flat forecast "
                  f"{_mean_sd([r['flat_mean_abs_error'] for r in seeds])}); error at the last point "
                  f"{_mean_sd([r['final_abs_error'] for r in seeds])}; fitted asymptote A "
                  f"{_mean_sd([r['early_half_fit']['A'] for r in seeds])} (early half) vs "
                  f"{_mean_sd([r['full_fit']['A'] for r in seeds])} (whole run)."]
    # how the forecast depends on where the fit stops (recomputed from the stored curves; no model run)
    fractions = (0.3, 0.4, 0.5, 0.6, 0.7)
    lines += ["", "Forecast error against the share of points fitted (the rest predicted), mean ± sd over seeds; the "
              "value reached at the split, as a share of the final value, says how far into the saturation the fit "
              "saw:", "", "| points fitted | reached at split | early fit's A | mean abs. error of the forecast | "
              "flat forecast |", "|---|---|---|---|---|"]
    for fraction in fractions:
        errs, flats, a_values, reached = [], [], [], []
        for r in seeds:
            c, y = np.asarray(r["compute"]), np.asarray(r["rate"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check = extrapolation_check(c, y, fraction=fraction, r0=r["start_rate"])
            n_fit = len(y) - len(check.heldout_rate)
            errs.append(check.mean_abs_error)
            flats.append(float(np.abs(check.heldout_rate - y[n_fit - 1]).mean()))
            a_values.append(check.fit.A)
            reached.append(y[n_fit - 1] / y[-1])
        lines.append(f"| {fraction:.0%} | {_mean_sd(reached)} | {_mean_sd(a_values)} | {_mean_sd(errs)} | "
                     f"{_mean_sd(flats)} |")
    warned = sorted({w for r in seeds for w in r["warnings"]})
    if warned:
        lines += ["", "Fit warnings: " + "; ".join(warned)]
    lines += ["", "![fits](fits.png)", ""]
    path = HERE / "results.md"
    previous = path.read_text().split("## Reading", 1) if path.exists() else []
    if len(previous) == 2:
        lines += ["## Reading" + previous[1].rstrip(), ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

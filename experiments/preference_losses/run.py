"""Experiment: DPO vs IPO (length-averaged, as TRL) vs KTO vs ORPO vs SimPO on the identity pairs with the
control-preservation measure (posttrain.eval.preservation), SmolLM2-135M-Instruct with LoRA, same budget.

    python experiments/preference_losses/run.py [--config experiments/preference_losses/config.yaml] [--only dpo,kto]

For the base model and after each method: the identity rate on the 12 held-out identity phrasings, the identity
leak on 24 unrelated control prompts, and the change of the per-token log-likelihood of the base model's own
control answers (each with n and a standard error). Writes results.json (after every run) and results.md; a
(method, seed) already in results.json with the same settings is kept, not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.config import build_config
from posttrain.data.formats import read_rows
from posttrain.data.preference import greedy_replies, mentions_new_identity
from posttrain.eval.metrics import mcnemar_p
from posttrain.eval.preservation import answer_logps, preservation_report, wilson
from posttrain.models.loading import load_model
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.dpo import run as run_dpo
from posttrain.recipes.kto import KTOConfig
from posttrain.recipes.kto import run as run_kto
from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent
BASE_KEYS = ("model", "heldout_file", "control_prompts", "max_new_tokens", "threads")  # what the base measures need


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--only", default=None, help="comma list of methods (default: all)")
    p.add_argument("--render", action="store_true", help="only rewrite results.md from results.json")
    a = p.parse_args()
    main_json = HERE / "results.json"
    if a.render:
        render(merged())
        return
    # a run limited by --only writes its own file, so parallel shells do not overwrite each other's runs
    out_json = HERE / ("results_" + a.only.replace(",", "_") + ".json") if a.only else main_json
    cfg = yaml.safe_load(Path(a.config).read_text())
    torch.set_num_threads(cfg["threads"])
    questions = [r["prompt"] for r in read_rows(ROOT / cfg["heldout_file"])]
    results = {"config": cfg, "runs": {}}
    t0 = time.time()
    base, tokenizer = load_model(cfg["model"])
    control = [[{"role": "user", "content": q}] for q in cfg["control_prompts"]]
    earlier = merged() if main_json.exists() else None
    same_base = earlier and all(earlier["config"].get(k) == cfg.get(k) for k in BASE_KEYS)
    if same_base and earlier.get("base", {}).get("base_control_answers"):
        base_answers = earlier["base"]["base_control_answers"]  # the base model's greedy answers, measured once
    else:
        base_answers = greedy_replies(base, tokenizer, control, max_new_tokens=cfg["max_new_tokens"])
    base_logps = answer_logps(base, tokenizer, control, base_answers)

    def measure(model, tok) -> dict:
        report = preservation_report(model, tok, identity_questions=questions, control_prompts=control,
                                     base_answers=base_answers, base_logps=base_logps,
                                     max_new_tokens=cfg["max_new_tokens"])
        return {**{k: vars(getattr(report, k)) for k in ("identity", "leakage", "unchanged")},
                "control_logp_change": report.control_logp_change,
                "control_logp_change_se": report.control_logp_change_se, "control_tokens": report.control_tokens,
                "identity_answers": report.identity_answers, "control_answers": report.control_answers}

    if earlier and earlier.get("base", {}).get("base_control_answers") == base_answers:
        results["base"] = earlier["base"]
    else:
        results["base"] = {**measure(base, tokenizer), "base_control_answers": base_answers,
                           "seconds": time.time() - t0}
    del base
    only = set(a.only.split(",")) if a.only else None
    later = cfg.get("later", [])  # these methods run after every seed of the others, in this order
    pairs = [(name, seed) for seed in cfg["seeds"] for name in cfg["methods"] if not only or name in only]
    pairs.sort(key=lambda pair: later.index(pair[0]) + 1 if pair[0] in later else 0)
    for name, seed in pairs:
        key, method = f"{name}_s{seed}", cfg["methods"][name]
        if earlier and key in earlier["runs"] and setup(earlier["config"], name) == setup(cfg, name):
            results["runs"][key] = earlier["runs"][key]  # stored with the same settings: not rerun
            continue
        t0, cpu0, started = time.time(), time.process_time(), time.strftime("%H:%M:%S", time.gmtime())
        values = {k: v for k, v in {**cfg["common"], **method}.items() if k != "recipe"}
        values.update(model=cfg["model"], train_file=str(ROOT / cfg["train_file"]), seed=seed,
                      output_dir=str(ROOT / cfg["output_root"] / key))
        cls, run = (KTOConfig, run_kto) if method["recipe"] == "kto" else (DPOConfig, run_dpo)
        config = build_config(cls, values, source=f"{a.config}:{name}")
        summary = run(config)
        train_seconds = time.time() - t0
        model, tok = load_model(summary["final_dir"])
        measured = measure(model, tok)
        rows = read_metrics(Path(config.output_dir) / "metrics.jsonl")
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        results["runs"][key] = {
            "method": name, "seed": seed, **measured, "loss_first": losses[0], "loss_last": losses[-1],
            "train_seconds": train_seconds, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0,
            "started_utc": started, "load_avg_1_5_15": os.getloadavg(),
        }
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        print(key, json.dumps({k: v for k, v in measured.items() if "answers" not in k}), flush=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    render(merged())


def setup(cfg: dict, name: str) -> dict | None:
    """Every setting a (method, seed) result depends on besides its seed; None if cfg has no such method."""
    if name not in cfg["methods"]:
        return None
    return {**{k: cfg.get(k) for k in (*BASE_KEYS, "train_file")}, **cfg["common"], **cfg["methods"][name]}


def merged() -> dict:
    """results.json plus the runs of any results_<methods>.json written by --only shells."""
    results = json.loads((HERE / "results.json").read_text())
    for extra in sorted(HERE.glob("results_*.json")):
        results["runs"].update(json.loads(extra.read_text())["runs"])
    return results


def _rate(r: dict) -> str:
    return f"{r['value']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def _count(rate: dict) -> int:
    """successes of a stored rate (value · n)."""
    return round(rate["value"] * rate["n"])


def _pooled(runs: list[dict], key: str) -> str:
    """k/n over all seeds with its Wilson 95% interval, then the per-seed counts."""
    k, n = sum(_count(r[key]) for r in runs), sum(r[key]["n"] for r in runs)
    return f"{k}/{n} = {_rate(vars(wilson(k, n)))} ({', '.join(str(_count(r[key])) for r in runs)})"


def _mean_se(values: list[float]) -> str:
    """mean ± standard error over seeds, then the per-seed values."""
    if len(values) == 1:
        return f"{values[0]:+.3f} (one seed)"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):+.3f} ± {se:.3f} ({', '.join(f'{v:+.2f}' for v in values)})"


def _mean_cpu(runs: list[dict]) -> str:
    """mean CPU seconds of the runs that recorded it (the first batch's seed-0 runs did not)."""
    cpu = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
    return f"{statistics.mean(cpu):.0f}" if cpu else "—"


def _holm(p: dict) -> dict:
    """Holm's step-down adjusted p-values (Holm 1979) for a family of tests {name: raw p}."""
    adjusted, running = {}, 0.0
    for rank, (name, value) in enumerate(sorted(p.items(), key=lambda kv: kv[1])):
        running = max(running, min(1.0, (len(p) - rank) * value))
        adjusted[name] = running
    return adjusted


def _identity_outcomes(runs: list[dict]) -> dict[tuple[int, int], bool]:
    """(seed, question index) -> did the greedy answer use the new name."""
    return {(r["seed"], i): mentions_new_identity(a) for r in runs for i, a in enumerate(r["identity_answers"])}


def render(results: dict) -> None:
    """results.md from results.json: per method pooled over seeds, paired tests between methods, then every run."""
    cfg = results["config"]
    b = results["base"]
    c = cfg["common"]
    by_method: dict[str, list[dict]] = {}
    for r in sorted(results["runs"].values(), key=lambda r: r["seed"]):
        by_method.setdefault(r["method"], []).append(r)

    def settings(name: str) -> str:
        m = cfg["methods"].get(name, {})
        per_step = f"{m.get('micro_batch_size', '')} {'rows' if m.get('recipe') == 'kto' else 'pairs'}"
        nll = f", NLL {m['sft_weight']}" if m.get("sft_weight") else (", own NLL" if m.get("loss") == "orpo" else "")
        extra = "".join(f", {k} {m[k]}" for k in ("lr", "desirable_weight") if k in m)
        return f"{m.get('loss', 'kto')} β={m.get('beta')}, {per_step}{nll}{extra}"

    lines = ["# DPO vs IPO vs KTO vs ORPO vs SimPO on the identity + control mix, with control preservation\n",
             (f"Rerun: `python experiments/preference_losses/run.py` (config `config.yaml`; runs already in "
              f"results.json with the same settings are kept). {cfg['model']}, LoRA r={c['lora_r']}, lr {c['lr']} "
              f"unless listed, {c['max_steps']} steps on `{cfg['train_file']}`, seeds {cfg['seeds']} (each method's in the table), "
              f"{cfg['threads']} CPU thread; each loss at its paper's β (settings: pairs or unpaired rows "
              "per step, and the weight of the chosen answers' NLL where one is added). Measures from "
              f"`posttrain.eval.preservation`: identity rate on {b['identity']['n']} held-out identity phrasings, "
              f"leakage of the new name into answers to {b['leakage']['n']} unrelated control prompts, the share of "
              "those answers left exactly unchanged, and Δ = change of the log-likelihood of the base model's own "
              f"control answers (nats per answer token, {b['control_tokens']} tokens; 0 = unchanged).\n"),
             "## Per method, over seeds\n",
             ("Rates: k/n pooled over seeds with a Wilson 95% interval (it treats the seeds' answers to the same "
              "questions as independent), then the count of each seed. Δ: mean ± standard error over seeds, then "
              "each seed's value.\n"),
             "| method | settings | seeds | identity | leakage (control) | control answers unchanged | "
             "control Δ log-lik/token | CPU s per run (mean) |",
             "|---|---|---|---|---|---|---|---|",
             (f"| base | | | {_pooled([b], 'identity')} | {_pooled([b], 'leakage')} | {_pooled([b], 'unchanged')} | "
              f"{b['control_logp_change']:+.3f} | |")]
    for name, runs in by_method.items():
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(f"| {name} | {settings(name)} | {seeds} | {_pooled(runs, 'identity')} | "
                     f"{_pooled(runs, 'leakage')} | {_pooled(runs, 'unchanged')} | "
                     f"{_mean_se([r['control_logp_change'] for r in runs])} | "
                     f"{_mean_cpu(runs)} |")
    names = list(by_method)
    tests = {}  # (row, column) -> (row right & column wrong, the reverse, exact McNemar p)
    for i, row in enumerate(names):
        a = _identity_outcomes(by_method[row])
        for col in names[i + 1:]:
            o = _identity_outcomes(by_method[col])
            shared = a.keys() & o.keys()
            gained, lost = sum(a[q] and not o[q] for q in shared), sum(o[q] and not a[q] for q in shared)
            tests[row, col] = (gained, lost, mcnemar_p(gained, lost))
    holm = _holm({pair: p for pair, (_, _, p) in tests.items()})
    lines += ["", "## Identity, method against method (paired by seed and question)\n",
              ("Exact McNemar test on the (seed, question) pairs both methods answered (the pair losses see the same "
               "data order for a seed): row method right and column method wrong / the reverse, raw p, and in bold "
               f"where the difference holds after Holm's correction for all {len(tests)} comparisons (adjusted "
               "p < 0.05).\n"),
              "| | " + " | ".join(names[1:]) + " |", "|---" * len(names) + "|"]
    for i, row in enumerate(names[:-1]):
        cells = [""] * i
        for col in names[i + 1:]:
            gained, lost, p = tests[row, col]
            cell = f"{gained}/{lost}, p={p:.2g}"
            cells.append(f"**{cell}**" if holm[row, col] < 0.05 else cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run\n",
              ("Rates with Wilson 95% intervals; Δ ± one standard error over the control prompts. CPU s: the "
               "process's CPU seconds for the run (not recorded for the seed-0 runs of the first batch); load: the "
               "machine's 1/5/15-minute load average at its end (2 cores).\n"),
              ("| run | settings | identity rate | leakage (control) | control answers unchanged | "
               "control Δ log-lik/token | train loss first → last | train s | wall s | CPU s | load |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_method.items():
        for r in runs:
            load = "/".join(f"{x:.1f}" for x in r["load_avg_1_5_15"]) if "load_avg_1_5_15" in r else "—"
            cpu = f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "—"
            lines.append(f"| {name}_s{r['seed']} | {settings(name)} | {_rate(r['identity'])} | "
                         f"{_rate(r['leakage'])} | {_rate(r['unchanged'])} | "
                         f"{r['control_logp_change']:+.3f} ± {r['control_logp_change_se']:.3f} | "
                         f"{r['loss_first']:.3f} → {r['loss_last']:.3f} | {r['train_seconds']:.0f} | "
                         f"{r['seconds']:.0f} | {cpu} | {load} |")
    lines += ["", "## Greedy answers to the first held-out identity question and the first two control prompts", ""]
    for key, r in [("base", b)] + [(f"{n}_s{r['seed']}", r) for n, runs in by_method.items() for r in runs]:
        lines.append(f"- **{key}**: {r['identity_answers'][0]!r} / {r['control_answers'][0]!r} / "
                     f"{r['control_answers'][1]!r}")
    reading = HERE / "reading.md"  # written by hand from the numbers above after a run
    if reading.exists():
        lines += ["", reading.read_text().strip()]
    notes = [f"- {key}: {r['note']}" for key, r in results["runs"].items() if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Experiment: DPO vs IPO (length-averaged, as TRL) vs KTO vs ORPO vs SimPO on the identity pairs with the
control-preservation measure (posttrain.eval.preservation), SmolLM2-135M-Instruct with LoRA, same budget.

    python experiments/preference_losses/run.py [--config experiments/preference_losses/config.yaml] [--only dpo,kto]

For the base model and after each method: the identity rate on the 12 held-out identity phrasings, the identity
leak on 24 unrelated control prompts, and the change of the per-token log-likelihood of the base model's own
control answers (each with n and a standard error). Writes results.json (after every method) and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.config import build_config
from posttrain.data.formats import read_rows
from posttrain.data.preference import greedy_replies
from posttrain.eval.preservation import answer_logps, preservation_report
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


def render(results: dict) -> None:
    """results.md from results.json."""
    cfg = results["config"]
    b = results["base"]
    c = cfg["common"]
    lines = ["# DPO vs IPO vs KTO vs ORPO vs SimPO on the identity + control mix, with control preservation\n",
             (f"Rerun: `python experiments/preference_losses/run.py` (config `config.yaml`). {cfg['model']}, LoRA "
              f"r={c['lora_r']}, lr {c['lr']}, {c['max_steps']} steps on `{cfg['train_file']}`, seeds {cfg['seeds']}, "
              f"{cfg['threads']} CPU thread; each loss at its paper's β (settings column: pairs or unpaired rows "
              "per step, and the weight of the chosen answers' NLL where one is added). Measures from "
              f"`posttrain.eval.preservation`: identity rate on {b['identity']['n']} held-out identity phrasings, "
              f"leakage of the new name into answers to {b['leakage']['n']} unrelated control prompts, the share of "
              "those answers left exactly unchanged, and Δ = change of the log-likelihood of the base model's own "
              f"control answers (nats per answer token, {b['control_tokens']} tokens; 0 = unchanged). Rates carry "
              "Wilson 95% intervals; Δ ± one standard error over prompts.\n"),
             ("| model | settings | identity rate | leakage (control) | control answers unchanged | "
              "control Δ log-lik/token | train loss first → last | train s |"), "|---|---|---|---|---|---|---|---|",
             (f"| base | | {_rate(b['identity'])} | {_rate(b['leakage'])} | {_rate(b['unchanged'])} | "
              f"{b['control_logp_change']:+.3f} | | |")]
    for key, r in results["runs"].items():
        m = cfg["methods"].get(r["method"], {})
        per_step = f"{m.get('micro_batch_size', '')} {'rows' if m.get('recipe') == 'kto' else 'pairs'}"
        nll = f", NLL {m['sft_weight']}" if m.get("sft_weight") else (", own NLL" if m.get("loss") == "orpo" else "")
        settings = f"{m.get('loss', r['method'])} β={m.get('beta')}, {per_step}{nll}"
        lines.append(f"| {key} | {settings} | {_rate(r['identity'])} | {_rate(r['leakage'])} | "
                     f"{_rate(r['unchanged'])} | {r['control_logp_change']:+.3f} ± {r['control_logp_change_se']:.3f} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "## Greedy answers to the first held-out identity question and the first two control prompts", ""]
    for key, r in [("base", b)] + list(results["runs"].items()):
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

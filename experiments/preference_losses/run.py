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
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.config import build_config
from posttrain.data.formats import read_rows
from posttrain.eval.preservation import control_reference, preservation
from posttrain.models.loading import load_model
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.dpo import run as run_dpo
from posttrain.recipes.kto import KTOConfig
from posttrain.recipes.kto import run as run_kto
from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--only", default=None, help="comma list of methods (default: all)")
    p.add_argument("--render", action="store_true", help="only rewrite results.md from results.json")
    a = p.parse_args()
    out_json = HERE / "results.json"
    if a.render:
        render(json.loads(out_json.read_text()))
        return
    cfg = yaml.safe_load(Path(a.config).read_text())
    torch.set_num_threads(cfg["threads"])
    questions = [r["prompt"] for r in read_rows(ROOT / cfg["heldout_file"])]
    results = json.loads(out_json.read_text()) if out_json.exists() and a.only else {"config": cfg, "runs": {}}
    t0 = time.time()
    base, tokenizer = load_model(cfg["model"])
    reference = control_reference(base, tokenizer, max_new_tokens=cfg["max_new_tokens"])
    report = preservation(base, tokenizer, reference, questions, max_new_tokens=cfg["max_new_tokens"])
    results["base"] = {**report.metrics(), "identity_answers": report.identity_answers,
                       "control_answers": report.control_answers, "seconds": time.time() - t0}
    del base
    only = set(a.only.split(",")) if a.only else None
    for seed in cfg["seeds"]:
        for name, method in cfg["methods"].items():
            if only and name not in only:
                continue
            t0 = time.time()
            values = {k: v for k, v in {**cfg["common"], **method}.items() if k != "recipe"}
            values.update(model=cfg["model"], train_file=str(ROOT / cfg["train_file"]), seed=seed,
                          output_dir=str(ROOT / cfg["output_root"] / f"{name}_s{seed}"))
            cls, run = (KTOConfig, run_kto) if method["recipe"] == "kto" else (DPOConfig, run_dpo)
            config = build_config(cls, values, source=f"{a.config}:{name}")
            summary = run(config)
            train_seconds = time.time() - t0
            model, tok = load_model(summary["final_dir"])
            report = preservation(model, tok, reference, questions, max_new_tokens=cfg["max_new_tokens"])
            rows = read_metrics(Path(config.output_dir) / "metrics.jsonl")
            losses = [r["train/loss"] for r in rows if "train/loss" in r]
            results["runs"][f"{name}_s{seed}"] = {
                "method": name, "seed": seed, **report.metrics(), "identity_answers": report.identity_answers,
                "control_answers": report.control_answers, "loss_first": losses[0], "loss_last": losses[-1],
                "train_seconds": train_seconds, "seconds": time.time() - t0,
            }
            out_json.write_text(json.dumps(results, indent=2) + "\n")
            print(name, seed, json.dumps(report.metrics()), flush=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    render(results)


def render(results: dict) -> None:
    """results.md from results.json."""
    cfg = results["config"]
    b = results["base"]
    lines = ["# DPO vs IPO vs KTO vs ORPO vs SimPO on the identity pairs, with control preservation\n",
             (f"Rerun: `python experiments/preference_losses/run.py` (config `config.yaml`). {cfg['model']}, LoRA "
             f"r={cfg['common']['lora_r']}, lr {cfg['common']['lr']}, {cfg['common']['max_steps']} steps of 12 "
             f"sequences (6 pairs; 12 unpaired rows for KTO), each loss at its paper's β, seeds {cfg['seeds']}, "
             f"{cfg['threads']} CPU thread. Measures from `posttrain.eval.preservation`: identity rate on "
             f"{b['identity_n']} held-out identity phrasings, identity leak on {b['control_n']} unrelated control "
             "prompts, and Δ = change of the per-token log-likelihood of the base model's own control answers "
             "(nats; 0 = unchanged). ± is one standard error (binomial for rates, over prompts for Δ).\n"),
             ("| model | identity rate | identity leak on control prompts | control Δ log-lik/token | "
             "train loss first → last | train s |"), "|---|---|---|---|---|---|",
             (f"| base | {b['identity_rate']:.2f} ± {b['identity_se']:.2f} | {b['control_identity_rate']:.2f} ± "
             f"{b['control_identity_se']:.2f} | {b['control_logp_delta']:+.3f} | | |")]
    for key, r in results["runs"].items():
        lines.append(f"| {key} | {r['identity_rate']:.2f} ± {r['identity_se']:.2f} | {r['control_identity_rate']:.2f} ± "
                     f"{r['control_identity_se']:.2f} | {r['control_logp_delta']:+.3f} ± {r['control_logp_delta_se']:.3f} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "## Greedy answers to the first held-out identity question and the first two control prompts", ""]
    for key, r in [("base", b)] + list(results["runs"].items()):
        lines.append(f"- **{key}**: {r['identity_answers'][0]!r} / {r['control_answers'][0]!r} / "
                     f"{r['control_answers'][1]!r}")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

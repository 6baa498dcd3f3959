"""A DPO identity that leaves the assistant intact: identity rate vs what happens to unrelated prompts.

    python experiments/dpo_identity_control/run.py [--config experiments/dpo_identity_control/config.yaml]
                                                   [--only mix,mix_low_lr]

For the base model and after each variant (posttrain.eval.preservation): identity rate on held-out identity
phrasings; on held-out unrelated prompts, the share of answers that use the new name (leakage), the share equal to
the base model's own answer, and the per-token log-likelihood change of the base model's answers (nats/token;
0 = unchanged behaviour). Targets (the course-examples issue): identity ≥ 90%, leakage ≤ 10%, change ≥ −0.2.
Writes results.json and results.md beside this script; runs go to output_root.
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
from posttrain.eval.preservation import answer_logps, preservation_report
from posttrain.models.loading import load_model
from posttrain.recipes.dpo import DPOConfig, run

HERE = Path(__file__).resolve().parent
TARGETS = {"identity": 0.9, "leakage": 0.1, "control_logp_change": -0.2}


def meets(report: dict) -> bool:
    return (report["identity"]["value"] >= TARGETS["identity"] and report["leakage"]["value"] <= TARGETS["leakage"]
            and report["control_logp_change"] >= TARGETS["control_logp_change"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--only", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model, training and every measure)")
    p.add_argument("--out", default=str(HERE), help="where results.json / results.md go")
    a = p.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(a.config).read_text())
    torch.set_num_threads(cfg.get("threads", 2))
    identity_questions = [r["prompt"] for r in read_rows(ROOT / cfg["identity_heldout"])]
    controls = [r for r in read_rows(ROOT / cfg["control_prompts"]) if r["split"] == "heldout"]
    control_prompts = [r["prompt"] for r in controls]
    base_answers = [r["base_answer"] for r in controls]
    out_path = out_dir / "results.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {"variants": {}}
    results["config"] = cfg
    results["device"] = a.device if a.device == "cpu" else f"{a.device} ({torch.cuda.get_device_name()})"

    base, tokenizer = load_model(cfg["model"], device=a.device)
    base_logps = answer_logps(base.eval(), tokenizer, control_prompts, base_answers)
    if "base" not in results:
        report = preservation_report(base, tokenizer, identity_questions=identity_questions,
                                     control_prompts=control_prompts, base_answers=base_answers,
                                     base_logps=base_logps, max_new_tokens=cfg["max_new_tokens"])
        results["base"] = report.to_dict()
        print("base:", report.summary(), flush=True)
    del base

    names = a.only.split(",") if a.only else list(cfg["variants"])
    for name in names:
        values = {**cfg["common"], **cfg["variants"][name], "model": cfg["model"],
                  "output_dir": str(Path(cfg["output_root"]) / name), "progress": False, "tensorboard": False,
                  "keep_last": 1, "device": a.device}
        values["train_file"] = str(ROOT / values["train_file"])
        config = build_config(DPOConfig, values, source=f"{a.config}:{name}")
        t0 = time.time()
        summary = run(config)
        train_seconds = time.time() - t0
        model, _ = load_model(summary["final_dir"], device=a.device)
        report = preservation_report(model, tokenizer, identity_questions=identity_questions,
                                     control_prompts=control_prompts, base_answers=base_answers,
                                     base_logps=base_logps, max_new_tokens=cfg["max_new_tokens"])
        results["variants"][name] = {"settings": cfg["variants"][name], "train_seconds": train_seconds,
                                     **report.to_dict()}
        results["variants"][name]["meets_targets"] = meets(results["variants"][name])
        print(f"{name}: {report.summary()} ({train_seconds:.0f} s)", flush=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        (out_dir / "results.md").write_text(render(results, [r["prompt"][-1]["content"] for r in controls]))
        del model


def render(results: dict, control_questions: list[str]) -> str:
    def rate(r):
        return f"{r['value']:.0%} [{r['low']:.0%}, {r['high']:.0%}]"

    rows = [("base", results["base"])] + list(results["variants"].items())
    lines = ["# A DPO identity that leaves the assistant intact", "",
             "Generated by `experiments/dpo_identity_control/run.py` from `config.yaml` (rerun to regenerate) on "
             f"{results.get('device', 'cpu')}. "
             f"Model {results['config']['model']}, LoRA r={results['config']['common']['lora_r']}. Identity: "
             f"{results['base']['identity']['n']} held-out identity phrasings. Control: "
             f"{results['base']['leakage']['n']} held-out unrelated prompts "
             f"({results['base']['control_tokens']} tokens of the base model's own answers). Intervals: Wilson 95% "
             "for rates, ± one standard error over prompts for the log-likelihood change.", "",
             "Targets: identity ≥ 90%, leakage ≤ 10%, log-likelihood change ≥ −0.2 nats/token.", "",
             "| run | settings | identity rate | leakage into unrelated answers | unrelated answers unchanged | "
             "base answers' log-lik. change (nats/token) | meets targets |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items() if k != "train_file")
        data = Path(r.get("settings", {}).get("train_file", "")).name
        lines.append(f"| {name} | {data + '; ' if data else ''}{settings} | {rate(r['identity'])} | "
                     f"{rate(r['leakage'])} | {rate(r['unchanged'])} | {r['control_logp_change']:+.3f} ± "
                     f"{r['control_logp_change_se']:.3f} | {'yes' if r.get('meets_targets') else ('—' if name == 'base' else 'no')} |")
    lines += ["", "## A few unrelated prompts, before and after", ""]
    for i in range(min(8, len(control_questions))):
        lines.append(f"**{control_questions[i]}**")
        for name, r in rows:
            lines.append(f"- {name}: {r['control_answers'][i]!r}")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

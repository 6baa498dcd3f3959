"""DPO vs "Idea 0" (maximize log π(y_w) − log π(y_l)) vs "Idea 1" (SFT on winners) on the identity pairs.

    .venv/bin/python experiments/dpo_identity/run.py [--config experiments/dpo_identity/config.yaml] [--only dpo,idea0]

For the base model and after each method, on the 12 held-out identity questions (phrasings never trained on):
- preference accuracy: the share of held-out pairs where the policy ranks the new-identity answer higher,
  (a) by the implicit reward r̂ = β log π/π_ref (TRL's `rewards/accuracies`; ties at the start count as wrong), and
  (b) reference-free, log π(y_w|x) > log π(y_l|x) (meaningful before training too);
- identity rate: the share of greedy answers that use the new name "Pico";
- control drift: mean per-token log-prob, under the trained model, of the base model's own greedy answers to four
  unrelated questions (a healthy model keeps them likely; a degenerate one does not);
- log π(y_w) and log π(y_l) over training (the meltdown of Idea 0 shows here), and greedy samples.
Writes results.json and results.md next to this script (runs go to output_root).
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

from posttrain.data.formats import read_rows
from posttrain.data.pairs import encode_pairs, pair_sequences, sequence_batch, sequence_logps, target_count
from posttrain.data.preference import CONTROL_QUESTIONS, greedy_replies, mentions_new_identity
from posttrain.eval.preservation import wilson
from posttrain.models.forward import TokenLogps
from posttrain.models.loading import load_model
from posttrain.recipes.dpo import DPOConfig, run
from posttrain.train.logging import read_metrics

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def pair_logps(model, tokenizer, rows, max_length: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """log π(y_w|x), log π(y_l|x) of each held-out pair ([N], [N]) and the answers' token counts."""
    pairs, _ = encode_pairs(rows, tokenizer, max_length, "heldout")
    fn = TokenLogps(model.eval())
    chosen, rejected = [], []
    for start in range(0, len(pairs), 6):
        index = list(range(start, min(start + 6, len(pairs))))
        logps = sequence_logps(fn, sequence_batch(pair_sequences(pairs, index), tokenizer.pad_token_id, pack_length=None))
        chosen.append(logps[:len(index)])
        rejected.append(logps[len(index):])
    return (torch.cat(chosen), torch.cat(rejected), [target_count(p["chosen"]) for p in pairs],
            [target_count(p["rejected"]) for p in pairs])


@torch.no_grad()
def control_logp_per_token(model, tokenizer, answers: list[str], max_length: int) -> float:
    """Mean per-token log-prob of fixed answers to the control questions."""
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": a + " ..."}]} for q, a in zip(CONTROL_QUESTIONS, answers)]
    c, _, n, _ = pair_logps(model, tokenizer, rows, max_length)
    return float(c.sum() / sum(n))


def evaluate_model(model, tokenizer, heldout_rows, base_control_answers, cfg) -> dict:
    questions = [r["prompt"] for r in heldout_rows]
    answers = greedy_replies(model, tokenizer, questions, max_new_tokens=cfg["max_new_tokens"])
    control = greedy_replies(model, tokenizer, CONTROL_QUESTIONS, max_new_tokens=cfg["max_new_tokens"])
    c, r, nc, nr = pair_logps(model, tokenizer, heldout_rows, cfg["common"]["max_length"])
    out = {
        "identity_rate": sum(map(mentions_new_identity, answers)) / len(answers),
        "logp_accuracy": float((c > r).float().mean()),
        "logp_per_token_accuracy": float((c / torch.tensor(nc) > r / torch.tensor(nr)).float().mean()),
        "heldout_logps_chosen": float(c.mean()), "heldout_logps_rejected": float(r.mean()),
        "answers": answers, "control_answers": control,
    }
    if base_control_answers is not None:
        out["control_logp_per_token"] = control_logp_per_token(model, tokenizer, base_control_answers,
                                                               cfg["common"]["max_length"])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--only", default=None, help="comma list of methods to run (default: all)")
    p.add_argument("--render", action="store_true", help="only rewrite results.md from results.json")
    a = p.parse_args()
    if a.render:
        stem = Path(a.config).stem
        out = HERE / ("results" if stem == "config" else "results_" + stem.removeprefix("config_"))
        results = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(render(results, read_rows(ROOT / results["config"]["heldout_file"]),
                                                 keep_reading_from=out.with_suffix(".md")))
        return
    cfg = yaml.safe_load(Path(a.config).read_text())
    torch.set_num_threads(cfg["threads"])
    train_file, heldout_file = ROOT / cfg["train_file"], ROOT / cfg["heldout_file"]
    heldout_rows = read_rows(heldout_file)
    out_root = ROOT / cfg["output_root"]
    results: dict = {"config": cfg, "config_file": Path(a.config).name, "methods": {}}
    t0 = time.perf_counter()

    model, tokenizer = load_model(cfg["model"])
    base = evaluate_model(model, tokenizer, heldout_rows, None, cfg)
    base["control_logp_per_token"] = control_logp_per_token(model, tokenizer, base["control_answers"],
                                                            cfg["common"]["max_length"])
    results["base"] = base
    base_control = base["control_answers"]
    del model
    print(f"base: identity {base['identity_rate']:.2f} logp-acc {base['logp_accuracy']:.2f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    methods = cfg["methods"] if a.only is None else {k: cfg["methods"][k] for k in a.only.split(",")}
    for name, overrides in methods.items():
        t1 = time.perf_counter()
        overrides = dict(overrides)
        start = overrides.pop("start_from", None)  # another method's final model: π_0 = π_ref = that model
        model_name = str(out_root / start / "final") if start else cfg["model"]
        config = DPOConfig(train_file=str(train_file), eval_file=str(heldout_file), model=model_name,
                           output_dir=str(out_root / name), progress=False, tensorboard=False, overwrite=True,
                           **{**cfg["common"], **overrides})
        config.validate()
        summary = run(config)
        train_seconds = time.perf_counter() - t1
        model, tokenizer = load_model(summary["final_dir"])
        res = evaluate_model(model, tokenizer, heldout_rows, base_control, cfg)
        del model
        metrics = read_metrics(out_root / name / "metrics.jsonl")
        res["trajectory"] = [{"step": m["step"], "logps/chosen": m["train/logps/chosen"],
                              "logps/rejected": m["train/logps/rejected"], "loss": m["train/loss"],
                              "rewards/accuracies": m["train/rewards/accuracies"]}
                             for m in metrics if "train/loss" in m]
        res["eval"] = [{k: v for k, v in m.items() if k == "step" or k.startswith("eval/")}
                       for m in metrics if "eval/loss" in m]
        res["implicit_reward_accuracy"] = summary["eval/rewards/accuracies"]
        res["implicit_reward_margin"] = summary["eval/rewards/margins"]
        res["train_seconds"] = train_seconds
        results["methods"][name] = res
        print(f"{name}: identity {res['identity_rate']:.2f} implicit-acc {res['implicit_reward_accuracy']:.2f} "
              f"logp-acc {res['logp_accuracy']:.2f} control {res['control_logp_per_token']:.3f} "
              f"({train_seconds:.0f}s train)", flush=True)

    results["seconds"] = time.perf_counter() - t0
    stem = Path(a.config).stem  # config.yaml -> results.*, config_X.yaml -> results_X.*
    out = HERE / ("results" if stem == "config" else "results_" + stem.removeprefix("config_"))
    if a.only is not None and out.with_suffix(".json").exists():  # merge a partial rerun into earlier results
        old = json.loads(out.with_suffix(".json").read_text())
        old["methods"].update(results["methods"])
        results = {**old, "config": cfg, "base": results["base"], "methods": old["methods"],
                   "seconds": old["seconds"] + results["seconds"]}
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(render(results, heldout_rows, keep_reading_from=out.with_suffix(".md")))
    print(f"wrote {out.with_suffix('.md')} ({results['seconds']:.0f}s)")


def render(results: dict, heldout_rows, keep_reading_from: Path | None = None) -> str:
    """The results tables; a hand-written "## Reading" section of an existing file is carried over."""
    cfg, base, methods = results["config"], results["base"], results["methods"]
    reading = ""
    if keep_reading_from is not None and keep_reading_from.exists() and "## Reading" in keep_reading_from.read_text():
        text = keep_reading_from.read_text()
        reading = "\n" + text[text.index("## Reading"):]
    lines = ["# DPO vs Idea 0 vs Idea 1 on the identity pairs", "",
             f"Generated by `experiments/dpo_identity/run.py` from `{results.get('config_file', 'config.yaml')}` "
             f"(model {cfg['model']}, LoRA r="
             f"{cfg['common']['lora_r']}, lr {cfg['common']['lr']}, β {cfg['common']['beta']}, "
             f"{cfg['common']['max_steps']} steps × {cfg['common']['micro_batch_size']} pairs, "
             f"{cfg['threads']} CPU thread). Held-out = {len(heldout_rows)} question phrasings never trained on; rates "
             f"carry Wilson 95% intervals over those n = {len(heldout_rows)}; one seed per method. The control "
             f"log-prob (per token, pooled over the answers; per-question values were not stored, so it has no "
             f"interval) covers {len(CONTROL_QUESTIONS)} unrelated questions only: "
             "`experiments/dpo_identity_control` measures what each run does to 59 held-out unrelated prompts.", "",
             "| model | held-out implicit-reward acc | held-out logp acc (log π(y_w) > log π(y_l)) | per-token logp acc "
             "| identity rate (greedy answers say \"Pico\") | control log-prob/token | log π(y_w) | log π(y_l) |",
             "|---|---|---|---|---|---|---|---|"]

    n = len(heldout_rows)

    def rate(x: float) -> str:  # a rate over the n held-out phrasings with its Wilson 95% interval
        w = wilson(round(x * n), n)
        return f"{x:.2f} [{w.low:.2f}, {w.high:.2f}]"

    def row(name, r, implicit):
        return (f"| {name} | {implicit} | {rate(r['logp_accuracy'])} | {rate(r['logp_per_token_accuracy'])} | "
                f"{rate(r['identity_rate'])} | {r['control_logp_per_token']:.3f} | {r['heldout_logps_chosen']:.1f} | "
                f"{r['heldout_logps_rejected']:.1f} |")

    lines.append(row("base", base, "0.00 (all ties)"))
    for name, r in methods.items():
        ref = cfg["methods"][name].get("start_from", "base")
        lines.append(row(name, r, f"{rate(r['implicit_reward_accuracy'])} (margin {r['implicit_reward_margin']:.2f}; "
                                  f"π_ref = {ref})"))
    lines += ["", "## log π(y_w) and log π(y_l) over training (train batch means, summed over answer tokens)", ""]
    steps = sorted({t["step"] for r in methods.values() for t in r["trajectory"]})
    pick = [s for s in steps if s == 1 or s % 3 == 0]
    lines.append("| step | " + " | ".join(f"{n} log π(y_w) | {n} log π(y_l)" for n in methods) + " |")
    lines.append("|---|" + "---|---|" * len(methods))
    for s in pick:
        cells = []
        for r in methods.values():
            t = next((t for t in r["trajectory"] if t["step"] == s), None)
            cells += [f"{t['logps/chosen']:.1f}", f"{t['logps/rejected']:.1f}"] if t else ["", ""]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Held-out pairs during training: mean log π(y_w) / log π(y_l) (recipe eval)", "",
              "| method | evaluations (step: log π(y_w) / log π(y_l)) |", "|---|---|"]
    for name, r in methods.items():
        lines.append(f"| {name} | " + "; ".join(
            f"{e['step']}: {e['eval/logps/chosen']:.1f} / {e['eval/logps/rejected']:.1f}" for e in r["eval"]) + " |")
    lines += ["", "## Greedy answers to held-out identity questions", ""]
    for i, row_ in enumerate(heldout_rows[:4]):
        lines.append(f"**{row_['prompt'][0]['content']}**")
        lines.append(f"- base: {base['answers'][i]!r}")
        for name, r in methods.items():
            lines.append(f"- {name}: {r['answers'][i]!r}")
        lines.append("")
    lines += ["## Greedy answers to control questions (not about identity)", ""]
    for i, q in enumerate(CONTROL_QUESTIONS):
        lines.append(f"**{q}**")
        lines.append(f"- base: {base['control_answers'][i]!r}")
        for name, r in methods.items():
            lines.append(f"- {name}: {r['control_answers'][i]!r}")
        lines.append("")
    lines.append(f"Total time {results['seconds']:.0f} s; training "
                 + ", ".join(f"{n} {r['train_seconds']:.0f} s" for n, r in methods.items()) + ".")
    return "\n".join(lines) + "\n" + reading


if __name__ == "__main__":
    main()

"""Experiment: tool use on reasoning-gym multi-digit multiplication with the embedded SmolLM2-135M-Instruct.

    python experiments/tool_use/run.py [--config experiments/tool_use/config.yaml] [--eval-size N] [--steps N]

Four conditions on the same held-out problems, each scored by the task's own scorer (posttrain.eval):
(a) no tools: greedy chain-of-thought answer; (b) ReAct prompting with a calculator (frozen model, the controller runs
the tool); (c) after a short SFT on a few scripted tool-use demonstrations (observation tokens masked out of the loss);
(d) after tool-use GRPO from (c) (`posttrain grpo env=tools`). Reports accuracy ± standard error, tool-call validity
(valid calls / attempted calls) and the compute each stage spent. Results are written after every stage.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from posttrain.config import build_config
from posttrain.envs import ToolEnv
from posttrain.envs.rl import episode_sequences
from posttrain.eval.preservation import wilson
from posttrain.eval.runner import evaluate
from posttrain.eval.tasks import make_task
from posttrain.generation.episodes import EpisodeBudget, Episodes, EpisodeSampler, play_scripted
from posttrain.generation.strategies import DecodeOptions
from posttrain.losses.sft import sft_loss
from posttrain.models import apply_lora, load_model
from posttrain.models.forward import TokenLogps
from posttrain.recipes.grpo import GRPOConfig
from posttrain.recipes.grpo import run as grpo_run
from posttrain.rewards.gym import gym_rows
from posttrain.train.logging import read_metrics
from posttrain.train.state import save_final

EXPRESSION = re.compile(r":\s*([-\d\s*+]+?)\.\s")


def demo_texts(row: dict) -> list[str]:
    """The scripted ReAct turns for one row: call the calculator on the question's expression, then answer."""
    question = json.loads(row["entry"])["question"]
    expression = EXPRESSION.search(question).group(1).strip()
    return [f"Thought: I multiply with the calculator.\nAction: calculator[{expression}]\nObservation:",
            f"Thought: I have the result.\nFinal Answer: {row['answer']}<|im_end|>"]


def react_eval(model, tok, task, problems, spec) -> dict:
    r = spec["react"]
    out = evaluate(model, tok, task, problems, "react",
                   options=DecodeOptions(max_new_tokens=r["max_turn_tokens"], batch_size=10), keep_samples=True,
                   react={"tools": r["tools"], "max_turns": r["max_turns"], "max_episode_tokens": r["max_episode_tokens"]})
    return out


def summarize(result: dict, seconds: float) -> dict:
    m = result["metrics"]
    keep = ("accuracy", "accuracy_stderr", "num_problems", "mean_generated_tokens", "forward_tokens", "turns",
            "tool_call_validity", "tool_valid", "tool_failed", "tool_malformed", "tool_unknown_tool",
            "finish_done", "finish_max_turns", "finish_max_tokens")
    out = {k: m[k] for k in keep if k in m}
    calls = sum(m.get(k, 0.0) for k in ("tool_valid", "tool_failed", "tool_malformed", "tool_unknown_tool"))
    out["attempted_calls"] = round(calls * m["num_problems"])
    out["valid_calls"] = round(m.get("tool_valid", 0.0) * m["num_problems"])
    out["wall_s"] = seconds
    samples = result.get("problems", [])[:3]
    out["examples"] = samples
    return out


def sft(model, tok, spec, task_kwargs, sft_dir: Path) -> dict:
    """A few epochs of LoRA SFT on scripted demonstrations (the loss covers the model's tokens, not the
    observations); the merged model is saved to sft_dir."""
    s, r = spec["sft"], spec["react"]
    rows = gym_rows(spec["task"], s["demos"], s["demo_seed"], instruction="", **task_kwargs)
    sampler = EpisodeSampler(model, tok)
    budget = EpisodeBudget(max_turns=r["max_turns"], max_turn_tokens=r["max_turn_tokens"],
                           max_episode_tokens=r["max_episode_tokens"])
    demos = [play_scripted(sampler, ToolEnv(r["tools"]), row, demo_texts(row), budget=budget) for row in rows]
    assert all(d.reward == 1.0 and d.finish == "done" for d in demos), "a demonstration does not verify"
    batch = episode_sequences(Episodes(demos, 1), tok.pad_token_id)
    model = apply_lora(model, r=s["lora_r"], alpha=s["lora_alpha"], dropout=0.0, target_modules="all-linear")
    logps_fn = TokenLogps(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses, trained_tokens, t0 = [], 0, time.time()
    for epoch in range(s["epochs"]):
        order = torch.randperm(len(demos), generator=g)
        for i in range(0, len(demos), s["batch_size"]):
            idx = order[i:i + s["batch_size"]]
            out = logps_fn(batch.input_ids[idx], batch.labels[idx], batch.position_ids[idx])
            loss = sft_loss(out.logps, batch.mask[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            trained_tokens += int(batch.input_ids[idx].ne(tok.pad_token_id).sum())
    model.eval()
    save_final(model, tok, sft_dir)  # LoRA merged into an ordinary checkpoint
    return {"demos": len(demos), "lora_r": s["lora_r"], "lr": s["lr"], "epochs": s["epochs"], "loss_first": losses[0], "loss_last": losses[-1],
            "masked_observation_tokens": int(sum(len(d.token_ids) - d.model_tokens for d in demos)),
            "target_tokens": int(batch.mask.sum()), "trained_tokens": trained_tokens, "wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(HERE / "config.yaml"))
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--only", default="abcd", help="stages to run (results of others are kept from results.json)")
    p.add_argument("--report", action="store_true", help="only rewrite table.md from results.json")
    a = p.parse_args()
    if a.report:
        write_report(json.loads((Path(a.out) / "results.json").read_text()), Path(a.out))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = yaml.safe_load(Path(a.config).read_text())
    out_dir, root = Path(a.out), Path(spec["run_root"])
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and a.only != "abcd" else {}
    results["config"] = spec

    done: set[str] = set()

    def save():
        # merge with the file: stages may run in separate processes (e.g. `--only d` while (c) is being evaluated)
        on_disk = json.loads(results_path.read_text()) if results_path.exists() else {}
        on_disk.update({k: v for k, v in results.items() if k in done or k == "config"})
        results_path.write_text(json.dumps(on_disk, indent=2, default=str) + "\n")
        results.update({k: v for k, v in on_disk.items() if k not in done})

    n_eval = a.eval_size or spec["eval_size"]
    tk = spec["task_kwargs"]
    nt = spec["no_tools"]
    base_task = make_task(spec["task"], tk, extract=nt["extract"], template=nt["template"])
    problems = base_task.problems(n_eval, spec["eval_seed"])
    model, tok = load_model(spec["model"])

    if "a" in a.only:
        t0 = time.time()
        res = evaluate(model, tok, base_task, problems, "greedy",
                       options=DecodeOptions(max_new_tokens=nt["max_new_tokens"], batch_size=10), keep_samples=True)
        done.add("a_no_tools")
        results["a_no_tools"] = summarize(res, time.time() - t0)
        save()
        print("a", results["a_no_tools"]["accuracy"], flush=True)
    if "b" in a.only:
        t0 = time.time()
        done.add("b_react_prompting")
        results["b_react_prompting"] = summarize(react_eval(model, tok, base_task, problems, spec), time.time() - t0)
        save()
        print("b", results["b_react_prompting"]["accuracy"], flush=True)
    sft_dir = root / "sft"
    if "c" in a.only:
        done.add("c_sft")
        results["c_sft"] = {"training": sft(model, tok, spec, tk, sft_dir)}
        save()
        del model
        model, tok = load_model(str(sft_dir))
        t0 = time.time()
        results["c_sft"].update(summarize(react_eval(model, tok, base_task, problems, spec), time.time() - t0))
        save()
        print("c", results["c_sft"]["accuracy"], flush=True)
    if "d" in a.only:
        values = {**spec["grpo"], "model": str(sft_dir), "task": spec["task"], "task_kwargs": tk,
                  "output_dir": str(root / "grpo"), "progress": False, "task_instruction": ""}
        if a.steps:
            values["max_steps"] = a.steps
        config = build_config(GRPOConfig, values, source=f"{a.config}:grpo")
        model = None  # the GRPO recipe loads its own copy
        t0 = time.time()
        grpo_run(config)
        train_s = time.time() - t0
        rows = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward/mean" in r]
        model, tok = load_model(str(root / "grpo" / "final"))
        t0 = time.time()
        res = summarize(react_eval(model, tok, base_task, problems, spec), time.time() - t0)
        res["training"] = {
            "steps": config.max_steps, "episodes": config.max_steps * config.prompts_per_step * config.num_generations,
            "reward_curve": [r["reward/mean"] for r in rows], "pass_rate_curve": [r["pass_rate"] for r in rows],
            "tool_call_validity_curve": [r.get("env/tool_call_validity") for r in rows],
            "filtered_frac": sum(r["filter/zero_variance_frac"] for r in rows) / max(len(rows), 1),
            "model_tokens_per_episode": sum(r["completion/mean_length"] for r in rows) / max(len(rows), 1),
            "wall_s": train_s}
        done.add("d_grpo")
        results["d_grpo"] = res
        save()
        print("d", res["accuracy"], flush=True)
    write_report(results, out_dir)


def write_report(results: dict, out: Path) -> None:
    names = [("a_no_tools", "(a) no tools, greedy CoT"), ("b_react_prompting", "(b) ReAct prompting + calculator"),
             ("c_sft", "(c) after SFT on demos, ReAct"), ("d_grpo", "(d) after tool-use GRPO from (c), ReAct")]
    header = ("| condition | n | accuracy ± s.e. | 95% Wilson | tool-call validity (valid/attempted) | turns "
              "| eval forward tokens | eval wall s |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for key, label in names:
        r = results.get(key)
        if not r or "accuracy" not in r:
            lines.append(f"| {label} | - | not run | - | - | - | - | - |")
            continue
        validity = (f"{r['valid_calls']}/{r['attempted_calls']}" if r.get("attempted_calls") else "no calls")
        rate = wilson(round(r["accuracy"] * r["num_problems"]), r["num_problems"])
        lo, hi = rate.low, rate.high
        lines.append(f"| {label} | {r['num_problems']} | {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f} | "
                     f"[{lo:.2f}, {hi:.2f}] | "
                     f"{validity} | {r.get('turns', 1):.2f} | {r['forward_tokens']} | {r['wall_s']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

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
from posttrain.eval.metrics import mcnemar_p
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


def summarize(result: dict, seconds: float, cpu_s: float) -> dict:
    """The stage's metrics, per-problem outcomes (for paired comparisons) and its compute."""
    m = result["metrics"]
    keep = ("accuracy", "accuracy_stderr", "num_problems", "mean_generated_tokens", "forward_tokens", "turns",
            "tool_call_validity", "tool_valid", "tool_failed", "tool_malformed", "tool_unknown_tool",
            "finish_done", "finish_max_turns", "finish_max_tokens")
    out = {k: m[k] for k in keep if k in m}
    problems = result.get("problems", [])
    calls = [e.get("tool_calls", {}) for p in problems for e in p.get("episodes", [])]
    out["attempted_calls"] = sum(sum(c.values()) for c in calls)
    out["valid_calls"] = sum(c.get("valid", 0) for c in calls)
    # per problem: correct (greedy, one sample) and whether its episode made at least one valid tool call
    out["correct"] = [int(p["correct"][0] >= 1.0) for p in problems]
    out["used_tool"] = [int(any(e.get("tool_calls", {}).get("valid", 0) for e in p.get("episodes", [])))
                        for p in problems]
    out["wall_s"] = seconds
    out["cpu_s"] = cpu_s
    out["examples"] = problems[:3]
    return out


def timed(fn):
    """(fn(), wall seconds, CPU seconds of this process)."""
    t0, c0 = time.time(), time.process_time()
    value = fn()
    return value, time.time() - t0, time.process_time() - c0


def overlap(spec: dict, problems) -> dict:
    """Held-out questions that also appear among the SFT demonstrations or the GRPO training rows (must be 0)."""
    tk = spec["task_kwargs"]
    held = {json.loads(p.data["entry"])["question"] for p in problems}
    demos = {json.loads(r["entry"])["question"]
             for r in gym_rows(spec["task"], spec["sft"]["demos"], spec["sft"]["demo_seed"], instruction="", **tk)}
    train = {json.loads(r["entry"])["question"]
             for r in gym_rows(spec["task"], spec["grpo"]["task_size"], spec["grpo"]["task_seed"], instruction="", **tk)}
    return {"held_out": len(held), "demos": len(demos), "grpo_rows": len(train),
            "held_out_in_demos": len(held & demos), "held_out_in_grpo_rows": len(held & train),
            "demos_in_grpo_rows": len(demos & train)}


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
    losses, trained_tokens, t0, c0 = [], 0, time.time(), time.process_time()
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
            "target_tokens": int(batch.mask.sum()), "trained_tokens": trained_tokens, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}


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
    results["overlap"] = overlap(spec, problems)
    done.add("overlap")
    assert results["overlap"]["held_out_in_demos"] == 0 and results["overlap"]["held_out_in_grpo_rows"] == 0, \
        f"held-out problems overlap the training data: {results['overlap']}"
    save()
    model, tok = load_model(spec["model"])

    if "a" in a.only:
        res, wall, cpu = timed(lambda: evaluate(model, tok, base_task, problems, "greedy", keep_samples=True,
                                                options=DecodeOptions(max_new_tokens=nt["max_new_tokens"],
                                                                      batch_size=10)))
        done.add("a_no_tools")
        results["a_no_tools"] = summarize(res, wall, cpu)
        save()
        print("a", results["a_no_tools"]["accuracy"], flush=True)
    if "b" in a.only:
        done.add("b_react_prompting")
        results["b_react_prompting"] = summarize(*timed(lambda: react_eval(model, tok, base_task, problems, spec)))
        save()
        print("b", results["b_react_prompting"]["accuracy"], flush=True)
    sft_dir = root / "sft"
    if "c" in a.only:
        done.add("c_sft")
        results["c_sft"] = {"training": sft(model, tok, spec, tk, sft_dir)}
        save()
        del model
        model, tok = load_model(str(sft_dir))
        results["c_sft"].update(summarize(*timed(lambda: react_eval(model, tok, base_task, problems, spec))))
        save()
        print("c", results["c_sft"]["accuracy"], flush=True)
    if "d" in a.only:
        values = {**spec["grpo"], "model": str(sft_dir), "task": spec["task"], "task_kwargs": tk,
                  "output_dir": str(root / "grpo"), "progress": False, "task_instruction": "",
                  "overwrite": True}  # the experiment owns this folder: a rerun replaces it
        if a.steps:
            values["max_steps"] = a.steps
        config = build_config(GRPOConfig, values, source=f"{a.config}:grpo")
        model = None  # the GRPO recipe loads its own copy
        _, train_s, train_cpu = timed(lambda: grpo_run(config))
        rows = [r for r in read_metrics(Path(config.output_dir) / "metrics.jsonl") if "reward/mean" in r]
        model, tok = load_model(str(root / "grpo" / "final"))
        res = summarize(*timed(lambda: react_eval(model, tok, base_task, problems, spec)))
        res["training"] = {
            "steps": config.max_steps, "episodes": config.max_steps * config.prompts_per_step * config.num_generations,
            "reward_curve": [r["reward/mean"] for r in rows], "pass_rate_curve": [r["pass_rate"] for r in rows],
            "tool_call_validity_curve": [r.get("env/tool_call_validity") for r in rows],
            "filtered_frac": sum(r["filter/zero_variance_frac"] for r in rows) / max(len(rows), 1),
            "model_tokens_per_episode": sum(r["completion/mean_length"] for r in rows) / max(len(rows), 1),
            "obs_tokens_per_episode": sum(r.get("env/obs_tokens", 0.0) for r in rows) / max(len(rows), 1),
            "wall_s": train_s, "cpu_s": train_cpu}
        done.add("d_grpo")
        results["d_grpo"] = res
        save()
        print("d", res["accuracy"], flush=True)
    write_report(results, out_dir)


def interval(k: int, n: int) -> str:
    rate = wilson(k, n)
    return f"{k}/{n} = {rate.value:.2f} [{rate.low:.2f}, {rate.high:.2f}]"


NAMES = [("a_no_tools", "(a) no tools, greedy CoT"), ("b_react_prompting", "(b) ReAct prompting + calculator"),
         ("c_sft", "(c) after SFT on demos, ReAct"), ("d_grpo", "(d) after tool-use GRPO from (c), ReAct")]


def write_report(results: dict, out: Path) -> None:
    """table.md: accuracy and tool use with Wilson 95% intervals, paired counts between conditions, compute."""
    lines = ["| condition | n | accuracy (95% Wilson) | episodes with a valid tool call (95% Wilson) | "
             "tool-call validity: valid/attempted calls | turns | eval forward tokens | eval wall s | eval CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, label in NAMES:
        r = results.get(key)
        if not r or "accuracy" not in r:
            lines.append(f"| {label} | - | not run | - | - | - | - | - | - |")
            continue
        n = r["num_problems"]
        correct = r.get("correct") or []
        k = sum(correct) if correct else round(r["accuracy"] * n)
        if key == "a_no_tools":
            use, validity = "n/a (no tools offered)", "n/a"
        else:
            use = interval(sum(r["used_tool"]), n) if "used_tool" in r else "-"
            att = r.get("attempted_calls", 0)
            validity = interval(r["valid_calls"], att) if att else "0 attempted (undefined)"
        lines.append(f"| {label} | {n} | {interval(k, n)} | {use} | {validity} | {r.get('turns', 1):.2f} | "
                     f"{r['forward_tokens']} | {r['wall_s']:.0f} | {r.get('cpu_s', float('nan')):.0f} |")
    pairs = [("a_no_tools", "b_react_prompting"), ("b_react_prompting", "c_sft"), ("c_sft", "d_grpo"),
             ("a_no_tools", "d_grpo")]
    paired = ["", "Paired outcomes on the same held-out problems (right only / left only / both right / both wrong; "
              "exact McNemar p):", "", "| left -> right | right only | left only | both | neither | McNemar p |",
              "|---|---|---|---|---|---|"]
    for x, y in pairs:
        cx, cy = results.get(x, {}).get("correct"), results.get(y, {}).get("correct")
        if not cx or not cy or len(cx) != len(cy):
            continue
        gain = sum(1 for u, v in zip(cx, cy) if v and not u)
        loss = sum(1 for u, v in zip(cx, cy) if u and not v)
        both = sum(1 for u, v in zip(cx, cy) if u and v)
        paired.append(f"| {x} -> {y} | {gain} | {loss} | {both} | {len(cx) - gain - loss - both} | "
                      f"{mcnemar_p(gain, loss):.3g} |")
    if "overlap" in results:
        paired += ["", f"Overlap check (question texts): {results['overlap']}"]
    (out / "table.md").write_text("\n".join(lines + paired) + "\n")
    print("\n".join(lines + paired))


if __name__ == "__main__":
    main()

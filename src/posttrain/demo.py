"""`posttrain demo` (= `make demo`): post-training the embedded SmolLM2 end to end on 2 CPU cores, with a report.

Stages (each adds a section to `<output_dir>/report.md`):
- sft:  teach a strict answer format (a final line `Answer: <number>`) on reasoning-gym arithmetic problems;
        held-out format compliance and accuracy before and after.
- grpo: GRPO (LoRA) with the task's own scorer as the reward; held-out accuracy on the same problems before and
        after (paired: McNemar's exact test), the train reward and held-out curves. By default (`grpo_start=base`)
        it starts from the embedded model on two-term one-digit sums with the last number as the answer: the base
        model samples varied answers there, so most groups carry a signal. `grpo_start=sft` continues from the SFT
        model on the SFT task instead (nearly deterministic at T = 1, so most of its groups carry none).
- ttc:  test-time compute on held-out problems with the trained model: greedy vs temperature 1 vs maj@k vs
        low temperature vs power sampling (p^α by Metropolis-Hastings), each with its cost in forwarded tokens.
- dpo:  DPO (plus the winners' NLL) on the shipped identity pairs mixed with control pairs on unrelated prompts:
        the assistant takes a new name and maker and keeps its other answers; identity rate, leakage and the
        log-likelihood change of its own answers on held-out prompts, before and after.
Later stages build on the SFT model (and on the GRPO model when `grpo_start=sft`). Every stage is a function `(ctx) -> Section`; `STAGES` maps names to them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import torch

from posttrain.config import field
from posttrain.errors import ConfigError
from posttrain.files import atomic_write_text
from posttrain.models.loading import EMBEDDED_DEFAULT, load_model


@dataclass
class DemoConfig:
    output_dir: str = field("demo_out", help="where the report, plots, data and checkpoints go")
    model: str = field(EMBEDDED_DEFAULT, help="the starting model")
    stages: str = field("sft,grpo,ttc,dpo", help="comma list of stages to run, in order")
    task: str = field("chain_sum", help="reasoning-gym task for the arithmetic problems")
    train_problems: int = field(320, help="SFT training problems")
    eval_problems: int = field(128, help="held-out problems for before/after evaluation")
    max_new_tokens: int = field(40, help="generation budget per answer")
    sft_lr: float = field(5e-5, help="SFT learning rate (full fine-tuning)")
    sft_epochs: float = field(1.0, help="SFT epochs")
    grpo_start: str = field("base", help="GRPO's starting model: 'base' (the embedded model on two-term one-digit "
                            "sums, answer = last number) or 'sft' (the SFT model on the SFT task, answer = `Answer:` line)")
    grpo_steps: int = field(12, help="GRPO steps (B prompts x G samples each)")
    grpo_prompts: int = field(16, help="GRPO prompts per step")
    grpo_generations: int = field(8, help="GRPO samples per prompt")
    grpo_lr: float = field(3e-5, help="GRPO learning rate (LoRA)")
    grpo_temperature: float = field(1.0, help="GRPO sampling temperature (1.2 helps grpo_start=sft: that model is "
                                    "nearly deterministic at 1)")
    grpo_max_new_tokens: int = field(32, help="GRPO generation budget per answer (training and held-out scoring)")
    grpo_task_size: int = field(1024, help="GRPO training problems (a generator seed apart from SFT's and held-out's)")
    grpo_eval_every: int = field(6, help="held-out greedy accuracy every N GRPO steps (and at start and end)")
    ttc_problems: int = field(24, help="held-out problems for the test-time compute comparison")
    ttc_samples: int = field(8, help="samples per problem for majority vote (maj@k)")
    power_alpha: float = field(4.0, help="power sampling exponent α (proposal temperature 1/α)")
    power_mcmc_steps: int = field(2, help="MH steps per block")
    dpo_steps: int = field(40, help="DPO steps on the identity + control pairs (LoRA)")
    dpo_lr: float = field(1e-3, help="DPO learning rate (LoRA)")
    dpo_controls: int = field(0, help="control prompts per split for the DPO stage (0 = all shipped: 59 + 59)")
    seed: int = field(0, help="seed for data and training")

    def validate(self) -> None:
        unknown = [s for s in self.stage_list if s not in STAGES]
        if unknown:
            raise ConfigError(f"key 'stages': unknown stage(s) {unknown}; available: {list(STAGES)}.")
        if self.grpo_start not in GRPO_STARTS:
            raise ConfigError(f"key 'grpo_start': expected one of {list(GRPO_STARTS)}, got {self.grpo_start!r}.")

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]


# Task settings: 2-3 terms of 1-2 digits keeps the 135M model's answers short and its accuracy off the floor.
TASK_KWARGS: dict[str, dict[str, Any]] = {"chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
               "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}}
INSTRUCTION = "\nGive the result alone on the last line as `Answer: <number>`."
# GRPO from the base model (grpo_start=base): the sums the embedded model gets right a third of the time greedily
# and a sixth of the time sampled (experiments/rlvr_passk), scored on the last number it writes.
GRPO_STARTS = ("base", "sft")
GRPO_BASE_TASK_KWARGS: dict[str, Any] = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


@dataclass
class Section:
    title: str
    markdown: str
    metrics: dict[str, Any] = dc_field(default_factory=dict)


@dataclass
class DemoContext:
    config: DemoConfig
    out: Path
    model_path: str  # the current best model (updated by training stages)
    sections: list[Section] = dc_field(default_factory=list)
    cache: dict[str, Any] = dc_field(default_factory=dict)


def task_rows(task: str, size: int, seed: int, task_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`size` reasoning-gym rows of `task` (generator seed `seed`; generator settings `task_kwargs`, default the
    demo's TASK_KWARGS) with the demo's answer instruction."""
    from posttrain.rewards.gym import gym_rows

    kwargs = TASK_KWARGS.get(task, {}) if task_kwargs is None else task_kwargs
    return gym_rows(task, size, seed, instruction=INSTRUCTION, **kwargs)


def worked_answer(row: dict[str, Any]) -> str:
    """The SFT target: the expression restated with its value, then the strict answer line."""
    question = json.loads(row["entry"])["question"]
    expr = re.search(r"([-\d\s+*/().]+)=\s*$", question.strip())
    lead = f"{expr.group(1).strip()} = {row['answer']}" if expr else f"The result is {row['answer']}."
    return f"{lead}\nAnswer: {row['answer']}"


@torch.no_grad()
def score_problems(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int,
                   extract: str = "final_line") -> dict[str, Any]:
    """Greedy answers to `rows`; format compliance (strict last line) and accuracy (the task's own scorer on the
    answer that `extract` reads: the `Answer:` line, or the last number)."""
    from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
    from posttrain.rewards.format import make_answer_line_format_reward
    from posttrain.rewards.gym import make_gym_reward

    model.eval()
    generator = HFGenerator(model, tokenizer)
    t0 = time.perf_counter()
    rollouts = generator.generate(encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                                  SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    seconds = time.perf_counter() - t0
    texts = rollouts.texts
    columns = {k: [r[k] for r in rows] for k in ("entry", "task", "task_config")}
    fmt = make_answer_line_format_reward()([r["prompt"] for r in rows], texts)
    correct = make_gym_reward(extract)([r["prompt"] for r in rows], texts, **columns)
    return {"texts": texts, "format": sum(fmt) / len(rows), "accuracy": sum(correct) / len(rows), "format_ok": fmt,
            "correct": correct, "generated_tokens": rollouts.generated_tokens, "seconds": seconds}


def _pct(rate: float | None, n: int) -> str:
    """A rate over n problems with its Wilson 95% interval, e.g. `50.0% [36%, 64%]`."""
    from posttrain.eval.preservation import wilson

    if rate is None:
        return "—"
    w = wilson(round(rate * n), n)
    return f"{rate:.1%} [{w.low:.0%}, {w.high:.0%}]"


def _plot_sft(path: Path, metrics_file: Path, before: dict, after: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.train.logging import read_metrics

    rows = [r for r in read_metrics(metrics_file) if "train/loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["step"] for r in rows], [r["train/loss"] for r in rows])
    a.set_xlabel("step")
    a.set_ylabel("SFT loss (completion tokens)")
    a.set_title("training loss")
    names = ["format", "accuracy"]
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [before[n] for n in names], width=0.4, label="before SFT")
    b.bar([i + 0.2 for i in x], [after[n] for n in names], width=0.4, label="after SFT")
    b.set_xticks(list(x), names)
    b.set_ylim(0, 1)
    b.set_title("held-out problems")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_sft(ctx: DemoContext) -> Section:
    """Demo stage: SFT on worked arithmetic answers, scored before and after on held-out problems."""
    from posttrain.recipes.sft import SFTConfig
    from posttrain.recipes.sft import run as run_sft

    c = ctx.config
    train = task_rows(c.task, c.train_problems, seed=c.seed + 1)
    held_out = task_rows(c.task, c.eval_problems, seed=c.seed + 2)
    ctx.cache["held_out"] = held_out
    data = ctx.out / "data" / "sft_train.jsonl"
    atomic_write_text(data, "".join(json.dumps({"prompt": r["prompt"], "completion": [
        {"role": "assistant", "content": worked_answer(r)}]}) + "\n" for r in train))

    model, tokenizer = load_model(ctx.model_path)
    before = score_problems(model, tokenizer, held_out, c.max_new_tokens)
    del model
    print(f"[demo] before SFT: format {before['format']:.0%}, accuracy {before['accuracy']:.0%}", flush=True)

    run_dir = ctx.out / "sft"
    summary = run_sft(SFTConfig(train_file=str(data), model=ctx.model_path, output_dir=str(run_dir), max_length=256,
                                packing=True, micro_batch_size=4, epochs=c.sft_epochs, lr=c.sft_lr, warmup_steps=2,
                                seed=c.seed, logging_steps=1, tensorboard=False, overwrite=True))
    ctx.model_path = summary["final_dir"]
    model, tokenizer = load_model(ctx.model_path)
    after = score_problems(model, tokenizer, held_out, c.max_new_tokens)
    print(f"[demo] after SFT: format {after['format']:.0%}, accuracy {after['accuracy']:.0%}", flush=True)
    ctx.cache["held_out_scores"] = after
    _plot_sft(ctx.out / "sft.png", run_dir / "metrics.jsonl", before, after)

    examples = "\n".join(
        f"| {json.loads(r['entry'])['question'].split(':')[-1].strip()} | {r['answer']} | "
        f"{_cell(b)} | {_cell(a)} |" for r, b, a in list(zip(held_out, before["texts"], after["texts"]))[:4]
    )
    md = (
        f"SFT on {len(train)} reasoning-gym `{c.task}` problems, loss on the answer only, "
        f"{summary.get('train/loop_seconds', 0):.0f} s of training "
        f"({summary.get('train/tokens', 0) / max(summary.get('train/loop_seconds', 1), 1e-9):.0f} tokens/s).\n\n"
        f"| held-out ({len(held_out)} problems, greedy; Wilson 95% intervals) | before | after |\n|---|---|---|\n"
        f"| format: last line `Answer: <number>` | {_pct(before['format'], len(held_out))} | "
        f"{_pct(after['format'], len(held_out))} |\n"
        f"| accuracy (task scorer on that line) | {_pct(before['accuracy'], len(held_out))} | "
        f"{_pct(after['accuracy'], len(held_out))} |\n\n"
        f"![SFT](sft.png)\n\n| problem | gold | before | after |\n|---|---|---|---|\n{examples}\n"
    )
    return Section("1. SFT: a strict answer format", md, {
        "before_format": before["format"], "before_accuracy": before["accuracy"],
        "after_format": after["format"], "after_accuracy": after["accuracy"],
        "train_seconds": summary.get("train/loop_seconds")})


def _plot_grpo(path: Path, train: list[dict], evals: list[dict], n_held_out: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.eval.preservation import wilson

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in train]
    rewards = [r["reward/mean"] for r in train]
    window = 5
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    a.plot(steps, rewards, ".", alpha=0.4, label="per step")
    a.plot(steps, smooth, "-", label=f"mean of last {window}")
    a.set(xlabel="GRPO step", ylabel="sampled reward (T=1)", ylim=(0, 1), title="train reward (fresh prompts)")
    a.legend()
    x = [r["step"] for r in evals]
    acc = [r["eval/accuracy"] for r in evals]
    bands = [wilson(round(v * n_held_out), n_held_out) for v in acc]
    b.fill_between(x, [w.low for w in bands], [w.high for w in bands], alpha=0.25)
    b.plot(x, acc, "o-")
    b.set(xlabel="GRPO step", ylabel="greedy accuracy", ylim=(0, 1),
          title=f"held-out ({n_held_out} problems, Wilson 95%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_grpo(ctx: DemoContext) -> Section:
    """Demo stage: GRPO with LoRA (from the base or the SFT model: `grpo_start`) on the task's verifier reward;
    held-out accuracy compared on the same problems before and after (McNemar's exact test), with the train reward
    and held-out curves."""
    from posttrain.eval.paired import paired_test
    from posttrain.recipes.grpo import GRPOConfig
    from posttrain.recipes.grpo import run as run_grpo
    from posttrain.train.logging import read_metrics

    c = ctx.config
    run_dir = ctx.out / "grpo"
    if c.grpo_start == "base":  # a side branch from the embedded model; later stages go on from the SFT model
        start, extract, start_name = c.model, "last_number", "the base model"
        held_out, before = task_rows(c.task, c.eval_problems, c.seed + 2, GRPO_BASE_TASK_KWARGS), None
        train_rows = task_rows(c.task, c.grpo_task_size, c.seed + 3, GRPO_BASE_TASK_KWARGS)
    else:
        start, extract, start_name = ctx.model_path, "final_line", "the SFT model"
        held_out = ctx.cache.get("held_out") or task_rows(c.task, c.eval_problems, seed=c.seed + 2)
        before, train_rows = ctx.cache.get("held_out_scores"), task_rows(c.task, c.grpo_task_size, seed=c.seed + 3)
    if before is None:  # score the starting model on the held-out problems
        model, tokenizer = load_model(start)
        before = score_problems(model, tokenizer, held_out, c.grpo_max_new_tokens, extract)
        del model
    train_file, eval_file = ctx.out / "data" / "grpo_train.jsonl", ctx.out / "data" / "grpo_heldout.jsonl"
    for path, rows in ((train_file, train_rows), (eval_file, held_out)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    config = GRPOConfig(model=start, train_file=str(train_file), eval_file=str(eval_file),
                        eval_size=len(held_out), eval_steps=c.grpo_eval_every,
                        rewards=["gym"], reward_options={"gym": {"extract": extract}}, loss="grpo",
                        num_generations=c.grpo_generations, prompts_per_step=c.grpo_prompts,
                        temperature=c.grpo_temperature, max_new_tokens=c.grpo_max_new_tokens,
                        micro_batch_size=min(c.grpo_prompts * c.grpo_generations, 64),
                        lr=c.grpo_lr, lora_r=16, lora_alpha=32, max_steps=c.grpo_steps, seed=c.seed,
                        output_dir=str(run_dir), tensorboard=False, overwrite=True)  # a rerun redoes the stage
    t0 = time.perf_counter()
    summary = run_grpo(config)
    seconds = time.perf_counter() - t0
    if c.grpo_start == "sft":
        ctx.model_path = summary["final_dir"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    model, tokenizer = load_model(summary["final_dir"])
    after = score_problems(model, tokenizer, held_out, c.grpo_max_new_tokens, extract)
    test = paired_test(before["correct"], after["correct"])
    n = len(held_out)
    print(f"[demo] after GRPO: accuracy {before['accuracy']:.0%} -> {after['accuracy']:.0%} ({test})", flush=True)
    _plot_grpo(ctx.out / "grpo.png", train, evals, n)
    timers = {k: sum(r.get(k, 0.0) for r in train) / len(train) for k in ("time/generate", "time/reward", "time/update")}
    k = min(5, len(train))
    first, last = (sum(r["reward/mean"] for r in part) / k for part in (train[:k], train[-k:]))
    curve = " → ".join(f"{r['eval/accuracy']:.0%} (step {r['step']})" for r in evals)
    md = (
        f"GRPO (LoRA r=16, lr {c.grpo_lr:g}) from {start_name}: {c.grpo_steps} steps of {c.grpo_prompts} prompts × "
        f"{c.grpo_generations} samples (T={c.grpo_temperature:g}), reward = the task's scorer on "
        f"{'the last number' if extract == 'last_number' else 'the `Answer:` line'}; {seconds:.0f} s in "
        f"all (per step: generate {timers['time/generate']:.1f} s, reward {timers['time/reward']:.2f} s, update "
        f"{timers['time/update']:.1f} s; held-out evaluations included in the total). Sampled train reward, mean of "
        f"the first {k} steps → last {k}: {first:.2f} → {last:.2f} ({c.grpo_prompts * c.grpo_generations} samples a "
        f"step). Held-out greedy accuracy during training: {curve}.\n\n"
        f"| held-out ({n} problems, greedy; Wilson 95% intervals) | {start_name} | after GRPO |\n"
        f"|---|---|---|\n"
        f"| accuracy | {_pct(before['accuracy'], n)} | {_pct(after['accuracy'], n)} |\n"
        f"| format | {_pct(before['format'], n)} | {_pct(after['format'], n)} |\n\n"
        f"Paired on the same {n} problems: {test.fixed} fixed, {test.broken} broken, change "
        f"{test.difference:+.1%} ± {test.difference_se:.1%} (paired standard error), McNemar exact p = "
        f"{test.p_value:.3g}.\n\n![GRPO](grpo.png)\n"
    )
    return Section("2. GRPO: reinforcement learning with a verifiable reward", md, {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"], "format_after": after["format"],
        "held_out": n, "fixed": test.fixed, "broken": test.broken, "difference": test.difference,
        "difference_se": test.difference_se, "mcnemar_p": test.p_value, "seconds": seconds,
        "reward_first": first, "reward_last": last, "reward_curve": [r["reward/mean"] for r in train],
        "eval_curve": [[r["step"], r["eval/accuracy"]] for r in evals], **timers})


def stage_ttc(ctx: DemoContext) -> Section:
    """Demo stage: greedy, temperature, majority vote, low temperature and power sampling side by side."""
    from posttrain.eval.runner import evaluate
    from posttrain.eval.tasks import GymTask, Problem
    from posttrain.generation.strategies import DecodeOptions

    c = ctx.config
    held_out = (ctx.cache.get("held_out") or task_rows(c.task, c.eval_problems, seed=c.seed + 2))[: c.ttc_problems]
    task = GymTask(c.task, TASK_KWARGS.get(c.task, {}), extract="final_line")
    problems = [Problem(id=f"demo-{i}", prompt=r["prompt"], answer=r["answer"],
                        data={"entry": r["entry"], "task_config": r["task_config"]}) for i, r in enumerate(held_out)]
    model, tokenizer = load_model(ctx.model_path)
    base = DecodeOptions(max_new_tokens=c.max_new_tokens, seed=c.seed, alpha=c.power_alpha, block_size=16,
                         mcmc_steps=c.power_mcmc_steps)
    runs = [("greedy", "greedy", 1, base), ("temperature 1", "temperature", 1, base),
            (f"maj@{c.ttc_samples} (T=1)", "majority", c.ttc_samples, base),
            (f"low temperature (τ=1/{c.power_alpha:g})", "low_temperature", 1, base),
            (f"power sampling (α={c.power_alpha:g}, {c.power_mcmc_steps} MH steps/block)", "power", 1, base)]
    rows, metrics = [], {}
    for label, strategy, n, options in runs:
        t0 = time.perf_counter()
        m = evaluate(model, tokenizer, task, problems, strategy, options=options, num_samples=n)["metrics"]
        m["wall_s"] = time.perf_counter() - t0
        print(f"[demo] {label}: accuracy {m['accuracy']:.0%}", flush=True)
        metrics[strategy] = m
        rows.append(f"| {label} | {m['accuracy']:.1%} ± {m['accuracy_stderr']:.1%} | {m['mean_generated_tokens']:.1f} | "
                    f"{m['forward_per_output_token']:.2f} | {m['wall_s'] / len(problems):.2f} |")
    md = (
        f"{len(problems)} held-out problems with the trained model. Cost: tokens run through the model per output "
        f"token (prompt encoding included) and seconds per problem.\n\n"
        "| strategy | accuracy | generated tokens | forward tokens / output token | s / problem |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nLow temperature sharpens each token's distribution; "
        "power sampling targets p(sequence)^α, which sums over futures before sharpening (Karan & Du 2025).\n"
    )
    return Section("3. Test-time compute: spending more while answering", md, metrics)


def stage_dpo(ctx: DemoContext) -> Section:
    """Demo stage: DPO + NLL on identity and control pairs (posttrain.demo_dpo), with its preservation table."""
    from posttrain.demo_dpo import DPOStageSettings, render_stage, run_identity_stage

    c = ctx.config
    settings = DPOStageSettings(max_steps=c.dpo_steps, lr=c.dpo_lr, num_controls=c.dpo_controls or None, seed=c.seed)
    result = run_identity_stage(ctx.model_path, ctx.out / "dpo", settings)
    ctx.model_path = result.final_dir
    a = result.after
    print(f"[demo] after DPO: identity {a['identity']['value']:.0%}, leakage {a['leakage']['value']:.0%}, "
          f"control log-lik {a['control_logp_change']:+.3f} nats/token", flush=True)
    return Section("4. DPO: a new identity that leaves the assistant intact", render_stage(result, settings), {
        "identity_before": result.before["identity"], "identity_after": a["identity"], "leakage_after": a["leakage"],
        "unchanged_after": a["unchanged"], "control_logp_change": a["control_logp_change"],
        "control_logp_change_se": a["control_logp_change_se"], "control_tokens": a["control_tokens"],
        "facts": result.facts, "meets_targets": result.meets_targets,
        "eval_accuracy": result.metrics.get("eval/rewards/accuracies"),
        "seconds": result.seconds})


def _cell(text: str) -> str:
    return text.strip().replace("\n", " ⏎ ").replace("|", "\\|")[:90]


STAGES: dict[str, Callable[[DemoContext], Section]] = {
    "sft": stage_sft, "grpo": stage_grpo, "ttc": stage_ttc, "dpo": stage_dpo,
}


def write_report(ctx: DemoContext, seconds: float) -> Path:
    """Write report.md and report.json from the stages' sections; returns the report's path."""
    parts = [f"# posttrain demo\n\nModel: `{ctx.config.model}` on {torch.get_num_threads()} CPU threads; "
             f"total {seconds / 60:.1f} min.\n"]
    parts += [f"## {s.title}\n\n{s.markdown}" for s in ctx.sections]
    path = ctx.out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    atomic_write_text(ctx.out / "report.json", json.dumps({s.title: s.metrics for s in ctx.sections}, indent=2) + "\n")
    return path


def run(config: DemoConfig) -> Path:
    """Run the demo's stages in order and write the report (`posttrain demo`); returns the report's path."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    ctx = DemoContext(config=config, out=out, model_path=config.model)
    t0 = time.perf_counter()
    for name in config.stage_list:
        print(f"[demo] stage {name}", flush=True)
        ctx.sections.append(STAGES[name](ctx))
        write_report(ctx, time.perf_counter() - t0)
    path = write_report(ctx, time.perf_counter() - t0)
    print(f"[demo] report: {path}", flush=True)
    return path

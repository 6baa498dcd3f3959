"""On-policy distillation step time: posttrain distill vs TRL's experimental GKDTrainer, same pair, batch and lengths.

    python bench/bench_distill.py [--student smollm2-135m-instruct:layers=0-5,24-29] [--teacher smollm2-135m-instruct]
                                  [--steps 5] [--rounds 1]
    python bench/bench_distill.py --teacher-dtype bfloat16 --rounds 2 --out bench/results/distill_bf16_teacher.json
    python bench/bench_distill.py --flops --steps 2 --out bench/results/distill_flops.json

Setting (both sides): the student samples one completion per prompt (λ = 1: every step on-policy), temperature 1, no
top-k/top-p, at most 32 new tokens; the teacher scores the student's tokens; the per-token loss is the
full-distribution reverse KL KL(q‖p) (TRL: GKD's JSD with β = 1, which is that reverse KL), summed over completion
tokens / their count; B = 8 reasoning-gym chain_sum prompts per step in the chat template; full fine-tuning of the
student, AdamW lr 1e-5, constant schedule, fp32 on CPU, no gradient checkpointing. Each side runs in its own
subprocess; the median step time over steps 2..N is reported, with each side's peak RSS. TRL computes both models'
full [B, T, V] logits; posttrain applies both heads in chunks at the completion positions only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from common import run_sides, step_clock

TASK_KW = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
INSTRUCTION = "\nGive the result alone on the last line as `Answer: <number>`."
B, MAX_NEW = 8, 32


def _rows():
    from posttrain.rewards.gym import gym_rows

    return gym_rows("chain_sum", 64, 0, instruction=INSTRUCTION, **TASK_KW)


def run_posttrain(student: str, teacher: str, steps: int, out: Path, teacher_dtype: str = "float32") -> dict:
    import time

    from posttrain.recipes.distill import DistillConfig, run
    from posttrain.train.logging import read_metrics
    from posttrain.train.timing import StageTimer

    rows = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["answer"]}]} for r in _rows()]
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DistillConfig(model=student, teacher=teacher, train_file=str(data), eval_size=0, rewards=[],
                           mode="on_policy", divergence="reverse_kl", estimator="full", lmbda=1.0,
                           prompts_per_step=B, num_generations=1, micro_batch_size=B, max_new_tokens=MAX_NEW,
                           temperature=1.0, lr=1e-5, max_steps=steps, output_dir=str(out / "pt"), progress=False,
                           tensorboard=False, keep_last=1, teacher_dtype=teacher_dtype)
    cpu_times, last, pop = [], [time.process_time()], StageTimer.pop

    def pop_with_cpu(timer):
        """The recipe pops its stage timer once per step: the process CPU time since the last pop is that step's."""
        now = time.process_time()
        cpu_times.append(now - last[0])
        last[0] = now
        return pop(timer)

    StageTimer.pop = pop_with_cpu  # type: ignore[method-assign]
    last[0] = time.process_time()
    try:
        run(config)
    finally:
        StageTimer.pop = pop  # type: ignore[method-assign]
    metrics = [r for r in read_metrics(out / "pt" / "metrics.jsonl") if "time/step" in r]
    split = {k: statistics.median(r.get(k, 0.0) for r in metrics[1:]) for k in ("time/generate", "time/update")}
    return {"step_seconds": [r["time/step"] for r in metrics], "split": split,
            "tokens": [r["tokens"] for r in metrics], "step_cpu_seconds": cpu_times[-len(metrics):]}


def run_trl(student: str, teacher: str, steps: int, out: Path, teacher_dtype: str = "float32") -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from posttrain.models.loading import load_tokenizer, resolve

    rows = [{"messages": [{"role": "user", "content": r["prompt"][-1]["content"] if isinstance(r["prompt"], list)
                           else r["prompt"]}, {"role": "assistant", "content": r["answer"]}]} for r in _rows()]
    ds = datasets.Dataset.from_list(rows)

    clock = step_clock()
    args = GKDConfig(output_dir=str(out / "trl"), per_device_train_batch_size=B, lmbda=1.0, beta=1.0, temperature=1.0,
                     max_new_tokens=MAX_NEW, seq_kd=False, learning_rate=1e-5, max_steps=steps, use_cpu=True,
                     bf16=False, report_to="none", save_strategy="no", logging_steps=1000,
                     gradient_checkpointing=False, disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    tokenizer = load_tokenizer(student)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(resolve(student)),
                         teacher_model=AutoModelForCausalLM.from_pretrained(resolve(teacher), dtype=teacher_dtype),
                         args=args,
                         train_dataset=ds, processing_class=tokenizer, callbacks=[clock])
    tokens: list[float] = []
    generate = trainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        """TRL's own on-policy generation; records the step's completion tokens (labels != -100), as posttrain logs."""
        out = generate(model, inputs, generation_config)
        tokens.append(float((out[2] != -100).sum()))
        return out

    trainer.generate_on_policy_outputs = counted
    trainer.train()
    return {"step_seconds": clock.times, "tokens": tokens, "step_cpu_seconds": clock.cpu_times}


def matmul_peak(seconds: float = 2.0) -> dict[str, float]:
    """Single-thread float32 matmul throughput (GFLOP/s) at the step's shapes: the decoders over 8 × 92 tokens, the
    head at the 256 completion rows, one decode step of 8 rows, and a large square product."""
    import time

    import torch

    torch.set_num_threads(1)
    out = {}
    for m, k, n in [(736, 576, 1536), (736, 576, 576), (256, 576, 49152), (8, 576, 1536), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start, reps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9
    return out


def child(side: str, student: str, teacher: str, steps: int, count_flops: bool = False,
          teacher_dtype: str = "float32") -> None:
    import contextlib
    import resource

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False) if count_flops else None
    with tempfile.TemporaryDirectory() as tmp, counter or contextlib.nullcontext():
        run = run_trl if side == "trl" else run_posttrain
        result = run(student, teacher, steps, Path(tmp), teacher_dtype)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if counter is not None:  # the FLOPs of every op the counter knows (matmuls, attention), per step: sampling, both
        # forwards, the backward
        result["flops_per_step"] = counter.get_total_flops() / steps
        result["flops_by_op"] = {str(op): n / steps for op, n in counter.get_flop_counts()["Global"].items()}
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--student", default="smollm2-135m-instruct:layers=0-5,24-29")
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill.json"))
    p.add_argument("--sides", default="posttrain,trl")
    p.add_argument("--flops", action="store_true",
                   help="count each side's FLOPs per step (torch FlopCounterMode) instead of timing: one subprocess "
                        "per side, --steps steps, written to --out")
    p.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="both sides load the teacher in this dtype (the student stays float32)")
    p.add_argument("--child", nargs=4, metavar=("SIDE", "STUDENT", "TEACHER", "STEPS"))
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.child[2], int(a.child[3]), count_flops=a.flops, teacher_dtype=a.teacher_dtype)
        return
    from posttrain.models.loading import resolve

    resolve(a.student)  # build a layer-subset folder once, before the sides start
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    sides = a.sides.split(",")
    if a.flops:
        runs = run_sides(__file__, [a.student, a.teacher, str(a.steps), "--flops"], sides, 1, env)
        flops = {x["side"]: x["flops_per_step"] for x in runs}
        summary = {"student": a.student, "teacher": a.teacher, "prompts": B, "max_new_tokens": MAX_NEW,
                   "steps": a.steps, "gflops_per_step": {s: f / 1e9 for s, f in flops.items()},
                   "completion_tokens_per_step": {x["side"]: x["tokens"] for x in runs},
                   "gflops_by_op": {x["side"]: {k: v / 1e9 for k, v in x["flops_by_op"].items()} for x in runs}}
        if "trl" in flops and "posttrain" in flops:
            summary["flop_ratio_trl_over_posttrain"] = flops["trl"] / flops["posttrain"]
        summary["matmul_gflops_per_s_one_thread"] = matmul_peak()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        return
    runs = run_sides(__file__, [a.student, a.teacher, str(a.steps), "--teacher-dtype", a.teacher_dtype], sides,
                     a.rounds, env)
    best = {s: min(x["median_step_s"] for x in runs if x["side"] == s) for s in sides}
    rss = {s: max(x["peak_rss_mb"] for x in runs if x["side"] == s) for s in sides}
    def per_token(x: dict) -> float:
        """Median over steps 2..N of seconds per completion token (the sides sample different lengths)."""
        return statistics.median(t / n for t, n in zip(x["step_seconds"][1:], x["tokens"][1:]))

    per_tok = {s: min(per_token(x) for x in runs if x["side"] == s) for s in sides}
    cpu = {s: min(statistics.median(x["step_cpu_seconds"][1:]) for x in runs if x["side"] == s) for s in sides}
    summary = {"student": a.student, "teacher": a.teacher, "prompts": B, "max_new_tokens": MAX_NEW,
               "steps": a.steps, "rounds": a.rounds, "step_s": best, "step_cpu_s": cpu, "s_per_completion_token": per_tok,
               "peak_rss_mb": rss, "teacher_dtype": a.teacher_dtype, "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")}
    if "trl" in best and "posttrain" in best:
        summary["speedup"] = best["trl"] / best["posttrain"]
        summary["speedup_cpu"] = cpu["trl"] / cpu["posttrain"]
        summary["speedup_per_token"] = per_tok["trl"] / per_tok["posttrain"]
        summary["memory_ratio"] = rss["posttrain"] / rss["trl"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

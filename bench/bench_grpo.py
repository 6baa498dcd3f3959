"""GRPO step time: posttrain vs TRL's GRPOTrainer, same model, prompts, G, lengths and settings, in one run.

    python bench/bench_grpo.py [--model smollm2-135m-instruct] [--steps 6] [--rounds 2]

Setting (both sides): reasoning-gym chain_sum prompts in the chat template, B = 4 prompts × G = 8 completions per
step, at most 32 new tokens, temperature 1, no top-k/top-p, loss "grpo" (clip 0.2, sample-level averaging), β = 0
(no reference model), one update per generation, full fine-tuning, AdamW lr 1e-6, fp32 on CPU, no gradient
checkpointing on either side (TRL's default is on; it is switched off so both do the same work), the same reward
function (the task's own scorer on the last number). Each side runs in its own subprocess, alternating, and the
median step time over steps 2..N is reported (the first step pays one-time costs on both sides). Our side also
reports its per-stage split (generate / reward / update). A third side, `posttrain_per_sample`, is the ablation
with shared-prefix scoring off (each of the G samples re-runs its prompt in the training forward, as TRL does).
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
from common import model_folder, run_sides, step_clock

TASK_KW = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
B, G, MAX_NEW = 4, 8, 32


def run_posttrain(model: str, steps: int, out: Path, shared_prefix: bool = True, **extra) -> dict:
    """GRPO steps of posttrain; `extra`: more GRPOConfig keys (bench_vllm.py passes generation_backend)."""
    from posttrain.recipes.grpo import GRPOConfig, run
    from posttrain.train.logging import read_metrics

    config = GRPOConfig(model=model, task="chain_sum", task_size=256, task_kwargs=TASK_KW, eval_size=0,
                        rewards=["gym"], reward_options={"gym": {"extract": "last_number"}}, loss="grpo",
                        num_generations=G, prompts_per_step=B, max_new_tokens=MAX_NEW, micro_batch_size=B * G,
                        zero_variance_filter=False, lr=1e-6, max_steps=steps, output_dir=str(out / "pt"),
                        progress=False, tensorboard=False, shared_prefix=shared_prefix, **extra)
    run(config)
    rows = [r for r in read_metrics(out / "pt" / "metrics.jsonl") if "time/step" in r]
    split = {k: statistics.median(r.get(k, 0.0) for r in rows[1:]) for k in
             ("time/generate", "time/reward", "time/update", "time/weight_sync", "time/step")}
    return {"step_seconds": [r["time/step"] for r in rows], "split": split}


def run_trl(model: str, steps: int, out: Path, **extra) -> dict:
    """GRPO steps of TRL's GRPOTrainer; `extra`: more trl.GRPOConfig arguments (e.g. use_vllm=True)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models.loading import resolve
    from posttrain.rewards.gym import gym_rows, make_gym_reward

    rows = gym_rows("chain_sum", 256, 0, instruction="\nGive the result alone on the last line as `Answer: <number>`.",
                    **TASK_KW)
    ds = datasets.Dataset.from_list(rows)
    reward = make_gym_reward("last_number")

    clock = step_clock()
    args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=B * G, num_generations=G,
                      max_completion_length=MAX_NEW, temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="grpo",
                      epsilon=0.2, learning_rate=1e-6, max_steps=steps, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", logging_steps=1000, gradient_checkpointing=False, disable_tqdm=True,
                      lr_scheduler_type="constant", seed=0, **extra)
    trainer = GRPOTrainer(model=str(resolve(model)), reward_funcs=reward, args=args, train_dataset=ds,
                          callbacks=[clock])
    trainer.train()
    return {"step_seconds": clock.times}


def child(side: str, model: str, steps: int) -> None:
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        if side == "trl":
            result = run_trl(model, steps, Path(tmp))
        else:
            result = run_posttrain(model, steps, Path(tmp), shared_prefix=side == "posttrain")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpo.json"))
    p.add_argument("--sides", default="posttrain,posttrain_per_sample,trl")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "MODEL", "STEPS"))
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return
    a.model = model_folder(a.model, Path(tempfile.mkdtemp()))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    runs = run_sides(__file__, [a.model, str(a.steps)], a.sides.split(","), a.rounds, env)
    sides = a.sides.split(",")
    best = {s: min(x["median_step_s"] for x in runs if x["side"] == s) for s in sides}
    split = min((x for x in runs if x["side"] == "posttrain"), key=lambda x: x["median_step_s"])["split"]
    summary = {"model": a.model, "prompts": B, "generations": G, "max_new_tokens": MAX_NEW,
               "posttrain_step_s": best["posttrain"], "trl_step_s": best["trl"], "speedup": best["trl"] / best["posttrain"],
               "posttrain_split_s": split,
               "peak_rss_mb": {s: max(x["peak_rss_mb"] for x in runs if x["side"] == s) for s in sides}}
    if "posttrain_per_sample" in best:
        ablation = min((x for x in runs if x["side"] == "posttrain_per_sample"), key=lambda x: x["median_step_s"])
        summary["per_sample_step_s"] = best["posttrain_per_sample"]
        summary["per_sample_split_s"] = ablation["split"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""The distill runs the 2-process test compares (imported by test_distill_parallel.py and by distill_worker.py).

Each job is a `posttrain distill` config on a tiny teacher/student pair; its 2-process form splits the same global
batch over the ranks (each rank takes every other prompt of a step; 2 ranks × 2 micro-batches of 2 sequences equal
1 process × 4 micro-batches of 2, and 1 process × 1 micro-batch of 8: the global token-count normalisation makes the
split and the accumulation invisible).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.models import tiny_model, tiny_tokenizer


def write_data(root: Path) -> dict[str, str]:
    """Prompt/completion rows, 5 held-out rows (unequal split over 2 ranks) and a tiny teacher, under root."""
    root.mkdir(parents=True, exist_ok=True)
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 1}.", "completion": f"{2 * a + 1}"}) + "\n"
                             for a in range(12)))
    held.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 2}.", "completion": f"{2 * a + 2}"}) + "\n"
                            for a in range(5)))
    teacher = root / "teacher"
    if not (teacher / "config.json").exists():
        tiny_model(seed=1, num_layers=2, init_std=0.3).save_pretrained(teacher)
        tiny_tokenizer().save_pretrained(teacher)
    return {"train": str(train), "eval": str(held), "teacher": str(teacher)}


JOBS: dict[str, dict] = {
    # off-policy token-level forward KL on the data's sequences
    "token": dict(mode="token", divergence="forward_kl", num_generations=1),
    # off-policy sequence-level: SFT on the teacher's greedy answers (decoded once on rank 0, shared with every rank)
    "sequence": dict(mode="sequence", responses="teacher", teacher_decoder="greedy", num_generations=1),
    # on-policy full-distribution reverse KL on the student's own samples (G = 2 per prompt)
    "on_policy": dict(mode="on_policy", divergence="reverse_kl", estimator="full", num_generations=2),
    # the same under FSDP2, with a checkpoint per step (DCP) for the resume check
    "on_policy_fsdp2": dict(mode="on_policy", divergence="reverse_kl", estimator="full", num_generations=2,
                            save_steps=1, keep_last=3),
}


def config_keys(name: str, data: dict[str, str], out: Path, *, world_size: int, **extra) -> dict:
    """DistillConfig keys of job `name` for `world_size` ranks, writing to out/name."""
    keys = dict(model="tiny", teacher=data["teacher"], train_file=data["train"], eval_file=data["eval"], rewards=[],
                prompts_per_step=4, max_new_tokens=5, max_steps=3, lr=1e-2, seed=3, progress=False,
                tensorboard=False, output_dir=str(out / name),
                micro_batch_size=2 if world_size > 1 else 8 if name == "token" else 2)
    keys.update(JOBS[name])
    if name.endswith("fsdp2"):
        keys["parallelism"] = "fsdp2"
    keys.update(extra)
    return keys


def run_job(keys: dict):
    """posttrain distill with these keys (in this process / launch)."""
    from posttrain.recipes.distill import DistillConfig, run

    return run(DistillConfig(**keys))

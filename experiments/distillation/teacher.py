"""Stage 0 of the distillation experiment: the teacher = the embedded SmolLM2 after a short SFT run on the task.

    python experiments/distillation/teacher.py [--config experiments/distillation/config.yaml]

Writes <run_root>/data/{teacher_sft,gold_sft}.jsonl and <run_root>/teacher/final (an HF folder). Skipped if done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from posttrain.demo import worked_answer
from posttrain.recipes.sft import SFTConfig
from posttrain.recipes.sft import run as run_sft
from posttrain.rewards.gym import gym_rows
from posttrain.train.checkpoint import atomic_write_text

HERE = Path(__file__).resolve().parent


def rows(c: dict, size: int, seed: int) -> list[dict]:
    return gym_rows(c["task"], size, seed, instruction=c["instruction"], **c["task_kwargs"])


def sft_file(path: Path, data: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps({"prompt": r["prompt"], "completion": [
        {"role": "assistant", "content": worked_answer(r)}]}) + "\n" for r in data))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(HERE / "config.yaml"))
    args = parser.parse_args(argv)
    c = yaml.safe_load(Path(args.config).read_text())
    torch.set_num_threads(c.get("threads", 1))
    root = Path(c["run_root"])
    final = root / "teacher" / "final"
    if (final / "config.json").exists():
        print(f"teacher exists: {final}")
        return 0
    t = c["teacher"]
    data = sft_file(root / "data" / "teacher_sft.jsonl", rows(c, t["train_problems"], c["teacher_seed"]))
    run_sft(SFTConfig(train_file=str(data), model=c["model"], output_dir=str(root / "teacher"), max_length=256,
                      packing=True, micro_batch_size=t["micro_batch_size"], epochs=t["epochs"], lr=t["lr"],
                      warmup_steps=2, seed=0, tensorboard=False, progress=False, keep_last=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

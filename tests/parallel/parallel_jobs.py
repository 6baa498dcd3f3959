"""The runs the 2-process tests compare: each job is a recipe, its keys, and the data it reads.

Imported by the test (1-process references, in the pytest process) and by `fsdp2_worker.py` (the same jobs under
torchrun with 2 ranks). A job's 2-process form splits the same global batch over the ranks: for SFT/DPO 2 ranks ×
micro_batch_size 2 equals 1 rank × 4; for GRPO/PPO each rank generates half of the step's prompts.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

LETTERS = set("abcdefghijklmnopqrstuvwxyz")


def free_port() -> int:
    """A TCP port that is free now on 127.0.0.1 (for torchrun's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def letters_reward(prompts, completions, **kwargs):
    """Fraction of lowercase letters in the completion: smooth enough that groups almost never tie."""
    return [sum(ch in LETTERS for ch in c) / max(len(c), 1) for c in completions]


def has_e_reward(prompts, completions, **kwargs):
    """1 when the completion contains an "e": a binary verifier whose groups often tie (filter, pool, resampling)."""
    return [float("e" in c) for c in completions]


def register_rewards() -> None:
    from posttrain.rewards import REWARDS

    REWARDS["letters"] = lambda: letters_reward
    REWARDS["has_e"] = lambda: has_e_reward


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_data(root: Path) -> dict[str, str]:
    """SFT rows, DPO pairs and RL prompts under root (deterministic)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    sft, dpo = [], []
    for i in range(16):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        pad = " please" * int(torch.randint(0, 4, (1,), generator=g))
        sft.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?{pad}"},
                                 {"role": "assistant", "content": f"Answer: {a + b}"}]})
        dpo.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                    "chosen": [{"role": "assistant", "content": f"It is {a + b}."}],
                    "rejected": [{"role": "assistant", "content": f"I{pad} think {a + b + 1}."}]})
    return {"sft": _write(root / "sft.jsonl", sft), "dpo": _write(root / "dpo.jsonl", dpo),
            "sft_eval": _write(root / "sft_eval.jsonl", sft[:5]), "dpo_eval": _write(root / "dpo_eval.jsonl", dpo[:5]),
            "rl": _write(root / "prompts.jsonl", [{"prompt": f"Say something #{i}"} for i in range(16)])}


COMMON = {"model": "tiny", "progress": False, "tensorboard": False, "seed": 0}


def job(name: str, data: dict[str, str], out: Path, *, world_size: int, **extra) -> tuple[str, dict]:
    """(recipe, config keys) of job `name` for `world_size` ranks, writing to out/name."""
    per_rank = 4 // world_size
    jobs = {
        "sft": ("sft", dict(train_file=data["sft"], eval_file=data["sft_eval"], max_length=96, lr=3e-3, max_steps=1,
                            micro_batch_size=per_rank, packing=False)),
        "sft5": ("sft", dict(train_file=data["sft"], max_length=96, lr=3e-3, max_steps=5, micro_batch_size=per_rank,
                             packing=False, save_steps=1, keep_last=5)),
        "sft_lora": ("sft", dict(train_file=data["sft"], max_length=96, lr=3e-2, max_steps=2, micro_batch_size=per_rank,
                                 packing=False, lora_r=4, gradient_checkpointing=True)),
        "dpo": ("dpo", dict(train_file=data["dpo"], eval_file=data["dpo_eval"], max_length=96, lr=3e-3, max_steps=1,
                            micro_batch_size=per_rank)),
        "reward": ("reward", dict(train_file=data["dpo"], eval_file=data["dpo_eval"], max_length=96, lr=3e-3,
                                  max_steps=2, micro_batch_size=per_rank)),  # step 1 moves only the zero-init head
        "grpo": ("grpo", dict(train_file=data["rl"], rewards=["letters"], loss="grpo", num_generations=4,
                              prompts_per_step=4, max_new_tokens=6, micro_batch_size=4, lr=1e-2, max_steps=1,
                              eval_size=0, kl_coef=0.1, temperature=0.7)),
        "dapo": ("grpo", dict(train_file=data["rl"], rewards=["letters"], loss="dapo", num_generations=4,
                              prompts_per_step=4, max_new_tokens=6, micro_batch_size=4, lr=1e-2, max_steps=1,
                              eval_size=0)),
        "cispo": ("grpo", dict(train_file=data["rl"], rewards=["letters"], loss="cispo", num_generations=4,
                               prompts_per_step=4, max_new_tokens=6, micro_batch_size=4, lr=1e-2, max_steps=1,
                               eval_size=0, updates_per_batch=2)),
        "scalerl": ("grpo", dict(train_file=data["rl"], rewards=["has_e"], loss="scalerl", num_generations=4,
                                 prompts_per_step=4, max_new_tokens=6, micro_batch_size=4, lr=1e-2, max_steps=3,
                                 eval_size=0, dynamic_sampling=True, max_sampling_rounds=3, pass_rate_cap=0.9)),
        "grpo5": ("grpo", dict(train_file=data["rl"], rewards=["letters"], loss="grpo", num_generations=4,
                               prompts_per_step=4, max_new_tokens=6, micro_batch_size=4, lr=1e-2, max_steps=5,
                               eval_size=0, kl_coef=0.05, temperature=0.7)),
        "ppo": ("ppo", dict(train_file=data["rl"], rewards=["letters"], prompts_per_step=4, num_generations=2,
                            max_new_tokens=6, minibatch_size=8, ppo_epochs=1, lr=5e-3, critic_lr=5e-3, kl_coef=0.05,
                            max_steps=1)),
    }
    recipe, keys = jobs[name]
    return recipe, {**COMMON, **keys, "output_dir": str(out / name), **extra}


def run_job(recipe: str, keys: dict, resume: str | None = None):
    """Run a recipe in this process (under torchrun when launched so) from a keys mapping."""
    from posttrain.config import build_config
    from posttrain.recipes import dpo, grpo, ppo, reward, sft

    module = {"sft": sft, "dpo": dpo, "grpo": grpo, "ppo": ppo, "reward": reward}[recipe]
    config_cls = {"sft": sft.SFTConfig, "dpo": dpo.DPOConfig, "grpo": grpo.GRPOConfig, "ppo": ppo.PPOConfig,
                  "reward": reward.RewardConfig}[recipe]
    config = build_config(config_cls, keys)
    return module.run(config, resume=resume) if resume else module.run(config)

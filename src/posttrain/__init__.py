"""posttrain: post-training for language models, test-time compute and diffusion, correct to the equation.

The Python API (posttrain/api.py): `posttrain.sft`, `dpo`, `reward`, `grpo`, `ppo`, `evaluate` and `train_diffusion`
take the command line's keys (or TRL's names) and data as paths, `datasets.Dataset`s or lists of dicts, and return a
RunResult (summary, final_dir, output_dir).
"""

from posttrain.api import RunResult, dpo, evaluate, grpo, ppo, reward, sft, train_diffusion

__version__ = "0.1.0"

__all__ = ["RunResult", "dpo", "evaluate", "grpo", "ppo", "reward", "sft", "train_diffusion"]

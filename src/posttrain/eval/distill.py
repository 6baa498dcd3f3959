"""Held-out evaluation of a distilled student: greedy accuracy with a verifier and reverse KL to the teacher.

The reverse KL is measured where on-policy distillation minimises it, on the student's own samples:
KL(q(y|x) ‖ p(y|x)) = E_{y~q} Σ_t KL(q(·|x, y<t) ‖ p(·|x, y<t)), estimated with one temperature-1 sample per prompt and
the full-distribution per-token KL at each visited prefix (losses.distill.reverse_kl, both heads chunked).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from posttrain.generation.rollout import rollout_sequences
from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
from posttrain.losses.distill import reverse_kl
from posttrain.models.teacher import FrozenTeacher, token_divergences
from posttrain.ops.logps import IGNORE_INDEX
from posttrain.rewards.combine import score_completions


def _prompt(row: dict[str, Any]):
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


@torch.no_grad()
def evaluate_student(student, teacher: FrozenTeacher, tokenizer, rows: list[dict[str, Any]], reward_fn, *,
                     max_new_tokens: int, seed: int, chunk_size: int = 256, batch: int = 32) -> dict[str, float]:
    """Held-out greedy accuracy (reward_fn ≥ 1) and the student's reverse KL to the teacher on its own samples.

    reverse KL per sequence = Σ_t KL(q(·|y_<t) ‖ p(·|y_<t)) over a temperature-1 student sample y of each prompt
    (the full-distribution form at each visited prefix; its mean over prompts estimates KL(q(y|x) ‖ p(y|x))).
    Returns accuracy, its standard error, the mean sequence KL and its standard error, the mean per-token KL.
    """
    was_training = student.training
    student.eval()
    generator = HFGenerator(student, tokenizer)
    device = next(student.parameters()).device
    correct: list[float] = []
    seq_kl: list[float] = []
    token_kl_sum, token_count = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompt_ids = encode_prompts(tokenizer, [_prompt(r) for r in chunk])
        if reward_fn is not None:
            greedy = generator.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
            values, _ = score_completions([reward_fn], [1.0], chunk, list(greedy.texts or []))
            correct += (values >= 1.0).float().tolist()
        sampled = generator.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0,
                                                                seed=seed + i))
        b = rollout_sequences(sampled, generator.pad_token_id).to(device)
        kl = token_divergences(student, teacher, b.input_ids, b.position_ids, b.labels, reverse_kl,
                               chunk_size=chunk_size)  # [N]
        mask = b.labels != IGNORE_INDEX
        per_seq = torch.zeros(mask.shape, dtype=kl.dtype, device=kl.device).masked_scatter(mask, kl).sum(-1)  # [B]
        seq_kl += per_seq.tolist()
        token_kl_sum += float(kl.sum())
        token_count += int(mask.sum())
    student.train(was_training)

    def mean_se(values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)
        return m, math.sqrt(var / len(values))

    acc, acc_se = mean_se(correct)
    kl_m, kl_se = mean_se(seq_kl)
    return {"eval/accuracy": acc, "eval/accuracy_se": acc_se, "eval/reverse_kl_seq": kl_m,
            "eval/reverse_kl_seq_se": kl_se, "eval/reverse_kl_token": token_kl_sum / max(token_count, 1),
            "eval/n": float(len(rows))}

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
from posttrain.train.distributed import Dist
from posttrain.train.parallel import all_gather_objects


def _prompt(row: dict[str, Any]):
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


@torch.no_grad()
def evaluate_student(student, teacher: FrozenTeacher, tokenizer, rows: list[dict[str, Any]], reward_fn, *,
                     max_new_tokens: int, seed: int, chunk_size: int = 256, batch: int = 32,
                     d: Dist | None = None, rows_out: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Held-out greedy accuracy (reward_fn ≥ 1) and the student's reverse KL to the teacher on its own samples.

    reverse KL per sequence = Σ_t KL(q(·|y_<t) ‖ p(·|y_<t)) over a temperature-1 student sample y of each prompt
    (the full-distribution form at each visited prefix; its mean over prompts estimates KL(q(y|x) ‖ p(y|x))).
    Returns accuracy, its standard error, the mean sequence KL and its standard error, the mean per-token KL.
    Row i's sample is drawn with seed `seed + i`, so the numbers do not depend on the batching; with `d` of several
    ranks, rank r evaluates rows r, r + W, ... and the per-row results are gathered (call it on every rank).
    rows_out: if given, filled with the per-row results in row order, "correct" (1.0 / 0.0, with a reward_fn) and
    "reverse_kl_seq" (nats per sample), for paired comparisons of two students on the same rows (McNemar).
    """
    d = d or Dist()
    indices = list(range(d.rank, len(rows), d.world_size))
    was_training = student.training
    student.eval()
    generator = HFGenerator(student, tokenizer)
    device = next(student.parameters()).device
    correct: list[tuple[int, float]] = []
    seq_kl: list[tuple[int, float, int]] = []  # (row, Σ_t KL over its sample, its tokens)
    for i in range(0, len(indices), batch):
        idx = indices[i:i + batch]
        chunk = [rows[j] for j in idx]
        prompt_ids = encode_prompts(tokenizer, [_prompt(r) for r in chunk])
        if reward_fn is not None:
            greedy = generator.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
            values, _ = score_completions([reward_fn], [1.0], chunk, list(greedy.texts or []))
            correct += list(zip(idx, (values >= 1.0).float().tolist()))
        sampled = generator.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0,
                                                                prompt_seeds=tuple(seed + j for j in idx)))
        b = rollout_sequences(sampled, generator.pad_token_id).to(device)
        kl = token_divergences(student, teacher, b.input_ids, b.position_ids, b.labels, reverse_kl,
                               chunk_size=chunk_size)  # [N]
        mask = b.labels != IGNORE_INDEX
        per_seq = torch.zeros(mask.shape, dtype=kl.dtype, device=kl.device).masked_scatter(mask, kl).sum(-1)  # [B]
        seq_kl += list(zip(idx, per_seq.tolist(), mask.sum(-1).tolist()))
    student.train(was_training)
    correct = sorted(c for part in all_gather_objects(correct, d) for c in part)
    seq_kl = sorted(c for part in all_gather_objects(seq_kl, d) for c in part)
    if rows_out is not None:
        rows_out["correct"] = [c[1] for c in correct]
        rows_out["reverse_kl_seq"] = [c[1] for c in seq_kl]
    token_kl_sum = sum(c[1] for c in seq_kl)
    token_count = sum(c[2] for c in seq_kl)

    def mean_se(values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        m = sum(values) / len(values)
        var = sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)
        return m, math.sqrt(var / len(values))

    acc, acc_se = mean_se([c[1] for c in correct])
    kl_m, kl_se = mean_se([c[1] for c in seq_kl])
    return {"eval/accuracy": acc, "eval/accuracy_se": acc_se, "eval/reverse_kl_seq": kl_m,
            "eval/reverse_kl_seq_se": kl_se, "eval/reverse_kl_token": token_kl_sum / max(token_count, 1),
            "eval/n": float(len(rows))}

"""Control preservation of a targeted behaviour change (the identity change of the DPO examples): did the training
change what it should and leave the rest alone?

Three measures, each with its sample size and standard error:
- identity rate: the share of greedy answers to held-out identity questions that use the new identity (target);
- identity leak: the share of greedy answers to unrelated control prompts that mention the new identity (should
  stay 0: a model that says "I'm Pico" when asked for a synonym of happy has overgeneralized);
- control log-likelihood change: for the base model's own greedy answers y_b to the control prompts,
  Δ = mean_i [ (1/|y_b,i|) log π_θ(y_b,i | x_i) − (1/|y_b,i|) log π_base(y_b,i | x_i) ] (per-token, nats). 0 means the
  trained model still finds the base model's answers exactly as likely; a large negative Δ means drift.

Usage: `reference = control_reference(base_model, tokenizer)` once (greedy answers + their log-likelihoods under the
base model), then `preservation(trained_model, tokenizer, reference, identity_questions)` per trained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from posttrain.data.collate import pad_batch
from posttrain.data.preference import greedy_replies, mentions_new_identity
from posttrain.data.tokenize import encode_unpaired
from posttrain.models.forward import TokenLogps
from posttrain.ops.logps import IGNORE_INDEX, shift_labels

CONTROL_PROMPTS: list[str] = [
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "What is 2 + 3?",
    "Name three colors.",
    "How many days are in a week?",
    "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into Spanish.",
    "Write one sentence about the ocean.",
    "What is the opposite of cold?",
    "Name a fruit that is yellow.",
    "What is 10 minus 4?",
    "Which planet is closest to the sun?",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
    "Suggest a name for a pet goldfish.",
    "What color is the sky on a clear day?",
    "Explain what a noun is in one sentence.",
    "What is the square root of 81?",
    "Name a musical instrument with strings.",
    "What season comes after winter?",
    "Write a short greeting for a birthday card.",
    "What is the chemical symbol for gold?",
]
"""Unrelated control prompts (general knowledge, arithmetic, language, short writing), none about the assistant."""


@dataclass(frozen=True)
class ControlReference:
    """The base model's greedy answers to the control prompts and their per-token log-likelihoods under it."""

    prompts: list[str]
    answers: list[str]
    base_logps_per_token: list[float]


@dataclass(frozen=True)
class PreservationReport:
    """Rates with their sample sizes and binomial standard errors; Δ with its standard error over prompts."""

    identity_rate: float
    identity_n: int
    identity_se: float
    control_identity_rate: float
    control_n: int
    control_identity_se: float
    control_logp_delta: float  # mean per-token Δ log π of the base answers (nats); 0 = unchanged
    control_logp_delta_se: float
    identity_answers: list[str]
    control_answers: list[str]

    def metrics(self) -> dict[str, float]:
        """The scalar measures, with their sample sizes and standard errors, for logs and results.json."""
        return {
            "identity_rate": self.identity_rate, "identity_n": self.identity_n, "identity_se": self.identity_se,
            "control_identity_rate": self.control_identity_rate, "control_n": self.control_n,
            "control_identity_se": self.control_identity_se, "control_logp_delta": self.control_logp_delta,
            "control_logp_delta_se": self.control_logp_delta_se,
        }


def binomial_se(rate: float, n: int) -> float:
    """Standard error sqrt(p(1 − p)/n) of a proportion (0 for n = 0)."""
    return math.sqrt(rate * (1 - rate) / n) if n else 0.0


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (Bessel-corrected; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def answer_logps_per_token(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                           batch_size: int = 8) -> list[float]:
    """(1/|y|) log π(y | x) of each answer y to its prompt x, both through the chat template as training encodes a
    single-turn conversation (`encode_unpaired`). Answers with no token score NaN."""
    was_training = model.training
    model.eval()
    fn = TokenLogps(model)
    out: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            examples = []
            for x, y in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
                ids = encode_unpaired(tokenizer, {"prompt": [{"role": "user", "content": x}],
                                                  "completion": [{"role": "assistant", "content": y}]})
                examples.append({"input_ids": ids["prompt_ids"] + ids["completion_ids"],
                                 "loss_mask": [0] * len(ids["prompt_ids"]) + [1] * len(ids["completion_ids"])})
            batch = pad_batch(examples, tokenizer.pad_token_id)
            device = next(model.parameters()).device
            labels = shift_labels(batch["input_ids"], batch["loss_mask"]).to(device)
            logps = fn(batch["input_ids"].to(device), labels, batch["position_ids"].to(device)).logps  # [b, T]
            valid = labels != IGNORE_INDEX
            counts = valid.sum(dim=1)
            sums = torch.where(valid, logps, 0.0).sum(dim=1)
            out += [float(s / n) if n else float("nan") for s, n in zip(sums.tolist(), counts.tolist())]
    finally:
        model.train(was_training)
    return out


def control_reference(base_model, tokenizer, prompts: Sequence[str] = CONTROL_PROMPTS, *,
                      max_new_tokens: int = 48) -> ControlReference:
    """The base model's greedy answers to the control prompts and their per-token log-likelihood under it."""
    answers = greedy_replies(base_model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    return ControlReference(list(prompts), answers, answer_logps_per_token(base_model, tokenizer, prompts, answers))


def preservation(
    model,
    tokenizer,
    reference: ControlReference,
    identity_questions: Sequence[str | list[dict[str, str]]],
    *,
    is_identity: Callable[[str], bool] = mentions_new_identity,
    max_new_tokens: int = 48,
) -> PreservationReport:
    """Identity rate on `identity_questions`, identity leak and log-likelihood change on the reference's control
    prompts, for a trained `model` (the reference was made once from the base model)."""
    identity_answers = greedy_replies(model, tokenizer, list(identity_questions), max_new_tokens=max_new_tokens)
    control_answers = greedy_replies(model, tokenizer, reference.prompts, max_new_tokens=max_new_tokens)
    trained = answer_logps_per_token(model, tokenizer, reference.prompts, reference.answers)
    deltas = [t - b for t, b in zip(trained, reference.base_logps_per_token) if not (math.isnan(t) or math.isnan(b))]
    delta, delta_se = mean_se(deltas) if deltas else (float("nan"), 0.0)
    rate = sum(map(is_identity, identity_answers)) / max(len(identity_answers), 1)
    leak = sum(map(is_identity, control_answers)) / max(len(control_answers), 1)
    return PreservationReport(
        identity_rate=rate, identity_n=len(identity_answers), identity_se=binomial_se(rate, len(identity_answers)),
        control_identity_rate=leak, control_n=len(control_answers),
        control_identity_se=binomial_se(leak, len(control_answers)),
        control_logp_delta=delta, control_logp_delta_se=delta_se,
        identity_answers=identity_answers, control_answers=control_answers,
    )

"""What a preference-tuning run changed besides its target (DPO as a KL-regularised change, Rafailov et al. 2023 §4).

A run that teaches a new identity should move the answers to identity questions and leave everything else alone:

- identity rate: the fraction of greedy answers to held-out identity questions that use the new name
  (`data.preference.mentions_new_identity`);
- leakage: the fraction of greedy answers to held-out *unrelated* prompts that use it;
- unchanged: the fraction of those unrelated answers that are exactly the base model's own answer;
- control log-likelihood change: how much less likely the trained model finds the base model's own answers to the
  unrelated prompts, in nats per answer token,
      Δ = (Σ_i log π_θ(a_i | x_i) − Σ_i log π_base(a_i | x_i)) / Σ_i |a_i|,
  a sample estimate of the per-token cross-entropy increase on base behaviour (≤ 0 is a loss of behaviour;
  −KL-like: at π_θ = π_base it is exactly 0).

Rates carry Wilson 95% intervals; Δ carries the standard error of the per-prompt per-token differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from posttrain.data.collate import pad_batch
from posttrain.data.preference import greedy_replies, mentions_new_identity
from posttrain.data.tokenize import encode_conversation
from posttrain.models.forward import TokenLogps
from posttrain.ops.logps import IGNORE_INDEX, shift_labels


@dataclass(frozen=True)
class Rate:
    """successes / n with its Wilson 95% interval [low, high]."""

    value: float
    n: int
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}] (n={self.n})"


def wilson(successes: int, n: int, z: float = 1.96) -> Rate:
    """Wilson score interval for a binomial proportion (Wilson 1927); n = 0 gives NaNs."""
    if n == 0:
        return Rate(float("nan"), 0, float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(p, n, max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def answer_logps(model, tokenizer, prompts: Sequence[list[dict]], answers: Sequence[str], *,
                 batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π(answer tokens | prompt) and the answer token count per row, through the chat template.

    prompts: [N] chat prompts; answers: [N] assistant replies. Returns ([N] float64 sums, [N] token counts); the
    scored tokens are exactly those an SFT loss on the reply would cover (template tokens of the turn included).
    """
    examples = [encode_conversation(tokenizer, list(p) + [{"role": "assistant", "content": a}], train_from=len(p))
                for p, a in zip(prompts, answers, strict=True)]
    scorer = TokenLogps(model)
    device = next(model.parameters()).device
    sums, counts = [], []
    for i in range(0, len(examples), batch):
        b = pad_batch(examples[i:i + batch], tokenizer.pad_token_id)
        labels = shift_labels(b["input_ids"], b["loss_mask"], b["position_ids"])  # [b, T] next-token targets
        out = scorer(b["input_ids"].to(device), labels.to(device), b["position_ids"].to(device),
                     b["attention_mask"].to(device))
        sums.append(out.logps.double().sum(-1).cpu())  # [b]
        counts.append((labels != IGNORE_INDEX).sum(-1))  # [b]
    return torch.cat(sums), torch.cat(counts)


@dataclass(frozen=True)
class PreservationReport:
    """The four measures of the module docstring, with their intervals and the answers they came from."""

    identity: Rate
    leakage: Rate
    unchanged: Rate
    control_logp_change: float  # nats per answer token (trained − base) on the base model's own answers
    control_logp_change_se: float
    control_tokens: int
    identity_answers: list[str]
    control_answers: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"identity {self.identity}; leakage into unrelated answers {self.leakage}; unrelated answers "
                f"unchanged {self.unchanged}; base answers' log-likelihood {self.control_logp_change:+.3f} ± "
                f"{self.control_logp_change_se:.3f} nats/token ({self.control_tokens} tokens)")


def preservation_report(model, tokenizer, *, identity_questions: Sequence[list[dict]],
                        control_prompts: Sequence[list[dict]], base_answers: Sequence[str],
                        base_logps: tuple[torch.Tensor, torch.Tensor] | None = None, base_model=None,
                        max_new_tokens: int = 64, control_answers: Sequence[str] | None = None,
                        ) -> PreservationReport:
    """Measure `model` against the base model's own answers to `control_prompts`.

    base_logps: `answer_logps(base_model, ...)` of those answers, computed once and reused across runs; or pass
    `base_model` to compute it here. control_answers: `model`'s greedy answers to `control_prompts` when already
    generated (e.g. `model` is the base model itself); otherwise they are generated here. The model is put in eval mode.
    """
    model.eval()
    if base_logps is None:
        if base_model is None:
            raise ValueError("pass base_logps (precomputed) or base_model")
        base_logps = answer_logps(base_model.eval(), tokenizer, control_prompts, base_answers)
    identity_answers = greedy_replies(model, tokenizer, list(identity_questions), max_new_tokens=max_new_tokens)
    if control_answers is None:
        control_answers = greedy_replies(model, tokenizer, list(control_prompts), max_new_tokens=max_new_tokens)
    elif len(control_answers) != len(control_prompts):
        raise ValueError(f"{len(control_answers)} control answers for {len(control_prompts)} control prompts")
    trained_sums, counts = answer_logps(model, tokenizer, control_prompts, base_answers)
    base_sums, base_counts = base_logps
    if not torch.equal(counts, base_counts):
        raise ValueError("base_logps were computed on other answers (token counts differ)")
    per_prompt = (trained_sums - base_sums) / counts.clamp(min=1)  # [N] nats/token per prompt
    n = len(control_prompts)
    return PreservationReport(
        identity=wilson(sum(map(mentions_new_identity, identity_answers)), len(identity_answers)),
        leakage=wilson(sum(map(mentions_new_identity, control_answers)), n),
        unchanged=wilson(sum(a == b.strip() for a, b in zip(control_answers, base_answers, strict=True)), n),
        control_logp_change=float((trained_sums - base_sums).sum() / counts.sum()),
        control_logp_change_se=float(per_prompt.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"),
        control_tokens=int(counts.sum()),
        identity_answers=identity_answers,
        control_answers=list(control_answers),
    )

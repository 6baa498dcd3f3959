"""A frozen teacher beside a trained student: final hidden states at the scored positions, and per-token divergences.

The distillation losses need whole next-token distributions of both models at every scored position. Neither model's
[B, T, V] logits are built: each model's decoder gives its final hidden states, the rows that carry a label are kept
([N, D]), and ops.distill.divergence_at_rows applies both LM heads chunk by chunk. The teacher can sit on another
device (`device=`); its hidden rows and each chunk's log-probs are moved to the student's device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from posttrain.models.forward import LogpsOutput, TokenLogps, base_model, fusable
from posttrain.ops.distill import RowDivergence, divergence_at_rows
from posttrain.ops.logps import DEFAULT_CHUNK, IGNORE_INDEX


def hidden_at_labels(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states at the positions whose label is not IGNORE_INDEX [N, D], LM head weight [V, D]).

    input_ids, position_ids, labels [B, T] (on the model's device). Needs a plain linear head (models.forward.fusable).
    Rows are in row-major order of the [B, T] positions, the order of `labels[labels != IGNORE_INDEX]`.
    """
    if not fusable(model):
        raise ValueError("distillation scores hidden states through a plain linear LM head; this model's head is not "
                         "one (logit soft-capping, a scale, or a LoRA-wrapped head)")
    inner = base_model(model)
    hidden = inner.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    B, T, D = hidden.shape
    rows = (labels.reshape(B * T) != IGNORE_INDEX).nonzero().squeeze(1)  # [N]
    return hidden.reshape(B * T, D).index_select(0, rows), inner.get_output_embeddings().weight


class TeacherScores(TokenLogps):
    """The frozen teacher behind one `forward`, so that FSDP2 can shard it as it shards the student (each rank holds
    1/W of its weights between calls; a layer's are gathered while it runs).

    forward(input_ids, labels, position_ids) -> LogpsOutput (log p of the labels, [B, T]);
    forward(input_ids, labels, position_ids, rows=True) -> (final hidden states at the labelled positions [N, D],
    LM head weight [V, D]) as `hidden_at_labels`; sharded, the head is a copy (the gathered one is freed after).
    """

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None, *,  # type: ignore[override]
                rows: bool = False, **kwargs) -> LogpsOutput | tuple[torch.Tensor, torch.Tensor]:
        if not rows:
            return super().forward(input_ids, labels, position_ids, attention_mask, **kwargs)
        if input_ids is None or labels is None or position_ids is None:
            raise ValueError("the teacher's rows need input_ids, labels and position_ids")
        hidden, weight = hidden_at_labels(self.model, input_ids, position_ids, labels)
        return hidden, weight.detach().clone() if isinstance(self, FSDPModule) else weight


class FrozenTeacher:
    """The teacher: eval mode, no gradients, on its own device (default: where it already is).

    wrap: applied to the teacher's TeacherScores module, e.g. `lambda m: train.parallel.parallelize(m, d)`, which
    shards it under FSDP2 (every rank must then score the same number of batches, as training steps do; hold it
    gathered with train.parallel.gathered for work that differs across ranks) and leaves it whole under DDP.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None, chunk_size: int = DEFAULT_CHUNK,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.chunk_size = chunk_size
        self.num_parameters = sum(p.numel() for p in self.model.parameters())  # (whole, also when sharded)
        self.scores: nn.Module = TeacherScores(self.model, chunk_size=chunk_size)
        if wrap is not None:
            self.scores = wrap(self.scores)

    @torch.no_grad()
    def hidden_at_labels(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `hidden_at_labels`, run on the teacher's device (inputs are moved there)."""
        return self.scores(input_ids.to(self.device), labels.to(self.device), position_ids.to(self.device), rows=True)

    @torch.no_grad()
    def token_logps(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels) [B, T] (0 where ignored), chunked, returned on the inputs' device."""
        out = self.scores(input_ids.to(self.device), labels.to(self.device), position_ids.to(self.device))
        return out.logps.to(input_ids.device)


class DistillStudent(TokenLogps):
    """The trained student behind one `forward`, so that a DDP or FSDP2 wrapper sees every use of its parameters.

    forward(input_ids, labels, position_ids) -> LogpsOutput (TokenLogps: log q of the labels, [B, T]);
    forward(input_ids, labels, position_ids, teacher_rows=..., teacher_weight=..., divergence=...) -> [N]: the
    per-token divergence D(q_θ(·|y_<t), p(·|y_<t)) at every labelled position (row-major over [B, T]), from the
    teacher's final hidden rows [N, D_t] and head [V, D_t] (FrozenTeacher.hidden_at_labels), chunked.
    """

    def forward(self, input_ids=None, labels=None, position_ids=None, attention_mask=None, *,  # type: ignore[override]
                teacher_rows: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                divergence: RowDivergence | None = None, temperature: float = 1.0, **kwargs):
        if divergence is None:
            return super().forward(input_ids, labels, position_ids, attention_mask, temperature=temperature, **kwargs)
        if teacher_rows is None or teacher_weight is None or input_ids is None or labels is None:
            raise ValueError("a divergence needs input_ids, labels and the teacher's rows and head")
        student_rows, student_weight = hidden_at_labels(self.model, input_ids, position_ids, labels)
        return divergence_at_rows(student_rows, student_weight, teacher_rows, teacher_weight, divergence,
                                  chunk_size=self.chunk_size, temperature=temperature)


def token_divergences(student: nn.Module, teacher: FrozenTeacher, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      labels: torch.Tensor, divergence: RowDivergence, *, chunk_size: int = DEFAULT_CHUNK,
                      temperature: float = 1.0) -> torch.Tensor:
    """D(q_θ(·|y_<t), p(·|y_<t)) at every labelled position: [N] (row-major over [B, T]), differentiable w.r.t. the
    student. Peak extra memory: a few [chunk, V] buffers, never either model's [B, T, V] logits."""
    student_rows, student_weight = hidden_at_labels(student, input_ids, position_ids, labels)
    teacher_rows, teacher_weight = teacher.hidden_at_labels(input_ids, position_ids, labels)
    return divergence_at_rows(student_rows, student_weight, teacher_rows, teacher_weight,
                              divergence, chunk_size=chunk_size, temperature=temperature)

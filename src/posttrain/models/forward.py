"""A causal LM as a function (input_ids, position_ids, labels) -> per-token log-probs, without full logits.

`TokenLogps` wraps a Hugging Face causal LM (plain, peft-wrapped or not) as an nn.Module so it can itself be wrapped by
DistributedDataParallel: its forward runs the decoder to the final hidden states and applies the LM head chunk by
chunk (ops.logps.logps_from_hidden). Models whose head is not a plain bias-free linear map (logit soft-capping,
logit scales, a LoRA-wrapped head) take the logits path instead, which is exact but materializes [B, T, V].
`TokenLogps.shared_prefix` scores RL rollouts packed by `data.collate.pack_shared_prefix` (each prompt run once for
its G samples) and returns the same [n, L] label layout as a per-sample forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posttrain.data.collate import SharedPrefixBatch
from posttrain.ops.logps import (
    DEFAULT_CHUNK,
    IGNORE_INDEX,
    entropy_at_rows,
    entropy_from_hidden,
    entropy_from_logits,
    logps_at_rows,
    logps_from_hidden,
    logps_from_logits,
)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fusable(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    config = model.config
    return (
        type(head) is nn.Linear
        and head.bias is None
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
        and hasattr(model, "get_decoder")
    )


@dataclass
class LogpsOutput:
    logps: torch.Tensor  # [B, T]; 0 where labels == IGNORE_INDEX
    entropy: torch.Tensor | None = None  # [B, T], detached


def fusable(model: nn.Module) -> bool:
    """Whether `model` (peft-wrapped or not) can take the fused head paths (`shared_prefix` needs it)."""
    return _fusable(base_model(model))


class TokenLogps(nn.Module):
    """forward(input_ids [B,T], position_ids [B,T], labels [B,T]) -> LogpsOutput with logps [B, T] of the labels."""

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        packed: SharedPrefixBatch | None = None,
    ) -> LogpsOutput:
        """Log-probs of `labels` (and entropies) per position; with `packed`, of a shared-prefix packing (same as
        `shared_prefix`, but through forward, so DDP/FSDP wrappers around this module see the call)."""
        if packed is not None:
            return self.shared_prefix(packed, temperature=temperature, with_entropy=with_entropy)
        if input_ids is None or labels is None:
            raise ValueError("TokenLogps needs input_ids and labels, or packed")
        inner = base_model(self.model)
        if _fusable(inner):
            hidden = inner.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [B, T, D]
            weight = inner.get_output_embeddings().weight  # [V, D]
            logps = logps_from_hidden(hidden, weight, labels, chunk_size=self.chunk_size, temperature=temperature)
            entropy = (
                entropy_from_hidden(hidden.detach(), weight.detach(), chunk_size=self.chunk_size, temperature=temperature,
                                    mask=labels != IGNORE_INDEX)
                if with_entropy else None
            )
            return LogpsOutput(logps, entropy)
        logits = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # [B, T, V]
        logps = logps_from_logits(logits, labels, chunk_size=self.chunk_size, temperature=temperature)
        entropy = entropy_from_logits(logits.detach(), chunk_size=self.chunk_size, temperature=temperature) if with_entropy else None
        return LogpsOutput(logps, entropy)

    def shared_prefix(
        self, packed: SharedPrefixBatch, *, temperature: float = 1.0, with_entropy: bool = False
    ) -> LogpsOutput:
        """Log-probs of rollout completions from a prompt-shared packing -> LogpsOutput in the [n, L] label layout.

        Equal to `forward` on the per-sample rows (tests/rl check values and gradients); needs a fusable model.
        """
        inner = base_model(self.model)
        if not _fusable(inner):
            raise ValueError("shared-prefix scoring needs a plain linear LM head; use the per-sample forward")
        weight = inner.get_output_embeddings().weight  # [V, D]
        hidden = inner.get_decoder()(
            input_ids=packed.input_ids, position_ids=packed.position_ids,
            attention_mask=packed.additive_mask(weight.dtype), use_cache=False,
        ).last_hidden_state  # [R, S, D]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.src)  # [M, D]
        n, L = packed.shape
        picked = logps_at_rows(rows, weight, packed.labels, chunk_size=self.chunk_size, temperature=temperature)
        logps = picked.new_zeros(n * L).index_copy(0, packed.dst, picked).view(n, L)
        entropy = None
        if with_entropy:
            values = entropy_at_rows(rows.detach(), weight.detach(), chunk_size=self.chunk_size, temperature=temperature)
            entropy = values.new_zeros(n * L).index_copy(0, packed.dst, values).view(n, L)
        return LogpsOutput(logps, entropy)

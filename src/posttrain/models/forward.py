"""A causal LM as a function (input_ids, position_ids, labels) -> per-token log-probs, without full logits.

`TokenLogps` wraps a Hugging Face causal LM (plain, peft-wrapped or not) as an nn.Module so it can itself be wrapped by
DistributedDataParallel: its forward runs the decoder to the final hidden states and applies the LM head chunk by
chunk (ops.logps.logps_from_hidden). Models whose head is not a plain bias-free linear map (logit soft-capping,
logit scales, a LoRA-wrapped head) take the logits path instead, which is exact but materializes [B, T, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posttrain.ops.logps import DEFAULT_CHUNK, entropy_from_hidden, entropy_from_logits, logps_from_hidden, logps_from_logits


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


class TokenLogps(nn.Module):
    """forward(input_ids [B,T], position_ids [B,T], labels [B,T]) -> LogpsOutput with logps [B, T] of the labels."""

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> LogpsOutput:
        inner = base_model(self.model)
        if _fusable(inner):
            hidden = inner.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [B, T, D]
            weight = inner.get_output_embeddings().weight  # [V, D]
            logps = logps_from_hidden(hidden, weight, labels, chunk_size=self.chunk_size, temperature=temperature)
            entropy = (
                entropy_from_hidden(hidden.detach(), weight.detach(), chunk_size=self.chunk_size, temperature=temperature)
                if with_entropy else None
            )
            return LogpsOutput(logps, entropy)
        logits = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # [B, T, V]
        logps = logps_from_logits(logits, labels, chunk_size=self.chunk_size, temperature=temperature)
        entropy = entropy_from_logits(logits.detach(), chunk_size=self.chunk_size, temperature=temperature) if with_entropy else None
        return LogpsOutput(logps, entropy)

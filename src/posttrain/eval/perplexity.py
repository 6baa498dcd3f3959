"""Perplexity of a model on a text or chat file (`posttrain eval perplexity_file=...`), reported with its token count.

Rows are read and checked like SFT data (data/formats.py): {"text": ...} rows score every token after the first
(plus the EOS that SFT appends), {"messages": [...]} and prompt/completion rows score the assistant / completion
tokens only, exactly the tokens SFT trains on (data/tokenize.encode_sft), so the figure matches the SFT recipe's
eval/perplexity on the same file. Rows longer than `max_length` are cut (the cut is counted in `truncated_rows`).
The metric itself is eval.metrics.perplexity: exp of the mean negative log-likelihood per target token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.errors import DataError
from posttrain.eval.metrics import perplexity


@torch.no_grad()
def file_perplexity(model: nn.Module, tokenizer, path: str | Path, *, max_length: int = 1024,
                    batch_size: int = 8) -> dict[str, Any]:
    """{"perplexity", "nll", "num_tokens", "num_rows", "truncated_rows"} of `model` on the rows of `path`."""
    from posttrain.data.formats import load_dataset_file
    from posttrain.data.tokenize import encode_sft, truncate
    from posttrain.models.forward import TokenLogps
    from posttrain.ops.logps import IGNORE_INDEX

    rows, fmt = load_dataset_file(path, "sft")
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        ex = encode_sft(tokenizer, row, fmt)
        if len(ex["input_ids"]) > max_length:
            ex, truncated = truncate(ex, max_length), truncated + 1
        if sum(ex["loss_mask"][1:]) == 0:
            raise DataError(f"{path}: row {i}: no target tokens to score (empty completion, or cut by "
                            f"max_length={max_length})")
        examples.append(ex)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    scorer = TokenLogps(model)
    total_logp, total_mask = [], []
    try:
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo:lo + batch_size]
            T = max(len(e["input_ids"]) for e in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            labels = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
            attn = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[b, :n] = torch.tensor(e["input_ids"])
                attn[b, :n] = 1
                target = torch.tensor(e["input_ids"][1:])
                keep = torch.tensor(e["loss_mask"][1:], dtype=torch.bool)
                labels[b, :n - 1] = torch.where(keep, target, torch.full_like(target, IGNORE_INDEX))
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            out = scorer(ids.to(device), labels.to(device), positions.to(device), attn.to(device))
            mask = labels != IGNORE_INDEX
            total_logp.append(out.logps.float().cpu()[mask].double())
            total_mask.append(torch.ones(int(mask.sum()), dtype=torch.float64))
    finally:
        model.train(was_training)
    result = perplexity(torch.cat(total_logp).numpy(), torch.cat(total_mask).numpy())
    return {"perplexity": result.perplexity, "nll": result.nll, "num_tokens": result.num_tokens,
            "num_rows": len(examples), "truncated_rows": truncated}

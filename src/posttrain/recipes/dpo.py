"""DPO recipe (Rafailov et al. 2023, arXiv 2305.18290): the loss by name, a cached or live reference, TR-DPO.

    posttrain dpo --config configs/dpo_identity.yaml [key=value ...] [--resume]

The loop: read + validate all pairs -> tokenize prompt+chosen and prompt+rejected -> reference log-probs of every
pair, once (the cache; training then runs no reference forward) -> for each optimizer step, this rank's
micro-batches of pairs -> the 2b sequences of a micro-batch through the policy in ONE forward (packed, or padded)
-> summed sequence log-probs -> DPO_LOSSES[loss] normalized by the step's global pair count -> clip -> step ->
every τ steps TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656) moves π_ref toward π_θ and the cache is recomputed.

The reference π_ref is, in this order of preference (`reference_kind`):
- "policy": the policy itself, read only when it equals π_ref: at step 0, or right after a hard sync (α = 1).
  Needs the cache; costs no memory.
- "base": the policy with its LoRA adapters disabled (LoRA without TR-DPO).
- "copy": a frozen copy of the network (LoRA merged in): for a live reference of a full fine-tune, a live
  reference with TR-DPO, or a soft sync (whose π_ref is a mix no single network state equals).
TRL refuses `sync_ref_model` together with `precompute_ref_log_probs` (and with PEFT); here a sync simply
recomputes the cache, and LoRA policies sync into a merged copy. Data order is a pure function of (seed, step) and
the cache and the reference weights are saved in each checkpoint, so `--resume` continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from posttrain.data.pairs import (
    Example,  # noqa: F401 -- importable from here too, as before
    SequenceBatch,
    encode_pairs,
    pair_sequences,
    sequence_batch,
    sequence_logps,
    target_count,
)
from posttrain.errors import ConfigError
from posttrain.losses.dpo import DEFAULT_BETA, DPO_LOSSES, REFERENCE_FREE, preferred_ft_loss
from posttrain.models.forward import TokenLogps
from posttrain.models.loading import load_model
from posttrain.models.reference import (
    effective_weights,  # noqa: F401 -- importable from here too, as before
    reference_kind,
    reference_logps_fn,
    sync_reference,
)
from posttrain.train.distributed import all_reduce_sum, run_distributed
from posttrain.train.guards import NonFiniteGuard
from posttrain.train.logging import MetricsLogger, print_run_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import all_reduce_max, clip_grad_norm, gathered, no_sync, parallelize
from posttrain.train.run_dir import open_run
from posttrain.train.sharded import check_resume_layout, export_final, resume_step, save_step, weights_checkpoint
from posttrain.train.state import Progress, announced, prepare_model, seed_everything


@dataclass(kw_only=True)
class DPOConfig(RunOptions):
    train_file: str = field(help="preference pairs: prompt/chosen/rejected (plain or conversational), "
                                 ".jsonl/.json/.parquet/.csv or a datasets folder")
    model: str = field("smollm2-135m-instruct", help="embedded model name, local HF folder, or tiny[:k=v,...]")
    eval_file: str | None = field(None, help="held-out pairs in the same format; default: none")
    output_dir: str = field("runs/dpo", help="where checkpoints, metrics.jsonl, TensorBoard logs and final/ go")
    loss: str = field("sigmoid", help="sigmoid (DPO), ipo, ipo_avg (IPO on length-averaged log-probs, as TRL), "
                                      "hinge, simpo, orpo (no reference), unweighted (DPO without its weighting; "
                                      "alias idea0), preferred_ft (SFT on winners; alias idea1)")
    beta: float | None = field(None, help="β: strength of the pull toward π_ref; default: the loss's paper value "
                                          "(0.1; SimPO 2.0; ORPO's λ 0.1)")
    simpo_gamma_beta_ratio: float = field(0.5, help="SimPO margin γ as a fraction of β (SimPO's code: 0.5)")
    label_smoothing: float = field(0.0, help="conservative DPO ε, the assumed label-flip rate (sigmoid only)")
    sft_weight: float = field(0.0, help="add w × the token-mean NLL of the chosen answers (RPO, Pang et al. 2024; "
                                        "TRL's rpo_alpha); 0 = the loss alone")
    precompute_ref_logps: bool = field(True, help="compute reference log-probs once over the data (and again "
                                                  "after each TR-DPO sync) instead of a reference forward per step")
    ref_batch_size: int = field(16, help="pairs per forward when computing the reference cache")
    ref_sync_steps: int = field(0, help="TR-DPO τ: update π_ref every τ optimizer steps; 0 = fixed reference")
    ref_sync_alpha: float = field(0.6, help="TR-DPO α: π_ref <- α·π_θ + (1-α)·π_ref; 1.0 = hard update")
    max_length: int = field(512, help="tokens per sequence (prompt + answer); longer ones lose their end")
    packing: bool = field(True, help="pack a micro-batch's sequences into rows of max_length tokens "
                                     "(attention kept inside each sequence); false = right-pad")
    micro_batch_size: int = field(4, help="pairs per forward/backward (2x sequences)")
    grad_accum_steps: int = field(1, help="micro-batches per optimizer step and process")
    epochs: float = field(1.0, help="passes over the pairs (ignored if max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps; -1 = derived from epochs")
    lr: float = field(1e-6, help="peak learning rate (DPO paper and TRL: 1e-6 for full fine-tuning)")
    weight_decay: float = field(0.0, help="AdamW weight decay (not on biases and norms)")
    min_lr_ratio: float = field(0.0, help="cosine decay floor as a fraction of lr")
    lr_schedule: Literal["constant", "cosine"] = field("constant", help="cosine or constant (after warmup)")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    eval_steps: int = field(0, help="evaluate every N steps; 0 = only at the end")
    chunk_size: int = field(256, help="rows per chunk of the fused LM-head log-prob computation")

    def __post_init__(self) -> None:
        if self.beta is None and self.loss in DPO_LOSSES:
            self.beta = DEFAULT_BETA.get(self.loss, 0.1)
        super().__post_init__()  # the shared keys' checks (choices, counts, trackers)

    def validate(self) -> None:
        for key in ("max_length", "micro_batch_size", "grad_accum_steps", "ref_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"key 'loss' must be one of {sorted(DPO_LOSSES)}, got {self.loss!r}.")
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss, 0.1)
        if self.beta <= 0:
            raise ConfigError(f"key 'beta' must be > 0, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"key 'label_smoothing' must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"key 'label_smoothing' applies only to loss=sigmoid, not {self.loss!r}.")
        if self.sft_weight < 0:
            raise ConfigError(f"key 'sft_weight' must be >= 0, got {self.sft_weight}.")
        if self.ref_sync_steps < 0:
            raise ConfigError(f"key 'ref_sync_steps' must be >= 0, got {self.ref_sync_steps}.")
        if not 0 < self.ref_sync_alpha <= 1:
            raise ConfigError(f"key 'ref_sync_alpha' must be in (0, 1], got {self.ref_sync_alpha}.")
        if self.lr <= 0:
            raise ConfigError(f"key 'lr' must be > 0, got {self.lr}.")
        if self.max_steps < -1 or self.max_steps == 0:
            raise ConfigError(f"key 'max_steps' must be >= 1, or -1 to derive it from epochs; got {self.max_steps}.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set max_steps > 0 or epochs > 0.")


def preference_loss(config: DPOConfig):
    """DPO_LOSSES[config.loss], with SimPO's margin ratio from the config."""
    if config.loss == "simpo":
        return functools.partial(DPO_LOSSES["simpo"], gamma_beta_ratio=config.simpo_gamma_beta_ratio)
    return DPO_LOSSES[config.loss]


def with_sft_term(loss_fn, sft_weight: float):
    """L = L_pref + w · Σ_b −log π_θ(y_w,b) / Σ_b |y_w,b|: the preference loss plus SFT on the winners (RPO, Pang
    et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1; TRL rpo_alpha, NeMo sft_loss_weight).
    DPO alone can meet its margin by pushing the rejected answers down; the NLL term also pulls the chosen ones up.
    Returns a function with the DPO_LOSSES signature whose `loss` is the sum (the metrics are L_pref's)."""
    if not sft_weight:
        return loss_fn

    def combined(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        nll = preferred_ft_loss(*args, **{**kwargs, "label_smoothing": 0.0}).loss
        return dataclasses.replace(out, loss=out.loss + sft_weight * nll)

    return combined


# --- the reference policy: models.reference; its log-prob cache -----------------------------------------------

@announced("reference log-probs")
@torch.no_grad()
def reference_cache(ref_fn: nn.Module, pairs, *, batch_size: int, pad_id: int, pack_length: int | None,
                    d) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(y_w|x), log π_ref(y_l|x) of every pair: ([N], [N]) on d.device. Ranks share the batches; the
    results are summed across ranks so every rank holds the whole cache."""
    N = len(pairs)
    chosen = torch.zeros(N, device=d.device)
    rejected = torch.zeros(N, device=d.device)
    starts = list(range(0, N, batch_size))[d.rank::d.world_size]
    for start in starts:
        index = list(range(start, min(start + batch_size, N)))
        batch = sequence_batch(pair_sequences(pairs, index), pad_id, pack_length=pack_length).to(d.device)
        logps = sequence_logps(ref_fn, batch)  # [2b]
        chosen[index] = logps[:len(index)]
        rejected[index] = logps[len(index):]
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(chosen)
        dist.all_reduce(rejected)
    return chosen, rejected


# --- evaluation --------------------------------------------------------------------------------------------------

@announced("held-out evaluation")
@torch.no_grad()
def evaluate(policy_fn: nn.Module, ref_logps, pairs, *, loss_fn, beta: float, label_smoothing: float,
             micro_batch_size: int, pad_id: int, pack_length: int | None, d) -> dict[str, float]:
    """Loss and the implicit-reward metrics over all held-out pairs. ref_logps(index, batch) -> ([b], [b])."""
    was_training = policy_fn.training
    policy_fn.eval()
    sums: dict[str, float] = {}
    N = len(pairs)
    total_chosen_targets = sum(target_count(p["chosen"]) for p in pairs)
    starts = list(range(0, N, micro_batch_size))[d.rank::d.world_size]
    # under fsdp2 every forward is collective: a rank with fewer micro-batches repeats its first and counts nothing
    for j in range(all_reduce_max(len(starts), d)):
        start = starts[j] if j < len(starts) else 0
        index = list(range(start, min(start + micro_batch_size, N)))
        batch = sequence_batch(pair_sequences(pairs, index), pad_id, pack_length=pack_length).to(d.device)
        logps = sequence_logps(policy_fn, batch)
        ref_c, ref_r = ref_logps(index, batch)
        counts = torch.tensor([target_count(pairs[i]["chosen"]) for i in index], device=d.device)
        rejected_counts = torch.tensor([target_count(pairs[i]["rejected"]) for i in index], device=d.device)
        out = loss_fn(logps[:len(index)], logps[len(index):], ref_c, ref_r, beta=beta,
                      label_smoothing=label_smoothing, chosen_token_counts=counts,
                      rejected_token_counts=rejected_counts, global_pair_count=N,
                      global_chosen_token_count=total_chosen_targets)
        if j >= len(starts):
            continue
        for key, value in _metric_sums(out).items():
            sums[key] = sums.get(key, 0.0) + value
        sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach())
    policy_fn.train(was_training)
    result = {"eval/loss": all_reduce_sum(sums.get("loss", 0.0), d)}
    for key in _METRICS:
        result[f"eval/{key}"] = all_reduce_sum(sums.get(key, 0.0), d) / N
    return result


_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")


def _metric_sums(out) -> dict[str, float]:
    """Per-pair metric sums of one micro-batch (divided by the global pair count after the all-reduce)."""
    return {"rewards/chosen": float(out.chosen_rewards.sum()), "rewards/rejected": float(out.rejected_rewards.sum()),
            "rewards/margins": float(out.margins.sum()), "rewards/accuracies": float(out.accuracy.sum()),
            "logps/chosen": float(out.policy_chosen_logps.sum()), "logps/rejected": float(out.policy_rejected_logps.sum())}


# --- the recipe --------------------------------------------------------------------------------------------------

def run(config: DPOConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain dpo`: train on preference pairs; returns the summary (last metrics, final_dir)."""
    return run_distributed(_run, config, resume)


def _run(config: DPOConfig, resume: str | None, d) -> dict[str, Any]:
    out_dir = Path(config.output_dir)
    if d.parallelism == "fsdp2" and config.ref_sync_steps:
        raise ConfigError("TR-DPO (ref_sync_steps > 0) copies the policy into a whole reference; it is not supported "
                          "with parallelism=fsdp2 yet: use parallelism=ddp.")
    # All data is read and validated before a model is loaded or anything is written.
    train_data = load_dataset_file(config.train_file, "dpo")
    eval_data = load_dataset_file(config.eval_file, "dpo") if config.eval_file else None
    run_dir = open_run(out_dir, resume=resume, overwrite=config.overwrite, d=d)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint
    check_resume_layout(checkpoint, d)
    seed_everything(config.seed)
    model, tokenizer = prepare_model(
        config.model, device=d.device, **config.model_options(),
        gradient_checkpointing=config.gradient_checkpointing, checkpoint=weights_checkpoint(checkpoint),
    )
    train_pairs, dropped = encode_pairs(train_data[0], tokenizer, config.max_length, config.train_file)
    eval_pairs = encode_pairs(eval_data[0], tokenizer, config.max_length, config.eval_file)[0] if eval_data else None
    pad_id = tokenizer.pad_token_id
    pack_length = config.max_length if config.packing else None
    global_batch = config.micro_batch_size * config.grad_accum_steps * d.world_size
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * len(train_pairs) / global_batch))
    loss_fn = with_sft_term(preference_loss(config), config.sft_weight)
    reference_free = config.loss in REFERENCE_FREE

    kind = "none" if reference_free else reference_kind(precompute=config.precompute_ref_logps, lora=config.lora_r > 0,
                          sync_steps=config.ref_sync_steps, sync_alpha=config.ref_sync_alpha)
    ref_model = None
    if kind == "copy":  # the initial network: the same weights the policy started from (LoRA starts at B = 0)
        ref_model = load_model(config.model, dtype=config.dtype, device=d.device)[0].requires_grad_(False).eval()

    logps_fn = parallelize(TokenLogps(model, chunk_size=config.chunk_size), d)
    optimizer = build_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                min_ratio=config.min_lr_ratio, kind=config.lr_schedule)
    start_step, extra = 0, dict[str, Any]()
    if checkpoint is not None:
        start_step, extra = resume_step(checkpoint, d=d, model=model, optimizer=optimizer, scheduler=scheduler)
        if ref_model is not None and extra.get("ref_state") is not None:
            ref_model.load_state_dict(extra["ref_state"])

    @contextlib.contextmanager
    def ref_context():
        # the policy as reference runs its inner network directly: under fsdp2 its shards are held gathered meanwhile
        with (gathered(logps_fn) if kind != "copy" else contextlib.nullcontext(),
              reference_logps_fn(kind, model, ref_model, config.chunk_size) as ref_fn):
            yield ref_fn

    def build_caches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        caches = {}
        with ref_context() as ref_fn:
            for name, pairs in (("train", train_pairs), ("eval", eval_pairs)):
                if pairs:
                    caches[name] = reference_cache(ref_fn, pairs, batch_size=config.ref_batch_size, pad_id=pad_id,
                                                   pack_length=pack_length, d=d)
        return caches

    caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    t_cache = 0.0
    if config.precompute_ref_logps and not reference_free:
        if "ref_cache" in extra:
            caches = {k: (c.to(d.device), r.to(d.device)) for k, (c, r) in extra["ref_cache"].items()}
        else:
            t0 = time.perf_counter()
            caches = build_caches()
            t_cache = time.perf_counter() - t0
    syncs = int(extra.get("ref_syncs", 0))

    def ref_logps_for(split: str):
        def fetch(index: list[int], batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
            if reference_free:  # SimPO, ORPO: the loss never reads π_ref
                zeros = torch.zeros(len(index), device=d.device)
                return zeros, zeros
            if config.precompute_ref_logps:
                chosen, rejected = caches[split]
                return chosen[index], rejected[index]
            with ref_context() as ref_fn:
                logps = sequence_logps(ref_fn, batch)
            return logps[:len(index)], logps[len(index):]
        return fetch

    def eval_now() -> dict[str, float]:
        return evaluate(logps_fn, ref_logps_for("eval"), eval_pairs, loss_fn=loss_fn, beta=config.beta,
                        label_smoothing=config.label_smoothing, micro_batch_size=config.micro_batch_size,
                        pad_id=pad_id, pack_length=pack_length, d=d)

    def checkpoint_extra() -> dict[str, Any]:
        extra_out: dict[str, Any] = {"ref_syncs": syncs}
        if config.precompute_ref_logps and not reference_free:
            extra_out["ref_cache"] = {k: (c.cpu(), r.cpu()) for k, (c, r) in caches.items()}
        if ref_model is not None and config.ref_sync_steps:
            extra_out["ref_state"] = {k: v.cpu() for k, v in ref_model.state_dict().items()}
        return extra_out

    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, out_dir)
    logger = MetricsLogger(out_dir, **config.logger_options(), start_step=start_step, enabled=d.is_main)
    if d.is_main and start_step == 0:
        logger.log(0, {"data/pairs": len(train_pairs), "data/dropped_truncated": dropped,
                       "data/global_batch": global_batch, "total_steps": total_steps, "ref/kind": kind,
                       "ref/cache_seconds": t_cache})
    progress = Progress(total_steps, initial=start_step, enabled=config.progress and d.is_main, desc="dpo")
    chosen_targets = [target_count(p["chosen"]) for p in train_pairs]
    rejected_targets = [target_count(p["rejected"]) for p in train_pairs]
    train_ref = ref_logps_for("train")
    summary: dict[str, Any] = {"ref/kind": kind, "ref/cache_seconds": t_cache}
    t_last, pairs_since, tokens_since = time.perf_counter(), 0.0, 0.0
    guard = NonFiniteGuard(config.max_nonfinite_steps, d)

    for step in range(start_step, total_steps):
        units = step_units(step, global_batch, len(train_pairs), config.seed)
        mine = micro_batches(units, config.micro_batch_size, d.rank, d.world_size)
        global_chosen = float(sum(chosen_targets[u] for u in units))
        sums: dict[str, float] = {}
        loss_sum, seen_tokens = 0.0, 0.0
        for i, index in enumerate(mine):
            batch = sequence_batch(pair_sequences(train_pairs, index), pad_id, pack_length=pack_length).to(d.device)
            ref_c, ref_r = train_ref(index, batch)  # before the policy's forward: under fsdp2 it may gather shards
            with no_sync(logps_fn, skip=i < len(mine) - 1):
                logps = sequence_logps(logps_fn, batch)  # [2b]: chosen then rejected
                counts = torch.tensor([chosen_targets[u] for u in index], device=d.device)
                rejected_counts = torch.tensor([rejected_targets[u] for u in index], device=d.device)
                # DDP averages gradients over ranks; dividing the global counts by world_size undoes that average.
                out = loss_fn(logps[:len(index)], logps[len(index):], ref_c, ref_r, beta=config.beta,
                              label_smoothing=config.label_smoothing, chosen_token_counts=counts,
                              rejected_token_counts=rejected_counts, global_pair_count=global_batch / d.world_size,
                              global_chosen_token_count=global_chosen / d.world_size)
                out.loss.backward()
            loss_sum += float(out.loss.detach())
            seen_tokens += batch.num_tokens
            for key, value in _metric_sums(out).items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
        if guard.ok(loss_sum, grad_norm, step=step + 1):  # a NaN/inf step is skipped on every rank
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if config.ref_sync_steps and done % config.ref_sync_steps == 0 and done < total_steps:
            if ref_model is not None:
                sync_reference(ref_model, model, config.ref_sync_alpha)
            if config.precompute_ref_logps and not reference_free:
                caches = build_caches()
            syncs += 1

        loss = all_reduce_sum(loss_sum, d) / d.world_size
        pairs_since += global_batch
        tokens_since += all_reduce_sum(seen_tokens, d)
        if done % config.logging_steps == 0 or done == total_steps:
            now = time.perf_counter()
            metrics = {"train/loss": loss, **{f"train/{k}": all_reduce_sum(sums[k], d) / global_batch for k in _METRICS},
                       "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm), **guard.metrics(),
                       "train/pairs_per_s": pairs_since / max(now - t_last, 1e-9),
                       "train/tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                       "train/epoch": done * global_batch / len(train_pairs), "ref/syncs": syncs}
            logger.log(done, metrics)
            t_last, pairs_since, tokens_since = now, 0.0, 0.0
            summary.update(metrics)
        progress.update(loss=loss, acc=summary.get("train/rewards/accuracies", 0.0))
        if eval_pairs and config.eval_steps and done % config.eval_steps == 0 and done != total_steps:
            logger.log(done, eval_now())
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or (config.save_steps and done % config.save_steps == 0 and done != total_steps):
            save_step(out_dir, done, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      extra=checkpoint_extra(), keep_last=config.keep_last)
        if stop:
            raise KeyboardInterrupt(f"stopped after step {done}; resume with --resume")
    progress.close()

    if eval_pairs:
        eval_metrics = eval_now()
        logger.log(total_steps, eval_metrics)
        summary.update(eval_metrics)
    save_step(out_dir, total_steps, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
              extra=checkpoint_extra(), keep_last=config.keep_last)
    export_final(model, tokenizer, out_dir / "final", d=d, rebuild=lambda: prepare_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    summary["final_dir"] = str(out_dir / "final")
    logger.close(summary)
    print_run_summary("dpo", summary, enabled=d.is_main)
    return summary

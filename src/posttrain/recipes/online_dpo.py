"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792): the
preference pairs come from the policy being trained.

    posttrain online-dpo --config configs/online_dpo_chain_sum.yaml [key=value ...]

One step: B prompts -> two completions each from the current policy (the rollout engine, KV cache shared per prompt)
-> score both with a reward model (a `posttrain reward` folder) or verifier rewards -> the higher-scored one is
chosen, the other rejected; ties carry no preference and are dropped -> π_ref log-probs of the pairs -> micro-batched
DPO_LOSSES[loss] normalized by the step's pair count -> clip -> step.

π_ref is the initial policy: the policy with its LoRA adapters disabled, or a frozen copy for full fine-tuning
(TRL's OnlineDPOTrainer keeps the same fixed reference).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import RunOptions, field
from posttrain.data.prompts import PromptPool, PromptSource
from posttrain.errors import ConfigError, PosttrainError
from posttrain.files import atomic_write_text
from posttrain.generation.rollout import RolloutSequences, rollout_sequences
from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
from posttrain.losses.dpo import DPO_LOSSES, REFERENCE_FREE
from posttrain.models.forward import TokenLogps
from posttrain.rewards import build_rewards, score_completions
from posttrain.train.distributed import init_distributed
from posttrain.train.logging import MetricsLogger
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.state import Progress, prepare_model, save_final, seed_everything
from posttrain.train.timing import StageTimer


@dataclass(kw_only=True)
class OnlineDPOConfig(RunOptions, PromptSource):
    model: str = field("smollm2-135m-instruct", help="embedded model name, local HF folder, or tiny[:k=v,...]")
    eval_file: str | None = field(None, help="held-out prompt rows; default: held-out `task` prompts")
    eval_size: int = field(32, help="held-out prompts evaluated (greedy) at the start and the end")
    output_dir: str = field("runs/online_dpo", help="metrics.jsonl, TensorBoard, final/")
    reward_model: str | None = field(None, help="a reward model folder written by `posttrain reward`")
    rewards: list[str] = field(default_factory=list, help="or verifier rewards by name (posttrain.rewards.REWARDS)")
    reward_weights: list[float] = field(default_factory=list, help="weights per reward (default all 1)")
    loss: str = field("sigmoid", help=f"a DPO_LOSSES name: {sorted(DPO_LOSSES)}")
    beta: float = field(0.1, help="β of the preference loss (TRL's online DPO: 0.1)")
    prompts_per_step: int = field(8, help="B: prompts per optimizer step (two completions each)")
    micro_batch_size: int = field(8, help="pairs per forward/backward")
    max_new_tokens: int = field(64, help="completion budget")
    temperature: float = field(0.9, help="sampling temperature (TRL's online DPO: 0.9)")
    top_p: float = field(1.0, help="sampling top-p")
    lr: float = field(5e-7, help="peak learning rate (TRL's online DPO: 5e-7)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = field("constant", help="constant or cosine (after warmup)")
    max_steps: int = field(50, help="optimizer steps")
    chunk_size: int = field(256, help="rows per chunk of the fused LM-head log-prob computation")

    def validate(self) -> None:
        self.validate_prompt_source()
        if (self.reward_model is None) == (not self.rewards):
            raise ConfigError("set exactly one of 'reward_model' (a `posttrain reward` folder) or 'rewards' (names).")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"key 'loss' must be one of {sorted(DPO_LOSSES)}, got {self.loss!r}.")
        for key in ("prompts_per_step", "micro_batch_size", "max_new_tokens", "max_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if self.beta <= 0:
            raise ConfigError(f"key 'beta' must be > 0, got {self.beta}.")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"'reward_weights' has {len(self.reward_weights)} values for {len(self.rewards)} rewards.")


def preference_pairs(rewards: torch.Tensor) -> tuple[list[int], list[int]]:
    """Rows of the chosen and rejected completion of each prompt from [2B] rewards (rows 2b, 2b+1 are prompt b's
    two samples). Prompts whose two rewards are equal are dropped: they express no preference."""
    chosen, rejected = [], []
    pairs = rewards.view(-1, 2)
    for b, (r0, r1) in enumerate(pairs.tolist()):
        if r0 == r1:
            continue
        win = 0 if r0 > r1 else 1
        chosen.append(2 * b + win)
        rejected.append(2 * b + 1 - win)
    return chosen, rejected


def sequence_logps(fn: TokenLogps, batch: RolloutSequences) -> torch.Tensor:
    """Σ_t log π(y_t) over each row's completion tokens.  -> [N]"""
    logps = fn(batch.input_ids, batch.labels, batch.position_ids).logps  # [N, L]
    return torch.where(batch.mask, logps, 0.0).sum(dim=1)


def run(config: OnlineDPOConfig, resume: str | None = None) -> dict[str, Any]:
    """Train with online DPO; returns the last step's metrics plus eval/reward_start, eval/reward and final_dir."""
    from posttrain.recipes.grpo import greedy_accuracy

    if resume is not None:
        raise ConfigError("online-dpo does not resume yet; start a new output_dir.")
    out_dir = Path(config.output_dir)
    rows, held_out = config.prompt_rows(config.eval_file, config.eval_size)  # validated before a model is loaded
    if config.reward_model is not None:
        from posttrain.models.reward_model import reward_function

        reward_fns = [reward_function(config.reward_model)]
        weights = [1.0]
    else:
        reward_fns = build_rewards(config.rewards, config.reward_options, config.reward_timeout_s)
        weights = config.reward_weights or [1.0] * len(reward_fns)
    seed_everything(config.seed)
    d = init_distributed(config.device)
    if d.enabled:
        raise PosttrainError("posttrain online-dpo runs in one process (generation is not split across ranks).")
    model, tokenizer = prepare_model(config.model, device=d.device, **config.model_options())
    device = next(model.parameters()).device
    reference_free = config.loss in REFERENCE_FREE
    ref_model = None
    if config.lora_r == 0 and not reference_free:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    logps_fn = TokenLogps(model, chunk_size=config.chunk_size)
    ref_fn = TokenLogps(ref_model, chunk_size=config.chunk_size) if ref_model is not None else logps_fn
    prompt_ids_all = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    generator = HFGenerator(model, tokenizer)
    optimizer = build_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                kind=config.lr_schedule)
    pool = PromptPool(len(rows), config.seed, 1.01)
    loss_fn = DPO_LOSSES[config.loss]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    logger = MetricsLogger(out_dir, tensorboard=config.tensorboard)
    timer = StageTimer()
    summary: dict[str, Any] = {}

    def evaluate(step: int, key: str) -> None:
        if held_out:
            value = greedy_accuracy(model, tokenizer, held_out, reward_fns[0], config.max_new_tokens)
            logger.log(step, {"eval/reward": value})
            summary[key] = value

    evaluate(0, "eval/reward_start")
    progress = Progress(config.max_steps, enabled=config.progress, desc=f"online-dpo[{config.loss}]")
    for step in range(config.max_steps):
        indices = pool.take(config.prompts_per_step)
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                top_p=config.top_p, seed=config.seed * 1_000_003 + step)
        with timer("generate"):
            rollouts = generator.generate([prompt_ids_all[i] for i in indices], params, n=2)
        with timer("reward"):
            row_of = [rows[indices[j // 2]] for j in range(len(rollouts.texts))]
            rewards, _ = score_completions(reward_fns, weights, row_of, rollouts.texts)
        chosen, rejected = preference_pairs(rewards)
        metrics: dict[str, float] = {"reward/mean": float(rewards.mean()),
                                     "pairs/kept_frac": len(chosen) / len(indices),
                                     "completion/mean_length": sum(rollouts.lengths) / len(rollouts.lengths)}
        if chosen:
            metrics.update(_update(rollout_sequences(rollouts, tokenizer.pad_token_id).to(device), chosen, rejected,
                                   model, logps_fn, ref_fn, ref_model, optimizer, loss_fn, config, reference_free,
                                   rewards, timer))
        else:
            metrics["update/skipped"] = 1.0
        scheduler.step()
        metrics.update(timer.pop())
        metrics["train/lr"] = scheduler.get_last_lr()[0]
        if (step + 1) % config.logging_steps == 0 or step + 1 == config.max_steps:
            logger.log(step + 1, metrics)
        summary.update(metrics)
        progress.update(reward=metrics["reward/mean"])
    progress.close()
    evaluate(config.max_steps, "eval/reward")
    save_final(model, tokenizer, out_dir / "final")
    logger.close()
    summary["final_dir"] = str(out_dir / "final")
    return summary


def _update(batch: RolloutSequences, chosen, rejected, model, logps_fn, ref_fn, ref_model, optimizer, loss_fn,
            config: OnlineDPOConfig, reference_free: bool, rewards, timer) -> dict[str, float]:
    """One optimizer step of the preference loss over the step's P pairs, in micro-batches of pairs."""
    P = len(chosen)
    counts = batch.mask.sum(dim=1)  # [2B] completion tokens per row
    with timer("ref_logps"), torch.no_grad():
        if reference_free:
            ref = torch.zeros(len(batch), device=counts.device)
        else:
            adapters_off = model.disable_adapter() if ref_model is None else nullcontext()
            with adapters_off:
                ref = sequence_logps(ref_fn, batch)  # [2B]
    sums = {"rewards/margins": 0.0, "rewards/accuracies": 0.0, "loss": 0.0}
    with timer("update"):
        for start in range(0, P, config.micro_batch_size):
            c = chosen[start:start + config.micro_batch_size]
            r = rejected[start:start + config.micro_batch_size]
            logps = sequence_logps(logps_fn, batch.select(c + r))  # [2b]: chosen then rejected
            b = len(c)
            out = loss_fn(logps[:b], logps[b:], ref[c], ref[r], beta=config.beta, chosen_token_counts=counts[c],
                          rejected_token_counts=counts[r], global_pair_count=P,
                          global_chosen_token_count=float(counts[chosen].sum()))
            out.loss.backward()
            sums["loss"] += float(out.loss.detach())
            sums["rewards/margins"] += float(out.margins.sum())
            sums["rewards/accuracies"] += float(out.accuracy.sum())
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                     if config.max_grad_norm > 0 else torch.tensor(float("nan")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"train/loss": sums["loss"], "train/rewards/margins": sums["rewards/margins"] / P,
            "train/rewards/accuracies": sums["rewards/accuracies"] / P, "train/grad_norm": float(grad_norm),
            "reward/chosen_mean": float(rewards[chosen].mean()), "reward/rejected_mean": float(rewards[rejected].mean())}

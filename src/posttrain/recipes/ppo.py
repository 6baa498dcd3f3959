"""RLHF with PPO (Ouyang et al. 2022; Ziegler et al. 2019): a critic, GAE, and the KL to the reference in the reward.

    posttrain ppo --config configs/ppo_reward_model.yaml [key=value ...] [--resume]

One step: B prompts -> one completion each (or G) -> score with the reward model (a folder saved by
`posttrain reward`) or verifier rewards -> per-token rewards r_t = −β·KL_t, plus the score on the last token ->
values from the critic -> GAE advantages (whitened) and returns -> `ppo_epochs` passes of minibatch updates of the
clipped policy loss plus vf_coef × the clipped value loss.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import RunOptions, field, save_run_config
from posttrain.data.prompts import PromptPool, PromptSource
from posttrain.errors import ConfigError
from posttrain.generation.backends import (
    GenerationOptions,
    close_generator,
    closing_engines,
    rollout_engine,
    sleep_engine,
    sync_weights,
)
from posttrain.generation.rollout import completion_view, rollout_sequences
from posttrain.generation.sampler import SamplingParams, encode_prompts
from posttrain.losses.policy import POLICY_LOSSES, GlobalCounts, clipped_value_loss
from posttrain.models.forward import TokenLogps
from posttrain.models.value import ValueModel
from posttrain.ops.advantages import gae, masked_whiten
from posttrain.ops.kl import kl_penalized_token_rewards
from posttrain.ops.masked import masked_mean
from posttrain.ops.mismatch import logprob_mismatch
from posttrain.rewards import score_completions
from posttrain.rewards.guard import check_reward_columns
from posttrain.rewards.user import TrainerState, prepare_rewards
from posttrain.train.distributed import Dist, all_reduce_sum, check_rl_launch, run_distributed
from posttrain.train.guards import NonFiniteGuard
from posttrain.train.logging import MetricsLogger, print_run_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import all_gather_objects, clip_grad_norm, gathered, parallelize
from posttrain.train.run_dir import open_run
from posttrain.train.sharded import check_resume_layout, export_final, resume_step, save_step, weights_checkpoint
from posttrain.train.state import Progress, prepare_model, seed_everything
from posttrain.train.timing import StageTimer


@dataclass(kw_only=True)
class PPOConfig(RunOptions, PromptSource, GenerationOptions):
    model: str = field("smollm2-135m-instruct", help="the policy to train (usually an SFT model)")
    reward_model: str | None = field(None, help="a reward model folder written by `posttrain reward`")
    rewards: list[str] = field(default_factory=list, help="or verifier rewards: registered names, "
                               "path/to/file.py:function or package.module:function (TRL's calling convention)")
    output_dir: str = field("runs/ppo", help="checkpoints, metrics.jsonl, TensorBoard, final/")
    prompts_per_step: int = field(8, help="B: prompts per rollout batch")
    num_generations: int = field(1, help="completions per prompt")
    max_new_tokens: int = field(64, help="completion budget")
    temperature: float = field(1.0, help="sampling temperature (training log-probs use the same)")
    kl_coef: float = field(0.05, help="β of the per-token KL penalty in the reward")
    kl_estimator: str = field("k1", help="estimator of the in-reward KL (k1 is the usual choice)")
    gamma: float = field(1.0, help="discount")
    lam: float = field(0.95, help="GAE λ")
    whiten_advantages: bool = field(True, help="normalize advantages over the batch")
    ppo_epochs: int = field(2, help="passes over each rollout batch")
    minibatch_size: int = field(8, help="sequences per optimizer step within a pass")
    epsilon: float = field(0.2, help="policy clip ε")
    value_clip: float = field(0.2, help="value clip ε_v")
    vf_coef: float = field(0.1, help="weight of the value loss")
    lr: float = field(1e-6, help="policy learning rate")
    critic_lr: float = field(1e-5, help="critic learning rate")
    max_steps: int = field(50, help="rollout batches")
    chunk_size: int = field(256, help="rows per chunk of the fused LM-head log-prob computation")

    def validate(self) -> None:
        self.validate_prompt_source()
        self.validate_generation()
        if (self.reward_model is None) == (not self.rewards):
            raise ConfigError("set exactly one of 'reward_model' (a `posttrain reward` folder) or 'rewards' (names).")
        for key in ("prompts_per_step", "num_generations", "max_new_tokens", "ppo_epochs", "minibatch_size", "max_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if not self.temperature > 0:
            raise ConfigError(f"key 'temperature' must be > 0 (PPO samples its rollouts), got {self.temperature}.")


def load_reward_fns(config: PPOConfig, rows: list[dict[str, Any]]) -> list:
    """The reward model as a reward function, or the verifier rewards checked against the prompt rows' columns."""
    if config.reward_model is not None:
        from posttrain.models.reward_model import reward_function

        return [reward_function(config.reward_model)]
    return prepare_rewards(config.rewards, rows, options=config.reward_options, timeout_s=config.reward_timeout_s,
                           max_error_rate=config.reward_max_error_rate, task=config.task, source=config.train_file,
                           command="ppo")


def run(config: PPOConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain ppo`: RLHF with a critic and GAE; returns the summary (last metrics, final_dir)."""
    with closing_engines():  # a run that raises still releases its vLLM engine
        return run_distributed(_run, config, resume)


def whiten(values: torch.Tensor, mask: torch.Tensor, d: Dist, eps: float = 1e-8) -> torch.Tensor:
    """ops.advantages.masked_whiten over the valid positions of every rank's batch (the global mean and unbiased
    variance from all-reduced sums). values, mask: [N, T] -> [N, T], 0 at padded positions."""
    if not d.enabled:
        return masked_whiten(values, mask)
    m = mask.bool()
    n = all_reduce_sum(float(m.sum()), d)
    mean = all_reduce_sum(float(torch.where(m, values, 0.0).double().sum()), d) / n
    var = all_reduce_sum(float((torch.where(m, values.double() - mean, 0.0) ** 2).sum()), d) / max(n - 1, 1.0)
    return torch.where(m, (values - mean) * (var + eps) ** -0.5, 0.0)


def _run(config: PPOConfig, resume: str | None, d: Dist) -> dict[str, Any]:
    check_rl_launch(config.prompts_per_step, config.generation_backend, d)
    out_dir = Path(config.output_dir)
    rows, _ = config.prompt_rows()
    reward_fns = load_reward_fns(config, rows)
    check_reward_columns(reward_fns, rows, config.train_file or f"task {config.task!r}")
    run_dir = open_run(out_dir, resume=resume, overwrite=config.overwrite, d=d)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint
    check_resume_layout(checkpoint, d)
    seed_everything(config.seed)
    hf_checkpoint = weights_checkpoint(checkpoint)
    model, tokenizer = prepare_model(
        config.model, device=d.device, **config.model_options(), checkpoint=hf_checkpoint)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if config.lora_r == 0 else None
    critic = ValueModel.from_causal_lm(model).to(d.device)
    if hf_checkpoint is not None:
        critic.load(hf_checkpoint / "critic.safetensors")
    logps_fn = parallelize(TokenLogps(model, chunk_size=config.chunk_size), d)
    ref_fn = parallelize(TokenLogps(ref_model, chunk_size=config.chunk_size), d) if ref_model is not None else None
    critic_fn = parallelize(critic, d)
    generator = rollout_engine(config, model, tokenizer, seed=config.seed, dtype=config.dtype)
    optimizer = build_optimizer(model.parameters(), lr=config.lr)
    optimizer.add_param_group({"params": [p for p in critic.parameters() if p.requires_grad], "lr": config.critic_lr,
                               "weight_decay": 0.0})
    steps_per_batch = config.ppo_epochs * -(-config.prompts_per_step * config.num_generations // config.minibatch_size)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps,
                                total_steps=config.max_steps * steps_per_batch, kind="constant")
    prompt_ids_all = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    pool = PromptPool(len(rows), config.seed)
    start_step = 0
    if checkpoint is not None:
        start_step, extra = resume_step(checkpoint, d=d, model=model, optimizer=optimizer, scheduler=scheduler,
                                        modules={"critic": critic})
        pool.load(extra["pool"])
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, out_dir)
    logger = MetricsLogger(out_dir, **config.logger_options(), start_step=start_step, enabled=d.is_main)
    policy_loss = POLICY_LOSSES["ppo"]
    timer = StageTimer()
    summary: dict[str, Any] = {}
    progress = Progress(config.max_steps, initial=start_step, enabled=config.progress and d.is_main, desc="ppo")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    guard = NonFiniteGuard(config.max_nonfinite_steps, d)
    G = config.num_generations

    for step in range(start_step, config.max_steps):
        indices = pool.take(config.prompts_per_step)
        positions = list(range(d.rank, len(indices), d.world_size))  # this rank's share of the step's prompts
        sampling = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  prompt_seeds=tuple(config.seed * 1_000_003 + step * 100_003 + j for j in positions))
        with timer("generate"), gathered(logps_fn):
            rollouts = generator.generate([prompt_ids_all[indices[j]] for j in positions], sampling, n=G)
        with timer("reward"):
            row_of = [rows[indices[positions[k // G]]] for k in range(len(rollouts.texts))]
            ids = [rollouts.completion_ids[j, :c].tolist() for j, c in enumerate(rollouts.lengths)]
            scores, _ = score_completions(reward_fns, [1.0] * len(reward_fns), row_of, rollouts.texts,
                                          completion_ids=ids, trainer_state=TrainerState(step, config.max_steps))
        batch = rollout_sequences(rollouts, tokenizer.pad_token_id).to(d.device)
        scores = scores.to(d.device)
        mask = completion_view(batch.mask, batch)  # [N, Tc]

        with timer("logps"), torch.no_grad():
            old_logps = logps_fn(batch.input_ids, batch.labels, batch.position_ids, temperature=config.temperature).logps
            with (model.disable_adapter() if ref_fn is None else nullcontext()):
                ref_logps = (ref_fn or logps_fn)(batch.input_ids, batch.labels, batch.position_ids,
                                                 temperature=config.temperature).logps
            old_values = critic_fn(batch.input_ids, batch.position_ids)
        mismatch = logprob_mismatch(old_logps, batch.gen_logps, batch.mask)  # trainer vs sampler at θ_old
        old_logps_c, ref_logps_c = completion_view(old_logps, batch), completion_view(ref_logps, batch)
        old_values_c = completion_view(old_values, batch)
        token_rewards = kl_penalized_token_rewards(scores, old_logps_c, ref_logps_c, mask, kl_coef=config.kl_coef,
                                                   estimator=config.kl_estimator)
        est = gae(token_rewards, old_values_c, mask, gamma=config.gamma, lam=config.lam)
        advantages = whiten(est.advantages, mask, d) if config.whiten_advantages else est.advantages

        # minibatches are drawn over the global rows (prompt position j, sample g -> j·G + g); each rank runs its own
        N = len(indices) * G
        local_row = {j * G + g: k * G + g for k, j in enumerate(positions) for g in range(G)}
        totals: dict[str, float] = {}
        updates = 0
        g = torch.Generator().manual_seed(config.seed * 31 + step)
        sleep_engine(generator)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(N, generator=g)
            for i in range(0, N, config.minibatch_size):
                mine = [local_row[int(r)] for r in order[i:i + config.minibatch_size] if int(r) in local_row]
                inert = not mine  # every rank runs each minibatch's forward/backward (DDP and FSDP2 reduce in it)
                idx = torch.tensor(mine or [0])
                sub = batch.select(idx)
                with timer("update"):
                    out = logps_fn(sub.input_ids, sub.labels, sub.position_ids, temperature=config.temperature,
                                   with_entropy=True)
                    values = critic_fn(sub.input_ids, sub.position_ids)
                    m = mask[idx] & (not inert)
                    counts = GlobalCounts(tokens=all_reduce_sum(float(m.sum()), d),
                                          samples=all_reduce_sum(0.0 if inert else float(len(mine)), d))
                    pg = policy_loss(completion_view(out.logps, sub), old_logps_c[idx], advantages[idx], m,
                                     epsilon_low=config.epsilon, epsilon_high=config.epsilon, counts=counts)
                    vf = clipped_value_loss(completion_view(values, sub), old_values_c[idx], est.returns[idx], m,
                                            clip_range=config.value_clip, counts=counts)
                    # counts are global sums and DDP/FSDP2 average over ranks: the world_size factor restores the sum
                    loss = pg.loss + config.vf_coef * vf.loss
                    (loss * d.world_size).backward()
                    grad_norm = clip_grad_norm(params, config.max_grad_norm)
                    if guard.ok(loss, grad_norm):  # a NaN/inf minibatch step is skipped on every rank
                        optimizer.step()
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                updates += 1
                for k, v in {"train/loss": float(pg.loss + config.vf_coef * vf.loss),
                             **{f"policy/{k}": v for k, v in pg.metrics().items()},
                             "value/loss": vf.loss.item(), "value/clip_frac": float(vf.clip_frac),
                             "entropy": float(masked_mean(completion_view(out.entropy, sub), m)),
                             "grad_norm": grad_norm}.items():
                    totals[k] = totals.get(k, 0.0) + v
        metrics_sync = sync_weights(generator, model, timer)
        kl_seq = (torch.where(mask, old_logps_c - ref_logps_c, 0.0)).sum(1)  # [N_local] sequence KL (k1)
        non_score = torch.where(mask, token_rewards, 0.0).sum(1) - scores  # [N_local]
        everyone = all_gather_objects((positions, scores.cpu(), kl_seq.cpu(), non_score.cpu(),
                                       batch.completion_lengths.float().cpu()), d)
        by_position = sorted((j, k, part) for part in everyone for k, j in enumerate(part[0]))
        rows_of = lambda t: torch.cat([part[t][k * G:(k + 1) * G] for _, k, part in by_position])  # noqa: B023 -- used in this iteration only
        all_scores, all_kl, all_non_score, all_lengths = rows_of(1), rows_of(2), rows_of(3), rows_of(4)
        metrics = {k: all_reduce_sum(v, d) / (updates * d.world_size) for k, v in totals.items()}
        metrics.update({
            "reward/score_mean": float(all_scores.mean()),
            "reward/score_std": float(all_scores.std()) if N > 1 else 0.0,
            "reward/non_score_mean": float(all_non_score.mean()),
            "kl/sequence_mean": float(all_kl.mean()), "value/explained_variance": float(vf.explained_variance),
            "completion/mean_length": float(all_lengths.mean()),
            "train/lr": scheduler.get_last_lr()[0], **mismatch, **metrics_sync, **timer.pop(), **guard.metrics(),
        })
        done = step + 1
        if done % config.logging_steps == 0 or done == config.max_steps:
            logger.log(done, metrics)
        summary.update(metrics)
        progress.update(score=metrics["reward/score_mean"], kl=metrics["kl/sequence_mean"])
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or (config.save_steps and done % config.save_steps == 0 and done != config.max_steps):
            save_step(out_dir, done, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      extra={"pool": pool.state()}, keep_last=config.keep_last, modules={"critic": critic})
        if stop:
            raise KeyboardInterrupt(f"stopped after step {done}; resume with --resume")
    progress.close()
    save_step(out_dir, config.max_steps, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer,
              scheduler=scheduler, extra={"pool": pool.state()}, keep_last=config.keep_last,
              modules={"critic": critic})
    export_final(model, tokenizer, out_dir / "final", d=d, rebuild=lambda: prepare_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    close_generator(generator)
    summary["final_dir"] = str(out_dir / "final")
    logger.close(summary)
    print_run_summary("ppo", summary, enabled=d.is_main)
    return summary

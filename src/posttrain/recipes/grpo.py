"""Online RL with verifiable rewards: GRPO, DAPO, Dr. GRPO, CISPO, ScaleRL, GSPO, SAPO, DPPO (TV/KL) and RLOO,
chosen by name (`loss=`).

    posttrain grpo --config configs/grpo_chain_sum.yaml [key=value ...] [--resume]

One step: take B prompts -> sample G completions each (KV cache shared per prompt) -> rewards -> group advantages ->
drop zero-variance groups -> (μ times) micro-batched forward -> policy loss with global counts -> clip -> step.
The loss presets (posttrain.losses.policy.POLICY_LOSSES) fix each algorithm's clip, aggregation and advantage
estimator; keys here override them. Logged per step: reward mean/std, pass rate, KL, clip fraction, entropy,
completion lengths, filtered-group fraction, sampler/trainer log-prob mismatch, and stage timers.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import RunOptions, field, save_run_config
from posttrain.data.prompts import PromptPool, PromptSource
from posttrain.envs import check_rows, env_factory
from posttrain.envs.rl import EpisodeRollouts, episode_accuracy
from posttrain.errors import ConfigError
from posttrain.generation.backends import (
    GenerationOptions,
    close_generator,
    closing_engines,
    rollout_engine,
    sleep_engine,
    sync_weights,
)
from posttrain.generation.engine_episodes import EngineEpisodeSampler
from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
from posttrain.generation.rollout import RolloutBatch, RolloutSequences, rollout_sequences
from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
from posttrain.losses.policy import POLICY_LOSSES, GlobalCounts, importance_sampling_weights
from posttrain.models.forward import TokenLogps, fusable
from posttrain.ops.advantages import ADVANTAGE_ESTIMATORS, zero_variance_groups
from posttrain.ops.logps import IGNORE_INDEX
from posttrain.ops.masked import masked_mean
from posttrain.ops.mismatch import Mismatch
from posttrain.rewards import build_rewards, score_completions
from posttrain.rewards.guard import check_reward_columns
from posttrain.rewards.user import TrainerState, prepare_rewards
from posttrain.train.distributed import Dist, all_reduce_sum, check_rl_launch, run_distributed
from posttrain.train.guards import NonFiniteGuard
from posttrain.train.logging import MetricsLogger, print_run_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import all_gather_objects, all_reduce_max, clip_grad_norm, gathered, parallelize
from posttrain.train.run_dir import open_run
from posttrain.train.sharded import check_resume_layout, export_final, resume_step, save_step, weights_checkpoint
from posttrain.train.state import Progress, announced, prepare_model, seed_everything
from posttrain.train.timing import StageTimer

RL_LOSSES = [k for k in POLICY_LOSSES if k != "ppo"]


@dataclass(kw_only=True)
class GRPOConfig(RunOptions, PromptSource, GenerationOptions):
    model: str = field("smollm2-135m-instruct", help="embedded model name, local HF folder, or tiny[:k=v,...]")
    eval_file: str | None = field(None, help="held-out prompt rows; default: held-out `task` prompts")
    eval_size: int = field(64, help="held-out prompts evaluated (greedy) at eval steps")
    output_dir: str = field("runs/grpo", help="checkpoints, metrics.jsonl, TensorBoard, final/")
    rewards: list[str] = field(default_factory=list, help="rewards: registered names (posttrain.rewards.REWARDS), "
                               "path/to/file.py:function or package.module:function (TRL's calling convention), or "
                               "callables from Python; the first is the verifier used for pass rates and eval "
                               "accuracy. Empty: gym for a task, else what the columns support (answer -> math)")
    reward_weights: list[float] = field(default_factory=list, help="weights per reward (default all 1)")
    loss: str = field("grpo", help=f"one of {RL_LOSSES}")
    advantage: str | None = field(None, help="override the preset's advantage estimator: grpo, dr_grpo, batch, rloo")
    epsilon_low: float | None = field(None, help="clip ε (lower); default: the preset's")
    epsilon_high: float | None = field(None, help="clip ε_high (DAPO clip-higher); default: the preset's")
    epsilon_max: float | None = field(None, help="CISPO/ScaleRL truncation cap ε_max; default: the preset's (5.0)")
    tau_pos: float | None = field(None, help="SAPO gate temperature for Â > 0; default: the preset's (1.0)")
    tau_neg: float | None = field(None, help="SAPO gate temperature for Â ≤ 0; default: the preset's (1.05)")
    delta_low: float | None = field(None, help="DPPO trust region δ for tokens pushed down; default: the preset's")
    delta_high: float | None = field(None, help="DPPO trust region δ for tokens pushed up; default: the preset's")
    aggregation: str | None = field(None, help="override: token, sample, prompt or constant")
    num_generations: int = field(8, help="G: samples per prompt")
    prompts_per_step: int = field(4, help="B: prompts per optimizer step")
    max_new_tokens: int = field(64, help="completion budget")
    temperature: float = field(1.0, help="sampling temperature (training log-probs use the same temperature)")
    top_k: int = field(0, help="sampling top-k (0 = off); a filter makes the IS correction matter")
    top_p: float = field(1.0, help="sampling top-p")
    updates_per_batch: int = field(1, help="μ: optimizer passes over each rollout batch (μ > 1: ratio ≠ 1)")
    micro_batch_size: int = field(16, help="completions per forward/backward")
    kl_coef: float = field(0.0, help="β: KL penalty to the reference (0 = no reference model)")
    kl_estimator: str = field("k3", help="k1, k2 or k3")
    zero_variance_filter: bool = field(True, help="drop groups whose rewards are all equal (they carry no signal)")
    dynamic_sampling: bool = field(False, help="DAPO: sample more prompts until B groups survive the filter")
    max_sampling_rounds: int = field(3, help="dynamic sampling: at most this many generation rounds per step")
    pass_rate_cap: float = field(1.01, help="ScaleRL no-positive-resampling: retire prompts at this pass rate "
                                            "(0.9 in the paper; > 1 disables)")
    is_level: str = field("none", help="sampler/trainer importance correction: none, token or sequence")
    is_mode: str = field("truncate", help="truncate (TIS) or mask (MIS)")
    is_cap: float = field(2.0, help="cap C of the importance weight")
    ratio_against: str = field("trainer", help="old log-probs from the trainer's forward (trainer) or the "
                                               "sampler (sampler: ScaleRL's literal ρ = π_train/π_gen)")
    lr: float = field(1e-6, help="peak learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = field("constant", help="constant (ScaleRL) or cosine")
    max_steps: int = field(50, help="optimizer steps")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward")
    shared_prefix: bool = field(True, help="training forward runs each prompt once for its G samples (exact; "
                                           "falls back to per-sample rows for heads it cannot fuse)")
    eval_steps: int = field(0, help="held-out greedy accuracy every N steps (and at start and end); 0 = start/end")
    chunk_size: int = field(256, help="rows per chunk of the fused LM-head log-prob computation")
    env: str | None = field(None, help="multi-turn episodes: 'tools' (posttrain.envs.ToolEnv) or 'file.py:Class'; "
                                       "rewards then come from the environment (max_new_tokens = tokens per turn)")
    env_options: dict = field(default_factory=dict, help="keyword arguments of the environment, e.g. "
                                                         "{tools: [calculator], valid_call_reward: 0.1}")
    max_turns: int = field(4, help="env: model turns per episode")
    max_episode_tokens: int = field(256, help="env: tokens per episode after the prompt (model + observations)")
    env_timeout_s: float = field(60.0, help="env: a reset/step call slower than this stops the run with an error")

    def validate(self) -> None:
        self.validate_prompt_source()
        self.validate_generation()
        if self.loss not in RL_LOSSES:
            raise ConfigError(f"key 'loss' must be one of {RL_LOSSES}, got {self.loss!r}.")
        if self.advantage is not None and self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(f"key 'advantage' must be one of {list(ADVANTAGE_ESTIMATORS)}, got {self.advantage!r}.")
        if self.num_generations < 2:
            raise ConfigError("key 'num_generations' must be >= 2: group advantages need at least two samples.")
        for key in ("prompts_per_step", "max_new_tokens", "updates_per_batch", "micro_batch_size", "max_steps",
                    "max_turns", "max_episode_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if not self.temperature > 0:
            raise ConfigError(f"key 'temperature' must be > 0 (GRPO samples its groups; 0 would make every sample "
                              f"of a group the same greedy answer), got {self.temperature}.")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"keys 'top_p' must be in (0, 1] and 'top_k' >= 0, got {self.top_p} and {self.top_k}.")
        if self.is_level not in ("none", "token", "sequence"):
            raise ConfigError(f"key 'is_level' must be none, token or sequence, got {self.is_level!r}.")
        if self.ratio_against not in ("trainer", "sampler"):
            raise ConfigError(f"key 'ratio_against' must be trainer or sampler, got {self.ratio_against!r}.")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"'reward_weights' has {len(self.reward_weights)} values for {len(self.rewards)} rewards.")
        if self.aggregation_name == "prompt" and self.micro_batch_size % self.num_generations:
            raise ConfigError("prompt-average aggregation needs whole groups per micro-batch: make "
                              "'micro_batch_size' a multiple of 'num_generations'.")

    @property
    def aggregation_name(self) -> str:
        return self.aggregation or POLICY_LOSSES[self.loss].defaults["aggregation"]


def loss_options(config: GRPOConfig) -> dict[str, Any]:
    """The preset's keywords overridden by the config (only those the chosen loss takes)."""
    preset = POLICY_LOSSES[config.loss]
    opts: dict[str, Any] = {"group_size": config.num_generations,
                            "max_length": config.max_episode_tokens if config.env else config.max_new_tokens}
    if config.aggregation:
        opts["aggregation"] = config.aggregation
    for name in ("epsilon_low", "epsilon_high", "epsilon_max", "tau_pos", "tau_neg", "delta_low", "delta_high"):
        if name in preset.defaults and getattr(config, name) is not None:
            opts[name] = getattr(config, name)
    if config.kl_coef:
        opts.update(kl_coef=config.kl_coef, kl_estimator=config.kl_estimator)
    return opts


@announced("held-out evaluation (greedy)")
@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows, reward_fn, max_new_tokens: int, batch: int = 64, d: Dist | None = None,
                    ) -> float:
    """Mean verifier reward of greedy answers to `rows` (split across ranks when `d` has several; call on all)."""
    if not rows:
        return float("nan")
    d = d or Dist()
    mine = rows[d.rank::d.world_size]
    generator = HFGenerator(model, tokenizer)
    total = 0.0
    for i in range(0, len(mine), batch):
        chunk = mine[i:i + batch]
        out = generator.generate(encode_prompts(tokenizer, [r["prompt"] for r in chunk]),
                                 SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        values, _ = score_completions([reward_fn], [1.0], chunk, out.texts)
        total += float(values.double().sum())
    return all_reduce_sum(total, d) / len(rows)


@dataclass
class SampledStep:
    """One step's sampling on this rank: its groups kept for the update (None when none survived the filter), and
    statistics of everything sampled on all ranks, kept or not, in the order one process would have sampled it.

    rewards, verifier, lengths: [N_sampled] over all rounds and ranks; groups / filtered: groups sampled / dropped
    as flat; kept_rewards: [B'_all, G] of every rank's kept groups, and mine: the rows of kept_rewards that are this
    rank's `batch` (advantage estimators that normalize over the batch see the global one).
    """

    batch: RolloutBatch | None
    rewards: torch.Tensor
    verifier: torch.Tensor
    lengths: torch.Tensor
    groups: int
    filtered: int
    truncated: int
    kept_rewards: torch.Tensor
    mine: list[int]


def prompt_seed(seed: int, step: int, sampling_round: int, position: int) -> int:
    """The sampling seed of the prompt at `position` in a step's (global) prompt list: what it samples is a function
    of (seed, step, round, position) alone, however the prompts are split across ranks."""
    return ((seed * 1_000_003 + step) * 101 + sampling_round) * 100_003 + position


def sample_step(generator, tokenizer, pool: PromptPool, rows, prompt_ids_all, config: GRPOConfig, reward_fns,
                weights, step: int, timer: StageTimer, d: Dist | None = None) -> SampledStep:
    """Generate, score and (optionally) filter one step's groups; DAPO dynamic sampling draws more rounds.

    Every rank draws the same prompts from its copy of the pool and generates the groups at positions j ≡ rank
    (mod world size); pass rates, kept counts and statistics are gathered so every rank's pool and decisions agree.
    """
    d = d or Dist()
    G, B = config.num_generations, config.prompts_per_step
    kept: list[RolloutBatch] = []
    kept_all: list[tuple[int, int, torch.Tensor]] = []  # (round, position, rewards [G]) of every rank's kept groups
    stats: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    groups = filtered = truncated = 0
    rounds = config.max_sampling_rounds if config.dynamic_sampling else 1
    for r in range(rounds):
        need = B - len(kept_all) if config.dynamic_sampling else B
        if need <= 0:
            break
        indices = pool.take(need)
        positions = list(range(d.rank, len(indices), d.world_size))
        local: dict[str, Any] = {"report": [], "stats": [], "kept": [], "truncated": 0}
        if positions:
            mine = [indices[j] for j in positions]
            params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                    top_k=config.top_k, top_p=config.top_p,
                                    prompt_seeds=tuple(prompt_seed(config.seed, step, r, j) for j in positions))
            if isinstance(generator, EpisodeRollouts):  # multi-turn: the environment gives the rewards
                with timer("generate"):
                    episodes = generator.sample([rows[i] for i in mine], mine, params, G)  # seeds per row
                rewards, verifier, sequences = episodes.rewards, episodes.verifier, episodes.sequences
                lengths, n_truncated = episodes.lengths, episodes.truncated
            else:
                with timer("generate"):
                    rollouts = generator.generate([prompt_ids_all[i] for i in mine], params, n=G)
                with timer("reward"):
                    row_of = [rows[mine[k // G]] for k in range(len(rollouts.texts))]
                    ids = [rollouts.completion_ids[j, :c].tolist() for j, c in enumerate(rollouts.lengths)]
                    rewards, parts = score_completions(reward_fns, weights, row_of, rollouts.texts,
                                                       completion_ids=ids,
                                                       trainer_state=TrainerState(step, config.max_steps))
                verifier = next(iter(parts.values())).nan_to_num(0.0)  # the first reward is the verifier
                lengths = torch.tensor(rollouts.lengths, dtype=torch.float32)
                sequences = rollout_sequences(rollouts, tokenizer.pad_token_id)
                n_truncated = sum(f == "length" for f in rollouts.finish_reasons)
            flat = zero_variance_groups(rewards, G) if config.zero_variance_filter else torch.zeros(len(mine), dtype=torch.bool)
            for b, (j, index) in enumerate(zip(positions, mine)):
                rows_b = slice(b * G, (b + 1) * G)
                local["report"].append((index, float((verifier[rows_b] >= 1.0).float().mean())))
                local["stats"].append((r, j, rewards[rows_b], verifier[rows_b], lengths[rows_b]))
                if not flat[b]:
                    local["kept"].append((r, j, rewards[rows_b]))
            local["truncated"] = n_truncated
            keep_groups = (~flat).nonzero().flatten().tolist()
            if keep_groups:
                keep_rows = [b * G + g for b in keep_groups for g in range(G)]
                kept.append(RolloutBatch(sequences.select(keep_rows),
                                         rewards.view(-1, G)[keep_groups], [mine[b] for b in keep_groups]))
        everyone = all_gather_objects(local, d)
        for part in everyone:
            for index, pass_rate in part["report"]:
                pool.report(index, pass_rate)
            stats += part["stats"]
            kept_all += part["kept"]
            truncated += part["truncated"]
        groups += len(indices)
        filtered += len(indices) - sum(len(p["kept"]) for p in everyone)
    stats.sort(key=lambda t: (t[0], t[1]))
    order = sorted(range(len(kept_all)), key=lambda k: kept_all[k][:2])
    where = {kept_all[k][:2]: n for n, k in enumerate(order)}
    own = [where[(r, j)] for r, j, _ in kept_all if (r, j) in where and j % d.world_size == d.rank]
    return SampledStep(
        batch=RolloutBatch.concat(kept) if kept else None,
        rewards=torch.cat([t[2] for t in stats]), verifier=torch.cat([t[3] for t in stats]),
        lengths=torch.cat([t[4] for t in stats]), groups=groups, filtered=filtered, truncated=truncated,
        kept_rewards=torch.stack([kept_all[k][2] for k in order]) if kept_all else torch.zeros(0, G),
        mine=sorted(own),
    )


def run(config: GRPOConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain grpo`: online RL with verifiable rewards; returns the summary (last metrics, final_dir)."""
    with closing_engines():  # a run that raises still releases its vLLM engine
        return run_distributed(_run, config, resume)


def _run(config: GRPOConfig, resume: str | None, d: Dist) -> dict[str, Any]:
    check_rl_launch(config.prompts_per_step, config.generation_backend, d)
    out_dir = Path(config.output_dir)
    # validated before any model is loaded
    rows, held_out = config.prompt_rows(config.eval_file, config.eval_size)
    if config.env:  # the environment scores the episodes; a wrong name, option or row fails before the model loads
        reward_fns = build_rewards(config.rewards, config.reward_options, config.reward_timeout_s)
        make_env = env_factory(config.env, config.env_options)
        check_rows(make_env, rows, config.env_timeout_s)
        check_rows(make_env, held_out, config.env_timeout_s, label="held-out")
    else:
        reward_fns = prepare_rewards(config.rewards, rows, options=config.reward_options,
                                     timeout_s=config.reward_timeout_s, max_error_rate=config.reward_max_error_rate,
                                     task=config.task, source=config.train_file, command="grpo")
        check_reward_columns(reward_fns, rows, config.train_file or f"task {config.task!r}")
        check_reward_columns(reward_fns, held_out, config.eval_file or f"held-out task {config.task!r}")
    run_dir = open_run(out_dir, resume=resume, overwrite=config.overwrite, d=d)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint
    check_resume_layout(checkpoint, d)
    weights = config.reward_weights or [1.0] * len(reward_fns)
    seed_everything(config.seed)
    model, tokenizer = prepare_model(
        config.model, device=d.device, **config.model_options(),
        gradient_checkpointing=config.gradient_checkpointing, checkpoint=weights_checkpoint(checkpoint))
    ref_model = None
    if config.kl_coef and config.lora_r == 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    prompt_ids_all = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    logps_fn = parallelize(TokenLogps(model, chunk_size=config.chunk_size), d)
    ref_fn = parallelize(TokenLogps(ref_model, chunk_size=config.chunk_size), d) if ref_model is not None else None
    engine = rollout_engine(config, model, tokenizer, seed=config.seed, dtype=config.dtype)
    generator: Any = engine
    budget = EpisodeBudget(max_turns=config.max_turns, max_turn_tokens=config.max_new_tokens,
                           max_episode_tokens=config.max_episode_tokens, env_timeout_s=config.env_timeout_s)
    if config.env:  # multi-turn: the torch engine continues its KV cache; vLLM gets token ids (prefix-cached)
        sampler = (EpisodeSampler(model, tokenizer) if config.generation_backend == "hf"
                   else EngineEpisodeSampler(engine, tokenizer))
        generator = EpisodeRollouts(sampler, env_factory(config.env, config.env_options, tokenizer=tokenizer), budget)
    optimizer = build_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                kind=config.lr_schedule)
    pool = PromptPool(len(rows), config.seed, config.pass_rate_cap)
    start_step = 0
    if checkpoint is not None:
        start_step, extra = resume_step(checkpoint, d=d, model=model, optimizer=optimizer, scheduler=scheduler)
        pool.load(extra["pool"])
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, out_dir)
    logger = MetricsLogger(out_dir, **config.logger_options(), start_step=start_step, enabled=d.is_main)
    preset = POLICY_LOSSES[config.loss]
    estimator = ADVANTAGE_ESTIMATORS[config.advantage or preset.advantage_estimator]
    timer = StageTimer()
    summary: dict[str, Any] = {}
    guard = NonFiniteGuard(config.max_nonfinite_steps, d)

    def evaluate(step: int) -> None:
        if not held_out:
            return
        with gathered(logps_fn):
            if isinstance(generator, EpisodeRollouts):
                acc = episode_accuracy(generator.sampler, generator.make_env, held_out, budget, rank=d.rank,
                                       world_size=d.world_size, all_reduce_sum=lambda x: all_reduce_sum(x, d))
            else:
                acc = greedy_accuracy(model, tokenizer, held_out, reward_fns[0], config.max_new_tokens, d=d)
        logger.log(step, {"eval/accuracy": acc})
        summary.setdefault("eval/accuracy_start", acc)
        summary["eval/accuracy"] = acc

    if start_step == 0:
        evaluate(0)
    progress = Progress(config.max_steps, initial=start_step, enabled=config.progress and d.is_main,
                        desc=f"grpo[{config.loss}]")
    for step in range(start_step, config.max_steps):
        with gathered(logps_fn):
            sampled = sample_step(generator, tokenizer, pool, rows, prompt_ids_all, config, reward_fns, weights, step,
                                  timer, d)
        all_rewards, verifier, lengths = sampled.rewards, sampled.verifier, sampled.lengths
        metrics: dict[str, float] = {
            "reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
            "pass_rate": float((verifier >= 1.0).float().mean()),
            "completion/mean_length": float(lengths.mean()), "completion/max_length": float(lengths.max()),
            "completion/truncated_frac": sampled.truncated / len(lengths),
            "filter/zero_variance_frac": sampled.filtered / max(sampled.groups, 1),
            "pool/retired": len(pool.retired),
        }
        if isinstance(generator, EpisodeRollouts):
            # every rank's episodes (one process's metrics whatever the world size)
            metrics.update(generator.pop_metrics(lambda eps: [e for part in all_gather_objects(eps, d) for e in part]))
        for fn in reward_fns:
            metrics.update({f"reward_fn/{fn.__name__}/{k}": v for k, v in fn.pop_counters().items()})
        if len(sampled.kept_rewards):
            sleep_engine(engine)
            all_advantages = estimator(sampled.kept_rewards)  # [B'_all, G] over every rank's kept groups
            metrics.update(_update(sampled.batch, all_advantages[sampled.mine].reshape(-1), model=model,
                                   logps_fn=logps_fn, ref_fn=ref_fn, optimizer=optimizer, scheduler=scheduler,
                                   config=config, timer=timer, d=d, num_groups=len(sampled.kept_rewards),
                                   guard=guard))
            metrics["advantage/abs_mean"] = float(all_advantages.abs().mean())
            metrics.update(sync_weights(engine, model, timer))
        else:  # every group was filtered: nothing to learn from this step
            metrics["update/skipped"] = 1.0
        metrics.update(timer.pop())
        metrics["train/lr"] = scheduler.get_last_lr()[0]
        metrics.update(guard.metrics())
        done = step + 1
        if done % config.logging_steps == 0 or done == config.max_steps:
            logger.log(done, metrics)
        summary.update(metrics)
        progress.update(reward=metrics["reward/mean"], pass_rate=metrics["pass_rate"])
        if config.eval_steps and done % config.eval_steps == 0 and done != config.max_steps:
            evaluate(done)
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or (config.save_steps and done % config.save_steps == 0 and done != config.max_steps):
            save_step(out_dir, done, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      extra={"pool": pool.state()}, keep_last=config.keep_last)
        if stop:
            raise KeyboardInterrupt(f"stopped after step {done}; resume with --resume")
    progress.close()
    evaluate(config.max_steps)
    save_step(out_dir, config.max_steps, d=d, model=model, tokenizer=tokenizer, optimizer=optimizer,
              scheduler=scheduler, extra={"pool": pool.state()}, keep_last=config.keep_last)
    export_final(model, tokenizer, out_dir / "final", d=d, rebuild=lambda: prepare_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    close_generator(engine)
    summary["final_dir"] = str(out_dir / "final")
    logger.close(summary)
    print_run_summary("grpo", summary, enabled=d.is_main)
    return summary


def inert_groups(like: RolloutSequences | None, groups: int, G: int, pad_id: int) -> RolloutSequences:
    """`groups` groups of G rows that weigh nothing (mask all False): the micro-batches a rank runs so that every
    rank runs as many forwards and backwards as the busiest one (DDP and FSDP2 reduce in each). Copies of a real
    group when there is one (same shapes), else one-token rows."""
    if like is not None and len(like):
        rows = like.select(list(range(G)) * groups)
        return dataclasses.replace(rows, mask=torch.zeros_like(rows.mask))
    n = groups * G
    ids = torch.full((n, 2), pad_id, dtype=torch.long)
    labels = torch.full((n, 2), IGNORE_INDEX, dtype=torch.long)
    labels[:, 0] = pad_id
    return RolloutSequences(ids, torch.arange(2).expand(n, 2).clone(), labels, torch.zeros(n, 2, dtype=torch.bool),
                            torch.zeros(n, 2), torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long))


def _update(rollout: RolloutBatch | None, advantages: torch.Tensor, *, model, logps_fn: TokenLogps,
            ref_fn: TokenLogps | None, optimizer, scheduler, config: GRPOConfig, timer: StageTimer, d: Dist,
            num_groups: int, guard: NonFiniteGuard) -> dict[str, float]:
    """Old/ref log-probs and μ passes of micro-batched updates over this rank's groups (advantages [B'·G], computed
    over all ranks' groups). Token/sequence/prompt counts are summed over ranks and the loss is multiplied by the
    world size (DDP/FSDP2 average gradients), so the step equals one process's over the whole batch."""
    preset = POLICY_LOSSES[config.loss]
    opts = loss_options(config)
    G = config.num_generations
    device = next(model.parameters()).device
    batch = rollout.sequences if rollout is not None else None
    local_tokens = float(batch.mask.sum()) if batch is not None else 0.0
    counts = GlobalCounts(tokens=torch.tensor(all_reduce_sum(local_tokens, d), dtype=torch.float64),
                          samples=num_groups * G, prompts=num_groups)
    mb = config.micro_batch_size
    N = len(batch) if batch is not None else 0
    slices = [slice(i, min(i + mb, N)) for i in range(0, N, mb)]
    extra = all_reduce_max(len(slices), d) - len(slices)
    if extra:  # this rank has fewer micro-batches than another: it runs inert ones
        pad = inert_groups(batch, extra, G, pad_id=0)
        batch = pad if batch is None else RolloutSequences.concat([batch, pad])
        advantages = torch.cat([advantages, torch.zeros(extra * G)])
        slices += [slice(N + k * G, N + (k + 1) * G) for k in range(extra)]
    temperature = config.temperature

    packed = ([batch.shared_prefix(s, pad_id=0).to(device) for s in slices]
              if config.shared_prefix and fusable(model) else None)
    batch, advantages = batch.to(device), advantages.to(device)

    def score(fn: TokenLogps, i: int, **kw):
        """Log-probs of micro-batch i in the [rows, L] label layout (shared-prefix packing when on)."""
        if packed is not None:
            return fn(packed=packed[i], **kw)
        s = slices[i]
        return fn(batch.input_ids[s], batch.labels[s], batch.position_ids[s], **kw)

    old_logps = ref_logps = None
    with timer("logps"), torch.no_grad():
        if config.ratio_against == "sampler":
            old_logps = batch.gen_logps
        elif config.updates_per_batch > 1:
            old_logps = torch.cat([score(logps_fn, i, temperature=temperature).logps for i in range(len(slices))])
        if config.kl_coef:
            ctx = model.disable_adapter() if ref_fn is None else nullcontext()
            fn = ref_fn or logps_fn
            with ctx:  # at the sampling temperature, like the policy's log-probs: KL is 0 while policy == reference
                ref_logps = torch.cat([score(fn, i, temperature=temperature).logps for i in range(len(slices))])

    totals: dict[str, float] = {}
    weight_sum = 0.0
    mismatch = Mismatch()  # sampler vs trainer log-probs at θ_old: the first pass's forward
    applied = False
    for epoch in range(config.updates_per_batch):
        pass_loss = 0.0
        for i, s in enumerate(slices):
            with timer("update"):
                out = score(logps_fn, i, temperature=temperature, with_entropy=True)
                mask = batch.mask[s]
                if epoch == 0:
                    mismatch.add(out.logps, batch.gen_logps[s], mask)
                old = old_logps[s] if old_logps is not None else out.logps.detach()
                is_w = None
                stats = importance_sampling_weights(old, batch.gen_logps[s], mask,
                                                    level="token" if config.is_level == "none" else config.is_level,
                                                    mode=config.is_mode, cap=config.is_cap)
                if config.is_level != "none":
                    is_w = stats.weights
                result = preset(out.logps, old, advantages[s], mask, counts=counts, is_weights=is_w,
                                ref_logps=ref_logps[s] if ref_logps is not None else None, **opts)
                (result.loss * d.world_size).backward()  # DDP/FSDP2 average over ranks; counts are global sums
            pass_loss += float(result.loss.detach())
            n = float(mask.sum())
            if n == 0:
                continue
            weight_sum += n
            for k, v in {**result.metrics(), **stats.metrics(),
                         "entropy": float(masked_mean(out.entropy, mask))}.items():
                if k == "loss":
                    totals["loss"] = totals.get("loss", 0.0) + v  # micro-batch losses add up to the step's loss
                else:
                    totals[k] = totals.get(k, 0.0) + v * n
        with timer("update"):
            grad_norm = clip_grad_norm(model.parameters(), config.max_grad_norm)
            if guard.ok(pass_loss, grad_norm):  # a NaN/inf pass is skipped on every rank, not applied
                optimizer.step()
                applied = True
            optimizer.zero_grad(set_to_none=True)
    if applied:
        scheduler.step()
    keys = sorted(set().union(*all_gather_objects(sorted(totals), d)))
    sums = {k: all_reduce_sum(totals.get(k, 0.0), d) for k in keys}
    weight_sum = all_reduce_sum(weight_sum, d)
    metrics = {k: (v / config.updates_per_batch if k == "loss" else v / max(weight_sum, 1.0)) for k, v in sums.items()}
    if "loss" in metrics:
        metrics["train/loss"] = metrics.pop("loss")  # one key for the optimized loss across commands
    metrics["grad_norm"] = grad_norm
    metrics["update/sequences"] = float(num_groups * G)
    metrics.update(mismatch.metrics())  # this rank's tokens
    return metrics

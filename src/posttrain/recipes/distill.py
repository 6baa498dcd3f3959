"""Strong-to-weak distillation: off-policy (sequence- or token-level) and on-policy (GKD, Agarwal et al. 2024).

    posttrain distill --config configs/distill_on_policy.yaml [key=value ...] [--resume]

Modes (`mode=`), a teacher p and a student q_θ that share a tokenizer:
- sequence:  the teacher answers every training prompt once (any posttrain decoder: greedy, temperature, beam, power
             sampling; `teacher_vote` keeps a majority-vote answer among `teacher_samples`), then the student is
             trained by SFT on those answers (Kim & Rush 2016; `responses=dataset` trains on the data's own answers
             instead, plain SFT with the same loop and accounting, the baseline).
- token:     fixed sequences (the data's prompt + completion); per token the divergence between the teacher's and
             the student's next-token distributions (default forward KL; `top_k` > 0: the teacher's top-k with the
             rest lumped, losses.distill.forward_kl_topk).
- on_policy: the student samples with the rollout engine (the Generator interface), the teacher scores the
             student's tokens, and the per-token loss is `divergence` on the student's own prefixes: reverse KL
             KL(q‖p) (estimator `full`: the whole distribution; `sampled`: the sampled-token estimator as a
             REINFORCE loss with `discount`), forward KL, or GKD's JSD(β). With GKD's λ (`lmbda`), each step is
             on-policy with probability λ and uses the fixed data otherwise (a seeded draw per step).
One step: B prompts -> sequences (teacher answers / fixed data / student samples) -> micro-batches -> per-token
divergence (teacher rows chunked, never a [B, T, V] tensor for either model) -> sum / the step's token count -> clip
-> step. Logged: loss, divergence, tokens, cumulative student and teacher FLOPs (2·N per forwarded token, 6·N per
trained token), held-out greedy accuracy (verifier = first reward) and the student's reverse KL to the teacher on its
own samples of held-out prompts. The data order, the λ draws and the sampling seeds are pure functions of (seed,
step, prompt position), so `--resume` continues exactly and the run does not depend on the number of processes.

Several processes (torchrun; `parallelism` none/ddp/fsdp2 as in every recipe): rank r takes prompts r, r + W, ... of
each step, token counts are summed over ranks and the loss is scaled by W (DDP/FSDP2 average gradients), so a step
equals one process's over the whole batch. The student samples with `generation_backend` hf (its own model) or vllm
(one process; weights pushed into the engine after every optimizer step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import RunOptions, field, save_run_config
from posttrain.data.collate import packed_batch
from posttrain.data.order import step_units
from posttrain.data.prompts import PromptSource
from posttrain.errors import ConfigError
from posttrain.eval.distill import evaluate_student
from posttrain.files import atomic_write_text
from posttrain.generation.backends import (
    GenerationOptions,
    close_generator,
    closing_engines,
    rollout_engine,
    sleep_engine,
    sync_weights,
)
from posttrain.generation.rollout import rollout_sequences
from posttrain.generation.sampler import SamplingParams, encode_prompts
from posttrain.losses.distill import (
    forward_kl_topk,
    reverse_kl_sampled_loss,
    row_divergence,
    token_divergence_loss,
)
from posttrain.losses.sft import sft_loss
from posttrain.models.forward import TokenLogps
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.teacher import DistillStudent, FrozenTeacher, token_divergences
from posttrain.ops.logps import IGNORE_INDEX, shift_labels
from posttrain.ops.mismatch import Mismatch
from posttrain.rewards import build_rewards
from posttrain.train.distributed import Dist, all_reduce_sum, check_rl_launch, run_distributed
from posttrain.train.guards import NonFiniteGuard
from posttrain.train.logging import MetricsLogger, print_run_summary
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import all_gather_objects, clip_grad_norm, gathered, local_numel, no_sync, parallelize
from posttrain.train.run_dir import open_run
from posttrain.train.sharded import check_resume_layout, export_final, resume_step, save_step, weights_checkpoint
from posttrain.train.state import Progress, prepare_model, seed_everything
from posttrain.train.timing import StageTimer

Mode = Literal["sequence", "token", "on_policy"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Estimator = Literal["full", "sampled"]
Responses = Literal["teacher", "dataset"]


@dataclass(kw_only=True)
class DistillConfig(RunOptions, PromptSource, GenerationOptions):
    model: str = field("smollm2-135m-instruct", help="the student: embedded name, HF folder, tiny[:k=v], or a layer "
                                                   "subset such as smollm2-135m-instruct:layers=0-5,24-29")
    teacher: str = field(help="the teacher (same tokenizer and vocabulary as the student); frozen")
    teacher_device: str = field("same", help="device of the teacher: same (the student's), cpu, cuda, cuda:1, ...")
    teacher_dtype: Literal["same", "float32", "bfloat16", "float16"] = field(
        "same", help="the teacher's weights and forward: same (key dtype) or its own, e.g. bfloat16 for a float32 "
                     "student (the divergence still runs in float32)")
    mode: Mode = field("on_policy", help="sequence (SFT on teacher answers), token (divergence on fixed sequences) "
                                         "or on_policy (divergence on the student's own samples)")
    divergence: Divergence = field("reverse_kl", help="per-token divergence for token/on_policy: forward_kl "
                                                      "KL(p‖q), reverse_kl KL(q‖p), or jsd (GKD's JSD(β))")
    estimator: Estimator = field("full", help="reverse_kl on-policy: full (whole distribution at each prefix) or "
                                              "sampled (log q(y) − log p(y) of the sampled token, REINFORCE)")
    beta: float = field(0.5, help="JSD(β) interpolation in [0, 1] (0: forward KL, 1: reverse KL, GKD Eq. 1)")
    top_k: int = field(0, help="forward_kl with the teacher's top-k tokens and the rest lumped (0 = full vocabulary)")
    lmbda: float = field(1.0, help="GKD λ: probability that a step uses student samples (else the fixed data)")
    discount: float = field(0.0, help="sampled estimator: γ of the per-token returns (0: each token's own KL; "
                                      "1: the sequence-level KL gradient)")
    responses: Responses = field("teacher", help="sequence mode: train on the teacher's answers or the data's own")
    teacher_decoder: str = field("greedy", help="sequence mode: the teacher's decoder (generation.strategies."
                                                "DECODERS: greedy, temperature, top_k, top_p, beam, power, ...)")
    teacher_samples: int = field(1, help="sequence mode: answers drawn per prompt (with teacher_vote: voters)")
    teacher_vote: bool = field(False, help="sequence mode: keep one answer agreeing with the majority of "
                                           "teacher_samples (self-consistency, ttc.vote)")
    vote_extract: str = field("final_line", help="teacher_vote: how an answer is read from a completion "
                                                 "(rewards.gym.EXTRACTORS: final_line, answer_tag, last_number, raw)")
    teacher_temperature: float = field(1.0, help="sequence mode: the teacher decoder's temperature")
    power_alpha: float = field(4.0, help="sequence mode, decoder power: the exponent α")
    eval_file: str | None = field(None, help="held-out prompt rows; default: held-out `task` prompts")
    eval_size: int = field(64, help="held-out prompts for accuracy and reverse KL at eval steps")
    output_dir: str = field("runs/distill", help="checkpoints, metrics.jsonl, final/")
    rewards: list[str] = field(default_factory=lambda: ["gym"], help="the first one is the verifier for held-out "
                                                                       "accuracy")
    prompts_per_step: int = field(8, help="B: prompts (or fixed sequences) per optimizer step")
    num_generations: int = field(1, help="G: student samples per prompt (on-policy)")
    max_new_tokens: int = field(64, help="completion budget (student and teacher)")
    temperature: float = field(1.0, help="student sampling temperature (1 = exactly on-policy)")
    max_length: int = field(512, help="tokens per fixed sequence (longer ones are truncated)")
    micro_batch_size: int = field(8, help="sequences per forward/backward")
    lr: float = field(1e-5, help="peak learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    lr_schedule: Literal["constant", "cosine"] = field("constant", help="constant or cosine (after warmup)")
    max_steps: int = field(50, help="optimizer steps")
    eval_steps: int = field(0, help="held-out evaluation every N steps (and at start and end); 0 = start/end")
    eval_start: bool = field(True, help="evaluate before the first step (off: when runs share one starting model)")
    distill_temperature: float = field(1.0, help="τ of both models' softmax in the divergence (GKD, Hinton)")
    chunk_size: int = field(256, help="rows per chunk of the head computations")
    gradient_checkpointing: bool = field(False, help="recompute the student's activations in backward")

    def validate(self) -> None:
        self.validate_generation()
        if self.generation_backend != "hf" and self.mode != "on_policy":
            raise ConfigError(f"key 'generation_backend' chooses the student's sampler, used by mode=on_policy only; "
                              f"mode={self.mode} samples nothing from the student (leave generation_backend=hf).")
        if self.train_file is None and self.task is None:
            raise ConfigError("set 'train_file' (prompt rows, or prompt/completion rows) or 'task' (reasoning-gym).")
        if self.train_file is not None and self.task is not None:
            raise ConfigError("set only one of 'train_file' or 'task'.")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"key 'beta' must be in [0, 1] (JSD(β) of GKD), got {self.beta}.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"key 'lmbda' must be in [0, 1], got {self.lmbda}.")
        if not 0.0 <= self.discount <= 1.0:
            raise ConfigError(f"key 'discount' must be in [0, 1], got {self.discount}.")
        for key in ("prompts_per_step", "num_generations", "max_new_tokens", "micro_batch_size", "max_steps",
                    "teacher_samples", "max_length", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if self.top_k < 0:
            raise ConfigError(f"key 'top_k' must be >= 0 (0 = full vocabulary), got {self.top_k}.")
        if self.top_k and self.divergence != "forward_kl":
            raise ConfigError("key 'top_k' applies to divergence=forward_kl only (a top-k reverse KL lets the student "
                              "shrink the kept mass; verl PR #5041).")
        if self.estimator == "sampled" and (self.mode != "on_policy" or self.divergence != "reverse_kl"):
            raise ConfigError("estimator=sampled is the sampled-token reverse KL: it needs mode=on_policy and "
                              "divergence=reverse_kl.")
        if self.estimator == "sampled" and self.lmbda < 1.0:
            raise ConfigError("estimator=sampled needs the student's own samples on every step: set lmbda=1.")
        if self.lr <= 0:
            raise ConfigError(f"key 'lr' must be > 0, got {self.lr}.")
        if self.distill_temperature <= 0:
            raise ConfigError(f"key 'distill_temperature' must be > 0, got {self.distill_temperature}.")
        if self.distill_temperature != 1.0 and (self.mode == "sequence" or self.estimator == "sampled"):
            raise ConfigError("key 'distill_temperature' scales the full-distribution divergences; it has no meaning "
                              "for mode=sequence (SFT on answers) or estimator=sampled.")
        from posttrain.generation.strategies import DECODERS

        if self.teacher_decoder not in DECODERS:
            raise ConfigError(f"key 'teacher_decoder' must be one of {sorted(DECODERS)}, got {self.teacher_decoder!r}.")
        if self.teacher_vote and self.teacher_samples < 2:
            raise ConfigError("teacher_vote needs teacher_samples >= 2.")
        from posttrain.rewards.gym import EXTRACTORS

        if self.vote_extract not in EXTRACTORS:
            raise ConfigError(f"key 'vote_extract' must be one of {sorted(EXTRACTORS)}, got {self.vote_extract!r}.")

    @property
    def needs_fixed_data(self) -> bool:
        return (self.mode == "token" or (self.mode == "on_policy" and self.lmbda < 1.0)
                or (self.mode == "sequence" and self.responses == "dataset"))


# ---------------------------------------------------------------------------------------------- inputs, checked first


def fixed_completion(row: dict[str, Any]) -> list[dict[str, str]] | str | None:
    """The data's own answer of a row: `completion`, or the last assistant turn of `messages`."""
    if "completion" in row:
        return row["completion"]
    if "messages" in row and row["messages"] and row["messages"][-1].get("role") == "assistant":
        return row["messages"][-1:]
    return None


def prompt_of(row: dict[str, Any]):
    """The prompt of a row (`prompt`, or the turns before the last assistant turn of `messages`)."""
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


def check_pair(student: str, teacher: str) -> None:
    """Teacher and student must share a tokenizer (same vocabulary, same ids): checked on the tokenizers, before any
    model is loaded. The head sizes are checked again once loaded (`check_heads`)."""
    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        differ = len(set(s_vocab.items()) ^ set(t_vocab.items()))
        raise ConfigError(f"teacher '{teacher}' and student '{student}' have different tokenizers ({len(t_vocab)} vs "
                          f"{len(s_vocab)} tokens, {differ} entries differ); distillation compares next-token "
                          f"distributions id by id, so they must share one.")


def check_heads(student_model, teacher_model, student: str, teacher: str) -> None:
    """Refuse (exit 2) a student and teacher whose output layers have different vocabulary sizes."""
    s_v, t_v = student_model.get_output_embeddings().weight.shape[0], teacher_model.get_output_embeddings().weight.shape[0]
    if s_v != t_v:
        raise ConfigError(f"teacher '{teacher}' has {t_v} output logits and student '{student}' {s_v}: the vocabularies "
                          f"must have the same size.")


def load_rows(config: DistillConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows), validated before any model is loaded."""
    train, held_out = config.prompt_rows(config.eval_file, config.eval_size)
    if config.needs_fixed_data:
        for i, row in enumerate(train, start=1):
            if fixed_completion(row) is None:
                raise ConfigError(f"{config.train_file or 'task ' + str(config.task)}: row {i} has no 'completion' "
                                  f"(or final assistant turn in 'messages'); mode={config.mode} with "
                                  f"lmbda={config.lmbda} / responses={config.responses} trains on fixed answers.")
    return train, held_out


# ------------------------------------------------------------------------------------------------------ sequences


def encode_fixed(tokenizer, row: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """prompt (chat template, generation prompt) + the data's answer; loss on the answer only."""
    from posttrain.data.tokenize import encode_sft

    completion = fixed_completion(row)
    prompt = prompt_of(row)
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    ex = encode_sft(tokenizer, {"prompt": prompt, "completion": completion}, "prompt_completion")
    return {k: v[:max_length] for k, v in ex.items()}


def sequence_tensors(examples: list[dict[str, list[int]]], pad_id: int, device) -> dict[str, Any]:
    """One right-padded row per example: input_ids, position_ids, labels [B, T] (labels on the answer tokens)."""
    batch = packed_batch(examples, [[i] for i in range(len(examples))], pad_id)
    labels = shift_labels(batch["input_ids"], batch["loss_mask"])
    return {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
            "labels": labels.to(device), "gen_logps": None,
            "tokens": sum(len(e["input_ids"]) for e in examples)}


def rollout_tensors(rollouts, pad_id: int, device) -> dict[str, Any]:
    """The student's sampled rollouts as padded tensors on `device` (input ids, positions, labels, masks)."""
    batch = rollout_sequences(rollouts, pad_id)
    return {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
            "labels": batch.labels.to(device), "gen_logps": batch.gen_logps.to(device),
            "tokens": int((batch.prompt_lengths + batch.completion_lengths).sum())}


def _slice(batch: dict[str, Any], s: slice) -> dict[str, Any]:
    return {k: (v[s] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def teacher_answers(teacher_model, tokenizer, prompt_ids: list[list[int]], config: DistillConfig,
                    extract=None) -> tuple[list[list[int]], int]:
    """Sequence mode: one answer (token ids) per prompt from the teacher's decoder (with teacher_vote: the first
    sample whose extracted answer is the majority answer). Returns (answers, teacher forward tokens)."""
    from posttrain.generation.strategies import DECODERS, DecodeOptions
    from posttrain.ttc.vote import majority_vote

    options = DecodeOptions(max_new_tokens=config.max_new_tokens, temperature=config.teacher_temperature,
                            alpha=config.power_alpha, batch_size=16, seed=config.seed)
    n = config.teacher_samples
    decoded = DECODERS[config.teacher_decoder](teacher_model, tokenizer, prompt_ids, n, options)
    answers = []
    for texts, ids in zip(decoded.texts, decoded.token_ids):
        pick = 0
        if extract is not None:
            found = [extract(t) for t in texts]
            winner = majority_vote(found).answer
            pick = next((i for i, a in enumerate(found) if a == winner), 0)
        answers.append(list(ids[pick]))
    return answers, decoded.forward_tokens


# ------------------------------------------------------------------------------------------------------------ loop


def micro_batch_loss(student, teacher: FrozenTeacher, logps_fn, mb: dict[str, Any], config: DistillConfig,
                     *, on_policy_samples: bool, num_tokens: float):
    """The loss of one micro-batch (sum over its tokens / num_tokens) and its divergence sum (detached).

    logps_fn: the student behind one forward (models.teacher.DistillStudent, possibly wrapped by DDP/FSDP2), so a
    data-parallel wrapper sees every use of the student's parameters; a plain TokenLogps also works (the divergence
    then runs on `student` directly, one process only). num_tokens: the step's token count over every micro-batch
    and rank, divided by the world size under DDP/FSDP2's gradient averaging."""
    mask = mb["labels"] != IGNORE_INDEX
    if config.mode == "sequence":
        out = logps_fn(mb["input_ids"], mb["labels"], mb["position_ids"])
        sft = sft_loss(out.logps, mask, num_target_tokens=num_tokens)
        return sft.loss, sft.nll_sum
    if config.estimator == "sampled" and on_policy_samples:
        student_logps = logps_fn(mb["input_ids"], mb["labels"], mb["position_ids"]).logps
        teacher_logps = teacher.token_logps(mb["input_ids"], mb["position_ids"], mb["labels"])
        result = reverse_kl_sampled_loss(student_logps, teacher_logps, mask, num_tokens=num_tokens,
                                         discount=config.discount, behaviour_logps=mb["gen_logps"])
        return result.loss, result.divergence
    if config.top_k:
        k = config.top_k

        def divergence(student_logps, teacher_logps):
            top = teacher_logps.topk(k, dim=-1)  # what a teacher top-k cache would hold
            return forward_kl_topk(student_logps, top.values, top.indices)
    else:
        divergence = row_divergence(config.divergence, config.beta)
    if isinstance(getattr(logps_fn, "module", logps_fn), DistillStudent):
        teacher_rows, teacher_weight = teacher.hidden_at_labels(mb["input_ids"], mb["position_ids"], mb["labels"])
        per_token = logps_fn(mb["input_ids"], mb["labels"], mb["position_ids"], teacher_rows=teacher_rows,
                             teacher_weight=teacher_weight, divergence=divergence,
                             temperature=config.distill_temperature)  # [N]
    else:
        per_token = token_divergences(student, teacher, mb["input_ids"], mb["position_ids"], mb["labels"], divergence,
                                      chunk_size=config.chunk_size, temperature=config.distill_temperature)  # [N]
    result = token_divergence_loss(per_token, torch.ones_like(per_token, dtype=torch.bool), num_tokens=num_tokens)
    return result.loss, result.divergence


def on_policy_step(step: int, config: DistillConfig) -> bool:
    """GKD's λ: whether step `step` uses the student's samples (a seeded draw, so resume replays it)."""
    if config.mode != "on_policy":
        return False
    if config.lmbda >= 1.0:
        return True
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 7 + 1)
    return bool(torch.rand((), generator=g) < config.lmbda)


@torch.no_grad()
def sampler_mismatch(student, batch: dict[str, Any], chunk_size: int) -> dict[str, float]:
    """How far a separate sampler's log-probs of the sampled tokens (batch["gen_logps"], e.g. vLLM's) are from the
    trainer's own at the same weights (ops.mismatch: mismatch/logp_abs_mean, _max, sequence ratios)."""
    logps = TokenLogps(student, chunk_size=chunk_size)(batch["input_ids"], batch["labels"], batch["position_ids"]).logps
    m = Mismatch()
    m.add(logps, batch["gen_logps"], batch["labels"] != IGNORE_INDEX)
    return m.metrics()


def sample_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the prompt at `position` of step `step`'s (global) prompt list: what the student samples
    for it depends on (seed, step, position) alone, however the step's prompts are split across ranks."""
    return (seed * 1_000_003 + step) * 100_003 + position


def run(config: DistillConfig, resume: str | None = None) -> dict[str, Any]:
    """`posttrain distill`: train the student (off-policy or on-policy) and return the run summary."""
    with closing_engines():  # a run that raises still releases its vLLM engine
        return run_distributed(_run, config, resume)


def _run(config: DistillConfig, resume: str | None, d: Dist) -> dict[str, Any]:
    check_rl_launch(config.prompts_per_step, config.generation_backend if config.mode == "on_policy" else "hf", d)
    out_dir = Path(config.output_dir)
    # Everything checkable is checked before a model is loaded or a file written.
    rows, held_out = load_rows(config)
    check_pair(config.model, config.teacher)
    reward_fns = build_rewards(config.rewards, config.reward_options, config.reward_timeout_s) if config.rewards else []
    run_dir = open_run(out_dir, resume=resume, overwrite=config.overwrite, d=d)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint
    check_resume_layout(checkpoint, d)
    seed_everything(config.seed)
    student, tokenizer = prepare_model(config.model, device=d.device, **config.model_options(),
                                       gradient_checkpointing=config.gradient_checkpointing,
                                       checkpoint=weights_checkpoint(checkpoint))
    teacher_dtype = config.dtype if config.teacher_dtype == "same" else config.teacher_dtype
    teacher_model, _ = load_model(config.teacher, dtype=teacher_dtype, device=d.device)
    check_heads(student, teacher_model, config.model, config.teacher)
    # FSDP2 shards a teacher that scores tokens on the trainer's devices as it shards the student; a teacher that
    # only writes answers (rank 0 decodes them) or sits on its own device stays whole
    shard_teacher = config.mode != "sequence" and config.teacher_device == "same"
    teacher = FrozenTeacher(teacher_model, device=None if config.teacher_device == "same" else config.teacher_device,
                            chunk_size=config.chunk_size, wrap=(lambda m: parallelize(m, d)) if shard_teacher else None)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = teacher.num_parameters
    teacher_held = float(sum(local_numel(p) for p in teacher.model.parameters()))  # this rank's share under FSDP2
    pad_id = tokenizer.pad_token_id
    prompt_ids_all = encode_prompts(tokenizer, [prompt_of(r) for r in rows])
    fixed = [encode_fixed(tokenizer, r, config.max_length) for r in rows] if config.needs_fixed_data else None

    student_fn = parallelize(DistillStudent(student, chunk_size=config.chunk_size), d)
    # The student samples through the Generator interface: the torch engine on the trainer's own model, or vLLM
    # (generation.backends), whose copy of the weights is refreshed after every optimizer step (sync_weights).
    generator = (rollout_engine(config, student, tokenizer, seed=config.seed, dtype=config.dtype)
                 if config.mode == "on_policy" else None)
    optimizer = build_optimizer(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                kind=config.lr_schedule)
    start_step, flops = 0, {"student": 0.0, "teacher": 0.0}
    if checkpoint is not None:
        start_step, extra = resume_step(checkpoint, d=d, model=student, optimizer=optimizer, scheduler=scheduler)
        flops = dict(extra["flops"])
        if generator is not None:
            sync_weights(generator, student, StageTimer())  # a vLLM engine started from the checkpoint's weights
    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(config, out_dir)
    logger = MetricsLogger(out_dir, **config.logger_options(), start_step=start_step, enabled=d.is_main)

    answers_file = out_dir / "teacher_answers.json"
    if config.mode == "sequence" and config.responses == "teacher":
        answers: list[list[int]] | None = None
        if checkpoint is not None and answers_file.exists():  # a resumed run trains on the answers it started with
            answers = json.loads(answers_file.read_text())["answers"]
        else:
            from posttrain.rewards.gym import EXTRACTORS

            extract = EXTRACTORS[config.vote_extract] if config.teacher_vote else None
            made = None
            if d.is_main:  # one decoder run (its batches and seeds as in one process), shared with every rank
                made = teacher_answers(teacher.model, tokenizer, prompt_ids_all, config, extract)
            answers, teacher_tokens = all_gather_objects(made, d)[0]
            flops["teacher"] += 2.0 * n_teacher * teacher_tokens
            if d.is_main:
                atomic_write_text(answers_file, json.dumps({"answers": answers,
                                                            "teacher_forward_tokens": teacher_tokens}))
        assert answers is not None
        fixed = [{"input_ids": (p + a)[:config.max_length],
                  "loss_mask": ([0] * len(p) + [1] * len(a))[:config.max_length]}
                 for p, a in zip(prompt_ids_all, answers)]

    summary: dict[str, Any] = {}
    verifier = reward_fns[0] if reward_fns else None

    def evaluate(step: int) -> None:
        if not held_out:
            return
        with gathered(student_fn), gathered(teacher.scores):  # ranks evaluate different numbers of batches
            metrics = evaluate_student(student, teacher, tokenizer, held_out, verifier,
                                       max_new_tokens=config.max_new_tokens, seed=config.seed + 10_000,
                                       chunk_size=config.chunk_size, d=d)
        metrics.update({"flops/student": flops["student"], "flops/teacher": flops["teacher"]})
        logger.log(step, metrics)
        summary.update(metrics)

    if start_step == 0 and config.eval_start:
        evaluate(0)
    timer = StageTimer()
    guard = NonFiniteGuard(config.max_nonfinite_steps, d)
    progress = Progress(config.max_steps, initial=start_step, enabled=config.progress and d.is_main,
                        desc=f"distill {config.mode}")
    device = d.device
    B, G = config.prompts_per_step, config.num_generations
    positions = list(range(d.rank, B, d.world_size))  # this rank's share of every step's prompts
    for step in range(start_step, config.max_steps):
        indices = step_units(step, B, len(rows), config.seed)  # the step's global prompt list
        mine = [indices[j] for j in positions]
        sampled = on_policy_step(step, config)
        mismatch: dict[str, float] = {}
        with timer("generate"):
            if sampled:
                assert generator is not None
                params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                        seed=sample_seed(config.seed, step, 0),  # vLLM: one seed per request batch
                                        prompt_seeds=tuple(sample_seed(config.seed, step, j) for j in positions))
                with gathered(student_fn):
                    rollouts = generator.generate([prompt_ids_all[i] for i in mine], params, n=G)
                flops["student"] += 2.0 * n_student * all_reduce_sum(rollouts.forward_tokens, d)
                batch = rollout_tensors(rollouts, pad_id, device)
                if hasattr(generator, "sync"):  # vLLM (one process): its log-probs vs the trainer's, same weights
                    mismatch = sampler_mismatch(student, batch, config.chunk_size)
            else:
                assert fixed is not None
                batch = sequence_tensors([fixed[i] for i in mine], pad_id, device)
        sleep_engine(generator)
        num_tokens = all_reduce_sum(float((batch["labels"] != IGNORE_INDEX).sum()), d)  # over every rank
        N = batch["input_ids"].shape[0]  # the same on every rank (whole prompts, B a multiple of the world size)
        loss_sum, divergence_sum = 0.0, 0.0
        starts = list(range(0, N, config.micro_batch_size))
        with timer("update"):
            for k, start in enumerate(starts):
                mb = _slice(batch, slice(start, start + config.micro_batch_size))
                with no_sync(student_fn, skip=k < len(starts) - 1):
                    # DDP/FSDP2 average gradients over ranks: normalising by the global count / W gives the sum
                    loss, div = micro_batch_loss(student, teacher, student_fn, mb, config, on_policy_samples=sampled,
                                                 num_tokens=max(num_tokens, 1.0) / d.world_size)
                    loss.backward()
                loss_sum += float(loss.detach()) / d.world_size
                divergence_sum += float(div)
            grad_norm = clip_grad_norm(student.parameters(), config.max_grad_norm)
            loss_sum = all_reduce_sum(loss_sum, d)
            if guard.ok(loss_sum, grad_norm, step=step + 1):  # a NaN/inf step is skipped on every rank
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        divergence_sum = all_reduce_sum(divergence_sum, d)
        sync = sync_weights(generator, student, timer) if generator is not None else {}
        step_tokens = all_reduce_sum(float(batch["tokens"]), d)
        flops["student"] += 6.0 * n_student * step_tokens
        if config.mode != "sequence":
            flops["teacher"] += 2.0 * n_teacher * step_tokens
        done = step + 1
        metrics = {"loss": loss_sum, "divergence": divergence_sum / max(num_tokens, 1.0), "tokens": num_tokens,
                   "on_policy": float(sampled), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                   "flops/student": flops["student"], "flops/teacher": flops["teacher"],
                   "teacher/params_on_rank": teacher_held, **guard.metrics(), **sync, **mismatch,
                   **timer.pop()}
        if done % config.logging_steps == 0 or done == config.max_steps:
            logger.log(done, metrics)
        summary.update(metrics)
        progress.update(loss=loss_sum)
        if config.eval_steps and done % config.eval_steps == 0 and done != config.max_steps:
            evaluate(done)
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or (config.save_steps and done % config.save_steps == 0 and done != config.max_steps):
            save_step(out_dir, done, d=d, model=student, tokenizer=tokenizer, optimizer=optimizer,
                      scheduler=scheduler, extra={"flops": flops}, keep_last=config.keep_last)
        if stop:
            raise KeyboardInterrupt(f"stopped after step {done}; resume with --resume")
    progress.close()
    if start_step < config.max_steps or not summary:
        evaluate(config.max_steps)
    save_step(out_dir, config.max_steps, d=d, model=student, tokenizer=tokenizer, optimizer=optimizer,
              scheduler=scheduler, extra={"flops": flops}, keep_last=config.keep_last)
    export_final(student, tokenizer, out_dir / "final", d=d, rebuild=lambda: prepare_model(
        config.model, device=torch.device("cpu"), **config.model_options())[0])
    if generator is not None:
        close_generator(generator)
    summary["final_dir"] = str(out_dir / "final")
    logger.close(summary)
    print_run_summary("distill", summary, enabled=d.is_main)
    return summary

"""TRL's (and diffusers') key names that mean the same thing as a posttrain key, accepted as aliases by the config
loader (posttrain.config), per config class.

Only real equivalents are listed: the same quantity in the same unit. A TRL name whose meaning differs here is not an
alias; `NOT_EQUIVALENT` says what to use instead, and the loader shows that when the name is given. The table is also
rendered in docs/trl.md (tests check they agree).
"""

from __future__ import annotations

# every training recipe (TrainingArguments / ModelConfig names)
_TRAINING = {
    "learning_rate": "lr",
    "save_total_limit": "keep_last",
    "model_name_or_path": "model",
    "lr_scheduler_type": "lr_schedule",
}
# the supervised recipes: per-device micro-batches, accumulation and epochs as in transformers' Trainer
_SUPERVISED = {
    **_TRAINING,
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
}

ALIASES: dict[str, dict[str, str]] = {
    "SFTConfig": dict(_SUPERVISED),
    "DPOConfig": {
        **_SUPERVISED,
        "loss_type": "loss",  # sigmoid, ipo, hinge: TRL's names
        "rpo_alpha": "sft_weight",  # RPO: weight of the NLL on the chosen answers
        "precompute_ref_log_probs": "precompute_ref_logps",
        "precompute_ref_batch_size": "ref_batch_size",
        "ref_model_sync_steps": "ref_sync_steps",  # TR-DPO τ (TRL also needs sync_ref_model=true; 0 = off here)
        "ref_model_mixup_alpha": "ref_sync_alpha",  # TR-DPO α
    },
    "RewardConfig": {**_SUPERVISED, "center_rewards_coefficient": "center_coef"},
    "GRPOConfig": {
        **_TRAINING,
        "per_device_train_batch_size": "micro_batch_size",  # completions per forward/backward
        "max_completion_length": "max_new_tokens",
        "beta": "kl_coef",
        "loss_type": "loss",  # grpo, bnpo, dr_grpo, dapo, cispo: TRL's names
        "num_iterations": "updates_per_batch",  # μ
        "reward_funcs": "rewards",  # GRPOTrainer's argument
    },
    "PPOConfig": {
        **_TRAINING,
        "sft_model_path": "model",
        "reward_model_path": "reward_model",
        "response_length": "max_new_tokens",
        "num_ppo_epochs": "ppo_epochs",
        "cliprange": "epsilon",
        "cliprange_value": "value_clip",
        "reward_funcs": "rewards",
    },
    "DiffusionTrainConfig": {
        "learning_rate": "lr",
        "train_batch_size": "batch_size",  # diffusers' training scripts
        "lr_warmup_steps": "warmup_steps",
        "max_train_steps": "max_steps",
        "save_total_limit": "keep_last",
    },
}

# TRL names that look like a posttrain key but are not the same thing
NOT_EQUIVALENT: dict[str, str] = {
    "bf16": "set dtype=bfloat16",
    "fp16": "set dtype=bfloat16 (float16 training is not supported)",
    "max_prompt_length": "prompts are never truncated here; max_length (sft/dpo/reward) bounds prompt + answer",
    "epsilon": "GRPO: set epsilon_low (and epsilon_high; TRL's epsilon sets both); PPO: epsilon is the same",
    "steps_per_generation": "each rollout batch is used for updates_per_batch optimizer passes (TRL: num_iterations)",
    "generation_batch_size": "a step samples prompts_per_step × num_generations completions",
    "use_peft": "set lora_r > 0",
    "lora_target_modules": "set lora_target to all-linear or a comma list of module names",
}


def aliases_for(class_name: str) -> dict[str, str]:
    """alias -> posttrain key for the config class named `class_name` (empty when it has none)."""
    return dict(ALIASES.get(class_name, {}))

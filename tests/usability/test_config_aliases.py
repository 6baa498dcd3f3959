"""TRL's key names: every alias in posttrain.trl_names sets the same key as the posttrain name, near-misses explain
themselves, and a renamed key keeps its former name."""

import dataclasses
import typing

import pytest

from posttrain.config import config_help, key_aliases, load_config
from posttrain.diffusion.recipe import DiffusionTrainConfig
from posttrain.errors import ConfigError
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.grpo import GRPOConfig
from posttrain.recipes.ppo import PPOConfig
from posttrain.recipes.reward import RewardConfig
from posttrain.recipes.sft import SFTConfig
from posttrain.trl_names import ALIASES

CLASSES = {c.__name__: c for c in (SFTConfig, DPOConfig, RewardConfig, GRPOConfig, PPOConfig, DiffusionTrainConfig)}
BASE = {"SFTConfig": ["train_file=x.jsonl"], "DPOConfig": ["train_file=x.jsonl"], "RewardConfig": ["train_file=x.jsonl"],
        "GRPOConfig": ["task=chain_sum"], "PPOConfig": ["task=chain_sum", "rewards=gym"], "DiffusionTrainConfig": []}
# every TRL alias the loader accepts (the table's entries whose key the class has)
CASES = [(cls, alias, key) for cls, table in ALIASES.items() for alias, key in table.items()
         if key_aliases(CLASSES[cls]).get(alias) == key]


def _other_value(cls, key):
    """A valid value for `key` that differs from its default, so an ignored alias cannot pass unnoticed."""
    default = getattr(load_config(CLASSES[cls], None, BASE[cls]), key)
    special = {("DPOConfig", "loss"): "ipo", ("GRPOConfig", "loss"): "dapo", ("GRPOConfig", "micro_batch_size"): 32,
               ("PPOConfig", "reward_model"): "runs/reward/final", ("GRPOConfig", "rewards"): ["math"],
               ("PPOConfig", "rewards"): ["math"]}
    if (cls, key) in special:
        return special[(cls, key)]
    if key == "model":
        return "tiny"
    if key == "lr_schedule":
        return "constant" if default == "cosine" else "cosine"
    tp = typing.get_type_hints(CLASSES[cls])[key]
    if tp is bool:
        return not default
    if tp is int:
        return default + 2 if default > 0 else 3
    return round(default + 0.1, 6)


@pytest.mark.parametrize(("cls", "alias", "key"), CASES, ids=[f"{c}.{a}" for c, a, _ in CASES])
def test_every_trl_alias_sets_its_key(cls, alias, key):
    value = _other_value(cls, key)
    text = ",".join(value) if isinstance(value, list) else value
    base = [b for b in BASE[cls] if not (key in ("reward_model", "rewards") and b.startswith("rewards="))]
    via_alias = load_config(CLASSES[cls], None, [*base, f"{alias}={text}"])
    via_key = load_config(CLASSES[cls], None, [*base, f"{key}={text}"])
    assert getattr(via_alias, key) == getattr(via_key, key) == value
    assert getattr(load_config(CLASSES[cls], None, BASE[cls]), key) != value
    assert dataclasses.asdict(via_alias) == dataclasses.asdict(via_key)
    assert alias in config_help(CLASSES[cls])  # --help names it


def test_trl_style_yaml_and_command_line(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("train_file: pairs.jsonl\nlearning_rate: 5.0e-7\nper_device_train_batch_size: 2\n"
                    "gradient_accumulation_steps: 4\nnum_train_epochs: 2\nbeta: 0.2\nrpo_alpha: 0.5\nloss_type: hinge\n")
    config = load_config(DPOConfig, path, ["lr=1e-6"])  # the command line overrides the file's alias
    assert (config.lr, config.micro_batch_size, config.grad_accum_steps, config.epochs, config.beta, config.sft_weight,
            config.loss) == (1e-6, 2, 4, 2.0, 0.2, 0.5, "hinge")


def test_alias_and_key_together_is_an_error():
    with pytest.raises(ConfigError, match="'learning_rate' and 'lr' both set 'lr'"):
        load_config(SFTConfig, None, ["train_file=x", "lr=1", "learning_rate=2"])


def test_not_equivalent_names_say_what_to_use():
    with pytest.raises(ConfigError, match="TRL's 'bf16' has no exact equivalent here: set dtype=bfloat16"):
        load_config(SFTConfig, None, ["train_file=x", "bf16=true"])
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(GRPOConfig, None, ["task=chain_sum", "max_prompt_length=64"])
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):  # typos are matched against aliases too
        load_config(SFTConfig, None, ["train_file=x", "learnin_rate=2"])


def test_errors_name_the_command_line_once():
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, ["train_file=x", "micro_batch_size=abc"])
    assert str(info.value).startswith("command line: key 'micro_batch_size'")


def test_diffusion_keys_share_the_training_names_and_keep_the_old_ones():
    new = load_config(DiffusionTrainConfig, None, ["logging_steps=7", "save_steps=9", "max_grad_norm=0.5",
                                                   "lr_schedule=constant", "keep_last=3"])
    old = load_config(DiffusionTrainConfig, None, ["log_every=7", "save_every=9", "grad_clip=0.5", "lr_decay=constant",
                                                   "save_total_limit=3"])
    assert dataclasses.asdict(new) == dataclasses.asdict(old)
    shared = {"logging_steps", "save_steps", "max_grad_norm", "keep_last", "lr", "max_steps", "warmup_steps", "seed"}
    for cls in (SFTConfig, GRPOConfig, DiffusionTrainConfig):
        assert shared <= {f.name for f in dataclasses.fields(cls)}
    assert key_aliases(DiffusionTrainConfig)["log_every"] == "logging_steps"

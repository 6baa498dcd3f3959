"""The Python API: data as Dataset / DatasetDict / lists of dicts, configs or keywords (TRL names too), reward
callables with TRL's convention, and the run summary with the final folder."""

import json

import pytest
from datasets import Dataset, DatasetDict

import posttrain
from posttrain.errors import ConfigError, DataError
from posttrain.recipes.sft import SFTConfig
from posttrain.train.logging import read_metrics

TINY = {"model": "tiny", "progress": False, "tensorboard": False}


def _sft_rows(n, offset=0):
    return [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(offset, offset + n)]


def test_sft_with_a_dataset_dict_uses_its_test_split_for_eval(tmp_path):
    data = DatasetDict({"train": Dataset.from_list(_sft_rows(8)), "test": Dataset.from_list(_sft_rows(4, 50))})
    run = posttrain.sft(train_dataset=data, max_steps=2, per_device_train_batch_size=4, max_length=32,
                        output_dir=str(tmp_path / "sft"), **TINY)
    assert isinstance(run, posttrain.RunResult)
    assert run.final_dir == tmp_path / "sft" / "final" and (run.final_dir / "model.safetensors").is_file()
    assert run.output_dir == tmp_path / "sft"
    rows = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert any("eval/loss" in r for r in rows) and run.summary["train/loss"] > 0
    written = [json.loads(line) for line in (tmp_path / "sft" / "data" / "eval.jsonl").read_text().splitlines()]
    assert written == _sft_rows(4, 50)  # the held-out split, kept with the run
    saved = json.loads((tmp_path / "sft" / "run_config.json").read_text())
    assert saved["micro_batch_size"] == 4 and saved["train_file"].endswith("data/train.jsonl")


def test_train_file_accepts_a_dataset_and_a_config_object_takes_overrides(tmp_path):
    config = SFTConfig(train_file="unused.jsonl", max_steps=5, max_length=32, micro_batch_size=4, **TINY)
    run = posttrain.sft(config, train_file=Dataset.from_list(_sft_rows(6)), max_steps=1,
                        output_dir=str(tmp_path / "obj"))
    assert [r["step"] for r in read_metrics(tmp_path / "obj" / "metrics.jsonl") if "train/loss" in r] == [1]
    assert run.final_dir.is_dir()


def test_bad_in_memory_rows_name_the_row_and_write_nothing(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 7}]
    with pytest.raises(DataError, match=r"train_file \(in-memory data\): row 2, column 'completion'"):
        posttrain.sft(train_dataset=rows, output_dir=str(tmp_path / "bad"), **TINY)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="expected a file path, a datasets.Dataset"):
        posttrain.sft(train_dataset=42, output_dir=str(tmp_path / "bad"), **TINY)


def test_grpo_with_a_trl_style_callable_on_conversational_prompts(tmp_path):
    seen = []

    def reward_len(completions, answer, trainer_state, **kwargs):  # TRL's documented example, conversational
        seen.append((type(completions[0]).__name__, trainer_state.global_step))
        return [-abs(len(c[0]["content"]) - int(a)) for c, a in zip(completions, answer)]

    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Write {n} letters."}], "answer": str(n)}
                                 for n in range(2, 8)])
    run = posttrain.grpo(train_dataset=prompts, reward_funcs=[reward_len], num_generations=2, prompts_per_step=2,
                         max_completion_length=6, micro_batch_size=4, max_steps=2, eval_size=0,
                         output_dir=str(tmp_path / "grpo"), **TINY)
    assert seen == [("list", 0), ("list", 1)]
    assert run.summary["reward_fn/reward_len/reward_errors"] == 0 and run.summary["reward/mean"] < 0
    assert json.loads((tmp_path / "grpo" / "run_config.json").read_text())["rewards"][0].startswith("<function")


def test_evaluate_takes_rows_and_returns_metrics(tmp_path):
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?", "answer": "4"}]
    result = posttrain.evaluate(model="tiny", task=rows, strategy="majority", num_samples=2, pass_k=[1, 2],
                                max_new_tokens=4, output_dir=str(tmp_path / "eval"))
    assert result.final_dir is None and result.summary["num_problems"] == 2
    assert {"accuracy", "pass@1", "maj@2"} <= set(result.summary)


def test_every_api_function_is_documented():
    import posttrain.diffusion.recipe  # importing the subpackage must not shadow an API name
    import posttrain.eval.runner

    for name in posttrain.__all__:
        assert callable(getattr(posttrain, name)) and getattr(posttrain, name).__doc__, name


_RECIPE_CONFIGS = ["sft.SFTConfig", "dpo.DPOConfig", "reward.RewardConfig", "kto.KTOConfig", "grpo.GRPOConfig",
                   "ppo.PPOConfig", "online_dpo.OnlineDPOConfig", "distill.DistillConfig"]


@pytest.mark.parametrize("cls_path, key, bad", [(c, k, b) for c in _RECIPE_CONFIGS for k, b in
                                                [("lr_schedule", "cosin"), ("dtype", "fp8"), ("parallelism", "zero3")]
                                                if (c, k) != ("ppo.PPOConfig", "lr_schedule")])  # PPO: constant lr
def test_a_config_built_in_python_refuses_a_choice_key_outside_its_choices(cls_path, key, bad):
    # the config loader checks Literal keys read from files and the command line; a config built in Python is
    # checked the same way
    import importlib

    module, name = cls_path.split(".")
    cls = getattr(importlib.import_module(f"posttrain.recipes.{module}"), name)
    kwargs = {"train_file": "x.jsonl", "teacher": "tiny"} if name == "DistillConfig" else {"train_file": "x.jsonl"}
    cls(**kwargs)  # the defaults are valid
    with pytest.raises(ConfigError, match=rf"key '{key}' must be one of \[.*\], got '{bad}'"):
        cls(**kwargs, **{key: bad})

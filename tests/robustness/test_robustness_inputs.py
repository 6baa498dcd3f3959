"""Bad input is a clear error (exit 2, the file/row/key named, nothing written) and silent values are refused or
explained: invalid UTF-8, a reward column missing from GRPO/PPO data, unknown tasks and reward options, dtypes,
tiny specs, negative counts, unavailable devices, temperature 0, SFT examples longer than max_length."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.data.formats import load_dataset_file
from posttrain.errors import ConfigError, DataError
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.grpo import GRPOConfig
from posttrain.recipes.ppo import PPOConfig
from posttrain.recipes.reward import RewardConfig
from posttrain.recipes.sft import SFTConfig


def test_a_data_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    path.write_bytes(good.encode() * 2 + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row/line 3 is not valid UTF-8 \(byte 0xe9 at column 16"):
        load_dataset_file(path, "sft")
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"prompt,completion\nok,fine\n\xff\xfe,x\n")
    with pytest.raises(DataError, match="row/line 3 is not valid UTF-8"):
        load_dataset_file(csv, "sft")


def test_the_cli_reports_bad_utf8_with_exit_2_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "\xc3\x28", "completion": "x"}\n')
    assert main(["sft", f"train_file={path}", "model=tiny", f"output_dir={tmp_path / 'out'}", "progress=false"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_rl_data_missing_a_reward_column_fails_before_the_model_loads(tmp_path, capsys, monkeypatch, recipe):
    from posttrain.train import state

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(state, "load_model", no_model)
    rows = [{"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"},
            {"prompt": "def g():\n", "entry_point": "g"}]  # row 2 lacks `test`
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = [recipe, f"train_file={path}", "model=tiny", "rewards=[code]", f"output_dir={out}", "progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}, row 2: no column 'test', which reward 'code' needs" in err, err
    assert not out.exists()


def test_unknown_task_and_reward_option_are_config_errors(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["grpo", "task=chain_summ", "model=tiny", f"output_dir={out}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "unknown reasoning-gym task 'chain_summ'" in err and "chain_sum" in err
    assert main(["grpo", "task=chain_sum", "task_size=4", "eval_size=0", "model=tiny", f"output_dir={out}",
                 "reward_options={gym: {extrct: last_number}}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert "reward 'gym' has no option(s) ['extrct']" in err and "extract" in err
    assert main(["grpo", "task=chain_sum", "task_kwargs={bogus: 1}", "model=tiny", f"output_dir={out}",
                 "progress=false"]) == 2
    assert "task_kwargs" in capsys.readouterr().err
    assert not out.exists()


BAD_VALUES = [
    (SFTConfig, ["max_steps=-5"], "max_steps"),
    (SFTConfig, ["warmup_steps=-1"], "warmup_steps"),
    (SFTConfig, ["lora_r=-4"], "lora_r"),
    (SFTConfig, ["max_grad_norm=-1"], "max_grad_norm"),
    (SFTConfig, ["max_grad_norm=.nan"], "max_grad_norm"),
    (SFTConfig, ["save_steps=-2"], "save_steps"),
    (SFTConfig, ["keep_last=-1"], "keep_last"),
    (SFTConfig, ["logging_steps=0"], "logging_steps"),
    (SFTConfig, ["max_nonfinite_steps=0"], "max_nonfinite_steps"),
    (SFTConfig, ["dtype=float64"], "dtype"),
    (SFTConfig, ["dtype=bf17"], "dtype"),
    (SFTConfig, ["device=mps"], "device"),
    (SFTConfig, ["model=tiny:layers=x"], "layers=x"),
    (SFTConfig, ["model=tiny:layerz=2"], "layerz=2"),
    (SFTConfig, ["model=tiny:hidden"], "hidden"),
    (SFTConfig, ["model=tiny:hidden=30,heads=4"], "multiple of heads"),
    (DPOConfig, ["max_steps=-3"], "max_steps"),
    (RewardConfig, ["max_steps=-3"], "max_steps"),
    (GRPOConfig, ["temperature=0"], "temperature"),
    (GRPOConfig, ["temperature=-1"], "temperature"),
    (GRPOConfig, ["max_steps=-1"], "max_steps"),
    (PPOConfig, ["temperature=0", "rewards=[gym]"], "temperature"),
]


@pytest.mark.parametrize("cls,overrides,key", BAD_VALUES, ids=[f"{c.__name__}-{o[0]}" for c, o, _ in BAD_VALUES])
def test_values_that_cannot_mean_anything_are_refused(cls, overrides, key):
    base = {SFTConfig: ["train_file=x.jsonl"], DPOConfig: ["train_file=x.jsonl"],
            RewardConfig: ["train_file=x.jsonl"], GRPOConfig: ["task=chain_sum"],
            PPOConfig: ["task=chain_sum"]}[cls]
    with pytest.raises(ConfigError, match=key):
        load_config(cls, None, [*base, *overrides])


def test_keep_last_zero_keeps_every_checkpoint_and_good_values_pass():
    config = load_config(SFTConfig, None, ["train_file=x.jsonl", "keep_last=0", "model=tiny:layers=1,hidden=16"])
    assert config.keep_last == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_an_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "out"
    assert main(["sft", f"train_file={data}", "model=tiny", "device=cuda", f"output_dir={out}"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err and not out.exists()


def test_sft_examples_longer_than_max_length_are_counted_in_a_warning(tmp_path, caplog):
    from posttrain.models import tiny_tokenizer
    from posttrain.recipes.sft import tokenize_rows

    # 16, 66 and 211 tokens (prompt + 10 answer tokens + end): two are longer than 64, one loses its whole answer
    rows = [{"prompt": "q" * n, "completion": "a" * 10} for n in (5, 55, 200)]
    with caplog.at_level(logging.WARNING):
        examples, dropped = tokenize_rows(rows, "prompt_completion", tiny_tokenizer(), 64, "data.jsonl")
    assert dropped == 1 and len(examples) == 2  # the 200-char prompt leaves no room for its answer
    message = caplog.text
    assert "2 of 3 examples are longer than max_length=64 tokens" in message and "1 lost their whole" in message

"""Small things a newcomer trips on at the command line: --resume, help for subcommands, task files in any format."""

import json

import pytest

from posttrain import cli
from posttrain.eval.tasks import JsonlTask, make_task


def test_resume_takes_a_folder_but_never_an_override():
    assert cli._take_resume(["--resume", "lr=1e-5"]) == (["lr=1e-5"], "latest")
    assert cli._take_resume(["--resume", "--lr", "3"]) == (["--lr", "3"], "latest")
    assert cli._take_resume(["a=1", "--resume", "runs/x/checkpoints/step-4", "b=2"]) == (
        ["a=1", "b=2"], "runs/x/checkpoints/step-4")
    assert cli._take_resume(["--resume=runs/y", "c=3"]) == (["c=3"], "runs/y")
    assert cli._take_resume(["c=3", "--resume"]) == (["c=3"], "latest")
    assert cli._take_resume(["c=3"]) == (["c=3"], None)


@pytest.mark.parametrize("command", [["eval"], ["demo"], ["diffusion", "sample", "model_dir=x"]])
def test_commands_without_checkpoints_refuse_resume_cleanly(command, capsys):
    assert cli.main([*command, "--resume"]) == 2
    err = capsys.readouterr().err
    assert ("has no checkpoints to resume from" in err or "--resume applies to" in err) and "TypeError" not in err


def test_help_offers_resume_only_where_it_exists(capsys):
    assert cli.main(["eval", "--help"]) == 0
    assert "--resume" not in capsys.readouterr().out
    assert cli.main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "learning_rate" in out  # TRL aliases are listed with their key


def test_diffusion_help_lists_its_subcommands(capsys):
    assert cli.main(["diffusion", "--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "sample" in out and "diffusion train --help" in out
    assert cli.main(["diffusion"]) == 2  # no subcommand is still a usage error


def test_config_error_names_the_command_line_once(capsys):
    assert cli.main(["sft", "train_file=x.jsonl", "micro_batch_size=abc"]) == 2
    err = capsys.readouterr().err
    assert "command line: key 'micro_batch_size'" in err and "command line + command line" not in err


def test_eval_task_file_in_any_data_format(tmp_path):
    import pandas as pd

    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+3?", "answer": "5"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "qa.parquet")
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    for name in ("qa.parquet", "qa.json"):
        task = make_task(str(tmp_path / name))
        assert isinstance(task, JsonlTask)
        assert [p.answer for p in task.problems(0, 0)] == ["2", "5"]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_keys_read_from_source_match_the_config_class(command):
    """The early key check (before torch is imported) knows exactly the keys the config class accepts."""
    import dataclasses
    import importlib

    from posttrain.config import key_aliases
    from posttrain.config_keys import accepted_keys

    module, class_name, _ = cli.COMMANDS[command]
    cls = getattr(importlib.import_module(module), class_name)
    assert accepted_keys(module, class_name) == {f.name for f in dataclasses.fields(cls)} | set(key_aliases(cls))


def test_a_mistyped_key_is_reported_before_torch_is_imported(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    (tmp_path / "c.yaml").write_text("task: chain_sum\nlearnig_rate: 1.0e-5\n")
    code = ("import sys; from posttrain.cli import main; "
            "rc = main(['grpo', 'task=chain_sum', 'max_stepz=3']); rc2 = main(['grpo', '--config', 'c.yaml']); "
            "print(rc, rc2, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": src, "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "2", "False", "False"], out.stderr
    assert "unknown key 'max_stepz' for GRPOConfig. Did you mean 'max_steps'?" in out.stderr
    assert "c.yaml: unknown key 'learnig_rate' for GRPOConfig. Did you mean 'learning_rate'?" in out.stderr

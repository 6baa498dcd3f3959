"""User reward functions the TRL way: loading `file.py:func` / `module:func`, TRL's keywords (message-list completions
for conversational prompts), None = not applicable, and a reward that keeps raising stopping the run."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, PosttrainError
from posttrain.plugins import is_object_spec, load_object
from posttrain.rewards import score_completions as compute_rewards
from posttrain.rewards.guard import GuardedReward, RewardFunctionError
from posttrain.rewards.user import (
    KeywordReward,
    TrainerState,
    build_reward_functions,
    check_reward_columns,
    default_rewards,
    reward_keywords,
)
from posttrain.train.logging import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")

# A reward written for TRL: conversational completions, a dataset column, None where it does not apply.
TRL_REWARD = textwrap.dedent('''
    from helper_next_to_it import BONUS

    def reward(prompts, completions, answer, completion_ids, trainer_state, **kwargs):
        out = []
        for prompt, completion, gold, ids in zip(prompts, completions, answer, completion_ids):
            assert isinstance(prompt, list) and prompt[-1]["role"] == "user"
            content = completion[0]["content"]  # raises on a plain string, as in TRL
            assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
            assert trainer_state.global_step >= 0
            out.append(None if gold == "skip" else BONUS + sum(ch.isalpha() for ch in content) / max(len(content), 1))
        return out
''')


def _write_reward_file(tmp_path: Path) -> Path:
    (tmp_path / "helper_next_to_it.py").write_text("BONUS = 1.0\n")
    path = tmp_path / "my_reward.py"
    path.write_text(TRL_REWARD)
    return path


def _conversational_prompts(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "conv.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Say something #{i}"}], "answer": "skip" if i == 0 else str(i)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_spec_syntax():
    assert is_object_spec("rewards/my.py:reward") and is_object_spec("pkg.mod:Cls.method")
    assert not is_object_spec("gym") and not is_object_spec("a.py:") and not is_object_spec("a.py:1bad")


def test_load_object_from_a_file_and_from_a_module(tmp_path):
    path = _write_reward_file(tmp_path)
    func = load_object(f"{path}:reward")
    assert func.__name__ == "reward" and func.__module__.startswith("posttrain_user_my_reward")
    assert load_object(f"{path}:reward") is func  # the file runs once
    assert load_object("posttrain.rewards.math:math_reward").__name__ == "math_reward"
    assert load_object("posttrain.rewards.guard:GuardedReward.pop_counters") is GuardedReward.pop_counters


def test_load_object_errors_name_the_spec(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_object(f"{tmp_path}/missing.py:reward")
    path = _write_reward_file(tmp_path)
    with pytest.raises(ConfigError, match="has no attribute 'rewrd'. Did you mean 'reward'"):
        load_object(f"{path}:rewrd")
    bad = tmp_path / "broken.py"
    bad.write_text("def reward(:\n")
    with pytest.raises(ConfigError, match="(?s)broken.py.*SyntaxError"):
        load_object(f"{bad}:reward")
    with pytest.raises(ConfigError, match="no module named 'no_such_pkg_xyz.rewards'"):
        load_object("no_such_pkg_xyz.rewards:reward")


def test_trl_keywords_conversational_and_plain():
    rows = [{"prompt": [{"role": "user", "content": "q1"}], "answer": "1", "completion": "ref"},
            {"prompt": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "Sure: "}], "answer": "2",
             "completion": "ref"}]
    kw = reward_keywords(rows, ["a", "b"], completion_ids=[[5, 6], [7]], trainer_state=TrainerState(3, 10))
    assert kw["completions"] == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "Sure: b"}]]
    assert kw["prompts"] == [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]  # prefill moved
    assert kw["completion_ids"] == [[5, 6], [7]] and kw["trainer_state"].global_step == 3
    assert kw["answer"] == ["1", "2"] and "completion" not in kw and "prompt" not in kw
    plain = reward_keywords([{"prompt": "q", "answer": "1"}], ["x"])
    assert plain == {"prompts": ["q"], "completions": ["x"], "answer": ["1"]}


def test_keyword_reward_passes_only_named_keywords_and_runs_async():
    def narrow(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    async def slow(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [len(c) for c in completions]

    kw = reward_keywords([{"prompt": "q", "answer": "x", "other": 1}] * 2, ["x", "y"], trainer_state=TrainerState(0, 1))
    assert KeywordReward(narrow)(**kw) == [1.0, 0.0]
    assert KeywordReward(slow)(**kw) == [1, 1]


def test_missing_column_is_an_error_before_training():
    def needs_solution(prompts, completions, solution, **kwargs):
        return [0.0] * len(completions)

    funcs = build_reward_functions([needs_solution])
    check_reward_columns(funcs, ["prompt", "solution"], "data.jsonl")
    with pytest.raises(ConfigError, match=r"needs column\(s\) \['solution'\].*data.jsonl"):
        check_reward_columns(funcs, ["prompt", "answer"], "data.jsonl")
    with pytest.raises(ConfigError, match=r"needs column\(s\) \['entry'\]"):  # the built-in gym reward too
        check_reward_columns(build_reward_functions(["gym"]), ["prompt", "answer"], "data.jsonl")


def test_default_reward_follows_the_columns():
    assert default_rewards(["prompt", "entry"], None)[0] == ["gym"]
    assert default_rewards(["prompt"], "chain_sum")[0] == ["gym"]
    assert default_rewards(["prompt", "answer"], None)[0] == ["math"]
    with pytest.raises(ConfigError, match="no 'rewards' given"):
        default_rewards(["prompt", "question"], None)


def test_none_is_not_applicable_in_the_weighted_sum():
    def half(prompts, completions, **kwargs):
        return [None if c == "skip" else 0.5 for c in completions]

    def one(prompts, completions, **kwargs):
        return [None, 1.0, 1.0]

    funcs = build_reward_functions([half, one])
    total, parts = compute_rewards(funcs, [2.0, 3.0], [{"prompt": "p"}] * 3, ["skip", "skip", "x"])
    assert total.tolist() == [0.0, 3.0, 4.0]  # all-None -> 0 (TRL's nansum); None terms are skipped
    assert parts["half"].isnan().tolist() == [True, True, False]


def test_a_reward_raising_on_most_of_a_batch_stops_with_traceback_and_row():
    def flaky(prompts, completions, answer, **kwargs):
        return [1.0 if c == "ok" else 1 / 0 for c in completions]

    [guarded] = build_reward_functions([flaky], max_error_rate=0.5)
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(4)]
    # 1 of 4 raises: substituted by 0 and counted, the run goes on
    assert compute_rewards([guarded], [1.0], rows, ["ok", "ok", "bad", "ok"])[0].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert guarded.pop_counters()["reward_errors"] == 1
    with pytest.raises(RewardFunctionError) as info:
        compute_rewards([guarded], [1.0], rows, ["ok", "bad", "bad", "bad"])
    message = str(info.value)
    assert isinstance(info.value, PosttrainError)  # the CLI turns it into exit status 2
    assert "raised on 3 of 4 completions" in message and "ZeroDivisionError" in message and "Traceback" in message
    assert "prompt: 'q1'" in message and "completion: 'bad'" in message and "answer: '1'" in message
    # 1.0: never stop (the old behaviour: every error scores 0)
    [lenient] = build_reward_functions([flaky], max_error_rate=1.0)
    assert compute_rewards([lenient], [1.0], rows, ["bad"] * 4)[0].tolist() == [0.0] * 4


def _cli(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


TINY_GRPO = ["model=tiny", "num_generations=2", "prompts_per_step=2", "max_new_tokens=4", "micro_batch_size=4",
             "max_steps=2", "progress=false", "tensorboard=false", "eval_size=0"]


def test_cli_trl_style_conversational_reward_file(tmp_path):
    _write_reward_file(tmp_path)
    data = _conversational_prompts(tmp_path)
    out = tmp_path / "run"
    r = _cli(["grpo", f"train_file={data}", "rewards=my_reward.py:reward", f"output_dir={out}", *TINY_GRPO], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "reward/mean" in m]
    assert len(rows) == 2
    # every completion was scored by the file (1 + a letter fraction, or None -> 0 for the 'skip' row): none errored
    assert all(m["reward_fn/reward/reward_errors"] == 0 for m in rows)
    assert all(m["reward/mean"] > 0.0 for m in rows)


def test_cli_reward_that_raises_stops_the_run(tmp_path):
    (tmp_path / "plain.py").write_text("def reward(prompts, completions, **kw):\n"
                                       "    return [c[0]['content'] for c in completions]\n")
    data = tmp_path / "plain.jsonl"  # plain-text prompts: completions are strings, so c[0]['content'] raises
    data.write_text("".join(json.dumps({"prompt": f"Say {i}"}) + "\n" for i in range(4)))
    r = _cli(["grpo", f"train_file={data}", "rewards=plain.py:reward", f"output_dir={tmp_path / 'run'}", *TINY_GRPO],
             tmp_path)
    assert r.returncode == 2, r.stderr
    assert "reward function 'reward' raised on 4 of 4 completions" in r.stderr
    assert "TypeError" in r.stderr and "prompt: 'Say " in r.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_cli_user_file_without_reward_or_answer_column_is_refused(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}"}) + "\n" for i in range(4)))
    r = _cli(["grpo", f"train_file={data}", "model=tiny", f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2 and "no 'rewards' given" in r.stderr and "rewards=path/to/file.py:function" in r.stderr
    assert not (tmp_path / "run").exists()

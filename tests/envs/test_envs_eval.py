"""`posttrain eval` strategy react: episodes scored by the task's own scorer, with tool-call validity."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from envs_helpers import ForcedLM

from posttrain.envs import ToolEnv
from posttrain.envs.rl import episode_metrics
from posttrain.eval.react import problem_question
from posttrain.eval.runner import evaluate
from posttrain.eval.tasks import make_task
from posttrain.generation.episodes import (
    Episode,
    EpisodeBudget,
    EpisodeSampler,
    play_scripted,
)
from posttrain.generation.strategies import DecodeOptions
from posttrain.models import tiny_model, tiny_tokenizer


def _task(tmp_path):
    path = tmp_path / "mult.jsonl"
    path.write_text(json.dumps({"prompt": "What is 12 * 34?", "answer": "408"}) + "\n")
    return make_task(str(path), extract="last_number")


def test_react_strategy_scores_a_scripted_episode_with_the_tasks_scorer(tmp_path):
    task = _task(tmp_path)
    problems = task.problems(1, 0)
    tok = tiny_tokenizer()
    row = {"question": problem_question(problems[0]), "problem": 0}
    env = ToolEnv(["calculator"], tokenizer=tok, verifier=lambda answer, r: float(task.score(problems, [answer])[0]))
    script = ["Thought: multiply.\nAction: calculator[12 * 34]\nObservation:", "Final Answer: 408<|im_end|>"]
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=64, max_episode_tokens=200)
    episode = play_scripted(EpisodeSampler(tiny_model(), tok), env, row, script, budget=budget)
    assert episode.reward == 1.0
    model = ForcedLM(episode.prompt_ids + episode.token_ids, len(tok), tok.eos_token_id)
    out = evaluate(model, tok, task, problems, "react", options=DecodeOptions(max_new_tokens=64), keep_samples=True,
                   react={"tools": ["calculator"], "max_turns": 3, "max_episode_tokens": 200})
    m = out["metrics"]
    assert m["accuracy"] == 1.0 and m["pass@1"] == 1.0 and m["maj@1"] == 1.0
    assert m["tool_call_validity"] == 1.0 and m["tool_valid"] == 1.0 and m["turns"] == 2.0
    assert m["mean_generated_tokens"] == episode.model_tokens
    assert out["problems"][0]["answers"] == ["408"]
    # the same script with a wrong final answer scores 0 under the same scorer
    wrong = play_scripted(EpisodeSampler(tiny_model(), tok), env, row, [script[0], "Final Answer: 407<|im_end|>"],
                          budget=budget)
    model = ForcedLM(wrong.prompt_ids + wrong.token_ids, len(tok), tok.eos_token_id)
    assert evaluate(model, tok, task, problems, "react", options=DecodeOptions(max_new_tokens=64),
                    react={"max_turns": 3, "max_episode_tokens": 200})["metrics"]["accuracy"] == 0.0


def test_episode_metrics_hand_counted():
    a = Episode(0, [1], turn_texts=["x", "y"], infos=[{"tool_call": "valid"}, {"verifier": 1.0}], finish="done",
                token_ids=[5, 6, 7], model_mask=[1, 0, 1])
    b = Episode(0, [1], turn_texts=["x", "y", "z"], finish="max_turns", token_ids=[5, 6], model_mask=[1, 1],
                infos=[{"tool_call": "malformed"}, {"tool_call": "failed"}, {"no_action": 1}])
    m = episode_metrics([a, b])
    assert m["turns"] == 2.5 and m["obs_tokens"] == 0.5
    assert m["finish_done"] == 0.5 and m["finish_max_turns"] == 0.5
    assert m["tool_valid"] == 0.5 and m["tool_malformed"] == 0.5 and m["tool_failed"] == 0.5
    assert m["no_action_turns"] == 0.5 and m["tool_call_validity"] == pytest.approx(1 / 3)
    assert math.isnan(episode_metrics([Episode(0, [1], turn_texts=["a"], infos=[{}])])["tool_call_validity"])


def test_tool_env_statuses_and_rewards():
    env = ToolEnv(["calculator"], valid_call_reward=0.1, failed_call_reward=-0.2)
    env.reset({"question": "q", "answer": "6"})
    assert env.step("Action: calculator[2*3]").info == {"tool_call": "valid", "tool": "calculator"}
    bad = env.step("Action: calculator 2*3")
    assert (bad.reward, bad.info, bad.done) == (-0.2, {"tool_call": "malformed"}, False)
    none = env.step("I think it is six")
    assert none.info == {"no_action": 1} and none.observation.startswith("\nObservation: Error: no 'Action")
    done = env.step("Final Answer: 6")
    assert (done.reward, done.done, done.info["verifier"]) == (1.0, True, 1.0)


def test_eval_react_config_errors_exit_2(capsys):
    from posttrain.cli import main

    assert main(["eval", "model=tiny", "strategy=react", "tools=[hammer]"]) == 2
    assert "unknown tool(s) ['hammer']" in capsys.readouterr().err
    assert main(["eval", "model=tiny", "strategy=react", "tool_format=xml"]) == 2
    assert "'tool_format' must be one of ['auto', 'react', 'chat']" in capsys.readouterr().err
    assert main(["eval", "model=tiny", "strategy=react", "max_turns=0"]) == 2

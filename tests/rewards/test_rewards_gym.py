"""reasoning-gym rows and reward: the task's own scorer on right and wrong answers, extraction modes, offline tasks."""

from __future__ import annotations

import json

import datasets
import pytest

from posttrain.rewards.gym import gym_rows, gym_score, make_gym_reward
from posttrain.rewards.text import answer_tag, last_number

OFFLINE_TASKS = ["basic_arithmetic", "chain_sum", "countdown", "gsm_symbolic", "leg_counting"]


def _call(reward, rows, completions):
    return reward(prompts=[r["prompt"] for r in rows], completions=completions, answer=[r["answer"] for r in rows],
                  entry=[r["entry"] for r in rows], task=[r["task"] for r in rows],
                  task_config=[r["task_config"] for r in rows])


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_rows_are_deterministic_and_scored_by_the_task(task):
    rows = gym_rows(task, size=4, seed=3)
    assert rows == gym_rows(task, size=4, seed=3)
    assert [r["answer"] for r in rows] != [r["answer"] for r in gym_rows(task, size=4, seed=4)]
    for r in rows:
        entry = json.loads(r["entry"])
        assert r["answer"] == str(entry["answer"]) and r["task"] == task
        assert r["prompt"][-1]["role"] == "user" and r["prompt"][-1]["content"].startswith(entry["question"])
    reward = make_gym_reward()
    correct = [[{"role": "assistant", "content": f"Working...\nAnswer: {r['answer']}"}] for r in rows]
    wrong = [f"Answer: {r['answer']}0000" for r in rows]
    assert _call(reward, rows, correct) == [1.0] * 4
    assert _call(reward, rows, wrong) == [0.0] * 4
    datasets.Dataset.from_list(rows)  # one type per column: the rows load as a dataset


def test_strict_final_line_versus_last_number():
    rows = gym_rows("basic_arithmetic", size=2, seed=0)
    texts = [f"The result is {r['answer']}.0, I believe." for r in rows]
    assert _call(make_gym_reward(), rows, texts) == [0.0, 0.0]  # no `Answer:` line
    assert _call(make_gym_reward("last_number"), rows, texts) == [1.0, 1.0]  # "X.0" normalized to "X"


def test_partial_credit_is_the_scorers_value():
    rows = gym_rows("gsm_symbolic", size=1, seed=1)
    wrong = str(int(rows[0]["answer"]) + 1)
    completions = [f"Answer: {wrong}", f"Answer: {rows[0]['answer']}", "no answer"]
    rows3 = rows * 3
    # gsm_symbolic's scorer: 1.0 for the right number, 0.01 for a wrong one (read from reasoning-gym 0.1.25)
    assert _call(make_gym_reward(partial_credit=True), rows3, completions) == [0.01, 1.0, 0.0]
    assert _call(make_gym_reward(), rows3, completions) == [0.0, 1.0, 0.0]


def test_countdown_accepts_any_expression_that_reaches_the_target():
    rows = gym_rows("countdown", size=3, seed=1)
    entry = json.loads(rows[0]["entry"])
    assert entry["question"].startswith("Calculate 309 using all of these numbers: 6, 61, 94, 4.")
    assert entry["answer"] == "94*4 - 61 - 6"
    assert gym_score("4*94 - 6 - 61", rows[0]["entry"]) == 1.0  # same value, other order: the scorer evaluates
    assert gym_score("94*4 - 61", rows[0]["entry"]) < 1.0  # 315, and 6 is unused


def test_task_defaults_to_the_entrys_source_dataset():
    rows = gym_rows("leg_counting", size=1, seed=0)
    assert gym_score(rows[0]["answer"], json.loads(rows[0]["entry"])) == 1.0
    reward = make_gym_reward()
    assert reward(prompts=[None], completions=[f"Answer: {rows[0]['answer']}"], entry=[rows[0]["entry"]]) == [1.0]


def test_plain_prompts_and_system_prompt():
    chat = gym_rows("chain_sum", size=1, seed=0, system_prompt="Be brief.")
    plain = gym_rows("chain_sum", size=1, seed=0, chat=False, instruction="")
    assert chat[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert plain[0]["prompt"] == json.loads(plain[0]["entry"])["question"]


def test_extractors():
    assert last_number("total: 1,234.0 legs") == "1234"
    assert last_number("from -4.0 to -7") == "-7"
    assert last_number("2.50") == "2.50"
    assert last_number("none") is None
    assert answer_tag("<answer> 12 </answer> and <answer>13</answer>") == "13"
    with pytest.raises(ValueError, match="unknown extract mode"):
        make_gym_reward("first_word")

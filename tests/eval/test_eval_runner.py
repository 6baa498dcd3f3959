"""The eval runner: metrics recomputed by hand from the returned samples, selection strategies, cost accounting,
the command's table and JSON file."""

import json
import math

import pytest
import torch

from posttrain.eval.runner import EvalConfig, evaluate, format_table, run
from posttrain.eval.tasks import Problem
from posttrain.generation.strategies import DecodeOptions
from posttrain.models import tiny_model, tiny_tokenizer


class ParityTask:
    """A task the tiny random model can 'solve' half the time: the answer is the first generated character, and it
    is correct when its code point is even."""

    name = "parity"
    votable = True

    def problems(self, num, seed):
        return [Problem(id=str(i), prompt=f"question {i}: {'x' * i}") for i in range(num)]

    def extract(self, text):
        return text[0] if text else None

    def score(self, problems, completions):
        return [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(seed=2, init_std=0.25)
    return model.eval(), tiny_tokenizer(), ParityTask()


OPTIONS = DecodeOptions(max_new_tokens=6, batch_size=4, seed=3)


def test_decoder_metrics_match_a_recount_of_the_samples(setup):
    model, tok, task = setup
    problems = task.problems(6, 0)
    out = evaluate(model, tok, task, problems, "temperature", options=OPTIONS, num_samples=4, pass_k=[1, 2, 4],
                   keep_samples=True)
    m, rows = out["metrics"], out["problems"]
    correct = [[float(bool(c) and ord(c[0]) % 2 == 0) for c in r["completions"]] for r in rows]
    assert [r["correct"] for r in rows] == correct
    assert m["accuracy"] == pytest.approx(sum(sum(r) for r in correct) / 24)
    for k in (1, 2, 4):  # unbiased pass@k by brute force over k-subsets
        expected = sum(1 - math.comb(4 - int(sum(r)), k) / math.comb(4, k) for r in correct) / 6
        assert m[f"pass@{k}"] == pytest.approx(expected)
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    assert 0 < m["accuracy"] < 1  # the task is neither trivial nor impossible for this model


def test_greedy_cost_counts_each_prompt_once_and_each_token_but_the_last(setup):
    model, tok, task = setup
    problems = task.problems(5, 0)
    out = evaluate(model, tok, task, problems, "greedy", options=OPTIONS, num_samples=3, keep_samples=True)
    m = out["metrics"]
    assert all(len(set(r["completions"])) == 1 for r in out["problems"])  # greedy repeated, not resampled
    from posttrain.data.tokenize import prompt_text

    prompt_tokens = sum(len(tok(prompt_text(tok, p.prompt), add_special_tokens=False)["input_ids"]) for p in problems)
    generated = m["mean_generated_tokens"] * 5  # one greedy completion per problem
    assert m["forward_tokens"] == prompt_tokens + generated - 5
    assert m["forward_per_output_token"] == pytest.approx(m["forward_tokens"] / (3 * generated))


def test_majority_selects_the_most_frequent_answer_and_verifier_reaches_pass_at_n(setup):
    model, tok, task = setup
    problems = task.problems(6, 1)
    maj = evaluate(model, tok, task, problems, "majority", options=OPTIONS, num_samples=5, pass_k=[5],
                   keep_samples=True)
    for r in maj["problems"]:
        counts = {a: r["answers"].count(a) for a in r["answers"] if a is not None}
        best = max(counts.values())
        first_best = next(a for a in r["answers"] if counts.get(a) == best)  # ties: first occurrence
        assert r["answers"][r["selected"]] == first_best
    assert maj["metrics"]["accuracy"] == pytest.approx(
        sum(r["correct"][r["selected"]] for r in maj["problems"]) / 6)

    ver = evaluate(model, tok, task, problems, "best_of_n_verifier", options=OPTIONS, num_samples=5, pass_k=[5],
                   keep_samples=True)
    # the oracle verifier picks a correct sample whenever there is one: accuracy = fraction with any correct
    assert ver["metrics"]["accuracy"] == pytest.approx(sum(max(r["correct"]) for r in ver["problems"]) / 6)
    assert ver["metrics"]["accuracy"] == pytest.approx(ver["metrics"]["pass@5"])
    # the same seed gives the same candidates to both selectors
    assert [r["completions"] for r in ver["problems"]] == [r["completions"] for r in maj["problems"]]


@pytest.mark.parametrize("strategy", ["beam", "power", "low_temperature", "top_k", "top_p"])
def test_every_decoder_runs_through_the_runner(setup, strategy):
    model, tok, task = setup
    out = evaluate(model, tok, task, task.problems(2, 0), strategy,
                   options=DecodeOptions(max_new_tokens=5, block_size=3, mcmc_steps=2, beam_width=2, top_k=5,
                                         top_p=0.8, seed=1), num_samples=2, keep_samples=True)
    assert all(len(r["completions"]) == 2 for r in out["problems"])
    assert out["metrics"]["forward_per_output_token"] > 1.0  # the prompt is part of the cost
    if strategy == "power":
        assert 0 <= out["metrics"]["acceptance_rate"] <= 1


def test_run_writes_json_and_prints_a_table(tmp_path, capsys):
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(3)))
    config = EvalConfig(model="tiny", task=str(data), num_problems=3, strategy="temperature", num_samples=2,
                        pass_k=[1, 2], max_new_tokens=4, output_dir=str(tmp_path / "out"), extract="last_number")
    result = run(config)
    written = json.loads((tmp_path / "out" / "eval_sums_temperature.json").read_text())
    for key in ("accuracy", "pass@1", "pass@2", "forward_tokens", "mean_generated_tokens"):
        assert written["metrics"][key] == result["metrics"][key]
    assert len(written["problems"]) == 3 and written["config"]["strategy"] == "temperature"
    screen = capsys.readouterr().out
    assert "pass@2" in screen and "temperature" in screen


def test_format_table_lines_up_values():
    table = format_table([{"strategy": "greedy", "accuracy": 0.25, "accuracy_stderr": 0.1, "pass@1": 0.25,
                           "mean_generated_tokens": 12.0, "forward_per_output_token": 3.5,
                           "wall_s_per_problem": 1.0}, {"strategy": "power", "accuracy": 0.5}])
    lines = table.splitlines()
    assert lines[0].split() == ["strategy", "acc", "±", "gen", "tok", "fwd/out", "tok", "s/problem", "pass@1"]
    assert lines[2].split() == ["greedy", "0.250", "0.100", "12.0", "3.50", "1.00", "0.250"]
    assert lines[3].split() == ["power", "0.500", "-", "-", "-", "-", "-"]


def test_bad_strategy_is_a_config_error():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy"):
        EvalConfig(strategy="nucleus")
    with pytest.raises(ConfigError, match="reward_model"):
        EvalConfig(strategy="best_of_n_reward")


def test_posttrain_eval_command_line(tmp_path, capsys):
    from posttrain.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "Say 4.", "answer": "4"}) + "\n")
    code = main(["eval", "--model", "tiny", "--task", str(data), "--strategy", "beam", "beam_width=2",
                 "max_new_tokens=3", f"output_dir={tmp_path}"])
    assert code == 0
    assert json.loads((tmp_path / "eval_qa_beam.json").read_text())["metrics"]["strategy"] == "beam"
    assert "beam" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny", "--strategy", "nucleus"]) == 2  # a config error, reported


def test_best_of_n_with_a_saved_reward_model_picks_its_highest_score(setup, tmp_path):
    from posttrain.models.reward_model import build_reward_model, reward_function

    model, tok, task = setup
    rm, rm_tok = build_reward_model("tiny")
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    problems = task.problems(3, 0)
    out = evaluate(model, tok, task, problems, "best_of_n_reward", options=OPTIONS, num_samples=4,
                   reward_model=str(tmp_path / "rm"), keep_samples=True)
    score = reward_function(str(tmp_path / "rm"))
    for p, r in zip(problems, out["problems"]):
        rewards = score([p.prompt] * 4, r["completions"])
        assert len(set(rewards)) > 1  # the head separates the candidates
        assert r["selected"] == max(range(4), key=lambda g: (rewards[g], -g))

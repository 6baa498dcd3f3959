"""reasoning-gym tasks as RL data and rewards (Stojanovski et al., arXiv 2505.24760, "Reasoning Gym").

`gym_rows(task, size, seed)` turns a procedural generator into rows {prompt, answer, entry, task, task_config};
`entry` is the generator's full entry (question, answer, metadata) as a JSON string, so the rows go through
`datasets.Dataset` (whose columns must have one type) and the task's own `score_answer(answer, entry)` can score a
completion later. `make_gym_reward` builds the TRL-style reward that does that scoring.

Tasks checked offline with reasoning-gym 0.1.25: basic_arithmetic, chain_sum, countdown, gsm_symbolic,
leg_counting, spell_backward (generation, scoring, and scoring after the JSON round trip).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from posttrain.errors import DataError
from posttrain.rewards.text import answer_tag, completion_text, final_answer_line, last_number

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "\n\nThink briefly, then give the final answer alone on the last line as `Answer: <answer>`."

EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "final_line": final_answer_line,  # strict: the last non-empty line must read `Answer: X`
    "answer_tag": answer_tag,  # <answer>X</answer>, as reasoning-gym's own prompts ask for
    "last_number": last_number,  # lenient: the last number anywhere (small models answer in sentences)
    "raw": lambda text: text.strip(),
}


def gym_rows(
    task: str,
    size: int,
    seed: int,
    *,
    chat: bool = True,
    instruction: str = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
    **task_kwargs: Any,
) -> list[dict[str, Any]]:
    """`size` rows of reasoning-gym task `task` (generator seed `seed`, extra generator settings in `task_kwargs`).

    prompt: the question plus `instruction`, as a chat list ([system], user) when `chat`, else a string.
    answer: the reference answer; entry: JSON of the full entry; task: the task name; task_config: JSON of the
    generator settings (size, seed and task_kwargs), from which the reward rebuilds the task's scorer.
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    from posttrain.errors import ConfigError

    if task not in DATASETS:
        import difflib

        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"key 'task': unknown reasoning-gym task {task!r}.{hint} ({len(DATASETS)} tasks exist; "
                          "see reasoning_gym.factory.DATASETS.)")
    config = {"size": size, "seed": seed, **task_kwargs}
    try:
        dataset = reasoning_gym.create_dataset(task, **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"key 'task_kwargs': reasoning-gym task {task!r} rejects the settings {task_kwargs}: "
                          f"{e}") from None
    rows = []
    for index in range(len(dataset)):
        entry = dataset[index]
        try:
            entry_json = json.dumps(entry)
        except TypeError as e:
            raise DataError(f"reasoning-gym task {task!r}, entry {index}: metadata is not JSON-serializable ({e}); "
                            "gym_rows supports tasks whose entries are plain JSON") from e
        question = entry["question"] + instruction
        if chat:
            prompt: Any = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": question}]
        else:
            prompt = question
        rows.append({"prompt": prompt, "answer": str(entry["answer"]), "entry": entry_json, "task": task,
                     "task_config": json.dumps(config, sort_keys=True)})
    return rows


@functools.lru_cache(maxsize=64)
def _scorer(task: str, task_config: str | None) -> Callable[[str | None, dict], float]:
    import reasoning_gym

    if task_config is None:
        return reasoning_gym.get_score_answer_fn(task)
    return reasoning_gym.create_dataset(task, **json.loads(task_config)).score_answer


def gym_score(answer: str | None, entry: dict | str, task: str | None = None, task_config: str | None = None) -> float:
    """The task's own score (in [0, 1]) of `answer` for `entry` (a dict or its JSON); `task` defaults to the
    entry's metadata["source_dataset"], the scorer to the task's default settings without `task_config`."""
    row: dict = json.loads(entry) if isinstance(entry, str) else entry
    task = task or row.get("metadata", {}).get("source_dataset")
    if not task:
        raise ValueError("gym_score: no task given and the entry has no metadata['source_dataset']")
    return float(_scorer(task, task_config)(answer, row))


def make_gym_reward(
    extract: str = "final_line", *, partial_credit: bool = False, name: str = "gym_reward"
) -> Callable[..., list[float | None]]:
    """A TRL-style reward for rows from `gym_rows`: the task's scorer on the answer taken from the completion.

    extract: "final_line" (default, strict `Answer: X` last line), "answer_tag", "last_number" or "raw".
    partial_credit: return the scorer's value (some tasks give 0.01 for a well-formed wrong answer, 0.5 for a
    near-miss); by default the reward is binary, 1.0 only when the scorer gives exactly 1.0.
    """
    if extract not in EXTRACTORS:
        raise ValueError(f"unknown extract mode {extract!r}; expected one of {sorted(EXTRACTORS)}")
    extractor = EXTRACTORS[extract]

    def reward(prompts: list, completions: list, entry: list, task: list | None = None,
               task_config: list | None = None, **kwargs: Any) -> list[float | None]:
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            answer = extractor(completion_text(completion))
            if answer is None:
                rewards.append(0.0)
                continue
            score = gym_score(answer, entry[i], task[i] if task else None, task_config[i] if task_config else None)
            rewards.append(score if partial_credit else float(score == 1.0))
        return rewards

    reward.__name__ = name
    return reward


gym_reward = make_gym_reward()

"""Format rewards (DeepSeek-AI, arXiv 2501.12948, "DeepSeek-R1", §2.2.2: a format reward beside the accuracy one).

They score the shape of a completion, not its correctness: a last line `Answer: <number>`, or a
`<think>...</think><answer>...</answer>` layout. Each returns 1.0 or 0.0 per completion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from posttrain.rewards.text import completion_text

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_THINK_ANSWER = re.compile(r"^\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<answer>.+?)</answer>\s*$", re.DOTALL)


def make_answer_line_format_reward(
    label: str = "Answer", *, numeric: bool = True, name: str = "answer_line_format_reward"
) -> Callable[..., list[float]]:
    """1.0 when the last non-empty line is `<label>: X` (label case-insensitive), X a number when `numeric`
    (`-12`, `3.5`, `1,000`) or any non-empty text otherwise."""
    value = _NUMBER if numeric else r"\S.*?"
    pattern = re.compile(rf"^\s*{re.escape(label)}\s*:\s*{value}\s*$", re.IGNORECASE)

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        scores = []
        for completion in completions:
            lines = [line for line in completion_text(completion).splitlines() if line.strip()]
            scores.append(1.0 if lines and pattern.match(lines[-1]) else 0.0)
        return scores

    reward.__name__ = name
    return reward


def think_answer_format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion is exactly `<think>...</think>` then `<answer>...</answer>` (whitespace around
    allowed), each non-empty and each tag used once; R1-Zero's template."""
    scores = []
    for completion in completions:
        text = completion_text(completion)
        match = _THINK_ANSWER.match(text)
        once = all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
        scores.append(1.0 if match and once and match["think"].strip() and match["answer"].strip() else 0.0)
    return scores


answer_line_format_reward = make_answer_line_format_reward()

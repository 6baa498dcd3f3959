"""Text helpers shared by the reward functions: completion text in either TRL format, and answer extraction."""

from __future__ import annotations

import re
from typing import Any

_ANSWER_LINE = re.compile(r"^\s*answer\s*:\s*(?P<answer>.*?)\s*$", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or a chat list [{"role": "assistant", "content": ...}, ...].

    In a chat list the assistant messages are joined (TRL passes exactly one); a message whose content is a list of
    parts ({"type": "text", "text": ...}) contributes its text parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        texts = []
        for message in completion:
            if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
                continue
            content = message.get("content", "")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            texts.append(str(content))
        return "\n".join(texts)
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def final_answer_line(text: str) -> str | None:
    """X from a last non-empty line of the form `Answer: X` (case-insensitive), or None if the last line is not one."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_LINE.match(lines[-1])
    return match.group("answer") if match and match.group("answer") else None


def answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer> pair, stripped, or None."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def last_number(text: str) -> str | None:
    """The last number in `text`, with thousands separators removed and `4.0` written as `4`; None if there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    if "." in number and float(number).is_integer():
        number = number.split(".")[0] or "0"
    return number


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None  # unbalanced: the completion was cut off inside the box

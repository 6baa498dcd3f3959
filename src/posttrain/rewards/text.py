"""Text helpers shared by the reward functions: completion text in either TRL format, and answer extraction."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# `Answer: X`, also with markdown around the label or the value ("**Answer:** 42", "## Answer: 42", "- *Answer*: 42")
_ANSWER_LINE = re.compile(r"^[\s>#\-*_]*answer[\s*_]*[:：][\s*_]*(?P<answer>.*?)[\s*_]*$", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.DOTALL)
# A number: optional sign (a minus that does not follow a word character or a closing bracket, so "3-5" is 5),
# digits with comma thousands groups (exactly three digits each: "1,234" but not "1,2,3"), an optional decimal
# part, or a bare decimal part (".5"); or a fraction a/b. Unicode minus signs are mapped to "-" first.
_NUMBER = re.compile(r"(?<![\w)\]}.])(?:(?<![\w)\]}])-)?"
                     r"(?:(?<!/)\d+/\d+(?![\d/])|\d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
                     r"(?:[eE][+-]?\d+(?![\w.]))?")
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})


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
    """X from a last non-empty line of the form `Answer: X` (case-insensitive), or None if the last line is not one.

    Markdown emphasis and heading/quote/bullet marks around the label and the value are ignored, so
    "**Answer:** 42", "**Answer: 42**", "## Answer: 42" and "Answer: *42*" all give "42"; a full-width colon counts.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_LINE.match(lines[-1])
    return match.group("answer") if match and match.group("answer") else None


def answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer> pair, stripped, or None."""
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def _ascii_digits(text: str) -> str:
    return "".join(str(unicodedata.digit(c)) if c.isdigit() and not c.isascii() else c for c in text)


def last_number(text: str) -> str | None:
    """The last number in `text` as a plain decimal string; None if there is none.

    Thousands separators are removed ("1,234" -> "1234", but "1,2,3" is three numbers -> "3"), "4.0" becomes "4",
    ".5" becomes "0.5", a Unicode minus (U+2212) is a minus, a hyphen between two numbers is not a sign ("3-5" ->
    "5"), fractions stay fractions ("1/2", "\\frac{1}{2}" -> "1/2"), non-ASCII digits become ASCII, leading zeros
    go ("007" -> "7") and scientific notation is written out ("1e5" -> "100000").
    """
    text = _FRAC.sub(lambda m: f" {m.group(1)}/{m.group(2)} ", _ascii_digits(text).translate(_MINUS))
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    if "/" in number:
        return number
    sign, digits = ("-", number[1:]) if number.startswith("-") else ("", number)
    if "e" in digits.lower():  # scientific notation: written out
        value = float(digits)
        digits = str(int(value)) if value.is_integer() and abs(value) < 1e18 else repr(value)
    if digits.startswith("."):
        digits = "0" + digits
    if "." in digits and float(digits).is_integer():
        digits = digits.split(".")[0]
    whole, dot, frac = digits.partition(".")
    digits = (whole.lstrip("0") or "0") + dot + frac
    if sign and float(digits) == 0:
        sign = ""
    return sign + digits


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

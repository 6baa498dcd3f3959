"""Math-answer reward for RLVR (Lambert et al., arXiv 2411.15124, "Tülu 3"), answers checked with math-verify.

The predicted answer is taken from the completion (the last \\boxed{...}, or a last line `Answer: X`, in the order
given by `sources`) and compared with the `answer` column by `math_verify.verify(parse(gold), parse(pred))`, so
\\frac{1}{2}, 0.5 and 1/2 agree, as do (x+1)^2 and x^2+2x+1. Both sides are parsed as LaTeX math (wrapped in $...$
unless they already carry $ or \\boxed): math-verify finds no expression in a bare `x^2+2x+1` or `\\sqrt{2}`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.rewards.text import completion_text, final_answer_line, last_boxed

log = logging.getLogger(__name__)

_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"boxed": last_boxed, "final_line": final_answer_line}
MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers, and sympy can take minutes on them


def extract_math_answer(text: str, sources: Sequence[str] = ("boxed", "final_line")) -> str | None:
    """The first answer found by the extractors named in `sources` ("boxed", "final_line"), or None."""
    for source in sources:
        if source not in _EXTRACTORS:
            raise ValueError(f"unknown answer source {source!r}; expected one of {sorted(_EXTRACTORS)}")
        answer = _EXTRACTORS[source](text)
        if answer:
            return answer.strip().rstrip(".").strip()
    return None


def _as_math(text: str) -> str:
    return text if ("$" in text or "\\boxed" in text) else f"${text}$"


def _drop_timeout_notice(record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


# Off the main thread the timeouts are off on purpose (below); math-verify would warn on every call.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_timeout_notice)


def _timeouts() -> dict[str, int | None]:
    # math-verify enforces its timeouts with signal.alarm, which only works in the main thread; elsewhere (a
    # reward run in a worker thread, e.g. under GuardedReward's timeout) they must be off: the guard times out.
    in_main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if in_main else None}


def parse_math(text: str) -> list:
    """math-verify's parse of `text` as LaTeX math; [] when nothing parses."""
    from math_verify import parse

    return parse(_as_math(text), **_timeouts())


def math_equal(gold: str, pred: str) -> bool:
    """True when math-verify finds `pred` equal to `gold` (numerically to 6 decimals, or symbolically)."""
    from math_verify import verify

    in_main = threading.current_thread() is threading.main_thread()
    return bool(verify(parse_math(gold), parse_math(pred), timeout_seconds=5 if in_main else None))


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> tuple:
    return tuple(parse_math(text)) if len(text) <= MAX_ANSWER_CHARS else ()


def math_equivalent(a: str, b: str) -> bool:
    """Whether two extracted answers are the same answer: math-verify equality when both parse as math ("0.5",
    "1/2" and "\\frac{1}{2}" agree), else equality after trimming and case folding. Symmetric (tried both ways, as
    math-verify's gold/pred roles are not); parses are cached, so grouping G answers costs G parses."""
    a, b = str(a).strip(), str(b).strip()
    if a == b:
        return True
    pa, pb = _parsed(a), _parsed(b)
    if pa and pb:
        from math_verify import verify

        in_main = threading.current_thread() is threading.main_thread()
        timeout = 5 if in_main else None
        return bool(verify(list(pa), list(pb), timeout_seconds=timeout) or
                    verify(list(pb), list(pa), timeout_seconds=timeout))
    return a.casefold() == b.casefold()


def make_math_reward(
    sources: Sequence[str] = ("boxed", "final_line"), *, name: str = "math_reward"
) -> Callable[..., list[float | None]]:
    """A TRL-style reward: 1.0 if the extracted answer equals the row's `answer`, 0.0 if not or if none is found,
    None if the gold answer itself does not parse (the row cannot be scored; logged)."""
    sources = tuple(sources)
    extract_math_answer("", sources)  # reject unknown sources now, not at the first reward call

    def reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float | None]:
        rewards: list[float | None] = []
        for completion, gold in zip(completions, answer, strict=True):
            gold = str(gold)
            if not parse_math(gold):
                log.warning("math reward: gold answer %r does not parse; reward is None", gold)
                rewards.append(None)
                continue
            pred = extract_math_answer(completion_text(completion), sources)
            if pred is None or len(pred) > MAX_ANSWER_CHARS:
                rewards.append(0.0)
                continue
            rewards.append(1.0 if math_equal(gold, pred) else 0.0)
        return rewards

    reward.__name__ = name
    return reward


math_reward = make_math_reward()

"""Fault isolation for reward functions: an exception or a timeout costs one batch's rewards, never the run.

`GuardedReward(func, timeout_s=..., fallback=0.0)` has the TRL calling convention itself. It calls `func`; if that
raises, it retries each completion on its own (so one bad completion does not zero the batch); if a call overruns
`timeout_s` or still fails, it substitutes `fallback` (0.0, or None for "not applicable") for the affected
completions, logs a warning, and counts them in `counters` ({"reward_errors": n, "reward_timeouts": m}: numbers of
completions whose reward was substituted). A recipe logs `pop_counters()` once per step.

A timed-out call stops all its work: its cancel token (sandbox.cancel_scope) is set, so the sandboxes it started
are killed within one poll (50 ms) and no new ones start (run_many returns the rest at once), and its thread is
interrupted by an exception raised into it at its next Python instruction, again every 50 ms for up to
STOP_GRACE_S (reward code may catch one), while the guard itself returns after at most 0.1 s more. Only a call
blocked inside C code that never returns can outlive that; it is logged as left behind.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.rewards.combine import RewardFunc, reward_name
from posttrain.rewards.sandbox import CancelToken, cancel_scope

log = logging.getLogger(__name__)


class RewardTimeout(Exception):
    """A reward call overran its time limit."""


class RewardCancelled(BaseException):
    """Raised inside an abandoned reward call's thread to stop it (a BaseException: `except Exception` in reward
    code does not swallow it)."""


STOP_GRACE_S = 5.0  # how long a timed-out call gets to wind down (kill its sandboxes, unwind) before it is leaked


def _stop(thread: threading.Thread, finished: threading.Event, name: str) -> None:
    """Keep interrupting an abandoned call's thread (reward code may catch the exception) until it ends."""
    deadline = time.monotonic() + STOP_GRACE_S
    while not finished.wait(0.05):
        if time.monotonic() > deadline:
            log.warning("reward %s: the timed-out call did not stop within %g s (blocked outside Python?); its "
                        "thread is left behind", name, STOP_GRACE_S)
            return
        _interrupt(thread)


def _interrupt(thread: threading.Thread) -> None:
    """Raise RewardCancelled in `thread` at its next Python instruction."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(RewardCancelled))


class RewardFunctionError(PosttrainError):
    """A reward function raised on more than the allowed share of a batch: the run stops with its traceback and the
    first offending row (prompt, completion and dataset columns)."""

    def __init__(self, name: str, errors: int, n: int, max_error_rate: float, row: dict[str, Any], trace: str):
        self.name, self.errors, self.n, self.row, self.trace = name, errors, n, row, trace
        shown = "\n".join(f"  {k}: {_short(v)}" for k, v in row.items())
        super().__init__(
            f"reward function '{name}' raised on {errors} of {n} completions in one batch (more than "
            f"reward_max_error_rate={max_error_rate:g} of them), so the run stops instead of training on "
            f"substituted rewards.\nFirst offending row:\n{shown}\n{trace.rstrip()}")


def _short(value: Any, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class RewardCall:
    rewards: list[float | None]
    errors: int  # completions substituted after an exception or an invalid return value
    timeouts: int  # completions substituted after a timeout
    first_error: tuple[int, str] | None = None  # (completion index, formatted traceback) of the first error


def _call_with_timeout(func: RewardFunc, timeout_s: float | None, kwargs: dict[str, Any]) -> list:
    if timeout_s is None:
        return func(**kwargs)
    box: dict[str, Any] = {}
    token = CancelToken()
    finished = threading.Event()

    def target() -> None:
        try:
            with cancel_scope(token):
                box["value"] = func(**kwargs)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread below
            box["error"] = e
        finally:
            finished.set()

    thread = threading.Thread(target=target, name=f"reward-{reward_name(func)}", daemon=True)
    thread.start()
    if not finished.wait(timeout_s):
        token.cancel()  # sandboxes started by the call die within one poll, queued ones never start
        _interrupt(thread)
        if not finished.wait(0.1):  # the rest of the winding down happens beside the next step
            threading.Thread(target=_stop, args=(thread, finished, reward_name(func)), daemon=True,
                             name=f"reward-stop-{reward_name(func)}").start()
        raise RewardTimeout(f"no result after {timeout_s:g} s")
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _validate(value: Any, n: int) -> list[float | None]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"expected a list of {n} rewards, got {got}")
    rewards: list[float | None] = []
    for v in value:
        if v is None:
            rewards.append(None)
            continue
        v = float(v)  # raises on strings, tensors of several elements...
        rewards.append(None if math.isnan(v) else v)
    return rewards


def _item_kwargs(kwargs: dict[str, Any], n: int, i: int) -> dict[str, Any]:
    return {k: (v[i: i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in kwargs.items()}


def call_reward(func: RewardFunc, *, timeout_s: float | None = None, fallback: float | None = 0.0,
                per_item_retry: bool = True, **kwargs: Any) -> RewardCall:
    """Call `func(**kwargs)` (kwargs hold prompts=, completions= and the dataset columns) without letting it fail."""
    n = len(kwargs["completions"])
    name = reward_name(func)
    try:
        return RewardCall(_validate(_call_with_timeout(func, timeout_s, kwargs), n), 0, 0)
    except RewardTimeout as e:
        log.warning("reward %s timed out on a batch of %d (%s); using %r", name, n, e, fallback)
        return RewardCall([fallback] * n, 0, n)
    except Exception as e:  # any failure of user reward code is contained
        log.warning("reward %s raised %s: %s", name, type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        if not per_item_retry or n == 1:
            return RewardCall([fallback] * n, n, 0, (0, traceback.format_exc()))
    rewards: list[float | None] = []
    errors = timeouts = 0
    first_error: tuple[int, str] | None = None
    for i in range(n):
        try:
            rewards += _validate(_call_with_timeout(func, timeout_s, _item_kwargs(kwargs, n, i)), 1)
        except RewardTimeout:
            rewards.append(fallback)
            timeouts += 1
        except Exception as e:  # noqa: BLE001
            log.warning("reward %s raised on completion %d: %s: %s", name, i, type(e).__name__, e)
            rewards.append(fallback)
            errors += 1
            first_error = first_error or (i, traceback.format_exc())
    return RewardCall(rewards, errors, timeouts, first_error)


class GuardedReward:
    """A reward function that never raises; see the module docstring."""

    def __init__(self, func: RewardFunc, *, timeout_s: float | None = None, fallback: float | None = 0.0,
                 per_item_retry: bool = True, name: str | None = None, max_error_rate: float | None = None):
        self.func, self.timeout_s, self.fallback, self.per_item_retry = func, timeout_s, fallback, per_item_retry
        self.max_error_rate = max_error_rate
        self.__name__ = name or reward_name(func)
        self.counters = {"reward_errors": 0, "reward_timeouts": 0}
        self._lock = threading.Lock()

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        result = call_reward(self.func, timeout_s=self.timeout_s, fallback=self.fallback,
                             per_item_retry=self.per_item_retry, prompts=prompts, completions=completions, **kwargs)
        with self._lock:
            self.counters["reward_errors"] += result.errors
            self.counters["reward_timeouts"] += result.timeouts
        n = len(completions)
        if self.max_error_rate is not None and result.first_error is not None and result.errors > self.max_error_rate * n:
            index, trace = result.first_error
            row = {"prompt": prompts[index] if len(prompts) == n else prompts, "completion": completions[index],
                   **{k: v[index] for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == n}}
            raise RewardFunctionError(self.__name__, result.errors, n, self.max_error_rate, row, trace)
        return result.rewards

    def pop_counters(self) -> dict[str, int]:
        """The counters since the last pop, then reset (log them once per step)."""
        with self._lock:
            counters, self.counters = self.counters, {"reward_errors": 0, "reward_timeouts": 0}
        return counters


def required_columns(func: Any) -> list[str]:
    """The dataset columns a TRL-style reward cannot run without: its keyword parameters without defaults (besides
    prompts and completions). Looks through GuardedReward and callable objects."""
    import inspect

    target = func.func if isinstance(func, GuardedReward) else func
    if hasattr(target, "required") and hasattr(target, "missing"):  # rewards.user.KeywordReward knows already
        return target.missing([])
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in ("prompts",
            "completions") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_reward_columns(reward_fns: list, rows: list[dict[str, Any]], source: str) -> None:
    """Raise DataError naming the row and the column when a row lacks a column one of the rewards needs (so a run
    stops before its model loads, instead of a silent zero-reward step and a KeyError later)."""
    from posttrain.errors import DataError

    for func in reward_fns:
        needed = required_columns(func)
        for index, row in enumerate(rows):
            missing = [c for c in needed if c not in row]
            if missing:
                raise DataError(f"{source}, row {index + 1}: no column {', '.join(repr(c) for c in missing)}, which "
                                f"reward {reward_name(func)!r} needs (it reads {', '.join(needed)}).")


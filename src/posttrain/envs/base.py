"""The environment interface for multi-turn episodes, and the checks that turn a broken environment into a clear error.

An environment is a plain Python class with two methods (no base class needed):

    reset(row) -> messages         the first observation: chat messages (or a plain prompt string) for dataset row `row`
    step(text) -> StepResult       the model's turn (decoded text) -> observation, reward, done

One instance plays one episode at a time; the rollout engine builds one per episode with the class's constructor
(`make_env`), calls `reset` once and `step` after each model turn until `done`, the turn budget or the token budget
ends the episode. The episode's reward is the sum of the step rewards: a verifier's score on the final answer (the last
step's reward) plus any per-turn rewards an environment gives on the way.

An observation is either text, appended right after the model's tokens (ReAct's `Observation: ...`), or a list of chat
messages, rendered by the chat template as new turns (a `tool` or `user` message followed by the assistant header).
Text after a turn the model closed itself (with its end-of-turn token) is sent as a `user` message.

Everything an environment returns is checked (`checked_reset`, `checked_step`); an exception, a wrong type or a call
that does not return within `timeout_s` raises `EnvError` naming the environment, the dataset row and the turn.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from posttrain.errors import ConfigError, PosttrainError

Messages = list[dict[str, str]]
Observation = str | Messages


class EnvError(PosttrainError):
    """An environment broke its contract (raised, returned the wrong types, hung, or could not use a row)."""


@dataclass(frozen=True)
class StepResult:
    """observation: text or chat messages appended before the model's next turn (None or "" when done);
    reward: this turn's reward; done: the episode is over; info: anything to log (e.g. {"verifier": 1.0,
    "tool_call": "valid"})."""

    observation: Observation | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """What the rollout engine needs from an environment (see the module docstring)."""

    def reset(self, row: dict[str, Any]) -> Observation: ...

    def step(self, text: str) -> StepResult: ...


def env_name(env: Any) -> str:
    """A name for messages: the instance's `name` attribute, else its class name."""
    return str(getattr(env, "name", None) or type(env).__name__)


class CallTimeout(Exception):
    """A call did not return within its time limit."""


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None, name: str = "call") -> Any:
    """fn() in a daemon thread; its exception is re-raised here, and CallTimeout after timeout_s seconds (the thread
    is abandoned, not killed: Python cannot kill a thread). timeout_s None: a plain call."""
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise CallTimeout(f"no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _call(fn: Callable[[], Any], timeout_s: float | None, what: str) -> Any:
    """An environment call; one that hangs stops the run with EnvError instead of hanging it."""
    try:
        return call_with_timeout(fn, timeout_s, "env-call")
    except CallTimeout:
        raise EnvError(f"{what}: no answer within {timeout_s:g} s (env_timeout_s); an environment call must "
                       "return") from None


def check_messages(value: Any, what: str) -> Observation:
    """A prompt string or a non-empty list of {"role": str, "content": str} dicts, else EnvError."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return value
    raise EnvError(f"{what} returned {_describe(value)}; expected a prompt string or a non-empty list of chat messages "
                   "{'role': str, 'content': str}")


def checked_reset(env: Any, row: dict[str, Any], row_index: int | str, timeout_s: float | None = None) -> Observation:
    """env.reset(row), checked. An exception means the environment cannot use the row: EnvError naming both."""
    what = f"environment '{env_name(env)}', row {row_index}: reset"
    try:
        value = _call(lambda: env.reset(row), timeout_s, what)
    except EnvError:
        raise
    except Exception as e:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise EnvError(f"environment '{env_name(env)}' cannot use row {row_index} (columns {keys}): "
                       f"reset raised {type(e).__name__}: {e}") from e
    return check_messages(value, what)


def checked_step(env: Any, text: str, row_index: int | str, turn: int, timeout_s: float | None = None) -> StepResult:
    """env.step(text), checked: a StepResult (or an (observation, reward, done) tuple) with a finite reward."""
    what = f"environment '{env_name(env)}', row {row_index}, turn {turn}: step"
    try:
        value = _call(lambda: env.step(text), timeout_s, what)
    except EnvError:
        raise
    except Exception as e:
        raise EnvError(f"{what} raised {type(e).__name__}: {e}") from e
    if isinstance(value, tuple) and len(value) == 3:
        value = StepResult(value[0], value[1], value[2])
    if not isinstance(value, StepResult):
        raise EnvError(f"{what} returned {_describe(value)}; expected a StepResult(observation, reward, done)")
    if isinstance(value.reward, bool) or not isinstance(value.reward, (int, float)) or not math.isfinite(value.reward):
        raise EnvError(f"{what} returned reward {value.reward!r}; expected a finite number")
    if not isinstance(value.done, bool):
        raise EnvError(f"{what} returned done={value.done!r}; expected True or False")
    if not isinstance(value.info, dict):
        raise EnvError(f"{what} returned info {_describe(value.info)}; expected a dict")
    if not value.done and not value.observation:
        raise EnvError(f"{what} returned no observation ({value.observation!r}) for an episode that goes on "
                       "(done=False); the model needs something new to read before its next turn")
    if value.observation:
        check_messages(value.observation, f"{what} observation:")
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def load_object(spec: str, what: str = "environment") -> Any:
    """`path/to/file.py:Name` or `package.module:Name` -> the object. Errors name the spec and what is missing."""
    if ":" not in spec:
        raise ConfigError(f"{what} {spec!r}: expected a built-in name or 'path/to/file.py:ClassName'")
    source, _, name = spec.rpartition(":")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what} {spec!r}: file '{path}' does not exist")
        module_name = f"_posttrain_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec_obj = importlib.util.spec_from_file_location(module_name, path)
            if spec_obj is None or spec_obj.loader is None:
                raise ConfigError(f"{what} {spec!r}: cannot import '{path}'")
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[module_name] = module
            try:
                spec_obj.loader.exec_module(module)
            except Exception as e:
                del sys.modules[module_name]
                raise ConfigError(f"{what} {spec!r}: importing '{path}' raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise ConfigError(f"{what} {spec!r}: cannot import module '{source}' ({e})") from e
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ConfigError(f"{what} {spec!r}: '{source}' has no '{name}'; it defines {public}")
    return getattr(module, name)

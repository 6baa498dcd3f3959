"""Your own reward functions, called the TRL way (GRPOTrainer's reward-function convention).

A reward is given as a registered name (`gym`, `math`, ... in posttrain.rewards.REWARDS), as `path/to/file.py:func` or
`package.module:func` (loaded by posttrain.plugins.load_object), or, in Python, as the callable itself. It is called
with keywords, exactly as TRL calls it:

    func(prompts=[...], completions=[...], completion_ids=[[...], ...], trainer_state=state, **dataset_columns)

- `prompts`: each row's prompt as it is in the data (a string, or a list of chat messages);
- `completions`: strings when the prompts are strings; when a prompt is conversational, its completion is a message
  list `[{"role": "assistant", "content": text}]` (a prompt ending in an assistant turn is a prefill: its content
  starts the completion and the turn is left out of `prompts`, as TRL does);
- `completion_ids`: each completion's token ids (no padding);
- `trainer_state`: a TrainerState (global_step, max_steps, epoch);
- every other dataset column (`answer`, ...) as a list aligned with the completions (TRL leaves out `prompt`,
  `completion` and `completion_ids`).

It returns one float per completion, or None where the reward does not apply (weighted sums skip it). A function
whose signature has no `**kwargs` gets only the keywords it names; one that names a column the data lacks is an
error before any model is loaded. `async def` functions are run to completion. A function that raises on more than
`max_error_rate` of a batch stops the run with its traceback and the offending row (rewards/guard.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError
from posttrain.plugins import is_object_spec, load_object
from posttrain.rewards.combine import reward_name
from posttrain.rewards.guard import GuardedReward

RewardSpec = str | Callable[..., Any]
EXCLUDED_COLUMNS = ("prompt", "completion", "completion_ids")  # never passed as column keywords (as in TRL)
STANDARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state")


@dataclass(frozen=True)
class TrainerState:
    """What TRL's `trainer_state` offers a reward most often: the step being scored and the run's length."""

    global_step: int
    max_steps: int
    epoch: float = 0.0


class KeywordReward:
    """A reward function called with the TRL keywords its signature accepts (all of them if it takes **kwargs)."""

    def __init__(self, func: Callable[..., Any], name: str | None = None):
        self.func = func
        self.__name__ = name or reward_name(func)
        self.is_async = inspect.iscoroutinefunction(func)
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: pass everything
            self.accepts_all, self.names, self.required = True, set(), set()
            return
        self.accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        self.names = {p.name for p in named}
        self.required = {p.name for p in named if p.default is inspect.Parameter.empty}

    def missing(self, available: Sequence[str]) -> list[str]:
        """Required keywords that neither TRL's standard keywords nor the data's columns provide."""
        return sorted(self.required - set(available) - set(STANDARD_KEYWORDS))

    def __call__(self, **kwargs: Any) -> Any:
        if not self.accepts_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self.names}
        result = self.func(**kwargs)
        if self.is_async or inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return result


async def _await(result: Any) -> Any:
    return await result


def resolve_reward(spec: RewardSpec, options: dict[str, dict[str, Any]] | None = None) -> tuple[str, Callable[..., Any]]:
    """(name, function) for a registered name, a `file.py:func` / `module:func` spec, or a callable."""
    from posttrain.rewards import build_reward

    options = options or {}
    if callable(spec):
        return reward_name(spec), spec
    if not isinstance(spec, str):
        raise ConfigError(f"a reward must be a name, 'path/to/file.py:function', 'package.module:function' or a "
                          f"callable, got {type(spec).__name__}.")
    if is_object_spec(spec):
        func = load_object(spec)
        if not callable(func):
            raise ConfigError(f"reward '{spec}' is a {type(func).__name__}, not a function.")
        if spec in options:
            raise ConfigError(f"reward_options['{spec}']: options are for registered rewards; a function from a "
                              f"file takes none (give it defaults or read them from dataset columns).")
        return spec.rpartition(":")[2].split(".")[-1], func
    return spec, build_reward(spec, **options.get(spec, {}))


def build_reward_functions(specs: Sequence[RewardSpec], options: dict[str, dict[str, Any]] | None = None, *,
                           timeout_s: float | None = None,
                           max_error_rate: float | None = None) -> list[GuardedReward]:
    """Each reward resolved, called with the keywords it accepts, and guarded: errors and timeouts are counted and
    substituted, and more than `max_error_rate` errors in one batch stop the run (None: never)."""
    out: list[GuardedReward] = []
    seen: dict[str, int] = {}
    for spec in specs:
        name, func = resolve_reward(spec, options)
        seen[name] = seen.get(name, 0) + 1
        unique = name if seen[name] == 1 else f"{name}_{seen[name] - 1}"
        out.append(GuardedReward(KeywordReward(func, unique), timeout_s=timeout_s, name=unique,
                                 max_error_rate=max_error_rate))
    return out


def check_reward_columns(funcs: Sequence[Any], columns: Sequence[str], source: str) -> None:
    """Raise ConfigError (before any model loads) when a reward requires a keyword the data's columns lack."""
    available = [c for c in columns if c not in EXCLUDED_COLUMNS]
    for func in funcs:
        inner = getattr(func, "func", func)
        keyword = inner if isinstance(inner, KeywordReward) else KeywordReward(inner)
        missing = keyword.missing(available)
        if missing:
            raise ConfigError(f"reward '{keyword.__name__}' needs column(s) {missing}, but {source} has columns "
                              f"{sorted(columns)}; add them to the data or choose another reward.")


def default_rewards(columns: Sequence[str], task: str | None) -> tuple[list[str], str]:
    """The reward to use when none is given, and why: the task's own scorer for a reasoning-gym task, else the one
    the data's columns support (`entry` -> gym, `answer` -> math). Raises ConfigError when no column fits."""
    if task is not None or "entry" in columns:
        return ["gym"], "reasoning-gym rows score with their task's own scorer"
    if "answer" in columns:
        return ["math"], "the data has an 'answer' column, compared with math-verify"
    raise ConfigError(f"no 'rewards' given and the prompt data (columns {sorted(columns)}) has neither an 'answer' "
                      f"column (for rewards=math) nor reasoning-gym 'entry' rows (for rewards=gym); set "
                      f"rewards=path/to/file.py:function (a TRL-style reward function) or a registered name.")


def is_conversational(prompt: Any) -> bool:
    """A prompt given as a list of chat messages."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def trl_prompts_and_completions(prompts: Sequence[Any], texts: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """TRL's view of a batch: conversational prompts give message-list completions (an assistant prefill is moved
    from the prompt into the completion's content); plain prompts give strings."""
    out_prompts: list[Any] = []
    completions: list[Any] = []
    for prompt, text in zip(prompts, texts):
        if is_conversational(prompt):
            prefill = prompt[-1]["content"] if prompt and prompt[-1]["role"] == "assistant" else ""
            out_prompts.append(prompt[:-1] if prefill else prompt)
            completions.append([{"role": "assistant", "content": prefill + text}])
        else:
            out_prompts.append(prompt)
            completions.append(text)
    return out_prompts, completions


def reward_keywords(rows: Sequence[dict[str, Any]], texts: Sequence[str], *,
                    completion_ids: Sequence[Sequence[int]] | None = None,
                    trainer_state: TrainerState | None = None) -> dict[str, Any]:
    """The keywords of one reward call: rows[i] is the dataset row of completion texts[i]."""
    prompts, completions = trl_prompts_and_completions([r["prompt"] for r in rows], texts)
    kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions}
    if completion_ids is not None:
        kwargs["completion_ids"] = [list(ids) for ids in completion_ids]
    if trainer_state is not None:
        kwargs["trainer_state"] = trainer_state
    for key in rows[0] if rows else ():
        if key not in EXCLUDED_COLUMNS and key not in kwargs:
            kwargs[key] = [r.get(key) for r in rows]
    return kwargs


def prepare_rewards(specs: Sequence[RewardSpec], rows: Sequence[dict[str, Any]], *,
                    options: dict[str, dict[str, Any]] | None, timeout_s: float | None, max_error_rate: float | None,
                    task: str | None, source: str | None, command: str) -> list[GuardedReward]:
    """The guarded reward functions of an RL run, checked against the prompt rows' columns before a model loads.

    No specs: the reward the data supports (default_rewards), announced on stderr."""
    import sys

    columns = list(rows[0]) if rows else []
    if not specs:
        specs, reason = default_rewards(columns, task)
        print(f"posttrain {command}: no 'rewards' given; using rewards={','.join(map(str, specs))} ({reason}).",
              file=sys.stderr)
    funcs = build_reward_functions(specs, options, timeout_s=timeout_s, max_error_rate=max_error_rate)
    check_reward_columns(funcs, columns, source or f"task '{task}'")
    return funcs

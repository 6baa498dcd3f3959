"""Multi-turn environments and tools: `reset(row)` -> messages, `step(model_text)` -> observation, reward, done.

- base.py: the interface, StepResult, checked calls (EnvError names the environment, row and turn), `load_object`;
- tools.py: calculator, Python in the sandbox, search over a local corpus; `call_tool` turns failures into error text;
- formats.py: ReAct `Thought / Action / Observation` text and chat-template `<tool_call>` parsing;
- tool_env.py: ToolEnv, question answering with tools and a verifier on the final answer;
- rl.py: episodes as training tensors (observation tokens masked out of the loss).

The rollout engine is posttrain.generation.episodes. Environments are named on the command line by a built-in name
(ENVIRONMENTS) or as `path/to/file.py:ClassName`; `env_factory(spec, options)` builds one instance per episode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.envs.base import (
    EnvError,
    Environment,
    StepResult,
    check_messages,
    checked_reset,
    checked_step,
    env_name,
    load_object,
)
from posttrain.envs.formats import (
    ChatToolFormat,
    Parsed,
    ReActFormat,
    supports_tool_calls,
    tool_format,
)
from posttrain.envs.tool_env import ToolEnv, verify_answer
from posttrain.envs.tools import (
    TOOLS,
    Tool,
    ToolError,
    ToolOutcome,
    build_tools,
    calculate,
    call_tool,
)
from posttrain.errors import ConfigError

ENVIRONMENTS: dict[str, Callable[..., Any]] = {"tools": ToolEnv}


def env_factory(spec: str, options: dict[str, Any] | None = None, *, tokenizer=None) -> Callable[[], Any]:
    """A zero-argument constructor of environment `spec` (a name in ENVIRONMENTS or 'file.py:ClassName') with
    keyword `options`; one instance is built now, so a wrong option or a class that is not an environment fails
    before any model is loaded. The built-in ToolEnv also gets the tokenizer (for format 'auto')."""
    options = dict(options or {})
    cls = ENVIRONMENTS.get(spec) if spec in ENVIRONMENTS else load_object(spec, "environment")
    if cls is ToolEnv and tokenizer is not None:
        options.setdefault("tokenizer", tokenizer)
    if not callable(cls):
        raise ConfigError(f"environment {spec!r} is a {type(cls).__name__}, not a class")

    def make() -> Any:
        try:
            return cls(**options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"environment {spec!r}: cannot build it with options {options}: {e}") from e
        except ConfigError:
            raise
        except Exception as e:  # a user's constructor may raise anything: name the environment, not a traceback
            raise EnvError(f"environment {spec!r}: its constructor raised {type(e).__name__}: {e}") from e

    probe = make()
    missing = [m for m in ("reset", "step") if not callable(getattr(probe, m, None))]
    if missing:
        raise ConfigError(f"environment {spec!r} has no {' / '.join(missing)} method; an environment needs "
                          "reset(row) -> messages and step(text) -> StepResult")
    return make


def check_rows(make_env: Callable[[], Any], rows: list[dict[str, Any]], timeout_s: float | None = None,
               label: str = "") -> None:
    """Reset a fresh environment on every row, so a row the environment cannot use fails (EnvError naming the
    environment and the row, e.g. "row 3" or with label "held-out": "row 3 (held-out)") before a model is loaded or
    anything is written."""
    for index, row in enumerate(rows):
        checked_reset(make_env(), row, f"{index} ({label})" if label else index, timeout_s)


__all__ = [
    "ENVIRONMENTS",
    "TOOLS",
    "ChatToolFormat",
    "EnvError",
    "Environment",
    "Parsed",
    "ReActFormat",
    "StepResult",
    "Tool",
    "ToolEnv",
    "ToolError",
    "ToolOutcome",
    "build_tools",
    "calculate",
    "call_tool",
    "check_messages",
    "check_rows",
    "checked_reset",
    "checked_step",
    "env_factory",
    "env_name",
    "load_object",
    "supports_tool_calls",
    "tool_format",
    "verify_answer",
]

"""The Python API: one function per method, the same keys as the command line (TRL's names work too).

    import posttrain

    run = posttrain.sft(model="smollm2-135m-instruct", train_dataset=rows, max_steps=100)
    run.final_dir            # an ordinary Hugging Face folder
    run.summary["train/loss"]

(`train_diffusion`, not `diffusion`: `posttrain.diffusion` is the diffusion package.) Every function takes an optional `config` (a config dataclass such as `posttrain.recipes.sft.SFTConfig`, a dict, or
a YAML path) and keyword arguments that override it. Data goes in `train_dataset` / `eval_dataset` (or
`train_file` / `eval_file`) as a file path, a `datasets.Dataset`, a `datasets.DatasetDict` (its "train" split, and
"test" or "validation" as the held-out data when none is given), a pandas DataFrame or a list of dicts. In-memory
data is validated row by row first (the same checks and messages as a file), then written to
`<output_dir>/data/*.jsonl` so the run can be resumed from the command line. Rewards (`rewards=` or TRL's
`reward_funcs=`) may be Python callables with TRL's calling convention (posttrain.rewards.user).

Each call returns a RunResult: the run's summary (the last logged metrics), `final_dir`, `output_dir`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

_DATA_KEYS = {"train_dataset": "train_file", "eval_dataset": "eval_file"}
_FORMAT_OF = {"sft": "sft", "dpo": "dpo", "reward": "reward", "grpo": "rl", "ppo": "rl"}


@dataclass(frozen=True)
class RunResult:
    """What a run returns: `summary` (the last logged metrics and headline numbers), `final_dir` (the trained
    model, a Hugging Face folder; None for evaluation), `output_dir` (metrics.jsonl, checkpoints, run_config.json)."""

    summary: dict[str, Any]
    final_dir: Path | None
    output_dir: Path

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]


def _rows_of(data: Any, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(rows, held-out rows from a DatasetDict or None) of in-memory data."""
    try:
        import datasets
    except ImportError:  # datasets is a dependency; this keeps the function usable without it
        datasets = None
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError(f"{name}: a DatasetDict needs a 'train' split; it has {list(data)}.")
        held_out = next((data[s] for s in ("test", "validation") if s in data), None)
        return data["train"].to_list(), held_out.to_list() if held_out is not None else None
    if datasets is not None and isinstance(data, datasets.Dataset):
        return data.to_list(), None
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a pandas DataFrame
        return data.to_dict(orient="records"), None
    if isinstance(data, (list, tuple)) and all(isinstance(r, dict) for r in data):
        return [dict(r) for r in data], None
    raise ConfigError(f"{name}: expected a file path, a datasets.Dataset / DatasetDict, a pandas DataFrame or a list "
                      f"of dicts, got {type(data).__name__}.")


def _materialize(command: str, values: dict[str, Any]) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Replace in-memory data in `values` by JSONL paths under output_dir/data (validated, not yet written)."""
    from posttrain.data.formats import ACCEPTS, validate_rows

    for alias, key in _DATA_KEYS.items():
        if alias in values:
            if values.get(key) is not None:
                raise ConfigError(f"give '{alias}' or '{key}', not both.")
            values[key] = values.pop(alias)
    out_dir = Path(values.get("output_dir") or f"runs/{command}")
    pending: list[tuple[Path, list[dict[str, Any]]]] = []
    for key in ("train_file", "eval_file"):
        data = values.get(key)
        if data is None or isinstance(data, (str, Path)):
            continue
        rows, held_out = _rows_of(data, key)
        if held_out is not None and key == "train_file" and values.get("eval_file") is None and command != "ppo":
            values["eval_file"] = held_out
        if command in _FORMAT_OF:
            if not rows:
                raise ConfigError(f"{key}: the data has no rows.")
            validate_rows(rows, ACCEPTS[_FORMAT_OF[command]], f"{key} (in-memory data)")
        path = out_dir / "data" / f"{key.split('_')[0]}.jsonl"
        pending.append((path, rows))
        values[key] = str(path)
    if values.get("eval_file") is not None and not isinstance(values["eval_file"], (str, Path)):
        rows, _ = _rows_of(values["eval_file"], "eval_file")
        validate_rows(rows, ACCEPTS[_FORMAT_OF[command]], "eval_file (in-memory data)")
        path = out_dir / "data" / "eval.jsonl"
        pending.append((path, rows))
        values["eval_file"] = str(path)
    return pending


def _write_rows(pending: list[tuple[Path, list[dict[str, Any]]]]) -> None:
    for path, rows in pending:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        tmp.replace(path)


def _values_of(cls: type, config: Any, command: str) -> dict[str, Any]:
    import yaml

    from posttrain.config import resolve_aliases

    if config is None:
        return {}
    if isinstance(config, cls):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of key: value.")
        return resolve_aliases(cls, loaded, str(path))
    if isinstance(config, dict):
        return resolve_aliases(cls, config, f"posttrain.{command}(config=...)")
    raise ConfigError(f"posttrain.{command}: config must be a {cls.__name__}, a dict or a YAML path, "
                      f"got {type(config).__name__}.")


def _run(command: str, config: Any, kwargs: dict[str, Any], resume: str | bool | None) -> RunResult:
    from posttrain.cli import _load_command, _quiet_libraries
    from posttrain.config import build_config, resolve_aliases

    _quiet_libraries()
    cls, fn = _load_command(command)
    source = f"posttrain.{command}()"
    kwargs = dict(kwargs)
    data = {k: kwargs.pop(k) for k in [*_DATA_KEYS, *_DATA_KEYS.values()] if k in kwargs}
    values = {**_values_of(cls, config, command), **resolve_aliases(cls, kwargs, source), **data}
    pending = _materialize(command, values)
    given = values.get("rewards")
    rewards: list[Any] = [given] if callable(given) else list(given) if isinstance(given, (list, tuple)) else []
    has_callables = any(callable(r) for r in rewards)
    if has_callables:  # the loader checks strings; callables are put back after it
        values["rewards"] = [f"callable_{i}" for i in range(len(rewards))]
    built: Any = build_config(cls, values, source=source)
    if has_callables:
        built.rewards = rewards
    _write_rows(pending)
    run_kwargs: dict[str, Any] = {}
    if resume:
        run_kwargs["resume"] = "latest" if resume is True else str(resume)
    summary = fn(built, **run_kwargs) or {}
    out_dir = Path(getattr(built, "output_dir", "") or ".")
    final = summary.get("final_dir")
    return RunResult(summary=dict(summary), final_dir=Path(final) if final else None, output_dir=out_dir)


def sft(config: Any = None, *, resume: str | bool | None = None, **kwargs: Any) -> RunResult:
    """Supervised fine-tuning (`posttrain sft`): text, prompt/completion or messages data; loss on completion /
    assistant tokens. Keys: `posttrain sft --help`."""
    return _run("sft", config, kwargs, resume)


def dpo(config: Any = None, *, resume: str | bool | None = None, **kwargs: Any) -> RunResult:
    """Direct preference optimization and its variants (`posttrain dpo`): prompt/chosen/rejected pairs."""
    return _run("dpo", config, kwargs, resume)


def reward(config: Any = None, *, resume: str | bool | None = None, **kwargs: Any) -> RunResult:
    """A Bradley-Terry reward model (`posttrain reward`); its final/ loads with AutoModelForSequenceClassification."""
    return _run("reward", config, kwargs, resume)


def grpo(config: Any = None, *, resume: str | bool | None = None, **kwargs: Any) -> RunResult:
    """GRPO, DAPO, Dr. GRPO, CISPO / ScaleRL (`posttrain grpo`): prompt rows (or a reasoning-gym `task`) and
    `rewards` / `reward_funcs`: names, 'file.py:function' specs or callables called the TRL way."""
    return _run("grpo", config, kwargs, resume)


def ppo(config: Any = None, *, resume: str | bool | None = None, **kwargs: Any) -> RunResult:
    """RLHF with PPO (`posttrain ppo`): prompt rows and a `reward_model` folder or verifier `rewards`."""
    return _run("ppo", config, kwargs, resume)


def evaluate(config: Any = None, **kwargs: Any) -> RunResult:
    """`posttrain eval`: accuracy, pass@k and maj@k of a model on a task with a decoding or test-time strategy.

    `task` is a reasoning-gym name, 'humaneval', a data file, or in-memory prompt/answer rows (a list of dicts, a
    Dataset). The summary is the metrics row (accuracy, pass@k, maj@k, ...)."""
    from posttrain.cli import _load_command, _quiet_libraries
    from posttrain.config import build_config, resolve_aliases

    _quiet_libraries()
    cls, fn = _load_command("eval")
    values = {**_values_of(cls, config, "evaluate"), **resolve_aliases(cls, dict(kwargs), "posttrain.evaluate()")}
    pending = []
    task = values.get("task")
    if task is not None and not isinstance(task, str):
        rows, _ = _rows_of(task, "task")
        path = Path(values.get("output_dir") or "runs/eval") / "data" / "task.jsonl"
        pending.append((path, rows))
        values["task"] = str(path)
    built = build_config(cls, values, source="posttrain.evaluate()")
    _write_rows(pending)
    result = fn(built)
    return RunResult(summary=dict(result["metrics"]), final_dir=None, output_dir=Path(built.output_dir))


def train_diffusion(config: Any = None, *, resume: str | bool | None = None, **kwargs: Any) -> RunResult:
    """Train a diffusion denoiser (`posttrain diffusion train`) on 2-D data or 8x8 digits."""
    return _run("diffusion train", config, kwargs, resume)


__all__ = ["RunResult", "dpo", "evaluate", "grpo", "ppo", "reward", "sft", "train_diffusion"]

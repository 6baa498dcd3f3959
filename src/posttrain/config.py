"""Recipe configuration: one flat dataclass per recipe, filled from YAML and `key=value` overrides.

A config file is a flat YAML mapping whose keys are the dataclass's fields. Overrides on the command line use the
same keys (`lr=1e-5 lora_r=8`); values are parsed as YAML scalars and then checked against the field's type.
An unknown key is an error that names the key, where it came from, and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from posttrain.errors import ConfigError

C = TypeVar("C")


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that carries its help text once (shown by `posttrain <recipe> --help`); `aliases` are other
    names accepted for it (a former name, kept working after a rename)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "aliases": tuple(aliases)}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def key_aliases(cls: type) -> dict[str, str]:
    """alias -> key for a config class: the fields' own `aliases` (former names) and TRL's names for the same
    quantity (posttrain.trl_names), for keys the class has."""
    from posttrain.trl_names import aliases_for

    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    out = {alias: key for alias, key in aliases_for(cls.__name__).items() if key in fields and alias not in fields}
    for f in fields.values():
        out.update({alias: f.name for alias in f.metadata.get("aliases", ())})
    return out


def unknown_key_error(key: str, class_name: str, names: list[str], source: str) -> ConfigError:
    """The error for a key that is not among `names`: the nearest valid name, or what to use for a TRL name."""
    from posttrain.trl_names import NOT_EQUIVALENT

    if key in NOT_EQUIVALENT:
        hint = f" (TRL's '{key}' has no exact equivalent here: {NOT_EQUIVALENT[key]}.)"
    else:
        hint = _suggest(key, names)
    return ConfigError(f"{source}: unknown key '{key}' for {class_name}.{hint}")


def _unknown_key(key: str, cls: type, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)] + list(key_aliases(cls))  # type: ignore[arg-type]
    return unknown_key_error(key, cls.__name__, names, source)


def resolve_aliases(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with aliases replaced by their keys; an unknown key, or a key given twice (as itself and as an
    alias, or as two aliases) in one source, is a ConfigError naming the source."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    aliases = key_aliases(cls)
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in fields:
            raise _unknown_key(str(key), cls, source)
        if name in out:
            raise ConfigError(f"{source}: '{key}' and '{given_as[name]}' both set '{name}'; give one of them.")
        out[name], given_as[name] = value, key
    return out


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few things YAML cannot express directly."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}.")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(choices)}, got {value!r}.")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}.")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, key, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp in (dict, list) and not isinstance(value, tp):
        raise ConfigError(f"{source}: key '{key}' expects a {'mapping' if tp is dict else 'list'}, got {value!r}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{source}: key '{key}' expects true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}.")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}.") from None
        if as_float != int(as_float):
            raise ConfigError(f"{source}: key '{key}' expects an integer, got {value!r}.")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: key '{key}' expects a number, got {value!r}.") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: key '{key}' expects a string, got {value!r}.")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Make `cls` from a flat mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in resolve_aliases(cls, values, source).items():
        kwargs[key] = _coerce(value, hints[key], key, source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing} for {cls.__name__}.")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def _flags_to_pairs(items: list[str]) -> list[str]:
    """`--key value` and `--key=value` become `key=value`; a bare `--flag` is `flag=true`."""
    out, i = [], 0
    while i < len(items):
        item = items[i]
        if item.startswith("--") and len(item) > 2 and "=" not in item:
            if i + 1 < len(items) and not items[i + 1].startswith("--") and "=" not in items[i + 1]:
                out.append(f"{item[2:]}={items[i + 1]}")
                i += 1
            else:
                out.append(f"{item[2:]}=true")
        else:
            out.append(item.removeprefix("--"))
        i += 1
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["lr=1e-5", "--lora_r", "8"]` -> `{"lr": 1e-5, "lora_r": 8}`; values are YAML scalars."""
    out: dict[str, Any] = {}
    for item in _flags_to_pairs(overrides):
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value.")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read a flat YAML file (optional), apply `key=value` overrides, and build the recipe's dataclass.

    Keys are checked where they come from, so an error names the file or the command line."""
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of key: value, got {type(loaded).__name__}.")
        values.update(resolve_aliases(cls, loaded, str(path)))
        source = str(path)
    cli = resolve_aliases(cls, parse_overrides(overrides or []), "command line")
    values.update(cli)  # the command line overrides the file, whichever name either used
    both = f"{source} + command line" if path is not None else "command line"
    return build_config(cls, values, source=both if cli else source)


_CHOICE_KEYS: dict[type, dict[str, tuple[Any, ...]]] = {}


def _choice_keys(cls: type) -> dict[str, tuple[Any, ...]]:
    """The keys of a config dataclass annotated with a Literal, and their choices (worked out once per class)."""
    if cls not in _CHOICE_KEYS:
        hints = typing.get_type_hints(cls)
        _CHOICE_KEYS[cls] = {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
                             if typing.get_origin(hints[f.name]) is typing.Literal}
    return _CHOICE_KEYS[cls]


def check_choices(config: Any) -> None:
    """A Literal-typed key holds one of its choices also when the config is built in Python, not only when the
    config loader reads it from a file or the command line."""
    for key, choices in _choice_keys(type(config)).items():
        value = getattr(config, key)
        if value not in choices:
            raise ConfigError(f"key '{key}' must be one of {list(choices)}, got {value!r}.")


@dataclasses.dataclass(kw_only=True)
class RunOptions:
    """Keys every training recipe shares (each recipe's config subclasses this, keyword-only): how the model is
    placed and adapted, the optimizer's guards, seeding, logging and checkpointing."""

    lora_r: int = field(0, help="LoRA rank on the trained model; 0 = full fine-tuning")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_dropout: float = field(0.0, help="LoRA dropout")
    lora_target: str = field("all-linear", help="LoRA target modules: all-linear or a comma list")
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="float32, bfloat16 or float16 (the half types are for GPUs)")
    device: Literal["auto", "cpu", "cuda"] = field(
        "auto", help="auto, cpu or cuda (cuda when none is available is an error)")
    parallelism: Literal["none", "ddp", "fsdp2"] = field(
        "ddp", help="data parallelism under torchrun: ddp (whole model per rank; a no-op in one process), fsdp2 "
                    "(parameters, gradients and optimizer state sharded; needs torchrun) or none")
    mixed_precision: bool = field(True, help="fsdp2 on CUDA: bf16 compute with fp32 gradient reduction")
    cpu_offload: bool = field(False, help="fsdp2 on CUDA: keep parameter/gradient/optimizer shards in host memory")
    warmup_steps: int = field(0, help="linear warmup steps")
    max_grad_norm: float = field(1.0, help="gradient clipping norm; 0 = off")
    seed: int = field(0, help="seed for data / prompt order, sampling and initialization")
    logging_steps: int = field(1, help="log every N steps")
    save_steps: int = field(0, help="checkpoint every N steps; 0 = only at the end")
    keep_last: int = field(2, help="checkpoints kept (the newest ones); 0 = keep all")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"],
                                 help="experiment trackers: some of tensorboard, trackio, wandb (optional packages; "
                                      "WANDB_MODE=offline works without a network), or none")
    tensorboard: bool = field(True, help="false drops tensorboard from report_to (the older switch)")
    progress: bool = field(True, help="show a progress bar")
    max_nonfinite_steps: int = field(5, help="stop with an error after this many optimizer steps in a row whose loss "
                                             "or gradient norm is NaN/inf (each such step is skipped, not applied)")
    overwrite: bool = field(False, help="start over in an output_dir that holds another run's checkpoints or final "
                                        "model, deleting them (without it such a folder is refused; --resume "
                                        "continues it)")

    def __post_init__(self) -> None:
        from posttrain.train.trackers import check_trackers

        check_choices(self)
        self.validate_run_options()
        check_trackers(self.report_to)  # an unknown or missing tracker stops the run before anything loads

    def validate_run_options(self) -> None:
        """Refuse values that cannot mean anything (negative counts, a zero logging interval)."""
        for key in ("lora_r", "warmup_steps", "save_steps", "keep_last"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key '{key}' must be >= 0, got {getattr(self, key)}.")
        for key in ("logging_steps", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if not self.max_grad_norm >= 0:  # also refuses NaN
            raise ConfigError(f"key 'max_grad_norm' must be >= 0 (0 = no clipping), got {self.max_grad_norm}.")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ConfigError(f"key 'lora_alpha' must be > 0, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"key 'lora_dropout' must be in [0, 1), got {self.lora_dropout}.")
        model = getattr(self, "model", None)
        if isinstance(model, str) and model.startswith("tiny"):
            from posttrain.models.loading import check_model_name

            check_model_name(model)

    def logger_options(self) -> dict[str, Any]:
        """The keywords of `train.logging.MetricsLogger` these options set (trackers and the config they record)."""
        return {"tensorboard": self.tensorboard, "report_to": self.report_to,
                "config": json.loads(json.dumps(dataclasses.asdict(self), default=repr))}

    def model_options(self) -> dict[str, Any]:
        """The keywords of `train.state.prepare_model` these options set (dtype and LoRA)."""
        return {"dtype": self.dtype, "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "lora_target": self.lora_target}


def config_help(cls: type) -> str:
    """One line per key: name, type, default, help; the recipe's own keys first, then those of its base classes."""
    hints = typing.get_type_hints(cls)
    own = set(inspect.get_annotations(cls))
    aliases: dict[str, list[str]] = {}
    for alias, key in key_aliases(cls).items():
        aliases.setdefault(key, []).append(alias)
    lines = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        also = f" [also: {', '.join(aliases[f.name])}]" if f.name in aliases else ""
        lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}){also}: "
                     f"{f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (dataclasses.asdict)."""
    return dataclasses.asdict(config)


RUN_CONFIG_FILE = "run_config.json"  # not config.json, which transformers reads as a model's config


def save_run_config(config: Any, output_dir: str | Path) -> Path:
    """Write the run's settings to `<output_dir>/run_config.json` (atomically); values JSON cannot hold, such as
    reward functions given as Python callables, are written as their repr."""
    from posttrain.files import atomic_write_text

    path = Path(output_dir) / RUN_CONFIG_FILE
    atomic_write_text(path, json.dumps(dataclasses.asdict(config), indent=2, default=repr) + "\n")
    return path

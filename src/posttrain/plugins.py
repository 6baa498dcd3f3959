"""User code named in a config: `path/to/file.py:name` or `package.module:name` (as TRL's and uvicorn's CLIs take it).

    load_object("rewards/my_reward.py:reward")      # a file, loaded once as its own module
    load_object("my_package.rewards:reward")        # an importable module
    load_object("my_package.rewards:Scorer.score")  # an attribute path inside the module

A file's folder is on `sys.path` while the file runs, so it can import modules that sit next to it. Errors are
ConfigErrors that name the spec and what is wrong (no such file, import failed with its traceback, no such name).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.errors import ConfigError

_FILE_MODULES: dict[Path, ModuleType] = {}


def is_object_spec(text: Any) -> bool:
    """True for `file.py:name` and `package.module:name`; False for plain names such as a registered reward."""
    if not isinstance(text, str) or ":" not in text:
        return False
    where, _, name = text.rpartition(":")
    return bool(where) and bool(name) and all(part.isidentifier() for part in name.split("."))


def _load_file(path: Path, spec: str) -> ModuleType:
    path = path.expanduser().resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise ConfigError(f"'{spec}': no such file '{path}'.")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"posttrain_user_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"'{spec}': '{path}' cannot be loaded as a Python module (expected a .py file).")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # pickling and dataclasses look the module up by name
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 -- the user's module failed; show them its own traceback
        sys.modules.pop(module_name, None)
        raise ConfigError(f"'{spec}': running '{path}' raised an exception:\n{traceback.format_exc()}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    _FILE_MODULES[path] = module
    return module


def _import_module(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ConfigError(f"'{spec}': no module named '{name}' (not importable from this environment; give a "
                              f"file path such as 'path/to/{name.split('.')[-1]}.py:function').") from None
        raise ConfigError(f"'{spec}': importing '{name}' failed:\n{traceback.format_exc()}") from None
    except Exception:  # noqa: BLE001 -- the user's module failed on import
        raise ConfigError(f"'{spec}': importing '{name}' raised an exception:\n{traceback.format_exc()}") from None


def load_object(spec: str) -> Any:
    """The object named by `spec` (`path/to/file.py:name` or `package.module:name`; `name` may be dotted)."""
    if not is_object_spec(spec):
        raise ConfigError(f"'{spec}' is not of the form 'path/to/file.py:name' or 'package.module:name'.")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(Path(where), spec)
    else:
        module = _import_module(where, spec)
    obj: Any = module
    for i, part in enumerate(name.split(".")):
        if not hasattr(obj, part):
            owner = where if i == 0 else f"{where}:{'.'.join(name.split('.')[:i])}"
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" It defines: {', '.join(public) or 'nothing public'}."
            raise ConfigError(f"'{spec}': '{owner}' has no attribute '{part}'.{hint}")
        obj = getattr(obj, part)
    return obj

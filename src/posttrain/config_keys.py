"""A config class's key names read from its source code, without importing it (so without torch).

The command line checks a config's keys before it imports the recipe: importing torch and transformers takes
seconds, and a mistyped key should be reported at once. The dataclass fields are the annotated assignments of the
class body and of its bases (found by name in the same module or through its `from ... import` lines); the
`aliases=(...)` of `field(...)` calls are read too. Anything this reader cannot follow returns None, and the full
check after the import (posttrain.config.load_config) decides as before.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def _module_tree(module: str) -> tuple[ast.Module, str] | None:
    if module.startswith("posttrain."):  # by path: find_spec would import the parent packages (and with them torch)
        base = Path(__file__).resolve().parent.joinpath(*module.split(".")[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return ast.parse(path.read_text(encoding="utf-8")), module
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8")), module


def _class_keys(module: str, name: str, depth: int = 0) -> dict[str, tuple[str, ...]] | None:
    """{field name: its aliases} of class `name` in `module` and its bases, or None if it cannot be followed."""
    found = _module_tree(module)
    if found is None or depth > 8:
        return None
    tree, _ = found
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    imports = {alias.asname or alias.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
               and node.module for alias in node.names}
    node = classes.get(name)
    if node is None:
        return None
    keys: dict[str, tuple[str, ...]] = {}
    for base in node.bases:
        if not isinstance(base, ast.Name):
            return None
        if base.id in classes:
            inherited = _class_keys(module, base.id, depth + 1)
        elif base.id in imports:
            inherited = _class_keys(imports[base.id], base.id, depth + 1)
        else:
            return None
        if inherited is None:
            return None
        keys.update(inherited)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(stmt.annotation, ast.Subscript) and getattr(stmt.annotation.value, "id", "") == "ClassVar":
                continue
            aliases: tuple[str, ...] = ()
            if isinstance(stmt.value, ast.Call):
                for kw in stmt.value.keywords:
                    if kw.arg == "aliases" and isinstance(kw.value, (ast.Tuple, ast.List)):
                        aliases = tuple(str(e.value) for e in kw.value.elts if isinstance(e, ast.Constant))
            keys[stmt.target.id] = aliases
    return keys


def accepted_keys(module: str, class_name: str) -> set[str] | None:
    """Every key the config class accepts (fields, their aliases, TRL's names for them), or None if unknown."""
    from posttrain.trl_names import aliases_for

    keys = _class_keys(module, class_name)
    if keys is None:
        return None
    accepted = set(keys) | {a for aliases in keys.values() for a in aliases}
    accepted |= {alias for alias, key in aliases_for(class_name).items() if key in keys}
    return accepted

"""Reading dataset files and validating every row against the formats users know from TRL.

Formats (TRL's `dataset_formats.md`):
- `text`:               {"text": str}
- `prompt_completion`:  {"prompt": str, "completion": str} or both as lists of {"role", "content"} turns
- `messages`:           {"messages": [{"role", "content"}, ...]}
- `preference`:         {"prompt": ..., "chosen": ..., "rejected": ...} (plain strings or conversational)
- `prompt_only`:        {"prompt": ...} plus any extra columns (e.g. "answer") for RL rewards

Files: .jsonl, .json (a list of rows, or {"data": [...]}) , .parquet, .csv, and folders written by
`datasets.Dataset.save_to_disk`. Every row is validated before anything trains; the first bad row raises a
DataError naming the file, the row number (1-based; the line number for JSONL) and the column.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

FORMATS = ("text", "prompt_completion", "messages", "preference", "prompt_only")
ROLES = ("system", "user", "assistant", "tool")

# What each recipe accepts, in order of detection preference.
ACCEPTS = {
    "sft": ("messages", "prompt_completion", "text"),
    "dpo": ("preference",),
    "reward": ("preference",),
    "rl": ("prompt_only", "prompt_completion", "messages"),
}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a data file or `datasets` folder, as plain dicts. Raises DataError for unreadable files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    if path.is_dir():
        return _read_datasets_folder(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected .jsonl, .json, .parquet, .csv or a "
                        f"folder saved with datasets' save_to_disk.")
    if suffix in (".jsonl", ".json", ".csv"):
        _check_utf8(path)
    rows = readers[suffix](path)
    if not rows:
        raise DataError(f"{path}: the file has no rows.")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, expected an object with named columns.")
    return rows


def _check_utf8(path: Path) -> None:
    """DataError naming the line and byte where a text data file stops being valid UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: row/line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}, "
                        f"file offset {e.start}); save the file as UTF-8.") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {line_no} (line {line_no}) is not valid JSON: {e.msg} at column {e.colno}.") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}}), got {type(data).__name__}.")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for i, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(f"{path}: row {i} has more fields than the header {reader.fieldnames}.")
            # Conversational columns in CSV are JSON strings; decode those that look like lists.
            rows.append({k: _maybe_json(v) for k, v in row.items()})
        return rows


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_datasets_folder(path: Path) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 -- datasets raises several types for a wrong folder
        raise DataError(f"{path}: not a folder saved with datasets' save_to_disk ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)}).")
        ds = ds["train"]
    return ds.to_list()


def detect_format(row: dict[str, Any], accepts: Iterable[str], source: str) -> str:
    """The format of the first row among those a recipe accepts; an error lists the columns that were expected."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        found = "preference"
    elif "messages" in keys:
        found = "messages"
    elif {"prompt", "completion"} <= keys:
        found = "prompt_completion"
    elif "text" in keys:
        found = "text"
    elif "prompt" in keys:
        found = "prompt_only"
    else:
        found = None
    accepts = tuple(accepts)
    if found not in accepts:
        want = {"text": "'text'", "prompt_completion": "'prompt' and 'completion'", "messages": "'messages'",
                "preference": "'prompt', 'chosen' and 'rejected'", "prompt_only": "'prompt' (plus extra columns)"}
        expected = " or ".join(want[f] for f in accepts)
        raise DataError(f"{source}: row 1 has columns {sorted(keys)}; this recipe expects {expected}.")
    return found


def _check_text(value: Any, source: str, row: int, column: str, *, allow_empty: bool = False) -> None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{source}: row {row}, column '{column}': missing value (null); expected a string.")
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row}, column '{column}': expected a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise DataError(f"{source}: row {row}, column '{column}': empty text.")


def _check_turns(value: Any, source: str, row: int, column: str, *, need_assistant: bool) -> None:
    if not isinstance(value, list):
        raise DataError(f"{source}: row {row}, column '{column}': expected a list of {{'role', 'content'}} turns, "
                        f"got {type(value).__name__}.")
    if not value:
        raise DataError(f"{source}: row {row}, column '{column}': the conversation is empty.")
    for j, turn in enumerate(value, start=1):
        where = f"{source}: row {row}, column '{column}', turn {j}"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(turn).__name__}.")
        if "role" not in turn:
            raise DataError(f"{where}: the turn has no 'role'.")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: unknown role {turn['role']!r}; expected one of {list(ROLES)}.")
        if "content" not in turn:
            raise DataError(f"{where}: the turn has no 'content'.")
        if not isinstance(turn["content"], str):
            raise DataError(f"{where}: 'content' must be a string, got {type(turn['content']).__name__}.")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise DataError(f"{where}: empty assistant content.")
    if need_assistant and not any(t["role"] == "assistant" for t in value):
        raise DataError(f"{source}: row {row}, column '{column}': no assistant turn, so there is nothing to train on.")


def _check_side(value: Any, source: str, row: int, column: str, *, conversational: bool, need_assistant: bool) -> None:
    if conversational:
        _check_turns(value, source, row, column, need_assistant=need_assistant)
    else:
        _check_text(value, source, row, column)


def _check_implicit_prompt(chosen: list, rejected: list, source: str, row: int) -> None:
    """Without a prompt, the turns before each side's final assistant turn are the prompt: both sides must share
    them exactly (TRL's implicit-prompt format), or one side would be trained on the other's history."""
    for column, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{source}: row {row}, column '{column}': with no 'prompt' the last turn must be the "
                            f"assistant's answer, got role {turns[-1]['role']!r}.")
    history_w, history_l = chosen[:-1], rejected[:-1]
    if history_w != history_l:
        turn = next((j for j, (a, b) in enumerate(zip(history_w, history_l), start=1) if a != b),
                    min(len(history_w), len(history_l)) + 1)
        raise DataError(f"{source}: row {row}: no 'prompt' column, so the turns before the last one are the prompt, "
                        f"but 'chosen' and 'rejected' differ at turn {turn}; give the shared history as 'prompt' or "
                        f"make both sides start with the same turns.")


def validate_rows(rows: list[dict[str, Any]], accepts: Iterable[str], source: str) -> str:
    """Check every row; return the detected format. The first problem raises DataError (file, row, column)."""
    fmt = detect_format(rows[0], accepts, source)
    required = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "messages": ["messages"],
                "preference": ["chosen", "rejected"], "prompt_only": ["prompt"]}[fmt]
    conversational = None
    for i, row in enumerate(rows, start=1):
        for column in required:
            if column not in row:
                raise DataError(f"{source}: row {i}: missing column '{column}' (the file's format is '{fmt}', "
                                f"detected from row 1).")
        if fmt == "text":
            _check_text(row["text"], source, i, "text")
        elif fmt == "messages":
            _check_turns(row["messages"], source, i, "messages", need_assistant=True)
        else:
            main = "completion" if fmt == "prompt_completion" else ("chosen" if fmt == "preference" else "prompt")
            is_conv = isinstance(row[main], list)
            if conversational is None:
                conversational = is_conv
            elif conversational != is_conv:
                raise DataError(f"{source}: row {i}, column '{main}': mixes conversational and plain-text rows "
                                f"(row 1 is {'conversational' if conversational else 'plain text'}).")
            if "prompt" in row or fmt != "preference":
                if fmt == "preference" and row.get("prompt") is None:
                    pass  # implicit prompt: chosen/rejected carry the whole conversation
                else:
                    _check_side(row["prompt"], source, i, "prompt", conversational=is_conv, need_assistant=False)
            if fmt == "prompt_completion":
                _check_side(row["completion"], source, i, "completion", conversational=is_conv, need_assistant=True)
            if fmt == "preference":
                for column in ("chosen", "rejected"):
                    _check_side(row[column], source, i, column, conversational=is_conv, need_assistant=True)
                if row["chosen"] == row["rejected"]:
                    raise DataError(f"{source}: row {i}: 'chosen' and 'rejected' are identical; a preference pair "
                                    f"needs two different answers.")
                if is_conv and not row.get("prompt"):
                    _check_implicit_prompt(row["chosen"], row["rejected"], source, i)
    return fmt


def load_dataset_file(path: str | Path, recipe: str) -> tuple[list[dict[str, Any]], str]:
    """Read and validate a data file for `recipe` ('sft', 'dpo', 'reward', 'rl'); returns (rows, format)."""
    rows = read_rows(path)
    return rows, validate_rows(rows, ACCEPTS[recipe], str(path))

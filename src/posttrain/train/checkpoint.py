"""Atomic, resumable checkpoints.

A checkpoint is a folder `<output_dir>/checkpoints/step-<N>/` holding the model in Hugging Face format (loadable by
`transformers` alone) and `trainer_state.pt` with everything else a run needs to continue exactly: optimizer,
scheduler, RNG states, data position, and the step. The folder is written under a temporary name and renamed into
place, so a run killed at any instant leaves either a complete checkpoint or none; `latest_checkpoint` only ever
sees complete ones.

Damage from outside (a truncated file, a half-deleted folder) is caught on resume: `checkpoint.json` lists the
size of every file of the folder, and `find_resume_checkpoint` falls back to the newest checkpoint that matches its
list and whose trainer state loads, with a warning. Old checkpoints are removed by renaming them to a hidden
`.deleting` name first, so a kill during the removal never leaves a half-deleted folder under a valid name;
`clean_partial_writes` removes such leftovers and temporary folders at the start of the next run. A full disk
while writing raises DiskFullError ("no space left on device") and leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.errors import DiskFullError, PosttrainError  # noqa: F401 -- DiskFullError: also importable from here
from posttrain.files import atomic_dir, atomic_write_text  # noqa: F401 -- atomic_write_text: also importable from here

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checkpoint.json"
_TEMP_MARKERS = (".tmp-", ".old-", ".deleting")


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states, for a checkpoint."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore random states saved by rng_state()."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step`: output_dir/checkpoints/step-NNNNNNNN."""
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    state: dict[str, Any],
    keep_last: int | None = 2,
) -> Path:
    """Write `step-N/` atomically: `save_model(folder)` writes the HF model, `state` goes to trainer_state.pt."""
    final = checkpoint_dir(output_dir, step)
    with atomic_dir(final) as tmp:
        save_model(tmp)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        _fault_point("checkpoint")
        write_manifest(tmp, step)
    if keep_last and keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            remove_tree_atomic(old)
    return final


def write_manifest(folder: Path, step: int) -> None:
    """`checkpoint.json`: the step and the size of every file in the folder (written last, inside the temporary
    folder; any layout that writes a checkpoint folder calls it, e.g. train.sharded)."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}) + "\n")


def _fault_point(name: str) -> None:
    """Test hook for the fault-injection tests: POSTTRAIN_FAULT_PAUSE=<name>:<seconds> sleeps here (inside a
    checkpoint write, with the temporary folder half-written) so that a test can SIGKILL the run at this point."""
    spec = os.environ.get("POSTTRAIN_FAULT_PAUSE", "")
    if spec.startswith(name + ":"):
        import time

        time.sleep(float(spec.split(":", 1)[1]))


def remove_tree_atomic(path: Path) -> None:
    """Delete a folder so that a kill midway never leaves it half-deleted under its own name: rename it to a hidden
    `.<name>.deleting` first (clean_partial_writes finishes the job if the run dies)."""
    path = Path(path)
    doomed = path.parent / f".{path.name}.deleting"
    with contextlib.suppress(FileNotFoundError):
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_partial_writes(output_dir: str | Path) -> list[Path]:
    """Remove temporary and half-deleted folders and files left by killed runs in output_dir and its checkpoints/;
    a replace interrupted between its two renames is rolled back (the old complete folder gets its name back).
    Call it only while holding the folder's lock (train.run_dir). Returns what was removed."""
    removed = []
    for folder in (Path(output_dir), Path(output_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            name = path.name
            if not name.startswith(".") or not any(marker in name for marker in _TEMP_MARKERS):
                continue
            if ".old-" in name:
                original = folder / name[1:name.rindex(".old-")]
                if not original.exists():
                    os.replace(path, original)  # killed between `final -> old` and `tmp -> final`
                    continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete-looking `step-N` folders under output_dir/checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under output_dir, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (a missing or truncated file, a state that does not load), or None."""
    manifest = checkpoint / MANIFEST_FILE
    try:
        files = json.loads(manifest.read_text()).get("files") if manifest.exists() else None
    except (OSError, ValueError) as e:
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name, size in (files or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for path in sorted(checkpoint.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            return f"{path.relative_to(checkpoint)} {problem}"
    try:
        state = load_state(checkpoint)
    except Exception as e:  # noqa: BLE001 -- any failure to load means the checkpoint is unusable
        return f"{STATE_FILE} does not load ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE_FILE} holds no step"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes it indexes: a truncated
    file is shorter than the header says (checked without reading the tensors)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 + header_len:
                return "is truncated (shorter than its header)"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as e:
        return f"is unreadable ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + header_len + max(ends, default=0) > size:
        return "is truncated (its tensors end past the end of the file)"
    return None


def find_resume_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """The checkpoint `--resume` means: "latest" = the newest intact one in output_dir (damaged newer ones are
    reported and removed); a path = that folder, which must be intact. Raises PosttrainError when there is none."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).exists():
            raise PosttrainError(f"--resume {resume}: no {STATE_FILE} in that folder; it is not a posttrain "
                                 "checkpoint.")
        problem = checkpoint_problem(path)
        if problem:
            raise PosttrainError(f"--resume {resume}: the checkpoint is damaged: {problem}.")
        return path
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); removing it and falling back to an older one", path, problem)
        remove_tree_atomic(path)
    raise PosttrainError(f"--resume: no intact checkpoint under '{Path(output_dir) / 'checkpoints'}'; nothing to "
                         "resume. Start the run without --resume (add overwrite=true to replace what is there).")


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`--resume` (= "latest") picks the newest intact checkpoint in output_dir; a path picks that folder; None
    means a fresh start. (Recipes use train.run_dir.open_run, which also locks the folder.)"""
    return None if resume is None else find_resume_checkpoint(output_dir, resume)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state (optimizer, scheduler, RNG, step, extra) of a checkpoint folder."""
    return torch.load(checkpoint / STATE_FILE, weights_only=False)

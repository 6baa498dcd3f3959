"""Atomic, resumable checkpoints.

A checkpoint is a folder `<output_dir>/checkpoints/step-<N>/` holding the model in Hugging Face format (loadable by
`transformers` alone) and `trainer_state.pt` with everything else a run needs to continue exactly: optimizer,
scheduler, RNG states, data position, and the step. The folder is written under a temporary name and renamed into
place, so a run killed at any instant leaves either a complete checkpoint or none; `latest_checkpoint` only ever
sees complete ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.pt"


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step}) + "\n")
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under output_dir, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`--resume` (= "latest") picks the newest complete checkpoint in output_dir; a path picks that folder."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        from posttrain.errors import PosttrainError

        raise PosttrainError(f"--resume {resume}: no {STATE_FILE} in that folder; it is not a posttrain checkpoint.")
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The training state (step, optimizer, scheduler, RNG, extras) saved in a checkpoint."""
    return torch.load(checkpoint / STATE_FILE, weights_only=False)

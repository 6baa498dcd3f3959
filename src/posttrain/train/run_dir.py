"""One run per output folder: a lock, a refusal to mix two runs, the resume checkpoint, a clean start and Ctrl-C.

`open_run(output_dir, resume=..., overwrite=..., d=...)` is called by every training recipe after its data has been
read and validated and before the model is loaded. On the main process it
1. checks that the folder can be written (a clear error for a path under a file, a read-only place, /proc...);
2. takes an exclusive lock (`<output_dir>/.lock`, flock: released by the kernel when the process dies, so a killed
   run never leaves a stale lock); a second live run into the same folder is refused with the holder's pid;
3. removes what killed runs leave behind: temporary checkpoint folders, half-deleted ones, temporary files
   (an interrupted replace of a folder is rolled back to the old complete one);
4. refuses a folder that holds another run's checkpoints or final model unless the user resumes it (`--resume`) or
   asks to replace it (`overwrite=true`, which deletes that run's checkpoints, final model and logs first);
5. resolves `--resume` to the newest intact checkpoint (train.checkpoint.find_resume_checkpoint: damaged ones are
   skipped with a warning; none at all is an error), and deletes checkpoints newer than it (an abandoned future).
The decision is shared with the other ranks, which fail too when the main process refuses.

The returned `Run` also turns the first Ctrl-C (SIGINT) into a request: `run.stop_requested()` (identical on every
rank) tells the loop to save a checkpoint at the step it just finished and stop (exit 130); a second Ctrl-C
interrupts at once. `run.close()` (also done by `close_runs()`, which train.distributed.run_distributed calls when
a recipe returns or raises) releases the lock and restores the SIGINT handler.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, PosttrainError
from posttrain.train.checkpoint import (
    clean_partial_writes,
    find_resume_checkpoint,
    list_checkpoints,
    remove_tree_atomic,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_open_runs: list[Run] = []
# What a run writes into its folder (besides the lock): a fresh run with overwrite=true deletes these.
RUN_OUTPUTS = ("checkpoints", "final", "model", "metrics.jsonl", "tensorboard", "config.json", "eval.json",
               "loss.png", "samples.png")


class Run:
    """A claimed output folder; see the module docstring."""

    def __init__(self, output_dir: Path, checkpoint: Path | None, lock_fd: int | None, d: Any, created: bool = False):
        self.output_dir, self.checkpoint, self._lock_fd, self.d = output_dir, checkpoint, lock_fd, d
        self._created = created  # this run made the folder: it removes it again if it never wrote anything
        self._stop = threading.Event()
        self._previous_handler: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        _open_runs.append(self)

    def _on_sigint(self, signum, frame) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self._stop.set()
        log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to stop at once)")

    def stop_requested(self) -> bool:
        """True once Ctrl-C was pressed on any rank (a collective call when several processes run)."""
        flag = 1.0 if self._stop.is_set() else 0.0
        if self.d is not None and getattr(self.d, "enabled", False):
            from posttrain.train.distributed import all_reduce_sum

            flag = all_reduce_sum(flag, self.d)
        return flag > 0

    def close(self) -> None:
        """Release the lock and restore the previous SIGINT handler (idempotent). A folder this run created and
        never wrote into (it failed before its first output) is removed, so a refused run leaves nothing behind."""
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
        if self._lock_fd is not None:
            _discard_if_unused(self.output_dir, self._created)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
        if self in _open_runs:
            _open_runs.remove(self)


def close_runs() -> None:
    """Close every Run this process opened (called when a recipe returns or raises)."""
    while _open_runs:
        _open_runs[-1].close()


def _writable_error(output_dir: Path, e: OSError) -> ConfigError:
    reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "it exists and is not a folder", errno.ENOSPC: "no space left on device"}.get(
                  e.errno or 0, e.strerror or str(e))
    return ConfigError(f"key 'output_dir': cannot write to '{output_dir}': {reason}. Choose a folder you can write.")


def _discard_if_unused(output_dir: Path, created: bool) -> None:
    if created:
        try:
            if [p.name for p in output_dir.iterdir()] == [LOCK_FILE]:
                (output_dir / LOCK_FILE).unlink()
                output_dir.rmdir()
        except OSError:
            pass


def _lock(output_dir: Path) -> tuple[int, bool]:
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not output_dir.is_dir():
            raise NotADirectoryError(errno.EEXIST, "not a folder")
        fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _writable_error(output_dir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)  # (a folder another run holds was not created by this one)
        raise ConfigError(f"key 'output_dir': '{output_dir}' is in use by another run (pid {holder}). Wait for it "
                          "to finish, or choose another output_dir.") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise _writable_error(output_dir, e) from None
    return fd, created


def previous_run(output_dir: Path) -> str | None:
    """A description of another run's results in `output_dir` (checkpoints, final model), or None."""
    found = []
    steps = list_checkpoints(output_dir)
    if steps:
        found.append(f"checkpoints up to {steps[-1].name}")
    for name in ("final", "model"):
        if (output_dir / name).is_dir():
            found.append(f"a {name}/ folder")
    return " and ".join(found) or None


def _claim(output_dir: Path, resume: str | None, overwrite: bool) -> tuple[int, Path | None, bool]:
    fd, created = _lock(output_dir)
    try:
        for path in clean_partial_writes(output_dir):
            log.warning("removed %s, left by a run that was killed while writing", path)
        checkpoint = None
        if resume is not None:
            checkpoint = find_resume_checkpoint(output_dir, resume)
            for newer in list_checkpoints(output_dir):
                if int(newer.name.split("-")[-1]) > int(checkpoint.name.split("-")[-1]) and \
                        newer.parent == checkpoint.parent:
                    log.warning("removing %s: it is newer than the checkpoint this run resumes from", newer)
                    remove_tree_atomic(newer)
        else:
            other = previous_run(output_dir)
            if other and not overwrite:
                raise ConfigError(
                    f"key 'output_dir': '{output_dir}' holds another run ({other}). Resume it with --resume, pass "
                    "overwrite=true to delete it and start over, or choose another output_dir.")
            if other:
                log.warning("overwrite=true: deleting the previous run in %s (%s)", output_dir, other)
            if overwrite:
                for name in RUN_OUTPUTS:
                    path = output_dir / name
                    if path.is_dir():
                        remove_tree_atomic(path)
                    elif path.exists():
                        path.unlink()
        return fd, checkpoint, created
    except BaseException:
        _discard_if_unused(output_dir, created)
        os.close(fd)
        raise


def open_run(output_dir: str | Path, *, resume: str | None, overwrite: bool = False, d: Any = None) -> Run:
    """Claim `output_dir` for this run; see the module docstring. `d`: the recipe's Dist (None: one process)."""
    output_dir = Path(output_dir)
    main = d is None or getattr(d, "is_main", True)
    fd, checkpoint, error, created = None, None, None, False
    if main:
        try:
            fd, checkpoint, created = _claim(output_dir, resume, overwrite)
        except PosttrainError as e:
            error = e
    if d is not None and getattr(d, "enabled", False):
        import torch
        import torch.distributed as dist

        from posttrain.train.distributed import all_reduce_sum

        if all_reduce_sum(0.0 if error is None else 1.0, d) > 0:
            if error is not None:
                raise error
            raise PosttrainError(f"the main process refused output_dir '{output_dir}' (see its message)")
        chosen = [str(checkpoint) if checkpoint is not None else ""]
        dist.broadcast_object_list(chosen, src=0, device=d.device if d.device.type == "cuda" else torch.device("cpu"))
        checkpoint = Path(chosen[0]) if chosen[0] else None
    elif error is not None:
        raise error
    return Run(output_dir, checkpoint, fd, d, created)



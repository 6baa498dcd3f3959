"""Files written atomically: under a temporary name, fsynced, then renamed into place, so a process killed at any
instant leaves the old file (or folder) or the new one, never a half-written one. A full disk raises DiskFullError
and leaves what was there before."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from posttrain.errors import DiskFullError, PosttrainError


def _is_disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed write failed for lack of space. torch.save reports ENOSPC as an iostream or zip-position
    RuntimeError, so a failure while the file system is (nearly) full counts too; call this before the partial
    output is removed."""
    for error in (e, e.__cause__, e.__context__):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    if "no space left" in str(e).lower():
        return True
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(where)
        return usage.free < max(1 << 20, usage.total // 200)
    return False


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
    except BaseException as e:
        full = isinstance(e, Exception) and not isinstance(e, PosttrainError) and _is_disk_full(e, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(f"no space left on device while writing '{final}'; it was not written and the "
                                "earlier checkpoints are kept. Free some space and resume with --resume.") from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file (UTF-8) under a temporary name and rename it into place; on failure the temporary file is
    removed and `path` is left as it was (a full disk raises DiskFullError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, OSError) and _is_disk_full(e, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"no space left on device while writing '{path}'; it was not written.") from e
        raise


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

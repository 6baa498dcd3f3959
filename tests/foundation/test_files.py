"""posttrain.files: a file is replaced whole or not at all, and a full disk is named."""

import errno
import json
import os

import pytest

from posttrain import files
from posttrain.data.preference import write_jsonl
from posttrain.errors import DiskFullError


def test_atomic_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    files.atomic_write_text(path, "first\n")
    files.atomic_write_text(path, "second: é ✓\n")  # UTF-8 whatever the locale
    assert path.read_text(encoding="utf-8") == "second: é ✓\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("code, error", [(errno.EIO, OSError), (errno.ENOSPC, DiskFullError)])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, code, error):
    path = tmp_path / "out.txt"
    path.write_text("old\n")

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(error) as caught:
        files.atomic_write_text(path, "new\n")
    if error is DiskFullError:
        assert "out.txt" in str(caught.value) and "no space left" in str(caught.value)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_jsonl_writes_every_row_through_a_temporary_file(tmp_path, monkeypatch):
    rows = [{"prompt": "Wie heißt du?", "chosen": "Pico ✓"}, {"prompt": "b", "chosen": "c"}]
    written = []
    real = files.os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (written.append((a, b)), real(a, b)))
    path = write_jsonl(rows, tmp_path / "pairs.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert len(written) == 1 and written[0][1] == path and str(written[0][0]).endswith(f".tmp-{os.getpid()}")

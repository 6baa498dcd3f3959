"""Shared fixture of the sandbox tests: no process of a sandbox may outlive it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from posttrain.rewards import sandbox as sb


def _sandbox_processes() -> list[int]:
    """Live (non-zombie) PIDs whose uid lies in this process's block of fresh sandbox uids (root only)."""
    low = sb._UID_BASE + (os.getpid() % 100_000) * 1000
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if low <= uid < low + 1000 and state != "Z":
                pids.append(int(entry))
    return pids


@pytest.fixture
def no_leftovers():
    yield
    if os.geteuid() != 0:
        return
    deadline = time.monotonic() + 2.0  # the kernel reaps a dead namespace asynchronously
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _sandbox_processes() == [], "processes of the sandbox outlived it"

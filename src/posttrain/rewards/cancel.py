"""Cancelling a reward call's work: a token that the guard (guard.py) sets when it gives up on a call.

The guard runs each reward call in a thread inside `cancel_scope(token)`. Code that starts work which outlives a
Python frame (the sandbox's processes, run_many's queue) reads `current_token()` and stops when it is cancelled:
the sandbox kills its processes within one poll interval and starts no new ones. Threads that run jobs for the
call (run_many's pool) inherit the token through `contextvars.copy_context()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator


class CancelToken:
    """Set once; read from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask every piece of work started under this token to stop."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("posttrain_cancel", default=None)


def current_token() -> CancelToken | None:
    """The token of the reward call running in this context, if any."""
    return _current.get()


@contextlib.contextmanager
def cancel_scope(token: CancelToken) -> Iterator[CancelToken]:
    """Run the body with `token` as the current token (in this thread's context)."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)

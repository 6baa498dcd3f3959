"""A free TCP port on localhost for a torchrun rendezvous (`tests/` is on sys.path through its conftest.py)."""

import socket


def free_port() -> int:
    """A port the OS reports free right now (bound to 127.0.0.1:0, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

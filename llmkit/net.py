"""Loopback networking shared by the tensor-parallel workers and the server launcher."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

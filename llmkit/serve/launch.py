"""Run an OpenAI-compatible server as a child process for the length of a block (recipes'
bench steps, benchmark scripts)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import LlmkitError


@dataclass(frozen=True, slots=True)
class Launched:
    url: str  # http://127.0.0.1:PORT
    startup_s: float  # from the process start to the first /health 200


def llmkit_serve_command(model: Path, port: int) -> list[str]:
    command = [sys.executable, "-m", "llmkit", "serve", str(model), "--port", str(port)]
    return [*command, "--log-level", "warning"]


@contextlib.contextmanager
def launched(
    command: list[str], port: int, env: dict | None = None, log=None, timeout_s: float = 600
) -> Iterator[Launched]:
    """Start `command` (a server listening on `port`), wait for /health 200, yield; then
    SIGTERM it (killed if it has not exited after 60 s)."""
    out = log if log is not None else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, timeout_s)
        yield Launched(url, time.perf_counter() - start)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LlmkitError(f"the server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health") as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise LlmkitError(f"the server was not ready within {timeout_s:.0f} s")

"""Run a benchmark's child process and measure it: shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path


def run_child(
    command: list[str], env: dict | None = None, cwd: Path | None = None
) -> tuple[str, float, int]:
    """(stdout, wall seconds, peak RSS bytes) of a child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=cwd
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command[:4])} failed:\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss * 1024

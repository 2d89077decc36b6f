"""Run a benchmark's child process and measure it: shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class TimedOut(Exception):
    """The child ran past its time limit and was stopped: it needs more than `seconds`."""

    def __init__(self, seconds: float):
        super().__init__(f"stopped after {seconds:.0f} s")
        self.seconds = seconds


def run_child(
    command: list[str],
    env: dict | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> tuple[str, float, int]:
    """(stdout, wall seconds, peak RSS bytes) of a child process. Past `timeout` seconds the
    child and everything it started are killed and TimedOut is raised."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
        expired = threading.Event()

        def stop() -> None:
            expired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if timer:
            timer.cancel()
        if expired.is_set():
            raise TimedOut(wall)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command[:4])} failed:\n{err.read()[-3000:]}")
        return out.read(), wall, usage.ru_maxrss * 1024


def llmkit_quantize(src: Path, out: Path, method: str, *options: str) -> tuple[dict, float, int]:
    """`llmkit quantize SRC OUT --method METHOD OPTIONS --json` as a child process:
    (its JSON report, wall seconds, peak RSS bytes)."""
    command = [sys.executable, "-m", "llmkit", "quantize", str(src), str(out), "--method", method]
    stdout, wall, peak = run_child([*command, *options, "--json"])
    return json.loads(stdout), wall, peak


def timed_cp(src: Path, dst: Path) -> float:
    """Seconds of `cp -r SRC DST` after a `sync` (so it inherits no one's dirty pages)."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def against_cp(
    tool: str,
    sizes: tuple[int, int],
    cp_s: list[float],
    tool_s: list[float],
    wall_s: list[float],
    rss: list[int],
    target: float,
) -> dict:
    """Medians of runs that alternated `cp` with `tool` on a checkpoint of `sizes` (weight
    bytes, largest tensor bytes), the throughput ratio over pairs (each pair ran back to back,
    under the same load from the rest of the machine), and the two targets' verdicts."""
    weight_bytes, largest = sizes
    cp_med, tool_med = statistics.median(cp_s), statistics.median(tool_s)
    ratio = statistics.median(c / t for c, t in zip(cp_s, tool_s, strict=True))
    bound = 2 * largest + 300e6
    return {
        "source_bytes": weight_bytes,
        "largest_tensor_bytes": largest,
        "cp_seconds": cp_med,
        f"{tool}_seconds": tool_med,
        "command_wall_seconds": statistics.median(wall_s),
        "cp_gb_per_s": weight_bytes / cp_med / 1e9,
        f"{tool}_gb_per_s": weight_bytes / tool_med / 1e9,
        "throughput_ratio": ratio,
        "wall_ratio": cp_med / statistics.median(wall_s),
        "runs": {"cp_seconds": cp_s, f"{tool}_seconds": tool_s},
        "peak_rss_bytes": max(rss),
        "rss_bound_bytes": bound,
        "throughput_target": target,
        "throughput_target_met": ratio >= target,
        "rss_target_met": max(rss) <= bound,
    }


def against_cp_rows(name: str, tool: str, result: dict) -> list[dict]:
    """RESULTS.md's rows for one `against_cp` result: throughput against cp (the median of
    the pairs' ratios, their spread), and peak RSS against its bound."""
    from report import row

    runs = result["runs"]
    pairs = [c / t for c, t in zip(runs["cp_seconds"], runs[f"{tool}_seconds"], strict=True)]
    target = result["throughput_target"]
    rss, bound = result["peak_rss_bytes"] / 1e6, result["rss_bound_bytes"] / 1e6
    return [
        row(
            f"{name}, GB of source per second ({len(pairs)} pairs; ratio: median of the pairs', "
            f"{min(pairs):.2f}-{max(pairs):.2f})",
            f"{result[f'{tool}_gb_per_s']:.2f} GB/s",
            f"{result['cp_gb_per_s']:.2f} GB/s",
            result["throughput_ratio"],
            f"≥ {target}×",
            result["throughput_target_met"],
        ),
        row(
            f"{name}, peak RSS against 2 × largest tensor + 300 MB",
            f"{rss:.0f} MB",
            f"bound {bound:.0f} MB",
            None,
            "≤ bound",
            result["rss_target_met"],
        ),
    ]

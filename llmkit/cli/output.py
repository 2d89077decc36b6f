"""Terminal output shared by all commands: JSON, errors, sizes, progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from llmkit.checkpoint.writer import ProgressFn

# Piped output is read by people in logs, not cut to an 80-column default.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, soft_wrap=True)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: str) -> None:
    """One red line on stderr (soft wrap: never broken across lines by Rich)."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def human_bytes(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num) < 1000 or unit == "TB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000
    raise AssertionError("unreachable")


def human_count(num: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num >= scale:
            return f"{num / scale:.1f}{unit}"
    return str(num)


@contextmanager
def byte_progress(description: str, quiet: bool = False) -> Iterator[ProgressFn]:
    """A Rich bar fed with (done, total) bytes; silent when quiet or stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)

"""Terminal output shared by all commands: JSON, errors, sizes, progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

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


class _AmountColumn(ProgressColumn):
    """'12.3/45.6 MB' for byte tasks, '3/12 layers' for counted ones."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        total = "?" if task.total is None else task.total
        if unit == "bytes":
            done = human_bytes(task.completed)
            return Text(f"{done}/{human_bytes(total) if task.total else '?'}")
        return Text(f"{int(task.completed)}/{total} {unit}")


@contextmanager
def progress_bars(quiet: bool = False) -> Iterator[Callable[[str, str], ProgressFn]]:
    """Yields `task(description, unit)` -> a (done, total) callback feeding a Rich bar.
    Silent when quiet or when stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        yield lambda description, unit="bytes": lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        _AmountColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:

        def task(description: str, unit: str = "bytes") -> ProgressFn:
            task_id = bar.add_task(description, total=None, unit=unit)
            return lambda done, total: bar.update(task_id, completed=done, total=total)

        yield task


@contextmanager
def byte_progress(description: str, quiet: bool = False) -> Iterator[ProgressFn]:
    """One byte-counting bar (see progress_bars)."""
    with progress_bars(quiet) as task:
        yield task(description)

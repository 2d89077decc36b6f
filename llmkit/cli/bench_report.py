"""What every `llmkit bench` command ends with: the JSON report (--output, --json) and its
CI thresholds (--assert, exit 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmkit.bench import asserts
from llmkit.cli.output import print_error, print_json

AssertOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--assert",
        help='Fail with exit 3 unless it holds, e.g. "output_throughput>=100" (repeatable).',
    ),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the result JSON here (always).")
]


def finish(
    report: dict,
    labelled: list[tuple[str, dict]],
    thresholds: list[asserts.Threshold],
    output: Path | None,
    json_out: bool,
) -> None:
    """Check the thresholds against each labelled result, record them in the report, write
    it (atomically) and print it as asked; exit 3 if any was missed."""
    missed = asserts.misses(thresholds, labelled)
    if thresholds:
        report["asserts"] = {"checked": [str(t) for t in thresholds], "missed": missed}
    if output is not None:
        from llmkit.checkpoint.atomic import atomic_output_file

        with atomic_output_file(output) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if json_out:
        print_json(report)
    for line in missed:
        print_error(f"threshold missed: {line}")
    if missed:
        raise typer.Exit(asserts.THRESHOLD_MISSED)


def ms_cell(value: float | None) -> str:
    """A latency for a table: one decimal, or - when there were no samples."""
    return "-" if value is None else f"{value:.1f}"

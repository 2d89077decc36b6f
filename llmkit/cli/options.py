"""Options shared by several commands, defined once as Annotated aliases."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer


def default(fn: Callable, name: str) -> Any:
    """The default of `fn`'s parameter `name`: the library owns defaults, the CLI reads them."""
    return inspect.signature(fn).parameters[name].default


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON report on stdout and no progress bars.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")
]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Branch, tag or commit, for hub ids.")
]
MaxShardSizeOpt = Annotated[
    str, typer.Option("--max-shard-size", help="Largest safetensors file, e.g. 5GB or 500MB.")
]
SourceArg = Annotated[
    str, typer.Argument(help="Checkpoint directory, or a hub id like org/name.", show_default=False)
]
OutArg = Annotated[Path, typer.Argument(help="Output directory (must not exist, or be empty).")]

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

# Where text comes from, shared by calibration (quantize) and evaluation (bench quality).
DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        help="'builtin' (offline generated English), a .txt/.jsonl/.parquet file, "
        "or a hub dataset id.",
    ),
]
DatasetConfigOpt = Annotated[
    str | None, typer.Option("--dataset-config", help="Hub dataset configuration name.")
]
DatasetSplitOpt = Annotated[str, typer.Option("--dataset-split", help="Hub dataset split.")]
TextColumnOpt = Annotated[
    str, typer.Option("--text-column", help="Column (or .jsonl field) holding the text.")
]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window, BOS included.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")]

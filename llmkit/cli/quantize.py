"""`llmkit quantize`: convert a checkpoint with one method and write it in a standard format."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from llmkit.cli.options import (
    JsonOpt,
    MaxShardSizeOpt,
    OutArg,
    OverwriteOpt,
    RevisionOpt,
    SourceArg,
    default,
)
from llmkit.cli.output import byte_progress, human_bytes, print_json, stderr, stdout
from llmkit.quant.pipeline import METHODS
from llmkit.quant.pipeline import quantize as run_quantize

MethodName = Literal[METHODS]


def quantize(
    src: SourceArg,
    out: OutArg,
    method: Annotated[MethodName, typer.Option(help="Quantization method.", show_default=False)],
    clamp: Annotated[
        bool, typer.Option("--clamp", help="Saturate values beyond fp16's range, don't refuse.")
    ] = default(run_quantize, "clamp"),
    max_shard_size: MaxShardSizeOpt = default(run_quantize, "max_shard_size"),
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Quantize SRC into OUT (fp16 and bf16 are streaming casts)."""
    with byte_progress(f"quantize {method}", quiet=json_out) as progress:
        report = run_quantize(
            src,
            out,
            method,
            clamp=clamp,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            revision=revision,
            progress=progress,
        )
    if json_out:
        print_json(report.to_dict())
        return
    for name, count in report.clamped.items():
        stderr.print(f"[yellow]warning:[/] clamped {count} values of {name}", highlight=False)
    stdout.print(
        f"wrote {report.output} ({report.method}): {report.num_tensors} tensors, "
        f"{report.num_converted} converted, {human_bytes(report.bytes_in)} -> "
        f"{human_bytes(report.bytes_out)} in {len(report.shards)} file(s), {report.seconds:.1f}s"
    )

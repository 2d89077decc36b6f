"""`llmkit init`: write a random-init checkpoint of a preset shape."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from llmkit.checkpoint.init import DTYPES, PRESETS, init_checkpoint
from llmkit.cli.options import JsonOpt, OutArg, OverwriteOpt, default
from llmkit.cli.output import byte_progress, human_bytes, print_json, stdout

PresetName = Literal[tuple(PRESETS)]
DtypeName = Literal[DTYPES]


def init(
    out: OutArg,
    preset: Annotated[PresetName, typer.Option(help="Model shape.", show_default=False)],
    seed: Annotated[int, typer.Option(help="Random seed.")] = default(init_checkpoint, "seed"),
    dtype: Annotated[DtypeName, typer.Option(help="Weight dtype.")] = default(
        init_checkpoint, "dtype"
    ),
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a random-init Hugging Face checkpoint with an offline-trained tokenizer."""
    with byte_progress(f"init {preset}", quiet=json_out) as progress:
        written = init_checkpoint(out, preset, seed, dtype, overwrite, progress)
    if json_out:
        print_json(
            {
                "output": str(written.path),
                "preset": preset,
                "seed": seed,
                "dtype": dtype,
                "num_tensors": written.num_tensors,
                "bytes": written.total_bytes,
            }
        )
        return
    stdout.print(
        f"wrote {preset} ({written.num_tensors} tensors, {human_bytes(written.total_bytes)}, "
        f"seed {seed}) to {written.path}"
    )

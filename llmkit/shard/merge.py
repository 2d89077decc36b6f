"""`llmkit shard merge`: a sharded directory back to a plain Hugging Face checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from llmkit.checkpoint.manifest import read_manifest
from llmkit.checkpoint.reader import row_chunks
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.sources import ShardedSource
from llmkit.checkpoint.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ProgressFn,
    WrittenCheckpoint,
    write_checkpoint,
)


def merge(
    sharded: str | Path,
    out: str | Path,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> WrittenCheckpoint:
    """Write the checkpoint `sharded` was cut from (tensor for tensor, bit-exact) into `out`."""
    directory = Path(sharded)
    source = ShardedSource(directory, read_manifest(directory))
    try:
        specs = [
            TensorSpec(name, meta[0], meta[1], _chunks(source, name))
            for name, meta in source.tensors.items()
        ]
        return write_checkpoint(
            Path(out),
            specs,
            source.config,
            aux_from=directory,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
        )
    finally:
        source.close()


def _chunks(source: ShardedSource, name: str) -> Callable[[], Iterator[np.ndarray]]:
    def chunks() -> Iterator[np.ndarray]:
        for _, rows in row_chunks(partial(source.read_rows, name), *source.tensors[name]):
            yield rows

    return chunks

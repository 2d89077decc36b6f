"""What a quantize run writes and reports: its report, lazily cast tensors, and the spill of
each layer's tensors inside the temporary output before the final shards are assembled."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.atomic import atomic_output_dir
from llmkit.checkpoint.reader import Checkpoint
from llmkit.checkpoint.safetensors_io import (
    TensorInfo,
    TensorSpec,
    file_layout,
    read_header,
    write_file,
)
from llmkit.checkpoint.writer import ProgressFn, fill_checkpoint_dir

CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})
_SPILL = ".llmkit-layers"


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    """What a quantize run did, for the terminal and for `--json`."""

    output: str
    method: str
    num_tensors: int
    num_converted: int
    bytes_in: int
    bytes_out: int
    shards: tuple[str, ...]
    seconds: float
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0  # resident memory when the work began (imports done)
    peak_device_bytes: int = 0  # CUDA: the most memory torch held on the device at once
    num_layers: int = 0
    calibration_samples: int = 0
    device: str = "cpu"
    clamped: dict[str, int] = field(default_factory=dict)
    layer_errors: list[dict] = field(default_factory=list)  # gptq: relative output error
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cast_spec(
    ck: Checkpoint, info: TensorInfo, target: str, clamp: bool, clamped: dict[str, int]
) -> TensorSpec:
    """A lazily read tensor, cast to `target` if it is floating point (else copied)."""
    if info.dtype not in CASTABLE or info.dtype == target:
        return TensorSpec(info.name, info.dtype, info.shape, lambda: ck.iter_row_chunks(info.name))
    return TensorSpec(
        info.name, target, info.shape, lambda: _cast_chunks(ck, info.name, target, clamp, clamped)
    )


def _cast_chunks(
    ck: Checkpoint, name: str, target: str, clamp: bool, clamped: dict[str, int]
) -> Iterator:
    from llmkit.quant.fp16 import checked_cast

    dtype = dtypes.to_torch(target)
    for chunk in ck.iter_row_chunks(name):
        yield checked_cast(
            name,
            chunk,
            dtype,
            "use --method bf16, or pass --clamp to saturate them",
            clamp,
            clamped,
        )


def spill(directory: Path, groups: Iterator[tuple[str, dict]]) -> Checkpoint:
    """Write each (file stem, {name: tensor}) group to its own safetensors file in `directory`
    as it arrives; returns a lazy reader over all of them."""
    directory.mkdir()
    tensors: dict[str, TensorInfo] = {}
    for stem, group in groups:
        path = directory / f"{stem}.safetensors"
        write_file(path, file_layout([tensor_spec(name, t) for name, t in group.items()]), {})
        del group  # written: not held while the next group is computed
        tensors.update(read_header(path)[0])
    return Checkpoint(directory, {}, tensors, "safetensors")


def tensor_spec(name: str, tensor: object) -> TensorSpec:
    """A spec for a tensor already in memory."""
    return TensorSpec(name, dtypes.from_torch(tensor.dtype), tuple(tensor.shape), lambda: [tensor])


def write_with_spill(
    out: Path,
    overwrite: bool,
    groups: Callable[[], Iterator[tuple[str, dict]]],
    assemble: Callable[[Checkpoint], tuple[list[TensorSpec], dict, dict]],
    aux_from: Path,
    max_shard_size: str | int,
    progress: ProgressFn | None,
):
    """Spill `groups()` inside the temporary output, then write `assemble(spilled)`'s
    (specs, config, extra files) as the checkpoint; the spill files never reach `out`."""
    with atomic_output_dir(out, overwrite, (aux_from,)) as tmp:
        with spill(tmp / _SPILL, groups()) as spilled:
            specs, config, extra = assemble(spilled)
            written = fill_checkpoint_dir(
                tmp,
                specs,
                config,
                aux_from,
                extra_files=extra,
                max_shard_size=max_shard_size,
                progress=progress,
            )
        shutil.rmtree(tmp / _SPILL)
    return written

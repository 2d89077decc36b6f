"""Apply a quantization method to a whole checkpoint: read lazily, convert, write atomically.

Casts (fp16, bf16) stream tensor by tensor. Integer methods (int8, w8a8, rtn) produce each
decoder layer's tensors in turn, data-free or calibrated one layer at a time, spill them to a
file per layer inside the temporary output, and then assemble the final shards, so memory
stays at about one layer whatever the model's size.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.atomic import atomic_output_dir, check_output_dir
from llmkit.checkpoint.reader import Checkpoint, open_checkpoint
from llmkit.checkpoint.safetensors_io import (
    TensorInfo,
    TensorSpec,
    file_layout,
    read_header,
    write_file,
)
from llmkit.checkpoint.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ProgressFn,
    fill_checkpoint_dir,
    parse_size,
    write_checkpoint,
)
from llmkit.errors import LlmkitError
from llmkit.memory import peak_rss
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import INTEGER_METHODS, QuantOptions

CAST_METHODS = {"fp16": "F16", "bf16": "BF16"}
METHODS = (*CAST_METHODS, *INTEGER_METHODS)
_CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})
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


def quantize(
    src: str | Path,
    out: str | Path,
    method: str,
    *,
    options: QuantOptions = QuantOptions(),
    calibration: CalibrationSpec = CalibrationSpec(),
    device: str = "auto",
    clamp: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    on_layer: ProgressFn | None = None,
) -> QuantizeReport:
    """Convert checkpoint `src` with `method` and write it to `out`."""
    if method not in METHODS:
        raise LlmkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    parse_size(max_shard_size)
    with open_checkpoint(src, revision) as ck:
        _check_source(ck, Path(out))
        if method in CAST_METHODS:
            return _cast(ck, Path(out), method, clamp, max_shard_size, overwrite, progress)
        from llmkit.quant.integer import quantize_integer

        return quantize_integer(
            ck,
            Path(out),
            method,
            options,
            calibration,
            device,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            on_layer=on_layer,
        )


def _check_source(ck: Checkpoint, out: Path) -> None:
    check_output_dir(out, overwrite=True, sources=(ck.path,))  # before any work
    if ck.quantization_config:
        method = ck.quantization_config.get("quant_method", "unknown")
        raise LlmkitError(
            f"{ck.path} is already quantized ({method}); quantize from a full-precision checkpoint"
        )


def _cast(
    ck: Checkpoint,
    out: Path,
    method: str,
    clamp: bool,
    max_shard_size: str | int,
    overwrite: bool,
    progress: ProgressFn | None,
) -> QuantizeReport:
    import llmkit.quant.fp16  # noqa: F401  (imports torch before the clock starts)

    start = time.perf_counter()
    target = CAST_METHODS[method]
    clamped: dict[str, int] = {}
    specs = [cast_spec(ck, info, target, clamp, clamped) for info in ck.tensors.values()]
    config = dict(ck.config)
    config["torch_dtype"] = config["dtype"] = dtypes.torch_name(target)
    written = write_checkpoint(
        out,
        specs,
        config,
        aux_from=ck.path,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
    )
    return QuantizeReport(
        output=str(written.path),
        method=method,
        num_tensors=len(specs),
        num_converted=sum(info.dtype in _CASTABLE for info in ck.tensors.values()),
        bytes_in=sum(info.nbytes for info in ck.tensors.values()),
        bytes_out=written.total_bytes,
        shards=written.shards,
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_bytes=peak_rss(),
        clamped=clamped,
    )


def cast_spec(
    ck: Checkpoint, info: TensorInfo, target: str, clamp: bool, clamped: dict[str, int]
) -> TensorSpec:
    """A lazily read tensor, cast to `target` if it is floating point (else copied)."""
    if info.dtype not in _CASTABLE or info.dtype == target:
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

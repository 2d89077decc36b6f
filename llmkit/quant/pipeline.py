"""Apply a quantization method to a whole checkpoint: read lazily, convert, write atomically."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.reader import Checkpoint, open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorInfo, TensorSpec
from llmkit.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, ProgressFn, write_checkpoint
from llmkit.errors import LlmkitError

CAST_METHODS = {"fp16": "F16", "bf16": "BF16"}
METHODS = tuple(CAST_METHODS)
_CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})


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
    clamped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize(
    src: str | Path,
    out: str | Path,
    method: str,
    *,
    clamp: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> QuantizeReport:
    """Convert checkpoint `src` with `method` and write it to `out`."""
    if method not in METHODS:
        raise LlmkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    with open_checkpoint(src, revision) as ck:
        _check_source(ck, Path(out))
        return _cast(ck, Path(out), method, clamp, max_shard_size, overwrite, progress)


def _check_source(ck: Checkpoint, out: Path) -> None:
    if out.resolve() == ck.path.resolve():
        raise LlmkitError("output directory must differ from the source checkpoint")
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
    specs = [_cast_spec(ck, info, target, clamp, clamped) for info in ck.tensors.values()]
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
        clamped=clamped,
    )


def _cast_spec(
    ck: Checkpoint, info: TensorInfo, target: str, clamp: bool, clamped: dict[str, int]
) -> TensorSpec:
    if info.dtype not in _CASTABLE:
        return TensorSpec(info.name, info.dtype, info.shape, lambda: ck.iter_row_chunks(info.name))
    return TensorSpec(
        info.name, target, info.shape, lambda: _cast_chunks(ck, info.name, target, clamp, clamped)
    )


def _cast_chunks(
    ck: Checkpoint, name: str, target: str, clamp: bool, clamped: dict[str, int]
) -> Iterator:
    import torch

    from llmkit.quant.fp16 import cast

    dtype = dtypes.to_torch(target)
    for chunk in ck.iter_row_chunks(name):
        result, over = cast(chunk, dtype, clamp)
        if over and not clamp:
            raise LlmkitError(
                f"tensor {name!r} has {over} values beyond {dtypes.torch_name(target)}'s range "
                f"(|x| > {torch.finfo(dtype).max:g}, max |x| = {float(chunk.abs().max()):.6g}); "
                f"use --method bf16, or pass --clamp to saturate them"
            )
        if over:
            clamped[name] = clamped.get(name, 0) + over
        yield result

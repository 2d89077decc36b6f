"""Apply a quantization method to a whole checkpoint: read lazily, convert, write atomically.

Casts (fp16, bf16) stream tensor by tensor. Integer methods (int8, w8a8, rtn) produce each
decoder layer's tensors in turn, data-free or calibrated one layer at a time, spill them to a
file per layer inside the temporary output, and then assemble the final shards, so memory
stays at about one layer whatever the model's size.
"""

from __future__ import annotations

import time
from pathlib import Path

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.atomic import check_output_dir
from llmkit.checkpoint.reader import Checkpoint, open_checkpoint
from llmkit.checkpoint.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ProgressFn,
    parse_size,
    write_checkpoint,
)
from llmkit.errors import LlmkitError
from llmkit.memory import peak_rss
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import CAST_METHODS, METHODS, MethodOptions, check_options
from llmkit.quant.output import CASTABLE, QuantizeReport, cast_spec


def quantize(
    src: str | Path,
    out: str | Path,
    method: str,
    *,
    options: MethodOptions | None = None,
    calibration: CalibrationSpec = CalibrationSpec(),
    device: str = "auto",
    clamp: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
    on_layer: ProgressFn | None = None,
) -> QuantizeReport:
    """Convert checkpoint `src` with `method` and write it to `out`; `options` are the
    method's (`options_for`), its defaults when None."""
    if method not in METHODS:
        raise LlmkitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    options = METHODS[method].options() if options is None else options
    check_options(method, options)
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
        num_converted=sum(info.dtype in CASTABLE for info in ck.tensors.values()),
        bytes_in=sum(info.nbytes for info in ck.tensors.values()),
        bytes_out=written.total_bytes,
        shards=written.shards,
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_bytes=peak_rss(),
        clamped=clamped,
    )

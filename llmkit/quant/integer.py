"""Integer quantization of a whole checkpoint (int8, w8a8, rtn), one decoder layer at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from llmkit.arch.family import Family, family_for, is_layer_linear, num_layers
from llmkit.checkpoint import dtypes
from llmkit.checkpoint.atomic import check_output_dir
from llmkit.checkpoint.reader import Checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.writer import ProgressFn
from llmkit.devices import resolve_device
from llmkit.errors import LlmkitError
from llmkit.memory import (
    current_rss,
    peak_device_memory,
    peak_rss,
    reset_peak_device_memory,
    return_freed_memory,
)
from llmkit.quant.calibration import CalibrationSpec, calibration_ids
from llmkit.quant.methods import implementation
from llmkit.quant.methods.dense import dense_dtype, dense_tensor
from llmkit.quant.options import (
    CALIBRATED_METHODS,
    FLOAT16_METHODS,
    GPTQ_FORMAT_METHODS,
    METHODS,
    MethodOptions,
    quantizes_lm_head,
)
from llmkit.quant.output import QuantizeReport, cast_spec, write_with_spill
from llmkit.quant.sequential import build_skeleton, run_layers

LayerTensors = Iterator[tuple[int, dict[str, torch.Tensor]]]


def _check_groups(ck: Checkpoint, arch: Family, method: str, options: MethodOptions) -> None:
    """Every Linear to quantize (the lm_head too, when asked) must split its inputs into
    whole groups and pack into int32 words; checked from the headers, before any read."""
    packing = METHODS[method].packing
    if packing not in ("gptq", "awq"):
        return
    names = [n for n in ck.tensors if is_layer_linear(arch, n)]
    if quantizes_lm_head(options):
        names.append(_lm_head_source(ck, arch))
    pack = 32 // math.gcd(options.bits, 32)  # values per whole run of int32 words (3 bits: 32)
    for name in names:
        out_features, in_features = ck.tensors[name].shape
        size = in_features if options.group_size == -1 else options.group_size
        packed = out_features if packing == "awq" else in_features  # packed 32 bits wide
        if in_features % size or packed % pack:
            fits = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            raise LlmkitError(
                f"{name} has {in_features} inputs and {out_features} outputs: --group-size "
                f"{options.group_size} does not divide its inputs, or its packed dimension is not "
                f"a multiple of {pack} ({options.bits}-bit values in int32 words); group sizes "
                f"that fit: {', '.join(map(str, fits)) or 'none'} (or -1)"
            )


def quantize_integer(
    ck: Checkpoint,
    out: Path,
    method: str,
    options: MethodOptions,
    calibration: CalibrationSpec,
    device: str,
    *,
    max_shard_size: str | int,
    overwrite: bool,
    progress: ProgressFn | None,
    on_layer: ProgressFn | None,
) -> QuantizeReport:
    arch = family_for(ck.config)
    _check_groups(ck, arch, method, options)
    check_output_dir(out, overwrite, (ck.path,))  # before calibration, which can take a while
    compute = resolve_device(device)
    start = time.perf_counter()
    calibrated = method in CALIBRATED_METHODS
    # The model code is imported (~110 MB of transformers) and GPTQ's CPU kernels loaded
    # before the baseline is taken: the memory measured above it is what the quantization
    # itself holds.
    skeleton = build_skeleton(ck.config) if calibrated else None
    prepare = getattr(implementation(method), "prepare", None)
    if prepare is not None:
        prepare(compute)
    start_rss = current_rss()
    reset_peak_device_memory(compute)
    ids = _calibration_ids(ck, calibration) if calibrated else None
    layer_errors: list[dict] = []
    warnings: list[str] = []
    if ids is not None:
        quantizer = _layer_quantizer(ck, arch, method, options, layer_errors, warnings.append)
        layers = run_layers(skeleton, ck, arch, ids, quantizer, compute, torch.float32, on_layer)
    else:
        layers = _data_free_layers(ck, arch, method, options, compute, on_layer)

    def groups() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for index, tensors in layers:
            prefix = f"{arch.layers}.{index}."
            yield f"layer-{index:05d}", {prefix + name: t for name, t in tensors.items()}
            del tensors  # written: not held while the next layer is quantized
        if quantizes_lm_head(options):
            yield "lm_head", _lm_head_tensors(ck, arch, method, options)

    def assemble(spilled: Checkpoint) -> tuple[list[TensorSpec], dict, dict]:
        return _specs(ck, arch, spilled, method, options), *_configs(ck, method, options)

    written = write_with_spill(out, overwrite, groups, assemble, ck.path, max_shard_size, progress)
    quantized = [n for n in ck.tensors if is_layer_linear(arch, n)]
    return QuantizeReport(
        output=str(out.absolute()),
        method=method,
        num_tensors=written.num_tensors,
        num_converted=len(quantized) + quantizes_lm_head(options),
        bytes_in=sum(info.nbytes for info in ck.tensors.values()),
        bytes_out=written.total_bytes,
        shards=written.shards,
        seconds=round(time.perf_counter() - start, 3),
        peak_rss_bytes=peak_rss(),
        start_rss_bytes=start_rss,
        peak_device_bytes=peak_device_memory(compute),
        num_layers=num_layers(ck.config),
        calibration_samples=0 if ids is None else int(ids.shape[0]),
        device=str(compute),
        layer_errors=layer_errors,
        warnings=warnings,
    )


def _calibration_ids(ck: Checkpoint, spec: CalibrationSpec) -> torch.Tensor:
    from llmkit.checkpoint.fast_tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(ck.path)
    except (OSError, ValueError) as e:
        raise LlmkitError(f"cannot load the tokenizer in {ck.path} for calibration: {e}") from None
    if tokenizer is None:
        raise LlmkitError(f"{ck.path} has no tokenizer files, which calibration needs")
    ids = calibration_ids(tokenizer, spec)
    del tokenizer
    return_freed_memory()
    return ids


def _storage(ck: Checkpoint, name: str) -> torch.dtype:
    return dtypes.to_torch(ck.tensors[name].dtype)


def _data_free_layers(
    ck: Checkpoint,
    arch: Family,
    method: str,
    options: MethodOptions,
    compute: torch.device,
    on_layer: ProgressFn | None,
) -> LayerTensors:
    """Each layer's tensors, its Linear weights rounded and packed on `compute` (a weight
    at a time), back on the CPU to be written."""
    total, pack = num_layers(ck.config), implementation(method).pack
    for index in range(total):
        prefix = f"{arch.layers}.{index}."
        out: dict[str, torch.Tensor] = {}
        for name in [n for n in ck.tensors if n.startswith(prefix)]:
            tensor = ck.get_tensor(name)
            if is_layer_linear(arch, name):
                module = name[len(prefix) :].removesuffix(".weight")
                packed = pack(options, tensor.to(compute).float(), _storage(ck, name))
                out.update({f"{module}.{k}": v.cpu() for k, v in packed.items()})
            else:
                out[name[len(prefix) :]] = dense_tensor(name, tensor, method, tensor.dtype)
        if on_layer is not None:
            on_layer(index + 1, total)
        yield index, out


def _layer_quantizer(ck, arch, method, options, layer_errors, warn):
    """The LayerQuantizer of a calibrated method."""
    storage = {name: _storage(ck, name) for name in ck.tensors}
    return implementation(method).layer_quantizer(arch, options, storage, layer_errors, warn)


def _lm_head_source(ck: Checkpoint, arch: Family) -> str:
    name = f"{arch.lm_head}.weight"
    return name if name in ck.tensors else f"{arch.embed}.weight"  # tied embeddings


def _lm_head_tensors(
    ck: Checkpoint, arch: Family, method: str, options: MethodOptions
) -> dict[str, torch.Tensor]:
    source = _lm_head_source(ck, arch)
    weight = ck.get_tensor(source).float()
    packed = implementation(method).pack(options, weight, _storage(ck, source))
    return {f"{arch.lm_head}.{k}": v for k, v in packed.items()}


def _specs(
    ck: Checkpoint, arch: Family, spilled: Checkpoint, method: str, options: MethodOptions
) -> list[TensorSpec]:
    """Embeddings first, then the layers, then the final norm and lm_head (HF's order)."""
    lm_head = f"{arch.lm_head}.weight"
    dense = [
        n
        for n in ck.tensors
        if not n.startswith(f"{arch.layers}.") and not (quantizes_lm_head(options) and n == lm_head)
    ]
    tail = {f"{arch.final_norm}.weight", lm_head}
    specs = [_dense_spec(ck, n, method) for n in dense if n not in tail]
    specs += [
        TensorSpec(n, info.dtype, info.shape, lambda n=n: spilled.iter_row_chunks(n))
        for n, info in spilled.tensors.items()
    ]
    return specs + [_dense_spec(ck, n, method) for n in dense if n in tail]


def _dense_spec(ck: Checkpoint, name: str, method: str) -> TensorSpec:
    info = ck.tensors[name]
    target = dtypes.from_torch(dense_dtype(method, dtypes.to_torch(info.dtype)))
    return cast_spec(ck, info, target, clamp=False, clamped={})


def _configs(ck: Checkpoint, method: str, options: MethodOptions) -> tuple[dict, dict]:
    """config.json with its quantization_config, and extra files (GPTQ's quantize_config)."""
    config = dict(ck.config)
    config["quantization_config"] = implementation(method).quantization_config(options)
    extra: dict[str, dict] = {}
    if method in FLOAT16_METHODS:
        config["torch_dtype"] = config["dtype"] = "float16"
    if method in GPTQ_FORMAT_METHODS:
        extra["quantize_config.json"] = config["quantization_config"]
    if quantizes_lm_head(options) and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # lm_head is now its own (quantized) tensor
    return config, extra

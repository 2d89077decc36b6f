"""`llmkit quantize`: convert a checkpoint with one method and write it in a standard format."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Annotated, Literal

import typer
from rich import box
from rich.table import Table

from llmkit.cli.options import (
    DatasetConfigOpt,
    DatasetOpt,
    DatasetSplitOpt,
    DeviceOpt,
    JsonOpt,
    MaxShardSizeOpt,
    OutArg,
    OverwriteOpt,
    RevisionOpt,
    SeqLenOpt,
    SourceArg,
    TextColumnOpt,
    default,
)
from llmkit.cli.output import human_bytes, print_json, progress_bars, stderr, stdout
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import METHODS, flag, option_types, options_for
from llmkit.quant.output import QuantizeReport
from llmkit.quant.pipeline import quantize as run_quantize

MethodName = Literal[tuple(METHODS)]
_CAL = CalibrationSpec


def quantize(
    src: SourceArg,
    out: OutArg,
    method: Annotated[MethodName, typer.Option(help="Quantization method.", show_default=False)],
    dataset: DatasetOpt = default(_CAL, "dataset"),
    dataset_config: DatasetConfigOpt = default(_CAL, "config"),
    dataset_split: DatasetSplitOpt = default(_CAL, "split"),
    text_column: TextColumnOpt = default(_CAL, "text_column"),
    num_samples: Annotated[
        int, typer.Option(help="Calibration windows (w8a8, gptq, awq).")
    ] = default(_CAL, "num_samples"),
    seq_len: SeqLenOpt = default(_CAL, "seq_len"),
    seed: Annotated[int, typer.Option(help="Seed for picking windows.")] = default(_CAL, "seed"),
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Wrap calibration text in the chat template.")
    ] = default(_CAL, "chat_template"),
    device: DeviceOpt = default(run_quantize, "device"),
    clamp: Annotated[
        bool, typer.Option("--clamp", help="Saturate values beyond fp16's range, don't refuse.")
    ] = default(run_quantize, "clamp"),
    max_shard_size: MaxShardSizeOpt = default(run_quantize, "max_shard_size"),
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
    **option_values,
) -> None:
    """Quantize SRC into OUT: fp16/bf16 casts, int8 (W8A16), w8a8 (SmoothQuant), rtn, gptq, awq."""
    calibration = CalibrationSpec(
        dataset,
        dataset_config,
        dataset_split,
        text_column,
        num_samples,
        seq_len,
        seed,
        chat_template,
    )
    given = {name: value for name, value in option_values.items() if value is not None}
    options = options_for(method, **given)
    with progress_bars(quiet=json_out) as task:
        report = run_quantize(
            src,
            out,
            method,
            options=options,
            calibration=calibration,
            device=device,
            clamp=clamp,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            revision=revision,
            progress=task("writing"),
            on_layer=task("layers", unit="layers"),
        )
    if json_out:
        print_json(report.to_dict())
        return
    _render(report)


def _option_parameters() -> list[inspect.Parameter]:
    """One flag per option any method takes, from the methods' options dataclasses; a flag
    not given is None, so that the method's own default applies."""
    takers: dict[str, list] = {}
    for m in METHODS.values():
        for f in fields(m.options):
            takers.setdefault(f.name, []).append((m.name, f))
    params = []
    for name, takes in takers.items():
        spec = takes[0][1]
        kind = option_types(METHODS[takes[0][0]].options)[name]
        names = [spec.metadata["flag"]] if spec.metadata["flag"] else [flag(name)]
        help = f"{spec.metadata['help']} ({_defaults(takes)})"
        info = typer.Option(*names, help=help, show_default=False)
        annotation = Annotated[kind | None, info]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation
            )
        )
    return params


def _defaults(takes: list) -> str:
    """`rtn, gptq: 4; awq: 4` collapsed to `rtn, gptq, awq; default 4`."""
    by_default: dict[str, list[str]] = {}
    for method, f in takes:
        value = {True: "on", False: "off"}.get(f.default, f.default)
        by_default.setdefault(str(value), []).append(method)
    if len(by_default) == 1:
        [(value, methods)] = by_default.items()
        return f"{', '.join(methods)}; default {value}"
    return "; ".join(f"{', '.join(ms)}: {value}" for value, ms in by_default.items())


def _with_option_flags(command):
    signature = inspect.signature(command, eval_str=True)
    fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    at = [p.name for p in fixed].index("device")  # after the calibration options
    params = fixed[:at] + _option_parameters() + fixed[at:]
    command.__signature__ = signature.replace(parameters=params)
    return command


quantize = _with_option_flags(quantize)


def _render(report: QuantizeReport) -> None:
    for name, count in report.clamped.items():
        stderr.print(f"[yellow]warning:[/] clamped {count} values of {name}", highlight=False)
    for message in report.warnings:
        stderr.print(f"[yellow]warning:[/] {message}", highlight=False)
    if report.layer_errors:
        stdout.print(_error_table(report.layer_errors))
    calibrated = (
        f", calibrated on {report.calibration_samples} samples"
        if report.calibration_samples
        else ""
    )
    gpu = (
        f", peak {report.device} memory {human_bytes(report.peak_device_bytes)}"
        if report.peak_device_bytes
        else ""
    )
    stdout.print(
        f"wrote {report.output} ({report.method}{calibrated}): {report.num_tensors} tensors, "
        f"{report.num_converted} converted, {human_bytes(report.bytes_in)} -> "
        f"{human_bytes(report.bytes_out)} in {len(report.shards)} file(s), "
        f"{report.seconds:.1f}s, peak RSS {human_bytes(report.peak_rss_bytes)}{gpu}"
    )


def _error_table(layer_errors: list[dict]) -> Table:
    """Per layer: mean and worst relative output error ||(W - Ŵ) X||² / ||W X||²."""
    table = Table(
        "layer",
        "mean error",
        "worst error",
        "worst module",
        title="Reconstruction error on the calibration inputs",
        box=box.SIMPLE,
    )
    for entry in layer_errors:
        errors = entry["modules"]
        worst = max(errors, key=errors.get)
        table.add_row(
            str(entry["layer"]),
            f"{sum(errors.values()) / len(errors):.2e}",
            f"{errors[worst]:.2e}",
            worst,
        )
    return table

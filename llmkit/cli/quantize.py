"""`llmkit quantize`: convert a checkpoint with one method and write it in a standard format."""

from __future__ import annotations

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
from llmkit.quant.options import METHODS, QuantOptions
from llmkit.quant.output import QuantizeReport
from llmkit.quant.pipeline import quantize as run_quantize

MethodName = Literal[tuple(METHODS)]
_CAL = CalibrationSpec
_OPT = QuantOptions


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
    bits: Annotated[int, typer.Option(help="Weight bits (rtn, gptq; awq: 4).")] = default(
        _OPT, "bits"
    ),
    group_size: Annotated[
        int, typer.Option(help="Inputs per scale (rtn, gptq, awq); -1 for one per output channel.")
    ] = default(_OPT, "group_size"),
    sym: Annotated[
        bool, typer.Option("--sym/--asym", help="Symmetric or asymmetric grid (rtn, gptq).")
    ] = default(_OPT, "sym"),
    smooth_alpha: Annotated[
        float, typer.Option(help="SmoothQuant migration strength (w8a8).")
    ] = default(_OPT, "smooth_alpha"),
    desc_act: Annotated[
        bool,
        typer.Option(
            "--desc-act", help="Act-order: quantize inputs by falling Hessian diagonal (gptq)."
        ),
    ] = default(_OPT, "desc_act"),
    act_group_aware: Annotated[
        bool,
        typer.Option(
            "--act-group-aware/--no-act-group-aware",
            help="Without act-order, visit important groups first; g_idx stays trivial (gptq).",
        ),
    ] = default(_OPT, "act_group_aware"),
    static_groups: Annotated[
        bool, typer.Option("--static-groups", help="Fit group scales before any update (gptq).")
    ] = default(_OPT, "static_groups"),
    clip_search: Annotated[
        bool,
        typer.Option(
            "--clip-search/--no-clip-search",
            help="Search each group's range for the least error (gptq, awq).",
        ),
    ] = default(_OPT, "clip_search"),
    damp_percent: Annotated[
        float, typer.Option(help="Hessian damping, a fraction of its mean diagonal (gptq).")
    ] = default(_OPT, "damp_percent"),
    true_sequential: Annotated[
        bool,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="Take each stage's inputs after the earlier stages are quantized (gptq).",
        ),
    ] = default(_OPT, "true_sequential"),
    awq_grid: Annotated[
        int, typer.Option(help="Scale exponents α tried by the AWQ search (awq).")
    ] = default(_OPT, "awq_grid"),
    awq_duo_scaling: Annotated[
        bool,
        typer.Option(
            "--awq-duo-scaling", help="Scales from activation and weight magnitudes (awq)."
        ),
    ] = default(_OPT, "awq_duo_scaling"),
    awq_search_tokens: Annotated[
        int, typer.Option(help="Calibration tokens each AWQ scale candidate is scored on (awq).")
    ] = default(_OPT, "awq_search_tokens"),
    quantize_lm_head: Annotated[
        bool, typer.Option("--quantize-lm-head", help="Quantize lm_head too.")
    ] = default(_OPT, "quantize_lm_head"),
    device: DeviceOpt = default(run_quantize, "device"),
    clamp: Annotated[
        bool, typer.Option("--clamp", help="Saturate values beyond fp16's range, don't refuse.")
    ] = default(run_quantize, "clamp"),
    max_shard_size: MaxShardSizeOpt = default(run_quantize, "max_shard_size"),
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
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
    options = QuantOptions(
        bits=bits,
        group_size=group_size,
        sym=sym,
        smooth_alpha=smooth_alpha,
        desc_act=desc_act,
        act_group_aware=act_group_aware,
        clip_search=clip_search,
        static_groups=static_groups,
        damp_percent=damp_percent,
        true_sequential=true_sequential,
        awq_grid=awq_grid,
        awq_duo_scaling=awq_duo_scaling,
        awq_search_tokens=awq_search_tokens,
        quantize_lm_head=quantize_lm_head,
    )
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

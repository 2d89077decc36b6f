"""`llmkit bench ...`: measure checkpoints. `quality` compares them with a reference."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from llmkit.bench import asserts
from llmkit.bench.quality import EVAL_SEED, evaluate_quality
from llmkit.cli import bench_offline, bench_serve
from llmkit.cli.bench_report import AssertOpt, OutputOpt, finish
from llmkit.cli.engine_options import with_engine_options
from llmkit.cli.options import (
    DatasetConfigOpt,
    DatasetOpt,
    DatasetSplitOpt,
    JsonOpt,
    SeqLenOpt,
    TextColumnOpt,
    default,
)
from llmkit.cli.output import print_error, progress_bars, stdout
from llmkit.quant.calibration import CalibrationSpec

app = typer.Typer(
    help="Measure checkpoints and servers: quality, serving load.", no_args_is_help=True
)
app.command("serve")(bench_serve.serve)
app.command("offline")(with_engine_options(bench_offline.offline))
app.command("compare")(bench_offline.compare)
QUALITY_METRICS = {"perplexity", "kld_mean", "kld_p99", "top1_agreement", "num_tokens"}


@app.command("quality")
def quality(
    reference: Annotated[str, typer.Argument(help="Reference checkpoint directory.")],
    candidates: Annotated[list[str], typer.Argument(help="Checkpoints to compare with it.")],
    dataset: DatasetOpt = default(CalibrationSpec, "dataset"),
    dataset_config: DatasetConfigOpt = default(CalibrationSpec, "config"),
    dataset_split: DatasetSplitOpt = "test",
    text_column: TextColumnOpt = default(CalibrationSpec, "text_column"),
    seq_len: SeqLenOpt = default(CalibrationSpec, "seq_len"),
    num_windows: Annotated[
        int, typer.Option(help="Windows to score (0: all the text holds).")
    ] = default(evaluate_quality, "num_windows"),
    engine_kernels: Annotated[
        bool,
        typer.Option(
            "--engine-kernels",
            help="Score the candidates as served, through the serving kernels (named in "
            "the report), instead of with exact dequantized arithmetic.",
        ),
    ] = False,
    assert_: AssertOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity, KL divergence from the reference and top-1 agreement, per checkpoint;
    --assert thresholds apply to each candidate."""
    thresholds = asserts.parse(assert_ or [])
    asserts.check_known(thresholds, QUALITY_METRICS)
    data = CalibrationSpec(
        dataset, dataset_config, dataset_split, text_column, seq_len=seq_len, seed=EVAL_SEED
    )
    with progress_bars(quiet=json_out) as task:
        rows = evaluate_quality(
            reference,
            candidates,
            data,
            num_windows,
            on_window=task("windows", unit="windows"),
            engine_kernels=engine_kernels,
        )
    report = {"reference": reference, "seq_len": seq_len, "rows": [r.to_dict() for r in rows]}
    if not json_out:
        _print_quality(reference, rows)
    scored = [(row["name"], row) for row in report["rows"][1:] if row["error"] is None]
    failed = [row for row in rows if row.error is not None]
    for row in failed:
        print_error(f"{row.name}: {row.error}")
    finish(report, scored, thresholds, output, json_out)
    if failed:
        raise typer.Exit(1)


def _print_quality(reference: str, rows) -> None:
    table = Table(
        "checkpoint",
        "perplexity",
        "KLD mean",
        "KLD p99",
        "top-1 agree",
        "tokens",
        title=f"quality against {reference}",
    )
    for row in rows:
        if row.error is not None:
            table.add_row(row.name, "unreadable", "-", "-", "-", "-")
            continue
        table.add_row(
            row.name,
            f"{row.perplexity:.4f}",
            f"{row.kld_mean:.6f}",
            f"{row.kld_p99:.6f}",
            f"{row.top1_agreement:.2%}",
            str(row.num_tokens),
        )
    stdout.print(table)

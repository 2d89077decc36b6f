"""`llmkit bench offline` (the engine in-process) and `llmkit bench compare` (checkpoints
side by side)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmkit.bench import asserts
from llmkit.bench.compare import CompareSpec
from llmkit.bench.offline import OfflineSpec
from llmkit.cli import engine_options as eo
from llmkit.cli.bench_report import AssertOpt, OutputOpt, finish, ms_cell
from llmkit.cli.options import (
    DatasetConfigOpt,
    DatasetOpt,
    DatasetSplitOpt,
    DeviceOpt,
    JsonOpt,
    SeqLenOpt,
    TextColumnOpt,
    default,
)
from llmkit.cli.output import human_bytes, progress_bars, stderr, stdout
from llmkit.errors import LlmkitError
from llmkit.memory import freeze_heap
from llmkit.quant.calibration import CalibrationSpec
from llmkit.runtime.engine_config import EngineConfig

CASE_METRICS = {
    "seconds", "output_throughput", "total_token_throughput", "decode_throughput",
    *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p90", "p99") for m in ("ttft", "tpot")),
}  # fmt: skip
OFFLINE_METRICS = CASE_METRICS | {"load_s", "peak_rss_mb", "kv_cache_tokens"}
OFFLINE, COMPARE = OfflineSpec(), CompareSpec()


def _joined(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


COMPARE_METRICS = {
    "size_bytes", "load_s", "peak_rss_mb", "decode_tokens_per_s", "output_throughput",
    "mean_ttft_ms", "perplexity", "kld_mean", "kld_p99", "top1_agreement",
}  # fmt: skip


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise LlmkitError(f"{name} {text!r}: give integers separated by commas") from None


def offline(
    model: Annotated[str, typer.Argument(help="Checkpoint or llmkit shard directory.")],
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Requests run at once, e.g. 1,16,64.")
    ] = _joined(OFFLINE.batch_sizes),
    input_len: Annotated[
        str, typer.Option("--input-len", help="Prompt tokens, e.g. 128,512.")
    ] = _joined(OFFLINE.input_lens),
    output_len: Annotated[
        str, typer.Option("--output-len", help="Output tokens, e.g. 128.")
    ] = _joined(OFFLINE.output_lens),
    seed: Annotated[int, typer.Option("--seed", help="Random prompt token ids.")] = OFFLINE.seed,
    lora: Annotated[
        Path | None,
        typer.Option("--lora", help="A PEFT LoRA adapter directory every request runs with."),
    ] = None,
    assert_: AssertOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
    engine: EngineConfig | None = None,
) -> None:
    """Engine throughput and latency in-process, for every batch size x input x output
    length; load time and peak memory."""
    from llmkit.bench.offline import run_offline

    freeze_heap()  # torch's modules, imported: out of the collector's full passes
    thresholds = asserts.parse(assert_ or [])
    asserts.check_known(thresholds, OFFLINE_METRICS)
    spec = OfflineSpec(
        _ints(batch_sizes, "--batch-sizes"),
        _ints(input_len, "--input-len"),
        _ints(output_len, "--output-len"),
        seed,
        None if lora is None else _adapter_dir(lora),
    )
    todo = spec.cases()
    with progress_bars(quiet=json_out) as task:
        step = task("cases", unit="cases")
        done = []
        report = run_offline(
            model, engine, spec, lambda row: (done.append(row), step(len(done), len(todo)))
        )
    top = {k: v for k, v in report.items() if k != "cases"}
    labelled = [(_case_label(c), {**top, **c}) for c in report["cases"]]
    if not json_out:
        _print_offline(report)
    finish(report, labelled, thresholds, output, json_out)


def _adapter_dir(path: Path) -> str:
    from llmkit.runtime.lora_registry import adapter_dir

    try:
        return adapter_dir(path)
    except LlmkitError as e:
        raise LlmkitError(f"--lora: {e}") from None


def _name(report: dict) -> str:
    lora = report.get("lora")
    return report["model"] if lora is None else f"{report['model']} with adapter {lora}"


def _case_label(c: dict) -> str:
    return f"batch {c['batch_size']}, in {c['input_len']}, out {c['output_len']}"


def _print_offline(report: dict) -> None:
    table = Table(
        "batch", "in", "out", "output tok/s", "total tok/s", "decode tok/s", "TTFT mean",
        "TTFT p99", "TPOT mean", "TPOT p99", title=f"{_name(report)} (latencies in ms)",
    )  # fmt: skip
    for c in report["cases"]:
        table.add_row(
            str(c["batch_size"]), str(c["input_len"]), str(c["output_len"]),
            f"{c['output_throughput']:.1f}", f"{c['total_token_throughput']:.1f}",
            f"{c['decode_throughput']:.1f}",
            *(ms_cell(c[f"{s}_{m}_ms"]) for m in ("ttft", "tpot") for s in ("mean", "p99")),
        )  # fmt: skip
    stdout.print(table)
    for c in report["cases"]:
        if "speculative" in c:
            cutoff = c.get("spec_draft_cutoff")
            stdout.print(
                f"{_case_label(c)}: speculative ({c['speculative']}) accepted "
                f"{c['spec_accepted_tokens']} of {c['spec_proposed_tokens']} draft tokens "
                f"({100 * c['spec_acceptance_rate']:.1f}%), "
                f"{c['spec_mean_accepted_length']:.2f} per draft (by position: "
                f"{', '.join(f'{rate:.2f}' for rate in c['spec_acceptance_by_position'])})"
                f"{'' if cutoff is None else f'; drafts end below a chance of {cutoff:.2f}'}",
                highlight=False,
            )
    stdout.print(
        f"load {report['load_s']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB, "
        f"KV cache {report['kv_cache_tokens']} tokens",
        highlight=False,
    )


def compare(
    checkpoints: Annotated[
        list[str], typer.Argument(help="Checkpoints; the first is the quality reference.")
    ],
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Requests at once for the throughput column.")
    ] = COMPARE.concurrency,
    input_len: Annotated[
        int, typer.Option("--input-len", help="Prompt tokens.")
    ] = COMPARE.input_len,
    output_len: Annotated[
        int, typer.Option("--output-len", help="Output tokens (>= 2).")
    ] = COMPARE.output_len,
    dataset: DatasetOpt = default(CalibrationSpec, "dataset"),
    dataset_config: DatasetConfigOpt = default(CalibrationSpec, "config"),
    dataset_split: DatasetSplitOpt = "test",
    text_column: TextColumnOpt = default(CalibrationSpec, "text_column"),
    seq_len: SeqLenOpt = default(CalibrationSpec, "seq_len"),
    num_windows: Annotated[
        int, typer.Option("--num-windows", help="Quality windows.")
    ] = COMPARE.num_windows,
    device: DeviceOpt = default(EngineConfig, "device"),
    kv_cache_memory: eo.KvCacheMemoryOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG of the table (needs matplotlib).")
    ] = None,
    assert_: AssertOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Size, load time, memory, batch-1 decode speed, throughput and quality of each
    checkpoint, side by side: one table, one JSON, one PNG."""
    from llmkit.bench.compare import compare as run
    from llmkit.bench.quality import EVAL_SEED

    thresholds = asserts.parse(assert_ or [])
    asserts.check_known(thresholds, COMPARE_METRICS)
    if len(checkpoints) < 2:
        raise LlmkitError("give two or more checkpoints")
    spec = CompareSpec(concurrency, input_len, output_len, num_windows)
    spec.offline()  # checks the numbers before anything runs
    data = CalibrationSpec(
        dataset, dataset_config, dataset_split, text_column, seq_len=seq_len, seed=EVAL_SEED
    )
    engine = EngineConfig(device=device, kv_cache_memory=eo.kv_cache_bytes(kv_cache_memory))
    with progress_bars(quiet=json_out) as task:
        steps = task("checkpoints", unit="steps")
        count = [0]

        def on_step(what: str) -> None:
            count[0] += 1
            steps(count[0], len(checkpoints) + 1)
            if not json_out:
                stderr.print(what, highlight=False)

        rows = run(checkpoints, spec, data, engine, on_step)
    report = {"concurrency": concurrency, "input_len": input_len, "output_len": output_len,
              "rows": rows}  # fmt: skip
    if not json_out:
        print_compare(rows, concurrency)
    if plot is not None:
        from llmkit.bench.plot import plot_compare

        plot_compare(rows, plot)
    finish(report, [(r["name"], r) for r in rows], thresholds, output, json_out)


def print_compare(rows: list[dict], concurrency: int) -> None:
    table = Table(
        "checkpoint", "size", "load s", "peak RSS MB", "decode tok/s",
        f"tok/s @{concurrency}", "perplexity", "KLD mean", "top-1 agree",
        title="which copy to deploy (quality against the first)",
    )  # fmt: skip
    for r in rows:
        table.add_row(
            r["name"], human_bytes(r["size_bytes"]), f"{r['load_s']:.2f}",
            f"{r['peak_rss_mb']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
            f"{r['output_throughput']:.1f}", f"{r['perplexity']:.3f}",
            f"{r['kld_mean']:.5f}", f"{r['top1_agreement']:.2%}",
        )  # fmt: skip
    stdout.print(table)

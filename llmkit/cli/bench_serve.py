"""`llmkit bench serve`: load-test an OpenAI-compatible server; optional rate sweep, plot and
CI thresholds."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmkit.bench import asserts
from llmkit.bench.load import LoadSpec
from llmkit.cli.bench_report import AssertOpt, OutputOpt, finish, ms_cell
from llmkit.cli.options import JsonOpt, default
from llmkit.cli.output import stderr, stdout
from llmkit.errors import LlmkitError

METRICS = {  # what --assert can name for this command
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p90", "p99")
      for m in ("ttft", "tpot", "itl", "e2el")),
}  # fmt: skip


def serve(
    url: Annotated[str, typer.Option("--url", help="The server's root URL.")] = (
        "http://127.0.0.1:8000"
    ),
    model: Annotated[
        str | None, typer.Option("--model", help="Model name (default: the server's first).")
    ] = None,
    endpoint: Annotated[str, typer.Option("--endpoint", help="completions or chat.")] = default(
        LoadSpec, "endpoint"
    ),
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="random (token ids; text with --tokenizer), a ShareGPT .json file, or a "
            '.jsonl file of {"prompt": ..., "max_tokens": ...}.',
        ),
    ] = "random",
    num_prompts: Annotated[int, typer.Option("--num-prompts", help="Requests to send.")] = 100,
    request_rate: Annotated[
        str, typer.Option("--request-rate", help="Requests per second, or inf (all at once).")
    ] = "inf",
    burstiness: Annotated[
        float,
        typer.Option("--burstiness", help="Gamma shape of the arrival gaps (1: Poisson)."),
    ] = default(LoadSpec, "burstiness"),
    max_concurrency: Annotated[
        int | None, typer.Option("--max-concurrency", help="Most requests in flight.")
    ] = None,
    input_len: Annotated[
        str, typer.Option("--input-len", help="Random prompt tokens: 128, or a range 64-256.")
    ] = "128",
    output_len: Annotated[
        str, typer.Option("--output-len", help="max_tokens: 128, or a range 64-256.")
    ] = "128",
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Ask for exactly max_tokens (llmkit, vLLM).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Prompts and arrivals.")] = 0,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="Checkpoint directory whose tokenizer makes prompts."),
    ] = None,
    random_vocab_size: Annotated[
        int, typer.Option("--random-vocab-size", help="Random token ids are below this.")
    ] = 256,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="LLMKIT_API_KEY", help="Bearer key.")
    ] = None,
    slo: Annotated[
        str | None,
        typer.Option("--slo", help="Goodput targets in ms, e.g. ttft=500,tpot=50."),
    ] = None,
    sweep_rates: Annotated[
        str | None,
        typer.Option("--sweep-rates", help="One run per rate, e.g. 1,2,4,8,inf."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG of the sweep (needs matplotlib).")
    ] = None,
    assert_: AssertOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Send a workload to an OpenAI-compatible server (llmkit, vLLM, TGI, llama.cpp) and
    report throughput, TTFT, TPOT, ITL and end-to-end latency."""
    from llmkit.bench.load import run_load
    from llmkit.bench.prompts import load_requests, parse_range

    thresholds = asserts.parse(assert_ or [])
    asserts.check_known(thresholds, METRICS)
    rates = [_rate(r) for r in (sweep_rates or request_rate).split(",")]
    if endpoint not in ("completions", "chat"):
        raise LlmkitError(f"--endpoint {endpoint!r}: choose completions or chat")
    if max_concurrency is not None and max_concurrency < 1:
        raise LlmkitError("--max-concurrency must be at least 1")
    if plot is not None and sweep_rates is None:
        raise LlmkitError("--plot draws a sweep: give --sweep-rates too")
    tok = _tokenizer(tokenizer)
    requests = load_requests(
        dataset,
        num_prompts,
        parse_range(input_len, "--input-len"),
        parse_range(output_len, "--output-len"),
        seed,
        tok,
        random_vocab_size,
    )
    slo_ms = _slo(slo)
    results = []
    for rate in rates:
        spec = LoadSpec(
            url, model, endpoint, rate, burstiness, max_concurrency, ignore_eos, seed, api_key,
            slo_ttft_ms=slo_ms.get("ttft"), slo_tpot_ms=slo_ms.get("tpot"),
        )  # fmt: skip
        with _live(len(requests), rate, quiet=json_out) as on_done:
            results.append(run_load(spec, requests, tok, on_done))
        if not json_out:
            _print_result(results[-1])
    _finish(results, sweep_rates is not None, thresholds, output, plot, json_out)


def _finish(results, sweep: bool, thresholds, output, plot, json_out) -> None:
    labelled = [(f"rate {r['request_rate']}" if sweep else "", r) for r in results]
    if sweep and not json_out:
        _print_sweep(results)
    if plot is not None:
        from llmkit.bench.plot import plot_sweep

        plot_sweep(results, plot)
    finish(
        {"sweep": results} if sweep else dict(results[0]), labelled, thresholds, output, json_out
    )


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise LlmkitError(f"request rate {text!r}: give a number or inf") from None
    if not rate > 0:
        raise LlmkitError(f"request rate {text!r} must be > 0 (or inf)")
    return rate


def _slo(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("ttft", "tpot"):
            raise LlmkitError(f"--slo {text!r}: name ttft and/or tpot, e.g. ttft=500,tpot=50")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise LlmkitError(f"--slo {text!r}: {value!r} is not a number of ms") from None
    return out


def _tokenizer(path: str | None):
    if path is None:
        return None
    from llmkit.checkpoint.fast_tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok is None:
        raise LlmkitError(f"--tokenizer {path}: no tokenizer files there")
    return tok


@contextmanager
def _live(total: int, rate: float, quiet: bool):
    """A live line (completed / failed / output tokens/s) while a run goes; yields the
    per-request callback."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    counts = {"done": 0, "failed": 0, "tokens": 0}
    start = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("", total=total)

        def on_done(record) -> None:
            counts["done"] += 1
            counts["failed"] += not record.ok
            counts["tokens"] += record.output_tokens if record.ok else 0
            speed = counts["tokens"] / (time.perf_counter() - start)
            progress.update(
                task,
                completed=counts["done"],
                description=f"rate {rate:g}: {counts['done']}/{total} done, "
                f"{counts['failed']} failed, {speed:.1f} output tok/s",
            )

        yield on_done


def _print_result(r: dict) -> None:
    table = Table(title=f"{r['model_id']} at rate {r['request_rate']}", show_header=False)
    rows = [
        ("completed / failed", f"{r['completed']} / {r['failed']}"),
        ("duration (s)", f"{r['duration']:.2f}"),
        ("request throughput (req/s)", f"{r['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{r['output_throughput']:.1f}"),
        ("total throughput (tok/s)", f"{r['total_token_throughput']:.1f}"),
    ]
    if "request_goodput" in r:
        rows.append(("goodput (req/s)", f"{r['request_goodput']:.2f}"))
    for name in ("ttft", "tpot", "itl", "e2el"):
        rows.append(
            (
                f"{name.upper()} mean / median / p90 / p99 (ms)",
                " / ".join(ms_cell(r[f"{s}_{name}_ms"]) for s in ("mean", "median", "p90", "p99")),
            )
        )
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)
    for error in r["errors"][:3]:
        stderr.print(f"a failed request: {error}", highlight=False, markup=False)


def _print_sweep(results: list[dict]) -> None:
    table = Table(
        "rate", "req/s", "output tok/s", "TTFT mean", "TTFT p99", "TPOT mean", "TPOT p99",
        "failed", title="latency against throughput (ms)",
    )  # fmt: skip
    for r in results:
        table.add_row(
            str(r["request_rate"]), f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}", ms_cell(r["mean_ttft_ms"]), ms_cell(r["p99_ttft_ms"]),
            ms_cell(r["mean_tpot_ms"]), ms_cell(r["p99_tpot_ms"]), str(r["failed"]),
        )  # fmt: skip
    stdout.print(table)

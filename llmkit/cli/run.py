"""`llmkit run RECIPE.yaml` and `llmkit demo` (the built-in offline quickstart recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmkit.cli.options import JsonOpt
from llmkit.cli.output import human_bytes, print_error, print_json, stderr, stdout

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. steps.gptq.quantize.method=awq."),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Rerun steps even when their inputs are unchanged.")
]


def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe (YAML).", show_default=False)],
    set_: SetOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a pipeline of quantize / shard / bench steps; exit 0, 3 (a threshold missed) or
    1 (a step failed). Writes OUTPUTS/run.json."""
    _run(recipe, set_ or [], force, json_out)


def demo(
    output_dir: Annotated[
        str, typer.Option("--output-dir", help="Where the demo writes everything.")
    ] = "llmkit-demo/quickstart",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The offline quickstart: a tiny model quantized four ways, sharded, compared, served
    and load-tested, in a few minutes on a laptop CPU."""
    _run(QUICKSTART, [f"outputs={output_dir}"], force, json_out)


def _run(recipe_path: Path, overrides: list[str], force: bool, json_out: bool) -> None:
    from llmkit.recipe.runner import Runner
    from llmkit.recipe.schema import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if not json_out:
        stderr.print(f"recipe {recipe.name}: {len(recipe.steps) + 1} steps", highlight=False)
    report = Runner(recipe, recipe_path, force, None if json_out else _progress).run()
    if json_out:
        print_json(report.to_dict())
    else:
        _summary(report)
    for step in report.steps:
        for line in step.missed:
            print_error(f"threshold missed in step {step.id}: {line}")
    if report.failed_step:
        failed = next(s for s in report.steps if s.id == report.failed_step)
        print_error(f"step {failed.id} failed: {failed.error}")
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _progress(record) -> None:
    stderr.print(f"  {record.id}: {record.status} ({record.seconds:.1f} s)", highlight=False)


def _summary(report) -> None:
    table = Table("step", "kind", "status", "seconds", "result", title=f"recipe {report.name}")
    for s in report.steps:
        table.add_row(s.id, s.kind, s.status, f"{s.seconds:.1f}", _result(s))
    stdout.print(table)
    for s in report.steps:
        if s.kind == "bench" and "rows" in s.metrics and "size_bytes" in s.metrics["rows"][0]:
            from llmkit.cli.bench_offline import print_compare

            print_compare(s.metrics["rows"], s.metrics["rows"][0]["concurrency"])
    stdout.print(
        f"{report.status} in {report.seconds:.1f} s; outputs in {report.outputs}, "
        f"report {report.outputs}/run.json",
        highlight=False,
    )


def _result(s) -> str:
    m = s.metrics
    if "bytes_out" in m:
        return f"{human_bytes(m['bytes_out'])} in {s.output}"
    if "tp" in m:
        return f"tp={m['tp']} pp={m['pp']} in {s.output}"
    if "output_throughput" in m:
        return (
            f"{m.get('completed', '')} requests, {m['output_throughput']:.1f} output tok/s, "
            f"TTFT mean {m.get('mean_ttft_ms') or 0:.1f} ms"
        )
    return s.output or s.error or ""

"""`llmkit inspect`: what a checkpoint holds, read from its headers alone."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from llmkit.checkpoint import checksums
from llmkit.checkpoint.inspect import inspect_checkpoint
from llmkit.checkpoint.reader import open_checkpoint
from llmkit.cli.options import JsonOpt, RevisionOpt, SourceArg
from llmkit.cli.output import human_bytes, human_count, print_json, stdout
from llmkit.errors import LlmkitError

VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify", help="Also check the weight files against llmkit's recorded checksums."
    ),
]


def inspect(
    path: SourceArg,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
    verify: VerifyOpt = False,
) -> None:
    """Architecture, parameters, dtypes, size, shards, quantization, tokenizer and modules."""
    with open_checkpoint(path, revision) as ck:
        report = inspect_checkpoint(ck)
        if verify:
            recorded = checksums.is_recorded(ck.path)
            report["verify"] = {"recorded": recorded, "problems": checksums.problems(ck.path)}
    if json_out:
        print_json(report)
    else:
        render(report)
    if verify:
        _verdict(report["verify"], quiet=json_out)


def _verdict(result: dict, quiet: bool) -> None:
    """Exit 1 naming the first file that fails; else say what was checked."""
    if result["problems"]:
        raise LlmkitError(f"{len(result['problems'])} file(s) fail: {result['problems'][0]}")
    if quiet:
        return
    if result["recorded"]:
        stdout.print("verify: every weight file matches its recorded checksum")
    else:
        stdout.print("verify: no checksums are recorded here (not written by llmkit)")


def render(report: dict) -> None:
    summary = Table.grid(padding=(0, 2))
    for key, value in _summary_rows(report):
        summary.add_row(f"[bold]{key}[/]", value)
    stdout.print(summary)
    modules = Table(title="modules", box=box.SIMPLE_HEAD)
    modules.add_column("module", no_wrap=True)
    for column in ("count", "tensors", "dtype", "params"):
        modules.add_column(column)
    for m in report["modules"]:
        tensors = ", ".join(
            f"{name} {' | '.join(_shape(s) for s in shapes)}"
            for name, shapes in m["tensors"].items()
        )
        modules.add_row(
            m["module"] or "(root)",
            str(m["count"]),
            tensors,
            ",".join(m["dtypes"]),
            human_count(m["num_parameters"]),
        )
    stdout.print(modules)


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _summary_rows(report: dict) -> list[tuple[str, str]]:
    config = report["config"]
    dtypes = ", ".join(
        f"{name} ({d['num_tensors']} tensors, {human_bytes(d['bytes'])})"
        for name, d in report["dtypes"].items()
    )
    shape = ", ".join(f"{k}={v}" for k, v in config.items())
    quant = report["quantization"]
    tok = report["tokenizer"]
    tokenizer = (
        f"{tok['class'] or 'unknown class'}, {tok['vocab_size'] or '?'} tokens, "
        f"{'chat template' if tok['chat_template'] else 'no chat template'}"
        if tok["files"]
        else "none"
    )
    return [
        ("path", report["path"]),
        ("architecture", f"{report['architecture']} ({report['model_type']})"),
        ("config", shape),
        ("parameters", human_count(report["num_parameters"])),
        ("dtypes", dtypes),
        ("size on disk", human_bytes(report["size_on_disk"])),
        ("shards", f"{len(report['shards'])} {report['format']} file(s)"),
        ("quantization", quant.get("quant_method", "yes") if quant else "none"),
        ("tokenizer", tokenizer),
    ]

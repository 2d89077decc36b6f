"""`llmkit generate`: offline batch inference from a JSONL file of prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmkit.cli.options import JsonOpt
from llmkit.cli.output import progress_bars, stderr
from llmkit.errors import LlmkitError
from llmkit.memory import freeze_heap
from llmkit.runtime.engine_config import EngineConfig


def generate(
    model: Annotated[
        str, typer.Argument(help="Checkpoint or llmkit shard directory.", show_default=False)
    ],
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            help='JSONL file, or - for stdin: {"prompt": ...} or {"prompt_token_ids": [...]} '
            "per line, with optional OpenAI sampling fields (max_tokens, temperature, top_p, "
            "seed, stop, ...) and ignore_eos.",
        ),
    ] = "-",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write results here (JSONL) instead of stdout."),
    ] = None,
    json_out: JsonOpt = False,
    engine: EngineConfig | None = None,
) -> None:
    """Complete every prompt of a JSONL file; one JSON line per prompt, in input order."""
    from llmkit.runtime.generate import generate as run
    from llmkit.runtime.generate import parse_requests

    freeze_heap()  # torch's modules, imported: out of the collector's full passes
    requests = parse_requests(*_lines(prompts))
    with progress_bars(quiet=json_out) as task:
        records, report = run(model, requests, engine, task("generate", unit="requests"))
    _write(records, output)
    if json_out:  # the report takes stdout unless the records are there
        report_json = json.dumps(report.to_dict(), indent=2)
        (sys.stdout if output is not None else sys.stderr).write(report_json + "\n")
        return
    stderr.print(
        f"{report.num_requests} requests, {report.num_prompt_tokens} prompt + "
        f"{report.num_generated_tokens} generated tokens in {report.elapsed_s:.2f} s: "
        f"{report.generated_tokens_per_s:.1f} generated tokens/s (load {report.load_s:.1f} s, "
        f"KV cache {report.kv_cache_tokens} tokens)",
        highlight=False,
    )


def _lines(prompts: str) -> tuple[list[str], str]:
    """The lines of --prompts and the name errors give them."""
    if prompts == "-":
        return sys.stdin.read().splitlines(), "<stdin>"
    path = Path(prompts)
    if not path.is_file():
        raise LlmkitError(f"--prompts {prompts}: no such file")
    return path.read_text().splitlines(), str(path)


def _write(records: list[dict], output: Path | None) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if output is None:
        sys.stdout.write(lines)
        return
    from llmkit.checkpoint.atomic import atomic_output_file

    with atomic_output_file(output) as tmp:
        tmp.write_text(lines)

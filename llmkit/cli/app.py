"""The `llmkit` command: a Typer app whose commands import torch only when they run."""

from __future__ import annotations

import signal
import sys
import traceback
from typing import Annotated

import typer

from llmkit import __version__
from llmkit.cli import bench, generate, init, inspect, quantize, run, serve, shard
from llmkit.cli.engine_options import with_engine_options
from llmkit.cli.output import print_error
from llmkit.errors import LlmkitError

app = typer.Typer(
    name="llmkit",
    help="Prepare large language models and serve them locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("init")(init.init)
app.command("inspect")(inspect.inspect)
app.command("quantize")(quantize.quantize)
app.command("shard")(shard.shard)
app.command("generate")(with_engine_options(generate.generate))
app.command("serve")(with_engine_options(serve.serve))
app.command("shard-merge", hidden=True)(shard.merge)
app.command("shard-verify", hidden=True)(shard.verify)
app.add_typer(bench.app, name="bench")
app.command("run")(run.run)
app.command("demo")(run.demo)

# `llmkit shard SRC OUT` takes positional arguments, so it cannot also be a Click group;
# its companions `llmkit shard merge|verify ...` are routed to their own commands instead.
_SHARD_COMPANIONS = {"merge": "shard-merge", "verify": "shard-verify"}

_verbose = False


def _print_version(value: bool) -> None:
    if value:
        print(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks on errors.")] = False,
) -> None:
    """llmkit: quantize, shard, serve and benchmark language models."""
    global _verbose
    _verbose = verbose


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one red line and exit code 1."""
    if argv is None:  # the console command: SIGTERM unwinds like Ctrl-C, removing partial output
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        app(args=_route(sys.argv[1:] if argv is None else argv), prog_name="llmkit")
    except (LlmkitError, OSError) as e:
        if _verbose:
            traceback.print_exc()
        print_error(_describe(e))
        sys.exit(1)


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _route(argv: list[str]) -> list[str]:
    """`shard merge ...` -> `shard-merge ...` (global options before `shard` are kept)."""
    i = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    if argv[i : i + 1] == ["shard"] and argv[i + 1 : i + 2] and argv[i + 1] in _SHARD_COMPANIONS:
        return [*argv[:i], _SHARD_COMPANIONS[argv[i + 1]], *argv[i + 2 :]]
    return argv


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error)

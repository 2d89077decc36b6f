"""`llmkit serve`: an OpenAI-compatible HTTP server around one engine."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.checkpoint.writer import parse_size
from llmkit.cli.options import RevisionOpt, default
from llmkit.errors import LlmkitError
from llmkit.runtime.engine_config import EngineConfig
from llmkit.serve.config import ServeConfig


def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="Checkpoint or llmkit shard directory, or a hub id like org/name.",
            show_default=False,
        ),
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (0.0.0.0 exposes it to the network).")
    ] = default(ServeConfig, "host"),
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = default(ServeConfig, "port"),
    served_model_name: Annotated[
        str | None,
        typer.Option("--served-model-name", help="The name clients use (default: MODEL)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLMKIT_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every /v1 route.",
        ),
    ] = None,
    max_queued_requests: Annotated[
        int | None,
        typer.Option("--max-queued-requests", help="Answer 429 beyond this many waiting requests."),
    ] = None,
    max_request_size: Annotated[
        str, typer.Option("--max-request-size", help="Largest request body, e.g. 8MiB.")
    ] = "8MiB",
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            "--shutdown-timeout", help="Seconds in-flight requests get to finish on SIGTERM."
        ),
    ] = default(ServeConfig, "shutdown_timeout_s"),
    stats_interval: Annotated[
        float, typer.Option("--stats-interval", help="Seconds between stats log lines.")
    ] = default(ServeConfig, "stats_interval_s"),
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    revision: RevisionOpt = None,
    engine: EngineConfig | None = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics) until SIGTERM or Ctrl-C."""
    from llmkit.checkpoint.reader import local_dir
    from llmkit.serve.server import log_to_stderr
    from llmkit.serve.server import serve as run

    if log_level not in ("debug", "info", "warning", "error"):
        raise LlmkitError(f"--log-level {log_level!r}: choose debug, info, warning or error")
    log_to_stderr(log_level)
    config = ServeConfig(
        model=str(local_dir(model, revision)),
        engine=engine,
        host=host,
        port=port,
        served_model_name=served_model_name or model,
        api_key=api_key,
        max_queued_requests=max_queued_requests,
        max_request_bytes=_size(max_request_size),
        shutdown_timeout_s=shutdown_timeout,
        stats_interval_s=stats_interval,
    )
    run(config, log_level)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except LlmkitError:
        raise LlmkitError(f"--max-request-size {text!r} must be a size like 8MiB") from None

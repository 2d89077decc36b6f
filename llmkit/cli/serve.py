"""`llmkit serve`: an OpenAI-compatible HTTP server around one engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from llmkit.checkpoint.writer import parse_size
from llmkit.cli.options import RevisionOpt, default
from llmkit.errors import LlmkitError
from llmkit.runtime.engine_config import EngineConfig
from llmkit.runtime.lora_registry import adapter_dir
from llmkit.serve.config import DEFAULT_MAX_LORAS, ServeConfig, read_chat_template


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
        typer.Option(
            "--served-model-name",
            help="The name /v1/models lists (default: MODEL's directory name, or the hub id).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="LLMKIT_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every /v1 route.",
        ),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            help="A Jinja chat template (a file, or the template itself) for checkpoints "
            "without one, used instead of the checkpoint's.",
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="NAME=PATH: serve the PEFT LoRA adapter in PATH as model NAME (repeatable).",
        ),
    ] = None,
    max_loras: Annotated[
        int | None,
        typer.Option(
            "--max-loras",
            help=f"LoRA adapters loaded at once (default: {DEFAULT_MAX_LORAS} with --lora or "
            "--lora-dir, else none).",
        ),
    ] = None,
    max_lora_rank: Annotated[
        int, typer.Option("--max-lora-rank", help="Largest LoRA adapter rank.")
    ] = default(EngineConfig, "max_lora_rank"),
    lora_dir: Annotated[
        str | None,
        typer.Option(
            "--lora-dir",
            help="Adapters loaded at run time (POST /v1/load_lora_adapter) must lie under it.",
        ),
    ] = None,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            "--tool-call-parser",
            help="How the model writes tool calls: hermes, llama3_json or mistral (default: "
            "what its chat template shows).",
        ),
    ] = None,
    max_queued_requests: Annotated[
        int | None,
        typer.Option(
            "--max-queued-requests",
            help="Answer 429 beyond this many waiting sequences (default: the KV cache's blocks).",
        ),
    ] = None,
    max_request_size: Annotated[
        str, typer.Option("--max-request-size", help="Largest request body, e.g. 8MiB.")
    ] = "8MiB",
    max_prompts_per_request: Annotated[
        int, typer.Option("--max-prompts-per-request", help="Prompts in one completions request.")
    ] = default(ServeConfig, "max_prompts_per_request"),
    max_prompt_bytes: Annotated[
        str | None,
        typer.Option(
            "--max-prompt-bytes",
            help="Largest prompt text, e.g. 1MiB (default: what the context can hold).",
        ),
    ] = None,
    max_response_entries: Annotated[
        int,
        typer.Option(
            "--max-response-entries",
            help="Most tokens and log probabilities in one answer: n x tokens x (1+logprobs).",
        ),
    ] = default(ServeConfig, "max_response_entries"),
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout", help="Seconds a client has to send its headers, then its body."
        ),
    ] = default(ServeConfig, "request_timeout_s"),
    stream_stall_timeout: Annotated[
        float,
        typer.Option(
            "--stream-stall-timeout",
            help="Seconds a stream may wait on a client that reads nothing before it is ended.",
        ),
    ] = default(ServeConfig, "stream_stall_timeout_s"),
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Open connections; beyond them 503.")
    ] = default(ServeConfig, "max_connections"),
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
    from llmkit.serve.logs import log_to_stderr
    from llmkit.serve.server import serve as run

    if log_level not in ("debug", "info", "warning", "error"):
        raise LlmkitError(f"--log-level {log_level!r}: choose debug, info, warning or error")
    log_to_stderr(log_level)
    if max_loras is None:
        max_loras = DEFAULT_MAX_LORAS if lora or lora_dir else 0
    engine = dataclasses.replace(
        engine or EngineConfig(), max_loras=max_loras, max_lora_rank=max_lora_rank
    )
    config = ServeConfig(
        model=str(local_dir(model, revision)),
        engine=engine,
        host=host,
        port=port,
        # a hub id is its own name (the local copy's directory is a cache snapshot)
        served_model_name=served_model_name or (None if Path(model).exists() else model),
        model_aliases=(model,),
        api_key=api_key,
        chat_template=None if chat_template is None else read_chat_template(chat_template),
        tool_call_parser=tool_call_parser,
        loras=_loras(lora or []),
        lora_dir=None if lora_dir is None else str(Path(lora_dir).expanduser().resolve()),
        max_queued_requests=max_queued_requests,
        max_request_bytes=_size(max_request_size, "--max-request-size"),
        max_prompts_per_request=max_prompts_per_request,
        max_prompt_bytes=None
        if max_prompt_bytes is None
        else _size(max_prompt_bytes, "--max-prompt-bytes"),
        max_response_entries=max_response_entries,
        request_timeout_s=request_timeout,
        stream_stall_timeout_s=stream_stall_timeout,
        max_connections=max_connections,
        shutdown_timeout_s=shutdown_timeout,
        stats_interval_s=stats_interval,
    )
    run(config, log_level)


def _loras(values: list[str]) -> tuple[tuple[str, str], ...]:
    """--lora NAME=PATH values as (name, absolute path), each an existing directory."""
    loras = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LlmkitError(f"--lora {value!r}: give NAME=PATH")
        try:
            loras.append((name, adapter_dir(path)))
        except LlmkitError as e:
            raise LlmkitError(f"--lora {name}: {e}") from None
    return tuple(loras)


def _size(text: str, option: str) -> int:
    try:
        return parse_size(text)
    except LlmkitError:
        raise LlmkitError(f"{option} {text!r} must be a size like 8MiB") from None

"""Run the app under uvicorn until SIGTERM or Ctrl-C; a failed load or bind exits non-zero."""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from llmkit.errors import LlmkitError
from llmkit.serve.config import ServeConfig

if TYPE_CHECKING:
    from llmkit.serve.engine_process import EngineProcess


def serve(config: ServeConfig, log_level: str = "info") -> None:
    from llmkit.serve.engine_process import engine_process

    # Before any thread and before the web stack is imported: the engine process loads the
    # model while this one gets the server ready.
    process = engine_process()
    process.load(config.model, config.engine, log_level)
    try:
        _run(config, process, log_level)
    finally:
        process.join(0)  # normally gone already; kills it if something went wrong here


def _run(config: ServeConfig, process: EngineProcess, log_level: str) -> None:
    import uvicorn

    from llmkit.serve.app import create_app

    app, state = create_app(config, process)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            access_log=False,  # one line per request comes from the engine's outputs instead
            timeout_graceful_shutdown=config.shutdown_timeout_s,
        )
    )

    def stop() -> None:
        server.should_exit = True

    state.on_fatal = stop
    # uvicorn raises the signal it shut down for again once it is done; with this handler
    # in place that is a no-op, so SIGTERM ends in a clean exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state.error:
        raise LlmkitError(state.error)
    if not server.started:
        raise LlmkitError(f"could not serve on {config.host}:{config.port}")


def log_to_stderr(level: str) -> None:
    """llmkit's log lines to stderr at `level` (the server's and its engine process's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("llmkit")
    logger.addHandler(handler)
    logger.setLevel(level.upper())

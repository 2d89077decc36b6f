"""Run the app under uvicorn until SIGTERM or Ctrl-C; a failed load or bind exits non-zero."""

from __future__ import annotations

import signal

from llmkit.errors import LlmkitError
from llmkit.serve.config import ServeConfig


def serve(config: ServeConfig, log_level: str = "info") -> None:
    import uvicorn

    from llmkit.serve.app import create_app

    app, state = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            access_log=False,  # one line per request comes from the engine loop instead
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
        raise LlmkitError(f"loading {config.model} failed: {state.error}")
    if not server.started:
        raise LlmkitError(f"could not serve on {config.host}:{config.port}")

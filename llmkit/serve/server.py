"""Run the app under uvicorn until SIGTERM or Ctrl-C; a failed load or bind exits non-zero."""

from __future__ import annotations

import signal
import socket
import threading
import time
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
    process.load(config.model, config.engine, log_level, config.loras)
    try:
        _run(config, process, log_level)
    finally:
        process.join(0)  # normally gone already; kills it if something went wrong here


# After --shutdown-timeout, requests still running are ended with an error; this long more
# lets their error events and 503s reach the clients before uvicorn cancels what is left.
_FLUSH_S = 5.0


def _run(config: ServeConfig, process: EngineProcess, log_level: str) -> None:
    import uvicorn

    from llmkit.serve.app import create_app
    from llmkit.serve.connections import guarded_protocol

    sock = _listen(config.host, config.port)
    app, state = create_app(config, process)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,  # one line per request comes from the engine's outputs instead
            http=guarded_protocol(config.request_timeout_s, config.max_connections),
            timeout_graceful_shutdown=config.shutdown_timeout_s + _FLUSH_S,
        )
    )

    def stop() -> None:
        server.should_exit = True

    def expire_on_shutdown() -> None:
        while not server.should_exit:
            time.sleep(0.1)
        time.sleep(config.shutdown_timeout_s)
        state.expire()

    state.on_fatal = stop
    threading.Thread(target=expire_on_shutdown, name="llmkit-shutdown", daemon=True).start()
    # uvicorn raises the signal it shut down for again once it is done; with this handler
    # in place that is a no-op, so SIGTERM ends in a clean exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if state.error:
        raise LlmkitError(state.error)
    if not server.started:
        raise LlmkitError(f"could not serve on {config.host}:{config.port}")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one error line (port taken, no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise LlmkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise LlmkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock

"""Connections as uvicorn's h11 protocol handles them, with the guards it lacks: a request's
headers must arrive within a timeout (a client that opens connections and sends half a
request cannot hold them forever), past a cap on open connections a new one is answered 503
in OpenAI's error shape and closed, and a connection's send buffers are small: they are what
a client that stops reading can leave unread before a stream's sends wait and its requests
are paused (serve/app.py EventStream)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llmkit.serve")
# A connection's kernel send buffer (Linux doubles it for its bookkeeping) instead of the
# autotuned megabytes, and the transport's own buffer above it: streamed tokens are small,
# and a stream runs at most this far ahead of a client that stops reading.
SEND_BUFFER_BYTES = 32 * 2**10
TRANSPORT_BUFFER_BYTES = 16 * 2**10


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with these limits (uvicorn builds one per connection)."""

    class Guarded(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        transport = None  # a refused connection never gets one

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                _refuse(transport, max_connections)
                return
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            transport.set_write_buffer_limits(high=TRANSPORT_BUFFER_BYTES)
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # (part of) a request whose headers have not all come yet
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self.transport is not None:  # refused connections never had one
                super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not (
                self.transport.is_closing()
            ):
                log.warning("closed a connection that sent no whole request in %.0f s",
                            header_timeout_s)  # fmt: skip
                self.transport.close()

    return Guarded


def _refuse(transport, limit: int) -> None:
    log.warning("refused a connection: %d are open (--max-connections)", limit)
    body = json.dumps(
        {
            "error": {
                "message": f"the server has {limit} connections open; retry shortly",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        },
        separators=(",", ":"),
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    transport.write(head.encode() + body)
    transport.close()

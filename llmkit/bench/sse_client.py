"""A lean streaming client for the load generator: one POST over its own HTTP/1.1 connection,
its Server-Sent Events read straight off an asyncio stream.

A load generator shares the machine with the server it measures, so its cost per streamed
chunk matters: a general HTTP client spends several times the CPU this reader does on each
one. It speaks what OpenAI-compatible servers answer with: a status line,
headers, then a chunked or close-delimited body.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HttpStatusError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text}")


async def post_events(
    url: str, body: dict, headers: dict[str, str], connect_timeout_s: float = 30.0
) -> AsyncIterator[bytes]:
    """POST `body` as JSON to `url`; yields the payload of each `data:` line of the answer's
    events. A status other than 200 raises HttpStatusError with the start of the body; a
    connection that drops mid-body raises asyncio.IncompleteReadError."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            parts.hostname, port, ssl=ssl.create_default_context() if tls else None
        ),
        connect_timeout_s,
    )
    try:
        writer.write(_request(parts, json.dumps(body).encode(), headers))
        status, fields = await _head(reader)
        chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        pieces = _chunked(reader) if chunked else _until_closed(reader)
        if status != 200:
            text = b"".join([p async for p in pieces])[:200].decode(errors="replace")
            raise HttpStatusError(status, text)
        async for data in _events(pieces):
            yield data
    finally:
        writer.close()


def _request(parts, payload: bytes, headers: dict[str, str]) -> bytes:
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status code and the headers (names lower-cased)."""
    status_line = (await reader.readline()).decode("latin-1").split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"not an HTTP answer: {' '.join(status_line)[:80]!r}")
    fields = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line[1]), fields


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]  # without the CRLF that ends it


async def _until_closed(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while data := await reader.read(65536):
        yield data


async def _events(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data:` payloads of complete events (an event ends at a blank line)."""
    buffer = b""
    async for piece in pieces:
        buffer = (buffer + piece).replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield line[5:].strip()

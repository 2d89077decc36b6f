"""The FastAPI application: routes, the API key, body limits, OpenAI-shaped errors, and the
engine loaded in its own process (/health answers 503 until it is ready)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from llmkit.memory import return_freed_memory
from llmkit.runtime.guide import GuideTokenizer
from llmkit.serve import handlers as h
from llmkit.serve import responses as r
from llmkit.serve.async_engine import AsyncEngine, EngineDead
from llmkit.serve.config import ServeConfig
from llmkit.serve.engine_process import EngineProcess
from llmkit.serve.metrics import Metrics
from llmkit.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraRequest,
    TokenizeRequest,
    UnloadLoraRequest,
    decode_json,
    parse,
)
from llmkit.serve.tool_calls import parser_for_template

log = logging.getLogger("llmkit.serve")


class ServerState:
    """The engine as it loads, runs and stops; `on_fatal` is told when loading fails or the
    engine process dies."""

    def __init__(self, config: ServeConfig, process: EngineProcess):
        self.config = config
        self.process = process
        self.metrics = Metrics()
        self.served: h.Served | None = None
        self.error: str | None = None
        self.closing = False
        self.on_fatal: Callable[[], None] = lambda: None
        self.load_s: float | None = None
        self.trim_due = False  # a large body was read: hand its freed pages back soon
        self._lock = threading.Lock()
        self.metrics.watch(lambda: self.served.engine.stats if self.served else None)

    def load(self) -> None:
        """Load the tokenizer here while the engine process loads the model."""
        from llmkit.checkpoint.fast_tokenizer import load_tokenizer

        cfg = self.config
        try:
            tokenizer = load_tokenizer(cfg.model)
            info = self.process.wait_ready()
            token_bytes = h.max_token_bytes(tokenizer)
            guides = None if tokenizer is None else GuideTokenizer(tokenizer, info.vocab_size)
            parser = cfg.tool_call_parser or parser_for_template(cfg.chat_template or tokenizer)
        except Exception as e:
            self._fail(f"loading {cfg.model} failed: {e}")
            return
        loop = AsyncEngine(
            self.process,
            info,
            self.metrics,
            cfg.max_queued_requests,
            cfg.stats_interval_s,
            on_dead=self._fail,
        )
        limits = h.Limits(
            cfg.max_prompts_per_request, cfg.max_response_entries, cfg.max_prompt_bytes
        )
        served = h.Served(
            loop,
            tokenizer,
            r.TokenText(tokenizer),
            cfg.model_name,
            info.max_model_len,
            info.vocab_size,
            limits,
            frozenset(cfg.model_aliases),
            token_bytes,
            cfg.chat_template,
            guides,
            parser,
            dict(cfg.loras),
        )
        with self._lock:
            if not self.closing:
                self.served = served
        if self.served is None:  # shut down while loading
            loop.shutdown(cfg.shutdown_timeout_s)
            return
        self.load_s = time.perf_counter() - self.process.started
        log.info(
            "%s is ready (%.1f s after the engine process started)", cfg.model_name, self.load_s
        )

    def _fail(self, message: str) -> None:
        self.error = message
        log.error("%s", message)
        self.on_fatal()

    def ready(self) -> h.Served:
        if self.served is None:
            raise ApiError(503, "the model is still loading", type="server_error", code="loading")
        return self.served

    def expire(self) -> None:
        """--shutdown-timeout has passed: end what still runs with an error (a stream gets an
        error event and [DONE], a waiting request a 503), in one log line."""
        served = self.served
        if served is None:
            return
        error = EngineDead("the server is shutting down and this request ran out of time")
        if count := served.engine.end_all(error):
            log.warning("shutdown timeout: ended %d requests still running", count)

    def close(self) -> None:
        with self._lock:
            self.closing = True
            served, self.served = self.served, None
        if served is not None:
            served.engine.shutdown(self.config.shutdown_timeout_s)
        elif self.error is None:  # still loading: it stops once loaded
            with contextlib.suppress(OSError):
                self.process.send(("stop",))
        self.process.join(self.config.shutdown_timeout_s)


class EventStream(StreamingResponse):
    """Server-Sent Events that stop (aborting their requests) the moment the client goes.
    Backpressure: while a send waits (the client has let the socket's buffers fill), the
    requests are paused in the engine (`hold(True)`), and go on once it has read
    (`hold(False)`); a client that reads nothing for `stall_timeout_s` loses the stream."""

    media_type = "text/event-stream"

    def __init__(self, events, stall_timeout_s: float, hold: Callable[[bool], None]):
        super().__init__(events)
        self.stall_timeout_s = stall_timeout_s
        self.hold = hold

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send_or_stall)
            except TimeoutError:  # uvicorn closes a connection left mid-response
                log.warning("a stream's client read nothing for %.0f s; ending it",
                            self.stall_timeout_s)  # fmt: skip

        async def send_or_stall(message) -> None:
            sending = asyncio.ensure_future(send(message))
            try:
                done, _ = await asyncio.wait({sending}, timeout=PAUSE_AFTER_S)
                if not done:
                    self.hold(True)
                    with anyio.fail_after(self.stall_timeout_s):
                        await sending
                    self.hold(False)
                sending.result()
            finally:
                sending.cancel()  # the stream ends (disconnect, stall): so does its send

        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            async with anyio.create_task_group() as group:

                async def run_then_stop(func) -> None:
                    await func()
                    group.cancel_scope.cancel()

                group.start_soon(run_then_stop, stream)
                await run_then_stop(until_disconnect)
        except OSError:
            pass
        finally:
            await self.body_iterator.aclose()


# A send still waiting after this has met full socket buffers: its client is not reading.
PAUSE_AFTER_S = 0.05


def create_app(config: ServeConfig, process: EngineProcess) -> tuple[FastAPI, ServerState]:
    state = ServerState(config, process)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="llmkit-load", daemon=True).start()
        trimming = asyncio.ensure_future(_trim_after_large_bodies(state))
        yield
        trimming.cancel()
        await asyncio.to_thread(state.close)

    app = FastAPI(
        title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    _errors(app)
    _routes(app, state)
    return app, state


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        error = ApiError(e.status_code, str(e.detail), type=kind)
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        error = ApiError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)


def _routes(app: FastAPI, state: ServerState) -> None:
    config = state.config
    key = None if config.api_key is None else f"Bearer {config.api_key}".encode()

    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if key is not None and not hmac.compare_digest(given, key):
            raise ApiError(
                401,
                "a valid API key is required: Authorization: Bearer KEY",
                type="authentication_error",
                code="invalid_api_key",
            )

    v1 = [Depends(authorized)]

    @app.get("/openapi.json", dependencies=v1, include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.served is not None:
            return JSONResponse({"status": "ok"})
        status = "failed" if state.error else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict:
        served = state.ready()
        card = {
            "id": served.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "llmkit",
            "root": served.model_name,
            "max_model_len": served.max_model_len,
        }
        adapters = [
            {**card, "id": name, "root": path, "parent": served.model_name}
            for name, path in sorted(served.loras.items())
        ]
        return {"object": "list", "data": [card, *adapters]}

    @app.post("/v1/load_lora_adapter", dependencies=v1)
    async def load_lora_adapter(request: Request) -> dict:
        served = state.ready()
        body = parse(LoadLoraRequest, decode_json(await _read_body(request, state)))
        return await h.load_lora(served, body, config.lora_dir)

    @app.post("/v1/unload_lora_adapter", dependencies=v1)
    async def unload_lora_adapter(request: Request) -> dict:
        served = state.ready()
        body = parse(UnloadLoraRequest, decode_json(await _read_body(request, state)))
        return await h.unload_lora(served, body)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request) -> Response:
        served = state.ready()
        raw = await _read_body(request, state)
        body, jobs = await asyncio.to_thread(
            _prepared, CompletionRequest, h.completion_jobs, raw, served
        )
        env = r.Envelope(r.new_id("cmpl"), "text_completion", served.model_name)
        runs, hold = h.start(served, jobs, env.id)
        if body.stream:
            events = h.completion_events(served, body, jobs, runs, env)
            return EventStream(events, config.stream_stall_timeout_s, hold)
        outs = await _unless_disconnected(request, h.finals(runs))
        answer = await asyncio.to_thread(h.completion_body, served, body, jobs, outs, env)
        return JSONResponse(answer)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(request: Request) -> Response:
        served = state.ready()
        raw = await _read_body(request, state)
        body, job = await asyncio.to_thread(
            _prepared, ChatCompletionRequest, h.chat_job, raw, served
        )
        env = r.Envelope(r.new_id("chatcmpl"), "chat.completion", served.model_name)
        runs, hold = h.start(served, [job], env.id)
        if body.stream:
            env.object = "chat.completion.chunk"
            events = h.chat_events(served, body, job, runs, env)
            return EventStream(events, config.stream_stall_timeout_s, hold)
        (out,) = await _unless_disconnected(request, h.finals(runs))
        return JSONResponse(await asyncio.to_thread(h.chat_body, served, body, job, out, env))

    @app.post("/tokenize", dependencies=v1)
    async def tokenize(request: Request) -> dict:
        served = state.ready()
        raw = await _read_body(request, state)
        return (await asyncio.to_thread(_prepared, TokenizeRequest, h.tokenize, raw, served))[1]

    @app.post("/detokenize", dependencies=v1)
    async def detokenize(request: Request) -> dict:
        served = state.ready()
        raw = await _read_body(request, state)
        return (await asyncio.to_thread(_prepared, DetokenizeRequest, h.detokenize, raw, served))[1]


LARGE_BODY = 2**20


async def _trim_after_large_bodies(state: ServerState) -> None:
    """Once a second at most, after a large body was read, hand freed heap pages back: each
    thread parsing one leaves megabytes in its own malloc arena otherwise, and RSS creeps."""
    while True:
        await asyncio.sleep(1)
        if state.trim_due:
            state.trim_due = False
            await asyncio.to_thread(return_freed_memory)


def _prepared(kind: type, make_jobs: Callable, raw: bytes, served: h.Served) -> tuple:
    """(the checked request, `make_jobs(served, request)`): decoding, validation, chat
    templates and tokenizing take time in proportion to the body, so they run off the event
    loop."""
    body = parse(kind, decode_json(raw))
    return body, make_jobs(served, body)


async def _read_body(request: Request, state: ServerState) -> bytes:
    """The body's bytes; 413 past --max-request-size, 408 when it does not arrive within
    --request-timeout."""
    config = state.config
    limit = config.max_request_bytes
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        with anyio.fail_after(config.request_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        log.warning("a request body did not arrive within %.0f s", config.request_timeout_s)
        raise ApiError(408, "the request body did not arrive in time", code="timeout") from None
    except ClientDisconnect:
        log.info("a client disconnected while sending its request")
        raise ApiError(499, "the client closed the connection", code="client_closed") from None
    state.trim_due |= size > LARGE_BODY
    return b"".join(chunks)


async def _unless_disconnected(request: Request, work):
    """Await `work`; if the client goes first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_closed")
    return task.result()

"""The front end's side of the engine process. Coroutines submit requests and read each
one's outputs from an asyncio queue; a reader thread takes each step's outputs off the pipe,
records their metrics and hands them to the event loop in one call. Closing a request's
iterator early (a client gone) aborts it in the engine, which frees its KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llmkit.errors import LlmkitError
from llmkit.runtime.outputs import RequestOutput, SpecStats
from llmkit.runtime.sequence import SamplingParams
from llmkit.serve.deltas import apply
from llmkit.serve.engine_process import EngineInfo, EngineProcess, EngineStats, Step
from llmkit.serve.metrics import Metrics

log = logging.getLogger("llmkit.serve")


class QueueFull(Exception):
    pass


class EngineDead(LlmkitError):
    """The engine has stopped (shutdown, or its process is gone)."""


@dataclass(slots=True)
class _Stream:
    """One request as the front end tracks it for its caller, the metrics and the log."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    num_tokens: int = 0  # generated so far, over all n completions
    first_token: float | None = None
    last_token: float | None = None
    output: RequestOutput | None = None  # the latest, rebuilt from the engine's deltas


@dataclass(slots=True)
class _Totals:
    """Tokens since the last stats line (and the speculative counts at it)."""

    since: float
    prompt: int = 0
    generated: int = 0
    spec: SpecStats = field(default_factory=SpecStats)


class AsyncEngine:
    def __init__(
        self,
        process: EngineProcess,
        info: EngineInfo,
        metrics: Metrics,
        max_queued_requests: int | None = None,
        stats_interval_s: float = 10.0,
        on_dead: Callable[[str], None] = lambda message: None,
    ):
        self.process = process
        self.metrics = metrics
        # None: as many sequences as the KV cache has blocks (each needs one at least to run)
        self.max_queued_requests = max_queued_requests or info.num_blocks
        self.stats_interval_s = stats_interval_s
        self.on_dead = on_dead  # told when the engine process dies under a running server
        self.stats = EngineStats(num_blocks=info.num_blocks)
        self._lock = threading.Lock()  # guards _streams and _seqs_sent
        self._streams: dict[str, _Stream] = {}
        self._seqs_sent = 0
        self._tokens = itertools.count()
        self._replies: dict[int, asyncio.Future] = {}  # "lora" commands awaiting their answer
        # Commands go through a queue to their own thread: a send blocked on a full pipe
        # (the engine drains it between steps) must block neither the event loop nor the
        # reader, which drains the other direction.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_all, name="llmkit-engine-sender", daemon=True
        )
        self._sender.start()
        self._stopping = False
        self._dead = False
        self._totals = _Totals(time.monotonic())
        self._reader = threading.Thread(target=self._read, name="llmkit-engine-reader", daemon=True)
        self._reader.start()

    @property
    def num_queued(self) -> int:
        """Sequences waiting in the engine, and those of requests not yet taken by it."""
        stats = self.stats
        return stats.waiting + self._seqs_sent - stats.seqs_seen

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival: float,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request now (call it from the event loop), with LoRA adapter `lora` if
        given; its outputs as it advances, the last one finished."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), arrival, len(prompt_ids))
        with self._lock:
            self._streams[request_id] = stream
            self._seqs_sent += params.n
        self._send(("add", request_id, prompt_ids, params, arrival, lora))
        return self._outputs(request_id, stream)

    async def change_lora(self, action: str, name: str, path: str | None = None) -> None:
        """Load ("load") or unload ("unload") a LoRA adapter in the engine; LlmkitError with
        the engine's reason when it cannot."""
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            token = next(self._tokens)
            self._replies[token] = future
        self._send(("lora", token, action, name, path))
        error = await future
        if error is not None:
            raise LlmkitError(error)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # forgotten already
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._abort(request_id)

    def admit(self, num_seqs: int) -> None:
        """Raise QueueFull when `num_seqs` more sequences would pass --max-queued-requests."""
        self._check_alive()
        if self.num_queued + num_seqs > self.max_queued_requests:
            raise QueueFull

    def hold(self, request_ids: list[str], paused: bool) -> None:
        """Pause the requests in the engine (their client is not reading: they stop taking
        steps and KV blocks), or let them go on."""
        with self._lock:
            live = [request_id for request_id in request_ids if request_id in self._streams]
        for request_id in live:
            self._send(("pause" if paused else "resume", request_id))

    def _check_alive(self) -> None:
        if self._stopping or self._dead:
            raise EngineDead("the server is shutting down")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine process (it stops its workers) and fail what is left."""
        self._stopping = True
        self._send(("stop",))
        self.process.join(timeout_s)
        self._reader.join(timeout_s)
        self._fail_all(EngineDead("the server is shutting down"))

    def end_all(self, error: Exception) -> int:
        """Fail every request in flight with `error` (their streams end with it), aborting
        them in the engine; how many there were."""
        with self._lock:
            ids = list(self._streams)
        self._fail_all(error)
        for request_id in ids:
            self._send(("abort", request_id))
        return len(ids)

    def _send(self, message: tuple) -> None:
        self._outbox.put(message)

    def _send_all(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self.process.send(message)
            except OSError:
                return  # the engine process is gone: the reader fails everything in flight
            if message[0] == "stop":
                return

    def _abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._send(("abort", request_id))
        self.metrics.requests.labels("abort").inc()
        self._log_request(request_id, stream, "abort", time.monotonic())

    def _read(self) -> None:
        conn = self.process.conn
        try:
            while True:
                if conn.poll(self.stats_interval_s):
                    self._on_step(conn.recv())
                self._log_stats()
        except (EOFError, OSError):
            pass
        conn.close()
        if self._stopping:
            return
        message = f"the engine process exited with {self.process.exitcode()}"
        self._dead = True
        self._fail_all(EngineDead(message))
        self.on_dead(message)

    def _on_step(self, step: Step) -> None:
        self.stats = step.stats
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, error in step.rejected:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, error))
            for delta in step.outputs:
                stream = self._streams.get(delta.request_id)
                if stream is None:
                    continue
                out = stream.output = apply(stream.output, delta)
                self._record(stream, out, now)
                item = out if out.error is None else LlmkitError(out.error)
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
                if out.finished:
                    del self._streams[out.request_id]
        _put_all(by_loop)
        for token, error in step.replies:
            with self._lock:
                future = self._replies.pop(token, None)
            if future is not None:
                future.get_loop().call_soon_threadsafe(_resolve, future, error)
        if step.error is not None:
            self._fail_all(LlmkitError(step.error))

    def _fail_all(self, error: Exception) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            replies, self._replies = self._replies, {}
        for future in replies.values():
            future.get_loop().call_soon_threadsafe(_resolve, future, str(error))
        with self._lock:
            for stream in self._streams.values():
                by_loop.setdefault(stream.loop, []).append((stream.queue, error))
            self._streams.clear()
        _put_all(by_loop)

    def _record(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        m = self.metrics
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        new = num_tokens - stream.num_tokens
        stream.num_tokens = num_tokens
        if stream.first_token is None:
            stream.first_token = now
            m.ttft.observe(now - stream.arrival)
            m.prompt_tokens.inc(stream.num_prompt_tokens)
            self._totals.prompt += stream.num_prompt_tokens
        elif new:
            m.itl.observe(now - stream.last_token)
        stream.last_token = now
        m.generation_tokens.inc(new)
        self._totals.generated += new
        if not out.finished:
            return
        m.e2e.observe(now - stream.arrival)
        if out.times and out.times.first_scheduled is not None:
            m.queue.observe(out.times.first_scheduled - stream.arrival)
        if num_tokens > len(out.outputs):
            m.tpot.observe((now - stream.first_token) / (num_tokens - len(out.outputs)))
        reason = "error" if out.error else out.outputs[0].finish_reason or "stop"
        m.requests.labels(reason).inc()
        self._log_request(out.request_id, stream, reason, now)

    def _log_request(self, request_id: str, s: _Stream, reason: str, now: float) -> None:
        ttft = f"{(s.first_token - s.arrival) * 1e3:.1f} ms" if s.first_token else "-"
        log.info(
            "request %s: %d prompt + %d completion tokens, TTFT %s, total %.1f ms, finish %s",
            request_id,
            s.num_prompt_tokens,
            s.num_tokens,
            ttft,
            (now - s.arrival) * 1e3,
            reason,
        )

    def _log_stats(self) -> None:
        now, t = time.monotonic(), self._totals
        elapsed = now - t.since
        if elapsed < self.stats_interval_s:
            return
        stats = self.stats
        if t.prompt or t.generated or stats.running or stats.waiting or stats.paused:
            log.info(
                "%.1f prompt tokens/s, %.1f generated tokens/s, %d running, %d waiting, "
                "%d paused, KV cache %.1f%% used, %d preemptions",
                t.prompt / elapsed,
                t.generated / elapsed,
                stats.running,
                stats.waiting,
                stats.paused,
                100 * stats.used_blocks / max(stats.num_blocks, 1),
                stats.preemptions,
            )
        spec = stats.spec.since(t.spec)
        if stats.proposer and spec.drafts:
            cutoff = stats.draft_cutoff
            log.info(
                "speculative (%s): %.1f%% of %d draft tokens accepted, %.2f per draft (by "
                "position: %s)%s",
                stats.proposer,
                100 * spec.acceptance_rate,
                spec.proposed,
                spec.mean_accepted_length,
                ", ".join(f"{rate:.2f}" for rate in spec.acceptance_by_position),
                "" if cutoff is None else f"; drafts end below a chance of {cutoff:.2f}",
            )
        if spec.forced:
            log.info("%d tokens guides forced verified as drafts", spec.forced)
        self._totals = _Totals(now, spec=stats.spec)


def _put(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Hand (queue, item) pairs to their event loop in one call (it may be gone: shutdown)."""

    def put_all() -> None:
        for target, item in items:
            target.put_nowait(item)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(put_all)


def _put_all(by_loop: dict[asyncio.AbstractEventLoop, list]) -> None:
    for loop, items in by_loop.items():
        _put(loop, items)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)

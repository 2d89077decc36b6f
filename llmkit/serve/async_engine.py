"""The engine in its own thread, so the HTTP layer never blocks it (and it never waits on the
HTTP layer). Coroutines submit requests and read each one's outputs from an asyncio queue;
the thread runs the commands they queue (add, abort), steps the engine while it has work,
and hands each step's outputs back to the event loop in one call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmkit.errors import LlmkitError
from llmkit.runtime.engine import Engine, RequestOutput
from llmkit.runtime.sequence import SamplingParams
from llmkit.serve.metrics import Metrics

log = logging.getLogger("llmkit.serve")


class QueueFull(Exception):
    pass


class EngineDead(LlmkitError):
    """The engine loop has stopped (shutdown, or a failure it could not recover from)."""


@dataclass(slots=True)
class _Stream:
    """One request as the engine thread tracks it for its caller, the metrics and the log."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    num_tokens: int = 0  # generated so far, over all n completions
    first_token: float | None = None
    last_token: float | None = None


@dataclass(slots=True)
class _Totals:
    """Tokens since the last stats line."""

    since: float
    prompt: int = 0
    generated: int = 0


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        max_queued_requests: int | None = None,
        stats_interval_s: float = 10.0,
    ):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.stats_interval_s = stats_interval_s
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # touched only by the engine thread
        self._stopping = False
        self._totals = _Totals(time.monotonic())
        self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
        self._thread.start()

    @property
    def num_queued(self) -> int:
        """Sequences waiting for the engine, and requests not yet handed to it."""
        return len(self.engine.scheduler.waiting) + len(self._commands)

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: float
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request now (call it from the event loop); its outputs as it advances, the
        last one finished. Closing the iterator early (a client gone) aborts the request and
        frees its KV blocks."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), arrival, len(prompt_ids))
        self._submit(lambda: self._add(request_id, prompt_ids, params, stream))
        return self._outputs(request_id, stream)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # the engine thread has forgotten it already
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id))

    def admit(self, num_requests: int) -> None:
        """Raise QueueFull when `num_requests` more would pass --max-queued-requests."""
        self._check_alive()
        limit = self.max_queued_requests
        if limit is not None and self.num_queued + num_requests > limit:
            raise QueueFull

    def _check_alive(self) -> None:
        if self._stopping or not self._thread.is_alive():
            raise EngineDead("the server is shutting down")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort what is left, stop the loop and release the engine's workers."""
        self._stopping = True
        self._submit(lambda: None)
        self._thread.join(timeout_s)

    def _submit(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._commands or self._stopping or self.engine.has_unfinished()):
                        self._wake.wait(self.stats_interval_s)
                        self._log_stats()
                    commands, self._commands = self._commands, deque()
                for command in commands:
                    command()
                if self._stopping:
                    break
                self._step()
                self._log_stats()
        finally:
            self._fail_all(EngineDead("the server is shutting down"))
            self.engine.close()

    def _step(self) -> None:
        if not self.engine.has_unfinished():
            return
        try:
            outputs = self.engine.step()
        except Exception as e:  # one bad step fails the requests in flight, not the server
            log.exception("engine step failed")
            self._fail_all(LlmkitError(f"the engine failed: {e}"))
            return
        self._deliver(outputs)

    def _add(self, request_id: str, ids: list[int], params: SamplingParams, s: _Stream) -> None:
        try:
            self.engine.add_request(request_id, None, ids, params, arrival=s.arrival)
        except (LlmkitError, ValueError) as e:
            _put(s.loop, [(s.queue, e)])
            return
        self._streams[request_id] = s

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self.engine.abort(request_id)
        self.metrics.requests.labels("abort").inc()
        self._log_request(request_id, stream, "abort", time.monotonic())

    def _fail_all(self, error: Exception) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, stream in self._streams.items():
            self.engine.abort(request_id)
            by_loop.setdefault(stream.loop, []).append((stream.queue, error))
        self._streams.clear()
        for loop, items in by_loop.items():
            _put(loop, items)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._record(stream, out, now)
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
            if out.finished:
                del self._streams[out.request_id]
        for loop, items in by_loop.items():
            _put(loop, items)

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
        reason = out.outputs[0].finish_reason or "stop"
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
        if t.prompt or t.generated or self.engine.has_unfinished():
            bm, sched = self.engine.block_manager, self.engine.scheduler
            log.info(
                "%.1f prompt tokens/s, %.1f generated tokens/s, %d running, %d waiting, "
                "KV cache %.1f%% used, %d preemptions",
                t.prompt / elapsed,
                t.generated / elapsed,
                len(sched.running),
                len(sched.waiting),
                100 * bm.num_used_blocks / bm.num_blocks,
                sched.num_preemptions,
            )
        self._totals = _Totals(now)


def _put(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Hand (queue, item) pairs to their event loop in one call (it may be gone: shutdown)."""

    def put_all() -> None:
        for queue, item in items:
            queue.put_nowait(item)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(put_all)

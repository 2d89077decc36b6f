"""An asyncio load generator for any OpenAI-compatible server (`llmkit bench serve`).

Requests leave at gamma-distributed intervals (Poisson when burstiness is 1) or all at once
(rate inf), at most `max_concurrency` in flight; each streams its answer, and its time to
first token, inter-token latencies and end-to-end latency are taken from the stream's
chunks. Output tokens come from the server's usage chunk, else a tokenizer, else the number
of text chunks. Any HTTP error, error event, broken stream or timeout is a failed request.
The summary keys follow `vllm bench serve`'s result JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from llmkit.bench.prompts import BenchRequest
from llmkit.bench.sse_client import HttpStatusError, post_events
from llmkit.bench.stats import summary
from llmkit.errors import LlmkitError


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str  # the server's root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)
    model: str | None = None  # None: the first model /v1/models lists
    endpoint: str = "completions"  # or "chat"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = False
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0  # a request that has not finished by then fails
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(slots=True)
class Record:
    """One request as the client saw it."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each request leaves: gamma intervals with shape
    `burstiness` and mean 1/rate (exponential, i.e. Poisson arrivals, at burstiness 1)."""
    if rate == math.inf:
        return [0.0] * num
    if rate <= 0 or burstiness <= 0:
        raise LlmkitError("--request-rate and --burstiness must be > 0")
    rng = random.Random(seed)
    gaps = [rng.gammavariate(burstiness, 1 / (rate * burstiness)) for _ in range(num)]
    return [0.0, *itertools.accumulate(gaps[1:])]


def run_load(
    spec: LoadSpec,
    requests: list[BenchRequest],
    tokenizer=None,
    on_done: Callable[[Record], None] | None = None,
) -> dict:
    """Send every request; the summary (vllm bench serve's keys) with the records' details."""
    return asyncio.run(_run(spec, requests, tokenizer, on_done))


async def _run(spec: LoadSpec, requests, tokenizer, on_done) -> dict:
    model = spec.model or await _first_model(spec)
    gate = asyncio.Semaphore(spec.max_concurrency or len(requests))
    offsets = arrival_offsets(len(requests), spec.request_rate, spec.burstiness, spec.seed)

    async def one(request: BenchRequest) -> Record:
        async with gate:
            record = await _send(spec, model, request, tokenizer)
        if on_done is not None:
            on_done(record)
        return record

    start = time.perf_counter()
    tasks = []
    for request, offset in zip(requests, offsets, strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(request)))
    records = await asyncio.gather(*tasks)
    return summarize(spec, model, records, time.perf_counter() - start)


async def _first_model(spec: LoadSpec) -> str:
    def fetch() -> str:  # one GET before the load starts: the standard library is enough
        request = urllib.request.Request(f"{spec.base}/v1/models", headers=spec.headers)
        with urllib.request.urlopen(request, timeout=30) as response:  # raises on non-2xx
            return json.load(response)["data"][0]["id"]

    try:
        return await asyncio.to_thread(fetch)
    except Exception as e:
        raise LlmkitError(f"cannot list the models of {spec.base} ({e}); pass --model") from None


def _body(spec: LoadSpec, model: str, request: BenchRequest) -> tuple[str, dict]:
    body = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.endpoint == "chat":
        if not isinstance(request.prompt, str):
            raise LlmkitError("the chat endpoint takes text prompts: give --tokenizer")
        body["messages"] = [{"role": "user", "content": request.prompt}]
        return f"{spec.base}/v1/chat/completions", body
    body["prompt"] = request.prompt
    return f"{spec.base}/v1/completions", body


async def _send(spec: LoadSpec, model: str, request: BenchRequest, tokenizer) -> Record:
    record = Record()
    try:
        await asyncio.wait_for(_stream(spec, model, request, tokenizer, record), spec.timeout_s)
    except HttpStatusError as e:
        record.error = str(e)[:200]
    except asyncio.TimeoutError:
        record.error = f"no complete answer within {spec.timeout_s:g} s"
    except Exception as e:  # connection refused or dropped, broken JSON
        record.error = f"{type(e).__name__}: {e}"[:200]
    return record


async def _stream(spec: LoadSpec, model: str, request: BenchRequest, tokenizer, record) -> None:
    """Fill `record` from one streamed request: ok, or the error that ended it."""
    url, body = _body(spec, model, request)
    start = time.perf_counter()
    last = None
    chunks = 0
    done = False
    async for data in post_events(url, body, spec.headers):
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = f"error event: {chunk['error'].get('message', '')}"[:200]
            return
        text = _chunk_text(chunk)
        if text:
            now = time.perf_counter()
            if last is None:
                record.ttft = now - start
            else:
                record.itl.append(now - last)
            last = now
            chunks += 1
            record.text += text
        usage = chunk.get("usage")
        if usage:
            record.prompt_tokens = usage.get("prompt_tokens", 0)
            record.output_tokens = usage.get("completion_tokens", 0)
    if not done:
        record.error = "the stream ended without [DONE]"
        return
    record.latency = time.perf_counter() - start
    if last is None:  # no text at all (it may all have been special tokens)
        record.ttft = record.latency
    if not record.output_tokens:
        record.output_tokens = _count(record.text, tokenizer) if tokenizer else chunks
    record.ok = True


def _count(text: str, tokenizer) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
    return text


def summarize(spec: LoadSpec, model: str, records: list[Record], duration: float) -> dict:
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    result = {
        "model_id": model,
        "endpoint": spec.endpoint,
        "request_rate": "inf" if spec.request_rate == math.inf else spec.request_rate,
        "burstiness": spec.burstiness,
        "max_concurrency": spec.max_concurrency,
        "num_prompts": len(records),
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        **summary("ttft_ms", [r.ttft for r in ok], 1e3),
        **summary("tpot_ms", tpots, 1e3),
        **summary("itl_ms", [x for r in ok for x in r.itl], 1e3),
        **summary("e2el_ms", [r.latency for r in ok], 1e3),
        "errors": [r.error for r in records if not r.ok][:20],
    }
    if spec.slo_ttft_ms is not None or spec.slo_tpot_ms is not None:
        result["request_goodput"] = sum(_meets(spec, r) for r in ok) / duration
    return result


def _meets(spec: LoadSpec, r: Record) -> bool:
    tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    ttft_ok = spec.slo_ttft_ms is None or r.ttft * 1e3 <= spec.slo_ttft_ms
    return ttft_ok and (spec.slo_tpot_ms is None or tpot * 1e3 <= spec.slo_tpot_ms)

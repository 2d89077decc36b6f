"""Offline batch inference over a JSONL file: `llmkit generate`.

Each input line is {"prompt": str} or {"prompt_token_ids": [int]} with optional sampling
fields named as in the OpenAI API; each output line, in input order, holds the completion.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields

from llmkit.errors import LlmkitError
from llmkit.runtime.engine import LLM, EngineConfig, RequestOutput
from llmkit.runtime.sequence import SamplingParams

_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}
_ALIASES = {"max_completion_tokens": "max_tokens"}
_TUPLES = ("stop", "stop_token_ids")


@dataclass(frozen=True, slots=True)
class Request:
    prompt: str | list[int]
    params: SamplingParams


@dataclass(slots=True)
class GenerateReport:
    num_requests: int
    num_prompt_tokens: int
    num_generated_tokens: int
    elapsed_s: float
    load_s: float
    kv_cache_tokens: int

    @property
    def generated_tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "generated_tokens_per_s": round(self.generated_tokens_per_s, 2)}


def parse_requests(lines: Iterable[str], source: str = "<prompts>") -> list[Request]:
    """JSONL lines -> requests; a bad line raises LlmkitError naming the line and the key."""
    requests = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            requests.append(_parse_line(line, f"{source}:{number}"))
    if not requests:
        raise LlmkitError(f"{source} holds no requests")
    return requests


def _parse_line(line: str, where: str) -> Request:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise LlmkitError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise LlmkitError(f"{where}: each line must be a JSON object")
    prompt = data.pop("prompt", None)
    ids = data.pop("prompt_token_ids", None)
    if (prompt is None) == (ids is None):
        raise LlmkitError(f"{where}: give exactly one of 'prompt' and 'prompt_token_ids'")
    if prompt is not None and not isinstance(prompt, str):
        raise LlmkitError(f"{where}: 'prompt' must be a string")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
        raise LlmkitError(f"{where}: 'prompt_token_ids' must be a list of integers")
    return Request(prompt if prompt is not None else ids, _params(data, where))


def _params(data: dict, where: str) -> SamplingParams:
    values = {}
    for key, value in data.items():
        name = _ALIASES.get(key, key)
        if name not in _PARAM_FIELDS:
            raise LlmkitError(f"{where}: unknown field {key!r}")
        if name in _TUPLES:
            value = (value,) if isinstance(value, str | int) else tuple(value or ())
        values[name] = value
    try:
        return SamplingParams(**values)
    except (TypeError, ValueError) as e:
        raise LlmkitError(f"{where}: {e}") from None


def output_record(index: int, out: RequestOutput) -> dict:
    first = out.outputs[0]
    record = {
        "index": index,
        "text": first.text,
        "token_ids": first.token_ids,
        "finish_reason": first.finish_reason,
        "num_prompt_tokens": len(out.prompt_token_ids),
    }
    if first.logprobs is not None:
        record["logprobs"] = first.logprobs
    if out.prompt_logprobs is not None:
        record["prompt_logprobs"] = out.prompt_logprobs
    if len(out.outputs) > 1:
        record["choices"] = [
            {
                "index": c.index,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
            }
            for c in out.outputs
        ]
    return record


def generate(
    model: str,
    requests: list[Request],
    config: EngineConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], GenerateReport]:
    """Run every request to completion; records in input order, and the totals."""
    start = time.perf_counter()
    llm = LLM(model, config)
    load_s = time.perf_counter() - start
    kv_cache_tokens = llm.engine.num_kv_tokens
    done = 0

    def count(out: RequestOutput) -> None:
        nonlocal done
        if out.finished:
            done += 1
            if on_progress is not None:
                on_progress(done, len(requests))

    try:
        start = time.perf_counter()
        outputs = llm.generate(
            [r.prompt for r in requests], [r.params for r in requests], on_output=count
        )
        elapsed = time.perf_counter() - start
    finally:
        llm.close()
    records = [output_record(i, out) for i, out in enumerate(outputs)]
    report = GenerateReport(
        num_requests=len(requests),
        num_prompt_tokens=sum(r["num_prompt_tokens"] for r in records),
        num_generated_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        elapsed_s=round(elapsed, 3),
        load_s=round(load_s, 3),
        kv_cache_tokens=kv_cache_tokens,
    )
    return records, report

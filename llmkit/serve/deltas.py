"""What crosses the pipe from the engine process for each request and step: only what is new
since the request's last output, so a step's message stays the same size however long the
requests have run. The engine process encodes; the front end rebuilds the engine's cumulative
RequestOutput from its previous one."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.runtime.outputs import Completion, RequestOutput, RequestTimes


@dataclass(slots=True)
class CompletionDelta:
    index: int
    keep: int  # characters of the text sent before that still stand (a stop string can cut)
    text: str  # what follows them
    token_ids: list[int]  # generated since the last output
    finish_reason: str | None
    logprobs: list[dict] | None  # entries since the last output (None: not asked for)


@dataclass(slots=True)
class OutputDelta:
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    times: RequestTimes | None
    num_cached_tokens: int
    prompt_token_ids: list[int] | None = None  # in a request's first delta only
    prompt_logprobs: list[dict | None] | None = None  # likewise
    error: str | None = None  # the engine failed this request (finished is then True)


@dataclass(slots=True)
class _Sent:
    tokens: int = 0
    text: str = ""
    logprobs: int = 0


class DeltaEncoder:
    """The engine process's side: remembers what each running request has been sent."""

    def __init__(self) -> None:
        self._sent: dict[str, list[_Sent]] = {}

    def encode(self, out: RequestOutput) -> OutputDelta:
        sent = self._sent.get(out.request_id)
        first = sent is None
        if first:
            sent = [_Sent() for _ in out.outputs]
        deltas = [_completion_delta(c, s) for c, s in zip(out.outputs, sent, strict=True)]
        if out.finished:
            self._sent.pop(out.request_id, None)
        else:
            self._sent[out.request_id] = [
                _Sent(len(c.token_ids), c.text, len(c.logprobs or ())) for c in out.outputs
            ]
        return OutputDelta(
            out.request_id,
            deltas,
            out.finished,
            out.times,
            out.num_cached_tokens,
            out.prompt_token_ids if first else None,
            out.prompt_logprobs if first else None,
            out.error,
        )

    def forget(self, request_id: str) -> None:
        """An aborted request: it gets no more outputs."""
        self._sent.pop(request_id, None)


def _completion_delta(c: Completion, sent: _Sent) -> CompletionDelta:
    keep = len(sent.text) if c.text.startswith(sent.text) else 0
    logprobs = None if c.logprobs is None else c.logprobs[sent.logprobs :]
    return CompletionDelta(
        c.index, keep, c.text[keep:], c.token_ids[sent.tokens :], c.finish_reason, logprobs
    )


def apply(previous: RequestOutput | None, delta: OutputDelta) -> RequestOutput:
    """The front end's side: the request's cumulative output after `delta` (a new object;
    `previous` is left as it was)."""
    if previous is None:
        empty = [Completion(d.index, "", [], None) for d in delta.outputs]
        previous = RequestOutput(
            delta.request_id, delta.prompt_token_ids or [], empty, False, None,
            delta.prompt_logprobs,
        )  # fmt: skip
    outputs = [
        Completion(
            d.index,
            old.text[: d.keep] + d.text,
            old.token_ids + d.token_ids,
            d.finish_reason,
            None if d.logprobs is None else (old.logprobs or []) + d.logprobs,
        )
        for old, d in zip(previous.outputs, delta.outputs, strict=True)
    ]
    return RequestOutput(
        delta.request_id,
        previous.prompt_token_ids,
        outputs,
        delta.finished,
        delta.times,
        previous.prompt_logprobs,
        delta.num_cached_tokens,
        delta.error,
    )

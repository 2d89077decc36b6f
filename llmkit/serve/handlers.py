"""/v1/completions and /v1/chat/completions: a checked request in, engine runs, a body or a
stream of Server-Sent Events out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.checkpoint.fast_tokenizer import encode_prompt
from llmkit.errors import LlmkitError
from llmkit.runtime.guide import GuideTokenizer
from llmkit.runtime.lora_registry import UnknownAdapter
from llmkit.runtime.outputs import RequestOutput, check_prompt_ids
from llmkit.runtime.sequence import SamplingParams
from llmkit.serve import responses as r
from llmkit.serve import tool_calls as tc
from llmkit.serve.async_engine import AsyncEngine, EngineDead, QueueFull
from llmkit.serve.config import check_lora_name
from llmkit.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraRequest,
    TokenizeRequest,
    UnloadLoraRequest,
    _Sampling,
)

DEFAULT_COMPLETION_TOKENS = 16  # the completions endpoint's default, as in OpenAI's API


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask of the server (from ServeConfig)."""

    max_prompts: int  # prompts in one completions request
    max_response_entries: int  # n x (tokens [+ echoed prompt]) x (1 + logprobs), summed
    max_prompt_bytes: int | None  # None: what the context and the tokenizer allow


@dataclass(slots=True)
class Served:
    """The loaded model as the handlers see it."""

    engine: AsyncEngine
    tokenizer: object
    names: r.TokenText
    model_name: str
    max_model_len: int
    vocab_size: int
    limits: Limits
    aliases: frozenset[str] = frozenset()  # other names clients may send (the path as given)
    max_token_bytes: int = 0  # the longest token's bytes: a byte count bounds the tokens
    chat_template: str | None = None  # --chat-template, instead of the tokenizer's
    guides: GuideTokenizer | None = None  # checks structured-output guides (None: refused)
    tool_parser: str | None = None  # how this model writes tool calls (tool_calls.PARSERS)
    loras: dict[str, str] = field(default_factory=dict)  # LoRA adapters loaded: name -> path

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter `model` names (None: the base model), or a 404."""
        if model in self.loras:
            return model
        if model is not None and model != self.model_name and model not in self.aliases:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}"
                + (f" and the LoRA adapters {sorted(self.loras)}" if self.loras else ""),
                param="model",
                code="model_not_found",
            )
        return None

    def prompt_ids(
        self, prompt: str | list[int], add_special_tokens: bool = True, check: bool = True
    ) -> list[int]:
        """A prompt's token ids (text is tokenized with the tokenizer's BOS and the like
        unless `add_special_tokens` is false), checked against the model unless not `check`."""
        if isinstance(prompt, str):
            self._check_bytes(len(prompt.encode()), "prompt")
            prompt = encode_prompt(self.tokenizer, prompt, add_special_tokens)
        return self._checked(prompt, "prompt") if check else prompt

    def _check_bytes(self, num_bytes: int, param: str) -> None:
        """Refuse text before tokenizing it when its size alone proves it too long: no token
        covers more than `max_token_bytes` bytes, so it has at least bytes / that tokens."""
        limit = self.limits.max_prompt_bytes
        if limit is not None and num_bytes > limit:
            raise ApiError(400, f"the prompt is over {limit} bytes (--max-prompt-bytes)",
                           param=param, code="too_large")  # fmt: skip
        if self.max_token_bytes and num_bytes > self.max_token_bytes * self.max_model_len:
            raise ApiError(
                400,
                f"the prompt's {num_bytes} bytes are more than this model's context of "
                f"{self.max_model_len} tokens can hold",
                param=param,
                code="context_length_exceeded",
            )

    def chat_ids(self, body: ChatCompletionRequest | TokenizeRequest, check: bool = True):
        """The token ids of `body.messages` rendered by the chat template."""
        messages = [m.for_template() for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
        self._check_bytes(len(json.dumps([messages, tools]).encode()), "messages")
        extra = {"chat_template": self.chat_template} if self.chat_template else {}
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                **extra,
            )
        except Exception as e:  # no template, or one the messages do not fit
            raise ApiError(400, f"the chat template failed: {e}", param="messages") from None
        ids = encode_prompt(self.tokenizer, text, bool(body.add_special_tokens))
        return self._checked(ids, "messages") if check else ids

    def check_guide(self, body: _Sampling) -> None:
        """A 400 naming the field when the request's guide cannot guide this model."""
        guide = body.guide()
        if guide is None:
            return
        param = "structured_outputs" if body.structured_outputs else "response_format"
        if getattr(body, "tools", None) and body.tool_mode() not in ("none", "auto"):
            param = "tools"
        if self.guides is None:
            raise ApiError(400, "this model's tokenizer cannot guide its output", param=param)
        try:
            problem = self.guides.problem(guide)
        except LlmkitError as e:
            problem = str(e)
        if problem:
            raise ApiError(400, f"{param}: {problem}", param=param)

    def _checked(self, ids: list[int], param: str) -> list[int]:
        """`ids`, or a 400 naming `param` when the model cannot take them."""
        try:
            check_prompt_ids(ids, self.vocab_size, self.max_model_len)
        except LlmkitError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        return ids

    def max_tokens(self, asked: int | None, prompt_len: int, default: int | None) -> int:
        room = self.max_model_len - prompt_len
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise ApiError(
                400,
                f"this model's context is {self.max_model_len} tokens; the prompt takes "
                f"{prompt_len}, so max_tokens can be at most {room}, not {asked}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes any token's string takes (byte-level and sentencepiece strings
    take at least as many as the text they stand for): text of B bytes is >= B / this tokens."""
    vocab = {} if tokenizer is None else tokenizer.get_vocab()
    return max((len(token.encode()) for token in vocab), default=0)


def sampling(body: _Sampling, max_tokens: int, logprobs, prompt_logprobs=None) -> SamplingParams:
    try:
        return body.params(max_tokens, logprobs, prompt_logprobs)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


@dataclass(slots=True)
class Job:
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    calls: object | None = None  # how to read tool calls in the output (tool_calls parsers)
    lora: str | None = None  # the LoRA adapter it runs with


def completion_jobs(served: Served, body: CompletionRequest) -> list[Job]:
    """The engine runs a completions request asks for (tokenizes: call it off the loop)."""
    lora = served.check_model(body.model)
    prompts = body.prompts()
    if len(prompts) > served.limits.max_prompts:
        raise ApiError(400, f"at most {served.limits.max_prompts} prompts per request "
                       "(--max-prompts-per-request)", param="prompt")  # fmt: skip
    served.check_guide(body)
    jobs = []
    for prompt in prompts:
        ids = served.prompt_ids(prompt, body.add_special_tokens)
        limit = served.max_tokens(body.max_tokens, len(ids), DEFAULT_COMPLETION_TOKENS)
        echo_scores = body.logprobs if body.echo and body.logprobs is not None else None
        # echoed as given; token ids as the generated text is decoded (no "<s>")
        text = prompt if isinstance(prompt, str) else served.names.text(ids)
        params = sampling(body, limit, body.logprobs, echo_scores)
        jobs.append(Job(text, ids, params, lora=lora))
    _check_response_size(served, jobs, echo=body.echo)
    return jobs


def chat_job(served: Served, body: ChatCompletionRequest) -> Job:
    """The engine run a chat request asks for (renders and tokenizes: call it off the loop)."""
    lora = served.check_model(body.model)
    served.check_guide(body)
    calls = _call_parser(served, body)
    ids = served.chat_ids(body)
    limit = served.max_tokens(body.token_limit(), len(ids), None)
    params = sampling(body, limit, body.num_logprobs())
    if calls is not None and calls.keeps_special_tokens:  # its markers are special tokens
        params = dataclasses.replace(params, skip_special_tokens=False)
    job = Job("", ids, params, calls, lora)
    _check_response_size(served, [job], echo=False)
    return job


def _call_parser(served: Served, body: ChatCompletionRequest):
    """How the request's output is read for tool calls (None: it is all content)."""
    mode = body.tool_mode()
    if mode in (None, "none"):
        return None
    if mode == "required":
        return tc.JsonList()
    if mode != "auto":
        return tc.Named(mode)
    if served.tool_parser is None:
        raise ApiError(400, "this model's chat template shows no way to call tools: start the "
                       "server with --tool-call-parser to read calls with tool_choice auto, or "
                       "send tool_choice required or a function", param="tool_choice")  # fmt: skip
    return tc.PARSERS[served.tool_parser]()


def tokenize(served: Served, body: TokenizeRequest) -> dict:
    """/tokenize: a prompt's or a conversation's token ids, as a request would be given them
    (a count past the context is reported, not refused)."""
    served.check_model(body.model)
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = served.prompt_ids(body.prompt, special, check=False)
    else:
        ids = served.chat_ids(body, check=False)
    names = served.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids,
            "token_strs": names}  # fmt: skip


def detokenize(served: Served, body: DetokenizeRequest) -> dict:
    """/detokenize: token ids as text (special tokens included)."""
    served.check_model(body.model)
    if len(body.tokens) > served.max_model_len:
        raise ApiError(400, f"at most {served.max_model_len} tokens (the context)",
                       param="tokens")  # fmt: skip
    if any(t >= served.vocab_size for t in body.tokens):
        raise ApiError(400, f"token ids must be below the vocabulary size {served.vocab_size}",
                       param="tokens")  # fmt: skip
    return {"prompt": served.tokenizer.decode(body.tokens)}


async def load_lora(served: Served, body: LoadLoraRequest, lora_dir: str | None) -> dict:
    """/v1/load_lora_adapter: the adapter in `lora_path` served as model `lora_name`."""
    name = body.lora_name
    try:
        check_lora_name(name, served.model_name)
    except LlmkitError as e:
        raise ApiError(400, str(e), param="lora_name") from None
    if name in served.loras:
        raise ApiError(400, f"a LoRA adapter named {name!r} is loaded already", param="lora_name")
    path = Path(body.lora_path).expanduser().resolve()
    if lora_dir is not None and not path.is_relative_to(lora_dir):
        raise ApiError(403, "lora_path is outside --lora-dir", type="permission_error",
                       param="lora_path")  # fmt: skip
    if not path.is_dir():
        raise ApiError(400, "lora_path is not a directory", param="lora_path")
    try:
        await served.engine.change_lora("load", name, str(path))
    except EngineDead as e:
        raise ApiError(503, str(e), type="server_error") from None
    except LlmkitError as e:
        raise ApiError(400, str(e), param="lora_path") from None
    served.loras[name] = str(path)
    return {"object": "lora_adapter", "id": name, "status": "loaded"}


async def unload_lora(served: Served, body: UnloadLoraRequest) -> dict:
    """/v1/unload_lora_adapter: requests can no longer name it; those running finish."""
    name = body.lora_name
    if served.loras.pop(name, None) is None:
        raise ApiError(404, f"no LoRA adapter named {name!r} is loaded", param="lora_name",
                       code="model_not_found")  # fmt: skip
    try:
        await served.engine.change_lora("unload", name)
    except LlmkitError as e:
        raise ApiError(503, str(e), type="server_error") from None
    return {"object": "lora_adapter", "id": name, "status": "unloaded"}


def _check_response_size(served: Served, jobs: list[Job], echo: bool) -> None:
    """Refuse a request whose answer could pass --max-response-entries: each token sent,
    each log probability with it, for every one of the n completions."""
    entries = 0
    for job in jobs:
        p = job.params
        tokens = p.max_tokens + (len(job.prompt_ids) if echo else 0)
        entries += p.n * tokens * (1 + (p.logprobs or 0))
    limit = served.limits.max_response_entries
    if entries > limit:
        raise ApiError(
            400,
            f"this request could produce {entries} tokens and log probabilities, more than "
            f"{limit} (--max-response-entries); lower n, max_tokens or logprobs",
            param="max_tokens",
        )


def start(
    served: Served, jobs: list[Job], request_id: str
) -> tuple[list[AsyncIterator[RequestOutput]], Callable[[bool], None]]:
    """Queue a response's jobs in the engine: (each job's outputs as it runs, `hold(paused)`,
    which pauses them all in the engine while the client is not reading, or lets them go on)."""
    try:
        served.engine.admit(sum(job.params.n for job in jobs))
    except QueueFull:
        raise ApiError(
            429,
            "too many requests are queued; retry shortly",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except EngineDead as e:
        raise ApiError(503, str(e), type="server_error") from None
    arrival = time.monotonic()
    ids = [f"{request_id}-{i}" for i in range(len(jobs))]
    runs = [
        served.engine.generate(run_id, job.prompt_ids, job.params, arrival, job.lora)
        for run_id, job in zip(ids, jobs, strict=True)
    ]
    return runs, lambda paused: served.engine.hold(ids, paused)


async def finals(runs: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each run's last output; if one fails or the caller is cancelled, the rest are aborted."""
    tasks = [asyncio.ensure_future(_last(run)) for run in runs]
    try:
        return await asyncio.gather(*tasks)
    except LlmkitError as e:
        raise _server_error(e) from None
    finally:
        for task in tasks:
            task.cancel()


async def _last(run: AsyncIterator[RequestOutput]) -> RequestOutput:
    async with contextlib.aclosing(run):
        async for out in run:
            last = out
    return last


async def merged(runs: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(run index, output) as the runs advance; closing it aborts every unfinished run.
    Outputs are cumulative, so while the caller is slow (a client not reading) only each
    run's latest waits: memory stays one output per run, however far the engine gets."""
    latest: dict[int, RequestOutput | Exception] = {}
    ready = asyncio.Event()

    async def pump(i: int, run) -> None:
        try:
            async with contextlib.aclosing(run):
                async for out in run:
                    latest[i] = out
                    ready.set()
        except Exception as e:
            latest[i] = e
            ready.set()

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        remaining = len(runs)
        while remaining:
            await ready.wait()
            ready.clear()
            items = sorted(latest.items(), key=lambda pair: pair[0])
            latest.clear()
            for i, item in items:
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def completion_body(served: Served, body: CompletionRequest, jobs, outs, env) -> dict:
    choices = []
    for i, (job, out) in enumerate(zip(jobs, outs, strict=True)):
        for c in out.outputs:
            text, lp = c.text, None
            if body.logprobs is not None:
                lp = _completion_lp(served, job, out, c, (0, len(c.token_ids)), 0, body.echo)
            if body.echo:
                text = job.prompt_text + text
            choices.append(
                {
                    "index": i * body.n + c.index,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                }
            )
    return env.body(choices, usage=r.usage(outs))


def _completion_lp(served, job, out, c, span, offset, echo) -> dict:
    """Log probabilities of completion `c`'s tokens in `span` (read after the prompt and its
    earlier tokens, their offsets from `offset`); under `echo` the prompt's go first, and the
    generated text's offsets start where the echoed prompt ends."""
    a, b = span
    context = job.prompt_ids + c.token_ids[:a]
    if not echo:
        return r.completion_logprobs(context, c.token_ids[a:b], c.logprobs[a:b], served.names,
                                     offset)  # fmt: skip
    scores = out.prompt_logprobs or [None] * len(job.prompt_ids)
    head = r.completion_logprobs([], job.prompt_ids, scores, served.names, 0)
    tail = r.completion_logprobs(context, c.token_ids[a:b], c.logprobs[a:b], served.names,
                                 len(job.prompt_text))  # fmt: skip
    return {key: head[key] + tail[key] for key in head}


def completion_events(served, body: CompletionRequest, jobs, runs, env) -> AsyncIterator[str]:
    def choice(i: int, out: RequestOutput, c, cursor: r.ChoiceCursor, step) -> dict:
        text, a, b = step
        echo = body.echo and not cursor.started
        lp = None
        if body.logprobs is not None:
            lp = _completion_lp(served, jobs[i], out, c, (a, b), cursor.offset, echo)
            start = len(jobs[i].prompt_text) if echo else cursor.offset
            cursor.offset = start + sum(len(t) for t in lp["tokens"][len(lp["tokens"]) - (b - a) :])
        return {
            "index": i * body.n + c.index,
            "text": (jobs[i].prompt_text if echo else "") + text,
            "logprobs": lp,
            "finish_reason": c.finish_reason,
        }

    return _events(runs, _hold(jobs[0].params), body.n, choice, env, body.include_usage())


def chat_body(served: Served, body: ChatCompletionRequest, job: Job, out, env) -> dict:
    choices = []
    for c in out.outputs:
        lp = None
        if c.logprobs is not None:
            lp = r.chat_logprobs(out.prompt_token_ids, c.token_ids, c.logprobs, served.names)
        message: dict = {"role": "assistant", "content": c.text}
        reason = c.finish_reason
        if job.calls is not None:
            content, calls = tc.message(job.calls, c.text)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            reason = tc.finish_reason(job.calls, reason, bool(calls))
        choices.append({"index": c.index, "message": message, "logprobs": lp,
                        "finish_reason": reason})  # fmt: skip
    return env.body(choices, usage=r.usage([out]))


def chat_events(served, body: ChatCompletionRequest, job, runs, env) -> AsyncIterator[str]:
    streams: dict[int, tc.CallStream] = {}

    def choice(i: int, out: RequestOutput, c, cursor: r.ChoiceCursor, step) -> dict | None:
        text, a, b = step
        reason, calls = c.finish_reason, None
        if job.calls is not None:  # the text is read for calls: content is what precedes them
            stream = streams.setdefault(c.index, tc.CallStream(job.calls))
            text, calls = stream.advance(c.text[: cursor.sent_chars], reason is not None)
        delta: dict = {"content": text} if text or not cursor.started else {}
        if job.calls is not None:
            if calls:
                delta["tool_calls"] = calls
            reason = tc.finish_reason(job.calls, reason, bool(stream.calls_sent))
            if not delta and reason is None and c.logprobs is None:
                return None  # nothing to send yet (a call's start, or its closing marker)
        if not cursor.started:  # the role rides with the first text, never alone
            delta = {"role": "assistant", **delta}
        lp = None
        if c.logprobs is not None:
            context = out.prompt_token_ids + c.token_ids[:a]
            lp = r.chat_logprobs(context, c.token_ids[a:b], c.logprobs[a:b], served.names)
        return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason}

    return _events(runs, _hold(job.params), body.n, choice, env, body.include_usage())


async def _events(runs, hold: int, n: int, choice, env, include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events of one response: a chunk whenever a choice has text (or its finish
    reason) to send, built by `choice(run index, output, completion, cursor, step)`; then the
    usage chunk when asked, and [DONE]. An engine failure becomes an error event."""
    cursors: dict[int, r.ChoiceCursor] = {}
    last: dict[int, RequestOutput] = {}
    async for i, out in _guard(merged(runs)):
        if isinstance(out, dict):  # an error body
            yield _sse(out)
            break
        last[i] = out
        for c in out.outputs:
            cursor = cursors.setdefault(i * n + c.index, r.ChoiceCursor(hold))
            step = cursor.advance(c)
            body = None if step is None else choice(i, out, c, cursor, step)
            if body is not None:
                cursor.started = True
                yield _sse(env.body([body]))
    else:
        if include_usage and last:
            yield _sse(env.body([], usage=r.usage([last[i] for i in sorted(last)])))
    yield "data: [DONE]\n\n"


async def _guard(events: AsyncIterator) -> AsyncIterator:
    """The events, then an OpenAI error body (as an event) if the engine fails mid-stream."""
    async with contextlib.aclosing(events):
        try:
            async for item in events:
                yield item
        except LlmkitError as e:
            yield None, _server_error(e).body()


def _server_error(e: LlmkitError) -> ApiError:
    """404 for an adapter unloaded after the request named it, 503 when the server is going
    away (shutdown, a dead engine), else 500."""
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), param="model", code="model_not_found")
    status = 503 if isinstance(e, EngineDead) else 500
    return ApiError(status, str(e), type="server_error")


def _hold(params: SamplingParams) -> int:
    return max((len(s) for s in params.stop), default=1) - 1


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

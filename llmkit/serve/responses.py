"""OpenAI response bodies: completions and chat completions, whole or as stream chunks, with
log probabilities in each endpoint's own shape."""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field

from llmkit.runtime.outputs import Completion, RequestOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TokenText:
    """Token id -> its text, as log probabilities name tokens (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def completion_logprobs(
    ids: list[int], entries: list[dict | None], names: TokenText, offset: int
) -> dict:
    """The completions endpoint's {tokens, token_logprobs, top_logprobs, text_offset}."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token_id, entry in zip(ids, entries, strict=True):
        text = names.text(token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry["logprob"] if entry else None)
        top = {names.text(t): lp for t, lp in entry["top"]} if entry else None
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(ids: list[int], entries: list[dict], names: TokenText) -> dict:
    """The chat endpoint's {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def item(token_id: int, logprob: float) -> dict:
        text = names.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token_id, entry in zip(ids, entries, strict=True):
        top = [item(t, lp) for t, lp in entry["top"]]
        content.append({**item(token_id, entry["logprob"]), "top_logprobs": top})
    return {"content": content}


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass(slots=True)
class Envelope:
    """What every body and chunk of one response repeats."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


@dataclass(slots=True)
class ChoiceCursor:
    """How much of one choice a stream has sent: text released only past any possible start
    of a stop string, tokens released together with their text."""

    hold: int  # characters held back while the choice runs (longest stop string - 1)
    sent_chars: int = 0
    sent_tokens: int = 0
    started: bool = False  # something was sent (echo and the chat role go first)
    ended: bool = False  # the finish reason was sent
    offset: int = 0  # text offset of the next token's log probability

    def advance(self, c: Completion) -> tuple[str, int, int] | None:
        """(new text, first new token, end token) to send now, or None."""
        done = c.finish_reason is not None
        visible = c.text if done else c.text[: max(0, len(c.text) - self.hold)]
        if self.ended or (len(visible) <= self.sent_chars and not done):
            return None
        self.ended = done
        delta = visible[self.sent_chars :]
        first = self.sent_tokens
        self.sent_chars, self.sent_tokens = len(visible), len(c.token_ids)
        return delta, first, len(c.token_ids)

"""OpenAI response bodies: completions and chat completions, whole or as stream chunks, with
log probabilities in each endpoint's own shape."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from llmkit.runtime.outputs import Completion, RequestOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TokenText:
    """Each token's text as it reads where it stands: what the text gains when the token is
    appended to the tokens before it, decoded as the engine decodes generated text. So a
    sentencepiece token keeps its leading space ("▁upon" is " upon"), special tokens read as
    "", a token that ends inside a character reads as "" and the one completing it carries the
    whole character, and the tokens of a text concatenate to it."""

    CONTEXT = 6  # tokens before one that decide its text (as the engine's detokenizer)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, ids: list[int]) -> str:
        """Token ids as text, decoded as the engine decodes what it generates."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pieces(self, context: list[int], ids: list[int], alternatives=None) -> tuple[list, list]:
        """(the text of each of `ids` after `context` and the ids before it, and for each the
        texts of `alternatives[i]`, the token ids that could have stood in its place)."""
        window = list(context[-self.CONTEXT :])
        texts, others = [], []
        for i, token_id in enumerate(ids):
            before = self.text(window).rstrip("\ufffd")
            texts.append(self._after(before, window, token_id))
            if alternatives is not None:
                others.append([self._after(before, window, t) for t in alternatives[i]])
            window = [*window[1 - self.CONTEXT :], token_id]
        return texts, others

    def _after(self, before: str, window: list[int], token_id: int) -> str:
        text = self.text([*window, token_id])
        text = text.rstrip("\ufffd")  # an unfinished character waits for its last token
        return text[len(before) :] if text.startswith(before) else text


def completion_logprobs(
    context: list[int], ids: list[int], entries: list[dict | None], names: TokenText, offset: int
) -> dict:
    """The completions endpoint's {tokens, token_logprobs, top_logprobs, text_offset}: the
    tokens of `ids` (after `context`) in context, and their offsets from `offset`."""
    tops = [[t for t, _ in entry["top"]] if entry else [] for entry in entries]
    texts, others = names.pieces(context, ids, tops)
    out: dict[str, list] = {"tokens": texts, "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}  # fmt: skip
    for text, entry, alternatives in zip(texts, entries, others, strict=True):
        out["token_logprobs"].append(entry["logprob"] if entry else None)
        top = None
        if entry:
            top = {}
            for name, (_, lp) in zip(alternatives, entry["top"], strict=True):
                top.setdefault(name, lp)  # two tokens of one text: the likelier one's
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(
    context: list[int], ids: list[int], entries: list[dict], names: TokenText
) -> dict:
    """The chat endpoint's {"content": [{token, logprob, bytes, top_logprobs}]}, each token's
    text read in context."""
    tops = [[t for t, _ in entry["top"]] for entry in entries]
    texts, others = names.pieces(context, ids, tops)

    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for text, entry, alternatives in zip(texts, entries, others, strict=True):
        top = [item(t, lp) for t, (_, lp) in zip(alternatives, entry["top"], strict=True)]
        content.append({**item(text, entry["logprob"]), "top_logprobs": top})
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

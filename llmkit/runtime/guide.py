"""Structured outputs: what a guided sequence may generate next, as a mask over the vocabulary.

A `Guide` (a JSON schema, a regular expression or a Lark grammar) travels with a request's
SamplingParams. `Guides` keeps one llguidance matcher per guided sequence: before a step it
computes the masks of the sequences that sample in it (all matchers at once, on llguidance's
threads), the sampler sets every token outside a mask to -inf, and each sampled token is fed
back. llguidance was chosen because it needs neither torch nor transformers (it reads
tokenizer.json), computes masks in native code with the interpreter lock released (so they
overlap the model's forward pass), and checks a grammar against the tokenizer before any
request is queued. Measured beside the others (benchmarks/grammar_engines.py: same schema,
tokenizer and documents), its mask + advance per token is about outlines-core's and a tenth
of xgrammar's, while it compiles a request's schema two orders of magnitude faster than they
do (each request can bring its own) and also takes Lark grammars.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("llmkit.engine")
# JSON as compact as OpenAI writes it: no free whitespace between tokens (a model left to
# itself, a random one especially, can spend its whole budget on it).
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True, slots=True)
class Guide:
    """What a sequence's output must match: `kind` json (`spec` a JSON schema as JSON text),
    regex (a regular expression the whole output matches) or lark (a Lark grammar)."""

    kind: Literal["json", "regex", "lark"]
    spec: str

    def grammar(self) -> str:
        """The guide as an llguidance grammar."""
        from llguidance import LLMatcher

        if self.kind == "json":
            return LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_DEFAULTS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        return LLMatcher.grammar_from_lark(self.spec)


def choice_guide(choices: list[str]) -> Guide:
    """A guide whose output is exactly one of `choices`."""
    import re

    return Guide("regex", "|".join(f"(?:{re.escape(c)})" for c in choices))


def mask_words(vocab_size: int) -> int:
    """int32 words of one mask (a bit per token)."""
    return (vocab_size + 31) // 32


class GuideTokenizer:
    """A tokenizer as llguidance reads it, built on first use (once per process)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._built = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._built is None:
                from llguidance import LLTokenizer

                self._built = LLTokenizer(
                    _tokenizer_json(self.tokenizer),
                    n_vocab=self.vocab_size,
                    eos_token=self.tokenizer.eos_token_id,
                )
            return self._built

    def problem(self, guide: Guide) -> str | None:
        """Why `guide` cannot guide this tokenizer's model (its first line), or None."""
        from llguidance import LLMatcher

        try:
            error = LLMatcher.validate_grammar(guide.grammar(), self.get())
        except ValueError as e:
            error = str(e)
        return error.strip().splitlines()[0] if error.strip() else None


class Guides:
    """The matcher of every guided sequence of an engine."""

    def __init__(self, tokenizer: GuideTokenizer):
        self.tokenizer = tokenizer
        self.matchers: dict[int, object] = {}
        # seq_id -> the tokens its guide forces next, as last computed, less those fed since:
        # computing them costs as much as they are long (a long literal a guide forces would
        # otherwise cost its whole length again at every step)
        self._ahead: dict[int, deque[int]] = {}
        self._executor = None

    def start(self, seq_ids: list[int], guide: Guide) -> None:
        """One matcher per sequence (of one request), compiled once."""
        from llguidance import LLMatcher

        first = LLMatcher(self.tokenizer.get(), guide.grammar(), log_level=0)
        if first.is_error():
            raise LlmkitError(f"the guide does not compile: {first.get_error()}")
        for i, seq_id in enumerate(seq_ids):
            self.matchers[seq_id] = first if i == 0 else first.deep_copy()

    def masks(
        self,
        seq_ids: list[int],
        drafts: dict[int, list[int]] | None = None,
        forced: dict[int, int] | None = None,
    ) -> dict[int, np.ndarray]:
        """seq_id -> the int32 bit mask of the tokens it may sample next, for the guided
        ones among `seq_ids`. A matcher in an error state allows EOS only, so it ends. A
        sequence with a draft (`drafts`, seq_id -> its tokens on trial) gets one mask per
        row the step verifies, [len(draft) + 1, words]: row j's after the draft's first j
        tokens (each matcher is left as it is); rows after a token the guide does not allow
        allow everything (that token is never accepted, so they are not read). The first
        `forced[seq_id]` tokens of a draft are ones its guide forces (`forced`): the row
        before each allows that token alone, as the guide does, and is not computed (a mask
        inside a long literal a guide forces costs as much as what is left of it, and a
        step verifies up to MAX_FORCED such rows)."""
        matchers = {s: self.matchers[s] for s in seq_ids if s in self.matchers}
        return self._masks(matchers, drafts or {}, forced or {})

    def trials(self, seq_ids: list[int]) -> dict[int, Trial]:
        """seq_id -> its guide on trial, for the guided ones among `seq_ids`."""
        return {s: Trial(self.matchers[s].deep_copy()) for s in seq_ids if s in self.matchers}

    def trial_masks(self, trials: dict[int, Trial]) -> dict[int, np.ndarray]:
        """seq_id -> the mask of the tokens its trial allows next."""
        return self._masks({s: t.matcher for s, t in trials.items()}, {}, {})

    def _masks(self, matchers: dict, drafts: dict[int, list[int]], forced: dict[int, int]):
        """`masks` of these matchers (seq_id -> matcher), computed on llguidance's threads."""
        if not matchers:
            return {}
        import numpy as np
        from llguidance import LLExecutor

        if self._executor is None:
            self._executor = LLExecutor()
        guided = list(matchers)
        rows = [1 + len(drafts.get(s, ())) for s in guided]
        starts = [0, *itertools.accumulate(rows)][:-1]
        words = mask_words(self.tokenizer.vocab_size)
        out = np.full((sum(rows), words), -1, dtype=np.int32)
        pairs, items = [], []  # matchers with their first row: without, with draft tokens
        for s, k in zip(guided, starts, strict=True):
            draft, state, given = drafts.get(s, ()), matchers[s], forced.get(s, 0)
            if given:  # a copy after them: each matcher left as it is
                _allow_only(out[k : k + given], draft[:given])
                state = state.deep_copy()
                state.consume_tokens(list(draft[:given]))
            if len(draft) > given:  # rolled back after
                items.append((state, k + given, list(draft[given:])))
            else:
                pairs.append((state, k + given))
        at = out.ctypes.data, words * 4, len(out)
        if pairs:
            self._executor.unsafe_compute_mask_ptr(pairs, *at)
        if items:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(items, *at)
        return {
            s: out[k] if s not in drafts else out[k : k + n]
            for s, k, n in zip(guided, starts, rows, strict=True)
        }

    def forced(self, seq_id: int, n: int) -> list[int]:
        """Up to n tokens the sequence's guide forces next: each the only token it allows
        after those before it (none for an unguided or finished sequence)."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            return []
        ahead = self._ahead.get(seq_id)
        if not ahead:
            ahead = self._ahead[seq_id] = deque(_forced(matcher))
        return list(itertools.islice(ahead, n))

    def allowed(self, seq_id: int, tokens: list[int]) -> int:
        """How many of `tokens`, in order from the sequence's current state, its guide
        allows (all for an unguided sequence)."""
        matcher = self.matchers.get(seq_id)
        return len(tokens) if matcher is None else matcher.validate_tokens(tokens)

    def advance(self, seq_id: int, token_id: int) -> bool:
        """Feed a sampled token; True when the output is complete (nothing may follow), or
        when the token broke the guide (it cannot be continued: the sequence ends)."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            return False
        ahead = self._ahead.get(seq_id)
        if ahead and ahead[0] == token_id:
            ahead.popleft()
        elif ahead:
            del self._ahead[seq_id]
        if not matcher.consume_token(token_id):
            log.warning("sequence %d left its guide: %s", seq_id, matcher.get_error())
            return True
        return matcher.is_stopped()

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
        self._ahead.pop(seq_id, None)


class Trial:
    """A guided sequence's guide on trial, for a draft model's draft: a copy of its matcher,
    fed the draft's tokens (the sequence's own matcher is not touched)."""

    __slots__ = ("matcher",)

    def __init__(self, matcher):
        self.matcher = matcher

    def feed(self, token_id: int) -> bool:
        """Feed a draft token; False where the draft ends with it: the guide does not allow
        it (nothing fed), or the output is complete with it (only its end may follow)."""
        return self.matcher.try_consume_tokens([token_id]) == 1 and not self.matcher.is_stopped()

    def forced(self, n: int) -> list[int]:
        """Up to n tokens the guide forces next (Guides.forced), not fed."""
        return _forced(self.matcher)[:n]


def _allow_only(rows: np.ndarray, tokens) -> None:
    """Row i of these int32 bit masks allows tokens[i] alone."""
    bits = rows.view("uint32")
    bits[:] = 0
    for row, token in zip(bits, tokens, strict=True):
        row[token // 32] = 1 << (token % 32)


def _forced(matcher) -> list[int]:
    """The tokens `matcher` forces next: each the only token it allows after those before
    it (llguidance's fast-forward tokens); none once it is stopped."""
    return [] if matcher.is_stopped() else matcher.compute_ff_tokens()


def _tokenizer_json(tokenizer) -> str:
    """tokenizer.json's text, from llmkit's FastTokenizer (`backend`) or a transformers fast
    tokenizer (`backend_tokenizer`; transformers 5 names its kind of backend, a string,
    `backend`)."""
    candidates = (getattr(tokenizer, n, None) for n in ("backend", "backend_tokenizer"))
    backend = next((b for b in candidates if hasattr(b, "to_str")), None)
    if backend is None:
        raise LlmkitError("structured outputs need a fast (tokenizer.json) tokenizer")
    text = json.loads(backend.to_str())
    text["truncation"] = text["padding"] = None
    return json.dumps(text)

"""Repetition, frequency and presence penalties for all of a step's rows at once.

Repetition divides a positive logit (multiplies a negative one) of every token in the
prompt or the output, as transformers and vLLM do; frequency takes off its factor times a
token's count in the output, presence its value once for a token in the output, as the
OpenAI API does. The host lists the (row, token) pairs each one changes, with their values,
and copies them over once; the logits change in one indexed update per kind.

A sequence's tokens as penalties read them (its distinct tokens; its output tokens'
counts) are kept from one step to the next (`Penalties`, by seq_id) and brought up to date
with the tokens added since, so a step's host cost grows with the rows' distinct tokens
copied in bulk, not with their histories walked in Python."""

from __future__ import annotations

import collections

import numpy as np
import torch

from llmkit.runtime.growing import Growing
from llmkit.runtime.sequence import SamplingParams


class Penalties:
    KEEP_STEPS = 16  # a sequence's tokens are dropped after as many steps without it

    def __init__(self) -> None:
        self.kept: dict[int, _Tokens] = {}  # seq_id -> its tokens, as of its last step
        self.steps = 0

    def apply(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        histories: list[tuple[list[int], list[int]]],  # per row: (prompt ids, output ids)
        seq_ids: list | None = None,  # per row: its sequence's id (None: nothing kept)
        extras: list[list[int]] | None = None,  # per row: tokens after its history
    ) -> torch.Tensor:
        """`logits` penalized, row by row, for its history followed by its extra tokens (a
        verifying row's draft tokens before it). A sequence's tokens are kept while it has a
        penalized row every KEEP_STEPS steps; one read again is read whole."""
        self.steps += 1
        old = self.steps - self.KEEP_STEPS
        self.kept = {k: t for k, t in self.kept.items() if t.used > old}
        rows = [i for i, p in enumerate(params) if p.penalized]
        if not rows:
            return logits
        seen, counted = _Pairs(), _Pairs()  # value: the repetition penalty; what is taken off
        for i in rows:
            seq_id = None if seq_ids is None else seq_ids[i]
            tokens = self._tokens(seq_id, *histories[i])
            p, extra = params[i], extras[i] if extras else []
            if p.repetition_penalty != 1:
                seen.add(i, tokens.seen_with(extra), p.repetition_penalty)
            if p.frequency_penalty or p.presence_penalty:
                ids, times = tokens.counts_with(extra)
                counted.add(i, ids, p.frequency_penalty * times + p.presence_penalty)
        logits = logits.clone()
        if seen.rows:
            at, penalty = seen.on(logits)
            values = logits[at]
            logits[at] = torch.where(values > 0, values / penalty, values * penalty)
        if counted.rows:
            at, penalty = counted.on(logits)
            logits[at] -= penalty
        return logits

    def _tokens(self, seq_id, prompt: list[int], output: list[int]) -> _Tokens:
        """The tokens of (prompt, output): the sequence's kept ones brought up to date where
        they are of these very lists, else read afresh (and kept)."""
        tokens = self.kept.get(seq_id) if seq_id is not None else None
        if tokens is None or not tokens.follows(prompt, output):
            tokens = _Tokens(prompt, output)
            if seq_id is not None:
                self.kept[seq_id] = tokens
        tokens.extend(output)
        tokens.used = self.steps
        return tokens


class _Tokens:
    """A sequence's tokens as penalties read them, each kind built on first use and then
    brought up to date with the output tokens added since: its distinct tokens (`_Seen`,
    for repetition) and its output's counts (`_Counts`, for frequency and presence)."""

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.prompt, self.output, self.prompt_len = prompt, output, len(prompt)
        self.synced, self.last = len(output), output[-1] if output else None
        self.kinds: dict[type, _Seen | _Counts] = {}
        self.used = 0  # the last step it was read in (Penalties.steps)

    def follows(self, prompt: list[int], output: list[int]) -> bool:
        """Whether these tokens are of these lists, as long as when read or longer (output
        only grows; a prompt changed in place would show in its length)."""
        return (
            prompt is self.prompt
            and output is self.output
            and len(prompt) == self.prompt_len
            and len(output) >= self.synced
            and (self.synced == 0 or output[self.synced - 1] == self.last)
        )

    def extend(self, output: list[int]) -> None:
        """Take in the output tokens added since the last call."""
        for kind in self.kinds.values():
            for token in output[self.synced :]:
                kind.add(token)
        self.synced, self.last = len(output), output[-1] if output else None

    def seen_with(self, extra: list[int]) -> np.ndarray:
        """The distinct tokens of the history, then those of `extra` it lacks."""
        return self._kind(_Seen).with_extra(extra)

    def counts_with(self, extra: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The output tokens and their counts (float64), `extra` counted in."""
        return self._kind(_Counts).with_extra(extra)

    def _kind(self, kind: type):
        if kind not in self.kinds:
            self.kinds[kind] = kind(self.prompt, self.output[: self.synced])
        return self.kinds[kind]


class _Seen:
    """The distinct tokens of a prompt and output, in a set and an array."""

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.tokens = set(prompt).union(output)
        self.array = Growing(np.fromiter(self.tokens, np.int64, len(self.tokens)))

    def add(self, token: int) -> None:
        if token not in self.tokens:
            self.tokens.add(token)
            self.array.append(token)

    def with_extra(self, extra: list[int]) -> np.ndarray:
        more = list(dict.fromkeys(t for t in extra if t not in self.tokens))
        if not more:
            return self.array.view()
        return np.concatenate([self.array.view(), np.asarray(more, np.int64)])


class _Counts:
    """An output's tokens and how many times each occurs, as arrays."""

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        counts = collections.Counter(output)
        self.slots = {token: slot for slot, token in enumerate(counts)}  # token -> index
        self.ids = Growing(np.fromiter(counts, np.int64, len(counts)))
        self.times = Growing(np.fromiter(counts.values(), np.float64, len(counts)))

    def add(self, token: int) -> None:
        slot = self.slots.get(token)
        if slot is None:
            self.slots[token] = len(self.ids)
            self.ids.append(token)
            self.times.append(1.0)
        else:
            self.times.values[slot] += 1

    def with_extra(self, extra: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids, times = self.ids.view(), self.times.view()
        if not extra:
            return ids, times
        times, more = times.copy(), collections.Counter()
        for token in extra:
            slot = self.slots.get(token)
            if slot is None:
                more[token] += 1
            else:
                times[slot] += 1
        added = np.fromiter(more.values(), np.float64, len(more))
        return (np.concatenate([ids, np.fromiter(more, np.int64, len(more))]),
                np.concatenate([times, added]))  # fmt: skip


class _Pairs:
    """(row, token) pairs of a step's logits and a value each, gathered row by row."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.values: list = []  # per row: one value for all its tokens (every row's), or
        # an array of one per token (every row's)

    def add(self, row: int, tokens: np.ndarray, values) -> None:
        self.rows.append(row)
        self.tokens.append(tokens)
        self.values.append(values)

    def on(self, logits: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(rows, tokens) to index `logits` with, and the values, on its device."""
        counts = [len(t) for t in self.tokens]
        at = np.empty((2, sum(counts)), dtype=np.int64)
        at[0] = np.repeat(self.rows, counts)
        np.concatenate(self.tokens, out=at[1])
        if np.isscalar(self.values[0]):
            values = np.repeat(np.asarray(self.values, dtype=np.float64), counts)
        else:
            values = np.concatenate(self.values).astype(np.float64, copy=False)
        at_t = torch.from_numpy(at).to(logits.device, non_blocking=True)
        values = torch.from_numpy(values)
        return (at_t[0], at_t[1]), values.to(logits.device, logits.dtype, non_blocking=True)

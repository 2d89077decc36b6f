"""When the engine speculates: what failing rounds of speculative decoding cost is not
paid again and again (Backoff), within a sequence and across sequences (Streak). Pure
Python, and it never changes a token: only which steps carry drafts."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.runtime.sequence import Sequence


class Backoff:
    """What failing rounds cost, not paid again and again; outputs do not change.

    - A round fails a sequence when none of its draft is accepted, or when the tokens it
      added cost more than plain decoding's would have: where that runs several steps a
      call (Engine._run_ahead), a step costs a fraction of a verifying round on a fast
      model, and a round must add at least as many tokens as its cost in plain steps
      (`record`'s cost).
    - After m failed rounds in a row, a sequence decodes the next 2^m - 1 tokens (at most
      MAX_BACKOFF) plainly, times the plain steps a failed round of cost c wastes (c - 1,
      rounded, at least 1 and at most MAX_BACKOFF): no draft model steps, no verified rows
      that are likely wasted, and rounds that keep failing take about 1/2^m of the time.
    - After m proposals in a row that found nothing (a lookup with no match), it proposes
      again at the next step, but a call that runs several decode steps (Engine._run_ahead)
      runs at most 2^m (at most MAX_BACKOFF + 1) for it before it does: a sequence whose
      lookups keep missing soon decodes in long calls, and one that missed once is not
      carried past the point where its lookups would match again.
    - The same holds across sequences, per kind (those whose plain decoding runs several
      steps a call, and the others), with waits of up to MAX_STREAK tokens: Streak.
      Requests are often shorter than the waits that make failing rounds rare, and a
      model on which rounds do not pay would otherwise pay the first few rounds of every
      request.

    Counted in tokens, so each step of such a call counts."""

    MAX_BACKOFF = 16
    # across sequences: rounds that keep failing take about 1/64 of the time, and a round
    # that pays again is found within 64 failed rounds' waste of plain tokens
    MAX_STREAK = 64

    def __init__(self) -> None:
        self.misses: dict[int, int] = {}  # seq_id -> failed rounds in a row
        self.resume: dict[int, int] = {}  # seq_id -> the length at which it drafts again
        self.empty: dict[int, int] = {}  # seq_id -> proposals in a row that found nothing
        self.kind: dict[int, bool] = {}  # seq_id -> whether its plain decoding runs ahead
        self.streaks = {False: Streak(), True: Streak()}  # per kind
        # seq_id -> its length when it took on its kind's Streak, until it drafts
        self.inherited: dict[int, int] = {}
        self.uncounted: set[int] = set()  # those of them that ran where none could draft

    def start(self, seq: Sequence, runs_ahead: bool) -> None:
        """A new sequence, of the kind whose plain decoding runs several steps a call or
        not: it carries on its kind's Streak (failed rounds in a row and what the engine
        still sits out after them)."""
        self.kind[seq.seq_id] = runs_ahead
        streak = self.streaks[runs_ahead]
        if not streak.misses:
            return
        self.inherited[seq.seq_id] = seq.num_tokens
        self.misses[seq.seq_id] = streak.misses
        if streak.owed:
            self.resume[seq.seq_id] = seq.num_tokens + streak.owed

    def record(
        self,
        seqs: list[Sequence],
        drafts: list[list[int]],
        accepted: list[int],
        cost: float | None = None,
    ):
        """After a step's verification: `accepted[i]` of `drafts[i]` taken; `cost`: the
        round's time over a step of plain decoding that runs several steps a call, for the
        sequences whose plain decoding does (`start`); for the others, or None (not timed),
        a round costs a step's worth, as a plain step there is one call, as the round is."""
        paid: dict[bool, bool] = {}  # per kind drafted: whether any of its rounds paid
        for seq, draft, n in zip(seqs, drafts, accepted, strict=True):
            if not draft:
                continue
            self.empty.pop(seq.seq_id, None)
            self.inherited.pop(seq.seq_id, None)  # drafting: it sat out all it inherited
            kind = self.kind.get(seq.seq_id, False)
            steps = max(1.0, cost if kind and cost is not None else 1.0)  # the round's
            if n and 1 + n >= steps:
                self.misses.pop(seq.seq_id, None)
                paid[kind] = True
                continue
            paid.setdefault(kind, False)
            misses = self.misses[seq.seq_id] = self.misses.get(seq.seq_id, 0) + 1
            wasted = min(max(1, round(steps - 1)), self.MAX_BACKOFF)  # a failed round's, at most
            self.streaks[kind].wasted = max(self.streaks[kind].wasted, wasted)
            # this step adds 1 + n tokens (`seq`'s tokens do not include them yet), then the wait
            self.resume[seq.seq_id] = seq.num_tokens + 1 + n + self.wait(misses, wasted)
        for kind, any_paid in paid.items():
            if any_paid:
                self._paid(kind)
            else:
                self.streaks[kind].failed()

    def _paid(self, kind: bool) -> None:
        """A round of `kind` paid: its streak ends, and sequences that have not drafted
        since they took it on drop it (they may draft at once)."""
        self.streaks[kind] = Streak()
        for seq_id in [s for s in self.inherited if self.kind[s] == kind]:
            del self.inherited[seq_id]
            self.resume.pop(seq_id, None)
            self.misses.pop(seq_id, None)

    @classmethod
    def wait(cls, misses: int, wasted: int, most: int = MAX_BACKOFF) -> int:
        """Tokens decoded plainly after `misses` failed rounds in a row, each of which
        wasted `wasted` plain steps (`most`: at most that many times as many)."""
        return min(2 ** min(misses, 32) - 1, most) * wasted  # past 32: as at 32, cheaply

    def crowded(self, seqs: list[Sequence]) -> None:
        """`seqs` ran a step in which the load allowed no drafts: what they sit out of
        their kind's Streak.owed meanwhile says nothing about drafting, and is not paid."""
        if self.inherited:  # none in the usual busy step: nothing to look through
            self.uncounted.update(s.seq_id for s in seqs if s.seq_id in self.inherited)

    def found_nothing(self, seq: Sequence) -> None:
        self.empty[seq.seq_id] = self.empty.get(seq.seq_id, 0) + 1

    def sits_out(self, seq: Sequence) -> int:
        """Tokens `seq` still decodes plainly before it may draft again."""
        return max(0, self.resume.get(seq.seq_id, 0) - seq.num_tokens)

    def call_limit(self, seq: Sequence) -> int | None:
        """The most decode steps one call runs for `seq` before it should propose again
        (None: no limit)."""
        if waiting := self.sits_out(seq):
            return waiting
        if empty := self.empty.get(seq.seq_id):
            return min(2**empty, self.MAX_BACKOFF + 1)
        return None

    def release(self, seq: Sequence) -> None:
        """Forget a finished sequence; what it sat out of its kind's Streak.owed is paid
        (unless it was `crowded`)."""
        began = self.inherited.pop(seq.seq_id, None)
        if began is not None and seq.seq_id not in self.uncounted:
            served = min(seq.num_tokens, self.resume.get(seq.seq_id, began)) - began
            self.streaks[self.kind[seq.seq_id]].serve(served)
        self.uncounted.discard(seq.seq_id)
        for state in (self.misses, self.resume, self.empty, self.kind):
            state.pop(seq.seq_id, None)


@dataclass(slots=True)
class Streak:
    """Rounds in a row that failed every sequence of a kind that drafted in them (Backoff),
    across sequences: after m of them, the engine's sequences of that kind sit out what
    one sequence would after m failures of its own, up to MAX_STREAK rather than
    MAX_BACKOFF times a round's waste (`owed`, tokens), counted over all of them: a new
    sequence sits out what is left of it, and what it decoded meanwhile is paid when it
    ends, unless the load allowed no drafts while it ran (Backoff.crowded). After that,
    the next new sequence drafts at once, as a sequence with m failures behind it (one
    more, and it waits longer). A round that pays ends the streak."""

    misses: int = 0
    wasted: int = 1  # the most plain steps a round of the streak wasted
    owed: int = 0

    def failed(self) -> None:
        self.misses += 1
        self.owed = Backoff.wait(self.misses, self.wasted, Backoff.MAX_STREAK)

    def serve(self, tokens: int) -> None:
        self.owed = max(0, self.owed - tokens)

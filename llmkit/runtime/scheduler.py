"""Iteration-level scheduling with one token budget per step (pure Python, no torch).

Each step, running sequences go first (decodes before unfinished prompt chunks, so a long
prompt never stalls decoding), then waiting ones in priority/arrival order while the budget,
`max_num_seqs` and the KV cache allow. A prompt larger than what is left of the budget is
computed in chunks over several steps. When blocks run out, the newest (lowest-priority)
running sequence is preempted: its blocks are freed and it is recomputed later.

A paused sequence (its client stopped reading) leaves both queues and frees its blocks, as
a preempted one does; resumed, it waits again and is recomputed, mostly from the prefix cache.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.sequence import Sequence, Status

POLICIES = ("fcfs", "priority")


@dataclass(slots=True)
class Batch:
    """What one step computes: `num_new_tokens[i]` tokens of `seqs[i]`, starting at its
    `num_computed_tokens`; for a decode with `drafts[i]`, its last token then those
    speculated tokens (num_new_tokens[i] counts both)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)
    draft_probs: dict[int, object] = field(default_factory=dict)  # seq_id -> what the
    # draft's tokens were drawn from (runtime/speculative.py Draft.probs), when sampled
    forced: dict[int, int] = field(default_factory=dict)  # seq_id -> how many of its
    # draft's first tokens its guide forced
    steps: int = 1  # > 1: every sequence decodes that many tokens, one greedy step each

    def add(self, seq: Sequence, num_new_tokens: int, draft: list[int] | None = None) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.drafts.append(draft or [])

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def decodes(self, i: int) -> bool:
        """Whether row i computes one token, its sequence's last (not a one-token chunk of a
        prompt that goes on), with no draft."""
        n, seq = self.num_new_tokens[i], self.seqs[i]
        return n == 1 and not self.drafts[i] and seq.num_uncomputed_tokens == 1

    def verifies(self) -> bool:
        """Whether the step is one model step of decodes only, some verifying drafts: each
        row a sequence's last token, then its draft where it has one."""
        rows = zip(self.seqs, self.num_new_tokens, self.drafts, strict=True)
        return (
            self.steps == 1
            and any(self.drafts)
            and all(n == 1 + len(d) and s.num_uncomputed_tokens == 1 for s, n, d in rows)
        )


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        policy: str = "fcfs",
    ):
        if policy not in POLICIES:
            raise ValueError(
                f"unknown scheduling policy {policy!r}; choose {' or '.join(POLICIES)}"
            )
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._key = _arrival if policy == "fcfs" else _priority
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []  # same order: the last is preempted first
        self.paused: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=self._key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def speculate(self, batch: Batch, index: int, draft: list[int]) -> bool:
        """Let decode `batch.seqs[index]` verify `draft` in this step when the token budget
        and the free KV blocks allow it without preempting anyone."""
        seq, bm = batch.seqs[index], self.block_manager
        room = self.max_num_batched_tokens - batch.num_tokens
        if not draft or len(draft) > room or not bm.can_allocate(seq, 1 + len(draft)):
            return False
        bm.allocate(seq, 1 + len(draft))
        batch.num_new_tokens[index] = 1 + len(draft)
        batch.drafts[index] = list(draft)
        return True

    def run_ahead(self, batch: Batch, steps: int) -> bool:
        """Let a batch of decodes only run `steps` decode steps in one (Batch.steps) when the
        token budget and the free KV blocks allow it for every sequence without preempting
        anyone (Batch.decodes says what a decode is)."""
        bm, seqs = self.block_manager, batch.seqs
        if not all(batch.decodes(i) for i in range(len(seqs))):
            return False
        if len(seqs) * steps > self.max_num_batched_tokens:
            return False
        needed = sum(bm.blocks_needed(seq, steps) for seq in seqs)
        if needed > bm.num_free_blocks:
            return False
        for seq in seqs:
            bm.allocate(seq, steps)
        batch.num_new_tokens = [steps] * len(seqs)
        batch.steps = steps
        return True

    def update(self, batch: Batch, accepted: list[int] | None = None) -> None:
        """After the model ran `batch`: advance each sequence and cache its full blocks.
        `accepted[i]`: how many of `batch.drafts[i]` were accepted; the K/V of the rest are
        dropped, and their blocks released."""
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            rejected = len(batch.drafts[i]) - (accepted[i] if accepted else 0)
            seq.num_computed_tokens += n - rejected
            if rejected:
                self.block_manager.truncate(seq)
            self.block_manager.cache_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire `seq` (finished or aborted) and free its blocks at once."""
        if seq.status is Status.FINISHED:
            return
        self._queue(seq).remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def pause(self, seq: Sequence) -> None:
        """Stop scheduling `seq` and free its blocks until `resume` (no-op unless it waits or
        runs)."""
        if seq.status not in (Status.WAITING, Status.RUNNING):
            return
        self._queue(seq).remove(seq)
        self._forget_kv(seq)
        seq.status = Status.PAUSED
        self.paused.append(seq)

    def resume(self, seq: Sequence) -> None:
        """Let a paused `seq` wait for its turn again (no-op unless it is paused)."""
        if seq.status is Status.PAUSED:
            self.paused.remove(seq)
            self.add(seq)

    def _queue(self, seq: Sequence) -> list[Sequence]:
        """The list an unfinished `seq` is in."""
        if seq.status is Status.RUNNING:
            return self.running
        return self.waiting if seq.status is Status.WAITING else self.paused

    def _forget_kv(self, seq: Sequence) -> None:
        """Free `seq`'s blocks: it is computed again (its full blocks from the prefix cache
        while they stay there) when it next runs."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _schedule_running(self, batch: Batch, budget: int) -> int:
        decodes_first = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted to make room for another
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, n, batch):
                continue
            self.block_manager.allocate(seq, n)
            batch.add(seq, n)
            budget -= n
        return budget

    def _make_room(self, seq: Sequence, num_new_tokens: int, batch: Batch) -> bool:
        """Preempt the last running sequences not yet scheduled until `seq` fits; False when
        `seq` itself had to go."""
        scheduled = None  # built only when someone must go: this runs for every sequence
        while not self.block_manager.can_allocate(seq, num_new_tokens):
            if scheduled is None:
                scheduled = {s.seq_id for s in batch.seqs}
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, batch: Batch, budget: int) -> None:
        bm = self.block_manager
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if _waits_for_parent(seq):
                i += 1
                continue
            hits = bm.computed_blocks(seq)
            n = min(seq.num_tokens - len(hits) * bm.block_size, budget)
            if not bm.can_allocate(seq, n, hits):
                break
            bm.allocate(seq, n, hits)
            del self.waiting[i]
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=self._key)
            batch.add(seq, n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._forget_kv(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=self._key)


def _arrival(seq: Sequence) -> tuple[int, int]:
    return (0, seq.arrival)


def _priority(seq: Sequence) -> tuple[int, int]:
    return (seq.params.priority, seq.arrival)


def _waits_for_parent(seq: Sequence) -> bool:
    """Siblings of an n > 1 request start once the first one's prompt is in the cache, so
    they share its blocks instead of computing the prompt again."""
    parent = seq.parent
    return (
        parent is not None
        and parent.status is not Status.FINISHED
        and parent.num_computed_tokens < parent.num_prompt_tokens
    )

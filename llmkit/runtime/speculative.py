"""Speculative decoding's proposers: each guesses the next tokens of running sequences, and
the model verifies a sequence's guesses (its draft) in one forward pass of the step (the
sampler's `verify`), so a step can add several tokens to a sequence for about the cost of
one when the guesses are good.

- `ngram` (prompt lookup): the last n tokens (n from `ngram_max` down to `ngram_min`) are
  looked up earlier in the sequence's own prompt and output; the tokens that followed the
  latest earlier match are the draft. Free to compute, good where the output repeats the
  input (edits, summaries, code, extraction).
- `draft`: a small model with the same vocabulary, with its own paged KV cache, run for k
  steps per round over all speculated sequences at once. Its tokens are its most likely
  ones for greedy requests and drawn from its own distribution (the request's temperature,
  top-k, top-p, min-p) for sampled ones, that distribution going with the draft to the
  rejection test. A sequence's draft ends once the chance that all its tokens are accepted
  falls below a cutoff: the product of the draft model's probabilities for them, each
  scaled by how such probabilities have matched what the model accepted lately
  (Calibration). The cutoff (Cutoff) is what one more draft token costs over what an
  accepted one saves: the draft model's step time over the model's, as measured, unless
  --draft-min-confidence fixes it. Past that point a token is more likely to waste a draft
  step than to save a step of the model; a draft model that agrees with the model more
  than its probabilities say drafts on for longer, a cheaper one too. A guided
  sequence's draft model chooses among the tokens its guide allows at each step, as the
  model does (a copy of the guide's matcher fed each draft token: Guides.trials). A
  sequence new to the draft model (or whose tokens it no longer holds) is first caught up
  on: a round computes at most `budget` tokens over all sequences (the engine's
  --max-num-batched-tokens, which bounds the model's own prefill in a step), so long
  prompts cost a step no more than the model's chunked prefill does; a sequence still
  catching up drafts nothing that round.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.engine_config import NGRAM
from llmkit.runtime.growing import Growing
from llmkit.runtime.scheduler import Batch
from llmkit.runtime.sequence import Sequence


@dataclass(slots=True)
class Draft:
    """A sequence's proposed tokens, and per token the distribution it was drawn from
    ([len(tokens), vocab]; None: each was chosen for sure, as greedy drafts are)."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None


def ngram_draft(tokens: list[int] | np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """k tokens that followed the latest earlier occurrence of the last n tokens of `tokens`,
    for the largest n in [min_n, max_n] that occurs earlier (none if none does). Where that
    continuation reaches the end, it goes on copying at the same distance back, into the
    draft itself: a repeating stretch is proposed as repeating on. `tokens` as an int64
    array is taken as it is (a list is converted, in time linear in its length)."""
    length = len(tokens)
    if k < 1 or length < min_n + 1:
        return []
    array = np.asarray(tokens, dtype=np.int64)
    # ends of earlier windows (before the last token) whose last token is the last token
    ends = np.flatnonzero(array[: length - 1] == array[-1])
    # matched[i]: how many of the last tokens agree, backwards, with those ending at ends[i]
    matched = np.ones(len(ends), dtype=np.int64)
    alive = ends
    for back in range(1, min(max_n, length - 1)):
        alive = alive[alive >= back]
        if not len(alive):
            break
        alive = alive[array[alive - back] == array[length - 1 - back]]
        matched[np.searchsorted(ends, alive)] += 1
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        found = np.flatnonzero(matched >= n)
        if len(found):
            start, draft = int(ends[found[-1]]) + 1, []
            for j in range(k):
                at = start + j
                draft.append(int(array[at]) if at < length else draft[at - length])
            return draft
    return []


class NgramProposer:
    name = NGRAM
    cutoff = None  # a lookup's draft is as long as its match (DraftProposer's: Cutoff)

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        # seq_id -> its tokens so far, as an array: a round converts only the tokens the
        # sequence gained since the last (its tokens are only ever appended to)
        self.arrays: dict[int, Growing] = {}

    def propose(self, seqs: list[Sequence], sizes: list[int], prefixes: list[list[int]]):
        """Each draft: its prefix (tokens certain to be accepted), then what follows the
        tokens and the prefix in the sequence (ngram_draft), sizes[i] tokens in all."""
        drafts = []
        for seq, k, prefix in zip(seqs, sizes, prefixes, strict=True):
            array = self.arrays.get(seq.seq_id)
            if array is None:
                array = self.arrays[seq.seq_id] = Growing(np.empty(0, dtype=np.int64))
            array.extend(seq.tokens(len(array), seq.num_tokens))
            tokens = array.view()
            if prefix:
                tokens = np.concatenate((tokens, np.asarray(prefix, dtype=np.int64)))
            drafts.append(
                Draft(prefix + ngram_draft(tokens, self.min_n, self.max_n, k - len(prefix)))
            )
        return drafts

    def observe(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]):
        pass

    def verified(self, seconds: float) -> None:
        pass

    def release(self, seq_id: int) -> None:
        self.arrays.pop(seq_id, None)

    def close(self) -> None:
        self.arrays.clear()


class DraftProposer:
    """A draft model on the engine's device (tp 1, in the driver's process), following each
    speculated sequence with a sequence of its own: the same tokens, its own KV blocks."""

    name = "draft"

    def __init__(
        self,
        runner,
        num_blocks: int,
        block_size: int,
        min_confidence,
        k: int,
        guides,
        vocab: int,
        budget: int,
    ):
        """`min_confidence`: a fixed cutoff (None: measured; Cutoff); `vocab`: the model's
        vocabulary size, over which drafts are drawn; `budget`: the most tokens a round
        catches up on (`_catch_up`)."""
        from llmkit.runtime.layers.sampler import Sampler

        self.runner, self.block_size, self.guides = runner, block_size, guides
        self.vocab = vocab
        self.cutoff = Cutoff(min_confidence)
        self.max_positions = runner.config.max_position_embeddings  # the draft model's context
        # where the draft model's decode step is one call (a CUDA graph's replay, the C++
        # decode stack), a mirror catching up on at most k + 1 tokens (those the target
        # accepted of its last draft, and the target's own) computes them as decodes: a step
        # of decodes only, which that call runs; elsewhere as a prefill, which the layers
        # one by one run faster (benchmarks/speculative.py's drafts)
        self.catch_up = k + 1 if runner.runs_steps() else 1
        self.k, self.budget = k, budget
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.mirrors: dict[int, Sequence] = {}  # target seq_id -> the draft model's sequence
        self.synced: dict[int, int] = {}  # target seq_id -> its length at the last sync
        self.sampler = Sampler()
        self.calibration = Calibration()
        # seq_id -> the draft model's probability for each token of its last draft
        self.confidences: dict[int, list[float]] = {}

    def propose(self, seqs: list[Sequence], sizes: list[int], prefixes: list[list[int]]):
        """Up to sizes[i] tokens for seqs[i], beginning with prefixes[i] (tokens certain to be
        accepted: those its guide forces), then k steps of the draft model over all of them
        (none for a sequence whose tokens its KV cache cannot hold now; no more after a
        token after which the draft is likely rejected: the module's docstring). Tokens a
        guide forces, at the start or after a drafted token, are taken as given: the draft
        model computes them with its next step instead of drafting them one a step."""
        # k steps compute positions up to the sequence's length + k - 2: none past the draft
        # model's context (a sequence longer than it is drafted for no more)
        limits = [
            min(k, self.max_positions + 1 - s.num_tokens) for s, k in zip(seqs, sizes, strict=True)
        ]
        for seq in (s for s, k in zip(seqs, limits, strict=True) if k <= 0):
            self.release(seq.seq_id)
        work = [
            _Drafting(k, list(p), [None] * len(p)) for k, p in zip(limits, prefixes, strict=True)
        ]
        trials = self.guides.trials([s.seq_id for s in seqs])
        active = [
            i for i, (k, p) in enumerate(zip(limits, prefixes, strict=True))
            if k > len(p) and self._start(seqs[i], p, trials.get(seqs[i].seq_id))
        ]  # fmt: skip
        active = self._catch_up(seqs, active)
        cutoff = self.cutoff.value()
        for _ in range(max(limits, default=0)):
            active = [i for i in active if len(work[i].tokens) < work[i].limit]
            batch = Batch()
            for i in active:
                mirror = self.mirrors[seqs[i].seq_id]
                n = mirror.num_tokens - mirror.num_computed_tokens
                if not self.blocks.can_allocate(mirror, n):
                    break
                self.blocks.allocate(mirror, n)
                batch.add(mirror, n)
            active = active[: len(batch.seqs)]
            if not active:
                break
            targets = [seqs[i].seq_id for i in active]
            start = time.perf_counter()
            chosen = self._next_tokens(batch, {t: trials[t] for t in targets if t in trials})
            if max(batch.num_new_tokens) <= self.k + 1:  # not a prompt's catching up
                self.cutoff.drafted(time.perf_counter() - start)
            for i, target, (token, q, confidence) in zip(active, targets, chosen, strict=True):
                drafting = work[i]
                drafting.add(token, q, confidence)
                drafting.chance *= min(1.0, self.calibration.scaled(confidence))
                guided_on = self._guided_on(seqs[i], trials.get(target), drafting)
                if drafting.chance < cutoff or not guided_on:
                    drafting.limit = len(drafting.tokens)
        for seq, drafting in zip(seqs, work, strict=True):
            self.confidences[seq.seq_id] = drafting.confidences  # for `observe`
        return [drafting.draft() for drafting in work]

    def _catch_up(self, seqs: list[Sequence], active: list[int]) -> list[int]:
        """Keep what a round computes for the mirrors of seqs[i] (i in `active`) within
        `budget` tokens: a mirror whose tokens not yet computed fit in what is left is ready
        (the first drafting step computes them); one that does not catches up on what is
        left, all but its last token, in one prefill now, and drafts in a later round.
        -> those of `active` ready to draft now."""
        from llmkit.runtime.model_runner import prepare

        batch, left, ready = Batch(), self.budget, []
        for i in active:
            mirror = self.mirrors[seqs[i].seq_id]
            pending = mirror.num_tokens - mirror.num_computed_tokens
            if pending <= left:
                ready.append(i)
                left -= pending
                continue
            n = min(pending - 1, left)
            if n > 0 and self.blocks.can_allocate(mirror, n):
                self.blocks.allocate(mirror, n)
                batch.add(mirror, n)
                left -= n
        if batch.seqs:  # no row samples: every mirror stops short of its last token
            inputs, _, _ = prepare(batch, self.block_size, self.catch_up)
            self.runner.execute(inputs)
            for mirror, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                mirror.num_computed_tokens += n
        return ready

    def _start(self, seq: Sequence, prefix: list[int], trial) -> bool:
        """Make seq's mirror hold seq's tokens and then `prefix` (`_take`); False where the
        draft model cannot draft after them now: the KV cache has no room, or the guided
        output is complete with the prefix."""
        return self._sync(seq) and self._take(seq, prefix, trial)

    def _guided_on(self, seq: Sequence, trial, drafting: _Drafting) -> bool:
        """Feed the draft's last token to its guide's `trial` (where it has one), then take
        the tokens the guide forces after it as given (`_take`); False where the draft
        ends: the guided output is complete."""
        if trial is None:
            return True
        if not trial.feed(drafting.tokens[-1]):
            return False
        forced = trial.forced(drafting.limit - len(drafting.tokens))
        drafting.give(forced)
        return self._take(seq, forced, trial)

    def _take(self, seq: Sequence, tokens: list[int], trial) -> bool:
        """Tokens certain to be accepted, as given: appended to seq's mirror (its next step
        computes them) and fed to its guide's `trial`, where it has one; False where the
        guided output is complete with them."""
        self.mirrors[seq.seq_id].prompt_token_ids += tokens
        return trial is None or all(trial.feed(t) for t in tokens)

    def observe(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]):
        """After a step's verification: `accepted[i]` of `drafts[i]` taken (the drafted
        tokens, past their prefix; the drafts the step had no room for are empty)."""
        for seq, draft, n in zip(seqs, drafts, accepted, strict=True):
            own = self.confidences.pop(seq.seq_id, None)
            if draft and own is not None and len(own) >= len(draft):  # the draft, or cut
                self.calibration.observe(own[: len(draft)], n)

    def verified(self, seconds: float) -> None:
        """A step of the model's that computed decodes only, some verifying drafts, took
        `seconds` (for the cutoff)."""
        self.cutoff.verified(seconds)

    def _next_tokens(self, batch: Batch, trials: dict):
        """Run the draft model on `batch`; each mirror's next token (appended to it), the
        distribution it was drawn from (None for greedy) and the probability the draft model
        gave it (under that distribution; for greedy, under the model's softmax), among the
        tokens its guide on trial allows where it has one (`trials`: Guides.trials of the
        guided sequences, by the sequence's seq_id; its mirror is self.mirrors[seq_id]).
        Every row is decided where the logits are (Sampler.propose): one read brings the
        tokens and probabilities to the host; the distributions stay there."""
        from llmkit.runtime.layers.sampler import apply_masks, fetch
        from llmkit.runtime.model_runner import prepare

        inputs, sampled, _ = prepare(batch, self.block_size, self.catch_up)
        logits = _model_width(self.runner.execute(inputs).float(), self.vocab)
        for mirror, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            mirror.num_computed_tokens += n
        rows = {m.seq_id: i for i, m in enumerate(sampled.seqs)}
        masks = self.guides.trial_masks(trials)  # while a GPU computes the logits
        if masks:
            row_masks = [None] * len(rows)
            for seq_id, mask in masks.items():
                row_masks[rows[self.mirrors[seq_id].seq_id]] = mask
            logits = apply_masks(logits, row_masks)
        mirrors = sampled.seqs  # by row
        keys = [None if m.seed is None else (m.seed, len(m.prompt_token_ids)) for m in mirrors]
        tokens, confidence, drawn_from = self.sampler.propose(
            logits, [m.params for m in mirrors], keys
        )
        tokens, confidence = fetch(tokens, confidence)
        out = []
        for mirror in batch.seqs:
            row = rows[mirror.seq_id]
            mirror.prompt_token_ids.append(tokens[row])
            out.append((tokens[row], drawn_from[row], confidence[row]))
        return out

    def _sync(self, seq: Sequence) -> bool:
        """Make seq's mirror hold seq's tokens, keeping the K/V of their common prefix;
        False when the draft's KV cache has no room for it now."""
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None:  # sampling as the request does, scoring nothing
            params = replace(seq.params, logprobs=None, prompt_logprobs=None)
            mirror = self.mirrors[seq.seq_id] = Sequence([], params, seed=seq.seed)
        # the mirror holds seq's tokens up to the last sync, then that round's draft: only
        # what came after the sync is compared and replaced (not the whole context)
        old, synced, n = mirror.prompt_token_ids, self.synced.get(seq.seq_id, 0), seq.num_tokens
        new = seq.tokens(synced, n)
        common = synced
        while common < min(len(old), n) and old[common] == new[common - synced]:
            common += 1  # past the last sync: the draft tokens the model accepted
        del old[common:]
        old += new[common - synced :]
        # the last token is computed again, whatever its K/V: its logits give the draft's
        # first token (a draft the step had no room for leaves the next one computed)
        mirror.num_computed_tokens = min(mirror.num_computed_tokens, common, n - 1)
        self.synced[seq.seq_id] = n
        self.blocks.truncate(mirror)
        return self.blocks.can_allocate(mirror, n - mirror.num_computed_tokens)

    def release(self, seq_id: int) -> None:
        mirror = self.mirrors.pop(seq_id, None)
        self.synced.pop(seq_id, None)
        self.confidences.pop(seq_id, None)
        if mirror is not None:
            self.blocks.free(mirror)

    def close(self) -> None:
        self.runner = None


@dataclass(slots=True)
class _Drafting:
    """A sequence's draft as DraftProposer builds it."""

    limit: int  # its most tokens
    tokens: list[int]
    rows: list  # per token: the distribution it was drawn from (None: certain or greedy)
    # per token past the prefix: the draft model's probability for it (None: given)
    confidences: list = field(default_factory=list)
    chance: float = 1.0  # that every token is accepted, as calibrated

    def add(self, token: int, q, confidence: float) -> None:
        self.tokens.append(token)
        self.rows.append(q)
        self.confidences.append(confidence)

    def give(self, tokens: list[int]) -> None:
        """Tokens certain to be accepted (its guide forces them)."""
        self.tokens += tokens
        self.rows += [None] * len(tokens)
        self.confidences += [None] * len(tokens)

    def draft(self) -> Draft:
        """The Draft: with its distributions where a token was drawn (a given token's
        certain), else none (each token chosen for sure)."""
        drawn = [q for q in self.rows if q is not None]
        if not drawn:
            return Draft(self.tokens)
        rows = []
        for token, q in zip(self.tokens, self.rows, strict=True):
            if q is None:  # (narrowed: a scalar set through an index waits for its copy)
                q = torch.zeros_like(drawn[0])
                q.narrow(0, token, 1).fill_(1.0)
            rows.append(q)
        return Draft(self.tokens, torch.stack(rows))


class Calibration:
    """How the draft model's probabilities for its tokens have matched what the model
    accepted lately: the accepted tokens over the sum of those probabilities, over the
    verified draft tokens (each draft's up to its first rejected one), the older ones
    weighing less (a weight of DECAY per token since). A draft model that agrees with the
    model more often than its probabilities say (the model itself, say) scales them up, one
    that agrees less scales them down."""

    DECAY = 0.99  # about the last 100 verified draft tokens
    PRIOR = 4.0  # as if that many tokens had been accepted as often as their probabilities

    def __init__(self) -> None:
        self.accepted = self.expected = self.PRIOR

    def observe(self, confidences: list, accepted: int) -> None:
        """A draft whose tokens had these probabilities (None: a token its guide forced,
        which says nothing of the draft model), of which `accepted` were taken."""
        verified = confidences[: accepted + 1]
        for i, confidence in enumerate(verified):
            if confidence is not None:
                self.accepted = self.accepted * self.DECAY + (i < accepted)
                self.expected = self.expected * self.DECAY + confidence

    def scaled(self, confidence: float) -> float:
        """The chance a token of this probability is accepted, by that record."""
        return confidence * self.accepted / max(self.expected, 1e-9)


class Cutoff:
    """The chance below which a draft model's draft ends (DraftProposer.propose): fixed by
    --draft-min-confidence, or else measured: the draft model's step time over the
    model's, PRIOR until both are timed. Each is the median of its last WINDOW steps: the
    model's steps of decodes that verified drafts, and the draft model's steps but those
    that catch up on a prompt (a round's first step also computes the at most k + 1 tokens
    the model took, at about a decode's cost at the loads speculation runs at).

    Drafting one more token costs a step of the draft model (and a verified row, a
    fraction of a step, which the ratio leaves out); where it is accepted it saves about a
    step of the model, which that token would otherwise have taken. So where the chance
    that the draft so far is all accepted (the next token's is at most that) is below the
    ratio of the two times, the next token is expected to cost more than it saves. A cheap
    draft model drafts on where its tokens are doubtful; one that costs as much as the
    model, hardly at all. Medians, since on a shared host a step now and then takes many
    times its usual time."""

    PRIOR = 0.4
    WINDOW = 32

    def __init__(self, fixed: float | None) -> None:
        self.fixed = fixed
        self.draft_steps: deque[float] = deque(maxlen=self.WINDOW)
        self.model_steps: deque[float] = deque(maxlen=self.WINDOW)

    def drafted(self, seconds: float) -> None:
        self.draft_steps.append(seconds)

    def verified(self, seconds: float) -> None:
        self.model_steps.append(seconds)

    def value(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if not self.draft_steps or not self.model_steps:
            return self.PRIOR
        model = max(statistics.median(self.model_steps), 1e-9)
        return min(1.0, statistics.median(self.draft_steps) / model)


def check_draft(path: str, draft_vocab, vocab: int, draft_tokenizer, tokenizer) -> None:
    """Refuse a draft model whose token ids may mean other tokens than the model's. Where
    both have a tokenizer, their token -> id maps must be the same; then their vocabulary
    sizes may differ (the rows past the tokenizer's ids are padding, which model families
    pad to different multiples: DraftProposer cuts or pads the draft's logits to the
    model's). Where either has none, the sizes must be the same."""
    if draft_tokenizer is not None and tokenizer is not None:
        ours, theirs = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if ours != theirs:
            differ = sum(theirs.get(t) != i for t, i in ours.items()) + len(theirs.keys() - ours)
            raise LlmkitError(
                f"--speculative {path}: its tokenizer is not the model's ({differ} tokens have "
                "other ids or none); a draft model needs the model's tokenizer"
            )
        used = max(ours.values(), default=-1) + 1  # the ids a token has
        if isinstance(draft_vocab, int) and used <= min(draft_vocab, vocab):
            return
    if draft_vocab != vocab:
        raise LlmkitError(
            f"--speculative {path}: its vocabulary has {draft_vocab} tokens, the model's "
            f"{vocab}; a draft model needs the model's tokenizer"
        )


def _model_width(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """A draft model's logits over the model's `vocab` tokens: its columns past them cut,
    those it lacks at -inf (padding rows either way: check_draft)."""
    width = logits.shape[-1]
    if width > vocab:
        return logits[:, :vocab]
    if width < vocab:
        return torch.nn.functional.pad(logits, (0, vocab - width), value=float("-inf"))
    return logits

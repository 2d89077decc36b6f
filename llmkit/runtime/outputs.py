"""What the engine hands back for each request (and its speculative decoding counts), and
the prompt checks a caller can run before submitting one. Torch-free: the HTTP front end
imports this without the engine."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError


@dataclass(slots=True)
class Completion:
    """One of a request's n sequences, as far as it has got."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, lp)]}


@dataclass(slots=True)
class RequestTimes:
    """time.monotonic() of a request's milestones (None until reached)."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    finished: bool
    times: RequestTimes | None = None
    # per prompt token {"token_id", "logprob", "top"}; None for the first (nothing scores it)
    prompt_logprobs: list[dict | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # the engine failed this request alone (finished is then True)


def check_prompt_ids(ids: list[int], vocab: int, max_model_len: int) -> None:
    """Raise LlmkitError for prompt token ids a model with this vocabulary and context cannot
    take."""
    if not ids:
        raise LlmkitError("the prompt is empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise LlmkitError(f"prompt token ids must be integers in [0, {vocab})")
    if len(ids) >= max_model_len:
        raise LlmkitError(
            f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} "
            "tokens, which must hold the prompt and at least one generated token"
        )


@dataclass(slots=True)
class SpecStats:
    """Counts since the engine started: the proposer's draft tokens proposed and accepted,
    and its drafts verified (one per speculated sequence and step); apart from those, the
    tokens guides forced that were verified as drafts and accepted. By position in the
    draft (index 0: its first token): the drafts with a token there, and those whose tokens
    up to it were all accepted (tuples of the same length, so that a copy keeps its
    counts)."""

    proposed: int = 0
    accepted: int = 0
    drafts: int = 0
    forced: int = 0
    proposed_at: tuple[int, ...] = ()
    accepted_at: tuple[int, ...] = ()

    def record(self, drafts: list[list[int]], accepted: list[int]) -> None:
        proposed_at, accepted_at = list(self.proposed_at), list(self.accepted_at)
        for draft, n in zip(drafts, accepted, strict=True):
            if draft:
                self.proposed += len(draft)
                self.accepted += n
                self.drafts += 1
                _count_first(proposed_at, len(draft))
                _count_first(accepted_at, n)
        accepted_at.extend([0] * (len(proposed_at) - len(accepted_at)))
        self.proposed_at, self.accepted_at = tuple(proposed_at), tuple(accepted_at)

    def since(self, before: SpecStats) -> SpecStats:
        """The counts after `before` was taken."""
        return SpecStats(
            self.proposed - before.proposed,
            self.accepted - before.accepted,
            self.drafts - before.drafts,
            self.forced - before.forced,
            _minus(self.proposed_at, before.proposed_at),
            _minus(self.accepted_at, before.accepted_at),
        )

    @property
    def acceptance_by_position(self) -> list[float]:
        """Per draft position, the share of the drafts with a token there whose tokens up
        to it were all accepted."""
        return [a / p for a, p in zip(self.accepted_at, self.proposed_at, strict=True) if p]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens accepted per draft verified (each verification adds one more token
        of the model's own)."""
        return self.accepted / self.drafts if self.drafts else 0.0


def _count_first(counts: list[int], n: int) -> None:
    """Add one to each of counts' first n entries (growing it to n entries)."""
    counts.extend([0] * (n - len(counts)))
    for i in range(n):
        counts[i] += 1


def _minus(after: tuple[int, ...], before: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a - (before[i] if i < len(before) else 0) for i, a in enumerate(after))

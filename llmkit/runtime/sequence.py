"""A request's sequence as the scheduler and block manager see it (pure Python, no torch)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from llmkit.runtime.guide import Guide


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # its client is not reading: it holds no KV blocks and is not scheduled
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request; names and defaults follow the OpenAI API where it has them."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n log probabilities per generated token
    prompt_logprobs: int | None = None  # top-n log probabilities per prompt token (echo)
    n: int = 1
    priority: int = 0  # lower runs first under the priority policy
    guide: Guide | None = None  # structured outputs: what the output must match
    skip_special_tokens: bool = True  # False: special tokens (not EOS) are part of the text
    speculative: bool = True  # False: never speculate this request's tokens

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs must be in [0, 20]",
            ),
            (self.n >= 1, "n must be at least 1"),
            (isinstance(self.speculative, bool), "speculative must be true or false"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a repetition, frequency or presence penalty changes the logits."""
        return (
            self.repetition_penalty != 1
            or self.frequency_penalty != 0
            or self.presence_penalty != 0
        )


_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """Token ids so far (prompt, then generated) and how much of them the KV cache holds."""

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    parent: Sequence | None = None  # n > 1: siblings wait for the first one's prompt
    seed: int | None = None  # this sequence's sampling seed (the request's, + sibling index)
    lora_id: int = 0  # the LoRA adapter it runs with (0: the base model)
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, taken from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    num_hashed_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    num_preemptions: int = 0
    finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, stop: int) -> list[int]:
        """token_ids[start:stop] without building the whole list."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log probabilities are computed once per request, by its first sequence."""
        return self.params.prompt_logprobs is not None and self.parent is None

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


def ends_by_token(seq: Sequence, eos_token_ids: frozenset[int]) -> bool:
    """`seq`'s latest token is one that ends it (EOS or a stop token id); as in vLLM, that
    token is not part of the text."""
    p, last = seq.params, seq.output_token_ids[-1]
    return last in p.stop_token_ids or (last in eos_token_ids and not p.ignore_eos)


def stop_reason(seq: Sequence, eos_token_ids: frozenset[int], max_model_len: int) -> str | None:
    """Why `seq` ends after its latest token ("stop" or "length"), or None to go on."""
    if ends_by_token(seq, eos_token_ids):
        return "stop"
    p = seq.params
    if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None

"""How to run a model (torch-free, so the CLI can read its defaults at `llmkit --help`)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError

NGRAM = "ngram"  # --speculative's prompt-lookup proposer (a draft model is a path)
MAX_SPECULATIVE_TOKENS = 16
MAX_NGRAM = 16
MAX_DECODE_STEPS = 64
MAX_DECODE_CALL_MS = 10_000
ANY, DRAFT = "any", "draft"  # besides NGRAM, the proposers an option tunes: all, a draft model
# The options that tune speculation, by EngineConfig field, and the proposers they tune
# (--speculative-revision, which names a draft model's revision, is EngineConfig's check)
TUNES = {"num_speculative_tokens": ANY, "speculative_max_seqs": ANY, "ngram_min": NGRAM,
         "ngram_max": NGRAM, "draft_min_confidence": DRAFT}  # fmt: skip


def untuned(field: str, speculative: str | None) -> str | None:
    """What the option `field` (an EngineConfig field) tunes where `speculative` (NGRAM, a
    draft model, None: off) does not do that: ANY, NGRAM or DRAFT; None where it does (or
    the option tunes no speculation). A caller that knows the option was given refuses it."""
    wants = TUNES.get(field)
    proposer = None if speculative is None else NGRAM if speculative == NGRAM else DRAFT
    if wants is None or wants == proposer or (wants == ANY and proposer is not None):
        return None
    return wants


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to run a model; every default of the engine lives here."""

    tp: int = 1
    dtype: str = "auto"  # auto: the checkpoint's dtype; float16 becomes bfloat16 on CPU
    device: str = "auto"
    threads: int | None = None  # CPU threads over all tp ranks; None: torch's (the cores)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: enough for max_num_seqs full contexts
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    verify: bool = True  # check the weight files against llmkit-checksums.json when present
    max_loras: int = 0  # LoRA adapters loaded at once; 0: the model takes none
    max_lora_rank: int = 16
    speculative: str | None = None  # "ngram", or a draft model's path; None: off
    speculative_revision: str | None = None  # a hub id draft model's branch, tag or commit
    num_speculative_tokens: int = 4  # k: tokens proposed per sequence and step
    ngram_min: int = 1
    ngram_max: int = 4
    # a draft model's draft ends once the chance all its tokens are accepted is below this;
    # None: the draft model's step time over the model's, as measured (speculative.Cutoff)
    draft_min_confidence: float | None = None
    # steps with more decoding sequences than this do not speculate (benchmarks/speculative.py)
    speculative_max_seqs: int = 4
    # at most this many greedy decode steps run in one call where the whole step is C++
    # (CPU) or a CUDA graph (tp 1): fewer trips through the Python engine per token
    # (benchmarks/cpu_decode.py) ...
    decode_steps: int = 16
    # ... as many as fit in this many milliseconds at the speed of earlier steps of about
    # as many sequences (runtime/pacing.py); 0: always decode_steps
    decode_call_ms: float = 25.0
    # CUDA: no graphs; every decode step launches its kernels from Python
    enforce_eager: bool = False
    # start each step before detokenizing the step before and building its outputs, which
    # then overlap the model's work; None: on CUDA (where that work is launched), off on CPU
    async_output: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise LlmkitError(
                f"--num-speculative-tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max <= MAX_NGRAM:
            raise LlmkitError(f"--ngram-min {self.ngram_min} and --ngram-max {self.ngram_max} "
                              f"need 1 <= min <= max <= {MAX_NGRAM}")  # fmt: skip
        if not 1 <= self.decode_steps <= MAX_DECODE_STEPS:
            raise LlmkitError(f"--decode-steps must be between 1 and {MAX_DECODE_STEPS}")
        if not 0 <= self.decode_call_ms <= MAX_DECODE_CALL_MS:
            raise LlmkitError(f"--decode-call-ms must be between 0 and {MAX_DECODE_CALL_MS}")
        if self.speculative_revision is not None and self.speculative in (None, NGRAM):
            raise LlmkitError("--speculative-revision names a draft model's revision; give one")
        if self.speculative_max_seqs < 0:
            raise LlmkitError("--speculative-max-seqs must be >= 0")
        if self.draft_min_confidence is not None and not 0.0 <= self.draft_min_confidence <= 1:
            raise LlmkitError("--draft-min-confidence must be between 0 and 1")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise LlmkitError("--max-loras must be >= 0 and --max-lora-rank >= 1")
        if self.max_loras and self.tp > 1:
            raise LlmkitError("LoRA adapters run with --tp 1 only")

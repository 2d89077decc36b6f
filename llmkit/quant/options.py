"""Options of the integer quantization methods (torch-free: the CLI imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError

INTEGER_METHODS = ("int8", "w8a8", "rtn", "gptq", "awq")
CALIBRATED_METHODS = frozenset({"w8a8", "gptq", "awq"})
GPTQ_FORMAT_METHODS = frozenset({"rtn", "gptq"})
FLOAT16_METHODS = GPTQ_FORMAT_METHODS | {"awq"}  # formats whose dense tensors are fp16


@dataclass(frozen=True, slots=True)
class QuantOptions:
    """Options of the integer methods (each reads the ones that concern it)."""

    bits: int = 4  # rtn, gptq (awq: 4 only)
    group_size: int = 128  # rtn, gptq, awq; -1 for one group per output channel (not awq)
    sym: bool = True  # rtn, gptq (awq is always asymmetric)
    smooth_alpha: float = 0.5  # w8a8
    desc_act: bool = False  # gptq: act-order
    act_group_aware: bool = True  # gptq: group-aware reordering when not act-order
    static_groups: bool = False  # gptq
    clip_search: bool = True  # gptq, awq: search each group's range for the least error
    damp_percent: float = 0.01  # gptq
    true_sequential: bool = True  # gptq
    awq_grid: int = 20  # awq: α candidates for the scale search
    awq_duo_scaling: bool = False  # awq: scales from activation and weight magnitudes
    awq_search_tokens: int = 4096  # awq: calibration tokens each candidate is scored on
    quantize_lm_head: bool = False


def check_options(method: str, options: QuantOptions) -> None:
    if method in GPTQ_FORMAT_METHODS and options.bits not in (2, 3, 4, 8):
        raise LlmkitError(f"--bits {options.bits} is not supported by {method}; use 2, 3, 4 or 8")
    if not 0 < options.damp_percent <= 1:
        raise LlmkitError("--damp-percent must lie in (0, 1]")
    if method in ("gptq", "awq") and options.quantize_lm_head:
        raise LlmkitError(f"--quantize-lm-head is not supported with {method}; use rtn or int8")
    if method == "awq":
        _check_awq(options)
    if options.group_size == 0 or options.group_size < -1:
        raise LlmkitError("--group-size must be positive, or -1 for one group per channel")
    if not 0 <= options.smooth_alpha <= 1:
        raise LlmkitError("--smooth-alpha must lie in [0, 1]")


def _check_awq(options: QuantOptions) -> None:
    if options.bits != 4:
        raise LlmkitError(
            f"--bits {options.bits} is not supported by awq; the GEMM format is 4-bit"
        )
    if options.group_size == -1:
        raise LlmkitError("awq needs a positive --group-size (the GEMM format has no per-channel)")
    if options.awq_grid < 1:
        raise LlmkitError("--awq-grid must be at least 1")
    if options.awq_search_tokens < 1:
        raise LlmkitError("--awq-search-tokens must be at least 1")

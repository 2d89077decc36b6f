"""Options of the integer quantization methods (torch-free: the CLI imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError

INTEGER_METHODS = ("int8", "w8a8", "rtn", "gptq")
CALIBRATED_METHODS = frozenset({"w8a8", "gptq"})
GPTQ_FORMAT_METHODS = frozenset({"rtn", "gptq"})


@dataclass(frozen=True, slots=True)
class QuantOptions:
    """Options of the integer methods (each reads the ones that concern it)."""

    bits: int = 4  # rtn, gptq
    group_size: int = 128  # rtn, gptq; -1 for one group per output channel
    sym: bool = True  # rtn, gptq
    smooth_alpha: float = 0.5  # w8a8
    desc_act: bool = False  # gptq: act-order
    act_group_aware: bool = True  # gptq: group-aware reordering when not act-order
    static_groups: bool = False  # gptq
    clip_search: bool = True  # gptq: search each group's range for the least rounding error
    damp_percent: float = 0.01  # gptq
    true_sequential: bool = True  # gptq
    quantize_lm_head: bool = False


def check_options(method: str, options: QuantOptions) -> None:
    if method in GPTQ_FORMAT_METHODS and options.bits not in (2, 3, 4, 8):
        raise LlmkitError(f"--bits {options.bits} is not supported by {method}; use 2, 3, 4 or 8")
    if not 0 < options.damp_percent <= 1:
        raise LlmkitError("--damp-percent must lie in (0, 1]")
    if method == "gptq" and options.quantize_lm_head:
        raise LlmkitError("--quantize-lm-head is not supported with gptq; use rtn or int8")
    if options.group_size == 0 or options.group_size < -1:
        raise LlmkitError("--group-size must be positive, or -1 for one group per channel")
    if not 0 <= options.smooth_alpha <= 1:
        raise LlmkitError("--smooth-alpha must lie in [0, 1]")

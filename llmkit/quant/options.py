"""Options of the integer quantization methods (torch-free: the CLI imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError

INTEGER_METHODS = ("int8", "w8a8", "rtn")
CALIBRATED_METHODS = frozenset({"w8a8"})


@dataclass(frozen=True, slots=True)
class QuantOptions:
    """Options of the integer methods (each reads the ones that concern it)."""

    bits: int = 4  # rtn
    group_size: int = 128  # rtn; -1 for one group per output channel
    sym: bool = True  # rtn
    smooth_alpha: float = 0.5  # w8a8
    quantize_lm_head: bool = False


def check_options(method: str, options: QuantOptions) -> None:
    if method == "rtn" and options.bits not in (2, 4, 8):
        raise LlmkitError(f"--bits {options.bits} is not supported by rtn; use 2, 4 or 8")
    if options.group_size == 0 or options.group_size < -1:
        raise LlmkitError("--group-size must be positive, or -1 for one group per channel")
    if not 0 <= options.smooth_alpha <= 1:
        raise LlmkitError("--smooth-alpha must lie in [0, 1]")

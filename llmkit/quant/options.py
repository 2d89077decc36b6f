"""The quantization methods, one table, and their options (torch-free: the CLI and the
recipe schema import it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from llmkit.errors import LlmkitError


@dataclass(frozen=True, slots=True)
class Method:
    """What the pipeline, the CLI and the recipe schema know of a method by its name."""

    name: str
    cast_to: str | None = None  # a cast: the safetensors dtype every float tensor becomes
    calibrated: bool = False  # runs calibration text through the model
    # The format it writes: "gptq" and "awq" (their dense tensors are float16), or
    # "compressed-tensors"; None for a cast.
    packing: str | None = "compressed-tensors"
    bits: tuple[int, ...] = ()  # the --bits its format holds (none: it does not read --bits)
    lm_head: bool = True  # it can quantize the lm_head (--quantize-lm-head)
    per_channel: bool = True  # its format takes one group per output channel (--group-size -1)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fp16", cast_to="F16", packing=None),
        Method("bf16", cast_to="BF16", packing=None),
        Method("int8"),
        Method("w8a8", calibrated=True),
        Method("rtn", packing="gptq", bits=(2, 3, 4, 8)),
        Method("gptq", calibrated=True, packing="gptq", bits=(2, 3, 4, 8), lm_head=False),
        Method("awq", calibrated=True, packing="awq", bits=(4,), lm_head=False, per_channel=False),
    )
}
CAST_METHODS = {m.name: m.cast_to for m in METHODS.values() if m.cast_to}
INTEGER_METHODS = tuple(name for name in METHODS if name not in CAST_METHODS)
CALIBRATED_METHODS = frozenset(m.name for m in METHODS.values() if m.calibrated)
GPTQ_FORMAT_METHODS = frozenset(m.name for m in METHODS.values() if m.packing == "gptq")
FLOAT16_METHODS = frozenset(m.name for m in METHODS.values() if m.packing in ("gptq", "awq"))


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
    """Refuse options the method's table entry, or any method, cannot take (before any
    weight is read)."""
    m = METHODS[method]
    if m.bits and options.bits not in m.bits:
        *most, last = map(str, m.bits)
        hint = f"use {', '.join(most)} or {last}" if most else f"its format is {last}-bit"
        raise LlmkitError(f"--bits {options.bits} is not supported by {method}; {hint}")
    if not 0 < options.damp_percent <= 1:
        raise LlmkitError("--damp-percent must lie in (0, 1]")
    if options.quantize_lm_head and not m.lm_head:
        raise LlmkitError(f"--quantize-lm-head is not supported with {method}; use rtn or int8")
    if options.group_size == -1 and not m.per_channel:
        raise LlmkitError(f"{method} needs a positive --group-size (its format has no per-channel)")
    if options.awq_grid < 1:
        raise LlmkitError("--awq-grid must be at least 1")
    if options.awq_search_tokens < 1:
        raise LlmkitError("--awq-search-tokens must be at least 1")
    if options.group_size == 0 or options.group_size < -1:
        raise LlmkitError("--group-size must be positive, or -1 for one group per channel")
    if not 0 <= options.smooth_alpha <= 1:
        raise LlmkitError("--smooth-alpha must lie in [0, 1]")


def settings_of(cls, options: QuantOptions):
    """An algorithm's settings (a dataclass): every field QuantOptions has too, by name, so
    that no option can be dropped on the way to the algorithm."""
    shared = {f.name for f in fields(cls)} & {f.name for f in fields(QuantOptions)}
    return cls(**{name: getattr(options, name) for name in shared})

"""The quantization methods, one table, and each method's options: one dataclass per method,
the only place its defaults live. The CLI's `quantize` flags and the recipe schema are built
from these dataclasses (torch-free: both import this module before any model code)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from llmkit.errors import LlmkitError


def option(
    default: Any,
    help: str,
    flag: str | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
):
    """A method option: its default, its help, its CLI flag (`--name` unless given, e.g.
    `--sym/--asym`), and a check with the rule it states."""
    return field(default=default, metadata={"help": help, "flag": flag, "check": check})


@dataclass(frozen=True)
class MethodOptions:
    """What every method's options class is (a cast takes none)."""


@dataclass(frozen=True)
class LmHead(MethodOptions):
    quantize_lm_head: bool = option(False, "Quantize lm_head too.", "--quantize-lm-head")


@dataclass(frozen=True)
class Groups(MethodOptions):
    bits: int = option(4, "Weight bits.")
    group_size: int = option(
        128,
        "Inputs per scale; -1 for one per output channel.",
        check=(lambda v: v > 0 or v == -1, "must be positive, or -1 for one group per channel"),
    )


@dataclass(frozen=True)
class Grid(Groups):
    sym: bool = option(True, "Symmetric or asymmetric grid.", "--sym/--asym")


@dataclass(frozen=True)
class ClipSearch(MethodOptions):
    clip_search: bool = option(
        True, "Search each group's range for the least error.", "--clip-search/--no-clip-search"
    )


@dataclass(frozen=True)
class Int8Options(LmHead):
    """`int8`: weight-only per-channel int8."""


@dataclass(frozen=True)
class W8A8Options(LmHead):
    """`w8a8`: SmoothQuant, int8 weights and per-token int8 activations."""

    smooth_alpha: float = option(
        0.5, "SmoothQuant migration strength.", check=(lambda v: 0 <= v <= 1, "must lie in [0, 1]")
    )
    w8a8_gptq: bool = option(
        True,
        "Round the smoothed int8 weights by GPTQ (else to nearest).",
        "--w8a8-gptq/--no-w8a8-gptq",
    )


@dataclass(frozen=True)
class RTNOptions(LmHead, Grid):
    """`rtn`: round-to-nearest groups."""


@dataclass(frozen=True)
class GPTQOptions(ClipSearch, Grid):
    """`gptq`."""

    desc_act: bool = option(
        False, "Act-order: quantize inputs by falling Hessian diagonal.", "--desc-act"
    )
    act_group_aware: bool = option(
        True,
        "Without act-order, visit important groups first; g_idx stays trivial.",
        "--act-group-aware/--no-act-group-aware",
    )
    static_groups: bool = option(False, "Fit group scales before any update.", "--static-groups")
    damp_percent: float = option(
        0.01,
        "Hessian damping, a fraction of its mean diagonal.",
        check=(lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    )
    true_sequential: bool = option(
        True,
        "Take each stage's inputs after the earlier stages are quantized.",
        "--true-sequential/--no-true-sequential",
    )


@dataclass(frozen=True)
class AWQOptions(ClipSearch, Groups):
    """`awq` (always asymmetric, 4-bit)."""

    awq_grid: int = option(
        20, "Scale exponents α tried by the AWQ search.", check=(lambda v: v >= 1, "must be ≥ 1")
    )
    awq_duo_scaling: bool = option(
        True,
        "Scales from activation and weight magnitudes (else from activations alone).",
        "--awq-duo-scaling/--no-awq-duo-scaling",
    )
    awq_search_tokens: int = option(
        4096,
        "Calibration tokens each AWQ scale candidate is scored on.",
        check=(lambda v: v >= 1, "must be ≥ 1"),
    )


@dataclass(frozen=True, slots=True)
class Method:
    """What the pipeline, the CLI and the recipe schema know of a method by its name."""

    name: str
    options: type[MethodOptions] = MethodOptions  # its options (none: a cast)
    cast_to: str | None = None  # a cast: the safetensors dtype every float tensor becomes
    calibrated: bool = False  # runs calibration text through the model
    # The format it writes: "gptq" and "awq" (their dense tensors are float16), or
    # "compressed-tensors"; None for a cast.
    packing: str | None = "compressed-tensors"
    bits: tuple[int, ...] = ()  # the --bits its format holds
    per_channel: bool = True  # its format takes one group per output channel (--group-size -1)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fp16", cast_to="F16", packing=None),
        Method("bf16", cast_to="BF16", packing=None),
        Method("int8", Int8Options),
        Method("w8a8", W8A8Options, calibrated=True),
        Method("rtn", RTNOptions, packing="gptq", bits=(2, 3, 4, 8)),
        Method("gptq", GPTQOptions, calibrated=True, packing="gptq", bits=(2, 3, 4, 8)),
        Method("awq", AWQOptions, calibrated=True, packing="awq", bits=(4,), per_channel=False),
    )
}
CAST_METHODS = {m.name: m.cast_to for m in METHODS.values() if m.cast_to}
INTEGER_METHODS = tuple(name for name in METHODS if name not in CAST_METHODS)
CALIBRATED_METHODS = frozenset(m.name for m in METHODS.values() if m.calibrated)
GPTQ_FORMAT_METHODS = frozenset(m.name for m in METHODS.values() if m.packing == "gptq")
FLOAT16_METHODS = frozenset(m.name for m in METHODS.values() if m.packing in ("gptq", "awq"))


def flag(name: str) -> str:
    """The CLI flag of option `name` (its first spelling: `--sym` of `--sym/--asym`)."""
    spelled = _spec(name).metadata["flag"]
    return spelled.split("/")[0] if spelled else "--" + name.replace("_", "-")


def option_types(cls: type[MethodOptions]) -> dict[str, Any]:
    """Each option of `cls` and its type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def options_for(method: str, **values: Any) -> MethodOptions:
    """`method`'s options with `values` set; an option the method does not take is refused
    by its flag."""
    cls = METHODS[method].options
    names = [f.name for f in fields(cls)]
    for name in values:
        if name not in names:
            takes = ", ".join(flag(n) for n in names) or "no options"
            raise LlmkitError(f"{flag(name)} does not apply to {method} (it takes {takes})")
    return cls(**values)


def quantizes_lm_head(options: MethodOptions) -> bool:
    return getattr(options, "quantize_lm_head", False)


def check_options(method: str, options: MethodOptions) -> None:
    """Refuse options that are not `method`'s, or that its table entry or an option's own
    rule cannot take (before any weight is read)."""
    m = METHODS[method]
    if type(options) is not m.options:
        raise LlmkitError(f"{method} takes {m.options.__name__}, not {type(options).__name__}")
    for f in fields(options):
        value, check = getattr(options, f.name), f.metadata["check"]
        if check is not None and not check[0](value):
            raise LlmkitError(f"{flag(f.name)} {check[1]} (got {value})")
    bits = getattr(options, "bits", None)
    if bits is not None and bits not in m.bits:
        *most, last = map(str, m.bits)
        hint = f"use {', '.join(most)} or {last}" if most else f"its format is {last}-bit"
        raise LlmkitError(f"--bits {bits} is not supported by {method}; {hint}")
    if getattr(options, "group_size", None) == -1 and not m.per_channel:
        raise LlmkitError(f"{method} needs a positive --group-size (its format has no per-channel)")


def settings_of(cls, options: MethodOptions):
    """An algorithm's settings (a dataclass): every field the options have too, by name, so
    that no option can be dropped on the way to the algorithm."""
    shared = {f.name for f in fields(cls)} & {f.name for f in fields(options)}
    return cls(**{name: getattr(options, name) for name in shared})


def _spec(name: str):
    """The dataclass field of option `name`, from the first method that takes it."""
    for m in METHODS.values():
        for f in fields(m.options):
            if f.name == name:
                return f
    raise KeyError(name)

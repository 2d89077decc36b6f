"""Casting to half precision: the floating-point "method" with an overflow guard."""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError


def cast(x: torch.Tensor, dtype: torch.dtype, clamp: bool = False) -> tuple[torch.Tensor, int]:
    """Cast `x` to `dtype`; returns (result, number of finite values beyond dtype's range).

    Out-of-range values would become ±inf; with `clamp` they saturate at ±max instead.
    """
    limit = torch.finfo(dtype).max
    if not x.is_floating_point() or torch.finfo(x.dtype).max <= limit or x.numel() == 0:
        return x.to(dtype), 0
    low, high = torch.aminmax(x)
    if -limit <= low and high <= limit:  # also False when NaN is present: then count below
        return x.to(dtype), 0
    over = int(((x.abs() > limit) & torch.isfinite(x)).sum())
    if over and clamp:
        x = torch.where(torch.isfinite(x), x.clamp(-limit, limit), x)
    return x.to(dtype), over


def checked_cast(
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    advice: str,
    clamp: bool = False,
    clamped: dict[str, int] | None = None,
) -> torch.Tensor:
    """`tensor` cast to `dtype`, refusing values beyond its range (one line naming the tensor,
    ending in `advice`), or with `clamp` saturating them and counting them in `clamped`."""
    result, over = cast(tensor, dtype, clamp)
    if over and not clamp:
        raise LlmkitError(
            f"tensor {name!r} has {over} values beyond {str(dtype).removeprefix('torch.')}'s "
            f"range (|x| > {torch.finfo(dtype).max:g}, max |x| = "
            f"{float(tensor.abs().max()):.6g}); {advice}"
        )
    if over and clamped is not None:
        clamped[name] = clamped.get(name, 0) + over
    return result

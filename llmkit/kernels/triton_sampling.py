"""A seeded row's split draw on CUDA (runtime/layers/sampler.py, `_split_draw`) in one launch:
each program descends one row's cumulative weights, a halving per uniform, where tensor
operations would take several launches per halving for a step's rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _descend_kernel(cdf, u, out, width, levels):
    row = tl.program_id(0).to(tl.int64)
    lo = row * 0  # an int64 scalar
    hi = lo + width - 1
    for level in range(0, levels):
        mid = (lo + hi) // 2
        base = tl.load(cdf + row * width + lo)
        lower = tl.load(u + row * levels + level) * (tl.load(cdf + row * width + hi) - base) < (
            tl.load(cdf + row * width + mid) - base
        )
        split = hi - lo > 1
        hi = tl.where(split & lower, mid, hi)
        lo = tl.where(lower, lo, tl.where(split, mid, lo))
    tl.store(out + row, lo)


def descend(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's token of `cdf` [rows, vocab + 1] float64 (its cumulative weights after a
    0) for its uniforms `u` [rows, levels] float64: the token sampler._descend takes from
    the row's weights (the same halves' weights, summed otherwise)."""
    rows, levels = u.shape
    out = torch.empty(rows, dtype=torch.long, device=cdf.device)
    if rows:
        # products and differences rounded apart, as the torch path's
        _descend_kernel[(rows,)](cdf.contiguous(), u.contiguous(), out, cdf.shape[1], levels,
                                 num_warps=1, enable_fp_fusion=False)  # fmt: skip
    return out

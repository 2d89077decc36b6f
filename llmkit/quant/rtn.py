"""Round-to-nearest group quantization: the data-free baseline GPTQ and AWQ must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class GroupQuant:
    """w[o, i] ≈ scales[o, g] * (q[o, i] - zeros[o, g]) with g = i // group_size.

    q: uint8 [out, in] in [0, 2**bits - 1]; scales: [out, groups]; zeros: int32 [out, groups].
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g_idx = torch.arange(self.q.shape[1], device=self.q.device) // self.group_size
        return dequantize_indexed(self.q, self.scales, self.zeros, g_idx).to(dtype)


def group_params(
    w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros for rows of `w` (each row one group): w [rows, n] -> ([rows], [rows]).

    The range always includes 0 (as GPTQ does). Symmetric: zero is the grid's midpoint.
    `min_zero` lets formats that cannot store zero 0 (GPTQ v1 stores zero - 1) raise it.
    """
    wf = w.detach().float()
    return range_params(wf.amin(dim=1), wf.amax(dim=1), bits, sym, scale_dtype, min_zero)


def range_params(
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    min_zero: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_params` from each group's minimum and maximum (any shape)."""
    maxq = 2**bits - 1
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    span = torch.where(xmax > xmin, xmax - xmin, torch.ones_like(xmax))
    scale = (span / maxq).to(scale_dtype).float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


FACTORS_AT_ONCE = 5
DEQUANTIZE_ROWS = 64
# On CUDA a loop's cost is mostly its kernel launches, however many rows each holds: loops over
# blocks of rows (or of search factors) take as many at once as this many bytes of float32 hold.
CUDA_BLOCK_BYTES = 2**28


def rows_at_once(in_features: int, device: torch.device, rows: int) -> int:
    """Rows of `in_features` a loop takes at a time: `rows` on the CPU (bounded temporaries,
    no loss of speed); on CUDA as many as CUDA_BLOCK_BYTES of float32 hold, `rows` at least."""
    if device.type != "cuda":
        return rows
    return max(rows, CUDA_BLOCK_BYTES // (4 * in_features))


def searched_group_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    min_zero: int = 0,
    steps: int = 20,
    min_shrink: float = 0.5,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_params` with the range shrunk by the factor in [min_shrink, 1] that minimizes each
    row's rounding error sum |w - ŵ|^norm: clipping a few outliers buys finer steps.
    Factors are tried a batch at a time, each batch in one vectorized pass: FACTORS_AT_ONCE
    on the CPU, on CUDA as many as `rows_at_once` allows copies of w. Any batching picks
    alike: a factor wins only by a strictly smaller error, so ties go to the earlier one."""
    wf = w.detach().float()
    low, high = wf.amin(dim=1), wf.amax(dim=1)
    at_once = rows_at_once(wf.numel(), wf.device, FACTORS_AT_ONCE)
    best_scale = best_zero = best_error = None
    for f in torch.linspace(1, min_shrink, steps).to(wf.device)[:, None].split(at_once):
        # shrinking w by f shrinks its range by f
        scale, zero = range_params(low * f, high * f, bits, sym, scale_dtype, min_zero)
        s, z = scale[..., None], zero[..., None]
        error = (wf[None] / s).round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s)
        error = error.sub_(wf[None]).abs_().pow_(norm).sum(-1)
        error, pick = error.min(dim=0)
        scale, zero = scale.gather(0, pick[None])[0], zero.gather(0, pick[None])[0]
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
            continue
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.minimum(error, best_error)
    return best_scale, best_zero


def quantize_groups(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    min_zero: int = 0,
) -> GroupQuant:
    """RTN of w: [out, in] with groups of `group_size` input channels (-1: one group a row)."""
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    if in_features % size:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {size}")
    groups = w.reshape(out_features * (in_features // size), size)
    scale, zero = group_params(groups, bits, sym, scale_dtype, min_zero)
    q = torch.round(groups.float() / scale[:, None]) + zero[:, None]
    q = q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(out_features, in_features)
    shape = (out_features, in_features // size)
    return GroupQuant(
        q, scale.to(scale_dtype).reshape(shape), zero.to(torch.int32).reshape(shape), bits, size
    )


def dequantize_indexed(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """float32 w[o, i] = scales[o, g] * (q[o, i] - zeros[o, g]) with g = g_idx[i], for any
    assignment of inputs to groups (act-order included). q: [out, in]; scales, zeros:
    [out, groups]. Beyond the result, holds only a block of rows at a time (`rows_at_once`)."""
    groups = g_idx.long()
    weight = q.float()
    step = rows_at_once(weight.shape[1], weight.device, DEQUANTIZE_ROWS)
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        weight[rows].sub_(zeros[rows].float()[:, groups]).mul_(scales[rows].float()[:, groups])
    return weight

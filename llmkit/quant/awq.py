"""AWQ: activation-aware weight quantization (Lin et al., 2023) as tensor math.

Inputs with large mean |x| matter most, so before rounding, each such input channel's weight
column is scaled up by s (and the input divided by s, folded into whatever produces it):
rounding then costs those columns relatively less. s = mean|x|^α, with α picked from a grid by
the error of the block's *output* on calibration data; then each group's clipping range is
searched for the least output error, and the weights are quantized asymmetrically in groups.

Shapes: W [out, in]; x [..., in]; s [in]. The decoder-layer wiring lives in methods/awq.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.quant import rtn
from llmkit.quant.options import AWQOptions

_OPTIONS = AWQOptions()  # the user-facing defaults
BITS = 4
CLIP_TOKENS = 512  # calibration tokens each Linear's clipping search scores with
# bound on the clipping search's [groups, tokens, outputs] temporary on the CPU (on CUDA,
# rtn.rows_at_once's larger one: a loop's cost there is its launches)
CLIP_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class AWQSettings:
    """AWQ's settings; the defaults of those a user sets are AWQOptions'."""

    group_size: int = _OPTIONS.group_size
    awq_grid: int = _OPTIONS.awq_grid  # α in {0, 1/grid, ..., (grid-1)/grid}
    # s = mean|x|^α / mean|w|^(1-α) instead of mean|x|^α
    awq_duo_scaling: bool = _OPTIONS.awq_duo_scaling
    clip_search: bool = _OPTIONS.clip_search
    max_shrink: float = 0.5  # the clipping search tries ranges down to this fraction
    clip_grid: int = 20  # ... in steps of 1/clip_grid


class ChannelMean:
    """Running mean of |x| per input channel over batches [..., in]."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        sums = flat.abs().sum(0, dtype=torch.float64)
        self.total = sums if self.total is None else self.total + sums
        self.count += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w as its 4-bit asymmetric group quantization computes (float32)."""
    return rtn.quantize_groups(w.float(), BITS, group_size, sym=False).dequantize()


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel mean of |w| relative to its group's largest |w| (duo scaling)."""
    w = torch.cat([x.detach().float() for x in weights])
    groups = w.abs().reshape(-1, group_size)
    relative = groups / (groups.amax(dim=1, keepdim=True) + 1e-6)
    return relative.reshape(w.shape).mean(0)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """s for one α, normalized so that max(s) · min(s) = 1."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True, slots=True)
class ScaleSearch:
    scales: torch.Tensor  # [in]
    alpha: float
    loss: float  # block output MSE with the chosen scales
    loss_unscaled: float  # ... without scales (plain round-to-nearest)


def search_scales(
    linears: list[nn.Linear],
    x_mean: torch.Tensor,
    block: Callable[[], torch.Tensor],
    reference: torch.Tensor,
    settings: AWQSettings,
) -> ScaleSearch:
    """The α whose scales give the least MSE between `block()` (computed with `linears` set
    to their scaled, quantized, unscaled weights) and `reference`; no scales at all (plain
    rounding, reported as α 0) are a candidate too, first. The weights are restored."""
    originals = [linear.weight.data for linear in linears]
    w_mean = weight_mean(originals, settings.group_size) if settings.awq_duo_scaling else None
    x_mean = x_mean.to(originals[0].device)
    candidates = [(0.0, torch.ones_like(x_mean))]
    first = 1 if w_mean is None else 0  # without duo scaling, α 0 is no scales
    for step in range(first, settings.awq_grid):
        alpha = step / settings.awq_grid
        candidates.append((alpha, candidate_scales(x_mean, w_mean, alpha)))
    best = None
    losses = []
    try:
        for alpha, s in candidates:
            for linear, w in zip(linears, originals, strict=True):
                scaled = fake_quantize(w * s, settings.group_size) / s
                linear.weight.data = scaled.to(w.dtype)
            loss = float((block() - reference).float().pow(2).mean())
            losses.append(loss)
            if best is None or loss < best[0]:
                best = (loss, alpha, s)
    finally:
        for linear, w in zip(linears, originals, strict=True):
            linear.weight.data = w
    loss, alpha, s = best
    return ScaleSearch(s, alpha, loss, losses[0])


def clip_sample(x: torch.Tensor, tokens: int = CLIP_TOKENS) -> torch.Tensor:
    """`tokens` evenly spaced rows of x [..., in] -> [tokens, in]."""
    flat = x.reshape(-1, x.shape[-1])
    return flat[:: max(1, flat.shape[0] // tokens)][:tokens]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, settings: AWQSettings) -> torch.Tensor:
    """Per (output, group) clipping bound max|w| · (1 - k / clip_grid), k < max_shrink ·
    clip_grid, with the least error of that group's share of the output on x [tokens, in].
    -> [out, groups]."""
    out_features, in_features = w.shape
    size = settings.group_size
    groups = in_features // size
    xg = x.float().reshape(-1, groups, size).transpose(0, 1)  # [groups, tokens, size]
    per_row = groups * xg.shape[1]  # the temporary's float32 values for each output
    chunk = rtn.rows_at_once(per_row, w.device, max(1, CLIP_CHUNK_BYTES // (4 * per_row)))
    bounds = []
    for rows in range(0, out_features, chunk):
        wg = w[rows : rows + chunk].float().reshape(-1, groups, size)  # [o, groups, size]
        bounds.append(_clip_rows(wg, xg, settings))
    return torch.cat(bounds)


def _clip_rows(wg: torch.Tensor, xg: torch.Tensor, settings: AWQSettings) -> torch.Tensor:
    reference = torch.bmm(xg, wg.permute(1, 2, 0))  # [groups, tokens, o]
    full = wg.abs().amax(dim=2)  # [o, groups]
    best_bound, best_error = full.clone(), None
    for k in range(int(settings.max_shrink * settings.clip_grid)):
        bound = full * (1 - k / settings.clip_grid)
        clipped = _clamp_groups(wg, bound)
        q = fake_quantize(clipped.reshape(-1, settings.group_size), settings.group_size)
        out = torch.bmm(xg, q.reshape(wg.shape).permute(1, 2, 0))
        error = (out - reference).pow(2).mean(dim=1).t()  # [o, groups]
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_bound = torch.where(better, bound, best_bound)
        best_error = torch.minimum(error, best_error)
    return best_bound


def apply_clip(w: torch.Tensor, bound: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [out, in] with each group clamped to ±bound [out, groups]."""
    return _clamp_groups(w.float().reshape(w.shape[0], -1, group_size), bound).reshape(w.shape)


def _clamp_groups(groups: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """groups [out, groups, size] clamped to ±bound [out, groups]."""
    return torch.clamp(groups, -bound[..., None], bound[..., None])

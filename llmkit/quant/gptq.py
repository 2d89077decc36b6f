"""GPTQ: quantize a Linear's weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs
(Frantar et al., 2022). Tensor in, tensor out; the format lives in formats/gptq.py.

Shapes: W [out, in]; H [in, in] = 2 X Xᵀ / n over the n calibration tokens X [in, n].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.quant.rtn import group_params

BLOCK_SIZE = 128
ERROR_ROWS = 256
MAX_DAMP_PERCENT = 1.0


class Hessian:
    """Accumulates H = 2 X Xᵀ / n in float32 from batches of inputs [..., in]."""

    def __init__(self, in_features: int, device: torch.device):
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)
        # Running mean keeps the magnitude bounded however many tokens arrive.
        total = self.num_tokens + x.shape[0]
        self.matrix.mul_(self.num_tokens / total).addmm_(x.T, x, alpha=2 / total)
        self.num_tokens = total


@dataclass(frozen=True, slots=True)
class GPTQResult:
    """q: uint8 [out, in] (original column order); scales, zeros: [out, groups];
    g_idx: int32 [in]; damp_percent actually used."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    damp_percent: float

    def dequantize(self) -> torch.Tensor:
        groups = self.g_idx.long()
        weight = self.q.float()
        weight.sub_(self.zeros.float()[:, groups])  # one [out, in] temporary at a time
        return weight.mul_(self.scales.float()[:, groups])


@dataclass(frozen=True, slots=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    min_zero: int = 1  # GPTQ v1 stores zero - 1


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    settings: GPTQSettings,
    name: str = "",
    warn: Callable[[str], None] | None = None,
) -> GPTQResult:
    """GPTQ of `weight` [out, in] given `hessian` [in, in]."""
    W = weight.detach().to(hessian.device, torch.float32).clone()
    in_features = W.shape[1]
    group_size = in_features if settings.group_size == -1 else settings.group_size
    dead = torch.diag(hessian) == 0  # inputs that were always zero: nothing to preserve
    W[:, dead] = 0
    static = _static_params(W, group_size, settings) if settings.static_groups else None
    perm = torch.argsort(torch.diag(hessian), descending=True) if settings.desc_act else None
    if perm is not None:
        W = W[:, perm]

    def prepared() -> torch.Tensor:  # H in sweep order, dead inputs given a unit diagonal
        H = hessian[perm][:, perm] if perm is not None else hessian.clone()
        kept = dead[perm] if perm is not None else dead
        H[kept, kept] = 1
        return H

    hinv, damp = _inverse_hessian_factor(prepared, settings.damp_percent, name, warn)
    q, scales, zeros, group_of = _quantize_columns(W, hinv, group_size, settings, static, perm)
    g_idx = torch.as_tensor(group_of, dtype=torch.int32)
    if perm is not None:
        inverse = torch.argsort(perm)
        q, g_idx = q[:, inverse], g_idx[inverse]
    return GPTQResult(q.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(), damp)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - Ŵ) X||² / ||W X||², from H ∝ X Xᵀ (in row blocks: no [out, in] temporaries)."""
    num = den = 0.0
    for rows in range(0, weight.shape[0], ERROR_ROWS):
        w = weight[rows : rows + ERROR_ROWS].detach().to(hessian.device, torch.float32)
        delta = w - approx[rows : rows + ERROR_ROWS].to(hessian.device, torch.float32)
        num += float(((delta @ hessian) * delta).sum())
        den += float(((w @ hessian) * w).sum())
    return num / den if den > 0 else 0.0


def _inverse_hessian_factor(
    prepared: Callable[[], torch.Tensor],
    damp_percent: float,
    name: str,
    warn: Callable[[str], None] | None,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), raising damp until H
    factorizes (a warning names the module). Factorizes in place: one n x n matrix at a time,
    rebuilt by `prepared()` for each attempt."""
    damp = damp_percent
    info = torch.empty((), dtype=torch.int32)
    while True:
        H = prepared()
        H.diagonal().add_(damp * float(H.diagonal().mean()))
        torch.linalg.cholesky_ex(H, out=(H, info))
        if int(info) == 0:
            torch.cholesky_inverse(H, out=H)
            torch.linalg.cholesky_ex(H, upper=True, out=(H, info))
            if int(info) == 0:
                return H, damp
        del H
        if damp >= MAX_DAMP_PERCENT:
            raise ValueError(f"{name}: the Hessian is not positive definite even at damp {damp}")
        damp = min(damp * 2, MAX_DAMP_PERCENT)
        if warn is not None:
            warn(f"{name}: Cholesky failed, retrying with damp_percent {damp:g}")


def _static_params(W: torch.Tensor, group_size: int, settings: GPTQSettings):
    """Group parameters fitted once, on the weights before any GPTQ update (--static-groups)."""
    out_features, in_features = W.shape
    groups = W.reshape(out_features, in_features // group_size, group_size)
    scale, zero = group_params(
        groups.permute(1, 0, 2).reshape(-1, group_size),
        settings.bits,
        settings.sym,
        torch.float16,
        settings.min_zero,
    )
    shape = (in_features // group_size, out_features)
    return scale.reshape(shape).t(), zero.reshape(shape).t()


def _quantize_columns(W, hinv, group_size, settings, static, perm):
    """The GPTQ sweep over (permuted) columns, in blocks of BLOCK_SIZE with lazy updates."""
    in_features = W.shape[1]
    maxq = 2**settings.bits - 1
    Q = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)
    scales, zeros, group_of = [], [], [0] * in_features
    scale = zero = None
    for i1 in range(0, in_features, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, in_features)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if static is not None:
                original = int(perm[column]) if perm is not None else column
                group_of[column] = original // group_size
                scale, zero = (p[:, group_of[column]] for p in static)
            elif column % group_size == 0:
                # Fit the group to its columns as they are now, updates so far included.
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                scale, zero = group_params(
                    current, settings.bits, settings.sym, torch.float16, settings.min_zero
                )
                scales.append(scale)
                zeros.append(zero)
            if static is None:
                group_of[column] = column // group_size
            w = W1[:, i]
            q = (torch.round(w / scale) + zero).clamp(0, maxq)
            Q[:, column] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    if static is not None:
        return Q, static[0].to(torch.float16), static[1].to(torch.int32), group_of
    return (
        Q,
        torch.stack(scales, dim=1).to(torch.float16),
        torch.stack(zeros, dim=1).to(torch.int32),
        group_of,
    )

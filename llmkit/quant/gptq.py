"""GPTQ: quantize a Linear's weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs
(Frantar et al., 2022). Tensor in, tensor out; the format lives in formats/gptq.py.

Shapes: W [out, in]; H [in, in] = 2 X Xᵀ / n over the n calibration tokens X [in, n].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.quant.rtn import dequantize_indexed, group_params, searched_group_params

BLOCK_SIZE = 128
ERROR_ROWS = 256
MAX_DAMP_PERCENT = 1.0


class Hessian:
    """Accumulates H = 2 X Xᵀ / n in float32 from batches of inputs [..., in].

    H is symmetric, so only its upper blocks are accumulated (for 2048 inputs in blocks of
    512, 10 of 16 products) and mirrored once when `matrix` is first read."""

    BLOCK = 512

    def __init__(self, in_features: int, device: torch.device):
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._full: torch.Tensor | None = None
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if self._full is not None:
            raise RuntimeError("Hessian already read; it takes no more inputs")
        x = x.reshape(-1, x.shape[-1]).to(self._upper.device, torch.float32)
        # Running mean keeps the magnitude bounded however many tokens arrive.
        total = self.num_tokens + x.shape[0]
        self._upper.mul_(self.num_tokens / total)
        n = x.shape[1]
        for i in range(0, n, self.BLOCK):
            rows = slice(i, min(i + self.BLOCK, n))
            self._upper[rows, i:].addmm_(x[:, rows].T, x[:, i:], alpha=2 / total)
        self.num_tokens = total

    @property
    def matrix(self) -> torch.Tensor:
        if self._full is None:
            full = self._upper
            lower = torch.tril(torch.ones_like(full, dtype=torch.bool), diagonal=-1)
            full[lower] = full.T[lower]
            self._full = full
        return self._full


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
        return dequantize_indexed(self.q, self.scales, self.zeros, self.g_idx)


@dataclass(frozen=True, slots=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    desc_act: bool = False
    # Without act-order: visit groups by their largest H diagonal entry and columns within a
    # group by theirs, keeping every group's columns together, so g_idx stays i // group_size
    # (group-aware reordering, Gafni et al. 2025; GPTQModel's default).
    act_group_aware: bool = True
    static_groups: bool = False
    # Fit each group's range by searching shrink factors for the least rounding error
    # (GPTQModel's `mse` option, off there by default).
    clip_search: bool = True
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
    perm = _column_order(torch.diag(hessian), group_size, settings)
    if perm is not None:
        W = W[:, perm]
    # Each sweep position's group: act-order groups follow the sweep; otherwise (and for
    # static groups) a column keeps the group of its original index.
    positions = torch.arange(in_features, device=W.device)
    original = perm if perm is not None else positions
    group_of = (positions if settings.desc_act and static is None else original) // group_size

    def prepared() -> torch.Tensor:  # H in sweep order, dead inputs given a unit diagonal
        H = hessian[perm][:, perm] if perm is not None else hessian.clone()
        kept = dead[perm] if perm is not None else dead
        H[kept, kept] = 1
        return H

    hinv, damp = _inverse_hessian_factor(prepared, settings.damp_percent, name, warn)
    q, scales, zeros = _quantize_columns(W, hinv, group_size, settings, static, group_of)
    g_idx = group_of.to(torch.int32)
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
            raise LlmkitError(
                f"{name}: the Hessian is not positive definite even at damp {damp}; "
                f"check the model and calibration data for NaN or inf activations"
            )
        damp = min(damp * 2, MAX_DAMP_PERCENT)
        if warn is not None:
            warn(f"{name}: Cholesky failed, retrying with damp_percent {damp:g}")


def _static_params(W: torch.Tensor, group_size: int, settings: GPTQSettings):
    """Group parameters fitted once, on the weights before any GPTQ update (--static-groups)."""
    out_features, in_features = W.shape
    groups = W.reshape(out_features, in_features // group_size, group_size)
    fit = searched_group_params if settings.clip_search else group_params
    scale, zero = fit(
        groups.permute(1, 0, 2).reshape(-1, group_size),
        settings.bits,
        settings.sym,
        torch.float16,
        settings.min_zero,
    )
    shape = (in_features // group_size, out_features)
    return scale.reshape(shape).t(), zero.reshape(shape).t()


def _column_order(diag: torch.Tensor, group_size: int, settings: GPTQSettings):
    """The sweep's column order (None: as stored)."""
    if settings.desc_act:
        return torch.argsort(diag, descending=True)
    if not settings.act_group_aware or group_size >= diag.numel():
        return None
    groups = diag.reshape(-1, group_size)
    within = torch.argsort(groups, dim=1, descending=True)
    order = torch.argsort(groups.amax(dim=1), descending=True)
    starts = (torch.arange(groups.shape[0], device=diag.device) * group_size)[:, None]
    return (within + starts)[order].reshape(-1)


def _quantize_columns(W, hinv, group_size, settings, static, group_of):
    """The GPTQ sweep over (permuted) columns in blocks of BLOCK_SIZE with lazy updates.
    -> (q uint8 [out, in] in sweep order, scales, zeros [out, groups] by group id)."""
    out_features, in_features = W.shape
    maxq = 2**settings.bits - 1
    Q = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)
    num_groups = in_features // group_size
    if static is not None:
        scales, zeros = static[0].to(W.device), static[1].to(W.device)
    else:
        scales = torch.zeros(out_features, num_groups, device=W.device)
        zeros = torch.zeros(out_features, num_groups, device=W.device)
    fitted = static is not None
    current_group = -1
    for i1 in range(0, in_features, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, in_features)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            group = int(group_of[column])
            if not fitted and group != current_group:
                # A group's columns are consecutive in the sweep: fit it to them as they are
                # now, updates so far included.
                ahead = W1[:, i : i + group_size]
                columns = torch.cat([ahead, W[:, i2 : i2 + group_size - ahead.shape[1]]], 1)
                fit = searched_group_params if settings.clip_search else group_params
                scales[:, group], zeros[:, group] = fit(
                    columns, settings.bits, settings.sym, torch.float16, settings.min_zero
                )
                current_group = group
            scale, zero = scales[:, group], zeros[:, group]
            w = W1[:, i]
            q = (torch.round(w / scale) + zero).clamp(0, maxq)
            Q[:, column] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    return Q, scales.to(torch.float16), zeros.to(torch.int32)

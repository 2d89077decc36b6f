"""GPTQ: quantize a Linear's weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs
(Frantar et al., 2022). Tensor in, tensor out; the format lives in formats/gptq.py.

Shapes: W [out, in]; H [in, in] = 2 X Xᵀ / n over the n calibration tokens X [in, n].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu as cpu_kernels
from llmkit.kernels import cuda as cuda_kernels
from llmkit.memory import return_freed_memory
from llmkit.quant.options import GPTQOptions
from llmkit.quant.rtn import dequantize_indexed, group_params, rows_at_once, searched_group_params

_OPTIONS = GPTQOptions()  # the user-facing defaults

BLOCK_SIZE = 128
# Rows at a time on the CPU (on CUDA `rows_at_once`'s more, a loop's cost being its launches):
ROW_BLOCK = 64  # where a whole [n, n] or [out, in] temporary is avoided
QUANTIZE_ROWS = 256  # swept at a time (each needs a working copy and search temporaries)
MAX_DAMP_PERCENT = 1.0


class Hessian:
    """Accumulates H = 2 X Xᵀ / n in float32 from batches of inputs [..., in].

    H is symmetric, so only its upper blocks are accumulated, each block row (BLOCK rows,
    from its diagonal block rightwards) in a tensor of its own: for 2048 inputs in blocks of
    128, 136 of 256 blocks, about half the memory while inputs arrive. The full matrix is
    assembled, and the block rows let go of, when `matrix` is first read."""

    BLOCK = 128

    def __init__(self, in_features: int, device: torch.device):
        n, self._device = in_features, device
        self._rows = [
            torch.zeros(min(self.BLOCK, n - i), n - i, dtype=torch.float32, device=device)
            for i in range(0, n, self.BLOCK)
        ]
        self._full: torch.Tensor | None = None
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if self._full is not None:
            raise RuntimeError("Hessian already read; it takes no more inputs")
        x = x.reshape(-1, x.shape[-1]).to(self._device, torch.float32)
        # Running mean keeps the magnitude bounded however many tokens arrive; the old sum is
        # rescaled inside the product (beta), not in a pass of its own over H.
        total = self.num_tokens + x.shape[0]
        for i, row in zip(range(0, x.shape[1], self.BLOCK), self._rows, strict=True):
            row.addmm_(
                x[:, i : i + row.shape[0]].T,
                x[:, i:],
                beta=self.num_tokens / total,
                alpha=2 / total,
            )
        self.num_tokens = total

    @property
    def matrix(self) -> torch.Tensor:
        if self._full is None:  # each block row, and its right part mirrored below its diagonal
            n = self._rows[0].shape[1]
            full = torch.empty(n, n, dtype=torch.float32, device=self._device)
            for i in range(0, n, self.BLOCK):
                row = self._rows.pop(0)
                end = i + row.shape[0]
                full[i:end, i:] = row
                full[end:, i:end] = row[:, end - i :].T
            self._full = full
        return self._full

    def take(self) -> torch.Tensor:
        """The matrix, which this object then lets go of (so that it is freed with its last
        user)."""
        matrix = self.matrix
        self._full = None
        return matrix


@dataclass(frozen=True, slots=True)
class GPTQResult:
    """q: uint8 [out, in] (original column order); scales, zeros: [out, groups];
    g_idx: int32 [in]; damp_percent actually used. Per output row, float64 [out]:
    row_error = (w - ŵ) H (w - ŵ)ᵀ and row_energy = w H wᵀ, so that a block of rows'
    ||(W - Ŵ) X||² / ||W X||² needs no Hessian afterwards."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    damp_percent: float
    row_error: torch.Tensor
    row_energy: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return dequantize_indexed(self.q, self.scales, self.zeros, self.g_idx)

    def dequantize_into(self, out: torch.Tensor) -> None:
        """Write the dequantized weight into `out` [out, in] (any device and float dtype), a
        block of rows at a time, computed on out's device."""
        step = rows_at_once(out.shape[1], out.device, ROW_BLOCK)
        for r in range(0, len(out), step):
            rows = slice(r, r + step)
            parts = (self.q[rows], self.scales[rows], self.zeros[rows], self.g_idx)
            out[rows].copy_(dequantize_indexed(*(t.to(out.device) for t in parts)))

    def relative_error(self, rows: slice = slice(None)) -> float:
        """||(W - Ŵ) X||² / ||W X||² over `rows`, on the calibration inputs X."""
        energy = float(self.row_energy[rows].sum())
        return float(self.row_error[rows].sum()) / energy if energy > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Grid:
    """A grid fixed before the sweep, one group per output row: each weight becomes
    clamp(round(w / scale) + zero, 0, maxq), meaning scale * (q - zero). W8A8's symmetric
    int8 (scale max|w| / 127, zero 127, maxq 254) is one; scales stay as given (float32)."""

    scale: torch.Tensor  # float32 [out]
    zero: torch.Tensor  # float32 [out]
    maxq: int

    def rows(self, start: int, stop: int) -> Grid:
        return Grid(self.scale[start:stop], self.zero[start:stop], self.maxq)


@dataclass(frozen=True, slots=True)
class GPTQSettings:
    """GPTQ's settings; the defaults of those a user sets are GPTQOptions'."""

    bits: int = _OPTIONS.bits
    group_size: int = _OPTIONS.group_size  # -1: one group per output channel
    sym: bool = _OPTIONS.sym
    desc_act: bool = _OPTIONS.desc_act
    # Without act-order: visit groups by their largest H diagonal entry and columns within a
    # group by theirs, keeping every group's columns together, so g_idx stays i // group_size
    # (group-aware reordering, Gafni et al. 2025; GPTQModel's default).
    act_group_aware: bool = _OPTIONS.act_group_aware
    static_groups: bool = _OPTIONS.static_groups
    # Fit each group's range by searching shrink factors for the least rounding error
    # (GPTQModel's `mse` option, off there by default).
    clip_search: bool = _OPTIONS.clip_search
    damp_percent: float = _OPTIONS.damp_percent
    min_zero: int = 1  # GPTQ v1 stores zero - 1


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    settings: GPTQSettings,
    name: str = "",
    warn: Callable[[str], None] | None = None,
    again: Callable[[], torch.Tensor] | None = None,
    grid: Grid | None = None,
) -> GPTQResult:
    """GPTQ of `weight` [out, in] given `hessian` [in, in]. The Hessian is let go once
    factorized: when the caller keeps no reference to it, the sweep runs without it. With a
    `grid` (settings.group_size must be -1), the rows are rounded to it instead of to grids
    fitted from `settings.bits`, and the result's scales are its own.

    Without `again`, each factorization attempt works on a copy of `hessian`. With it (a
    function that rebuilds the same H, e.g. from the calibration data), `hessian` is
    factorized in its own storage, and a retry at higher damping factorizes `again()`.

    Rows are independent once H is factorized, so they are swept a block at a time
    (QUANTIZE_ROWS, more on CUDA: `rows_at_once`): beyond `weight` and the factor, memory
    holds one block of rows' working copies."""
    in_features = weight.shape[1]
    if grid is not None and settings.group_size != -1:
        raise ValueError("a fixed grid is one group per row: group_size must be -1")
    group_size = in_features if settings.group_size == -1 else settings.group_size
    dead = torch.diag(hessian) == 0  # inputs that were always zero: nothing to preserve
    energy = _row_products(weight, hessian)  # (H is zero in dead inputs' rows and columns)
    perm = _column_order(torch.diag(hessian), group_size, settings)
    # Each sweep position's group: act-order groups follow the sweep; otherwise (and for
    # static groups) a column keeps the group of its original index.
    positions = torch.arange(in_features, device=hessian.device)
    original = perm if perm is not None else positions
    group_of = positions if settings.desc_act and not settings.static_groups else original
    group_of = group_of // group_size

    if again is None:  # the caller's matrix stays as it is: each attempt factorizes a copy
        first, again = hessian.clone(), hessian.clone
    else:
        first = hessian
    attempts = _Attempts(first, again, perm, dead)
    del hessian, first, again
    hinv, damp, damping = _inverse_hessian_factor(attempts, settings.damp_percent, name, warn)
    attempts.release()
    return_freed_memory()  # the factorization's workspace, before the sweep's copies
    sweep = _RowSweep(hinv, dead, perm, group_of, group_size, settings)
    inverse = torch.argsort(perm) if perm is not None else None
    q = torch.empty(weight.shape, dtype=torch.uint8, device=hinv.device)  # original order
    blocks = []
    step = rows_at_once(in_features, hinv.device, QUANTIZE_ROWS)
    for r in range(0, len(weight), step):
        rows_grid = None if grid is None else grid.rows(r, r + step)
        block_q, *params = sweep(weight[r : r + step], rows_grid)
        q[r : r + step] = block_q if inverse is None else block_q[:, inverse]
        blocks.append(params)
    del hinv, sweep
    return_freed_memory()  # the factor's pages, before the distances' temporaries touch others
    scales, zeros, losses = (torch.cat(parts) for parts in zip(*blocks, strict=True))
    g_idx = group_of.to(torch.int32)
    if inverse is not None:
        g_idx = g_idx[inverse]
    # The sweep's losses sum to (w - ŵ)(H + λI)(w - ŵ)ᵀ per row, with w's dead inputs zeroed
    # (where ŵ is 0 too, and H has nothing); take the damping's share back off.
    shift = _row_distances(weight, dead, q, scales, zeros, g_idx)
    error = (losses.cpu() - damping * shift).clamp(min=0)
    return GPTQResult(q.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(), damp, error, energy.cpu())


class _Attempts:
    """H in sweep order, dead inputs given a unit diagonal, once per factorization attempt:
    `first`, then `again()` for each retry, each permuted in place."""

    def __init__(self, first: torch.Tensor, again: Callable[[], torch.Tensor], perm, dead):
        self._first, self._again = [first], again
        self._perm = perm
        self._kept = dead[perm] if perm is not None else dead

    def __call__(self) -> torch.Tensor:
        H = self._first.pop() if self._first else self._again()
        if self._perm is not None:
            _permute_columns_(H, self._perm)
            _permute_columns_(H.mT, self._perm)  # H is symmetric: its rows, permuted alike
        H[self._kept, self._kept] = 1
        return H

    def release(self) -> None:
        """Let go of what rebuilds H (once it is factorized)."""
        self._again = None


@dataclass(frozen=True, slots=True)
class _RowSweep:
    """The GPTQ sweep of a block of rows, given the factorized Hessian and the column order.
    -> (q uint8 [rows, in] in sweep order, scales fp16, zeros int32 [rows, groups], each
    row's loss, float64 [rows])."""

    hinv: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor | None
    group_of: torch.Tensor
    group_size: int
    settings: GPTQSettings

    def __call__(self, rows: torch.Tensor, grid: Grid | None = None):
        W = rows.detach().to(self.hinv.device, torch.float32).clone()
        W[:, self.dead] = 0
        settings = self.settings
        maxq, static = 2**settings.bits - 1, None
        if grid is not None:
            maxq, static = grid.maxq, (grid.scale[:, None], grid.zero[:, None])
        elif settings.static_groups:
            static = _static_params(W, self.group_size, settings)
        if self.perm is not None:
            _permute_columns_(W, self.perm)
        return _quantize_columns(
            W, self.hinv, self.group_size, settings, static, self.group_of, maxq, grid is None
        )


def _row_products(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """w H wᵀ for every row w of W, float64 [out] (a block of rows at a time)."""
    out = []
    step = rows_at_once(W.shape[1], H.device, ROW_BLOCK)
    for r in range(0, W.shape[0], step):
        w = W[r : r + step].detach().to(H.device, torch.float32)
        out.append(((w @ H) * w).sum(1, dtype=torch.float64))
    return torch.cat(out)


def _row_distances(weight, dead, q, scales, zeros, g_idx) -> torch.Tensor:
    """||w - ŵ||² for every row, dead inputs of w taken as 0, float64 [out] on the CPU."""
    out = []
    step = rows_at_once(weight.shape[1], q.device, ROW_BLOCK)
    for r in range(0, weight.shape[0], step):
        rows = slice(r, r + step)
        w = weight[rows].detach().to(q.device, torch.float32).masked_fill(dead, 0)
        delta = w - dequantize_indexed(q[rows], scales[rows], zeros[rows], g_idx)
        out.append(delta.square().sum(1, dtype=torch.float64).cpu())
    return torch.cat(out)


def _permute_columns_(matrix: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """matrix[:, perm], in place (a block of rows at a time)."""
    step = rows_at_once(matrix.shape[1], matrix.device, ROW_BLOCK)
    for rows in range(0, matrix.shape[0], step):
        matrix[rows : rows + step] = matrix[rows : rows + step][:, perm]
    return matrix


def _inverse_hessian_factor(
    prepared: Callable[[], torch.Tensor],
    damp_percent: float,
    name: str,
    warn: Callable[[str], None] | None,
) -> tuple[torch.Tensor, float, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), raising damp until H
    factorizes (a warning names the module). Factorizes in place: one n x n matrix at a time,
    given by `prepared()` for each attempt.

    H is symmetric, so its transpose view is the same matrix laid out column-major, as LAPACK
    works: factorized through that view, each step overwrites H's own storage instead of a
    column-major copy. The lower factor L of H⁻¹ = L Lᵀ, read back row-major, is Lᵀ: the
    upper factor. -> (factor, damp percent used, λ)."""
    damp = damp_percent
    while True:
        H = prepared()
        info = torch.empty((), dtype=torch.int32, device=H.device)
        damping = damp * float(H.diagonal().mean())
        H.diagonal().add_(damping)
        A = H.mT
        torch.linalg.cholesky_ex(A, out=(A, info))
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, out=(A, info))
            if int(info) == 0:
                return H, damp, damping
        del A
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


def _quantize_columns(W, hinv, group_size, settings, static, group_of, maxq, half_scales):
    """The GPTQ sweep over (permuted) columns in blocks of BLOCK_SIZE with lazy updates.
    -> (q uint8 [out, in] in sweep order, scales (float16 if `half_scales`, as fitted
    grids are stored), zeros [out, groups] by group id, each row's sum of squared scaled
    errors, float64 [out])."""
    out_features, in_features = W.shape
    Q = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)
    num_groups = in_features // group_size
    if static is not None:
        scales, zeros = static[0].to(W.device), static[1].to(W.device)
    else:
        scales = torch.zeros(out_features, num_groups, device=W.device)
        zeros = torch.zeros(out_features, num_groups, device=W.device)
    fit = searched_group_params if settings.clip_search else group_params
    groups = group_of.tolist()
    fitted = set() if static is None else set(groups)
    losses = torch.zeros(out_features, dtype=torch.float64, device=W.device)
    for i1 in range(0, in_features, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, in_features)
        W1, Hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2].contiguous()
        Q1, Err1 = torch.empty_like(W1, dtype=torch.uint8), torch.empty_like(W1)
        for group, run in itertools.groupby(range(i1, i2), key=groups.__getitem__):
            columns = list(run)
            first, last = columns[0] - i1, columns[-1] - i1 + 1
            if group not in fitted:
                # A group's columns are consecutive in the sweep: fit it to them as they are
                # now, updates so far included.
                ahead = W1[:, first : first + group_size]
                span = torch.cat([ahead, W[:, i2 : i2 + group_size - ahead.shape[1]]], 1)
                scales[:, group], zeros[:, group] = fit(
                    span, settings.bits, settings.sym, torch.float16, settings.min_zero
                )
                fitted.add(group)
            scale, zero = scales[:, group].contiguous(), zeros[:, group].contiguous()
            _sweep(W1, Q1, Err1, Hinv1, scale, zero, first, last, maxq)
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1)
        losses += Err1.square().sum(1, dtype=torch.float64)
    return Q, scales.to(torch.float16) if half_scales else scales, zeros.to(torch.int32), losses


def _sweep(W1, Q1, Err1, Hinv1, scale, zero, start: int, stop: int, maxq: int) -> None:
    """Columns [start, stop) of a block, which share `scale` and `zero` [out]: each rounded,
    its scaled error recorded in Err1 and taken off the block's later columns."""
    tensors = (W1, Err1, Hinv1, scale, zero)  # float32 here
    kernels = cpu_kernels.for_tensors(*tensors) or cuda_kernels.for_tensors(*tensors)
    if kernels is not None:
        kernels.gptq_columns(W1, Q1, Err1, Hinv1, scale, zero, start, stop, maxq)
        return
    for i in range(start, stop):
        w = W1[:, i]
        q = (torch.round(w / scale) + zero).clamp(0, maxq)
        Q1[:, i] = q.to(torch.uint8)
        err = (w - scale * (q - zero)) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err

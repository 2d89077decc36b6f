"""CUDA kernels written in Triton, compiled on first use by Triton's own cache.

- gptq_columns: GPTQ's column sweep over a run of columns that share one group's scale and
  zero, inside a block of at most 128 columns; the same contract as the CPU kernel of that
  name (cpu_ops.cpp), and the torch path's values (no fused multiply-adds). Done with torch
  ops, each column costs ~8 kernel launches; here a run of columns is one launch, each
  program holding a tile of rows in registers.

`for_tensors()` is None where Triton is not installed or the tensors are not float32 CUDA
tensors; callers then use their torch path. With TRITON_INTERPRET=1 set before this module
is imported, the kernels run on CPU tensors through Triton's interpreter (how the tests
check them without a GPU).
"""

from __future__ import annotations

import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: no Triton, the torch paths
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_WIDTH = 128  # columns of a block: the tile a program holds
ROWS_PER_PROGRAM = 32


def for_tensors(*tensors: torch.Tensor):
    """This module when its kernels can take the tensors (float32, on CUDA, or on the CPU
    under Triton's interpreter), else None."""
    if triton is None:
        return None
    device = "cpu" if INTERPRETED else "cuda"
    if any(t.device.type != device for t in tensors):
        return None
    if any(t.dtype != torch.float32 for t in tensors):
        return None
    return sys.modules[__name__]


def gptq_columns(w, q, err, hinv, scale, zero, start: int, stop: int, maxq: int) -> None:
    """Columns [start, stop) of the block w [rows, width] (width <= 128), all sharing
    scale and zero [rows]: each rounded into q (uint8), its error divided by hinv's diagonal
    entry recorded in err, and taken off w's later columns through hinv's row (hinv
    [width, width], the block of the inverse Hessian's upper factor)."""
    rows, width = w.shape
    if width > MAX_WIDTH or not all(t.is_contiguous() for t in (w, q, err, hinv)):
        raise ValueError("gptq_columns: contiguous blocks of at most 128 columns are needed")
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    _gptq_columns_kernel[grid](
        w,
        q,
        err,
        hinv,
        scale.contiguous(),
        zero.contiguous(),
        rows,
        width,
        start,
        stop,
        float(maxq),
        ROWS=ROWS_PER_PROGRAM,
        WIDTH=MAX_WIDTH,
        enable_fp_fusion=False,  # products and sums rounded apart, as the torch ops do
    )


if triton is not None:

    @triton.jit(do_not_specialize=["rows", "start", "stop"])
    def _gptq_columns_kernel(
        w_ptr,
        q_ptr,
        err_ptr,
        hinv_ptr,
        scale_ptr,
        zero_ptr,
        rows,
        width,
        start,
        stop,
        maxq,
        ROWS: tl.constexpr,
        WIDTH: tl.constexpr,
    ):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        col = tl.arange(0, WIDTH)
        in_rows = row < rows
        inside = in_rows[:, None] & (col < width)[None, :]
        offsets = row[:, None] * width + col[None, :]
        tile = tl.load(w_ptr + offsets, mask=inside, other=0.0)
        scale = tl.load(scale_ptr + row, mask=in_rows, other=1.0)
        zero = tl.load(zero_ptr + row, mask=in_rows, other=0.0)
        for i in range(start, stop):
            value = tl.sum(tl.where(col[None, :] == i, tile, 0.0), axis=1)
            # round half to even, as torch.round: adding 1.5 * 2^23 leaves no fraction bits
            scaled = tl.math.div_rn(value, scale)
            rounded = (scaled + 12582912.0) - 12582912.0
            code = tl.minimum(tl.maximum(rounded + zero, 0.0), maxq)
            diagonal = tl.load(hinv_ptr + i * width + i)
            error = tl.math.div_rn(value - scale * (code - zero), diagonal)
            later = tl.load(hinv_ptr + i * width + col, mask=(col >= i) & (col < width), other=0.0)
            tile -= error[:, None] * later[None, :]
            tl.store(q_ptr + row * width + i, code.to(tl.uint8), mask=in_rows)
            tl.store(err_ptr + row * width + i, error, mask=in_rows)
        tl.store(w_ptr + offsets, tile, mask=inside)

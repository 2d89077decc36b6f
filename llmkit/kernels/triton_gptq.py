"""GPTQ's column sweep as a Triton kernel (imported only once a CUDA tensor needs it:
importing Triton costs ~75 MB of resident memory). See cuda.py."""

from __future__ import annotations

import triton
import triton.language as tl

MAX_WIDTH = 128  # columns of a block: the tile a program holds
ROWS_PER_PROGRAM = 32


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

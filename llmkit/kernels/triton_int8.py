"""INT8 products on CUDA for weights q [out, in] with one float32 scale per output row, read
as int8 (half the bytes of a bf16 weight, which a decode step's time is mostly spent
reading):

- weight-only (`int8_linear`): y = (x @ qᵀ) * scale, the weight tiles turned into the
  activations' dtype in registers for the tensor cores (every int8 value is exact in fp16
  and bf16), float32 sums, the scale applied once, rounded once to the activations' dtype;
- W8A8 (`quantize_rows`, then `w8a8_linear`): each row of the activations as int8 with one
  scale, max|x| / 127 (quant/int8.py's quantize_per_token: the same divisions, correctly
  rounded, and rounding half to even), then int8 x int8 products with exact int32 sums,
  times the row's scale and then the output's, as W8A8Linear's torch path computes them.
  Two launches where that path takes some twenty.

Both products are one kernel, its tile shape chosen by the number of rows (TILES). Like the
other kernels of a decode step they launch as programmatic dependents of the kernel before
them where the device can (triton_launch.py). `checked(device, dtype)` runs every tile
shape and the row quantization once against float64 references on a small weight before a
layer uses them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llmkit.kernels.triton_launch import launch_options, programmatic_start

# (most rows, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)), the first whose rows suffice.
# Up to 16 rows (a decode step): 16 outputs a program, so that even a 4096-output weight
# makes 256 programs, enough loads in flight to keep memory busy; more rows: wider tiles,
# each weight tile serving more rows.
TILES = (
    (16, (16, 16, 256, 4, 4)),
    (64, (64, 32, 128, 4, 4)),
    (None, (128, 128, 64, 8, 3)),
)
QMAX = tl.constexpr(127.0)  # quant/int8.py's (a constexpr: kernels read no other globals)
QUANTIZE_BLOCK = 1024  # inputs a program of quantize_rows takes at a time


def tile_for(rows: int) -> tuple[int, int, int, int, int]:
    return next(tile for most, tile in TILES if most is None or rows <= most)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, tile=None) -> torch.Tensor:
    """x [rows, in] (bf16, fp16 or float32, contiguous) times int8 q [out, in] (contiguous)
    transposed, each output column times its float32 `scale` -> [rows, out] in x's dtype.
    `tile`: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) instead of TILES' for the rows
    (benchmarks/cuda_int8.py times others)."""
    return _product(x, None, q, scale, x.dtype, tile)


def w8a8_linear(xq, x_scale, q, scale, dtype: torch.dtype, tile=None) -> torch.Tensor:
    """int8 xq [rows, in] (contiguous) times int8 q [out, in] (contiguous) transposed, exact
    int32 sums, each row times its float32 x_scale [rows] and then each output column times
    its float32 `scale` -> [rows, out] in `dtype`."""
    return _product(xq, x_scale, q, scale, dtype, tile)


def _product(a, row_scale, q, scale, dtype, tile) -> torch.Tensor:
    rows, inputs = a.shape
    outputs = q.shape[0]
    out = a.new_empty((rows, outputs), dtype=dtype)
    if rows == 0:
        return out
    bm, bn, bk, warps, stages = tile or tile_for(rows)
    grid = (triton.cdiv(outputs, bn), triton.cdiv(rows, bm))
    integer = row_scale is not None
    _int8_kernel[grid](a, q, scale, row_scale if integer else scale, out, rows, outputs, inputs,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=a.dtype == torch.float32,
                       INTEGER=integer, num_warps=warps, num_stages=stages,
                       **launch_options(a))  # fmt: skip
    return out


@triton.jit(do_not_specialize=["rows"])
def _int8_kernel(a, q, scale, row_scale, out, rows, outputs, inputs,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr, INTEGER: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    programmatic_start(PDL)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    a_rows = a + m.to(tl.int64)[:, None] * inputs
    q_rows = q + n.to(tl.int64)[:, None] * inputs  # (an lm_head's may pass 2**31 bytes)
    if INTEGER:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, inputs, BLOCK_K):
        at = start + k
        x = tl.load(a_rows + at[None, :], mask=(m < rows)[:, None] & (at < inputs)[None, :],
                    other=0)  # fmt: skip
        w = tl.load(q_rows + at[None, :], mask=(n < outputs)[:, None] & (at < inputs)[None, :],
                    other=0)  # fmt: skip
        if INTEGER:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        elif IEEE:  # float32 activations: float32 products, not TF32's
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    y = acc.to(tl.float32)
    if INTEGER:  # the row's scale first, as W8A8Linear's torch path multiplies
        y = y * tl.load(row_scale + m, mask=m < rows, other=0.0)[:, None]
    y = y * tl.load(scale + n, mask=n < outputs, other=0.0)[None, :]
    keep = (m < rows)[:, None] & (n < outputs)[None, :]
    tl.store(out + m.to(tl.int64)[:, None] * outputs + n[None, :], y.to(out.dtype.element_ty),
             mask=keep)  # fmt: skip


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] (contiguous) -> (int8 [rows, in], float32 scales [rows]): each row
    divided by max|row| / 127 (1 for a row of zeros), rounded half to even, clamped to
    [-128, 127]: quant/int8.py's quantize_per_token, one program a row."""
    rows, inputs = x.shape
    xq = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = min(QUANTIZE_BLOCK, triton.next_power_of_2(inputs))
        _quantize_kernel[(rows,)](x, xq, scales, inputs, BLOCK=block, num_warps=4,
                                  **launch_options(x))  # fmt: skip
    return xq, scales


@triton.jit
def _quantize_kernel(x, xq, scales, inputs, BLOCK: tl.constexpr, PDL: tl.constexpr):
    programmatic_start(PDL)
    r = tl.program_id(0)
    row = r.to(tl.int64) * inputs
    d = tl.arange(0, BLOCK)
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, inputs, BLOCK):
        v = tl.load(x + row + start + d, mask=start + d < inputs, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(v))
    amax = tl.max(top, 0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
    for start in range(0, inputs, BLOCK):
        keep = start + d < inputs
        v = tl.load(x + row + start + d, mask=keep, other=0.0).to(tl.float32)
        # round half to even, as torch.round: adding 1.5 * 2^23 leaves no fraction bits
        rounded = (tl.math.div_rn(v, scale) + 12582912.0) - 12582912.0
        code = tl.minimum(tl.maximum(rounded, -128.0), QMAX)
        tl.store(xq + row + start + d, code.to(tl.int8), mask=keep)
    tl.store(scales + r, scale)


def reference_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows' values computed in float64 on the CPU: the divisions there, rounded
    once to float32, are float32's correctly rounded ones."""
    x = x.double().cpu()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / QMAX.value, 1.0).float()
    q = torch.round((x / scale.double()[:, None]).float()).clamp(-128, QMAX.value)
    q = q.to(torch.int8)
    return q, scale


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, x_scale=None):
    """The float64 product the kernel computes, [rows, out] float64 on the CPU (x int8 with
    its `x_scale` for W8A8)."""
    y = x.double().cpu() @ q.double().cpu().t()
    if x_scale is not None:
        y = y * x_scale.double().cpu()[:, None]
    return y * scale.double().cpu()


# relative error against the float64 product: float32 sums of a few hundred exact products,
# then one rounding to the dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@functools.cache
def checked(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where every tile shape of both products, and quantize_rows, compute what they
    should on `device` with `dtype` activations (a small weight against `reference`, the
    quantization against `reference_rows`), else why not."""
    g = torch.Generator().manual_seed(0)
    # sizes in multiples of 16, as a model's: Triton compiles the variant its layers launch
    # (their last tiles still partly masked)
    q = torch.randint(-128, 128, (48, 320), generator=g, dtype=torch.int8)
    scale = torch.rand(48, generator=g) * 0.02 + 0.001
    for rows in (3, 33, 130):  # every tile shape of TILES
        x = torch.randn(rows, 320, generator=g).to(dtype)
        try:
            got = int8_linear(x.to(device), q.to(device), scale.to(device))
            xq, x_scale = quantize_rows(x.to(device))
            integer = w8a8_linear(xq, x_scale, q.to(device), scale.to(device), dtype)
        except Exception as e:  # whatever Triton raises where it cannot build or launch it
            return f"{type(e).__name__}: {e}"
        want_q, want_scale = reference_rows(x)
        if not (torch.equal(xq.cpu(), want_q) and torch.equal(x_scale.cpu(), want_scale)):
            return f"{rows} rows quantize otherwise than in float64"
        for name, y, want in (("int8", got, reference(x, q, scale)),
                              ("w8a8", integer, reference(want_q, q, scale, x_scale))):  # fmt: skip
            error = float((y.double().cpu() - want).abs().max() / want.abs().max())
            if not error < TOLERANCE[dtype]:
                return f"the {name} product of {rows} rows is off by {error:.3g} of float64's"
    return None

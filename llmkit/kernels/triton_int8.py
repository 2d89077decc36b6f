"""INT8 weight-only products on CUDA: y = (x @ qᵀ) * scale for int8 weights q [out, in] with
one float32 scale per output row, read as int8 (half the bytes of a bf16 weight, which a
decode step's time is mostly spent reading) and turned into the activations' dtype in
registers, tile by tile, for the tensor cores (every int8 value is exact in fp16 and bf16).
Sums are float32; the scale multiplies each row's sum once, rounded once to the activations'
dtype. Every batch size, decode steps and prefills, takes this one kernel, its tile shape
chosen by the number of rows (TILES).

Like the other kernels of a decode step it launches as a programmatic dependent of the
kernel before it where the device can (triton_launch.py). `checked(device)` runs every tile
shape once against the float64 product on a small weight before a layer uses the kernel.
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


def tile_for(rows: int) -> tuple[int, int, int, int, int]:
    return next(tile for most, tile in TILES if most is None or rows <= most)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, tile=None) -> torch.Tensor:
    """x [rows, in] (bf16, fp16 or float32, contiguous) times int8 q [out, in] (contiguous)
    transposed, each output column times its float32 `scale` -> [rows, out] in x's dtype.
    `tile`: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) instead of TILES' for the rows
    (benchmarks/cuda_int8.py times others)."""
    rows, inputs = x.shape
    outputs = q.shape[0]
    out = x.new_empty((rows, outputs))
    if rows == 0:
        return out
    bm, bn, bk, warps, stages = tile or tile_for(rows)
    grid = (triton.cdiv(outputs, bn), triton.cdiv(rows, bm))
    _int8_kernel[grid](x, q, scale, out, rows, outputs, inputs,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32,
                       num_warps=warps, num_stages=stages, **launch_options(x))  # fmt: skip
    return out


@triton.jit(do_not_specialize=["rows"])
def _int8_kernel(x, q, scale, out, rows, outputs, inputs,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    programmatic_start(PDL)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    x_rows = x + m.to(tl.int64)[:, None] * inputs
    q_rows = q + n.to(tl.int64)[:, None] * inputs  # (an lm_head's may pass 2**31 bytes)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, inputs, BLOCK_K):
        at = start + k
        a = tl.load(x_rows + at[None, :], mask=(m < rows)[:, None] & (at < inputs)[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(q_rows + at[None, :], mask=(n < outputs)[:, None] & (at < inputs)[None, :],
                    other=0)  # fmt: skip
        if IEEE:  # float32 activations: float32 products, not TF32's
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
    s = tl.load(scale + n, mask=n < outputs, other=0.0)
    y = (acc * s[None, :]).to(out.dtype.element_ty)
    keep = (m < rows)[:, None] & (n < outputs)[None, :]
    tl.store(out + m.to(tl.int64)[:, None] * outputs + n[None, :], y, mask=keep)


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float64 product the kernel computes, [rows, out] float64 on the CPU."""
    return (x.double().cpu() @ q.double().cpu().t()) * scale.double().cpu()


# relative error against the float64 product: float32 sums of a few hundred exact products,
# then one rounding to the dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@functools.cache
def checked(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where every tile shape computes its product on `device` with `dtype`
    activations (a small odd-shaped weight against `reference`), else why not."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (40, 300), generator=g, dtype=torch.int8)
    scale = torch.rand(40, generator=g) * 0.02 + 0.001
    for rows in (3, 33, 130):  # every tile shape of TILES
        x = torch.randn(rows, 300, generator=g).to(dtype)
        try:
            got = int8_linear(x.to(device), q.to(device), scale.to(device))
        except Exception as e:  # whatever Triton raises where it cannot build or launch it
            return f"{type(e).__name__}: {e}"
        want = reference(x, q, scale)
        error = float((got.double().cpu() - want).abs().max() / want.abs().max())
        if not error < TOLERANCE[dtype]:
            return f"{rows} rows are off by {error:.3g} of the float64 product"
    return None

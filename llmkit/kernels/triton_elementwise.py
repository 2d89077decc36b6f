"""The decode layer's elementwise steps on CUDA, each one launch instead of several torch
kernels: RMSNorm (with the residual add before it) and silu(gate) * up (the rotary embedding
is part of the K/V write, triton_attention.py). Even replayed from a CUDA graph, every launch
of a decode step costs microseconds, and each of these steps was several torch kernels per
layer.

These kernels, like the attention kernels of a decode step, launch as programmatic
dependents where the device can (triton_launch.py).

Roundings: the residual sum is rounded to the model's dtype (it is stored as such), the
normalized row is rounded before the weight multiplies it, as the torch paths do; silu * up
computes in float32 and rounds once (the torch ops round each product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkit.kernels.triton_launch import launch_options, programmatic_start


@triton.jit
def _norm_kernel(x, residual, weight, out, dim, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    programmatic_start(PDL)
    row = tl.program_id(0).to(tl.int64) * dim
    d = tl.arange(0, BLOCK)
    keep = d < dim
    h = tl.load(x + row + d, mask=keep, other=0.0)
    if ADD:
        h = h.to(tl.float32) + tl.load(residual + row + d, mask=keep, other=0.0).to(tl.float32)
        h = h.to(residual.dtype.element_ty)
        tl.store(residual + row + d, h, mask=keep)
    h = h.to(tl.float32)
    scale = tl.rsqrt(tl.sum(h * h, 0) / dim + eps)
    normed = (h * scale).to(out.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + d, mask=keep, other=0.0).to(tl.float32)
    tl.store(out + row + d, (normed * w).to(out.dtype.element_ty), mask=keep)


def _norm_launch(x, residual, weight, eps: float) -> torch.Tensor:
    rows, dim = x.shape
    out = torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(dim)
        _norm_kernel[(rows,)](x, x if residual is None else residual, weight, out, dim, eps,
                              ADD=residual is not None, BLOCK=block,
                              num_warps=min(16, max(1, block // 256)),
                              **launch_options(x))  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) for contiguous [rows, dim] x."""
    return _norm_launch(x, None, weight, eps)


def add_rms_norm(residual, x, weight, eps: float) -> torch.Tensor:
    """residual += x (in place), then weight * rms_norm(residual); both [rows, dim]."""
    return _norm_launch(x, residual, weight, eps)


@triton.jit
def _silu_mul_kernel(gate_up, out, width, BLOCK: tl.constexpr, PDL: tl.constexpr):
    programmatic_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = d < width
    gate = tl.load(gate_up + t * 2 * width + d, mask=keep, other=0.0).to(tl.float32)
    up = tl.load(gate_up + t * 2 * width + width + d, mask=keep, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(out + t * width + d, (silu * up).to(out.dtype.element_ty), mask=keep)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Contiguous [tokens, 2 * width] -> silu(gate) * up, [tokens, width]."""
    tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((tokens, width))
    if tokens:
        block = 1024
        grid = (tokens, triton.cdiv(width, block))
        _silu_mul_kernel[grid](gate_up, out, width, BLOCK=block, **launch_options(gate_up))
    return out

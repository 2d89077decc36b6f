"""The decode layer's elementwise steps on CUDA, each one launch instead of several torch
kernels: RMSNorm (with the residual add before it), rotary embeddings of q and k together,
and silu(gate) * up. Even replayed from a CUDA graph, every launch of a decode step costs
microseconds, and each of these steps was several torch kernels per layer.

Roundings: the residual sum is rounded to the model's dtype (it is stored as such), the
normalized row is rounded before the weight multiplies it, as the torch paths do; rotary and
silu * up compute in float32 and round once (the torch ops round each product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_kernel(x, residual, weight, out, dim, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
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
                              num_warps=min(16, max(1, block // 256)))  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) for contiguous [rows, dim] x."""
    return _norm_launch(x, None, weight, eps)


def add_rms_norm(residual, x, weight, eps: float) -> torch.Tensor:
    """residual += x (in place), then weight * rms_norm(residual); both [rows, dim]."""
    return _norm_launch(x, residual, weight, eps)


@triton.jit
def _rotary_kernel(src, dst, cos, sin, stride_t, stride_h, heads, HALF: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    keep = d < HALF
    at = t.to(tl.int64) * stride_t + h * stride_h
    x1 = tl.load(src + at + d, mask=keep, other=0.0).to(tl.float32)
    x2 = tl.load(src + at + HALF + d, mask=keep, other=0.0).to(tl.float32)
    angle = t.to(tl.int64) * 2 * HALF
    c1 = tl.load(cos + angle + d, mask=keep, other=0.0).to(tl.float32)
    c2 = tl.load(cos + angle + HALF + d, mask=keep, other=0.0).to(tl.float32)
    s1 = tl.load(sin + angle + d, mask=keep, other=0.0).to(tl.float32)
    s2 = tl.load(sin + angle + HALF + d, mask=keep, other=0.0).to(tl.float32)
    row = (t.to(tl.int64) * heads + h) * 2 * HALF
    tl.store(dst + row + d, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=keep)
    tl.store(dst + row + HALF + d, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=keep)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        half = dim // 2
        _rotary_kernel[(tokens, heads)](x, out, cos, sin, x.stride(0), x.stride(1), heads,
                                        HALF=half, BLOCK=triton.next_power_of_2(half))  # fmt: skip
    return out


def rotary(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embeddings: q [tokens, heads, dim], k [tokens, kv_heads, dim] (last
    dim contiguous); cos, sin contiguous [tokens, dim] -> new contiguous q, k."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton.jit
def _silu_mul_kernel(gate_up, out, width, BLOCK: tl.constexpr):
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
        _silu_mul_kernel[(tokens, triton.cdiv(width, block))](gate_up, out, width, BLOCK=block)
    return out

"""Symmetric INT8: per-output-channel weights and dynamic per-token activations."""

from __future__ import annotations

import torch

QMAX = 127


def quantize_per_channel(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] -> (q: int8 [out, in] in [-127, 127], scale: [out, 1] in `scale_dtype`).

    The scale is rounded to its storage dtype *before* q is computed, and rounded up where
    needed, so q * scale is within half a step of w for every element.
    """
    scale = per_channel_scale(w, scale_dtype)
    q = torch.round(w.float() / scale.float()).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def per_channel_scale(w: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """[out, 1]: max|w| / QMAX per output row in `scale_dtype`, rounded up where rounding to
    it made the step too small to reach max|w| within QMAX steps."""
    amax = w.detach().abs().amax(dim=1, keepdim=True).float()
    # divided by a tensor: a GPU multiplies by the reciprocal of a scalar divisor, which
    # can differ in the last bit from the division the CPU does
    step = amax / torch.full_like(amax, QMAX)
    scale = torch.where(amax > 0, step, torch.ones_like(amax)).to(scale_dtype)
    too_small = scale.float() * QMAX < amax
    return torch.where(too_small, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def quantize_per_token(x: torch.Tensor, divisor: float = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 with one scale per token (the last dim is the channel dim):
    (q: int8 like x, scale: float32 [..., 1]) with scale = max|x| / divisor. vLLM's kernels
    divide by 127 (the default); compressed-tensors' own fake quantization, which
    transformers uses, by 127.5."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / divisor, torch.ones_like(amax))
    return torch.round(x.float() / scale).clamp(-128, QMAX).to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor, divisor: float = QMAX) -> torch.Tensor:
    """x rounded through `quantize_per_token` and back, in x's dtype."""
    q, scale = quantize_per_token(x, divisor)
    return (q.float() * scale).to(x.dtype)

"""Rotary position embeddings (rotate-half convention), with linear and Llama-3 scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.kernels import cpu


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim / 2] in float32."""
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return base
    if kind == "linear":
        return base / float(scaling["factor"])
    if kind == "llama3":
        return _llama3(base, scaling)
    raise LlmkitError(
        f"rope scaling {kind!r} is not supported; llmkit runs default, linear, llama3"
    )


def _llama3(base: torch.Tensor, s: dict) -> torch.Tensor:
    """Long wavelengths are divided by `factor`, short ones kept, the band between blended."""
    factor, low, high = (
        float(s["factor"]),
        float(s["low_freq_factor"]),
        float(s["high_freq_factor"]),
    )
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > original / low, base / factor, base)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """cos/sin for every position up to `max_positions`, gathered by each token's position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions).float(), inv_freq(head_dim, theta, scaling))
        emb = torch.cat([freqs, freqs], dim=-1)  # [positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) [tokens, 1, head_dim] for `positions`, computed once per step."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(
            dtype
        )


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]; cos, sin: [tokens, 1,
    head_dim]. On the CPU one pass of llmkit's kernel, with the same roundings (on CUDA,
    paged_attention rotates them in its K/V write)."""
    kernels = cpu.for_tensors(q, k, cos, sin)
    if kernels is not None and q.stride(-1) == 1 and k.stride(-1) == 1:
        return kernels.rotary(q, k, cos.reshape(len(cos), -1), sin.reshape(len(sin), -1))
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

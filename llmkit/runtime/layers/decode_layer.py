"""A decoder layer of a CPU decode step as one call of llmkit's C++ layer
(kernels/cpu_layer.cpp): the kernels the Python layer runs for such a step, in the same
order and with the same roundings, without the Python around each of them (on a small
model, a large share of a 4-bit decode step).

It applies when every part of the layer runs through llmkit's CPU kernels (no act-order
permutation, no q/k norms, no tensor-parallel reduction, head_dim a multiple of 16) and the
step holds only decodes, at most KERNEL_MAX_ROWS of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmkit.kernels import cpu
from llmkit.runtime.layers.attention import AttentionMetadata
from llmkit.runtime.layers.linear import KERNEL_MAX_ROWS
from llmkit.runtime.layers.norm import RMSNorm


@dataclass(frozen=True, slots=True)
class DecodeLayer:
    """A layer's arguments to llmkit_cpu.decode_layer, gathered once at load."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    linears: tuple[list[torch.Tensor], ...]  # qkv, o, gate_up, down: weights, then bias
    kinds: list[int]
    group_sizes: list[int]
    num_heads: int
    num_kv_heads: int
    scale: float

    @classmethod
    def build(cls, attn, mlp, input_norm: RMSNorm, post_norm: RMSNorm) -> DecodeLayer | None:
        """None when some part of the layer does not run through llmkit's CPU kernels."""
        dtype = input_norm.weight.dtype
        if not input_norm.weight.is_cpu or cpu.ops() is None:
            return None
        calls = [_kernel_call(m) for m in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)]
        usable = (
            dtype in cpu.DTYPES
            and post_norm.weight.dtype == dtype
            and input_norm.eps == post_norm.eps
            and attn.q_norm is None
            and attn.head_dim % 16 == 0
            and all(c is not None for c in calls)
        )
        if not usable:
            return None
        return cls(
            input_norm.weight,
            post_norm.weight,
            input_norm.eps,
            tuple(c.tensors for c in calls),
            [c.kind for c in calls],
            [c.group_size for c in calls],
            attn.num_heads,
            attn.num_kv_heads,
            attn.scale,
        )

    def takes(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step is one the C++ layer runs: decodes only, few of them."""
        tokens = x.shape[0]
        return (
            not meta.prefills
            and meta.num_decodes == tokens
            and tokens <= KERNEL_MAX_ROWS
            and x.dtype == self.input_norm.dtype
        )

    def __call__(self, x, residual, rotary, kv_cache, meta: AttentionMetadata):
        """(this layer's output, the new residual), as DecoderLayer.forward returns them."""
        cos, sin = rotary
        return torch.ops.llmkit_cpu.decode_layer.default(
            x,
            residual,
            self.input_norm,
            self.post_norm,
            self.eps,
            *self.linears,
            self.kinds,
            self.group_sizes,
            cos,
            sin,
            kv_cache[0],
            kv_cache[1],
            meta.slot_mapping,
            meta.decode_blocks,
            meta.decode_lens,
            self.num_heads,
            self.num_kv_heads,
            self.scale,
        )


def _kernel_call(module: nn.Module):
    call = getattr(module, "kernel_call", None)
    return None if call is None else call()

"""RMSNorm computed in float32, as the llama family's reference code does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.kernels import cpu, cuda


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]; normalised in float32 (one fused op), scaled in the model dtype
        kernels = cuda.elementwise_for(x, self.weight)
        if kernels is not None and x.dim() == 2 and x.is_contiguous():
            return kernels.rms_norm(x, self.weight, self.eps)
        kernels = cpu.for_tensors(x, self.weight)
        if kernels is not None and x.dim() == 2 and x.is_contiguous():
            # norm(0 + x) in llmkit's kernel, as the C++ decode layer's first norm: the same
            # bits in float32 too, where torch's sums end a bit apart
            return kernels.add_rms_norm(torch.zeros_like(x), x, self.weight, self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)

    def add_and_norm(
        self, residual: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for [tokens, dim] inputs; on the CPU and on
        CUDA one pass of llmkit's kernel, which updates `residual` in place."""
        kernels = cpu.for_tensors(residual, x, self.weight) or cuda.elementwise_for(residual, x)
        if kernels is not None and x.dim() == 2 and residual.is_contiguous() and x.is_contiguous():
            return kernels.add_rms_norm(residual, x, self.weight, self.eps), residual
        residual = residual + x
        return self(residual), residual

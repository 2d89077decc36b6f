"""RMSNorm computed in float32, as the llama family's reference code does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.runtime.kernels import cpu


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]; normalised in float32 (one fused op), scaled in the model dtype
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)

    def add_and_norm(
        self, residual: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for [tokens, dim] inputs; on the CPU one pass
        of llmkit's kernel, which updates `residual` in place."""
        if _fusable(residual, x, self.weight):
            return cpu.ops().add_rms_norm(residual, x, self.weight, self.eps), residual
        residual = residual + x
        return self(residual), residual


def _fusable(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.bfloat16)
        and residual.dtype == x.dtype == weight.dtype
        and residual.is_contiguous()
        and x.is_contiguous()
        and cpu.ops() is not None
    )

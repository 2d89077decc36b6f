"""The tensor-parallel group a model runs in: collectives that are no-ops at tp = 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True, slots=True)
class Group:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; bf16/fp16 are summed in float32 (gloo has no bf16 sums)."""
        if self.size == 1:
            return x
        total = x.float() if x.device.type == "cpu" else x
        dist.all_reduce(total)
        return total.to(x.dtype)

    def gather_last(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate each rank's x along the last dim on rank 0 (None on the others)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None


class RowParallel(nn.Module):
    """A row-parallel Linear: each rank multiplies its slice of the inputs, the partial
    outputs are summed, and the bias (held whole by every rank) is added once after."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group: Group):
        super().__init__()
        self.inner = inner
        self.bias = bias
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias

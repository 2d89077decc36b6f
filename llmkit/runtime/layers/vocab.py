"""Vocab-parallel embedding and LM head: each rank holds a contiguous block of vocab rows
(padded with zero rows to a multiple of the padding unit, see arch/plan.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.runtime.distributed import Group


class VocabEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, start: int, group: Group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [vocab rows here, hidden]
        self.start = start
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        here = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.group.all_reduce(out * here.unsqueeze(-1).to(out.dtype))


class LMHead(nn.Module):
    """Logits over the real vocab (padding columns dropped), complete on rank 0 only."""

    def __init__(self, proj: nn.Module, vocab_size: int, group: Group):
        super().__init__()
        self.proj = proj  # this rank's vocab rows: any Linear module
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        logits = self.group.gather_last(self.proj(x))
        return None if logits is None else logits[:, : self.vocab_size]

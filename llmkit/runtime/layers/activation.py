"""The llama MLP's activation: silu(gate) * up from the merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.kernels import cpu, cuda


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [tokens, 2 * width] -> [tokens, width]; on the CPU one pass of llmkit's
    kernel, with the same roundings as the torch ops; on CUDA one launch."""
    kernels = cpu.for_tensors(gate_up) or cuda.elementwise_for(gate_up)
    if kernels is not None and gate_up.dim() == 2 and gate_up.is_contiguous():
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

"""The plain records a stored Linear is read into, whatever its format: a dense weight,
symmetric per-channel int8, or grouped integers. The runtime converts them into its
modules (runtime/layers/linear.py); `dequantize` gives the float weight they compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.quant import int8
from llmkit.quant.rtn import dequantize_indexed


@dataclass(slots=True)
class DenseWeight:
    weight: torch.Tensor  # [out, in]

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


@dataclass(slots=True)
class Int8Weight:
    """Symmetric per-output-channel int8; `act_quant` adds dynamic per-token int8 inputs."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]
    act_quant: bool

    def dequantize(self) -> torch.Tensor:
        return int8.dequantize(self.q, self.scale[:, None], torch.float32)


@dataclass(slots=True)
class GroupedWeight:
    """w[o, i] = scales[o, g_idx[i]] * (q[o, i] - zeros[o, g_idx[i]])."""

    q: torch.Tensor  # int64 [out, in], unsigned
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # float32 [out, groups]
    g_idx: torch.Tensor  # int64 [in]
    bits: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_indexed(self.q, self.scales, self.zeros, self.g_idx)


LinearWeight = DenseWeight | Int8Weight | GroupedWeight

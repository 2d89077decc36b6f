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

    def check(self) -> None:
        """ValueError when the tensors cannot be one Linear's (checked at read)."""
        if self.q.dim() != 2 or self.scale.shape != (self.q.shape[0],):
            raise ValueError(
                f"{tuple(self.scale.shape)} scales for int8 weights of {tuple(self.q.shape)}"
            )


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

    def check(self) -> None:
        """ValueError when the tensors cannot be one Linear's (checked at read)."""
        out, inputs = self.q.shape
        groups = self.scales.shape[1] if self.scales.dim() == 2 else -1
        if (
            self.scales.shape != (out, groups)
            or self.zeros.shape != self.scales.shape
            or self.g_idx.shape != (inputs,)
            or (inputs and not 0 <= int(self.g_idx.min()) <= int(self.g_idx.max()) < groups)
        ):
            raise ValueError(
                f"scales {tuple(self.scales.shape)}, zeros {tuple(self.zeros.shape)} and "
                f"g_idx {tuple(self.g_idx.shape)} do not fit weights of {(out, inputs)}"
            )


LinearWeight = DenseWeight | Int8Weight | GroupedWeight

"""`--method int8`: weight-only symmetric per-channel int8, no calibration, written as
compressed-tensors `pack-quantized` (8-bit values packed in int32 words)."""

from __future__ import annotations

import torch

from llmkit.quant import int8
from llmkit.quant.formats import compressed_tensors as ct
from llmkit.quant.options import Int8Options


def pack(options: Int8Options, weight: torch.Tensor, scale_dtype: torch.dtype) -> dict:
    q, scale = int8.quantize_per_channel(weight, scale_dtype)
    return {
        "weight_packed": ct.pack_int32(q, 8),
        "weight_scale": scale,
        "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def quantization_config(options: Int8Options) -> dict:
    ignore = [] if options.quantize_lm_head else ["lm_head"]
    return ct.quantization_config(ct.PACK_QUANTIZED, activations=False, ignore=ignore)

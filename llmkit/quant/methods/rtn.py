"""`--method rtn`: round-to-nearest groups, no calibration, in the GPTQ v1 format (the
baseline the calibrated methods are measured against)."""

from __future__ import annotations

import torch

from llmkit.quant import rtn
from llmkit.quant.formats import gptq
from llmkit.quant.options import Grid, RTNOptions, quantizes_lm_head


def pack(options: RTNOptions, weight: torch.Tensor, scale_dtype: torch.dtype) -> dict:
    return _gptq_tensors(options, weight)


def quantization_config(options: Grid, desc_act: bool = False) -> dict:
    """GPTQ's config (gptq.py adds its own settings to it)."""
    config = gptq.quantization_config(options.bits, options.group_size, options.sym, desc_act)
    config["lm_head"] = quantizes_lm_head(options)
    return config


def _gptq_tensors(options: RTNOptions, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """(Group sizes and packing were checked for every Linear before any weight was read.)"""
    in_features = weight.shape[1]
    size = in_features if options.group_size == -1 else options.group_size
    # GPTQ v1 stores zero - 1, so asymmetric zero points start at 1.
    quant = rtn.quantize_groups(weight, options.bits, size, options.sym, min_zero=1)
    g_idx = torch.arange(in_features, dtype=torch.int32, device=weight.device) // size
    return gptq.pack(quant.q, quant.scales, quant.zeros, options.bits, g_idx)

"""What every integer method writes beside its quantized Linears: the other tensors of a
layer (norms, biases) in the method's dense dtype, and the input hook W8A8 computes with."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.arch.family import Family
from llmkit.quant import int8
from llmkit.quant.fp16 import checked_cast
from llmkit.quant.options import FLOAT16_METHODS


def dense_dtype(method: str, original: torch.dtype) -> torch.dtype:
    """The dtype unquantized tensors are written in: GPTQ and AWQ checkpoints are float16."""
    return torch.float16 if method in FLOAT16_METHODS else original


def dense_tensor(name: str, tensor: torch.Tensor, method: str, stored: torch.dtype):
    """An unquantized tensor (norm, bias) as `method` writes it, from one stored as `stored`;
    values the target dtype cannot hold are refused, naming the tensor."""
    dtype = dense_dtype(method, stored)
    advice = f"{method} checkpoints store it as {str(dtype).removeprefix('torch.')}"
    return checked_cast(name, tensor.detach().cpu(), dtype, advice)


def dense_tensors(layer: nn.Module, arch: Family, method: str, dtypes: dict, prefix: str) -> dict:
    """Every tensor of a decoder layer but its Linears' weights, as `method` writes it.
    `dtypes`: every checkpoint tensor's stored dtype, by full name (`prefix` + name)."""
    return {
        name: dense_tensor(prefix + name, tensor, method, dtypes[prefix + name])
        for name, tensor in layer.state_dict().items()
        if name.removesuffix(".weight") not in arch.linears
    }


def per_token_int8_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input as W8A8 kernels see it (dynamic per-token int8)."""
    return (int8.fake_quantize_per_token(args[0]), *args[1:])

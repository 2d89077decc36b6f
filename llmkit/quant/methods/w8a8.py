"""`--method w8a8`: SmoothQuant, then per-channel int8 weights with dynamic per-token int8
activations, written as compressed-tensors `int-quantized`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.arch.family import Family
from llmkit.quant import int8
from llmkit.quant.formats import compressed_tensors as ct
from llmkit.quant.methods.dense import dense_tensors, per_token_int8_hook
from llmkit.quant.options import W8A8Options
from llmkit.quant.sequential import LayerRun
from llmkit.quant.smoothquant import InputAbsMax, fold, smooth_scales


def pack(options: W8A8Options, weight: torch.Tensor, scale_dtype: torch.dtype) -> dict:
    q, scale = int8.quantize_per_channel(weight, scale_dtype)
    return {"weight": q, "weight_scale": scale}


def quantization_config(options: W8A8Options) -> dict:
    ignore = [] if options.quantize_lm_head else ["lm_head"]
    return ct.quantization_config(ct.INT_QUANTIZED, activations=True, ignore=ignore)


def layer_quantizer(arch: Family, options: W8A8Options, dtypes: dict, errors: list, warn):
    return W8A8Layer(arch, options.smooth_alpha, dtypes)


@dataclass(frozen=True, slots=True)
class W8A8Layer:
    """SmoothQuant then per-channel int8 weights for one decoder layer (a LayerQuantizer)."""

    arch: Family
    alpha: float
    dtypes: dict[str, torch.dtype]  # every checkpoint tensor's dtype, by full name

    def __call__(self, index: int, run: LayerRun) -> dict[str, torch.Tensor]:
        layer, prefix = run.layer, f"{self.arch.layers}.{index}."
        observers = [
            (g, InputAbsMax(layer.get_submodule(g.linears[0]))) for g in self.arch.smoothable
        ]
        run.run()
        for group, observer in observers:
            linears = [layer.get_submodule(name) for name in group.linears]
            scales = smooth_scales(observer.remove(), [m.weight for m in linears], self.alpha)
            fold(layer.get_submodule(group.source), linears, scales)
        out: dict[str, torch.Tensor] = {}
        for name in self.arch.linears:
            linear = layer.get_submodule(name)
            q, scale = int8.quantize_per_channel(
                linear.weight, self.dtypes[f"{prefix}{name}.weight"]
            )
            linear.weight.data = int8.dequantize(q, scale, linear.weight.dtype)
            linear.register_forward_pre_hook(per_token_int8_hook)
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = q, scale
        return out | dense_tensors(layer, self.arch, "w8a8", self.dtypes, prefix)

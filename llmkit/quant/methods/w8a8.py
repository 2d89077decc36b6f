"""`--method w8a8`: SmoothQuant, then per-channel int8 weights (rounded by GPTQ, or to
nearest) with dynamic per-token int8 activations, written as compressed-tensors
`int-quantized`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.arch.family import Family
from llmkit.quant import gptq as gptq_algorithm
from llmkit.quant import int8
from llmkit.quant.formats import compressed_tensors as ct
from llmkit.quant.methods.dense import dense_tensors, per_token_int8_hook
from llmkit.quant.methods.gptq import row_slices, run_collecting_stage_inputs
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
    return W8A8Layer(arch, options.smooth_alpha, options.w8a8_gptq, dtypes, warn)


# GPTQ of symmetric per-channel int8: one group per row, on a grid given (see _gptq_stage).
INT8_GPTQ = gptq_algorithm.GPTQSettings(
    bits=8, group_size=-1, sym=True, desc_act=False, act_group_aware=False, clip_search=False
)


@dataclass(frozen=True, slots=True)
class W8A8Layer:
    """SmoothQuant then per-channel int8 weights for one decoder layer (a LayerQuantizer).
    With `gptq`, each stage of Linears sharing an input is rounded by GPTQ on the Hessian of
    that input as smoothing leaves it (x / s: H / s sᵀ), taken in the same forward pass as
    the smoothing statistics, onto the grid round-to-nearest would use."""

    arch: Family
    alpha: float
    gptq: bool
    dtypes: dict[str, torch.dtype]  # every checkpoint tensor's dtype, by full name
    warn: Callable[[str], None] | None = None

    def __call__(self, index: int, run: LayerRun) -> dict[str, torch.Tensor]:
        layer, prefix = run.layer, f"{self.arch.layers}.{index}."
        observers = [
            (g, InputAbsMax(layer.get_submodule(g.linears[0]))) for g in self.arch.smoothable
        ]
        if self.gptq:
            hessians = run_collecting_stage_inputs(layer, self.arch.stages, run)
        else:
            run.run()
        smoothed = {}  # Linear -> the scales its inputs were divided by
        for group, observer in observers:
            linears = [layer.get_submodule(name) for name in group.linears]
            scales = smooth_scales(observer.remove(), [m.weight for m in linears], self.alpha)
            fold(layer.get_submodule(group.source), linears, scales)
            smoothed |= dict.fromkeys(group.linears, scales)
        out: dict[str, torch.Tensor] = {}
        for k, stage in enumerate(self.arch.stages):
            if not self.gptq:
                out |= self._nearest_stage(layer, prefix, stage)
                continue
            hessian = hessians[k].take()
            if stage[0] in smoothed:  # the stage reads x / s
                s = smoothed[stage[0]].to(hessian.device, torch.float32)
                hessian.div_(s[:, None] * s[None, :])
            out |= self._gptq_stage(layer, prefix, stage, hessian)
        for name in self.arch.linears:
            layer.get_submodule(name).register_forward_pre_hook(per_token_int8_hook)
        return out | dense_tensors(layer, self.arch, "w8a8", self.dtypes, prefix)

    def _nearest_stage(self, layer, prefix: str, stage) -> dict[str, torch.Tensor]:
        out = {}
        for name in stage:
            linear = layer.get_submodule(name)
            q, scale = int8.quantize_per_channel(
                linear.weight, self.dtypes[f"{prefix}{name}.weight"]
            )
            linear.weight.data = int8.dequantize(q, scale, linear.weight.dtype)
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = q, scale
        return out

    def _gptq_stage(self, layer, prefix: str, stage, hessian) -> dict[str, torch.Tensor]:
        linears = [layer.get_submodule(name) for name in stage]
        weight = torch.cat([linear.weight.detach() for linear in linears])
        blocks = row_slices(linears)
        out = {
            f"{name}.weight_scale": int8.per_channel_scale(
                weight[rows], self.dtypes[f"{prefix}{name}.weight"]
            )
            for name, rows in zip(stage, blocks, strict=True)
        }
        scale = torch.cat([out[f"{name}.weight_scale"].float().flatten() for name in stage])
        scale = scale.to(hessian.device)
        grid = gptq_algorithm.Grid(scale, torch.full_like(scale, int8.QMAX), 2 * int8.QMAX)
        label = prefix + "/".join(stage)
        result = gptq_algorithm.quantize(
            weight, hessian, INT8_GPTQ, name=label, warn=self.warn, grid=grid
        )
        q = (result.q.to(torch.int16) - int8.QMAX).to(torch.int8)
        for name, linear, rows in zip(stage, linears, blocks, strict=True):
            out[f"{name}.weight"] = q[rows].contiguous()
            linear.weight.data = int8.dequantize(  # on the layer's device, as its scale
                q[rows].to(weight.device), out[f"{name}.weight_scale"], linear.weight.dtype
            )
        return out

"""Integer quantization methods: how one Linear becomes its on-disk tensors, which config
goes with them, and (for W8A8) how a decoder layer is calibrated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.quant import gptq as gptq_algorithm
from llmkit.quant import int8, rtn
from llmkit.quant import layer_steps as steps
from llmkit.quant.arch import Arch
from llmkit.quant.formats import awq, gptq
from llmkit.quant.formats import compressed_tensors as ct
from llmkit.quant.fp16 import checked_cast
from llmkit.quant.options import FLOAT16_METHODS, GPTQ_FORMAT_METHODS, QuantOptions
from llmkit.quant.sequential import LayerRun, return_freed_memory
from llmkit.quant.smoothquant import InputAbsMax, fold, smooth_scales


def linear_tensors(
    method: str, options: QuantOptions, weight: torch.Tensor, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """weight: [out, in] float -> the module's tensors in `method`'s format (suffix -> tensor)."""
    if method == "rtn":
        return _gptq_tensors(options, weight)
    q, scale = int8.quantize_per_channel(weight, scale_dtype)
    if method == "w8a8":
        return {"weight": q, "weight_scale": scale}
    return {
        "weight_packed": ct.pack_int32(q, 8),
        "weight_scale": scale,
        "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def _gptq_tensors(options: QuantOptions, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """(Group sizes and packing were checked for every Linear before any weight was read.)"""
    in_features = weight.shape[1]
    size = in_features if options.group_size == -1 else options.group_size
    # GPTQ v1 stores zero - 1, so asymmetric zero points start at 1.
    quant = rtn.quantize_groups(weight, options.bits, size, options.sym, min_zero=1)
    g_idx = torch.arange(in_features, dtype=torch.int32) // size
    return gptq.pack(quant.q, quant.scales, quant.zeros, options.bits, g_idx)


def dense_dtype(method: str, original: torch.dtype) -> torch.dtype:
    """The dtype unquantized tensors are written in: GPTQ and AWQ checkpoints are float16."""
    return torch.float16 if method in FLOAT16_METHODS else original


def dense_tensor(name: str, tensor: torch.Tensor, method: str, stored: torch.dtype):
    """An unquantized tensor (norm, bias) as `method` writes it, from one stored as `stored`;
    values the target dtype cannot hold are refused, naming the tensor."""
    dtype = dense_dtype(method, stored)
    advice = f"{method} checkpoints store it as {str(dtype).removeprefix('torch.')}"
    return checked_cast(name, tensor.detach().cpu(), dtype, advice)


def dense_tensors(layer: nn.Module, arch: Arch, method: str, dtypes: dict, prefix: str) -> dict:
    """Every tensor of a decoder layer but its Linears' weights, as `method` writes it.
    `dtypes`: every checkpoint tensor's stored dtype, by full name (`prefix` + name)."""
    return {
        name: dense_tensor(prefix + name, tensor, method, dtypes[prefix + name])
        for name, tensor in layer.state_dict().items()
        if name.removesuffix(".weight") not in arch.linears
    }


def quantization_config(method: str, options: QuantOptions) -> dict:
    if method == "awq":
        return awq.quantization_config(options.group_size)
    if method in GPTQ_FORMAT_METHODS:
        config = gptq.quantization_config(
            options.bits, options.group_size, options.sym, options.desc_act and method == "gptq"
        )
        config["lm_head"] = options.quantize_lm_head
        if method == "gptq":
            config |= {
                "static_groups": options.static_groups,
                "true_sequential": options.true_sequential,
                "damp_percent": options.damp_percent,
                "act_group_aware": options.act_group_aware and not options.desc_act,
                "clip_search": options.clip_search,
            }
        return config
    fmt = ct.INT_QUANTIZED if method == "w8a8" else ct.PACK_QUANTIZED
    ignore = [] if options.quantize_lm_head else ["lm_head"]
    return ct.quantization_config(fmt, activations=method == "w8a8", ignore=ignore)


def per_token_int8_hook(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input as W8A8 kernels see it (dynamic per-token int8)."""
    return (int8.fake_quantize_per_token(args[0]), *args[1:])


@dataclass(frozen=True, slots=True)
class W8A8Layer:
    """SmoothQuant then per-channel int8 weights for one decoder layer (a LayerQuantizer)."""

    arch: Arch
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


@dataclass(frozen=True, slots=True)
class GPTQLayer:
    """GPTQ for one decoder layer (a LayerQuantizer). Stages of Linears sharing an input are
    quantized together (their rows stacked: one Hessian, one sweep); with `true_sequential`
    each stage's Hessian is taken after the earlier stages are quantized."""

    arch: Arch
    settings: gptq_algorithm.GPTQSettings
    true_sequential: bool
    dtypes: dict[str, torch.dtype]
    errors: list[dict]  # filled: one {"layer": i, "modules": {name: relative error}} per layer
    warn: Callable[[str], None]

    @torch.no_grad()
    def __call__(self, index: int, run: LayerRun) -> dict[str, torch.Tensor]:
        layer, prefix = run.layer, f"{self.arch.layers}.{index}."
        out: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        cache = run.scratch()  # attention outputs, then the residual after attention
        deferred = []
        for k, stage in enumerate(self.arch.stages):
            first = layer.get_submodule(stage[0])
            hessian = gptq_algorithm.Hessian(first.in_features, first.weight.device)
            for x, c in zip(run.inputs, cache, strict=True):
                hessian.add(self._stage_input(k, layer, run, x, c))
            if self.true_sequential:
                out |= self._quantize_stage(layer, prefix, stage, hessian, errors)
            else:
                deferred.append((stage, hessian))
        for stage, hessian in deferred:
            out |= self._quantize_stage(layer, prefix, stage, hessian, errors)
        if self.true_sequential:  # the cache holds what the quantized layer computes
            run.advance(lambda i, x: steps.output(layer, self.arch, _on(cache[i], x)))
        out |= dense_tensors(layer, self.arch, "gptq", self.dtypes, prefix)
        self.errors.append({"layer": index, "modules": errors})
        return out

    def _stage_input(self, k, layer, run, x, cache) -> torch.Tensor:
        """The input of stage k's Linears for one batch, from what earlier stages left in
        `cache` (each stage's Linears are as quantized as true-sequential asks)."""
        arch, x = self.arch, x.to(run.device, run.dtype)
        if k == 0:
            return layer.get_submodule(arch.input_norm)(x)
        if k == 1:
            core = steps.attention_core(layer, arch, x, run.position_embeddings)
            cache.copy_(core)
            return core
        if k == 2:
            h = steps.after_attention(layer, arch, x, _on(cache, x))
            cache.copy_(h)
            return layer.get_submodule(arch.post_norm)(h)
        return steps.mlp_core(layer, arch, _on(cache, x))

    def _quantize_stage(self, layer, prefix, stage, hessian, errors) -> dict[str, torch.Tensor]:
        linears = [layer.get_submodule(name) for name in stage]
        weight = torch.cat([linear.weight for linear in linears])
        result = gptq_algorithm.quantize(
            weight, hessian.matrix, self.settings, name=prefix + "/".join(stage), warn=self.warn
        )
        del weight
        dequantized = result.dequantize()
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, linear in zip(stage, linears, strict=True):
            rows = slice(start, start + linear.out_features)
            start = rows.stop
            q, scales, zeros = result.q[rows], result.scales[rows], result.zeros[rows]
            packed = gptq.pack(q, scales, zeros, self.settings.bits, result.g_idx)
            out |= {f"{name}.{suffix}": t for suffix, t in packed.items()}
            approx = dequantized[rows]
            errors[name] = gptq_algorithm.relative_error(linear.weight, approx, hessian.matrix)
            linear.weight.data = approx.to(linear.weight.device, linear.weight.dtype)
        return_freed_memory()
        return out


def _on(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor.to(like.device, like.dtype)

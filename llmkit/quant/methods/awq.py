"""`--method awq`: AWQ in the AutoAWQ GEMM format. One decoder layer at a time (a
LayerQuantizer): observe, search scales, fold, clip, quantize.

1. One forward over all calibration batches records each scale group's mean |input| and keeps
   the inputs of the first batches (about `search_tokens` tokens) as the search sample.
2. Per group, in compute order: the α whose scales give the least error of the group's block
   output (attention for q/k/v, the MLP for gate/up, the Linear itself for o and down) on
   the sample; the scales are folded into the source (norm or Linear), which leaves the float
   layer unchanged, and divided out of the sample.
3. Per Linear: the clipping search (not for q/k, whose errors the softmax amplifies), then
   4-bit asymmetric group quantization; the layer then computes with the quantized weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from llmkit.arch.family import Family, Smoothable
from llmkit.memory import return_freed_memory
from llmkit.quant import awq, rtn
from llmkit.quant.formats import awq as awq_format
from llmkit.quant.methods.dense import dense_tensors
from llmkit.quant.options import AWQOptions, settings_of
from llmkit.quant.sequential import LayerRun
from llmkit.quant.smoothquant import fold


def quantization_config(options: AWQOptions) -> dict:
    return awq_format.quantization_config(options.group_size)


def layer_quantizer(arch: Family, options: AWQOptions, dtypes: dict, errors: list, warn):
    settings = settings_of(awq.AWQSettings, options)
    return AWQLayer(arch, settings, options.awq_search_tokens, dtypes, errors)


@dataclass
class _Observed:
    """Forward pre-hook: mean |x| over every batch, and the batches (on the CPU) until
    `search_tokens` tokens have been kept."""

    search_tokens: int
    mean: awq.ChannelMean = field(default_factory=awq.ChannelMean)
    sample: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.mean.count < self.search_tokens:
            self.sample.append(args[0].detach().to("cpu", copy=True))
        self.mean.add(args[0])


@dataclass(frozen=True, slots=True)
class AWQLayer:
    arch: Family
    settings: awq.AWQSettings
    search_tokens: int
    dtypes: dict[str, torch.dtype]  # every checkpoint tensor's dtype, by full name
    errors: list[dict]  # filled: one {"layer", "modules", "alphas"} per layer

    @torch.no_grad()
    def __call__(self, index: int, run: LayerRun) -> dict[str, torch.Tensor]:
        layer = run.layer
        observed = self._observe(run)
        alphas = {}
        for group in self.arch.awq_groups:
            if _applies(layer, group):
                seen = observed[group.linears[0]]
                alphas["/".join(group.linears)] = self._scale(layer, run, group, seen)
        out: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        for stage in self.arch.stages:
            sample = observed[stage[0]].sample
            x = awq.clip_sample(torch.cat([s.reshape(-1, s.shape[-1]) for s in sample]))
            for name in stage:
                out |= self._quantize(layer.get_submodule(name), name, x, errors)
        out |= dense_tensors(layer, self.arch, "awq", self.dtypes, f"{self.arch.layers}.{index}.")
        self.errors.append({"layer": index, "modules": errors, "alphas": alphas})
        return_freed_memory()
        return out

    def _observe(self, run: LayerRun) -> dict[str, _Observed]:
        """Mean |input| of every stage's Linears (keyed by the first one's name) over all
        batches; the inputs of the first batches kept as the search sample."""
        firsts = [stage[0] for stage in self.arch.stages]
        observed = {name: _Observed(self.search_tokens) for name in firsts}
        layer = run.layer
        handles = [layer.get_submodule(n).register_forward_pre_hook(observed[n]) for n in firsts]
        try:
            run.run()
        finally:
            for handle in handles:
                handle.remove()
        return observed

    def _scale(self, layer, run: LayerRun, group: Smoothable, seen: _Observed) -> float:
        linears = [layer.get_submodule(name) for name in group.linears]
        block = self._block(layer, run, group)
        sample = [x.to(run.device, run.dtype) for x in seen.sample]

        def outputs() -> torch.Tensor:
            return torch.cat([block(x) for x in sample])

        search = awq.search_scales(linears, seen.mean.mean, outputs, outputs(), self.settings)
        fold(layer.get_submodule(group.source), linears, search.scales)
        for x in seen.sample:
            x.div_(search.scales.to(x.device, x.dtype))
        return search.alpha

    def _block(self, layer, run: LayerRun, group: Smoothable) -> Callable:
        """input of the group's Linears -> the output AWQ scores."""
        if not group.block:
            return layer.get_submodule(group.linears[0])
        module = layer.get_submodule(group.block)
        if group.block != self.arch.attention:
            return module
        rope = run.position_embeddings

        def attention(x: torch.Tensor) -> torch.Tensor:
            return module(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]

        return attention

    def _quantize(self, linear: nn.Linear, name: str, x: torch.Tensor, errors: dict) -> dict:
        original = linear.weight.detach().float()
        x = x.to(original.device)
        size = self.settings.group_size
        w = original
        if self.settings.clip_search and name not in self.arch.score_linears:
            w = awq.apply_clip(w, awq.search_clip(w, x, self.settings), size)
        quant = rtn.quantize_groups(w, awq.BITS, size, sym=False)
        approx = quant.dequantize()
        errors[name] = _relative_error(x, original, approx)
        linear.weight.data = approx.to(linear.weight.dtype)
        packed = awq_format.pack(quant.q.cpu(), quant.scales.cpu(), quant.zeros.cpu())
        return {f"{name}.{suffix}": t for suffix, t in packed.items()}


def _applies(layer: nn.Module, group: Smoothable) -> bool:
    """Can the scales be folded: does the source produce exactly the linears' inputs?"""
    source = layer.get_submodule(group.source)
    if not isinstance(source, nn.Linear):
        return True
    return all(source.out_features == layer.get_submodule(n).in_features for n in group.linears)


def _relative_error(x: torch.Tensor, w: torch.Tensor, approx: torch.Tensor) -> float:
    """||x (W - Ŵ)ᵀ||² / ||x Wᵀ||² on the sample."""
    reference = x.float() @ w.t()
    den = float(reference.pow(2).sum())
    return float((x.float() @ approx.t() - reference).pow(2).sum()) / den if den else 0.0

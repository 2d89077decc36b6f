"""`--method gptq`: GPTQ, layer by layer on calibration text (act-order, static groups,
group-aware order, the clip search, true-sequential stages), in the GPTQ v1 format."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmkit.arch.family import Family
from llmkit.kernels import cpu as cpu_kernels
from llmkit.memory import return_freed_memory
from llmkit.quant import gptq as gptq_algorithm
from llmkit.quant import layer_steps as steps
from llmkit.quant.formats import gptq
from llmkit.quant.methods import rtn
from llmkit.quant.methods.dense import dense_tensors
from llmkit.quant.options import GPTQOptions, settings_of
from llmkit.quant.sequential import LayerRun

# Tokens the MLP runs at once in GPTQ's stages: its [tokens, intermediate] buffer stays small
# (attention takes whole windows), while the products and the Hessian get rows enough to run
# near their full speed (fewer tokens a call cost more CPU time).
MLP_TOKENS = 512


def quantization_config(options: GPTQOptions) -> dict:
    return rtn.quantization_config(options, options.desc_act) | {
        "static_groups": options.static_groups,
        "true_sequential": options.true_sequential,
        "damp_percent": options.damp_percent,
        "act_group_aware": options.act_group_aware and not options.desc_act,
        "clip_search": options.clip_search,
    }


def prepare(device: torch.device) -> None:
    """Before the memory baseline is taken: GPTQ's CPU kernels, loaded once."""
    if device.type == "cpu":
        cpu_kernels.ops()


def layer_quantizer(arch: Family, options: GPTQOptions, dtypes: dict, errors: list, warn):
    settings = settings_of(gptq_algorithm.GPTQSettings, options)
    return GPTQLayer(arch, settings, options.true_sequential, dtypes, errors, warn)


@dataclass(frozen=True, slots=True)
class GPTQLayer:
    """GPTQ for one decoder layer (a LayerQuantizer). Stages of Linears sharing an input are
    quantized together (their rows stacked: one Hessian, one sweep); with `true_sequential`
    each stage's Hessian is taken after the earlier stages are quantized.

    The calibration activations are the only activation buffer: once attention is quantized,
    each batch of the layer's inputs is overwritten with the residual after attention, which
    is all the MLP stages and the layer's output need."""

    arch: Family
    settings: gptq_algorithm.GPTQSettings
    true_sequential: bool
    dtypes: dict[str, torch.dtype]
    errors: list[dict]  # filled: one {"layer": i, "modules": {name: relative error}} per layer
    warn: Callable[[str], None]

    @property
    def deferred(self) -> tuple[str, ...]:
        """The MLP's Linears, which true-sequential GPTQ reads only for the MLP's stages."""
        return self.arch.stages[2] + self.arch.stages[3] if self.true_sequential else ()

    @torch.no_grad()
    def __call__(self, index: int, run: LayerRun) -> dict[str, torch.Tensor]:
        layer, prefix = run.layer, f"{self.arch.layers}.{index}."
        errors: dict[str, float] = {}
        if self.true_sequential:
            out = self._sequential(layer, run, prefix, errors)
        else:
            out = self._all_at_once(layer, run, prefix, errors)
        out |= dense_tensors(layer, self.arch, "gptq", self.dtypes, prefix)
        self.errors.append({"layer": index, "modules": errors})
        return out

    def _all_at_once(self, layer, run, prefix, errors) -> dict[str, torch.Tensor]:
        """Every stage's Hessian from one forward of the float layer, then every stage
        quantized (run_layers then computes the quantized layer's outputs)."""
        hessians = run_collecting_stage_inputs(layer, self.arch.stages, run)
        out: dict[str, torch.Tensor] = {}
        for stage, hessian in zip(self.arch.stages, hessians, strict=True):
            out |= self._quantize_stage(layer, prefix, stage, hessian.take, errors)
        return out

    def _sequential(self, layer, run, prefix, errors) -> dict[str, torch.Tensor]:
        """Stage by stage, each one's inputs computed with the earlier stages quantized. Only
        the Linears still to run hold weights: attention's until the residual after it is
        computed; then gate/up's (let go of while down_proj is quantized, and given back,
        quantized, for the layer's output); down_proj's from its stage on."""
        stages = self.arch.stages
        out: dict[str, torch.Tensor] = {}
        for k, stage in enumerate(stages):
            if k == 2:  # the MLP starts from the residual after the (quantized) attention
                run.update(functools.partial(self._residual, layer, run.position_embeddings))
                run.unload(stages[0] + stages[1])
                run.load(stage)
            collect = functools.partial(self._stage_matrix, k, run)
            if k == 3:
                collect = functools.partial(self._down_matrix, run, out)
            out |= self._quantize_stage(layer, prefix, stage, collect, errors, again=collect)
        if not run.last:  # the last layer's outputs feed no other layer
            self._reload(run, stages[2], out)
            buffers = steps.MLPBuffers(layer, self.arch, MLP_TOKENS, run.device, run.dtype)
            run.advance(lambda h: steps.output(layer, self.arch, h, buffers, out=h), MLP_TOKENS)
        return out

    def _stage_matrix(self, k: int, run: LayerRun) -> torch.Tensor:
        return self._collect(k, run).take()

    def _down_matrix(self, run: LayerRun, out: dict) -> torch.Tensor:
        """down_proj's Hessian, collected with gate/up's quantized weights (given back first
        on a retry), which are let go of before the Hessian's full matrix is assembled;
        down_proj then reads its own."""
        gate_up, down = self.arch.stages[2], self.arch.stages[3]
        self._reload(run, gate_up, out)
        hessian = self._collect(3, run)
        run.unload(gate_up)
        matrix = hessian.take()
        run.load(down)
        return matrix

    def _reload(self, run: LayerRun, names: tuple[str, ...], out: dict) -> None:
        """Give unloaded Linears their quantized weights back, dequantized from the tensors
        written for them (what they computed with before, exactly)."""
        linears = {name: run.layer.get_submodule(name) for name in names}
        unloaded = {name: linear for name, linear in linears.items() if linear.weight.is_meta}
        for name, linear in unloaded.items():
            packed = [out[f"{name}.{suffix}"] for suffix in gptq.SUFFIXES]
            shape = (linear.out_features, linear.in_features)
            weight = torch.empty(shape, device=run.device, dtype=run.dtype)
            gptq.dequantize_into(weight, *packed, self.settings.bits)
            linear.weight = nn.Parameter(weight, requires_grad=False)
        if unloaded:  # the unpacking's temporaries, before the pass that follows
            return_freed_memory()

    def _residual(self, layer, rope, x: torch.Tensor) -> torch.Tensor:
        """h = x + attention(input_norm(x))."""
        core = steps.attention_core(layer, self.arch, x, rope)
        return steps.after_attention(layer, self.arch, x, core)

    def _collect(self, k: int, run: LayerRun) -> gptq_algorithm.Hessian:
        """Stage k's Hessian over every batch of the inputs as the earlier stages left them
        (called once more to retry a failed factorization, which overwrote the first)."""
        hessian = _stage_hessian(run.layer, self.arch.stages[k], run.device)
        tokens = None if k < 2 else MLP_TOKENS  # attention needs whole windows; the MLP not
        stage_input = self._stage_input(k, run)
        run.each(lambda x: hessian.add(stage_input(x)), tokens)
        return hessian

    def _stage_input(self, k: int, run: LayerRun) -> Callable[[torch.Tensor], torch.Tensor]:
        """What stage k's Linears read, from a batch of the inputs as the earlier stages left
        them (the layer's inputs, then from stage 2 on the residual after attention)."""
        arch, layer = self.arch, run.layer
        if k == 0:
            return layer.get_submodule(arch.input_norm)
        if k == 1:
            return lambda x: steps.attention_core(layer, arch, x, run.position_embeddings)
        if k == 2:
            return layer.get_submodule(arch.post_norm)
        buffers = steps.MLPBuffers(layer, arch, MLP_TOKENS, run.device, run.dtype)
        return lambda h: steps.mlp_core(layer, arch, h, buffers)

    def _quantize_stage(
        self, layer, prefix, stage, hessian: Callable[[], torch.Tensor], errors, again=None
    ) -> dict[str, torch.Tensor]:
        """GPTQ of the stage's stacked Linears given their Hessian (and `again`, which
        rebuilds it: see gptq.quantize); the Linears then compute as quantized.

        `hessian()` is computed before the weights are taken (computing it may load them:
        see _down_matrix), and handed on from a list, so that no reference here keeps the
        matrix (factorized in place) alive after GPTQ lets go of it."""
        matrix = [hessian()]
        linears = [layer.get_submodule(name) for name in stage]
        if len(linears) == 1:
            weight = linears[0].weight.detach()
        else:
            weight = torch.cat([linear.weight for linear in linears])
        rows = row_slices(linears)
        for linear, block in zip(linears, rows, strict=True):  # one copy of them, not two
            linear.weight.data = weight[block]
        return_freed_memory()  # the Linears' own weights, now views of the stacked copy
        label = prefix + "/".join(stage)
        result = gptq_algorithm.quantize(
            weight, matrix.pop(), self.settings, name=label, warn=self.warn, again=again
        )
        return_freed_memory()  # the error step's temporaries, before dequantizing and packing
        result.dequantize_into(weight)  # from here on, the Linears compute as quantized
        out: dict[str, torch.Tensor] = {}
        for name, block in zip(stage, rows, strict=True):
            q, scales, zeros = result.q[block], result.scales[block], result.zeros[block]
            packed = gptq.pack(q, scales, zeros, self.settings.bits, result.g_idx)
            out |= {f"{name}.{suffix}": t for suffix, t in packed.items()}
            errors[name] = result.relative_error(block)
        return_freed_memory()
        return out


def _stage_hessian(layer: nn.Module, stage: tuple[str, ...], device) -> gptq_algorithm.Hessian:
    """An empty Hessian for the inputs the Linears of `stage` share."""
    return gptq_algorithm.Hessian(layer.get_submodule(stage[0]).in_features, device)


def run_collecting_stage_inputs(layer, stages, run: LayerRun) -> list[gptq_algorithm.Hessian]:
    """run.run(), each stage's Hessian of the inputs its Linears share collected meanwhile
    (from a forward pre-hook on its first Linear)."""
    hessians, handles = [], []
    for stage in stages:
        hessian = _stage_hessian(layer, stage, run.device)
        first = layer.get_submodule(stage[0])
        handles.append(first.register_forward_pre_hook(_accumulate_into(hessian)))
        hessians.append(hessian)
    try:
        run.run()
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def row_slices(linears: list[nn.Module]) -> list[slice]:
    """Each Linear's rows in its stage's stacked weight."""
    sizes = [linear.out_features for linear in linears]
    ends = itertools.accumulate(sizes)
    return [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]


def _accumulate_into(hessian: gptq_algorithm.Hessian):
    """A forward pre-hook adding a module's input to `hessian`."""

    def hook(module: nn.Module, args: tuple) -> None:
        hessian.add(args[0])

    return hook

"""Build one rank's LlamaModel from a checkpoint: read each Linear into a plain weight record
for its format, merge siblings, and convert to the device's fastest layout."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.arch.family import Block, Family, family_for
from llmkit.checkpoint.rank_tensors import RankTensors
from llmkit.errors import LlmkitError
from llmkit.memory import return_freed_memory
from llmkit.quant.formats.readers import LinearReader
from llmkit.runtime.distributed import Group, RowParallel
from llmkit.runtime.layers import pages
from llmkit.runtime.layers.linear import (
    DenseLinear,
    DenseWeight,
    LinearWeight,
    Parallel,
    concat,
    convert_for_runtime,
)
from llmkit.runtime.layers.norm import RMSNorm
from llmkit.runtime.layers.rotary import Rotary
from llmkit.runtime.layers.vocab import LMHead, VocabEmbedding
from llmkit.runtime.lora import LoraContext, LoraLinear
from llmkit.runtime.models.llama import MLP, Attention, DecoderLayer, LlamaConfig, LlamaModel


def load_model(
    src: RankTensors,
    group: Group,
    dtype: torch.dtype,
    device: torch.device,
    exact: bool = False,
    loras: LoraContext | None = None,
) -> tuple[LlamaModel, LlamaConfig]:
    """The model rank `group.rank` runs, weights on `device`; `exact`: weight-only quantized
    Linears as their dequantized weights (see convert_for_runtime); `loras`: wrap each
    adaptable Linear in a LoraLinear reading that context (the model's `lora_modules` then
    names them)."""
    cfg = LlamaConfig.from_hf(src.config)
    family = family_for(src.config)
    heads, kv_heads = cfg.heads_per_rank(group.size)
    reader = LinearReader(src, src.config.get("quantization_config"))
    build = _Builder(src, family, reader, group, dtype, device, exact, loras)
    with pages.shared():  # the streamed weights, small ones sharing 2 MiB pages
        layers = [build.layer(i, cfg, heads, kv_heads) for i in range(cfg.num_layers)]
        embed_name = f"{family.embed}.weight"
        embed = src.get(embed_name).to(device, dtype)
        head = build.lm_head(embed)
    if build.tied() and isinstance(head, DenseLinear):
        embed = head.weight  # one table for both (the head may have copied it to 2 MiB pages)
    model = LlamaModel(
        VocabEmbedding(embed, src.offset(embed_name), group),
        layers,
        build.norm(f"{family.final_norm}.weight", cfg),
        LMHead(head, cfg.vocab_size, group),
        Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling),
    )
    model.lora_modules = build.lora_modules
    model = _frozen(model.to(device))
    return_freed_memory()  # the load's transient copies, else kept as free heap in the RSS
    return model, cfg


def _frozen(model: nn.Module) -> nn.Module:
    """The model for inference only: every module's parameters, buffers and children become
    plain instance attributes as well, which Python finds without nn.Module.__getattr__ (a
    CPU decode step reads hundreds of them). Nothing may be moved or re-registered
    afterwards: the attributes would go stale."""
    for module in model.modules():
        for named in (module._parameters, module._buffers, module._modules):
            module.__dict__.update(named)
    return model


class _Builder:
    def __init__(
        self, src: RankTensors, family: Family, reader, group: Group, dtype, device, exact, loras
    ):
        self.src, self.family, self.reader, self.group = src, family, reader, group
        self.dtype, self.device, self.exact = dtype, device, exact
        self.loras = loras
        self.lora_modules: dict[str, LoraLinear] = {}  # each part's module name -> its wrapper

    def convert(self, weight: LinearWeight, bias, gated: bool = False) -> nn.Module:
        return convert_for_runtime(weight, bias, self.dtype, self.device, self.exact, gated)

    def layer(self, i: int, cfg: LlamaConfig, heads: int, kv_heads: int) -> DecoderLayer:
        p = f"{self.family.layers}.{i}."
        attention, mlp = self.family.blocks
        attn = Attention(
            *self.block(p, attention),
            *(self.norm(f"{p}{n}.weight", cfg) for n in self.family.head_norms),  # when held
            heads,
            kv_heads,
            cfg.head_dim,
        )
        return DecoderLayer(
            attn,
            MLP(*self.block(p, mlp, gated=True)),
            *(self.norm(f"{p}{n}.weight", cfg) for n in self.family.norms),
            self.loras,
        )

    def block(self, prefix: str, block: Block, gated: bool = False) -> tuple[nn.Module, nn.Module]:
        """(the block's input Linears as one product, its row-parallel output Linear);
        `gated`: their outputs are the [gate; up] halves of silu(gate) * up."""
        inputs = [f"{prefix}{block.name}.{linear.name}" for linear in block.inputs]
        merged = self.merged(inputs, gated)
        return merged, self.row_parallel(f"{prefix}{block.name}.{block.output.name}")

    def norm(self, name: str, cfg: LlamaConfig) -> RMSNorm | None:
        """The norm `name`, or None when the checkpoint has none (the architecture has none)."""
        if name not in self.src:
            return None
        return RMSNorm(self.src.get(name).to(self.device, self.dtype), cfg.rms_norm_eps)

    def merged(self, modules: list[str], gated: bool = False) -> nn.Module:
        """Column-parallel siblings sharing an input, as one Linear when their layouts allow;
        `gated` (see convert_for_runtime) only where no LoRA wrapper will sit between the
        product and its activation (adapters add to gate and up before it)."""
        weights = [self.reader.read(m) for m in modules]
        biases = [self._bias(m) for m in modules]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        if any(b is not None for b in biases) and bias is None:
            raise LlmkitError(f"{modules[0]}: some of {modules} have a bias and some do not")
        whole = concat(weights)
        if whole is not None:
            module = self.convert(whole, bias, gated and self.loras is None)
        else:
            module = Parallel([self.convert(w, b) for w, b in zip(weights, biases, strict=True)])
        return self.adaptable(module, modules, weights)

    def adaptable(self, module: nn.Module, names: list[str], weights: list) -> nn.Module:
        """`module` (computing the Linears `names` side by side), wrapped to take LoRA
        adapters when the engine serves them."""
        if self.loras is None:
            return module
        shapes = [_shape(w) for w in weights]
        parts = [(name, shape[0]) for name, shape in zip(names, shapes, strict=True)]
        wrapper = LoraLinear(module, parts, shapes[0][1], self.loras)
        self.lora_modules.update(dict.fromkeys(names, wrapper))
        return wrapper

    def lm_head(self, embed: torch.Tensor) -> nn.Module:
        """The lm_head as stored, quantized or not; the embedding when they are tied."""
        if self.tied():
            return self.convert(DenseWeight(embed), None)
        return self.convert(self.reader.read(self.family.lm_head), None)

    def tied(self) -> bool:
        """Whether the checkpoint has no lm_head of its own (it is the embedding)."""
        return not any(name.startswith(f"{self.family.lm_head}.") for name in self.src.plans)

    def row_parallel(self, module: str) -> nn.Module:
        weight, bias = self.reader.read(module), self._bias(module)
        if self.group.size == 1:
            return self.adaptable(self.convert(weight, bias), [module], [weight])
        inner = self.convert(weight, None)
        bias = None if bias is None else bias.to(self.device, self.dtype)
        return RowParallel(inner, bias, self.group)

    def _bias(self, module: str) -> torch.Tensor | None:
        name = f"{module}.bias"
        return self.src.get(name) if name in self.src else None


def _shape(weight: LinearWeight) -> tuple[int, int]:
    """[out, in] of a Linear's record, whatever its format."""
    return tuple((weight.weight if isinstance(weight, DenseWeight) else weight.q).shape)

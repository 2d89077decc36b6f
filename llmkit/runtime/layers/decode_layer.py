"""A decoder layer of a CPU decode step as one call of llmkit's C++ layer
(kernels/cpu_layer.cpp): the kernels the Python layer runs for such a step, in the same
order and with the same roundings, without the Python around each of them (on a small
model, a large share of a 4-bit decode step). When every layer is one, a DecodeStack runs
them all in one call.

It applies when every part of the layer runs through llmkit's CPU kernels (no act-order
permutation, no q/k norms, no tensor-parallel reduction, head_dim a multiple of 8) and the
step holds only decodes, at most KERNEL_MAX_ROWS of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmkit.kernels import cpu
from llmkit.runtime.layers.attention import AttentionMetadata
from llmkit.runtime.layers.linear import KERNEL_MAX_ROWS, KernelCall
from llmkit.runtime.layers.norm import RMSNorm


@dataclass(frozen=True, slots=True)
class DecodeLayer:
    """A layer's arguments to llmkit_cpu.decode_layer, gathered once at load."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    linears: tuple[list[torch.Tensor], ...]  # qkv, o, gate_up, down: weights, then bias
    kinds: list[int]
    group_sizes: list[int]
    num_heads: int
    num_kv_heads: int
    scale: float

    @classmethod
    def build(cls, attn, mlp, input_norm: RMSNorm, post_norm: RMSNorm) -> DecodeLayer | None:
        """None when some part of the layer does not run through llmkit's CPU kernels."""
        dtype = input_norm.weight.dtype
        if not input_norm.weight.is_cpu or cpu.ops() is None:
            return None
        calls = [_kernel_call(m) for m in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)]
        usable = (
            dtype in cpu.DTYPES
            and post_norm.weight.dtype == dtype
            and input_norm.eps == post_norm.eps
            and attn.q_norm is None
            and attn.head_dim % cpu.HEAD_DIM_MULTIPLE == 0
            and all(c is not None for c in calls)
        )
        if not usable:
            return None
        return cls(
            input_norm.weight,
            post_norm.weight,
            input_norm.eps,
            tuple(c.tensors for c in calls),
            [c.kind for c in calls],
            [c.group_size for c in calls],
            attn.num_heads,
            attn.num_kv_heads,
            attn.scale,
        )

    def takes(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step is one the C++ layer runs (see decode_only), in its dtype."""
        return x.dtype == self.input_norm.dtype and decode_only(x.shape[0], meta)

    def __call__(self, x, residual, rotary, kv_cache, meta: AttentionMetadata):
        """(this layer's output, the new residual), as DecoderLayer.forward returns them."""
        cos, sin = rotary
        return torch.ops.llmkit_cpu.decode_layer.default(
            x,
            residual,
            self.input_norm,
            self.post_norm,
            self.eps,
            *self.linears,
            self.kinds,
            self.group_sizes,
            cos,
            sin,
            kv_cache[0],
            kv_cache[1],
            meta.slot_mapping,
            meta.decode_blocks,
            meta.decode_lens,
            self.num_heads,
            self.num_kv_heads,
            self.scale,
        )


def decode_only(tokens: int, meta: AttentionMetadata) -> bool:
    """Whether a step of `tokens` tokens is one the C++ layers run: decodes only, few."""
    return not meta.prefills and meta.num_decodes == tokens and tokens <= KERNEL_MAX_ROWS


def _kernel_call(module: nn.Module):
    call = getattr(module, "kernel_call", None)
    return None if call is None else call()


@dataclass(frozen=True, slots=True)
class DecodeHead:
    """What turns token ids into the first layer's input and the last layer's output into
    logits (LlamaModel's embedding, rotary tables, final norm and lm_head), as
    DecodeStack.set_head takes them."""

    embed: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    norm: torch.Tensor
    eps: float
    lm_head: KernelCall
    vocab: int

    @classmethod
    def build(cls, embed, rotary, norm: RMSNorm, lm_head) -> DecodeHead | None:
        """None unless the vocabulary is whole here (one rank), the lm_head runs through
        llmkit's CPU kernels and the embedding has the norm's dtype."""
        if embed.group.size != 1 or lm_head.group.size != 1:
            return None
        call = _kernel_call(lm_head.proj)
        if call is None or embed.weight.dtype != norm.weight.dtype:
            return None
        args = (embed.weight, rotary.cos, rotary.sin, norm.weight, norm.eps)
        return cls(*args, call, lm_head.vocab_size)

    def arguments(self) -> tuple:
        """DecodeStack.set_head's arguments."""
        call = self.lm_head
        tables = (self.embed, self.cos, self.sin, self.norm, self.eps)
        return (*tables, call.kind, call.tensors, call.group_size, self.vocab)


class DecodeStack:
    """Every decoder layer of a model as one C++ call per decode step
    (torch.classes.llmkit_cpu.DecodeStack): each layer's DecodeLayer arguments and KV cache
    handed over once, so a step passes only its hidden states, rotary tables and metadata.
    With a DecodeHead, a step passes its token ids and gets its logits."""

    def __init__(self, layers: list[DecodeLayer], kv_caches: list[torch.Tensor]):
        first = layers[0]
        tensors, counts, kinds, group_sizes = [], [], [], []
        for layer, cache in zip(layers, kv_caches, strict=True):
            tensors += [layer.input_norm, layer.post_norm, cache[0], cache[1]]
            for linear in layer.linears:
                tensors += linear
                counts.append(len(linear))
            kinds += layer.kinds
            group_sizes += layer.group_sizes
        self.first = first
        self.has_head = False  # whether logits() runs the whole step
        self.stack = torch.classes.llmkit_cpu.DecodeStack(
            tensors,
            counts,
            kinds,
            group_sizes,
            first.eps,
            first.num_heads,
            first.num_kv_heads,
            first.scale,
        )

    @classmethod
    def build(
        cls, layers: list[DecodeLayer | None], kv_caches, head: DecodeHead | None = None
    ) -> DecodeStack | None:
        """None unless every layer is a DecodeLayer, all with the same norm epsilon, heads
        and attention scale. The head is taken when it has the layers' dtype."""
        if not layers or any(layer is None for layer in layers):
            return None
        shared = [(x.eps, x.num_heads, x.num_kv_heads, x.scale) for x in layers]
        if any(s != shared[0] for s in shared):
            return None
        stack = cls(layers, kv_caches)
        if head is not None and head.embed.dtype == layers[0].input_norm.dtype:
            stack.stack.set_head(*head.arguments())
            stack.has_head = True
        return stack

    def takes(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return self.first.takes(x, meta)

    def logits(self, ids, positions, meta: AttentionMetadata, rows: torch.Tensor):
        """The step's float32 logits [len(rows), vocab], as LlamaModel.forward gives them."""
        tables = (meta.slot_mapping, meta.decode_blocks, meta.decode_lens)
        return self.stack.logits(ids, positions, *tables, rows)

    def greedy_steps(self, ids, positions, slots, meta: AttentionMetadata, steps: int):
        """int64 [sequences, steps]: `steps` greedy decode steps in one call, each step's
        tokens the argmax of the last one's logits; slots [steps, sequences], and meta's
        block tables covering every step (its lengths are the first step's)."""
        tables = (meta.decode_blocks, meta.decode_lens)
        return self.stack.greedy_steps(ids, positions, slots, *tables, steps)

    def __call__(self, x, rotary, meta: AttentionMetadata):
        """(the last layer's output, the residual stream), as the layers in turn return them."""
        cos, sin = rotary
        return self.stack.run(x, cos, sin, meta.slot_mapping, meta.decode_blocks, meta.decode_lens)

"""The llama family (Llama, Mistral, Qwen2, Qwen3) over a flattened batch of tokens.

There is no padding and no batch dim: the tokens of every scheduled sequence are laid end to
end ([tokens, hidden]); attention finds each sequence's context through AttentionMetadata.
Modules arrive already built for one tensor-parallel rank (see runtime/loader.py), so the
sizes here are per rank and nothing below knows about the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmkit.arch.plan import Model, heads_per_rank
from llmkit.errors import LlmkitError
from llmkit.kernels.cuda_int4 import FUSED_ROWS, l2_prefetch_bytes, prefetch_regions
from llmkit.runtime.layers.activation import silu_and_mul
from llmkit.runtime.layers.attention import AttentionMetadata, paged_attention
from llmkit.runtime.layers.decode_layer import (
    DecodeHead,
    DecodeLayer,
    DecodeStack,
    decode_only,
)
from llmkit.runtime.layers.norm import RMSNorm
from llmkit.runtime.layers.rotary import Rotary


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """The numbers of config.json the runtime uses (whole-model sizes). What differs between
    the family's members (q/k/v biases, Qwen3's q/k norms, tied embeddings) is read from
    which tensors the checkpoint holds."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        shape = Model.from_config(config)  # the family and sizes, as the shard rules read them
        if config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
            raise LlmkitError("llmkit runs SiLU-gated MLPs without bias only")
        rope = config.get("rope_parameters") or config.get("rope_scaling")
        return cls(
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            vocab_size=shape.vocab_size,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float((rope or {}).get("rope_theta") or config.get("rope_theta", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        )

    def heads_per_rank(self, tp: int) -> tuple[int, int]:
        """(query heads, kv heads) one of `tp` ranks holds, by the shard rules table."""
        return heads_per_rank(self.num_heads, self.num_kv_heads, tp)


class Attention(nn.Module):
    def __init__(self, qkv, o_proj, q_norm, k_norm, num_heads: int, num_kv_heads: int, head_dim):
        super().__init__()
        self.qkv, self.o_proj = qkv, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, x, rotary: tuple[torch.Tensor, torch.Tensor], kv_cache, meta):
        return self.o_proj(self.attend(self.qkv(x), rotary, kv_cache, meta))

    def attend(self, qkv: torch.Tensor, rotary, kv_cache, meta) -> torch.Tensor:
        """The attention of the products q, k, v side by side [tokens, (heads + 2 kv_heads)
        * head_dim] -> o_proj's input [tokens, heads * head_dim]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)  # [tokens, heads, head_dim]
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, rotary)
        return o.reshape(-1, q_size)


class MLP(nn.Module):
    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        # silu(gate) * up in the gate/up product's own launch where it offers one (a 4-bit
        # weight on CUDA, for a decode step's few rows: Int4Linear.silu_mul)
        self.silu_mul = getattr(gate_up, "silu_mul", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None if self.silu_mul is None else self.silu_mul(x)
        return self.down(silu_and_mul(self.gate_up(x)) if h is None else h)

    def add_normed(self, residual: torch.Tensor, norm: RMSNorm) -> None:
        """residual += this MLP of norm(residual), the norm and the add inside the products
        (Int4Linear.normed, add_to: see DecoderLayer.fuses)."""
        h = self.gate_up.normed(residual, norm)
        self.down.add_to(h if self.gate_up.gated else silu_and_mul(h), residual)


def _adapted(loras) -> bool:
    """Whether LoRA adapters run in this step (the C++ decode layers have none)."""
    return loras is not None and bool(loras.segments)


class DecoderLayer(nn.Module):
    def __init__(
        self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm, loras=None
    ):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_norm = input_norm, post_norm
        self.fused = DecodeLayer.build(attn, mlp, input_norm, post_norm)  # None: not on CPU
        self.loras = loras  # runtime/lora.py LoraContext when adapters are served
        # CUDA, every product 4-bit and taking a norm or an add (Int4Linear.fuses, where
        # LLMKIT_FUSED_NORMS=1): for up to FUSED_ROWS rows, the norms and residual adds run
        # inside the products
        parts = (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)
        self.fuses = loras is None and all(getattr(m, "fuses", False) for m in parts)
        # there, what the q/k/v product prefetches into the L2 for the products after the
        # attention (cuda_int4.l2_prefetch_bytes; None: nothing)
        self.prefetch = None
        if self.fuses:
            self.prefetch = after_attention(attn.o_proj, mlp.gate_up, l2_prefetch_bytes())

    def forward(self, x, residual, rotary, kv_cache, meta):
        """x: the previous layer's output, not yet added to `residual` (the sum of all
        before it; None at the first layer), or None where that layer added it -> (this
        layer's output or None, the new residual)."""
        if self.fused is not None and not _adapted(self.loras) and self.fused.takes(x, meta):
            return self.fused(x, residual, rotary, kv_cache, meta)
        if self.fuses and (residual if x is None else x).shape[0] <= FUSED_ROWS:
            return None, self._add_fused(x, residual, rotary, kv_cache, meta)
        if residual is None:
            residual, h = x, self.input_norm(x)
        elif x is None:
            h = self.input_norm(residual)
        else:
            h, residual = self.input_norm.add_and_norm(residual, x)
        h, residual = self.post_norm.add_and_norm(residual, self.attn(h, rotary, kv_cache, meta))
        return self.mlp(h), residual

    def _add_fused(self, x, residual, rotary, kv_cache, meta) -> torch.Tensor:
        """The residual with x and this layer's output added, in place, each norm inside
        the product after it and each add inside the product before it."""
        if residual is None:
            residual = x
        elif x is not None:
            residual.add_(x)
        qkv = self.attn.qkv.normed(residual, self.input_norm, self.prefetch)
        self.attn.o_proj.add_to(self.attn.attend(qkv, rotary, kv_cache, meta), residual)
        self.mlp.add_normed(residual, self.post_norm)
        return residual


def after_attention(o_proj, gate_up, budget: int) -> torch.Tensor | None:
    """The prefetch regions (cuda_int4.prefetch_regions) of the first `budget` bytes of the
    4-bit weights a layer reads after its attention: o_proj's, then gate_up's."""
    weights = [o_proj.decode_tiles, o_proj.decode_scales, gate_up.decode_tiles]
    return prefetch_regions(weights, budget)


class LlamaModel(nn.Module):
    def __init__(self, embed, layers: list[DecoderLayer], norm, lm_head, rotary: Rotary):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = rotary
        self._stack: DecodeStack | None = None
        self._stack_caches: list[torch.Tensor] | None = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]
        positions: torch.Tensor,  # [tokens]
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],  # per layer [2, slots, kv_heads, head_dim]
        logits_indices: torch.Tensor,  # [sequences needing a next token]
    ) -> torch.Tensor | None:
        """-> logits [len(logits_indices), vocab] in float32 (None on ranks other than 0)."""
        stack = self._decode_stack(kv_caches)
        usable = stack is not None and not _adapted(self.layers[0].loras)
        if usable and stack.has_head and decode_only(len(input_ids), meta):
            return stack.logits(input_ids, positions, meta, logits_indices)
        h, residual = self.embed(input_ids), None
        rotary = self.rotary(positions, h.dtype)
        if usable and stack.takes(h, meta):
            h, residual = stack(h, rotary, meta)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                h, residual = layer(h, residual, rotary, kv_cache, meta)
        # the rows sampled, added and normed (in place on the copies indexing makes)
        if h is None:  # the last layer added its output
            h = self.norm(residual[logits_indices])
        else:
            h = self.norm.add_and_norm(residual[logits_indices], h[logits_indices])[0]
        logits = self.lm_head(h)
        return None if logits is None else logits.float()

    def runs_steps(self, kv_caches: list[torch.Tensor]) -> bool:
        """Whether `greedy_steps` runs: the whole decode step of the base model (no LoRA
        adapter) is one C++ call."""
        stack = self._decode_stack(kv_caches)
        return stack is not None and stack.has_head

    @torch.inference_mode()
    def greedy_steps(self, ids, positions, slots, meta, kv_caches, steps: int) -> torch.Tensor:
        """int64 [sequences, steps]: the tokens of `steps` greedy decode steps, each the
        argmax of the logits `forward` gives for the one before (see DecodeStack)."""
        return self._decode_stack(kv_caches).greedy_steps(ids, positions, slots, meta, steps)

    def _decode_stack(self, kv_caches: list[torch.Tensor]) -> DecodeStack | None:
        """Every layer's C++ decode layer as one call, built for these KV caches on first
        use (None when some layer has none)."""
        if self._stack_caches is not kv_caches:
            fused = [layer.fused for layer in self.layers]
            head = DecodeHead.build(self.embed, self.rotary, self.norm, self.lm_head)
            self._stack = DecodeStack.build(fused, kv_caches, head)
            self._stack_caches = kv_caches
        return self._stack

"""Attention over the paged KV cache (torch path; CUDA kernels live in kernels/).

The cache of one layer is a pair of tensors [num_slots, kv_heads, head_dim], slot =
block_id * block_size + offset. New tokens' K/V are written to their slots first; each
sequence then attends over the slots of its whole context, gathered in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class Prefill:
    """A sequence computing more than one token this step."""

    start: int  # first of its tokens in the flattened batch
    length: int
    context_slots: torch.Tensor | None  # [context] slots, None when nothing was cached before
    mask: torch.Tensor | None  # [length, context] bool, True where a query may attend


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and what each sequence attends to. The first
    `num_decodes` tokens are single-token steps of as many sequences."""

    slot_mapping: torch.Tensor  # [tokens]
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [decodes, max_context], padded with slot 0
    decode_mask: torch.Tensor | None = None  # [decodes, 1, 1, max_context] bool
    prefills: list[Prefill] = field(default_factory=list)

    def to(self, device: torch.device) -> AttentionMetadata:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        prefills = [
            Prefill(p.start, p.length, move(p.context_slots), move(p.mask)) for p in self.prefills
        ]
        return AttentionMetadata(
            move(self.slot_mapping),
            self.num_decodes,
            move(self.decode_slots),
            move(self.decode_mask),
            prefills,
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim] -> like q."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    b = meta.num_decodes
    if b:
        # [decodes, kv_heads, max_context, head_dim]; padding slots are masked out
        keys = k_cache[meta.decode_slots].transpose(1, 2)
        values = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:b].unsqueeze(2), keys, values, meta.decode_mask, scale=scale, enable_gqa=True
        )
        out[:b] = o.squeeze(2)
    for p in meta.prefills:
        end = p.start + p.length
        query = q[p.start : end].transpose(0, 1).unsqueeze(0)  # [1, heads, length, head_dim]
        if p.context_slots is None:
            keys, values, mask = k[p.start : end], v[p.start : end], None
        else:
            keys, values, mask = k_cache[p.context_slots], v_cache[p.context_slots], p.mask
        o = F.scaled_dot_product_attention(
            query,
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[p.start : end] = o[0].transpose(0, 1)
    return out

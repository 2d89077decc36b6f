"""Attention over the paged KV cache.

The cache of one layer is a pair of tensors [num_blocks, kv_heads, block_size, head_dim];
slot = block_id * block_size + offset. New tokens' K/V are written to their slots first; each
sequence then attends over its whole context. On CUDA, Triton kernels do all three (the
write, which rotates q and k first in the same launch; the decodes; every prefill of the step
in one launch), reading the blocks in place (kernels/triton_attention.py). On the CPU,
single-token (decode) queries go to llmkit's C++ kernel, which reads the blocks in place
(kernels/cpu_ops.cpp; head dims that are multiples of 8); otherwise, and for prefills, the
context is gathered (block, head) by (block, head) from the block table straight into the
[kv_heads, context, head_dim] layout torch's matmuls want.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.kernels import cpu, cuda
from llmkit.runtime.layers.rotary import apply_rotary

DECODE_CHUNK_BYTES = 2 * 2**20  # gathered keys per decode chunk: about what stays cached


# block ids up to which a step's tables go through padded lists: fewer numpy calls, whose
# fixed cost outweighs the flat run's gain below about this (both cold and warm caches)
LIST_TABLES = 4096


def padded_tables(
    tables: list[list[int]], width: int, rows: list[int] | None = None
) -> torch.Tensor:
    """int64 [len(rows), width]: the first `width` blocks of block table tables[r] for each r
    of `rows` (all the tables in order where None), padded with block 0. Past LIST_TABLES
    ids, made from one flat run of each table's (converting a list of lists, or padding each
    one, takes a Python step per block: milliseconds a step for hundreds of long contexts)."""
    picked = range(len(tables)) if rows is None else rows
    if len(picked) * width <= LIST_TABLES:
        padded = [tables[r][:width] + [0] * (width - len(tables[r])) for r in picked]
        return torch.tensor(padded, dtype=torch.long)
    lengths = np.fromiter((min(len(t), width) for t in tables), np.int64, len(tables))
    ids = itertools.chain.from_iterable(itertools.islice(t, width) for t in tables)
    out = np.zeros((len(tables), width), dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = np.fromiter(ids, np.int64, int(lengths.sum()))
    return torch.from_numpy(out if rows is None else out[np.asarray(rows)])


@dataclass(slots=True)
class Prefill:
    """A sequence computing more than one token this step: its tokens at positions
    computed..computed+length-1, each attending to the keys up to its own position."""

    start: int  # first of its tokens in the flattened batch
    length: int
    computed: int  # tokens of the sequence in the cache before this step
    blocks: list[int]  # its block table, exactly as far as it covers computed + length tokens

    _context: tuple[torch.Tensor, torch.Tensor] | None = None

    def context(self, block_size: int, device: torch.device):
        """(blocks [n], mask [length, n * block_size] bool, True where it may attend): what
        the gathering path reads of a prefill over cached tokens; derived once per step."""
        if self._context is None:
            blocks = torch.tensor(self.blocks, dtype=torch.long, device=device)
            keys = torch.arange(len(self.blocks) * block_size, device=device)[None, :]
            end = self.computed + self.length
            seen = keys <= torch.arange(self.computed, end, device=device)[:, None]
            self._context = blocks, seen
        return self._context


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and what each sequence attends to. The first
    `num_decodes` tokens are queries of one position each (a sequence's next token, or one
    of the tokens of its draft), each over its sequence's blocks up to its own position."""

    slot_mapping: torch.Tensor  # [tokens]
    num_decodes: int = 0
    decode_blocks: torch.Tensor | None = None  # [decodes, max blocks], padded with block 0
    decode_lens: torch.Tensor | None = None  # [decodes] int64, context length with the new token
    prefills: list[Prefill] = field(default_factory=list)
    _decode_index: torch.Tensor | None = None  # derived once per step, shared by all layers
    _decode_mask: torch.Tensor | None = None
    _write_rows: torch.Tensor | None = None
    _prefill_args: tuple | None = None

    def write_rows(self, num_kv_heads: int, block_size: int) -> torch.Tensor:
        """[tokens * kv_heads]: the row of the cache viewed as [slots * kv_heads, dim] where
        each new token's K (or V) of each head goes, in k.reshape(-1, dim) order."""
        if self._write_rows is None:
            slots = self.slot_mapping
            heads = torch.arange(num_kv_heads, device=slots.device)
            block, offset = slots // block_size, slots % block_size
            rows = (block[:, None] * num_kv_heads + heads) * block_size + offset[:, None]
            self._write_rows = rows.reshape(-1)
        return self._write_rows

    def decode_index(self, num_kv_heads: int) -> torch.Tensor:
        """[decodes, kv_heads, max blocks]: rows of the cache viewed as
        [blocks * kv_heads, block_size, dim] holding each sequence's context, head-major."""
        if self._decode_index is None:
            self._decode_index = _head_rows(self.decode_blocks, num_kv_heads)
        return self._decode_index

    def decode_mask(self, block_size: int) -> torch.Tensor:
        """[decodes, 1, max blocks * block_size] bool: True where each decode may attend."""
        if self._decode_mask is None:
            positions = torch.arange(
                self.decode_blocks.shape[1] * block_size, device=self.decode_lens.device
            )
            self._decode_mask = (positions < self.decode_lens[:, None])[:, None, :]
        return self._decode_mask

    def prefill_args(self, device: torch.device) -> tuple:
        """The Triton prefill kernel's description of this step's prefills, on `device`:
        (block tables [prefills, width], (tile sequence, tile first row), starts, lengths,
        computed), int32; built once per step."""
        if self._prefill_args is None:
            prefills = self.prefills
            width = max(len(p.blocks) for p in prefills)
            tables = padded_tables([p.blocks for p in prefills], width).to(torch.int32)
            lengths = [p.length for p in prefills]
            tiles = triton_attention().prefill_tiles(lengths)
            fields = (*tiles, [p.start for p in prefills], lengths,
                      [p.computed for p in prefills])  # fmt: skip
            packed = [tables.to(device, non_blocking=True)]
            packed += [torch.tensor(f, dtype=torch.int32).to(device, non_blocking=True)
                       for f in fields]  # fmt: skip
            self._prefill_args = (packed[0], (packed[1], packed[2]), *packed[3:])
        return self._prefill_args

    def to(self, device: torch.device) -> AttentionMetadata:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        prefills = [Prefill(p.start, p.length, p.computed, p.blocks) for p in self.prefills]
        return AttentionMetadata(  # derived values are rebuilt on the device
            move(self.slot_mapping),
            self.num_decodes,
            move(self.decode_blocks),
            move(self.decode_lens),
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
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim] -> like q. `rotary`:
    (cos, sin) [tokens, 1, head_dim] where q and k are still to be rotated by them."""
    if q.is_cuda and triton_attention() is not None:
        return _on_cuda(q, k, v, k_cache, v_cache, meta, scale, rotary)
    if rotary is not None:
        q, k = apply_rotary(q, k, *rotary)
    kernels = _cpu_kernels(q, k_cache)
    if kernels is not None:
        kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    else:
        rows = meta.write_rows(k_cache.shape[1], k_cache.shape[2])
        k_cache.view(-1, k.shape[-1]).index_copy_(0, rows, k.reshape(-1, k.shape[-1]))
        v_cache.view(-1, v.shape[-1]).index_copy_(0, rows, v.reshape(-1, v.shape[-1]))
    out = torch.empty_like(q)
    b = meta.num_decodes
    if b and kernels is not None:
        kernels.paged_decode(
            out[:b],
            q[:b].contiguous(),
            k_cache,
            v_cache,
            meta.decode_blocks,
            meta.decode_lens,
            scale,
        )
    elif b:
        index = meta.decode_index(k_cache.shape[1])
        mask = meta.decode_mask(k_cache.shape[2])
        # A few sequences at a time, so the K/V just gathered are still in the CPU cache
        # when the matmuls read them (all at once, they are read back from memory).
        per_seq = k_cache[0].numel() * index.shape[2] * k_cache.element_size()
        step = max(1, DECODE_CHUNK_BYTES // per_seq)
        for i in range(0, b, step):
            j = min(b, i + step)
            out[i:j] = _decode(q[i:j], k_cache, v_cache, index[i:j], mask[i:j], scale)
    for p in meta.prefills:
        end = p.start + p.length
        query = q[p.start : end].transpose(0, 1).unsqueeze(0)  # [1, heads, length, head_dim]
        mask = None
        if p.computed == 0:  # keys, values: [kv_heads, context, head_dim]
            keys, values = k[p.start : end].transpose(0, 1), v[p.start : end].transpose(0, 1)
        else:
            blocks, mask = p.context(k_cache.shape[2], q.device)
            index = _head_rows(blocks[None, :], k_cache.shape[1])
            keys, values = _gather(k_cache, index)[0], _gather(v_cache, index)[0]
        o = F.scaled_dot_product_attention(
            query,
            keys.unsqueeze(0),
            values.unsqueeze(0),
            mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[p.start : end] = o[0].transpose(0, 1)
    return out


def _on_cuda(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, rotary):
    """The Triton path: one launch for the write (and the rotary embedding of q and k), one
    for the decodes, one for every prefill of the step."""
    kernels = triton_attention()
    if rotary is None:
        kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    else:
        cos, sin = (t.reshape(len(t), -1) for t in rotary)
        q = kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping, q, (cos, sin))
    out = torch.empty_like(q)
    b = meta.num_decodes
    if b:
        kernels.paged_decode(
            out[:b], q[:b], k_cache, v_cache, meta.decode_blocks, meta.decode_lens, scale
        )
    if meta.prefills:
        kernels.paged_prefill(out, q, k_cache, v_cache, *meta.prefill_args(q.device), scale)
    return out


def triton_attention():
    """llmkit.kernels.triton_attention, or None without Triton (the torch paths then)."""
    return cuda.attention_kernels()


def _cpu_kernels(q: torch.Tensor, k_cache: torch.Tensor):
    """torch.ops.llmkit_cpu when its cache kernels take these tensors, else None."""
    return cpu.for_tensors(q, k_cache) if q.shape[-1] % cpu.HEAD_DIM_MULTIPLE == 0 else None


def _head_rows(blocks: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """blocks [seqs, n] -> [seqs, kv_heads, n]: for each head, the rows of the cache viewed
    as [blocks * kv_heads, block_size, dim] holding those blocks."""
    heads = torch.arange(num_kv_heads, device=blocks.device)
    return blocks[:, None, :] * num_kv_heads + heads[:, None]


def _gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, kv_heads, block_size, dim], index [seqs, kv_heads, n] (from
    _head_rows) -> [seqs, kv_heads, n * block_size, dim], one copy."""
    num_blocks, num_kv_heads, block_size, dim = cache.shape
    rows = cache.view(num_blocks * num_kv_heads, block_size * dim)
    gathered = rows.index_select(0, index.flatten())  # whole-row copies: far faster than []
    return gathered.view(index.shape[0], num_kv_heads, -1, dim)


def _decode(q, k_cache, v_cache, index, mask, scale: float) -> torch.Tensor:
    """One query per sequence. Explicit batched matmuls: SDPA's CPU kernels are tuned for
    long queries and are several times slower on a single one."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    keys, values = _gather(k_cache, index), _gather(v_cache, index)  # [b, kv, ctx, dim]
    query = q.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)  # heads sharing a kv
    scores = torch.matmul(query, keys.transpose(-1, -2)).float()  # [b, kv, group, ctx]
    scores.masked_fill_(~mask.unsqueeze(1), -torch.inf)
    probs = (scores * scale).softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, num_heads, head_dim)

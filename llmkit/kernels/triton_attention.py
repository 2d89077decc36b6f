"""Attention over the paged KV cache in Triton: the cache write, decode (split-K) and the
prefills of a step, each one launch, reading K/V in place through block tables.

The cache of one layer is a pair of tensors [num_blocks, kv_heads, block_size, head_dim];
slot = block * block_size + offset. Every kernel finds a key's row by gathering its block id
from the sequence's block table, so no K/V is ever copied out of the cache. Queries of one
KV head's group are computed together (GQA without repeating K/V). Scores and the softmax are
float32; the products take the cache's dtype (float32 ones at full precision, not TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner step (gathered across cache blocks)
PREFILL_BLOCK_M = 64  # query rows per prefill program
SPLIT_TARGET = 256  # programs a decode launch aims for before it splits contexts
MIN_SPLIT_KEYS = BLOCK_N  # no split covers fewer keys than one inner step
LOG2E = 1.4426950408889634


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _write_kv_kernel(k, v, k_cache, v_cache, slots, stride_t, stride_h, stride_vt, stride_vh,
                     cache_b, cache_h, cache_s, block_size, D: tl.constexpr,
                     BLOCK_D: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + t)
    if slot >= 0:  # a negative slot: a padding row of a captured graph, written nowhere
        d = tl.arange(0, BLOCK_D)
        keep = d < D
        row = (slot // block_size) * cache_b + h * cache_h + (slot % block_size) * cache_s
        key = tl.load(k + t * stride_t + h * stride_h + d, mask=keep)
        value = tl.load(v + t * stride_vt + h * stride_vh + d, mask=keep)
        tl.store(k_cache + row + d, key, mask=keep)
        tl.store(v_cache + row + d, value, mask=keep)


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Each token's K and V [tokens, kv_heads, head_dim] into its slot (slots < 0 skipped)."""
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    _write_kv_kernel[(tokens, kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), *_cache_strides(k_cache), k_cache.shape[2], D=dim,
        BLOCK_D=_block_d(dim),
    )  # fmt: skip


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot takes no dimension under 16


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    if not cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous [blocks, kv_heads, block_size, dim]")
    return cache.stride(0), cache.stride(1), cache.stride(2)


@triton.jit
def _key_tile(tables, row0, n, keep, d, D, block_size, cache_b, cache_h, cache_s, kv_head):
    """(offsets [keys, BLOCK_D], mask) of keys `n` (where `keep`) of the sequence whose block
    table starts at `tables + row0`, in a [blocks, kv_heads, block_size, dim] cache."""
    block = tl.load(tables + row0 + n // block_size, mask=keep, other=0)
    rows = block.to(tl.int64) * cache_b + kv_head * cache_h + (n % block_size) * cache_s
    return rows[:, None] + d[None, :], keep[:, None] & (d[None, :] < D)


@triton.jit
def _attend(query, k_cache, v_cache, at, kv_keep, seen, m_i, l_i, acc, scale_log2,
            PREC: tl.constexpr):  # fmt: skip
    """One step of the online softmax: the queries [rows, dim] against the keys and values
    at offsets `at` [keys, dim] of the caches, where `seen` [rows, keys] allows; -> the
    running (max, sum, weighted values)."""
    key = tl.load(k_cache + at, mask=kv_keep, other=0.0)
    s = tl.dot(query, tl.trans(key), input_precision=PREC) * scale_log2
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    value = tl.load(v_cache + at, mask=kv_keep, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision=PREC)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(q, k_cache, v_cache, tables, lens, out, part_m, part_l, part_acc,
                   stride_qt, stride_qh, stride_ot, stride_oh, table_stride, cache_b, cache_h,
                   cache_s, block_size, scale_log2, split_keys, num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
                   SPLIT: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    q_rows = seq * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q_keep = (g[:, None] < GROUP) & (d[None, :] < D)
    query = tl.load(q + q_rows, mask=q_keep, other=0.0)
    length = tl.load(lens + seq)
    start = split * split_keys
    end = tl.minimum(length, start + split_keys)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    row0 = seq.to(tl.int64) * table_stride
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        keep = n < end
        at, kv_keep = _key_tile(tables, row0, n, keep, d, D, block_size, cache_b, cache_h,
                                cache_s, kv_head)  # fmt: skip
        m_i, l_i, acc = _attend(query, k_cache, v_cache, at, kv_keep, keep[None, :], m_i, l_i,
                                acc, scale_log2, PREC)  # fmt: skip
    if SPLIT:
        at = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_m + at, m_i, mask=g < GROUP)
        tl.store(part_l + at, l_i, mask=g < GROUP)
        tl.store(part_acc + at[:, None] * BLOCK_D + d[None, :], acc, mask=q_keep)
    else:
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        o_rows = seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(out + o_rows, o.to(out.dtype.element_ty), mask=q_keep)


@triton.jit
def _combine_kernel(out, part_m, part_l, part_acc, stride_ot, stride_oh, num_splits,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    at = (seq * tl.num_programs(1) + head) * num_splits + s
    keep = s < num_splits
    m = tl.load(part_m + at, mask=keep, other=float("-inf"))
    m_max = tl.max(m, 0)
    w = tl.where(keep, tl.exp2(m - m_max), 0.0)  # empty splits (m = -inf) weigh 0
    l_sum = tl.sum(w * tl.load(part_l + at, mask=keep, other=0.0), 0)
    acc = tl.load(part_acc + at[:, None] * BLOCK_D + d[None, :], mask=keep[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.maximum(l_sum, 1e-30)
    tl.store(out + seq * stride_ot + head * stride_oh + d, o.to(out.dtype.element_ty),
             mask=d < D)  # fmt: skip


def decode_splits(seqs: int, kv_heads: int, max_keys: int) -> int:
    """How many parts each context is split into: enough programs to fill the GPU when few
    sequences decode, none shorter than MIN_SPLIT_KEYS keys. Depends only on shapes, so a
    captured graph's launch stays valid for every step it replays."""
    wanted = -(-SPLIT_TARGET // max(1, seqs * kv_heads))
    return max(1, min(wanted, -(-max_keys // MIN_SPLIT_KEYS)))


def paged_decode(out, q, k_cache, v_cache, block_tables, lens, scale: float) -> None:
    """out, q: [seqs, heads, dim]; block_tables [seqs, width] (int32/int64), lens [seqs]:
    each query attends to keys 0..lens-1 of its sequence (lens >= 1)."""
    seqs, heads, dim = q.shape
    if seqs == 0:
        return
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    block_d = _block_d(dim)
    max_keys = block_tables.shape[1] * block_size
    splits = decode_splits(seqs, kv_heads, max_keys)
    split_keys = -(-max_keys // splits)
    split_keys = -(-split_keys // BLOCK_N) * BLOCK_N
    parts = [q.new_empty(0, dtype=torch.float32)] * 3
    if splits > 1:
        parts = [q.new_empty((seqs, heads, splits), dtype=torch.float32),
                 q.new_empty((seqs, heads, splits), dtype=torch.float32),
                 q.new_empty((seqs, heads, splits, block_d), dtype=torch.float32)]  # fmt: skip
    _decode_kernel[(seqs, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, lens, out, *parts, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), *_cache_strides(k_cache),
        block_size, scale * LOG2E, split_keys, splits, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_D=block_d,
        BLOCK=BLOCK_N, PREC=_precision(q.dtype), SPLIT=splits > 1, num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(seqs, heads)](
            out, *parts, out.stride(0), out.stride(1), splits, D=dim, BLOCK_D=block_d,
            SPLITS_PAD=triton.next_power_of_2(splits),
        )  # fmt: skip


@triton.jit
def _prefill_kernel(q, k_cache, v_cache, tables, out, tile_seq, tile_row, q_start, q_len,
                    computed, stride_qt, stride_qh, stride_ot, stride_oh, table_stride, cache_b,
                    cache_h, cache_s, block_size, scale_log2, GROUP: tl.constexpr,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seq + tile)
    m = tl.load(tile_row + tile) + tl.arange(0, BLOCK_M)
    length = tl.load(q_len + seq)
    before = tl.load(computed + seq)
    first = tl.load(q_start + seq)
    d = tl.arange(0, BLOCK_D)
    rows_keep = m < length
    q_keep = rows_keep[:, None] & (d[None, :] < D)
    q_rows = (first + m)[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :]
    query = tl.load(q + q_rows, mask=q_keep, other=0.0)
    position = before + m  # each query sees the keys up to its own position
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = before + tl.minimum(tl.max(m, 0) + 1, length)
    row0 = seq.to(tl.int64) * table_stride
    for n0 in range(0, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        keep = n < end
        at, kv_keep = _key_tile(tables, row0, n, keep, d, D, block_size, cache_b, cache_h,
                                cache_s, kv_head)  # fmt: skip
        seen = keep[None, :] & (n[None, :] <= position[:, None])
        m_i, l_i, acc = _attend(query, k_cache, v_cache, at, kv_keep, seen, m_i, l_i, acc,
                                scale_log2, PREC)  # fmt: skip
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    o_rows = (first + m)[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :]
    tl.store(out + o_rows, o.to(out.dtype.element_ty), mask=q_keep)


def prefill_tiles(lengths: list[int]) -> tuple[list[int], list[int]]:
    """(sequence, first row) of each PREFILL_BLOCK_M-row tile of queries of the prefills."""
    seqs, rows = [], []
    for i, n in enumerate(lengths):
        for r in range(0, n, PREFILL_BLOCK_M):
            seqs.append(i)
            rows.append(r)
    return seqs, rows


def paged_prefill(out, q, k_cache, v_cache, tables, tiles, starts, lengths, computed,
                  scale: float) -> None:  # fmt: skip
    """Every prefill of a step in one launch. q, out: [tokens, heads, dim] (the step's
    flattened tokens); prefill i's queries are rows starts[i]..+lengths[i], at positions
    computed[i].., each attending to keys 0..its position through tables[i] (its K/V
    already written). tiles: (sequence, first row) tensors from prefill_tiles."""
    tile_seq, tile_row = tiles
    if len(tile_seq) == 0:
        return
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k_cache.shape[1]
    _prefill_kernel[(len(tile_seq), heads)](
        q, k_cache, v_cache, tables, out, tile_seq, tile_row, starts, lengths, computed,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        *_cache_strides(k_cache), k_cache.shape[2], scale * LOG2E, GROUP=group, D=dim,
        BLOCK_D=_block_d(dim), BLOCK_M=PREFILL_BLOCK_M, BLOCK=BLOCK_N,
        PREC=_precision(q.dtype), num_warps=4, num_stages=2,
    )  # fmt: skip

"""Attention over the paged KV cache in Triton: the cache write (which rotates q and k first,
rotate-half, in float32 rounded once), decode (split-K) and the prefills of a step, each one
launch, reading K/V in place through block tables.

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

from llmkit.kernels.triton_launch import (
    FUSED,
    launch_options,
    programmatic_launch,
    programmatic_start,
    programmatic_wait,
)

BLOCK_N = 64  # keys per inner step (gathered across cache blocks)
PREFILL_BLOCK_M = 64  # query rows per prefill program
SPLIT_TARGET = 256  # programs a decode launch aims for before it splits contexts
MIN_SPLIT_KEYS = BLOCK_N  # no split covers fewer keys than one inner step
# warps of a decode or prefill program below head dim 128 and from it: at 128, 4 warps need
# more than 255 registers a thread for their tiles and spill (ptxas for sm_90, with Triton
# 3.6: some 300 bytes a thread in decode, 490 in prefill; none with 8 warps)
WARPS = (4, 8)
COMBINE_TILE = 8192  # float32 values of the parts a decode's last split loads at once
LOG2E = 1.4426950408889634


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _rotate_row(src, dst, cos, sin, t, D: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """dst = the rotate-half rotary embedding of the D values at src, at token t's angles
    (cos, sin: [tokens, D]): in float32, rounded once."""
    d = tl.arange(0, BLOCK_HALF)
    keep = d < D // 2
    x1 = tl.load(src + d, mask=keep, other=0.0).to(tl.float32)
    x2 = tl.load(src + D // 2 + d, mask=keep, other=0.0).to(tl.float32)
    angle = t.to(tl.int64) * D + d
    c1 = tl.load(cos + angle, mask=keep, other=0.0).to(tl.float32)
    c2 = tl.load(cos + angle + D // 2, mask=keep, other=0.0).to(tl.float32)
    s1 = tl.load(sin + angle, mask=keep, other=0.0).to(tl.float32)
    s2 = tl.load(sin + angle + D // 2, mask=keep, other=0.0).to(tl.float32)
    tl.store(dst + d, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=keep)
    tl.store(dst + D // 2 + d, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=keep)


@triton.jit
def _write_kv_kernel(q, q_out, k, v, cos, sin, k_cache, v_cache, slots, stride_qt, stride_qh,
                     stride_t, stride_h, stride_vt, stride_vh, heads, cache_b, cache_h, cache_s,
                     block_size, D: tl.constexpr, BLOCK_D: tl.constexpr, ROTATE: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    programmatic_start(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)  # query heads 0..heads-1 (rotating), then the KV heads
    if h < heads:
        if ROTATE:
            dst = q_out + (t.to(tl.int64) * heads + h) * D
            _rotate_row(q + t * stride_qt + h * stride_qh, dst, cos, sin, t, D, BLOCK_HALF)
    else:
        h -= heads
        slot = tl.load(slots + t)
        if slot >= 0:  # a negative slot: a padding row of a captured graph, written nowhere
            d = tl.arange(0, BLOCK_D)
            keep = d < D
            row = (slot // block_size) * cache_b + h * cache_h + (slot % block_size) * cache_s
            if ROTATE:
                _rotate_row(k + t * stride_t + h * stride_h, k_cache + row, cos, sin, t, D,
                            BLOCK_HALF)  # fmt: skip
            else:
                key = tl.load(k + t * stride_t + h * stride_h + d, mask=keep)
                tl.store(k_cache + row + d, key, mask=keep)
            value = tl.load(v + t * stride_vt + h * stride_vh + d, mask=keep)
            tl.store(v_cache + row + d, value, mask=keep)


def write_kv(k_cache, v_cache, k, v, slot_mapping, q=None, rotary=None):
    """Each token's K and V [tokens, kv_heads, head_dim] into its slot (slots < 0 skipped).
    With `rotary` (cos, sin: [tokens, head_dim] each, contiguous), K and the queries `q`
    [tokens, heads, head_dim] are rotated first (rotate-half), in the same launch: -> the
    rotated queries (contiguous), else None. Last dims contiguous."""
    tokens, kv_heads, dim = k.shape
    heads = 0 if rotary is None else q.shape[1]
    q_out = None if rotary is None else q.new_empty((tokens, heads, dim))
    if tokens == 0:
        return q_out
    cos, sin = (k, k) if rotary is None else rotary
    q = k if q is None else q
    _write_kv_kernel[(tokens, heads + kv_heads)](
        q, k if q_out is None else q_out, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), heads,
        *_cache_strides(k_cache), k_cache.shape[2], D=dim, BLOCK_D=_block_d(dim),
        ROTATE=rotary is not None, BLOCK_HALF=triton.next_power_of_2(max(1, dim // 2)),
        **launch_options(k),
    )  # fmt: skip
    return q_out


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
    value = tl.load(v_cache + at, mask=kv_keep, other=0.0)  # in flight with the keys
    s = tl.dot(query, tl.trans(key), input_precision=PREC) * scale_log2
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision=PREC)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(q, k_cache, v_cache, tables, lens, out, part_m, part_l, part_acc, counters,
                   stride_qt, stride_qh, stride_ot, stride_oh, table_stride, cache_b, cache_h,
                   cache_s, block_size, scale_log2, num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
                   SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   COMBINE_HEADS: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    programmatic_launch(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    # the lengths come from the host before the step's first kernel, so they are read
    # before the wait; the queries and the cache (this step's keys among them) after it
    length = tl.load(lens + seq)
    # the context's own keys in num_splits parts of whole inner steps (the last parts empty
    # where it is short): however wide the padded table, every part is as short as it can be
    split_keys = tl.cdiv(tl.cdiv(length, num_splits), BLOCK) * BLOCK
    start = split * split_keys
    end = tl.minimum(length, start + split_keys)
    row0 = seq.to(tl.int64) * table_stride
    programmatic_wait(PDL)
    q_rows = seq * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q_keep = (g[:, None] < GROUP) & (d[None, :] < D)
    query = tl.load(q + q_rows, mask=q_keep, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        keep = n < end
        at, kv_keep = _key_tile(tables, row0, n, keep, d, D, block_size, cache_b, cache_h,
                                cache_s, kv_head)  # fmt: skip
        m_i, l_i, acc = _attend(query, k_cache, v_cache, at, kv_keep, keep[None, :], m_i, l_i,
                                acc, scale_log2, PREC)  # fmt: skip
    o_rows = seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
    if SPLIT:
        used = tl.cdiv(length, split_keys)  # the splits that hold keys: the rest store none
        if used > 1:  # the split that finishes its group last combines all of them
            at = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
            if split < used:
                tl.store(part_m + at, m_i, mask=g < GROUP)
                tl.store(part_l + at, l_i, mask=g < GROUP)
                tl.store(part_acc + at[:, None] * BLOCK_D + d[None, :], acc, mask=q_keep)
            counter = counters + seq * tl.num_programs(1) + kv_head
            tl.debug_barrier()  # every thread's parts stored before the counter says so
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
                for i in tl.static_range(0, GROUP, COMBINE_HEADS):
                    head = kv_head * GROUP + i
                    _combine(out + seq * stride_ot + head * stride_oh, stride_oh, part_m,
                             part_l, part_acc,
                             (seq * tl.num_programs(1) * GROUP + head) * num_splits, GROUP - i,
                             num_splits, used, D, BLOCK_D, COMBINE_HEADS,
                             SPLITS_PAD)  # fmt: skip
                tl.atomic_xchg(counter, 0)  # zero again for the next launch
        elif split == 0:  # a context too short to split: its first part is all of it
            _finish(out + o_rows, acc, l_i, q_keep)
    else:
        _finish(out + o_rows, acc, l_i, q_keep)


@triton.jit
def _finish(out, acc, l_i, keep):
    """The output rows at `out` ([rows, dim] offsets) of one part that holds all the keys."""
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out, o.to(out.dtype.element_ty), mask=keep)


@triton.jit
def _combine(out, stride_oh, part_m, part_l, part_acc, first, heads, num_splits, used,
             D: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
             SPLITS_PAD: tl.constexpr):  # fmt: skip
    """The output rows of up to HEADS consecutive heads (the first's row at `out`; `heads`
    of them real) from the parts of their first `used` of num_splits splits, which start at
    `first`, in split order. Every part is loaded before any arithmetic, past the L1, which
    other programs' stores did not go through."""
    h = tl.arange(0, HEADS)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    keep = (h[:, None] < heads) & (s[None, :] < used)
    at = first + h[:, None] * num_splits + s[None, :]
    m = tl.load(part_m + at, mask=keep, other=float("-inf"), cache_modifier=".cg")
    parts_l = tl.load(part_l + at, mask=keep, other=0.0, cache_modifier=".cg")
    acc = tl.load(part_acc + at[:, :, None] * BLOCK_D + d[None, None, :], mask=keep[:, :, None],
                  other=0.0, cache_modifier=".cg")  # fmt: skip
    m_max = tl.max(m, 1)
    w = tl.where(keep, tl.exp2(m - m_max[:, None]), 0.0)
    l_sum = tl.sum(w * parts_l, 1)
    o = tl.sum(acc * w[:, :, None], 1) / tl.maximum(l_sum, 1e-30)[:, None]
    rows = h[:, None] * stride_oh + d[None, :]
    tl.store(out + rows, o.to(out.dtype.element_ty), mask=(h[:, None] < heads) & (d[None, :] < D))


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
    parts = [q.new_empty(0, dtype=torch.float32)] * 3
    if splits > 1:
        parts = [q.new_empty((seqs, heads, splits), dtype=torch.float32),
                 q.new_empty((seqs, heads, splits), dtype=torch.float32),
                 q.new_empty((seqs, heads, splits, block_d), dtype=torch.float32)]  # fmt: skip
    counters = _counters(q.device, seqs * kv_heads) if splits > 1 else lens
    _decode_kernel[(seqs, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, lens, out, *parts, counters, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(k_cache), block_size, scale * LOG2E, splits, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_D=block_d,
        BLOCK=BLOCK_N, PREC=_precision(q.dtype), SPLIT=splits > 1,
        SPLITS_PAD=triton.next_power_of_2(splits),
        COMBINE_HEADS=_combine_heads(group, triton.next_power_of_2(splits), block_d),
        num_warps=WARPS[block_d >= 128], **launch_options(q),
    )  # fmt: skip


def _combine_heads(group: int, splits_pad: int, block_d: int) -> int:
    """Heads the last split combines at once: the whole group where its parts' tile holds
    at most COMBINE_TILE values, else the largest power of two of heads that fits."""
    fits = max(1, COMBINE_TILE // (splits_pad * block_d))
    return min(triton.next_power_of_2(group), 1 << (fits.bit_length() - 1))


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, at least n, that every split decode on `device` shares (launches run in
    stream order, each leaving them zero). Made by the eager step before a graph captures
    (never during it); a larger set is made beside the old ones, which graphs may hold."""
    made = _COUNTERS.setdefault(device, [])
    if not made or made[-1].numel() < n:
        made.append(torch.zeros(max(n, SPLIT_TARGET), dtype=torch.int32, device=device))
    return made[-1]


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
        PREC=_precision(q.dtype), num_warps=WARPS[_block_d(dim) >= 128], num_stages=2,
        **FUSED,
    )  # fmt: skip

"""The Triton attention kernels (llmkit/kernels/triton_attention.py) against a float32
computation over the same paged cache, on random block tables and lengths: natively on CUDA
where there is a GPU, and on the CPU through Triton's interpreter in a child process."""

from __future__ import annotations

import pytest
import torch

from tests.runtime_helpers import NEEDS_CUDA, interpreted_split

# (heads, kv_heads, head_dim, block_size, dtype name)
CASES = [
    (4, 4, 64, 16, "float32"),
    (8, 2, 64, 16, "float16"),
    (6, 2, 128, 8, "float16"),
    (8, 4, 8, 16, "float32"),  # stories260K's heads: head_dim under tl.dot's 16
]
CUDA_CASES = [*CASES, (32, 8, 128, 16, "bfloat16"), (12, 4, 64, 32, "bfloat16")]


def _paged(contexts: list[int], kv_heads, dim, block_size, dtype, device, g):
    """A cache holding random K/V for sequences of the given context lengths, each in
    random (shuffled) blocks; -> (k_cache, v_cache, padded block tables, tables)."""
    need = [-(-n // block_size) for n in contexts]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at : at + n])
        at += n
    shape = (num_blocks, kv_heads, block_size, dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    width = max(need) + 2  # wider than any: padding columns are never read
    padded = torch.tensor([t + [num_blocks - 1] * (width - len(t)) for t in tables])
    return k_cache, v_cache, padded.to(device), tables


def _context(cache, table, n, block_size):
    """[n, kv_heads, dim] float32: the first n positions of a sequence, in order."""
    rows = [cache[table[p // block_size], :, p % block_size] for p in range(n)]
    return torch.stack(rows).float()


def _reference(q, keys, values, positions, scale):
    """q [rows, heads, dim]; keys/values [ctx, kv_heads, dim]; row r sees keys 0..positions[r]."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).double()
    v = values.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("rhd,chd->hrc", q.double(), k) * scale
    seen = torch.arange(len(keys))[None, :] <= torch.tensor(positions)[:, None]
    probs = scores.masked_fill(~seen[None], -torch.inf).softmax(-1)
    return torch.einsum("hrc,chd->rhd", probs, v).float()


def decode_error(case, device: str, split: bool, seed: int = 0, combine_tile=None) -> float:
    """Largest |kernel - float64 reference| of a decode step over random contexts (short
    ones, one of exactly a block, a long one), with the contexts split (flash-decoding) or
    each in one program (`combine_tile`: the split's combine loads at most that many parts'
    values at once, so a group's heads are combined a few at a time); a second launch must
    give the same."""
    from llmkit.kernels import triton_attention as ta

    heads, kv_heads, dim, block_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    contexts = [1, block_size, 3 * block_size + 5, 700, 37]
    k_cache, v_cache, tables, raw = _paged(contexts, kv_heads, dim, block_size, dtype, device, g)
    q = torch.randn(len(contexts), heads, dim, generator=g).to(dtype)
    out = torch.empty_like(q).to(device)
    lens = torch.tensor(contexts).to(device)
    scale = dim**-0.5
    target, tile = ta.SPLIT_TARGET, ta.COMBINE_TILE
    ta.SPLIT_TARGET = 256 if split else 1
    ta.COMBINE_TILE = combine_tile or tile
    try:
        splits = ta.decode_splits(len(contexts), kv_heads, tables.shape[1] * block_size)
        assert (splits > 1) == split
        ta.paged_decode(out, q.to(device), k_cache, v_cache, tables, lens, scale)
        again = torch.empty_like(out)  # a split launch leaves its counters as it found them
        ta.paged_decode(again, q.to(device), k_cache, v_cache, tables, lens, scale)
        assert torch.equal(again, out)
    finally:
        ta.SPLIT_TARGET, ta.COMBINE_TILE = target, tile
    worst = 0.0
    for i, n in enumerate(contexts):
        keys = _context(k_cache.cpu(), raw[i], n, block_size)
        values = _context(v_cache.cpu(), raw[i], n, block_size)
        want = _reference(q[i : i + 1].float(), keys, values, [n - 1], scale)
        worst = max(worst, (out[i : i + 1].cpu().float() - want).abs().max().item())
    return worst


def prefill_error(case, device: str, seed: int = 0) -> tuple[float, float]:
    """(largest |kernel - reference| of the prefill rows, of rows that are not prefills):
    a step of a fresh prompt, prompts over cached prefixes (one not block-aligned), and one
    longer than a tile, their K/V first written to their slots with write_kv; rows of the
    batch outside every prefill must keep what the output held."""
    from llmkit.kernels import triton_attention as ta

    heads, kv_heads, dim, block_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    computed = [0, 2 * block_size, block_size + 3, 0]
    lengths = [5, 9, 70, 130]
    contexts = [c + n for c, n in zip(computed, lengths, strict=True)]
    k_cache, v_cache, tables, raw = _paged(contexts, kv_heads, dim, block_size, dtype, device, g)
    decodes = 2  # rows before the prefills, which the kernel must leave alone
    total = decodes + sum(lengths)
    q = torch.randn(total, heads, dim, generator=g).to(dtype).to(device)
    k = torch.randn(total, kv_heads, dim, generator=g).to(dtype).to(device)
    v = torch.randn(total, kv_heads, dim, generator=g).to(dtype).to(device)
    slots = [-1] * decodes  # skipped by write_kv
    starts, at = [], decodes
    for table, c, n in zip(raw, computed, lengths, strict=True):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        starts.append(at)
        at += n
    ta.write_kv(k_cache, v_cache, k, v, torch.tensor(slots).to(device))
    out = torch.full_like(q, 7.0)
    tile_seq, tile_row = ta.prefill_tiles(lengths)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int32).to(device)  # noqa: E731
    ta.paged_prefill(out, q, k_cache, v_cache, tables, (as_dev(tile_seq), as_dev(tile_row)),
                     as_dev(starts), as_dev(lengths), as_dev(computed), dim**-0.5)  # fmt: skip
    worst = 0.0
    for i, (c, n) in enumerate(zip(computed, lengths, strict=True)):
        keys = _context(k_cache.cpu(), raw[i], c + n, block_size)
        values = _context(v_cache.cpu(), raw[i], c + n, block_size)
        new = slice(starts[i], starts[i] + n)
        # the new tokens' K/V must be where write_kv put them
        assert torch.equal(keys[c:], k[new].cpu().float())
        want = _reference(q[new].cpu().float(), keys, values, list(range(c, c + n)), dim**-0.5)
        worst = max(worst, (out[new].cpu().float() - want).abs().max().item())
    untouched = (out[:decodes].cpu() - 7.0).abs().max().item()
    return worst, untouched


def rotary_write_error(case, device: str, seed: int = 0) -> tuple[float, bool]:
    """(largest |kernel - float64 reference| of the rotated queries and cached keys, relative
    to the reference's largest |value|; whether everything else is exact): the K/V write
    that rotates q and k first, q and k views of a wider row as the model's qkv output, one
    padding row (slot -1) that writes nothing."""
    from llmkit.kernels import triton_attention as ta
    from llmkit.runtime.layers.rotary import _rotate_half

    heads, kv_heads, dim, block_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    tokens, num_blocks = 5, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype).to(device)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = (t.reshape(tokens, -1, dim) for t in (q, k, v))
    angles = torch.rand(tokens, dim // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    shape = (num_blocks, kv_heads, block_size, dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[2] = -1
    got = ta.write_kv(k_cache, v_cache, k, v, slots.to(device), q, (cos.to(device), sin.to(device)))
    c, s = cos.double()[:, None], sin.double()[:, None]
    rotate = lambda t: t.double().cpu() * c + _rotate_half(t.double().cpu()) * s  # noqa: E731
    want_q, want_k = rotate(q), rotate(k)
    rows = [(i, int(slot)) for i, slot in enumerate(slots) if slot >= 0]
    cached = lambda cache, slot: cache.cpu()[slot // block_size, :, slot % block_size]  # noqa: E731
    got_k = torch.stack([cached(k_cache, slot) for _, slot in rows]).double()
    error = max(
        ((got.cpu().double() - want_q).abs().max() / want_q.abs().max()).item(),
        ((got_k - want_k[[i for i, _ in rows]]).abs().max() / want_k.abs().max()).item(),
    )
    exact = all(torch.equal(cached(v_cache, slot), v[i].cpu()) for i, slot in rows)
    for cache, old in zip((k_cache, v_cache), before, strict=True):
        for slot in range(num_blocks * block_size):
            if slot not in slots.tolist():
                exact &= torch.equal(cached(cache, slot), cached(old, slot))
    return error, exact


TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
ROUNDED_ONCE = {"float32": 2e-6, "float16": 1e-3, "bfloat16": 8e-3}  # relative


def test_attention_kernels_interpreted_match_float64():
    errors = interpreted_split(
        "import json\n"
        "from tests.test_triton_attention import CASES, decode_error, prefill_error\n"
        "from tests.test_triton_attention import rotary_write_error\n"
        "print(json.dumps([[decode_error(c, 'cpu', True), decode_error(c, 'cpu', False),\n"
        "                   decode_error(c, 'cpu', True, combine_tile=2048),\n"
        "                   *prefill_error(c, 'cpu'), *rotary_write_error(c, 'cpu')]\n"
        "                  for c in CASES{part}]))\n"
    )
    for case, found in zip(CASES, errors, strict=True):
        split, whole, chunked, prefill, untouched, rotary, exact = found
        assert max(split, whole, chunked) < TOLERANCE[case[-1]], (case, split, whole, chunked)
        assert prefill < TOLERANCE[case[-1]], (case, prefill)
        assert untouched == 0, case
        assert rotary < ROUNDED_ONCE[case[-1]] and exact, (case, rotary)


@NEEDS_CUDA
@pytest.mark.parametrize("case", CUDA_CASES)
def test_attention_kernels_on_cuda_match_float64(case):
    pytest.importorskip("triton")
    assert decode_error(case, "cuda", True) < TOLERANCE[case[-1]]
    assert decode_error(case, "cuda", False) < TOLERANCE[case[-1]]
    assert decode_error(case, "cuda", True, combine_tile=2048) < TOLERANCE[case[-1]]
    prefill, untouched = prefill_error(case, "cuda")
    assert prefill < TOLERANCE[case[-1]] and untouched == 0
    rotary, exact = rotary_write_error(case, "cuda")
    assert rotary < ROUNDED_ONCE[case[-1]] and exact

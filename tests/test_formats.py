"""On-disk packings, each checked with an unpacker written independently here."""

from __future__ import annotations

import pytest
import torch

from llmkit.quant import rtn
from llmkit.quant.formats import compressed_tensors as ct
from llmkit.quant.formats import gptq


def bits_of(word: int, start: int, width: int) -> int:
    """The unsigned `width`-bit field at bit `start` of a 32-bit word (two's complement)."""
    return ((word & 0xFFFFFFFF) >> start) & ((1 << width) - 1)


def unpack_gptq_by_loops(qweight, qzeros, bits):
    """Read GPTQ v1 tensors one bit field at a time, straight from the format's definition."""
    per_word = 32 // bits
    rows, out_features = qweight.shape
    q = torch.zeros(out_features, rows * per_word, dtype=torch.int64)
    for r in range(rows):
        for o in range(out_features):
            word = int(qweight[r, o])
            for j in range(per_word):
                q[o, r * per_word + j] = bits_of(word, j * bits, bits)
    groups, words = qzeros.shape
    zeros = torch.zeros(out_features, groups, dtype=torch.int64)
    for gi in range(groups):
        for w in range(words):
            for j in range(per_word):
                zeros[w * per_word + j, gi] = bits_of(int(qzeros[gi, w]), j * bits, bits) + 1
    return q, zeros


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_pack_against_independent_unpacker(bits, sym):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(bits))
    quant = rtn.quantize_groups(w, bits, 8, sym, min_zero=1)
    g_idx = torch.arange(32) // 8
    packed = gptq.pack(quant.q, quant.scales, quant.zeros, bits, g_idx)
    assert packed["qweight"].shape == (32 * bits // 32, 16)
    assert packed["qzeros"].shape == (4, 16 * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    q, zeros = unpack_gptq_by_loops(packed["qweight"], packed["qzeros"], bits)
    assert torch.equal(q, quant.q.long()) and torch.equal(zeros, quant.zeros.long())
    assert torch.equal(gptq.unpack(packed["qweight"], packed["qzeros"], bits)[0], q)
    dequantized = gptq.dequantize(**{k: packed[k] for k in gptq.SUFFIXES}, bits=bits)
    assert torch.allclose(dequantized, quant.dequantize(), atol=1e-6)


def test_gptq_v1_refuses_zero_points_it_cannot_store():
    quant = rtn.quantize_groups(torch.rand(8, 16), 4, 8, sym=False, min_zero=0)
    assert int(quant.zeros.min()) == 0  # all-positive groups: zero point 0
    with pytest.raises(ValueError, match="zero - 1"):
        gptq.pack(quant.q, quant.scales, quant.zeros, 4, torch.arange(16) // 8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compressed_tensors_packing_against_independent_unpacker(bits):
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (5, 37), dtype=torch.int8, generator=torch.Generator())
    packed = ct.pack_int32(q, bits)
    assert packed.shape == (5, -(-37 * bits // 32))
    for row in range(5):
        for i in range(37):
            word = int(packed[row, i * bits // 32])
            assert bits_of(word, (i * bits) % 32, bits) - half == int(q[row, i])
    assert torch.equal(ct.unpack_int32(packed, bits, 37), q)


def test_compressed_tensors_packing_matches_the_reference_package():
    helpers = pytest.importorskip(
        "compressed_tensors.compressors.pack_quantized.helpers",
        reason="compressed-tensors (the test extra) is not installed",
    )
    q = torch.randint(-128, 128, (9, 64), dtype=torch.int8, generator=torch.Generator())
    assert torch.equal(helpers.pack_to_int32(q, 8), ct.pack_int32(q, 8))

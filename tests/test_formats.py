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


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("rows", [32, 64])
def test_gptq_dequantize_into_by_row_blocks_equals_whole_dequantize(bits, rows):
    """Dequantizing 96 outputs `rows` at a time (64: a ragged last block; 3 bits: blocks
    start mid-word in qzeros' packing otherwise) into bf16 equals the whole-tensor
    dequantization, with act-order's g_idx."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(bits))
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1)) // 32
    quant = rtn.quantize_groups(w, bits, 32, False, min_zero=1)
    packed = [gptq.pack(quant.q, quant.scales, quant.zeros, bits, g_idx)[k] for k in gptq.SUFFIXES]
    out = torch.empty(96, 64, dtype=torch.bfloat16)
    gptq.dequantize_into(out, *packed, bits, rows=rows)
    assert torch.equal(out, gptq.dequantize(*packed, bits).to(torch.bfloat16))


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


def unpack_gptq_3bit_by_words(qweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's 3-bit layout, word by word: per 32 inputs, 3 words holding 10 values, one
    value split 2|1 bits across words 0-1, 10 values, one split 1|2 across words 1-2, 10."""
    words, out_features = qweight.shape
    q = torch.zeros(words // 3 * 32, out_features, dtype=torch.int64)
    for block in range(words // 3):
        for o in range(out_features):
            w0, w1, w2 = (int(qweight[3 * block + k, o]) & 0xFFFFFFFF for k in range(3))
            values = [(w0 >> (3 * j)) & 7 for j in range(10)]
            values.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
            values += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
            values.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
            values += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
            q[32 * block : 32 * block + 32, o] = torch.tensor(values)
    return q.t()


def test_gptq_3bit_layout_against_autogptq_word_structure():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    quant = rtn.quantize_groups(w, 3, 32, sym=True, min_zero=1)
    packed = gptq.pack(quant.q, quant.scales, quant.zeros, 3, torch.arange(64) // 32)
    assert packed["qweight"].shape == (6, 32) and packed["qzeros"].shape == (2, 3)
    assert torch.equal(unpack_gptq_3bit_by_words(packed["qweight"]), quant.q.long())
    zeros = unpack_gptq_3bit_by_words(packed["qzeros"].t().contiguous()).t() + 1
    assert torch.equal(zeros, quant.zeros.long())


def test_gptq_3bit_needs_whole_words():
    quant = rtn.quantize_groups(torch.randn(32, 48), 3, 16, sym=True, min_zero=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        gptq.pack(quant.q, quant.scales, quant.zeros, 3, torch.arange(48) // 16)


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_dense_packing_of_odd_widths_matches_the_reference_package(bits):
    helpers = pytest.importorskip(
        "compressed_tensors.compressors.pack_quantized.helpers",
        reason="compressed-tensors (the test extra) is not installed",
    )
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (7, 45), dtype=torch.int8, generator=torch.Generator())
    assert torch.equal(helpers.pack_to_int32(q, bits), ct.pack_int32(q, bits))
    assert torch.equal(ct.unpack_int32(ct.pack_int32(q, bits), bits, 45), q)


@pytest.mark.parametrize(("strategy", "groups", "with_zero"), [
    ("group", 4, False), ("channel", 1, False), ("tensor", 1, False), ("group", 4, True),
])  # fmt: skip
def test_compressed_tensors_pack_quantized_dequantizes_as_its_definition(
    strategy, groups, with_zero
):
    """W4A16 as llm-compressor writes it (int4 packed 8 to an int32 along the inputs, one
    scale per output and group of 16, a zero point only when asymmetric) against
    w = scale * (q - zero) computed here in float64."""
    g = torch.Generator().manual_seed(0)
    out_features, in_features = 8, 64
    q = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8, generator=g)
    rows = 1 if strategy == "tensor" else out_features
    scale = torch.rand(rows, groups, generator=g, dtype=torch.float64) + 0.1
    zero = torch.randint(-3, 4, (rows, groups), generator=g, dtype=torch.int8)
    tensors = {
        "weight_packed": ct.pack_int32(q, 4),
        "weight_shape": torch.tensor([out_features, in_features]),
        "weight_scale": scale.to(torch.bfloat16),
    }
    if with_zero:
        tensors["weight_zero_point"] = zero
    weights = {"num_bits": 4, "type": "int", "symmetric": not with_zero, "strategy": strategy,
               "group_size": in_features // groups if strategy == "group" else None}  # fmt: skip
    got = ct.dequantize_module(tensors, {"weights": weights})
    stored_scale = tensors["weight_scale"].double().expand(out_features, groups)
    offset = zero.double().expand(out_features, groups) if with_zero else 0
    columns = torch.arange(in_features) // (in_features // groups)
    expected = (q.double() - (offset[:, columns] if with_zero else 0)) * stored_scale[:, columns]
    assert got.shape == (out_features, in_features)
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-6)


def ct_fixture(layout: str, bits: int, strategy: str, asym: bool, act_order: bool, seed: int):
    """(stored tensors, scheme, float64 weight) of one compressed-tensors Linear, written
    here from the format's definition: w[o, i] = scale[o, g] * (q[o, i] - zero[o, g])."""
    g = torch.Generator().manual_seed(seed)
    out_features, in_features, group_size = 16, 48, 16
    groups = {"group": in_features // group_size, "channel": 1, "tensor": 1}[strategy]
    rows = 1 if strategy == "tensor" else out_features
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (out_features, in_features), dtype=torch.int8, generator=g)
    scale = torch.rand(rows, groups, generator=g, dtype=torch.float64) + 0.05
    zero = torch.randint(-half // 2, half // 2, (rows, groups), generator=g, dtype=torch.int8)
    group_of = torch.arange(in_features) // group_size if strategy == "group" else None
    if act_order:
        group_of = group_of[torch.randperm(in_features, generator=g)]
    stored = {"weight_scale": scale.to(torch.float16)}
    if layout == "pack-quantized":
        stored["weight_packed"] = ct.pack_int32(q, bits)
        stored["weight_shape"] = torch.tensor([out_features, in_features])
    else:  # int- and naive-quantized keep the values unpacked in int8
        stored["weight"] = q
    if asym:
        packed = layout == "pack-quantized"
        stored["weight_zero_point"] = ct.pack_int32(zero.t(), bits).t() if packed else zero
    if act_order:
        stored["weight_g_idx"] = group_of.to(torch.int32)
    weights = {"num_bits": bits, "type": "int", "symmetric": not asym, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None,
               "actorder": "group" if act_order else None}  # fmt: skip
    expected = torch.empty(out_features, in_features, dtype=torch.float64)
    s = stored["weight_scale"].double()
    for o in range(out_features):
        for i in range(in_features):
            r, c = (0 if rows == 1 else o), (0 if group_of is None else int(group_of[i]))
            z = float(zero[r, c]) if asym else 0.0
            expected[o, i] = float(s[r, c]) * (int(q[o, i]) - z)
    return stored, {"weights": weights, "format": layout}, expected


@pytest.mark.parametrize(("layout", "bits", "strategy", "asym", "act_order"), [
    ("pack-quantized", 4, "group", False, True),
    ("pack-quantized", 4, "group", True, False),
    ("pack-quantized", 4, "group", True, True),
    ("pack-quantized", 4, "channel", True, False),
    ("pack-quantized", 8, "channel", False, False),
    ("int-quantized", 8, "channel", False, False),
    ("int-quantized", 8, "tensor", True, False),
    ("naive-quantized", 4, "group", True, True),
    ("naive-quantized", 8, "group", False, False),
])  # fmt: skip
def test_every_compressed_tensors_layout_reads_as_its_float_reference(
    layout, bits, strategy, asym, act_order
):
    """pack-, int- and naive-quantized; symmetric and asymmetric (zero points packed along
    the outputs in pack-quantized); per group, channel and tensor; act-order's g_idx."""
    from llmkit.quant.formats.readers import LinearReader

    stored, scheme, expected = ct_fixture(layout, bits, strategy, asym, act_order, seed=3)
    assert torch.allclose(ct.dequantize_module(stored, scheme).double(), expected, atol=1e-6)
    config = {"quant_method": "compressed-tensors", "format": layout,
              "config_groups": {"g": {**scheme, "targets": ["Linear"]}}}  # fmt: skip
    source = WholeTensors({f"layer.{name}": t for name, t in stored.items()})
    read = LinearReader(source, config).read("layer")  # what the runtime loads
    assert torch.allclose(read.dequantize().double(), expected, atol=1e-6)


class WholeTensors(dict):
    """A reader's tensor source over whole tensors (no tensor-parallel slice)."""

    def get(self, name: str) -> torch.Tensor:
        return self[name]

    def offset(self, name: str, dim: int = 0) -> int:
        return 0


def awq_gemv_fixture(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    """AutoAWQ GEMV tensors of q [out, in], scales and zeros [out, groups], written word by
    word from the layout's definition: nibble j of word c of row o is input (or group)
    8c + j; zeros and scales padded to the width its kernels read."""
    out_features, in_features = q.shape
    groups = in_features // group
    words = -(-groups // 8)
    width = -(-words // {32: 4, 64: 2}.get(group, 1)) * {32: 4, 64: 2}.get(group, 1)
    qweight = torch.zeros(out_features, in_features // 8, dtype=torch.int64)
    qzeros = torch.zeros(out_features, width, dtype=torch.int64)
    for o in range(out_features):
        for i in range(in_features):
            qweight[o, i // 8] |= int(q[o, i]) << (4 * (i % 8))
        for g in range(groups):
            qzeros[o, g // 8] |= int(zeros[o, g]) << (4 * (g % 8))
    padded = torch.zeros(out_features, width * 8, dtype=torch.float16)
    padded[:, :groups] = scales
    as_int32 = lambda t: (t - (t >= 2**31) * 2**32).to(torch.int32)  # noqa: E731
    return {"qweight": as_int32(qweight), "qzeros": as_int32(qzeros), "scales": padded}


@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_awq_gemv_reads_as_its_float_reference(group):
    from llmkit.quant.formats.readers import LinearReader

    g = torch.Generator().manual_seed(group % 97)
    out_features, in_features = 16, 256
    size = in_features if group == -1 else group
    q = torch.randint(0, 16, (out_features, in_features), generator=g)
    zeros = torch.randint(0, 16, (out_features, in_features // size), generator=g)
    scales = (torch.rand(out_features, in_features // size, generator=g) + 0.05).half()
    stored = awq_gemv_fixture(q, scales, zeros, size)
    columns = torch.arange(in_features) // size
    expected = scales.double()[:, columns] * (q.double() - zeros.double()[:, columns])
    config = {"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": group}
    source = WholeTensors({f"layer.{name}": t for name, t in stored.items()})
    read = LinearReader(source, config).read("layer")
    assert torch.allclose(read.dequantize().double(), expected, rtol=0, atol=1e-6)


def test_awq_gemv_with_too_few_groups_is_one_line_naming_the_layout():
    from llmkit.errors import LlmkitError
    from llmkit.quant.formats.readers import LinearReader

    q, zeros = torch.zeros(8, 256, dtype=torch.int64), torch.zeros(8, 2, dtype=torch.int64)
    stored = awq_gemv_fixture(q, torch.ones(8, 2).half(), zeros, 128)
    config = {"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 16}  # 16 groups
    source = WholeTensors({f"layer.{name}": t for name, t in stored.items()})
    with pytest.raises(LlmkitError, match=r"^layer: cannot read it as awq gemv: .*the 16 groups"):
        LinearReader(source, config).read("layer")

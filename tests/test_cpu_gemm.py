"""llmkit's CPU matrix-product kernels (llmkit/kernels/cpu_gemm.cpp, cpu_lora.cpp) against
float64 computations of what they are defined to compute, on whatever vector level this CPU has:
every weight layout, act-order, ragged shapes (outputs not a multiple of the thread split,
activation rows not a multiple of the kernels' tiles of 8 rows or the dense kernel's blocks
of 3 outputs x 4 rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit.kernels import cpu
from llmkit.quant import int8
from llmkit.runtime.layers.linear import (
    DenseLinear,
    GroupedWeight,
    Int8Linear,
    Int8Weight,
    PairsLinear,
    Q4Linear,
    W8A8Linear,
    convert_for_runtime,
    pair_products_here,
)
from tests.test_runtime_quantized import random_grouped

pytestmark = pytest.mark.skipif(cpu.ops() is None, reason="the CPU kernels cannot be built here")
ROWS = [1, 3, 4, 9, 15]  # 15 rows: tiles of 8, 4, 2 and 1 (the dense kernel: blocks of 4, 4 and 7)
CPU = torch.device("cpu")


def blocks_of_32(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-block kernels see it, in float64: each block of 32 scaled to max|x| = 127,
    rounded to nearest (ties to even), scaled back."""
    x = x.float().reshape(x.shape[0], -1, 32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(x * inv)
    return (q.double() * (amax / 127).double()).reshape(x.shape[0], -1)


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Float32 sums in another order: 1e-5 of the largest output; bf16 outputs: one rounding."""
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    scale = float(expected.abs().max())
    return bool(
        ((got.double() - expected).abs() <= tolerance * scale + tolerance * expected.abs()).all()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("inp,group", [(96, 32), (256, 64), (256, 128), (160, 160)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_q4_kernel_is_the_dequantized_product_of_block_quantized_inputs(
    dtype, act_order, inp, group, symmetric
):
    """37 outputs: four tiles of 8 rows and one padded past the weight's last row; 130 rows
    of a prefill: two passes over the weight, the second of 2 rows. A symmetric weight (every
    zero 8) keeps no zeros."""
    w = random_grouped(37, inp, group, act_order)
    if symmetric:
        w = GroupedWeight(w.q, w.scales, torch.full_like(w.zeros, 8.0), w.g_idx, 4)
    module = Q4Linear.build(w, None, dtype, CPU)
    assert module is not None and (module.perm is not None) == (act_order and group < inp)
    assert (module.zeros.numel() == 0) == symmetric
    perm = torch.argsort(w.g_idx, stable=True)  # groups made contiguous, as the kernel reads
    scales = w.scales.half().double()[:, w.g_idx]  # stored as fp16
    weight = scales * (w.q.double() - w.zeros.double()[:, w.g_idx])
    for rows in [*ROWS, 130]:
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)).to(dtype)
        expected = blocks_of_32(x[:, perm]) @ weight[:, perm].T
        got = module(x)
        assert got.dtype == dtype and close(got, expected, dtype), (rows, group)
        alone = torch.cat([module(x[m : m + 1]) for m in range(rows)])
        assert torch.equal(alone, got), rows  # a row's bits do not depend on the batch


def test_activations_quantized_on_several_threads():
    """40 rows x 8 blocks: more blocks than one thread quantizes, so every thread writes
    some of the activations' int8 blocks. The 4-bit kernel's rows are their bits alone; the
    int8 kernel's, the dequantized product."""
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(11))
    q4 = Q4Linear.build(random_grouped(16, 256, 64, False), None, torch.float32, CPU)
    w8 = int8_weight(16, 256, act_quant=False)
    q8 = Int8Linear(w8, None, torch.float32)
    ops = cpu.ops()

    def four_bit(rows):
        return ops.q4_linear(rows, q4.packed, q4.scales, q4.zeros, q4.group_size)

    assert torch.equal(four_bit(x), torch.cat([four_bit(x[m : m + 1]) for m in range(len(x))]))
    expected = blocks_of_32(x) @ (w8.q.double() * w8.scale.double()[:, None]).T
    assert close(ops.q8_linear(x, q8.q, q8.scale), expected, torch.float32)


def test_q4_refuses_what_its_layout_cannot_hold():
    w = random_grouped(16, 64, 32, False)
    half_zero = GroupedWeight(w.q, w.scales, w.zeros + 0.5, w.g_idx, 4)
    tiny_scale = GroupedWeight(w.q, w.scales * 1e-4, w.zeros, w.g_idx, 4)
    groups_of_16 = random_grouped(16, 64, 16, False)
    for weight in (half_zero, tiny_scale, groups_of_16):
        assert Q4Linear.build(weight, None, torch.float32, CPU) is None
    assert Q4Linear.build(w, None, torch.float16, CPU) is None
    # what it refuses still runs, through torch's kernel or the dequantized weight
    module = convert_for_runtime(half_zero, None, torch.float32, CPU)
    x = torch.randn(2, 64)
    expected = x.double() @ half_zero.dequantize().double().T
    assert torch.allclose(
        module(x).double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())
    )


def int8_weight(out: int, inp: int, act_quant: bool, seed: int = 0) -> Int8Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    return Int8Weight(q, torch.rand(out, generator=g) * 0.01 + 1e-3, act_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_kernel_is_the_dequantized_product_of_block_quantized_inputs(dtype):
    """37 outputs: four tiles of 8 and one padded; 130 rows: two passes over the weight."""
    w = int8_weight(37, 160, act_quant=False)
    module = Int8Linear(w, None, dtype)
    assert module.op is not None
    weight = w.q.double() * w.scale.double()[:, None]
    for rows in [*ROWS, 130]:
        x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)).to(dtype)
        got = module(x)
        assert got.dtype == dtype and close(got, blocks_of_32(x) @ weight.T, dtype), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_kernel_equals_per_token_int8_with_exact_int32_sums(dtype):
    w = int8_weight(37, 160, act_quant=True)
    w.q[:, 0] = 127  # the extremes, against which the kernel's int32 sums could go wrong
    w.q[:, 1] = -127
    module = W8A8Linear(w, None, dtype, CPU)
    assert module.op is not None
    for rows in [*ROWS, 130]:
        x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)).to(dtype)
        x[-1, :7] = 0
        if rows == 9:
            x[0] = 0  # a row of zeros: its scale is 1
        xq, x_scale = int8.quantize_per_token(x)
        exact = xq.long() @ w.q.long().T  # int64: no rounding at all
        expected = (exact.float() * x_scale * w.scale).to(dtype)
        assert torch.equal(module(x), expected), rows


@pytest.mark.parametrize("inputs", [8, 100, 172])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_of_any_input_count_run(inputs, dtype):
    """Inputs llmkit's kernel does not take (not a multiple of 32) and torch's int8 kernel
    gets wrong or crashes on (not a multiple of its vectors) run as the dequantized weight,
    at a decode's rows and a prefill's."""
    w = int8_weight(48, inputs, act_quant=False)
    module = Int8Linear(w, None, dtype)
    assert module.op is None
    weight = w.q.double() * w.scale.double()[:, None]
    for rows in (1, 5, 80):
        x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype)
        expected = x.double() @ weight.T
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(module(x).double(), expected, rtol=tolerance, atol=tolerance), rows


def test_int8_weights_holding_minus_128_use_torch():
    w = int8_weight(16, 64, act_quant=False)
    w.q[3, 5] = -128
    assert Int8Linear(w, None, torch.float32).op is None
    assert W8A8Linear(Int8Weight(w.q, w.scale, True), None, torch.float32, CPU).op is None


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inputs", [200, 203])  # a tail past 16 lanes; then past 8 too
def test_dense_kernel_is_the_float_product_of_the_weights(weight_dtype, dtype, inputs):
    """Half-precision weights widened to float32 in registers, float32 ones as they are,
    float32 sums; in tiles (1 to 3 rows) and register blocks of 4 to 7 rows (4, 6, 7, 9 = 4 +
    5, 15 = 4 + 4 + 7, and the most the kernel takes)."""
    import llmkit.runtime.layers.linear as linear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, inputs, generator=g).to(weight_dtype)
    module = DenseLinear(weight, None)
    assert module.op is not None
    for rows in [*ROWS, 6, 7, linear.KERNEL_MAX_ROWS]:
        x = torch.randn(rows, inputs, generator=g).to(dtype)
        got = module(x)
        assert got.dtype == dtype and close(got, x.double() @ weight.double().T, dtype), rows


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_kernel_gives_every_row_and_every_output_their_own_bits(weight_dtype, dtype):
    """Tiles of 1 to 3 rows and register blocks of several outputs x 4 to 7 rows sum each
    (output, row) in one order, so a row's bits are the same alone as in a call of any size:
    a speculative verify step's rows stand for decode steps, and a decode step's rows do not
    depend on the batch. The same for an output computed alone and in the tiles of 4 outputs
    or the blocks of 3 or 4 it shares, spread over the outputs (1 to 13 rows) or side by
    side (33 and 64). 37 outputs: on one thread or two, each thread's share holds at least 2
    groups of 4 or 3 spread outputs (so at least 2 apart) and outputs left alone. 2350
    inputs: a tail past the last block (bf16's blocks of 16 inputs and the others' of 8
    alike)."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 2350, generator=g).to(weight_dtype)
    module = DenseLinear(weight, None)
    assert module.op is not None
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 33, 64):
        x = torch.randn(rows, 2350, generator=g).to(dtype)
        got = module.op(x, module.weight)
        alone = torch.cat([module.op(x[m : m + 1], module.weight) for m in range(rows)])
        assert torch.equal(alone, got), rows
        outputs = [module.op(x, module.weight[j : j + 1].contiguous()) for j in range(37)]
        assert torch.equal(torch.cat(outputs, dim=1), got), rows


@pytest.mark.skipif(not pair_products_here(), reason="this CPU has no AVX512-BF16 pair products")
def test_pairs_kernel_is_the_float_product_of_the_bf16_weights():
    """PairsLinear: 128 outputs (two groups of 64), 200 inputs (100 pairs, not a multiple of
    the 32 a vector holds), 1 to 130 rows (tiles of 6 rows, then one of the 1 to 5 left; past
    64 rows, chunks of 64): the float64 product rounded once to bf16; a row's bits alone as
    in the batch."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(128, 200, generator=g).bfloat16()
    bias = torch.randn(128, generator=g).bfloat16()
    module = PairsLinear.build(weight, bias)
    assert module is not None and torch.equal(module.weight(), weight)
    for rows in [*ROWS, 5, 11, 64, 130]:
        x = torch.randn(rows, 200, generator=g).bfloat16()
        got = module(x)
        expected = x.double() @ weight.double().T + bias.double()
        assert got.dtype == torch.bfloat16 and close(got, expected, torch.bfloat16), rows
        alone = torch.cat([module(x[m : m + 1]) for m in range(rows)])
        assert torch.equal(alone, got), rows
    x = torch.randn(3, 200, generator=g)  # float32 activations: the plain product
    assert torch.allclose(module(x), F.linear(x, weight.float(), bias.float()))
    # what the layout cannot hold stays a DenseLinear
    assert PairsLinear.build(weight[:100], None) is None
    assert PairsLinear.build(weight[:, :199], None) is None
    assert PairsLinear.build(weight.half(), None) is None


def test_huge_pages_are_zeros_in_whole_2mib_pages_at_a_2mib_boundary():
    """kernels/cpu_gemm.cpp huge_pages: uint8 zeros, at least the size asked for, in whole
    2 MiB pages starting on a 2 MiB boundary, usable to the end (and mapped afresh: memory
    given back and asked for again is zeros again)."""
    for size in (0, 1, 2 << 20, (2 << 20) + 1, 2 << 20):
        memory = cpu.ops().huge_pages(size)
        assert memory.dtype == torch.uint8 and memory.dim() == 1
        assert memory.numel() >= max(size, 1) and memory.numel() % (2 << 20) == 0
        assert memory.data_ptr() % (2 << 20) == 0
        assert int(memory.count_nonzero()) == 0
        memory.fill_(7)
        assert int(memory[-1]) == 7
        del memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_kernel_adds_each_runs_low_rank_product_to_its_rows_only(dtype):
    """kernels/cpu_lora.cpp: runs with gaps between them, ranks 8, 16 and 5, 37 outputs (a
    tail past the tiles of 16), runs of 1, 6 and 7 rows (tails past the tiles of 4 rows),
    one run as two parts each with its own rank rows and outputs (and outputs in neither);
    each row gets the same bits alone as in the batch."""
    g = torch.Generator().manual_seed(3)
    rows, inp, out = 23, 200, 37
    x = torch.randn(rows, inp, generator=g).to(dtype)
    y = torch.randn(rows, out, generator=g).to(dtype)
    runs = [(8, 2, 3), (16, 5, 11), (5, 14, 21)]  # rank, start, stop
    blocks = [[(0, out, 0, 8)], [(0, 20, 0, 10), (29, 37, 10, 16)], [(0, out, 0, 5)]]
    factors = [
        (torch.randn(inp, r, generator=g) / inp**0.5, torch.randn(r, out, generator=g))
        for r, _, _ in runs
    ]
    args = (
        [a for a, _ in factors],
        [b for _, b in factors],
        [torch.tensor(b) for b in blocks],
        [b for _, start, stop in runs for b in (start, stop)],
    )
    got = y.clone()
    cpu.ops().lora_add(got, x, *args)
    expected = y.double()
    for (a, b), (_, start, stop), parts in zip(factors, runs, blocks, strict=True):
        for o0, o1, j0, j1 in parts:
            product = x[start:stop].double() @ a[:, j0:j1].double() @ b[j0:j1, o0:o1].double()
            expected[start:stop, o0:o1] += product
    assert got.dtype == dtype and close(got, expected, dtype)
    untouched = [m for m in range(rows) if not any(s <= m < e for _, s, e in runs)]
    assert torch.equal(got[untouched], y[untouched])
    assert torch.equal(got[5:11, 20:29], y[5:11, 20:29])  # outputs in no block of the run
    for m in range(5, 11):
        alone = y[m : m + 1].clone()
        one = [[arg[1]] for arg in args[:3]]
        cpu.ops().lora_add(alone, x[m : m + 1].contiguous(), *one, [0, 1])
        assert torch.equal(alone, got[m : m + 1]), m

"""The Triton 4-bit kernels (kernels/triton_int4.py) and their layer (TritonInt4Linear)
against the dequantized weight's product in float64: every output-tile width, split and
unsplit inputs, groups of 32 to 128, act-order, outputs that are not a multiple of a tile.
On the CPU through Triton's interpreter; natively (bf16, fp16) where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from tests.runtime_helpers import NEEDS_CUDA, interpreted
from tests.test_runtime_quantized import random_grouped

# (outputs, inputs, group size, act-order)
SHAPES = [(40, 256, 32, False), (72, 384, 128, True), (128, 512, 64, False), (24, 512, 256, False)]


def errors(device: str, dtype: torch.dtype) -> list[float]:
    """Per shape, rows and way of computing: max |layer - float64 reference| / max |reference|."""
    from llmkit.runtime.layers.linear import TritonInt4Linear

    found = []
    for shape in SHAPES:
        w = random_grouped(*shape)
        bias = torch.randn(shape[0], dtype=torch.float64)
        layer = TritonInt4Linear.build(w, bias.to(device, dtype), torch.device(device))
        assert layer is not None
        for rows in (1, 3, 16, 19):
            x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
            x = x.to(dtype)  # the reference takes the rounded inputs
            expected = x.double() @ w.dequantize().double().t() + bias
            for option in layer.options(rows):
                layer._choice = lambda _, option=option: option
                got = layer(x.to(device)).double().cpu()
                found.append(float((got - expected).abs().max() / expected.abs().max()))
        assert not layer.counters.any()  # split products leave their counters zero
    return found


def test_pack_puts_input_128t_plus_16i_plus_j_in_bits_4i_of_word_16t_plus_j():
    from llmkit.kernels.triton_int4 import pack

    q = torch.randint(0, 16, (3, 256), generator=torch.Generator().manual_seed(1))
    packed = pack(q)
    assert packed.shape == (32, 3) and packed.dtype == torch.int32
    for n in range(3):
        for k in range(256):
            t, i, j = k // 128, k % 128 // 16, k % 16
            assert (int(packed[16 * t + j, n]) >> (4 * i)) & 0xF == q[n, k]


def test_split_parts_divide_the_input_tiles_and_fill_the_programs():
    from llmkit.kernels.triton_int4 import split_parts

    assert split_parts(4096, 4096, 64, 512) == 8  # 64 output tiles x 8 parts
    assert split_parts(4096, 28672, 64, 512) == 2
    assert split_parts(14336, 4096, 64, 512) == 8  # a divisor of its 112 tiles
    assert split_parts(14336, 1024, 64, 512) == 56  # 7 does not divide 112: 8 would not
    assert split_parts(1024, 64, 64, 512) == 8  # no more parts than tiles


def test_int4_kernels_under_the_interpreter_equal_the_dequantized_product():
    found = interpreted(
        "import json, torch\n"
        "from tests.test_triton_int4 import errors\n"
        "print(json.dumps(errors('cpu', torch.float32)))\n"
    )
    assert len(found) == len(SHAPES) * (7 + 7 + 4 + 4)  # rows 1 and 3 take the gemv ones
    assert max(found) < 1e-5, found


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_kernels_on_cuda_equal_the_dequantized_product(dtype):
    pytest.importorskip("triton")
    found = errors("cuda", dtype)
    assert max(found) < 2e-2, found  # the rows and outputs rounded to 16 bits


@NEEDS_CUDA
def test_the_layer_on_cuda_measures_its_choice_once_per_shape_and_rows():
    pytest.importorskip("triton")
    from llmkit.runtime.layers.linear import TritonInt4Linear

    TritonInt4Linear.choices.clear()
    w = random_grouped(256, 512, 128, False)
    layers = [TritonInt4Linear.build(w, None, torch.device("cuda")) for _ in range(2)]
    x = torch.randn(3, 512, dtype=torch.bfloat16, device="cuda")
    expected = (x.double() @ w.dequantize().double().t().cuda()).float()
    for layer in layers:
        got = layer(x).float()
        assert float((got - expected).abs().max() / expected.abs().max()) < 2e-2
    key = (256, 512, 128, torch.bfloat16, 4)  # 3 rows: measured as 4
    assert list(TritonInt4Linear.choices) == [key]
    assert list(TritonInt4Linear.timings[key]) == layers[0].options(4)

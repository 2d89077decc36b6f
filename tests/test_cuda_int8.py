"""llmkit's CUDA int8 kernels (llmkit/kernels/cuda_int8.py, cuda_int8.cu) for a decode
step's rows: on the CPU, the CUDA C++ sources compiled by NVRTC for Hopper and Ampere, the
launches' kernels and arguments, and the exact bf16 values the weight-only kernel splits
each byte into; on a GPU, both products against their references (the weight-only one the
float64 product, the W8A8 one the Triton product's bits) and the int8 layers taking them."""

from __future__ import annotations

import re

import pytest
import torch

from llmkit.kernels import cuda_int4, cuda_int8
from tests.runtime_helpers import NEEDS_CUDA
from tests.test_cuda_int4 import warp_chunks

SHAPES = [(48, 320), (4096, 4096), (6144, 4096), (4096, 14336)]  # [out, in]: odd chunk counts, 8B's


def nvrtc_or_skip():
    from llmkit.kernels import cuda_rtc

    try:
        cuda_rtc._nvrtc()
    except (OSError, cuda_rtc.CudaError):
        pytest.skip("needs NVRTC (the `test` extra's nvidia-cuda-nvrtc)")
    return cuda_rtc


@pytest.mark.parametrize("arch", [(9, 0), (8, 0)])
@pytest.mark.parametrize("path", [cuda_int8.SOURCE, cuda_int4.SOURCE], ids=["int8", "int4"])
def test_the_cuda_sources_compile_for_hopper_and_ampere(path, arch):
    """What a GPU's first use would compile (with cuda_common.cuh's helpers), every kernel a
    Python module launches among the cubin's names."""
    cuda_rtc = nvrtc_or_skip()
    cubin = cuda_rtc.compile_cubin(cuda_rtc.source(path), path.name, arch, [])
    names = cuda_int8.NAMES if path == cuda_int8.SOURCE else cuda_int4._KERNELS.values()
    assert all(name.encode() in cubin for name in names)


def test_each_product_launches_its_kernel_with_the_arguments_in_the_sources_order():
    """Up to 8 rows one tile of rows, up to MAX_ROWS two; a block per 16 outputs of WARPS
    warps; the arguments of the source's KERNEL: x, x's row scales (none weight-only), the
    weight, its scales, y, rows, N, K; more rows or shapes the kernel does not tile
    refused."""
    source = cuda_int8.SOURCE.read_text()
    made = {f"{name}_m{mt}" for name, mt in re.findall(r"^KERNEL\((\w+), (\d),", source, re.M)}
    assert made == set(cuda_int8.NAMES)
    assert re.search(r"\(const char\* x, const float\* x_scale, const char\* w, const float\* "
                     r"scale, +\\\n +u16\* y, int rows, int N, int K\)", source)  # fmt: skip
    launched = []

    class Module:
        def launch(self, kernel, grid, block, *args, dependent):
            launched.append((kernel, grid, block, args, dependent))

    q, scale = torch.zeros(48, 128, dtype=torch.int8), torch.ones(48)
    for rows, kind, x_scale in ((8, "int8_gemv", None), (9, "w8a8_gemv", torch.ones(9))):
        x = torch.zeros(rows, 128, dtype=torch.int8 if x_scale is not None else torch.bfloat16)
        y = cuda_int8._launch(Module(), kind, x, x_scale, q, scale)
        kernel, grid, block, args, dependent = launched[-1]
        assert (kernel, grid, block, dependent) == (f"{kind}_m{1 + (rows > 8)}", 3, 256, True)
        assert args[0] is x and args[1] is x_scale and args[2] is q and args[3] is scale
        assert args[4] is y and y.shape == (rows, 48) and y.dtype == torch.bfloat16
        assert args[5:] == (rows, 48, 128)
    for x, weight in ((torch.zeros(17, 128), q), (torch.zeros(1, 96), q[:, :96]),
                      (torch.zeros(1, 128), q[:40])):  # fmt: skip
        with pytest.raises(ValueError, match="int8 products take"):
            cuda_int8._launch(Module(), "int8_gemv", x.bfloat16(), None, weight, scale)


def test_a_byte_is_two_exact_bf16_values_whose_sum_less_2304_is_it():
    """The weight-only kernel's split of q (two's complement, as stored): 0x4300 | (q & 15)
    is 128 + the low nibble and (the high nibble ^ 8) ^ 0x4500 is 2048 + 16 ((q + 128) >>
    4), both exact in bf16; with -2304 (0xC510) they sum to q for every byte."""

    def bf16(bits: int) -> float:
        return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item()

    for q in range(-128, 128):
        u = q & 0xFF
        low, high = bf16(0x4300 | (u & 15)), bf16(((u >> 4) & 15) ^ 0x4508)
        assert (low, high) == (128 + (u & 15), 2048 + 16 * ((q + 128) >> 4))
        assert low + high + bf16(0xC510) == q


def products(rows: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 0.001
    x = torch.randn(rows, k, generator=g).bfloat16()
    xq = torch.randint(-127, 128, (rows, k), generator=g, dtype=torch.int8)
    x_scale = torch.rand(rows, generator=g) * 0.1 + 0.01
    return q, scale, x, xq, x_scale


@NEEDS_CUDA
@pytest.mark.parametrize("n, k", SHAPES)
def test_the_weight_only_kernel_gives_the_float64_product(n, k):
    for rows in (1, 2, 7, 8, 9, 16):
        q, scale, x, _, _ = products(rows, n, k, rows + n + k)
        got = cuda_int8.matmul(x.cuda(), q.cuda(), scale.cuda()).double().cpu()
        want = cuda_int8.reference(x, q, scale)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-2, rows


@NEEDS_CUDA
@pytest.mark.parametrize("n, k", SHAPES)
def test_the_w8a8_kernel_gives_the_bits_of_the_triton_product(n, k):
    triton_int8 = pytest.importorskip("llmkit.kernels.triton_int8")
    for rows in (1, 5, 8, 12, 16):
        q, scale, _, xq, x_scale = products(rows, n, k, rows + n)
        on = [t.cuda() for t in (xq, x_scale, q, scale)]
        got = cuda_int8.w8a8(*on)
        assert torch.equal(got, triton_int8.w8a8_linear(*on, torch.bfloat16)), rows
        if n * k <= 2**20:  # (integer products on the CPU take seconds at 8B's shapes)
            assert torch.equal(got.cpu(), cuda_int8.w8a8_reference(xq, x_scale, q, scale)), rows


@NEEDS_CUDA
@pytest.mark.parametrize("act_quant", [False, True], ids=["int8", "w8a8"])
def test_bf16_layers_take_the_kernel_for_a_decode_steps_rows_and_triton_for_more(
    act_quant, monkeypatch
):
    """Int8Linear and W8A8Linear as the runtime builds them for a bf16 model: up to
    MAX_ROWS rows through cuda_int8 (the kernel counted), more through the Triton product,
    each within bf16's rounding of the float64 product of what it multiplies; float32
    models and shapes the kernel does not tile never take it."""
    pytest.importorskip("triton")
    from llmkit.quant import int8
    from llmkit.quant.formats.weights import Int8Weight
    from llmkit.runtime.layers.linear import convert_for_runtime

    q, scale, _, _, _ = products(1, 96, 192, 11)
    module = convert_for_runtime(Int8Weight(q, scale, act_quant), None, torch.bfloat16,
                                 torch.device("cuda"))  # fmt: skip
    assert module.decode_rows == cuda_int8.MAX_ROWS
    calls = []
    for name in ("matmul", "w8a8"):
        real = getattr(cuda_int8, name)
        monkeypatch.setattr(cuda_int8, name, lambda *a, real=real: calls.append(1) or real(*a))
    for rows, took in ((1, 1), (16, 1), (17, 0), (64, 0)):
        x = torch.randn(rows, 192).bfloat16()
        before = len(calls)
        got = module(x.cuda()).double().cpu()
        assert len(calls) - before == took, rows
        if act_quant:
            xq, x_scale = int8.quantize_per_token(x)
            x = xq.double() * x_scale.double()
        want = cuda_int8.reference(x, q, scale)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-2, rows
    odd = convert_for_runtime(Int8Weight(q[:, :160], scale, act_quant), None, torch.bfloat16,
                              torch.device("cuda"))  # fmt: skip
    wide = convert_for_runtime(Int8Weight(q, scale, act_quant), None, torch.float32,
                               torch.device("cuda"))  # fmt: skip
    assert odd.decode_rows == 0 and wide.decode_rows == 0


def test_the_first_use_check_runs_every_warps_unrolled_loop():
    """The check before layers use the kernels multiplies a weight whose every warp runs its
    unrolled loop twice and its tail loop once, so a kernel whose unrolled loop multiplied
    the wrong weights after its first pass is caught there (test_cuda_emulated runs the
    check on such a kernel)."""
    chunks = warp_chunks(cuda_int8.WARPS, cuda_int8.CHECK_INPUTS // 64)
    assert set(chunks) == {2 * cuda_int8.UNROLL + 1}

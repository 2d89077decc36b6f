"""The Triton INT8 products (llmkit/kernels/triton_int8.py) against the float64 product, at
every tile shape, odd shapes included, and Int8Linear and W8A8Linear built on them (W8A8:
the bits of its torch path): natively on CUDA where there is a GPU, and on the CPU through
Triton's interpreter in a child process (float32 and float16 there: the interpreter cannot
compute in bf16)."""

from __future__ import annotations

import pytest
import torch

from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize
from llmkit.runtime.engine import Engine, EngineConfig
from tests.runtime_helpers import NEEDS_CUDA, interpreted, random_prompts
from tests.test_runtime_engine import run_staggered

# (rows, outputs, inputs, dtype name): each tile shape of triton_int8.TILES, outputs and
# inputs that are not multiples of a tile's
CASES = [
    (1, 40, 300, "float32"),
    (16, 48, 512, "float16"),
    (17, 40, 300, "float32"),
    (64, 33, 130, "float16"),
    (130, 140, 200, "float32"),
]
CUDA_CASES = [
    *CASES,
    (1, 4096, 4096, "bfloat16"),
    (5, 6144, 4096, "bfloat16"),
    (16, 4096, 14336, "bfloat16"),
    (48, 1024, 4096, "float16"),
    (300, 4096, 4096, "bfloat16"),
]


def errors(device: str, cases) -> list[float]:
    """Each case's largest |kernel - float64 product| over the product's largest |value|."""
    from llmkit.kernels import triton_int8

    out = []
    for rows, outputs, inputs, name in cases:
        g = torch.Generator().manual_seed(rows + outputs + inputs)
        q = torch.randint(-128, 128, (outputs, inputs), generator=g, dtype=torch.int8)
        scale = torch.rand(outputs, generator=g) * 0.02 + 0.001
        x = torch.randn(rows, inputs, generator=g).to(getattr(torch, name))
        got = triton_int8.int8_linear(x.to(device), q.to(device), scale.to(device))
        assert got.dtype == x.dtype and got.shape == (rows, outputs)
        want = triton_int8.reference(x, q, scale)
        out.append(float((got.double().cpu() - want).abs().max() / want.abs().max()))
    return out


def layer_errors(device: str, dtype_name: str) -> dict:
    """Int8Linear as the runtime builds it (convert_for_runtime) on `device`: whether it took
    the Triton product, and its error against the float64 product with a bias, for inputs
    with two leading dimensions."""
    from llmkit.kernels import triton_int8
    from llmkit.quant.formats.weights import Int8Weight
    from llmkit.runtime.layers.linear import Int8Linear, convert_for_runtime

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-128, 128, (72, 160), generator=g, dtype=torch.int8)
    scale = torch.rand(72, generator=g) * 0.02 + 0.001
    bias = torch.randn(72, generator=g).to(dtype)
    module = convert_for_runtime(Int8Weight(q, scale, False), bias, dtype, torch.device(device))
    x = torch.randn(2, 7, 160, generator=g).to(dtype)
    got = module(x.to(device)).reshape(14, 72).double().cpu()
    want = triton_int8.reference(x.reshape(14, 160), q, scale) + bias.double()
    took = isinstance(module, Int8Linear) and module.kernels is not None
    return {"took": took, "error": float((got - want).abs().max() / want.abs().max())}


def w8a8_differences(device: str, dtype_name: str, shape=(72, 160)) -> dict:
    """W8A8Linear as the runtime builds it on `device` for a weight of `shape`: whether it
    took the Triton kernels, and per number of rows (up to TRITON_ROWS, or for shapes
    torch._int_mm refuses: the Triton product; more: torch._int_mm) the largest difference
    from its torch path's values (quantize_per_token, exact int32 sums, times the row's
    scale, then the output's, rounded, then the bias)."""
    from llmkit.quant import int8
    from llmkit.quant.formats.weights import Int8Weight
    from llmkit.runtime.layers.linear import W8A8Linear, convert_for_runtime

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(4)
    outputs, inputs = shape
    q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    scale = torch.rand(outputs, generator=g) * 0.02 + 0.001
    bias = torch.randn(outputs, generator=g).to(dtype)
    module = convert_for_runtime(Int8Weight(q, scale, True), bias, dtype, torch.device(device))
    out = {"took": isinstance(module, W8A8Linear) and module.kernels is not None}
    for rows in (1, 16, 40, 64, 65, 150):
        x = (torch.randn(rows, inputs, generator=g) * 3).to(dtype)
        xq, x_scale = int8.quantize_per_token(x)
        acc = (xq.long() @ q.long().t()).float()  # exact
        want = (acc * x_scale * scale).to(dtype) + bias
        got = module(x.to(device)).cpu()
        out[rows] = float((got.double() - want.double()).abs().max())
    return out


def quantized_alike(device: str, dtype_name: str) -> bool:
    """Whether quantize_rows gives quant/int8.py's quantize_per_token, bit for bit, on rows
    with halves to round (to even), a row of zeros and a long random row."""
    from llmkit.kernels import triton_int8
    from llmkit.quant import int8

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(3, 2500)
    x[0, :5] = torch.tensor([127.0, 0.5, 1.5, -2.5, -126.5])  # scale 1: halves stay halves
    x[2] = torch.randn(2500, generator=g) * 4
    x = x.to(dtype)
    xq, scale = triton_int8.quantize_rows(x.to(device))
    want_q, want_scale = int8.quantize_per_token(x)
    return torch.equal(xq.cpu(), want_q) and torch.equal(scale.cpu(), want_scale[:, 0])


def test_the_float64_row_quantization_is_quantize_per_token():
    from llmkit.kernels import triton_int8
    from llmkit.quant import int8

    x = torch.randn(9, 700, generator=torch.Generator().manual_seed(6)) * 3
    x[1] = 0
    x[2, :3] = torch.tensor([127.0, 0.5, -2.5])
    x[2, 3:] = 0
    q, scale = triton_int8.reference_rows(x)
    want_q, want_scale = int8.quantize_per_token(x)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale[:, 0])


def compiled_for(kernel, types: dict, constexprs: dict, capability: int, options: dict,
                 aligned: tuple[str, ...] = ()):  # fmt: skip
    """`kernel` compiled ahead of time for an NVIDIA GPU of this compute capability (no GPU
    needed: Triton's wheel brings ptxas), its arguments of `types` and `constexprs`; those
    named in `aligned` known to be multiples of 16 (of 16 bytes for pointers), as Triton
    specializes a launch's arguments where they are (a model's weights and shapes). With
    Triton's `options` (num_warps, ...), over llmkit's launches' FUSED."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmkit.kernels.triton_launch import FUSED

    signature = {name: "constexpr" if name in constexprs else types[name]
                 for name in kernel.arg_names}  # fmt: skip
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={**FUSED, **options})


@pytest.mark.parametrize("capability", [90, 80])
def test_the_int8_kernels_compile_for_hopper_and_ampere(capability, tmp_path, monkeypatch):
    """What Triton's interpreter does not check (globals a kernel may not read, what a GPU's
    compiler refuses): every tile shape of both products, and the row quantization, compiled
    to a cubin, as a GPU would on first use (into a cache of the test's own)."""
    pytest.importorskip("triton", minversion="3.8", reason="needs Triton >= 3.8 (`test` extra)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    from llmkit.kernels import triton_int8

    pointers = {"q": "*i8", "scale": "*fp32", "row_scale": "*fp32", "out": "*bf16"}
    sizes = {"rows": "i32", "outputs": "i32", "inputs": "i32"}
    model = ("a", *pointers, "outputs", "inputs")  # a model's shapes; `checked`'s are odd
    cases = [(tile, a, model) for _, tile in triton_int8.TILES for a in ("*bf16", "*i8")]
    cases += [(triton_int8.TILES[0][1], "*fp32", model), (triton_int8.TILES[0][1], "*bf16", ())]
    for (bm, bn, bk, warps, stages), a, aligned in cases:
        constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "IEEE": a == "*fp32",
                      "INTEGER": a == "*i8", "PDL": capability >= 90}  # fmt: skip
        types = {"a": a, **pointers, **sizes}
        options = {"num_warps": warps, "num_stages": stages}
        done = compiled_for(triton_int8._int8_kernel, types, constexprs, capability, options,
                            aligned)  # fmt: skip
        assert done.asm["cubin"]
        if aligned:  # the weight streams through asynchronous copies, 16 bytes each
            assert "cp.async.cg.shared.global" in done.asm["ptx"]
    for x in ("*bf16", "*fp32"):
        types = {"x": x, "xq": "*i8", "scales": "*fp32", "inputs": "i32"}
        constexprs = {"BLOCK": triton_int8.QUANTIZE_BLOCK, "PDL": capability >= 90}
        options = {"num_warps": 4, "num_stages": 3}
        assert compiled_for(triton_int8._quantize_kernel, types, constexprs, capability, options)


def check(cases, found: list[float]) -> None:
    from llmkit.kernels.triton_int8 import TOLERANCE

    for case, error in zip(cases, found, strict=True):
        assert error < TOLERANCE[getattr(torch, case[-1])], (case, error)


def test_int8_product_interpreted_matches_the_float64_product():
    found = interpreted(
        "import json\n"
        "from tests.test_triton_int8 import CASES, errors, layer_errors\n"
        "from tests.test_triton_int8 import quantized_alike, w8a8_differences\n"
        "dtypes = ('float32', 'float16')\n"
        "print(json.dumps([errors('cpu', CASES), layer_errors('cpu', 'float16'),\n"
        "                  [quantized_alike('cpu', d) for d in dtypes],\n"
        "                  *(w8a8_differences('cpu', d) for d in dtypes),\n"
        "                  w8a8_differences('cpu', 'float32', (70, 150))]))\n"
    )
    check(CASES, found[0])
    assert found[1]["took"] and found[1]["error"] < 2e-3, found[1]
    assert found[2] == [True, True]
    for w8a8 in found[3:]:  # the same values as the torch path, bit for bit
        assert w8a8.pop("took") and set(w8a8.values()) == {0.0}, w8a8


@NEEDS_CUDA
def test_int8_product_on_cuda_matches_the_float64_product():
    pytest.importorskip("triton")
    check(CUDA_CASES, errors("cuda", CUDA_CASES))


@NEEDS_CUDA
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_int8_layers_on_cuda_take_the_triton_product(dtype_name):
    pytest.importorskip("triton")
    found = layer_errors("cuda", dtype_name)
    assert found["took"] and found["error"] < (1.6e-2 if dtype_name == "bfloat16" else 1e-5)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_w8a8_layers_on_cuda_give_the_values_of_the_torch_path(dtype_name):
    pytest.importorskip("triton")
    assert quantized_alike("cuda", dtype_name)
    for shape in ((72, 160), (70, 150)):  # the second: sizes torch._int_mm refuses
        found = w8a8_differences("cuda", dtype_name, shape)
        assert found.pop("took") and set(found.values()) == {0.0}, (shape, found)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_int8_decode_with_cuda_graphs_equals_eager_mode(tiny_dir, tmp_path, method, dtype):
    """An INT8 checkpoint (weight-only, or W8A8) decoding batches of 1 to 12 sequences: the
    graphs' tokens (rows padded to a bucket) equal eager mode's, with float32 activations
    (as test_cuda.py's graphs test; the Triton products) and bf16 ones (a decode step's rows
    through kernels/cuda_int8.py, prefills through Triton)."""
    pytest.importorskip("triton")
    from llmkit.kernels import cuda_int8

    out = tmp_path / method
    calibration = CalibrationSpec(num_samples=8, seq_len=64)
    quantize(tiny_dir("tiny-llama"), out, method, options=options_for(method),
             calibration=calibration, device="cuda")  # fmt: skip
    prompts = random_prompts(12, 3, 60, seed=5)
    runs = {}
    for eager in (False, True):
        engine = Engine(out, EngineConfig(device="cuda", dtype=dtype, enforce_eager=eager))
        try:
            down = engine.executor.runner.model.layers[0].mlp.down
            assert down.kernels is not None
            assert down.decode_rows == (cuda_int8.MAX_ROWS if dtype == "bfloat16" else 0)
            runs[eager] = run_staggered(engine, prompts)
        finally:
            engine.close()
    assert runs[False] == runs[True]

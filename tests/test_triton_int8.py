"""The Triton INT8 weight-only product (llmkit/kernels/triton_int8.py) against the float64
product, at every tile shape, odd shapes included, and Int8Linear built on it: natively on
CUDA where there is a GPU, and on the CPU through Triton's interpreter in a child process
(float32 and float16 there: the interpreter cannot compute in bf16)."""

from __future__ import annotations

import pytest
import torch

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
    took = isinstance(module, Int8Linear) and module.product is not None
    return {"took": took, "error": float((got - want).abs().max() / want.abs().max())}


def check(cases, found: list[float]) -> None:
    from llmkit.kernels.triton_int8 import TOLERANCE

    for case, error in zip(cases, found, strict=True):
        assert error < TOLERANCE[getattr(torch, case[-1])], (case, error)


def test_int8_product_interpreted_matches_the_float64_product():
    found = interpreted(
        "import json\n"
        "from tests.test_triton_int8 import CASES, errors, layer_errors\n"
        "print(json.dumps([errors('cpu', CASES), layer_errors('cpu', 'float16')]))\n"
    )
    check(CASES, found[0])
    assert found[1]["took"] and found[1]["error"] < 2e-3, found[1]


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
def test_int8_decode_with_cuda_graphs_equals_eager_mode(tiny_dir, tmp_path):
    """An INT8 weight-only checkpoint decoding batches of 1 to 12 sequences through the
    Triton product: the graphs' tokens (rows padded to a bucket) equal eager mode's (float32
    activations, as test_cuda.py's graphs test)."""
    pytest.importorskip("triton")
    out = tmp_path / "int8"
    quantize(tiny_dir("tiny-llama"), out, "int8", options=options_for("int8"), device="cuda")
    prompts = random_prompts(12, 3, 60, seed=5)
    runs = {}
    for eager in (False, True):
        engine = Engine(out, EngineConfig(device="cuda", dtype="float32", enforce_eager=eager))
        try:
            assert engine.executor.runner.model.layers[0].mlp.down.product is not None
            runs[eager] = run_staggered(engine, prompts)
        finally:
            engine.close()
    assert runs[False] == runs[True]

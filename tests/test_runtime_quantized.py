"""Every quantized format runs through its fast kernel and computes what its dequantized
float weights compute (the reference: llmkit's own reader feeding transformers)."""

from __future__ import annotations

import pytest
import torch

from llmkit.bench.model import load_model
from llmkit.checkpoint.rank_tensors import open_rank
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import options_for, quantizes_lm_head
from llmkit.quant.pipeline import quantize
from llmkit.runtime.distributed import Group
from llmkit.runtime.layers.linear import (
    DenseLinear,
    GroupedWeight,
    Int4Linear,
    Int8Linear,
    Parallel,
    Q4Linear,
    W8A8Linear,
    concat,
    convert_for_runtime,
)
from llmkit.runtime.loader import load_model as load_runtime
from tests.runtime_helpers import DEVICES, random_prompts, runtime_logits

# method, options, the module the CPU path must build, tolerance relative to max |logit|.
# The int8 and 4-bit kernels take activations in int8 blocks of 32 (tests/test_cpu_gemm.py
# checks them exactly against that definition); through this random tiny model's layers
# that rounding moves the logits by up to ~3% of the largest. W8A8's per-token int8
# activations are the format's own, in both computations, but their float inputs come from
# sums in different orders: an activation near a rounding boundary can land one int8 step
# apart (1/127 of its row's largest), which moved the logits by up to 0.6% on an AVX-512 host.
CASES = {
    "int8": ("int8", options_for("int8"), Int8Linear, 3e-2),
    "w8a8": ("w8a8", options_for("w8a8"), W8A8Linear, 1e-2),
    "gptq": ("gptq", options_for("gptq", group_size=32, act_group_aware=False), Q4Linear, 3e-2),
    "gptq-act-order": ("gptq", options_for("gptq", group_size=32, desc_act=True), Q4Linear, 3e-2),
    "rtn-per-channel": ("rtn", options_for("rtn", group_size=-1), Q4Linear, 3e-2),
    "gptq-8bit": ("gptq", options_for("gptq", bits=8, group_size=32), DenseLinear, 1e-4),
    "awq": ("awq", options_for("awq", group_size=32), Q4Linear, 3e-2),
    "int8-lm-head": ("int8", options_for("int8", quantize_lm_head=True), Int8Linear, 3e-2),
    "rtn-lm-head": (
        "rtn",
        options_for("rtn", group_size=32, quantize_lm_head=True),
        Q4Linear,
        3e-2,
    ),
}


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    made = {}

    def get(case: str):
        if case not in made:
            method, options = CASES[case][:2]
            out = tmp_path_factory.mktemp(case) / "ckpt"
            calibration = CalibrationSpec(num_samples=8, seq_len=64)
            quantize(tiny_dir("tiny-llama"), out, method, options=options, calibration=calibration)
            made[case] = out
        return made[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_quantized_logits_equal_the_dequantized_computation(quantized, case):
    path, (_, _, kind, tolerance) = quantized(case), CASES[case]
    src = open_rank(path)
    model, _ = load_runtime(src, Group(), torch.float32, torch.device("cpu"))
    src.close()
    assert isinstance(model.layers[0].mlp.gate_up, kind)
    assert isinstance(model.layers[0].attn.o_proj, kind)
    if quantizes_lm_head(CASES[case][1]):
        assert isinstance(model.lm_head.proj, kind)
    ids = random_prompts(1, 48, 49, seed=7)[0]
    with torch.inference_mode():
        expected = load_model(path, torch.float32)(torch.tensor([ids])).logits[0]
    got = runtime_logits(path, ids)
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error <= tolerance, error
    # as quality measurements run it: the dequantized weights, no kernel rounding (W8A8's
    # int8 activations are the format's own)
    exact = runtime_logits(path, ids, exact=True)
    error = float((exact - expected).abs().max() / expected.abs().max())
    assert error <= (tolerance if case == "w8a8" else 1e-5), error


def random_grouped(out: int, inp: int, group: int, act_order: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    g_idx = torch.arange(inp) // group
    if act_order:
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    return GroupedWeight(
        torch.randint(0, 16, (out, inp), generator=g),
        torch.rand(out, inp // group, generator=g) * 0.02 + 0.01,
        torch.randint(0, 16, (out, inp // group), generator=g).float(),
        g_idx,
        4,
    )


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("device", DEVICES)
def test_int4_kernel_equals_the_dequantized_matmul(act_order, group, device):
    w = random_grouped(64, 1024, group, act_order)
    module = Int4Linear.build(w, None, torch.float32, torch.device(device))
    assert module is not None and (module.perm is not None) == act_order
    assert module.packed.device.type == device
    x = torch.randn(7, 1024, generator=torch.Generator().manual_seed(1))
    expected = x.bfloat16().float() @ w.dequantize().t()  # the kernel takes bf16 inputs
    got = module(x.to(device)).cpu()
    assert float((got - expected).abs().max() / expected.abs().max()) < 5e-3


def test_siblings_with_different_layouts_run_side_by_side():
    parts = [random_grouped(32, 64, 32, act_order=True, seed=s) for s in (0, 1)]
    assert concat(parts) is None
    module = Parallel(
        [convert_for_runtime(p, None, torch.float32, torch.device("cpu")) for p in parts]
    )
    x = torch.randn(3, 64)
    expected = torch.cat([x.bfloat16().float() @ p.dequantize().t() for p in parts], dim=-1)
    assert torch.allclose(module(x), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_linear_widened_in_blocks_rounds_as_the_half_product(monkeypatch, dtype):
    """Without native half-precision products, DenseLinear computes batches in float32 from
    widened weight blocks: every block (the ragged last one too) is the float64 product
    rounded once to the half dtype, and small batches keep the plain half product."""
    import llmkit.runtime.layers.linear as linear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 24, generator=g).to(dtype)
    bias = torch.randn(37, generator=g).to(dtype)
    x = torch.randn(9, 24, generator=g).to(dtype)
    monkeypatch.setattr(linear, "WIDEN_BLOCK", 5 * 24)  # blocks of 5 rows, the last of 2
    monkeypatch.setattr(linear, "native_bf16_on_cpu", lambda: False)  # as on a CPU without bf16
    monkeypatch.setattr(linear, "_cpu_op", lambda *a: None)  # and without llmkit's kernels
    module = DenseLinear(weight, bias)
    assert module.widen
    exact = x.double() @ weight.double().T + bias.double()
    assert torch.equal(module(x), exact.to(dtype))
    spy = []
    monkeypatch.setattr(linear, "linear_in_float32", lambda *a: spy.append(a))
    small = x[: linear.WIDEN_MIN_ROWS]
    assert torch.allclose(module(small).double(), exact[: len(small)], rtol=1e-2, atol=1e-2)
    assert not spy


def test_a_tied_lm_head_and_the_embedding_share_one_table(tiny_dir, monkeypatch):
    """Tied (tiny-qwen2), bf16 through the half-precision kernel (as on a CPU without
    AVX512-BF16): the lm_head copies the table (into 2 MiB pages; a plain copy here), and the
    embedding reads that copy instead of keeping a second."""
    import llmkit.runtime.layers.linear as linear

    if linear._cpu_op("dense_linear", torch.device("cpu")) is None:
        pytest.skip("the CPU kernels cannot be built here")
    monkeypatch.setattr(linear.PairsLinear, "build", classmethod(lambda cls, w, b: None))
    monkeypatch.setattr(linear, "_streamed", lambda weight: weight.clone())
    src = open_rank(tiny_dir("tiny-qwen2"))
    model, _ = load_runtime(src, Group(), torch.bfloat16, torch.device("cpu"))
    src.close()
    head = model.lm_head.proj
    assert isinstance(head, DenseLinear) and head.op is not None
    assert head.weight.data_ptr() == model.embed.weight.data_ptr()

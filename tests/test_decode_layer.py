"""The C++ decoder layer of CPU decode steps (kernels/cpu_layer.cpp) computes what the Python
layer computes, bit for bit: the same tokens and log probabilities with and without it, for
every kind of Linear it takes, the whole step in one call (DecodeStack with its head), all
layers in one call (without the head) or layer by layer beside Python layers; steps it does
not take run the Python layer."""

from __future__ import annotations

import pytest

from llmkit.kernels import cpu
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.layers.decode_layer import DecodeLayer, DecodeStack
from llmkit.runtime.layers.linear import HALF, PAIRS, Q4, Q8, W8A8, pair_products_here
from llmkit.runtime.sequence import SamplingParams
from tests.runtime_helpers import random_prompts

pytestmark = pytest.mark.skipif(cpu.ops() is None, reason="llmkit's CPU kernels are not built")

# the kind bf16 Linears take here: the pair products where the CPU has them
DENSE = PAIRS if pair_products_here() else HALF

# case -> (preset, quantization method or None, options, the kinds of qkv, o, gate_up, down)
CASES = {
    "bf16": ("tiny-llama", None, None, [DENSE] * 4),
    "qwen2-bias-bf16": ("tiny-qwen2", None, None, [DENSE] * 4),
    "int8": ("tiny-llama", "int8", options_for("int8"), [Q8] * 4),
    "w8a8": ("tiny-llama", "w8a8", options_for("w8a8"), [W8A8] * 4),
    "rtn-g32": ("tiny-llama", "rtn", options_for("rtn", group_size=32), [Q4] * 4),
}


def outputs(path, fused: str, prompts, params):
    """(the layers' kernel kinds, every sequence's tokens and log probabilities); `fused`:
    "all" layers keep their C++ layer and the model its C++ head, "layers" (no head), "some"
    (all layers but the first) or "none"."""
    llm = LLM(path, EngineConfig(device="cpu", dtype="bfloat16"))
    try:
        runner = llm.engine.executor.runner
        if fused == "layers":
            runner.model._decode_stack(runner.kv_caches).has_head = False
        layers = runner.model.layers
        kinds = [layer.fused.kinds for layer in layers if layer.fused is not None]
        for i, layer in enumerate(layers):
            if fused == "none" or (fused == "some" and i == 0):
                layer.fused = None
        outs = llm.generate(prompts, params)
    finally:
        llm.close()
    return kinds, [(c.token_ids, c.logprobs) for o in outs for c in o.outputs]


@pytest.mark.parametrize("case", CASES)
def test_the_cpp_layer_decodes_what_the_python_layer_decodes(tiny_dir, tmp_path, monkeypatch, case):
    preset, method, options, kinds = CASES[case]
    path = tiny_dir(preset)
    if method is not None:
        calibration = CalibrationSpec(num_samples=8, seq_len=64)
        quantize(path, tmp_path / case, method, options=options, calibration=calibration)
        path = tmp_path / case
    calls = []
    spied = [(DecodeLayer, "__call__"), (DecodeStack, "__call__"), (DecodeStack, "logits")]
    for cls, name in spied:
        run, key = getattr(cls, name), f"{cls.__name__}.{name}"
        monkeypatch.setattr(cls, name, lambda *a, run=run, key=key: calls.append(key) or run(*a))
    # 9 sequences that end at different steps; 60 more, ending 12 at a time, make steps of 12
    # to 64 decodes (the half-precision kernel's register blocks) and steps the C++ layer does
    # not take (prefills beside decodes) in both runs
    prompts = random_prompts(66, 3, 40, seed=3)
    params = [
        SamplingParams(max_tokens=4 + i, temperature=0, ignore_eos=True, logprobs=3)
        if i % 2
        else SamplingParams(max_tokens=20, temperature=0.9, seed=i, n=2, ignore_eos=True)
        for i in range(6)
    ] + [SamplingParams(max_tokens=2 + i % 5, temperature=0, ignore_eos=True) for i in range(60)]
    used, fused = outputs(path, "all", prompts, params)
    assert used and all(k == kinds for k in used)
    assert set(calls) == {"DecodeStack.logits"}  # ids to logits in one call a step
    calls.clear()
    assert fused == outputs(path, "layers", prompts, params)[1]
    assert set(calls) == {"DecodeStack.__call__"}  # every layer fused: one call of them all
    calls.clear()
    assert fused == outputs(path, "none", prompts, params)[1]
    assert not calls
    if case == "rtn-g32":  # one layer in Python, the others one C++ call each
        assert fused == outputs(path, "some", prompts, params)[1]
        assert set(calls) == {"DecodeLayer.__call__"}

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
from llmkit.runtime.layers.linear import DENSE, PAIRS, Q4, Q8, W8A8, pair_products_here
from llmkit.runtime.sequence import SamplingParams
from tests.runtime_helpers import random_prompts

pytestmark = pytest.mark.skipif(cpu.ops() is None, reason="llmkit's CPU kernels are not built")

# the kind bf16 Linears take here: the pair products where the CPU has them
BF16 = PAIRS if pair_products_here() else DENSE

# case -> (preset, quantization method or None, options, the kinds of qkv, o, gate_up, down);
# every case runs in bf16 but FLOAT32's
FLOAT32 = "float32"
CASES = {
    FLOAT32: ("tiny-llama", None, None, [DENSE] * 4),
    "bf16": ("tiny-llama", None, None, [BF16] * 4),
    "bf16-head-dim-8": ("tiny-llama-head-dim-8", None, None, [BF16] * 4),
    "qwen2-bias-bf16": ("tiny-qwen2", None, None, [BF16] * 4),
    "int8": ("tiny-llama", "int8", options_for("int8"), [Q8] * 4),
    "w8a8": ("tiny-llama", "w8a8", options_for("w8a8"), [W8A8] * 4),
    "rtn-g32": ("tiny-llama", "rtn", options_for("rtn", group_size=32), [Q4] * 4),
}


def checkpoint(tiny_dir, tmp_path, case: str):
    """The tiny checkpoint of `case`, quantized under tmp_path when it names a method."""
    preset, method, options, _ = CASES[case]
    if method is None:
        return tiny_dir(preset)
    calibration = CalibrationSpec(num_samples=8, seq_len=64)
    quantize(tiny_dir(preset), tmp_path / case, method, options=options, calibration=calibration)
    return tmp_path / case


def outputs(path, fused: str, prompts, params, dtype: str):
    """(the layers' kernel kinds, every sequence's tokens and log probabilities); `fused`:
    "all" layers keep their C++ layer and the model its C++ head, "layers" (no head), "some"
    (all layers but the first) or "none"."""
    llm = LLM(path, EngineConfig(device="cpu", dtype=dtype))
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
    kinds = CASES[case][3]
    dtype = "float32" if case == FLOAT32 else "bfloat16"
    path = checkpoint(tiny_dir, tmp_path, case)
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
    used, fused = outputs(path, "all", prompts, params, dtype)
    assert used and all(k == kinds for k in used)
    assert set(calls) == {"DecodeStack.logits"}  # ids to logits in one call a step
    calls.clear()
    assert fused == outputs(path, "layers", prompts, params, dtype)[1]
    assert set(calls) == {"DecodeStack.__call__"}  # every layer fused: one call of them all
    calls.clear()
    assert fused == outputs(path, "none", prompts, params, dtype)[1]
    assert not calls
    if case == "rtn-g32":  # one layer in Python, the others one C++ call each
        assert fused == outputs(path, "some", prompts, params, dtype)[1]
        assert set(calls) == {"DecodeLayer.__call__"}


@pytest.mark.parametrize("case", ["bf16", "rtn-g32"])
def test_greedy_steps_run_ahead_in_one_call_decode_what_single_steps_decode(
    tiny_dir, tmp_path, monkeypatch, case
):
    """--decode-steps: a batch of greedy decodes runs several steps in one C++ call, each
    step's tokens the argmax of the last one's logits. Where a sequence runs in the same
    batches either way (alone, or in a batch whose sequences all end together: a row's
    sums depend on how many rows its step has), its tokens, text and finish reason are
    those of one step at a time, for requests stopped part-way by EOS, a stop token or a
    stop string and at max_tokens that no step count divides. In a KV cache small enough
    that running ahead is refused and sequences are preempted, every request still gets
    its tokens and every block is free afterwards."""
    path = checkpoint(tiny_dir, tmp_path, case)
    ran = []
    steps_call = DecodeStack.greedy_steps
    monkeypatch.setattr(
        DecodeStack, "greedy_steps", lambda self, *a: ran.append(a[-1]) or steps_call(self, *a)
    )
    prompts = random_prompts(12, 3, 30, seed=5)
    alone = [
        SamplingParams(max_tokens=30, temperature=0),
        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, stop_token_ids=(17, 40)),
        SamplingParams(max_tokens=21, temperature=0, ignore_eos=True, stop=("a", " t")),
        SamplingParams(max_tokens=11, temperature=0, ignore_eos=True),
    ] * 2
    together = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True)

    def run(steps: int, kv_cache_memory: int | None = None):
        config = EngineConfig(
            device="cpu",
            dtype="bfloat16",
            decode_steps=steps,
            decode_call_ms=0,  # every call runs `steps`, however fast a step is
            kv_cache_memory=kv_cache_memory,
        )
        llm = LLM(path, config)
        try:
            outs = [llm.generate([p], [q])[0] for p, q in zip(prompts, alone, strict=False)]
            outs += llm.generate(prompts[8:], together)
            assert llm.engine.block_manager.num_used_blocks == 0
            preempted = llm.engine.scheduler.num_preemptions
        finally:
            llm.close()
        return [(c.token_ids, c.text, c.finish_reason) for o in outs for c in o.outputs], preempted

    single, _ = run(1)
    assert not ran and {r for _, _, r in single} == {"stop", "length"}
    for steps in (4, 5):
        assert run(steps)[0] == single
        assert ran.count(steps) >= 10  # several steps a call
        ran.clear()
    tight, preempted = run(4, kv_cache_memory=24 * 1024)
    assert preempted > 0 and ran
    lengths = [len(tokens) for tokens, _, _ in tight]
    assert lengths == [len(tokens) for tokens, _, _ in single]

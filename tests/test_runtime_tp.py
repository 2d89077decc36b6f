"""Tensor parallel: two gloo ranks in two processes produce the tokens one process does."""

from __future__ import annotations

import pytest

from llmkit.errors import LlmkitError
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import GPTQOptions, options_for
from llmkit.quant.pipeline import quantize
from llmkit.runtime.engine import LLM, Engine, EngineConfig
from llmkit.runtime.sequence import SamplingParams
from llmkit.shard.write import shard
from tests.runtime_helpers import random_prompts

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def generate(path, tp: int) -> list[list[int]]:
    llm = LLM(path, EngineConfig(tp=tp))
    try:
        outs = llm.generate(random_prompts(6, 3, 50, seed=8), PARAMS)
    finally:
        llm.close()
    return [o.outputs[0].token_ids for o in outs]


def test_a_step_packed_for_the_other_ranks_unpacks_to_the_same_inputs():
    """What the driver broadcasts each step (one int64 tensor): decodes (one with a draft),
    a fresh prefill and one over a cached prefix, two LoRA adapters."""
    import torch

    from llmkit.runtime.model_runner import StepInputs, prepare
    from llmkit.runtime.scheduler import Batch
    from llmkit.runtime.sequence import Sequence

    batch = Batch()
    specs = [  # prompt, tokens cached, tokens this step, adapter, draft
        (list(range(3, 40)), 36, 1, 0, None),
        (list(range(5, 30)), 24, 3, 7, [9, 9]),
        (list(range(9, 20)), 0, 11, 7, None),
        (list(range(2, 60)), 32, 26, 2, None),
    ]
    for table_start, (prompt, computed, n, lora, draft) in enumerate(specs):
        seq = Sequence(prompt, lora_id=lora)
        seq.num_computed_tokens = computed
        seq.block_table = list(range(table_start * 10, table_start * 10 + 5))
        batch.add(seq, n, draft)
    inputs = prepare(batch, 16)[0]
    assert inputs.meta.prefills and inputs.meta.num_decodes and inputs.lora_segments
    back = StepInputs.unpack(inputs.pack())
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(back, name), getattr(inputs, name)), name
    for name in ("slot_mapping", "decode_blocks", "decode_lens"):
        assert torch.equal(getattr(back.meta, name), getattr(inputs.meta, name)), name
    assert back.meta.num_decodes == inputs.meta.num_decodes
    fields = lambda m: [(p.start, p.length, p.computed, p.blocks) for p in m.prefills]  # noqa: E731
    assert fields(back.meta) == fields(inputs.meta)
    assert back.lora_segments == inputs.lora_segments and back.steps == inputs.steps


def test_tp2_from_a_full_checkpoint_equals_tp1(tiny_dir):
    assert generate(tiny_dir("tiny-llama"), 2) == generate(tiny_dir("tiny-llama"), 1)


def test_tp2_from_shard_output_equals_tp1(tiny_dir, tmp_path):
    # Qwen2: tied embeddings, q/k/v biases; vocab padded to 128 per rank
    shard(tiny_dir("tiny-qwen2"), tmp_path / "tp2", tp=2)
    assert generate(tmp_path / "tp2", 2) == generate(tiny_dir("tiny-qwen2"), 1)


def first_logprobs(path, tp: int) -> list[list[tuple[int, float]]]:
    llm = LLM(path, EngineConfig(tp=tp))
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    try:
        outs = llm.generate(random_prompts(6, 3, 50, seed=8), params)
    finally:
        llm.close()
    return [o.outputs[0].logprobs[0]["top"] for o in outs]


def test_tp2_gptq_act_order_computes_what_tp1_does(tiny_dir, tmp_path):
    # Row-parallel ranks keep every group's scales and index them with global g_idx. A rank's
    # share of the inputs has uneven group counts, so it runs dequantized where tp=1 runs the
    # int4 kernel: both round through bf16, so compare distributions, not greedy streams.
    options = GPTQOptions(group_size=32, desc_act=True)
    calibration = CalibrationSpec(num_samples=8, seq_len=64)
    quantize(
        tiny_dir("tiny-llama"), tmp_path / "gptq", "gptq", options=options, calibration=calibration
    )
    for tp2, tp1 in zip(
        first_logprobs(tmp_path / "gptq", 2), first_logprobs(tmp_path / "gptq", 1), strict=True
    ):
        assert tp2[0][0] == tp1[0][0]
        assert dict(tp2).keys() & dict(tp1).keys()
        assert abs(tp2[0][1] - tp1[0][1]) < 0.05


def test_a_shard_layout_mismatch_is_refused(tiny_dir, tmp_path):
    shard(tiny_dir("tiny-llama"), tmp_path / "tp2", tp=2)
    with pytest.raises(LlmkitError, match="sharded for tp=2, pp=1; run it with --tp 2"):
        Engine(tmp_path / "tp2", EngineConfig(tp=1))


def test_tp_that_does_not_divide_the_heads_is_refused(tiny_dir):
    with pytest.raises(LlmkitError, match="tp=3 does not divide num_attention_heads=4"):
        Engine(tiny_dir("tiny-llama"), EngineConfig(tp=3))


@pytest.mark.parametrize("method", ["rtn", "int8"])
def test_tp2_quantized_lm_head_computes_what_tp1_does(tiny_dir, tmp_path, method):
    # Qwen2's vocab is padded per rank: the quantized lm_head's padding rows are cut again
    groups = {"group_size": 32} if method == "rtn" else {}  # int8 is per channel
    options = options_for(method, quantize_lm_head=True, **groups)
    quantize(tiny_dir("tiny-qwen2"), tmp_path / method, method, options=options)
    for tp2, tp1 in zip(
        first_logprobs(tmp_path / method, 2), first_logprobs(tmp_path / method, 1), strict=True
    ):
        assert tp2[0][0] == tp1[0][0]
        assert abs(tp2[0][1] - tp1[0][1]) < 0.05

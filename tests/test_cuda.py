"""The CUDA paths against the same references as the CPU tests: transformers' forward pass,
the dequantized float computation, and the CPU run of the same algorithm. Skipped where
torch sees no CUDA device (the CI machine); on a GPU machine `pytest -k cuda` runs them with
the CUDA variants of the CPU tests (prefill logits, the int4 kernel)."""

from __future__ import annotations

import pytest
import torch

from llmkit.bench.model import load_model
from llmkit.checkpoint.rank_tensors import open_rank
from llmkit.quant import gptq
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import options_for
from llmkit.quant.pipeline import quantize
from llmkit.runtime.distributed import Group
from llmkit.runtime.engine import LLM, Engine, EngineConfig
from llmkit.runtime.layers.linear import Int4Linear, Int8Linear, W8A8Linear
from llmkit.runtime.loader import load_model as load_runtime
from tests.runtime_helpers import NEEDS_CUDA, random_prompts, runtime_logits
from tests.test_gptq import correlated_inputs, hessian_error
from tests.test_runtime_engine import expect_hf, run_staggered

pytestmark = NEEDS_CUDA
CUDA = torch.device("cuda")


# the KV cache sized by --gpu-memory-utilization (most of the GPU), then by an explicit budget
@pytest.mark.parametrize(("prefix_caching", "kv_bytes"), [(False, None), (True, 2**24)])
def test_concurrent_greedy_on_cuda_equals_transformers_one_by_one(
    tiny_dir, prefix_caching, kv_bytes
):
    shared = random_prompts(1, 40, 41, seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(8, 1, 40, seed=4)]
    config = EngineConfig(
        device="cuda",
        dtype="float32",
        enable_prefix_caching=prefix_caching,
        kv_cache_memory=kv_bytes,
    )
    engine = Engine(tiny_dir(), config)
    try:
        expect_hf(tiny_dir(), prompts, run_staggered(engine, prompts))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        if prefix_caching:
            assert engine.block_manager.num_hit_blocks > 0
    finally:
        engine.close()  # its KV cache fills most of the GPU


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_greedy_tokens_with_cuda_graphs_equal_eager_mode_and_transformers(tiny_dir, decode_steps):
    """Requests arriving two per step make decode batches of every size from 1 to 12, so
    several graph buckets (and padded rows) are exercised, one step per call or several
    replays per call; tokens equal eager mode's."""
    prompts = random_prompts(12, 3, 60, seed=5)
    runs = {}
    for eager in (False, True):
        config = EngineConfig(
            device="cuda", dtype="float32", enforce_eager=eager, decode_steps=decode_steps
        )
        engine = Engine(tiny_dir(), config)
        try:
            runs[eager] = run_staggered(engine, prompts)
            graphs = engine.executor.runner.graphs
            assert (graphs is None) == eager
            # steps of several replays come once every request has arrived (one bucket)
            assert eager or len(graphs.graphs) >= (3 if decode_steps == 1 else 1)
            del graphs  # it holds the KV cache, which close() must hand back
        finally:
            engine.close()
    assert runs[False] == runs[True]
    expect_hf(tiny_dir(), prompts, runs[False])


@pytest.mark.parametrize("logprobs", [None, 2])
def test_speculation_on_cuda_gives_the_tokens_of_plain_decoding(tiny_dir, logprobs):
    """ngram and the model as its own draft on CUDA, drafts verified as decode rows of the
    graphs: greedy rows on the device (only their argmax comes back), rows asking for log
    probabilities on the CPU; the tokens of plain decoding on CUDA either way. The draft
    model's steps (its catch-ups too) replay graphs of its own."""
    from llmkit.runtime.sequence import SamplingParams
    from tests.test_speculative import ALL, prompts

    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=logprobs)

    def run(**speculation):
        config = EngineConfig(device="cuda", dtype="float32", kv_cache_memory=2**24,
                              **speculation)  # fmt: skip
        llm = LLM(tiny_dir(), config)
        try:
            outs = llm.generate(prompts(), params)
            draft = getattr(llm.engine.proposer, "runner", None)
            graphs = draft.graphs.graphs if draft is not None else None
            tokens = [[c.token_ids for c in o.outputs] for o in outs]
            return tokens, llm.engine.spec_stats, graphs
        finally:
            llm.close()

    plain, _, _ = run()
    for speculative in ("ngram", str(tiny_dir())):
        speculated, stats, graphs = run(**ALL, speculative=speculative)
        assert speculated == plain and stats.accepted > 0, speculative
        assert speculative == "ngram" or graphs, "the draft model ran no graph"


GUIDED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "role": {"enum": ["king", "queen", "fool"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "role", "age"],
    "additionalProperties": False,
}


def test_guided_answers_on_cuda_are_those_of_plain_decoding(tiny_dir, device="cuda"):
    """Structured outputs on CUDA, masks applied to the logits on the device: answers that
    follow the schema, and the tokens the guide forces verified as drafts (graph rows),
    with ngram, or with the model as its own draft model (drafting inside the guide, its
    masks on the device) give the greedy answers of no speculation at all."""
    import json
    from dataclasses import replace

    from llmkit.runtime.guide import Guide
    from llmkit.runtime.sequence import SamplingParams

    params = SamplingParams(max_tokens=80, temperature=0,
                            guide=Guide("json", json.dumps(GUIDED_SCHEMA)))  # fmt: skip
    prompts = ["Hello", "Once upon", "The king"]

    def run(on, params=params, **config):
        llm = LLM(tiny_dir(), EngineConfig(device=on, dtype="float32", kv_cache_memory=2**24,
                                           speculative_max_seqs=8, **config))  # fmt: skip
        try:
            texts = [o.outputs[0].text for o in llm.generate(prompts, params)]
            return texts, llm.engine.spec_stats
        finally:
            llm.close()

    plain, _ = run(device, replace(params, speculative=False))
    for answer in map(json.loads, plain):
        assert set(answer) == {"name", "role", "age"}
    drafts = {"speculative": str(tiny_dir()), "draft_min_confidence": 0.0}
    for config in ({}, {"speculative": "ngram"}, drafts):
        texts, stats = run(device, **config)
        assert texts == plain and stats.forced > 0, config
    assert stats.accepted > 0  # the draft model's own tokens


def test_sampling_on_cuda_draws_the_tokens_the_cpu_draws():
    """The sampler on CUDA logits: seeded rows with temperature, top-k, top-p, min-p and
    penalties give the tokens and log probabilities it gives on the CPU."""
    from llmkit.runtime.layers.sampler import Sampler
    from llmkit.runtime.sequence import SamplingParams

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, top_k=20, seed=1),
        SamplingParams(temperature=1.0, top_p=0.7, seed=2, logprobs=2),
        SamplingParams(temperature=1.3, min_p=0.05, seed=3, repetition_penalty=1.3),
        SamplingParams(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.2, seed=4),
    ]
    histories = [([1, 2, 3], [4, 5, 5])] * 5
    seeds = [p.seed for p in params]
    on_cpu, on_gpu = Sampler(), Sampler()
    for _ in range(3):
        cpu = on_cpu(logits, params, histories, seeds)
        on_cuda = on_gpu(logits.to(CUDA), params, histories, seeds)
        assert [s.token_id for s in cpu] == [s.token_id for s in on_cuda]
        for a, b in zip(cpu, on_cuda, strict=True):
            assert (a.logprob is None) == (b.logprob is None)
            assert a.logprob is None or abs(a.logprob - b.logprob) < 1e-4


def test_a_closed_engine_hands_the_gpu_back(tiny_dir):
    """Each engine sizes its KV cache to most of the GPU; closing one lets the next start."""
    for _ in range(2):
        llm = LLM(tiny_dir(), EngineConfig(device="cuda"))
        assert llm.engine.num_kv_tokens > 10**6
        llm.close()


# method, options, the module CUDA must build, tolerance relative to max |logit|
CASES = {
    "int8": ("int8", {}, Int8Linear, 1e-4),
    "w8a8": ("w8a8", {}, W8A8Linear, 1e-3),
    "gptq-act-order": ("gptq", {"group_size": 32, "desc_act": True}, Int4Linear, 2e-2),
    "awq": ("awq", {"group_size": 32}, Int4Linear, 2e-2),
    "rtn": ("rtn", {"group_size": 32}, Int4Linear, 2e-2),
}


@pytest.mark.parametrize("case", CASES)
def test_quantized_on_cuda_computes_the_dequantized_model(tiny_dir, tmp_path, case):
    """Calibrated and quantized on CUDA, run by the runtime on CUDA: the logits of the
    dequantized float weights (transformers on the CPU, llmkit's reader)."""
    method, options, kind, tolerance = CASES[case]
    out = tmp_path / "ckpt"
    calibration = CalibrationSpec(num_samples=8, seq_len=64)
    report = quantize(
        tiny_dir("tiny-llama"),
        out,
        method,
        options=options_for(method, **options),
        calibration=calibration,
        device="cuda",
    )
    assert report.device.startswith("cuda") and report.peak_device_bytes > 0
    src = open_rank(out)
    model, _ = load_runtime(src, Group(), torch.float32, CUDA)
    src.close()
    assert isinstance(model.layers[0].mlp.gate_up, kind)
    ids = random_prompts(1, 48, 49, seed=7)[0]
    with torch.inference_mode():
        expected = load_model(out, torch.float32)(torch.tensor([ids])).logits[0]
    got = runtime_logits(out, ids, "cuda")
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error <= tolerance, error


@pytest.mark.parametrize(("method", "options"), [("int8", {}), ("rtn", {"group_size": 32})])
def test_methods_without_calibration_write_the_cpus_bits_on_cuda(tiny_dir, tmp_path, method,
                                                                 options):  # fmt: skip
    """int8 and RTN round and pack each weight on the device asked for: the same tensors,
    bit for bit, as on the CPU."""
    from safetensors.torch import load_file

    written = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        quantize(tiny_dir("tiny-llama"), out, method, options=options_for(method, **options),
                 device=device)  # fmt: skip
        written[device] = load_file(out / "model.safetensors")
    assert written["cpu"].keys() == written["cuda"].keys()
    for name, tensor in written["cpu"].items():
        assert torch.equal(tensor, written["cuda"][name]), name


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_on_cuda_is_as_good_as_on_cpu(desc_act):
    """The same algorithm on both devices: float32 sums in another order may round a few
    weights the other way, so the two are compared by their output error, not bit for bit."""
    x = correlated_inputs(1, in_features=256, tokens=4096)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    settings = gptq.GPTQSettings(group_size=64, desc_act=desc_act)
    errors = {}
    for device in ("cpu", "cuda"):
        h = gptq.Hessian(256, torch.device(device))
        for batch in x.split(500):
            h.add(batch)
        result = gptq.quantize(w.to(device), h.matrix, settings)
        assert result.q.device.type == "cpu"  # results come back to the host for packing
        errors[device] = hessian_error(w, result.dequantize(), h.matrix.cpu())
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=0.02)

"""The engine against transformers: logits, and greedy tokens under every scheduling path."""

from __future__ import annotations

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.runtime.engine import LLM, Engine, EngineConfig
from llmkit.runtime.sequence import SamplingParams
from tests.conftest import TINY_PRESETS
from tests.runtime_helpers import DEVICES, hf_greedy, hf_model, random_prompts, runtime_logits

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_logits_match_transformers(tiny_dir, preset, device):
    ids = random_prompts(1, 40, 41, seed=1)[0]
    expected = hf_model(tiny_dir(preset))(torch.tensor([ids])).logits[0]
    assert torch.allclose(runtime_logits(tiny_dir(preset), ids, device), expected, atol=1e-4)


def run_staggered(engine: Engine, prompts: list[list[int]], params=GREEDY) -> dict:
    """Add two requests every step (so they arrive mid-flight) and run all to completion."""
    pending = list(enumerate(prompts))
    done = {}
    while pending or engine.has_unfinished():
        for i, prompt in pending[:2]:
            engine.add_request(str(i), prompt_token_ids=prompt, params=params)
        pending = pending[2:]
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return done


def expect_hf(path, prompts, done):
    model = hf_model(path)
    for i, prompt in enumerate(prompts):
        assert done[i] == hf_greedy(model, prompt, GREEDY.max_tokens), f"request {i}"


@pytest.mark.parametrize(
    "preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-llama-head-dim-8"]
)
def test_concurrent_greedy_equals_transformers_one_by_one(tiny_dir, preset):
    prompts = random_prompts(8, 3, 60, seed=2)
    engine = Engine(tiny_dir(preset), EngineConfig(enable_prefix_caching=False))
    expect_hf(tiny_dir(preset), prompts, run_staggered(engine, prompts))


def test_prefix_caching_with_a_shared_prefix(tiny_dir):
    shared = random_prompts(1, 40, 41, seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(8, 1, 20, seed=4)]
    engine = Engine(tiny_dir(), EngineConfig())
    done = run_staggered(engine, prompts)
    # requests 0 and 1 arrive together; each later one reuses the 2 full blocks of the prefix
    assert engine.block_manager.num_hit_blocks == 6 * 2
    expect_hf(tiny_dir(), prompts, done)


def test_preemption_by_recompute_when_blocks_run_out(tiny_dir):
    prompts = random_prompts(8, 20, 60, seed=5)
    # tiny-llama: 8 KiB per 16-token block; 12 blocks cannot hold 8 running requests
    engine = Engine(tiny_dir(), EngineConfig(kv_cache_memory=12 * 8192))
    done = run_staggered(engine, prompts)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    expect_hf(tiny_dir(), prompts, done)


def test_chunked_prefill_under_a_tiny_token_budget(tiny_dir):
    prompts = random_prompts(8, 20, 60, seed=6)
    engine = Engine(tiny_dir(), EngineConfig(max_num_batched_tokens=7, max_num_seqs=3))
    expect_hf(tiny_dir(), prompts, run_staggered(engine, prompts))


def test_prompt_longer_than_the_context_is_rejected(tiny_dir):
    engine = Engine(tiny_dir(), EngineConfig(max_model_len=64))
    with pytest.raises(LlmkitError, match=r"prompt has 64 tokens.*context is 64"):
        engine.add_request("a", prompt_token_ids=[5] * 64)
    with pytest.raises(LlmkitError, match="token ids must be integers"):
        engine.add_request("b", prompt_token_ids=[5, 100000])
    assert not engine.has_unfinished()


@pytest.mark.parametrize("length", [513, 1, -4])
def test_a_context_the_model_has_no_positions_for_is_refused(tiny_dir, length):
    """tiny-llama computes 512 positions: a longer --max-model-len failed every request that
    reached position 512, in the middle of its generation."""
    with pytest.raises(LlmkitError, match=rf"--max-model-len {length} must be between 2 and .*512"):
        Engine(tiny_dir(), EngineConfig(max_model_len=length))


def test_generation_stops_at_the_context_length(tiny_dir):
    llm = LLM(tiny_dir(), EngineConfig(max_model_len=32))
    out = llm.generate([[5] * 30], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_scaling_matches_transformers(tiny_dir, tmp_path, scaling):
    import json
    import shutil

    path = tmp_path / "scaled"
    shutil.copytree(tiny_dir("tiny-llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {**scaling, "rope_theta": config.get("rope_theta", 10000.0)}
    (path / "config.json").write_text(json.dumps(config))
    ids = random_prompts(1, 100, 101, seed=10)[0]  # past original_max_position_embeddings
    expected = hf_model(path)(torch.tensor([ids])).logits[0]
    unscaled = hf_model(tiny_dir("tiny-llama"))(torch.tensor([ids])).logits[0]
    assert not torch.allclose(expected, unscaled, atol=1e-3)  # the scaling does matter here
    assert torch.allclose(runtime_logits(path, ids), expected, atol=1e-4)


def run_to_end(engine: Engine) -> tuple[dict, dict]:
    """Step `engine` until it is idle: each finished request's tokens and each failed
    request's error, by request id."""
    done, errors = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            elif out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done, errors


@pytest.mark.parametrize("async_output", [False, True], ids=["sync", "async"])
def test_a_request_that_breaks_the_sampler_fails_alone(tiny_dir, monkeypatch, async_output):
    """One request whose sampling raises is failed with an error output; the others in its
    step go on to exactly the greedy tokens transformers gives. With async output the step
    that raises ran on the step thread; it is run again request by request on the caller's."""
    prompts = random_prompts(6, 3, 30, seed=4)
    config = EngineConfig(enable_prefix_caching=False, async_output=async_output)
    engine = Engine(tiny_dir(), config)
    sampler = engine.executor.runner.sampler
    poison = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, seed=7)
    real = type(sampler).__call__

    def breaks_on_poison(self, logits, params, *rest):
        if any(p is poison for p in params):
            raise RuntimeError("sampler broke")
        return real(self, logits, params, *rest)

    monkeypatch.setattr(type(sampler), "__call__", breaks_on_poison)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=prompt, params=GREEDY)
    engine.add_request("bad", prompt_token_ids=prompts[0], params=poison)
    done, errors = run_to_end(engine)
    done = {int(request_id): tokens for request_id, tokens in done.items()}
    assert list(errors) == ["bad"] and "sampler broke" in errors["bad"]
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    expect_hf(tiny_dir(), prompts, done)


def test_a_request_that_breaks_steps_run_ahead_fails_alone(tiny_dir, monkeypatch):
    """The same when several decode steps run in one call (--decode-steps, bf16: the C++
    decode step): the step is run again request by request, each part still running ahead,
    and the others get all their tokens."""
    prompts = random_prompts(4, 3, 30, seed=5)
    engine = Engine(tiny_dir(), EngineConfig(dtype="bfloat16", decode_steps=3, decode_call_ms=0))
    runner = engine.executor.runner
    real, ran = type(runner).greedy_steps, []

    def breaks_on_bad(self, inputs, seqs, launched=None):
        ran.append(len(seqs))
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("steps broke")
        return real(self, inputs, seqs, launched)

    monkeypatch.setattr(type(runner), "greedy_steps", breaks_on_bad)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=prompt, params=GREEDY)
    engine.add_request("bad", prompt_token_ids=prompts[0], params=GREEDY)
    done, errors = run_to_end(engine)
    assert list(errors) == ["bad"] and "steps broke" in errors["bad"]
    assert ran[:6] == [5, 1, 1, 1, 1, 1]  # the whole batch, then each request alone
    assert sorted(done) == ["0", "1", "2", "3"]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in done.values())
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_seeds_and_top_k_past_their_ranges_sample(tiny_dir):
    engine = LLM(tiny_dir(), EngineConfig())
    params = SamplingParams(max_tokens=4, seed=2**64 - 1, n=2, top_k=10**20)
    (out,) = engine.generate([[1, 5, 9]], params)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4]


@pytest.mark.parametrize(
    "params",
    [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=2, ignore_eos=True)],
)
def test_a_paused_request_frees_its_blocks_and_resumes_with_the_same_tokens(tiny_dir, params):
    prompt = random_prompts(1, 40, 41, seed=9)[0]
    (straight,) = LLM(tiny_dir()).generate([prompt], params)
    engine = Engine(tiny_dir(), EngineConfig(decode_steps=1))  # a token a step: paused mid-way
    engine.add_request("r", prompt_token_ids=prompt, params=params)
    for _ in range(4):
        engine.step()
    engine.pause("r")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
    engine.resume("r")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finished
    assert [c.token_ids for c in outs[-1].outputs] == [c.token_ids for c in straight.outputs]


def test_a_cuda_device_past_the_last_is_refused_in_one_line(cli, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "max_tokens": 1}\n')
    result = cli("generate", tiny_dir(), "--prompts", prompts, "--device", "cuda:2")
    assert result.code != 0
    expected = "error: --device cuda:2: torch sees 2 CUDA device(s), cuda:0 to cuda:1"
    assert result.err.strip() == expected

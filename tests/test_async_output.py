"""Async output (EngineConfig.async_output): each step starts before the outputs of the step
before are detokenized and built. It changes when outputs come, never what they are."""

from __future__ import annotations

import asyncio
import random

import pytest

from llmkit.runtime.engine import LLM, Engine, EngineConfig
from llmkit.runtime.sequence import SamplingParams
from tests.runtime_helpers import random_prompts
from tests.serve_helpers import start_server

TEXT = ["The king said", "Once upon a time", "A storm came over the", "Where is the"]


def _requests(stop: str) -> list[tuple[str | list[int], SamplingParams]]:
    """Requests that take every path out of a step: greedy, seeded sampling with n and
    logprobs, a stop string, a stop token id, prompt logprobs, EOS."""
    ids = random_prompts(4, 3, 40, seed=21)
    return [
        (TEXT[0], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)),
        (TEXT[1], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop,))),
        (TEXT[2], SamplingParams(max_tokens=12, temperature=0.9, seed=3, n=2, logprobs=2)),
        (ids[0], SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(ids[0][-1],))),
        (ids[1], SamplingParams(max_tokens=7, temperature=0, prompt_logprobs=1)),
        (ids[2], SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=9)),
        (ids[3], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)),
    ]


def _stream(engine: Engine, requests) -> dict[str, list]:
    """Each request's outputs in the order the engine gave them (text, tokens, finish
    reasons, logprobs of every completion; prompt logprobs)."""
    for i, (prompt, params) in enumerate(requests):
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        engine.add_request(str(i), text, ids, params)
    seen: dict[str, list] = {str(i): [] for i in range(len(requests))}
    while engine.has_unfinished():
        for out in engine.step():
            completions = [(c.text, c.token_ids, c.finish_reason, c.logprobs) for c in out.outputs]
            seen[out.request_id].append((completions, out.prompt_logprobs, out.finished))
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    return seen


def _first_difference(got: dict[str, list], expected: dict[str, list]) -> str:
    """The first output that differs, whole (pytest cuts long comparisons short)."""
    for request_id, outputs in expected.items():
        for i, (a, b) in enumerate(zip(got[request_id], outputs, strict=False)):
            if a != b:
                return f"request {request_id}, output {i}: got {a!r}, expected {b!r}"
        if len(got[request_id]) != len(outputs):
            return f"request {request_id}: {len(got[request_id])} outputs, not {len(outputs)}"
    return ""


@pytest.mark.parametrize(
    "config",
    [
        {"decode_steps": 1},  # on CUDA a step a call: the pacer's measured calls vary
        {"dtype": "bfloat16", "decode_steps": 4, "decode_call_ms": 0},  # steps run ahead
        {"speculative": "ngram", "num_speculative_tokens": 3},
    ],
    ids=["plain", "steps-ahead", "ngram"],
)
def test_async_output_gives_the_outputs_of_sync_output(tiny_dir, config):
    """Output by output, the same: text, tokens, finish reasons, logprobs (with
    speculation, the last outputs)."""
    plain = LLM(tiny_dir(), EngineConfig(async_output=False, **config))
    sync = plain.engine
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    text = plain.generate([TEXT[1]], greedy)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = _stream(sync, _requests(stop))
    sync.close()
    engine = Engine(tiny_dir(), EngineConfig(async_output=True, **config))
    try:
        got = _stream(engine, _requests(stop))
    finally:
        engine.close()
    if "speculative" in config:  # how many tokens a step adds hangs on measured times
        got, expected = ({r: outs[-1:] for r, outs in seen.items()} for seen in (got, expected))
    assert got == expected, _first_difference(got, expected)
    assert expected["1"][-1][0][0][2] == "stop"  # the stop string was met
    assert stop not in expected["1"][-1][0][0][0]


def test_each_step_starts_before_the_outputs_of_the_one_before(tiny_dir):
    """The call that gives a step's outputs has started the next step by then: each output
    comes after the model began the step that follows its tokens (sync output gives them
    before)."""
    events: list[tuple[str, int]] = []

    def run(async_output: bool) -> list[tuple[str, int]]:
        engine = Engine(tiny_dir(), EngineConfig(async_output=async_output, decode_steps=1))
        real = engine.executor.step

        def step(batch, masks=None, launched=None):
            events.append(("run", len(batch.seqs[0].output_token_ids)))
            return real(batch, masks, launched)

        engine.executor.step = step
        events.clear()
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        engine.add_request("r", prompt_token_ids=[1, 5, 9], params=params)
        while engine.has_unfinished():
            for out in engine.step():
                events.append(("out", len(out.outputs[0].token_ids)))
        engine.close()
        return list(events)

    steps = [("run", 0), ("run", 1), ("run", 2), ("run", 3)]
    outs = [("out", 1), ("out", 2), ("out", 3), ("out", 4)]
    assert run(False) == [e for pair in zip(steps, outs, strict=True) for e in pair]
    # async: the output of 1 token comes once the step from 1 token has started, ...
    assert run(True) == [steps[0], steps[1], outs[0], steps[2], outs[1], steps[3], outs[2], outs[3]]


def test_aborts_and_pauses_between_steps_free_every_block(tiny_dir):
    """Requests aborted or paused while a step runs: no output after the abort, every KV
    block free at the end, and the requests left alone finish with all their tokens."""
    rng = random.Random(4)
    engine = Engine(tiny_dir(), EngineConfig(async_output=True))
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
    prompts = random_prompts(60, 3, 50, seed=6)
    aborted, paused, done = set(), set(), {}
    try:
        for n, prompt in enumerate(prompts):
            engine.add_request(str(n), prompt_token_ids=prompt, params=params)
            for out in engine.step():
                assert out.request_id not in aborted
                if out.finished:
                    done[out.request_id] = out
            live = [r for r in engine.requests if r not in paused]
            if live and rng.random() < 0.4:
                victim = rng.choice(live)
                engine.abort(victim)
                aborted.add(victim)
            if live and rng.random() < 0.2:
                victim = rng.choice(live)
                if victim not in aborted:
                    engine.pause(victim)
                    paused.add(victim)
        for request_id in paused - aborted:
            engine.resume(request_id)
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id not in aborted
                if out.finished:
                    done[out.request_id] = out
    finally:
        engine.close()
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    assert set(done) == {str(n) for n in range(len(prompts))} - aborted
    assert all(len(o.outputs[0].token_ids) == 12 for o in done.values())


def test_close_while_a_step_runs(tiny_dir):
    engine = Engine(tiny_dir(), EngineConfig(async_output=True))
    engine.add_request("r", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=50))
    assert engine.step() == [] and engine.has_unfinished()  # the prefill runs
    engine.close()


def test_a_server_with_async_output_streams_what_offline_gives(tiny_dir, tmp_path):
    """`llmkit serve --async-output`: fifty concurrent streams equal offline greedy, and a
    stop string is never streamed."""
    openai = pytest.importorskip("openai")
    model = tiny_dir()
    prompts = random_prompts(50, 4, 60, seed=11)
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    llm = LLM(model)
    expected = [o.outputs[0].text for o in llm.generate(prompts, greedy)]
    whole = llm.generate([TEXT[1]], greedy)[0].outputs[0].text
    llm.close()
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    server = start_server(model, tmp_path, "--async-output")

    async def one(client, prompt, **extra) -> str:
        stream = await client.completions.create(
            model=str(model), prompt=prompt, max_tokens=20, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, **extra,
        )  # fmt: skip
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            texts = await asyncio.gather(*(one(c, p) for p in prompts))
            return texts, await one(c, TEXT[1], stop=[stop])

    try:
        texts, stopped = asyncio.run(main())
    finally:
        assert server.stop() == 0
    assert texts == expected
    assert whole.startswith(stopped) and stop not in stopped and len(stopped) < len(whole)


def test_the_cli_flag_reaches_the_engine(cli, tiny_dir, tmp_path, monkeypatch):
    """`--async-output` / `--no-async-output` (and neither: the device decides) reach the
    engine, and the records are the same either way."""
    import json

    from llmkit.runtime import engine as engine_module

    seen = []
    real = engine_module._async_output

    def record(option, device_type):
        seen.append(option)
        return real(option, device_type)

    monkeypatch.setattr(engine_module, "_async_output", record)
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": TEXT[0], "max_tokens": 6, "temperature": 0, "stop": ["zz"]},
             {"prompt": TEXT[1], "max_tokens": 5, "temperature": 0.8, "seed": 2}]  # fmt: skip
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    outputs = []
    for flags in (["--async-output"], ["--no-async-output"], []):
        out = tmp_path / f"out{len(outputs)}.jsonl"
        result = cli("generate", tiny_dir(), "--prompts", prompts, "-o", out, *flags)
        assert result.code == 0, result.err
        outputs.append(out.read_text())
    assert seen == [True, False, None]
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0].splitlines()) == 2


def test_the_step_thread_runs_on_the_models_device(tiny_dir, monkeypatch):
    """Where the model's work is launched (CUDA; here a CPU model that says it is on GPU
    0), the step thread makes the model's device its current one (devices.bind) before it
    runs a step: Triton and llmkit's CUDA kernels launch on the current device."""
    import threading

    import torch

    from llmkit.runtime import engine as engine_module

    bound = []
    monkeypatch.setattr(
        engine_module, "bind", lambda d: bound.append((threading.current_thread().name, d))
    )
    engine = Engine(tiny_dir(), EngineConfig(async_output=True))
    engine.executor.device = torch.device("cuda", 0)
    engine.add_request("r", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=3))
    while engine.has_unfinished():
        engine.step()
    engine.close()
    assert [(name.startswith("llmkit-step"), d) for name, d in bound] == [
        (True, torch.device("cuda", 0))
    ]


def test_on_the_cpu_async_steps_run_on_the_calling_thread(tiny_dir):
    """On the CPU a step's work is done before the call could go on, so async output runs
    it on the engine's own thread (whose OpenMP workers ran the model so far); its outputs
    still come a call later (test_each_step_starts_before_the_outputs_of_the_one_before)."""
    import threading

    engine = Engine(tiny_dir(), EngineConfig(async_output=True, decode_steps=4))
    real, threads = engine.executor.step, set()

    def step(*args):
        threads.add(threading.current_thread())
        return real(*args)

    engine.executor.step = step
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    engine.add_request("r", prompt_token_ids=[1, 2, 3], params=params)
    while engine.has_unfinished():
        engine.step()
    engine.close()
    assert threads == {threading.current_thread()}

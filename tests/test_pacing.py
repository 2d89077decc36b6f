"""How many greedy decode steps a call runs: the pacer alone, then in the engine."""

from __future__ import annotations

import pytest

from llmkit.errors import LlmkitError
from llmkit.runtime.engine import Engine, EngineConfig
from llmkit.runtime.pacing import DecodePacer
from llmkit.runtime.sequence import SamplingParams
from tests.runtime_helpers import random_prompts


def test_a_call_runs_the_steps_that_fit_in_its_time_at_the_speed_of_its_batch_size():
    pacer = DecodePacer(max_steps=16, call_ms=25)
    assert pacer.steps(1) == 1  # not timed yet: one step, which is timed
    pacer.record(1, 1, 0.002)
    assert pacer.steps(1) == 12  # 25 ms / 2 ms
    assert pacer.steps(2) == pacer.steps(3) == 1  # another size class, not timed yet
    pacer.record(3, 4, 0.040)
    assert pacer.steps(2) == 2  # 10 ms a step
    assert pacer.steps(4) == 1
    pacer.record(1, 12, 0.012)  # 1 ms a step: more would fit than --decode-steps allows
    assert pacer.steps(1) == 16
    pacer.record(1, 16, 0.800)  # a slow call (50 ms a step): the next one runs alone
    assert pacer.steps(1) == 1
    pacer.record(2, 1, 0.0)
    assert pacer.steps(2) == 16


def test_without_a_time_limit_every_call_runs_the_most_steps():
    pacer = DecodePacer(max_steps=5, call_ms=0)
    assert pacer.steps(1) == pacer.steps(64) == 5
    pacer.record(1, 5, 10.0)
    assert pacer.steps(1) == 5


def test_a_plain_token_costs_a_step_of_the_latest_call_as_long_as_the_pacer_gave():
    """What a token of plain decoding costs (for the speculative Backoff): a step of the
    latest call that ran as many steps as the pacer gave, not of one cut short, which
    shares the engine's Python around a call among fewer steps."""
    pacer = DecodePacer(max_steps=16, call_ms=25)
    assert pacer.token_s(1) is None
    pacer.record(1, 1, 0.002)  # not timed yet: the one step given
    assert pacer.token_s(1) == 0.002 and pacer.steps(1) == 12
    pacer.record(1, 12, 0.012)
    assert pacer.token_s(1) == 0.001 and pacer.steps(1) == 16
    pacer.record(1, 3, 0.006)  # cut short (a sequence drafts again after 3)
    assert pacer.token_s(1) == 0.001 and pacer.steps(1) == 12  # its pace still sizes calls
    assert pacer.token_s(2) is None


@pytest.mark.parametrize("call_ms", [-1, 10_001, float("nan")])
def test_a_call_time_out_of_range_is_refused(call_ms):
    with pytest.raises(LlmkitError, match="--decode-call-ms"):
        EngineConfig(decode_call_ms=call_ms)


def test_the_engine_runs_the_steps_its_pacer_gives_and_times_each_call(tiny_dir, monkeypatch):
    """Greedy decodes on the C++ decode step (bf16): the first call of a batch size runs
    one step; the next ones as many as fit in --decode-call-ms at the speed recorded, here
    a clock that says 10 ms a step, within what the sequences still want. A batch that
    samples is not paced, and its calls are not timed."""
    engine = Engine(tiny_dir(), EngineConfig(dtype="bfloat16", decode_steps=8, decode_call_ms=35))
    runner = engine.executor.runner
    real, ran, timed = type(runner).greedy_steps, [], []
    monkeypatch.setattr(
        type(runner),
        "greedy_steps",
        lambda self, i, seqs, launched=None: ran.append(i.steps) or real(self, i, seqs, launched),
    )
    record = engine.pacer.record

    def clock(seqs, steps, seconds):  # every step took 10 ms
        timed.append((seqs, steps))
        record(seqs, steps, 0.010 * steps)

    monkeypatch.setattr(engine.pacer, "record", clock)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = random_prompts(1, 5, 6, seed=3)[0]
    engine.add_request("greedy", prompt_token_ids=prompt, params=greedy)
    while engine.has_unfinished():
        engine.step()
    # the prefill gives token 1; then 1 step (timed), 3, 3, 3 (35 ms / 10 ms), then the 1 left
    assert timed == [(1, 1), (1, 3), (1, 3), (1, 3), (1, 1)]
    assert ran == [3, 3, 3]
    sampled = SamplingParams(max_tokens=4, temperature=1.0, seed=1)
    engine.add_request("sampled", prompt_token_ids=prompt, params=sampled)
    while engine.has_unfinished():
        engine.step()
    assert len(timed) == 5 and ran == [3, 3, 3]
    assert engine.block_manager.num_used_blocks == 0

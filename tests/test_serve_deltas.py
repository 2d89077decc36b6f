"""The engine process sends each step's outputs as deltas; the front end must rebuild exactly
the engine's cumulative outputs from them."""

from __future__ import annotations

import copy
import random

import pytest

from llmkit.runtime.outputs import Completion, RequestOutput, RequestTimes
from llmkit.serve.deltas import DeltaEncoder, apply


def _cumulative(n: int, logprobs: bool, steps: int, seed: int) -> list[RequestOutput]:
    """A request's outputs step by step, as the engine builds them: n completions growing
    a token at a time, the text growing unevenly, and the last step cutting a stop string
    off the first completion's text."""
    rng = random.Random(seed)
    prompt = [rng.randrange(100) for _ in range(7)]
    prompt_lp = [None] + [{"token_id": t, "logprob": -1.0, "top": []} for t in prompt[1:]]
    ids: list[list[int]] = [[] for _ in range(n)]
    texts = ["" for _ in range(n)]
    outs = []
    for step in range(steps):
        last = step == steps - 1
        completions = []
        for i in range(n):
            ids[i].append(rng.randrange(100))
            texts[i] += rng.choice(["", "a", " bc", "déf"])
            if last and i == 0:
                texts[i] = texts[i][: len(texts[i]) // 2]  # a stop string cut off
            lp = [{"token_id": t, "logprob": -0.5, "top": [(t, -0.5)]} for t in ids[i]]
            completions.append(
                Completion(
                    i, texts[i], list(ids[i]), "stop" if last else None, lp if logprobs else None
                )
            )
        times = RequestTimes(1.0, 1.5, 2.0 + step)
        outs.append(RequestOutput("r", prompt, completions, last, times, prompt_lp, 3))
    return outs


@pytest.mark.parametrize("n, logprobs", [(1, False), (2, True)])
def test_deltas_rebuild_every_cumulative_output(n, logprobs):
    encoder, rebuilt = DeltaEncoder(), None
    for step, out in enumerate(_cumulative(n, logprobs, steps=9, seed=n)):
        delta = encoder.encode(out)
        before = copy.deepcopy(rebuilt)
        previous, rebuilt = rebuilt, apply(rebuilt, delta)
        assert rebuilt == out
        assert previous == before  # apply builds a new output, leaving the last one alone
        assert all(len(c.token_ids) == 1 for c in delta.outputs)  # only what is new
        assert (delta.prompt_token_ids is None) == (step > 0)
        assert (delta.prompt_logprobs is None) == (step > 0)


def test_a_forgotten_request_starts_over():
    encoder = DeltaEncoder()
    first, second = _cumulative(1, False, steps=2, seed=0)
    encoder.encode(first)
    encoder.forget("r")
    delta = encoder.encode(second)
    assert delta.prompt_token_ids == second.prompt_token_ids
    assert apply(None, delta) == second

"""benchmarks/speculative.py's rows: a speed-up at concurrency 1 larger than the tokens
accepted from drafts can give is called out, and its target is not met."""

from __future__ import annotations

import pytest

from tests.bench_helpers import benchmark

OUTPUT = 64  # tokens a request


@pytest.fixture
def bench():
    return benchmark("speculative")


def run(tok_s: float, accepted: int) -> dict:
    return {"tok_s": tok_s, "decode_tok_s": tok_s, "proposed": accepted, "accepted": accepted,
            "drafts": max(1, accepted // 4), "forced": 0, "output_tokens": OUTPUT,
            "cutoff": None, "same_tokens": True}  # fmt: skip


def ngram_row(bench, plain: float, speculated: float, accepted: int) -> dict:
    rounds = [{"small-llama plain grounded 1": run(plain, 0),
               "small-llama ngram grounded 1": run(speculated, accepted)}] * 3  # fmt: skip
    return bench._row(rounds, "small-llama", "ngram", "grounded", "1")


@pytest.mark.parametrize("accepted", [8, 32, 48])
def test_a_speed_up_beyond_what_the_drafts_explain_is_not_met(bench, accepted):
    """At most 1 / (1 - share accepted from drafts): each accepted token saves one plain step
    at most. 1.9x with half the output drafted holds; with an eighth it cannot."""
    most = OUTPUT / (OUTPUT - accepted)  # the steps left of plain decoding's
    assert bench.explained(accepted / OUTPUT) == pytest.approx(most)
    line = ngram_row(bench, 100.0, 190.0, accepted)
    beyond = bench.EXPLAINED_SLACK * most < 1.9
    assert ("more than its drafts explain" in line["measured"]) == beyond
    assert line["met"] is (not beyond)
    assert line["target"] == "≥ 1.8×"


def test_a_row_without_drafts_is_not_called_out_within_the_slack(bench):
    line = ngram_row(bench, 100.0, 105.0, 0)  # noise around plain decoding
    assert "explain" not in line["measured"] and line["met"] is False  # below 1.8x


def test_the_ngram_target_is_small_llamas_and_its_widened_copys(bench):
    """The 1B shapes' random weights decide how much of their output repeats, so the ngram
    target is small-llama's and its widened copy's (its output is small-llama's; on CUDA
    that copy's alone); the 1B shapes keep the concurrency-64 target, and the draft target
    where drafts are right."""
    small, llama = bench.SMALL_1B, bench.LLAMA_1B
    assert bench._target(small, "ngram", "grounded", 1, 0.9, 1.9) == ("≥ 1.8×", True)
    assert bench._target(small, "ngram", "free", 1, 0.9, 1.9) == ("", None)
    assert bench._target(llama, "ngram", "grounded", 1, 0.9, 1.9) == ("", None)
    assert bench._target(llama, "ngram", "free", 64, 0.9, 0.9) == ("≥ 0.95×", False)
    assert bench._target(llama, "draft", "grounded", 1, 0.7, 1.4) == ("≥ 1.3×", True)
    assert bench._target("small-llama", "ngram", "grounded", 1, 0.9, 1.7) == ("≥ 1.8×", False)
    # the long passage's row shows where the lookups stand on long contexts: no target
    assert bench._target("small-llama", "ngram", bench.LONG, 1, 0.9, 1.9) == ("", None)

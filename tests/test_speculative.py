"""Speculative decoding: lossless against plain decoding (greedy tokens identical; sampled
tokens keep the model's distribution), and the KV blocks of rejected drafts released."""

from __future__ import annotations

import itertools
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.checkpoint.init import init_checkpoint
from llmkit.errors import LlmkitError
from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.layers import sampler as sampler_module
from llmkit.runtime.layers.sampler import Sampler, apply_masks
from llmkit.runtime.scheduler import Scheduler
from llmkit.runtime.sequence import SamplingParams, Sequence
from llmkit.runtime.speculative import Cutoff, ngram_draft
from tests.runtime_helpers import random_prompts

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
# speculate however many sequences a step decodes, with draft models' drafts of full length
# (a tiny random model is never confident, so the default would end every draft at one token)
ALL = {"speculative_max_seqs": 64, "draft_min_confidence": 0.0}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny-llama (another seed): a draft model that is mostly wrong."""
    return init_checkpoint(tmp_path_factory.mktemp("draft") / "ckpt", "tiny-llama", 1).path


def prompts() -> list[list[int]]:
    """Random prompts whose last tokens repeat earlier ones (so prompt lookup proposes)."""
    return [p + p[:10] for p in random_prompts(6, 3, 50, seed=8)]


def generate(model, prompt_list, params=GREEDY, **config):
    llm = LLM(model, EngineConfig(**{**ALL, **config}))
    try:
        outs = llm.generate(prompt_list, params)
        return [[c.token_ids for c in o.outputs] for o in outs], llm.engine.spec_stats
    finally:
        llm.close()


def test_ngram_draft_continues_the_latest_earlier_match_of_the_longest_suffix():
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert ngram_draft(tokens, 1, 4, 3) == [4, 5, 7]  # "2 3" last seen before "4 5 7"
    assert ngram_draft(tokens, 3, 4, 3) == []  # "7 2 3" never occurred before
    assert ngram_draft([5, 6, 5], 1, 2, 4) == [6, 5, 6, 5]  # past the end: repeats on
    assert ngram_draft([8, 8, 8], 1, 4, 3) == [8, 8, 8]
    assert ngram_draft([1, 2], 1, 4, 0) == []


def test_ngram_drafts_go_on_from_their_prefix():
    """A prefix (tokens a guide forces) begins the draft, and the lookup takes it as part
    of the sequence: what followed "1 2" earlier follows it."""
    from llmkit.runtime.speculative import NgramProposer

    seq = Sequence([1, 2, 3, 4, 1], GREEDY)
    drafts = NgramProposer(1, 3).propose([seq, seq], [4, 4], [[2], []])
    assert drafts[0].tokens == [2, 3, 4, 1] and drafts[1].tokens == [2, 3, 4, 1]
    seq = Sequence([7, 1, 2, 5, 1], GREEDY)
    assert NgramProposer(1, 3).propose([seq], [3], [[2]])[0].tokens == [2, 5, 1]


def _ngram_draft_by_definition(tokens, min_n, max_n, k):
    """ngram_draft's rule, written out window by window."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[-n:]]
        if starts:
            return (tokens[starts[-1] + n :] * k)[:k]
    return []


def test_ngram_draft_agrees_with_its_definition_on_random_sequences():
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(rng.choice([2, 3, 8])) for _ in range(rng.randrange(1, 40))]
        min_n = rng.randrange(1, 4)
        args = (tokens, min_n, rng.randrange(min_n, 6), rng.randrange(0, 6))
        assert ngram_draft(*args) == _ngram_draft_by_definition(*args), args


def test_ngram_proposals_of_growing_sequences_are_the_lookups_in_their_lists():
    """The proposer keeps each sequence's tokens as an array between rounds: as sequences
    grow (by 0-5 tokens between rounds), with prefixes and with releases in between, its
    drafts are ngram_draft's on the sequence's token list."""
    from llmkit.runtime.speculative import NgramProposer

    rng = random.Random(1)
    proposer = NgramProposer(1, 3)
    seqs = [Sequence([rng.randrange(4) for _ in range(rng.randrange(1, 30))], GREEDY)
            for _ in range(4)]  # fmt: skip
    for _ in range(400):
        seq = rng.choice(seqs)
        seq.output_token_ids += [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
        prefix = [rng.randrange(4) for _ in range(rng.randrange(0, 3))]
        k = len(prefix) + rng.randrange(0, 5)
        tokens = seq.prompt_token_ids + seq.output_token_ids + prefix
        expected = prefix + ngram_draft(tokens, 1, 3, k - len(prefix))
        assert proposer.propose([seq], [k], [prefix])[0].tokens == expected
        if rng.random() < 0.05:
            proposer.release(seq.seq_id)
    assert max(len(s.output_token_ids) for s in seqs) > 200  # past several regrowths


def test_a_proposers_rounds_read_only_the_tokens_new_since_the_last(tiny_dir, monkeypatch):
    """Round after round, neither proposer reads a sequence's earlier tokens again: the
    ranges of tokens it reads cover the sequence once (a long context costs no copy of all
    of it a round)."""
    from llmkit.runtime.speculative import DraftProposer, NgramProposer

    read = []
    tokens = Sequence.tokens
    monkeypatch.setattr(
        Sequence, "tokens", lambda s, a, b: read.append((s.seq_id, a, b)) or tokens(s, a, b)
    )
    model = tiny_dir("tiny-llama")
    for spec, kind in (("ngram", NgramProposer), (str(model), DraftProposer)):
        llm = LLM(model, EngineConfig(**ALL, speculative=spec))
        try:
            proposer = llm.engine.proposer
            assert isinstance(proposer, kind)
            seq = Sequence(list(range(5, 305)), GREEDY)
            for step in range(20):
                read.clear()
                proposer.propose([seq], [3], [[]])
                new = 300 if step == 0 else 2
                assert [(a, b) for i, a, b in read if i == seq.seq_id] == [
                    (seq.num_tokens - new, seq.num_tokens)
                ]
                seq.output_token_ids += [7, 8]
        finally:
            llm.close()


@pytest.mark.parametrize("draft", ["ngram", "self", "other", "self-head-dim-8"])
def test_greedy_tokens_are_those_of_plain_decoding(tiny_dir, other_model, draft):
    """ngram (some accepted, some rejected), a draft model that is the model itself (all
    accepted) and one that is another model (almost all rejected); and a model with heads of
    8 values (the CPU attention kernel's narrowest) as its own draft."""
    model = tiny_dir("tiny-llama-head-dim-8" if draft == "self-head-dim-8" else "tiny-llama")
    spec = {"ngram": "ngram", "other": str(other_model)}.get(draft, str(model))
    plain, _ = generate(model, prompts())
    speculated, stats = generate(model, prompts(), speculative=spec)
    assert speculated == plain
    assert stats.drafts > 0 and stats.proposed > 0
    if draft.startswith("self"):
        assert stats.accepted == stats.proposed
    if draft == "ngram":
        assert 0 < stats.accepted < stats.proposed


def test_a_catch_up_as_decode_rows_computes_what_a_prefill_chunk_computes(tiny_dir):
    """A draft model catching up on a few tokens runs them as decodes (one query each, the
    step a CUDA graph replays): the same K/V and logits as the same tokens as a prefill
    chunk, against a float64 runner."""
    from llmkit.runtime.distributed import Group
    from llmkit.runtime.model_runner import ModelRunner, prepare
    from llmkit.runtime.scheduler import Batch

    prompt, new = list(range(3, 40)), [7, 11, 5]
    cpu = torch.device("cpu")

    def logits(dtype: torch.dtype, decode_upto: int):
        runner = ModelRunner(str(tiny_dir("tiny-llama")), Group(0, 1), dtype, cpu, 16, 16)
        blocks, seq = BlockManager(16, 16), Sequence(list(prompt))
        out = []
        for tokens in (prompt, new):
            seq.prompt_token_ids = prompt + new[: len(tokens)] if tokens is new else prompt
            blocks.allocate(seq, len(tokens))
            batch = Batch()
            batch.add(seq, len(tokens))
            inputs, _, _ = prepare(batch, 16, decode_upto)
            assert inputs.meta.num_decodes == (len(tokens) if len(tokens) <= decode_upto else 0)
            inputs.logits_indices = torch.arange(len(tokens))  # every token's
            out.append(runner.execute(inputs).double())
            seq.num_computed_tokens += len(tokens)
        return torch.cat(out)

    reference = logits(torch.float64, 1)
    for upto in (1, 3):
        torch.testing.assert_close(logits(torch.float32, upto), reference, atol=1e-4, rtol=1e-4)


def test_a_draft_model_with_a_shorter_context_drafts_only_within_it(tiny_dir, tmp_path):
    """A draft model of 48 positions beside a model of 512: prompts that outgrow it while
    decoding, and one longer than it from the start, decode as plainly, drafted for while
    they fit (none of the draft model's positions past its context)."""
    import json
    import shutil

    model = tiny_dir("tiny-llama")
    short = Path(shutil.copytree(model, tmp_path / "short"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    prompt_list = [list(range(3, 33)), list(range(5, 45)), list(range(3, 70))]
    plain, _ = generate(model, prompt_list)
    speculated, stats = generate(model, prompt_list, speculative=str(short))
    assert speculated == plain and stats.drafts > 0


def _padded(model: Path, out: Path, rows: int) -> Path:
    """`model` with `rows` more vocabulary rows (zeros) in its embeddings and head, as
    model families pad theirs to different multiples; its tokenizer as it is."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = Path(shutil.copytree(model, out))
    (out / "llmkit-checksums.json").unlink(missing_ok=True)
    tensors = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = tensors[name]
        tensors[name] = torch.cat([w, w.new_zeros(rows, w.shape[1])])
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] += rows
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_draft_with_the_models_tokenizer_may_pad_its_vocabulary_otherwise(tiny_dir, tmp_path):
    """The model as its own draft with 64 padding rows more: its logits are cut to the
    model's, so every draft token is accepted, greedy and under a guide (whose masks have
    the model's width); the padded model beside the unpadded draft (its logits padded at
    -inf) gives plain decoding's tokens too. Sampled drafts are drawn over the model's
    tokens (the rejection test takes their distributions at its width), and a seeded
    request reproduces."""
    import json

    from llmkit.runtime.guide import Guide
    from tests.test_structured_outputs import PERSON

    model = tiny_dir("tiny-llama")
    wide = _padded(model, tmp_path / "wide", 64)
    plain, _ = generate(model, prompts())
    out, stats = generate(model, prompts(), speculative=str(wide))
    assert out == plain and stats.accepted == stats.proposed > stats.drafts
    guided = SamplingParams(max_tokens=60, temperature=0, guide=Guide("json", json.dumps(PERSON)))
    plain, _ = generate(model, prompts()[:2], guided)
    out, stats = generate(model, prompts()[:2], guided, speculative=str(wide))
    assert out == plain and stats.accepted == stats.proposed > 0
    plain, _ = generate(wide, prompts())
    out, stats = generate(wide, prompts(), speculative=str(model))
    assert out == plain and stats.accepted > 0
    sampled = SamplingParams(max_tokens=30, temperature=0.8, seed=5, ignore_eos=True)
    out, stats = generate(model, prompts(), sampled, speculative=str(wide))
    again, _ = generate(model, prompts(), sampled, speculative=str(wide))
    assert out == again and stats.accepted > 0


def test_a_draft_whose_token_ids_may_mean_other_tokens_is_one_error(tiny_dir, tmp_path):
    """A tokenizer with two tokens' ids swapped; a draft of another vocabulary size with no
    tokenizer to show it shares the model's: each refused with one line."""
    import json
    import shutil

    model = tiny_dir("tiny-llama")
    swapped = Path(shutil.copytree(model, tmp_path / "swapped"))
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(LlmkitError, match=r"its tokenizer is not the model's \(2 tokens"):
        LLM(model, EngineConfig(speculative=str(swapped)))
    bare = _padded(model, tmp_path / "bare", 64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    with pytest.raises(LlmkitError, match="its vocabulary has 576 tokens, the model's 512"):
        LLM(model, EngineConfig(speculative=str(bare)))


def test_a_draft_model_whose_weights_differ_from_their_checksums_is_refused(tiny_dir, tmp_path):
    """One byte of the draft model's weights changed: one error naming the file, before
    anything loads; --no-verify loads it anyway (drafts are verified, so tokens hold)."""
    import shutil

    model = tiny_dir("tiny-llama")
    draft = Path(shutil.copytree(model, tmp_path / "draft"))
    weights = draft / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(LlmkitError, match=r"draft/model\.safetensors does not match its recorded"):
        LLM(model, EngineConfig(speculative=str(draft)))
    plain, _ = generate(model, prompts())
    out, stats = generate(model, prompts(), speculative=str(draft), verify=False)
    assert out == plain and stats.drafts > 0


def test_a_failing_draft_model_costs_its_drafts_not_the_requests(tiny_dir, monkeypatch, caplog):
    """A draft model whose every other round raises: the requests decode as plainly, with
    the drafts of the rounds that ran, and each failure is one warning."""
    from llmkit.runtime.speculative import DraftProposer

    model = tiny_dir("tiny-llama")
    real, calls = DraftProposer.propose, []

    def flaky(self, seqs, sizes, prefixes):
        calls.append(len(seqs))
        if len(calls) % 2:
            raise RuntimeError("CUDA out of memory")
        return real(self, seqs, sizes, prefixes)

    monkeypatch.setattr(DraftProposer, "propose", flaky)
    plain, _ = generate(model, prompts())
    with caplog.at_level("WARNING", logger="llmkit.engine"):
        speculated, stats = generate(model, prompts(), speculative=str(model))
    assert speculated == plain and stats.accepted > 0
    failures = [r for r in caplog.records if "proposer failed (CUDA out of memory)" in r.message]
    assert len(failures) == (len(calls) + 1) // 2


def test_the_gpu_budget_holds_the_draft_models_weights_and_kv_blocks(tiny_dir, monkeypatch):
    """On a GPU the KV blocks are what is left after the model's weights and the draft
    model's, each block beside one of the draft model's (the model as its own draft here:
    twice the weights, twice the bytes a block)."""
    from dataclasses import replace

    from llmkit.checkpoint.rank_tensors import open_rank
    from llmkit.runtime import engine as engine_module
    from llmkit.runtime.executor import DTYPES

    model = tiny_dir("tiny-llama")
    monkeypatch.setattr(engine_module, "cuda_memory", lambda device: (10**8, 2 * 10**8))
    llm = LLM(model, EngineConfig(speculative=str(model)))
    src = open_rank(str(model))
    try:
        engine, cuda = llm.engine, torch.device("cuda")
        per_block, itemsize = engine.kv_block_bytes, DTYPES[engine.executor.spec.dtype].itemsize
        weights = engine_module._weight_bytes(src)
        drafted = engine._cuda_num_blocks(cuda, src, per_block, itemsize)
        engine.config, engine.draft_dir = replace(engine.config, speculative="ngram"), None
        plain = engine._cuda_num_blocks(cuda, src, per_block, itemsize)
    finally:
        src.close()
        llm.close()
    left = 10**8 - 2 * 10**8 * 0.1  # --gpu-memory-utilization 0.9 of 2e8 bytes, 1e8 free
    assert plain == int(left - weights) // per_block
    assert drafted == int(left - 2 * weights) // (2 * per_block) < plain


def test_a_proposer_failing_round_after_round_turns_speculation_off(tiny_dir, monkeypatch, caplog):
    """Three failing rounds in a row: two warnings, then one error and no more rounds; the
    requests decode as plainly."""
    from llmkit.runtime.speculative import NgramProposer

    calls = []

    def broken(self, seqs, sizes, prefixes):
        calls.append(len(seqs))
        raise RuntimeError("broken")

    monkeypatch.setattr(NgramProposer, "propose", broken)
    model = tiny_dir("tiny-llama")
    plain, _ = generate(model, prompts())
    with caplog.at_level("WARNING", logger="llmkit.engine"):
        speculated, stats = generate(model, prompts(), speculative="ngram")
    assert speculated == plain and stats.drafts == 0 and len(calls) == 3
    levels = [r.levelname for r in caplog.records if "proposer failed" in r.message]
    assert levels == ["WARNING", "WARNING", "ERROR"]


def test_backoff_sits_out_twice_as_long_after_each_draft_with_nothing_accepted():
    """Counted in tokens: 1, 3, 7, 15, then 16 plain tokens after 1, 2, 3, 4, 5+ drafts in
    a row with nothing accepted; a draft with a token accepted starts over. Lookups that
    find nothing never sit out: they cap a call's steps at 2, 4, 8, 16, then 17."""
    from types import SimpleNamespace

    from llmkit.runtime.backoff import Backoff

    backoff, seq = Backoff(), SimpleNamespace(seq_id=3, num_tokens=10)

    def rejected() -> int:
        assert backoff.sits_out(seq) == 0
        backoff.record([seq], [[7, 8]], [0])
        seq.num_tokens += 1  # the round's own token
        wait = backoff.sits_out(seq)
        assert backoff.call_limit(seq) == wait
        seq.num_tokens += wait
        return wait

    assert [rejected() for _ in range(6)] == [1, 3, 7, 15, 16, 16]
    backoff.record([seq], [[]], [0])  # no draft verified: no round
    backoff.record([seq], [[7, 8]], [1])
    assert backoff.call_limit(seq) is None and rejected() == 1
    limits = []
    for _ in range(6):
        backoff.found_nothing(seq)
        limits.append(backoff.call_limit(seq))
        assert backoff.sits_out(seq) == 0
    assert limits == [2, 4, 8, 16, 17, 17]
    backoff.record([seq], [[7]], [1])
    assert backoff.call_limit(seq) is None
    backoff.found_nothing(seq)
    backoff.release(seq)
    assert backoff.call_limit(seq) is None and rejected() == 1


def test_backoff_fails_a_round_whose_tokens_cost_more_than_plain_decodings():
    """A round that cost c steps of plain decoding (a sequence whose plain decoding runs
    several steps a call) fails unless it added at least c tokens (its own and those
    accepted), and the sequence then sits out c - 1 (rounded, from 1 to 16: the steps a
    failed round wastes) times as long: 1, 3, 7, ... times that. With no cost (None) a
    round costs a step."""
    from types import SimpleNamespace

    from llmkit.runtime.backoff import Backoff

    backoff, seq = Backoff(), SimpleNamespace(seq_id=3, num_tokens=10)
    backoff.start(seq, True)  # its plain decoding runs several steps a call
    backoff.record([seq], [[7, 8, 9]], [2], 3.0)  # 3 tokens for 3 steps' time: paid
    assert backoff.sits_out(seq) == 0
    backoff.record([seq], [[7, 8, 9]], [1], 3.4)  # 2 tokens for 3.4 steps' time
    seq.num_tokens += 2
    assert backoff.sits_out(seq) == 2
    seq.num_tokens += 2
    backoff.record([seq], [[7]], [0], 40.0)  # nothing accepted, at a cost past 16
    seq.num_tokens += 1
    assert backoff.sits_out(seq) == 3 * 16
    seq.num_tokens += 3 * 16
    backoff.record([seq], [[7]], [1], None)  # a token accepted, a step's cost: paid
    backoff.record([seq], [[7]], [0], 0.5)  # cheaper than a step: as a step
    seq.num_tokens += 1
    assert backoff.sits_out(seq) == 1


def test_new_sequences_carry_on_their_kinds_failed_rounds_until_one_pays():
    """After m rounds in a row that failed every sequence of a kind, a new sequence of that
    kind sits out what is left of the wait one sequence would after m failures (less what
    sequences that sat it out before decoded where the load allowed drafts; up to 64
    times a round's waste, not 16), then fails on as from m; the other kind starts
    afresh; a round that pays ends the streak for those that have not drafted since."""
    from types import SimpleNamespace

    from llmkit.runtime.backoff import Backoff

    backoff, ids = Backoff(), iter(range(100))

    def new(kind: bool, length: int = 20) -> SimpleNamespace:
        seq = SimpleNamespace(seq_id=next(ids), num_tokens=length)
        backoff.start(seq, kind)
        return seq

    def fail(seq, cost=5.0) -> int:  # a round of `seq` alone that accepts nothing
        backoff.record([seq], [[7]], [0], cost)
        seq.num_tokens += 1
        return backoff.sits_out(seq)

    first = new(True)
    assert [fail(first) for _ in range(3)] == [4, 12, 28]  # cost 5: 4 plain steps wasted
    second, other = new(True), new(False)
    assert backoff.sits_out(second) == 28 and backoff.sits_out(other) == 0
    crowded = new(True)
    backoff.crowded([crowded, other])  # a step in which the load allowed no drafts
    crowded.num_tokens += 20
    backoff.release(crowded)  # what it decoded so says nothing about drafting
    second.num_tokens += 10
    backoff.release(second)  # it decoded 10 of the 28
    third = new(True)
    assert backoff.sits_out(third) == 18
    third.num_tokens += 18
    assert fail(third) == 15 * 4  # its fourth failure in a row
    fourth = new(True)
    assert backoff.sits_out(fourth) == 60
    fourth.num_tokens += 60
    backoff.release(fourth)  # it sat out all of it
    fifth, sixth = new(True), new(True)  # they draft at once, with four failures behind them
    assert backoff.sits_out(fifth) == backoff.sits_out(sixth) == 0
    assert fail(fifth) == 16 * 4  # its own wait: at most 16 times a round's waste
    seventh = new(True)
    assert backoff.sits_out(seventh) == 31 * 4  # the streak's: up to 64 times
    backoff.record([first, seventh], [[7, 8], []], [2, 0], 2.0)  # first's round pays
    assert backoff.sits_out(fifth) == 64  # its own failures stand
    assert backoff.sits_out(seventh) == 0 and backoff.sits_out(new(True)) == 0
    assert fail(sixth) == 4 and fail(seventh) == 4  # their streak over, a first failure
    assert fail(other, None) == 1 and backoff.sits_out(new(False)) == 1  # its kind's own


def test_rounds_costlier_than_plain_calls_sit_out_longer_where_plain_decoding_runs_ahead(
    tiny_dir, monkeypatch
):
    """Where a plain step costs next to nothing (DecodePacer.token_s patched), every round
    of a greedy request fails and its sequences sit out for longer: fewer drafts, plain
    decoding's tokens. A seeded sampled request decodes one step a call, so a round costs
    it as much as a step would: it drafts as often as before, and reproduces."""
    from llmkit.runtime.pacing import DecodePacer

    model = tiny_dir("tiny-llama")
    greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=60, temperature=0.8, seed=5, ignore_eos=True)
    plain, _ = generate(model, prompts(), greedy)
    runs = [generate(model, prompts(), p, speculative="ngram") for p in (greedy, sampled)]
    monkeypatch.setattr(DecodePacer, "token_s", lambda self, seqs: 1e-9)
    cheap = [generate(model, prompts(), p, speculative="ngram") for p in (greedy, sampled)]
    assert runs[0][0] == cheap[0][0] == plain
    assert 0 < cheap[0][1].drafts < runs[0][1].drafts
    assert cheap[1][0] == runs[1][0] and cheap[1][1].drafts == runs[1][1].drafts > 0


def test_requests_after_failed_rounds_carry_on_the_engines_wait(tiny_dir, monkeypatch):
    """One greedy request at a time where a plain step costs next to nothing (every round
    fails): the first fails its way into long waits, and those after it sit out what is
    left of them instead of failing their first rounds afresh. Plain decoding's tokens,
    also for all of them at once, more than --speculative-max-seqs."""
    from llmkit.runtime.pacing import DecodePacer

    monkeypatch.setattr(DecodePacer, "token_s", lambda self, seqs: 1e-9)
    model = tiny_dir("tiny-llama")
    greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    plain, _ = generate(model, prompts(), greedy)
    llm = LLM(model, EngineConfig(**{**ALL, "speculative": "ngram", "speculative_max_seqs": 2}))
    drafts, outs = [], []
    try:
        for prompt in prompts():
            before = llm.engine.spec_stats.drafts
            outs += [[c.token_ids for c in o.outputs] for o in llm.generate([prompt], greedy)]
            drafts.append(llm.engine.spec_stats.drafts - before)
        crowded = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts(), greedy)]
        assert crowded == plain
        backoff = llm.engine.backoff  # finished sequences leave nothing behind
        leftovers = (backoff.misses, backoff.resume, backoff.kind, backoff.inherited,
                     backoff.uncounted)  # fmt: skip
        assert not any(leftovers)
    finally:
        llm.close()
    assert outs == plain
    assert drafts[0] >= 2 and max(drafts[1:]) < drafts[0] and drafts.count(0) >= 2


def test_a_sequence_whose_lookups_find_nothing_runs_ahead_in_longer_and_longer_calls(
    tiny_dir, monkeypatch
):
    """Lookups that keep finding nothing, in bf16 (the C++ decode step runs several steps a
    call): the sequence looks up at each call, and the calls run 2, 4, 8, 16, then 17 steps;
    the tokens are plain decoding's."""
    from llmkit.runtime.speculative import Draft, NgramProposer

    model, asked = tiny_dir("tiny-llama"), []

    def nothing(self, seqs, sizes, prefixes):
        asked.append(seqs[0].num_tokens)
        return [Draft() for _ in seqs]

    monkeypatch.setattr(NgramProposer, "propose", nothing)
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    config = {"dtype": "bfloat16", "decode_steps": 32, "decode_call_ms": 0}
    plain, _ = generate(model, [list(range(3, 23))], params, **config)
    speculated, stats = generate(model, [list(range(3, 23))], params, **config,
                                 speculative="ngram")  # fmt: skip
    assert speculated == plain and stats.drafts == 0
    assert [b - a for a, b in itertools.pairwise(asked)] == [2, 4, 8, 16, 17, 17]


def test_a_speculative_path_that_is_no_model_is_one_error(tiny_dir, tmp_path):
    with pytest.raises(LlmkitError, match=r"no checkpoint directory at .*give 'ngram' or a"):
        LLM(tiny_dir("tiny-llama"), EngineConfig(speculative=str(tmp_path / "missing")))
    with pytest.raises(LlmkitError, match=r"no config\.json there"):
        LLM(tiny_dir("tiny-llama"), EngineConfig(speculative=str(tmp_path)))


def test_a_draft_model_may_be_a_hub_id(tiny_dir, other_model, tmp_path):
    """`--speculative org/name` takes the hub's snapshot (here from a local cache, the hub
    offline): the model as its own draft (its main branch) gives plain decoding's tokens,
    every draft token accepted; `--speculative-revision v2` takes that branch's snapshot,
    another model, whose drafts are mostly rejected. An id neither reachable nor cached is
    one error naming it."""
    import shutil

    from tests.conftest import run_python

    model = tiny_dir("tiny-llama")
    repo = tmp_path / "cache" / "models--some-org--draft"
    (repo / "refs").mkdir(parents=True)
    for branch, snapshot, source in (("main", "0" * 40, model), ("v2", "1" * 40, other_model)):
        shutil.copytree(source, repo / "snapshots" / snapshot)
        (repo / "refs" / branch).write_text(snapshot)
    code = f"""
from llmkit.errors import LlmkitError
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.sequence import SamplingParams
params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
prompt = list(range(3, 40))
outs, stats = [], []
for spec, revision in ((None, None), ("some-org/draft", None), ("some-org/draft", "v2")):
    config = EngineConfig(speculative=spec, speculative_revision=revision,
                          draft_min_confidence=0)
    llm = LLM({str(model)!r}, config)
    outs.append(llm.generate([prompt], params)[0].outputs[0].token_ids)
    stats.append(llm.engine.spec_stats)
    llm.close()
assert outs[0] == outs[1] == outs[2], outs
assert stats[1].accepted == stats[1].proposed > 0, stats[1]
assert stats[2].accepted < stats[2].proposed, stats[2]
try:
    LLM({str(model)!r}, EngineConfig(speculative="some-org/absent"))
except LlmkitError as e:
    print(e)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    done = run_python(code, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("--speculative: cannot get 'some-org/absent' from the Hugging Face")


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_a_speculative_revision_without_a_draft_model_is_refused(speculative):
    with pytest.raises(LlmkitError, match="--speculative-revision names a draft model's"):
        EngineConfig(speculative=speculative, speculative_revision="v2")


def test_a_draft_ends_where_its_chance_of_being_accepted_falls_below_the_threshold(
    tiny_dir, other_model
):
    """A draft model that is mostly wrong: with the threshold at 0.4 each draft ends after
    its first token (a tiny random model is never confident, and its record of rejections
    scales that down further); at 0 every draft runs to full length. The model as its own
    draft: its record (every token accepted) scales its probabilities up, so some drafts
    go past their first token, where the probabilities alone would end each there. The
    tokens are plain decoding's."""
    model = tiny_dir("tiny-llama")
    plain, _ = generate(model, prompts())
    for threshold in (0.4, 0.0):
        out, stats = generate(model, prompts(), speculative=str(other_model),
                              draft_min_confidence=threshold)  # fmt: skip
        assert out == plain and stats.drafts > 0
        assert stats.proposed == (stats.drafts if threshold else 4 * stats.drafts)
    out, stats = generate(model, prompts(), speculative=str(model), draft_min_confidence=0.4)
    assert out == plain and stats.accepted == stats.proposed > stats.drafts
    with pytest.raises(LlmkitError, match="draft-min-confidence"):
        EngineConfig(draft_min_confidence=1.5)


def test_the_measured_cutoff_is_the_draft_models_step_time_over_the_models():
    """Cutoff: PRIOR until both are timed; then the median of the draft model's last WINDOW
    step times over that of the model's (a step now and then many times slower moves
    neither), at most 1; a fixed cutoff stays as it is."""
    cutoff = Cutoff(None)
    assert cutoff.value() == Cutoff.PRIOR
    cutoff.drafted(0.002)
    assert cutoff.value() == Cutoff.PRIOR  # the model's steps not timed yet
    for seconds in (0.010, 0.008, 0.5):
        cutoff.verified(seconds)
    for seconds in (0.002, 0.003, 0.9, 0.001):
        cutoff.drafted(seconds)
    assert cutoff.value() == pytest.approx(0.002 / 0.010)
    for _ in range(Cutoff.WINDOW):  # the old times leave the window
        cutoff.drafted(0.05)
    assert cutoff.value() == 1.0
    fixed = Cutoff(0.3)
    fixed.drafted(1.0), fixed.verified(0.001)
    assert fixed.value() == 0.3


def test_the_engine_times_the_steps_its_cutoff_is_measured_from(tiny_dir):
    """By default the cutoff is measured: one prompt at a time, the model's steps that
    verified drafts are timed (one per draft: not the prompt's step), and each step of the
    draft model (one per drafted token) but the first, which catches up on the prompt. The
    tokens are plain decoding's."""
    model = tiny_dir("tiny-llama")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain, _ = generate(model, prompts()[:1], params)
    config = EngineConfig(speculative=str(model), draft_min_confidence=None)
    llm = LLM(model, config)
    try:
        out = llm.generate(prompts()[:1], params)
        cutoff, stats = llm.engine.proposer.cutoff, llm.engine.spec_stats
    finally:
        llm.close()
    assert [[c.token_ids for c in o.outputs] for o in out] == plain
    assert len(cutoff.model_steps) == stats.drafts > 0
    assert len(cutoff.draft_steps) == stats.proposed - 1
    assert 0 < cutoff.value() <= 1 and cutoff.value() != Cutoff.PRIOR


def test_spec_stats_count_drafts_by_position_against_a_direct_count():
    """Random drafts and accepted counts: per position, the drafts with a token there and
    those accepted through it, as counted draft by draft; `since` subtracts a copy taken
    earlier, which later counts leave as it was."""
    from dataclasses import replace

    from llmkit.runtime.outputs import SpecStats

    rng = random.Random(3)
    rounds = [[(rng.randrange(7), rng.random()) for _ in range(5)] for _ in range(40)]
    stats, before = SpecStats(), None
    for r, drafts in enumerate(rounds):
        lengths = [n for n, _ in drafts]
        stats.record([[0] * n for n in lengths], [int(n * u) for n, u in drafts])
        if r == 9:
            before = replace(stats)
    snapshot = replace(before)
    for first, stats_now in ((0, stats), (10, stats.since(before))):
        pairs = [(n, int(n * u)) for drafts in rounds[first:] for n, u in drafts if n]
        most = len(stats_now.proposed_at)  # since(): positions only earlier drafts reached: 0
        assert most >= max(n for n, _ in pairs)
        assert stats_now.proposed_at == tuple(sum(n > i for n, _ in pairs) for i in range(most))
        accepted = [sum(a > i for _, a in pairs) for i in range(most)]
        assert stats_now.acceptance_by_position == pytest.approx(
            [a / p for a, p in zip(accepted, stats_now.proposed_at, strict=True) if p]
        )
        assert sum(stats_now.accepted_at) == stats_now.accepted == sum(a for _, a in pairs)
    assert before == snapshot


def test_the_calibration_weighs_each_verified_draft_token_by_its_age():
    """Accepted draft tokens over the sum of their probabilities, each draft's tokens up to
    its first rejected one, every token DECAY times less than the next, after PRIOR tokens
    accepted as often as their probabilities said: against a float64 sum. Tokens a guide
    forced (None) are not counted."""
    from llmkit.runtime.speculative import Calibration

    rng = random.Random(4)
    calibration, verified = Calibration(), []
    for _ in range(30):
        probs = [rng.choice([rng.random(), None]) for _ in range(rng.randint(1, 4))]
        accepted = rng.randint(0, len(probs))
        calibration.observe(probs, accepted)
        seen = enumerate(probs[: accepted + 1])
        verified += [(p, i < accepted) for i, p in seen if p is not None]
    n, decay, prior = len(verified), Calibration.DECAY, Calibration.PRIOR
    weights = [decay ** (n - 1 - i) for i in range(n)]
    taken = prior * decay**n + sum(w * ok for w, (_, ok) in zip(weights, verified, strict=True))
    said = prior * decay**n + sum(w * p for w, (p, _) in zip(weights, verified, strict=True))
    assert calibration.scaled(0.5) == pytest.approx(0.5 * taken / said, rel=1e-12)
    assert Calibration().scaled(0.3) == pytest.approx(0.3)  # no record: as they are


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_speculation_with_prefix_caching_preemption_logprobs_and_stop(tiny_dir, draft):
    """A KV cache small enough that sequences are preempted, shared prefixes, n = 2,
    log probabilities: the same tokens and the same log probabilities, with ngram and with
    a draft model (the model itself: its KV cache as small)."""
    model = tiny_dir("tiny-llama")
    shared = random_prompts(1, 40, 41, seed=3)[0]
    prompt_list = [shared + p for p in prompts()]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2, n=2)
    config = dict(kv_cache_memory=24 * 2048, block_size=4)  # 24 blocks of 4 tokens
    llm_plain = LLM(model, EngineConfig(**config))
    speculative = "ngram" if draft == "ngram" else str(model)
    llm_spec = LLM(model, EngineConfig(**config, **ALL, speculative=speculative))
    try:
        plain = llm_plain.generate(prompt_list, params)
        spec = llm_spec.generate(prompt_list, params)
        assert llm_spec.engine.scheduler.num_preemptions > 0
        assert llm_spec.engine.block_manager.num_hit_blocks > 0
        assert llm_spec.engine.spec_stats.accepted > 0
        assert llm_spec.engine.block_manager.num_used_blocks == 0
        if draft != "ngram":  # every mirror released with its sequence
            assert llm_spec.engine.proposer.blocks.num_used_blocks == 0
            assert not llm_spec.engine.proposer.mirrors
    finally:
        llm_plain.close()
        llm_spec.close()
    for a, b in zip(plain, spec, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            for la, lb in zip(x.logprobs, y.logprobs, strict=True):
                assert la["token_id"] == lb["token_id"]
                assert la["logprob"] == pytest.approx(lb["logprob"], abs=1e-4)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculation_beside_chunked_prefills(tiny_dir, proposer, caplog):
    """Prompts longer than a step's token budget, arriving while others decode: drafts the
    step has no room for, and steps that verify drafts and compute a prompt's chunk at
    once, give plain decoding's tokens, and the proposer never fails."""
    model = tiny_dir("tiny-llama")
    spec = "ngram" if proposer == "ngram" else str(model)
    config = {"max_num_batched_tokens": 32}
    arrivals = [p + p for p in random_prompts(4, 20, 30, seed=11)]  # 40-60 tokens each
    plain, _ = _staggered(model, arrivals, config)
    mixed = []
    with caplog.at_level("WARNING", logger="llmkit.engine"):
        speculated, engine = _staggered(model, arrivals, {**config, **ALL, "speculative": spec},
                                        mixed)  # fmt: skip
    assert speculated == plain
    assert engine.spec_stats.accepted > 0 and any(mixed)
    assert engine.block_manager.num_used_blocks == 0
    assert not [r.message for r in caplog.records if "proposer failed" in r.message]


def _staggered(model, arrivals, config, mixed=None):
    """Each prompt of `arrivals` added two steps after the one before; the greedy tokens of
    each request, and the engine. `mixed` gets, per step, whether it verified a draft and
    computed part of a prompt together."""
    engine = LLM(model, EngineConfig(**config)).engine
    real, done = engine.executor.step, {}

    def step(batch, masks, launched=None):
        if mixed is not None:
            chunks = [
                n > 1 and not d for n, d in zip(batch.num_new_tokens, batch.drafts, strict=True)
            ]
            mixed.append(any(batch.drafts) and any(chunks))
        return real(batch, masks, launched)

    engine.executor.step = step
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    try:
        for n in range(1000):
            if n % 2 == 0 and n // 2 < len(arrivals):
                engine.add_request(str(n // 2), prompt_token_ids=arrivals[n // 2], params=params)
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            if len(done) == len(arrivals):
                return [done[str(i)] for i in range(len(arrivals))], engine
        raise AssertionError(f"{len(done)} of {len(arrivals)} requests done in 1000 steps")
    finally:
        engine.close()


def test_a_draft_model_catches_up_on_long_prompts_within_the_step_budget(tiny_dir):
    """Prompts longer than --max-num-batched-tokens, several at once: no call of the draft
    model computes more tokens than that (before, a round caught up on every new prompt at
    once), and the tokens are plain decoding's, the model its own draft (all accepted)."""
    model = tiny_dir("tiny-llama")
    budget = 64
    prompt_list = [p + p[:10] for p in random_prompts(4, 150, 200, seed=3)]
    config = {"max_num_batched_tokens": budget}
    plain, _ = generate(model, prompt_list, **config)
    llm = LLM(model, EngineConfig(**ALL, **config, speculative=str(model)))
    runner, calls = llm.engine.proposer.runner, []
    execute = runner.execute

    def counted(inputs):
        calls.append(len(inputs.input_ids))
        return execute(inputs)

    runner.execute = counted
    try:
        outs = llm.generate(prompt_list, GREEDY)
        stats = llm.engine.spec_stats
    finally:
        llm.close()
    assert [[c.token_ids for c in o.outputs] for o in outs] == plain
    assert sum(calls) >= sum(map(len, prompt_list))  # it followed every prompt
    assert max(calls) <= budget, calls
    assert stats.accepted == stats.proposed > 0


def test_the_draft_model_holds_blocks_only_for_running_sequences(tiny_dir):
    """Preempted and paused sequences give their draft blocks back with their own; resumed,
    they are followed again from their prompt and end with plain decoding's tokens."""
    model = tiny_dir("tiny-llama")
    prompt_list = prompts()
    config = {"kv_cache_memory": 24 * 2048, "block_size": 4}  # 24 blocks: preemptions
    plain, _ = generate(model, prompt_list, **config)
    engine = LLM(model, EngineConfig(**config, **ALL, speculative=str(model))).engine
    proposer, done = engine.proposer, {}
    try:
        for i, prompt in enumerate(prompt_list):
            engine.add_request(str(i), prompt_token_ids=prompt, params=GREEDY)
        for n in range(1000):
            if n == 6:
                engine.pause("0")
                assert engine.scheduler.paused  # still running then: paused now
            if n == 12:
                engine.resume("0")
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = [c.token_ids for c in out.outputs]
            running = {s.seq_id for s in engine.scheduler.running}
            assert set(proposer.mirrors) <= running
            if not engine.has_unfinished() and n > 12:
                break
        assert engine.scheduler.num_preemptions > 0 and engine.spec_stats.accepted > 0
        assert [done[str(i)] for i in range(len(prompt_list))] == plain
        assert proposer.blocks.num_used_blocks == 0
    finally:
        engine.close()


def test_aborted_requests_leave_the_draft_model_no_blocks(tiny_dir):
    """Requests aborted while their drafts are in flight release the draft model's copy
    of them as they release their own blocks."""
    model = tiny_dir("tiny-llama")
    llm = LLM(model, EngineConfig(**ALL, speculative=str(model)))
    engine = llm.engine
    try:
        for i, prompt in enumerate(prompts()):
            engine.add_request(str(i), prompt_token_ids=prompt, params=GREEDY)
        for _ in range(4):
            engine.step()
        assert engine.proposer.mirrors and engine.spec_stats.drafts > 0
        for i in range(0, len(prompts()), 2):
            engine.abort(str(i))
        while engine.has_unfinished():
            engine.step()
        assert engine.block_manager.num_used_blocks == 0
        assert engine.proposer.blocks.num_used_blocks == 0 and not engine.proposer.mirrors
    finally:
        llm.close()


def test_speculation_stops_at_max_tokens_and_per_request_off(tiny_dir):
    model = tiny_dir("tiny-llama")
    for max_tokens in (1, 2, 5):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        plain, _ = generate(model, prompts(), params)
        spec, _ = generate(model, prompts(), params, speculative="ngram")
        assert spec == plain
        assert all(len(c) == max_tokens for o in spec for c in o)
    off = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative=False)
    _, stats = generate(model, prompts(), off, speculative="ngram")
    assert stats.drafts == 0
    # six sequences decoding in step, one more than --speculative-max-seqs: none speculates
    _, stats = generate(model, prompts(), speculative="ngram", speculative_max_seqs=5)
    assert stats.drafts == 0


def test_no_speculation_while_more_sequences_wait_than_the_limit(tiny_dir):
    """Six requests, two running at a time, limit 2: the first two pairs decode two
    sequences a step but others wait, so only the last pair speculates, as alone."""
    model = tiny_dir("tiny-llama")
    # one decode step a call: calls running several (--decode-steps) would end where the
    # batches differ, and drafts start only there
    limits = {"speculative": "ngram", "speculative_max_seqs": 2, "decode_steps": 1}
    _, queued = generate(model, prompts(), max_num_seqs=2, **limits)
    _, alone = generate(model, prompts()[4:], **limits)
    assert queued.drafts == alone.drafts > 0


def test_a_seeded_sampled_request_gives_plain_decodings_tokens_however_it_speculates(
    tiny_dir, other_model
):
    """Its token at a position depends on its seed, the position and the distribution
    alone: plain decoding's tokens with ngram, with another model as its draft, and with
    the model as its own, whose seeded drafts, drawn with the same uniforms, are all
    accepted; and so with enough requests that speculation is off but at the end."""
    params = SamplingParams(max_tokens=24, temperature=0.8, top_k=50, seed=7, n=2)
    model = tiny_dir("tiny-llama")
    plain, _ = generate(model, prompts(), params)
    for spec in ("ngram", str(other_model), str(model)):
        out, stats = generate(model, prompts(), params, speculative=spec)
        assert out == plain and stats.drafts > 0
        crowded, few = generate(model, prompts(), params, speculative=spec, speculative_max_seqs=4)
        assert crowded == plain and few.drafts < stats.drafts
    assert stats.accepted == stats.proposed  # the model as its own draft


def test_unseeded_sampled_drafts_come_with_the_distribution_the_model_verifies(
    tiny_dir, monkeypatch
):
    """The model as its own draft, unseeded sampled requests drafting together: each draft
    token's distribution, as verify() is told it, is the model's filtered distribution at
    that token's row (the same up to rounding), so rejection sampling takes nearly all of
    them. A draft row paired with another sequence's row, or filtered otherwise, differs."""
    from llmkit.runtime.layers.sampler import _filtered

    model, compared = tiny_dir("tiny-llama"), []
    verify = Sampler.verify

    def checked(self, logits, params, histories, seeds, drafts, draft_probs=None, *rest):
        first = 0
        for p, draft, q in zip(params, drafts, draft_probs or [None] * len(drafts), strict=True):
            if q is not None:
                kept = _filtered(logits[first : first + len(draft)], [p] * len(draft))
                compared.append(float((kept / kept.sum(-1, keepdim=True) - q).abs().max()))
            first += len(draft) + 1
        return verify(self, logits, params, histories, seeds, drafts, draft_probs, *rest)

    monkeypatch.setattr(Sampler, "verify", checked)
    params = SamplingParams(max_tokens=30, temperature=0.8, top_k=20, top_p=0.9, ignore_eos=True)
    out, stats = generate(model, prompts(), params, speculative=str(model))
    assert all(len(o[0]) == 30 for o in out)
    assert len(compared) > 20 and max(compared) < 1e-4
    assert stats.accepted >= 0.95 * stats.proposed > 0, stats


def test_a_draft_models_rows_are_proposed_at_once_each_by_its_rule():
    """Sampler.propose over a greedy row, a seeded one and unseeded ones at once: the
    greedy row's argmax with its softmax probability; the seeded row's token the one a
    plain step draws with that seed at that position; each unseeded row's distribution its
    filtered one (the float64 definition), its token drawn from it (a chi-square test over
    6,000 rows of one call) and its probability that distribution's at the token."""
    from tests.test_runtime_sampling import filtered_reference

    row = torch.randn(VOCAB * 2, generator=torch.Generator().manual_seed(3)) * 2
    greedy, seeded = SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=8)
    drawing = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.02)
    n = 6000
    torch.manual_seed(3)
    tokens, confidence, q = Sampler().propose(
        torch.stack([row] * (n + 2)), [greedy, seeded] + [drawing] * n, [None, (9, 5)] + [None] * n
    )

    def normalized(p: SamplingParams) -> torch.Tensor:
        kept = filtered_reference(row / p.temperature, p)
        return kept / kept.sum()

    best = int(row.argmax())
    assert int(tokens[0]) == best and q[0] is None
    assert float(confidence[0]) == pytest.approx(float(row.softmax(-1)[best]))
    plain = Sampler()(row[None], [seeded], [([0] * 5, [])], [9])[0].token_id
    assert int(tokens[1]) == plain and q[1] is None
    assert float(confidence[1]) == pytest.approx(float(normalized(seeded)[plain]))
    expected = normalized(drawing)
    assert all(torch.allclose(q[i].double(), expected, atol=1e-6) for i in (2, n + 1))
    assert torch.allclose(confidence[2:].double(), expected[tokens[2:]], atol=1e-6)
    counts = torch.bincount(tokens[2:], minlength=len(row)).double()
    assert chi_square_p_value(counts, expected) > 1e-3


@torch.inference_mode()
def test_penalized_greedy_tokens_are_the_definitions_on_transformers_logits(tiny_dir):
    """Repetition, frequency and presence penalties on each step's logits, the tokens
    kept from step to step (Penalties): plain decoding and the model as its own draft
    (verifying rows penalized for the draft tokens before them; its drafts, unpenalized,
    are accepted where they are the penalized argmax) give the argmax of transformers'
    logits penalized by the definitions, step by step."""
    from tests.runtime_helpers import hf_model
    from tests.test_runtime_sampling import penalized_reference

    model = tiny_dir("tiny-llama")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.3)  # fmt: skip
    hf, expected = hf_model(model), []
    for prompt in prompts()[:3]:
        output = []
        for _ in range(params.max_tokens):
            logits = hf(torch.tensor([prompt + output])).logits[0, -1]
            row = torch.tensor(penalized_reference(logits, params, prompt, output))
            output.append(int(row.argmax()))
        expected.append([output])
    plain, _ = generate(model, prompts()[:3], params)
    speculated, stats = generate(model, prompts()[:3], params, speculative=str(model))
    assert plain == expected and speculated == expected and stats.accepted > 0, stats


def test_tp2_speculation_gives_the_tokens_of_tp1_plain(tiny_dir):
    model = tiny_dir("tiny-llama")
    plain, _ = generate(model, prompts())
    for spec in ("ngram", str(model)):
        speculated, stats = generate(model, prompts(), tp=2, speculative=spec)
        assert speculated == plain and stats.accepted > 0


# --- the rejection test keeps the model's distribution --------------------------------------

VOCAB = 6


def first_tokens(
    samples: int, seed: int, allowed=None, seeded: bool = False, certain: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first token verify() returns for draft tokens drawn from a draft
    distribution q far from the model's p; and p. Unseeded requests go through rejection
    sampling (torch's generator seeded first, so the counts repeat); `seeded` ones (a seed
    each) take the draft token where it is the token they draw there. With `allowed`
    (token ids), both under a guide's mask of them, as a guided request's draft model draws
    and the model verifies. `certain`: verify() is not told q, as a lookup's drafts are
    proposed (each token taken as chosen for sure)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    p_logits = torch.randn(VOCAB, generator=g) * 1.5
    q_logits = torch.randn(VOCAB, generator=g) * 1.5
    params = SamplingParams(temperature=1.0)
    masks = None if allowed is None else [np.array([sum(1 << t for t in allowed)], np.int32)]
    q = Sampler().propose(apply_masks(q_logits[None], masks), [params], [None])[2][0]
    sampler = Sampler()
    counts = torch.zeros(VOCAB)
    logits = torch.stack([p_logits, p_logits])  # rows: after the history, after the draft
    for i in range(samples):
        d = int(torch.multinomial(q, 1, generator=g))
        seeds = [seed + i if seeded else None]
        told = None if certain else [q[None]]
        out = sampler.verify(logits, [params], [([], [])], seeds, [[d]], told, masks)
        counts[out[0][0].token_id] += 1
    p = torch.softmax(p_logits.double(), dim=-1)
    if allowed is not None:
        kept = torch.zeros(VOCAB, dtype=torch.bool)
        kept[list(allowed)] = True
        p = torch.where(kept, p, 0) / p[kept].sum()
    return counts, p


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Over the tokens of nonzero probability (a count of any other fails outright)."""
    kept = probs > 0
    assert counts[~kept].sum() == 0
    counts, probs = counts[kept], probs[kept]
    expected = probs.double() * counts.sum()
    statistic = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_tokens_keep_the_models_distribution(seeded):
    counts, p = first_tokens(6000, seed=1, seeded=seeded)
    assert chi_square_p_value(counts, p) > 1e-3


@pytest.mark.parametrize("seeded", [False, True])
def test_guided_sampled_tokens_keep_the_models_distribution_within_the_guide(seeded):
    """The draft drawn among the tokens a guide allows (its distribution renormalized over
    them) and verified under the same mask: the tokens are the model's distribution over
    the allowed tokens, renormalized, and never another token."""
    counts, p = first_tokens(6000, seed=2, allowed=[0, 2, 3, 5], seeded=seeded)
    assert chi_square_p_value(counts, p) > 1e-3


def test_sampled_tokens_keep_the_models_distribution_past_drafts_chosen_for_sure():
    """A lookup's draft token (q a point mass on it): rejection sampling takes it with
    probability p(d), else draws from p without it; the tokens are p."""
    counts, p = first_tokens(6000, seed=3, certain=True)
    assert chi_square_p_value(counts, p) > 1e-3


def test_sequences_verified_together_keep_each_ones_distribution():
    """Three sampled sequences in one verify() call: one with a draft model's two tokens
    (and their q), one with a lookup's token, one without a draft. Each one's first token
    follows its own first row's p, whatever the rows beside it."""
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    logits = torch.randn(6, VOCAB, generator=g) * 1.5  # rows: 3 + 2 + 1
    q = torch.softmax(torch.randn(2, VOCAB, generator=g) * 1.5, -1)
    params = [SamplingParams(temperature=1.0)] * 3
    counts = torch.zeros(3, VOCAB)
    sampler = Sampler()
    for _ in range(4000):
        drafts = [[int(torch.multinomial(q[0], 1, generator=g)), 1], [4], []]
        out = sampler.verify(logits, params, [([], [])] * 3, [None] * 3, drafts, [q, None, None])
        for i, tokens in enumerate(out):
            counts[i, tokens[0].token_id] += 1
    for i, row in enumerate((0, 3, 5)):
        p = torch.softmax(logits[row].double(), -1)
        assert chi_square_p_value(counts[i], p) > 1e-3, i


def test_verified_tokens_carry_their_rows_log_probabilities():
    """Greedy, seeded and rejection-sampled sequences asking for 2, 0 and 3 top log
    probabilities, with drafts: each token's entry is the model's own log probability of
    it at its row (after the tokens before it), and that row's top n."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    params = [SamplingParams(temperature=0, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, logprobs=0),
              SamplingParams(temperature=1.0, logprobs=3)]  # fmt: skip
    reference_rows, widths = torch.randn(12, VOCAB, generator=g), [4, 3, 5]
    for trial in range(30):
        logits = reference_rows[torch.randperm(12, generator=g)]
        drafts = [[int(t) for t in torch.randint(VOCAB, (w - 1,), generator=g)] for w in widths]
        if trial % 3 == 0:  # drafts of the model's own argmax: accepted by the greedy row
            drafts[0] = logits[:3].argmax(-1).tolist()
        out = Sampler().verify(logits, params, [([], [])] * 3, [None, 3, None], drafts)
        reference, first = torch.log_softmax(logits, -1), 0
        for p, tokens, width in zip(params, out, widths, strict=True):
            assert 1 <= len(tokens) <= width
            for j, s in enumerate(tokens):
                row = reference[first + j]
                assert s.logprob == float(row[s.token_id])
                values, ids = row.topk(p.logprobs)
                assert s.top_logprobs == list(zip(ids.tolist(), values.tolist(), strict=True))
            first += width


def test_the_distribution_test_fails_on_a_biased_acceptance_rule(monkeypatch):
    """Accepting with probability p(d) (q ignored) skews the tokens toward the draft's:
    the same test, same samples, rejects it by a wide margin."""
    monkeypatch.setattr(sampler_module, "accepts", lambda u, p_d, q_d: u < p_d)
    counts, p = first_tokens(6000, seed=1)
    assert chi_square_p_value(counts, p) < 1e-9


def test_the_distribution_test_fails_on_seeded_rows_taking_their_drafts(monkeypatch):
    """Seeded rows that took their draft token whatever they draw would give q, not p:
    the same test rejects it by a wide margin."""
    monkeypatch.setattr(sampler_module, "_accept_greedy", lambda chosen, draft: [*draft, 0])
    counts, p = first_tokens(6000, seed=1, seeded=True)
    assert chi_square_p_value(counts, p) < 1e-9


# --- rollback -------------------------------------------------------------------------------


def test_rollback_leaves_no_block_used_after_1000_requests_with_random_aborts():
    """Pure scheduler and block manager: every step each decode verifies a random draft of
    which a random number is accepted; requests are aborted at random."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    pending = [Sequence([rng.randrange(50) for _ in range(rng.randrange(1, 20))],
                        SamplingParams(max_tokens=rng.randrange(1, 30)))
               for _ in range(1000)]  # fmt: skip
    running: list[Sequence] = []
    while pending or sched.has_unfinished():
        while pending and len(running) < 12:
            running.append(pending.pop())
            sched.add(running[-1])
        batch = sched.schedule()
        for i, seq in enumerate(batch.seqs):
            if batch.num_new_tokens[i] == 1 and seq.num_uncomputed_tokens == 1:
                sched.speculate(batch, i, [rng.randrange(50) for _ in range(rng.randrange(5))])
        accepted = [rng.randrange(len(d) + 1) for d in batch.drafts]
        sched.update(batch, accepted)
        for seq, draft, a in zip(batch.seqs, batch.drafts, accepted, strict=True):
            if seq.num_computed_tokens >= seq.num_tokens:  # its logits were sampled
                seq.output_token_ids += [*draft[:a], rng.randrange(50)]
                assert seq.num_computed_tokens == seq.num_tokens - 1
                assert len(seq.block_table) == bm.num_blocks_for(seq.num_computed_tokens)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.finish(seq, "length")
        for seq in running:
            if rng.random() < 0.02:  # an abort, wherever the sequence is
                sched.finish(seq, "abort")
        running = [s for s in running if not s.is_finished]
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 64


# --- the server ------------------------------------------------------------------------------


def test_a_server_with_a_draft_model_reports_its_cutoff(tiny_dir, tmp_path):
    """The model as its own draft: its greedy text is that of a request without
    speculation; /metrics gives the draft cutoff now (measured, so not the prior once
    drafts were verified), and the stats line gives it beside the acceptance (by position
    too)."""
    from tests.serve_helpers import start_server

    model = tiny_dir("tiny-llama")
    # one decode step a call: against plain calls of several, the model as its own draft
    # costs more than it saves, and its rounds soon sit out (Backoff)
    options = ("--speculative", str(model), "--stats-interval", "1", "--decode-steps", "1")
    server = start_server(model, tmp_path, *options)
    try:
        body = {"prompt": prompts()[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        plain = server.request("POST", "/v1/completions", {**body, "speculative": False})
        spec = server.request("POST", "/v1/completions", body)
        assert plain[0] == spec[0] == 200
        assert spec[2]["choices"][0]["text"] == plain[2]["choices"][0]["text"]
        metrics = server.metrics()
        assert metrics["llmkit_spec_decode_drafts_total{proposer=draft}"] > 0
        cutoff = metrics["llmkit_spec_decode_draft_cutoff{proposer=draft}"]
        assert 0 < cutoff <= 1 and cutoff != Cutoff.PRIOR
        line = r"per draft \(by position: [0-9.]+(, [0-9.]+)*\); drafts end below a chance of"
        deadline = time.monotonic() + 5
        while not re.search(line, server.log.read_text()):
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        server.stop()


def _position(sample: str) -> int:
    """The position label of a /metrics sample's name (0 where it has none)."""
    found = re.search(r"position=(\d+)", sample)
    return int(found.group(1)) if found else 0


def test_a_speculating_server_reports_acceptance_and_takes_per_request_off(tiny_dir, tmp_path):
    from tests.serve_helpers import start_server

    # one decode step a call, so every step looks up a draft
    server = start_server(
        tiny_dir("tiny-llama"), tmp_path, "--speculative", "ngram", "--decode-steps", "1"
    )
    try:
        body = {"prompt": prompts()[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        plain = server.request("POST", "/v1/completions", {**body, "speculative": False})
        before = server.metrics()
        assert before["llmkit_spec_decode_drafts_total{proposer=ngram}"] == 0
        spec = server.request("POST", "/v1/completions", body)
        assert plain[0] == spec[0] == 200
        assert spec[2]["choices"][0]["text"] == plain[2]["choices"][0]["text"]
        after = server.metrics()
        proposed = after["llmkit_spec_decode_proposed_tokens_total{proposer=ngram}"]
        accepted = after["llmkit_spec_decode_accepted_tokens_total{proposer=ngram}"]
        assert proposed > 0 and 0 < accepted <= proposed
        rate = after["llmkit_spec_decode_acceptance_rate{proposer=ngram}"]
        assert rate == pytest.approx(accepted / proposed)
        # by position: every draft has a first token; a draft of n tokens counts at positions
        # 1..n, one with a accepted at 1..a
        at = {name: [v for k, v in sorted(after.items(), key=lambda kv: _position(kv[0]))
                     if k.startswith(f"llmkit_spec_decode_{name}_at_position_total")]
              for name in ("proposed", "accepted")}  # fmt: skip
        drafts = after["llmkit_spec_decode_drafts_total{proposer=ngram}"]
        assert at["proposed"][0] == drafts and sum(at["proposed"]) == proposed
        assert sum(at["accepted"]) == accepted
        status, _, error = server.request("POST", "/v1/completions", {**body, "speculative": "no"})
        assert status == 400 and error["error"]["param"] == "speculative"
    finally:
        server.stop()

"""Block manager and scheduler with fake token ids: no torch, no model."""

from __future__ import annotations

import random

import pytest

from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.scheduler import Scheduler
from llmkit.runtime.sequence import SamplingParams, Sequence, Status
from tests.conftest import run_python


def test_pure_python_modules_do_not_import_torch():
    code = (
        "import sys, llmkit.runtime.scheduler, llmkit.runtime.block_manager, "
        "llmkit.runtime.sequence, llmkit.runtime.detokenizer; print('torch' in sys.modules)"
    )
    assert run_python(code).stdout.strip() == "False"


def seq(n: int, start: int = 0, **params) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams(**params))


def test_blocks_are_allocated_as_tokens_grow_and_freed_with_the_sequence():
    bm = BlockManager(8, 4)
    s = seq(6)
    assert bm.can_allocate(s, 6)
    bm.allocate(s, 6)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    s.num_computed_tokens = 6
    s.output_token_ids += [100, 101]
    bm.allocate(s, 2)  # 8 tokens still fit in 2 blocks
    assert len(s.block_table) == 2
    s.num_computed_tokens = 8
    s.output_token_ids.append(102)
    bm.allocate(s, 1)
    assert len(s.block_table) == 3
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_touched_blocks_count_each_block_once_it_has_held_tokens():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    assert bm.num_touched_blocks == 0
    for _ in range(3):  # freed blocks are reused: the touched count does not grow
        s = seq(10)
        bm.allocate(s, 10)
        assert bm.num_touched_blocks == 3
        bm.free(s)
    a, b = seq(10), seq(10)
    bm.allocate(a, 10)
    bm.allocate(b, 10)
    assert bm.num_touched_blocks == 6 == len(set(a.block_table) | set(b.block_table))


def test_prefix_blocks_are_shared_with_ref_counts():
    bm = BlockManager(8, 4)
    a, b = seq(10), seq(10)
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.cache_blocks(a)  # two full blocks become findable
    hits = bm.computed_blocks(b)
    assert hits == a.block_table[:2]
    bm.allocate(b, 2, hits)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in hits] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_the_last_token_is_always_computed_even_on_a_full_hit():
    bm = BlockManager(8, 4)
    a = seq(8)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_blocks(a)
    assert len(bm.computed_blocks(seq(8))) == 1  # 8 tokens: only the first block is reused


def test_a_hash_collision_is_caught_by_the_token_check():
    bm = BlockManager(8, 4)
    a = seq(5)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_blocks(a)
    bm.blocks[a.block_table[0]].token_ids = (9, 9, 9, 9)  # same hash, other tokens
    assert bm.computed_blocks(seq(5)) == []


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(4, 2)
    a, b = seq(3, 0), seq(3, 50)
    for s in (a, b):
        bm.allocate(s, 3)
        s.num_computed_tokens = 3
        bm.cache_blocks(s)
    bm.free(a)  # a's cached block is freed first, b's second
    bm.free(b)
    c = seq(4, 90)
    bm.allocate(c, 4)  # takes the two uncached blocks (a's and b's partial ones)
    d = seq(2, 95)
    bm.allocate(d, 2)  # now a cached block must go: a's, the older
    assert bm.computed_blocks(seq(3, 0)) == []
    assert len(bm.computed_blocks(seq(3, 50))) == 1


def run_fake(sched: Scheduler, steps: int = 10_000, on_step=None) -> list[list]:
    """Drive the scheduler like the engine, 'sampling' token 7; returns each step's batch."""
    history = []
    for _ in range(steps):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        history.append(list(zip(batch.seqs, batch.num_new_tokens, strict=True)))
        sched.update(batch)
        for s in (s for s in batch.seqs if s.num_computed_tokens == s.num_tokens):
            s.output_token_ids.append(7)
            if len(s.output_token_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
        if on_step:
            on_step()
    return history


def test_token_budget_chunks_long_prompts_without_stalling_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short = seq(3, max_tokens=20)
    sched.add(short)
    run_fake(sched, steps=2)  # short is decoding now
    long = seq(40, 100, max_tokens=2)
    sched.add(long)
    history = run_fake(sched, steps=5)
    for step in history:
        assert sum(n for _, n in step) <= 10
        assert (short, 1) in step  # one decode token every step
    assert [n for step in history for s, n in step if s is long][:4] == [9, 9, 9, 9]


def test_preemption_takes_the_newest_and_recomputes_it():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = seq(8, max_tokens=12), seq(8, 100, max_tokens=12)
    sched.add(old)
    sched.add(new)
    run_fake(sched)
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert len(old.output_token_ids) == len(new.output_token_ids) == 12
    assert bm.num_free_blocks == 6


def test_a_paused_sequence_frees_its_blocks_skips_steps_and_resumes_where_it_was():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    paused, other = seq(10, max_tokens=8), seq(6, 100, max_tokens=8)
    sched.add(paused)
    sched.add(other)
    run_fake(sched, steps=3)
    generated = len(paused.output_token_ids)
    assert generated == 3 and paused.block_table
    sched.pause(paused)
    assert paused.block_table == [] and paused.num_computed_tokens == 0
    history = run_fake(sched)  # runs `other` to its end; `paused` takes no step
    assert all(s is not paused for step in history for s, _ in step)
    assert len(paused.output_token_ids) == generated and not sched.has_unfinished()
    assert bm.num_free_blocks == 16
    sched.resume(paused)
    history = run_fake(sched)
    # its 13 tokens' 3 full blocks come back from the prefix cache: one token to compute
    assert history[0] == [(paused, 1)] and paused.num_cached_tokens == 12
    assert len(paused.output_token_ids) == 8 and paused.is_finished


def test_pause_and_resume_of_waiting_finished_or_paused_sequences():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=1)
    first, waiting = seq(4, max_tokens=2), seq(4, 50, max_tokens=2)
    sched.add(first)
    sched.add(waiting)
    sched.pause(waiting)
    sched.pause(waiting)  # twice: still one entry
    assert sched.paused == [waiting] and sched.waiting == [first]
    run_fake(sched)
    assert first.is_finished and not waiting.output_token_ids
    sched.pause(first)  # finished: nothing to do
    sched.resume(first)
    assert first.is_finished and sched.paused == [waiting]
    sched.finish(waiting, "abort")  # an abort while paused
    assert sched.paused == [] and bm.num_free_blocks == 16
    sched.resume(waiting)
    assert not sched.has_unfinished()


def test_priority_policy_runs_lower_values_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, policy="priority")
    late_urgent = seq(4, priority=-1, max_tokens=1)
    first = seq(4, max_tokens=1)
    sched.add(first)
    sched.add(late_urgent)
    assert sched.schedule().seqs == [late_urgent]


def test_n_siblings_wait_for_the_first_prompt_then_share_its_blocks():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    first = seq(17, max_tokens=3)
    sibling = Sequence(list(first.prompt_token_ids), first.params, parent=first)
    sched.add(first)
    sched.add(sibling)
    assert sched.schedule().seqs == [first]
    first.num_computed_tokens = 17
    bm.cache_blocks(first)
    first.output_token_ids.append(7)
    batch = sched.schedule()
    assert sibling in batch.seqs and sibling.num_cached_tokens == 16


def test_unknown_policy_and_bad_limits_are_refused():
    with pytest.raises(ValueError, match="scheduling policy"):
        Scheduler(BlockManager(4, 4), policy="lifo")
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockManager(4, 4), max_num_seqs=0)


def test_a_thousand_requests_with_random_aborts_free_every_block():
    rng = random.Random(0)
    bm = BlockManager(40, 4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=48)
    live: list[Sequence] = []
    for i in range(1000):
        s = seq(rng.randint(1, 30), rng.randint(0, 1000), max_tokens=rng.randint(1, 12))
        sched.add(s)
        live.append(s)
        if rng.random() < 0.3:  # abort someone, waiting or running
            victim = rng.choice(live)
            sched.finish(victim, "abort")
        if i % 3 == 0:
            run_fake(sched, steps=1)
        live = [s for s in live if s.status is not Status.FINISHED]
    run_fake(sched)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_decodes_run_ahead_only_when_every_one_fits_and_none_is_a_prompt():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(3, max_tokens=20), seq(7, 100, max_tokens=20)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()  # both prompts: nothing to run ahead
    assert not sched.run_ahead(first, 4) and first.steps == 1
    sched.update(first)
    a.output_token_ids.append(7)
    b.output_token_ids.append(7)
    batch = sched.schedule()  # a at 3 of block 1, b at 7 of block 2: one token each
    assert batch.num_new_tokens == [1, 1] and bm.num_free_blocks == 3
    assert sched.run_ahead(batch, 4)  # positions 3-6 and 7-10: a block more each
    assert batch.steps == 4 and batch.num_new_tokens == [4, 4]
    assert [len(s.block_table) for s in batch.seqs] == [2, 3] and bm.num_free_blocks == 1
    sched.update(batch)
    assert (a.num_computed_tokens, b.num_computed_tokens) == (7, 11)
    a.output_token_ids += [7] * 4
    b.output_token_ids += [7] * 4
    again = sched.schedule()
    free = bm.num_free_blocks
    assert not sched.run_ahead(again, 8)  # 2 blocks more each: only one is free
    assert again.steps == 1 and again.num_new_tokens == [1, 1] and bm.num_free_blocks == free
    tight = Scheduler(BlockManager(6, 4), max_num_batched_tokens=7)
    tight.running, batch.num_new_tokens, batch.steps = [a, b], [1, 1], 1
    assert not tight.run_ahead(batch, 4)  # 8 tokens over a budget of 7
    batch.drafts[0] = [5]
    assert not sched.run_ahead(batch, 2)  # a draft is verified, not run ahead


def test_a_one_token_chunk_of_a_prompt_does_not_run_ahead():
    """A budget that leaves a prompt one token this step schedules it like a decode (one
    token), but its next tokens are the prompt's, not the model's argmax."""
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=5)
    short, long = seq(3, max_tokens=20), seq(12, 100, max_tokens=20)
    sched.add(short)
    sched.add(long)
    sched.update(sched.schedule())  # short's 3 prompt tokens, long's first 2
    short.output_token_ids.append(7)
    batch = sched.schedule()  # short decodes (1), long gets the 4 left of the budget
    assert batch.num_new_tokens == [1, 4]
    sched.update(batch)
    short.output_token_ids.append(7)
    sched.max_num_batched_tokens = 2
    batch = sched.schedule()  # short decodes, long's prompt goes on by one token
    assert batch.num_new_tokens == [1, 1] and long.num_uncomputed_tokens == 6
    sched.max_num_batched_tokens = 64  # budget and blocks would allow the steps
    assert not sched.run_ahead(batch, 4) and batch.steps == 1

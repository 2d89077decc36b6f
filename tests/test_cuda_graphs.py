"""What runtime/cuda_graphs.py decides on the host, checked on the CPU: the batch-size
buckets, which steps replay a graph, and how a step fills and pads the persistent buffers.
The graphs themselves are checked against eager mode in tests/test_cuda.py."""

from __future__ import annotations

import pytest

from llmkit.runtime.cuda_graphs import bucket_for, buckets


@pytest.mark.parametrize("max_seqs", [1, 2, 5, 16, 17, 32, 40, 256, 300])
def test_every_batch_size_has_the_smallest_bucket_that_holds_it(max_seqs):
    sizes = buckets(max_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_seqs
    for rows in range(1, max_seqs + 1):
        bucket = bucket_for(rows, sizes)
        assert bucket >= rows
        # a power of two up to 32, then a multiple of 32, or the most a step holds
        regular = bucket & (bucket - 1) == 0 if bucket <= 32 else bucket % 32 == 0
        assert bucket == max_seqs or regular
        assert bucket < 2 * rows or bucket - rows < 32  # padding stays small
    assert bucket_for(max_seqs + 1, sizes) is None


def _decode_step(rows: int, width: int, steps: int = 1, lora=()):
    """StepInputs of `rows` decodes with block tables `width` wide (distinct values per row)."""
    import torch

    from llmkit.runtime.layers.attention import AttentionMetadata
    from llmkit.runtime.model_runner import StepInputs

    meta = AttentionMetadata(torch.arange(100, 100 + rows), rows)
    meta.decode_blocks = torch.arange(rows * width).view(rows, width) + 1
    meta.decode_lens = torch.arange(rows) + 7
    ids = torch.arange(rows) + 3
    return StepInputs(ids, torch.arange(rows) + 50, meta, torch.arange(rows), list(lora), steps)


def test_a_decode_step_fills_the_buffers_and_pads_the_rest_of_its_bucket():
    """The persistent buffers after a step of 3 rows: its ids, positions, slots, lengths and
    tables first; every later row writes nowhere (slot -1) and attends to one key."""
    import torch

    from llmkit.runtime.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(None, None, max_seqs=8, max_blocks=6, device="cpu")
    graphs._load(_decode_step(5, 4))  # an earlier, wider step
    graphs._load(_decode_step(3, 2))
    ids, positions, slots, lens = graphs.fields
    assert ids[:3].tolist() == [3, 4, 5] and positions[:3].tolist() == [50, 51, 52]
    assert slots.tolist() == [100, 101, 102] + [-1] * 5
    assert lens.tolist() == [7, 8, 9] + [1] * 5
    assert graphs.tables[:3, :2].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert graphs.tables.dtype == torch.int32


def test_only_plain_decode_steps_that_fit_replay_a_graph():
    from llmkit.runtime.cuda_graphs import DecodeGraphs
    from llmkit.runtime.layers.attention import Prefill

    graphs = DecodeGraphs(None, None, max_seqs=8, max_blocks=6, device="cpu")
    assert graphs.takes(_decode_step(1, 6)) and graphs.takes(_decode_step(8, 3))
    assert not graphs.takes(_decode_step(9, 3))  # more rows than the largest bucket
    assert not graphs.takes(_decode_step(2, 7))  # a table wider than the buffers
    assert not graphs.takes(_decode_step(2, 3, steps=2))
    assert not graphs.takes(_decode_step(2, 3, lora=[(1, 0, 2)]))
    with_prefill = _decode_step(2, 3)
    with_prefill.meta.prefills.append(Prefill(2, 4, 0, [5]))
    assert not graphs.takes(with_prefill)


def test_greedy_steps_feed_each_argmax_back_and_advance_every_field():
    """A run of 3 greedy steps over 2 rows, with a stand-in for the graph that records the
    buffers it sees and answers a token derived from them: each step's ids are the last
    step's argmax, positions and lengths advance by one, slots follow the step-major slot
    mapping, and padding rows keep writing nowhere."""
    import torch

    from llmkit.runtime.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(None, None, max_seqs=4, max_blocks=6, device="cpu")
    seen = []
    vocab = 1000

    class Graph:
        def replay(self):
            ids, positions = graphs.fields[0, :2], graphs.fields[1, :2]
            seen.append(graphs.fields.clone())
            logits.zero_()
            logits[torch.arange(2), (ids * 3 + positions) % vocab] = 1.0

    logits = torch.zeros(2, vocab)  # the bucket of 2 rows
    graphs.graphs[2] = (Graph(), logits)
    step = _decode_step(2, 4, steps=3)
    step.meta.slot_mapping = torch.tensor([100, 200, 101, 201, 102, 202])
    tokens = graphs.greedy_steps(step)
    ids, positions = [3, 4], [50, 51]
    expected = []
    for fields in seen:
        assert fields[0, :2].tolist() == ids and fields[1, :2].tolist() == positions
        ids = [(i * 3 + p) % vocab for i, p in zip(ids, positions, strict=True)]
        positions = [p + 1 for p in positions]
        expected.append(ids)
    assert [f[2].tolist() for f in seen] == [[100, 200, -1, -1], [101, 201, -1, -1],
                                             [102, 202, -1, -1]]  # fmt: skip
    assert [f[3].tolist() for f in seen] == [[7, 8, 1, 1], [8, 9, 1, 1], [9, 10, 1, 1]]
    assert tokens.tolist() == [list(row) for row in zip(*expected, strict=True)]

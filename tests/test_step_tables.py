"""The block tables a step's decodes attend through (attention.padded_tables), against
the definition: a row per query, its sequence's first blocks, padded with block 0."""

from __future__ import annotations

import random

import pytest
import torch

from llmkit.runtime.layers import attention
from llmkit.runtime.layers.attention import padded_tables
from llmkit.runtime.model_runner import prepare, prepare_steps
from llmkit.runtime.scheduler import Batch
from llmkit.runtime.sequence import Sequence

BLOCK = 16


def by_definition(tables: list[list[int]], width: int, rows) -> list[list[int]]:
    return [[tables[r][i] if i < len(tables[r]) else 0 for i in range(width)] for r in rows]


@pytest.mark.parametrize("limit", [0, attention.LIST_TABLES, 10**9], ids=str)
def test_padded_tables_are_the_definitions_by_either_path(monkeypatch, limit):
    """Through the padded lists (every size under a huge limit), the flat run (every size
    over limit 0) and the default, which takes either by size: tables shorter and longer
    than the width, empty ones, rows repeated and left out."""
    monkeypatch.setattr(attention, "LIST_TABLES", limit)
    rng = random.Random(limit)
    for _ in range(60):
        width = rng.choice([1, 3, 64, 300])
        tables = [[rng.randrange(1, 10**6) for _ in range(rng.randrange(0, width + 3))]
                  for _ in range(rng.randrange(1, 40))]  # fmt: skip
        rows = rng.choice([None, [rng.randrange(len(tables)) for _ in range(rng.randrange(1, 60))]])
        got = padded_tables(tables, width, rows)
        assert got.dtype == torch.long and got.is_contiguous()
        expected = by_definition(tables, width, range(len(tables)) if rows is None else rows)
        assert got.tolist() == expected


def long_decodes(rng: random.Random, count: int, length: int) -> list[Sequence]:
    seqs = []
    for _ in range(count):
        n = length - rng.randrange(BLOCK)
        seq = Sequence([rng.randrange(5, 500) for _ in range(n)])
        seq.block_table = rng.sample(range(10**5), -(-(n + 8) // BLOCK))
        seq.num_computed_tokens = n - 1
        seqs.append(seq)
    return seqs


def test_a_steps_decode_tables_are_each_querys_sequences_past_the_list_limit():
    """70 decodes of about 70 blocks each (past LIST_TABLES), some with drafts (a row per
    draft token, each its sequence's table); and a run of greedy steps over them."""
    rng = random.Random(3)
    seqs = long_decodes(rng, 70, 70 * BLOCK)
    batch = Batch()
    for seq in seqs:
        draft = [7] * rng.choice([0, 0, 2, 4])
        batch.add(seq, 1 + len(draft), draft)
    meta = prepare(batch, BLOCK)[0].meta
    queries = [i for i, d in enumerate(batch.drafts) for _ in range(1 + len(d))]
    assert meta.num_decodes == len(queries) > 70
    width = meta.decode_blocks.shape[1]
    assert width == -(-max(meta.decode_lens.tolist()) // BLOCK)
    assert width * len(queries) > attention.LIST_TABLES
    tables = [s.block_table for s in seqs]
    assert meta.decode_blocks.tolist() == by_definition(tables, width, queries)

    steps = Batch(steps=4)
    for seq in seqs:
        steps.add(seq, 4)
    blocks = prepare_steps(steps, BLOCK).meta.decode_blocks
    width = -(-(max(s.num_computed_tokens for s in seqs) + 4) // BLOCK)
    assert blocks.tolist() == by_definition(tables, width, range(len(seqs)))

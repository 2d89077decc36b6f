"""The batch-size buckets CUDA graphs are captured for (runtime/cuda_graphs.py); the graphs
themselves are checked against eager mode in tests/test_cuda.py."""

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

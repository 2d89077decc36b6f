"""benchmarks/cuda.py's logic that needs no GPU: which table a run's result belongs to."""

from __future__ import annotations

import pytest

from tests.bench_helpers import benchmark


@pytest.mark.parametrize(
    "shapes, methods, variant",
    [
        (["1b", "8b"], ["int8", "w8a8", "gptq", "awq"], []),  # the default run: the targets
        (["8b"], ["gptq"], []),
        (["8b"], ["int8", "w8a8"], ["int8", "w8a8"]),  # a device call's other copies
        (["8b"], ["awq"], ["awq"]),
        (["1b"], [], ["1b"]),  # gpu_checks.sh's bf16-1b step
        (["1b"], ["gptq"], ["1b"]),
        (["1b"], ["awq"], ["1b", "awq"]),
    ],
)
def test_a_run_without_the_targets_copies_keeps_a_table_of_its_own(shapes, methods, variant):
    assert benchmark("cuda").result_variant(shapes, methods) == variant

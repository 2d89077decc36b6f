"""The Triton elementwise kernels (llmkit/kernels/triton_elementwise.py) against the torch
paths they replace (float64 references for the steps that round once): natively on CUDA where
there is a GPU, and on the CPU through Triton's interpreter in a child process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.runtime_helpers import NEEDS_CUDA, interpreted

# (rows, dim, dtype name); odd row counts and a dim that is not a power of two
CASES = [(3, 64, "float32"), (5, 96, "float16"), (1, 256, "float32")]
CUDA_CASES = [*CASES, (7, 4096, "bfloat16"), (64, 2048, "bfloat16")]


def errors(case, device: str) -> dict[str, float]:
    """Largest |kernel - reference| of each kernel, relative to the reference's largest |value|."""
    from llmkit.kernels import triton_elementwise as te

    rows, dim, name = case
    dtype = getattr(torch, name)
    g = torch.Generator().manual_seed(rows + dim)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    x, residual, weight = rand(rows, dim), rand(rows, dim), rand(dim)

    def rel(got, want):
        return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()

    def norm(h):  # the torch path: float32 normalisation, rounded, then the weight
        return weight * F.rms_norm(h.float(), (dim,), eps=1e-5).to(dtype)

    out = {"rms_norm": rel(te.rms_norm(x, weight, 1e-5), norm(x))}
    summed = residual + x
    kept = residual.clone()
    normed = te.add_rms_norm(kept, x, weight, 1e-5)
    out["add_rms_norm"] = max(rel(normed, norm(summed)), rel(kept, summed))
    gate_up = rand(rows, 2 * dim)
    gate, up = gate_up.double().chunk(2, dim=-1)
    out["silu_mul"] = rel(te.silu_mul(gate_up), F.silu(gate) * up)
    return out


# relative error: one rounding of the dtype's, or two where the torch path rounds twice
TOLERANCE = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def check(case, found: dict[str, float]) -> None:
    for kernel, error in found.items():
        assert error < TOLERANCE[case[-1]], (case, kernel, error)


def test_elementwise_kernels_interpreted_match_the_torch_paths():
    found = interpreted(
        "import json\n"
        "from tests.test_triton_elementwise import CASES, errors\n"
        "print(json.dumps([errors(c, 'cpu') for c in CASES]))\n"
    )
    for case, errors_of_case in zip(CASES, found, strict=True):
        check(case, errors_of_case)


@NEEDS_CUDA
@pytest.mark.parametrize("case", CUDA_CASES)
def test_elementwise_kernels_on_cuda_match_the_torch_paths(case):
    pytest.importorskip("triton")
    check(case, errors(case, "cuda"))

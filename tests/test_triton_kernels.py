"""The Triton kernels (llmkit/kernels/cuda.py) against the torch paths they replace:
on CUDA where there is a GPU (`pytest -k cuda`), and everywhere else on the CPU through
Triton's interpreter, in a child process (the interpreter is chosen when Triton compiles,
before any test module could set it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runtime_helpers import NEEDS_CUDA, interpreted_split

SETTINGS = [
    dict(group_size=16),
    dict(bits=3, group_size=-1, sym=False),
    dict(group_size=32, desc_act=True),
    dict(group_size=16, desc_act=True, static_groups=True),
    dict(bits=8, group_size=64, clip_search=False, act_group_aware=False),
]
FIELDS = ("q", "scales", "zeros", "g_idx", "row_error")


def differing_fields(settings: dict, device: str) -> list[str]:
    """GPTQ of one layer on `device` with the Triton sweep and with the torch ops: the
    result's fields that are not equal."""
    from llmkit.kernels import cpu, cuda
    from llmkit.quant import gptq

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 320, generator=g) @ (torch.randn(320, 320, generator=g) * 0.2)
    h = gptq.Hessian(320, torch.device(device))  # 320: a last block of 64 columns
    h.add(x)
    w = (torch.randn(72, 320, generator=g) * 0.05).to(device)  # 72: a partial row tile
    config = gptq.GPTQSettings(**settings)
    assert cpu.for_tensors(w) is None and cuda.for_tensors(w) is not None
    fast = gptq.quantize(w, h.matrix, config)
    original = cuda.for_tensors
    cuda.for_tensors = lambda *tensors: None
    try:
        plain = gptq.quantize(w, h.matrix, config)
    finally:
        cuda.for_tensors = original
    return [f for f in FIELDS if not torch.equal(getattr(fast, f), getattr(plain, f))]


def test_gptq_sweep_kernel_interpreted_gives_the_torch_sweeps_values():
    """Every settings case, in two interpreted children side by side: same codes, same
    errors."""
    differing = interpreted_split(
        "import json\n"
        "from tests.test_triton_kernels import SETTINGS, differing_fields\n"
        "print(json.dumps([differing_fields(s, 'cpu') for s in SETTINGS{part}]))\n"
    )
    assert differing == [[] for _ in SETTINGS]


@NEEDS_CUDA
@pytest.mark.parametrize("settings", SETTINGS)
def test_gptq_sweep_kernel_on_cuda_gives_the_torch_sweeps_values(settings):
    pytest.importorskip("triton")
    assert differing_fields(settings, "cuda") == []


def test_gptq_on_the_cpu_never_imports_triton():
    """Importing Triton costs ~75 MB of resident memory, which llmkit's CPU code must not
    add itself (torch._dynamo still imports it where transformers' model code runs)."""
    code = (
        "import sys, torch\n"
        "from llmkit.quant import gptq\n"
        "h = gptq.Hessian(64, torch.device('cpu'))\n"
        "h.add(torch.randn(256, 64))\n"
        "gptq.quantize(torch.randn(32, 64), h.matrix, gptq.GPTQSettings(group_size=32))\n"
        "print('triton' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]

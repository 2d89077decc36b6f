"""The CPU C++ kernels (cpu_ops.cpp), built once per machine with the local compiler
by torch's extension loader and cached (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR).

`ops()` is None, with one warning, when they cannot be built (no compiler, no ninja) or when
LLMKIT_CPU_KERNELS=0; callers then use their torch path.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import torch

log = logging.getLogger("llmkit.kernels")
SOURCE = Path(__file__).with_name("cpu_ops.cpp")


@functools.cache
def ops():
    """torch.ops.llmkit_cpu once the kernels are built and loaded, else None."""
    if os.environ.get("LLMKIT_CPU_KERNELS", "1") == "0":
        return None
    try:
        _build()
    except Exception as e:  # no compiler, a failed build: the torch paths still work
        warnings.warn(
            f"llmkit's CPU kernels are unavailable ({_reason(e)}); using torch paths", stacklevel=2
        )
        return None
    return torch.ops.llmkit_cpu


def for_tensors(*tensors: torch.Tensor):
    """ops() when the tensors are all CPU tensors of one dtype, float32 or bfloat16 (what the
    kernels take), else None."""
    first = tensors[0]
    usable = first.device.type == "cpu" and first.dtype in (torch.float32, torch.bfloat16)
    if not usable or any(t.device != first.device or t.dtype != first.dtype for t in tensors):
        return None
    return ops()


def _build() -> None:
    from torch.utils.cpp_extension import load

    log.info("loading llmkit's CPU kernels (compiled the first time, ~20 s)")
    load(
        name="llmkit_cpu_kernels",
        sources=[str(SOURCE)],
        # no FMA contraction: the element-wise kernels round as the torch ops they replace
        extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _reason(error: Exception) -> str:
    """The line of a build failure that says what went wrong (the compiler's error if any)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(error).__name__])[-1][:300]

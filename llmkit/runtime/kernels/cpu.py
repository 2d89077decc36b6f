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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"llmkit's CPU kernels are unavailable ({first}); using torch paths", stacklevel=2
        )
        return None
    return torch.ops.llmkit_cpu


def _build() -> None:
    from torch.utils.cpp_extension import load

    log.info("building llmkit's CPU kernels (once per machine)")
    load(
        name="llmkit_cpu_kernels",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )

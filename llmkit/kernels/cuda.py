"""CUDA kernels written in Triton, compiled on first use by Triton's own cache.

- gptq_columns (triton_gptq.py): GPTQ's column sweep over a run of columns that share one
  group's scale and zero, inside a block of at most 128 columns; the same contract as the
  CPU kernel of that name (cpu_ops.cpp), and the torch path's values (no fused
  multiply-adds). Done with torch ops, each column costs ~8 kernel launches; here a run of
  columns is one launch, each program holding a tile of rows in registers.
- attention_kernels (triton_attention.py): paged attention's cache write (with the rotary
  embedding of q and k), decode and prefills, for the runtime's CUDA path
  (runtime/layers/attention.py).
- elementwise_for (triton_elementwise.py): RMSNorm (with its residual add) and silu * up,
  each one launch (runtime/layers/norm.py, activation.py).
- int8_for (triton_int8.py): INT8 products, weight-only and W8A8, the weight read as int8
  (runtime/layers/linear.py's Int8Linear and W8A8Linear).

On a GPU of compute capability 9.0 or newer (`cuda_rtc.programmatic`), a decode step's
kernels (the K/V write, decode attention, norms and silu * up above, the 4-bit products of
cuda_int4.py and the int8 ones of cuda_int8.py) launch as programmatic dependents of the
kernel before them (PDL): a kernel's blocks may start while that kernel finishes and wait
for it (griddepcontrol.wait) before they read what it wrote or write anything, which hides
a launch's latency behind the kernel before it. Every such kernel waits in every program,
so a successor that waits for it also waits for all before it. The Triton kernels take
their switches from triton_launch.py.

`for_tensors()` is None where Triton is not installed or the tensors are not float32 CUDA
tensors; callers then use their torch path. Triton is imported only then: llmkit's CPU paths
never import it themselves. With TRITON_INTERPRET=1 in the environment, the kernels run on
CPU tensors through Triton's interpreter instead (how the tests check them without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def for_tensors(*tensors: torch.Tensor):
    """The kernels (a module with `gptq_columns`) when they can take the tensors: float32,
    on CUDA (on the CPU under Triton's interpreter); else None."""
    device = "cpu" if INTERPRETED else "cuda"
    if any(t.device.type != device or t.dtype != torch.float32 for t in tensors):
        return None
    return _module("triton_gptq")


def attention_kernels():
    """llmkit.kernels.triton_attention (paged attention on CUDA), or None without Triton."""
    return _module("triton_attention")


def elementwise_for(*tensors: torch.Tensor):
    """llmkit.kernels.triton_elementwise (norms, silu * up) when every tensor is on
    CUDA and Triton is installed, else None."""
    if not all(t.is_cuda for t in tensors):
        return None
    return _module("triton_elementwise")


def int8_for(device: torch.device, dtype: torch.dtype):
    """llmkit.kernels.triton_int8 where its products run on `device` with `dtype`
    activations: CUDA (the CPU under Triton's interpreter), Triton installed, and the
    kernel checked there (`triton_int8.checked`; where it fails, a warning, once); else
    None."""
    if device.type != ("cpu" if INTERPRETED else "cuda"):
        return None
    module = _module("triton_int8")
    if module is None:
        return None
    failed = module.checked(device, dtype)
    if failed is not None:
        # shown once: Python's default filter reports a warning once per place and text
        warnings.warn(f"llmkit's int8 kernels are unavailable on {device} for {dtype} "
                      f"({failed}); int8 layers run without them", stacklevel=2)  # fmt: skip
        return None
    return module


@functools.cache
def _module(name: str):
    """llmkit.kernels.<name>, imported on first use; None without Triton (CPU-only
    installs), where callers take their torch paths."""
    try:
        return importlib.import_module(f"llmkit.kernels.{name}")
    except ImportError:
        return None

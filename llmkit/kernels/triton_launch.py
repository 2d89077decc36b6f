"""How a decode step's Triton kernels launch as programmatic dependents (kernels/cuda.py):
`launch_options` gives a launch its switches for the tensors' device, and each such kernel
begins with `programmatic_start`, or with `programmatic_launch` and, before it reads what
any kernel of the step writes, `programmatic_wait`. Where Triton has no grid dependency
control, or `cuda_rtc.programmatic` says the device cannot, the launches are plain.

Every launch of llmkit's Triton kernels also says whether its multiplies and adds may fuse
(`enable_fp_fusion`), so that a kernel's code and values do not change with Triton's
default: fused where the GPUs measured the kernels (`FUSED`, which `launch_options` holds),
apart where a kernel must round as torch's ops do (gptq_columns, descend). Triton 3.9 warns
on a launch that leaves it unset; 3.10 turns fusion off by default."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkit.kernels.cuda import INTERPRETED
from llmkit.kernels.cuda_rtc import programmatic

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: plain launches
    gdc_launch_dependents = gdc_wait = None


FUSED = {"enable_fp_fusion": True}  # as Triton up to 3.9 compiles by default


def launch_options(t: torch.Tensor) -> dict:
    """A decode-step kernel's launch options for tensors on t's device: FUSED, its `PDL`
    constexpr and, where on, Triton's `launch_pdl`."""
    on = t.is_cuda and not INTERPRETED and gdc_wait is not None and programmatic(t.device)
    return {**FUSED, "PDL": True, "launch_pdl": True} if on else {**FUSED, "PDL": False}


@triton.jit
def programmatic_start(PDL: tl.constexpr):
    """With PDL: let the next kernel start, then wait for the one before, before any load
    or store."""
    programmatic_launch(PDL)
    programmatic_wait(PDL)


@triton.jit
def programmatic_launch(PDL: tl.constexpr):
    """With PDL: let the next kernel start. Until `programmatic_wait`, the kernel may read
    only what the host wrote before the step's first kernel (kernels before this one may
    still run, several back: each lets its successor start at its own start) and may
    write nothing."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def programmatic_wait(PDL: tl.constexpr):
    """With PDL: wait until the kernels before this one have finished and their writes
    are visible."""
    if PDL:
        gdc_wait()

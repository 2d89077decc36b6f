"""CUDA kernels written in Triton, compiled on first use by Triton's own cache.

- gptq_columns (triton_gptq.py): GPTQ's column sweep over a run of columns that share one
  group's scale and zero, inside a block of at most 128 columns; the same contract as the
  CPU kernel of that name (cpu_ops.cpp), and the torch path's values (no fused
  multiply-adds). Done with torch ops, each column costs ~8 kernel launches; here a run of
  columns is one launch, each program holding a tile of rows in registers.
- attention_kernels (triton_attention.py): paged attention's cache write, decode and
  prefills, for the runtime's CUDA path (runtime/layers/attention.py).
- elementwise_for (triton_elementwise.py): RMSNorm (with its residual add), rotary
  embeddings and silu * up, each one launch (runtime/layers/norm.py, rotary.py,
  activation.py).
- int4_kernels (triton_int4.py): 4-bit grouped weights' product and dequantization
  (runtime/layers/linear.py TritonInt4Linear), which `fastest` chooses between.

`for_tensors()` is None where Triton is not installed or the tensors are not float32 CUDA
tensors; callers then use their torch path. Triton is imported only then: llmkit's CPU paths
never import it themselves. With TRITON_INTERPRET=1 in the environment, the kernels run on
CPU tensors through Triton's interpreter instead (how the tests check them without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
log = logging.getLogger(__name__)


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
    """llmkit.kernels.triton_elementwise (norms, rotary, silu * up) when every tensor is on
    CUDA and Triton is installed, else None."""
    if not all(t.is_cuda for t in tensors):
        return None
    return _module("triton_elementwise")


def int4_kernels(device: torch.device):
    """llmkit.kernels.triton_int4 for weights on `device` (CUDA; the CPU under Triton's
    interpreter), or None."""
    if device.type != ("cpu" if INTERPRETED else "cuda"):
        return None
    return _module("triton_int4")


def fastest(candidates: list, reps: int = 10) -> tuple[int, list[float]]:
    """The index of the fastest of `candidates` (callables launching work on the current
    CUDA device) and each one's milliseconds: the median of `reps` timed calls, every call
    after a write that evicts the L2 cache, so a weight is read from memory as a model's
    step reads it. A candidate that raises is left out (inf), with a warning."""
    flush = torch.empty(2 * _l2_bytes(), dtype=torch.int8, device="cuda")
    medians = []
    for run in candidates:
        try:
            run()  # compiled, tuned and warm before it is timed
        except Exception as e:  # e.g. a kernel this GPU's compiler refuses: not a candidate
            log.warning("a kernel option failed and is left out: %s", e)
            medians.append(math.inf)
            continue
        pairs = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        medians.append(sorted(s.elapsed_time(e) for s, e in pairs)[reps // 2])
    if min(medians) == math.inf:
        raise RuntimeError("every kernel option failed on this GPU")
    return medians.index(min(medians)), medians


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "L2_cache_size", 0) or 2**26


@functools.cache
def _module(name: str):
    """llmkit.kernels.<name>, imported on first use; None without Triton (CPU-only
    installs), where callers take their torch paths."""
    try:
        return importlib.import_module(f"llmkit.kernels.{name}")
    except ImportError:
        return None

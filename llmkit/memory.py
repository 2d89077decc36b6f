"""Resident memory of this process (and its CUDA device memory), for the peak-memory figures
commands report."""

from __future__ import annotations

import ctypes
import functools
import gc
import resource


def peak_rss() -> int:
    """Largest resident set so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def reset_peak_device_memory(device) -> None:
    """Start counting the CUDA peak of `device` (a torch.device) from now; no-op elsewhere."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory(device) -> int:
    """Most bytes torch held at once on CUDA `device` since the last reset; 0 elsewhere."""
    if device.type != "cuda":
        return 0
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS. Without it, memory freed after each
    layer stays in the process (RSS creeping up layer by layer) for reuse that fragmentation
    often prevents. A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def freeze_heap() -> None:
    """Take every object alive now (the interpreter's and torch's modules, a loaded model)
    out of the garbage collector's full passes, which otherwise walk all of them, hundreds of
    thousands in an engine process, stalling every request in flight while they do; frozen,
    a pass walks only what came after. For processes that hold one engine for their lifetime
    (the server's engine process, `generate`, `bench offline`): frozen objects are never
    collected, so a process that made engine after engine would keep the cycles of those it
    closed (what is garbage already is collected first)."""
    gc.collect()
    gc.freeze()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (None without glibc)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None

"""Memory in 2 MiB pages (transparent huge pages, asked for by kernels/cpu_gemm.cpp's
huge_pages) for what the CPU kernels read most: the weights they read whole at every decode
step, so streaming hundreds of megabytes costs a page walk per 2 MiB instead of per 4 KiB,
and the KV cache, whose blocks attention reads scattered, a TLB miss per block in 4 KiB pages.

While a model loads (`shared`), its weights are placed one after another in chunks of such
pages, small ones sharing pages: a 1 MiB projection given pages of its own would leave half
of a 2 MiB page empty, and left in 4 KiB pages it pays the page walks the large ones avoid
(benchmarks/cpu_decode.py measures the decode speed this gives).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from llmkit.kernels import cpu as cpu_kernels

CHUNK = 32 * 2**20  # bytes of pages asked for at a time; larger weights get their own
ALIGN = 4096  # each weight starts on a 4 KiB boundary


class Pages:
    """Weights copied one after another into chunks from `allocate(bytes)` (a uint8 tensor
    of at least that many bytes). A chunk lives as long as a weight placed in it."""

    def __init__(self, allocate: Callable[[int], torch.Tensor]):
        self.allocate = allocate
        self.chunk: torch.Tensor | None = None
        self.used = 0

    def place(self, weight: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `weight` in the pages."""
        nbytes = weight.numel() * weight.element_size()
        if nbytes >= CHUNK:
            memory, start = self.allocate(nbytes), 0
        else:
            if self.chunk is None or self.used + nbytes > self.chunk.numel():
                self.chunk, self.used = self.allocate(CHUNK), 0
            memory, start = self.chunk, self.used
            self.used += -(-nbytes // ALIGN) * ALIGN
        copy = memory[start : start + nbytes].view(weight.dtype).view(weight.shape)
        return copy.copy_(weight)


_LOADING: ContextVar[Pages | None] = ContextVar("llmkit_pages", default=None)


@contextlib.contextmanager
def shared() -> Iterator[None]:
    """Weights `streamed` while this runs share chunks of pages (a model's load); the last
    chunk is let go at the end, to live as long as its weights."""
    op = _huge_pages()
    token = _LOADING.set(None if op is None else Pages(op))
    try:
        yield
    finally:
        _LOADING.reset(token)


def streamed(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU weight in 2 MiB pages where llmkit's kernels are built (in
    the load's shared chunks, or pages of its own outside one), else weight.contiguous()."""
    op = _huge_pages() if weight.device.type == "cpu" else None
    if op is None:
        return weight.contiguous()
    return (_LOADING.get() or Pages(op)).place(weight)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """CPU zeros in 2 MiB pages, each committed when first written; None without the
    kernels."""
    op = _huge_pages()
    if op is None:
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    return op(nbytes)[:nbytes].view(dtype).view(shape)


def _huge_pages():
    ops = cpu_kernels.ops()
    return None if ops is None else ops.huge_pages.default

"""layers/pages.py: streamed weights are exact contiguous copies, small ones sharing chunks
of pages during a load, large ones in pages of their own; a chunk lives as long as its
weights."""

from __future__ import annotations

import gc

import pytest
import torch

from llmkit.kernels import cpu
from llmkit.runtime.layers import pages


def _memory(sizes: list[int]):
    """An allocator of plain uint8 tensors that records the sizes asked for."""

    def allocate(nbytes: int) -> torch.Tensor:
        sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    return allocate


def _start(t: torch.Tensor) -> int:
    return t.data_ptr() - t.untyped_storage().data_ptr()


def test_small_weights_share_a_chunk_each_on_a_4kib_boundary():
    sizes: list[int] = []
    place = pages.Pages(_memory(sizes)).place
    g = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(30, 70, generator=g).to(torch.bfloat16),
        torch.randn(50, 20, generator=g).t(),  # not contiguous
        torch.randint(-128, 128, (3, 5, 7), generator=g, dtype=torch.int8),
        torch.randint(0, 255, (100,), generator=g, dtype=torch.uint8),
    ]
    copies = [place(w) for w in weights]
    assert sizes == [pages.CHUNK]
    chunk = copies[0].untyped_storage().data_ptr()
    previous_end = 0
    for w, c in zip(weights, copies, strict=True):
        assert torch.equal(c, w) and c.dtype == w.dtype and c.is_contiguous()
        assert c.untyped_storage().data_ptr() == chunk
        assert _start(c) % pages.ALIGN == 0 and _start(c) >= previous_end
        previous_end = _start(c) + c.numel() * c.element_size()


def test_a_full_chunk_starts_another_and_a_large_weight_gets_its_own():
    sizes: list[int] = []
    place = pages.Pages(_memory(sizes)).place
    third = torch.ones(pages.CHUNK // 3, dtype=torch.uint8)
    first, second, _ = place(third), place(third), place(third)  # the third does not fit
    assert sizes == [pages.CHUNK, pages.CHUNK]
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    large = place(torch.zeros(pages.CHUNK // 2, dtype=torch.int16))  # CHUNK bytes
    assert sizes == [pages.CHUNK, pages.CHUNK, pages.CHUNK] and _start(large) == 0
    small = place(torch.ones(10, dtype=torch.uint8))  # back in the second chunk
    assert len(sizes) == 3 and _start(small) == pages.ALIGN * -(-len(third) // pages.ALIGN)


def test_a_weight_keeps_its_chunk_after_the_load():
    sizes: list[int] = []
    weight = torch.arange(1000, dtype=torch.float32)
    copy = pages.Pages(_memory(sizes)).place(weight)
    gc.collect()
    assert torch.equal(copy, weight)


@pytest.mark.skipif(cpu.ops() is None, reason="the CPU kernels cannot be built here")
def test_streamed_weights_share_huge_pages_during_a_load_only():
    a, b = torch.randn(64, 64), torch.randn(32, 8).to(torch.bfloat16)
    with pages.shared():
        copies = [pages.streamed(a), pages.streamed(b)]
    storages = {c.untyped_storage().data_ptr() for c in copies}
    assert len(storages) == 1 and storages.pop() % (2 << 20) == 0
    apart = [pages.streamed(a), pages.streamed(b)]
    assert len({c.untyped_storage().data_ptr() for c in apart}) == 2
    for c, w in zip(copies + apart, [a, b, a, b], strict=True):
        assert torch.equal(c, w) and c.is_contiguous()


@pytest.mark.skipif(cpu.ops() is None, reason="the CPU kernels cannot be built here")
def test_zeros_in_pages_are_zeros_of_the_shape():
    cache = pages.zeros((3, 2, 5, 64), torch.bfloat16)
    assert cache.shape == (3, 2, 5, 64) and cache.dtype == torch.bfloat16
    assert cache.is_contiguous() and not cache.any()
    assert cache.untyped_storage().data_ptr() % (2 << 20) == 0

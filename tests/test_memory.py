"""llmkit/memory.py freeze_heap: what is garbage already is collected, what lives is frozen
out of the collector's passes, and what comes after is still collected."""

from __future__ import annotations

import gc
import weakref

from llmkit.memory import freeze_heap


class _Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it


def test_freeze_heap_collects_the_garbage_then_freezes_the_living():
    gc.unfreeze()
    dead, alive = _Node(), _Node()
    dead_ref = weakref.ref(dead)
    del dead
    try:
        freeze_heap()
        assert dead_ref() is None  # collected before the freeze
        assert gc.get_freeze_count() > 0
        frozen_count = gc.get_freeze_count()
        later = _Node()
        later_ref = weakref.ref(later)
        del later
        gc.collect()
        assert later_ref() is None  # made after the freeze: collected as usual
        assert gc.get_freeze_count() == frozen_count and alive.me is alive
    finally:
        gc.unfreeze()

"""Paged KV-cache blocks: allocation with ref counts, and prefix caching (pure Python).

A block holds the K/V of `block_size` consecutive tokens of a sequence. A full block is named
by a chained hash (the previous block's hash and its own token ids), so two sequences with the
same prefix share its blocks. Freed blocks that hold a cached prefix stay findable until they
are reused, least recently freed first (LRU eviction).
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Sequence as Blocks

from llmkit.runtime.sequence import Sequence


class Block:
    __slots__ = ("block_id", "hash", "lora_id", "ref_count", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()
        self.lora_id = 0  # K/V computed under this adapter are its own


class BlockManager:
    """Owns the block pool; sequences hold block ids in `seq.block_table`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = _new_blocks(num_blocks)
        # Free block ids, reused from the front: uncached blocks first, then cached ones in
        # the order they were freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_hit_blocks = 0  # full blocks taken from the prefix cache, all told
        # Blocks that have ever held tokens: on CPU the cache's pages are committed as blocks
        # are first written, so memory grows with this count up to the whole cache.
        self._touched = bytearray(num_blocks)
        self.num_touched_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds (freed blocks that still cache a prefix are free)."""
        return len(self.blocks) - len(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of a new sequence's tokens. Only full blocks, and
        never all of its tokens: the last one is always computed to produce logits. None
        for a sequence that wants prompt log probabilities: those need every prompt token."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits: list[int] = []
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // self.block_size)):
            block_id = self._cached.get(h)
            bs = self.block_size
            block = None if block_id is None else self.blocks[block_id]
            if block is None or (block.lora_id, block.token_ids) != (
                seq.lora_id,
                tuple(seq.tokens(i * bs, (i + 1) * bs)),
            ):  # a hash collision must not hand out someone else's K/V
                break
            hits.append(block_id)
        self.num_hit_blocks += len(hits)
        return hits

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: Blocks[int] = ()) -> bool:
        """Can `seq` compute `num_new_tokens` more tokens (after taking cached `hits`)?"""
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self._num_new_blocks(seq, num_new_tokens, hits) + reclaimed <= len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """The free blocks a running `seq` takes to compute `num_new_tokens` more tokens."""
        return self._num_new_blocks(seq, num_new_tokens, ())

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: Blocks[int] = ()) -> None:
        """Give `seq` the blocks for `num_new_tokens` more tokens; `hits` (from
        `computed_blocks`, for a sequence with no blocks yet) become its first blocks."""
        num_new_blocks = self._num_new_blocks(seq, num_new_tokens, hits)
        if hits:
            for block_id in hits:
                self._take(block_id)
            seq.block_table = list(hits)
            seq.num_hashed_blocks = len(hits)
            seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        for _ in range(num_new_blocks):
            block_id = next(iter(self._free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
            if not self._touched[block_id]:
                self._touched[block_id] = 1
                self.num_touched_blocks += 1

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`; cached ones stay findable until reused."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if self._cached.get(block.hash) != block_id:
                    self._free.move_to_end(block_id, last=False)  # nothing to keep: reuse first
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def truncate(self, seq: Sequence) -> None:
        """Release the blocks of `seq` past its computed tokens: the slots speculated tokens
        took that were not accepted (their K/V were never registered in the prefix cache)."""
        keep = self.num_blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                self._free.move_to_end(block_id, last=False)

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the blocks `seq` has filled completely, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        # computed tokens can run ahead of the sequence's tokens for a moment: accepted
        # speculated tokens are appended after the step is recorded
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        hashes = self._hashes(seq, num_full)
        bs = self.block_size
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = hashes[i], tuple(seq.tokens(i * bs, (i + 1) * bs))
            block.lora_id = seq.lora_id
            self._cached.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, hits: Blocks[int]) -> int:
        start = max(seq.num_computed_tokens, len(hits) * self.block_size)
        needed = self.num_blocks_for(start + num_new_tokens)
        return max(0, needed - len(seq.block_table) - len(hits))

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the first `num_blocks` full blocks (memoised on the sequence)."""
        bs = self.block_size
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else ("lora", seq.lora_id)  # adapters differ
            seq.block_hashes.append(hash((parent, tuple(seq.tokens(i * bs, (i + 1) * bs)))))
        return seq.block_hashes[:num_blocks]

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        """A free block is about to hold new tokens: forget the prefix it cached."""
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]
        block.hash, block.token_ids = None, ()


def _new_blocks(num_blocks: int) -> list[Block]:
    """The pool's blocks, made with the garbage collector paused: allocating them would set
    off collections, and the full ones walk every object in the process (all of torch's in
    an engine), so a pool's start-up would grow with the process's objects, not its blocks."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [Block(i) for i in range(num_blocks)]
    finally:
        if enabled:
            gc.enable()

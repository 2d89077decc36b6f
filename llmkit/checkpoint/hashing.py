"""Content hashes of checkpoint files and tensors (xxh3-128: fast enough to hash while
copying at memory speed; these guard against corruption and mix-ups, not tampering)."""

from __future__ import annotations

from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
_CHUNK = 16 * 2**20


def new_hash() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def file_hash(path: Path) -> str:
    """Hash of a whole file, read sequentially."""
    h = new_hash()
    with path.open("rb") as f:
        while data := f.read(_CHUNK):
            h.update(data)
    return h.hexdigest()


class SequentialHash:
    """Hashes a file from the pieces its reader reads anyway, when they arrive in order.

    `feed(position, data)` is called with every piece read; if a piece arrives out of order,
    hashing is abandoned and `hexdigest()` reads the file again instead, so the result is
    always the hash of the whole file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._hash = new_hash()
        self._position = 0
        self._in_order = True

    def feed(self, position: int, data: memoryview | bytes) -> None:
        if self._in_order and position == self._position:
            self._hash.update(data)
            self._position += len(data)
        elif position + len(data) > self._position:  # a gap or a re-read that goes further
            self._in_order = False

    def hexdigest(self) -> str:
        if self._in_order and self._position == self.path.stat().st_size:
            return self._hash.hexdigest()
        return file_hash(self.path)

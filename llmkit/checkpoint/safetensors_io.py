"""Safetensors files without the safetensors package: header parsing and a streaming writer.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes.
The JSON maps names to {dtype, shape, data_offsets=[begin, end)} relative to the byte
buffer, plus an optional `__metadata__` of strings. Writing the header first and then
each tensor's bytes as they are produced keeps memory bounded by one chunk.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeVar

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.hashing import new_hash
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_HEADER_BYTES = 100_000_000  # the same sanity limit the reference reader applies


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code, shape and absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0 (the whole tensor for scalars)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


def read_row_bytes(f: BinaryIO, info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor as raw bytes, uint8 [rows, row_bytes], read with one
    `readinto` (no memory map, so RSS stays at what is asked for)."""
    import numpy as np

    rows = info.shape[0] if info.shape else 1
    start, stop = max(0, start), min(stop, rows)
    out = np.empty((max(0, stop - start), info.row_bytes), dtype=np.uint8)
    f.seek(info.begin + start * info.row_bytes)
    if out.size and f.readinto(memoryview(out).cast("B")) != out.size:
        raise LlmkitError(f"{info.file} ended early while reading {info.name!r}")
    return out


def map_row_bytes(f: BinaryIO, info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor as raw bytes, uint8 [rows, row_bytes], read-only, in a
    memory map of just those rows: no copy into this process, and the map goes when the last
    view of it does, so RSS stays at what is held."""
    import numpy as np

    rows = info.shape[0] if info.shape else 1
    start, stop = max(0, start), min(stop, rows)
    size = max(0, stop - start) * info.row_bytes
    if size == 0:
        return np.empty((0, info.row_bytes), dtype=np.uint8)
    position = info.begin + start * info.row_bytes
    skip = position % mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(f.fileno(), skip + size, offset=position - skip, access=mmap.ACCESS_READ)
    except ValueError:  # past the end of the file
        raise LlmkitError(f"{info.file} ended early while reading {info.name!r}") from None
    if hasattr(mmap, "MADV_SEQUENTIAL"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mapped, np.uint8, size, skip).reshape(-1, info.row_bytes)


def read_rows(f: BinaryIO, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor as a torch tensor of its dtype."""
    return rows_as_tensor(read_row_bytes(f, info, start, stop), info)


def rows_as_tensor(data: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """Row bytes uint8 [rows, row_bytes] of `info`'s tensor, viewed as its dtype and shape."""
    import torch

    shape = (data.shape[0], *info.shape[1:]) if info.shape else ()
    return torch.from_numpy(data.reshape(-1)).view(dtypes.to_torch(info.dtype)).reshape(shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors by name, metadata)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise LlmkitError(f"corrupt safetensors file {path}: shorter than its 8-byte header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise LlmkitError(
                f"corrupt safetensors file {path}: header length {header_len} exceeds the file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmkitError(f"corrupt safetensors file {path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise LlmkitError(f"corrupt safetensors file {path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors = {name: _parse_entry(path, name, entry, base) for name, entry in header.items()}
    _check_coverage(path, tensors, base, size)
    return tensors, metadata


def _parse_entry(path: Path, name: str, entry: object, base: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (TypeError, KeyError, ValueError) as e:
        raise LlmkitError(
            f"corrupt safetensors file {path}: bad entry for {name!r} ({e})"
        ) from None
    if not dtypes.is_known(dtype):
        raise LlmkitError(f"unsupported dtype {dtype!r} for tensor {name!r} in {path}")
    info = TensorInfo(name, path, dtype, shape, base + int(begin), base + int(end))
    if any(d < 0 for d in shape) or info.end - info.begin != info.nbytes:
        raise LlmkitError(
            f"corrupt safetensors file {path}: tensor {name!r} has shape {list(shape)} "
            f"but {info.end - info.begin} bytes"
        )
    return info


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    # The byte buffer must be exactly tiled by the tensors: no holes, no overlaps, no overrun.
    position = base
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise LlmkitError(
                f"corrupt safetensors file {path}: tensor {info.name!r} starts at data byte "
                f"{info.begin - base}, expected {position - base}"
            )
        position = info.end
    if position > size:
        raise LlmkitError(
            f"corrupt safetensors file {path}: data needs {position - base} bytes, file holds "
            f"{size - base} (truncated?)"
        )


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor to write, produced lazily: `chunks()` yields row-major pieces in `dtype`
    (torch tensors) or as raw bytes (numpy uint8 arrays)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


class Entry(Protocol):
    """What a file's header needs of a tensor (TensorSpec and TensorInfo both are one)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...


E = TypeVar("E", bound=Entry)


def file_layout(specs: list[E]) -> list[E]:
    """Order tensors so each starts aligned to its element size (largest items first)."""
    return sorted(specs, key=lambda s: -dtypes.itemsize(s.dtype))


def encode_header(specs: list[E], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: Path,
    specs: list[TensorSpec],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """Write `specs` (already in file order) to `path`, streaming each tensor's chunks; the
    file's content hash (hashing.file_hash's), computed as the bytes go out.

    Chunks are produced (read, converted) on this thread while a background thread writes
    and hashes the previous ones: the two overlap, and at most `_QUEUE_DEPTH` are held.
    """
    header = encode_header(specs, metadata)
    digest = new_hash()

    def write(data) -> None:
        f.write(data)
        digest.update(data)

    with path.open("wb") as f:
        preallocate(f, len(header) + sum(s.nbytes for s in specs))
        write(header)
        with BackgroundWriter(write) as writer:
            for spec in specs:
                written = 0
                for chunk in spec.chunks():
                    data = _chunk_bytes(chunk, spec)
                    writer.write(data)
                    written += len(data)
                    if on_bytes is not None:
                        on_bytes(len(data))
                if written != spec.nbytes:
                    raise RuntimeError(
                        f"{spec.name}: produced {written} bytes, expected {spec.nbytes}"
                    )
    return digest.hexdigest()


_QUEUE_DEPTH = 2


class BackgroundWriter:
    """Hands items to `sink` on a worker thread, in order; re-raises the sink's errors.

    Reading and converting the next chunk on the calling thread then overlaps with writing
    the previous one (file writes release the GIL). At most `depth` items wait.
    """

    def __init__(self, sink: Callable[[object], object], depth: int = _QUEUE_DEPTH):
        self._sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error

    def write(self, item: object) -> None:
        self.check()
        self._queue.put(item)

    def check(self) -> None:
        """Re-raise the sink's error, if it failed (items after a failure are not written)."""
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._sink(item)
                except BaseException as e:  # handed to the producing thread
                    self._error = e


def preallocate(f: BinaryIO, size: int) -> None:
    # Reserving the extents up front spares the filesystem allocating as it goes, which made
    # large writes after a `sync` markedly faster on ext4.
    if size > 0 and hasattr(os, "posix_fallocate"):
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, size)


def _chunk_bytes(chunk: torch.Tensor | np.ndarray, spec: TensorSpec) -> memoryview:
    import numpy as np

    if isinstance(chunk, np.ndarray):  # raw bytes, already in the file's encoding
        return memoryview(np.ascontiguousarray(chunk, dtype=np.uint8)).cast("B")
    if dtypes.from_torch(chunk.dtype) != spec.dtype:
        raise RuntimeError(f"{spec.name}: chunk dtype {chunk.dtype}, expected {spec.dtype}")
    return as_bytes(chunk)


def as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (little-endian, as safetensors stores it)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())

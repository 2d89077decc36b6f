"""Safetensors files without the safetensors package: header parsing and a streaming writer.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes.
The JSON maps names to {dtype, shape, data_offsets=[begin, end)} relative to the byte
buffer, plus an optional `__metadata__` of strings. Writing the header first and then
each tensor's bytes as they are produced keeps memory bounded by one chunk.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from llmkit.checkpoint import dtypes
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the same sanity limit the reference reader applies


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code, shape and byte range in the data buffer."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


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
    tensors = {name: _parse_entry(path, name, entry) for name, entry in header.items()}
    _check_coverage(path, tensors, size - 8 - header_len)
    return tensors, metadata


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (TypeError, KeyError, ValueError) as e:
        raise LlmkitError(
            f"corrupt safetensors file {path}: bad entry for {name!r} ({e})"
        ) from None
    if not dtypes.is_known(dtype):
        raise LlmkitError(f"unsupported dtype {dtype!r} for tensor {name!r} in {path}")
    info = TensorInfo(name, path, dtype, shape, int(begin), int(end))
    if any(d < 0 for d in shape) or info.end - info.begin != info.nbytes:
        raise LlmkitError(
            f"corrupt safetensors file {path}: tensor {name!r} has shape {list(shape)} "
            f"but {info.end - info.begin} bytes"
        )
    return info


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], buffer_len: int) -> None:
    # The byte buffer must be exactly tiled by the tensors: no holes, no overlaps, no overrun.
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise LlmkitError(
                f"corrupt safetensors file {path}: tensor {info.name!r} starts at byte "
                f"{info.begin}, expected {position}"
            )
        position = info.end
    if position > buffer_len:
        raise LlmkitError(
            f"corrupt safetensors file {path}: data needs {position} bytes, file holds "
            f"{buffer_len} (truncated?)"
        )


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor to write, produced lazily: `chunks()` yields row-major pieces in `dtype`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


def file_layout(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Order tensors so each starts aligned to its element size (largest items first)."""
    return sorted(specs, key=lambda s: -dtypes.itemsize(s.dtype))


def encode_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
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
) -> None:
    """Write `specs` (already in file order) to `path`, streaming each tensor's chunks."""
    with path.open("wb") as f:
        f.write(encode_header(specs, metadata))
        for spec in specs:
            written = sum(_write_chunk(f, c, spec, on_bytes) for c in spec.chunks())
            if written != spec.nbytes:
                raise RuntimeError(f"{spec.name}: produced {written} bytes, expected {spec.nbytes}")


def _write_chunk(
    f: BinaryIO, chunk: torch.Tensor, spec: TensorSpec, on_bytes: Callable[[int], None] | None
) -> int:
    if dtypes.from_torch(chunk.dtype) != spec.dtype:
        raise RuntimeError(f"{spec.name}: chunk dtype {chunk.dtype}, expected {spec.dtype}")
    data = as_bytes(chunk)
    f.write(data)
    if on_bytes is not None:
        on_bytes(len(data))
    return len(data)


def as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (little-endian, as safetensors stores it)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())

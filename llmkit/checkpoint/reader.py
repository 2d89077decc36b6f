"""Open a Hugging Face checkpoint directory lazily: headers now, tensor bytes on demand."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from llmkit.arch.shapes import check_shapes
from llmkit.checkpoint import dtypes
from llmkit.checkpoint.safetensors_io import (
    TensorInfo,
    as_bytes,
    map_row_bytes,
    read_header,
    read_row_bytes,
    read_rows,
)
from llmkit.checkpoint.writer import SAFETENSORS_INDEX
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import numpy as np
    import torch

BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_CHUNK_BYTES = 16 * 2**20  # small enough to stay in cache, large enough to amortise
T = TypeVar("T")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class Checkpoint:
    """A checkpoint directory: config, tensor index, and lazy access to tensor data."""

    def __init__(
        self,
        path: Path,
        config: dict,
        tensors: dict[str, TensorInfo],
        fmt: str,
        handles: dict[Path, Any] | None = None,
    ):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.format = fmt  # "safetensors" or "bin"
        self._handles: dict[Path, Any] = dict(handles or {})

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            if hasattr(handle, "close"):
                handle.close()
        self._handles.clear()

    @property
    def weight_files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0, reading only those bytes from disk."""
        info = self.tensors[name]
        handle = self._handle(info.file)
        if self.format == "safetensors":
            return read_rows(handle, info, start, stop)
        tensor = handle[name]
        return tensor[start:stop] if tensor.dim() else tensor

    def read_row_bytes(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along dim 0 as raw bytes, uint8 [rows, row_bytes]."""
        import numpy as np

        info = self.tensors[name]
        if self.format == "safetensors":
            return read_row_bytes(self._handle(info.file), info, start, stop)
        data = np.frombuffer(as_bytes(self.read_rows(name, start, stop)), dtype=np.uint8)
        return data.reshape(-1, info.row_bytes)

    def map_row_bytes(self, name: str, start: int, stop: int) -> np.ndarray:
        """As read_row_bytes, but read-only and memory-mapped where the format allows (a
        copy fewer, for callers that only pass the bytes on)."""
        info = self.tensors[name]
        if self.format == "safetensors":
            return map_row_bytes(self._handle(info.file), info, start, stop)
        return self.read_row_bytes(name, start, stop)

    def iter_row_chunks(
        self, name: str, max_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[torch.Tensor]:
        """Yield a tensor as consecutive blocks of rows, each at most ~`max_bytes`."""
        info = self.tensors[name]
        read = partial(self.read_rows, name)
        for _, rows in row_chunks(read, info.dtype, info.shape, max_bytes):
            yield rows

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            opener = (lambda f: f.open("rb")) if self.format == "safetensors" else _load_bin
            self._handles[file] = opener(file)
        return self._handles[file]


def row_chunks(
    read: Callable[[int, int], T],
    dtype: str,
    shape: tuple[int, ...],
    max_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[tuple[int, T]]:
    """(first row, rows) of a tensor read by `read(start, stop)`, ~`max_bytes` at a time
    (a tensor without rows gives one empty read)."""
    rows = shape[0] if shape else 1
    step = max(1, max_bytes // max(1, math.prod(shape[1:]) * dtypes.itemsize(dtype)))
    for start in range(0, max(rows, 1), step):
        yield start, read(start, start + step)


def open_checkpoint(source: str | Path, revision: str | None = None) -> Checkpoint:
    """Open a local checkpoint directory, or download one by hub id (`org/name`)."""
    return load_dir(local_dir(source, revision))


def local_dir(source: str | Path, revision: str | None = None) -> Path:
    """A checkpoint directory: `source` itself, or a hub id's downloaded snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LlmkitError(f"{source} is a file; give the checkpoint's directory")
    if _HUB_ID.fullmatch(str(source)) and "/" in str(source):
        from llmkit.checkpoint.hub import download

        return download(str(source), revision)
    raise LlmkitError(f"no checkpoint directory at {source} (and it is not a hub id like org/name)")


def load_dir(path: Path) -> Checkpoint:
    """Open a checkpoint directory (headers only), refusing one whose tensors contradict its
    config.json."""
    config = read_json(path / "config.json", what="config")
    tensors = _index(path, SAFETENSORS_INDEX, "*.safetensors", _safetensors_infos)
    if tensors:
        check_shapes(config, {n: t.shape for n, t in tensors.items()}, str(path))
        return Checkpoint(path, config, tensors, "safetensors")
    loaded: dict[Path, dict] = {}  # memory-mapped state dicts, kept as the file handles
    tensors = _index(path, BIN_INDEX, "pytorch_model*.bin", lambda f: _bin_infos(f, loaded))
    if tensors:
        check_shapes(config, {n: t.shape for n, t in tensors.items()}, str(path))
        return Checkpoint(path, config, tensors, "bin", handles=loaded)
    raise LlmkitError(f"no weights in {path}: expected *.safetensors or pytorch_model*.bin files")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise LlmkitError(f"not a Hugging Face checkpoint: {path.parent} has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmkitError(f"{what} file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LlmkitError(f"{what} file {path} must hold a JSON object")
    return data


def _index(
    path: Path, index_name: str, pattern: str, read_infos: Callable[[Path], dict]
) -> dict[str, TensorInfo]:
    """Tensors of the files an index names (or that match `pattern`), checked for overlaps."""
    weight_map: dict[str, str] = {}
    if (path / index_name).is_file():
        weight_map = read_json(path / index_name, what="index").get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob(pattern))
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise LlmkitError(f"shard {file.name} listed in {index_name} is missing")
        _merge(tensors, read_infos(file))
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].file.name != file:
            raise LlmkitError(f"{index_name} puts {name!r} in {file}, which lacks it")
    return tensors


def _safetensors_infos(file: Path) -> dict[str, TensorInfo]:
    return read_header(file)[0]


def _bin_infos(file: Path, loaded: dict[Path, dict]) -> dict[str, TensorInfo]:
    loaded[file] = state = _load_bin(file)
    return {
        name: TensorInfo(name, file, dtypes.from_torch(t.dtype), tuple(t.shape))
        for name, t in state.items()
    }


def _merge(tensors: dict[str, TensorInfo], infos: dict[str, TensorInfo]) -> None:
    for name, info in infos.items():
        if name in tensors:
            raise LlmkitError(
                f"tensor {name!r} appears in both {tensors[name].file.name} and {info.file.name}"
            )
        tensors[name] = info


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """`torch.load` with `weights_only=True` (no pickled code runs), memory-mapped when possible."""
    import pickle

    import torch

    if not file.is_file():
        raise LlmkitError(f"weights file {file} is missing")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise LlmkitError(f"cannot read {file} as a weights-only torch checkpoint: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise LlmkitError(f"{file} does not hold a flat dict of tensors (a state_dict)")
    return state

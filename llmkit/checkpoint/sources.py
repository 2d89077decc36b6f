"""What shard, merge and verify read: whole tensors as raw row bytes, uint8 [rows, row_bytes].

Two kinds: a Hugging Face checkpoint directory, and a sharded directory seen through its
manifest as the checkpoint it was cut from (so resharding and merging are the same copy
loop as sharding). Bytes are never interpreted, so every dtype and packed format passes
through bit-exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llmkit.arch.plan import TensorPlan
from llmkit.checkpoint import dtypes
from llmkit.checkpoint.hashing import ALGORITHM, SequentialHash
from llmkit.checkpoint.manifest import MANIFEST, Manifest, read_manifest
from llmkit.checkpoint.reader import Checkpoint, open_checkpoint, read_json
from llmkit.checkpoint.safetensors_io import TensorInfo, map_row_bytes, read_header

Meta = tuple[str, tuple[int, ...]]  # (dtype code, shape)


def row_bytes(meta: Meta) -> int:
    dtype, shape = meta
    return math.prod(shape[1:]) * dtypes.itemsize(dtype)


class CheckpointSource:
    """A checkpoint directory; its weight files are hashed from the bytes read in order."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.path = ck.path
        self.config = ck.config
        self.tensors: dict[str, Meta] = {n: (i.dtype, i.shape) for n, i in ck.tensors.items()}
        self.dropped: tuple[str, ...] = ()  # dropped by earlier resharding
        self._hashes = {f: SequentialHash(f) for f in ck.weight_files}
        if ck.format == "safetensors":
            self._feed_headers()

    def order(self) -> list[str]:
        """Names in file order, so that reading them all reads each file front to back."""
        infos = self.ck.tensors
        return sorted(infos, key=lambda n: (infos[n].file, infos[n].begin))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        data = self.ck.map_row_bytes(name, start, stop)
        info = self.ck.tensors[name]
        if self.ck.format == "safetensors" and data.size:
            position = info.begin + max(0, start) * info.row_bytes
            self._hashes[info.file].feed(position, memoryview(data).cast("B"))
        return data

    def record(self) -> dict:
        """Where the tensors came from: path and each weight file's size and hash."""
        files = {
            f.name: {"bytes": f.stat().st_size, ALGORITHM: h.hexdigest()}
            for f, h in sorted(self._hashes.items())
        }
        return {"path": str(self.path), "format": self.ck.format, "files": files}

    def close(self) -> None:
        self.ck.close()

    def _feed_headers(self) -> None:
        for file, h in self._hashes.items():
            begins = [i.begin for i in self.ck.tensors.values() if i.file == file]
            with file.open("rb") as f:
                h.feed(0, f.read(min(begins, default=file.stat().st_size)))


class ShardedSource:
    """A sharded directory presented as the whole tensors it was cut from (padding removed,
    replicas read once, tied copies left out)."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        headers: dict[str, dict[str, TensorInfo]] | None = None,
    ):
        self.path = directory
        self.manifest = manifest
        self.config = read_json(directory / "config.json", what="config")
        self.plans = {n: p for n, p in manifest.plans.items() if not p.is_copy}
        self.tensors: dict[str, Meta] = {n: (p.dtype, p.shape) for n, p in self.plans.items()}
        self.dropped = tuple(manifest.data["dropped"])
        self._infos: dict[str, dict[str, TensorInfo]] = dict(headers or {})  # file -> header
        self._handles: dict[str, BinaryIO] = {}

    def order(self) -> list[str]:
        return list(self.plans)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        plan = self.plans[name]
        rows = plan.shape[0] if plan.shape else 1
        start, stop = max(0, start), min(stop, rows)
        if plan.dim is None:
            return self.rank_rows(plan.name, 0, start, stop)
        if plan.dim == 0:
            return self._row_split(plan, start, stop)
        return self._column_split(plan, start, stop)

    def rank_rows(self, name: str, tp_rank: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one rank's copy of `name`, as stored (padding included)."""
        file = self.manifest.files[name, tp_rank]
        return map_row_bytes(self._handle(file), self.rank_info(name, tp_rank), start, stop)

    def rank_info(self, name: str, tp_rank: int) -> TensorInfo:
        file = self.manifest.files[name, tp_rank]
        if file not in self._infos:
            self._infos[file] = read_header(self.path / file)[0]
        return self._infos[file][name]

    def record(self) -> dict:
        """The original source, plus the layout it was resharded from."""
        previous = {"path": str(self.path), "tp": self.manifest.tp, "pp": self.manifest.pp}
        return {**self.manifest.data["source"], "resharded_from": previous}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _row_split(self, plan: TensorPlan, start: int, stop: int) -> np.ndarray:
        pieces = []
        for part in plan.holders():
            a, b = max(start, part.offset), min(stop, part.offset + part.length)
            if a < b:
                pieces.append(
                    self.rank_rows(plan.name, part.tp_rank, a - part.offset, b - part.offset)
                )
        return (
            np.concatenate(pieces)
            if pieces
            else np.empty((0, row_bytes(self.tensors[plan.name])), np.uint8)
        )

    def _column_split(self, plan: TensorPlan, start: int, stop: int) -> np.ndarray:
        # A rank's rows are [outer, length, inner] bytes; the source's are the parts side by
        # side along the middle axis, without the padding columns.
        inner = math.prod(plan.shape[plan.dim + 1 :]) * dtypes.itemsize(plan.dtype)
        size = plan.shape[plan.dim]
        pieces = []
        for part in plan.holders():
            real = min(part.length, size - part.offset)
            if real > 0:
                data = self.rank_rows(plan.name, part.tp_rank, start, stop)
                pieces.append(data.reshape(-1, part.length, inner)[:, :real])
        return np.concatenate(pieces, axis=1).reshape(
            stop - start, row_bytes(self.tensors[plan.name])
        )

    def _handle(self, file: str) -> BinaryIO:
        if file not in self._handles:
            self._handles[file] = (self.path / file).open("rb")
        return self._handles[file]


def open_source(source: str | Path, revision: str | None = None):
    """A sharded directory (it has llmkit-shards.json) or any checkpoint open_checkpoint reads."""
    path = Path(source).expanduser()
    if (path / MANIFEST).is_file():
        return ShardedSource(path, read_manifest(path))
    return CheckpointSource(open_checkpoint(source, revision))

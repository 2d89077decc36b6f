"""Write a tp x pp layout: one pass over the source, each tensor read once in row chunks and
its slices written straight to every rank's file at their final offsets.

Every rank file's header is known from the plan, so all files are laid out and opened up
front; a chunk of source rows then yields, per distinct slice, one piece that is written to
each rank holding that slice and hashed once. Memory stays at about one chunk.
"""

from __future__ import annotations

import math
import os
import queue
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.atomic import atomic_output_dir, check_output_dir
from llmkit.checkpoint.hashing import new_hash
from llmkit.checkpoint.reader import DEFAULT_CHUNK_BYTES, row_chunks
from llmkit.checkpoint.safetensors_io import (
    BackgroundWriter,
    TensorInfo,
    encode_header,
    file_layout,
    preallocate,
)
from llmkit.checkpoint.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ProgressFn,
    copy_aux_files,
    parse_size,
    plan_shards,
    write_json,
)
from llmkit.errors import LlmkitError
from llmkit.memory import peak_rss
from llmkit.shard import manifest
from llmkit.shard.plan import DEFAULT_VOCAB_PAD, ShardPlan, Slice, TensorPlan, make_plan
from llmkit.shard.sources import Meta, open_source, row_bytes

Rank = tuple[int, int]  # (tp_rank, pp_rank)


@dataclass(frozen=True, slots=True)
class ShardReport:
    output: str
    tp: int
    pp: int
    stages: list[list[int]]
    num_tensors: int
    num_files: int
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    rules: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def shard(
    src: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    pp_layers: tuple[int, ...] | None = None,
    vocab_pad: int = DEFAULT_VOCAB_PAD,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> ShardReport:
    """Reshard `src` (a checkpoint or a sharded directory) for tp x pp into `out`, atomically."""
    started = time.perf_counter()
    out = Path(out)
    max_bytes = parse_size(max_shard_size)
    check_output_dir(out.absolute(), overwrite)
    source = open_source(src, revision)
    try:
        if out.absolute() == Path(source.path).absolute():
            raise LlmkitError("output directory must differ from the source")
        plan = make_plan(source.config, source.tensors, tp, pp, pp_layers, vocab_pad)
        bytes_in = sum(_nbytes(m) for m in source.tensors.values())
        with atomic_output_dir(out, overwrite) as tmp:
            data = _write(source, plan, tmp, max_bytes, progress, bytes_in)
    finally:
        source.close()
    return ShardReport(
        output=str(out.absolute()),
        tp=tp,
        pp=pp,
        stages=[list(s) for s in plan.stages],
        num_tensors=len(plan.tensors),
        num_files=len(data["files"]),
        bytes_in=bytes_in,
        bytes_out=sum(f["bytes"] for f in data["files"].values()),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss(),
        rules=plan.rules,
    )


def _write(
    source, plan: ShardPlan, tmp: Path, max_bytes: int, progress: ProgressFn | None, total: int
) -> dict:
    """Copy every tensor (`total` bytes), then write the manifest, config and tokenizer."""
    layout = _layout(plan, max_bytes)
    by_source: dict[str, list[TensorPlan]] = defaultdict(list)
    for p in plan.tensors:
        by_source[p.source].append(p)
    done = 0
    with _RankFiles(tmp, layout) as files:
        for name in source.order():
            done = _copy(source, name, by_source[name], plan.tp, files, done, progress, total)
    plan = replace(plan, dropped=(*source.dropped, *plan.dropped))
    data = manifest.build(
        plan, files.names, files.sizes, files.where_file, files.digests, source.record()
    )
    copy_aux_files(Path(source.path), tmp)
    write_json(tmp / "config.json", source.config)
    write_json(tmp / manifest.MANIFEST, data)
    return data


def _layout(plan: ShardPlan, max_bytes: int) -> dict[Rank, list[list[TensorInfo]]]:
    """Per rank, its files, each a list of tensor entries in file order."""
    entries: dict[Rank, list[TensorInfo]] = {
        (t, p): [] for p in range(plan.pp) for t in range(plan.tp)
    }
    for p in plan.tensors:
        for tp_rank in range(plan.tp):
            shape = p.rank_shape(tp_rank)
            entries[tp_rank, p.pp_rank].append(TensorInfo(p.name, Path(), p.dtype, shape))
    return {
        rank: [file_layout(f) for f in plan_shards(e, max_bytes)] for rank, e in entries.items()
    }


def _copy(
    source, name: str, plans: list[TensorPlan], tp: int, files: _RankFiles, done: int,
    progress: ProgressFn | None, total: int,
) -> int:  # fmt: skip
    """Stream one source tensor into every rank that holds part of it; returns bytes done."""
    holders = {p.name: _holders(p, tp) for p in plans}
    hashes = {(p.name, part): new_hash() for p in plans for part in holders[p.name]}
    for start, chunk in row_chunks(partial(source.read_rows, name), *source.tensors[name]):
        for p in plans:
            for part, ranks in holders[p.name].items():
                piece, position = _piece(p, part, chunk, start, files.scratch.take)
                if piece is not None:
                    files.write(p.name, ranks, position, piece)
                    hashes[p.name, part].update(memoryview(piece).cast("B"))
        files.scratch.release()  # once the chunk's pieces are written
        done += chunk.size
        if progress is not None:
            progress(done, total)
    for p in plans:
        for part, ranks in holders[p.name].items():
            _pad_rows(p, part, ranks, files, hashes[p.name, part])
            files.record_hash(p.name, ranks, hashes[p.name, part].hexdigest())
    return done


def _holders(p: TensorPlan, tp: int) -> dict[Slice | None, list[int]]:
    """Distinct slice -> the tp ranks holding it; a replicated tensor (None) is on every rank."""
    return {None: list(range(tp))} if p.dim is None else p.holders()


def _piece(
    p: TensorPlan,
    part: Slice | None,
    chunk: np.ndarray,
    start: int,
    scratch: Callable[[tuple[int, ...]], np.ndarray],
) -> tuple[np.ndarray | None, int]:
    """The part of source rows [start, start + len(chunk)) that `part` holds, and its byte
    position within the rank's tensor; a piece that must be gathered goes into `scratch`."""
    if part is None:
        return chunk, start * chunk.shape[1]
    offset, length = part.offset, part.length
    if p.dim == 0:
        a, b = max(start, offset), min(start + len(chunk), offset + length)
        if a >= b:
            return None, 0
        return chunk[a - start : b - start], (a - offset) * chunk.shape[1]
    # chunk rows as [outer, size, inner] bytes; the slice takes [offset, offset + length) of
    # the middle axis, zero-filled past the source size (vocab padding).
    size = p.shape[p.dim]
    inner = math.prod(p.shape[p.dim + 1 :]) * dtypes.itemsize(p.dtype)
    view = chunk.reshape(-1, size, inner)
    real = max(0, min(length, size - offset))
    piece = scratch((view.shape[0], length, inner))
    piece[:, :real] = view[:, offset : offset + real]
    piece[:, real:] = 0
    return piece, start * (chunk.shape[1] // size) * length


def _pad_rows(p: TensorPlan, part: Slice | None, ranks: list[int], files: _RankFiles, h) -> None:
    """Zero rows past the source's end, for a vocab split along dim 0."""
    if p.dim != 0 or p.padding == 0:
        return
    first = max(part.offset, p.shape[0])
    end = part.offset + part.length
    if first >= end:
        return
    zeros = np.zeros((end - first, row_bytes((p.dtype, p.shape))), np.uint8)
    files.write(p.name, ranks, (first - part.offset) * zeros.shape[1], zeros)
    h.update(memoryview(zeros).cast("B"))


def _nbytes(meta: Meta) -> int:
    return math.prod(meta[1]) * dtypes.itemsize(meta[0])


class _RankFiles:
    """Every rank's output files, open, with headers written and each tensor's byte offset."""

    def __init__(self, directory: Path, layout: dict[Rank, list[list[TensorInfo]]]):
        self.names: dict[Rank, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.where_file: dict[tuple[str, int], str] = {}
        self.digests: dict[tuple[str, int], str] = {}
        self._where: dict[tuple[str, int], tuple[BinaryIO, int]] = {}
        self._open: list[BinaryIO] = []
        self._writer = BackgroundWriter(_run_job, depth=4)
        self.scratch = _Scratch(2 * DEFAULT_CHUNK_BYTES, _SCRATCH_BUFFERS, self._writer)
        for (tp_rank, pp_rank), rank_layout in layout.items():
            names = manifest.rank_files(tp_rank, pp_rank, len(rank_layout))
            self.names[tp_rank, pp_rank] = names
            for file_name, entries in zip(names, rank_layout, strict=True):
                self._open_file(directory / file_name, entries, tp_rank)

    def _open_file(self, path: Path, entries: list[TensorInfo], tp_rank: int) -> None:
        header = encode_header(entries, {"format": "pt"})
        f = path.open("wb")
        self._open.append(f)
        size = len(header) + sum(e.nbytes for e in entries)
        preallocate(f, size)
        f.write(header)
        f.flush()
        position = len(header)
        for e in entries:
            self._where[e.name, tp_rank] = (f, position)
            self.where_file[e.name, tp_rank] = path.name
            position += e.nbytes
        self.sizes[path.name] = size

    def write(self, name: str, tp_ranks: list[int], position: int, data: np.ndarray) -> None:
        """Queue `data` for each rank's copy of `name`, at `position` within the tensor."""
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        for tp_rank in tp_ranks:
            f, begin = self._where[name, tp_rank]
            self._writer.write(partial(_pwrite_all, f.fileno(), view, begin + position))

    def record_hash(self, name: str, tp_ranks: list[int], digest: str) -> None:
        for tp_rank in tp_ranks:
            self.digests[name, tp_rank] = digest

    def __enter__(self) -> _RankFiles:
        self._writer.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._writer.__exit__(*exc)
        finally:
            for f in self._open:
                f.close()


_SCRATCH_BUFFERS = 3  # one being filled, the rest waiting to be written


class _Scratch:
    """Buffers for gathered pieces, reused chunk after chunk.

    Fresh memory is slow where a VM hands freed pages back to its host: touching 3 GB of new
    anonymous memory took 7.3-8 s after an idle pause against 0.45 s for memory just freed,
    so gathering into new arrays cost a 1B-parameter shard seconds. A chunk's pieces fill one
    buffer front to back; `writer` puts the buffer back once it has written them. A writer
    that failed puts nothing back: its error is raised instead of waiting for ever.
    """

    def __init__(self, nbytes: int, count: int, writer: BackgroundWriter):
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(np.empty(nbytes, np.uint8))
        self._writer = writer
        self._buffer: np.ndarray | None = None
        self._used = 0

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """Room for a gathered piece of the current chunk."""
        while self._buffer is None:
            try:
                self._buffer, self._used = self._free.get(timeout=0.1), 0
            except queue.Empty:
                self._writer.check()
        size = math.prod(shape)
        if self._used + size > len(self._buffer):  # a chunk of one huge row
            return np.empty(shape, np.uint8)
        self._used += size
        return self._buffer[self._used - size : self._used].reshape(shape)

    def release(self) -> None:
        """The current chunk's pieces are queued: its buffer goes back once they are written."""
        if self._buffer is not None:
            self._writer.write(partial(self._free.put, self._buffer))
            self._buffer = None


def _run_job(job: Callable[[], None]) -> None:
    job()


# Written 256 KiB a call: on a VM that hands freed memory back to its host, larger buffered
# writes ran 3-5x slower (the 3.0 GB of a 1B-parameter tp=4 pp=2 shard, gather memory kept:
# 4.3-5.2 s in whole pieces, 0.87-1.10 s in 256 KiB calls, 1.2-1.5 s in 64 KiB, 1.5-1.7 s in
# 512 KiB; benchmarks/RESULTS.md). Likely cause: the page cache then takes large folios from
# the high-order free blocks, which are the ones reported to the host.
_WRITE_BYTES = 256 * 2**10


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view[:_WRITE_BYTES], offset)
        view, offset = view[written:], offset + written

"""Write a tp x pp layout: one pass over the source, each tensor read once in row chunks and
its slices written straight to every rank's file at their final offsets.

Every rank file's header is known from the plan, so all files are laid out and opened up
front; a chunk of source rows then yields, per distinct slice, one piece that is written to
each rank holding that slice and hashed once. Two worker threads take the pieces; the
calling thread reads and hashes the source. Memory stays at a few chunks.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import xxhash

from llmkit.arch.plan import DEFAULT_VOCAB_PAD, ShardPlan, Slice, TensorPlan, make_plan
from llmkit.checkpoint import dtypes, manifest
from llmkit.checkpoint.atomic import atomic_output_dir, check_output_dir
from llmkit.checkpoint.hashing import new_hash
from llmkit.checkpoint.reader import DEFAULT_CHUNK_BYTES, row_chunks
from llmkit.checkpoint.safetensors_io import (
    TensorInfo,
    encode_header,
    file_layout,
    preallocate,
)
from llmkit.checkpoint.sources import Meta, open_source, row_bytes
from llmkit.checkpoint.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ProgressFn,
    copy_aux_files,
    parse_size,
    plan_shards,
    write_json,
)
from llmkit.memory import peak_rss

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
    check_output_dir(out.absolute(), overwrite, [src] if Path(src).exists() else [])
    source = open_source(src, revision)
    try:
        plan = make_plan(source.config, source.tensors, tp, pp, pp_layers, vocab_pad)
        bytes_in = sum(_nbytes(m) for m in source.tensors.values())
        with atomic_output_dir(out, overwrite, (source.path,)) as tmp:
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
    done, streams = 0, []
    with _RankFiles(tmp, layout) as files:
        with _Workers(_WORKERS, _QUEUE_DEPTH) as workers:
            for name in source.order():
                tensor_streams = _streams(by_source[name], plan.tp, files)
                done = _copy(source, name, tensor_streams, workers, done, progress, total)
                streams += tensor_streams
            copy_aux_files(Path(source.path), tmp)  # while the last pieces are written
            write_json(tmp / "config.json", source.config)
        for s in streams:
            files.record_hash(s.holders, s.hash.hexdigest())
    plan = replace(plan, dropped=(*source.dropped, *plan.dropped))
    data = manifest.build(
        plan, files.names, files.sizes, files.where_file, files.digests, source.record()
    )
    manifest.write(tmp, data)
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


@dataclass(eq=False, slots=True)
class _Stream:
    """One distinct slice of a source tensor: its pieces are written to every place that holds
    it and hashed once, in order. A tied copy cut the same way (lm_head) shares the stream."""

    plan: TensorPlan  # how the slice is cut
    part: Slice | None  # None: the whole tensor
    holders: list[tuple[str, int]] = field(default_factory=list)  # (name, tp_rank)
    targets: list[tuple[int, int]] = field(default_factory=list)  # (fd, tensor's position)
    hash: xxhash.xxh3_128 = field(default_factory=new_hash)
    queued: int = 0  # pieces handed to the workers
    hashed: int = 0  # pieces hashed so far
    waiting: dict[int, memoryview] = field(default_factory=dict)  # written, not yet hashed

    @property
    def contiguous(self) -> bool:
        """Whether its pieces are views of the source chunks, not gathered into a buffer."""
        return self.plan.dim in (None, 0)

    def holds(self, start: int, rows: int) -> bool:
        """Whether source rows [start, start + rows) have bytes in this slice."""
        if self.plan.dim != 0:
            return True
        return start < self.part.offset + self.part.length and self.part.offset < start + rows


def _streams(plans: list[TensorPlan], tp: int, files: _RankFiles) -> list[_Stream]:
    """The distinct slices of one source tensor, over all the tensors cut from it."""
    streams: dict[tuple, _Stream] = {}
    for p in plans:
        for part, ranks in _holders(p, tp).items():
            cut = (p.dim, p.padded, None if part is None else (part.offset, part.length))
            stream = streams.setdefault(cut, _Stream(p, part))
            for tp_rank in ranks:
                stream.holders.append((p.name, tp_rank))
                stream.targets.append(files.where(p.name, tp_rank))
    return list(streams.values())


def _copy(
    source, name: str, streams: list[_Stream], workers: _Workers, done: int,
    progress: ProgressFn | None, total: int,
) -> int:  # fmt: skip
    """Hand every piece of one source tensor to the workers; returns bytes done."""
    for start, chunk in row_chunks(partial(source.read_rows, name), *source.tensors[name]):
        for s in streams:
            if s.holds(start, len(chunk)):
                workers.submit(partial(_copy_piece, s, s.queued, chunk, start))
                s.queued += 1
        done += chunk.size
        if progress is not None:
            progress(done, total)
    for s in streams:
        padding = _pad_rows(s)
        if padding is not None:
            workers.submit(partial(_put, s, s.queued, *padding))
            s.queued += 1
    return done


def _holders(p: TensorPlan, tp: int) -> dict[Slice | None, list[int]]:
    """Distinct slice -> the tp ranks holding it; a replicated tensor (None) is on every rank."""
    return {None: list(range(tp))} if p.dim is None else p.holders()


def _copy_piece(
    s: _Stream, seq: int, chunk: np.ndarray, start: int, scratch: _Scratch, workers: _Workers
) -> None:
    piece, position = _piece(s.plan, s.part, chunk, start, scratch.take)
    _put(s, seq, piece, position, scratch, workers)


def _put(
    s: _Stream, seq: int, piece: np.ndarray, position: int, _: _Scratch, workers: _Workers
) -> None:
    """Write the stream's piece number `seq` at `position` of every copy and hash it. The
    thread's gather buffer (`_`) goes unused: the piece is ready, cut or padding.

    When the piece before it is already hashed, each block is hashed right after it is
    written, while it is still in cache. Otherwise the whole piece is written first, so that
    the thread never waits before writing, and then left to be hashed by the thread that
    hashes the piece before it; a piece in a gather buffer, which the thread reuses, waits
    for its turn instead.
    """
    view = memoryview(np.ascontiguousarray(piece)).cast("B")
    hash_now = workers.take_turn(s, seq)
    for a in range(0, len(view), _WRITE_BYTES):
        block = view[a : a + _WRITE_BYTES]
        for fd, begin in s.targets:
            _pwrite_all(fd, block, begin + position + a)
        if hash_now:
            s.hash.update(block)
    if hash_now:
        workers.end_turn(s)
    elif s.contiguous:
        workers.defer(s, seq, view)
    else:
        workers.in_turn(s, seq, partial(s.hash.update, view))


def _piece(
    p: TensorPlan,
    part: Slice | None,
    chunk: np.ndarray,
    start: int,
    scratch: Callable[[tuple[int, ...]], np.ndarray],
) -> tuple[np.ndarray, int]:
    """The part of source rows [start, start + len(chunk)) that `part` holds, and its byte
    position within the rank's tensor; a piece that must be gathered goes into `scratch`."""
    if part is None:
        return chunk, start * chunk.shape[1]
    offset, length = part.offset, part.length
    if p.dim == 0:
        a, b = max(start, offset), min(start + len(chunk), offset + length)
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


def _pad_rows(s: _Stream) -> tuple[np.ndarray, int] | None:
    """Zero rows past the source's end, for a vocab split along dim 0, and their position."""
    p, part = s.plan, s.part
    if p.dim != 0 or p.padding == 0:
        return None
    first = max(part.offset, p.shape[0])
    end = part.offset + part.length
    if first >= end:
        return None
    zeros = np.zeros((end - first, row_bytes((p.dtype, p.shape))), np.uint8)
    return zeros, (first - part.offset) * zeros.shape[1]


def _nbytes(meta: Meta) -> int:
    return math.prod(meta[1]) * dtypes.itemsize(meta[0])


class _RankFiles:
    """Every rank's output files, open, with headers written and each tensor's byte offset."""

    def __init__(self, directory: Path, layout: dict[Rank, list[list[TensorInfo]]]):
        self.names: dict[Rank, list[str]] = {}
        self.sizes: dict[str, int] = {}
        self.where_file: dict[tuple[str, int], str] = {}
        self.digests: dict[tuple[str, int], str] = {}
        self._where: dict[tuple[str, int], tuple[int, int]] = {}
        self._open: list[BinaryIO] = []
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
            self._where[e.name, tp_rank] = (f.fileno(), position)
            self.where_file[e.name, tp_rank] = path.name
            position += e.nbytes
        self.sizes[path.name] = size

    def where(self, name: str, tp_rank: int) -> tuple[int, int]:
        """(file descriptor, byte position) of a rank's copy of `name`."""
        return self._where[name, tp_rank]

    def record_hash(self, holders: list[tuple[str, int]], digest: str) -> None:
        for name, tp_rank in holders:
            self.digests[name, tp_rank] = digest

    def __enter__(self) -> _RankFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._open:
            f.close()


# Two threads copy into the page cache side by side: one thread copying every byte left the
# second core idle (benchmarks/shard.py measures it). Each worker gathers, writes and hashes
# whole pieces.
_WORKERS = 2
_QUEUE_DEPTH = 6  # pieces waiting; each holds its source chunk's memory map


class _Stopped(Exception):
    """Raised in a thread waiting for its turn once a worker has failed."""


class _Workers:
    """Threads taking pieces from one queue in the order they were submitted; the submitting
    thread does a piece itself when the queue is full.

    Any of them may write any piece, but a stream's pieces must be hashed in order. A piece
    whose turn has not come is left (`defer`) to whoever hashes the piece before it, or, in
    a gather buffer, waits (`in_turn`) until that piece is hashed. The earliest piece not
    yet done never waits, so no thread can block the others. The first error stops every
    worker and is re-raised to the submitting thread.
    """

    def __init__(self, count: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._turns = threading.Condition()
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        self._own_scratch = _Scratch()

    def submit(self, job: Callable[[_Scratch, _Workers], None]) -> None:
        """Queue `job`, or do it here while the queue is full: the workers have enough
        waiting, and this thread would otherwise sleep until there is room."""
        self.check()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            try:
                job(self._own_scratch, self)
            except _Stopped:  # a worker failed while this thread waited for a turn
                self.check()
                raise

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def in_turn(self, s: _Stream, seq: int, action: Callable[[], object]) -> None:
        """Run `action` (piece `seq` of `s`'s hashing) once pieces 0 .. seq-1 are hashed."""
        with self._turns:
            self._turns.wait_for(lambda: s.hashed == seq or self._error is not None)
            if self._error is not None:
                raise _Stopped
        action()
        self.end_turn(s)

    def take_turn(self, s: _Stream, seq: int) -> bool:
        """Whether piece `seq` of `s` may be hashed now; if so, `end_turn` must follow."""
        with self._turns:
            return s.hashed == seq

    def end_turn(self, s: _Stream) -> None:
        """Piece `s.hashed` is hashed; hash the written pieces left waiting right after it."""
        while True:
            with self._turns:
                s.hashed += 1
                self._turns.notify_all()
                waiting = s.waiting.pop(s.hashed, None)
            if waiting is None:
                return
            s.hash.update(waiting)

    def defer(self, s: _Stream, seq: int, view: memoryview) -> None:
        """Leave written piece `seq` of `s` to the thread that hashes piece seq-1, or hash it
        here if that is already done."""
        with self._turns:
            if s.hashed != seq:
                s.waiting[seq] = view
                return
        s.hash.update(view)
        self.end_turn(s)

    def __enter__(self) -> _Workers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[1] is not None:
            self._fail(exc[1])  # queued pieces are dropped, not written
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        if exc[0] is None:
            self.check()

    def _run(self) -> None:
        scratch = _Scratch()
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    job(scratch, self)
                except BaseException as e:  # handed to the submitting thread
                    self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._turns:
            if self._error is None:
                self._error = error
            self._turns.notify_all()


class _Scratch:
    """One worker's buffer for gathered pieces, reused piece after piece.

    Fresh memory is slow where a VM hands freed pages back to its host (the host must fault
    them in again), so gathering into new arrays made large shards markedly slower. A worker
    writes and hashes a piece before it takes the next, so the buffer is free again by then.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(2 * DEFAULT_CHUNK_BYTES, np.uint8)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        if size > len(self._buffer):  # a chunk of one huge row
            self._buffer = np.empty(size, np.uint8)
        return self._buffer[:size].reshape(shape)


# Written 256 KiB a call: on a VM that hands freed memory back to its host, larger buffered
# writes were slower, and smaller ones cost more calls. Likely cause: the page cache then
# takes large folios from the high-order free blocks, which are the ones reported to the host.
_WRITE_BYTES = 256 * 2**10


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view[:_WRITE_BYTES], offset)
        view, offset = view[written:], offset + written

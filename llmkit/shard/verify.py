"""`llmkit shard verify`: is a sharded directory complete and intact, and (given the source)
bit-exact with the checkpoint it was cut from?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from llmkit.checkpoint.hashing import ALGORITHM, new_hash
from llmkit.checkpoint.manifest import Manifest, read_manifest
from llmkit.checkpoint.reader import open_checkpoint, row_chunks
from llmkit.checkpoint.safetensors_io import TensorInfo, read_header
from llmkit.checkpoint.sources import CheckpointSource, ShardedSource
from llmkit.errors import LlmkitError


@dataclass(slots=True)
class VerifyReport:
    path: str
    tp: int
    pp: int
    num_tensors: int = 0
    num_files: int = 0
    bytes_checked: int = 0
    source: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def verify(sharded: str | Path, source: str | Path | None = None) -> VerifyReport:
    """Check files, headers and every slice's hash; with `source`, compare every tensor."""
    directory = Path(sharded)
    manifest = read_manifest(directory)
    report = VerifyReport(str(directory.absolute()), manifest.tp, manifest.pp)
    headers = _check_files(directory, manifest, report)
    if report.ok:
        sharded_source = ShardedSource(directory, manifest, headers)
        try:
            _check_hashes(sharded_source, report)
            if source is not None:
                _compare_source(sharded_source, source, report)
        finally:
            sharded_source.close()
    return report


def _check_files(
    directory: Path, manifest: Manifest, report: VerifyReport
) -> dict[str, dict[str, TensorInfo]]:
    """Every file present, of its size, holding exactly its tensors with their shapes;
    returns the headers read."""
    expected: dict[str, dict[str, tuple]] = {name: {} for name in manifest.data["files"]}
    for (tensor, tp_rank), file in manifest.files.items():
        plan = manifest.plans[tensor]
        expected.setdefault(file, {})[tensor] = (plan.dtype, plan.rank_shape(tp_rank))
    headers = {}
    for file, tensors in expected.items():
        report.num_files += 1
        record = manifest.data["files"].get(file, {})
        headers[file] = _check_file(directory / file, record, tensors, report)
    report.num_tensors = len(manifest.plans)
    return headers


def _check_file(
    path: Path, record: dict, tensors: dict[str, tuple], report: VerifyReport
) -> dict[str, TensorInfo]:
    if not path.is_file():
        report.problems.append(f"{path.name}: missing")
        return {}
    size = path.stat().st_size
    if size != record.get("bytes"):
        report.problems.append(
            f"{path.name}: {size} bytes, the manifest says {record.get('bytes')}"
        )
        return {}
    try:
        infos = read_header(path)[0]
    except LlmkitError as e:
        report.problems.append(f"{path.name}: {e}")
        return {}
    for name in sorted(set(infos) - set(tensors)):
        report.problems.append(f"{path.name}: holds {name!r}, which the manifest does not list")
    for name, (dtype, shape) in tensors.items():
        info = infos.get(name)
        if info is None:
            report.problems.append(f"{path.name}: lacks {name!r}")
        elif (info.dtype, info.shape) != (dtype, shape):
            report.problems.append(
                f"{path.name}: {name!r} is {info.dtype} {list(info.shape)}, "
                f"expected {dtype} {list(shape)}"
            )
    return infos


def _check_hashes(source: ShardedSource, report: VerifyReport) -> None:
    for (name, tp_rank), expected in source.manifest.hashes.items():
        info = source.rank_info(name, tp_rank)
        h = new_hash()
        read = partial(source.rank_rows, name, tp_rank)
        for _, rows in row_chunks(read, info.dtype, info.shape):
            h.update(memoryview(rows).cast("B"))
        report.bytes_checked += info.nbytes
        if h.hexdigest() != expected:
            report.problems.append(
                f"{name!r} on tp rank {tp_rank} ({source.manifest.files[name, tp_rank]}): "
                f"{ALGORITHM} differs from the manifest (corrupt or modified)"
            )


def _compare_source(sharded: ShardedSource, src: str | Path, report: VerifyReport) -> None:
    """Every source tensor bit-exact in the shards, and the source files the same ones."""
    source = CheckpointSource(open_checkpoint(src))
    report.source = str(source.path)
    dropped = set(sharded.manifest.data.get("dropped", []))
    try:
        for name in source.order():
            _compare_tensor(sharded, source, name, name in dropped, report)
        for name in sorted(set(sharded.tensors) - set(source.tensors)):
            report.problems.append(f"{name!r} is in the shards but not in the source")
        _compare_file_hashes(sharded.manifest.data["source"], source.record(), report)
    finally:
        source.close()


def _compare_tensor(
    sharded: ShardedSource, source: CheckpointSource, name: str, dropped: bool, report
) -> None:
    meta, held = source.tensors[name], sharded.tensors.get(name)
    if held is None and not dropped:
        report.problems.append(f"{name!r} is in the source but not in the shards")
    elif held is not None and held != meta:
        report.problems.append(f"{name!r}: {held} in the shards, {meta} in the source")
    equal = held == meta
    # Every chunk is read, compared or not, so that the source files are hashed on the way.
    for start, rows in row_chunks(partial(source.read_rows, name), *meta):
        if equal and not np.array_equal(sharded.read_rows(name, start, start + len(rows)), rows):
            report.problems.append(f"{name!r}: rows from {start} differ from the source")
            equal = False


def _compare_file_hashes(recorded: dict, actual: dict, report: VerifyReport) -> None:
    expected = recorded.get("files", {})
    for name in sorted(set(expected) | set(actual["files"])):
        if expected.get(name) != actual["files"].get(name):
            report.problems.append(
                f"source file {name}: {actual['files'].get(name)} now, "
                f"{expected.get(name)} when the shards were cut"
            )

"""`llmkit-shards.json`: what a sharded directory holds, rank by rank and tensor by tensor.

{format, version, tp, pp, vocab_pad, hash,
 stages:  [{pp_rank, layers: [start, stop)}],
 ranks:   [{rank, tp_rank, pp_rank, files}]           rank = pp_rank * tp + tp_rank
 files:   {name: {bytes}},
 tensors: {name: {source, dtype, shape, pp_rank, rule, dim, padded, padding, note,
                  slices: [{tp_rank, offset, length, shape, file, <hash>}]}},
 rules, dropped, source: {path, format, files: {name: {bytes, <hash>}}, resharded_from?}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmkit.arch.plan import ShardPlan, Slice, TensorPlan
from llmkit.checkpoint.hashing import ALGORITHM
from llmkit.checkpoint.reader import read_json
from llmkit.errors import LlmkitError

MANIFEST = "llmkit-shards.json"
FORMAT = "llmkit-shards"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest: the plan's tensors, where each rank's copy lives, and its hash."""

    data: dict
    plans: dict[str, TensorPlan]
    files: dict[tuple[str, int], str]  # (tensor, tp_rank) -> file
    hashes: dict[tuple[str, int], str]

    @property
    def tp(self) -> int:
        return self.data["tp"]

    @property
    def pp(self) -> int:
        return self.data["pp"]


def rank_files(tp_rank: int, pp_rank: int, num_files: int) -> list[str]:
    stem = f"rank-{tp_rank}-{pp_rank}"
    if num_files == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{num_files:05d}.safetensors" for i in range(1, num_files + 1)]


def build(
    plan: ShardPlan,
    rank_file_names: dict[tuple[int, int], list[str]],
    file_bytes: dict[str, int],
    files: dict[tuple[str, int], str],
    hashes: dict[tuple[str, int], str],
    source: dict,
) -> dict:
    """The manifest of a written layout."""
    ranks = [
        {"rank": pp_rank * plan.tp + tp_rank, "tp_rank": tp_rank, "pp_rank": pp_rank,
         "files": rank_file_names[tp_rank, pp_rank]}
        for pp_rank in range(plan.pp) for tp_rank in range(plan.tp)
    ]  # fmt: skip
    return {
        "format": FORMAT,
        "version": VERSION,
        "tp": plan.tp,
        "pp": plan.pp,
        "vocab_pad": plan.vocab_pad,
        "hash": ALGORITHM,
        "stages": [{"pp_rank": i, "layers": list(r)} for i, r in enumerate(plan.stages)],
        "ranks": ranks,
        "files": {name: {"bytes": size} for name, size in sorted(file_bytes.items())},
        "tensors": {p.name: _tensor_entry(p, plan.tp, files, hashes) for p in plan.tensors},
        "rules": plan.rules,
        "dropped": list(plan.dropped),
        "source": source,
    }


def _tensor_entry(
    plan: TensorPlan, tp: int, files: dict[tuple[str, int], str], hashes: dict[tuple[str, int], str]
) -> dict:
    slices = []
    for tp_rank in range(tp):
        entry: dict = {"tp_rank": tp_rank}
        if plan.dim is not None:
            entry |= {"offset": plan.slices[tp_rank].offset, "length": plan.slices[tp_rank].length}
        entry["shape"] = list(plan.rank_shape(tp_rank))
        entry["file"] = files[plan.name, tp_rank]
        entry[ALGORITHM] = hashes[plan.name, tp_rank]
        slices.append(entry)
    return {
        "source": plan.source,
        "dtype": plan.dtype,
        "shape": list(plan.shape),
        "pp_rank": plan.pp_rank,
        "rule": plan.rule,
        "dim": plan.dim,
        "padded": plan.padded,
        "padding": plan.padding,
        "note": plan.note,
        "slices": slices,
    }


def write(directory: Path, data: dict) -> None:
    """Write the manifest with each stage, rank, file and tensor on a line of its own."""
    (Path(directory) / MANIFEST).write_text(outline(data, levels=2) + "\n")


def outline(value: object, levels: int, depth: int = 0) -> str:
    """JSON indented for the first `levels` levels of nesting and compact below them: one
    line per entry reads better than one per value, and the compact parts come from the C
    encoder, which is faster and writes a smaller file than fully indented JSON (only Python's
    own encoder indents)."""
    if depth >= levels or not isinstance(value, dict | list) or not value:
        return json.dumps(value, separators=(", ", ": "))
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {outline(v, levels, depth + 1)}" for k, v in value.items()]
        open_, close = "{", "}"
    else:
        items = [outline(v, levels, depth + 1) for v in value]
        open_, close = "[", "]"
    return f"{open_}\n{inner}" + f",\n{inner}".join(items) + f"\n{pad}{close}"


def read_manifest(directory: Path) -> Manifest:
    """Parse `directory`/llmkit-shards.json, refusing anything this version did not write."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise LlmkitError(f"{directory} is not an llmkit shard directory: it has no {MANIFEST}")
    data = read_json(path, what="shard manifest")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise LlmkitError(
            f"{path} is not a version-{VERSION} llmkit shard manifest "
            f"(format {data.get('format')!r}, version {data.get('version')!r})"
        )
    try:
        return _parse(data)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise LlmkitError(f"corrupt shard manifest {path}: {type(e).__name__} {e}") from None


def _parse(data: dict) -> Manifest:
    plans, files, hashes = {}, {}, {}
    for name, entry in data["tensors"].items():
        slices = (
            ()
            if entry["dim"] is None
            else tuple(Slice(s["tp_rank"], s["offset"], s["length"]) for s in entry["slices"])
        )
        plans[name] = TensorPlan(
            name,
            entry["source"],
            entry["dtype"],
            tuple(entry["shape"]),
            entry["pp_rank"],
            entry["rule"],
            entry["dim"],
            entry["padded"],
            slices,
            entry.get("note", ""),
        )
        for s in entry["slices"]:
            files[name, s["tp_rank"]] = s["file"]
            hashes[name, s["tp_rank"]] = s[data["hash"]]
    return Manifest(data, plans, files, hashes)

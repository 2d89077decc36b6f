"""Write a Hugging Face checkpoint directory: sharded safetensors + index + config + aux files.

Tensors arrive as lazy `TensorSpec`s, so shards are planned from shapes alone and every byte
is written once, in order, while peak memory stays at one chunk.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmkit.checkpoint import checksums
from llmkit.checkpoint.atomic import atomic_output_dir
from llmkit.checkpoint.safetensors_io import E, TensorSpec, file_layout, write_file
from llmkit.errors import LlmkitError

DEFAULT_MAX_SHARD_SIZE = "5GB"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files a checkpoint carries besides weights and config; copied verbatim when present.
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True, slots=True)
class WrittenCheckpoint:
    path: Path
    shards: tuple[str, ...]
    num_tensors: int
    total_bytes: int


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512*2**20, 1000 -> 1000 (decimal units as transformers uses)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise LlmkitError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise LlmkitError(f"size {text!r} must be positive")
    return size


def plan_shards(specs: list[E], max_bytes: int) -> list[list[E]]:
    """Fill shards in order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[E]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


def write_tensors(
    directory: Path,
    specs: list[TensorSpec],
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: ProgressFn | None = None,
) -> tuple[str, ...]:
    """Write `specs` as safetensors shards (+ index when more than one) into `directory`,
    with their checksums (checksums.py) hashed as they are written."""
    _check_unique(specs)
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = shard_names(len(shards))
    total = sum(s.nbytes for s in specs)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    hashes = {}
    for name, shard in zip(names, shards, strict=True):
        hashes[name] = write_file(directory / name, file_layout(shard), {"format": "pt"}, on_bytes)
    checksums.record(directory, hashes)
    if len(names) > 1:
        weight_map = {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / SAFETENSORS_INDEX, index)
    return tuple(names)


def _check_unique(specs: list[TensorSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor {spec.name!r} given twice")
        seen.add(spec.name)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation and chat-template files that exist in `src`."""
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def fill_checkpoint_dir(
    directory: Path,
    specs: list[TensorSpec],
    config: dict,
    aux_from: Path | None = None,
    *,
    extra_files: dict[str, dict] | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: ProgressFn | None = None,
) -> WrittenCheckpoint:
    """Write config, auxiliary files and tensor shards into an existing (temporary) directory."""
    if aux_from is not None:
        copy_aux_files(aux_from, directory)
    for name, data in (extra_files or {}).items():
        write_json(directory / name, data)
    write_json(directory / "config.json", config)
    shards = write_tensors(directory, specs, max_shard_size, progress)
    return WrittenCheckpoint(directory, shards, len(specs), sum(s.nbytes for s in specs))


def write_checkpoint(
    out: Path,
    specs: list[TensorSpec],
    config: dict,
    aux_from: Path | None = None,
    *,
    extra_files: dict[str, dict] | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> WrittenCheckpoint:
    """Write a complete checkpoint atomically: nothing appears at `out` unless all of it does."""
    parse_size(max_shard_size)  # a bad size fails before any work
    sources = () if aux_from is None else (aux_from,)
    with atomic_output_dir(Path(out), overwrite, sources) as tmp:
        written = fill_checkpoint_dir(
            tmp,
            specs,
            config,
            aux_from,
            extra_files=extra_files,
            max_shard_size=max_shard_size,
            progress=progress,
        )
    return replace(written, path=Path(out).absolute())

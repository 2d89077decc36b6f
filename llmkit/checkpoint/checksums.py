"""A content hash of every weight file llmkit writes, recorded beside the checkpoint in
`llmkit-checksums.json`, and checked when a model is loaded to run (`--no-verify` skips it) or
by `llmkit inspect --verify`: bytes corrupted on disk or in a copy are refused with the file's
name instead of being served. config.json and the tokenizer files are not covered (people edit
them on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.checkpoint.hashing import ALGORITHM, file_hash
from llmkit.errors import LlmkitError

NAME = "llmkit-checksums.json"


def record(directory: Path, hashes: dict[str, str]) -> None:
    """Write `directory`'s checksum file: weight file name -> its hashing.file_hash."""
    text = json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(hashes.items()))}, indent=1)
    (directory / NAME).write_text(text + "\n")


def is_recorded(directory: Path) -> bool:
    return (directory / NAME).is_file()


def problems(directory: Path) -> list[str]:
    """What differs from the recorded hashes (a missing or changed file); [] when all match
    or nothing is recorded."""
    if not is_recorded(directory):
        return []
    try:
        recorded = json.loads((directory / NAME).read_text())
        algorithm, hashes = recorded["algorithm"], dict(recorded["files"])
    except (ValueError, KeyError, TypeError):
        return [f"{directory / NAME} is not a checksum file llmkit can read"]
    if algorithm != ALGORITHM:
        return [f"{directory / NAME} uses {algorithm!r}; llmkit checks {ALGORITHM!r}"]
    found = []
    for name, expected in hashes.items():
        path = directory / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif file_hash(path) != expected:
            found.append(f"{path} does not match its recorded checksum (corrupted or replaced)")
    return found


def verify(directory: Path) -> None:
    """Raise LlmkitError naming the first file that differs from its recorded hash."""
    if found := problems(directory):
        raise LlmkitError(f"{found[0]}; --no-verify loads it anyway")

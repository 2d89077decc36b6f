"""Write a directory under a temporary name and move it into place only when complete."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmkit.errors import LlmkitError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work is done, an output that would clobber something."""
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"output {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LlmkitError(f"output {out} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`.

    On any exception (or Ctrl-C) the temporary directory is removed and `out` is untouched.
    With `overwrite`, an existing `out` is swapped away only after the new one is complete.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.llmkit-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.llmkit-old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it replaces `out` in one rename."""
    out = Path(out).absolute()
    if out.is_dir():
        raise LlmkitError(f"output {out} is a directory; give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.llmkit-tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

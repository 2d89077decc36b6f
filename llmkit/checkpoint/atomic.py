"""Write a directory under a temporary name and move it into place only when complete."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmkit.errors import LlmkitError


def check_output_dir(out: Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work is done, an output that would clobber something: a file, a
    non-empty directory without `overwrite`, or any of `sources` (the inputs a command reads),
    which the output may not be, contain, or replace a part of."""
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"output {out} exists and is not a directory; choose another path")
    target = out.resolve()
    filled = out.is_dir() and any(out.iterdir())
    for source in sources:
        src = Path(source).resolve()
        if target == src or src.is_relative_to(target):
            where = "is" if target == src else "contains"
            raise LlmkitError(f"output {out} {where} the source {source}; choose another path")
        if filled and target.is_relative_to(src):
            raise LlmkitError(
                f"output {out} is inside the source {source}, and replacing it would change "
                "the source; choose another path"
            )
    if filled and not overwrite:
        raise LlmkitError(f"output {out} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(
    out: Path, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`.

    On any exception (or Ctrl-C) the temporary directory is removed and `out` is untouched.
    With `overwrite`, an existing `out` is swapped away only after the new one is complete.
    """
    out = Path(out).absolute()
    check_output_dir(out, overwrite, sources)
    if out.is_dir() and os.path.ismount(out):  # a volume's root cannot be renamed over
        with _inside(out) as tmp:
            yield tmp
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.llmkit-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


COMPLETE = ".llmkit-complete"  # written last into an output that could not be swapped in


@contextmanager
def _inside(out: Path) -> Iterator[Path]:
    """Write into a temporary directory inside `out` (a mount point), then replace `out`'s
    entries with the new ones, each in one rename, and mark it complete. Until the marker is
    there again the directory is not a finished output; the old entries go only once the new
    ones are all written."""
    tmp = out / f".llmkit-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (out / COMPLETE).unlink(missing_ok=True)
    new = {p.name for p in tmp.iterdir()}
    for old in out.iterdir():
        if old != tmp and old.name not in new:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for entry in tmp.iterdir():
        if (out / entry.name).is_dir() and not (out / entry.name).is_symlink():
            shutil.rmtree(out / entry.name)
        os.replace(entry, out / entry.name)
    tmp.rmdir()
    (out / COMPLETE).write_text("")


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

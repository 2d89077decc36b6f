"""YAML with the line of every key, so that errors can point into the file."""

from __future__ import annotations

from typing import Any

import yaml

from llmkit.errors import LlmkitError

Path_ = tuple[str | int, ...]


def load_with_lines(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """The document's data, and path -> 1-based line of each mapping key and list item."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise LlmkitError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if node is None:
        raise LlmkitError(f"{source}: the recipe is empty")
    lines: dict[Path_, int] = {}
    _Walk(source, lines).walk(node, ())
    return yaml.safe_load(text), lines


# Entries a recipe may expand to, aliases included: real recipes have hundreds; an alias
# bomb (each anchor listing the previous one ten times) has billions.
MAX_ENTRIES = 100_000


class _Walk:
    """Records each key's line, refusing aliases that nest themselves or expand past
    MAX_ENTRIES (an alias is walked where it is used, so it counts each time)."""

    def __init__(self, source: str, lines: dict[Path_, int]):
        self.source, self.lines = source, lines
        self.count = 0
        self.open: set[int] = set()  # ids of the nodes being walked (a cycle comes back to one)

    def walk(self, node, path: Path_) -> None:
        self.count += 1
        where = f"{self.source}:{node.start_mark.line + 1}"
        if self.count > MAX_ENTRIES:
            raise LlmkitError(f"{where}: the recipe expands to over {MAX_ENTRIES} entries "
                              "(YAML aliases?)")  # fmt: skip
        if id(node) in self.open:
            raise LlmkitError(f"{where}: a YAML alias contains itself")
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, key.value)
                self.lines[child] = key.start_mark.line + 1
                self.walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = item.start_mark.line + 1
                self.walk(item, (*path, i))
        self.open.discard(id(node))


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """The line of `path`, or of its nearest ancestor present in the file."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None

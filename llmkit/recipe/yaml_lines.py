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
    _walk(node, (), lines)
    return yaml.safe_load(text), lines


def _walk(node, path: Path_, lines: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            lines[child] = key.start_mark.line + 1
            _walk(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines)


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """The line of `path`, or of its nearest ancestor present in the file."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None

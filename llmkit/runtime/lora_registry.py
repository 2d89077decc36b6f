"""Which LoRA adapters an engine has loaded, by name (pure Python: the engine imports no
torch). Ids are never reused, so K/V an unloaded adapter left in the prefix cache can never
be taken for another's; an adapter unloaded while requests use it stays until they end."""

from __future__ import annotations

import itertools
from pathlib import Path

from llmkit.errors import LlmkitError


def adapter_dir(path: str | Path) -> str:
    """The absolute path of the adapter directory `path` (LlmkitError: not a directory)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise LlmkitError(f"{path} is not a directory")
    return str(directory.resolve())


class UnknownAdapter(LlmkitError):
    """A request names an adapter that is not loaded (or no longer is)."""


class LoraRegistry:
    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.ids: dict[str, int] = {}  # name -> id, of the adapters requests may name
        self.retiring: set[int] = set()  # unloaded, still used by requests in flight
        self._next = itertools.count(1)

    def new_id(self, name: str) -> int:
        """The id adapter `name` will have, once it has loaded."""
        if not self.max_loras:
            raise LlmkitError("this engine takes no LoRA adapters (start it with --max-loras)")
        if name in self.ids:
            raise LlmkitError(f"a LoRA adapter named {name!r} is loaded already")
        if len(self.ids) + len(self.retiring) >= self.max_loras:
            raise LlmkitError(f"{self.max_loras} LoRA adapters are loaded (--max-loras); "
                              "unload one first")  # fmt: skip
        return next(self._next)

    def add(self, name: str, lora_id: int) -> None:
        self.ids[name] = lora_id

    def id_of(self, name: str) -> int:
        if name not in self.ids:
            raise UnknownAdapter(f"no LoRA adapter named {name!r} is loaded")
        return self.ids[name]

    def retire(self, name: str) -> None:
        """Requests can no longer name `name`; its weights go once no request uses them."""
        self.retiring.add(self.id_of(name))
        del self.ids[name]

    def done(self, in_use: set[int]) -> list[int]:
        """The retiring ids no request uses any more (forgotten here: remove their weights)."""
        gone = sorted(self.retiring - in_use)
        self.retiring -= set(gone)
        return gone

"""One tensor-parallel rank's view of a checkpoint: each tensor as the slice this rank holds,
cut by the split rules `llmkit shard` uses (arch/plan.py).

From a plain or quantized checkpoint the slice is read lazily (rows of dim-0 splits only);
from an `llmkit shard` directory it is this rank's own file, and the layout must match.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from llmkit.arch.plan import ShardPlan, TensorPlan, make_plan
from llmkit.checkpoint.manifest import MANIFEST, read_manifest
from llmkit.checkpoint.reader import Checkpoint, open_checkpoint
from llmkit.checkpoint.safetensors_io import rows_as_tensor
from llmkit.checkpoint.sources import ShardedSource
from llmkit.errors import LlmkitError


class RankTensors(ABC):
    """config, and `get(name)`: the tensor as rank `tp_rank` of `tp` holds it."""

    def __init__(self, config: dict, plans: dict[str, TensorPlan], tp: int, tp_rank: int):
        self.config = config
        self.plans = plans
        self.tp, self.tp_rank = tp, tp_rank

    def __contains__(self, name: str) -> bool:
        return name in self.plans

    def offset(self, name: str, dim: int = 0) -> int:
        """Where this rank's slice starts along `dim` (0 when not split along it)."""
        plan = self.plans[name]
        return plan.slices[self.tp_rank].offset if plan.dim == dim else 0

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def close(self) -> None: ...


class CheckpointRank(RankTensors):
    def __init__(self, ck: Checkpoint, tp: int, tp_rank: int, plan: ShardPlan | None = None):
        """`plan`: the split to read by (default: llmkit's own for `tp`)."""
        if plan is None:
            metas = {name: (info.dtype, info.shape) for name, info in ck.tensors.items()}
            plan = make_plan(ck.config, metas, tp=tp)
        super().__init__(ck.config, {p.name: p for p in plan.tensors}, tp, tp_rank)
        self.ck = ck

    def get(self, name: str) -> torch.Tensor:
        plan = self.plans[name]
        if plan.dim is None:
            return self.ck.get_tensor(name)
        part = plan.slices[self.tp_rank]
        if plan.dim == 0:  # read only these rows; vocab padding rows are zeros
            rows = self.ck.read_rows(name, part.offset, part.offset + part.length)
            missing = part.length - rows.shape[0]
            return torch.cat([rows, rows.new_zeros(missing, *rows.shape[1:])]) if missing else rows
        return self.ck.get_tensor(name).narrow(plan.dim, part.offset, part.length).contiguous()

    def close(self) -> None:
        self.ck.close()


class ShardRank(RankTensors):
    def __init__(self, source: ShardedSource, tp: int, tp_rank: int):
        manifest = source.manifest
        if manifest.tp != tp or manifest.pp != 1:
            raise LlmkitError(
                f"{source.path} is sharded for tp={manifest.tp}, pp={manifest.pp}; run it with "
                f"--tp {manifest.tp}, or reshard it: llmkit shard {source.path} OUT --tp {tp}"
            )
        super().__init__(source.config, manifest.plans, tp, tp_rank)
        self.source = source

    def get(self, name: str) -> torch.Tensor:
        info = self.source.rank_info(name, self.tp_rank)
        rows = info.shape[0] if info.shape else 1
        data = self.source.rank_rows(name, self.tp_rank, 0, rows)
        return rows_as_tensor(data.copy(), info)  # owned: rank_rows maps the file read-only

    def close(self) -> None:
        self.source.close()


def open_rank(path: str | Path, tp: int = 1, tp_rank: int = 0) -> RankTensors:
    """Rank `tp_rank` of `tp` of a checkpoint directory, hub id, or `llmkit shard` output."""
    directory = Path(path).expanduser()
    if (directory / MANIFEST).is_file():
        manifest = read_manifest(directory)
        return ShardRank(ShardedSource(directory, manifest), tp, tp_rank)
    return CheckpointRank(open_checkpoint(path), tp, tp_rank)

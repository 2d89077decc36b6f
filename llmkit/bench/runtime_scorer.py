"""Whole-window logits of a checkpoint from llmkit's runtime: the model `llmkit serve` runs,
in float32 on the CPU (or another device), with weight-only formats (int8, GPTQ/AWQ int4)
as their exactly dequantized weights: the serving kernels round activations and scales, and
that rounding must not count against the checkpoint. W8A8 keeps its int8 activations, which
are part of what the format computes. `exact=False`: the serving kernels, as served."""

from __future__ import annotations

import torch

from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.distributed import Group
from llmkit.runtime.model_runner import ModelRunner, prepare
from llmkit.runtime.scheduler import Batch
from llmkit.runtime.sequence import Sequence

BLOCK_SIZE = 16


class RuntimeScorer:
    """`scorer(ids [windows, seq_len])` -> logits [windows, seq_len, vocab] (float32)."""

    backend = "runtime"

    def __init__(
        self, path: str, max_windows: int, seq_len: int, device: str = "cpu", exact: bool = True
    ):
        self.num_blocks = max_windows * -(-seq_len // BLOCK_SIZE)
        self.runner = ModelRunner(
            str(path),
            Group(),
            torch.float32,
            torch.device(device),
            self.num_blocks,
            BLOCK_SIZE,
            exact,
        )
        self.vocab_size = self.runner.config.vocab_size

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = BlockManager(self.num_blocks, BLOCK_SIZE, enable_prefix_caching=False)
        batch = Batch()
        for row in ids.tolist():
            seq = Sequence(row)
            blocks.allocate(seq, len(row))
            batch.add(seq, len(row))
        inputs, _, _ = prepare(batch, BLOCK_SIZE)
        inputs.logits_indices = torch.arange(ids.numel())
        return self.runner.execute(inputs).view(*ids.shape, -1)

"""The public scoring entry point: token windows in, logits or log-probabilities at every
position out, from the model `llmkit serve` runs. `bench quality` and calibration checks
score through it.

By default it computes in float32 with weight-only formats (int8, GPTQ/AWQ int4) as their
exactly dequantized weights: the serving kernels round activations and scales, and that
rounding must not count against a checkpoint. W8A8 keeps its int8 activations, which are
part of what the format computes. `exact=False`: the serving kernels, as served.
"""

from __future__ import annotations

import torch

from llmkit.runtime.distributed import Group
from llmkit.runtime.model_runner import ModelRunner

BLOCK_SIZE = 16


class WindowScorer:
    """`scorer(ids [windows, seq_len])` -> logits [windows, seq_len, vocab] (float32);
    `scorer.logprobs(ids)` -> their log-softmax (float64)."""

    backend = "runtime"

    def __init__(
        self,
        path: str,
        max_windows: int,
        seq_len: int,
        device: str = "cpu",
        exact: bool = True,
    ):
        num_blocks = max_windows * -(-seq_len // BLOCK_SIZE)
        self.runner = ModelRunner(
            str(path), Group(), torch.float32, torch.device(device), num_blocks, BLOCK_SIZE, exact
        )
        self.vocab_size = self.runner.config.vocab_size
        self.exact = exact

    def kernels(self) -> list[str]:
        """What computes the model's Linears: each layer class with the kernel it calls
        (`torch` where it calls none of llmkit's)."""
        names = set()
        for module in self.runner.model.modules():
            if hasattr(module, "op") or hasattr(module, "_mm"):
                op = getattr(module, "op", None) or getattr(module, "_mm", None)
                names.add(f"{type(module).__name__} ({_op_name(op)})")
        return sorted(names)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runner.window_logits(ids.tolist())

    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(token | the tokens before it) for every vocabulary entry at every position."""
        return torch.log_softmax(self(ids).double(), dim=-1)


def _op_name(op) -> str:
    """`llmkit_cpu::q4_linear` for torch.ops.llmkit_cpu.q4_linear, `torch` for None."""
    if op is None:
        return "torch"
    name = getattr(op, "_qualified_op_name", None) or getattr(op, "__name__", None) or str(op)
    return str(name).removesuffix(".default")

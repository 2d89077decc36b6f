"""Read any checkpoint llmkit writes (or reads) as plain float weights: the reference
computation that quantized formats are checked against, and what quality evaluation runs."""

from __future__ import annotations

from collections import defaultdict

import torch

from llmkit.checkpoint.reader import Checkpoint
from llmkit.quant.formats.readers import LinearReader


def dequantized_state(ck: Checkpoint) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(state dict with float weights, names of Linears whose inputs run through per-token
    int8) for a plain, compressed-tensors, GPTQ or AWQ checkpoint: each quantized Linear
    read as the runtime reads it (LinearReader), then dequantized."""
    config = ck.quantization_config
    if not config:
        return {name: ck.get_tensor(name) for name in ck.tensors}, set()
    reader = LinearReader(_Whole(ck), config)
    state: dict[str, torch.Tensor] = {}
    act_quant: set[str] = set()
    for module, leaves in _by_module(ck).items():
        quantized = reader.is_quantized(module, set(leaves))
        if quantized:
            state[f"{module}.weight"] = reader.read(module).dequantize()
            if reader.quantizes_inputs(module):
                act_quant.add(module)
        for leaf, full in leaves.items():
            if not (quantized and leaf in reader.leaves):
                state[full] = ck.get_tensor(full)
    return state, act_quant


class _Whole:
    """A checkpoint's tensors as LinearReader reads them: whole, no tensor-parallel slice."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck

    def __contains__(self, name: str) -> bool:
        return name in self.ck.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.ck.get_tensor(name)

    def offset(self, name: str, dim: int = 0) -> int:
        return 0


def _by_module(ck: Checkpoint) -> dict[str, dict[str, str]]:
    """module name -> {leaf name: full tensor name}."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    for name in ck.tensors:
        module, _, leaf = name.rpartition(".")
        modules[module][leaf] = name
    return modules

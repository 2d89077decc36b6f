"""Read any checkpoint llmkit writes (or reads) as plain float weights: the reference
computation that quantized formats are checked against, and what quality evaluation runs."""

from __future__ import annotations

from collections import defaultdict

import torch

from llmkit.checkpoint.reader import Checkpoint
from llmkit.errors import LlmkitError
from llmkit.quant.formats import awq, gptq
from llmkit.quant.formats import compressed_tensors as ct


def dequantized_state(ck: Checkpoint) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(state dict with float weights, names of Linears whose inputs run through per-token
    int8) for a plain, compressed-tensors or GPTQ checkpoint."""
    config = ck.quantization_config
    if not config:
        return {name: ck.get_tensor(name) for name in ck.tensors}, set()
    method = config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(ck, config)
    if method == "gptq":
        return _gptq(ck, config), set()
    if method == "awq":
        return _awq(ck, config), set()
    raise LlmkitError(f"reading {method!r} checkpoints is not supported yet")


def _by_module(ck: Checkpoint) -> dict[str, dict[str, str]]:
    """module name -> {leaf name: full tensor name}."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    for name in ck.tensors:
        module, _, leaf = name.rpartition(".")
        modules[module][leaf] = name
    return modules


def _compressed_tensors(ck: Checkpoint, config: dict) -> tuple[dict, set[str]]:
    ct.check_config(config)
    state: dict[str, torch.Tensor] = {}
    act_quant: set[str] = set()
    for module, leaves in _by_module(ck).items():
        scheme = ct.scheme_for(config, module) if "weight_scale" in leaves else None
        if scheme is None:
            state.update({full: ck.get_tensor(full) for full in leaves.values()})
            continue
        stored = {leaf: ck.get_tensor(full) for leaf, full in leaves.items() if leaf in ct.LEAVES}
        state[f"{module}.weight"] = ct.dequantize_module(stored, scheme)
        state.update(
            {full: ck.get_tensor(full) for leaf, full in leaves.items() if leaf not in ct.LEAVES}
        )
        if ct.quantizes_inputs(scheme):
            act_quant.add(module)
    return state, act_quant


def _gptq(ck: Checkpoint, config: dict) -> dict[str, torch.Tensor]:
    bits, zero_offset = gptq.checkpoint_bits(config)

    def dequantize(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        qweight, qzeros, scales, g_idx = (parts[leaf] for leaf in gptq.SUFFIXES)
        return gptq.dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset)

    return _packed(ck, gptq.SUFFIXES, dequantize)


def _awq(ck: Checkpoint, config: dict) -> dict[str, torch.Tensor]:
    awq.check_config(config)
    return _packed(
        ck, awq.SUFFIXES, lambda p: awq.dequantize(p["qweight"], p["qzeros"], p["scales"])
    )


def _packed(ck: Checkpoint, suffixes: tuple[str, ...], dequantize) -> dict[str, torch.Tensor]:
    """Modules with a `qweight` get `.weight` = dequantize({suffix: tensor}); every other
    tensor (biases, norms, embeddings) is read as it is."""
    state: dict[str, torch.Tensor] = {}
    for module, leaves in _by_module(ck).items():
        packed = "qweight" in leaves
        if packed:
            state[f"{module}.weight"] = dequantize({s: ck.get_tensor(leaves[s]) for s in suffixes})
        for leaf, full in leaves.items():
            if not (packed and leaf in suffixes):
                state[full] = ck.get_tensor(full)
    return state

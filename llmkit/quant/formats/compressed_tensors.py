"""compressed-tensors checkpoints (quant_method "compressed-tensors"), the format vLLM and
transformers read for INT8.

- `int-quantized` and `naive-quantized`: `weight` int8 [out, in] holding the integer values
  (of any width up to 8 bits).
- `pack-quantized`: `weight_packed` int32 [out, ceil(in * bits / 32)] holding values offset by
  2**(bits-1), element i at bit i * bits of its row (little-endian within each word), and
  `weight_shape` int64 [2].

Beside them: `weight_scale` [out, groups] ([out, 1] per channel, one value per tensor);
`weight_zero_point` when asymmetric, [out, groups] int8, or for pack-quantized packed along
the outputs, int32 [ceil(out * bits / 32), groups]; and for act-order `weight_g_idx` int32
[in], the group of each input (else input i is in group i // group_size). Weight:
w[o, i] = scale[o, g] * (q[o, i] - zero[o, g]), g the group of input i.
"""

from __future__ import annotations

import re

import torch

from llmkit.errors import LlmkitError
from llmkit.quant.formats import bitpack

INT_QUANTIZED = "int-quantized"
NAIVE_QUANTIZED = "naive-quantized"
PACK_QUANTIZED = "pack-quantized"
FORMATS = (INT_QUANTIZED, NAIVE_QUANTIZED, PACK_QUANTIZED)
# The tensors of a quantized module (besides its bias); `dequantize_module` reads them.
LEAVES = (
    "weight",
    "weight_packed",
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_g_idx",
)


def check_config(config: dict) -> None:
    """Refuse compressed-tensors formats other than the integer ones read here."""
    if config.get("format") not in FORMATS:
        raise LlmkitError(
            f"compressed-tensors format {config.get('format')!r} is not supported; llmkit "
            f"reads {', '.join(FORMATS)}"
        )


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [rows, cols] (signed, |q| < 2**(bits-1)) -> int32 [rows, ceil(cols * bits / 32)]."""
    return bitpack.pack_last(q.to(torch.int64) + (1 << (bits - 1)), bits)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 [rows, words] -> int8 [rows, cols]."""
    return (bitpack.unpack_last(packed, bits, cols) - (1 << (bits - 1))).to(torch.int8)


def quantization_config(format: str, activations: bool, ignore: list[str]) -> dict:
    """`quantization_config` for symmetric per-channel int8 weights, with dynamic per-token
    int8 activations when `activations` (W8A8) and none otherwise (W8A16)."""
    weights = {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "channel",
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    scheme: dict = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": format,
    }
    if activations:
        scheme["input_activations"] = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "group_size": None,
            "strategy": "token",
            "dynamic": True,
            "actorder": None,
            "block_structure": None,
            "observer": None,
            "observer_kwargs": {},
        }
    return {
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _targets(scheme: dict, module: str) -> bool:
    for target in scheme.get("targets", []):
        if target == "Linear" or module == target or module.endswith(f".{target}"):
            return True
        if target.startswith("re:") and re.match(target[3:], module):
            return True
    return False


def scheme_for(config: dict, module: str) -> dict | None:
    """The config group that quantizes `module`, or None when it is ignored / untargeted."""
    for ignored in config.get("ignore") or []:
        pattern = ignored[3:] if ignored.startswith("re:") else re.escape(ignored) + "$"
        if re.match(pattern, module):
            return None
    for scheme in (config.get("config_groups") or {}).values():
        if _targets(scheme, module):
            return scheme
    return None


def dequantize_module(tensors: dict[str, torch.Tensor], scheme: dict) -> torch.Tensor:
    """A module's stored tensors (by leaf name) -> its float32 weight [out, in]."""
    weights = scheme.get("weights") or {}
    if weights.get("type", "int") != "int" or weights.get("strategy") not in _STRATEGIES:
        raise LlmkitError(f"compressed-tensors weights {weights} are not supported by llmkit yet")
    bits = int(weights["num_bits"])
    if "weight_packed" in tensors:
        out_features, in_features = (int(d) for d in tensors["weight_shape"])
        q = unpack_int32(tensors["weight_packed"], bits, in_features)
    else:
        q = tensors["weight"]
        out_features, in_features = q.shape
    scale = tensors["weight_scale"].float()
    scale = scale.reshape(1 if scale.numel() == 1 else out_features, -1)  # a tensor's: [1, 1]
    zero = tensors.get("weight_zero_point")
    zero = torch.zeros(scale.shape) if zero is None else _zero_points(zero, bits, scale.shape)
    columns = _groups_of_inputs(tensors.get("weight_g_idx"), weights, in_features, scale.shape[1])
    scale = scale.expand(out_features, -1)[:, columns]
    zero = zero.float().expand(out_features, -1)[:, columns]
    return (q.float() - zero) * scale


def _groups_of_inputs(g_idx, weights: dict, in_features: int, groups: int) -> torch.Tensor:
    """The scale column of each input: g_idx where stored (act-order), else consecutive
    groups of group_size inputs (one column per channel or tensor)."""
    if groups == 1:
        return torch.zeros(in_features, dtype=torch.long)
    if g_idx is not None:
        columns = g_idx.long()
    else:
        size = int(weights.get("group_size") or -(-in_features // groups))
        columns = torch.arange(in_features) // size
    if columns.shape != (in_features,) or int(columns.min()) < 0 or int(columns.max()) >= groups:
        raise LlmkitError(
            f"compressed-tensors groups do not fit: {groups} scale columns for {in_features} inputs"
        )
    return columns


_STRATEGIES = ("tensor", "channel", "group")


def _zero_points(zero: torch.Tensor, bits: int, scale_shape: torch.Size) -> torch.Tensor:
    if zero.dtype == torch.int32 and zero.shape != scale_shape:  # packed along the output dim
        return unpack_int32(zero.t().contiguous(), bits, scale_shape[0]).t().float()
    return zero.float().reshape(scale_shape[0] if zero.dim() == 2 else 1, -1)


def quantizes_inputs(scheme: dict) -> bool:
    """Does the scheme quantize activations dynamically per token to int8 (W8A8)?"""
    acts = scheme.get("input_activations")
    if not acts:
        return False
    supported = acts.get("type") == "int" and acts.get("num_bits") == 8 and acts.get("dynamic")
    if not supported or acts.get("strategy") != "token" or not acts.get("symmetric", True):
        raise LlmkitError(f"compressed-tensors input activations {acts} are not supported yet")
    return True

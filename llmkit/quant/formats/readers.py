"""Reading a stored Linear into its plain record (quant/formats/weights.py), for every
checkpoint format llmkit reads. The runtime loader reads through it, rank by rank, and so
does the reference dequantization (quant/formats/loader.py), over whole tensors."""

from __future__ import annotations

from typing import Protocol

import torch

from llmkit.arch.shapes import is_awq_gemv
from llmkit.errors import LlmkitError
from llmkit.quant.formats import awq, gptq
from llmkit.quant.formats import compressed_tensors as ct
from llmkit.quant.formats.weights import DenseWeight, GroupedWeight, Int8Weight, LinearWeight


class TensorSource(Protocol):
    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...

    def offset(self, name: str, dim: int = 0) -> int: ...


class LinearReader:
    """A Linear's stored tensors -> DenseWeight | Int8Weight | GroupedWeight, for every
    `quant_method` llmkit reads (the _FORMATS table). `src` holds the tensors
    (`name in src`, `src.get(name)`) and says where a tensor-parallel slice starts
    (`src.offset(name, dim)`: 0 for whole tensors)."""

    def __init__(self, src: TensorSource, qconfig: dict | None):
        self.src, self.qconfig = src, qconfig or {}
        self.method = self.qconfig.get("quant_method")
        if self.method is not None and self.method not in _FORMATS:
            raise LlmkitError(f"llmkit cannot run {self.method!r} checkpoints")
        self.leaves, check, self._read = _FORMATS.get(self.method, ((), None, None))
        if check is not None:
            check(self.qconfig)

    def is_quantized(self, module: str, leaves: set[str]) -> bool:
        """Is `module`, holding tensors named `leaves`, a quantized Linear of this format?"""
        if self.method == "compressed-tensors":
            return "weight_scale" in leaves and ct.scheme_for(self.qconfig, module) is not None
        return self.method is not None and "qweight" in leaves

    def quantizes_inputs(self, module: str) -> bool:
        """Does the format quantize this Linear's inputs too (W8A8's per-token int8)?"""
        if self.method != "compressed-tensors":
            return False
        scheme = ct.scheme_for(self.qconfig, module)
        return scheme is not None and ct.quantizes_inputs(scheme)

    def read(self, module: str) -> LinearWeight:
        if f"{module}.weight" in self.src and self.method != "compressed-tensors":
            return DenseWeight(self.src.get(f"{module}.weight"))
        if self._read is None:
            raise LlmkitError(f"checkpoint has no weight for {module}")
        try:
            weight = self._read(self, module)
            if not isinstance(weight, DenseWeight):
                weight.check()
        except (RuntimeError, ValueError, IndexError, KeyError) as e:  # tensors that disagree
            raise LlmkitError(f"{module}: cannot read it as {self.layout()}: {e}") from None
        return weight

    def layout(self) -> str:
        """The stored layout, as its config names it (for error messages)."""
        detail = self.qconfig.get("format") or self.qconfig.get("version")
        return f"{self.method} {detail}" if detail else str(self.method)

    def _gptq(self, module: str) -> GroupedWeight:
        bits, zero_offset = gptq.checkpoint_bits(self.qconfig)
        stored = [self.src.get(f"{module}.{suffix}") for suffix in gptq.SUFFIXES]
        q, scales, zeros, g_idx = gptq.grouped(*stored, bits, zero_offset)
        # g_idx holds global group ids; a rank holding a slice of the groups (scales split
        # along dim 0, a row-parallel layer without act-order) shifts them.
        g_idx = g_idx - self.src.offset(f"{module}.scales", dim=0)
        return GroupedWeight(q, scales, zeros.float(), g_idx, bits)

    def _awq(self, module: str) -> GroupedWeight:
        stored = [self.src.get(f"{module}.{suffix}") for suffix in awq.SUFFIXES]
        if is_awq_gemv(self.qconfig):
            group_size = int(self.qconfig.get("group_size", 128))
            q, scales, zeros, g_idx = awq.grouped_gemv(*stored, group_size)
        else:
            q, scales, zeros, g_idx = awq.grouped(*stored)
        return GroupedWeight(q, scales, zeros.float(), g_idx, awq.BITS)

    def _compressed(self, module: str) -> LinearWeight:
        scheme = ct.scheme_for(self.qconfig, module)
        if scheme is None or f"{module}.weight_scale" not in self.src:
            return DenseWeight(self.src.get(f"{module}.weight"))
        stored = {
            leaf: self.src.get(f"{module}.{leaf}")
            for leaf in ct.LEAVES
            if f"{module}.{leaf}" in self.src
        }
        if "weight_packed" in stored:  # a tp slice is narrower than the stored full shape
            bits = int(scheme["weights"]["num_bits"])
            stored["weight_shape"] = torch.tensor(
                [stored["weight_packed"].shape[0], _packed_cols(stored, bits)]
            )
        weights = scheme.get("weights") or {}
        per_channel_int8 = (
            weights.get("num_bits") == 8
            and weights.get("strategy") == "channel"
            and weights.get("symmetric", True)
            and "weight_zero_point" not in stored
        )
        if not per_channel_int8:
            return DenseWeight(ct.dequantize_module(stored, scheme))
        q = stored["weight"] if "weight" in stored else _unpacked(stored, 8)
        scale = stored["weight_scale"].float().reshape(-1)
        return Int8Weight(q, scale, ct.quantizes_inputs(scheme))


def _packed_cols(stored: dict, bits: int) -> int:
    full_in = int(stored["weight_shape"][1])
    words = stored["weight_packed"].shape[1]
    return full_in if words == -(-full_in * bits // 32) else words * 32 // bits


def _unpacked(stored: dict, bits: int) -> torch.Tensor:
    return ct.unpack_int32(stored["weight_packed"], bits, int(stored["weight_shape"][1]))


# quant_method -> (the tensor names a quantized Linear is stored in, the config check, the
# reader): the one place that dispatches on it.
_FORMATS = {
    "gptq": (gptq.SUFFIXES, None, LinearReader._gptq),
    "awq": (awq.SUFFIXES, awq.check_config, LinearReader._awq),
    "compressed-tensors": (ct.LEAVES, ct.check_config, LinearReader._compressed),
}

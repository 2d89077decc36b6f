"""The AutoAWQ GEMM checkpoint format (`quant_method: awq`, `version: gemm`), 4-bit.

Per quantized Linear with `in` inputs, `out` outputs and groups of g inputs:
- `qweight` int32 [in, out / 8]: row i holds input i of every output; word c holds outputs
  8c..8c+7 in the interleaved order ORDER: nibble j (bits 4j..4j+3) is output 8c + ORDER[j];
- `qzeros`  int32 [in / g, out / 8]: true zero points (not minus one), packed the same way;
- `scales`  fp16  [in / g, out].
Weight: w[o, i] = scales[i // g, o] * (q[i, o] - zeros[i // g, o]). No g_idx: AWQ has no
act-order.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.quant.formats import bitpack
from llmkit.quant.rtn import dequantize_indexed

BITS = 4
PACK = 32 // BITS
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds output ORDER[j] of its eight
SUFFIXES = ("qweight", "qzeros", "scales")


def _interleave(out_features: int) -> torch.Tensor:
    """Position p of the packed stream holds output _interleave(out)[p]."""
    base = torch.arange(0, out_features, PACK)[:, None]
    return (base + torch.tensor(ORDER)).reshape(-1)


def _pack_outputs(values: torch.Tensor) -> torch.Tensor:
    """values [rows, out] (< 16) -> int32 [rows, out / 8], outputs interleaved."""
    if values.shape[1] % PACK:
        raise ValueError(f"AWQ packs outputs in words of {PACK}; got {values.shape[1]} outputs")
    return bitpack.pack_last(values[:, _interleave(values.shape[1])], BITS)


def _unpack_outputs(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_outputs`: int32 [rows, out / 8] -> int64 [rows, out]."""
    out_features = words.shape[1] * PACK
    stream = bitpack.unpack_last(words, BITS, out_features)
    return stream[:, torch.argsort(_interleave(out_features))]


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """q: uint8 [out, in]; scales, zeros: [out, groups] -> qweight, qzeros, scales."""
    if int(q.max()) >= 2**BITS or int(zeros.max()) >= 2**BITS or int(zeros.min()) < 0:
        raise ValueError("AWQ GEMM stores 4-bit values and zero points in [0, 15]")
    return {
        "qweight": _pack_outputs(q.t()),
        "qzeros": _pack_outputs(zeros.t()),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q: int64 [out, in], zeros: int64 [out, groups])."""
    return _unpack_outputs(qweight).t(), _unpack_outputs(qzeros).t()


def grouped(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [out, in], scales [out, groups], zeros [out, groups], g_idx [in]) as in
    gptq.grouped; AWQ's groups are consecutive inputs."""
    q, zeros = unpack(qweight, qzeros)
    group_size = q.shape[1] // scales.shape[0]
    return q, scales.float().t(), zeros, torch.arange(q.shape[1]) // group_size


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] an AWQ GEMM layer computes with."""
    return dequantize_indexed(*grouped(qweight, qzeros, scales))


def check_config(config: dict) -> None:
    """Refuse AWQ variants other than the 4-bit GEMM layout this module reads."""
    if config.get("version", "gemm").lower() != "gemm" or int(config.get("bits", BITS)) != BITS:
        raise LlmkitError(
            f"AWQ {config.get('version')!r} at {config.get('bits')} bits is not supported; "
            "llmkit reads the 4-bit GEMM format"
        )


def quantization_config(group_size: int) -> dict:
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": None,
    }

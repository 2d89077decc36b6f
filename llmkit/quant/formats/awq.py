"""The AutoAWQ checkpoint formats (`quant_method: awq`), 4-bit: GEMM (`version: gemm`),
which llmkit writes and reads, and GEMV (`version: gemv`), which it reads.

GEMM, per quantized Linear with `in` inputs, `out` outputs and groups of g inputs:
- `qweight` int32 [in, out / 8]: row i holds input i of every output; word c holds outputs
  8c..8c+7 in the interleaved order ORDER: nibble j (bits 4j..4j+3) is output 8c + ORDER[j];
- `qzeros`  int32 [in / g, out / 8]: true zero points (not minus one), packed the same way;
- `scales`  fp16  [in / g, out].
GEMV keeps each output's inputs in a row, in their own order:
- `qweight` int32 [out, in / 8]: nibble j of word c of row o is input 8c + j of output o;
- `qzeros`  int32 [out, W]: the groups' zero points packed the same way, in W words: the
  groups in words of 8, rounded up to a multiple of 4, 2 or 1 words for groups of 32, 64
  or 128 and more inputs (only the first in / g are read);
- `scales`  fp16  [out, 8 W]: the groups' scales, then zeros up to the padded width.
Weight: w[o, i] = scale[o, i // g] * (q[o, i] - zero[o, i // g]). No g_idx: AWQ has no
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


def grouped_gemv(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`grouped` for the GEMV layout; `group_size` from the config (-1: one group), as the
    padded scales and zeros do not say it."""
    in_features = qweight.shape[1] * PACK
    size = in_features if group_size <= 0 else group_size
    if in_features % size:
        raise ValueError(f"{in_features} inputs are not whole groups of {size}")
    groups = in_features // size
    if qzeros.shape[1] * PACK < groups or scales.shape[1] < groups:
        raise ValueError(
            f"qzeros {list(qzeros.shape)} and scales {list(scales.shape)} hold fewer than "
            f"the {groups} groups of {in_features} inputs"
        )
    q = bitpack.unpack_last(qweight, BITS, in_features)
    zeros = bitpack.unpack_last(qzeros, BITS, qzeros.shape[1] * PACK)[:, :groups]
    return q, scales[:, :groups].float(), zeros, torch.arange(in_features) // size


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] an AWQ GEMM layer computes with."""
    return dequantize_indexed(*grouped(qweight, qzeros, scales))


def check_config(config: dict) -> None:
    """Refuse AWQ variants other than the 4-bit GEMM and GEMV layouts this module reads."""
    version = str(config.get("version", "gemm")).lower()
    if version not in ("gemm", "gemv") or int(config.get("bits", BITS)) != BITS:
        raise LlmkitError(
            f"AWQ {config.get('version')!r} at {config.get('bits')} bits is not supported; "
            "llmkit reads the 4-bit GEMM and GEMV formats"
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

"""The GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`).

Per quantized Linear with `in` inputs, `out` outputs, b bits, p = 32 // b values a word and
groups of g inputs:
- `qweight` int32 [in * b / 32, out]: each column's inputs as a dense bitstream (input i at
  bits [i*b, (i+1)*b), see bitpack; for b = 2, 4, 8 input i is at bits (i % p) * b of row i // p);
- `qzeros`  int32 [groups, out * b / 32]: zero point minus one, packed the same way along outputs;
- `scales`  fp16  [groups, out];
- `g_idx`   int32 [in]: the group of each input (i // g unless act-order permuted it).
Weight: w[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)).
"""

from __future__ import annotations

import math

import torch

from llmkit.quant.formats import bitpack
from llmkit.quant.rtn import dequantize_indexed

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 3, 4, 8)


def pack(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g_idx: torch.Tensor
) -> dict[str, torch.Tensor]:
    """q: uint8 [out, in]; scales, zeros: [out, groups]; g_idx: [in] -> the four tensors."""
    if bits not in BITS:
        raise ValueError(f"GPTQ packs {', '.join(map(str, BITS))}-bit values, not {bits}")
    in_features, out_features = q.shape[1], q.shape[0]
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        raise ValueError(
            f"{bits}-bit GPTQ packing needs inputs and outputs in whole int32 words "
            f"(multiples of {32 // math.gcd(32, bits)}); got {in_features} x {out_features}"
        )
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero - 1, so zero points must be >= 1")
    return {
        "qweight": bitpack.pack(q.t(), bits),
        "qzeros": bitpack.pack_last((zeros - 1).t(), bits),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, zero_offset: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q: int64 [out, in], zeros: int64 [out, groups]). `zero_offset` is 1 for v1
    checkpoints (zero - 1 stored) and 0 for GPTQModel's v2."""
    in_features = qweight.shape[0] * 32 // bits
    out_features = qweight.shape[1]
    q = bitpack.unpack(qweight, bits, in_features).t()
    zeros = bitpack.unpack_last(qzeros, bits, out_features).t() + zero_offset
    return q, zeros


def checkpoint_bits(config: dict) -> tuple[int, int]:
    """(bits, zero_offset) of a GPTQ `quantization_config` (see `unpack`)."""
    return int(config["bits"]), 0 if config.get("checkpoint_format") == "gptq_v2" else 1


def grouped(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [out, in], scales [out, groups], zeros [out, groups], g_idx [in]): the layer's
    weight is w[o, i] = scales[o, g] * (q[o, i] - zeros[o, g]) with g = g_idx[i]."""
    q, zeros = unpack(qweight, qzeros, bits, zero_offset)
    return q, scales.float().t(), zeros, g_idx.long()


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> torch.Tensor:
    """The float32 weight [out, in] a GPTQ layer computes with."""
    return dequantize_indexed(*grouped(qweight, qzeros, scales, g_idx, bits, zero_offset))


def dequantize_into(
    out: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    rows: int = 256,
) -> None:
    """`dequantize` of a v1 layer written into `out` [out, in] (any float dtype), computed on
    out's device `rows` outputs at a time, so that unpacking's int64 temporaries stay small.
    `rows` is a multiple of 32, where every bit width's packing of the outputs starts a new
    word."""
    for start in range(0, out.shape[0], rows):
        stop = min(start + rows, out.shape[0])
        words = slice(start * bits // 32, stop * bits // 32)
        part = (qweight[:, start:stop], qzeros[:, words], scales[:, start:stop], g_idx)
        out[start:stop] = dequantize(*(t.to(out.device) for t in part), bits)


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool) -> dict:
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
    }

"""The GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel `checkpoint_format: gptq`).

Per quantized Linear with `in` inputs, `out` outputs, b bits, p = 32 // b values a word and
groups of g inputs:
- `qweight` int32 [in / p, out]: input i of column o sits at bits (i % p) * b of row i // p;
- `qzeros`  int32 [groups, out / p]: zero point minus one, packed the same way along outputs;
- `scales`  fp16  [groups, out];
- `g_idx`   int32 [in]: the group of each input (i // g unless act-order permuted it).
Weight: w[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)).
"""

from __future__ import annotations

import torch

from llmkit.quant.formats.compressed_tensors import _to_int32

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint [n, m] -> int32 [n / p, m]: p consecutive rows share a word, the first lowest."""
    per_word = 32 // bits
    n, m = values.shape
    if n % per_word:
        raise ValueError(f"{n} is not a multiple of {per_word} ({bits}-bit values per int32)")
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits)[:, None]
    grouped = values.to(torch.int64).reshape(n // per_word, per_word, m)
    return _to_int32((grouped << shifts).sum(dim=1))


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_rows`: int32 [n / p, m] -> int64 [n, m]."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits)[:, None]
    words = packed.to(torch.int64)[:, None, :] & 0xFFFFFFFF
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(-1, packed.shape[1])


def pack(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g_idx: torch.Tensor
) -> dict[str, torch.Tensor]:
    """q: uint8 [out, in]; scales, zeros: [out, groups]; g_idx: [in] -> the four tensors."""
    if bits not in (2, 4, 8):
        raise ValueError(f"GPTQ packing of {bits}-bit values is not supported here")
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero - 1, so zero points must be >= 1")
    return {
        "qweight": _pack_rows(q.t().contiguous(), bits),
        "qzeros": _pack_rows((zeros - 1).contiguous(), bits).t().contiguous(),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, zero_offset: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q: int64 [out, in], zeros: int64 [out, groups]). `zero_offset` is 1 for v1
    checkpoints (zero - 1 stored) and 0 for GPTQModel's v2."""
    q = _unpack_rows(qweight, bits).t()
    zeros = _unpack_rows(qzeros.t().contiguous(), bits) + zero_offset
    return q, zeros


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> torch.Tensor:
    """The float32 weight [out, in] a GPTQ layer computes with."""
    q, zeros = unpack(qweight, qzeros, bits, zero_offset)
    groups = g_idx.long()
    scale = scales.float().t()[:, groups]  # [out, in]
    return scale * (q.float() - zeros.float()[:, groups])


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

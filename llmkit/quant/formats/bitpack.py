"""Dense little-endian bit packing into int32 words, shared by the GPTQ and compressed-tensors
formats: value k of a column occupies bits [k*b, (k+1)*b) of the column's bitstream, word w
holding stream bits [32w, 32w+32). For b in {2, 4, 8} no value straddles two words; for b = 3
(GPTQ's 3-bit layout) 32 values fill exactly 3 words, two of them straddling."""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def packed_rows(n: int, bits: int) -> int:
    return -(-n * bits // 32)


# Columns packed at a time by the bitstream path (widths that straddle words): its arithmetic
# is in int64, 8 bytes a value, so whole matrices would need several times their own size in
# temporaries.
PACK_COLUMNS = 64


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [n, m] (< 2**bits) -> int32 [ceil(n * bits / 32), m], packed along dim 0."""
    if _whole_words(values.shape[0], bits):
        return _pack_fields(values.t(), bits).t().contiguous()
    return _pack_stream(values, bits)


def pack_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack` along the last dim: [m, n] -> int32 [m, ceil(n * bits / 32)]."""
    if _whole_words(values.shape[1], bits):
        return _pack_fields(values, bits)
    return _pack_stream(values.t(), bits).t().contiguous()


def _whole_words(n: int, bits: int) -> bool:
    """Whether n values of `bits` fill whole words with none straddling two (else the
    bitstream path); widths outside 1-8 are refused."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit values")
    return 32 % bits == 0 and n % (32 // bits) == 0


def _pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths that divide 32, whole words a row: word w of a row ORs its values 32/bits*w + k,
    each shifted k * bits up, one k at a time in int32 (the top field's bit 31 is the sign)."""
    per = 32 // bits
    fields = values.reshape(values.shape[0], -1, per)
    words = torch.zeros(fields.shape[:2], dtype=torch.int32, device=values.device)
    field = torch.empty_like(words)  # one buffer for every k: no fresh pages each time
    for k in range(per):
        field.copy_(fields[..., k]).bitwise_and_((1 << bits) - 1)
        words.bitwise_or_(field.bitwise_left_shift_(k * bits))
    return words


def _pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The bitstream packing along dim 0, PACK_COLUMNS columns at a time."""
    chunks = [values[:, c : c + PACK_COLUMNS] for c in range(0, values.shape[1], PACK_COLUMNS)]
    return torch.cat([_pack_columns(chunk, bits) for chunk in chunks], dim=1)


def _pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    n, m = values.shape
    values = values.to(torch.int64) & ((1 << bits) - 1)
    words = torch.zeros(packed_rows(n, bits) + 1, m, dtype=torch.int64, device=values.device)
    start = torch.arange(n, device=values.device) * bits
    index, offset = start // 32, (start % 32)[:, None]
    # Bit ranges never overlap, so adding is OR-ing; bits past 31 are masked off below and
    # the straddling values' high parts added to the next word.
    words.index_add_(0, index, values << offset)
    words.index_add_(0, index + 1, values >> (32 - offset))
    return to_int32(words[:-1] & _MASK32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 [ceil(n * bits / 32), m] -> int64 [n, m]."""
    if 32 % bits == 0:  # no value straddles two words: each word's fields side by side
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        fields = (words.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return fields.reshape(-1, words.shape[1])[:n].to(torch.int64)
    stream = words.to(torch.int64) & _MASK32
    stream = torch.cat([stream, torch.zeros_like(stream[:1])])
    start = torch.arange(n, device=words.device) * bits
    index, offset = start // 32, (start % 32)[:, None]
    low = stream[index] >> offset
    high = stream[index + 1] << (32 - offset)
    return (low | high) & ((1 << bits) - 1)


def unpack_last(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_last`: int32 [m, ceil(n * bits / 32)] -> int64 [m, n]."""
    return unpack(words.t(), bits, n).t()

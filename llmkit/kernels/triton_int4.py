"""4-bit grouped weights on CUDA in Triton: split-K products for the few rows of decode
steps (on the CUDA cores for up to 4 rows, on the tensor cores for more), and a
dequantizing kernel whose bf16/fp16 weight cuBLAS then multiplies (prefills).

Layout (`pack`): `packed` int32 [in / 8, out], the inputs in tiles of BLOCK_K = 128: word
[t * 16 + j, n] holds inputs t * 128 + 16 i + j (i = 0..7) of output n, input i in bits
4i .. 4i + 3 (unsigned, 0..15); `scales` and `zeros` [groups, out]: weight = scale *
(q - zero), a group of `group_size` consecutive inputs (a multiple of 16 that divides a
tile, or a multiple of a tile). Every tensor has the outputs contiguous, so a program's
loads are coalesced across its outputs, and each word is loaded once: its i-th nibbles
across a tile's 16 words are the weights of 16 consecutive inputs, one slice of the tile.

The products: each program holds BLOCK_N outputs and a run of whole tiles for its rows;
per slice it takes the integer weights as they are (0..15 is exact in any float type),
their products with the rows (tensor cores: a dot per slice; CUDA cores: float32 products
summed per input and output until the tile ends), and applies the group's scale and zero
once per tile (or slice, for groups under 128): s * (x . q) - s * z * sum(x). When the
outputs alone give too few programs to fill the GPU, the inputs are split into parts: each
writes its float32 sums apart, and the part that finishes an output tile last (an atomic
counter per tile says which) adds them up in part order, so a product is one launch and
its result the same every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkit.kernels.triton_attention import dot_precision

BLOCK_M = 16  # rows a tensor-core program holds (tl.dot's smallest)
GEMV_ROWS = 4  # the most rows the CUDA-core product takes
BLOCK_K = 128  # inputs of a tile
SLICE = BLOCK_K // 8  # inputs of a slice: one nibble of each of a tile's words
FILL_PROGRAMS = 4  # programs per streaming multiprocessor a split product aims for
DEQUANTIZE_BLOCK_N = 64


@triton.jit
def _group(s_ptr, z_ptr, first_input, cols, in_cols, N, GROUP: tl.constexpr):
    """(scale, zero) [outputs] float32 of the group holding input `first_input`."""
    at = (first_input // GROUP) * N + cols
    scale = tl.load(s_ptr + at, mask=in_cols, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + at, mask=in_cols, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def _nibbles(words, i: tl.constexpr):
    """The i-th 4-bit value of each word as float32, exactly: its bits under float32's
    exponent of 2**23 make 2**23 + q, and 2**23 is taken off (cheaper than a conversion)."""
    biased = ((words >> (4 * i)) & 0xF) | 0x4B000000
    return biased.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _finish(acc, at, inside, out_ptr, part_ptr, count_ptr, counter, part, M, N,
            PARTS: tl.constexpr):  # fmt: skip
    """Store a program's sums [rows, outputs] at offsets `at`; with several parts, the part
    that finishes its output tile last (`counter`, one per tile, left zero) adds them up."""
    if PARTS == 1:
        tl.store(out_ptr + at, acc, mask=inside)
    else:
        tl.store(part_ptr + part * M * N + at, acc, mask=inside)
        tl.debug_barrier()  # every thread's sums stored before the counter says so
        if tl.atomic_add(count_ptr + counter, 1, sem="acq_rel") == PARTS - 1:
            total = tl.zeros_like(acc)
            for p in range(PARTS):  # in part order: the same sums every run
                total += tl.load(part_ptr + p * M * N + at, mask=inside, other=0.0,
                                 cache_modifier=".cg")  # fmt: skip
            tl.store(out_ptr + at, total, mask=inside)
            tl.atomic_xchg(count_ptr + counter, 0)


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
                   tiles_per_part, PARTS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    pid_n, part, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)
    in_rows, in_cols = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = part * tiles_per_part
    for tile in range(first, first + tiles_per_part):
        at = (tile * 16 + j)[:, None] * N + cols[None, :]
        words = tl.load(w_ptr + at, mask=in_cols[None, :], other=0)
        if GROUP >= 128:  # the tile lies in one group
            scale, zero = _group(s_ptr, z_ptr, tile * 128, cols, in_cols, N, GROUP)
        for i in tl.static_range(8):
            k = tile * 128 + i * 16 + j
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=in_rows[:, None], other=0.0)
            q = _nibbles(words, i).to(x.dtype)
            if GROUP < 128:  # each slice lies in one group
                scale, zero = _group(s_ptr, z_ptr, tile * 128 + i * 16, cols, in_cols, N,
                                     GROUP)  # fmt: skip
            dot = tl.dot(x, q, input_precision=PREC)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += dot * scale[None, :] - x_sum[:, None] * (zero * scale)[None, :]
    at = rows[:, None] * N + cols[None, :]
    inside = in_rows[:, None] & in_cols[None, :]
    counter = pid_m * tl.num_programs(0) + pid_n
    _finish(acc, at, inside, out_ptr, part_ptr, count_ptr, counter, part, M, N, PARTS)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, M, N, K,
                 tiles_per_part, PARTS: tl.constexpr, GROUP: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The product for a few rows without tensor cores: products and sums in float32 on
    the CUDA cores, each slice's weights broadcast over the rows."""
    pid_n, part = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)
    in_rows, in_cols = rows < M, cols < N
    sums = tl.zeros((ROWS, 16, BLOCK_N), dtype=tl.float32)
    offset = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # the zeros' part, taken off last
    first = part * tiles_per_part
    for tile in range(first, first + tiles_per_part):
        at = (tile * 16 + j)[:, None] * N + cols[None, :]
        words = tl.load(w_ptr + at, mask=in_cols[None, :], other=0)
        if GROUP >= 128:  # one scale and zero for the tile, applied once
            scale, zero = _group(s_ptr, z_ptr, tile * 128, cols, in_cols, N, GROUP)
            tile_sums = tl.zeros((ROWS, 16, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((ROWS,), dtype=tl.float32)
        for i in tl.static_range(8):
            k = tile * 128 + i * 16 + j
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=in_rows[:, None], other=0.0)
            x = x.to(tl.float32)
            q = _nibbles(words, i)
            if GROUP >= 128:
                tile_sums += x[:, :, None] * q[None, :, :]
                x_sum += tl.sum(x, axis=1)
            else:  # each slice lies in one group: its weights dequantized
                scale, zero = _group(s_ptr, z_ptr, tile * 128 + i * 16, cols, in_cols, N,
                                     GROUP)  # fmt: skip
                sums += x[:, :, None] * ((q - zero[None, :]) * scale[None, :])[None, :, :]
        if GROUP >= 128:
            sums += tile_sums * scale[None, None, :]
            offset += x_sum[:, None] * (zero * scale)[None, :]
    acc = tl.sum(sums, axis=1) - offset
    at = rows[:, None] * N + cols[None, :]
    inside = in_rows[:, None] & in_cols[None, :]
    _finish(acc, at, inside, out_ptr, part_ptr, count_ptr, pid_n, part, M, N, PARTS)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr):  # fmt: skip
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)
    in_cols = cols < N
    words = tl.load(w_ptr + (tile * 16 + j)[:, None] * N + cols[None, :], mask=in_cols[None, :])
    for i in tl.static_range(8):
        k = tile * 128 + i * 16 + j
        scale, zero = _group(s_ptr, z_ptr, tile * 128 + i * 16, cols, in_cols, N, GROUP)
        weight = (_nibbles(words, i) - zero[None, :]) * scale[None, :]
        tl.store(out_ptr + k[:, None] * N + cols[None, :], weight, mask=in_cols[None, :])


def takes(inputs: int, group_size: int) -> bool:
    """Whether the kernels take a weight: inputs in whole tiles, groups a multiple of 16
    inputs that divides a tile or a multiple of a tile."""
    fits = BLOCK_K % group_size == 0 if group_size < BLOCK_K else group_size % BLOCK_K == 0
    return inputs % BLOCK_K == 0 and group_size % 16 == 0 and fits


def pack(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit q [out, in] (takes() the inputs) as `packed` int32 [in / 8, out]."""
    out, inputs = q.shape
    slices = q.to(torch.int32).t().reshape(inputs // BLOCK_K, 8, SLICE, out)  # t i j n
    shifts = (torch.arange(8, dtype=torch.int32, device=q.device) * 4).view(1, 8, 1, 1)
    words = (slices << shifts).sum(dim=1, dtype=torch.int32)  # t j n
    return words.reshape(inputs // 8, out).contiguous()


def matmul(x, packed, scales, zeros, group_size: int, option: str, parts: int, counters):
    """x [rows, in] @ the weight -> [rows, out] in x's dtype by `option` ("dot/<width>":
    the tensor-core product with output tiles <width> wide; "gemv/<width>": the CUDA-core
    one, for up to GEMV_ROWS rows), the inputs split in `parts` (a divisor of the input
    tiles: split_parts). `counters`: int32 zeros, at least counters_needed(), left zero (a
    layer's own, or one shared by launches in order)."""
    kind, width = option.split("/")
    block_n = int(width)
    rows, inputs = x.shape
    outputs = packed.shape[1]
    tiles = inputs // BLOCK_K
    if tiles % parts:
        raise ValueError(f"{parts} parts do not divide {tiles} input tiles")
    if kind == "gemv" and rows > GEMV_ROWS:
        raise ValueError(f"the CUDA-core product takes at most {GEMV_ROWS} rows")
    grid_m = 1 if kind == "gemv" else triton.cdiv(rows, BLOCK_M)
    grid = (triton.cdiv(outputs, block_n), parts, grid_m)
    if counters.numel() < grid[0] * grid_m:
        raise ValueError("too few counters for this product")
    x = x.contiguous()
    out = torch.empty((rows, outputs), dtype=x.dtype, device=x.device)
    partial = out if parts == 1 else torch.empty((parts, rows, outputs), dtype=torch.float32,
                                                 device=x.device)  # fmt: skip
    args = (x, packed, scales, zeros, out, partial, counters, rows, outputs, inputs, tiles // parts)
    if kind == "gemv":
        _gemv_kernel[grid](*args, PARTS=parts, GROUP=group_size, ROWS=triton.next_power_of_2(rows),
                           BLOCK_N=block_n, num_warps=4 if block_n <= 128 else 8)  # fmt: skip
    else:
        _matmul_kernel[grid](*args, PARTS=parts, GROUP=group_size, BLOCK_M=BLOCK_M,
                             BLOCK_N=block_n, PREC=dot_precision(x.dtype), num_warps=4)  # fmt: skip
    return out


def counters_needed(outputs: int, block_n: int, rows: int) -> int:
    """The most counters a product of up to `rows` rows with output tiles `block_n` wide
    needs."""
    return triton.cdiv(outputs, block_n) * triton.cdiv(rows, BLOCK_M)


def split_parts(inputs: int, outputs: int, block_n: int, programs: int) -> int:
    """The fewest parts (a divisor of the input tiles) that give at least `programs`
    programs, or as many parts as there are tiles."""
    tiles = inputs // BLOCK_K
    columns = triton.cdiv(outputs, block_n)
    return next((p for p in range(1, tiles) if tiles % p == 0 and columns * p >= programs), tiles)


def dequantize(packed, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [in, out] in `dtype` (transposed: `x @ w` is the product)."""
    inputs, outputs = packed.shape[0] * 8, packed.shape[1]
    out = torch.empty((inputs, outputs), dtype=dtype, device=packed.device)
    grid = (inputs // BLOCK_K, triton.cdiv(outputs, DEQUANTIZE_BLOCK_N))
    _dequantize_kernel[grid](packed, scales, zeros, out, outputs, GROUP=group_size,
                             BLOCK_N=DEQUANTIZE_BLOCK_N)  # fmt: skip
    return out


def fill_programs(device: torch.device) -> int:
    """Programs a split product aims for on `device` (a few per multiprocessor)."""
    if device.type != "cuda":
        return 8
    return FILL_PROGRAMS * torch.cuda.get_device_properties(device).multi_processor_count

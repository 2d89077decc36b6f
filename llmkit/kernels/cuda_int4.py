"""4-bit grouped weights times a decode step's few activation rows on CUDA tensor cores
(cuda_int4.cu, compiled by NVRTC through cuda_rtc.py).

`pack` lays a weight out for the kernel: 16-output tiles, each in 64-input chunks of 32
lanes x 4 words, a lane's word holding the 8 values of one 16 x 16 tile that lane gives
mma.sync.m16n8k16 as its A fragment (the tile's inputs in the order the kernel feeds the
activations, see cuda_int4.cu). `pack_scales` keeps (scale, zero) per group and
output as two fp16 values in one 32-bit word, group-major. `matmul` takes bf16 activations
of at most MAX_ROWS rows and returns bf16: the product, or with `gated` silu(gate) * up of a
merged gate/up weight whose rows were packed in `gated_order`. For up to FUSED_ROWS rows it
can also fold a decoder layer's RMSNorm into the product that follows it (`norm`: the
product of the normed rows of the residual stream) and its residual add into the product
before it (`into`: the product added to the residual stream in place), so a layer's norms
cost no launch of their own. Layers do so only where LLMKIT_FUSED_NORMS=1
(`fused_norms`): on the GPUs that have measured it (an H200, benchmarks/cuda_int4.py's
layer rows; an H100, benchmarks/cuda.py's decode) it was slower than the norm kernels apart.

Each product is launched as a programmatic dependent of the kernel before it (compute
capability 9.0 and newer): its blocks start, and load their first weights, while that
kernel finishes. A product may also prefetch other weights into the L2 once it has loaded
its own (`prefetch`, regions made by `prefetch_regions`): a fused decode layer's q/k/v
product those of the products after the attention, which leaves memory nearly idle. Off
unless LLMKIT_L2_PREFETCH_MB says how many megabytes (`l2_prefetch_bytes`): on the H200 it
made a layer slower at every size benchmarks/cuda_int4.py tries.

The packing is plain torch (tested on the CPU against an unpacker written from the
fragment layout); the kernel needs a GPU of compute capability 8.0 or newer.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from pathlib import Path

import torch

from llmkit.errors import LlmkitError

MAX_ROWS = 16  # activation rows one product takes: two tiles of the mma's 8 columns
FUSED_ROWS = 8  # rows a product with a norm or a residual add takes: one tile
# the block shapes a layer chooses from, (warps, chunks in flight a lane): more loads in
# flight, or fewer registers or threads a block (so an SM may hold more blocks); a third
# element 1 (benchmarks/cuda_int4.py compares such) loads a lane's next chunks before it
# multiplies the last (the source's PIPELINE). No one-tile kernel of these spills registers
# on sm_90 (tests/test_cuda_machine_code.py); (8, 4)'s two-tile ones, for 9-16 rows, spill a
# few bytes there and on sm_80 under the 128 registers two blocks an SM leave a thread,
# which variants_for does not weigh (benchmarks/cuda_int4.py times each shape at 16 rows)
VARIANTS = ((8, 4), (8, 2), (4, 4))
SOURCE = Path(__file__).with_name("cuda_int4.cu")


def _fragment_positions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, input, shift) [32 lanes, 4 tiles, 8 values]: where each nibble of a lane's
    word j comes from in a 16-output x 64-input chunk, and its bit position in the word.
    Lane l (g = l // 4, t = l % 4) holds A register s = 0..3 as row g + 8 (s % 2) and,
    in half h, its B fragment's k = 2t + h + 8 (s // 2), which the kernel's activations
    make input 32 (j // 2) + 8t + 4 (j % 2) + 2 (s // 2) + h; half h sits at bits 4s + 16h."""
    lane = torch.arange(32)[:, None, None]
    j = torch.arange(4)[None, :, None]
    s = torch.arange(4).repeat(2)[None, None, :]
    h = torch.arange(2).repeat_interleave(4)[None, None, :]
    row = (lane // 4 + 8 * (s % 2)).expand(32, 4, 8)
    col = 32 * (j // 2) + 8 * (lane % 4) + 4 * (j % 2) + 2 * (s // 2) + h
    return row, col, (4 * s + 16 * h).expand(32, 4, 8)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit `q` [N, K] (N a multiple of 16, K of 64) as int32
    [N / 16, K / 64, 32, 4]: tile, chunk, lane, and the chunk's four 16 x 16 tiles."""
    n, k = q.shape
    row, col, shift = (t.to(q.device) for t in _fragment_positions())
    chunks = q.to(torch.int64).reshape(n // 16, 16, k // 64, 64).permute(0, 2, 1, 3)
    values = chunks[:, :, row, col]  # [N/16, K/64, 32, 4, 8]
    words = (values << shift).sum(-1)  # nibbles do not overlap: the sum is their OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor | None:
    """(scale, zero) [N, groups] as int32 [groups, N], fp16 scale in the low half, fp16 zero
    in the high half; None when a scale is not a normal fp16 number or a zero not exactly
    an fp16 one (the kernel would compute something else)."""
    s, z = scales.to(torch.float32), zeros.to(torch.float32)
    normal = (s.abs() >= 2.0**-14) & (s.abs() <= 65504)
    if not bool(normal.all()) or not torch.equal(z.half().float(), z):
        return None
    bits = [t.half().view(torch.int16).to(torch.int32) & 0xFFFF for t in (s, z)]
    words = bits[0] | (bits[1] << 16)
    return words.t().contiguous()


def gated_order(n: int) -> torch.Tensor:
    """The rows of a merged [gate; up] weight of n rows (n / 2 each, a multiple of 8) in the
    gated kernels' order: each block of 16 outputs 8 gate rows, then the up rows of the same
    8 outputs, so one lane holds both sums of an output."""
    return torch.arange(n).reshape(2, n // 16, 8).transpose(0, 1).reshape(-1)


def fits(n: int, k: int, group_size: int) -> bool:
    """Whether the kernel takes a weight of this shape and group size."""
    return n % 16 == 0 and k % 64 == 0 and group_size % 32 == 0 and k % group_size == 0


def matmul(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, group_size: int,
           variant: tuple[int, int] = VARIANTS[0], gated: bool = False,
           norm: tuple[torch.Tensor, float] | None = None,
           into: torch.Tensor | None = None,
           prefetch: torch.Tensor | None = None):  # fmt: skip
    """bf16 x [rows <= MAX_ROWS, K] times the packed weight: bf16 [rows, N], or with `gated`
    silu(gate) * up [rows, N / 2]. `variant`: (warps a block, chunks in flight a lane[, 1
    to load the next chunks while the last multiply]), the source's WARPS, UNROLL and
    PIPELINE (`variants_for` chooses; benchmarks/cuda_int4.py compares others). At most
    FUSED_ROWS rows, and only where `fuses` said so, one of: `norm` (weight [K] bf16, eps):
    x is the residual stream, and the product is that of weight * rms_norm(x), rounded as
    triton_elementwise's norm rounds; `into` (bf16 [rows, N], contiguous): each output,
    rounded to bf16, is added to it in place (the sum rounded once) -> `into`. `prefetch`
    (`prefetch_regions`): memory each block prefetches a share of into the L2 once its own
    weights are loaded."""
    module = kernels(x.device, variant)
    return _matmul(module, variant[0], x, tiles, scales, group_size, gated, norm, into,
                   prefetch)  # fmt: skip


def _matmul(module, warps: int, x, tiles, scales, group_size: int, gated: bool, norm=None,
            into=None, prefetch=None) -> torch.Tensor:  # fmt: skip
    rows, k = x.shape
    n = tiles.shape[0] * 16
    x = aligned(x)  # runs of 8 inputs are read at once
    if into is None:
        y = torch.empty(rows, n // 2 if gated else n, dtype=torch.bfloat16, device=x.device)
    elif into.shape != (rows, n) or into.dtype != torch.bfloat16 or not into.is_contiguous():
        raise ValueError(f"a product is added only to a contiguous bf16 [{rows}, {n}] tensor")
    else:
        y = into
    weight, eps = (x, 0.0) if norm is None else (aligned(norm[0]), float(norm[1]))
    kind = "norm" if norm is not None else "add" if into is not None else ""
    if kind and rows > FUSED_ROWS:
        raise ValueError(f"norms and adds take at most {FUSED_ROWS} rows, not {rows}")
    kernel = _KERNELS[group_size % 64 == 0, rows > 8, gated, kind]
    regions = 0 if prefetch is None else prefetch.shape[0]
    module.launch(kernel, n // 16, 32 * warps, x, tiles, scales, y, rows, n, k, group_size,
                  weight, eps, prefetch, regions, dependent=True)  # fmt: skip
    return y


def fused_norms() -> bool:
    """Whether decode layers fold their norms and residual adds into their 4-bit products:
    LLMKIT_FUSED_NORMS=1; unset or 0, they do not."""
    text = os.environ.get("LLMKIT_FUSED_NORMS", "0")
    if text not in ("0", "1"):
        raise LlmkitError(f"LLMKIT_FUSED_NORMS={text!r}: give 1 (fold the norms) or 0")
    return text == "1"


def l2_prefetch_bytes() -> int:
    """How many bytes of the weights after its attention a decode layer's q/k/v product
    prefetches into the L2 (`prefetch_regions`): LLMKIT_L2_PREFETCH_MB megabytes; unset or
    0, none."""
    text = os.environ.get("LLMKIT_L2_PREFETCH_MB", "0")
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not 0 <= megabytes <= 1024:
        raise LlmkitError(f"LLMKIT_L2_PREFETCH_MB={text!r}: give megabytes from 0 to 1024")
    return int(megabytes * 2**20)


def prefetch_regions(parts: list[torch.Tensor], budget: int) -> torch.Tensor | None:
    """The first `budget` bytes of the contiguous tensors `parts`, taken in order, as the
    kernel's prefetch regions: int64 [regions, 2] (address, bytes) on their device; None
    where that is nothing. The tensors must outlive the regions."""
    regions = []
    for part in parts:
        if budget <= 0:
            break
        if not part.is_contiguous():
            raise ValueError("prefetch regions are contiguous tensors")
        size = min(budget, part.numel() * part.element_size())
        regions.append((part.data_ptr(), size))
        budget -= size
    if not regions:
        return None
    return torch.tensor(regions, dtype=torch.int64).to(parts[0].device)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy where it is not contiguous or not 16-byte aligned (the CUDA
    C++ kernels, this module's and cuda_int8's, read 16 bytes at once)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _name(fold64: bool, many: bool, gated: bool, kind: str) -> str:
    product = ("silu" if gated else "gemv") + (f"_{kind}" if kind else "")
    return f"int4_{product}_fold{4 if fold64 else 2}_m{2 if many else 1}"


# by (every group a multiple of 64 inputs, more than 8 rows, gated, kind): folds after 4 tiles
# or 2, one or two tiles of 8 rows, silu(gate) * up or the product, with the norm before it
# ("norm"), the residual add after it ("add") or neither; norms and adds for up to 8 rows,
# adds to plain products only
_KERNELS = {
    (a, b, c, kind): _name(a, b, c, kind)
    for a, b, c in itertools.product((False, True), repeat=3)
    for kind in ("", "norm", "add")
    if not (kind and b) and not (kind == "add" and c)
}


def variants_for(n: int, group_size: int, gated: bool, device: torch.device):
    """(the variant for up to 8 rows, for 9-16) of a weight of n outputs: of VARIANTS, the
    one whose n / 16 blocks take the fewest waves over the device's SMs at the blocks an SM
    holds of its kernel (the first on a tie). Each block streams the same bytes, so a last
    wave that is only partly full costs about what a full one does."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count

    def waves(variant: tuple[int, int], many: bool) -> float:
        try:
            module = kernels(device, variant)
        except (OSError, RuntimeError):
            return float("inf")
        kernel = _KERNELS[group_size % 64 == 0, many, gated, ""]
        per_sm = max(1, module.blocks_per_sm(kernel, 32 * variant[0]))
        return -(-(n // 16) // (per_sm * sms))

    return tuple(min(VARIANTS, key=lambda v: waves(v, many)) for many in (False, True))


PIPELINED_GAIN = 0.97  # a pipelined twin is chosen where it takes under this of the time
TIMING_TRIALS, TIMING_LAUNCHES = 3, 8


def timed_variants(tiles: torch.Tensor, scales: torch.Tensor, group_size: int, gated: bool,
                   variants: tuple) -> tuple:  # fmt: skip
    """`variants_for`'s choice for this packed weight, each replaced by its pipelined twin
    (the same variant with PIPELINE: the same sums in the same order, so the same bits)
    where the twin runs faster on this device: timed once per weight shape and variant,
    when a layer is built, at 1 row for the first and MAX_ROWS rows for the second."""
    return tuple(
        _faster(tiles, scales, group_size, gated, variant, MAX_ROWS if many else 1)
        for many, variant in enumerate(variants)
    )


_FASTER: dict[tuple, tuple] = {}  # (device, tiles' shape, group, gated, variant, rows) -> choice


def _faster(tiles, scales, group_size: int, gated: bool, variant: tuple, rows: int) -> tuple:
    key = (tiles.device, tuple(tiles.shape), group_size, gated, variant, rows)
    if key not in _FASTER:
        twin = (*variant[:2], 1)
        try:
            kernels(tiles.device, twin)
        except (OSError, RuntimeError):
            _FASTER[key] = variant  # the twin does not compile or check here
        else:
            x = torch.randn(rows, tiles.shape[1] * 64, device=tiles.device)  # [N/16, K/64, ...]
            args = (x.bfloat16(), tiles, scales, group_size)
            try:
                times = _times((variant, twin), args, gated)
            except (AttributeError, RuntimeError) as e:  # a torch without what _times uses
                warnings.warn(f"llmkit could not time the pipelined 4-bit kernels ({e})",
                              stacklevel=2)  # fmt: skip
                times = {variant: 1.0, twin: 1.0}
            _FASTER[key] = twin if times[twin] < PIPELINED_GAIN * times[variant] else variant
    return _FASTER[key]


def _times(variants: tuple, args: tuple, gated: bool) -> dict:
    """The least GPU time (ms) of TIMING_LAUNCHES products per variant over TIMING_TRIALS
    trials, the variants taking turns; each product's weight read from memory, not L2, and
    the launches queued behind a sleep, so no gap between them is timed."""
    device = args[0].device
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 2**26
    flush = torch.empty(l2 // 2, dtype=torch.float32, device=device)  # twice the L2's bytes
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(TIMING_TRIALS):
        for variant in variants:
            matmul(*args, variant=variant, gated=gated)  # its first launch: untimed
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * TIMING_LAUNCHES)]
            torch.cuda._sleep(10**6)
            for start, end in zip(events[::2], events[1::2], strict=True):
                flush.zero_()
                start.record()
                matmul(*args, variant=variant, gated=gated)
                end.record()
            events[-1].synchronize()
            spent = sum(a.elapsed_time(b) for a, b in zip(events[::2], events[1::2], strict=True))
            best[variant] = min(best[variant], spent)
    return best


def kernels(device: torch.device, variant: tuple[int, int] = VARIANTS[0]):
    """The kernels of `variant` compiled for CUDA `device` and checked there (on first use; a
    CudaError when NVRTC or the driver cannot, or a kernel computes something else). Called
    when a layer is built, so never first while a graph captures."""
    from llmkit.kernels.cuda_rtc import checked_kernels

    return checked_kernels(SOURCE, _KERNELS.values(), defines(variant), device,
                           lambda module, on: _check(module, variant, on))  # fmt: skip


def defines(variant: tuple[int, int]) -> tuple[str, ...]:
    """The source's macros for `variant`: WARPS, UNROLL and PIPELINE (1 for a pipelined
    twin, (warps, unroll, 1))."""
    pipeline = int(variant[2:] == (1,))
    return (f"WARPS={variant[0]}", f"UNROLL={variant[1]}", f"PIPELINE={pipeline}")


@functools.cache
def fuses(device: torch.device, variant: tuple[int, int], prefetching: bool = False) -> bool:
    """Whether `variant`'s products with a norm or a residual add (`matmul`'s `norm`,
    `into`; `prefetching`: the norm ones with a `prefetch`, as layers launch them where
    l2_prefetch_bytes is set) compute what they should on CUDA `device`: checked once, when
    a layer is built; where not, a warning, and layers run their norms and adds as launches
    of their own."""
    from llmkit.kernels.cuda_rtc import CudaError

    module = kernels(device, variant)
    try:
        _check(module, variant, device, ("norm", "add"), prefetching)
    except CudaError as e:
        warnings.warn(f"llmkit runs a layer's norms in launches of their own: {e}", stacklevel=2)
        return False
    return True


def check_inputs(variant: tuple[int, int]) -> int:
    """The inputs of the weights a first-use check multiplies with kernels of `variant`
    (warps, UNROLL; cuda_int4.cu's and cuda_int8.cu's split a block's inputs alike): each
    warp takes 2 UNROLL + 1 chunks of 64, so its unrolled loop runs twice (the pipelined
    one loading ahead once) and its tail loop once, as in a model's layers; a multiple of
    128, so that every group size `_check` tries divides it."""
    warps, unroll = variant[:2]
    chunks = warps * (2 * unroll + 1)
    return 64 * (chunks + chunks % 2)


def _check(module, variant, device: torch.device, kinds=("",), prefetching=False) -> None:
    """Each kernel of `kinds` against the float32 product on `device` (a GPU or a driver
    that computes them otherwise would be caught here, before any layer uses them), the
    norm ones prefetching where `prefetching`: CudaError if off."""
    from llmkit.kernels.cuda_rtc import CudaError

    g = torch.Generator().manual_seed(0)
    k = check_inputs(variant)
    cases = ((32, 3), (32, 12), (128, 1), (128, 16))  # every kernel, gated or not
    for (group, rows), gated, kind in itertools.product(cases, (False, True), kinds):
        key = (group % 64 == 0, rows > 8, gated, kind)
        if key not in _KERNELS:
            continue
        q = torch.randint(0, 16, (32, k), generator=g)
        s = (torch.rand(32, k // group, generator=g) * 0.01 + 0.005).half().float()
        z = torch.randint(0, 16, s.shape, generator=g).float()
        x = torch.randn(rows, k, generator=g).bfloat16()
        w = s.repeat_interleave(group, 1) * (q - z.repeat_interleave(group, 1))
        norm = into = None
        if kind == "norm":
            weight = (torch.rand(k, generator=g) + 0.5).bfloat16()
            norm = (weight.to(device), 1e-5)
            expected = _normed_rows(x, weight, 1e-5) @ w.t()
        else:
            expected = x.float() @ w.t()
        if gated:
            gate, up = expected.chunk(2, dim=-1)
            expected = torch.nn.functional.silu(gate) * up
            order = gated_order(32)
            q, s, z = q[order], s[order], z[order]
        if kind == "add":
            residual = torch.randn(rows, 32, generator=g).bfloat16()
            expected = residual.float() + expected.bfloat16().float()
            into = residual.to(device)
        tiles, words = pack(q.to(device, torch.uint8)), pack_scales(s, z).to(device)
        prefetch = None
        if prefetching and kind == "norm":  # as a layer's q/k/v product may launch
            prefetch = prefetch_regions([tiles, words], 2**20)
        got = _matmul(module, variant[0], x.to(device), tiles, words, group, gated, norm, into,
                      prefetch)  # fmt: skip
        error = float((got.float().cpu() - expected).abs().max() / expected.abs().max())
        if not error < 1e-2:
            raise CudaError(f"{_KERNELS[key]} is off by {error:.3g} of the float32 product here")


def _normed_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) of bf16 rows as the NORM kernels round it (and the norm
    kernels of triton_elementwise.py): the rows times their 1 / rms in float32, rounded to
    bf16, times the weight, rounded again; as float32."""
    h = x.float()
    normed = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).bfloat16()
    return (normed.float() * weight.float()).bfloat16().float()

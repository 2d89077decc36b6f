"""int8 weights times a decode step's few activation rows on CUDA tensor cores (cuda_int8.cu,
compiled by NVRTC through cuda_rtc.py), reading the weight as a checkpoint stores it: q
[N, K] int8, one float32 scale an output, the tensor triton_int8.py's products read too, so
a layer keeps one copy for both.

- `matmul`: weight-only, bf16 activations x -> bf16 scale * (x @ qᵀ), float32 sums (each
  int8 value split into two exact bf16 values for bf16 tensor-core products);
- `w8a8`: int8 activations xq with a float32 scale a row (triton_int8.quantize_rows') ->
  bf16, exact int32 sums of int8 tensor-core products, times the row's scale, then the
  output's: the values triton_int8.w8a8_linear computes, bit for bit.

Both take up to MAX_ROWS rows, N a multiple of 16 and K of 64 (`fits`), and launch as
programmatic dependents of the kernel before them (compute capability 9.0 and newer). The
kernels need compute capability 8.0 or newer; `kernels(device)` compiles them and checks
them against float64 and exact-integer references on first use.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.kernels.cuda_int4 import aligned, check_inputs

MAX_ROWS = 16  # activation rows one product takes: two tiles of the mma's 8 columns
WARPS = 8  # the source's WARPS: warps a block, splitting the inputs
UNROLL = 2  # the source's UNROLL: 64-input chunks a lane loads at once
DEFINES = (f"WARPS={WARPS}", f"UNROLL={UNROLL}")  # the source's macros, as compiled
SOURCE = Path(__file__).with_name("cuda_int8.cu")
NAMES = tuple(f"{kind}_m{tiles}" for kind in ("int8_gemv", "w8a8_gemv") for tiles in (1, 2))
TOLERANCE = 1e-2  # the weight-only check's error, of the float64 product's largest value
# the checked weight's inputs: every warp runs its unrolled loop twice and its tail once
CHECK_INPUTS = check_inputs((WARPS, UNROLL))


def fits(n: int, k: int) -> bool:
    """Whether the kernels take a weight of n outputs and k inputs."""
    return n % 16 == 0 and k % 64 == 0


def matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 x [rows <= MAX_ROWS, K] times int8 q [N, K] (contiguous) transposed, each output
    times its float32 `scale` [N] -> bf16 [rows, N]."""
    return _launch(kernels(x.device), "int8_gemv", x, None, q, scale)


def w8a8(xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
    """int8 xq [rows <= MAX_ROWS, K] times int8 q [N, K] (contiguous) transposed, exact int32
    sums, times each row's float32 x_scale [rows], then each output's `scale` -> bf16."""
    return _launch(kernels(xq.device), "w8a8_gemv", xq, x_scale, q, scale)


def _launch(module, kind: str, x, x_scale, q, scale) -> torch.Tensor:
    rows, k = x.shape
    n = q.shape[0]
    if rows > MAX_ROWS or not fits(n, k) or q.shape[1] != k:
        raise ValueError(f"int8 products take [<= {MAX_ROWS}, K] by [N, K], N % 16 == 0 and "
                         f"K % 64 == 0, not {tuple(x.shape)} by {tuple(q.shape)}")  # fmt: skip
    y = torch.empty(rows, n, dtype=torch.bfloat16, device=x.device)
    if rows:
        x, q = aligned(x), aligned(q)  # runs of 16 bytes are read at once
        module.launch(f"{kind}_m{2 if rows > 8 else 1}", n // 16, 32 * WARPS, x, x_scale, q,
                      scale, y, rows, n, k, dependent=True)  # fmt: skip
    return y


def kernels(device: torch.device):
    """The kernels compiled for CUDA `device` and checked there (on first use; a CudaError
    where NVRTC or the driver cannot, or a kernel computes something else). Called when a
    layer is built, so never first while a graph captures."""
    from llmkit.kernels.cuda_rtc import checked_kernels

    return checked_kernels(SOURCE, NAMES, DEFINES, device, _check)


def _check(module, device: torch.device) -> None:
    """Every kernel against its reference on `device`, at rows of both tile counts: the
    weight-only product within TOLERANCE of the float64 one, the W8A8 one equal to the
    exact integer sums times the scales as float32 rounds them. CudaError if off."""
    from llmkit.kernels.cuda_rtc import CudaError

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (48, CHECK_INPUTS), generator=g, dtype=torch.int8)
    scale = torch.rand(48, generator=g) * 0.02 + 0.001
    on = [t.to(device) for t in (q, scale)]
    for rows in (3, 8, 13, 16):
        x = torch.randn(rows, CHECK_INPUTS, generator=g).bfloat16()
        got = _launch(module, "int8_gemv", x.to(device), None, *on).double().cpu()
        want = reference(x, q, scale)
        error = float((got - want).abs().max() / want.abs().max())
        if not error < TOLERANCE:
            raise CudaError(f"int8_gemv is off by {error:.3g} of the float64 product here")
        xq = torch.randint(-127, 128, (rows, CHECK_INPUTS), generator=g, dtype=torch.int8)
        x_scale = torch.rand(rows, generator=g) * 0.1 + 0.01
        got = _launch(module, "w8a8_gemv", xq.to(device), x_scale.to(device), *on).cpu()
        if not torch.equal(got, w8a8_reference(xq, x_scale, q, scale)):
            raise CudaError("w8a8_gemv gives other values than its exact reference here")


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight-only product in float64 on the CPU, [rows, N]."""
    return (x.double().cpu() @ q.double().cpu().t()) * scale.double().cpu()


def w8a8_reference(xq, x_scale, q, scale) -> torch.Tensor:
    """The W8A8 product's bf16 values on the CPU: exact integer sums (in int64), as float32,
    times each row's scale, then each output's, rounded to bf16."""
    sums = (xq.cpu().to(torch.int64) @ q.cpu().to(torch.int64).t()).float()
    return (sums * x_scale.cpu()[:, None] * scale.cpu()).bfloat16()

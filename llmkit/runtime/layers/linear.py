"""Linear layers for every format llmkit reads, and the load-time conversion into them.

A checkpoint's Linear is first read into one of three plain records (dense, int8 per-channel,
grouped integer: quant/formats/weights.py, read by quant/formats/readers.py), merged with its
siblings when they share an input (q/k/v, gate/up), then
converted into the module that is fastest on the device:

- dense: `F.linear` in the model dtype. On a CPU with AVX512-BF16, bf16 weights are
  repacked for its bf16 pair products and every batch takes llmkit's kernel. Elsewhere on
  CPU, half-precision weights take llmkit's kernel for the few rows of a decode step,
  widened to float32 in registers; larger batches without native half-precision products
  are computed in float32 from weight blocks widened on the fly;
- int8 weight-only: on CPU llmkit's kernel for every batch, else
  `torch._weight_int8pack_mm` (inputs a multiple of 32), else the dequantized weight; on
  CUDA llmkit's tensor-core kernel for the few rows of a decode step with bf16 activations
  (kernels/cuda_int8.py) and its Triton product (kernels/triton_int8.py) for the rest, both
  reading the one int8 copy of the weight;
- W8A8: dynamic per-token int8 activations; on CPU llmkit's kernel for every batch (exact
  int32 sums), else `torch._int_mm`; on CUDA the activations quantized by llmkit's Triton
  kernel, then for a decode step's rows its tensor-core kernel (bf16 models, up to 16 rows)
  or Triton product (up to 64), `torch._int_mm` for more; all of them the same values;
- 4-bit grouped (GPTQ incl. act-order, AWQ, compressed-tensors): on CPU llmkit's kernel
  for every batch, prefills included (it passes over a weight once per 128 rows), else
  `aten._weight_int4pack_mm_for_cpu`; on CUDA (compute capability 8.0 and newer)
  llmkit's tensor-core kernel for the few rows of a decode step (kernels/cuda_int4.py, its
  own copy of the weight; for a merged gate/up pair it writes silu(gate) * up itself) and
  the tinygemm kernel `aten._weight_int4pack_mm` for more.
  Act-order is a permutation of the inputs so groups become contiguous.

llmkit's CPU kernels (llmkit/kernels/cpu_gemm.cpp) take float32 or bf16 activations; the
int8 and 4-bit weight-only ones compute with the activations in int8 blocks of 32 (one
scale per block, as llama.cpp does), so their products are exact integer dot products and
the weights' bytes, not arithmetic, set their speed. torch's kernels compute (q - 8) *
scale + zero per group with bf16 activations and scales.

Anything a kernel cannot take (odd shapes, 3/8-bit GPTQ, older GPUs) runs as its exact
dequantized float weight instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.kernels import cpu as cpu_kernels
from llmkit.kernels import cuda as cuda_kernels
from llmkit.kernels import cuda_int4, cuda_int8
from llmkit.quant import int8
from llmkit.quant.formats.weights import DenseWeight, GroupedWeight, Int8Weight, LinearWeight
from llmkit.runtime.layers import pages

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the CPU int4 kernel accepts, largest first


def concat(parts: list[LinearWeight]) -> LinearWeight | None:
    """One weight computing all `parts` side by side along outputs, or None when their
    layouts differ (e.g. act-order permutations that are not the same)."""
    first = parts[0]
    if any(type(p) is not type(first) for p in parts):
        return None
    if isinstance(first, DenseWeight):
        return DenseWeight(torch.cat([p.weight for p in parts]))
    if isinstance(first, Int8Weight):
        if any(p.act_quant != first.act_quant for p in parts):
            return None
        return Int8Weight(
            torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), first.act_quant
        )
    same = all(p.bits == first.bits and torch.equal(p.g_idx, first.g_idx) for p in parts)
    if not same or any(p.scales.shape[1] != first.scales.shape[1] for p in parts):
        return None
    return GroupedWeight(
        torch.cat([p.q for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zeros for p in parts]),
        first.g_idx,
        first.bits,
    )


def convert_for_runtime(
    weight: LinearWeight,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    exact: bool = False,
    gated: bool = False,
) -> nn.Module:
    """The fastest module computing `weight` on `device` with `dtype` activations; with
    `exact`, weight-only formats run as their dequantized weight in `dtype` (no kernel
    rounds the activations or the scales: what quality measurements need). `gated`: the
    weight is a merged [gate; up] pair, so the module may offer `silu_mul(x)`, silu(gate) *
    up in its own launch (Int4Linear on CUDA)."""
    bias = None if bias is None else bias.to(device, dtype)
    if exact and not (isinstance(weight, Int8Weight) and weight.act_quant):
        if isinstance(weight, DenseWeight):
            return DenseLinear(weight.weight.to(device, dtype), bias)
        return DenseLinear(weight.dequantize().to(device, dtype), bias)
    if isinstance(weight, Int8Weight):
        if weight.act_quant:
            return W8A8Linear(weight, bias, dtype, device)
        module = Int8Linear.build(weight, bias, dtype, device)
        if module is not None:
            return module
    if isinstance(weight, GroupedWeight):
        module = Q4Linear.build(weight, bias, dtype, device)
        module = module or Int4Linear.build(weight, bias, dtype, device, gated)
        if module is not None:
            return module
    if isinstance(weight, DenseWeight):  # straight to `dtype`: no float32 copy on the way
        return _dense(weight.weight.to(device, dtype), bias)
    return _dense(weight.dequantize().to(device, dtype), bias)


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return PairsLinear.build(weight, bias) or DenseLinear(weight, bias)


class DenseLinear(nn.Module):
    """F.linear. On CPU (where PairsLinear does not take the weight), the few rows of a
    decode step (up to KERNEL_MAX_ROWS) go through llmkit's kernel, float32 sums: bf16 and
    fp16 weights stay half precision in memory, widened to float32 in registers, and
    float32 weights stream as they are (the kernel reads them faster than torch's products
    do up to some 32 rows, and about as fast at 64). Larger batches: F.linear; for half
    precision where the CPU has native bf16 products (oneDNN), else float32 products of
    weight blocks widened on the fly, since emulated half-precision products are much
    slower than float32 ones (benchmarks/cpu_decode.py and benchmarks/engine_throughput.py
    measure both)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        half = _half_on_cpu(weight)
        self.widen = half and not (weight.dtype == torch.bfloat16 and native_bf16_on_cpu())
        dense = half or (weight.device.type == "cpu" and weight.dtype == torch.float32)
        self.op = _cpu_op("dense_linear", weight.device) if dense else None
        if self.op is not None:  # streamed whole at every decode step
            weight = _streamed(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is not None and _kernel_takes(x):
            return _plus(self.op(x, self.weight), self.bias)
        if self.widen and x.numel() > WIDEN_MIN_ROWS * x.shape[-1]:
            return linear_in_float32(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def kernel_call(self) -> KernelCall | None:
        return None if self.op is None else KernelCall(DENSE, [self.weight], self.bias)


class PairsLinear(nn.Module):
    """bf16 weights for the CPU's bf16 pair products (AVX512-BF16: llmkit's pairs_linear
    kernel, built only where the CPU has them), repacked at load as [out / 64, in / 2, 64, 2]:
    for each group of 64 outputs and each pair of inputs, the 64 outputs' two weights side
    by side, so each vector lane sums one output and a group streams in one run. Every batch
    size takes it, decode steps and prefills alike (benchmarks/cpu_decode.py measures it
    against llama.cpp). It takes bf16 activations, the model's dtype."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, op):
        super().__init__()
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.op = op

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> PairsLinear | None:
        """None unless the kernel exists here, the weight is bf16 and its outputs come in
        groups of 64 and its inputs in pairs."""
        out, inp = weight.shape
        if weight.dtype != torch.bfloat16 or out % PAIR_OUTPUTS or inp % 2:
            return None
        op = _cpu_op("pairs_linear", weight.device)
        if op is None:
            return None
        groups = weight.reshape(out // PAIR_OUTPUTS, PAIR_OUTPUTS, inp // 2, 2)
        return cls(_streamed(groups.permute(0, 2, 1, 3)), bias, op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:  # not the model's dtype: the plain product
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight().to(x.dtype), bias)
        return _plus(_on_rows(self.op, x, self.packed), self.bias)

    def weight(self) -> torch.Tensor:
        """The weight [out, in] as it was before the repacking."""
        groups, pairs = self.packed.shape[:2]
        return self.packed.permute(0, 2, 1, 3).reshape(groups * PAIR_OUTPUTS, 2 * pairs)

    def kernel_call(self) -> KernelCall:
        return KernelCall(PAIRS, [self.packed], self.bias)


PAIR_OUTPUTS = 64  # outputs a group of PairsLinear's layout holds


def pair_products_here() -> bool:
    """Whether this CPU runs PairsLinear (llmkit's kernels are built, with AVX512-BF16)."""
    return _cpu_op("pairs_linear", torch.device("cpu")) is not None


# The kinds of llmkit's CPU matrix kernels, as kernels/cpu_layer.cpp numbers them
DENSE, Q4, Q8, W8A8, PAIRS = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class KernelCall:
    """How a Linear runs through llmkit's CPU kernels for a few rows: the kernel's kind, its
    weight tensors, the bias added after it, the 4-bit group size (0 for other kinds)."""

    kind: int
    weights: list[torch.Tensor]
    bias: torch.Tensor | None
    group_size: int = 0

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.weights if self.bias is None else [*self.weights, self.bias]


# Rows of activations llmkit's dense kernel takes (and a decode step the one-call
# decode stack runs). More rows than this (prefill chunks) are multiplied by torch's products,
# the weights widened a block at a time where the CPU has no native bf16 ones; the int8 and
# 4-bit kernels take every batch.
KERNEL_MAX_ROWS = 64
WIDEN_MIN_ROWS = 8  # without the kernel: up to this many rows the half product is as fast
WIDEN_BLOCK = 2**20  # weight elements widened at a time: 4 MiB of float32 stay in cache


def linear_in_float32(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed in float32, a block of output rows at a time, and
    rounded once to x's dtype, as the half-precision product rounds its float32 sums.
    `weight`: a tensor, or a quantized module whose `shape` and `[rows]` (float32 rows,
    dequantized) stand for its weight."""
    x32 = x.float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    rows = max(1, WIDEN_BLOCK // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        stop = start + rows
        b = None if bias is None else bias[start:stop].float()
        out[..., start:stop] = F.linear(x32, weight[start:stop].float(), b)
    return out


def _cpu_op(name: str, device: torch.device, dtype: torch.dtype | None = None):
    """llmkit's CPU kernel `name` (torch.ops.llmkit_cpu) when it can run on `device` with
    activations of `dtype` (float32 or bf16; None: checked at each call), else None."""
    if device.type != "cpu" or dtype not in (None, *cpu_kernels.DTYPES):
        return None
    ops = cpu_kernels.ops()
    op = None if ops is None else getattr(ops, name, None)  # some exist only on some CPUs
    return None if op is None else op.default


def _streamed(weight: torch.Tensor) -> torch.Tensor:
    """A weight llmkit's CPU kernels read whole at every step, copied into 2 MiB pages
    (layers/pages.py). Contiguous in any case."""
    return pages.streamed(weight)


def _kernel_takes(x: torch.Tensor) -> bool:
    """Whether `x` suits the dense kernel: a few float32 or bf16 rows."""
    return x.dim() == 2 and x.shape[0] <= KERNEL_MAX_ROWS and x.dtype in cpu_kernels.DTYPES


def _on_rows(op, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """op(x, *weights) for x of any leading shape (the kernels take [rows, in])."""
    if x.dim() == 2:
        return op(x, *weights)
    y = op(x.reshape(-1, x.shape[-1]), *weights)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _plus(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _half_on_cpu(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)


def native_bf16_on_cpu() -> bool:
    """Whether oneDNN computes bf16 products natively here (else they are emulated, slowly)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _int8_op(name: str, q: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """llmkit's int8 kernel `name` when it takes this weight: inputs in blocks of 32, no -128
    (the kernels multiply by |x| and move x's sign onto the weight)."""
    if q.shape[1] % 32 or bool((q == -128).any()):
        return None
    return _cpu_op(name, device, dtype)


class Int8Linear(nn.Module):
    """Weight-only int8. On CUDA llmkit's tensor-core kernel for up to `decode_rows` rows
    (kernels/cuda_int8.py) and its Triton product for more (kernels/triton_int8.py), both
    reading the weight as int8 with float32 scales. On the CPU llmkit's kernel for every
    batch (q8_linear, the weight in tiles of 8 outputs, see _i8_tiles), else torch's int8 x
    float product."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype,
                 device=None, kernels=None):  # fmt: skip
        """`kernels`: kernels/cuda.int8_for's module, for the Triton product (`build`)."""
        super().__init__()
        device = weight.q.device if device is None else device
        self.kernels = kernels
        self.decode_rows = _int8_decode_rows(weight.q.shape, device, dtype) if kernels else 0
        self.op = None if kernels else _int8_op("q8_linear", weight.q, device, dtype)
        self.out_features = weight.q.shape[0]
        if self.op is not None:
            _register_int8_tiles(self, weight)
        else:  # [out, in], as the products and linear_in_float32 read it
            self.register_buffer("q", weight.q.to(device).contiguous())
            scale_dtype = dtype if kernels is None else torch.float32
            self.register_buffer("scale", weight.scale.to(device, scale_dtype))
        self.bias = bias

    @classmethod
    def build(cls, weight: Int8Weight, bias, dtype, device: torch.device) -> Int8Linear | None:
        """The module where one of its products runs on `device` with `dtype` activations,
        else None (the dequantized weight runs instead)."""
        kernels = cuda_kernels.int8_for(device, dtype)
        on_cpu = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
        if kernels is None and not on_cpu:
            return None
        return cls(weight, bias, dtype, device, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return _plus(_on_rows(self._cuda, x.contiguous()), self.bias)
        if self.op is not None:
            return _plus(_tile_outputs(self, _on_rows(self.op, x, self.q, self.scale)), self.bias)
        if self.q.shape[1] % 32 == 0:
            return _plus(torch._weight_int8pack_mm(x, self.q, self.scale), self.bias)
        # inputs torch's kernel cannot take: it reads them in whole vectors, past the end of
        # a row whose length is not a multiple of its width (wrong sums, or a crash)
        return linear_in_float32(x, self, self.bias)

    def _cuda(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA path of [rows, in] x, bias aside."""
        if len(x) <= self.decode_rows and x.dtype == torch.bfloat16:
            return cuda_int8.matmul(x, self.q, self.scale)
        return self.kernels.int8_linear(x, self.q, self.scale)

    def kernel_call(self) -> KernelCall | None:
        if self.op is None or self.out_features % TILE_ROWS:
            return None
        return KernelCall(Q8, [self.q, self.scale], self.bias)

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's shape (torch's layout only, as linear_in_float32 reads it)."""
        return tuple(self.q.shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Output rows `rows` of the weight, dequantized to float32 (torch's layout only)."""
        return self.q[rows].float() * self.scale[rows, None]


class W8A8Linear(nn.Module):
    """int8 x int8 -> int32 with per-token input scales and per-channel weight scales: on CPU
    llmkit's kernel for every batch (w8a8_linear, the weight in q8_linear's tiles), else
    torch._int_mm. On CUDA the rows are quantized by llmkit's Triton kernel and, up to
    `decode_rows` of them, multiplied by its tensor-core kernel (kernels/cuda_int8.py), up
    to TRITON_ROWS (or shapes cuBLASLt cannot take) by its Triton product (kernels/
    triton_int8.py), more by torch._int_mm: exact int32 sums, the same values each way."""

    TRITON_ROWS = 64  # a decode step's rows; prefills take cuBLASLt's int8 products

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype, device):
        super().__init__()
        self.kernels = cuda_kernels.int8_for(device, dtype)
        self.op = None if self.kernels else _int8_op("w8a8_linear", weight.q, device, dtype)
        shape = weight.q.shape
        self.decode_rows = _int8_decode_rows(shape, device, dtype) if self.kernels else 0
        self.out_features = weight.q.shape[0]
        if self.op is not None:
            _register_int8_tiles(self, weight)
        else:  # [in, out], as torch's product reads it: row-major on the CPU, column-major
            # (the [out, in] rows) on CUDA, the layout cuBLASLt's int8 products take and,
            # transposed back, the Triton product
            q = weight.q.to(device)
            row_major = q.is_cpu and self.kernels is None
            self.register_buffer("q", q.t().contiguous() if row_major else q.contiguous().t())
            self.register_buffer("scale", weight.scale.to(device))
        self.bias = bias
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op is not None:
            return _plus(_tile_outputs(self, _on_rows(self.op, x, self.q, self.scale)), self.bias)
        if self.kernels is not None:
            return _plus(_on_rows(self._cuda, x.contiguous()), self.bias)
        xq, x_scale = int8.quantize_per_token(x)  # max|x| / 127 per token, as vLLM's kernels
        return _plus(self._product(xq, x_scale), self.bias)

    def _cuda(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA path of [rows, in] x, bias aside."""
        xq, x_scale = self.kernels.quantize_rows(x)
        if len(x) <= self.decode_rows:
            return cuda_int8.w8a8(xq, x_scale, self.q.t(), self.scale)
        if len(x) <= self.TRITON_ROWS or not self._int_mm_takes():
            return self.kernels.w8a8_linear(xq, x_scale, self.q.t(), self.scale, self.dtype)
        return self._product(xq, x_scale[:, None])

    def _product(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """int8 rows xq times the weight through torch ops: exact int32 sums, times each
        row's x_scale [rows, 1], then each output's scale, rounded to the dtype."""
        if xq.device.type == "cpu":
            acc = torch._int_mm(xq, self.q).float()
        elif self._int_mm_takes():
            acc = _int_mm_on_cuda(xq, self.q).float()
        else:  # exact in float32 for |sums| < 2**24
            acc = xq.float() @ self.q.float()
        return (acc * x_scale * self.scale).to(self.dtype)

    def _int_mm_takes(self) -> bool:
        """Whether torch._int_mm (cuBLASLt) takes the weight's shape on CUDA."""
        return self.q.shape[0] % 8 == 0 and self.q.shape[1] % 8 == 0

    def kernel_call(self) -> KernelCall | None:
        if self.op is None or self.out_features % TILE_ROWS:
            return None
        return KernelCall(W8A8, [self.q, self.scale], self.bias)


def _int8_decode_rows(shape, device: torch.device, dtype: torch.dtype) -> int:
    """The most rows llmkit's CUDA int8 kernels take of a weight of `shape` [out, in] with
    `dtype` activations on `device` (cuda_int8.MAX_ROWS), or 0: off CUDA, for other dtypes
    than bf16, shapes they do not tile, GPUs before compute capability 8.0, and where they
    do not compile or check (a warning, once; the Triton products take every batch)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not cuda_int8.fits(*shape):
        return 0
    if torch.cuda.get_device_capability(device) < (8, 0):
        return 0
    try:
        cuda_int8.kernels(device)
    except (OSError, RuntimeError) as e:
        # shown once: Python's default filter reports a warning once per place and text
        reason = f"llmkit's CUDA int8 kernels are unavailable ({e}); Triton's products run"
        warnings.warn(reason, stacklevel=2)
        return 0
    return cuda_int8.MAX_ROWS


def _int_mm_on_cuda(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """int32 xq @ q through torch._int_mm (cuBLASLt), which takes more than 16 rows only:
    fewer are padded with zero rows, cut from the result."""
    rows = xq.shape[0]
    if rows <= 16:
        xq = torch.cat([xq, xq.new_zeros(32 - rows, xq.shape[1])])
    return torch._int_mm(xq, q)[:rows]


class Int4Linear(nn.Module):
    """4-bit grouped weights in the packed layout of the device's int4 kernel."""

    def __init__(self, packed, scales_zeros, group_size, perm, bias, dtype, decode=None,
                 fuses: bool = False):  # fmt: skip
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)  # bf16 [groups, out, 2]
        self.register_buffer("perm", perm)  # [in] input order, or None when groups are in order
        self.group_size = group_size
        self.bias = bias
        self.dtype = dtype
        # CUDA: the weight again for llmkit's kernel of a decode step's few rows
        # (kernels/cuda_int4.py): (tiles, scales, group size, gated, variants), or None;
        # gated: a [gate; up] pair in cuda_int4.gated_order, which only silu_mul runs;
        # variants: the kernel's block shapes for up to 8 rows and for more
        none = (None, None, 0, False, ())
        tiles, scales, self.decode_group, self.gated, self.variants = decode or none
        self.register_buffer("decode_tiles", tiles)
        self.register_buffer("decode_scales", scales)
        # whether that kernel also takes the norm before this product or the residual add
        # after it, for up to cuda_int4.FUSED_ROWS rows (`normed`, `add_to`)
        self.fuses = fuses
        self._mm = (
            torch.ops.aten._weight_int4pack_mm
            if packed.is_cuda
            else torch.ops.aten._weight_int4pack_mm_for_cpu
        )

    @classmethod
    def build(cls, w: GroupedWeight, bias, dtype, device: torch.device,
              gated: bool = False) -> Int4Linear | None:  # fmt: skip
        """None when the kernel cannot take this weight (bits, shapes, uneven groups) or the
        device has no int4 kernel. `gated`: see convert_for_runtime."""
        layout = _contiguous_groups(w)
        if w.bits != 4 or w.q.shape[0] % 16 or layout is None or not _int4_kernel_on(device):
            return None
        perm, groups, size = layout
        kernel_size = next((s for s in INT4_GROUP_SIZES if size % s == 0), None)
        if kernel_size is None:
            return None
        repeat = size // kernel_size  # a large group becomes several kernel groups
        in_order = w.scales[:, groups], w.zeros[:, groups]  # [out, groups] as the inputs go
        scales, zeros = (t.repeat_interleave(repeat, dim=1) for t in in_order)
        # kernel: (q - 8) * s + z'  ==  s * (q - zero)  with  z' = (8 - zero) * s
        scales_zeros = torch.stack([scales, (8 - zeros) * scales], dim=-1).transpose(0, 1)
        q = (w.q if perm is None else w.q[:, perm]).to(device, torch.uint8)  # once for both
        packed = _pack_int4(q, device)
        if packed is None:
            return None
        scales_zeros = scales_zeros.to(device, torch.bfloat16).contiguous()
        perm = None if perm is None else perm.to(device)
        decode = _cuda_decode_weight(q, *in_order, size, device, gated and bias is None)
        foldable = perm is None and bias is None and dtype == torch.bfloat16
        fuses = decode is not None and foldable and cuda_int4.fused_norms()
        if fuses:  # its kernels with a norm or an add checked as a layer would launch them
            fuses = cuda_int4.fuses(device, decode[4][0], cuda_int4.l2_prefetch_bytes() > 0)
        return cls(packed, scales_zeros, kernel_size, perm, bias, dtype, decode, fuses)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        x = x.to(torch.bfloat16)
        if self.decode_tiles is not None and not self.gated and x.shape[0] <= cuda_int4.MAX_ROWS:
            y = cuda_int4.matmul(x, *self._decode(x))
        else:
            y = self._mm(x, self.packed, self.group_size, self.scales_zeros)
        y = y.to(self.dtype)
        return y if self.bias is None else y + self.bias

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up [rows, out / 2] of this [gate; up] pair in one launch, from the
        float32 sums (rounded once); None where the decode layout is not gated or x has
        more rows than the kernel takes (the caller then runs forward and the activation)."""
        if not self.gated or x.shape[0] > cuda_int4.MAX_ROWS:
            return None
        if self.perm is not None:
            x = x[:, self.perm]
        x = x.to(torch.bfloat16)
        return cuda_int4.matmul(x, *self._decode(x), gated=True).to(self.dtype)

    def normed(self, residual: torch.Tensor, norm, prefetch=None) -> torch.Tensor:
        """This product of norm(residual) (an RMSNorm; its rounding) in one launch, or where
        gated silu(gate) * up of it; `residual` bf16 [rows <= FUSED_ROWS, in]; `prefetch`:
        cuda_int4.matmul's. Where `fuses` only."""
        decode = self._decode(residual)
        return cuda_int4.matmul(residual, *decode, gated=self.gated,
                                norm=(norm.weight, norm.eps), prefetch=prefetch)  # fmt: skip

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """residual += this product of x, in one launch (the product rounded to bf16, the
        sum rounded once, as RMSNorm's residual add rounds); bf16 [rows <= FUSED_ROWS, ...]
        both. Where `fuses` only."""
        cuda_int4.matmul(x, *self._decode(x), into=residual)

    def _decode(self, x: torch.Tensor) -> tuple:
        """cuda_int4.matmul's arguments after x: the decode copy and the variant for x."""
        variant = self.variants[x.shape[0] > 8]
        return self.decode_tiles, self.decode_scales, self.decode_group, variant


class Q4Linear(nn.Module):
    """4-bit grouped weights through llmkit's CPU kernel (kernels/cpu_gemm.cpp q4_linear), in
    tiles of 8 output rows: packed [tiles, 4 x in] (each block of 32 inputs of a tile's rows
    128 bytes), fp16 scales and uint8 zeros [tiles, groups, 8]; zeros empty where every zero
    is 8 (symmetric quantization: the kernel reads fewer bytes). Outputs past a multiple of 8
    are padded with zero rows and cut off after the kernel. Decode steps and prefills alike:
    its int8 dot products run a prefill several times faster than float32 products of the
    dequantized weight (benchmarks/cpu_decode.py measures both against llama.cpp)."""

    def __init__(self, packed, scales, zeros, group_size: int, out_features: int, perm, bias, op):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("perm", perm)  # [in] input order, or None when groups are in order
        self.group_size = group_size
        self.out_features = out_features
        self.bias = bias
        self.op = op

    @classmethod
    def build(cls, w: GroupedWeight, bias, dtype, device: torch.device) -> Q4Linear | None:
        """None when the kernel cannot take this weight: bits, uneven groups or groups not a
        multiple of 32 inputs, zeros that are not 4-bit integers, scales fp16 cannot hold
        to its precision, or no kernel for this device and dtype."""
        op = _cpu_op("q4_linear", device, dtype)
        layout = _contiguous_groups(w)
        if op is None or w.bits != 4 or layout is None or layout[2] % 32:
            return None
        perm, groups, size = layout
        scales, zeros = w.scales[:, groups], w.zeros[:, groups]
        if not (_4bit_integers(zeros) and _fp16_normal(scales)):
            return None
        q = (w.q if perm is None else w.q[:, perm]).to(torch.uint8)
        symmetric = bool((zeros == SYMMETRIC_ZERO).all())
        return cls(
            _streamed(_q4_tiles(q)),
            _by_tile(scales.to(torch.float16)),
            torch.empty(0, dtype=torch.uint8) if symmetric else _by_tile(zeros.to(torch.uint8)),
            size,
            q.shape[0],
            perm,
            bias,
            op,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[..., self.perm]
        y = _on_rows(self.op, x, self.packed, self.scales, self.zeros, self.group_size)
        return _plus(_tile_outputs(self, y), self.bias)

    def kernel_call(self) -> KernelCall | None:
        if self.perm is not None or self.out_features % TILE_ROWS:
            return None
        weights = [self.packed, self.scales, self.zeros]
        return KernelCall(Q4, weights, self.bias, self.group_size)


TILE_ROWS = 8  # output rows the 4-bit and int8 CPU kernels interleave
SYMMETRIC_ZERO = 8  # every zero of a symmetric 4-bit weight: q4_linear takes no zeros then


def _q4_tiles(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit q [out, in] in q4_linear's tiles: [tiles, 4 x in], byte 32 j + 4 r + i
    of a block holding input 4 j + i of row r (low nibble) and input 16 + 4 j + i (high)."""
    q = _pad_rows(q)
    tiles = q.shape[0] // TILE_ROWS
    parts = q.reshape(tiles, TILE_ROWS, -1, 2, 4, 4)  # t r b h j i
    packed = parts[:, :, :, 0] | (parts[:, :, :, 1] << 4)  # t r b j i
    return packed.permute(0, 2, 3, 1, 4).reshape(tiles, -1).contiguous()


def _i8_tiles(q: torch.Tensor) -> torch.Tensor:
    """int8 q [out, in] in q8_linear's and w8a8_linear's tiles: [tiles, 8 x in], byte
    32 c + 4 r + i of a block of 32 inputs holding input 4 c + i of row r."""
    q = _pad_rows(q)
    tiles = q.shape[0] // TILE_ROWS
    parts = q.reshape(tiles, TILE_ROWS, -1, 8, 4)  # t r b c i
    return parts.permute(0, 2, 3, 1, 4).reshape(tiles, -1).contiguous()


def _register_int8_tiles(module: nn.Module, weight: Int8Weight) -> None:
    """The int8 kernels' buffers: `q`, the weight in tiles (2 MiB pages), and `scale`,
    float32, one per output of the tiles (zero past the weight's last row)."""
    module.register_buffer("q", _streamed(_i8_tiles(weight.q)))
    module.register_buffer("scale", _pad_rows(weight.scale.float()))


def _tile_outputs(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A tiled kernel's outputs without the rows that padded its weight to whole tiles."""
    return y if y.shape[-1] == module.out_features else y[..., : module.out_features]


def _by_tile(t: torch.Tensor) -> torch.Tensor:
    """Per-group values [out, groups] as [tiles, groups, 8]: a tile's rows side by side."""
    t = _pad_rows(t)
    return t.reshape(-1, TILE_ROWS, t.shape[1]).transpose(1, 2).contiguous()


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with zero rows appended up to a multiple of TILE_ROWS."""
    extra = -t.shape[0] % TILE_ROWS
    return t if not extra else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


def _contiguous_groups(w: GroupedWeight) -> tuple[torch.Tensor | None, torch.Tensor, int] | None:
    """(perm, groups, size): the input permutation that makes groups contiguous (None when
    they are already: no act-order), the group ids in that order, and the inputs per group;
    None when groups differ in size."""
    perm, g_idx = None, w.g_idx
    if bool((g_idx[1:] < g_idx[:-1]).any()):  # act-order
        perm = torch.argsort(g_idx, stable=True)
        g_idx = g_idx[perm]
    groups, counts = torch.unique_consecutive(g_idx, return_counts=True)
    size = int(counts[0])
    return None if bool((counts != size).any()) else (perm, groups, size)


def _4bit_integers(t: torch.Tensor) -> bool:
    return bool(((t == t.round()) & (t >= 0) & (t <= 15)).all())


def _fp16_normal(t: torch.Tensor) -> bool:
    """Whether fp16 holds every value of `t` with its full 11-bit precision (or as 0)."""
    a = t.abs()
    return bool(((a == 0) | ((a >= 2.0**-14) & (a <= 65504))).all())


def _int4_kernel_on(device: torch.device) -> bool:
    """CPU always; CUDA from compute capability 8.0 (tinygemm's bf16 tensor-core path)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def _cuda_decode_weight(q, scales, zeros, group_size: int, device: torch.device, gated: bool):
    """(tiles, scales, group size, gated, variants) for llmkit's CUDA kernel of a few rows,
    from `q` (uint8, on `device`), its rows in cuda_int4.gated_order where `gated`; None off
    CUDA, where the kernel cannot take the shape or the scales, or where it does not compile
    (tinygemm then takes every batch)."""
    if device.type != "cuda" or not cuda_int4.fits(*q.shape, group_size):
        return None
    if gated:
        order = cuda_int4.gated_order(q.shape[0])
        q, scales, zeros = q[order.to(q.device)], scales[order], zeros[order]
    scales = cuda_int4.pack_scales(scales, zeros)
    if scales is None:
        return None
    try:
        cuda_int4.kernels(device)
        variants = cuda_int4.variants_for(q.shape[0], group_size, gated, device)
    except (OSError, RuntimeError) as e:
        # shown once: Python's default filter reports a warning once per place and text
        reason = f"llmkit's CUDA 4-bit kernel is unavailable ({e}); tinygemm runs instead"
        warnings.warn(reason, stacklevel=2)
        return None
    tiles, scales = cuda_int4.pack(q), scales.to(device)
    variants = cuda_int4.timed_variants(tiles, scales, group_size, gated, variants)
    return tiles, scales, group_size, gated, variants


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Unsigned 4-bit `q` [out, in] (uint8, on `device`) in the int4 kernel's layout (None
    when CUDA's kernel cannot tile the inputs)."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)
    # CUDA takes two values a byte, the even input in the high nibble, and tiles the inputs
    # by 16 * inner_k_tiles (2, 4 or 8; more is faster).
    inner = next((t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0), None)
    if inner is None:
        return None
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(packed, inner)


class Parallel(nn.Module):
    """Sibling Linears that could not be merged: run each, outputs side by side."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

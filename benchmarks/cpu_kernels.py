"""llmkit's CPU kernels against the torch paths they replace, same inputs, same process.

- decode attention (`paged_attention`, one layer's call in a decode step): 64 sequences with
  contexts uniform in [32, 384] (seed 0), 12 heads over 4 KV heads, head_dim 64, block size
  16, blocks scattered over a 2000-block bf16 cache (the engine benchmark's shapes); anchor:
  the same call on the torch path (K/V written with index_copy_, blocks gathered, batched
  matmuls);
- silu(gate) * up on [64, 2 x 2048] and [2048, 2 x 2048] bf16 (a decode step and a prefill
  chunk of small-llama's MLP); anchor: `F.silu(gate) * up`;
- where the CPU has AVX512-BF16: a bf16 Linear of small-llama's gate_up shape (4096 x 768),
  16 different weights a call (100 MB, so they stream from memory as a step's do), at 1, 64
  and 512 rows, through PairsLinear; anchor: oneDNN's bf16 product on the weights prepacked
  for it (`mkldnn._linear_pointwise`, what bf16 Linears ran on such CPUs before);
- a float32 Linear of the same shape, 16 weights a call (200 MB), at 1, 8 and 64 rows,
  through DenseLinear (llmkit's dense kernel up to 64 rows); anchor: `F.linear` (MKL), what
  float32 Linears ran on before.

Each is timed as the median of 7 repeats of 20 calls, kernel and anchor alternating, with 2
threads; printed as milliseconds per call and anchor / kernel (above 1: the kernel is faster).

    python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from report import row, save_result

from llmkit.kernels import cpu
from llmkit.runtime.layers import attention
from llmkit.runtime.layers.attention import AttentionMetadata, paged_attention
from llmkit.runtime.layers.linear import DenseLinear, PairsLinear, pair_products_here

THREADS, REPEATS, CALLS = 2, 7, 20


def per_call_ms(pairs) -> tuple[float, float]:
    """Median ms per call of (kernel, anchor), timed alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(REPEATS):
        for i, fn in enumerate(pairs):
            fn()
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times[i].append((time.perf_counter() - start) / CALLS * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def decode_case():
    g = torch.Generator().manual_seed(0)
    seqs, heads, kv_heads, dim, block, num_blocks = 64, 12, 4, 64, 16, 2000
    shape = (num_blocks, kv_heads, block, dim)
    k_cache = torch.randn(shape, generator=g).bfloat16()
    v_cache = torch.randn(shape, generator=g).bfloat16()
    lens = torch.randint(32, 385, (seqs,), generator=g)
    width = int(-(-lens.max() // block))
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in range(seqs)])
    last = lens - 1  # each sequence's new token goes to its last position
    slots = tables[torch.arange(seqs), last // block] * block + last % block
    q = torch.randn(seqs, heads, dim, generator=g).bfloat16()
    k, v = (torch.randn(seqs, kv_heads, dim, generator=g).bfloat16() for _ in range(2))
    torch_path = attention._cpu_kernels

    def run(kernels: bool):
        attention._cpu_kernels = torch_path if kernels else lambda *_: None
        try:  # a fresh metadata each call: the torch path derives its index and mask per step
            meta = AttentionMetadata(slots, seqs, tables, lens)
            paged_attention(q, k, v, k_cache, v_cache, meta, dim**-0.5)
        finally:
            attention._cpu_kernels = torch_path

    return (lambda: run(True)), (lambda: run(False))


def silu_case(rows: int):
    gate_up = torch.randn(rows, 2 * 2048, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    return (lambda: cpu.ops().silu_mul(gate_up)), (lambda: F.silu(gate) * up)


def bf16_linear_case(rows: int, copies: int = 16):
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(4096, 768, generator=g).bfloat16() for _ in range(copies)]
    pairs = [PairsLinear.build(w, None) for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    x = torch.randn(rows, 768, generator=g).bfloat16()

    def onednn():
        for w in packed:
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    return (lambda: [p(x) for p in pairs]), onednn


def float32_linear_case(rows: int, copies: int = 16):
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(4096, 768, generator=g) for _ in range(copies)]
    dense = [DenseLinear(w, None) for w in weights]
    x = torch.randn(rows, 768, generator=g)
    return (lambda: [d(x) for d in dense]), (lambda: [F.linear(x, w) for w in weights])


def main() -> None:
    if cpu.ops() is None:
        raise SystemExit("llmkit's CPU kernels could not be built here")
    torch.set_num_threads(THREADS)
    cases = {
        "decode attention, 64 seqs": decode_case(),
        "silu * up, 64 rows": silu_case(64),
        "silu * up, 2048 rows": silu_case(2048),
    }
    if pair_products_here():
        for rows in (1, 64, 512):
            cases[f"bf16 Linear x16, {rows} rows"] = bf16_linear_case(rows)
    for rows in (1, 8, 64):
        cases[f"float32 Linear x16, {rows} rows"] = float32_linear_case(rows)
    print(f"{'case':28} {'kernel ms':>10} {'torch ms':>10} {'torch / kernel':>15}")
    times, summary = {}, []
    for name, pair in cases.items():
        kernel_ms, anchor_ms = times[name] = per_call_ms(pair)
        print(f"{name:28} {kernel_ms:10.3f} {anchor_ms:10.3f} {anchor_ms / kernel_ms:15.2f}")
        summary.append(
            row(
                f"{name}, ms a call (ratio: torch / kernel)",
                f"{kernel_ms:.3f} ms",
                f"{anchor_ms:.3f} ms",
                anchor_ms / kernel_ms,
            )
        )
    fields = {"ms_per_call": {name: {"kernel": k, "torch": a} for name, (k, a) in times.items()}}
    anchor = "the torch path the kernel replaces"
    save_result("cpu_kernels", fields, f"{THREADS} threads", anchor=anchor, summary=summary)


if __name__ == "__main__":
    main()

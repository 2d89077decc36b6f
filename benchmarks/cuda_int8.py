"""INT8 products on CUDA at Llama-3-8B's linear shapes, per activation rows: the weight-only
product as a bf16 Int8Linear runs it (`llmkit`: llmkit's tensor-core kernel, kernels/
cuda_int8.py, up to its MAX_ROWS rows, else the Triton product), each of the two (`cuda`,
`triton`: kernels/triton_int8.py, the tile TILES gives the rows), the bf16 weight through
cuBLAS, and at 1 row torch's `_weight_int8pack_mm` (a thread per output, reading its row
alone); W8A8 as W8A8Linear runs it (the Triton row quantization, then the tensor-core kernel
up to MAX_ROWS rows, the Triton product up to its TRITON_ROWS, else torch._int_mm), with
each product after the Triton quantization at every row count it takes (where the
thresholds lie), and the torch ops it falls back to without the kernels
(quantize_per_token, torch._int_mm with fewer than 17 rows padded to 32, the scales). The
kernels are launched as in a decode step, llmkit's CUDA one as a programmatic dependent of
the call before it. Each is the median time of a call inside a CUDA graph of 24 calls that
cycle through copies of the weight larger than the L2 together (benchmarks/cuda_int4.py's
graph_ms: every call reads its weight from memory, as a decode step does), and what that is
in GB/s of the weight's bytes. At 1, 16, 64 and 512 rows also each candidate tile of TUNE
(the data for TILES), and each weight-only product's largest difference from the float32
product of the dequantized weight. A diagnostic for benchmarks/cuda.py's int8 and w8a8 rows,
without targets.

    python benchmarks/cuda_int8.py [--rows 1,2,4,8,16,64,512] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from cuda_int4 import CALLS, EVICT_BYTES, SHAPES, graph_ms

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) timed beside the chosen tile, by rows
TUNE = {
    1: [(16, 16, 256, 4, 4), (16, 16, 512, 4, 3), (16, 32, 256, 4, 4), (16, 16, 128, 4, 6),
        (16, 64, 128, 4, 4), (16, 16, 256, 2, 4), (16, 32, 512, 4, 3), (16, 16, 1024, 4, 2)],
    64: [(64, 32, 128, 4, 4), (64, 64, 64, 4, 4), (64, 64, 128, 8, 3), (32, 64, 128, 4, 4)],
    512: [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
}  # fmt: skip
TUNE[16] = TUNE[1]
DEVICE = "cuda"  # (a check of the script's logic may set "cpu", under Triton's interpreter)


def weights(n: int, k: int, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`copies` random int8 weights [n, k] with float32 scales, on the GPU."""
    out = []
    for seed in range(copies):
        g = torch.Generator(DEVICE).manual_seed(seed)
        q = torch.randint(-127, 128, (n, k), generator=g, device=DEVICE, dtype=torch.int8)
        out.append((q, torch.rand(n, generator=g, device=DEVICE) * 0.01 + 0.001))
    return out


def timed(calls: list) -> float:
    return graph_ms([calls[i % len(calls)] for i in range(CALLS)])


def measure(name: str, n: int, k: int, rows_list: list[int]) -> list[dict]:
    from llmkit.kernels import cuda_int8, triton_int8

    int8_bytes = n * k + 4 * n
    ws = weights(n, k, max(2, math.ceil(EVICT_BYTES / int8_bytes)))
    dense = [(q.bfloat16() * s[:, None]).bfloat16() for q, s in ws[: max(2, len(ws) // 2)]]
    results = []
    for rows in rows_list:
        x = torch.randn(rows, k, device=DEVICE).bfloat16()
        row = {"shape": name, "n": n, "k": k, "rows": rows,
               "tile": list(triton_int8.tile_for(rows))}  # fmt: skip
        products = {"triton": triton_int8.int8_linear}
        if rows <= cuda_int8.MAX_ROWS:
            products["cuda"] = cuda_int8.matmul
        q, s = ws[0]
        want = x.float() @ (q.float() * s[:, None]).t()
        for label, product in products.items():
            row[f"{label}_ms"] = timed([lambda q=q, s=s, x=x, f=product: f(x, q, s) for q, s in ws])
            got = product(x, q, s).float()
            row[f"{label}_max_diff_vs_float32"] = float((got - want).abs().max() / want.abs().max())
        row["llmkit_ms"] = row["cuda_ms" if "cuda" in products else "triton_ms"]
        row["bf16_ms"] = timed([lambda w=w, x=x: x @ w.t() for w in dense])
        if rows == 1:
            halves = [(q, s.to(x.dtype)) for q, s in ws]  # its scales: the activations' dtype
            naive = [lambda q=q, s=s, x=x: torch._weight_int8pack_mm(x, q, s) for q, s in halves]
            try:
                row["torch_int8pack_ms"] = timed(naive)
            except (NotImplementedError, RuntimeError) as e:  # a torch without it on CUDA
                row["torch_int8pack_ms"] = f"unavailable: {e}"
        for tile in TUNE.get(rows, ()):
            calls = [lambda q=q, s=s, t=tile, x=x: triton_int8.int8_linear(x, q, s, t)
                     for q, s in ws]  # fmt: skip
            row["tile_" + "_".join(map(str, tile)) + "_ms"] = timed(calls)
        row.update(w8a8_ms(x, ws))
        row["llmkit_gb_s"] = int8_bytes / row["llmkit_ms"] / 1e6
        row["bf16_gb_s"] = 2 * n * k / row["bf16_ms"] / 1e6
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def w8a8_ms(x: torch.Tensor, ws: list) -> dict:
    """W8A8 on the same weights: as W8A8Linear runs it, with each product that takes the
    rows after the Triton quantization, and as the torch ops it falls back to."""
    from llmkit.kernels import cuda_int8, triton_int8
    from llmkit.quant import int8
    from llmkit.runtime.layers.linear import W8A8Linear, _int_mm_on_cuda

    def cuda(q, s):
        xq, x_scale = triton_int8.quantize_rows(x)
        return cuda_int8.w8a8(xq, x_scale, q, s)

    def triton(q, s):
        xq, x_scale = triton_int8.quantize_rows(x)
        return triton_int8.w8a8_linear(xq, x_scale, q, s, x.dtype)

    def int_mm(q, s):
        xq, x_scale = triton_int8.quantize_rows(x)
        return (_int_mm_on_cuda(xq, q.t()).float() * x_scale[:, None] * s).to(x.dtype)

    def torch_ops(q, s):
        xq, x_scale = int8.quantize_per_token(x)
        return (_int_mm_on_cuda(xq, q.t()).float() * x_scale * s).to(x.dtype)

    rows = len(x)
    paths = {"cuda": cuda} if rows <= cuda_int8.MAX_ROWS else {}
    paths |= {"triton": triton, "int_mm": int_mm, "torch": torch_ops}
    used = next(iter(paths)) if rows <= W8A8Linear.TRITON_ROWS else "int_mm"
    paths = {"w8a8": paths[used], **{f"w8a8_{name}": f for name, f in paths.items()}}
    return {f"{name}_ms": timed([lambda q=q, s=s, f=f: f(q, s) for q, s in ws])
            for name, f in paths.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,64,512")
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(json.dumps({"gpu": torch.cuda.get_device_name()}), flush=True)
    results = [r for name, (n, k) in SHAPES.items() for r in measure(name, n, k, rows)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
